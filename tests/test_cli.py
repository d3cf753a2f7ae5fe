"""The `pwgroup` console script as users and CI run it: exit codes 0/1/2, one-line errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

from fixtures import onnx_models
from tests.conftest import REPO, file_bytes, run_pwgroup

SITE_KEYS = {
    "name",
    "cin",
    "filters",
    "groups",
    "interleave_step",
    "has_l",
    "params_before",
    "params_after",
    "macs_before",
    "macs_after",
}


def _one_line_error(proc, code=2):
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("pwgroup: ")
    return lines[0]


def test_rewrite_writes_a_loadable_model_and_keeps_the_input(keras_fixtures, tmp_path):
    src = keras_fixtures["conv_bn_act"]
    original = file_bytes(src)
    out = tmp_path / "out.keras"
    report = tmp_path / "r.json"
    md = tmp_path / "r.md"
    proc = run_pwgroup(
        "rewrite",
        src,
        "-o",
        str(out),
        "--json",
        str(report),
        "--markdown",
        str(md),
        "--mode",
        "linear",
        "--seed",
        "3",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "trainable parameters" in proc.stdout and "pw" in proc.stdout
    assert file_bytes(src) == original
    data = json.loads(report.read_text())
    assert data["mode"] == "linear" and data["schema_version"] == 2
    assert set(data["sites"][0]) >= SITE_KEYS
    assert data["totals"]["file_size_after"] == os.path.getsize(out)
    assert "| parameters |" in md.read_text()

    import keras

    import graphopt  # noqa: F401
    from graphopt.api import keras_counts

    reloaded = keras.models.load_model(out)
    assert keras_counts(reloaded) == (
        data["totals"]["params_after"],
        data["totals"]["trainable_params_after"],
    )


def test_report_is_a_dry_run(keras_fixtures, tmp_path):
    shutil.copy(keras_fixtures["residual"], tmp_path / "m.keras")
    proc = run_pwgroup("report", "m.keras", "--json", "r.json", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["m.keras", "r.json"]
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["totals"]["sites"] == 3 and data["skipped"] == []


def test_report_of_several_models_with_a_glob(keras_fixtures, tmp_path):
    for name in ("residual", "sequential"):
        shutil.copy(keras_fixtures[name], tmp_path / f"{name}.keras")
    proc = run_pwgroup("report", "*.keras", "--fail-under", "40", cwd=str(tmp_path))
    assert proc.returncode == 1
    assert "residual.keras" in proc.stdout and "sequential.keras" in proc.stdout
    assert "model" in proc.stdout.splitlines()[-3]  # the summary block closes the output
    err = _one_line_error(proc, code=1)
    assert "sequential.keras" in err and "below --fail-under 40%" in err


def test_fail_under_passes_and_fails(keras_fixtures):
    src = keras_fixtures["residual"]
    assert run_pwgroup("report", src, "--quiet", "--fail-under", "40").returncode == 0
    err = _one_line_error(run_pwgroup("report", src, "--quiet", "--fail-under", "99"), code=1)
    assert "46.19%" in err


@pytest.mark.parametrize(
    "content,needle",
    [
        (None, "no such file"),
        (b"", "empty"),
        (b"PK\x03\x04garbage" * 10, "not a readable Keras model"),
    ],
)
def test_bad_files_give_one_line_and_exit_2(tmp_path, content, needle):
    path = tmp_path / "model.keras"
    if content is not None:
        path.write_bytes(content)
    err = _one_line_error(run_pwgroup("rewrite", str(path), "-o", str(tmp_path / "o.keras")))
    assert needle in err
    assert not (tmp_path / "o.keras").exists()
    if content is not None:
        assert path.read_bytes() == content


def test_unsafe_model_is_refused_without_side_effect(keras_fixtures, tmp_path):
    src = keras_fixtures["with_lambda"]
    original = file_bytes(src)
    err = _one_line_error(run_pwgroup("rewrite", src, "-o", str(tmp_path / "o.keras")))
    assert "Lambda" in err and "--trust-model" in err
    assert file_bytes(src) == original and not (tmp_path / "o.keras").exists()


def test_output_equal_to_input_is_refused(keras_fixtures, tmp_path):
    src = tmp_path / "m.keras"
    shutil.copy(keras_fixtures["residual"], src)
    original = file_bytes(str(src))
    err = _one_line_error(run_pwgroup("rewrite", str(src), "-o", str(src)))
    assert "refusing to overwrite the input" in err
    assert file_bytes(str(src)) == original


@pytest.mark.parametrize(
    "args,needle",
    [
        (["rewrite", "model.txt"], "unknown model kind"),
        (["report", "keras.applications:NoSuchNet"], "no model named"),
        (["report", "keras.applications:EfficientNetB0", "--input-shape", "8,8"], ""),
    ],
)
def test_bad_names_give_one_line_and_exit_2(tmp_path, args, needle):
    (tmp_path / "model.txt").write_text("hello")
    err = _one_line_error(run_pwgroup(*args, cwd=str(tmp_path)))
    assert needle in err


@pytest.mark.parametrize("command", ["", "rewrite", "report", "export", "finetune"])
def test_help_of_every_command(command):
    proc = run_pwgroup(*filter(None, [command, "--help"]))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.startswith("usage: pwgroup")
    if command == "finetune":
        assert "ORIGINAL REWRITTEN" in proc.stdout


def test_usage_errors_exit_2():
    proc = run_pwgroup("rewrite", "x.keras", "--mode", "fast")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert run_pwgroup("report", "x.keras", "--min-channels-per-group", "0").returncode == 2


def _unwritable_targets(tmp_path):
    """A path under a missing folder and one under a regular file (root writes anywhere else)."""
    (tmp_path / "plain").write_text("a file, not a folder")
    return [tmp_path / "missing" / "r.out", tmp_path / "plain" / "r.out"]


@pytest.mark.parametrize("flag", ["--json", "--markdown", "--html"])
def test_unwritable_report_file_is_refused_before_the_model_is_written(tmp_path, flag):
    """Issue 24 (6): the run failed only after the model was written, naming a temp file."""
    src = tmp_path / "m.onnx"
    onnx.save(onnx_models.pytorch_style(), str(src))
    for target in _unwritable_targets(tmp_path):
        proc = run_pwgroup("rewrite", str(src), "-o", str(tmp_path / "o.onnx"), flag, str(target))
        err = _one_line_error(proc)
        assert err.startswith(f"pwgroup: {target}: ") and ".tmp" not in err
        assert sorted(os.listdir(tmp_path)) == ["m.onnx", "plain"]


def test_unwritable_output_is_refused_before_tensorflow_is_loaded(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(onnx_models.pytorch_style(), str(src))
    script = "import sys, cli; print(cli.main(sys.argv[1:]), 'tensorflow' in sys.modules)"
    for target in _unwritable_targets(tmp_path):
        proc = subprocess.run(
            [sys.executable, "-c", script, "rewrite", str(src), "-o", str(target)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=600,
        )
        assert proc.stdout.split() == ["2", "False"], proc.stderr
        assert proc.stderr.startswith(f"pwgroup: {target}: ") and proc.stderr.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "plain"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["rewrite", "x.keras", "--mode", "fast"], "argument --mode: invalid choice: 'fast'"),
        (["report", "x.keras", "--no-such-option"], "unrecognized arguments: --no-such-option"),
        (["report", "x.keras", "--min-channels-per-group", "0"], "must be a positive integer"),
        (
            ["finetune", "a.keras", "b.keras", "--data", "d", "-o", "o.keras", "--epochs", "x"],
            "argument --epochs: must be a positive integer, not 'x'",
        ),
        (["rewrite"], "the following arguments are required: model"),
        (["export", "m.keras"], "the following arguments are required: -o/--output"),
    ],
)
def test_usage_errors_are_one_line(args, needle):
    """Issue 24 (8): argparse printed a 15-line usage block before its error."""
    err = _one_line_error(run_pwgroup(*args))
    assert err.startswith("pwgroup: error: ") and needle in err
    assert err.endswith(f"(see pwgroup {args[0]} --help)")


def test_help_of_max_site_error_states_the_default_the_docs_do():
    from graphopt.calibrate import DEFAULT_SITE_ERROR

    with open(os.path.join(REPO, "docs", "cli.md"), encoding="utf-8") as f:
        row = next(line for line in f if line.startswith("| `--max-site-error"))
    default = re.search(r"\(default: [^)]*\)", row).group(0)
    assert f"; {DEFAULT_SITE_ERROR:g} without targets)" in default
    for command in ("rewrite", "report"):
        assert default in " ".join(run_pwgroup(command, "--help").stdout.split())


def test_data_cast_to_the_models_dtype_is_one_note_on_stderr(tmp_path):
    import onnx

    from fixtures.onnx_models import single_site

    onnx.save(single_site(), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(8, 32, 6, 6)))  # float64
    result = run_pwgroup(
        "report", str(tmp_path / "m.onnx"), "--measure", str(tmp_path / "x.npy"), "--quiet"
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"pwgroup: note: {tmp_path / 'x.npy'}: input 'x': float64 values cast to float32, "
        "the model's dtype"
    ]


def test_file_sizes_of_an_h5_model_compare_like_with_like(tmp_path):
    """An .h5 saved with its optimizer state against the rewritten .keras read "53.17% saved"
    with no site rewritten: both sizes are now of .keras files, and a note gives the input's."""
    import keras

    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3)(inp)  # no pointwise conv: nothing to save
    model = keras.Model(inp, keras.layers.GlobalAveragePooling2D()(x))
    model.compile("adam", "mse")
    model.fit(np.zeros((4, 8, 8, 3)), np.zeros((4, 8)), verbose=0)
    model.save(tmp_path / "m.h5")  # with the optimizer's slots
    result = run_pwgroup("report", str(tmp_path / "m.h5"), "--json", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    totals = report["totals"]
    assert (
        abs(totals["file_size_after"] - totals["file_size_before"])
        < 0.02 * totals["file_size_before"]
    )
    size = os.path.getsize(tmp_path / "m.h5")
    assert any(f"m.h5 itself is {size:,} bytes" in note for note in report["notes"])
