"""Which onnxruntime is installed. onnxruntime and onnxruntime-gpu both install the module
`onnxruntime` and overwrite each other's files, so pwgroup depends on neither: the `cpu` extra
brings one, the `gpu` extra the other. This module finds the one that is there and says, in one
line, what to do when there is none or both."""

from __future__ import annotations

import importlib.util
from importlib import metadata

from graphopt.errors import GraphoptError

CPU_DIST, GPU_DIST = "onnxruntime", "onnxruntime-gpu"
INSTALL_HINT = "pip install 'pwgroup[cpu]' (or 'pwgroup[gpu]' on a CUDA machine)"


class MissingRuntimeError(GraphoptError):
    """onnxruntime is needed (to check or time a rewritten ONNX model) and is not installed."""


def installed_distributions() -> list[str]:
    """The onnxruntime distributions installed, of the two pwgroup knows."""
    found = []
    for dist in (CPU_DIST, GPU_DIST):
        try:
            metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        found.append(dist)
    return found


def conflict() -> str | None:
    """A one-line warning when both distributions are installed, else None."""
    if len(installed_distributions()) < 2:
        return None
    return (
        f"both {CPU_DIST} and {GPU_DIST} are installed and overwrite each other's files; "
        f"keep one: pip uninstall -y {CPU_DIST} {GPU_DIST} && pip install 'pwgroup[gpu]'"
    )


def onnxruntime(purpose: str):
    """The onnxruntime module, or MissingRuntimeError saying how to get it; `purpose` says
    what it was needed for (e.g. "to check the rewritten model")."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise MissingRuntimeError(
            f"onnxruntime is not installed; it is needed {purpose}: {INSTALL_HINT}"
        ) from exc
    return ort


KERAS_HINT = "pip install 'pwgroup[keras]' (TensorFlow and Keras)"


class MissingKerasError(GraphoptError):
    """Keras (with TensorFlow) is needed for a Keras model and is not installed."""


def has_keras() -> bool:
    """Whether Keras and TensorFlow are installed (without importing them)."""
    return all(importlib.util.find_spec(m) is not None for m in ("keras", "tensorflow"))


def require_keras(why: str) -> None:
    """MissingKerasError naming what needs Keras and how to install it, when it is not there."""
    if not has_keras():
        raise MissingKerasError(f"{why} needs Keras and TensorFlow: {KERAS_HINT}")
