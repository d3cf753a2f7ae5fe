"""Loading and saving ONNX files: external data checked before it is read, atomic writes,
one-line errors through the command line."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import graphopt
from fixtures import onnx_models
from graphopt.backends.onnx_io import count_params, load_onnx
from graphopt.errors import InputError, UnsafeModelError
from tests.conftest import file_bytes, run_pwgroup


def _with_external_data(tmp_path, location: str) -> str:
    """single_site with its weight stored externally at `location` (written by hand)."""
    model = onnx_models.single_site(64, 32)
    weight = next(t for t in model.graph.initializer if t.name == "W")
    data = numpy_helper.to_array(weight).tobytes()
    target = location if os.path.isabs(location) else os.path.join(tmp_path, location)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "wb") as f:
        f.write(data)
    weight.ClearField("raw_data")
    weight.ClearField("float_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(data)))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    path = os.path.join(tmp_path, "model.onnx")
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return path


def test_relative_external_data_loads_and_rewrites(tmp_path):
    path = _with_external_data(tmp_path, "weights.bin")
    model = load_onnx(path)
    assert count_params(model) == 64 * 32 + 32
    new, report = graphopt.rewrite(model)
    assert len(report.sites) == 1


@pytest.mark.parametrize("location", ["../outside.bin", "sub/../../outside.bin"])
def test_external_data_escaping_the_folder_is_refused(tmp_path, location):
    folder = tmp_path / "m"
    folder.mkdir()
    path = _with_external_data(str(folder), location)
    with pytest.raises(UnsafeModelError, match="outside the model's folder"):
        load_onnx(path)


def test_absolute_external_data_is_refused(tmp_path):
    path = _with_external_data(str(tmp_path), str(tmp_path / "abs" / "w.bin"))
    with pytest.raises(UnsafeModelError, match="absolute"):
        load_onnx(path)


def test_symlinked_external_data_is_refused(tmp_path):
    path = _with_external_data(str(tmp_path), "real.bin")
    os.symlink(tmp_path / "real.bin", tmp_path / "link.bin")
    model = onnx.load(path, load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "link.bin"
    onnx.save(model, path)
    with pytest.raises(UnsafeModelError, match="link"):
        load_onnx(path)


def test_missing_external_data_is_an_input_error(tmp_path):
    path = _with_external_data(str(tmp_path), "weights.bin")
    os.unlink(tmp_path / "weights.bin")
    with pytest.raises(InputError, match="missing"):
        load_onnx(path)


def test_cli_rewrites_onnx_and_verifies(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(onnx_models.pytorch_style(), src)
    before = file_bytes(str(src))
    proc = run_pwgroup("rewrite", str(src), "-o", str(tmp_path / "out.onnx"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "3 sites rewritten" in proc.stdout
    onnx.checker.check_model(onnx.load(str(tmp_path / "out.onnx")), full_check=True)
    assert file_bytes(str(src)) == before


def test_cli_default_output_name_for_onnx(tmp_path):
    onnx.save(onnx_models.single_site(), tmp_path / "m.onnx")
    proc = run_pwgroup("rewrite", "m.onnx", "--quiet", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m.pwgroup.onnx").exists()


@pytest.mark.parametrize(
    "content,needle",
    [
        (b"", "empty"),
        (b"\x08\x07garbage\xff\xfe" * 50, "not a readable ONNX model"),
    ],
)
def test_cli_bad_onnx_files(tmp_path, content, needle):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    proc = run_pwgroup("rewrite", str(path), "-o", str(tmp_path / "o.onnx"))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and needle in proc.stderr
    assert not (tmp_path / "o.onnx").exists() and path.read_bytes() == content


def test_cli_refuses_escaping_external_data(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    path = _with_external_data(str(folder), "../outside.bin")
    proc = run_pwgroup("report", path)
    assert proc.returncode == 2 and "outside the model's folder" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_save_refuses_the_input_path_and_writes_atomically(tmp_path):
    path = str(tmp_path / "m.onnx")
    model = onnx_models.single_site()
    onnx.save(model, path)
    new, _ = graphopt.rewrite(model)
    with pytest.raises(graphopt.GraphoptError, match="refusing to overwrite"):
        graphopt.save(new, path, source=path)
    graphopt.save(new, str(tmp_path / "o.onnx"))
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "o.onnx"]  # no temporary left behind
    np.testing.assert_equal(count_params(load_onnx(str(tmp_path / "o.onnx"))), count_params(new))


def test_large_models_are_saved_with_external_data(tmp_path, monkeypatch):
    from graphopt.backends import onnx_io

    monkeypatch.setattr(onnx_io, "_TWO_GB", 1000)  # treat this small model as a large one
    new, report = graphopt.rewrite(onnx_models.pytorch_style())
    path = str(tmp_path / "big.onnx")
    graphopt.save(new, path)
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]
    reloaded = load_onnx(path)
    assert count_params(reloaded) == report.totals.params_after


@pytest.mark.parametrize("how", ["absolute", "symlink"])
def test_cli_refuses_absolute_and_linked_external_data(tmp_path, how):
    if how == "absolute":
        path = _with_external_data(str(tmp_path), str(tmp_path / "abs" / "w.bin"))
    else:
        path = _with_external_data(str(tmp_path), "real.bin")
        os.symlink(tmp_path / "real.bin", tmp_path / "link.bin")
        model = onnx.load(path, load_external_data=False)
        for e in model.graph.initializer[0].external_data:
            if e.key == "location":
                e.value = "link.bin"
        onnx.save(model, path)
    before = file_bytes(path)
    proc = run_pwgroup("rewrite", path, "-o", str(tmp_path / "out.onnx"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "refused" in proc.stderr and file_bytes(path) == before
    assert not (tmp_path / "out.onnx").exists()


def test_cli_skip_slower_on_onnx_and_refused_on_keras(tmp_path, keras_fixtures):
    onnx.save(onnx_models.single_site(64, 64, spatial=16), tmp_path / "m.onnx")
    proc = run_pwgroup("report", "m.onnx", "--skip-slower", "--json", "r.json", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    proc = run_pwgroup("report", keras_fixtures["residual"], "--skip-slower")
    assert proc.returncode == 2 and "applies to ONNX models" in proc.stderr


def test_a_model_that_fails_shape_inference_is_refused_at_load(tmp_path):
    """Issue 9: such a model passed the structural check, then failed in verification as an
    "unexpected error". Here Conv's input has two dimensions (it needs at least three)."""
    model = onnx_models.single_site()
    model.graph.input[0].type.tensor_type.shape.dim.pop()
    model.graph.input[0].type.tensor_type.shape.dim.pop()
    onnx.checker.check_model(model)  # the structural check alone lets it through
    path = tmp_path / "bad_shapes.onnx"
    onnx.save(model, str(path))
    with pytest.raises(InputError, match="bad_shapes.onnx: not a valid ONNX model"):
        load_onnx(str(path))


