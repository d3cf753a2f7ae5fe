"""What an ONNX rewrite costs against reading and writing the model: wall time of the rewrite
alone against load+save (medians of runs in one warm process, interleaved), and the peak
memory of the whole `pwgroup rewrite` (check in onnxruntime included) against the model's
size, in a fresh process of its own.

Usage: python benchmarks/onnx_rewrite_cost.py [--large] [--repeat 5]
  default: EfficientNetB0 (tf2onnx, 224x224); --large: nine 8192 -> 8192 pointwise convs,
  2.4 GB of external data (fixtures.onnx_models.write_large; needs ~7 GB of memory).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_TIMED = """
import statistics, sys, time
from graphopt.backends.onnx_io import load_onnx, save_onnx
from graphopt.backends.onnx_rewrite import rewrite_onnx
path, out, repeat = sys.argv[1], sys.argv[2], int(sys.argv[3])
runs = {"load+save": [], "rewrite": []}
for i in range(repeat + (repeat > 1)):  # one warm-up run when repeating, runs interleaved
    t0 = time.perf_counter()
    model = load_onnx(path)
    t1 = time.perf_counter()
    save_onnx(model, out)
    t2 = time.perf_counter()
    rewrite_onnx(model, "paper", 16, 0, None)
    t3 = time.perf_counter()
    if i or repeat == 1:
        runs["load+save"].append(t2 - t0)
        runs["rewrite"].append(t3 - t2)
print(statistics.median(runs["load+save"]), statistics.median(runs["rewrite"]))
"""


def _child(argv: list[str]) -> tuple[str, float, int]:
    """Run `argv`; its stdout, wall seconds and peak resident memory in bytes."""
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode})")
    return out, time.perf_counter() - t0, usage.ru_maxrss * 1024


def _model(folder: str, large: bool) -> str:
    path = os.path.join(folder, "model.onnx")
    make = (
        f"from fixtures.onnx_models import write_large; write_large({path!r})"
        if large
        else "import keras, graphopt; from graphopt.backends.onnx_io import save_onnx; "
        "m = keras.applications.EfficientNetB0(weights=None, classes=10); "
        f"save_onnx(graphopt.export_onnx(m), {path!r})"
    )
    _child([sys.executable, "-c", make])
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--large", action="store_true")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = _model(folder, args.large)
        size = sum(
            os.path.getsize(os.path.join(folder, f))
            for f in os.listdir(folder)
            if f.startswith("model.onnx")
        )
        out = os.path.join(folder, "out.onnx")
        repeat = 1 if args.large else args.repeat
        text, _, _ = _child([sys.executable, "-c", _TIMED, path, out, str(repeat)])
        load_save, rewrite = (float(v) for v in text.split())
        _, wall, peak = _child(["pwgroup", "rewrite", path, "-o", out, "--quiet"])
    name = "nine 8192->8192 convs" if args.large else "EfficientNetB0 224x224"
    print(
        f"{name}, {size / 1e6:,.1f} MB: rewrite {rewrite:.3f} s, load+save {load_save:.3f} s "
        f"(ratio {rewrite / load_save:.2f}); pwgroup rewrite with its check: {wall:.1f} s, "
        f"peak memory {peak / 1e9:.2f} GB ({peak / size:.2f}x the model; importing graphopt, "
        "which imports TensorFlow, takes about 0.7 GB of it)"
    )


if __name__ == "__main__":
    main()
