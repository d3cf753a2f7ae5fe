"""Subclassed Keras models (`class Net(keras.Model)` with a hand-written `call`): the graph
cannot be rebuilt, so each pointwise conv *layer object* among the model's tracked layers
(attributes, lists, dicts, nested layers and models) is swapped for a `PointwiseSite` that
computes the site and is called the same way. This happens on a copy made the Keras way
(`get_config`/`from_config`, or a factory), whose class is a registered subclass of the
user's class, so the copy saves with `model.save` and reloads with the rewrite replayed."""

from __future__ import annotations

import dataclasses
import math

import keras

from graphopt.backends.keras_layers import PointwiseSite
from graphopt.errors import UnsupportedModelError
from graphopt.fit import fit_site
from graphopt.plan import FIT, PAPER, Selection, Skipped, plan_site

_REWRITTEN: dict[type, type] = {}


def rewritten_class(cls: type) -> type:
    """The registered subclass of `cls` that rewritten copies are instances of; call it (or
    `graphopt.register_rewritten(cls)`) before `load_model` in a process that did not
    rewrite."""
    if cls in _REWRITTEN.values():
        return cls
    if cls not in _REWRITTEN:

        def get_config(self):
            config = super(sub, self).get_config()
            config["graphopt_rewrite"] = dict(self._graphopt_rewrite)
            return config

        @classmethod
        def from_config(klass, config):
            config = dict(config)
            options = config.pop("graphopt_rewrite", None)
            model = super(sub, klass).from_config(config)
            model._graphopt_pending = options
            return model

        def build_from_config(self, config):
            """On load: build the user's model, then swap in the sites as the rewrite did
            (Keras loads the weights afterwards)."""
            super(sub, self).build_from_config(config)
            options = getattr(self, "_graphopt_pending", None)
            if options:
                _replace_sites(self, _Options(**options), sites=[], skipped=[])
                self._graphopt_rewrite = options
                self._graphopt_pending = None
                _run_once(self, config)

        sub = type(
            cls.__name__,
            (cls,),
            {
                "get_config": get_config,
                "from_config": from_config,
                "build_from_config": build_from_config,
            },
        )
        sub.__module__ = cls.__module__
        sub.__qualname__ = f"Rewritten{cls.__qualname__}"
        name = f"{cls.__module__}.{cls.__qualname__}"  # two user classes may share a name
        keras.saving.register_keras_serializable("graphopt_rewritten", name)(sub)
        _REWRITTEN[cls] = sub
    return _REWRITTEN[cls]


@dataclasses.dataclass
class _Options:
    mode: str
    min_channels_per_group: int
    seed: int = 0
    dense_sequences: bool = False
    exclude: tuple = ()
    """Site names left as they are (everything the selection skipped on the first rewrite)."""


def rewrite_subclassed(model, job, factory=None):
    """A rewritten copy of the subclassed `model`; `job` (a KerasRewrite) collects the plans."""
    if not model.built:
        raise UnsupportedModelError(
            f"subclassed model '{model.name}' is not built; call it on a batch first"
        )
    copy = _copy(model, factory)
    skipped: list[Skipped] = []
    sites = []
    options = _Options(job.mode, job.min_channels_per_group, job.seed, job.dense_sequences)
    selected_out = _replace_sites(copy, options, sites, skipped, job.selection, job.init == FIT)
    # only what the user's selection left out (by name): the group rule decides again on
    # reload by itself
    options.exclude = tuple(s.name for s in skipped if s.name in selected_out)
    copy._graphopt_rewrite = dataclasses.asdict(options)
    try:
        _run_once(copy, model.get_build_config())
    except (ValueError, TypeError, AttributeError) as exc:
        raise UnsupportedModelError(
            f"subclassed model '{model.name}': its call() fails once its pointwise layers are "
            f"swapped for sites (does it read the layers' attributes?): {exc}"
        ) from exc
    job.sites.extend(sites)
    job.skipped.extend(skipped)
    return copy


