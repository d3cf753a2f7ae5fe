"""The nodes that replace one site of an ONNX graph: K, the interleave, L, copies of the
pulled BN/activation in each branch and the residual sum; or the folded form, which computes
the site's dense kernel from K and L with constant-only nodes. onnx_rewrite decides what to
replace and where; this module only builds."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.plan import SitePlan, interleave_permutation

# "gather" (one Gather on axis 1 with a constant permutation) or "transpose"
# (Reshape -> Transpose -> Reshape). benchmarks/onnx_b0.py measures both on EfficientNetB0;
# three runs gave whole-model ratios within each other's noise (batch 1: gather 0.60-0.82x,
# transpose 0.63-1.00x; batch 32: gather 0.83-0.88x, transpose 0.76-0.84x), so the simpler
# single node is the default.
INTERLEAVE = "gather"


def constant_value(tensor) -> np.ndarray | None:
    """The value of a weight given as an initializer or as a Constant node's output."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        if isinstance(value, gs.Constant):
            return np.asarray(value.values)
    return None


def constant_spec(tensor) -> np.ndarray | None:
    """A stand-in for a constant weight with its shape and dtype but none of its data (a
    zero-stride view), so that deciding about a site reads no weights: a model over 2 GB stays
    in memory once."""
    if not isinstance(tensor, gs.Constant):
        if len(tensor.inputs) != 1 or tensor.inputs[0].op != "Constant":
            return None
        tensor = tensor.inputs[0].attrs.get("value")
        if not isinstance(tensor, gs.Constant):
            return None
    return np.broadcast_to(np.zeros((), tensor.dtype), tuple(tensor.shape))


def foldable(plan: SitePlan, chain) -> bool:
    """Whether a site is linear up to an elementwise activation after K (see
    `SiteBuilder.folded`): a pulled BatchNormalization, or anything pulled into L's branch, is
    not."""
    if any(node.op == "BatchNormalization" for node in chain):
        return False
    return not (plan.has_l and chain)


