"""Timing in onnxruntime (--skip-slower, --fold-slower, --latency, benchmarks): every session
that is timed has spinning off and a pinned thread count; --latency in every report format."""

from __future__ import annotations

import glob
import json
import os

import jsonschema
import onnx
import onnxruntime
import pytest

import cli
import graphopt
from fixtures import keras_models, onnx_models
from graphopt.backends import onnx_timing
from graphopt.backends.onnx_verify import timing_threads
from graphopt.report import SCHEMA_PATH
from graphopt.report_html import render_html
from tests.conftest import REPO

SCHEMA = json.load(open(SCHEMA_PATH))


@pytest.fixture
def recorded_sessions(monkeypatch):
    """The SessionOptions of every onnxruntime session made while the test runs."""
    made = []
    real = onnxruntime.InferenceSession

    def recording(model, options=None, *args, **kwargs):
        made.append(options)
        return real(model, options, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", recording)
    return made


def _pinned_without_spinning(options) -> bool:
    return (
        options is not None
        and options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        and options.intra_op_num_threads == timing_threads()
        and options.graph_optimization_level == onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    )


def test_site_timing_runs_without_spinning_on_pinned_threads(recorded_sessions, monkeypatch):
    monkeypatch.setattr(onnx_timing, "BUDGET_S", 0.001)
    _, report = graphopt.rewrite(onnx_models.single_site(64, 32), skip_slower=True)
    assert len(recorded_sessions) == 2
    assert all(_pinned_without_spinning(o) for o in recorded_sessions)


def test_latency_runs_interleaved_without_spinning_on_pinned_threads(
    recorded_sessions, monkeypatch
):
    monkeypatch.setattr(onnx_timing, "LATENCY_BUDGET_S", 0.001)
    model = onnx_models.single_site(64, 32)
    new, _ = graphopt.rewrite(model)
    timings, notes = onnx_timing.latency(model, new, (1, 3))
    assert notes == [] and [t.batch for t in timings] == [1, 3]
    assert all(t.original_ms > 0 and t.rewritten_ms > 0 and t.threads >= 1 for t in timings)
    assert all(_pinned_without_spinning(o) for o in recorded_sessions)


def test_benchmarks_time_with_pwgroup_sessions_only():
    """Benchmarks build no session of their own: they get spinning off and pinned threads."""
    for path in glob.glob(os.path.join(REPO, "benchmarks", "*.py")):
        with open(path, encoding="utf-8") as f:
            assert "InferenceSession(" not in f.read(), path


def test_cli_latency_in_every_format(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(onnx_timing, "LATENCY_BUDGET_S", 0.001)
    src = tmp_path / "m.onnx"
    onnx.save(onnx_models.pytorch_style(), str(src))
    out = {ext: tmp_path / f"r.{ext}" for ext in ("json", "md", "html")}
    argv = ["report", str(src), "--latency", "1,2", "--json", str(out["json"])]
    assert cli.main(argv + ["--markdown", str(out["md"]), "--html", str(out["html"])]) == 0
    text = capsys.readouterr().out
    data = json.loads(out["json"].read_text())
    jsonschema.validate(data, SCHEMA)
    assert [t["batch"] for t in data["latency"]] == [1, 2]
    for t in data["latency"]:
        assert t["ratio"] == pytest.approx(t["rewritten_ms"] / t["original_ms"], rel=1e-2)
    assert "latency (CPUExecutionProvider" in text and "no spinning" in text
    assert "batch 2" in out["md"].read_text() and "latency ms, batch 2" in out["html"].read_text()


def test_cli_latency_notes_a_batch_the_model_cannot_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(onnx_timing, "LATENCY_BUDGET_S", 0.001)
    src = tmp_path / "fixed.onnx"
    onnx.save(onnx_models.constant_weights(), str(src))  # batch fixed at 1
    json_path = tmp_path / "r.json"
    assert cli.main(["report", str(src), "--latency=1,8", "--json", str(json_path)]) == 0
    assert "--latency batch 8: the model does not run" in capsys.readouterr().err
    assert [t["batch"] for t in json.loads(json_path.read_text())["latency"]] == [1]


def test_cli_latency_of_a_keras_model_through_its_onnx_export(tmp_path, capsys, monkeypatch):
    pytest.importorskip("tf2onnx")
    monkeypatch.setattr(onnx_timing, "LATENCY_BUDGET_S", 0.001)
    src = tmp_path / "k.keras"
    keras_models.conv_bn_act().save(str(src))
    json_path = tmp_path / "r.json"
    assert cli.main(["report", str(src), "--latency", "2", "--json", str(json_path)]) == 0
    assert [t["batch"] for t in json.loads(json_path.read_text())["latency"]] == [2]


def test_latency_without_it_is_absent_and_bad_batches_are_usage_errors(capsys):
    _, report = graphopt.rewrite(onnx_models.single_site())
    assert "latency" not in report.to_dict() and "latency" not in report.to_text()
    assert render_html([report]).count("latency ms") == 0
    with pytest.raises(SystemExit) as exc:
        cli.main(["report", "m.onnx", "--latency", "0,8"])
    assert exc.value.code == 2
