"""onnxruntime is an extra, CPU or GPU build, never both: what a user sees without it or with
both, and the packaging that keeps the two apart."""

from __future__ import annotations

import configparser
import os
import re
import sys

import onnx
import pytest

import cli
from fixtures.onnx_models import pytorch_style
from graphopt import runtime
from tests.conftest import REPO, file_bytes


def _requirements(text: str) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", line.strip())[0] for line in text.splitlines() if line.strip()}


def test_base_install_has_no_runtime_and_no_extra_set_brings_both():
    config = configparser.ConfigParser()
    config.read(os.path.join(REPO, "setup.cfg"))
    base = _requirements(config["options"]["install_requires"])
    extras = {k: _requirements(v) for k, v in config["options.extras_require"].items()}
    runtimes = {runtime.CPU_DIST, runtime.GPU_DIST}
    assert not base & runtimes
    assert extras["cpu"] & runtimes == {runtime.CPU_DIST}
    assert extras["gpu"] & runtimes == {runtime.GPU_DIST}
    for name, reqs in extras.items():
        if name not in ("cpu", "gpu"):
            assert not reqs & runtimes, f"extra '{name}' must not pick a runtime: [gpu,{name}]"


@pytest.fixture
def onnx_model(tmp_path):
    path = str(tmp_path / "model.onnx")
    onnx.save(pytorch_style(), path)
    return path


@pytest.fixture
def no_onnxruntime(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` fails


def test_missing_runtime_stops_at_once_with_one_line(no_onnxruntime, onnx_model, capsys):
    before = file_bytes(onnx_model)
    out = onnx_model.replace(".onnx", ".new.onnx")
    assert cli.main(["rewrite", onnx_model, "-o", out, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "onnxruntime is not installed" in err and "pip install 'pwgroup[cpu]'" in err
    assert "--no-verify" in err and onnx_model in err
    assert not os.path.exists(out) and file_bytes(onnx_model) == before
    assert cli.main(["report", onnx_model, "--skip-slower", "--no-verify", "--quiet"]) == 2
    assert "--skip-slower" in capsys.readouterr().err


def test_without_runtime_no_verify_and_keras_still_work(
    no_onnxruntime, onnx_model, keras_fixtures, capsys
):
    out = onnx_model.replace(".onnx", ".new.onnx")
    assert cli.main(["rewrite", onnx_model, "-o", out, "--no-verify", "--quiet"]) == 0
    onnx.checker.check_model(onnx.load(out), full_check=True)
    assert cli.main(["report", keras_fixtures["conv_bn_act"], "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_both_runtimes_installed_is_a_warning(monkeypatch, onnx_model, capsys):
    monkeypatch.setattr(runtime.metadata, "version", lambda dist: "1.0")
    assert runtime.installed_distributions() == [runtime.CPU_DIST, runtime.GPU_DIST]
    assert cli.main(["report", onnx_model, "--quiet"]) == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("pwgroup: warning: both onnxruntime and onnxruntime-gpu are installed")
    assert len(err.splitlines()) == 1


def test_one_runtime_is_no_conflict(monkeypatch):
    def only_cpu(dist):
        if dist != runtime.CPU_DIST:
            raise runtime.metadata.PackageNotFoundError(dist)
        return "1.0"

    monkeypatch.setattr(runtime.metadata, "version", only_cpu)
    assert runtime.conflict() is None
