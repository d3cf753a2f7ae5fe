"""--init fit: K and L fitted to the original kernel (linear mode), in both backends."""

from __future__ import annotations

import json

import jsonschema
import keras
import numpy as np
import pytest
from onnx import numpy_helper

import graphopt
from fixtures import keras_models, onnx_models
from graphopt.backends.onnx_verify import session, verify
from graphopt.fit import fit_site, site_matrix
from graphopt.plan import plan_site
from graphopt.report import SCHEMA_PATH
from tests.conftest import run_pwgroup
from tests.numpy_reference import linear_site


def _relative(got, want) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _plan(cin, filters, bias=True):
    return plan_site("pw", cin, filters, use_bias=bias, min_channels_per_group=16)


def _structured(plan, seed=0):
    """A kernel the site can hold exactly: (I + L P) K for random K and L."""
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((plan.filters, plan.cin // plan.groups))
    lw = rng.standard_normal((plan.filters, plan.filters // plan.groups)) if plan.has_l else None
    return site_matrix(plan, k, lw).astype(np.float32)


def _reference_matrix(plan, fitted):
    """The site's F x Cin map rebuilt with the NumPy reference (docs/method.md) on an identity."""
    eye = np.eye(plan.cin)
    return linear_site(
        eye, fitted.kw.T, plan.groups, None, None if fitted.lw is None else fitted.lw.T
    ).T


@pytest.mark.parametrize("cin,filters", [(64, 32), (96, 96), (32, 64), (144, 24)])
def test_reported_error_is_the_error_of_the_fitted_weights(cin, filters):
    plan = _plan(cin, filters)
    w = np.random.default_rng(1).standard_normal((filters, cin))
    fitted = fit_site(w, plan)
    error = np.linalg.norm(w - _reference_matrix(plan, fitted)) / np.linalg.norm(w)
    assert fitted.error == pytest.approx(error, rel=1e-5)
    # better than K alone taken from W's diagonal blocks (where the fit starts)
    blocks = fit_site(w, plan, iterations=0)
    assert fitted.error <= blocks.error + 1e-12


def test_a_kernel_of_the_site_structure_is_recovered():
    expand = _plan(32, 64)  # no L: a closed form, exact
    assert fit_site(_structured(expand), expand).error < 1e-6
    project = _plan(128, 64)  # with L: alternating least squares, a local optimum
    assert fit_site(_structured(project), project).error < 0.01
    scratch = np.random.default_rng(9).standard_normal((64, 128))
    assert fit_site(scratch, project).error > 0.5  # a random kernel is far from the structure


def test_bias_is_exact_with_and_without_l():
    for plan in (_plan(64, 32), _plan(32, 64)):
        bias = np.random.default_rng(2).standard_normal(plan.filters)
        fitted = fit_site(_structured(plan), plan, bias)
        zero = np.zeros((1, plan.cin))
        out = linear_site(
            zero,
            fitted.kw.T,
            plan.groups,
            fitted.k_bias,
            None if fitted.lw is None else fitted.lw.T,
            fitted.l_bias,
        )
        np.testing.assert_allclose(out[0], bias, atol=1e-6)


def _keras_structured(cin, filters):
    """pointwise_block with its conv kernel and bias set to what the site can hold exactly."""
    model = keras_models.pointwise_block(cin, filters, activation=None)
    conv = model.get_layer("pw")
    w = _structured(_plan(cin, filters))
    bias = np.random.default_rng(3).standard_normal(filters).astype(np.float32)
    conv.set_weights([w.T.reshape(conv.kernel.shape), bias])
    return model


@pytest.mark.parametrize("cin,filters", [(32, 64), (128, 64)])
def test_keras_fit_keeps_the_models_output(cin, filters):
    model = _keras_structured(cin, filters)
    new, report = graphopt.rewrite(model, mode="linear", init="fit")
    (site,) = report.sites
    x = np.random.default_rng(0).standard_normal((2, 6, 6, cin)).astype(np.float32)
    want = keras.ops.convert_to_numpy(model(x))
    got = keras.ops.convert_to_numpy(new(x))
    # for isotropic inputs the output's relative error follows the kernel's
    assert _relative(got, want) <= 2 * site.fit_error + 1e-5
    k = new.get_layer("pw_k").get_weights()[0].reshape(-1, filters).T
    lw = new.get_layer("pw_l").get_weights()[0].reshape(-1, filters).T if site.has_l else None
    w = model.get_layer("pw").get_weights()[0].reshape(cin, filters).T
    rebuilt = site_matrix(site, k, lw)
    assert site.fit_error == pytest.approx(
        np.linalg.norm(w - rebuilt) / np.linalg.norm(w), rel=1e-4, abs=1e-6
    )
    _, scratch = graphopt.rewrite(model, mode="linear")
    assert scratch.sites[0].fit_error is None


def test_keras_fit_on_a_real_network_reports_every_site():
    model = keras.applications.MobileNet(weights=None, classes=10, input_shape=(32, 32, 3))
    new, report = graphopt.rewrite(model, mode="linear", init="fit")
    assert report.sites and all(0 <= s.fit_error < 1 for s in report.sites)
    x = np.random.default_rng(0).standard_normal((1, 32, 32, 3)).astype(np.float32)
    assert np.isfinite(keras.ops.convert_to_numpy(new(x))).all()


def test_onnx_fit_keeps_the_models_output_and_the_weights_match_the_error():
    plan = _plan(128, 64)
    model = onnx_models.single_site(128, 64)
    w = _structured(plan)
    for t in model.graph.initializer:
        if t.name == "W":
            t.CopyFrom(numpy_helper.from_array(w.reshape(64, 128, 1, 1), "W"))
    new, report = graphopt.rewrite(model, mode="linear", init="fit")
    verify(model, new)
    (site,) = report.sites
    inits = {t.name: numpy_helper.to_array(t) for t in new.graph.initializer}
    k, lw = inits["pw_K_W"][:, :, 0, 0], inits["pw_L_W"][:, :, 0, 0]
    rebuilt = site_matrix(plan, k, lw)
    assert site.fit_error == pytest.approx(
        np.linalg.norm(w - rebuilt) / np.linalg.norm(w), rel=1e-4
    )
    x = np.random.default_rng(0).standard_normal((2, 128, 6, 6)).astype(np.float32)
    (want,) = session(model).run(None, {"x": x})
    (got,) = session(new).run(None, {"x": x})
    assert _relative(got, want) <= 2 * site.fit_error + 1e-5


def test_fit_needs_linear_mode(tmp_path, keras_fixtures):
    with pytest.raises(graphopt.GraphoptError, match="linear mode"):
        graphopt.rewrite(keras_models.pointwise_block(), init="fit")
    proc = run_pwgroup("report", keras_fixtures["residual"], "--init", "fit")
    assert proc.returncode == 2 and "linear mode" in proc.stderr


def test_cli_fit_reports_errors_in_text_and_json(tmp_path, keras_fixtures):
    proc = run_pwgroup(
        "report", keras_fixtures["residual"], "--mode", "linear", "--init", "fit",
        "--json", "r.json", cwd=str(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "fit: relative kernel error" in proc.stdout
    data = json.loads((tmp_path / "r.json").read_text())
    with open(SCHEMA_PATH) as f:
        jsonschema.validate(data, json.load(f))
    assert all(isinstance(s["fit_error"], float) for s in data["sites"])
