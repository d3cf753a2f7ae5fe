"""The layers a rewrite inserts compute exactly what docs/method.md says, fast or not."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest

from graphopt.backends import keras_layers
from graphopt.backends.keras_layers import ChannelInterleave, GroupedPointwiseConv
from tests.numpy_reference import grouped_pointwise, interleave


@pytest.mark.parametrize(
    "cin,filters,groups",
    [(32, 16, 2), (64, 64, 4), (1152, 192, 64), (80, 480, 5), (96, 4, 4), (8, 16, 8), (6, 6, 6)],
)
def test_grouped_conv_matches_numpy_and_holds_only_the_grouped_kernel(cin, filters, groups):
    layer = GroupedPointwiseConv(filters, groups, use_bias=True, bias_initializer="random_normal")
    x = np.random.default_rng(0).normal(size=(2, 5, 3, cin)).astype("float32")
    y = keras.ops.convert_to_numpy(layer(x))
    kernel, bias = (w.numpy() for w in layer.weights)
    assert kernel.shape == (1, 1, cin // groups, filters)
    assert layer.count_params() == cin * filters // groups + filters
    np.testing.assert_allclose(y, grouped_pointwise(x, kernel[0, 0], groups, bias), atol=1e-4)


def test_every_strategy_agrees_with_keras_grouped_conv():
    x = np.random.default_rng(1).normal(size=(2, 4, 4, 64)).astype("float32")
    stock = keras.layers.Conv2D(32, 1, groups=8, use_bias=False)
    ref = keras.ops.convert_to_numpy(stock(x))
    ours = GroupedPointwiseConv(32, 8, use_bias=False)
    ours.build(x.shape)
    ours.set_weights(stock.get_weights())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(ours(x)), ref, atol=1e-5)
    # the matmul strategies of 3-D convs and other backends: batched, block-diagonal dense
    for strategy in (ours._batched, ours._block_diagonal):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(strategy(x)), ref, atol=1e-5)


@pytest.mark.parametrize(
    "cin,filters,groups,spatial,with_grouped_conv,with_matmuls",
    [
        # few channels: a dense matmul is memory-bound
        (32, 16, 2, (32, 32), "block diagonal", "block diagonal"),
        (40, 240, 2, (28, 28), "block diagonal", "block diagonal"),
        (80, 80, 10, (14, 14), "grouped conv", "block diagonal"),
        # a small map: 147k multiply-adds per sample, less than a grouped conv's fixed cost
        (192, 192, 64, (2, 2), "block diagonal", "batched"),
        (192, 192, 64, (14, 14), "grouped conv", "batched"),
        (1152, 192, 64, (None, None), "grouped conv", "batched"),
        (320, 1280, 20, (2, 2), "grouped conv", "batched"),
        (24, 24, 6, (None, None), "block diagonal", "block diagonal"),
    ],
)
@pytest.mark.parametrize("grouped_conv_trains", [True, False])
def test_which_form_a_grouped_conv_takes(
    cin,
    filters,
    groups,
    spatial,
    with_grouped_conv,
    with_matmuls,
    grouped_conv_trains,
    monkeypatch,
):
    """Which form a grouped conv takes where TensorFlow can train its grouped convolution
    (DENSE_MAX_INTENSITY, DENSE_MAX_MACS) and where it cannot (MATMUL_DENSE_MAX_INTENSITY):
    every form agrees with NumPy, also on maps whose size is known only when called."""
    monkeypatch.setattr(keras_layers, "tf_grouped_conv_trains", lambda: grouped_conv_trains)
    how = with_grouped_conv if grouped_conv_trains else with_matmuls
    layer = GroupedPointwiseConv(filters, groups, use_bias=False)
    inputs = keras.Input(spatial + (cin,))
    layer(inputs)
    assert layer._how(inputs) == how
    shape = (1,) + tuple(n or 3 for n in spatial) + (cin,)
    x = np.random.default_rng(4).normal(size=shape).astype("float32")
    assert layer._how(x) == how
    want = grouped_pointwise(x, layer.get_weights()[0][0, 0], groups)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), want, atol=1e-4)


@pytest.mark.parametrize("cin,filters,groups", [(320, 1280, 20), (1152, 192, 64), (80, 80, 10)])
def test_large_grouped_convs_train_on_any_cpu(cin, filters, groups):
    """The gradients of a grouped conv too large for a dense matmul, traced as `fit` traces
    them, equal NumPy's. TensorFlow cannot differentiate its own grouped convolution with
    oneDNN off ("Gradients for grouped convolutions are not supported on CPU": the AMD EPYC
    machine), where a rewritten EfficientNetB0 could not take one training step."""
    import tensorflow as tf

    layer = GroupedPointwiseConv(filters, groups, use_bias=False)
    rng = np.random.default_rng(5)
    x = tf.constant(rng.normal(size=(2, 3, 4, cin)).astype("float32"))
    r = rng.normal(size=(2, 3, 4, filters))
    layer.build(x.shape)

    @tf.function
    def gradients():
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x) * tf.constant(r, tf.float32))
        return tape.gradient(loss, [x, layer.kernel])

    dx, dkernel = (g.numpy() for g in gradients())
    kernel = layer.get_weights()[0][0, 0]  # (Cin/groups, F)
    cin_g, f_g = cin // groups, filters // groups
    want_dx = np.concatenate(
        [
            r[..., g * f_g : (g + 1) * f_g] @ kernel[:, g * f_g : (g + 1) * f_g].T
            for g in range(groups)
        ],
        axis=-1,
    )
    rows, grads = x.numpy().reshape(-1, cin), r.reshape(-1, filters)
    want_dkernel = np.concatenate(
        [
            rows[:, g * cin_g : (g + 1) * cin_g].T @ grads[:, g * f_g : (g + 1) * f_g]
            for g in range(groups)
        ],
        axis=-1,
    )
    np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(dkernel[0, 0], want_dkernel, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("rank,strides", [(1, 1), (1, 2), (2, 2), (3, 1)])
def test_grouped_conv_strides_and_ranks(rank, strides):
    x = np.random.default_rng(2).normal(size=(2,) + (6,) * rank + (32,)).astype("float32")
    layer = GroupedPointwiseConv(16, 2, rank=rank, strides=strides, use_bias=False)
    y = keras.ops.convert_to_numpy(layer(x))
    sub = x[(slice(None),) + (slice(None, None, strides),) * rank]
    np.testing.assert_allclose(
        y, grouped_pointwise(sub, layer.get_weights()[0].reshape(16, 16), 2), atol=1e-5
    )
    assert y.shape == layer.compute_output_shape(x.shape)


@pytest.mark.parametrize("cin,filters", [(24, 6), (6, 24), (6, 6)])
def test_one_channel_groups_with_strides_and_channels_first(cin, filters):
    """Groups of one input or one output channel compute as elementwise products: strides and
    the channels-first layout still apply."""
    groups = min(cin, filters)
    x = np.random.default_rng(3).normal(size=(2, cin, 6, 5)).astype("float32")
    layer = GroupedPointwiseConv(
        filters, groups, strides=2, data_format="channels_first", use_bias=False
    )
    y = keras.ops.convert_to_numpy(layer(x))
    last = np.moveaxis(x, 1, -1)[:, ::2, ::2]
    want = grouped_pointwise(last, layer.get_weights()[0][0, 0], groups)
    np.testing.assert_allclose(y, np.moveaxis(want, -1, 1), atol=1e-5)


def test_interleave_matches_numpy_on_dynamic_spatial_dims():
    inp = keras.Input((None, None, 12))
    model = keras.Model(inp, ChannelInterleave(3)(inp))
    x = np.arange(2 * 2 * 5 * 12, dtype="float32").reshape(2, 2, 5, 12)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(x)), interleave(x, 3))


def test_layers_round_trip_through_config():
    layer = GroupedPointwiseConv(8, 2, rank=1, strides=2, activation="swish", name="k")
    clone = GroupedPointwiseConv.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    shuffle = ChannelInterleave(4, axis=1)
    assert ChannelInterleave.from_config(shuffle.get_config()).get_config() == shuffle.get_config()


def test_interleave_on_the_channels_first_axis():
    x = np.arange(2 * 12 * 3 * 2, dtype="float32").reshape(2, 12, 3, 2)
    y = keras.ops.convert_to_numpy(ChannelInterleave(4, axis=1)(x))
    np.testing.assert_array_equal(y, interleave(x, 4, axis=1))


@pytest.mark.parametrize(
    "epsilon,center,scale,shape",
    [
        (1e-3, True, True, (8, 5, 5, 6)),
        (1e-5, False, True, (4, 1, 1, 6)),
        (1e-3, True, False, (8, 3, 7, 6)),
    ],
)
def test_site_batch_norm_trains_like_keras_batch_norm(epsilon, center, scale, shape):
    """A site's BN (fused kernel in training) gives Keras' outputs, gradients and moving
    statistics, and Keras' inference; ranks the kernel does not cover go through Keras."""
    import tensorflow as tf

    from graphopt.backends.keras_layers import SiteBatchNormalization

    rng = np.random.default_rng(0)
    x = rng.normal(2, 3, shape).astype("float32")
    config = dict(epsilon=epsilon, center=center, scale=scale, momentum=0.9)
    plain, fused = keras.layers.BatchNormalization(**config), SiteBatchNormalization(**config)
    plain.build(shape), fused.build(shape)
    weights = [rng.normal(size=w.shape).astype("float32") for w in plain.get_weights()]
    weights[-1] = np.abs(weights[-1])
    plain.set_weights(weights), fused.set_weights(weights)
    results = []
    for layer in (plain, fused):
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = layer(xt, training=True)
            loss = tf.reduce_sum(y * tf.range(1.0, shape[-1] + 1.0))
        grads = tape.gradient(loss, [xt, *layer.trainable_weights])
        results.append((y, grads, layer.get_weights(), layer(xt, training=False)))
    (y0, g0, w0, i0), (y1, g1, w1, i1) = results
    np.testing.assert_allclose(y1, y0, atol=1e-5)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)
    for a, b in zip(w1, w0):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(i1, i0, atol=1e-5)
    flat = rng.normal(size=(8, 6)).astype("float32")  # rank 2: Keras' own code
    plain, fused = keras.layers.BatchNormalization(**config), SiteBatchNormalization(**config)
    np.testing.assert_allclose(fused(flat, training=True), plain(flat, training=True), atol=1e-5)


