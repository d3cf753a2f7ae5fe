"""Loading Keras models safely (files and keras.applications names) and saving them atomically."""

from __future__ import annotations

import contextlib
import json
import zipfile

from graphopt.errors import InputError, UnsafeModelError, UnsupportedModelError, UsageError

APPLICATIONS_PREFIX = "keras.applications:"
_TRUSTED_MODULE_PREFIXES = ("keras", "graphopt")
_UNSAFE_CLASSES = {"Lambda", "TFSMLayer"}


def is_application_name(source: str) -> bool:
    return source.startswith(APPLICATIONS_PREFIX)


def build_application(source: str, classes: int | None = None, input_shape=None):
    """`keras.applications:EfficientNetB0` -> that model with weights=None (nothing downloaded)."""
    import keras

    name = source[len(APPLICATIONS_PREFIX) :]
    factory = getattr(keras.applications, name, None)
    if not name or not name[0].isupper() or not callable(factory):
        raise InputError(f"{source}: keras.applications has no model named '{name}'")
    kwargs = {"weights": None}
    if classes is not None:
        kwargs["classes"] = classes
    if input_shape is not None:
        kwargs["input_shape"] = tuple(input_shape)
    try:
        return factory(**kwargs)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{source}: {_first_line(exc)}") from exc


def check_config_safe(config, source: str) -> None:
    """Refuse a model config that would run code: Lambda, TFSMLayer, or foreign modules."""
    for node in _walk(config):
        cls = node.get("class_name")
        module = node.get("module") or ""
        registered = node.get("registered_name") or ""
        if cls in _UNSAFE_CLASSES:
            raise UnsafeModelError(
                f"{source}: contains a {cls} layer ('{_layer_name(node)}'), which runs arbitrary "
                "code when loaded; pass --trust-model if you trust this file"
            )
        if module and module.split(".")[0] not in _TRUSTED_MODULE_PREFIXES:
            raise UnsafeModelError(
                f"{source}: refers to '{module}.{registered or cls}', a class outside keras and "
                "graphopt; pass --trust-model if you trust this file"
            )
        if cls == "function" or (registered and "__lambda__" in registered):
            raise UnsafeModelError(
                f"{source}: contains a serialised Python function; pass --trust-model if you "
                "trust this file"
            )


def _walk(obj):
    if isinstance(obj, dict):
        if "class_name" in obj:
            yield obj
        for v in obj.values():
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)


def _layer_name(node) -> str:
    config = node.get("config")
    return config.get("name", "?") if isinstance(config, dict) else "?"


def _read_config(path: str) -> dict:
    """The model config of a .keras archive or a legacy .h5 file, read without building it."""
    try:
        if path.endswith(".keras"):
            with zipfile.ZipFile(path) as archive:
                return json.loads(archive.read("config.json"))
        import h5py

        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
            if raw is None:
                raise InputError(
                    f"{path}: the HDF5 file holds no Keras model config "
                    "(weights-only files cannot be rewritten)"
                )
            return json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    except (zipfile.BadZipFile, KeyError, OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable Keras model ({_first_line(exc)})") from exc


def load_keras_file(path: str, trust_model: bool = False):
    """Load a .keras or .h5 file with safe_mode on, after checking its config for code."""
    if not trust_model:
        check_config_safe(_read_config(path), path)
    else:
        _read_config(path)
    import keras

    import graphopt.backends.keras_layers  # noqa: F401  (registers our layers)

    try:
        return keras.models.load_model(path, compile=False, safe_mode=not trust_model)
    except Exception as exc:  # Keras raises many types for a bad file; all mean "cannot load"
        raise InputError(f"{path}: Keras could not load it ({_first_line(exc)})") from exc


def save_keras(model, path: str) -> None:
    """Write `model` to `path` atomically: a temporary .keras file beside it, then a rename."""
    from graphopt.atomic import replacing

    with replacing(path, suffix=".tmp.keras") as tmp:
        model.save(tmp)


def cpu_layout_limit(exc: BaseException) -> str | None:
    """Why TensorFlow could not run a model, where the cause is this machine's kernels rather
    than the model or the data: TensorFlow's CPU kernels of Conv2D, pooling and others take
    channels-last (NHWC) tensors only, so a channels_first Keras model (trained on a GPU) does
    not run on a CPU, not even its forward pass ("The Conv2D op currently only supports the
    NHWC tensor format on the CPU. The op was given the format: NCHW")."""
    text = str(exc)
    if "NHWC" in text and "CPU" in text:
        return (
            "TensorFlow cannot run this model's channels_first layers on a CPU (its CPU "
            "kernels take channels_last tensors only): run it where a GPU is, or save it "
            "with data_format='channels_last'"
        )
    return None


@contextlib.contextmanager
def cpu_layouts(name: str | None = None):
    """Running a model inside: TensorFlow's refusal of a channels_first layer on CPU becomes an
    UnsupportedModelError naming the model (see cpu_layout_limit); other errors pass."""
    try:
        yield
    except Exception as exc:
        reason = cpu_layout_limit(exc)
        if reason is None:
            raise
        raise UnsupportedModelError(f"{name}: {reason}" if name else reason) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def input_specs(model) -> list:
    """The model's inputs as data.InputSpec (names are those `predict` takes in a dict)."""
    import numpy as np

    from graphopt.data import InputSpec

    return [
        InputSpec(t.name, (None, *tuple(t.shape)[1:]), np.dtype(t.dtype).name) for t in model.inputs
    ]
