"""graphopt.checkpoint (the options a fine-tuning checkpoint records, what makes two runs the
same) and backends/keras_checkpoint (a checkpoint that a kill at any instant leaves whole)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from graphopt import checkpoint
from graphopt.data import Samples
from graphopt.errors import InputError, UsageError

OPTIONS = {"epochs": 2, "batch_size": 64, "lr": 0.002, "train_only": "all", "student": "ab12"}


def _committed(folder, options=OPTIONS, epoch: int = 1) -> None:
    """A folder as a run leaves it after `epoch` epochs (without weights: not needed here)."""
    checkpoint.record(str(folder), options)
    metadata = {"epoch": epoch, "batch": 0, "weights": f"epoch-{epoch}.weights.h5"}
    checkpoint.write_json(str(folder / checkpoint.METADATA_FILE), metadata)


def test_same_options_resume_at_the_epoch_the_checkpoint_holds(tmp_path):
    _committed(tmp_path, epoch=1)
    assert checkpoint.check(str(tmp_path), dict(OPTIONS)) == 1
    assert checkpoint.check(str(tmp_path), {"epochs": 2}) == 1  # a subset: checked early


def test_other_options_are_refused_in_one_line_naming_the_folder_and_each_option(tmp_path):
    _committed(tmp_path)
    other = {**OPTIONS, "epochs": 3, "lr": 0.001, "student": "cd34"}
    with pytest.raises(UsageError) as caught:
        checkpoint.check(str(tmp_path), other)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{tmp_path}: ")
    assert "epochs 2, now 3" in message and "lr 0.002, now 0.001" in message
    assert "student: other weights" in message and "batch size" not in message
    assert "run with the same options" in message and f"delete {tmp_path}" in message


def test_no_checkpoint_or_no_finished_epoch_is_nothing_to_compare(tmp_path):
    assert checkpoint.check(str(tmp_path / "absent"), OPTIONS) is None
    checkpoint.record(str(tmp_path), OPTIONS)  # killed during the first epoch
    assert checkpoint.check(str(tmp_path), {**OPTIONS, "epochs": 9}) is None


def test_a_checkpoint_without_options_is_refused(tmp_path):
    metadata = {"epoch": 1, "batch": 0, "weights": "epoch-1.weights.h5"}
    checkpoint.write_json(str(tmp_path / checkpoint.METADATA_FILE), metadata)
    with pytest.raises(UsageError, match="does not record the options"):
        checkpoint.check(str(tmp_path), OPTIONS)


def test_damaged_metadata_is_one_line_not_a_traceback(tmp_path):
    (tmp_path / checkpoint.METADATA_FILE).write_text('{"epoch": 1, "wei')
    with pytest.raises(InputError, match="its checkpoint cannot be read"):
        checkpoint.check(str(tmp_path), OPTIONS)
    assert checkpoint.resume_epoch(str(tmp_path)) is None


def test_data_identity_is_content_not_name():
    rng = np.random.default_rng(0)
    x = rng.random((100, 4, 4, 1), dtype=np.float32)
    same = checkpoint.digest_samples(Samples({"image": x.copy()}, source="elsewhere.npz"))
    assert checkpoint.digest_samples(Samples({"image": x}, source="a.npz")) == same
    assert checkpoint.digest_samples(Samples({"image": x[:90]}))["samples"] == 90
    changed = x.copy()
    changed[99] += 1  # the last sample is always among those digested
    assert checkpoint.digest_samples(Samples({"image": changed}))["digest"] != same["digest"]
    labelled = Samples({"image": x}, labels=np.arange(100) % 3)
    assert checkpoint.digest_samples(labelled)["digest"] != same["digest"]


# ---- a kill at any instant of a checkpoint's writing ---------------------------------------


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (no `except Exception` catches it)."""


def _tiny():
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


def _kill_on_call(monkeypatch, model, k: int) -> list[str]:
    """Kill the k-th file operation of a save (1-based); a kill in save_weights leaves half a
    file. Returns the operations seen."""
    seen: list[str] = []

    def wrap(name, fn, truncate=False):
        def op(*args, **kwargs):
            seen.append(name)
            if len(seen) == k:
                if truncate:
                    fn(*args, **kwargs)
                    path = args[0] if args else kwargs["filepath"]
                    os.truncate(path, os.path.getsize(path) // 2)
                raise _Killed
            return fn(*args, **kwargs)

        return op

    monkeypatch.setattr(model, "save_weights", wrap("save_weights", model.save_weights, True))
    for name in ("replace", "remove", "fsync"):
        monkeypatch.setattr(os, name, wrap(name, getattr(os, name)))
    return seen


def _save_twice(folder, kill_at: int | None) -> tuple[dict, list[str]]:
    """Checkpoint epoch 1, then epoch 2 (other weights) killed at operation `kill_at`; return
    each epoch's weights and the operations the second save reached."""
    from graphopt.backends.keras_checkpoint import AtomicBackupAndRestore

    model = _tiny()
    saver = AtomicBackupAndRestore(str(folder))
    saver.set_model(model)
    saver.on_epoch_end(0)
    weights = {1: model.get_weights()}
    model.set_weights([w + 1.0 for w in weights[1]])
    weights[2] = model.get_weights()
    with pytest.MonkeyPatch.context() as patch:
        seen = _kill_on_call(patch, model, kill_at or 0)
        try:
            saver.on_epoch_end(1)
        except _Killed:
            pass
    return weights, seen


def test_a_kill_anywhere_in_a_save_leaves_the_previous_checkpoint_or_the_new(tmp_path):
    """Every file operation of the epoch-2 save is interrupted in turn: the restore finds epoch 1
    with epoch 1's weights or epoch 2 with epoch 2's, never a mix, a crash or a traceback."""
    from graphopt.backends.keras_checkpoint import AtomicBackupAndRestore

    _, operations = _save_twice(tmp_path / "whole", None)
    assert "save_weights" in operations and "replace" in operations
    assert sorted(os.listdir(tmp_path / "whole")) == [
        "epoch-2.weights.h5",
        checkpoint.METADATA_FILE,
    ]
    restored = []
    for k in range(1, len(operations) + 1):
        folder = tmp_path / f"kill-{k}"
        weights, _ = _save_twice(folder, k)
        fresh = _tiny()
        restorer = AtomicBackupAndRestore(str(folder))
        restorer.set_model(fresh)
        restorer.on_train_begin()
        epoch = fresh._initial_epoch
        assert epoch in (1, 2), (k, operations[k - 1])
        for got, want in zip(fresh.get_weights(), weights[epoch]):
            np.testing.assert_array_equal(got, want)
        assert checkpoint.resume_epoch(str(folder)) == epoch
        restored.append(epoch)
    assert restored[0] == 1 and restored[-1] == 2, (operations, restored)


def test_a_damaged_committed_checkpoint_is_one_line(tmp_path):
    from graphopt.backends.keras_checkpoint import AtomicBackupAndRestore

    model = _tiny()
    saver = AtomicBackupAndRestore(str(tmp_path))
    saver.set_model(model)
    saver.on_epoch_end(0)
    path = tmp_path / "epoch-1.weights.h5"
    os.truncate(path, os.path.getsize(path) // 2)  # a disk fault: not something a kill does
    restorer = AtomicBackupAndRestore(str(tmp_path))
    restorer.set_model(_tiny())
    with pytest.raises(InputError) as caught:
        restorer.on_train_begin()
    assert "\n" not in str(caught.value) and "epoch-1.weights.h5" in str(caught.value)
    assert json.loads((tmp_path / checkpoint.METADATA_FILE).read_text())["epoch"] == 1
