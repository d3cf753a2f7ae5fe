"""Keras graph surgery: find the sites of a model and rebuild it with each site replaced.

The walk re-runs the model's nodes by depth on new tensors (as Keras' own cloning does), cloning
every layer with its weights, so the input model is left untouched.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import keras
import numpy as np

from graphopt.backends.keras_layers import (
    ChannelInterleave,
    GroupedPointwiseConv,
    SiteBatchNormalization,
)
from graphopt.errors import UnsupportedModelError
from graphopt.fit import Fitted, fit_site
from graphopt.plan import EVERY_SITE, FIT, PAPER, SCRATCH, Selection, SitePlan, Skipped, plan_site

_SITE_TYPES = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
_SEPARABLE_TYPES = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
_DEPTHWISE_OF = {
    keras.layers.SeparableConv1D: keras.layers.DepthwiseConv1D,
    keras.layers.SeparableConv2D: keras.layers.DepthwiseConv2D,
}
_FEATURE_MAP_RANKS = (4, 5)
"""Input ranks on which a Dense is a pointwise conv (2-D and 3-D feature maps)."""
_SEQUENCE_RANK = 3
_STATELESS_ACTIVATIONS = (
    keras.layers.Activation,
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.ELU,
)


def is_pointwise(layer) -> bool:
    """A stock Keras convolution whose every kernel dimension is 1 and that has one group."""
    return (
        type(layer) in _SITE_TYPES and all(k == 1 for k in layer.kernel_size) and layer.groups == 1
    )


def site_kind(layer, input_ranks, dense_sequences: bool = False) -> str | None:
    """ "conv", "separable" or "dense" when `layer` holds a site (called on `input_ranks`)."""
    if is_pointwise(layer):
        return "conv"
    if type(layer) in _SEPARABLE_TYPES:
        return "separable"
    if type(layer) is keras.layers.Dense and input_ranks and not _quantized(layer):
        ranks = _FEATURE_MAP_RANKS + ((_SEQUENCE_RANK,) if dense_sequences else ())
        if all(r in ranks for r in input_ranks):
            return "dense"
    return None


def _quantized(dense) -> bool:
    return bool(getattr(dense, "lora_enabled", False) or getattr(dense, "quantization_mode", None))


def pointwise_kernel(layer):
    """The (…1, Cin, F) kernel of the site a layer holds."""
    return layer.pointwise_kernel if type(layer) in _SEPARABLE_TYPES else layer.kernel


@dataclass
class _Site:
    """One conv layer to replace, with the BN/activation chain paper mode pulls into branches."""

    plan: SitePlan
    layer: keras.layers.Layer
    rank: int
    """Spatial rank of the feature map the site reads (a Dense's input rank - 2)."""
    chain: list = field(default_factory=list)
    """The nodes (calls) of the pulled BatchNormalization/activation, in order."""
    replacement: dict = field(default_factory=dict)
    fitted: Fitted | None = None
    """--init fit: K and L fitted to the original kernel, put in once the layers are built."""


@dataclass
class KerasRewrite:
    """The options of one rewrite and what it found; one instance per top-level call."""

    mode: str
    min_channels_per_group: int
    seed: int = 0
    selection: Selection = EVERY_SITE
    init: str = SCRATCH
    weights: dict = field(default_factory=dict)
    """Site name -> Fitted: weights given for a site (calibration), used instead of `init`."""
    dense_sequences: bool = False
    """Also take a Dense on rank-3 inputs (sequences) as a site, not only on feature maps."""
    sites: list[SitePlan] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    found: dict = field(default_factory=dict)
    """Site name -> _Site of every site rewritten (what calibration reads: layers, chain)."""

    def __post_init__(self):
        self._rng = np.random.default_rng(self.seed)

    def _next_seed(self) -> int:
        return int(self._rng.integers(0, 2**31 - 1))

    # ---- the walk -------------------------------------------------------------------------

    def model(self, model: keras.Model, prefix: str = "") -> keras.Model:
        """Return a rewritten copy of `model` (Functional or Sequential, nested ones included)."""
        functional = _as_functional(model)
        graph = _Graph(functional)
        sites, absorbed = self._find_sites(functional, graph, prefix)
        clones: dict[int, object] = {}
        tensors: dict[int, object] = {}
        new_inputs = []
        for t in functional.inputs:
            layer = t._keras_history.operation
            new = keras.Input(batch_shape=t.shape, dtype=t.dtype, name=layer.name)
            tensors[id(t)] = new
            new_inputs.append(new)
        for depth in sorted(functional._nodes_by_depth, reverse=True):
            for node in functional._nodes_by_depth[depth]:
                if node.is_input or not node.operation:
                    continue
                args, kwargs = node.arguments.fill_in(tensors)
                op = node.operation
                if id(op) in absorbed:
                    outputs = args[0]
                elif id(op) in sites:
                    outputs = self._replace(sites[id(op)], args[0])
                else:
                    first_call = id(op) not in clones
                    clone = self._clone(op, clones, prefix)
                    outputs = clone(*args, **kwargs)
                    if first_call:  # now built: give it the original's weights
                        _copy_weights(op, clone)
                for ref, new in zip(node.outputs, keras.tree.flatten(outputs)):
                    tensors[id(ref)] = new
        new_outputs = keras.tree.map_structure(lambda t: tensors[id(t)], functional._outputs_struct)
        return keras.Model(
            new_inputs if len(new_inputs) > 1 else new_inputs[0], new_outputs, name=model.name
        )

    def _clone(self, op, clones: dict, prefix: str):
        """A copy of a non-site operation (cached, so shared layers stay shared)."""
        if id(op) in clones:
            return clones[id(op)]
        if isinstance(op, (keras.Sequential, keras.Model)) and is_graph_model(op):
            new = self.model(op, prefix=f"{prefix}{op.name}/")
        elif isinstance(op, keras.Model):
            self._skip_nested(op, prefix)
            new = op
        elif isinstance(op, keras.layers.Layer):
            try:
                new = op.__class__.from_config(op.get_config())
            except (TypeError, ValueError, NotImplementedError, KeyError):
                new = op  # a custom layer that cannot be re-created: pass it through as it is
        else:
            new = op  # a stateless keras.ops operation
        clones[id(op)] = new
        return new

    def _skip_nested(self, model, prefix: str) -> None:
        for layer in model._flatten_layers(include_self=False):
            if is_pointwise(layer):
                self.skipped.append(
                    Skipped(
                        f"{prefix}{model.name}/{layer.name}",
                        "inside a subclassed model, which cannot be rebuilt",
                    )
                )

    # ---- finding sites --------------------------------------------------------------------

    def _find_sites(self, model, graph: _Graph, prefix):
        sites: dict[int, _Site] = {}
        absorbed: set[int] = set()
        for layer in model.layers:
            nodes = graph.own_nodes(layer)
            kind = site_kind(layer, _input_ranks(nodes), self.dense_sequences)
            name = prefix + layer.name
            if kind is None:
                reason = _why_not(layer, nodes)
                if reason:
                    self.skipped.append(Skipped(name, reason))
                continue
            reason = self.selection.skip_reason(name)
            if reason:
                self.skipped.append(Skipped(name, reason))
                continue
            chain = []
            if self.mode == PAPER and len(nodes) == 1:
                chain = _pulled_chain(nodes[0], graph, _channel_axis(layer))
            kernel = pointwise_kernel(layer)
            cin, filters = int(kernel.shape[-2]), int(kernel.shape[-1])
            plan = plan_site(
                name,
                cin,
                filters,
                use_bias=layer.use_bias,
                min_channels_per_group=self.min_channels_per_group,
                positions=_positions(layer, nodes),
                l_norm_per_channel=_norm_per_channel(chain),
                groups=self.selection.groups_for(name),
                mode=self.mode,
                kind=kind,
            )
            if isinstance(plan, Skipped):
                self.skipped.append(plan)
                continue
            fitted = self.weights.get(name)
            if fitted is None and self.init == FIT:
                kernel = keras.ops.convert_to_numpy(kernel).reshape(cin, filters).T
                bias = keras.ops.convert_to_numpy(layer.bias) if layer.use_bias else None
                fitted = fit_site(kernel, plan, bias)
                plan = dataclasses.replace(plan, fit_error=fitted.error)
            self.sites.append(plan)
            rank = len(nodes[0].input_tensors[0].shape) - 2
            sites[id(layer)] = self.found[name] = _Site(plan, layer, rank, chain, fitted=fitted)
            absorbed.update(id(node.operation) for node in chain)
        return sites, absorbed

    # ---- the replacement ------------------------------------------------------------------

    def _replace(self, site: _Site, x):
        """K -> (BN -> act) -> interleave -> L -> (BN' -> act) -> sum, per docs/method.md."""
        layers = site.replacement or self._make_layers(site)
        site.replacement = layers
        if "depthwise" in layers:  # a separable conv: its depthwise half stays as it was
            first_call = not layers["depthwise"].built
            x = layers["depthwise"](x)
            if first_call:
                kernel = keras.ops.convert_to_numpy(site.layer.depthwise_kernel)
                layers["depthwise"].set_weights([kernel])
        k_out = layers["k"](x)
        for layer in layers["k_chain"]:
            k_out = layer(k_out)
        mixed = layers["interleave"](k_out) if "interleave" in layers else k_out
        if "l" not in layers:
            out = mixed
        else:
            l_out = layers["l"](mixed)
            for layer in layers["l_chain"]:
                l_out = layer(l_out)
            out = layers["sum"]([k_out, l_out])
        if "act" in layers:
            out = layers["act"](out)
        if site.fitted is not None:  # the layers are built now
            put_fitted(layers, site.fitted)
            site.fitted = None  # once, also for a layer called twice
        return out

    def _make_layers(self, site: _Site) -> dict:
        layer, plan, paper = site.layer, site.plan, self.mode == PAPER
        name, spec = layer.name, _site_spec(layer, site.rank)
        activation = layer.activation if paper else None
        layers = {}
        if plan.kind == "separable":
            layers["depthwise"] = depthwise_half(layer)
        layers["k"] = self._grouped(spec, plan, f"{name}_k", spec["strides"], activation)
        layers["k_chain"] = [_clone_with_weights(node) for node in site.chain]
        axis = _channel_axis(layer)
        if plan.has_interleave:
            layers["interleave"] = ChannelInterleave(
                plan.groups, axis=axis, name=f"{name}_interleave"
            )
        if plan.has_l:
            layers["l"] = self._grouped(spec, plan, f"{name}_l", 1, activation)
            layers["l_chain"] = [
                _fresh_copy(node.operation, f"{node.operation.name}_l") for node in site.chain
            ]
            layers["sum"] = keras.layers.Add(name=f"{name}_sum")
        if not paper and keras.activations.serialize(layer.activation) != "linear":
            layers["act"] = keras.layers.Activation(layer.activation, name=f"{name}_act")
        return layers

    def _grouped(self, spec: dict, plan: SitePlan, name: str, strides, activation):
        return GroupedPointwiseConv(
            filters=plan.filters,
            groups=plan.groups,
            rank=spec["rank"],
            strides=strides,
            data_format=spec["data_format"],
            use_bias=spec["use_bias"],
            activation=activation,
            kernel_initializer=keras.initializers.GlorotUniform(seed=self._next_seed()),
            bias_initializer="zeros",
            kernel_regularizer=spec["kernel_regularizer"],
            bias_regularizer=spec["bias_regularizer"],
            kernel_constraint=spec["kernel_constraint"],
            bias_constraint=spec["bias_constraint"],
            dtype=spec["dtype"],
            name=name,
        )


def _site_spec(layer, rank: int) -> dict:
    """What K and L take over from the layer that held the site, whatever its kind."""
    separable = type(layer) in _SEPARABLE_TYPES
    dense = isinstance(layer, keras.layers.Dense)
    prefix = "pointwise" if separable else "kernel"
    return {
        "rank": rank,
        "strides": 1 if separable or dense else layer.strides,
        "data_format": "channels_last" if dense else layer.data_format,
        "use_bias": layer.use_bias,
        "kernel_regularizer": getattr(layer, f"{prefix}_regularizer"),
        "kernel_constraint": getattr(layer, f"{prefix}_constraint"),
        "bias_regularizer": layer.bias_regularizer,
        "bias_constraint": layer.bias_constraint,
        "dtype": layer.dtype_policy,
    }


def depthwise_half(sep):
    """The depthwise conv of a separable conv, as its own layer (it gets the same weights)."""
    return _DEPTHWISE_OF[type(sep)](
        kernel_size=sep.kernel_size,
        strides=sep.strides,
        padding=sep.padding,
        depth_multiplier=sep.depth_multiplier,
        data_format=sep.data_format,
        dilation_rate=sep.dilation_rate,
        use_bias=False,
        depthwise_regularizer=sep.depthwise_regularizer,
        depthwise_constraint=sep.depthwise_constraint,
        dtype=sep.dtype_policy,
        name=f"{sep.name}_depthwise",
    )


# ---- helpers over Keras' graph --------------------------------------------------------------


def is_graph_model(model) -> bool:
    return isinstance(model, keras.Sequential) or hasattr(model, "_nodes_by_depth")


def _as_functional(model: keras.Model) -> keras.Model:
    """A Functional view of `model`; Sequential models are re-traced on an Input of their shape."""
    if isinstance(model, keras.Sequential):
        if not model.built or not model.inputs:
            raise UnsupportedModelError(
                f"Sequential model '{model.name}' has no known input shape; "
                "build it (or give it an Input) first"
            )
        inp = keras.Input(batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype)
        x = inp
        for layer in model.layers:
            x = layer(x)
        return keras.Model(inp, x, name=model.name)
    if not hasattr(model, "_nodes_by_depth"):
        raise UnsupportedModelError(
            f"model '{model.name}' is a subclassed Keras model; only Functional and Sequential "
            "models can be rebuilt"
        )
    return model


class _Graph:
    """Who reads which tensor in one Functional model (a layer's nodes may span models)."""

    def __init__(self, model):
        self.node_ids: set[int] = set()
        self.readers: dict[int, list] = {}
        self.output_ids = {id(t) for t in model.outputs}
        for nodes in model._nodes_by_depth.values():
            for node in nodes:
                self.node_ids.add(id(node))
                for t in node.input_tensors:
                    self.readers.setdefault(id(t), []).append(node)

    def own_nodes(self, layer) -> list:
        """The calls of `layer` that belong to this model."""
        return [n for n in layer._inbound_nodes if id(n) in self.node_ids]


def _pulled_chain(node, graph: _Graph, axis) -> list:
    """The calls of the BatchNormalization and/or activation that only this conv feeds."""
    chain = []
    tensor = node.outputs[0]
    while True:
        readers = graph.readers.get(id(tensor), [])
        if id(tensor) in graph.output_ids or len(readers) != 1:
            return chain
        nxt = readers[0].operation
        if len(graph.own_nodes(nxt)) != 1 or any(
            v is not None for v in readers[0].arguments.kwargs.values()
        ):
            return chain
        if (
            not chain
            and isinstance(nxt, keras.layers.BatchNormalization)
            and _same_axis(nxt.axis, axis, len(tensor.shape))
        ):
            chain.append(readers[0])
        elif isinstance(nxt, _STATELESS_ACTIVATIONS):
            chain.append(readers[0])
            return chain
        else:
            return chain
        tensor = readers[0].outputs[0]


def _same_axis(bn_axis, conv_axis: int, rank: int) -> bool:
    bn_axis = bn_axis[0] if isinstance(bn_axis, (list, tuple)) and len(bn_axis) == 1 else bn_axis
    return isinstance(bn_axis, int) and bn_axis % rank == conv_axis % rank


def _norm_per_channel(chain) -> tuple[int, int]:
    for op in (node.operation for node in chain):
        if isinstance(op, keras.layers.BatchNormalization):
            trainable = int(op.scale) + int(op.center)
            return trainable + 2, trainable
    return 0, 0


def _channel_axis(layer) -> int:
    return -1 if getattr(layer, "data_format", "channels_last") == "channels_last" else 1


def _input_ranks(nodes) -> list[int]:
    return [len(node.input_tensors[0].shape) for node in nodes if node.input_tensors]


def _positions(layer, nodes) -> int | None:
    if len(nodes) != 1:
        return None
    shape = nodes[0].outputs[0].shape
    spatial = shape[1:-1] if _channel_axis(layer) == -1 else shape[2:]
    if any(d is None for d in spatial):
        return None
    return math.prod(spatial)


def _why_not(layer, nodes) -> str | None:
    """Why a layer that looks like a site is not one (None: it does not look like one)."""
    if isinstance(layer, keras.layers.Dense):
        ranks = _input_ranks(nodes)
        if not any(r >= _SEQUENCE_RANK for r in ranks):
            return None  # a classifier head, not a pointwise conv
        if type(layer) is not keras.layers.Dense:
            return f"{type(layer).__name__} is not a stock Dense"
        if _quantized(layer):
            return "Dense with LoRA or quantized weights"
        if any(r < _SEQUENCE_RANK for r in ranks):
            return "Dense also applied to vectors (rank-2 input)"
        return "Dense on a sequence (rank-3 input); --dense-sequences takes it"
    ks = getattr(layer, "kernel_size", None)
    if ks is None or not all(k == 1 for k in ks) or not hasattr(layer, "filters"):
        return None
    if getattr(layer, "groups", 1) != 1:
        return f"already grouped ({layer.groups} groups)"
    return f"{type(layer).__name__} is not a stock Conv1D/2D/3D"


def put_fitted(layers: dict, fitted: Fitted) -> None:
    """Give K and L the fitted weights (grouped kernels are stored as (1..., Cin/N, F)), and
    BN' its scale and shift when they were fitted too."""
    for key, kernel, bias in (("k", fitted.kw, fitted.k_bias), ("l", fitted.lw, fitted.l_bias)):
        if key not in layers:
            continue
        layer = layers[key]
        weights = [kernel.T.reshape(tuple(layer.kernel.shape))]
        if layer.use_bias:
            weights.append(bias)
        layer.set_weights(weights)
    norm = next(
        (x for x in layers.get("l_chain", []) if isinstance(x, keras.layers.BatchNormalization)),
        None,
    )
    if norm is not None and fitted.l_norm is not None:
        gamma, beta = fitted.l_norm
        values = ([gamma] if norm.scale else []) + ([beta] if norm.center else [])
        values += [np.zeros_like(gamma), np.ones_like(gamma)]  # moving mean, moving variance
        norm.set_weights(values)


def _site_class(op):
    """The class of a site's copy of `op`: a plain BatchNormalization trains fused."""
    if type(op) is keras.layers.BatchNormalization:
        return SiteBatchNormalization
    return op.__class__


def _clone_with_weights(node):
    """A copy of the layer of `node`, built for that call and holding the original's weights."""
    op = node.operation
    new = _site_class(op).from_config(op.get_config())
    new.build(node.input_tensors[0].shape)
    _copy_weights(op, new)
    return new


def _fresh_copy(op, name: str):
    config = op.get_config()
    config["name"] = name
    if isinstance(op, keras.layers.BatchNormalization):
        config.update(
            beta_initializer="zeros",
            gamma_initializer="ones",
            moving_mean_initializer="zeros",
            moving_variance_initializer="ones",
        )
    return _site_class(op).from_config(config)


def _copy_weights(original, new) -> None:
    """Give a built clone the original's weights (nested models rebuild their own)."""
    if new is original or isinstance(original, keras.Model):
        return
    if isinstance(original, keras.layers.Layer):
        weights = original.get_weights()
        if weights:
            new.set_weights(weights)
