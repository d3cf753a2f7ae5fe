"""Median training-step time (batch 32, CPU) of EfficientNetB0 before and after the rewrite
(paper mode), at 32x32, 64x64 and 224x224.

Usage: python benchmarks/keras_train_step.py [--sizes 32,64,224] [--steps 15] [--variant B0]
Targets (issue 11): rewritten/original <= 1.0 at 32x32, <= 0.9 at 64x64 and 224x224.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import graphopt


def prepare(model, x, y, jit: bool = False) -> None:
    """Compile once and trace (tracing B0 takes about a minute on 2 cores)."""
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        jit_compile=jit,
    )
    model.train_on_batch(x, y)
    model.train_on_batch(x, y)


def step_times(model, x, y, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - t0)
    return times


TARGETS = {32: 1.0}
"""Ratio targets per input size; 0.9 for the others."""


def measure(factory, size: int, args) -> tuple[float, float]:
    """Median step (s) of the original and the rewrite, A/B rounds interleaved."""
    original = factory(weights=None, classes=10, input_shape=(size, size, 3))
    rewritten, _ = graphopt.rewrite(original, mode=args.mode, exclude=tuple(args.exclude))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, size, size, 3)).astype("float32")
    y = rng.integers(0, 10, args.batch)
    prepare(original, x, y, args.jit)
    prepare(rewritten, x, y, args.jit)
    rounds = {"original": [], "rewritten": []}
    for _ in range(3):  # interleave A/B rounds: the machine is shared and noisy
        rounds["original"] += step_times(original, x, y, args.steps // 3 or 1)
        rounds["rewritten"] += step_times(rewritten, x, y, args.steps // 3 or 1)
    return statistics.median(rounds["original"]), statistics.median(rounds["rewritten"])


def main() -> None:
    import keras

    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="32,64,224")
    parser.add_argument("--steps", type=int, default=15, help="per model and size")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--variant", default="B0")
    parser.add_argument("--mode", default="paper", choices=("paper", "linear"))
    parser.add_argument("--exclude", action="append", default=[], help="site glob to leave")
    parser.add_argument("--jit", action="store_true", help="both models compiled with XLA")
    args = parser.parse_args()
    factory = getattr(keras.applications, f"EfficientNet{args.variant}")
    print(
        f"EfficientNet{args.variant}, {args.mode} mode"
        f"{''.join(f', --exclude {e}' for e in args.exclude)}{', XLA' if args.jit else ''}, "
        f"batch {args.batch}, "
        f"{args.steps} train_on_batch steps each, medians"
    )
    print(f"{'input':>9} {'original ms':>12} {'rewritten ms':>13} {'ratio':>6} {'target':>7}")
    for size in (int(s) for s in args.sizes.split(",")):
        before, after = measure(factory, size, args)
        target = TARGETS.get(size, 0.9)
        print(
            f"{size:>4}x{size:<4} {before * 1000:12.1f} {after * 1000:13.1f} "
            f"{after / before:6.2f} {'<= ' + str(target):>7}",
            flush=True,
        )


if __name__ == "__main__":
    main()
