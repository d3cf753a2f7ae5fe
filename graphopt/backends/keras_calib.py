"""What calibration needs of Keras: build the rewrite with given weights, read a site's input
through a sub-model, run a model. Sites inside nested models, and layers called more than once,
keep their init (their tensors have no single place in the top-level graph)."""

from __future__ import annotations

from dataclasses import dataclass, field

import keras
import numpy as np

from graphopt import activations as act
from graphopt.backends.keras_io import cpu_layouts
from graphopt.backends.keras_rewrite import depthwise_half, pointwise_kernel, put_fitted
from graphopt.calibrate import BATCH, Built, RewriteOptions, SiteInfo
from graphopt.data import Samples
from graphopt.plan import PAPER, Selection
from graphopt.reconstruct import Step


@dataclass
class KerasCalibration(RewriteOptions):
    original: keras.Model
    _last: tuple | None = field(default=None, repr=False)
    _depthwise_outputs: dict = field(default_factory=dict, repr=False)

    @property
    def output_names(self) -> list[str]:
        return list(self.original.output_names)  # the layers' names, as the user knows them

    def build(self, selection: Selection, weights) -> Built:
        from graphopt.api import _rewrite_keras

        model, report, found = self.rewrite_found(_rewrite_keras, selection, weights)
        sites, handles = {}, {}
        for name, site in found.items():
            layers = site.replacement
            if "/" in name or "k" not in layers:
                continue  # sites inside nested models keep their init
            if len(site.layer._inbound_nodes) != 1:
                continue
            if len(layers["k"]._inbound_nodes) != 1:
                continue
            sites[name] = self._info(site, self._site_input(name, site), layers["k"].input)
            handles[name] = layers
        return Built(model, report, sites, handles)

    def _site_input(self, name: str, site):
        """The original's tensor that the pointwise conv of `site` reads. A separable conv's
        pointwise half reads its depthwise half's output, which is inside the layer: it is
        made a tensor of the original's graph by a copy of that half called on the layer's
        input (once per site: a new tensor would cost a new sub-model and trace)."""
        if site.plan.kind != "separable":
            return site.layer.input
        if name not in self._depthwise_outputs:
            sep = site.layer
            half = depthwise_half(sep)
            out = half(sep.input)
            half.set_weights([keras.ops.convert_to_numpy(sep.depthwise_kernel)])
            self._depthwise_outputs[name] = out
        return self._depthwise_outputs[name]

    def update(self, built: Built, name: str, fitted) -> None:
        put_fitted(built.handles[name], fitted)

    def _info(self, site, x_original, x_rewritten) -> SiteInfo:
        layer, rank = site.layer, site.rank
        kernel = keras.ops.convert_to_numpy(pointwise_kernel(layer))
        cin, filters = kernel.shape[-2], kernel.shape[-1]
        bias = keras.ops.convert_to_numpy(layer.bias) if layer.use_bias else None
        steps = []
        if self.mode == PAPER:
            if keras.activations.serialize(layer.activation) != "linear":
                steps.append(_activation_step(layer.activation))
            steps += [_step(node.operation) for node in site.chain]
        conv = site.plan.kind == "conv"  # a separable conv strides in its depthwise half
        channels_first = getattr(layer, "data_format", None) == "channels_first"
        return SiteInfo(
            plan=site.plan,
            x_original=x_original,
            x_rewritten=x_rewritten,
            weight=kernel.reshape(cin, filters).T.astype(np.float64),
            bias=None if bias is None else bias.astype(np.float64),
            strides=tuple(layer.strides) if conv else (1,) * rank,
            channel_axis=1 if channels_first else -1,
            steps=steps,
        )

    def capture(self, model, samples: Samples, keys: list):
        reader = self._reader(model, keys)
        for feed in samples.batches(BATCH):
            outputs = self._predict(reader, feed)
            yield outputs if isinstance(outputs, (list, tuple)) else [outputs]

    def _reader(self, model, keys: list) -> keras.Model:
        """A sub-model up to `keys` (it runs only the prefix they need), kept for the next
        call with the same ones: each new one costs a trace, longer than a pass over a few
        hundred samples. Weights changed in place since are read, not copied."""
        key = (id(model), tuple(id(k) for k in keys))
        if self._last is None or self._last[0] != key:
            self._last = (key, keras.Model(model.inputs, list(keys)), model, list(keys))
        return self._last[1]

    def _predict(self, model, feed: dict):
        """`model` on one batch. The feed is keyed by the original's input names (a rebuilt
        model's tensors do not keep them); a short last batch is padded to BATCH rows, as
        each new batch size would cost another trace, and the padding cut off again."""
        arrays = [feed[t.name] for t in self.original.inputs]
        count = len(arrays[0])
        if count < BATCH:
            arrays = [np.concatenate([a, np.repeat(a[-1:], BATCH - count, 0)]) for a in arrays]
        with cpu_layouts():
            outputs = model.predict_on_batch(arrays[0] if len(arrays) == 1 else arrays)
        return keras.tree.map_structure(lambda o: keras.ops.convert_to_numpy(o)[:count], outputs)

    def run(self, model, samples: Samples) -> list[np.ndarray]:
        parts = []
        for feed in samples.batches(BATCH):
            parts.append(keras.tree.flatten(self._predict(model, feed)))
        return [np.concatenate(column) for column in zip(*parts)]

    def distill(self, model, fit: Samples, held: Samples, options, seed: int):
        from graphopt.finetune import finetune

        epochs = options.passes(len(fit))
        tuned, result = finetune(
            self.original,
            model,
            fit,
            epochs=epochs,
            batch_size=options.batch_size,
            lr=options.lr,
            temperature=options.temperature,
            train_only="sites",
            strategy="one",
            validation_data=held,
            seed=seed,
            verbose=0,
        )
        return tuned, sum(e.steps for e in result.history), result.kept_start