def test_paper_rewrite_site_norms_are_fused_and_reload():
    import os
    import tempfile

    import graphopt
    from fixtures.keras_models import conv_bn_act
    from graphopt.backends.keras_layers import SiteBatchNormalization

    model, _ = graphopt.rewrite(conv_bn_act(), mode="paper")
    norms = [n for n in model.layers if isinstance(n, keras.layers.BatchNormalization)]
    assert norms and all(type(n) is SiteBatchNormalization for n in norms)
    x = np.random.default_rng(0).normal(size=(2, *model.input_shape[1:])).astype("float32")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "m.keras")
        model.save(path)
        again = keras.models.load_model(path)
    np.testing.assert_allclose(again.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def test_asking_whether_the_grouped_conv_trains_prints_nothing():
    """Where it cannot train, TensorFlow logged the probe's failure to stderr ("Local rendezvous
    is aborting ... Gradients for grouped convolutions are not supported on CPU"), which reads
    as if the rewritten model could not train: for a user who imported TensorFlow first, with
    its C++ log level at its default."""
    import subprocess
    import sys

    code = (
        "import tensorflow, graphopt\n"
        "from graphopt.backends import keras_layers\n"
        "print(keras_layers.tf_grouped_conv_trains())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() in ("True", "False")
    assert "grouped convolutions" not in proc.stderr, proc.stderr
