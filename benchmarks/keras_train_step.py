"""Median training-step time (batch 32, CPU) of EfficientNetB0 before and after the rewrite
(paper mode), at 32x32, 64x64 and 224x224.

Usage: python benchmarks/keras_train_step.py [--sizes 32,64,224] [--steps 30] [--variant B0]
       [--ceiling] [--grouped-conv] [--optimizer adam]
Targets (issue 11): rewritten/original <= 1.0 at 32x32, <= 0.9 at 64x64 and 224x224.

--ceiling also times the original with every site's conv replaced by a free channel map (a
slice, or a tile when the conv widens): the rest of the train step, which the rewrite does not
touch. With the sites' convs at the dense convs' speed per multiply-add and the interleave, the
residual sum and the branch copies free, the rewrite could not go below
`(free + (original - free) * site MACs after / before) / original`.

--grouped-conv also times the same rewrite with every grouped pointwise conv traced as
TensorFlow's grouped convolution, as before groups of one channel became elementwise products
and small ones dense matmuls (see DENSE_MAX_INTENSITY in graphopt/backends/keras_layers.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import graphopt
from graphopt.backends import keras_layers


def prepare(model, x, y, jit: bool = False, optimizer: str = "adam") -> None:
    """Compile once and trace (tracing B0 takes about a minute on 2 cores)."""
    import keras

    model.compile(
        optimizer=keras.optimizers.get({"class_name": optimizer, "config": {}}),
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


def _onednn() -> bool:
    """Whether TensorFlow's CPU kernels are oneDNN's (on Linux its default only for CPUs with
    AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX; TF_ENABLE_ONEDNN_OPTS=1 forces it): both models
    run on other kernels when it is off, and the rewrite's K and L take other forms."""
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())


TARGETS = {32: 1.0}
"""Ratio targets per input size; 0.9 for the others."""


def without_sites(model, names: set):
    """`model` with each named 1x1 conv replaced by a channel map that does no arithmetic."""
    import keras

    class FreeChannels(keras.layers.Layer):
        def __init__(self, filters, **kwargs):
            super().__init__(**kwargs)
            self.filters = filters

        def call(self, x):
            cin = x.shape[-1]
            if cin < self.filters:
                x = keras.ops.tile(x, [1] * (len(x.shape) - 1) + [-(-self.filters // cin)])
            return x[..., : self.filters]

    def clone(layer):
        if layer.name in names:
            return FreeChannels(layer.filters, name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    return keras.models.clone_model(model, clone_function=clone)


def measure(factory, size: int, args) -> dict:
    """Median step (s) of the original, the rewrite (with --ceiling the original without its
    sites' convs, with --grouped-conv the rewrite as it computed before), one step of each in
    turn; the paired ratio; and the sites' MACs after / before."""
    original = factory(weights=None, classes=10, input_shape=(size, size, 3))

    def rewrite():
        return graphopt.rewrite(original, mode=args.mode, exclude=tuple(args.exclude))

    rewritten, report = rewrite()
    models = {"original": original, "rewritten": rewritten}
    if args.ceiling:
        models["free"] = without_sites(original, {s.name for s in report.sites})
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, size, size, 3)).astype("float32")
    y = rng.integers(0, 10, args.batch)
    for model in models.values():
        prepare(model, x, y, args.jit, args.optimizer)
    if args.grouped_conv:  # the same rewrite, every grouped conv traced as TF's grouped conv
        models["grouped conv"], _ = rewrite()
        how = keras_layers.GroupedPointwiseConv._how
        keras_layers.GroupedPointwiseConv._how = lambda self, x: "grouped conv"
        try:
            prepare(models["grouped conv"], x, y, args.jit, args.optimizer)
        finally:
            keras_layers.GroupedPointwiseConv._how = how
    rounds = {name: [] for name in models}
    for _ in range(args.steps):  # one step of each in turn: the machine is shared and noisy
        for name, model in models.items():
            rounds[name] += step_times(model, x, y, 1)
    medians = {name: statistics.median(times) for name, times in rounds.items()}
    medians["macs"] = report.site_macs_after / report.site_macs_before
    # steps taken side by side share the machine's state: the median of their ratios moves
    # less with drift than the ratio of the medians
    pairs = zip(rounds["rewritten"], rounds["original"])
    medians["paired"] = statistics.median(a / b for a, b in pairs)
    return medians


def main() -> None:
    import keras

    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="32,64,224")
    parser.add_argument("--steps", type=int, default=30, help="per model and size")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--variant", default="B0")
    parser.add_argument("--mode", default="paper", choices=("paper", "linear"))
    parser.add_argument("--exclude", action="append", default=[], help="site glob to leave")
    parser.add_argument("--jit", action="store_true", help="both models compiled with XLA")
    parser.add_argument(
        "--optimizer",
        default="adam",
        help="a Keras optimizer name (each variable's update is "
        "a few ops: the rewrite has more variables)",
    )
    parser.add_argument(
        "--grouped-conv",
        action="store_true",
        help="also time the rewrite with every grouped conv as TF's grouped conv (before)",
    )
    parser.add_argument(
        "--ceiling", action="store_true", help="also time the original without its sites' convs"
    )
    args = parser.parse_args()
    if args.grouped_conv and not keras_layers.tf_grouped_conv_trains():
        parser.error(
            "--grouped-conv: TensorFlow cannot differentiate its grouped convolution here "
            "(oneDNN is off; TF_ENABLE_ONEDNN_OPTS=1 turns it on)"
        )
    factory = getattr(keras.applications, f"EfficientNet{args.variant}")
    runtime = "oneDNN" if _onednn() else "oneDNN off"
    print(
        f"EfficientNet{args.variant}, {args.mode} mode, TensorFlow on CPU ({runtime})"
        f"{''.join(f', --exclude {e}' for e in args.exclude)}{', XLA' if args.jit else ''}, "
        f"batch {args.batch}, {args.optimizer}, "
        f"{args.steps} train_on_batch steps each, one of each model in turn, medians "
        "(paired: the median of the step-by-step ratios)"
    )
    extra = f" {'free ms':>8} {'ceiling':>8}" if args.ceiling else ""
    print(
        f"{'input':>9} {'original ms':>12} {'rewritten ms':>13} {'ratio':>6} {'paired':>6} "
        f"{'target':>7}{extra}"
    )
    for size in (int(s) for s in args.sizes.split(",")):
        t = measure(factory, size, args)
        before, after = t["original"], t["rewritten"]
        line = (
            f"{size:>4}x{size:<4} {before * 1000:12.1f} {after * 1000:13.1f} "
            f"{after / before:6.2f} {t['paired']:6.2f} {'<= ' + str(TARGETS.get(size, 0.9)):>7}"
        )
        if args.ceiling:
            free = t["free"]
            line += f" {free * 1000:8.1f} {(free + (before - free) * t['macs']) / before:8.2f}"
        if args.grouped_conv:
            line += f" (all as grouped convs: {t['grouped conv'] / before:.2f})"
        print(line, flush=True)
    if args.ceiling:
        print(f"site MACs after / before: {t['macs']:.3f}")


if __name__ == "__main__":
    main()
