"""keras.applications models whose pointwise layers are separable convs (Xception,
NASNetMobile) or Dense layers (ConvNeXtTiny): each built once, every check on it."""

from __future__ import annotations

import collections
import gc

import keras
import numpy as np
import pytest

import graphopt
from graphopt.api import keras_counts
from graphopt.backends.onnx_verify import verify
from tests.test_keras_sites import expected_linear_count, expected_sites


def _site_list(report) -> collections.Counter:
    return collections.Counter(
        (s.cin, s.filters, s.groups, s.interleave_step, s.has_l) for s in report.sites
    )


@pytest.fixture
def fresh_keras():
    """Each model is large (ConvNeXtTiny's test peaks at ~9 GB): free it before the next."""
    yield
    keras.backend.clear_session()
    gc.collect()


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,kinds,size",
    [
        ("Xception", {"separable", "conv"}, 96),
        ("NASNetMobile", {"separable", "conv"}, 96),
        ("ConvNeXtTiny", {"dense"}, 64),
    ],
)
def test_application_sites_counts_training_and_export(name, kinds, size, fresh_keras):
    """Small inputs keep the training step and the check cheap; the sites do not depend on
    the input size."""
    build = getattr(keras.applications, name)
    model = build(weights=None, classes=10, input_shape=(size, size, 3))
    new, report = graphopt.rewrite(model, mode="paper")
    want = expected_sites(model)
    assert {s.name: (s.kind, s.cin, s.filters, s.use_bias) for s in report.sites} == want
    assert {s.kind for s in report.sites} == kinds
    assert keras_counts(new) == (report.totals.params_after, report.totals.trainable_params_after)
    saved = sum(s.params_before - s.params_after for s in report.sites)
    assert report.totals.params_before - report.totals.params_after == saved
    linear, _ = graphopt.rewrite(model, mode="linear")
    assert linear.count_params() == expected_linear_count(model)

    shape = (2,) + tuple(model.inputs[0].shape[1:])
    x = np.random.default_rng(0).uniform(0, 255, shape).astype("float32")
    # one step, eagerly: every layer's gradient, without TensorFlow's graph build (the first
    # traced step of the rewritten NASNetMobile took 171-185 s on the AVX2 machine, the
    # original's 95 s; eagerly 12 s). Traced training: tests/test_training.py, test_finetune.py
    new.compile(
        "adam", keras.losses.SparseCategoricalCrossentropy(), jit_compile=False, run_eagerly=True
    )
    loss = new.train_on_batch(x, np.array([1, 2]))
    assert np.isfinite(loss)

    exported = graphopt.export_onnx(model)
    rewritten, onnx_report = graphopt.rewrite(exported, mode="paper")
    assert _site_list(onnx_report) == _site_list(report)
    verify(exported, rewritten)
