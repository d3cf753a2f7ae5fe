"""A fine-tuning epoch of the rewritten model against an epoch of training the original alone.

    python benchmarks/finetune_speed.py [--images 10000] [--rounds 6]

The Fashion-MNIST CNN of `fixtures/fmnist_mobilenet.keras` and its `paper` rewrite, batch 128,
on the first N training images. "original" is `fit` of the original with cross-entropy on the
labels; "finetune" is `graphopt.finetune` of the rewrite (teacher outputs cached). Each is run
for 2 epochs and the second is timed (the first traces); A and B alternate `--rounds` times.
Printed: the steady epoch ratio, and the ratio with the teacher's forward pass over the data
(computed once, when the outputs are cached) added to one fine-tuning epoch, and the medians
of both over the rounds. Target: <= 1.3. On the shared 2-core machine an epoch of either takes
~12 s or ~19 s for spells of a minute or more, whatever runs: one round's ratio means little.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402

import graphopt  # noqa: E402
from fixtures import fashion_mnist  # noqa: E402
from graphopt.backends.keras_distill import copy_model  # noqa: E402

TEACHER = os.path.join(os.path.dirname(__file__), "..", "fixtures", "fmnist_mobilenet.keras")
BATCH = 128


class _EpochTimes(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.start)


def original_epoch(teacher, x, y) -> float:
    model = copy_model(teacher)
    model.compile(keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy")
    times = _EpochTimes()
    model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[times], shuffle=True)
    return times.seconds[-1]


def finetune_epoch(teacher, student, x) -> float:
    _, result = graphopt.finetune(
        teacher, student, {"image": x}, epochs=2, batch_size=BATCH,
        validation_data={"image": x[:256]}, verbose=0,
    )  # fmt: skip
    return result.history[-1].seconds


def teacher_forward(teacher, x) -> float:
    teacher.predict(x[:BATCH], verbose=0)
    start = time.perf_counter()
    teacher.predict(x, batch_size=256, verbose=0)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    teacher = graphopt.load(TEACHER)
    student, report = graphopt.rewrite(teacher, mode="paper")
    x, y = fashion_mnist.load("train", limit=args.images)
    steady, first = [], []
    for r in range(args.rounds):
        a = original_epoch(teacher, x, y)
        b = finetune_epoch(teacher, student, x)
        t = teacher_forward(teacher, x)
        steady.append(b / a)
        first.append((b + t) / a)
        print(
            f"round {r + 1}: {len(x):,} images, batch {BATCH}: original epoch {a:.1f} s, "
            f"fine-tuning epoch {b:.1f} s (ratio {b / a:.2f}), teacher forward {t:.1f} s "
            f"(one epoch with it: {(b + t) / a:.2f})",
            flush=True,
        )
    print(
        f"median over {args.rounds} rounds: ratio {statistics.median(steady):.2f}, one epoch "
        f"with the teacher's forward pass {statistics.median(first):.2f} (target <= 1.3)"
    )
    print(f"parameters: {report.totals.trainable_params_before:,} -> "
          f"{report.totals.trainable_params_after:,} trainable")  # fmt: skip


if __name__ == "__main__":
    main()