def test_an_input_onnxruntime_cannot_load_is_the_input_s_fault(tmp_path, capsys):
    """A custom op passes onnx.checker but not onnxruntime: exit 2 naming the file, not a
    "rewritten model fails" bug report."""
    import cli

    model = onnx_models.single_site()
    model.graph.node.append(onnx.helper.make_node("MyOp", ["y"], ["z"], domain="com.example"))
    model.graph.output[0].name = "z"
    model.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    src, out = tmp_path / "custom.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(src))
    assert cli.main(["rewrite", str(src), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(src) in err[0] and "cannot load the input model" in err[0]
    assert not out.exists()


def test_large_model_path_end_to_end_without_touching_the_model(tmp_path, monkeypatch, capsys):
    """Issue 9: models over 2 GB. With the threshold lowered, a small model takes the path a
    large one does: checked from its file, shape inference without weights, verified in
    onnxruntime from a file, saved with external data one tensor at a time, and an in-memory
    model saved stays as it was (onnx.save_model moves a large model's data out of it)."""
    import cli
    from fixtures.onnx_models import write_large
    from graphopt.backends import onnx_io

    src = str(tmp_path / "in" / "big.onnx")
    os.makedirs(os.path.dirname(src))
    write_large(src, convs=3, channels=256)
    monkeypatch.setattr(onnx_io, "_TWO_GB", 1000)
    model = load_onnx(src)
    new, report = graphopt.rewrite(model)
    assert all(s.macs_before == 256 * 256 * 4 for s in report.sites)  # shapes were inferred
    before = new.SerializeToString()
    size = graphopt.save(new, str(tmp_path / "o.onnx"))
    assert new.SerializeToString() == before
    assert size == os.path.getsize(tmp_path / "o.onnx") + os.path.getsize(tmp_path / "o.onnx.data")
    out, json_path = str(tmp_path / "out.onnx"), tmp_path / "r.json"
    argv = ["rewrite", src, "-o", out, "--quiet", "--json", str(json_path)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert count_params(load_onnx(out)) == report.totals.params_after
    assert os.path.exists(out + ".data")
    totals = __import__("json").loads(json_path.read_text())["totals"]
    assert totals["file_size_before"] == os.path.getsize(src) + os.path.getsize(src + ".data")


@pytest.mark.slow
def test_a_model_over_2_gb_is_rewritten_checked_and_verified(tmp_path):
    """Nine 8192 -> 8192 pointwise convs, 2.4 GB in one external data file."""
    from fixtures.onnx_models import write_large

    src = str(tmp_path / "big.onnx")
    write_large(src)
    assert os.path.getsize(src + ".data") > 2**31
    out = str(tmp_path / "big.pwgroup.onnx")
    proc = run_pwgroup("rewrite", src, "-o", out, "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    report = __import__("json").loads((tmp_path / "r.json").read_text())
    assert report["totals"]["params_before"] == 9 * 8192 * 8192
    assert len(report["sites"]) == 9
    assert count_params(load_onnx(out)) == report["totals"]["params_after"]
    assert report["totals"]["file_size_before"] > 2**31  # the .data file counts
    assert report["totals"]["file_size_after"] < report["totals"]["file_size_before"] // 100
