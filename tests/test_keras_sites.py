"""Sites that are not a stock 1x1 conv (issue 13): the pointwise half of SeparableConv1D/2D
and Dense on a feature map's channel axis. Counts against an independent count from the model
config, outputs against the original."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import graphopt
from fixtures import keras_models
from graphopt.api import keras_counts
from tests.numpy_reference import linear_site

SEPARABLE = ("SeparableConv1D", "SeparableConv2D")


def _groups(cin: int, filters: int, m: int = 16) -> int:
    """docs/method.md, the plan of one site, step 1, written out again for the tests."""
    return max(d for d in range(1, max(1, cin // m) + 1) if cin % d == 0 and filters % d == 0)


def expected_sites(model: keras.Model, dense_sequences: bool = False) -> dict[str, tuple]:
    """name -> (kind, Cin, F, use_bias) of every site, from the model's config alone."""
    sites = {}
    for entry in model.get_config()["layers"]:
        cls, cfg = entry["class_name"], entry["config"]
        shape = (entry.get("build_config") or {}).get("input_shape")
        if shape is None:
            continue
        if cls in SEPARABLE:
            kind, cin = "separable", shape[-1] * cfg["depth_multiplier"]
        elif cls.startswith("Conv") and set(cfg["kernel_size"]) == {1} and cfg["groups"] == 1:
            kind, cin = "conv", shape[-1 if cfg["data_format"] == "channels_last" else 1]
        elif cls == "Dense" and len(shape) in ((3, 4, 5) if dense_sequences else (4, 5)):
            kind, cin = "dense", shape[-1]
        else:
            continue
        filters = cfg["filters" if kind != "dense" else "units"]
        if _groups(cin, filters) > 1:
            sites[cfg["name"]] = (kind, cin, filters, cfg["use_bias"])
    return sites


def expected_linear_count(model: keras.Model, dense_sequences: bool = False) -> int:
    """All parameters after a linear-mode rewrite, from the config's sites and Keras' own
    count of the original."""
    total = model.count_params()
    for _, cin, filters, bias in expected_sites(model, dense_sequences).values():
        n, b = _groups(cin, filters), filters if bias else 0
        after = cin * filters // n + b + ((filters * filters // n + b) if cin >= filters else 0)
        total += after - (cin * filters + b)
    return total


@pytest.mark.parametrize("dense_sequences", [False, True])
def test_sites_and_counts_match_an_independent_count(dense_sequences):
    model = keras_models.custom_cnn()
    new, report = graphopt.rewrite(model, mode="linear", dense_sequences=dense_sequences)
    want = expected_sites(model, dense_sequences)
    got = {s.name: (s.kind, s.cin, s.filters, s.use_bias) for s in report.sites}
    assert got == want
    assert {k for k, *_ in want.values()} == {"separable", "dense"}
    assert ("dense_seq" in got) == dense_sequences
    assert new.count_params() == expected_linear_count(model, dense_sequences)
    assert keras_counts(new) == (report.totals.params_after, report.totals.trainable_params_after)
    saved = sum(s.params_before - s.params_after for s in report.sites)
    assert report.totals.params_before - report.totals.params_after == saved
    skipped = {s.name: s.reason for s in report.skipped}
    assert "head" not in skipped and "head" not in got  # a classifier head is not a site
    if not dense_sequences:
        assert "--dense-sequences" in skipped["dense_seq"]


def test_paper_mode_counts_are_what_keras_counts():
    model = keras_models.custom_cnn()
    new, report = graphopt.rewrite(model, mode="paper")
    assert keras_counts(new) == (report.totals.params_after, report.totals.trainable_params_after)
    saved = sum(s.params_before - s.params_after for s in report.sites)
    assert report.totals.params_before - report.totals.params_after == saved
    # the separable conv is split: its depthwise half keeps the original weights
    depthwise = new.get_layer("sep2d_depthwise")
    assert isinstance(depthwise, keras.layers.DepthwiseConv2D) and depthwise.strides == (2, 2)
    np.testing.assert_array_equal(
        depthwise.get_weights()[0], model.get_layer("sep2d").get_weights()[0]
    )
    assert "sep2d" not in {layer.name for layer in new.layers}


