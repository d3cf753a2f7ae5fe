"""The savings report: plans of all sites and model totals, as text, JSON, Markdown."""

from __future__ import annotations

import json
import os
import textwrap
from dataclasses import dataclass, field

from graphopt.plan import SitePlan, Skipped
from graphopt.quality import few_held_out

SCHEMA_VERSION = 2
SCHEMA_PATH = os.path.join(os.path.dirname(__file__), "schema", "report.schema.json")


def change(pct: float) -> str:
    """How the report words a change of parameters: a growth is never called a reduction."""
    return f"grew by {-pct:.2f}%" if pct < 0 else f"reduced by {pct:.2f}%"


def _pct(before: int | None, after: int | None) -> float:
    if not before or after is None:
        return 0.0
    return round(100.0 * (before - after) / before, 2)


def _saved(before: int | None, after: int | None) -> float | None:
    """The saving a renderer shows: None (printed as a dash) where a count is unknown."""
    return None if before is None or after is None else _pct(before, after)


@dataclass
class Totals:
    """Counts for the whole model, as the framework itself reports them."""

    params_before: int
    params_after: int
    trainable_params_before: int
    trainable_params_after: int
    file_size_before: int | None = None
    file_size_after: int | None = None

    @property
    def reduction_pct(self) -> float:
        """Reduction of trainable parameters, the figure of the paper's Table 2."""
        return _pct(self.trainable_params_before, self.trainable_params_after)

    @property
    def params_reduction_pct(self) -> float:
        return _pct(self.params_before, self.params_after)


@dataclass
class Report:
    """Everything a rewrite found and changed; the one thing renderers and tests read."""

    model: str
    backend: str
    mode: str
    min_channels_per_group: int
    totals: Totals
    sites: list[SitePlan] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    quality: object = None
    """calibrate.Quality when data was given: agreement with the original on held-out samples."""
    latency: list | None = None
    """--latency: onnx_timing.Latency per batch size (None when not measured)."""
    notes: list[str] = field(default_factory=list)
    """What the figures leave out (e.g. integer weights of quantized convs), one sentence each."""

    @property
    def site_macs_before(self) -> int | None:
        return _sum_or_none(s.macs_before for s in self.sites)

    @property
    def site_macs_after(self) -> int | None:
        return _sum_or_none(s.macs_after for s in self.sites)

    def totals_rows(self) -> list[tuple[str, int | None, int | None, float | None]]:
        """(label, before, after, saved %) of the totals block every renderer shows; None
        where a count is unknown (dynamic shapes, a file not measured)."""
        t = self.totals
        return [
            ("parameters", t.params_before, t.params_after, t.params_reduction_pct),
            (
                "trainable parameters",
                t.trainable_params_before,
                t.trainable_params_after,
                t.reduction_pct,
            ),
            (
                "pointwise MACs",
                self.site_macs_before,
                self.site_macs_after,
                _saved(self.site_macs_before, self.site_macs_after),
            ),
            (
                "file size (bytes)",
                t.file_size_before,
                t.file_size_after,
                _saved(t.file_size_before, t.file_size_after),
            ),
        ]

    def to_dict(self) -> dict:
        totals = {
            "params_before": self.totals.params_before,
            "params_after": self.totals.params_after,
            "trainable_params_before": self.totals.trainable_params_before,
            "trainable_params_after": self.totals.trainable_params_after,
            "reduction_pct": self.totals.reduction_pct,
            "params_reduction_pct": self.totals.params_reduction_pct,
            "site_macs_before": self.site_macs_before,
            "site_macs_after": self.site_macs_after,
            "file_size_before": self.totals.file_size_before,
            "file_size_after": self.totals.file_size_after,
            "sites": len(self.sites),
            "skipped": len(self.skipped),
        }
        data = {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "backend": self.backend,
            "mode": self.mode,
            "min_channels_per_group": self.min_channels_per_group,
            "totals": totals,
            "sites": [s.as_dict() for s in self.sites],
            "skipped": [s.as_dict() for s in self.skipped],
            **({"latency": [t.as_dict() for t in self.latency]} if self.latency else {}),
            **({"notes": list(self.notes)} if self.notes else {}),
        }
        if self.quality is not None:
            data["quality"] = self.quality.as_dict()
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def to_text(self, width: int = 80, color: bool = False) -> str:
        return render_text(self, width, color)

    def to_markdown(self) -> str:
        return render_markdown(self)