def _copy(model, factory):
    cls = rewritten_class(type(model))
    try:
        if factory is not None:
            copy = factory()
            copy.__class__ = cls
        else:
            copy = cls.from_config(model.get_config())
    except (NotImplementedError, TypeError, ValueError, KeyError) as exc:
        raise UnsupportedModelError(
            f"cannot copy subclassed model '{model.name}' ({type(model).__name__}): its class "
            "must provide get_config() returning its constructor arguments (and from_config() "
            "when they are not plain values), or pass factory= a function that builds a new "
            f"instance ({exc})"
        ) from exc
    copy.build_from_config(model.get_build_config())
    try:
        copy.set_weights(model.get_weights())
    except ValueError as exc:
        raise UnsupportedModelError(
            f"the copy of subclassed model '{model.name}' does not have the original's weights "
            f"(its get_config() or factory builds a different model: {exc})"
        ) from exc
    return copy


def _run_once(model, build_config) -> None:
    """Call the model once on zeros of its build shape: Keras marks a subclassed model built
    only after a call, and the call checks that the swapped layers fit the user's `call`."""
    shapes = (build_config or {}).get("input_shape")
    if shapes is None:
        return

    def zeros(shape):
        return keras.ops.zeros([1 if d is None else d for d in shape], model.compute_dtype)

    nested = isinstance(shapes, (list, tuple)) and shapes and isinstance(shapes[0], (list, tuple))
    model(keras.tree.map_shape_structure(zeros, shapes) if nested else zeros(shapes))


def _replace_sites(model, options: _Options, sites, skipped, selection=None, fit=False) -> set:
    """Swap every pointwise layer among `model`'s tracked layers for a PointwiseSite; return
    the names the selection left out."""
    from graphopt.backends.keras_rewrite import site_kind

    selection = selection or Selection(exclude=options.exclude)
    layers = [model, *model._flatten_layers(include_self=False, recursive=True)]
    in_graphs = {
        id(inner)
        for layer in layers[1:]
        if hasattr(layer, "_nodes_by_depth")
        for inner in layer._flatten_layers(include_self=False, recursive=True)
    }
    new_for: dict[int, object] = {}
    selected_out: set[str] = set()
    for layer in layers:
        shape = (getattr(layer, "_build_shapes_dict", None) or {}).get("input_shape")
        ranks = [len(shape)] if shape else []
        kind = site_kind(layer, ranks, options.dense_sequences)
        if kind is None or id(layer) in new_for:
            continue
        if id(layer) in in_graphs:  # its model's graph calls it: swapping would not reach it
            skipped.append(
                Skipped(layer.name, "inside a Functional model nested in a subclassed one")
            )
            continue
        reason = selection.skip_reason(layer.name)
        if reason:
            skipped.append(Skipped(layer.name, reason))
            selected_out.add(layer.name)
            continue
        groups = selection.groups_for(layer.name)
        site = _site(layer, kind, shape, options, sites, skipped, fit, groups)
        if site is not None:
            new_for[id(layer)] = site
    for parent in layers:
        _swap_in(parent, new_for)
    return selected_out