@dataclass
class SiteBuilder:
    """Makes the new nodes and weights, with names unique in the model and seeded weights."""

    rng: np.random.Generator
    names: set = field(default_factory=set)
    """Every tensor and node name in use (the walk adds the model's, this adds its own)."""

    def given(self, base, kernel, bias, rank) -> list[gs.Constant]:
        """A grouped conv's weights from arrays (F x in/groups kernel, optional bias)."""
        params = [self._const(f"{base}_W", kernel.reshape(kernel.shape + (1,) * rank))]
        if bias is not None:
            params.append(self._const(f"{base}_B", bias))
        return params

    def _unique(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def _var(self, base: str) -> gs.Variable:
        return gs.Variable(self._unique(base))

    def constant(self, base: str, values: np.ndarray) -> gs.Constant:
        """A new weight with a name unique in the model."""
        return self._const(base, values)

    def _const(self, base: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(self._unique(base), values)

    def fresh(self, plan, base, dtype, rank, in_channels, use_bias) -> list[gs.Constant]:
        """New weights of a grouped conv as a framework would make them: Glorot-uniform
        kernel, zero bias."""
        shape = (plan.filters, in_channels // plan.groups) + (1,) * rank
        limit = math.sqrt(6.0 / (in_channels // plan.groups + plan.filters))
        params = [self._const(f"{base}_W", self.rng.uniform(-limit, limit, shape).astype(dtype))]
        if use_bias:
            params.append(self._const(f"{base}_B", np.zeros(plan.filters, dtype)))
        return params

    def _grouped_conv(self, graph, x, plan, base, attrs, params):
        """A Conv with `plan.groups` groups over `x` holding `params` (weight, bias)."""
        inputs = [x, *params]
        out = self._var(f"{base}_out")
        graph.nodes.append(
            gs.Node("Conv", self._unique(base), dict(attrs, group=plan.groups), inputs, [out])
        )
        return out

    def _interleave(self, graph, x, plan, base):
        out = self._var(f"{base}_interleave_out")
        if INTERLEAVE == "gather":
            perm = np.asarray(interleave_permutation(plan.filters, plan.groups), np.int64)
            graph.nodes.append(
                gs.Node(
                    "Gather",
                    self._unique(f"{base}_interleave"),
                    {"axis": 1},
                    [x, self._const(f"{base}_perm", perm)],
                    [out],
                )
            )
            return out
        shape = self._var(f"{base}_shape")
        mid, moved = self._var(f"{base}_grouped"), self._var(f"{base}_moved")
        split = self._const(
            f"{base}_split", np.asarray([0, plan.groups, plan.interleave_step, -1], np.int64)
        )
        graph.nodes += [
            gs.Node("Shape", self._unique(f"{base}_shape"), {}, [x], [shape]),
            gs.Node("Reshape", self._unique(f"{base}_reshape"), {}, [x, split], [mid]),
            gs.Node(
                "Transpose",
                self._unique(f"{base}_transpose"),
                {"perm": [0, 2, 1, 3]},
                [mid],
                [moved],
            ),
            gs.Node("Reshape", self._unique(f"{base}_restore"), {}, [moved, shape], [out]),
        ]
        return out

    def _branch(self, graph, x, chain, base, fresh: dict | None = None):
        """Apply copies of the pulled BN/activation nodes; with `fresh` (the site's weights),
        a BN gets BN' (identity stats), made once per site, so every use of a shared conv
        reads the same BN'."""
        prev_in = x
        for node in chain:
            out = self._var(f"{base}_{node.op.lower()}_out")
            inputs = [x] + list(node.inputs[1:])
            if node.op == "BatchNormalization" and fresh is not None:
                if "BN'" not in fresh:
                    scale = constant_value(node.inputs[1])
                    channels, dtype = scale.shape[0], scale.dtype
                    fresh["BN'"] = [
                        self._const(f"{base}_bn_{p}", np.full(channels, v, dtype))
                        for p, v in (("scale", 1), ("bias", 0), ("mean", 0), ("var", 1))
                    ]
                inputs = [x, *fresh["BN'"]]
            if node.op == "Mul":  # x * Sigmoid(x): the Sigmoid was the previous chain member
                inputs = [prev_in, x]
            prev_in = x
            graph.nodes.append(
                gs.Node(
                    node.op,
                    self._unique(f"{base}_{node.op.lower()}"),
                    dict(node.attrs),
                    inputs,
                    [out],
                )
            )
            x = out
        return x

    def site(self, graph, x, plan, base, attrs, weights, k_chain, l_chain, biased=True):
        """K, its chain, interleave, L, its chain, residual sum, applied to `x`; the output."""
        keep = (lambda params: params) if biased else (lambda params: params[:1])
        k_out = self._grouped_conv(graph, x, plan, f"{base}_K", attrs, keep(weights["K"]))
        k_out = self._branch(graph, k_out, k_chain, f"{base}_K")
        mixed = self._interleave(graph, k_out, plan, base) if plan.has_interleave else k_out
        if not plan.has_l:
            return mixed
        l_attrs = {k: v for k, v in attrs.items() if k in ("kernel_shape",)}
        l_out = self._grouped_conv(graph, mixed, plan, f"{base}_L", l_attrs, keep(weights["L"]))
        l_out = self._branch(graph, l_out, l_chain, f"{base}_L", fresh=weights)
        result = self._var(f"{base}_sum_out")
        graph.nodes.append(
            gs.Node("Add", self._unique(f"{base}_sum"), {}, [k_out, l_out], [result])
        )
        return result

    def folded(self, graph, x, plan, base, attrs, rank, weights, chain):
        """The same site, with its linear part computed on the weights instead of on `x`:
        K, interleave, L and the sum applied to an identity give the dense kernel
        `(I + L P) K` (and to zeros, the bias), which one ordinary Conv then applies. The
        model still holds only K's and L's weights; every node that builds the kernel reads
        constants only, so onnxruntime folds them once when it loads the model and runs the
        site as fast as the original dense conv, without the extra nodes and layout changes
        that make some grouped sites slower than their original. Needs a linear site: no L
        and only an elementwise activation after K (which commutes with the interleave), or
        nothing pulled at all."""
        dtype = weights["K"][0].dtype
        ones = [1] * rank
        on_weights = {"kernel_shape": ones}
        eye = self._filled(graph, f"{base}_eye", [plan.cin, plan.cin], dtype, identity=True)
        eye = self._reshaped(graph, eye, [plan.cin, plan.cin, *ones], f"{base}_eye_nd")
        transposed = self.site(
            graph, eye, plan, f"{base}_fold", on_weights, weights, [], [], biased=False
        )
        kernel = self._var(f"{base}_fold_W")
        graph.nodes.append(
            gs.Node(
                "Transpose",
                self._unique(f"{base}_fold_W"),
                {"perm": [1, 0, *range(2, 2 + rank)]},
                [transposed],
                [kernel],
            )
        )
        inputs = [x, kernel]
        if len(weights["K"]) > 1:  # the bias: the site applied to zeros
            origin = self._filled(graph, f"{base}_origin", [1, plan.cin, *ones], dtype)
            at_zero = self.site(graph, origin, plan, f"{base}_fold", on_weights, weights, [], [])
            inputs.append(self._reshaped(graph, at_zero, [plan.filters], f"{base}_fold_B"))
        out = self._var(f"{base}_folded_out")
        graph.nodes.append(
            gs.Node("Conv", self._unique(f"{base}_folded"), dict(attrs), inputs, [out])
        )
        return self._branch(graph, out, chain, f"{base}_K")

    def _filled(self, graph, base, shape, dtype, identity=False) -> gs.Variable:
        """Zeros of `shape` (or, 2D, an identity) made by nodes from a shape: nothing stored."""
        zero = gs.Constant(self._unique(f"{base}_zero"), np.zeros(1, dtype))
        size = self._const(f"{base}_shape", np.asarray(shape, np.int64))
        out = self._var(f"{base}_zeros")
        graph.nodes.append(
            gs.Node("ConstantOfShape", self._unique(base), {"value": zero}, [size], [out])
        )
        if not identity:
            return out
        eye = self._var(base)
        graph.nodes.append(gs.Node("EyeLike", self._unique(f"{base}_identity"), {}, [out], [eye]))
        return eye

    def _reshaped(self, graph, x, shape, base) -> gs.Variable:
        out = self._var(base)
        target = self._const(f"{base}_shape", np.asarray(shape, np.int64))
        graph.nodes.append(gs.Node("Reshape", self._unique(base), {}, [x, target], [out]))
        return out
