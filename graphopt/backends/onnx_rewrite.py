"""ONNX graph surgery with onnx-graphsurgeon: walk the graph (subgraphs included), find the
pointwise Conv nodes, decide for each (plan, shared weights, timing, folding, fit) and hand it
to onnx_build for the new nodes; then take out what only the old nodes used and sort."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.backends.onnx_build import SiteBuilder, constant_spec, constant_value, foldable
from graphopt.backends.onnx_io import (
    count_params,
    is_large,
    iter_graphs,
    shape_only,
    without_weights,
)
from graphopt.backends.onnx_scopes import Scopes
from graphopt.fit import fit_site
from graphopt.plan import (
    EVERY_SITE,
    FIT,
    PAPER,
    SCRATCH,
    Selection,
    SitePlan,
    Skipped,
    plan_site,
)
from graphopt.report import Report, Totals

_FEATURE_MAP_RANKS = (4, 5)
_SEQUENCE_RANK = 3
ACTIVATIONS = {"Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Tanh"}
QUANTIZED_CONVS = {"ConvInteger": 1, "QLinearConv": 3}
"""Integer convolutions -> the index of their weight input."""
INTEGER_NOTE = (
    "integer tensors (the weights of quantized convs) are not counted in the parameter totals"
)


def rewrite_onnx(
    model: onnx.ModelProto,
    mode: str,
    min_channels_per_group: int,
    seed: int,
    name: str | None,
    selection: Selection = EVERY_SITE,
    skip_slower: bool = False,
    fold_slower: bool = False,
    fold=frozenset(),
    init: str = SCRATCH,
    provider: str = "CPUExecutionProvider",
    weights=None,
    found: dict | None = None,
    dense_sequences: bool = False,
):
    """Rewrite every pointwise Conv of `model` (subgraphs included); return (new, report).

    A MatMul/Gemm with a constant 2-D weight on the last axis of a rank-4/5 tensor (or of
    such a tensor flattened to 2-D by a Reshape, as tf2onnx exports Keras' Dense) is a site
    too; on a rank-3 tensor only with `dense_sequences`. Such sites are never timed or folded.
    `weights` maps site names to given K/L (fit.Fitted, from calibration); `found`, when a
    dict, receives a `FoundSite` per rewritten conv site of the main graph (what calibration
    reads).

    With `skip_slower` or `fold_slower`, each site is first timed in onnxruntime against its
    dense original (onnx_timing). A site that would run slower is left as it is with
    `skip_slower` (and listed in `skipped`); with `fold_slower` it keeps its grouped weights
    but runs folded into one dense conv (`SiteBuilder.folded`) when it is linear, and is left as
    it is when it is not. `fold` names sites (labels, or a predicate on the plan) to fold
    without timing them.
    """
    job = _OnnxRewrite(
        mode,
        min_channels_per_group,
        np.random.default_rng(seed),
        _known_shapes(model),
        selection,
        "fold" if fold_slower else "skip" if skip_slower else None,
        fold,
        init,
        provider,
        weights=dict(weights or {}),
        dense_sequences=dense_sequences,
    )
    graph = gs.import_onnx(model)
    job.main, job.collect = graph, found is not None
    job.scopes = Scopes(model, graph)
    for g in [graph, *graph.subgraphs(recursive=True)]:
        job.graph(g)
    if found is not None:
        found.update(job.found)
    if job.sites:
        graph.toposort()
        new = job.scopes.export(graph, job.removed_weights)
        _keep_identity(model, new)
    else:
        new = onnx.ModelProto()
        new.CopyFrom(model)  # no site: the same graph, untouched by any cleanup
    params_before, params_after = count_params(model), count_params(new)
    totals = Totals(params_before, params_after, params_before, params_after)
    report = Report(
        name or model.graph.name or "model.onnx",
        "onnx",
        mode,
        min_channels_per_group,
        totals,
        job.sites,
        job.skipped,
    )
    if job.quantized:
        report.notes.append(INTEGER_NOTE)
    return new, report


def _keep_identity(original: onnx.ModelProto, new: onnx.ModelProto) -> None:
    """The exported model keeps the input's IR version, opsets and metadata."""
    new.ir_version = original.ir_version
    del new.opset_import[:]
    new.opset_import.extend(original.opset_import)
    for attr in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(new, attr, getattr(original, attr))
    del new.metadata_props[:]
    new.metadata_props.extend(original.metadata_props)


def _known_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Tensor name -> inferred shape (ints or None); empty when inference cannot run. A model
    over 2 GB is inferred without its weights' data (inference needs only their shapes)."""
    try:
        source = without_weights(model, shape_only) if is_large(model) else model
        inferred = onnx.shape_inference.infer_shapes(source, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is a nicety (MACs); the rewrite needs none
        return {}
    shapes = {}
    for graph in iter_graphs(inferred.graph):
        for vi in list(graph.value_info) + list(graph.output) + list(graph.input):
            dims = vi.type.tensor_type.shape.dim
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return shapes


@dataclass
class _OnnxRewrite:
    mode: str
    min_channels_per_group: int
    rng: np.random.Generator
    shapes: dict
    selection: Selection = EVERY_SITE
    when_slower: str | None = None
    """None (no timing), "skip" or "fold": what to do with a site slower than its original."""
    fold: object = frozenset()
    """Labels of the sites to fold (or a callable plan -> bool): see `SiteBuilder.folded`."""
    init: str = SCRATCH
    """"scratch" (Glorot-uniform K and L, zero biases) or "fit" (fitted to the original)."""
    provider: str = "CPUExecutionProvider"
    """The onnxruntime execution provider sites are timed on."""
    weights: dict = field(default_factory=dict)
    """Site name -> Fitted given for that site (calibration), used instead of `init`."""
    collect: bool = False
    """Fill `found` (reads each replaced kernel's data)."""
    main: object = None
    """The main graph (only its sites are reported in `found`: subgraph tensors cannot be
    read out of onnxruntime)."""
    found: dict = field(default_factory=dict)
    dense_sequences: bool = False
    """MatMul/Gemm on rank-3 tensors (sequences) are sites too."""
    sites: list[SitePlan] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    removed_weights: set = field(default_factory=set)
    """Names of the weight initializers of replaced convs (they may go with them)."""
    _first_use: dict = field(default_factory=dict)
    """(weight, bias) tensors (by identity: sibling If branches may each have their own
    "W") -> label of the first Conv that uses them."""
    _keys: list = field(default_factory=list)
    """The tensors of those keys, kept alive so that their ids stay theirs."""
    scopes: Scopes | None = None
    """Which graph holds each weight (new K and L go where the weight they replace was)."""
    _shared: dict = field(default_factory=dict)
    """(weight, bias) tensors -> (plan, new constants) once that conv was replaced: a
    later Conv with the same weights (a layer called twice) gets the same new weights."""
    quantized: bool = False
    """The model has an integer conv (its weights are left out of the parameter counts)."""

    def __post_init__(self):
        self.build = SiteBuilder(self.rng)

    def graph(self, graph: gs.Graph) -> None:
        self.build.names |= set(graph.tensors().keys()) | {n.name for n in graph.nodes}
        for index, node in enumerate(list(graph.nodes)):
            if node.op in ("MatMul", "Gemm"):
                self._matmul(graph, node, node.name or f"{node.op}_{index}")
                continue
            if node.op in QUANTIZED_CONVS:
                self._quantized(node, node.name or f"{node.op}_{index}")
                continue
            if node.op != "Conv":
                continue
            weight = constant_spec(node.inputs[1]) if len(node.inputs) > 1 else None
            label = node.name or f"Conv_{index}"
            if weight is None or weight.ndim < 3:
                if weight is None and _looks_pointwise(node):
                    self.skipped.append(Skipped(label, "weight is not a constant"))
                continue
            if any(k != 1 for k in weight.shape[2:]):
                continue
            if int(node.attrs.get("group", 1)) != 1:
                self.skipped.append(
                    Skipped(label, f"already grouped ({node.attrs['group']} groups)")
                )
                continue
            key = tuple(id(t) for t in node.inputs[1:3])
            self._keys.append(node.inputs[1:3])
            if key in self._first_use:
                self._reuse(graph, node, key, label)
                continue
            self._first_use[key] = label
            reason = self.selection.skip_reason(label)
            if reason:
                self.skipped.append(Skipped(label, reason))
                continue
            self._site(graph, node, weight, label, key)

    def _quantized(self, node, label) -> None:
        """An integer 1x1 conv would be a site, but pwgroup does not requantize: it is
        listed as skipped, so that the user knows why the model shrinks less than expected."""
        self.quantized = True
        index = QUANTIZED_CONVS[node.op]
        weight = constant_spec(node.inputs[index]) if len(node.inputs) > index else None
        if weight is None:
            if not _looks_pointwise(node):
                return
            filters = cin = None
        else:
            grouped = int(node.attrs.get("group", 1)) != 1
            if weight.ndim < 3 or any(k != 1 for k in weight.shape[2:]) or grouped:
                return
            filters, cin = int(weight.shape[0]), int(weight.shape[1])
        reason = f"quantized conv ({node.op}): integer weights are not rewritten"
        self.skipped.append(Skipped(label, reason, cin, filters))

    def _reuse(self, graph, conv, key, label) -> None:
        """A Conv whose weights an earlier Conv already holds: one layer, so one site; it
        is replaced with the same new weights, or left as it is with the first."""
        if key not in self._shared:
            first = self._first_use[key]
            self.skipped.append(Skipped(label, f"shares its weights with {first}, left as it is"))
            return
        plan, weights = self._shared[key]
        chain = _pulled_chain(graph, conv.outputs[0]) if self.mode == PAPER else []
        self._replace(graph, conv, plan, chain, weights)

    def _site(self, graph, conv, weight, label, key) -> None:
        bias = constant_value(conv.inputs[2]) if len(conv.inputs) > 2 else None
        if len(conv.inputs) > 2 and bias is None:
            self.skipped.append(Skipped(label, "bias is not a constant"))
            return
        filters, cin = int(weight.shape[0]), int(weight.shape[1])
        chain = _pulled_chain(graph, conv.outputs[0]) if self.mode == PAPER else []
        has_bn = any(n.op == "BatchNormalization" for n in chain)
        plan = plan_site(
            label,
            cin,
            filters,
            use_bias=bias is not None,
            min_channels_per_group=self.min_channels_per_group,
            positions=self._positions(conv.outputs[0].name),
            l_norm_per_channel=(4, 4) if has_bn else (0, 0),
            groups=self.selection.groups_for(label),
            mode=self.mode,
        )
        if isinstance(plan, Skipped):
            self.skipped.append(plan)
            return
        fold = self.fold(plan) if callable(self.fold) else label in self.fold
        if self.when_slower and not fold:
            ratio = _timed(plan, f"to time sites for --{self.when_slower}-slower", self.provider)
            if ratio is not None and ratio > 1.0:
                slower = f"{ratio:.2f}x slower than the dense conv in onnxruntime"
                if self.when_slower == "skip" or not foldable(plan, chain):
                    why = "" if self.when_slower == "skip" else ", not linear so not foldable"
                    reason = f"{slower}{why} (--{self.when_slower}-slower)"
                    self.skipped.append(Skipped(label, reason, cin, filters))
                    return
                fold = True
        if fold and foldable(plan, chain):
            plan = dataclasses.replace(plan, runs_folded=True)
        weights: dict[str, list] = {}
        given = self.weights.get(label)
        if given is not None or self.init == FIT:
            kernel = constant_value(conv.inputs[1])  # the data, only now that it is needed
            plan = self._fit(conv.name or label, plan, kernel, bias, weights, given)
        if graph is self.main and self.collect:
            final = (chain[-1] if chain else conv).outputs[0]
            kernel = constant_value(conv.inputs[1])
            self.found[label] = FoundSite(
                conv.inputs[0].name, final.name, kernel, bias, conv.attrs, pulled(chain)
            )
        self.sites.append(plan)
        self.removed_weights.update(t.name for t in conv.inputs[1:] if isinstance(t, gs.Constant))
        self._shared[key] = (plan, weights)
        replaced = conv.inputs[1]
        self._replace(graph, conv, plan, chain, weights, weight)
        if label in self.found:
            self.found[label].params.update({k: [t.name for t in v] for k, v in weights.items()})
        if self.scopes is not None:
            self.scopes.home_like([t for ts in weights.values() for t in ts], replaced, graph)

    def _matmul(self, graph, node, label) -> None:
        """A MatMul/Gemm that is a pointwise conv on a feature map's last axis: a site."""
        weight, bias_node, bias = _matmul_weight(graph, node)
        if weight is None:
            return
        rank, map_rank, last = self._matmul_input(node.inputs[0])
        cin, filters = (int(d) for d in weight.shape)
        ranks = _FEATURE_MAP_RANKS + ((_SEQUENCE_RANK,) if self.dense_sequences else ())
        if map_rank not in ranks or last not in (None, cin):
            if map_rank == _SEQUENCE_RANK and last in (None, cin):
                why = f"{node.op} on a sequence (rank-3 input); --dense-sequences takes it"
                self.skipped.append(Skipped(label, why, cin, filters))
            return
        key = (node.inputs[1].name,)
        if key in self._first_use:
            why = f"shares its weights with {self._first_use[key]}, left as it is"
            self.skipped.append(Skipped(label, why, cin, filters))
            return
        self._first_use[key] = label
        reason = self.selection.skip_reason(label)
        if reason:
            self.skipped.append(Skipped(label, reason))
            return
        last_node = bias_node or node
        chain = (
            _pulled_chain(graph, last_node.outputs[0], norms=False) if self.mode == PAPER else []
        )
        plan = plan_site(
            label,
            cin,
            filters,
            use_bias=bias is not None,
            min_channels_per_group=self.min_channels_per_group,
            positions=self._map_positions(node.inputs[0]),
            kind="matmul",
            groups=self.selection.groups_for(label),
            mode=self.mode,
        )
        if isinstance(plan, Skipped):
            self.skipped.append(plan)
            return
        base = node.name or label
        fitted = self.weights.get(label)  # calibrated
        if fitted is None and self.init == FIT:
            fitted = fit_site(weight.T, plan, bias)
            plan = dataclasses.replace(plan, fit_error=fitted.error)
        if fitted is not None:
            weights = {
                "K": self.build.given_matmul(f"{base}_K", fitted.kw, fitted.k_bias, plan.groups)
            }
            if plan.has_l:
                weights["L"] = self.build.given_matmul(
                    f"{base}_L", fitted.lw, fitted.l_bias, plan.groups
                )
        else:
            dtype, use_bias = weight.dtype, bias is not None
            weights = {"K": self.build.fresh_matmul(plan, f"{base}_K", dtype, cin, use_bias)}
            if plan.has_l:
                weights["L"] = self.build.fresh_matmul(plan, f"{base}_L", dtype, filters, use_bias)
        self.sites.append(plan)
        if graph is self.main and self.collect:
            final = (chain[-1] if chain else last_node).outputs[0]
            self.found[label] = FoundSite(
                node.inputs[0].name, final.name, np.asarray(weight).T, bias, {}, pulled(chain),
                {k: [t.name for t in v] for k, v in weights.items()}, kind="matmul",
            )  # fmt: skip
        old = [node] + ([bias_node] if bias_node else [])
        for n in old:
            self.removed_weights.update(t.name for t in n.inputs[1:] if isinstance(t, gs.Constant))
        result = self.build.site(
            graph, node.inputs[0], plan, base, {}, weights, chain, chain, matmul_rank=rank
        )
        final = (chain[-1] if chain else last_node).outputs[0]
        producer = result.inputs[0]
        for n in [*old, *chain]:
            n.outputs.clear()
        producer.outputs.clear()
        producer.outputs.append(final)
        _remove(graph, [*old, *chain])

    def _matmul_input(self, tensor) -> tuple[int | None, int | None, int | None]:
        """(rank of `tensor`, rank of the feature map it holds, its channels or None): a 2-D
        tensor that a Reshape made from a feature map holds that map (tf2onnx's Tensordot)."""
        shape = self.shapes.get(tensor.name)
        rank = len(shape) if shape else None
        if rank == 2 and len(tensor.inputs) == 1 and tensor.inputs[0].op == "Reshape":
            source = self.shapes.get(tensor.inputs[0].inputs[0].name)
            if source and len(source) > 2:
                return rank, len(source), source[-1]
        return rank, rank, (shape[-1] if shape else None)

    def _map_positions(self, tensor) -> int | None:
        """Positions per sample of the feature map a MatMul site reads (H*W...)."""
        if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Reshape":
            source = self.shapes.get(tensor.inputs[0].inputs[0].name)
            if source and len(source) > 2:
                tensor = tensor.inputs[0].inputs[0]
        shape = self.shapes.get(tensor.name)
        if not shape or len(shape) < 3 or any(d is None or d == 0 for d in shape[1:-1]):
            return None
        return math.prod(shape[1:-1])

    def _fit(self, base, plan, weight, bias, weights: dict, given=None) -> SitePlan:
        """K and L fitted to the conv's kernel (and giving its bias), or `given` ones (with
        BN''s scale and shift under "norm"), put in `weights`."""
        fitted = given or fit_site(weight.reshape(plan.filters, plan.cin), plan, bias)
        rank = weight.ndim - 2
        weights["K"] = self.build.given(f"{base}_K", fitted.kw, fitted.k_bias, rank)
        if plan.has_l:
            weights["L"] = self.build.given(f"{base}_L", fitted.lw, fitted.l_bias, rank)
        if fitted.l_norm is not None:  # BN' as calibrated: mean 0, variance 1
            scale, shift = (np.asarray(v, weight.dtype) for v in fitted.l_norm)
            values = (scale, shift, np.zeros_like(scale), np.ones_like(scale))
            weights["BN'"] = [
                self.build.constant(f"{base}_L_bn_{p}", v)
                for p, v in zip(("scale", "bias", "mean", "var"), values)
            ]
        return plan if given else dataclasses.replace(plan, fit_error=fitted.error)

    def _positions(self, tensor_name: str) -> int | None:
        shape = self.shapes.get(tensor_name)
        if not shape or len(shape) < 3 or any(d is None or d == 0 for d in shape[2:]):
            return None
        return math.prod(shape[2:])

    def _replace(self, graph, conv, plan: SitePlan, chain, weights: dict, weight=None) -> None:
        """Put K, interleave, L and the sum in place of `conv` (and its pulled `chain`);
        `weights` holds K's and L's parameters, made here like the original kernel `weight`
        when empty (first use)."""
        base = conv.name or plan.name
        x, final = conv.inputs[0], (chain[-1] if chain else conv).outputs[0]
        attrs = {k: v for k, v in conv.attrs.items() if k != "group"}
        rank = (weight.ndim if weight is not None else len(weights["K"][0].shape)) - 2
        if not weights:
            dtype, use_bias = weight.dtype, len(conv.inputs) > 2
            weights["K"] = self.build.fresh(plan, f"{base}_K", dtype, rank, plan.cin, use_bias)
            if plan.has_l:
                weights["L"] = self.build.fresh(
                    plan, f"{base}_L", dtype, rank, plan.filters, use_bias
                )
        if plan.runs_folded and foldable(plan, chain):
            result = self.build.folded(graph, x, plan, base, attrs, rank, weights, chain)
        else:
            result = self.build.site(graph, x, plan, base, attrs, weights, chain, chain)
        # Hand the original output tensor to the last new node, so consumers and graph outputs
        # keep their names, then take out the old nodes and what only they used.
        producer = result.inputs[0]
        for old in [conv, *chain]:
            old.outputs.clear()
        producer.outputs.clear()
        producer.outputs.append(final)
        _remove(graph, [conv, *chain])


@dataclass(frozen=True)
class FoundSite:
    """What calibration reads of a site: the tensors it reads and replaces (by name, the same
    in the rewritten model), the original kernel (F x Cin x 1...) and bias, the conv's
    attributes (strides) and the BN/activation nodes pulled into its branches."""

    x: str
    y: str
    weight: np.ndarray
    bias: np.ndarray | None
    attrs: dict
    chain: list
    params: dict = field(default_factory=dict)
    """"K", "L" (weight, bias) and "BN'" (scale, shift, mean, var): the names of the new
    weights in the rewritten model, filled in once they are made."""
    kind: str = "conv"
    """"conv" (channels on axis 1, weights F x Cin/N x 1...) or "matmul" (channels last,
    weights N x Cin/N x F/N)."""


@dataclass(frozen=True)
class PulledNode:
    """A BN/activation node pulled into a site's branches, as it was before the rewrite took
    it out of the graph (and cleared its inputs)."""

    op: str
    attrs: dict
    constants: list
    """Each input's constant value; None for a computed or absent input."""


def pulled(chain) -> list[PulledNode]:
    return [
        PulledNode(n.op, dict(n.attrs), [constant_value(t) if t.name else None for t in n.inputs])
        for n in chain
    ]


def _remove(graph, nodes) -> None:
    """Detach `nodes` and drop Constant nodes that fed only them.

    graphsurgeon's cleanup() would also delete what was already dead in the input (a model's
    unused branches and weights), changing more than the sites; this removes only our own.
    Clearing a node's *inputs* (never a tensor's outputs) leaves other consumers attached.
    """
    gone = {id(n) for n in nodes}
    for node in nodes:
        feeders = [t for t in node.inputs if not isinstance(t, gs.Constant)]
        node.inputs.clear()
        for tensor in feeders:
            if (
                not tensor.outputs
                and len(tensor.inputs) == 1
                and tensor.inputs[0].op == ("Constant")
                and tensor not in graph.outputs
            ):
                gone.add(id(tensor.inputs[0]))
                tensor.inputs[0].outputs.clear()
    graph.nodes = [n for n in graph.nodes if id(n) not in gone]


def _timed(plan: SitePlan, purpose: str, provider: str) -> float | None:
    """Speed of this site's replacement (linear mode, same groups) against the dense conv."""
    from graphopt.backends.onnx_timing import speed_ratio

    def rewrite_alone(dense):  # paper mode: it rewrites a site that saves nothing, too
        return rewrite_onnx(dense, PAPER, plan.cin // plan.groups, 0, None)[0]

    return speed_ratio(plan, rewrite_alone, provider, purpose)


def _looks_pointwise(node) -> bool:
    shape = node.attrs.get("kernel_shape")
    return bool(shape) and all(k == 1 for k in shape) and int(node.attrs.get("group", 1)) == 1


def _single_reader(graph, tensor):
    if tensor in graph.outputs or len(tensor.outputs) != 1:
        return None
    return tensor.outputs[0]


def _pulled_chain(graph, tensor, norms: bool = True) -> list:
    """Unfused BatchNormalization (unless not `norms`) and/or activation that only this conv
    feeds (paper mode)."""
    chain = []
    node = _single_reader(graph, tensor)
    if (
        norms
        and node is not None
        and node.op == "BatchNormalization"
        and node.inputs[0] is tensor
        and all(constant_value(t) is not None for t in node.inputs[1:5])
        and len(node.outputs) == 1
    ):
        chain.append(node)
        tensor = node.outputs[0]
    node = _single_reader(graph, tensor)
    if (
        node is not None
        and node.op in ACTIVATIONS
        and node.inputs[0] is tensor
        and all(constant_value(t) is not None for t in node.inputs[1:] if t.name)
    ):
        return chain + [node]
    silu = _silu(graph, tensor)
    return chain + silu


def _silu(graph, tensor) -> list:
    """x * Sigmoid(x) read from `tensor`: [Sigmoid, Mul] when nothing else reads them."""
    if tensor in graph.outputs or len(tensor.outputs) != 2:
        return []
    ops = {n.op: n for n in tensor.outputs}
    sig, mul = ops.get("Sigmoid"), ops.get("Mul")
    if sig is None or mul is None or len(sig.outputs[0].outputs) != 1:
        return []
    if sig.outputs[0].outputs[0] is not mul or sig.outputs[0] in graph.outputs:
        return []
    return [sig, mul]


def _matmul_weight(graph, node):
    """(weight as Cin x F, the Add node holding the bias or None, bias or None) of a
    MatMul/Gemm whose weight is a constant 2-D matrix; (None, None, None) for any other."""
    if len(node.inputs) < 2:
        return None, None, None
    weight = constant_value(node.inputs[1])
    if weight is None or weight.ndim != 2 or not np.issubdtype(weight.dtype, np.floating):
        return None, None, None
    if node.op == "MatMul":
        add = _single_reader(graph, node.outputs[0])
        if add is not None and add.op == "Add" and len(add.inputs) == 2:
            other = add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]
            bias = constant_value(other)
            if bias is not None and bias.shape == (weight.shape[1],):
                return weight, add, bias
        return weight, None, None
    attrs = node.attrs
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
        return None, None, None
    if attrs.get("transB", 0):
        weight = weight.T
    if len(node.inputs) < 3 or not node.inputs[2].name:
        return weight, None, None
    bias = constant_value(node.inputs[2])
    if bias is None or attrs.get("beta", 1.0) != 1.0 or bias.shape != (weight.shape[1],):
        return None, None, None
    return weight, None, bias
