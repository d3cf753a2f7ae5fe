"""The report in every format, for a Keras and an ONNX model: the numbers agree with the JSON,
the JSON validates against the shipped schema, the HTML chart is there and visible."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import jsonschema
import onnx
import pytest

import graphopt
from fixtures import keras_models, onnx_models
from graphopt.report import SCHEMA_PATH
from graphopt.report_html import render_html
from tests.conftest import run_pwgroup

SCHEMA = json.load(open(SCHEMA_PATH))


def _reports():
    _, keras_report = graphopt.rewrite(keras_models.residual(), name="residual.keras")
    _, onnx_report = graphopt.rewrite(onnx_models.pytorch_style(), name="pytorch_style.onnx")
    keras_report.totals.file_size_before, keras_report.totals.file_size_after = 1000, 600
    return {"keras": keras_report, "onnx": onnx_report}


@pytest.fixture(scope="module")
def reports():
    return _reports()


@pytest.mark.parametrize("kind", ["keras", "onnx"])
def test_json_validates_and_is_versioned(reports, kind):
    data = json.loads(reports[kind].to_json())
    jsonschema.validate(data, SCHEMA)
    assert data["schema_version"] == 2 and data["backend"] == kind
    jsonschema.validate({"schema_version": 2, "models": [data, data]}, SCHEMA)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**data, "totals": {**data["totals"], "params_after": -1}}, SCHEMA)


@pytest.mark.parametrize("kind", ["keras", "onnx"])
def test_text_has_the_json_numbers_and_fits_80_columns(reports, kind):
    report = reports[kind]
    data = report.to_dict()
    text = report.to_text()
    assert all(len(line) <= 80 for line in text.splitlines())
    t = data["totals"]
    for key in (
        "params_before",
        "params_after",
        "trainable_params_before",
        "trainable_params_after",
    ):
        assert f"{t[key]:,}" in text
    assert f"{t['reduction_pct']:.2f}%" in text
    for site in data["sites"]:
        assert re.search(
            rf"{re.escape(site['name'][:10])}.*\b{site['cin']}\s+{site['filters']}\s+"
            rf"{site['groups']}\s+{site['interleave_step']}\b",
            text,
        )
    assert "\033[" not in text and "\033[" in report.to_text(color=True)


def test_long_names_are_shortened_keeping_both_ends():
    model = keras_models.pointwise_block()
    _, report = graphopt.rewrite(model)
    long = report.sites[0].__class__(
        **{**report.sites[0].__dict__, "name": "encoder/stage_4/block_17/expand_pointwise_conv"}
    )
    report.sites[0] = long
    line = next(ln for ln in report.to_text().splitlines() if "…" in ln)
    assert line.startswith("encoder/st") and "_conv" in line and len(line) <= 80


@pytest.mark.parametrize("kind", ["keras", "onnx"])
def test_markdown_has_the_json_numbers(reports, kind):
    report = reports[kind]
    md = report.to_markdown()
    t = report.to_dict()["totals"]
    assert f"**Trainable parameters reduced by {t['reduction_pct']:.2f}%**" in md
    assert (
        f"| trainable parameters | {t['trainable_params_before']:,} | "
        f"{t['trainable_params_after']:,} | {t['reduction_pct']:.2f}% |" in md
    )
    for site in report.sites:
        assert f"| `{site.name}` | {site.cin} | {site.filters} | {site.groups} |" in md


@pytest.mark.parametrize("kind", ["keras", "onnx"])
def test_html_has_the_json_numbers_and_an_embedded_chart(reports, kind):
    page = render_html([reports[kind]])
    t = reports[kind].to_dict()["totals"]
    assert f"{t['trainable_params_before']:,}" in page and f"{t['reduction_pct']:.2f}%" in page
    assert 'src="data:image/png;base64,' in page
    assert "<script" not in page and "http://" not in page and "https://" not in page


def test_html_without_matplotlib_falls_back_to_a_table(reports, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    page = render_html([reports["keras"]])
    assert "data:image/png" not in page and "install matplotlib" in page
    assert "<td>pw_a</td>" in page


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    not _chromium(),
    reason="Debian's chromium is not installed (.ci/run installs it where apt-get can run)",
)
def test_html_chart_is_visible_in_headless_chromium(reports, tmp_path):
    page = render_html([reports["keras"]])
    # A copy of the page with a probe that reports what the browser laid out.
    probe = (
        "<script>window.onload=function(){var i=document.querySelector('img.chart');"
        "var r=i.getBoundingClientRect();document.title='chart '+i.complete+' '+"
        "i.naturalWidth+' '+Math.round(r.width)+' '+Math.round(r.height)+' '+"
        "getComputedStyle(i).visibility;};</script>"
    )
    path = tmp_path / "probe.html"
    path.write_text(page.replace("</body>", probe + "</body>"))
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
    ]
    dom = subprocess.run(
        [_chromium(), *flags, "--dump-dom", path.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    match = re.search(r"<title>chart (\w+) (\d+) (\d+) (\d+) (\w+)</title>", dom)
    assert match, dom[:500]
    complete, natural, width, height, visibility = match.groups()
    assert complete == "true" and int(natural) > 100
    assert int(width) > 100 and int(height) > 100 and visibility == "visible"
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            _chromium(),
            *flags,
            f"--screenshot={shot}",
            "--window-size=1200,1600",
            (tmp_path / "probe.html").as_uri(),
        ],
        capture_output=True,
        timeout=120,
    )
    assert shot.exists() and os.path.getsize(shot) > 10_000


def test_selection_is_reflected_in_skipped():
    model = keras_models.residual()
    _, report = graphopt.rewrite(model, include=["pw_*"], exclude=["*strided"])
    assert [s.name for s in report.sites] == ["pw_a"]
    reasons = {s.name: s.reason for s in report.skipped}
    assert reasons["pw_strided"] == "matched by --exclude *strided"
    assert reasons["shortcut"].startswith("not matched by --include")
    _, report = graphopt.rewrite(onnx_models.pytorch_style(), keep_last=1)
    assert [s.name for s in report.sites] == ["pw1", "pw2"]
    assert [(s.name, s.reason) for s in report.skipped] == [("down", "kept by --keep-last 1")]


def test_cli_writes_every_format_and_progress_on_request(keras_fixtures, tmp_path):
    onnx.save(onnx_models.pytorch_style(), tmp_path / "m.onnx")
    proc = run_pwgroup(
        "report",
        "m.onnx",
        "--json",
        "r.json",
        "--markdown",
        "r.md",
        "--html",
        "r.html",
        "--exclude",
        "down",
        "--progress",
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "r.json").read_text())
    jsonschema.validate(data, SCHEMA)
    assert data["skipped"][0]["reason"] == "matched by --exclude down"
    md, page = (tmp_path / "r.md").read_text(), (tmp_path / "r.html").read_text()
    pct = f"{data['totals']['reduction_pct']:.2f}%"
    assert pct in md and pct in page and pct in proc.stdout
    assert "\033[" not in proc.stdout  # not a terminal: no colour
    quiet = run_pwgroup("report", "m.onnx", "--quiet", cwd=str(tmp_path))
    assert quiet.stdout == "" and quiet.stderr == ""


def test_progress_spinner_shows_slow_steps_only(monkeypatch):
    import io
    import time

    from graphopt import progress

    monkeypatch.setattr(progress, "DELAY_S", 0.05)
    stream = io.StringIO()
    with progress.step("rewriting m.onnx", True, stream):
        time.sleep(0.4)
    assert "rewriting m.onnx" in stream.getvalue() and "done in" in stream.getvalue()
    quiet = io.StringIO()
    with progress.step("fast", True, quiet):
        pass
    assert quiet.getvalue() == ""
    assert progress.wanted(True) and not progress.wanted(False, quiet=True)


def test_a_model_that_grows_is_never_called_reduced_and_fails_fail_under(tmp_path, capsys):
    """Issue 9: a growth was printed as 'reduced by -27.75%'. Paper mode keeps sites that save
    nothing (Cin = F = 32, two groups: 1,056 -> 1,088 parameters), so this model grows."""
    import cli

    new, report = graphopt.rewrite(onnx_models.single_site(32, 32), mode="paper")
    assert report.totals.reduction_pct < 0
    pct = f"{-report.totals.reduction_pct:.2f}%"
    for text in (report.to_text(), report.to_markdown(), render_html([report])):
        assert "reduced by -" not in text and "grew by" in text and pct in text
    src = tmp_path / "grows.onnx"
    onnx.save(onnx_models.single_site(32, 32), str(src))
    assert cli.main(["report", str(src), "--quiet", "--fail-under", "-50"]) == 1
    err = capsys.readouterr().err
    assert f"grew by {pct}" in err and "reduced by" not in err


def _calibrated(report):
    """`report` as a calibration leaves it: long site names, errors and a long skip reason."""
    import dataclasses

    from graphopt.calibrate import Quality
    from graphopt.plan import Skipped
    from graphopt.quality import OutputQuality

    long = "encoder/stage_4/block_17/expand_pointwise_conv"
    report = dataclasses.replace(report)
    report.sites = [
        dataclasses.replace(s, name=f"{long}_{i}", site_error=0.0123 * i, context_error=0.2345 * i)
        for i, s in enumerate(report.sites, 1)
    ]
    report.skipped = [
        Skipped(
            f"{long}_9",
            "no group count keeps the site error within 0.05 (best 0.123; --groups auto)",
        )
    ]
    output = OutputQuality("classifier/probabilities/softmax_output", 0.987654, 0.0456, 0.9989, 8)
    report.quality = Quality(600, 200, True, [output])
    return report


def test_text_wraps_long_quality_and_skip_lines_keeping_every_figure(reports):
    """Issue 24 (9): at 80 columns these lines were cut, their figures and the worst site's
    name lost behind a '…'."""
    from graphopt.report import quality_lines

    report = _calibrated(reports["onnx"])
    text = report.to_text()
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "  encoder/stage_…ointwise_conv_9: no group count" in text  # the name shortened
    joined = " ".join(text.split())
    lines = quality_lines(report) + [report.skipped[0].reason]
    assert any(len(line) > 80 for line in lines)
    for line in lines:
        assert " ".join(line.split()) in joined
    assert "in context 0.234 to 0.704, last site 0.704" in joined
    assert "worst: encoder/stage_4/block_17/expand_pointwise_conv_3)" in joined


def test_unknown_counts_print_a_dash_not_a_zero_saving(reports):
    """Issue 24 (9): MACs of dynamic shapes printed '- - 0.00%'; a file not measured too."""
    report = reports["onnx"]  # dynamic spatial dims: no site's MACs are known
    assert report.site_macs_before is None
    (macs,) = [ln for ln in report.to_text().splitlines() if ln.startswith("pointwise MACs")]
    assert macs.split() == ["pointwise", "MACs", "-", "-", "-"]
    md = report.to_markdown()
    assert "| pointwise MACs | – | – | – |" in md and "| file size (bytes) | – | – | – |" in md
    page = render_html([report])
    assert "<tr><td>pointwise MACs</td><td>–</td><td>–</td><td>–</td></tr>" in page
    assert "0.00%" not in report.to_text() + md + page


def test_html_chart_legend_covers_no_bar(reports, monkeypatch):
    """Issue 24 (9): the legend sat inside the plot, over the longest bar."""
    from matplotlib.figure import Figure

    laid_out, save = [], Figure.savefig

    def measuring(fig, *args, **kwargs):
        out = save(fig, *args, **kwargs)
        renderer, ax = fig.canvas.get_renderer(), fig.axes[0]
        legend = ax.get_legend().get_window_extent(renderer)
        bars = [bar.get_window_extent(renderer) for bar in ax.patches]
        laid_out.append((legend, bars, fig.bbox))
        return out

    monkeypatch.setattr(Figure, "savefig", measuring)
    for report in reports.values():
        render_html([report])
    assert len(laid_out) == 2
    for legend, bars, page in laid_out:
        assert len(bars) == 6 and not any(legend.overlaps(bar) for bar in bars)
        assert page.x0 <= legend.x0 and legend.x1 <= page.x1  # and it is not cut off