def _site(layer, kind: str, shape, options: _Options, sites, skipped, fit: bool, groups=None):
    """The PointwiseSite replacing `layer` (None when the group rule leaves it)."""
    from graphopt.backends.keras_rewrite import pointwise_kernel

    kernel = pointwise_kernel(layer)
    cin, filters = int(kernel.shape[-2]), int(kernel.shape[-1])
    plan = plan_site(
        layer.name,
        cin,
        filters,
        use_bias=layer.use_bias,
        min_channels_per_group=options.min_channels_per_group,
        positions=_positions(layer, kind, shape),
        groups=groups,
        mode=options.mode,
        kind=kind,
    )
    if isinstance(plan, Skipped):
        skipped.append(plan)
        return None
    fitted = None
    if fit:
        weight = keras.ops.convert_to_numpy(kernel).reshape(cin, filters).T
        bias = keras.ops.convert_to_numpy(layer.bias) if layer.use_bias else None
        fitted = fit_site(weight, plan, bias)
        plan = dataclasses.replace(plan, fit_error=fitted.error)
    seed = options.seed * 1_000_003 + len(sites)
    dense = kind == "dense"
    site = PointwiseSite(
        {
            "filters": filters,
            "rank": len(shape) - 2 if dense else layer.rank,
            "strides": list(layer.strides) if kind == "conv" else 1,
            "data_format": "channels_last" if dense else layer.data_format,
            "use_bias": layer.use_bias,
            "activation": keras.activations.serialize(layer.activation),
            "kernel_initializer": keras.initializers.serialize(
                keras.initializers.GlorotUniform(seed=seed)
            ),
        },
        plan.groups,
        paper=options.mode == PAPER,
        depthwise=_depthwise_config(layer) if kind == "separable" else None,
        name=layer.name,
        dtype=layer.dtype_policy,
    )
    site.build(shape)
    if site.depthwise is not None:
        site.depthwise.set_weights([keras.ops.convert_to_numpy(layer.depthwise_kernel)])
    if fitted is not None:
        pairs = ((site.k, fitted.kw, fitted.k_bias), (site.l, fitted.lw, fitted.l_bias))
        for part, weight, bias in pairs:
            if part is not None:
                weights = [weight.T.reshape(tuple(part.kernel.shape))]
                part.set_weights(weights + ([bias] if part.use_bias else []))
    sites.append(plan)
    return site


def _depthwise_config(sep) -> dict:
    return {
        "kernel_size": list(sep.kernel_size),
        "strides": list(sep.strides),
        "padding": sep.padding,
        "depth_multiplier": sep.depth_multiplier,
        "data_format": sep.data_format,
        "dilation_rate": list(sep.dilation_rate),
    }


def _positions(layer, kind: str, shape) -> int | None:
    """Output positions per sample of a conv or Dense site (None for a separable conv, whose
    depthwise half sets them, or when the shape is open)."""
    if shape is None or kind == "separable":
        return None
    channels_last = kind == "dense" or layer.data_format == "channels_last"
    spatial = shape[1:-1] if channels_last else shape[2:]
    if any(d is None for d in spatial):
        return None
    strides = (1,) * len(spatial) if kind == "dense" else layer.strides
    return math.prod((d + s - 1) // s for d, s in zip(spatial, strides))


def _swap_in(parent, new_for: dict) -> None:
    """Put the sites where `parent` holds the convs: attributes, lists, tuples and dicts (the
    layer tracking lists included), without Keras' tracking (the parent is built and locked)."""
    for name, value in list(vars(parent).items()):
        if name in ("_tracker",):
            continue
        swapped = _swapped(value, new_for)
        if swapped is not value:
            object.__setattr__(parent, name, swapped)
    tracker = getattr(parent, "_tracker", None)
    if tracker is not None:
        for store in tracker.stored_ids.values():
            for old, new in list(new_for.items()):
                if old in store:
                    store.discard(old)
                    store.add(id(new))


def _swapped(value, new_for: dict):
    """`value` with the convs in it replaced (lists and dicts in place, tuples anew)."""
    if id(value) in new_for:
        return new_for[id(value)]
    if isinstance(value, list):
        for i, item in enumerate(value):
            if id(item) in new_for:
                list.__setitem__(value, i, new_for[id(item)])
        return value
    if isinstance(value, dict):
        for key, item in list(value.items()):
            if id(item) in new_for:
                dict.__setitem__(value, key, new_for[id(item)])
        return value
    if isinstance(value, tuple) and any(id(item) in new_for for item in value):
        return type(value)(new_for.get(id(item), item) for item in value)
    return value
