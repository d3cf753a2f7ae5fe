"""benchmarks/parity.py --quick: every row trains, is evaluated, timed and printed (the
pipeline, not the accuracy: 256 images and one epoch learn nothing)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

ROWS = ("b0", "b0-paper", "b0-linear", "v2", "v2-paper", "v3s-alpha", "v2-alpha")


def _fashion_mnist_available() -> bool:
    from fixtures import fashion_mnist

    return fashion_mnist.available()


@pytest.mark.slow
@pytest.mark.skipif(not _fashion_mnist_available(), reason="needs dataset-fashion-mnist")
def test_quick_parity_run_trains_evaluates_and_prints_every_row(tmp_path):
    out, png = tmp_path / "parity.json", tmp_path / "parity.png"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "benchmarks", "parity.py"),
            "--quick",
            "--json",
            str(out),
            "--plot",
            str(png),
        ],
        capture_output=True,
        text=True,
        timeout=1800,  # ~2 min on an idle 2-core machine; 12 min at load average 18
        env=env,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [r["key"] for r in rows] == list(ROWS)
    assert data["meta"]["train_images"] == 256 and data["meta"]["epochs"] == 1
    by = {r["key"]: r for r in rows}
    # The paper's pair: the rewrite keeps exactly the paper's Table 2 count.
    assert by["b0"]["trainable_params"] == 4_020_358
    assert by["b0-paper"]["trainable_params"] == 639_702
    assert by["v2-paper"]["trainable_params"] < by["v2"]["trainable_params"]
    for r in rows:
        assert 0.0 <= r["test_accuracy"] <= 1.0
        assert 0.0 <= r["test_accuracy_keras_stats"] <= 1.0  # before BN re-estimation
        assert r["bn_reestimate_s"] > 0
        assert math.isfinite(r["test_loss"])
        assert len(r["history"]) == 1 and math.isfinite(r["history"][0]["loss"])
        assert r["epoch_s"] > 0
        assert r["latency_b1"] > 0 and r["latency_b32"] > 0
        assert r["latency_backend"] in ("onnxruntime", "keras")
        # Every row is a line of the printed table.
        assert f"| {r['name']} | {100 * r['test_accuracy']:.2f} |" in proc.stdout
    # The alternatives are sized on the rewritten B0: within a quarter of its count.
    for key in ("v3s-alpha", "v2-alpha"):
        assert abs(by[key]["trainable_params"] / 639_702 - 1) < 0.25
    assert "target 1 (rewritten B0 within 0.5 points of B0)" in proc.stdout
    assert png.stat().st_size > 0
