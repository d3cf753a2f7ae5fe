"""What a trained network keeps without retraining: the Fashion-MNIST CNN of fixtures/
(92.79% test accuracy), rewritten with scratch, weight-space fit and calibrated weights (with
and without --distill-steps on the same calibration images), and with accuracy control,
measured on the 10,000 test images no step has seen.

    python benchmarks/calibrate_fmnist.py [--calibration 1000] [--targets 0.9,0.95,0.97,0.99]

Prints one row per rewrite (parameter cut, held-out agreement, test agreement with the
original, test accuracy, time) and the curve of cut against held-out agreement that
--groups auto chose on.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calibration", type=int, default=1000, help="training images used")
    parser.add_argument("--targets", default="0.9,0.95,0.97,0.99")
    parser.add_argument("--skip-paper", action="store_true")
    parser.add_argument("--distill", type=int, default=200, help="--distill-steps rows")
    args = parser.parse_args()
    import keras

    import graphopt
    from fixtures import fashion_mnist

    model = keras.models.load_model(os.path.join(REPO, "fixtures", "fmnist_mobilenet.keras"))
    calib, _ = fashion_mnist.load("train", args.calibration)
    test, labels = fashion_mnist.load("test")
    reference = model.predict(test, batch_size=500, verbose=0).argmax(-1)
    print(f"original: test accuracy {np.mean(reference == labels):.4f}")
    header = f"{'rewrite':44} {'cut %':>6} {'held-out':>9} {'test agr':>9} {'test acc':>9} {'s':>5}"
    print(header)
    runs = [
        ("linear, scratch (measured only)", dict(mode="linear", calibrate=False)),
        ("linear, --init fit (measured only)", dict(mode="linear", init="fit", calibrate=False)),
        ("linear, calibrated, every site", dict(mode="linear")),
        (f"linear, calibrated, --distill-steps {args.distill}",
         dict(mode="linear", distill_steps=args.distill)),
    ]  # fmt: skip
    if not args.skip_paper:
        runs += [
            ("paper, scratch (measured only)", dict(mode="paper", calibrate=False)),
            ("paper, calibrated, every site", dict(mode="paper")),
            (f"paper, calibrated, --distill-steps {args.distill}",
             dict(mode="paper", distill_steps=args.distill)),
        ]  # fmt: skip
    for target in (float(t) for t in args.targets.split(",")):
        runs.append(
            (f"linear, --groups auto --min-agreement {target:g}",
             dict(mode="linear", groups="auto", min_agreement=target))
        )  # fmt: skip
    ladder = None
    for label, options in runs:
        start = time.time()
        new, report = graphopt.rewrite(model, calibration=calib, **options)
        seconds = time.time() - start
        predicted = new.predict(test, batch_size=500, verbose=0).argmax(-1)
        print(
            f"{label:44} {report.totals.reduction_pct:6.2f} "
            f"{report.quality.agreement:9.4f} {np.mean(predicted == reference):9.4f} "
            f"{np.mean(predicted == labels):9.4f} {seconds:5.0f}",
            flush=True,
        )
        ladder = report.quality.ladder or ladder
    if ladder:
        print("\n--groups auto: parameter cut against held-out agreement (bounds tried)")
        for point in ladder:
            print(
                f"  site error <= {point['site_error']:.3f}: {point['reduction_pct']:6.2f}% "
                f"fewer parameters, agreement {point['agreement']:.4f}"
            )


if __name__ == "__main__":
    main()
