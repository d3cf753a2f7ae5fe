"""What calibration needs of ONNX: build the rewrite with given weights, read a site's input as
an extra output in onnxruntime (the rewrite keeps the tensor's name), run a model. Sites inside
If/Loop bodies keep their init: onnxruntime cannot hand out a subgraph's tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from graphopt import activations as act
from graphopt.backends.onnx_io import copy_fields
from graphopt.calibrate import BATCH, Built, RewriteOptions, SiteInfo
from graphopt.data import Samples
from graphopt.errors import UsageError
from graphopt.plan import PAPER, Selection
from graphopt.reconstruct import Step


@dataclass
class OnnxCalibration(RewriteOptions):
    original: onnx.ModelProto
    provider: str = "CPUExecutionProvider"
    _last: tuple | None = field(default=None, repr=False)
    _axes: list[int] | None = field(default=None, repr=False)

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.original.graph.output]

    def build(self, selection: Selection, weights) -> Built:
        from graphopt.backends.onnx_rewrite import rewrite_onnx

        model, report, found = self.rewrite_found(rewrite_onnx, selection, weights)
        sites, handles = {}, {}
        initializers = {t.name: t for t in model.graph.initializer}
        for name, site in found.items():
            weight = site.weight.reshape(site.weight.shape[0], site.weight.shape[1])
            rank = site.weight.ndim - 2
            strides = tuple(site.attrs.get("strides", (1,) * rank))
            steps = [_step(node) for node in site.chain] if self.mode == PAPER else []
            if any(s is None for s in steps):
                continue
            plan = next(p for p in report.sites if p.name == name)
            sites[name] = SiteInfo(
                plan,
                site.x,
                site.x,
                weight.astype(np.float64),
                None if site.bias is None else site.bias.astype(np.float64),
                strides,
                -1 if site.kind == "matmul" else 1,
                _silu(steps),
            )
            names = [n for group in site.params.values() for n in group]
            if not all(n in initializers for n in names):
                del sites[name]  # weights calibration cannot reach in place: they keep init
                continue
            handles[name] = {k: [initializers[n] for n in v] for k, v in site.params.items()}
            handles[name]["kind"] = site.kind
        return Built(model, report, sites, handles)

    def update(self, built: Built, name: str, fitted) -> None:
        params = built.handles[name]
        groups = next(p.groups for p in built.report.sites if p.name == name)
        layout = _matmul_layout if params["kind"] == "matmul" else _conv_layout
        rank = len(params["K"][0].dims) - 2
        arrays = {"K": [layout(fitted.kw, groups, rank), fitted.k_bias]}
        if "L" in params:
            arrays["L"] = [layout(fitted.lw, groups, rank), fitted.l_bias]
        if fitted.l_norm is not None and "BN'" in params:
            scale, shift = fitted.l_norm
            arrays["BN'"] = [scale, shift, np.zeros_like(scale), np.ones_like(scale)]
        for key, values in arrays.items():
            for tensor, value in zip(params[key], values):
                dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
                tensor.CopyFrom(numpy_helper.from_array(np.asarray(value, dtype), tensor.name))
        self._last = None  # the cached session holds the old weights

    def _session(self, model: onnx.ModelProto, outputs: list[str] = ()):
        """A session over `model`, or over only the part that computes `outputs`."""
        from graphopt.runtime import onnxruntime

        ort = onnxruntime("to calibrate ONNX models on data")
        if outputs:
            model = prefix(model, outputs)
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 4  # failures come back as exceptions, said in one line
        providers = [self.provider, "CPUExecutionProvider"]
        available = ort.get_available_providers()
        return ort.InferenceSession(
            model.SerializeToString(),
            options,
            providers=[p for p in dict.fromkeys(providers) if p in available],
        )

    @property
    def batch(self) -> int | None:
        """The batch the graph fixes (PyTorch exports often fix 1), else None."""
        for value in self.original.graph.input:
            dims = value.type.tensor_type.shape.dim
            if dims and dims[0].dim_value > 0:
                return int(dims[0].dim_value)
        return None

    def _feeds(self, samples: Samples):
        """(feed, samples in it): batches of BATCH, or of the graph's fixed batch with the
        last one padded by repeating its last sample (the padding is cut off again)."""
        size = self.batch or BATCH
        for feed in samples.batches(size):
            count = len(next(iter(feed.values())))
            if self.batch and count < size:
                feed = {k: _padded(v, size) for k, v in feed.items()}
            yield feed, count

    def capture(self, model, samples: Samples, keys: list):
        key = (id(model), tuple(keys))  # the fit and held-out passes share one session
        if self._last is None or self._last[0] != key:
            self._last = (key, self._session(model, keys), model)
        session = self._last[1]
        for feed, count in self._feeds(samples):  # a site's input: samples on axis 0
            yield [a[:count] for a in session.run(list(keys), feed)]

    def _batch_axes(self, session, samples: Samples) -> list[int]:
        """The axis of each output that holds the samples: 0 for most models, 1 for
        time-first sequences (CTC recognisers exported from PyTorch give (T, N, classes)).
        Found by running one and two samples where the batch is open."""
        if self.batch is not None or len(samples) < 2:
            return [0] * len(self.output_names)
        one = session.run(self.output_names, next(samples.take(slice(0, 1)).batches(1)))
        two = session.run(self.output_names, next(samples.take(slice(0, 2)).batches(2)))
        axes = []
        for a, b in zip(one, two):
            grown = [i for i, (m, n) in enumerate(zip(a.shape, b.shape)) if (m, n) == (1, 2)]
            axes.append(grown[0] if grown else 0)
        return axes

    def distill(self, model, fit: Samples, held: Samples, options, seed: int):
        raise UsageError(
            "--distill-steps trains the rewritten model, and pwgroup cannot train ONNX models "
            "yet: calibrate without it, or rewrite the Keras model"
        )

    def run(self, model, samples: Samples) -> list[np.ndarray]:
        session = self._session(model)
        if self._axes is None:
            self._axes = self._batch_axes(session, samples)
        names, parts = self.output_names, []
        for feed, count in self._feeds(samples):
            outputs = session.run(names, feed)
            parts.append([_take(o, ax, count) for o, ax in zip(outputs, self._axes)])
        return [np.concatenate(c, axis=ax) for c, ax in zip(zip(*parts), self._axes)]


def _conv_layout(kernel: np.ndarray, groups: int, rank: int) -> np.ndarray:
    """F x in/N (graphopt.fit's layout) as a grouped Conv's weight, F x in/N x 1..."""
    return kernel.reshape(kernel.shape + (1,) * rank)


def _matmul_layout(kernel: np.ndarray, groups: int, rank: int) -> np.ndarray:
    """F x in/N as a grouped MatMul's weight, N x in/N x F/N (see SiteBuilder.given_matmul)."""
    filters, width = kernel.shape
    return np.ascontiguousarray(kernel.reshape(groups, filters // groups, width).transpose(0, 2, 1))


def _padded(array: np.ndarray, size: int) -> np.ndarray:
    return np.concatenate([array, np.repeat(array[-1:], size - len(array), 0)])


def _take(array: np.ndarray, axis: int, count: int) -> np.ndarray:
    if array.ndim <= axis or array.shape[axis] == count:
        return array
    return np.take(array, np.arange(count), axis=axis)


def prefix(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """A copy of `model` whose outputs are `outputs` and that holds only the nodes and weights
    they need (a node with If/Loop bodies needs what its bodies read too). Inputs all stay:
    the same feeds run it."""
    graph = model.graph
    producer = {o: i for i, node in enumerate(graph.node) for o in node.output}
    needed, keep, stack = set(), set(), list(outputs)
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        index = producer.get(name)
        if index is None or index in keep:
            continue
        keep.add(index)
        stack += [n for n in _reads(graph.node[index]) if n]
    pruned = onnx.ModelProto()  # only the weights kept are copied
    copy_fields(model, pruned, skip={"graph"})
    copy_fields(graph, pruned.graph, skip={"node", "initializer", "output"})
    pruned.graph.node.extend(graph.node[i] for i in sorted(keep))
    pruned.graph.initializer.extend(t for t in graph.initializer if t.name in needed)
    pruned.graph.output.extend(onnx.ValueInfoProto(name=n) for n in outputs)
    return pruned


def _reads(node) -> list[str]:
    """Every tensor name `node` reads, those its subgraphs read from outer scopes included."""
    names = list(node.input)
    for attribute in node.attribute:
        for body in [attribute.g, *attribute.graphs]:
            for inner in body.node:
                names += _reads(inner)
    return names


def _attr(node, name, default):
    return node.attrs.get(name, default)


def _step(node) -> Step | None:
    """The NumPy description of a pulled node; None for one calibration cannot model."""
    op = node.op
    if op == "BatchNormalization":
        scale, shift, mean, var = node.constants[1:5]
        if any(v is None for v in (scale, shift, mean, var)):
            return None
        eps = float(_attr(node, "epsilon", 1e-5))
        a = scale / np.sqrt(var + eps)
        return Step("affine", a.astype(np.float64), (shift - mean * a).astype(np.float64), eps)
    if op == "Clip":
        bounds = node.constants[1:3]
        low = bounds[0] if len(bounds) > 0 and bounds[0] is not None else _attr(node, "min", None)
        high = bounds[1] if len(bounds) > 1 and bounds[1] is not None else _attr(node, "max", None)
        return act.clip(
            -np.inf if low is None else float(low), np.inf if high is None else float(high)
        )
    alpha = float(_attr(node, "alpha", {"LeakyRelu": 0.01, "HardSigmoid": 0.2}.get(op, 1.0)))
    beta = float(_attr(node, "beta", 0.5))
    makers = {
        "Relu": act.relu,
        "Sigmoid": act.logistic,
        "Tanh": act.tanh,
        "HardSigmoid": lambda: act.hard_sigmoid(alpha, beta),
        "HardSwish": act.hard_swish,
        "LeakyRelu": lambda: act.leaky_relu(alpha),
        "Elu": lambda: act.elu(alpha),
        "Mul": lambda: Step("act", fn="mul"),
    }
    return makers[op]() if op in makers else None


def _silu(steps: list[Step]) -> list[Step]:
    """x * Sigmoid(x) arrives as [Sigmoid, Mul]: one step."""
    out = []
    for step in steps:
        if step.fn == "mul":
            out[-1] = act.silu()
        else:
            out.append(step)
    return out
