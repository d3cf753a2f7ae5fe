"""ONNX-only installs: `pip install pwgroup[cpu]` has no TensorFlow, and every ONNX command works
without it (rewrite, calibrate in both modes, report, latency); a Keras model is one line
saying what to install."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib import metadata

import pytest

from tests.conftest import REPO

ONNX_ONLY = ["numpy", "onnx", "onnx-graphsurgeon", "onnxruntime", "pillow"]

SCRIPT = textwrap.dedent(
    """
    import os, subprocess, sys
    import numpy as np, onnx
    from fixtures.onnx_models import bn_silu, pytorch_style
    onnx.save(pytorch_style(), "m.onnx")
    onnx.save(bn_silu(), "bn.onnx")
    dims = [d.dim_value or 1 for d in pytorch_style().graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(0)
    np.save("x.npy", rng.random((40, *dims[1:])).astype("float32"))
    np.save("xb.npy", rng.normal(size=(40, 128, 4, 4)).astype("float32"))
    runs = [
        ["rewrite", "m.onnx", "-o", "a.onnx", "--mode", "linear", "--calibrate", "x.npy"],
        ["rewrite", "bn.onnx", "-o", "b.onnx", "--calibrate", "xb.npy"],
        ["report", "m.onnx", "--latency", "1", "--json", "r.json"],
        ["rewrite", "keras.applications:EfficientNetB0", "-o", "b0.keras"],
    ]
    for args in runs:
        done = subprocess.run([sys.executable, "-c", PWGROUP, *args], capture_output=True,
                              text=True)
        print(args[0], args[1], done.returncode, done.stderr.strip().splitlines()[-1:])
    import graphopt
    print("imported", *(sys.modules.get(m) is not None for m in ("tensorflow", "keras")))
    """
)


def _run(python: str, env: dict, cwd) -> str:
    pwgroup = "import sys, cli; sys.exit(cli.main())"
    code = f"PWGROUP = {pwgroup!r}\n" + SCRIPT
    done = subprocess.run(
        [python, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _check(out: str) -> None:
    lines = out.splitlines()
    assert "rewrite m.onnx 0 []" in lines
    assert "rewrite bn.onnx 0 []" in lines
    assert "report m.onnx 0 []" in lines
    keras_line = next(line for line in lines if "EfficientNetB0" in line)
    assert " 2 " in keras_line and "pip install 'pwgroup[keras]'" in keras_line
    assert "imported False False" in lines


BLOCKER = textwrap.dedent(
    """
    import sys
    for name in ("tensorflow", "keras", "tf2onnx", "h5py"):
        sys.modules[name] = None  # import fails, importlib.util.find_spec gives None
    """
)


def test_onnx_commands_run_where_tensorflow_cannot_be_imported(tmp_path):
    """The same checks as below in this environment, with TensorFlow and Keras made
    unimportable in the child processes (a sitecustomize on their path)."""
    (tmp_path / "block").mkdir()
    (tmp_path / "block" / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "block"), REPO]))
    _check(_run(sys.executable, env, tmp_path))


@pytest.mark.slow
def test_onnx_commands_run_in_a_venv_without_tensorflow(tmp_path):
    """A real ONNX-only install: a fresh venv with only what `pwgroup[cpu]` brings (the
    versions of this environment, so pip takes them from its cache)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    pins = [f"{name}=={metadata.version(name)}" for name in ONNX_ONLY]
    done = subprocess.run(
        [python, "-m", "pip", "install", "-q", *pins], capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    if done.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot install {pins}: {done.stderr[-500:]}")
        pytest.skip("cannot install the ONNX-only packages (no package registry?)")
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("VIRTUAL_ENV", None)
    _check(_run(python, env, tmp_path))
