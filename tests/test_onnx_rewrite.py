"""Rewriting ONNX models: NumPy references, the checker, onnxruntime, counts of the files."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import graphopt
from fixtures import onnx_models
from graphopt.backends.onnx_io import count_params, iter_graphs, load_onnx
from graphopt.backends.onnx_verify import interface, random_feed, session, verify
from tests.numpy_reference import grouped_pointwise, interleave, linear_site


def _inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _kernel(w):
    """ONNX grouped weight [F, Cin/N, 1, ...] -> reference layout (Cin/N, F)."""
    return w.reshape(w.shape[0], w.shape[1]).T


def _run(model, feed):
    return session(model).run(None, feed)


@pytest.mark.parametrize(
    "rank,cin,filters,bias,expect_l,expect_interleave",
    [
        (2, 32, 16, True, True, True),
        (2, 32, 64, False, False, True),
        (2, 96, 4, True, True, False),
        (1, 32, 16, True, True, True),
        (1, 32, 64, True, False, True),
        (1, 96, 4, False, True, False),
    ],
)
def test_site_matches_numpy(rank, cin, filters, bias, expect_l, expect_interleave):
    model = onnx_models.single_site(cin, filters, rank=rank, bias=bias)
    new, report = graphopt.rewrite(model, mode="linear", seed=2)
    (plan,) = report.sites
    assert (plan.has_l, plan.has_interleave) == (expect_l, expect_interleave)
    w = _inits(new)
    ops = [n.op_type for n in new.graph.node]
    assert ops.count("Conv") == (2 if expect_l else 1)
    assert all(
        a.i == plan.groups
        for n in new.graph.node
        if n.op_type == "Conv"
        for a in n.attribute
        if a.name == "group"
    )
    x = np.random.default_rng(0).standard_normal((2, cin) + (6,) * rank).astype(np.float32)
    xl = np.moveaxis(x, 1, -1)
    expected = linear_site(
        xl,
        _kernel(w["pw_K_W"]),
        plan.groups,
        w.get("pw_K_B"),
        _kernel(w["pw_L_W"]) if expect_l else None,
        w.get("pw_L_B"),
    )
    (got,) = _run(new, {"x": x})
    np.testing.assert_allclose(np.moveaxis(got, 1, -1), expected, atol=1e-5)


def test_paper_mode_applies_bn_and_silu_in_both_branches():
    model = onnx_models.bn_silu()
    new, report = graphopt.rewrite(model, seed=1)
    (plan,) = report.sites
    assert plan.groups == 8 and plan.l_norm_params == 4 * 64
    w, orig = _inits(new), _inits(model)
    x = np.random.default_rng(0).standard_normal((2, 128, 4, 4)).astype(np.float32)
    xl = np.moveaxis(x, 1, -1)

    def silu(v):
        return v / (1 + np.exp(-v))

    k = grouped_pointwise(xl, _kernel(w["pw_K_W"]), 8)
    k = silu((k - orig["mean"]) / np.sqrt(orig["var"] + 1e-3) * orig["scale"] + orig["bias"])
    ll = grouped_pointwise(interleave(k, 8), _kernel(w["pw_L_W"]), 8)
    expected = k + silu(ll / np.sqrt(1 + 1e-3))
    (got,) = _run(new, {"x": x})
    np.testing.assert_allclose(np.moveaxis(got, 1, -1), expected, atol=1e-4)


def test_linear_mode_leaves_what_follows_the_conv():
    new, report = graphopt.rewrite(onnx_models.bn_silu(), mode="linear")
    ops = [n.op_type for n in new.graph.node]
    assert ops.count("BatchNormalization") == 1 and ops.count("Sigmoid") == 1
    assert report.sites[0].l_norm_params == 0


@pytest.mark.parametrize("name", sorted(onnx_models.ALL))
def test_every_fixture_rewrites_to_a_valid_running_model(name, tmp_path):
    model = onnx_models.ALL[name]()
    for mode in ("paper", "linear"):
        new, report = graphopt.rewrite(model, mode=mode)
        verify(model, new)  # checker(full_check), interface, onnxruntime, finite outputs
        assert interface(new) == interface(model)
        assert new.ir_version == model.ir_version
        assert list(new.opset_import) == list(model.opset_import)
        path = str(tmp_path / f"{mode}.onnx")
        graphopt.save(new, path)
        assert report.totals.params_before == count_params(model)
        assert report.totals.params_after == count_params(load_onnx(path))
        assert report.totals.params_after - report.totals.params_before == sum(
            s.params_after - s.params_before for s in report.sites
        )


def test_model_without_site_is_returned_unchanged():
    model = onnx_models.no_site()
    new, report = graphopt.rewrite(model)
    assert report.sites == [] and report.totals.params_after == report.totals.params_before
    assert new.SerializeToString() == model.SerializeToString()


def test_constant_node_weights_are_replaced_by_initializers():
    model = onnx_models.constant_weights()
    assert len(model.graph.initializer) == 0
    new, _ = graphopt.rewrite(model)
    ops = [n.op_type for n in new.graph.node]
    assert "Constant" not in ops  # the replaced conv's weights went with it
    assert {"pw_K_W", "pw_L_W"} <= set(_inits(new))
    assert ops.count("HardSigmoid") == 2  # paper mode: the activation in both branches


def test_convs_inside_if_branches_are_rewritten_for_both_branches():
    model = onnx_models.if_subgraph()
    new, report = graphopt.rewrite(model, mode="linear")
    assert sorted(s.name for s in report.sites) == ["else_pw", "then_pw"]
    main_inits = {t.name for t in new.graph.initializer}
    assert "W" not in main_inits and "W2" not in main_inits  # only they used them
    for cond in (True, False):
        feed = {"x": np.ones((1, 64, 4, 4), np.float32), "cond": np.array(cond)}
        (got,) = _run(new, feed)
        assert got.shape == (1, 32, 4, 4) and np.isfinite(got).all()


def _initializer_homes(model) -> dict[str, list[str]]:
    """Initializer name -> names of the graphs that define it (subgraphs included)."""
    homes: dict[str, list[str]] = {}
    for g in iter_graphs(model.graph):
        for t in g.initializer:
            homes.setdefault(t.name, []).append(g.name)
    return homes


@pytest.mark.parametrize("mode", ["paper", "linear"])
def test_outer_scope_weights_stay_in_the_main_graph_once(mode):
    """Issue 9: weights of the main graph read by If/Loop bodies were copied into every body,
    so the model grew while its sites saved parameters."""
    model = onnx_models.outer_scope_weights()
    new, report = graphopt.rewrite(model, mode=mode, min_channels_per_group=8)  # 4 groups 32->32
    verify(model, new)
    assert sorted(s.name for s in report.sites) == ["else_own_pw", "else_pw", "loop_pw"]
    homes = _initializer_homes(new)
    assert all(len(graphs) == 1 for graphs in homes.values()), homes
    main = model.graph.name
    assert homes["K3"] == [main] and homes["trips"] == [main]  # read by both branches
    assert not {"W", "B", "LW", "E_W"} & set(homes)  # only the replaced convs read them
    # The new weights of an outer conv live where it did; a branch's own conv stays there.
    assert homes["else_pw_K_W"] == homes["loop_pw_K_W"] == [main]
    assert homes["else_own_pw_K_W"] == ["else"]
    delta = count_params(new) - count_params(model)
    assert delta == sum(s.params_after - s.params_before for s in report.sites) < 0
    for cond in (True, False):
        feed = {"x": np.ones((1, 64, 4, 4), np.float32), "cond": np.array(cond)}
        assert all(np.isfinite(out).all() for out in _run(new, feed))


def test_a_failed_accounting_check_is_a_bug_report_and_writes_nothing(
    tmp_path, capsys, monkeypatch
):
    import cli
    from graphopt.backends import onnx_rewrite

    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(onnx_models.single_site(), str(src))
    real = onnx_rewrite.count_params
    calls = []

    def miscounted(model):
        calls.append(model)
        return real(model) + (len(calls) > 1)  # the rewritten model holds one more

    monkeypatch.setattr(onnx_rewrite, "count_params", miscounted)
    with pytest.raises(graphopt.InternalError, match="sites account for"):
        graphopt.rewrite(onnx_models.single_site())
    calls.clear()
    assert cli.main(["rewrite", str(src), "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a bug in pwgroup" in err[0] and str(src) in err[0], err
    assert not out.exists()


def test_a_conv_used_twice_stays_one_layer_with_one_set_of_new_weights():
    model = onnx_models.shared_head()
    new, report = graphopt.rewrite(model, mode="linear", seed=3)
    (plan,) = report.sites  # one layer, one site, as Keras reports a shared layer
    convs = [n for n in new.graph.node if n.op_type == "Conv"]
    assert len(convs) == 4 and {tuple(n.input[1:]) for n in convs} == {
        ("head_p3_K_W", "head_p3_K_B"),
        ("head_p3_L_W", "head_p3_L_B"),
    }
    delta = report.totals.params_after - report.totals.params_before
    assert plan.groups == 4  # 64 // 16
    before, after = 64 * 32 + 32, (64 * 32 // 4 + 32) + (32 * 32 // 4 + 32)
    assert delta == plan.params_after - plan.params_before == after - before
    w = _inits(new)
    rng = np.random.default_rng(1)
    feed = {"p3": rng.standard_normal((1, 64, 8, 8)), "p4": rng.standard_normal((1, 64, 4, 4))}
    feed = {k: v.astype(np.float32) for k, v in feed.items()}
    for x, got in zip(feed.values(), _run(new, feed)):
        expected = linear_site(
            np.moveaxis(x, 1, -1),
            _kernel(w["head_p3_K_W"]),
            plan.groups,
            w["head_p3_K_B"],
            _kernel(w["head_p3_L_W"]),
            w["head_p3_L_B"],
        )
        np.testing.assert_allclose(np.moveaxis(got, 1, -1), expected, atol=1e-5)
    _, kept = graphopt.rewrite(model, exclude=["head_p3"])
    assert not kept.sites and "shares its weights with head_p3" in kept.skipped[1].reason


def test_strided_padded_site_keeps_stride_and_pads_on_k():
    model = onnx_models.single_site(64, 64, strides=2, pads=1)
    new, _ = graphopt.rewrite(model, mode="linear")
    convs = {
        n.name: {a.name: list(a.ints) or a.i for a in n.attribute}
        for n in new.graph.node
        if n.op_type == "Conv"
    }
    assert convs["pw_K"]["strides"] == [2, 2] and convs["pw_K"]["pads"] == [1, 1, 1, 1]
    assert "strides" not in convs["pw_L"] and "pads" not in convs["pw_L"]
    feed = random_feed(model, session(model))
    assert _run(new, feed)[0].shape == _run(model, feed)[0].shape == (1, 64, 4, 4)


def test_dynamic_dims_and_residual_inputs_survive():
    model = onnx_models.pytorch_style()
    new, report = graphopt.rewrite(model)
    assert [s.name for s in report.sites] == ["pw1", "pw2", "down"]
    ref, got = session(model), session(new)
    for hw in (8, 13):
        feed = {"x": np.random.default_rng(hw).standard_normal((3, 3, hw, hw)).astype("f")}
        assert ref.run(None, feed)[0].shape == got.run(None, feed)[0].shape
    # "residual" still reads the stem's output: the shared tensor kept its other consumer
    residual = next(n for n in new.graph.node if n.name == "residual")
    assert "s_act" in residual.input


def test_rewriting_twice_finds_no_new_site():
    new, _ = graphopt.rewrite(onnx_models.pytorch_style())
    _, again = graphopt.rewrite(new)
    assert again.sites == []
    assert {s.reason.split(" (")[0] for s in again.skipped} == {"already grouped"}


def test_opset_11_model_keeps_opset_11():
    model = onnx_models.single_site(opset=11)
    new, _ = graphopt.rewrite(model)
    assert [o.version for o in new.opset_import] == [11]
    onnx.checker.check_model(new, full_check=True)


@pytest.mark.parametrize("kind", ["gather", "transpose"])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_every_interleave_implementation_matches_numpy(kind, rank, monkeypatch):
    from graphopt.backends import onnx_build

    monkeypatch.setattr(onnx_build, "INTERLEAVE", kind)
    model = onnx_models.single_site(64, 32, rank=rank, spatial=4)
    new, report = graphopt.rewrite(model, mode="linear")
    ops = {n.op_type for n in new.graph.node}
    assert ("Gather" in ops) == (kind == "gather") and ("Transpose" in ops) == (kind != "gather")
    w = _inits(new)
    x = np.random.default_rng(1).standard_normal((3, 64) + (4,) * rank).astype(np.float32)
    expected = linear_site(
        np.moveaxis(x, 1, -1),
        _kernel(w["pw_K_W"]),
        4,
        w["pw_K_B"],
        _kernel(w["pw_L_W"]),
        w["pw_L_B"],
    )
    (got,) = _run(new, {"x": x})
    np.testing.assert_allclose(np.moveaxis(got, 1, -1), expected, atol=1e-5)


def test_skip_slower_times_sites_and_lists_the_slow_ones():
    model = onnx_models.single_site(64, 64, spatial=16)
    _, full = graphopt.rewrite(model)
    new, report = graphopt.rewrite(model, skip_slower=True)
    verify(model, new)
    slow = [s for s in report.skipped if "slower than the dense conv" in s.reason]
    assert len(report.sites) + len(slow) == len(full.sites) == 1
    for s in slow:
        assert float(s.reason.split("x slower")[0]) > 1.0
    # dynamic spatial dims: nothing to time, every site is rewritten
    _, dynamic = graphopt.rewrite(onnx_models.pytorch_style(), skip_slower=True)
    assert len(dynamic.sites) == 3


def test_skip_slower_is_for_onnx_only():
    from fixtures import keras_models

    with pytest.raises(graphopt.GraphoptError, match="ONNX"):
        graphopt.rewrite(keras_models.pointwise_block(), skip_slower=True)


def test_linear_mode_skips_a_site_that_saves_nothing_and_paper_mode_marks_it():
    """Issue 9: Cin = F = 32 with two groups holds 1,088 parameters after, 1,056 before."""
    model = onnx_models.single_site(32, 32)
    new, report = graphopt.rewrite(model, mode="linear")
    assert report.sites == [] and report.skipped[0].reason.startswith("no saving")
    assert count_params(new) == count_params(model)
    new, report = graphopt.rewrite(model, mode="paper")
    (plan,) = report.sites
    assert (plan.params_before, plan.params_after, plan.saves) == (1056, 1088, False)
    assert plan.as_dict()["saves"] is False
    assert "1.1k!" in report.to_text() and "1,088! |" in report.to_markdown()
    _, report = graphopt.rewrite(onnx_models.single_site(64, 32), mode="linear")
    assert report.sites[0].saves and report.sites[0].as_dict()["saves"] is True


def test_sibling_branches_weights_of_the_same_name_are_two_sites():
    """Found while fixing issue 9: convs were matched to an earlier use by weight *name*, so
    the else branch's own "W" got the then branch's new weights, which it cannot see."""
    model = onnx_models.same_names_in_branches()
    new, report = graphopt.rewrite(model)
    assert sorted(s.name for s in report.sites) == ["else_pw", "then_pw"]
    verify(model, new)
    homes = _initializer_homes(new)
    assert homes["then_pw_K_W"] == ["then"] and homes["else_pw_K_W"] == ["else"]


def test_quantized_convs_are_listed_as_skipped_and_the_report_says_integers_are_not_counted():
    """Issue 24 (5): a QLinearConv or ConvInteger 1x1 conv was silently left out of `skipped`,
    and the totals did not say that they count no integer weights."""
    import jsonschema

    from graphopt.report import SCHEMA_PATH
    from graphopt.report_html import render_html

    model = onnx_models.quantized()
    new, report = graphopt.rewrite(model, name="quantized.onnx")
    assert report.sites == [] and new.SerializeToString() == model.SerializeToString()
    data = report.to_dict()
    assert data["skipped"] == [
        {
            "name": "qpw",
            "reason": "quantized conv (QLinearConv): integer weights are not rewritten",
            "cin": 16,
            "filters": 32,
        },
        {
            "name": "ipw",
            "reason": "quantized conv (ConvInteger): integer weights are not rewritten",
            "cin": 32,
            "filters": 8,
        },
    ]
    assert data["totals"]["params_before"] == 3  # the three float scales, no uint8 weights
    note = "integer tensors (the weights of quantized convs) are not counted in the parameter"
    assert data["notes"] == [f"{note} totals"]
    jsonschema.validate(data, json.load(open(SCHEMA_PATH)))
    text = report.to_text()
    assert "qpw: quantized conv (QLinearConv)" in text and "skipped 2:" in text
    assert f"note: {note} totals" in " ".join(text.split())  # wrapped at 80 columns
    assert f"Note: {note} totals." in report.to_markdown()
    assert f"<p class=note>Note: {note} totals.</p>" in render_html([report])
    assert "notes" not in graphopt.rewrite(onnx_models.single_site())[1].to_dict()
