"""Subclassed Keras models as research code writes them (issue 13): layers as attributes, a
list of blocks, a dict, a shared layer, a conv with its own activation, a nested keras.Model."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import graphopt
from graphopt.api import keras_counts
from tests.numpy_reference import linear_site


@keras.saving.register_keras_serializable(package="tests")
class Block(keras.layers.Layer):
    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels
        self.expand = keras.layers.Conv2D(2 * channels, 1, activation="relu")
        self.project = keras.layers.Conv2D(channels, 1)

    def call(self, x):
        return x + self.project(self.expand(x))

    def get_config(self):
        return {**super().get_config(), "channels": self.channels}


@keras.saving.register_keras_serializable(package="tests")
class Head(keras.Model):
    def __init__(self, classes=10, **kwargs):
        super().__init__(**kwargs)
        self.reduce = keras.layers.Conv2D(32, 1)
        self.proj = keras.layers.Dense(64, activation="relu")  # on a feature map: a site
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.fc = keras.layers.Dense(classes)  # on vectors: not a site

    def call(self, x):
        return self.fc(self.pool(self.proj(self.reduce(x))))


@keras.saving.register_keras_serializable(package="tests")
class Net(keras.Model):
    def __init__(self, width=32, depth=2, classes=10, **kwargs):
        super().__init__(**kwargs)
        self.stem = keras.layers.Conv2D(width, 3, padding="same")
        self.sep = keras.layers.SeparableConv2D(width, 3, padding="same", activation="relu")
        self.blocks = [Block(width) for _ in range(depth)]
        self.shared = keras.layers.Conv2D(width, 1)
        self.convs = {"mix": keras.layers.Conv2D(2 * width, 1, activation="relu")}
        self.head = Head(classes)

    def call(self, x):
        x = self.sep(self.stem(x))
        for block in self.blocks:
            x = block(x)
        x = self.shared(self.shared(x))  # one layer, called twice
        return self.head(self.convs["mix"](x))


def _net():
    keras.utils.set_random_seed(0)
    net = Net()
    net(np.zeros((1, 8, 8, 3), "float32"))
    return net


def _x(n=4):
    return np.random.default_rng(0).normal(size=(n, 8, 8, 3)).astype("float32")


def _groups(cin, filters, m=16):
    return max(d for d in range(1, max(1, cin // m) + 1) if cin % d == 0 and filters % d == 0)


def _pointwise(model):
    """(layer, Cin, F, bias) of every pointwise layer the model holds (each once): 1x1
    Conv2D, the pointwise half of SeparableConv2D, Dense on a rank-4 input."""
    seen = {}
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.SeparableConv2D):
            cin = layer.depthwise_kernel.shape[-2] * layer.depth_multiplier
        elif isinstance(layer, keras.layers.Conv2D) and layer.kernel_size == (1, 1):
            cin = layer.kernel.shape[-2]
        elif (
            isinstance(layer, keras.layers.Dense)
            and len(layer._build_shapes_dict["input_shape"]) == 4  # as Keras built it
        ):
            cin = layer.kernel.shape[0]
        else:
            continue
        f = layer.units if isinstance(layer, keras.layers.Dense) else layer.filters
        seen[id(layer)] = (layer, cin, f, layer.use_bias)
    return list(seen.values())


def _expected_linear_count(model):
    """Linear mode: a site whose replacement would not hold fewer parameters stays."""
    total = model.count_params()
    for _, cin, f, bias in _pointwise(model):
        n, b = _groups(cin, f), f if bias else 0
        after = cin * f // n + b + (f * f // n + b if cin >= f else 0)
        if n > 1 and after < cin * f + b:
            total += after - (cin * f + b)
    return total


def test_sites_counts_and_the_original_untouched():
    net = _net()
    weights = [w.copy() for w in net.get_weights()]
    new, report = graphopt.rewrite(net, mode="linear")
    assert type(new).__name__ == "Net" and isinstance(new, Net) and new is not net
    # 2 x (expand, project), mix, head's reduce; head's proj. shared (32 -> 32) and sep's
    # pointwise half (32 -> 32) would take 2 groups and save nothing: linear mode leaves them,
    # as it does in a Functional model (they were rewritten here, and grew)
    kinds = sorted(s.kind for s in report.sites)
    assert kinds == ["conv"] * 6 + ["dense"]
    no_saving = sorted(s.name for s in report.skipped if s.reason.startswith("no saving"))
    assert len(no_saving) == 2 and all(s.params_after < s.params_before for s in report.sites)
    assert new.count_params() == _expected_linear_count(net)
    assert keras_counts(new) == (report.totals.params_after, report.totals.trainable_params_after)
    saved = sum(s.params_before - s.params_after for s in report.sites)
    assert report.totals.params_before - report.totals.params_after == saved
    assert type(new.shared).__name__ == "Conv2D" and type(new.sep).__name__ == "SeparableConv2D"
    assert type(new.blocks[1].project).__name__ == "PointwiseSite"
    assert type(new.convs["mix"]).__name__ == "PointwiseSite"
    assert type(new.head.reduce).__name__ == "PointwiseSite"
    assert type(new.head.proj).__name__ == "PointwiseSite"
    assert all(np.array_equal(a, b) for a, b in zip(weights, net.get_weights()))
    assert not any(type(c).__name__ == "PointwiseSite" for c, *_ in _pointwise(net))
    assert new(_x()).shape == (4, 10)


def _site_shaped(model):
    """Kernels each site holds exactly (see tests/test_keras_sites.py)."""
    rng = np.random.default_rng(3)
    for layer, cin, f, _ in _pointwise(model):
        n = _groups(cin, f)
        k = rng.standard_normal((cin // n, f)).astype("float32") / np.sqrt(cin)
        l_zero = np.zeros((f // n, f), "float32") if cin >= f else None
        dense = linear_site(np.eye(cin, dtype="float32"), k, n, None, l_zero, None)
        separable = isinstance(layer, keras.layers.SeparableConv2D)
        kernel = layer.pointwise_kernel if separable else layer.kernel
        kernel.assign(dense.reshape(kernel.shape).astype("float32"))


def test_linear_fit_keeps_the_outputs():
    net = _net()
    _site_shaped(net)
    new, report = graphopt.rewrite(net, mode="linear", init="fit")
    assert max(s.fit_error for s in report.sites) < 1e-5
    want = keras.ops.convert_to_numpy(net(_x()))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(new(_x())), want, rtol=1e-4, atol=1e-4)


def test_paper_mode_trains_saves_and_reloads(tmp_path):
    new, report = graphopt.rewrite(_net(), mode="paper")
    assert keras_counts(new)[0] == report.totals.params_after
    # paper mode rewrites the sites that save nothing, as the paper did: the shared layer is
    # one site called twice, and the separable conv keeps its depthwise half
    assert sorted(s.kind for s in report.sites) == ["conv"] * 7 + ["dense", "separable"]
    assert type(new.shared).__name__ == "PointwiseSite" and new.sep.depthwise is not None
    new.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = new.fit(_x(8), np.arange(8) % 10, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    path = str(tmp_path / "net.keras")
    new.save(path)
    again = keras.models.load_model(path)
    assert isinstance(again, Net) and again.count_params() == new.count_params()
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(again(_x())), keras.ops.convert_to_numpy(new(_x())), atol=1e-5
    )


class NoConfig(keras.Model):
    def __init__(self, layers_list):
        super().__init__()
        self.convs = layers_list

    def call(self, x):
        for conv in self.convs:
            x = conv(x)
        return x


def test_a_class_that_cannot_be_copied_says_what_it_needs_or_takes_a_factory():
    def make():
        return NoConfig([keras.layers.Conv2D(32, 1), keras.layers.Conv2D(64, 1)])

    model = make()
    model(np.zeros((1, 4, 4, 32), "float32"))
    with pytest.raises(graphopt.GraphoptError, match="get_config"):
        graphopt.rewrite(model)
    new, report = graphopt.rewrite(model, factory=make)
    assert len(report.sites) == 2 and new.count_params() == report.totals.params_after