def _site_shaped(model: keras.Model) -> None:
    """Give every site a kernel the site holds exactly, so that a fit must reproduce the
    model: (P K) without L; K alone (L = 0) with L, which the fit recovers exactly (a general
    (I + L P) K only to ~1e-2, graphopt.fit)."""
    rng = np.random.default_rng(3)
    for name, (_, cin, filters, _) in expected_sites(model, dense_sequences=True).items():
        layer = model.get_layer(name)
        groups = _groups(cin, filters)
        k = rng.standard_normal((cin // groups, filters)).astype("float32") / np.sqrt(cin)
        l_zero = np.zeros((filters // groups, filters), "float32") if cin >= filters else None
        dense = linear_site(np.eye(cin, dtype="float32"), k, groups, None, l_zero, None)
        variable = layer.pointwise_kernel if hasattr(layer, "pointwise_kernel") else layer.kernel
        variable.assign(dense.reshape(variable.shape).astype("float32"))


def test_linear_fit_of_site_shaped_kernels_keeps_the_outputs():
    model = keras_models.custom_cnn()
    _site_shaped(model)
    new, report = graphopt.rewrite(model, mode="linear", init="fit", dense_sequences=True)
    assert len(report.sites) == 6 and max(s.fit_error for s in report.sites) < 1e-5
    x = np.random.default_rng(0).normal(size=(3, 8, 8, 16)).astype("float32")
    want = keras.ops.convert_to_numpy(model(x))
    got = keras.ops.convert_to_numpy(new(x))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_rewritten_model_trains_saves_and_reloads(tmp_path):
    model = keras_models.custom_cnn()
    new, _ = graphopt.rewrite(model, mode="paper", dense_sequences=True)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 8, 8, 16)).astype("float32")
    y = rng.integers(0, 10, size=(8,))
    new.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = [w.copy() for w in new.get_weights()]
    history = new.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert any(not np.array_equal(a, b) for a, b in zip(before, new.get_weights()))
    path = str(tmp_path / "custom.keras")
    graphopt.save(new, path)
    again = keras.models.load_model(path)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(again(x)), keras.ops.convert_to_numpy(new(x)), atol=1e-5
    )


def test_report_names_the_kind_of_each_site():
    new, report = graphopt.rewrite(keras_models.custom_cnn())
    kinds = {s["name"]: s["kind"] for s in report.to_dict()["sites"]}
    assert kinds == {
        "sep2d": "separable",
        "dense2d": "dense",
        "dense2d_back": "dense",
        "dense3d": "dense",
        "sep1d": "separable",
    }
    text = report.to_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert any(line.startswith("sep2d") and " sep " in line for line in text.splitlines())
    assert "| `dense3d` | dense |" in report.to_markdown()


def _site_list(report) -> list[tuple]:
    return sorted((s.cin, s.filters, s.groups, s.interleave_step, s.has_l) for s in report.sites)


def test_tf2onnx_export_has_the_same_sites():
    """Separable convs export as a depthwise Conv and a 1x1 Conv, Dense as Reshape -> MatMul
    -> Reshape (Tensordot), exact GELU through Erf: the ONNX file has the Keras sites."""
    model = keras_models.custom_cnn()
    _, keras_report = graphopt.rewrite(model, dense_sequences=True)
    exported = graphopt.export_onnx(model)
    _, onnx_report = graphopt.rewrite(exported, dense_sequences=True)
    assert _site_list(onnx_report) == _site_list(keras_report)
    kinds = sorted(s.kind for s in onnx_report.sites)
    assert kinds == ["conv", "conv", "matmul", "matmul", "matmul", "matmul"]


def test_rewritten_model_exports_grouped_convs_that_compute_the_same():
    """Every site (1-D, 2-D and 3-D, from separable convs and Dense) exports as grouped Conv
    nodes; the ONNX model computes what the Keras one does."""
    from graphopt.backends.onnx_verify import session

    new, report = graphopt.rewrite(keras_models.custom_cnn(), dense_sequences=True)
    exported = graphopt.export_onnx(new)
    groups = sorted(
        a.i
        for n in exported.graph.node
        if n.op_type == "Conv"
        for a in n.attribute
        if a.name == "group" and a.i < 16  # not the depthwise convs
    )
    assert groups == sorted(s.groups for s in report.sites for _ in range(2 if s.has_l else 1))
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 16)).astype("float32")
    run = session(exported)
    (got,) = run.run(None, {run.get_inputs()[0].name: x})
    np.testing.assert_allclose(got, keras.ops.convert_to_numpy(new(x)), rtol=1e-4, atol=1e-5)
