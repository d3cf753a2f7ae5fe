"""How fast a planned site runs in onnxruntime against the dense conv it replaces: the
measurement behind `skip_slower` (a site slower than its original is left as it is)."""

from __future__ import annotations

import math
import statistics
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphopt.plan import SitePlan

REPEATS = 25


def _spatial(positions: int) -> list[int]:
    side = math.isqrt(positions)
    return [side, side] if side * side == positions else [1, positions]


def _dense_site(plan: SitePlan, spatial: list[int]) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((plan.filters, plan.cin, 1, 1)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["y"], name="site", kernel_shape=[1, 1])],
        "site",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, plan.cin, *spatial])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, plan.filters, *spatial])],
        [numpy_helper.from_array(w, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def speed_ratio(plan: SitePlan, rewrite, provider: str = "CPUExecutionProvider") -> float | None:
    """Median latency of the rewritten site over the dense conv (batch 1, runs interleaved);
    None when the site's spatial size is unknown. `rewrite` turns a ModelProto into its
    rewritten form (passed in so that this module needs no rewriter of its own)."""
    if plan.positions is None:
        return None
    from graphopt.backends.onnx_verify import session

    spatial = _spatial(plan.positions)
    dense = _dense_site(plan, spatial)
    why = "to time sites for --skip-slower"
    sessions = {
        "dense": session(dense, provider, why),
        "new": session(rewrite(dense), provider, why),
    }
    feed = {
        "x": np.random.default_rng(0).standard_normal((1, plan.cin, *spatial)).astype(np.float32)
    }
    times: dict[str, list[float]] = {"dense": [], "new": []}
    for s in sessions.values():
        s.run(None, feed)
    for _ in range(REPEATS):
        for name, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feed)
            times[name].append(time.perf_counter() - t0)
    return statistics.median(times["new"]) / statistics.median(times["dense"])
