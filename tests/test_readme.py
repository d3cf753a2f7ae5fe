"""The library example for subclassed models (docs/library.md) runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _block_after(heading: str) -> str:
    with open(os.path.join(REPO, "docs", "library.md"), encoding="utf-8") as f:
        text = f.read()
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _run(code: str, cwd) -> subprocess.CompletedProcess:
    """`python -c code` in `cwd` with this checkout importable; fails the test on an error."""
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_subclassed_model_example_runs_as_written(tmp_path):
    code = _block_after("## Subclassed Keras models")
    assert "3 sites rewritten" in _run(code, tmp_path).stdout
    assert (tmp_path / "net.pwgroup.keras").exists()
    # a fresh process loads it after registering the class, as the doc says
    load = code[: code.index("net = Net()")] + (
        "graphopt.register_rewritten(Net)\n"
        "again = keras.models.load_model('net.pwgroup.keras')\n"
        "print(type(again).__name__, again.count_params())\n"
    )
    assert _run(load, tmp_path).stdout.split()[0] == "Net"
