"""Wall time to rewrite EfficientNet B0 and B7 next to the time to load and save the same model.

Usage: python benchmarks/keras_rewrite_time.py [--variants B0 B7] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile

from timing import median_time

import graphopt


def main() -> None:
    import keras

    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", nargs="+", default=["B0", "B7"])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            model = getattr(keras.applications, f"EfficientNet{variant}")(weights=None, classes=10)
            path = os.path.join(tmp, f"{variant}.keras")
            model.save(path)
            load_save = median_time(lambda: keras.models.load_model(path).save(path), args.repeat)
            rewrite = median_time(lambda: graphopt.rewrite(model), args.repeat)
            print(
                f"EfficientNet{variant}: rewrite {rewrite:6.2f} s, load+save {load_save:6.2f} s, "
                f"ratio {rewrite / load_save:.2f} (median of {args.repeat})",
                flush=True,
            )
            keras.backend.clear_session()


if __name__ == "__main__":
    main()
