"""The report as one self-contained HTML page: no network, no JavaScript, the chart embedded
as a PNG data URI (matplotlib, the `html` extra); a plain table when matplotlib is missing."""

from __future__ import annotations

import base64
import html
import io

from graphopt.report import Report, change, human, percent, quality_lines

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1100px}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px}
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f0f0f0}
.big{font-size:1.4em}.good{color:#1a7f37}.bad{color:#b35900}.note{color:#666}img.chart{max-width:100%}
"""


def chart_png(report: Report) -> bytes | None:
    """Parameters per site before/after as a horizontal bar chart; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    sites = report.sites
    if not sites:
        return None
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.22 * len(sites)))
    ys = range(len(sites))
    ax.barh(
        [y + 0.2 for y in ys],
        [s.params_before for s in sites],
        height=0.4,
        label="before",
        color="#999999",
    )
    ax.barh(
        [y - 0.2 for y in ys],
        [s.params_after for s in sites],
        height=0.4,
        label="after",
        color="#1a7f37",
    )
    ax.set_yticks(list(ys), [s.name[-32:] for s in sites], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("parameters (log scale)")
    ax.set_title("Parameters per site")
    # outside the plot, right of it: inside, it hid the longest bars (issue 24)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def quality_png(report: Report) -> bytes | None:
    """Trainable parameters against held-out agreement (or output error) at every point the
    calibration tried; None without matplotlib or without such points."""
    quality = report.quality
    points = [] if quality is None else quality.ladder + quality.curve
    if not points:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    scores = quality.agreement is not None
    key, label = ("agreement", "top-1 agreement") if scores else ("output_error", "output error")
    fig, ax = plt.subplots(figsize=(7, 4))
    for series, name, marker in (
        (quality.ladder, "--groups auto bounds", "o"),
        (quality.curve, "sites left as they were", "s"),
    ):
        if series:
            ax.plot(
                [p["trainable_params_after"] for p in series],
                [p[key] for p in series],
                marker=marker,
                label=name,
            )
    ax.scatter(
        [report.totals.trainable_params_after],
        [quality.agreement if scores else quality.output_error],
        s=120,
        facecolors="none",
        edgecolors="#b35900",
        label="chosen",
        zorder=3,
    )
    ax.axvline(report.totals.trainable_params_before, color="#999999", ls=":", label="original")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(f"held-out {label}")
    ax.set_title("Parameters against agreement with the original")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _quality(report: Report) -> list[str]:
    """The quality lines and the parameters-against-agreement plot ([] without data)."""
    lines = quality_lines(report)
    if not lines:
        return []
    parts = [f"<h3>{html.escape(lines[0])}</h3>", "<ul>"]
    parts += [f"<li>{html.escape(line.strip())}</li>" for line in lines[1:]]
    parts.append("</ul>")
    png = quality_png(report)
    if png is not None:
        data = base64.b64encode(png).decode()
        parts.append(
            f'<img class=chart alt="Parameters against agreement" '
            f'src="data:image/png;base64,{data}">'
        )
    return parts


def _row(cells, header=False) -> str:
    tag = "th" if header else "td"
    out = []
    for c in cells:
        numeric = isinstance(c, (int, float)) and not isinstance(c, bool)
        text = f"{c:,}" if isinstance(c, int) and not isinstance(c, bool) else html.escape(str(c))
        out.append(f"<{tag}{' class=n' if numeric else ''}>{text}</{tag}>")
    return "<tr>" + "".join(out) + "</tr>"


def _changed(pct: float) -> str:
    """'reduced by <b>X%</b>', or 'grew by' for a model that grew (never a negative cut)."""
    verb, value = change(pct).rsplit(" ", 1)
    return f"{verb} <b class={'good' if pct >= 0 else 'bad'}>{value}</b>"


def _section(report: Report) -> str:
    t = report.totals
    parts = [
        f"<h2>{html.escape(report.model)}</h2>",
        f"<p class=big>Trainable parameters {_changed(t.reduction_pct)}"
        f": {t.trainable_params_before:,} → {t.trainable_params_after:,}</p>",
        f"<p>{report.backend} model, {report.mode} mode, min {report.min_channels_per_group} "
        f"channels per group; {len(report.sites)} sites rewritten, {len(report.skipped)} "
        "skipped.</p>",
        "<table>",
        _row(["", "before", "after", "saved"], header=True),
    ]
    for label, before, after, pct in report.totals_rows():
        parts.append(
            _row(
                [
                    label,
                    "–" if before is None else before,
                    "–" if after is None else after,
                    "–" if pct is None else percent(pct),
                ]
            )
        )
    for t in report.latency or []:  # --latency: onnxruntime, spinning off, threads pinned
        label = f"latency ms, batch {t.batch} ({t.provider}, {t.threads} threads)"
        saved = f"{100 * (1 - t.ratio):.2f}%"
        parts.append(_row([label, f"{t.original_ms:.2f}", f"{t.rewritten_ms:.2f}", saved]))
    parts.append("</table>")
    parts += [f"<p class=note>Note: {html.escape(note)}.</p>" for note in report.notes]
    parts += _quality(report)
    png = chart_png(report)
    if png is not None:
        data = base64.b64encode(png).decode()
        parts.append(
            f'<img class=chart alt="Parameters per site before and after" '
            f'src="data:image/png;base64,{data}">'
        )
    elif report.sites:
        parts.append(
            "<p class=note>No chart: install matplotlib (pip install 'pwgroup[html]') for one.</p>"
        )
    parts += [
        "<table>",
        _row(
            [
                "site",
                "Cin",
                "F",
                "groups",
                "step",
                "L",
                "params before",
                "params after",
                "MACs before",
                "MACs after",
            ],
            header=True,
        ),
    ]
    for s in report.sites:
        parts.append(
            _row(
                [
                    s.name,
                    s.cin,
                    s.filters,
                    s.groups,
                    s.interleave_step,
                    "yes" if s.has_l else "no",
                    s.params_before,
                    s.params_after,
                    human(s.macs_before),
                    human(s.macs_after),
                ]
            )
        )
    parts.append("</table>")
    if report.skipped:
        parts += ["<table>", _row(["skipped", "reason"], header=True)]
        parts += [_row([sk.name, sk.reason]) for sk in report.skipped]
        parts.append("</table>")
    return "\n".join(parts)


def render_html(reports: list[Report]) -> str:
    body = "\n".join(_section(r) for r in reports)
    return (
        f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>pwgroup report</title><style>{_STYLE}</style></head>\n<body>\n"
        f"<h1>pwgroup savings report</h1>\n{body}\n</body></html>\n"
    )
