"""Median training-step time (batch 32, CPU) of EfficientNetB0 before and after the rewrite.

Usage: python benchmarks/keras_train_step.py [--size 32] [--steps 15] [--variant B0]
The target of issue 2 is a ratio <= 1.0: the rewritten model does a sixth of the pointwise work.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import graphopt


def prepare(model, x, y) -> None:
    """Compile once and trace (tracing B0 takes about a minute on 2 cores)."""
    import keras

    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    model.train_on_batch(x, y)
    model.train_on_batch(x, y)


def step_times(model, x, y, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    import keras

    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--variant", default="B0")
    args = parser.parse_args()
    factory = getattr(keras.applications, f"EfficientNet{args.variant}")
    original = factory(weights=None, classes=10, input_shape=(args.size, args.size, 3))
    rewritten, _ = graphopt.rewrite(original)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, args.size, args.size, 3)).astype("float32")
    y = rng.integers(0, 10, args.batch)
    prepare(original, x, y)
    prepare(rewritten, x, y)
    rounds = {"original": [], "rewritten": []}
    for _ in range(3):  # interleave A/B rounds: the machine is shared and noisy
        rounds["original"] += step_times(original, x, y, args.steps // 3 or 1)
        rounds["rewritten"] += step_times(rewritten, x, y, args.steps // 3 or 1)
    med = {k: statistics.median(v) for k, v in rounds.items()}
    print(
        f"EfficientNet{args.variant} {args.size}x{args.size}, batch {args.batch}, "
        f"{len(rounds['original'])} steps each"
    )
    print(f"  original  median step {med['original'] * 1000:8.1f} ms")
    print(f"  rewritten median step {med['rewritten'] * 1000:8.1f} ms")
    print(f"  ratio rewritten/original {med['rewritten'] / med['original']:.2f} (target <= 1.0)")


if __name__ == "__main__":
    main()
