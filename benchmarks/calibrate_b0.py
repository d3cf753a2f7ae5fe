"""Calibration cost on EfficientNetB0 at 224x224 with 256 samples (issue 10): wall time per
phase and peak memory, Keras and ONNX (tf2onnx export of the same model).

    python benchmarks/calibrate_b0.py [--samples 256] [--mode linear] [--backend keras|onnx|both]

The weights are keras.applications' fresh ones and the samples random images: this measures
the cost, not the agreement (see benchmarks/calibrate_fmnist.py for that).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--mode", default="linear", choices=("linear", "paper"))
    parser.add_argument("--backend", default="both", choices=("keras", "onnx", "both"))
    args = parser.parse_args()
    import keras

    import graphopt

    keras.utils.set_random_seed(0)
    model = keras.applications.EfficientNetB0(weights=None, classes=10)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (args.samples, 224, 224, 3)).astype(np.float32)
    start = time.time()
    lines = []

    def say(line: str) -> None:
        lines.append(line)
        print(f"  [{time.time() - start:7.1f} s] {line}", flush=True)

    runs = []
    if args.backend in ("keras", "both"):
        runs.append(("keras", model, images))
    if args.backend in ("onnx", "both"):
        proto = graphopt.export_onnx(model)
        runs.append(("onnx", proto, {proto.graph.input[0].name: images}))
    for name, subject, data in runs:
        start = time.time()
        _, report = graphopt.rewrite(subject, mode=args.mode, calibration=data, progress=say)
        seconds = time.time() - start
        print(
            f"{name}: {len(report.sites)} sites calibrated on {report.quality.fit_samples} "
            f"samples (+{report.quality.held_out_samples} held out) in {seconds:.0f} s; "
            f"peak memory so far {_peak_mb():,.0f} MB"
        )


if __name__ == "__main__":
    main()
