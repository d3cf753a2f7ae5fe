"""How fast a planned site runs in onnxruntime against the dense conv it replaces: the
measurement behind `--skip-slower` and `--fold-slower`.

A site is timed in context, between two cheap per-channel convolutions, because that is where
it pays its hidden cost: onnxruntime's CPU provider runs dense convs in a blocked channel
layout (NCHWc) and reorders tensors into and out of it around any node that cannot use it,
which includes grouped convs whose groups are not multiples of the block size. Timed alone, a
grouped site looks faster than it is inside a network. It is timed at two batch sizes, since
memory-bound overheads grow with the batch, and the worse ratio counts.
"""

from __future__ import annotations

import math
import statistics
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphopt.plan import SitePlan

BATCHES = (1, 8)
MIN_REPEATS, MAX_REPEATS = 15, 400
BUDGET_S = 0.1
"""Runs per session and batch: enough for about BUDGET_S of each, within the bounds (tiny
sites, whose timings are the noisiest, get the most runs)."""


def _spatial(positions: int) -> list[int]:
    side = math.isqrt(positions)
    return [side, side] if side * side == positions else [1, positions]


def _in_context(plan: SitePlan, spatial: list[int]) -> onnx.ModelProto:
    """x -> per-channel conv -> the dense pointwise conv ("site") -> per-channel conv -> y."""
    rng = np.random.default_rng(0)
    cin, filters = plan.cin, plan.filters

    def weight(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    ones = [1, 1]
    nodes = [
        helper.make_node("Conv", ["x", "pre_W"], ["a"], name="pre", kernel_shape=ones, group=cin),
        helper.make_node("Conv", ["a", "W"], ["b"], name="site", kernel_shape=ones),
        helper.make_node(
            "Conv", ["b", "post_W"], ["y"], name="post", kernel_shape=ones, group=filters
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "site_in_context",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, *spatial])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", filters, *spatial])],
        [
            weight("pre_W", cin, 1, 1, 1),
            weight("W", filters, cin, 1, 1),
            weight("post_W", filters, 1, 1, 1),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def speed_ratio(
    plan: SitePlan,
    rewrite,
    provider: str = "CPUExecutionProvider",
    purpose: str = "to time sites",
) -> float | None:
    """Median latency of the rewritten site over the dense conv, in context, runs interleaved;
    the larger ratio of BATCHES. None when the site's spatial size is unknown. `rewrite`
    turns a ModelProto into its rewritten form (passed in so that this module needs no
    rewriter of its own)."""
    if plan.positions is None:
        return None
    from graphopt.backends.onnx_verify import session

    spatial = _spatial(plan.positions)
    dense = _in_context(plan, spatial)
    sessions = {
        "dense": session(dense, provider, purpose, spinning=False),
        "new": session(rewrite(dense), provider, purpose, spinning=False),
    }
    ratios = []
    for batch in BATCHES:
        shape = (batch, plan.cin, *spatial)
        feed = {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
        times: dict[str, list[float]] = {"dense": [], "new": []}
        for s in sessions.values():
            s.run(None, feed)  # warm-up
        t0 = time.perf_counter()
        sessions["dense"].run(None, feed)
        once = time.perf_counter() - t0
        repeats = min(MAX_REPEATS, max(MIN_REPEATS, int(BUDGET_S / max(once, 1e-6))))
        for _ in range(repeats):
            for name, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, feed)
                times[name].append(time.perf_counter() - t0)
        ratios.append(statistics.median(times["new"]) / statistics.median(times["dense"]))
    return max(ratios)
