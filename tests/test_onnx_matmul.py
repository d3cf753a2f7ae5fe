"""MatMul/Gemm sites (issue 13): a pointwise conv written as a matrix product on the last axis
of a feature map, as PyTorch exports ConvNeXt and tf2onnx exports Keras' Dense."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import graphopt
from fixtures import onnx_models
from graphopt.backends.onnx_io import count_params
from graphopt.backends.onnx_verify import random_feed, session, verify
from tests.numpy_reference import linear_site

# name -> (Cin, F, groups, step, L, weight, bias, transposed weight) in convnext_style
SITES = {
    "pw1": (32, 128, 2, 64, False, "pw1_W", "pw1_B", False),
    "pw2": (128, 32, 8, 4, True, "pw2_W", "pw2_B", False),
    "tensordot": (32, 64, 2, 32, False, "td_W", "td_B", True),
}
SEQUENCE_SITES = {
    "seq1": (64, 96, 4, 24, False, "seq1_W", "seq1_B", False),
    "seq2": (96, 64, 4, 16, True, "seq2_W", None, False),
}


def _inits(model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("dense_sequences", [False, True])
@pytest.mark.parametrize("mode", ["paper", "linear"])
def test_matmul_sites_are_found_counted_and_run(mode, dense_sequences):
    model = onnx_models.convnext_style()
    new, report = graphopt.rewrite(model, mode=mode, dense_sequences=dense_sequences)
    verify(model, new)
    want = dict(SITES, **(SEQUENCE_SITES if dense_sequences else {}))
    got = {s.name: (s.cin, s.filters, s.groups, s.interleave_step, s.has_l) for s in report.sites}
    assert got == {name: spec[:5] for name, spec in want.items()}
    assert {s.kind for s in report.sites} == {"matmul"}
    inits = _inits(model)
    for s in report.sites:  # before: the original weight and bias, as the initializers hold
        weight, bias = want[s.name][5:7]
        assert s.params_before == inits[weight].size + (inits[bias].size if bias else 0)
    assert report.totals.params_after == count_params(new)
    saved = sum(s.params_before - s.params_after for s in report.sites)
    assert report.totals.params_before - report.totals.params_after == saved
    skipped = {s.name: s.reason for s in report.skipped}
    assert "head" not in skipped and "head" not in got  # a rank-2 classifier is no site
    if not dense_sequences:
        assert set(skipped) == {"seq1", "seq2"} and "--dense-sequences" in skipped["seq1"]
        ops = [n.op_type for n in new.graph.node if n.name in ("seq1", "seq2")]
        assert ops == ["MatMul", "MatMul"]  # untouched


def _dense_equivalent(new, plan, name):
    """The (Cin x F) matrix and bias of a rewritten linear site, from its new initializers,
    computed with the NumPy reference of docs/method.md (K, interleave, L, sum) on an identity."""
    inits = _inits(new)

    def keras_layout(key):  # (N, in/N, F/N) -> Keras' grouped (in/N, F)
        w = inits.get(f"{name}_{key}_W")
        return None if w is None else w.transpose(1, 0, 2).reshape(w.shape[1], -1)

    k, lw = keras_layout("K"), keras_layout("L")
    kb, lb = inits.get(f"{name}_K_B"), inits.get(f"{name}_L_B")
    at_zero = linear_site(np.zeros((1, plan.cin)), k, plan.groups, kb, lw, lb)[0]
    matrix = linear_site(np.eye(plan.cin), k, plan.groups, kb, lw, lb) - at_zero
    return matrix, at_zero


@pytest.mark.parametrize("init", ["scratch", "fit"])
def test_linear_matmul_sites_compute_what_the_reference_computes(init):
    """Put each rewritten site's dense equivalent into the original model: it must compute
    what the rewritten model computes (grouping, last-axis interleave and L of the MatMul
    form), and with --init fit its distance to the original weight is the reported error."""
    model = onnx_models.convnext_style()
    new, report = graphopt.rewrite(model, mode="linear", init=init, dense_sequences=True)
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    tensors = {t.name: t for t in reference.graph.initializer}
    spec = dict(SITES, **SEQUENCE_SITES)
    for plan in report.sites:
        weight, bias, transposed = spec[plan.name][5:]
        matrix, offset = _dense_equivalent(new, plan, plan.name)
        original = numpy_helper.to_array(tensors[weight])
        original = original.T if transposed else original
        if init == "fit":
            error = np.linalg.norm(matrix - original) / np.linalg.norm(original)
            assert error == pytest.approx(plan.fit_error, rel=1e-3, abs=1e-6)
        tensors[weight].CopyFrom(
            numpy_helper.from_array((matrix.T if transposed else matrix).astype("float32"), weight)
        )
        if bias:
            tensors[bias].CopyFrom(numpy_helper.from_array(offset.astype("float32"), bias))
        else:
            assert not np.any(offset)
    ref = session(reference)
    feed = random_feed(reference, ref)
    (want,) = ref.run(None, feed)
    (got,) = session(new).run(None, feed)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_cli_dense_sequences_and_the_json_kind(tmp_path):
    import json

    import jsonschema

    from graphopt.report import SCHEMA_PATH
    from tests.conftest import run_pwgroup

    path = str(tmp_path / "convnext_style.onnx")
    onnx.save(onnx_models.convnext_style(), path)
    with open(SCHEMA_PATH, encoding="utf-8") as f:
        schema = json.load(f)
    counts = {}
    for flags in ([], ["--dense-sequences"]):
        out = str(tmp_path / f"report{len(flags)}.json")
        done = run_pwgroup("report", path, "--json", out, "--quiet", *flags)
        assert done.returncode == 0, done.stderr
        with open(out, encoding="utf-8") as f:
            data = json.load(f)
        jsonschema.validate(data, schema)
        assert {s["kind"] for s in data["sites"]} == {"matmul"}
        counts[bool(flags)] = len(data["sites"])
    assert counts == {False: 3, True: 5}