def _step(layer) -> Step:
    if isinstance(layer, keras.layers.BatchNormalization):
        weights = dict(zip([w.path.split("/")[-1] for w in layer.weights], layer.get_weights()))
        mean, var = weights["moving_mean"], weights["moving_variance"]
        gamma = weights.get("gamma", np.ones_like(mean))
        beta = weights.get("beta", np.zeros_like(mean))
        scale = gamma / np.sqrt(var + layer.epsilon)
        return Step(
            "affine",
            scale.astype(np.float64),
            (beta - mean * scale).astype(np.float64),
            float(layer.epsilon),
        )
    return _activation_step(layer)


_BY_NAME = {
    "relu": act.relu,
    "relu6": lambda: act.clip(0.0, 6.0),
    "sigmoid": act.logistic,
    "tanh": act.tanh,
    "silu": act.silu,
    "swish": act.silu,
    "hard_sigmoid": lambda: act.hard_sigmoid(1 / 6, 0.5),
    "hard_silu": act.hard_swish,
    "hard_swish": act.hard_swish,
    "elu": lambda: act.elu(1.0),
    "leaky_relu": lambda: act.leaky_relu(0.2),
}
"""Keras activations (by their serialised name) written out in NumPy with derivatives."""


def _activation_step(fn) -> Step:
    """A Keras activation (function or layer) as a Step on NumPy arrays: written out for the
    common ones, else Keras run on the array (its derivative by differences)."""
    if isinstance(fn, keras.layers.ReLU):
        config = fn.get_config()
        return act.relu_general(
            config.get("max_value"), config.get("negative_slope", 0.0), config.get("threshold", 0.0)
        )
    if isinstance(fn, keras.layers.Activation):
        fn = fn.activation
    if not isinstance(fn, keras.layers.Layer):
        name = keras.activations.serialize(fn)
        name = name if isinstance(name, str) else None
        if name in _BY_NAME:
            return _BY_NAME[name]()

    def call(z: np.ndarray) -> np.ndarray:
        return keras.ops.convert_to_numpy(fn(keras.ops.convert_to_tensor(z, "float32")))

    return Step("act", fn=call)
