"""graphopt.finetune / `pwgroup finetune`: distillation of the trained Fashion-MNIST CNN into its
rewrite, with tiny budgets (a few hundred images, 1-2 epochs) and thresholds that hold across
seeds; bad input; checkpoints and resuming; mirrored and multi-worker runs; ONNX export."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.conftest import REPO, file_bytes, run_pwgroup

TEACHER = os.path.join(REPO, "fixtures", "fmnist_mobilenet.keras")

pytestmark = pytest.mark.skipif(
    not os.path.exists(TEACHER), reason="fixtures/fmnist_mobilenet.keras is not there"
)


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    """The teacher, its paper-mode rewrite, 384 training images (labels in `y`), 256 test."""
    from fixtures import fashion_mnist

    fashion_mnist_ok = fashion_mnist.available()
    if not fashion_mnist_ok:
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    import graphopt

    folder = tmp_path_factory.mktemp("fmnist")
    teacher = graphopt.load(TEACHER)
    student, _ = graphopt.rewrite(teacher, mode="paper", seed=0)
    paths = {"teacher": TEACHER, "student": str(folder / "student.keras")}
    graphopt.save(student, paths["student"])
    x, y = fashion_mnist.load("train", limit=384)
    xt, yt = fashion_mnist.load("test", limit=256)
    for name, arrays in {
        "train": {"image": x, "y": y},
        "unlabelled": {"image": x},
        "test": {"image": xt, "y": yt},
        "bad_labels": {"image": x, "y": y + 5},
    }.items():
        paths[name] = str(folder / f"{name}.npz")
        np.savez(paths[name], **arrays)
    paths["folder"] = str(folder)
    return paths


def _finetune_args(fmnist, out, *extra):
    return (
        "finetune",
        fmnist["teacher"],
        fmnist["student"],
        "--data",
        fmnist["unlabelled"],
        "--validation-data",
        fmnist["test"],
        "-o",
        str(out),
        "--epochs",
        "2",
        "--batch-size",
        "64",
        *extra,
    )


# ---- pieces ----------------------------------------------------------------------------------


def test_reports_say_when_too_few_samples_were_held_out():
    from graphopt.quality import few_held_out

    assert few_held_out(1) == ["  only 1 held-out sample: these figures say little (30+ needed)"]
    assert "only 29 held-out samples" in few_held_out(29)[0]
    assert few_held_out(30) == []


def test_evaluate_agreement_accuracy_and_relative_error():
    from graphopt.finetune import evaluate

    teacher = np.eye(4, dtype=np.float32)[[0, 1, 2, 3]]
    student = np.eye(4, dtype=np.float32)[[0, 1, 2, 0]]
    values = np.ones((4, 3), np.float32)
    result = evaluate(
        [student, values * 1.1],
        [teacher, values],
        ["probabilities", "values"],
        labels=np.array([0, 1, 3, 3]),
        labelled=0,
    )
    assert result.agreement == pytest.approx(0.75)
    assert result.accuracy == pytest.approx(0.5)
    assert result.relative_error == pytest.approx(0.1, rel=1e-4)


def test_reestimated_batchnorm_statistics_are_the_average_of_batch_statistics():
    import keras

    from graphopt.backends.keras_distill import reestimate_batchnorm

    inp = keras.Input((3,))
    model = keras.Model(inp, keras.layers.BatchNormalization(momentum=0.99)(inp))
    rng = np.random.default_rng(0)
    batches = [rng.normal(5.0, 2.0, (50, 3)).astype(np.float32) for _ in range(4)]
    assert reestimate_batchnorm(model, batches) == 1
    bn = model.layers[-1]
    want_mean = np.mean([b.mean(0) for b in batches], axis=0)
    want_var = np.mean([b.var(0) for b in batches], axis=0)
    np.testing.assert_allclose(bn.moving_mean.numpy(), want_mean, rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), want_var, rtol=1e-4)
    assert bn.momentum == 0.99


def test_distillation_loss_is_zero_when_the_student_is_the_teacher():
    import keras

    from graphopt.backends.keras_distill import Distiller

    probs = keras.ops.softmax(np.random.default_rng(0).normal(size=(8, 5)).astype("float32"))
    loss = Distiller(None, None, ["probabilities"], 2.0, 0.0).compute_loss(
        y={"t0": probs}, y_pred=probs
    )
    assert float(loss) == pytest.approx(0.0, abs=1e-5)


def test_train_only_sites_trains_k_l_and_their_batchnorm(fmnist):
    import graphopt
    from graphopt.backends.keras_distill import copy_model, freeze_all_but_sites

    student = copy_model(graphopt.load(fmnist["student"]))
    freeze_all_but_sites(student)
    names = sorted(w.path.split("/")[0] for w in student.trainable_weights)
    assert names and all(n.endswith(("_k", "_l", "_bn", "_bn_l")) for n in names), names
    assert any(n.endswith("_bn_l") for n in names)
    assert not any(n.startswith(("stem", "scores")) for n in names)


# ---- bad input: one line naming the file, exit 2, nothing written ------------------------------


def test_library_refuses_a_student_with_other_outputs(fmnist):
    import keras

    import graphopt
    from graphopt.errors import InputError

    teacher = graphopt.load(fmnist["teacher"])
    other = keras.Model(teacher.inputs, teacher.layers[-2].output)  # pooled features, not scores
    with pytest.raises(InputError, match="outputs"):
        graphopt.finetune(teacher, other, fmnist["train"], teacher_name="t", student_name="s")


def test_library_refuses_a_student_that_is_not_a_rewrite(fmnist):
    import keras

    import graphopt
    from graphopt.errors import InputError

    teacher = graphopt.load(fmnist["teacher"])
    inp = keras.Input((32, 32, 3), name="image")
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(8, 3)(inp))
    stranger = keras.Model(inp, keras.layers.Dense(10, activation="softmax")(x))
    with pytest.raises(InputError, match="not a rewrite"):
        graphopt.finetune(teacher, stranger, fmnist["train"], student_name="stranger.keras")


def test_library_refuses_labels_that_do_not_match_the_output(fmnist):
    import graphopt
    from graphopt.errors import InputError

    teacher, student = graphopt.load(fmnist["teacher"]), graphopt.load(fmnist["student"])
    with pytest.raises(InputError, match="bad_labels.npz: labels range 5..14.*10 classes"):
        graphopt.finetune(teacher, student, fmnist["bad_labels"])


@pytest.mark.parametrize("case", ["unreadable", "swapped", "labels", "missing"])
def test_cli_bad_input_is_one_line_exit_2_nothing_written(fmnist, tmp_path, case):
    data = fmnist["unlabelled"]
    models = [fmnist["teacher"], fmnist["student"]]
    if case == "unreadable":
        data = str(tmp_path / "broken.npz")
        with open(data, "wb") as f:
            f.write(b"PK\x03\x04 not really a zip")
    elif case == "labels":
        data = fmnist["bad_labels"]
    elif case == "missing":
        data = str(tmp_path / "nothing.npz")
    else:
        import keras

        import graphopt

        teacher = graphopt.load(fmnist["teacher"])
        inp = keras.Input((32, 32, 3), name="image")
        x = keras.layers.GlobalAveragePooling2D()(inp)
        graphopt.save(keras.Model(inp, keras.layers.Dense(5)(x)), str(tmp_path / "five.keras"))
        del teacher
        models[1] = str(tmp_path / "five.keras")
    out = tmp_path / "out.keras"
    proc = run_pwgroup("finetune", *models, "--data", data, "-o", str(out))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pwgroup: "), proc.stderr
    named = {"unreadable": data, "labels": data, "missing": data, "swapped": models[1]}[case]
    assert named in lines[0]
    assert not out.exists()
    assert not os.path.exists(str(out) + ".checkpoint")


def _small_model(tmp_path, data_format: str, first: str = "conv"):
    """A small CNN (a 3x3 conv, a separable conv, or a 1x1 conv inside a nested model; then a
    1x1 conv), saved, with its paper-mode rewrite and 48 random samples: the teacher, the
    student, the report, the files."""
    import keras

    import graphopt

    shape = (32, 12, 12) if data_format == "channels_first" else (12, 12, 32)
    inp = keras.Input(shape, name="image")
    if first == "separable":
        x = keras.layers.SeparableConv2D(
            64, 3, padding="same", data_format=data_format, name="sep"
        )(inp)
    elif first == "nested":
        inner_in = keras.Input(shape)
        inner_out = keras.layers.Conv2D(64, 1, data_format=data_format, name="pw")(inner_in)
        x = keras.Model(inner_in, inner_out, name="inner")(inp)
    else:
        x = keras.layers.Conv2D(64, 3, padding="same", data_format=data_format)(inp)
    x = keras.layers.Conv2D(64, 1, activation="relu", data_format=data_format)(x)
    x = keras.layers.GlobalAveragePooling2D(data_format=data_format)(x)
    teacher = keras.Model(inp, keras.layers.Dense(4, activation="softmax")(x))
    student, report = graphopt.rewrite(teacher, mode="paper", seed=0)
    paths = {"teacher": str(tmp_path / "teacher.keras"), "student": str(tmp_path / "st.keras")}
    graphopt.save(teacher, paths["teacher"])
    graphopt.save(student, paths["student"])
    paths["data"] = str(tmp_path / "data.npz")
    x = np.random.default_rng(0).normal(size=(48, *shape)).astype("float32")
    np.savez(paths["data"], image=x)
    return teacher, student, report, paths


@pytest.mark.parametrize("first", ["separable", "nested"])
def test_rewrites_of_separable_convs_and_nested_models_are_rewrites_and_finetune(tmp_path, first):
    """The check that the student is a rewrite of the teacher refused every model with a
    separable conv (its site is split into a depthwise conv and K/L, and only layers whose
    class name starts with "Conv" were taken as sites) and every model with a site inside a
    nested model (the nested model itself, a layer with weights, differs in its rewrite)."""
    import graphopt
    from graphopt.finetune import check_pair

    teacher, student, report, paths = _small_model(tmp_path, "channels_last", first)
    site = {"separable": "sep", "nested": "inner/pw"}[first]
    assert site in [s.name for s in report.sites] and len(report.sites) == 2
    check_pair(teacher, student, "teacher.keras", "st.keras")
    tuned, result = graphopt.finetune(
        teacher, student, paths["data"], epochs=1, batch_size=16, verbose=0
    )
    assert result.after.agreement is not None and len(tuned.layers) == len(student.layers)


def test_data_the_models_cannot_run_on_is_refused_naming_the_data(tmp_path):
    """Token ids beyond an embedding's vocabulary pass the checks of names, shapes and dtypes;
    both models run on two samples first, so the failure is one line naming the data."""
    import keras

    import graphopt
    from graphopt.errors import InputError

    inp = keras.Input((40,), dtype="int32", name="ids")
    x = keras.layers.Embedding(100, 32)(inp)
    x = keras.layers.Conv1D(64, 1, activation="relu")(x)
    x = keras.layers.GlobalMaxPooling1D()(x)
    teacher = keras.Model(inp, keras.layers.Dense(6, activation="softmax")(x))
    student, _ = graphopt.rewrite(teacher, mode="paper")
    data = str(tmp_path / "ids.npz")
    np.savez(data, ids=np.full((32, 40), 500, "int32"))
    with pytest.raises(InputError, match=r"ids.npz: t.keras does not run on these samples: .*500"):
        graphopt.finetune(teacher, student, data, teacher_name="t.keras")


def _has_gpu() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def _channels_first_runs_here() -> bool:
    """TensorFlow's own CPU kernels refuse channels_first convolutions; with oneDNN (on by
    default on AVX-512 VNNI/AMX CPUs) they run, training included."""
    import keras

    inp = keras.Input((3, 8, 8))
    model = keras.Model(inp, keras.layers.Conv2D(4, 3, data_format="channels_first")(inp))
    try:
        model(np.zeros((1, 3, 8, 8), np.float32))
    except Exception:  # the runtime's refusal, whatever its class
        return False
    return True


@pytest.mark.parametrize("command", ["finetune", "calibrate"])
def test_channels_first_model_on_a_cpu_is_one_line_naming_it(tmp_path, command):
    """TensorFlow's CPU kernels run channels_last convolutions only: a channels_first model
    (trained on a GPU) cannot run on a CPU, not even forward. Calibrating or fine-tuning one
    said "unexpected error: UnimplementedError ... Graph execution error" (fine-tuning) or
    blamed the data with a piece of a traceback (calibration)."""
    if _has_gpu() or _channels_first_runs_here():
        pytest.skip("this machine runs channels_first layers (a GPU, or oneDNN on the CPU)")
    *_, paths = _small_model(tmp_path, "channels_first")
    out = tmp_path / "out.keras"
    if command == "finetune":
        args = ("finetune", paths["teacher"], paths["student"], "--data", paths["data"])
    else:
        args = ("rewrite", paths["teacher"], "--mode", "linear", "--calibrate", paths["data"])
    before = file_bytes(paths["teacher"]), file_bytes(paths["student"])
    proc = run_pwgroup(*args, "-o", str(out))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"pwgroup: {paths['teacher']}: TensorFlow cannot run"), lines[0]
    assert "channels_first" in lines[0] and "unexpected" not in lines[0]
    assert not out.exists() and not os.path.exists(str(out) + ".checkpoint")
    assert (file_bytes(paths["teacher"]), file_bytes(paths["student"])) == before


def test_a_runtime_error_in_one_line_is_its_own_words():
    from graphopt.errors import runtime_reason

    graph_error = (
        "Graph execution error:\n\nDetected at node conv2d_1/convolution defined at (most "
        'recent call last):\n  File "/x/trainer.py", line 587, in predict\n\n  File '
        '"/x/nn.py", line 812, in _conv\n\nThe Conv2D op currently only supports the NHWC '
        "tensor format on the CPU. The op was given the format: NCHW\n\t [[{{node "
        "conv2d_1/convolution}}]] [Op:__inference_one_step_on_data_346]"
    )
    assert runtime_reason(ValueError(graph_error)) == (
        "The Conv2D op currently only supports the NHWC tensor format on the CPU. The op was "
        "given the format: NCHW"
    )
    assert runtime_reason(ValueError("x" * 400 + "y" * 100)) == "..." + "x" * 197 + "y" * 100
    assert runtime_reason(ValueError("")) == "ValueError"


# ---- training runs ---------------------------------------------------------------------------


# batch 16: epochs of 24 steps, so that a signal sent on the first epoch's line arrives before
# the second epoch ends even when this process is slow to read that line
SMALL_BATCH = ("--batch-size", "16")
RESUME_TOLERANCE = 0.1
"""How far a resumed run's held-out accuracy may be from an uninterrupted run's (noise: the
shuffle restarts with the resumed run)."""


@pytest.fixture(scope="module")
def uninterrupted(fmnist, tmp_path_factory):
    """The run that interrupted runs must match: (its process, its JSON report, its output)."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    whole = folder / "whole.keras"
    proc = run_pwgroup(
        *_finetune_args(fmnist, whole, "--json", str(folder / "whole.json"), *SMALL_BATCH)
    )
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads((folder / "whole.json").read_text()), whole


