"""Reconstruction of one site on activations (graphopt.reconstruct), against NumPy references."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.fit import fit_site, site_matrix
from graphopt.plan import interleave_permutation, plan_site
from graphopt.reconstruct import Step, fit_linear, fit_paper, relative_error


def _activations(rng, n, cin):
    """Correlated, offset activations, as real feature maps are."""
    mix = rng.normal(size=(cin, cin)) / np.sqrt(cin)
    return rng.normal(size=(n, cin)) @ mix + rng.normal(size=cin)


@pytest.mark.parametrize("cin, filters", [(64, 32), (96, 96), (32, 96), (192, 64)])
def test_a_site_with_the_structure_is_recovered_from_its_activations(cin, filters):
    rng = np.random.default_rng(cin + filters)
    plan = plan_site("s", cin, filters, use_bias=True)
    kw = rng.normal(size=(filters, cin // plan.groups))
    lw = rng.normal(size=(filters, filters // plan.groups)) * 0.3 if plan.has_l else None
    weight, bias = site_matrix(plan, kw, lw), rng.normal(size=filters)
    x = _activations(rng, 3000, cin)
    fitted = fit_linear(plan, x, x @ weight.T + bias)
    assert fitted.error < 2e-2
    # the NumPy reference of the fitted site: (I + L P) K x + L's bias, or P (K x + K's bias)
    held = _activations(rng, 500, cin)
    m = site_matrix(plan, fitted.kw.astype(float), None if lw is None else fitted.lw.astype(float))
    if plan.has_l:
        assert not fitted.k_bias.any()
        pred = held @ m.T + fitted.l_bias
    else:
        pred = held @ m.T + fitted.k_bias[interleave_permutation(filters, plan.groups)]
    assert relative_error(pred, held @ weight.T + bias) < 8e-2  # ALS: a local optimum


def test_fitting_on_activations_beats_fitting_the_kernel_on_those_activations():
    rng = np.random.default_rng(1)
    plan = plan_site("s", 192, 64, use_bias=False)
    weight = rng.normal(size=(64, 192))
    x = _activations(rng, 4000, 192)
    on_data = fit_linear(plan, x, x @ weight.T)
    on_kernel = fit_site(weight, plan)
    kernel_error = relative_error(x @ site_matrix(plan, on_kernel.kw, on_kernel.lw).T, x @ weight.T)
    assert on_data.error < 0.8 * kernel_error


def test_paper_site_with_bn_and_relu_is_fitted_by_gradient_steps():
    rng = np.random.default_rng(2)
    plan = plan_site("s", 64, 32, use_bias=False, l_norm_per_channel=(4, 2))
    weight = rng.normal(size=(32, 64)) / 8
    bn = Step("affine", rng.uniform(0.5, 2, 32), rng.normal(size=32) * 0.1, 1e-3)
    steps = [bn, Step("act", fn=lambda z: np.maximum(z, 0))]
    x = _activations(rng, 4000, 64)
    pre = x @ weight.T
    target = np.maximum(pre * bn.scale + bn.shift, 0)
    fitted = fit_paper(plan, x, target, pre, steps, iterations=300)
    assert fitted.l_norm is not None and fitted.l_norm[0].shape == (32,)
    assert fitted.error < 0.6  # it learns: a random init of the same site is ~1.0


@pytest.mark.parametrize("cin, filters, bias", [(64, 32, True), (32, 64, True), (48, 48, False)])
def test_paper_site_gradients_match_finite_differences(cin, filters, bias):
    """The paper site's gradients are written out by hand (no framework): each parameter's
    against central differences of the loss, through BN, swish (its derivative itself taken by
    differences), interleave, L and BN'."""
    from graphopt.reconstruct import _Blocks, _PaperSite

    rng = np.random.default_rng(cin + filters)
    plan = plan_site("s", cin, filters, use_bias=bias, l_norm_per_channel=(4, 2))
    b = _Blocks(plan)
    steps = [
        Step("affine", rng.uniform(0.5, 2, filters), rng.normal(size=filters), 1e-3),
        Step("act", fn=lambda z: z / (1 + np.exp(-z))),
    ]
    start_k = rng.normal(size=(b.n, b.s, b.c)) / np.sqrt(b.c)
    bias0 = rng.normal(size=filters) if bias else None
    site = _PaperSite(plan, b, steps, start_k, bias0, rng, dtype=np.float64)  # exact enough
    if plan.has_l:
        site.params["l"] *= 10  # away from the small init, so that L's path counts
    x, target = rng.normal(size=(16, cin)), rng.normal(size=(16, filters))

    def loss() -> float:
        return float(np.sum((site.forward(x)[0] - target) ** 2))

    out, tape = site.forward(x)
    grads = site.backward(2 * (out - target), tape)
    assert set(grads) == set(site.params)
    for name, value in site.params.items():
        flat = value.reshape(-1)
        for index in rng.choice(flat.size, 5, replace=False):
            keep = flat[index]
            flat[index] = keep + 1e-5
            up = loss()
            flat[index] = keep - 1e-5
            down = loss()
            flat[index] = keep
            numeric = (up - down) / 2e-5
            got = grads[name].reshape(-1)[index]
            assert got == pytest.approx(numeric, rel=1e-3, abs=1e-3), name


@pytest.mark.parametrize(
    "name", ["relu", "relu6", "sigmoid", "tanh", "silu", "hard_sigmoid", "hard_silu", "elu"]
)
def test_keras_activations_written_out_in_numpy_match_keras(name):
    """Calibration runs Keras' activations as NumPy functions with their derivatives: the same
    values as Keras, and derivatives matching Keras' own gradients."""
    import keras
    import tensorflow as tf

    from graphopt.backends.keras_calib import _activation_step

    fn = keras.activations.get(name)
    step = _activation_step(fn)
    assert step.grad is not None, "written out, not run through Keras"
    z = np.linspace(-7, 7, 2001).astype(np.float32)
    z = z[np.abs(z - np.round(z)) > 1e-3]  # off the kinks (0, 6, +-3)
    t = tf.constant(z)
    with tf.GradientTape() as tape:
        tape.watch(t)
        y = fn(t)
    np.testing.assert_allclose(step.fn(z.astype(np.float64)), y.numpy(), atol=1e-5)
    np.testing.assert_allclose(step.grad(z.astype(np.float64)), tape.gradient(y, t), atol=1e-4)
    relu6 = _activation_step(keras.layers.ReLU(max_value=6.0))
    np.testing.assert_allclose(relu6.fn(np.array([-1.0, 3.0, 9.0])), [0, 3, 6])