def _sum_or_none(values) -> int | None:
    total = 0
    for v in values:
        if v is None:
            return None
        total += v
    return total


def human(n: int | None) -> str:
    """12,345,678 -> '12.3M'; short enough for an 80-column table."""
    if n is None:
        return "-"
    for unit, size in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def shorten(name: str, width: int) -> str:
    """Keep both ends of a long layer name: 'block6a_expand_conv' -> 'block6…d_conv'."""
    if len(name) <= width:
        return name
    head = (width - 1) // 2
    tail = width - 1 - head
    return name[:head] + "…" + name[-tail:]


def wrap(line: str, width: int) -> list[str]:
    """A line too long for the terminal over several, broken between words, so that no
    figure is cut off; the lines after the first are indented under it."""
    indent = " " * (len(line) - len(line.lstrip()) + 2)
    return textwrap.wrap(line, width, subsequent_indent=indent, break_on_hyphens=False) or [""]


def percent(pct: float | None) -> str:
    """A saving as the tables print it; a dash where it is unknown."""
    return "-" if pct is None else f"{pct:.2f}%"


_COLUMNS = ("Cin", "F", "N", "step", "L", "params", "after", "MACs", "after")
_KIND_LABELS = {"conv": "conv", "separable": "sep", "dense": "dense", "matmul": "mm"}
KIND_NOTE = "kind: sep = pointwise half of a separable conv, mm = MatMul/Gemm"


def _shows_kind(report: Report) -> bool:
    """The kind column appears only when some site is not a plain 1x1 conv."""
    return any(s.kind != "conv" for s in report.sites)


def _site_row(s: SitePlan) -> tuple:
    return (
        s.cin,
        s.filters,
        s.groups,
        s.interleave_step,
        "yes" if s.has_l else "no",
        human(s.params_before),
        human(s.params_after) + ("" if s.saves else "!"),
        human(s.macs_before),
        human(s.macs_after) + ("*" if s.runs_folded else ""),
    )


FOLDED_NOTE = "{n} folded: the file holds K and L; onnxruntime runs them as one dense conv"
NO_SAVING_NOTE = "{n} save nothing (paper mode rewrites them as the paper did; linear skips them)"


