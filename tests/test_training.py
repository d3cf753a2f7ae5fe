"""A rewritten EfficientNetB0 reloads in a fresh process and trains: the loss falls."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, run_pwgroup


@pytest.mark.slow
def test_rewritten_b0_reloads_in_a_fresh_process_and_trains(tmp_path):
    out = tmp_path / "b0.keras"
    proc = run_pwgroup(
        "rewrite",
        "keras.applications:EfficientNetB0",
        "--classes",
        "10",
        "--input-shape",
        "32,32,3",
        "-o",
        str(out),
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr
    train = subprocess.run(
        [sys.executable, os.path.join(REPO, "tests", "train_rewritten.py"), str(out), "384"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert train.returncode == 0, train.stderr[-2000:]
    losses = json.loads(train.stdout.strip().splitlines()[-1])["losses"]
    assert len(losses) == 12
    assert all(math.isfinite(v) for v in losses)
    # Keras reports the running mean of the epoch: it falls when the batch losses fall.
    assert losses[-1] < losses[0]
