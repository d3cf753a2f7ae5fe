"""Rewriting Keras models: numbers against a NumPy reference, counts against Keras itself."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import graphopt
from fixtures import keras_models
from graphopt.api import keras_counts
from tests.numpy_reference import grouped_pointwise, interleave, linear_site


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _kernel(layer):
    w = layer.get_weights()
    return w[0].reshape(w[0].shape[-2:]), (w[1] if len(w) > 1 else None)


@pytest.mark.parametrize(
    "rank,cin,filters,expect_l,expect_interleave",
    [
        (2, 32, 16, True, True),  # K, interleave, L, sum
        (2, 32, 64, False, True),  # widening: no L, interleaved K output
        (2, 96, 4, True, False),  # step 1: L without interleave
        (1, 32, 16, True, True),  # Conv1D
        (3, 64, 32, True, True),  # Conv3D
    ],
)
def test_linear_mode_site_matches_numpy(rank, cin, filters, expect_l, expect_interleave):
    model = keras_models.pointwise_block(cin, filters, rank=rank, activation="relu")
    new, report = graphopt.rewrite(model, mode="linear", seed=3)
    (plan,) = report.sites
    assert plan.has_l == expect_l and plan.has_interleave == expect_interleave
    names = {layer.name for layer in new.layers}
    assert ("pw_l" in names) == expect_l and ("pw_interleave" in names) == expect_interleave
    x = np.random.default_rng(0).normal(size=(2,) + (6,) * rank + (cin,)).astype("float32")
    k, kb = _kernel(new.get_layer("pw_k"))
    lk, lb = _kernel(new.get_layer("pw_l")) if expect_l else (None, None)
    expected = np.maximum(linear_site(x, k, plan.groups, kb, lk, lb), 0)  # relu after the sum
    np.testing.assert_allclose(_np(new(x)), expected, atol=1e-5)


def test_paper_mode_pulls_bn_and_activation_into_both_branches():
    model = keras_models.conv_bn_act(64, 32)
    new, report = graphopt.rewrite(model, mode="paper", seed=1)
    (plan,) = report.sites
    assert plan.groups == 4 and plan.has_l and plan.l_norm_params == 4 * 32
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    stem = _np(keras.Model(new.inputs, new.get_layer("stem").output)(x))
    bn = new.get_layer("pw_bn")
    gamma, beta, mean, var = bn.get_weights()
    np.testing.assert_array_equal(gamma, model.get_layer("pw_bn").get_weights()[0])
    k, _ = _kernel(new.get_layer("pw_k"))
    lk, _ = _kernel(new.get_layer("pw_l"))
    eps = bn.epsilon
    k_out = np.maximum(
        (grouped_pointwise(stem, k, 4) - mean) / np.sqrt(var + eps) * gamma + beta, 0
    )
    l_out = np.maximum(grouped_pointwise(interleave(k_out, 4), lk, 4) / np.sqrt(1 + eps), 0)
    got = _np(keras.Model(new.inputs, new.get_layer("pw_sum").output)(x))
    np.testing.assert_allclose(got, k_out + l_out, atol=1e-4)
    assert new.get_layer("pw_bn_l").get_weights()[0].tolist() == [1.0] * 32


def test_untouched_layers_keep_their_weights_and_the_input_model_is_unchanged():
    model = keras_models.residual()
    before = {layer.name: [w.copy() for w in layer.get_weights()] for layer in model.layers}
    new, report = graphopt.rewrite(model)
    sites = {s.name for s in report.sites}
    assert sites == {"pw_a", "pw_strided", "shortcut"}
    for layer in model.layers:
        for w, w0 in zip(layer.get_weights(), before[layer.name]):
            np.testing.assert_array_equal(w, w0)
        if layer.name in sites or not layer.weights:
            continue
        for w, w0 in zip(new.get_layer(layer.name).get_weights(), before[layer.name]):
            np.testing.assert_array_equal(w, w0)
    assert new.get_layer("bn_a") is not model.get_layer("bn_a")  # a copy, not shared
    assert new.output.shape == model.output.shape


def test_strided_site_keeps_the_stride_on_k_only():
    new, _ = graphopt.rewrite(keras_models.residual())
    assert new.get_layer("pw_strided_k").strides == (2, 2)
    assert new.get_layer("pw_strided_l").strides == (1, 1)
    assert new.get_layer("add").output.shape == (None, 4, 4, 64)


@pytest.mark.parametrize(
    "make",
    [keras_models.sequential, keras_models.nested, keras_models.residual, keras_models.conv_bn_act],
)
def test_report_totals_equal_what_keras_counts(make):
    model = make()
    new, report = graphopt.rewrite(model)
    t = report.totals
    assert (t.params_before, t.trainable_params_before) == keras_counts(model)
    assert (t.params_after, t.trainable_params_after) == keras_counts(new)
    assert t.params_after - t.params_before == sum(
        s.params_after - s.params_before for s in report.sites
    )
    x = (
        np.random.default_rng(0)
        .normal(size=(2,) + tuple(model.inputs[0].shape[1:]))
        .astype("float32")
    )
    assert np.isfinite(_np(new(x))).all()


def test_nested_models_are_reached_and_sharing_is_kept():
    model = keras_models.nested()
    new, report = graphopt.rewrite(model)
    assert [s.name for s in report.sites] == ["inner_seq/inner_pw", "sub_functional/sub_pw"]
    inner = new.get_layer("inner_seq")
    assert isinstance(inner, keras.Model)
    # the inner model is called twice but its weights exist once
    assert keras_counts(new)[0] == report.totals.params_after
    assert any(
        isinstance(layer, graphopt.backends.keras_layers.GroupedPointwiseConv)
        for layer in inner.layers
    )


def test_rewriting_a_rewritten_model_finds_no_new_site():
    new, _ = graphopt.rewrite(keras_models.conv_bn_act())
    again, report = graphopt.rewrite(new)
    assert report.sites == []
    assert report.totals.params_after == report.totals.params_before


def test_min_channels_per_group_and_seed():
    model = keras_models.pointwise_block(64, 64)
    _, r16 = graphopt.rewrite(model)
    _, r32 = graphopt.rewrite(model, min_channels_per_group=32)
    assert r16.sites[0].groups == 4 and r32.sites[0].groups == 2
    a, _ = graphopt.rewrite(model, seed=5)
    b, _ = graphopt.rewrite(model, seed=5)
    c, _ = graphopt.rewrite(model, seed=6)
    np.testing.assert_array_equal(
        a.get_layer("pw_k").get_weights()[0], b.get_layer("pw_k").get_weights()[0]
    )
    assert not np.array_equal(
        a.get_layer("pw_k").get_weights()[0], c.get_layer("pw_k").get_weights()[0]
    )


def test_bad_arguments_raise_graphopt_errors():
    with pytest.raises(graphopt.GraphoptError):
        graphopt.rewrite(keras_models.pointwise_block(), mode="fast")
    with pytest.raises(graphopt.GraphoptError):
        graphopt.rewrite("not a model")


def test_efficientnet_b0_paper_mode_is_table_2():
    model = keras.applications.EfficientNetB0(weights=None, classes=10)
    new, report = graphopt.rewrite(model)
    assert report.totals.trainable_params_before == 4_020_358
    assert report.totals.trainable_params_after == 639_702
    assert report.totals.reduction_pct == 84.09
    assert len(report.sites) == 49 and len(report.skipped) == 15
    assert keras_counts(new)[1] == 639_702


def test_efficientnet_b0_linear_mode_adds_no_normalisation():
    model = keras.applications.EfficientNetB0(weights=None, classes=10)
    _, report = graphopt.rewrite(model, mode="linear")
    assert all(s.l_norm_params == 0 for s in report.sites)
    assert report.totals.trainable_params_after == 639_702 - sum(
        2 * s.filters for s in report.sites if s.has_l and s.name.endswith("project_conv")
    )


def test_linear_mode_skips_a_site_that_saves_nothing_and_paper_mode_keeps_it():
    """Issue 9: 32 -> 32 with two groups holds 1,088 parameters after, 1,056 before."""
    model = keras_models.pointwise_block(32, 32)
    _, linear = graphopt.rewrite(model, mode="linear")
    assert linear.sites == [] and linear.skipped[0].reason.startswith("no saving")
    _, paper = graphopt.rewrite(model, mode="paper")
    (plan,) = paper.sites
    assert (plan.params_before, plan.params_after, plan.saves) == (1056, 1088, False)
    assert paper.totals.params_after - paper.totals.params_before == 32
