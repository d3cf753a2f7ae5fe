"""How fast a planned site runs in onnxruntime against the dense conv it replaces: the
measurement behind `--skip-slower` and `--fold-slower`.

A site is timed in context, between two cheap per-channel convolutions, because that is where
it pays its hidden cost: onnxruntime's CPU provider runs dense convs in a blocked channel
layout (NCHWc) and reorders tensors into and out of it around any node that cannot use it,
which includes grouped convs whose groups are not multiples of the block size. Timed alone, a
grouped site looks faster than it is inside a network. It is timed at two batch sizes, since
memory-bound overheads grow with the batch, and the worse ratio counts.

`latency` times whole models (--latency). Every timing here runs sessions with their worker
threads' spinning off and a fixed thread count (onnx_verify.session(timing=True)), A/B runs
interleaved, medians.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass

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
        "dense": session(dense, provider, purpose, timing=True),
        "new": session(rewrite(dense), provider, purpose, timing=True),
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


LATENCY_BATCHES = (1, 8, 32)
LATENCY_BUDGET_S = 3.0
"""--latency: runs per batch size, both models together: about this long, within
MIN_REPEATS..MAX_REPEATS pairs."""


@dataclass(frozen=True)
class Latency:
    """Median latency of the original and the rewritten model at one batch size."""

    batch: int
    original_ms: float
    rewritten_ms: float
    provider: str
    threads: int

    @property
    def ratio(self) -> float:
        return self.rewritten_ms / self.original_ms

    def as_dict(self) -> dict:
        data = asdict(self)
        data.update(
            original_ms=round(self.original_ms, 4),
            rewritten_ms=round(self.rewritten_ms, 4),
            ratio=round(self.ratio, 4),
        )
        return data


def latency(
    original: onnx.ModelProto,
    rewritten: onnx.ModelProto,
    batches=LATENCY_BATCHES,
    provider: str = "CPUExecutionProvider",
) -> tuple[list[Latency], list[str]]:
    """Time both models in onnxruntime, runs interleaved (original, rewritten, original, ...),
    spinning off and threads pinned; medians per batch size. Returns the timings and a note for
    each batch size the model cannot run at (a fixed batch dimension)."""
    from graphopt.backends.onnx_verify import session, timing_threads

    purpose = "to time the models for --latency"
    sessions = [session(m, provider, purpose, timing=True) for m in (original, rewritten)]
    used = sessions[0].get_providers()[0]
    results, notes = [], []
    for batch in batches:
        feed = _batch_feed(original, sessions[0], batch)
        if feed is None:
            notes.append(f"batch {batch}: the model does not run at this batch size")
            continue
        times = _interleaved(sessions, feed)
        results.append(Latency(batch, 1000 * times[0], 1000 * times[1], used, timing_threads()))
    return results, notes


def _batch_feed(model: onnx.ModelProto, ref, batch: int) -> dict | None:
    """Random inputs with `batch` samples that the original runs on (dynamic sizes tried in
    turn, as the verification does), or None."""
    from graphopt.backends.onnx_verify import DYNAMIC_SIZES, random_feed

    for size in DYNAMIC_SIZES:
        feed = random_feed(model, ref, dynamic=size, batch=batch)
        if any(x.shape[:1] != (batch,) for x in feed.values() if x.ndim):
            return None  # a fixed leading dimension other than `batch`
        try:
            ref.run(None, feed)
        except Exception:  # noqa: BLE001, S112 - the original rejects this size; try the next
            continue
        return feed
    return None


def _interleaved(sessions, feed) -> list[float]:
    """Median seconds per run of each session, runs interleaved, after a warm-up."""
    for s in sessions:
        s.run(None, feed)
        s.run(None, feed)
    t0 = time.perf_counter()
    for s in sessions:
        s.run(None, feed)
    pair = time.perf_counter() - t0
    repeats = min(MAX_REPEATS, max(MIN_REPEATS, int(LATENCY_BUDGET_S / max(pair, 1e-6))))
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(repeats):
        for s, out in zip(sessions, times):
            t0 = time.perf_counter()
            s.run(None, feed)
            out.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]
