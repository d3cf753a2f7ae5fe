"""A fine-tuning checkpoint folder records the options its run was started with, so that a run
started again resumes it only when it is the same run (otherwise it would silently mix two).

The options are plain values, except three identities, compared by content, not by name:
- the teacher and the student: a digest of all their weight arrays (shapes, dtypes, bytes);
- the training and the held-out data, as loaded (after `--limit`, the split, preprocessing):
  the number of samples, each input's shape and dtype, the bytes of up to `DIGEST_SAMPLES`
  samples spread evenly over them, and all labels. Files and in-memory arrays are treated
  alike, a moved or copied file is the same data, and reading the data once more costs little.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from graphopt.atomic import replacing
from graphopt.data import Samples
from graphopt.errors import InputError, UsageError

OPTIONS_FILE = "pwgroup_options.json"
METADATA_FILE = "training_metadata.json"  # Keras' BackupAndRestore: the epochs done
DIGEST_SAMPLES = 64
LABELS = {
    "epochs": "epochs",
    "batch_size": "batch size",
    "lr": "lr",
    "temperature": "temperature",
    "alpha": "alpha",
    "train_only": "train only",
    "strategy": "strategy",
    "replicas": "replicas",
    "workers": "workers",
    "seed": "seed",
    "teacher": "teacher",
    "student": "student",
    "data": "training data",
    "held_out": "held-out data",
}
"""Every option recorded, in the order a refusal names them, with the words it uses."""


def digest_weights(arrays) -> str:
    """Identity of a model's weights: every array's shape, dtype and bytes, in order."""
    h = hashlib.blake2b(digest_size=16)
    for array in arrays:
        array = np.ascontiguousarray(array)
        h.update(f"{array.shape}{array.dtype.str}".encode())
        h.update(array.tobytes())
    return h.hexdigest()


def digest_samples(samples: Samples) -> dict:
    """Identity of loaded samples: their number and a digest of an even spread of them."""
    n = len(samples)
    rows = np.unique(np.linspace(0, n - 1, min(n, DIGEST_SAMPLES)).astype(np.int64))
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(samples.inputs):
        array = np.asarray(samples.inputs[name])
        h.update(f"{name}{array.shape}{array.dtype.str}".encode())
        h.update(np.ascontiguousarray(array[rows]).tobytes())
    if samples.labels is not None:
        h.update(np.ascontiguousarray(np.asarray(samples.labels)).tobytes())
    return {"samples": n, "digest": h.hexdigest()}


def resume_epoch(folder: str) -> int | None:
    """The number of epochs a checkpoint folder holds (None when there is none or it is
    damaged)."""
    try:
        metadata = read_metadata(folder)
    except InputError:
        return None
    return (metadata["epoch"] or None) if metadata else None


def read_metadata(folder: str) -> dict | None:
    """The committed checkpoint, {"epoch", "weights"} (the weights' file name in `folder`);
    None when there is none."""
    path = os.path.join(folder, METADATA_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            metadata = json.load(f)
        epoch, weights = int(metadata["epoch"]), str(metadata["weights"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise damaged(folder, f"{METADATA_FILE}: {exc}") from None
    if os.path.basename(weights) != weights:
        raise damaged(folder, f"{METADATA_FILE} names {weights!r}")
    return {"epoch": epoch, "weights": weights}


def damaged(folder: str, why: str) -> InputError:
    """The one-line error for a checkpoint that cannot be resumed."""
    first = (why.strip().splitlines() or [""])[0]
    return InputError(f"{folder}: its checkpoint cannot be read ({first}); {_afresh(folder)}")


def check(folder: str, options: dict) -> int | None:
    """Refuse (UsageError, one line) to resume a checkpoint made with other `options`; compare
    only the keys given, so that cheap options can be checked before the data are loaded.
    Return the number of epochs the checkpoint holds (None when there is none to resume)."""
    metadata = read_metadata(folder)
    done = metadata["epoch"] if metadata else None
    if not done:
        return None
    recorded = _read(folder)
    if recorded is None:
        raise UsageError(
            f"{folder}: holds a checkpoint (epoch {done}) that does not record the options it "
            f"was made with; {_afresh(folder)}"
        )
    differ = [
        _difference(key, recorded.get(key), value)
        for key, value in options.items()
        if recorded.get(key) != value
    ]
    if differ:
        raise UsageError(
            f"{folder}: holds a checkpoint (epoch {done}) of a run with other options "
            f"({'; '.join(differ)}): run with the same options to resume it, or "
            f"{_afresh(folder)}"
        )
    return done


def record(folder: str, options: dict) -> None:
    """Write `options` into the folder atomically (a kill leaves the old file or the new)."""
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, OPTIONS_FILE), {"schema_version": 1, **options})


def write_json(path: str, data: dict) -> None:
    """Written to a temporary file, flushed to disk, then renamed over `path`."""
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)


def _read(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, OPTIONS_FILE), encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise InputError(
            f"{folder}: its {OPTIONS_FILE} cannot be read ({exc}); {_afresh(folder)}"
        ) from None
    return data if isinstance(data, dict) else None


def _afresh(folder: str) -> str:
    """How every refusal ends: the two ways to start again from nothing."""
    return f"delete {folder} or choose another checkpoint folder (--checkpoint-dir) to start afresh"


def _difference(key: str, old, new) -> str:
    label = LABELS.get(key, key)
    if key in ("teacher", "student"):
        return f"{label}: other weights"
    if isinstance(new, dict) and isinstance(old, dict):
        if old.get("samples") != new.get("samples"):
            return f"{label}: {old.get('samples')} samples, now {new.get('samples')}"
        return f"{label}: other samples"
    return f"{label} {_text(old)}, now {_text(new)}"


def _text(value) -> str:
    return "unset" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
