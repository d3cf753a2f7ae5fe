"""How each grouped pointwise conv of a rewritten EfficientNet trains: forward+backward time
(batch 32, CPU) of every K and L as TensorFlow's grouped convolution, as one dense matmul with
the block-diagonal kernel, and as the layer computes it (`GroupedPointwiseConv._how`), medians
of calls taken in turn.

Usage: python benchmarks/keras_grouped_conv.py [--sizes 32,64,224] [--calls 30] [--variant B0]

Checks the rule that picks the dense form (DENSE_MAX_INTENSITY and DENSE_MAX_MACS in
graphopt/backends/keras_layers.py): per size, how many convs the layer's choice makes faster
or slower than the grouped convolution, and the sum over all of them. Groups of one input or
one output channel (elementwise products) are left out: benchmarks/keras_train_step.py
--grouped-conv times them in the whole model.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import graphopt
from graphopt.backends.keras_layers import GroupedPointwiseConv


def timer(layer, x, how: str):
    """A traced forward+backward of `layer` on the variable `x`, computed as `how`."""
    import tensorflow as tf

    def forward(inputs):
        if how == "grouped conv":
            return layer._as_grouped_conv(inputs)
        if how == "block diagonal":
            return layer._block_diagonal(inputs)
        return layer(inputs)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(forward(x)))
        return tape.gradient(loss, [x, layer.kernel])

    return step


def site_convs(model):
    for layer in model.layers:
        if isinstance(layer, GroupedPointwiseConv) and layer.groups not in (
            layer.cin,
            layer.filters,
        ):
            yield layer


def main() -> None:
    import keras
    import tensorflow as tf

    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="32,64,224")
    parser.add_argument("--calls", type=int, default=30, help="per conv and form")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--variant", default="B0")
    args = parser.parse_args()
    factory = getattr(keras.applications, f"EfficientNet{args.variant}")
    forms = ("grouped conv", "block diagonal", "layer")
    print(
        f"EfficientNet{args.variant}, paper mode, batch {args.batch}, forward+backward of each "
        f"grouped pointwise conv, {args.calls} calls of each form in turn, medians (ms)"
    )
    for size in (int(s) for s in args.sizes.split(",")):
        original = factory(weights=None, classes=10, input_shape=(size, size, 3))
        rewritten, _ = graphopt.rewrite(original)
        print(
            f"\n{size}x{size}\n{'conv':32} {'Cin -> F':>12} {'groups':>6} {'map':>7} "
            f"{'grouped conv':>12} {'dense':>7} {'layer':>7}  layer computes"
        )
        totals = dict.fromkeys(forms, 0.0)
        faster = slower = 0
        rng = np.random.default_rng(0)
        for layer in site_convs(rewritten):
            shape = (args.batch,) + tuple(layer.input.shape[1:])
            x = tf.Variable(rng.normal(size=shape).astype("float32"))
            steps = {form: timer(layer, x, form) for form in forms}
            for step in steps.values():  # trace and warm up
                step()
                step()
            times = {form: [] for form in forms}
            for _ in range(args.calls):
                for form, step in steps.items():
                    start = time.perf_counter()
                    [g.numpy() for g in step()]
                    times[form].append(time.perf_counter() - start)
            ms = {form: statistics.median(t) * 1000 for form, t in times.items()}
            for form in forms:
                totals[form] += ms[form]
            how = layer._how(x)
            if how != "grouped conv":
                faster += ms["layer"] < ms["grouped conv"]
                slower += ms["layer"] > ms["grouped conv"]
            spatial = "x".join(str(n) for n in shape[1:-1])
            print(
                f"{layer.name:32} {f'{layer.cin} -> {layer.filters}':>12} {layer.groups:6} "
                f"{spatial:>7} {ms['grouped conv']:12.2f} {ms['block diagonal']:7.2f} "
                f"{ms['layer']:7.2f}  {how}",
                flush=True,
            )
        grouped, dense, own = (totals[form] for form in forms)
        print(
            f"all: grouped conv {grouped:.1f} ms, dense {dense:.1f}, layer {own:.1f}; where "
            f"the layer does not use the grouped conv it is faster for {faster}, slower for "
            f"{slower}"
        )


if __name__ == "__main__":
    main()
