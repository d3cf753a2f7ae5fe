"""Untrusted models: code hidden in Keras files is refused before anything runs; random Keras
CNNs rewrite to models whose counts match the report; repeated rewrites do not leak memory."""

from __future__ import annotations

import gc
import json
import os
import zipfile

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphopt
from fixtures import keras_models, onnx_models
from graphopt.api import keras_counts
from tests.conftest import examples, file_bytes, run_pwgroup


def _patched_keras(src: str, dst: str, patch) -> None:
    """Copy a .keras archive with its config.json changed by `patch(config)`."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == "config.json":
                config = json.loads(data)
                patch(config)
                data = json.dumps(config).encode()
            zout.writestr(item, data)


def _set_activation(config):
    layer = next(x for x in config["config"]["layers"] if x["class_name"] == "Conv2D")
    layer["config"]["activation"] = {
        "module": "os",
        "class_name": "function",
        "config": "system",
        "registered_name": "function",
    }


def _foreign_layer(config):
    layer = next(x for x in config["config"]["layers"] if x["class_name"] == "ReLU")
    layer["module"] = "subprocess"
    layer["class_name"] = "Popen"


@pytest.mark.parametrize(
    "patch,needle", [(_set_activation, "os.function"), (_foreign_layer, "subprocess.Popen")]
)
def test_keras_file_naming_foreign_code_is_refused(keras_fixtures, tmp_path, patch, needle):
    src = str(tmp_path / "evil.keras")
    _patched_keras(keras_fixtures["residual"], src, patch)
    before = file_bytes(src)
    proc = run_pwgroup("rewrite", src, "-o", str(tmp_path / "out.keras"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert needle in proc.stderr and "--trust-model" in proc.stderr
    assert file_bytes(src) == before and not (tmp_path / "out.keras").exists()


def test_legacy_h5_with_lambda_is_refused(tmp_path):
    path = str(tmp_path / "lambda.h5")
    keras_models.with_lambda().save(path)
    with pytest.raises(graphopt.GraphoptError, match="Lambda"):
        graphopt.load(path)


def test_legacy_h5_without_code_rewrites(tmp_path):
    path = str(tmp_path / "m.h5")
    keras_models.residual().save(path)
    model = graphopt.load(path)
    _, report = graphopt.rewrite(model)
    assert len(report.sites) == 3


@st.composite
def random_cnn(draw):
    """A random functional CNN: pointwise and 3x3 convs, BN/activations, Add/Concatenate
    branches and sometimes a nested sub-model, with awkward channel counts."""
    channels = st.sampled_from([1, 3, 7, 16, 17, 32, 48, 64, 96])
    keras.utils.set_random_seed(draw(st.integers(0, 1000)))
    inp = keras.Input((6, 6, draw(channels)))
    tensors = [inp]
    for i in range(draw(st.integers(1, 7))):
        x = tensors[draw(st.integers(0, len(tensors) - 1))]
        kind = draw(st.sampled_from(["pw", "pw", "k3", "bn", "add", "concat", "nested"]))
        if kind == "pw":
            act = draw(st.sampled_from([None, "relu", "swish"]))
            y = keras.layers.Conv2D(
                draw(channels), 1, activation=act, use_bias=draw(st.booleans()), name=f"pw{i}"
            )(x)
        elif kind == "k3":
            y = keras.layers.Conv2D(draw(channels), 3, padding="same", name=f"k3_{i}")(x)
        elif kind == "bn":
            y = keras.layers.BatchNormalization(name=f"bn{i}")(x)
            y = keras.layers.Activation("relu", name=f"act{i}")(y)
        elif kind == "add":
            same = [t for t in tensors if t.shape[-1] == x.shape[-1]]
            y = keras.layers.Add(name=f"add{i}")([x, same[draw(st.integers(0, len(same) - 1))]])
        elif kind == "concat":
            y = keras.layers.Concatenate(name=f"cat{i}")([x, tensors[0]])
        else:
            sub_in = keras.Input(tuple(x.shape[1:]))
            sub_out = keras.layers.Conv2D(draw(channels), 1, name=f"sub_pw{i}")(sub_in)
            y = keras.Model(sub_in, sub_out, name=f"sub{i}")(x)
        tensors.append(y)
    return keras.Model(inp, tensors[-1], name="random_cnn")


@settings(max_examples=examples(15), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=random_cnn(), mode=st.sampled_from(["paper", "linear"]), m=st.sampled_from([1, 4, 16]))
def test_random_keras_cnns_rewrite_with_counts_equal_to_the_report(model, mode, m):
    before = {layer.name: [w.copy() for w in layer.get_weights()] for layer in model.layers}
    new, report = graphopt.rewrite(model, mode=mode, min_channels_per_group=m)
    assert keras_counts(new) == (report.totals.params_after, report.totals.trainable_params_after)
    assert report.totals.params_after - report.totals.params_before == sum(
        s.params_after - s.params_before for s in report.sites
    )
    sites = {s.name for s in report.sites}
    for layer in model.layers:
        if layer.name in sites or isinstance(layer, keras.Model) or not layer.weights:
            continue
        for w, w0 in zip(new.get_layer(layer.name).get_weights(), before[layer.name]):
            np.testing.assert_array_equal(w, w0)
    x = np.random.default_rng(0).standard_normal((2, 6, 6, model.input.shape[-1])).astype("f")
    y = keras.ops.convert_to_numpy(new(x))
    assert y.shape == tuple(keras.ops.convert_to_numpy(model(x)).shape) and np.isfinite(y).all()


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
def test_repeated_rewrites_do_not_grow_memory():
    onnx_model = onnx_models.pytorch_style()
    keras_model = keras_models.conv_bn_act()

    def burst(n):
        for _ in range(n):
            graphopt.rewrite(onnx_model)
            graphopt.rewrite(keras_model)
        gc.collect()

    burst(20)  # warm caches (TensorFlow kernels, tracing)
    base = _rss_mb()
    burst(60)
    middle = _rss_mb()
    burst(60)
    end = _rss_mb()
    # Growth must not continue: the second burst adds no more than a small slack.
    assert end - middle < 25, (base, middle, end)


class _Scale(keras.layers.Layer):
    """A user's custom layer whose config cannot re-create it (no get_config override)."""

    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.w * self.factor


def test_unknown_custom_layers_pass_through_untouched():
    inp = keras.Input((4, 4, 32))
    x = _Scale(3.0)(inp)
    out = keras.layers.Conv2D(32, 1, name="pw")(x)
    model = keras.Model(inp, out)
    new, report = graphopt.rewrite(model)
    assert [s.name for s in report.sites] == ["pw"]
    custom = [layer for layer in new.layers if isinstance(layer, _Scale)]
    assert len(custom) == 1 and custom[0].factor == 3.0
    assert keras_counts(new)[0] == report.totals.params_after
