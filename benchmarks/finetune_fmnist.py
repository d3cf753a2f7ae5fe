"""Fine-tuning the trained Fashion-MNIST CNN after its rewrite, without labels (issue 11).

    python benchmarks/finetune_fmnist.py [--epochs 8] [--limit N] [--start paper|linear-fit]

The teacher is `fixtures/fmnist_mobilenet.keras` (train it with `python -m
fixtures.train_fmnist`). The student is its rewrite (`paper`: fresh K and L as the paper;
`linear-fit`: linear mode with K and L fitted to the original kernels; `linear-calibrated`:
linear mode calibrated on 2,048 training images, `graphopt.rewrite(..., calibration=...)`).
It is distilled on the 60,000 training images without their labels; the test set's labels only
measure accuracy.
Prints the parameter cut, then test accuracy after each epoch (BatchNormalization statistics
re-estimated), and the epoch of the first accuracy within 1 point of the original's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import graphopt  # noqa: E402
from fixtures import fashion_mnist  # noqa: E402

TEACHER = os.path.join(os.path.dirname(__file__), "..", "fixtures", "fmnist_mobilenet.keras")


def student_of(teacher, start: str, calibration):
    if start == "paper":
        return graphopt.rewrite(teacher, mode="paper", seed=0)
    if start == "linear-fit":
        return graphopt.rewrite(teacher, mode="linear", init="fit", seed=0)
    return graphopt.rewrite(teacher, mode="linear", calibration={"image": calibration}, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher", default=TEACHER)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--limit", type=int, help="training images (default all 60,000)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--start", choices=("paper", "linear-fit", "linear-calibrated"))
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()
    teacher = graphopt.load(args.teacher)
    x, _ = fashion_mnist.load("train", limit=args.limit)  # the labels are not used
    xt, yt = fashion_mnist.load("test")
    info_path = os.path.splitext(args.teacher)[0] + ".json"
    original = json.load(open(info_path))["test_accuracy"] if os.path.exists(info_path) else None
    results = {}
    for start in [args.start] if args.start else ["paper"]:
        student, report = student_of(teacher, start, x[:2048])
        t = report.totals
        print(
            f"{start}: {len(report.sites)} sites, trainable parameters "
            f"{t.trainable_params_before:,} -> {t.trainable_params_after:,} "
            f"({t.reduction_pct:.2f}% fewer)",
            flush=True,
        )
        began = time.time()
        _, result = graphopt.finetune(
            teacher,
            student,
            {"image": x},
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            validation_data={"image": xt, "y": yt},
            verbose=1 if sys.stdout.isatty() else "auto",
        )
        accuracy = [e.evaluation.accuracy for e in result.history]
        target = result.teacher_eval.accuracy - 0.01
        within = next((e.epoch for e in result.history if e.evaluation.accuracy >= target), None)
        print(result.to_text(), end="")
        print(
            f"{start}: original {100 * result.teacher_eval.accuracy:.2f}% (fixture json: "
            f"{original}); accuracy per epoch "
            + ", ".join(f"{100 * a:.2f}%" for a in accuracy)
            + f"; within 1 point after epoch {within}; epoch times "
            + ", ".join(f"{e.seconds:.0f} s" for e in result.history)
            + f"; {time.time() - began:.0f} s in all",
            flush=True,
        )
        results[start] = {
            "reduction_pct": t.reduction_pct,
            "params": [t.trainable_params_before, t.trainable_params_after],
            "accuracy_per_epoch": accuracy,
            "within_1_point_after_epoch": within,
            "result": result.to_dict(),
        }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
