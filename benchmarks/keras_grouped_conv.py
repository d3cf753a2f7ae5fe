"""How each grouped pointwise conv of a rewritten EfficientNet trains: forward+backward time
(batch 32, CPU) of every K and L in each form the layer knows (TensorFlow's grouped
convolution where TensorFlow can differentiate it, one dense matmul with the block-diagonal
kernel, matmuls batched over the groups) and as the layer computes it
(`GroupedPointwiseConv._how`), medians of calls taken in turn.

Usage: python benchmarks/keras_grouped_conv.py [--sizes 32,64,224] [--calls 30] [--variant B0]

Checks the rule that picks the form (DENSE_MAX_INTENSITY, DENSE_MAX_MACS, BATCHED_FROM_GROUPS
in graphopt/backends/keras_layers.py): per size, how many convs the layer's choice computes
in the fastest form, how far from it the others are, and the sum over all of them. Groups of
one input or one output channel (elementwise products) are left out: benchmarks/
keras_train_step.py --grouped-conv times them in the whole model.

TensorFlow's grouped convolution trains only where oneDNN or cuDNN runs it
(`tf_grouped_conv_trains`): on Linux oneDNN is on by default only for CPUs with AVX512_VNNI,
AVX512_BF16, AVX_VNNI or AMX (off on the AVX2 AMD EPYC Zen 3) unless TF_ENABLE_ONEDNN_OPTS=1.
The first line says which.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import graphopt
from graphopt.backends.keras_layers import GroupedPointwiseConv, tf_grouped_conv_trains


def timer(layer, x, how: str):
    """A traced forward+backward of `layer` on the variable `x`, computed as `how`."""
    import tensorflow as tf

    forms = {
        "grouped conv": layer._as_grouped_conv,
        "block diagonal": layer._block_diagonal,
        "batched": layer._batched,
    }
    forward = forms.get(how, layer)

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
    forms = ("grouped conv",) if tf_grouped_conv_trains() else ()
    forms += ("block diagonal", "batched")
    print(
        f"EfficientNet{args.variant}, paper mode, batch {args.batch}, forward+backward of each "
        f"grouped pointwise conv, {args.calls} calls of each form in turn, medians (ms); "
        + (
            "TensorFlow's grouped convolution trains here"
            if forms[0] == "grouped conv"
            else "TensorFlow's grouped convolution does not train here (oneDNN off)"
        )
    )
    for size in (int(s) for s in args.sizes.split(",")):
        original = factory(weights=None, classes=10, input_shape=(size, size, 3))
        rewritten, _ = graphopt.rewrite(original)
        print(
            f"\n{size}x{size}\n{'conv':32} {'Cin -> F':>12} {'groups':>6} {'map':>7} "
            + "".join(f"{form:>15}" for form in forms)
            + f" {'layer':>7}  layer computes"
        )
        totals = dict.fromkeys(forms + ("layer", "fastest"), 0.0)
        chose_fastest = 0
        rng = np.random.default_rng(0)
        for layer in site_convs(rewritten):
            shape = (args.batch,) + tuple(layer.input.shape[1:])
            x = tf.Variable(rng.normal(size=shape).astype("float32"))
            steps = {form: timer(layer, x, form) for form in forms + ("layer",)}
            for step in steps.values():  # trace and warm up
                step()
                step()
            times = {form: [] for form in steps}
            for _ in range(args.calls):
                for form, step in steps.items():
                    start = time.perf_counter()
                    [g.numpy() for g in step()]
                    times[form].append(time.perf_counter() - start)
            ms = {form: statistics.median(t) * 1000 for form, t in times.items()}
            ms["fastest"] = min(ms[form] for form in forms)
            for form in totals:
                totals[form] += ms[form]
            how = layer._how(x)
            chose_fastest += ms[how] == ms["fastest"]
            spatial = "x".join(str(n) for n in shape[1:-1])
            print(
                f"{layer.name:32} {f'{layer.cin} -> {layer.filters}':>12} {layer.groups:6} "
                f"{spatial:>7} "
                + "".join(f"{ms[form]:15.2f}" for form in forms)
                + f" {ms['layer']:7.2f}  {how}",
                flush=True,
            )
        count = sum(1 for _ in site_convs(rewritten))
        print(
            "all: "
            + ", ".join(f"{form} {totals[form]:.1f} ms" for form in forms)
            + f"; the fastest form of each {totals['fastest']:.1f}; the layer {totals['layer']:.1f}"
            f" (its own form the fastest for {chose_fastest} of {count})"
        )


if __name__ == "__main__":
    main()
