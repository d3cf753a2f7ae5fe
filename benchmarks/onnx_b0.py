"""EfficientNetB0 exported to ONNX (tf2onnx): rewrite time against load+save time, and
onnxruntime latency of the rewritten model against the original at batch 1 and 32, for both
interleave implementations, plus each site alone against its dense original.

Usage: python benchmarks/onnx_b0.py [--size 224] [--repeat 10] [--provider CPUExecutionProvider]
       [--no-sites]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import onnx
from onnx import TensorProto, helper
from timing import median_time

import graphopt
from graphopt.backends import onnx_rewrite
from graphopt.backends.onnx_io import load_onnx, save_onnx


def make_session(model: onnx.ModelProto, provider: str, threads: int = 2):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 4
    available = ort.get_available_providers()
    if provider not in available:
        print(f"note: {provider} is not available; using CPUExecutionProvider")
        provider = "CPUExecutionProvider"
    return ort.InferenceSession(model.SerializeToString(), options, providers=[provider])


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


def single_conv(cin: int, filters: int, hw: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = helper.make_tensor(
        "W",
        TensorProto.FLOAT,
        [filters, cin, 1, 1],
        rng.standard_normal(filters * cin).astype(np.float32),
    )
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="pw", kernel_shape=[1, 1])
    graph = helper.make_graph(
        [node],
        "site",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", filters, hw, hw])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def main() -> None:
    import keras

    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--provider", default="CPUExecutionProvider")
    parser.add_argument("--no-sites", action="store_true")
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
        onnx_rewrite.INTERLEAVE = kind
        variants[f"rewritten/{kind}"], report = graphopt.rewrite(original)
    onnx_rewrite.INTERLEAVE = "gather"
    variants["rewritten/skip-slower"], fast_report = graphopt.rewrite(original, skip_slower=True)
    print(
        f"--skip-slower left {len(report.sites) - len(fast_report.sites)} of "
        f"{len(report.sites)} sites as they were; trainable parameters reduced by "
        f"{fast_report.totals.reduction_pct:.2f}% instead of {report.totals.reduction_pct:.2f}%"
    )
    sessions = {name: make_session(m, args.provider) for name, m in variants.items()}
    name = sessions["original"].get_inputs()[0].name
    for batch in (1, 32):
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

    if args.no_sites:
        return
    print("each site alone, batch 1 (rewritten/dense, linear mode, gather interleave):")
    slower, ratios = 0, {}
    for site in report.sites:
        hw = int(round((site.positions or 1) ** 0.5))
        dense = single_conv(site.cin, site.filters, hw)
        new, _ = graphopt.rewrite(dense, mode="linear")
        s = {"dense": make_session(dense, args.provider), "new": make_session(new, args.provider)}
        x = np.random.default_rng(0).standard_normal((1, site.cin, hw, hw)).astype(np.float32)
        med = interleaved_medians(s, {"x": x}, 30)
        ratio = ratios[site.name] = med["new"] / med["dense"]
        slower += ratio > 1.0
        print(
            f"  {site.name[-40:]:40} {site.cin:5d}->{site.filters:<5d} {hw:3d}x{hw:<3d} "
            f"groups {site.groups:3d}: {ratio:.2f}x"
        )
    print(f"sites slower than their dense original: {slower} of {len(report.sites)}")
    kept = [s.name for s in fast_report.sites]
    again = sum(ratios[name] > 1.0 for name in kept)
    print(
        f"with --skip-slower: {again} of its {len(kept)} rewritten sites measured slower here "
        "(an independent second measurement; values near 1.0x flip with noise)"
    )


if __name__ == "__main__":
    main()
