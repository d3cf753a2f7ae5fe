"""What calibration needs of ONNX: build the rewrite with given weights, read a site's input as
an extra output in onnxruntime (the rewrite keeps the tensor's name), run a model. Sites inside
If/Loop bodies keep their init: onnxruntime cannot hand out a subgraph's tensors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from graphopt.backends.onnx_build import constant_value
from graphopt.calibrate import BATCH, Built, SiteInfo
from graphopt.data import Samples
from graphopt.plan import PAPER, Selection
from graphopt.reconstruct import Step


@dataclass
class OnnxCalibration:
    original: onnx.ModelProto
    mode: str
    min_channels_per_group: int
    seed: int = 0
    name: str | None = None
    provider: str = "CPUExecutionProvider"

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.original.graph.output]

    def build(self, selection: Selection, weights) -> Built:
        from graphopt.backends.onnx_rewrite import rewrite_onnx

        found: dict = {}
        model, report = rewrite_onnx(
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
                1,
                _silu(steps),
            )
        return Built(model, report, sites)

    def _session(self, model: onnx.ModelProto, extra: list[str] = ()):
        from graphopt.runtime import onnxruntime

        ort = onnxruntime("to calibrate ONNX models on data")
        if extra:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            present = {o.name for o in copy.graph.output}
            for name in extra:
                if name not in present:
                    copy.graph.output.append(onnx.ValueInfoProto(name=name))
                    present.add(name)
            model = copy
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        providers = [self.provider, "CPUExecutionProvider"]
        available = ort.get_available_providers()
        return ort.InferenceSession(
            model.SerializeToString(),
            options,
            providers=[p for p in dict.fromkeys(providers) if p in available],
        )

    def capture(self, model, samples: Samples, keys: list):
        session = self._session(model, keys)
        for feed in samples.batches(BATCH):
            yield session.run(list(keys), feed)

    def run(self, model, samples: Samples) -> list[np.ndarray]:
        session = self._session(model)
        names = self.output_names
        parts = [session.run(names, feed) for feed in samples.batches(BATCH)]
        return [np.concatenate(column) for column in zip(*parts)]


def _attr(node, name, default):
    return node.attrs.get(name, default)


def _step(node) -> Step | None:
    """The NumPy-free description of a pulled node; None for one calibration cannot model."""
    import keras

    ops = keras.ops
    op = node.op
    if op == "BatchNormalization":
        scale, shift, mean, var = (constant_value(t) for t in node.inputs[1:5])
        eps = float(_attr(node, "epsilon", 1e-5))
        a = scale / np.sqrt(var + eps)
        return Step("affine", a.astype(np.float64), (shift - mean * a).astype(np.float64), eps)
    if op == "Clip":
        bounds = [constant_value(t) if t.name else None for t in node.inputs[1:3]]
        low = bounds[0] if len(bounds) > 0 and bounds[0] is not None else _attr(node, "min", None)
        high = bounds[1] if len(bounds) > 1 and bounds[1] is not None else _attr(node, "max", None)
        low = -np.inf if low is None else float(low)
        high = np.inf if high is None else float(high)
        return Step("act", fn=lambda x: ops.clip(x, low, high))
    alpha = float(_attr(node, "alpha", {"LeakyRelu": 0.01, "HardSigmoid": 0.2}.get(op, 1.0)))
    beta = float(_attr(node, "beta", 0.5))
    table = {
        "Relu": ops.relu,
        "Sigmoid": ops.sigmoid,
        "Tanh": ops.tanh,
        "HardSigmoid": lambda x: ops.clip(alpha * x + beta, 0.0, 1.0),
        "HardSwish": lambda x: x * ops.clip(x / 6.0 + 0.5, 0.0, 1.0),
        "LeakyRelu": lambda x: ops.leaky_relu(x, alpha),
        "Elu": lambda x: ops.where(x > 0, x, alpha * (ops.exp(ops.minimum(x, 0.0)) - 1.0)),
        "Mul": "mul",
    }
    fn = table.get(op)
    return None if fn is None else Step("act", fn=fn)


def _silu(steps: list[Step]) -> list[Step]:
    """x * Sigmoid(x) arrives as [Sigmoid, Mul]: one step."""
    import keras

    out = []
    for step in steps:
        if step.fn == "mul":
            out[-1] = Step("act", fn=keras.ops.silu)
        else:
            out.append(step)
    return out
