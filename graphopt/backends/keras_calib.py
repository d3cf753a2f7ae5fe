"""What calibration needs of Keras: build the rewrite with given weights, read a site's input
through a sub-model, run a model. Sites inside nested models, and layers called more than once,
keep their init (their tensors have no single place in the top-level graph)."""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

from graphopt.calibrate import BATCH, Built, SiteInfo
from graphopt.data import Samples
from graphopt.plan import PAPER, Selection
from graphopt.reconstruct import Step


@dataclass
class KerasCalibration:
    original: keras.Model
    mode: str
    min_channels_per_group: int
    seed: int = 0
    name: str | None = None

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.original.outputs]

    def build(self, selection: Selection, weights) -> Built:
        from graphopt.api import _rewrite_keras

        found: dict = {}
        model, report = _rewrite_keras(
            self.original,
            self.mode,
            self.min_channels_per_group,
            self.seed,
            self.name,
            selection,
            weights=weights,
            found=found,
        )
        sites = {}
        for name, site in found.items():
            layers = site.replacement
            if "/" in name or len(site.layer._inbound_nodes) != 1 or "k" not in layers:
                continue
            if len(layers["k"]._inbound_nodes) != 1:
                continue
            sites[name] = self._info(site, layers["k"].input)
        return Built(model, report, sites)

    def _info(self, site, x_rewritten) -> SiteInfo:
        conv = site.layer
        kernel = keras.ops.convert_to_numpy(conv.kernel)
        cin, filters = kernel.shape[-2], kernel.shape[-1]
        bias = keras.ops.convert_to_numpy(conv.bias) if conv.use_bias else None
        steps = []
        if self.mode == PAPER:
            if keras.activations.serialize(conv.activation) != "linear":
                steps.append(Step("act", fn=conv.activation))
            steps += [_step(node.operation) for node in site.chain]
        return SiteInfo(
            plan=site.plan,
            x_original=conv.input,
            x_rewritten=x_rewritten,
            weight=kernel.reshape(cin, filters).T.astype(np.float64),
            bias=None if bias is None else bias.astype(np.float64),
            strides=tuple(conv.strides),
            channel_axis=-1 if conv.data_format == "channels_last" else 1,
            steps=steps,
        )

    def capture(self, model, samples: Samples, keys: list):
        reader = keras.Model(model.inputs, list(keys))
        for feed in samples.batches(BATCH):
            outputs = reader.predict_on_batch(_inputs(model, feed))
            outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
            yield [keras.ops.convert_to_numpy(o) for o in outputs]

    def run(self, model, samples: Samples) -> list[np.ndarray]:
        parts = []
        for feed in samples.batches(BATCH):
            outputs = keras.tree.flatten(model.predict_on_batch(_inputs(model, feed)))
            parts.append([keras.ops.convert_to_numpy(o) for o in outputs])
        return [np.concatenate(column) for column in zip(*parts)]


def _inputs(model, feed: dict):
    """The feed as the model's call takes it: its one array, or a list in input order."""
    arrays = [feed[t.name] for t in model.inputs]
    return arrays[0] if len(arrays) == 1 else arrays


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
    return Step("act", fn=layer)
