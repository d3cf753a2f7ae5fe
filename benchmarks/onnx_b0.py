"""EfficientNetB0 exported to ONNX (tf2onnx): rewrite time against load+save time, and
onnxruntime latency of the rewritten model against the original at batch 1, 8 and 32 (both
interleave implementations, --skip-slower and --fold-slower), plus each site in context
against its dense original, grouped and folded.

Usage: python benchmarks/onnx_b0.py [--size 224] [--repeat 10] [--provider CPUExecutionProvider]
       [--no-sites] [--profile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import onnx
from timing import median_time

import graphopt
from graphopt.backends import onnx_build, onnx_rewrite, onnx_timing
from graphopt.backends.onnx_io import load_onnx, save_onnx
from graphopt.backends.onnx_verify import session, session_options, timing_threads


def make_session(model: onnx.ModelProto, provider: str):
    """pwgroup's own timing session: ORT_ENABLE_ALL, spinning off, threads pinned."""
    return session(model, provider, "to benchmark", timing=True)


def kernel_time_by_node(model: onnx.ModelProto, provider: str, feed: dict, runs: int = 10):
    """onnxruntime's own profile: {node name: (op type, kernel ms per run)} of the optimized
    graph (where time goes)."""
    import collections
    import json

    options = session_options()
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = os.path.join(tmp, "profile")
        s = session(model, provider, "to benchmark", timing=True, options=options)
        for _ in range(runs):
            s.run(None, feed)
        with open(s.end_profiling()) as f:
            events = json.load(f)
    ms, ops = collections.Counter(), {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            name = e["name"][: -len("_kernel_time")]
            ms[name] += e["dur"] / 1000 / runs
            ops[name] = e["args"]["op_name"]
    return {name: (ops[name], t) for name, t in ms.items()}


def by_op(nodes: dict):
    import collections

    total = collections.Counter()
    for op, t in nodes.values():
        total[op] += t
    return total


def ceiling(nodes: dict, report) -> tuple[float, float]:
    """(share of the original's kernel time in its site convs, the lowest rewritten/original
    ratio any rewrite with these sites could reach): the sites' convs at the dense convs'
    speed per MAC, the interleave, residual sum and branch copies free, everything else as
    it was. A site conv is found by its tf2onnx layer prefix (`model/layer/`), which also
    catches an activation onnxruntime fused into it, so the ceiling errs low."""
    prefixes = tuple("/".join(s.name.split("/")[:2]) + "/" for s in report.sites)
    total = sum(t for _, t in nodes.values())
    sites = sum(t for n, (op, t) in nodes.items() if op == "Conv" and n.startswith(prefixes))
    macs = report.site_macs_after / report.site_macs_before
    return sites / total, (total - sites + sites * macs) / total


def interleaved_medians(sessions: dict, feed: dict, repeat: int) -> dict:
    """Median latency of each session, runs interleaved A/B/... (the machine is noisy)."""
    for s in sessions.values():
        s.run(None, feed)
    times = {name: [] for name in sessions}
    for _ in range(repeat):
        for name, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feed)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    import keras

    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--provider", default="CPUExecutionProvider")
    parser.add_argument("--no-sites", action="store_true")
    parser.add_argument(
        "--profile", action="store_true", help="kernel time by op type, original vs rewritten"
    )
    args = parser.parse_args()

    model = keras.applications.EfficientNetB0(
        weights=None, classes=10, input_shape=(args.size, args.size, 3)
    )
    original = graphopt.export_onnx(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "b0.onnx")
        save_onnx(original, path)
        load_save = median_time(lambda: save_onnx(load_onnx(path), path))
    rewrite = median_time(lambda: graphopt.rewrite(original))
    print(
        f"EfficientNetB0 ONNX {args.size}x{args.size}: rewrite {rewrite:.2f} s, "
        f"load+save {load_save:.2f} s, ratio {rewrite / load_save:.2f}"
    )

    variants = {"original": original}
    for kind in ("gather", "transpose"):
        onnx_build.INTERLEAVE = kind
        variants[f"rewritten/{kind}"], report = graphopt.rewrite(original)
    onnx_build.INTERLEAVE = "gather"
    for flag in ("skip", "fold"):
        t0 = time.perf_counter()
        variants[f"{flag}-slower"], slower = graphopt.rewrite(original, **{f"{flag}_slower": True})
        folded = sum(s.runs_folded for s in slower.sites)
        print(
            f"--{flag}-slower ({time.perf_counter() - t0:.1f} s): {len(slower.sites)} of "
            f"{len(report.sites)} sites rewritten, {folded} of them folded, "
            f"{len(report.sites) - len(slower.sites)} left as they were; parameters reduced by "
            f"{slower.totals.reduction_pct:.2f}% (every site grouped: "
            f"{report.totals.reduction_pct:.2f}%)"
        )
        if flag == "fold":
            fold_report = slower
    sessions = {name: make_session(m, args.provider) for name, m in variants.items()}
    name = sessions["original"].get_inputs()[0].name
    print(
        f"onnxruntime {sessions['original'].get_providers()[0]}, {timing_threads()} threads, "
        "spinning off, ORT_ENABLE_ALL, runs interleaved, medians"
    )
    for batch in (1, 8, 32):
        x = (
            np.random.default_rng(0)
            .standard_normal((batch, args.size, args.size, 3))
            .astype(np.float32)
        )
        med = interleaved_medians(
            sessions, {name: x}, args.repeat if batch == 1 else max(3, args.repeat // 3)
        )
        base = med["original"]
        line = ", ".join(f"{k} {v * 1000:.1f} ms ({v / base:.2f}x)" for k, v in med.items())
        print(f"batch {batch:2d}: {line}")
        if args.profile:
            before, after = (
                kernel_time_by_node(variants[v], args.provider, {name: x})
                for v in ("original", "rewritten/gather")
            )
            share, best = ceiling(before, report)
            print(
                f"  site convs: {share:.0%} of the original's kernel time; ceiling {best:.2f} "
                f"(the sites' {report.site_macs_after / report.site_macs_before:.1%} of the "
                "MACs at the dense convs' speed per MAC, interleave, sum and branch copies free)"
            )
            before, after = by_op(before), by_op(after)
            total = sum(before.values())
            print(
                f"  kernel ms by op, original -> rewritten/gather (share of original {total:.1f}):"
            )
            for op in sorted(set(before) | set(after), key=lambda k: -before[k] - after[k])[:8]:
                print(
                    f"    {op:20} {before[op]:8.2f} -> {after[op]:8.2f} "
                    f"({(after[op] - before[op]) / total:+.1%})"
                )

    if args.no_sites:
        return
    print(
        "each site in context (between two per-channel convs), rewritten/dense, the worse of "
        f"batch {' and '.join(map(str, onnx_timing.BATCHES))}:"
    )
    folded = {s.name for s in fold_report.sites if s.runs_folded}
    slower, again_ratios = 0, []
    for site in report.sites:
        grouped = onnx_timing.speed_ratio(site, lambda m: _alone(m, site))
        line = f"grouped {grouped:.2f}x"
        slower += grouped > 1.0
        if site.name in folded:
            again_ratios.append(onnx_timing.speed_ratio(site, lambda m: _alone(m, site, True)))
            line += f", folded {again_ratios[-1]:.2f}x"
        print(
            f"  {site.name[-40:]:40} {site.cin:5d}->{site.filters:<5d} "
            f"groups {site.groups:3d}: {line}"
        )
    print(f"sites slower than their dense original: {slower} of {len(report.sites)}")
    if again_ratios:
        print(
            f"folded sites, measured again: {min(again_ratios):.2f}x to {max(again_ratios):.2f}x "
            f"of the dense conv; above 1.05x (beyond timing noise): "
            f"{sum(r > 1.05 for r in again_ratios)} of {len(again_ratios)}"
        )


def _alone(model, site, fold=False):
    """The rewrite of a single-site model with `site`'s groups, folded or not."""
    fold_set = (lambda plan: True) if fold else frozenset()
    return onnx_rewrite.rewrite_onnx(
        model, "paper", site.cin // site.groups, 0, None, fold=fold_set
    )[0]


if __name__ == "__main__":
    main()
