"""--fold-slower: a site that would run slower keeps its grouped weights in the file but runs
as one dense conv that onnxruntime computes from them when it loads the model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import graphopt
from fixtures import onnx_models
from graphopt.backends import onnx_rewrite
from graphopt.backends.onnx_io import count_params
from graphopt.backends.onnx_verify import random_feed, session, verify
from tests.conftest import run_pwgroup
from tests.numpy_reference import linear_site


def _rewrite(model, mode="linear", fold=lambda plan: True):
    return onnx_rewrite.rewrite_onnx(model, mode, 16, 3, None, fold=fold)


def _weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _kernel(w):
    return w.reshape(w.shape[0], w.shape[1]).T


@pytest.mark.parametrize(
    "rank,cin,filters,bias",
    [(2, 32, 16, True), (2, 32, 64, False), (2, 96, 4, True), (1, 64, 32, True), (3, 32, 48, True)],
)
def test_folded_site_holds_the_grouped_weights_and_matches_numpy(rank, cin, filters, bias):
    model = onnx_models.single_site(cin, filters, rank=rank, bias=bias, spatial=4)
    grouped, plain = _rewrite(model, fold=frozenset())
    new, report = _rewrite(model)
    (plan,) = report.sites
    assert plan.runs_folded and not plain.sites[0].runs_folded
    assert plan.macs_after == plan.macs_before  # it computes like the dense conv
    # the file holds exactly the grouped K and L of the ordinary rewrite, nothing dense
    assert count_params(new) == count_params(grouped) == report.totals.params_after
    w, g = _weights(new), _weights(grouped)
    sites = ("pw_K_W", "pw_K_B", "pw_L_W", "pw_L_B")
    assert {n for n in w if n in sites} == {n for n in g if n in sites}
    for name in set(w) & set(sites):
        np.testing.assert_array_equal(w[name], g[name])
    w = {name: w[name] for name in set(w) & set(sites)}
    verify(model, new)
    # new values for K and L in the file (as after training, biases nonzero): the dense
    # kernel is computed from what the file holds, so the output follows them
    rng = np.random.default_rng(5)
    for t in new.graph.initializer:
        if t.name in w:
            w[t.name] = rng.standard_normal(w[t.name].shape).astype(np.float32)
            t.CopyFrom(numpy_helper.from_array(w[t.name], t.name))
    x = np.random.default_rng(0).standard_normal((2, cin) + (4,) * rank).astype(np.float32)
    expected = linear_site(
        np.moveaxis(x, 1, -1),
        _kernel(w["pw_K_W"]),
        plan.groups,
        w.get("pw_K_B"),
        _kernel(w["pw_L_W"]) if plan.has_l else None,
        w.get("pw_L_B"),
    )
    (got,) = session(new).run(None, {"x": x})
    # outputs of order 10 here: float32 rounding of a different summation order is relative
    np.testing.assert_allclose(np.moveaxis(got, 1, -1), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(onnx_models.ALL))
@pytest.mark.parametrize("mode", ["paper", "linear"])
def test_folding_never_changes_what_the_model_computes(name, mode):
    """Every fixture (strides, pads, 1D/3D, Constant weights, If branches, shared weights,
    BN and SiLU): folding every foldable site gives the plain rewrite's outputs."""
    model = onnx_models.ALL[name]()
    plain, _ = _rewrite(model, mode=mode, fold=frozenset())
    folded, report = _rewrite(model, mode=mode)
    verify(model, folded)
    assert count_params(folded) == count_params(plain)
    ref = session(plain)
    feed = random_feed(plain, ref)
    for want, got in zip(ref.run(None, feed), session(folded).run(None, feed)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_onnxruntime_folds_the_site_into_one_conv_when_it_loads_it(tmp_path):
    new, _ = _rewrite(onnx_models.single_site(64, 32, spatial=8, opset=11))
    assert "EyeLike" in [n.op_type for n in new.graph.node]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(new.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops == ["Conv"]


def test_no_l_site_with_its_activation_folds_in_paper_mode():
    """The interleave commutes with an elementwise activation, so K -> act -> interleave is
    act(dense conv): foldable. With L, the activation runs in both branches: not linear."""
    expand = onnx_models.single_site(32, 64, activation="Relu")
    new, report = _rewrite(expand, mode="paper")
    assert report.sites[0].runs_folded
    ref = session(expand)
    (x,) = [np.random.default_rng(1).standard_normal((2, 32, 6, 6)).astype(np.float32)]
    grouped, _ = _rewrite(expand, mode="paper", fold=frozenset())
    (want,) = session(grouped).run(None, {"x": x})
    (got,) = session(new).run(None, {"x": x})
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert ref.run(None, {"x": x})[0].shape == got.shape
    project = onnx_models.single_site(64, 32, activation="Relu")
    _, report = _rewrite(project, mode="paper")
    assert not report.sites[0].runs_folded
    _, report = _rewrite(onnx_models.bn_silu(), mode="paper")  # BN pulled into the branches
    assert report.sites and not any(s.runs_folded for s in report.sites)


def test_fold_slower_folds_the_slow_linear_sites_and_leaves_the_others(monkeypatch):
    monkeypatch.setattr(onnx_rewrite, "_timed", lambda plan, purpose, provider: 1.5)
    linear = onnx_models.single_site(64, 32)
    new, report = graphopt.rewrite(linear, fold_slower=True)
    assert report.sites[0].runs_folded and not report.skipped
    verify(linear, new)
    nonlinear = onnx_models.single_site(64, 32, activation="Relu")
    new, report = graphopt.rewrite(nonlinear, fold_slower=True)
    assert not report.sites
    assert "1.50x slower" in report.skipped[0].reason and "not foldable" in report.skipped[0].reason
    monkeypatch.setattr(onnx_rewrite, "_timed", lambda plan, purpose, provider: 0.5)
    _, report = graphopt.rewrite(linear, fold_slower=True)
    assert not report.sites[0].runs_folded


def test_fold_slower_from_the_command_line(tmp_path):
    onnx.save(onnx_models.single_site(64, 64, spatial=16), str(tmp_path / "m.onnx"))
    proc = run_pwgroup(
        "rewrite", "m.onnx", "-o", "out.onnx", "--fold-slower", "--json", "r.json",
        cwd=str(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "r.json").read_text())
    assert len(data["sites"]) + len(data["skipped"]) == 1
    assert all(isinstance(s["runs_folded"], bool) for s in data["sites"])
    proc = run_pwgroup("report", "m.onnx", "--fold-slower", "--skip-slower", cwd=str(tmp_path))
    assert proc.returncode == 2 and "not allowed with" in proc.stderr
