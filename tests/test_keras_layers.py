"""The layers a rewrite inserts compute exactly what SPEC.md says, fast or not."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from graphopt.backends import keras_layers
from graphopt.backends.keras_layers import ChannelInterleave, GroupedPointwiseConv
from tests.numpy_reference import grouped_pointwise, interleave


@pytest.mark.parametrize(
    "cin,filters,groups", [(32, 16, 2), (64, 64, 4), (1152, 192, 64), (80, 480, 5), (96, 4, 4)]
)
def test_grouped_conv_matches_numpy_and_holds_only_the_grouped_kernel(cin, filters, groups):
    layer = GroupedPointwiseConv(filters, groups, use_bias=True, bias_initializer="random_normal")
    x = np.random.default_rng(0).normal(size=(2, 5, 3, cin)).astype("float32")
    y = keras.ops.convert_to_numpy(layer(x))
    kernel, bias = (w.numpy() for w in layer.weights)
    assert kernel.shape == (1, 1, cin // groups, filters)
    assert layer.count_params() == cin * filters // groups + filters
    np.testing.assert_allclose(y, grouped_pointwise(x, kernel[0, 0], groups, bias), atol=1e-4)


def test_both_strategies_agree_with_keras_grouped_conv():
    x = np.random.default_rng(1).normal(size=(2, 4, 4, 64)).astype("float32")
    stock = keras.layers.Conv2D(32, 1, groups=8, use_bias=False)
    ref = keras.ops.convert_to_numpy(stock(x))
    ours = GroupedPointwiseConv(32, 8, use_bias=False)
    ours.build(x.shape)
    ours.set_weights(stock.get_weights())
    for threshold in (1, 10**6):  # batched matmul, then block-diagonal dense
        keras_layers.BATCHED_FROM_GROUPS = threshold
        try:
            np.testing.assert_allclose(keras.ops.convert_to_numpy(ours(x)), ref, atol=1e-5)
        finally:
            keras_layers.BATCHED_FROM_GROUPS = 16


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
