"""The paper's Table 2, to the parameter, through the real command line (docs/method.md)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_pwgroup

TABLE_2 = {
    "B0": (4_020_358, 639_702, 84.09),
    "B1": (6_525_994, 922_770, 85.86),
    "B2": (7_715_084, 1_130_344, 85.35),
    "B3": (10_711_602, 1_532_902, 85.69),
    "B4": (17_566_546, 1_952_306, 88.89),
    "B5": (28_361_274, 2_633_470, 90.71),
    "B6": (40_758_754, 4_714_030, 88.43),
    "B7": (63_812_570, 4_669_218, 92.68),
}


def _params(variant):
    marks = [] if variant == "B0" else [pytest.mark.slow]
    return pytest.param(variant, marks=marks, id=variant)


@pytest.mark.parametrize("variant", [_params(v) for v in TABLE_2])
def test_pwgroup_report_reproduces_table_2(variant, tmp_path):
    out = tmp_path / "r.json"
    proc = run_pwgroup(
        "report",
        f"keras.applications:EfficientNet{variant}",
        "--classes",
        "10",
        "--json",
        str(out),
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""
    totals = json.loads(out.read_text())["totals"]
    before, after, pct = TABLE_2[variant]
    assert totals["trainable_params_before"] == before
    assert totals["trainable_params_after"] == after
    assert totals["reduction_pct"] == pct