def _ms(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def latency_summary(report: Report) -> str:
    """One line on --latency ("" without it): medians per batch size, rewritten/original."""
    if not report.latency:
        return ""
    first = report.latency[0]
    runs = ", ".join(
        f"batch {t.batch} {_ms(t.original_ms)} -> {_ms(t.rewritten_ms)} ms ({t.ratio:.2f}x)"
        for t in report.latency
    )
    return f"latency ({first.provider}, {first.threads} threads, no spinning): {runs}"


def fit_summary(report: Report) -> str:
    """One line on the --init fit errors ("" without a fit)."""
    errors = sorted((s.fit_error, s.name) for s in report.sites if s.fit_error is not None)
    if not errors:
        return ""
    median = errors[len(errors) // 2][0]
    return (
        f"fit: relative kernel error {errors[0][0]:.3f} to {errors[-1][0]:.3f}, "
        f"median {median:.3f} (worst: {errors[-1][1]})"
    )


def quality_lines(report: Report) -> list[str]:
    """The lines on agreement with the original ([] without calibration data)."""
    quality = report.quality
    if quality is None:
        return []
    if quality.calibrated:
        head = (
            f"quality (calibrated on {quality.fit_samples} samples, figures on "
            f"{quality.held_out_samples} held-out samples):"
        )
    else:
        head = f"quality (measured on {quality.held_out_samples} samples, nothing fitted):"
    lines = [head]
    lines += few_held_out(quality.held_out_samples)
    for o in quality.outputs:
        top1 = "" if o.agreement is None else f"top-1 agreement {100 * o.agreement:.2f}%, "
        lines.append(
            f"  output {o.name}: {top1}relative error {o.relative_error:.4f}, cosine {o.cosine:.4f}"
        )
    errors = sorted((s.site_error, s.name) for s in report.sites if s.site_error is not None)
    if errors:
        lines.append(
            f"  site errors {errors[0][0]:.3f} to {errors[-1][0]:.3f}, median "
            f"{errors[len(errors) // 2][0]:.3f} (worst: {errors[-1][1]})"
        )
    kept = [s.name for s in report.sites if s.site_error is None]
    if quality.calibrated and kept:
        lines.append(  # docs/calibration.md: which sites calibration cannot fit
            f"  {len(kept)} of {len(report.sites)} sites not fitted, fresh init (first: {kept[0]})"
        )
    in_context = [s for s in report.sites if s.context_error is not None]
    if in_context:
        worst = max(in_context, key=lambda s: s.context_error)
        lines.append(
            f"  in context {min(s.context_error for s in in_context):.3f} to "
            f"{worst.context_error:.3f}, last site {in_context[-1].context_error:.3f} (inside "
            f"the rewritten model, drift from upstream included; worst: {worst.name})"
        )
    distill = getattr(quality, "distill", None) or {}
    if distill:
        lines.append(
            f"  distilled {distill['steps']} steps in {distill['seconds']:.0f} s (sites only); "
            f"before it {_share(distill['agreement_before'])}, relative error "
            f"{distill['output_error_before']:.4f}"
            + (
                "; it made them worse: calibrated weights kept"
                if distill["kept_calibrated"]
                else ""
            )
        )
    if len(quality.curve) > 1:
        first, last = quality.curve[0], quality.curve[-1]
        lines.append(
            f"  accuracy control: {len(last['sites_left'])} sites left as they were; "
            f"{_share(first['agreement'])} at {first['reduction_pct']:.2f}% fewer parameters -> "
            f"{_share(last['agreement'])} at {last['reduction_pct']:.2f}%"
        )
    return lines


def _share(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}% agreement"


def _paint(text: str, code: str, color: bool) -> str:
    return f"\033[{code}m{text}\033[0m" if color else text


def render_text(report: Report, width: int = 80, color: bool = False) -> str:
    """The terminal table: fits `width` columns (long names keep both ends); ANSI when color."""
    widths = (5, 5, 4, 4, 3, 7, 7, 7, 7)
    columns, kinds = _COLUMNS, _shows_kind(report)
    if kinds:
        widths, columns = (5,) + widths, ("kind",) + columns
    name_width = max(12, width - sum(w + 1 for w in widths) - 1)
    lines = [
        f"pwgroup {report.mode} mode, min {report.min_channels_per_group} channels per group: "
        f"{report.model}"
    ]
    header = "site".ljust(name_width) + " " + " ".join(c.rjust(w) for c, w in zip(columns, widths))
    lines += [_paint(header, "1", color), "-" * len(header)]
    for s in report.sites:
        row = ((_KIND_LABELS[s.kind],) if kinds else ()) + _site_row(s)
        cells = " ".join(str(v).rjust(w) for v, w in zip(row, widths))
        lines.append(shorten(s.name, name_width).ljust(name_width) + " " + cells)
    if not report.sites:
        lines.append("(no pointwise convolution could be grouped)")
    lines += [part for line in _notes(report, kinds) for part in wrap(line, width)]
    if report.skipped:
        lines.append(f"skipped {len(report.skipped)}:")
        for sk in report.skipped:
            lines += wrap(f"  {shorten(sk.name, 30)}: {sk.reason}", width)
    lines.append("")
    lines += _totals_lines(report, color)
    lines += [part for note in report.notes for part in wrap(f"note: {note}", width)]
    timing = latency_summary(report)
    if timing:
        lines.append(timing)  # not shortened: the figures are the point
    return "\n".join(lines) + "\n"


def _notes(report: Report, kinds: bool) -> list[str]:
    """The lines under the site table: what its marks mean, the fit, the quality."""
    lines = []
    if kinds and any(s.kind in ("separable", "matmul") for s in report.sites):
        lines.append(KIND_NOTE)
    folded = sum(s.runs_folded for s in report.sites)
    if folded:
        lines.append("* " + FOLDED_NOTE.format(n=folded))
    grow = sum(not s.saves for s in report.sites)
    if grow:
        lines.append("! " + NO_SAVING_NOTE.format(n=grow))
    fit = fit_summary(report)
    return lines + ([fit] if fit else []) + quality_lines(report)


def _totals_lines(report: Report, color: bool = False) -> list[str]:
    t = report.totals
    rows = [r for r in report.totals_rows() if r[1] is not None or r[0] != "file size (bytes)"]
    out = [f"{'':22}{'before':>15}{'after':>15}{'saved':>9}"]
    for label, before, after, pct in rows:
        b = "-" if before is None else f"{before:,}"
        a = "-" if after is None else f"{after:,}"
        out.append(f"{label:22}{b:>15}{a:>15}{percent(pct):>9}")
    pct = _paint(change(t.reduction_pct), "1;32" if t.reduction_pct > 0 else "1;33", color)
    out.append(
        f"{len(report.sites)} sites rewritten, {len(report.skipped)} skipped; "
        f"trainable parameters {pct}"
    )
    return out


def render_markdown(report: Report) -> str:
    t = report.totals
    lines = [
        f"### pwgroup: `{report.model}` ({report.mode} mode)",
        "",
        f"**Trainable parameters {change(t.reduction_pct)}**: "
        f"{t.trainable_params_before:,} → {t.trainable_params_after:,} "
        f"({len(report.sites)} sites rewritten, {len(report.skipped)} skipped).",
        "",
        "| | before | after | saved |",
        "|---|---:|---:|---:|",
    ]
    for label, before, after, pct in report.totals_rows():
        b = "–" if before is None else f"{before:,}"
        a = "–" if after is None else f"{after:,}"
        lines.append(f"| {label} | {b} | {a} | {'–' if pct is None else percent(pct)} |")
    lines += [f"\nNote: {note}." for note in report.notes]
    timing = latency_summary(report)
    if timing:
        lines += ["", timing.replace("->", "→")]
    quality = quality_lines(report)
    if quality:
        lines += ["", quality[0], ""] + [f"- {line.strip()}" for line in quality[1:]]
    lines += [
        "",
        "<details><summary>Sites</summary>",
        "",
    ]
    kinds = _shows_kind(report)
    kind_head, kind_rule = ("kind | ", "---|") if kinds else ("", "")
    lines += [
        f"| site | {kind_head}Cin | F | groups | step | L | params before | after "
        "| MACs before | after |",
        f"|---|{kind_rule}---:|---:|---:|---:|:-:|---:|---:|---:|---:|",
    ]
    for s in report.sites:
        kind = f"{s.kind} | " if kinds else ""
        lines.append(
            f"| `{s.name}` | {kind}{s.cin} | {s.filters} | {s.groups} | {s.interleave_step} | "
            f"{'yes' if s.has_l else 'no'} | {s.params_before:,} | {s.params_after:,}"
            f"{'' if s.saves else '!'} | "
            f"{human(s.macs_before)} | {human(s.macs_after)}{'*' if s.runs_folded else ''} |"
        )
    folded = sum(s.runs_folded for s in report.sites)
    if folded:
        lines += ["", "\\* " + FOLDED_NOTE.format(n=folded)]
    grow = sum(not s.saves for s in report.sites)
    if grow:
        lines += ["", "! " + NO_SAVING_NOTE.format(n=grow)]
    fit = fit_summary(report)
    if fit:
        lines += ["", fit]
    if report.skipped:
        lines += ["", "| skipped | reason |", "|---|---|"]
        lines += [f"| `{sk.name}` | {sk.reason} |" for sk in report.skipped]
    lines += ["", "</details>", ""]
    return "\n".join(lines)
