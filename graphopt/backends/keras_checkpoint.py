"""Keras' `BackupAndRestore`, made safe against a kill at any instant (SIGKILL, power loss).

Keras 3.15's own overwrites `latest.weights.h5` in place and then `training_metadata.json` in
place: a kill in between leaves the weights of epoch N with the epoch count of N-1 (the resumed
run trains one epoch too many, silently), and a kill while either is written leaves a truncated
file (the resume stops with a JSON or HDF5 error). Here each epoch's weights go to their own
file, written under a temporary name and renamed; the metadata, renamed over the old in one
step, names that file and is the commit point; older weights are deleted only after it.
"""

from __future__ import annotations

import glob
import os

import keras

from graphopt.checkpoint import METADATA_FILE, damaged, read_metadata, write_json

PARTIAL = "partial.weights.h5"  # Keras saves weights only to names ending in .weights.h5


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """Checkpoints after every epoch; at the start of `fit`, restores the last one committed."""

    def __init__(self, backup_dir: str):
        super().__init__(backup_dir, save_freq="epoch", delete_checkpoint=False)

    def on_train_begin(self, logs=None):
        self._load_model()  # no fallback to Keras' .bkp files: a committed checkpoint is whole

    def _load_model(self):
        metadata = read_metadata(self.backup_dir)
        if metadata is None:
            return
        path = os.path.join(self.backup_dir, metadata["weights"])
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        try:
            self.model.load_weights(path)
        except (OSError, ValueError, KeyError) as exc:
            raise damaged(self.backup_dir, f"{metadata['weights']}: {exc}") from None
        self.model._initial_epoch = metadata["epoch"]

    def _save_model(self):
        folder = self.backup_dir
        os.makedirs(folder, exist_ok=True)
        name = f"epoch-{self._current_epoch}.weights.h5"
        partial = os.path.join(folder, PARTIAL)
        self.model.save_weights(partial, overwrite=True)
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial, os.path.join(folder, name))
        metadata = {"epoch": self._current_epoch, "batch": 0, "weights": name}
        write_json(os.path.join(folder, METADATA_FILE), metadata)
        for old in glob.glob(os.path.join(glob.escape(folder), "epoch-*.weights.h5")):
            if os.path.basename(old) != name:
                os.remove(old)