def _assert_resumed_like(uninterrupted, resumed: dict) -> None:
    report = uninterrupted[1]
    assert resumed["resumed_at"] == 2
    assert [e["epoch"] for e in resumed["history"]] == [2]
    assert abs(resumed["after"]["accuracy"] - report["after"]["accuracy"]) < RESUME_TOLERANCE


@pytest.mark.slow
def test_cli_finetune_interrupted_resumes_and_matches_an_uninterrupted_run(
    fmnist, tmp_path, uninterrupted
):
    """Ctrl-C after epoch 1 leaves the checkpoint, with the options it was started with, and
    says how to resume; the same command then resumes at epoch 2 and ends where an
    uninterrupted run ends (within noise); the input models are never modified."""
    before = {k: file_bytes(fmnist[k]) for k in ("teacher", "student")}
    proc, report, whole = uninterrupted
    assert proc.stderr == ""
    assert "epoch 1/2" in proc.stdout and "epoch 2/2" in proc.stdout  # one line per epoch
    assert "say little" not in proc.stdout  # 256 held-out images
    assert report["after"]["agreement"] > report["before"]["agreement"] + 0.2
    assert report["teacher_cached"] and not report["labels"]
    assert [e["epoch"] for e in report["history"]] == [1, 2]
    assert not os.path.exists(str(whole) + ".checkpoint")

    out = tmp_path / "resumed.keras"
    args = _finetune_args(fmnist, out, "--json", str(tmp_path / "resumed.json"), *SMALL_BATCH)
    # SIGINT at its default in the child: a shell ignores it in background jobs (nohup, CI),
    # and a process that starts with it ignored never sees Ctrl-C
    run = subprocess.Popen(["pwgroup", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, preexec_fn=_default_sigint)  # fmt: skip
    for line in run.stdout:
        if line.startswith("epoch 1/2"):
            run.send_signal(signal.SIGINT)
            break
    _, err = run.communicate(timeout=300)
    assert run.returncode == 130, err
    assert "holds epoch 1 of 2: run the same command again to resume" in err
    assert os.path.exists(str(out) + ".checkpoint") and not out.exists()
    with open(os.path.join(str(out) + ".checkpoint", "pwgroup_options.json")) as f:
        options = json.load(f)
    assert (options["epochs"], options["batch_size"], options["train_only"]) == (2, 16, "all")
    assert options["data"]["samples"] == 384 and options["held_out"]["samples"] == 256

    proc = run_pwgroup(*args)
    assert proc.returncode == 0, proc.stderr
    assert "at epoch 2" in proc.stdout and "epoch 1/2" not in proc.stdout
    _assert_resumed_like(uninterrupted, json.loads((tmp_path / "resumed.json").read_text()))
    assert not os.path.exists(str(out) + ".checkpoint")
    assert {k: file_bytes(fmnist[k]) for k in before} == before

    import keras

    import graphopt

    model = keras.models.load_model(str(out))
    assert model.count_params() == graphopt.load(fmnist["student"]).count_params()


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _files(folder: str) -> dict[str, bytes]:
    return {name: file_bytes(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}


@pytest.mark.slow
def test_cli_finetune_killed_refuses_other_options_then_resumes_like_an_uninterrupted_run(
    fmnist, tmp_path, uninterrupted
):
    """SIGKILL once the first epoch's checkpoint is written: no output, nothing but the
    checkpoint left. The command with other options is refused (one line naming the folder and
    what differs, exit 2, nothing written); the same command resumes at epoch 2 and ends where
    an uninterrupted run ends (within noise); the input models are never modified."""
    inputs = {k: file_bytes(fmnist[k]) for k in ("teacher", "student")}
    out, report = tmp_path / "killed.keras", tmp_path / "killed.json"
    folder = str(out) + ".checkpoint"
    args = _finetune_args(fmnist, out, "--json", str(report), *SMALL_BATCH)
    run = subprocess.Popen(["pwgroup", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)  # fmt: skip
    for line in run.stdout:
        if line.startswith("epoch 1/2"):  # printed once the epoch's checkpoint is committed
            run.kill()
            break
    run.communicate(timeout=300)
    assert run.returncode == -signal.SIGKILL
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(folder)]  # no output, no temp file
    checkpoint = _files(folder)
    assert json.loads(checkpoint["training_metadata.json"])["epoch"] == 1

    for extra, differ in (
        (("--epochs", "3", "--lr", "0.001"), ("epochs 2, now 3", "lr 0.002, now 0.001")),
        (("--limit", "300"), ("training data: 384 samples, now 300",)),
    ):
        proc = run_pwgroup(*args, *extra)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"pwgroup: {folder}: "), proc.stderr
        assert all(d in lines[0] for d in differ), lines[0]
        assert "run with the same options" in lines[0] and f"delete {folder}" in lines[0]
        assert sorted(os.listdir(tmp_path)) == [os.path.basename(folder)]
        assert _files(folder) == checkpoint

    proc = run_pwgroup(*args)
    assert proc.returncode == 0, proc.stderr
    assert f"resuming from {folder} at epoch 2" in proc.stdout and "epoch 1/2" not in proc.stdout
    _assert_resumed_like(uninterrupted, json.loads(report.read_text()))
    assert out.exists() and not os.path.exists(folder)
    assert {k: file_bytes(fmnist[k]) for k in inputs} == inputs


@pytest.mark.slow
def test_train_only_sites_trains_nothing_else(fmnist):
    """One epoch with `sites`: every weight outside K, L and the BatchNormalization after them
    is bit-identical to the student's, BatchNormalization moving statistics included (finetune
    re-estimates the statistics only of the layers that train), and every site weight moved.
    With `all`, the other weights move too."""
    import graphopt
    from graphopt.backends.keras_distill import site_layers

    teacher, student = graphopt.load(fmnist["teacher"]), graphopt.load(fmnist["student"])
    start = {w.path: w.numpy() for w in student.weights}
    sites = {w.path for layer in site_layers(student) for w in layer.weights}
    assert sites and len(sites) < len(start)
    kernels = {p for p in start if p not in sites and p.endswith("kernel")}
    assert kernels
    for train_only in ("sites", "all"):
        model, result = graphopt.finetune(
            teacher, student, fmnist["unlabelled"], validation_data=fmnist["test"], epochs=1,
            batch_size=64, train_only=train_only, verbose=0,
        )  # fmt: skip
        assert result.train_only == train_only
        after = {w.path: w.numpy() for w in model.weights}
        assert after.keys() == start.keys()
        changed = {p for p in start if not np.array_equal(start[p], after[p])}
        if train_only == "sites":
            assert changed == sites, sorted(changed ^ sites)
        else:
            assert kernels <= changed, sorted(kernels - changed)
    for w in student.weights:  # the student given is never modified
        np.testing.assert_array_equal(w.numpy(), start[w.path])


_MIRRORED = textwrap.dedent(
    """
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import graphopt
    teacher, student = graphopt.load(sys.argv[1]), graphopt.load(sys.argv[2])
    out = {}
    for strategy in ("one", "mirrored"):
        _, result = graphopt.finetune(teacher, student, sys.argv[3], validation_data=sys.argv[4],
                                      epochs=2, batch_size=64, strategy=strategy, verbose=0)
        out[strategy] = result.to_dict()
    print(json.dumps(out))
    """
)


@pytest.mark.slow
def test_mirrored_on_two_logical_cpus_trains_as_one_device(fmnist):
    proc = subprocess.run(
        [sys.executable, "-c", _MIRRORED, fmnist["teacher"], fmnist["student"],
         fmnist["unlabelled"], fmnist["test"]],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    one, mirrored = out["one"], out["mirrored"]
    assert (one["replicas"], mirrored["replicas"]) == (1, 2)
    assert mirrored["strategy"] == "mirrored"
    assert [e["steps"] for e in one["history"]] == [e["steps"] for e in mirrored["history"]]
    assert mirrored["after"]["agreement"] > mirrored["before"]["agreement"] + 0.2
    assert abs(mirrored["after"]["accuracy"] - one["after"]["accuracy"]) < 0.1


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_two_worker_processes_train_together_and_only_the_chief_writes(fmnist, tmp_path):
    workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    out = tmp_path / "out.keras"
    procs = []
    for index in range(2):
        env = dict(os.environ)
        env["TF_CONFIG"] = json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        )
        procs.append(
            subprocess.Popen(
                ["pwgroup", *_finetune_args(fmnist, out, "--strategy", "multiworker",
                                            "--json", str(tmp_path / f"w{index}.json"))],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                cwd=str(tmp_path),
            )
        )  # fmt: skip
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr[-3000:]
    for index, (stdout, _) in enumerate(results):
        steps = [
            int(line.rsplit("(", 1)[1].split()[0])
            for line in stdout.splitlines()
            if line.startswith(f"worker {index + 1}/2: epoch")
        ]
        assert len(steps) == 2 and all(s > 0 for s in steps), stdout  # both workers stepped
    assert out.exists()
    assert (tmp_path / "w0.json").exists() and not (tmp_path / "w1.json").exists()
    assert "wrote" in results[0][0] and "wrote" not in results[1][0]
    report = json.loads((tmp_path / "w0.json").read_text())
    assert (report["strategy"], report["workers"], report["replicas"]) == ("multiworker", 2, 2)
    assert report["after"]["agreement"] > report["before"]["agreement"] + 0.2
    assert not list(tmp_path.glob("out.keras.checkpoint*"))


@pytest.mark.slow
def test_finetuned_then_exported_keeps_its_accuracy_in_onnxruntime(fmnist, monkeypatch):
    """With labels, and with the teacher run on each batch instead of cached."""
    import onnxruntime as ort

    import graphopt

    monkeypatch.setattr(sys.modules["graphopt.finetune"], "TEACHER_CACHE_BYTES", 0)

    teacher, student = graphopt.load(fmnist["teacher"]), graphopt.load(fmnist["student"])
    model, result = graphopt.finetune(
        teacher, student, fmnist["train"], validation_data=fmnist["test"], epochs=2,
        batch_size=64, verbose=0,
    )  # fmt: skip
    assert result.labels and not result.teacher_cached
    assert result.after.accuracy > result.before.accuracy + 0.2
    proto = graphopt.export_onnx(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    with np.load(fmnist["test"]) as test:
        x, y = test["image"], test["y"]
    scores = session.run(None, {session.get_inputs()[0].name: x})[0]
    onnx_accuracy = float(np.mean(scores.argmax(-1) == y))
    assert onnx_accuracy == pytest.approx(result.after.accuracy, abs=0.01)
    keras_scores = model.predict(x, verbose=0)
    np.testing.assert_allclose(scores, keras_scores, atol=1e-3)


def test_a_student_without_sites_is_refused(fmnist):
    """A copy of the original "tuned" from 100% to 47% agreement and was written."""
    import graphopt
    from graphopt.errors import InputError

    teacher = graphopt.load(fmnist["teacher"])
    copy = graphopt.load(fmnist["teacher"])
    with pytest.raises(InputError, match="copy.keras: no site of it was rewritten"):
        graphopt.finetune(teacher, copy, fmnist["train"], student_name="copy.keras")


def test_statistics_are_estimated_again_only_where_weights_changed(fmnist):
    """With a learning rate too small to change a weight, nothing is re-estimated and the
    student comes back as it was (every BatchNormalization's statistics used to be estimated
    again, and agreement fell 21.6% -> 14.7%); with a real one, the statistics of trainable
    BatchNormalizations downstream of the first change are, and no others."""
    import keras

    import graphopt
    from graphopt.backends.keras_distill import all_layers

    teacher, student = graphopt.load(fmnist["teacher"]), graphopt.load(fmnist["student"])
    common = dict(validation_data=fmnist["test"], epochs=1, batch_size=64, verbose=0)
    start = {w.path: w.numpy() for w in student.weights}

    def moving(model):
        return {
            w.path: w.numpy()
            for layer in all_layers(model)
            if isinstance(layer, keras.layers.BatchNormalization)
            for w in layer.non_trainable_weights
        }

    still, result = graphopt.finetune(
        teacher, student, fmnist["unlabelled"], lr=1e-12, train_only="sites", **common
    )
    assert result.bn_reestimated == 0
    for path, value in moving(still).items():
        np.testing.assert_allclose(value, start[path], rtol=1e-6, atol=1e-7)
    assert result.after.agreement == pytest.approx(result.before.agreement, abs=1e-9)
    moved, result = graphopt.finetune(
        teacher, student, fmnist["unlabelled"], train_only="sites", **common
    )
    assert result.bn_reestimated > 0
    changed = {p for p, v in moving(moved).items() if not np.allclose(v, start[p])}
    trained = {
        w.path
        for layer in all_layers(moved)
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
        for w in layer.non_trainable_weights
    }
    assert changed and changed <= trained
    off, result = graphopt.finetune(
        teacher, student, fmnist["unlabelled"], train_only="sites", bn_reestimate=False, **common
    )
    assert result.bn_reestimated == 0


def test_a_run_that_makes_the_student_worse_keeps_its_weights(fmnist, monkeypatch):
    """When the closing figure is worse than the starting one, the starting weights are kept
    and the report says so plainly."""
    import importlib

    import graphopt

    ft = importlib.import_module("graphopt.finetune")
    worse = ft._worse
    monkeypatch.setattr(ft, "_worse", lambda after, before: True)
    teacher, student = graphopt.load(fmnist["teacher"]), graphopt.load(fmnist["student"])
    model, result = graphopt.finetune(
        teacher, student, fmnist["unlabelled"], validation_data=fmnist["test"], epochs=1,
        batch_size=64, verbose=0,
    )  # fmt: skip
    assert result.kept_start and "the starting weights are kept" in result.to_text()
    for a, b in zip(model.get_weights(), student.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert worse(ft.Evaluation(agreement=0.4), ft.Evaluation(agreement=0.5))
    assert not worse(ft.Evaluation(0.4, accuracy=0.9), ft.Evaluation(0.5, accuracy=0.8))
    assert worse(ft.Evaluation(relative_error=0.3), ft.Evaluation(relative_error=0.2))
