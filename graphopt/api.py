"""The public face: rewrite(), load(), save(); dispatches to the backend that fits the model."""

from __future__ import annotations

import functools
import math
import os

from graphopt.errors import InputError, OutputError, UsageError
from graphopt.plan import DEFAULT_MIN_CHANNELS_PER_GROUP, FIT, INITS, LINEAR, MODES, Selection
from graphopt.report import Report, Totals


def _is_keras(model) -> bool:
    try:
        import keras
    except ImportError:  # pragma: no cover - keras is a dependency
        return False
    return isinstance(model, keras.Model)


def _is_onnx(model) -> bool:
    return type(model).__name__ == "ModelProto" and type(model).__module__.startswith("onnx")


def rewrite(
    model,
    mode: str = "paper",
    min_channels_per_group: int = DEFAULT_MIN_CHANNELS_PER_GROUP,
    seed: int = 0,
    name: str | None = None,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    keep_last: int = 0,
    skip_slower: bool = False,
    fold_slower: bool = False,
    init: str = "scratch",
    provider: str = "CPUExecutionProvider",
    dense_sequences: bool = False,
    factory=None,
):
    """Replace the pointwise convs of a Keras model or onnx.ModelProto; return (new, report).

    `include`/`exclude` are globs on site names; `keep_last` leaves the last N sites as they
    are. ONNX only, both time each site in onnxruntime against its dense conv: `skip_slower`
    leaves a site whose replacement runs slower as it was; `fold_slower` keeps such a site's
    grouped weights but has it run as one dense conv that onnxruntime computes from them at
    load (the parameter cut stays, the speed is the original's), or leaves it as it was when
    its branches are not linear. Every site left alone is listed in `report.skipped` with the
    reason; a folded one has `runs_folded`. `init` is "scratch" (fresh weights, the paper) or
    "fit" (linear mode: K and L fitted to the original kernel, relative error per site in
    `fit_error`). `provider` is the onnxruntime execution provider the sites are timed on.

    Sites are 1x1 convolutions, the pointwise half of separable convolutions, and Dense layers
    (ONNX: MatMul/Gemm with a 2-D weight) on the channel axis of rank-4/5 feature maps; with
    `dense_sequences` also those on rank-3 inputs (sequences, transformer MLPs).

    A subclassed keras.Model (hand-written `call`) is copied (its get_config/from_config, or
    `factory()` when given) and each pointwise conv layer object it tracks is swapped for a
    layer computing the site; see README, "Subclassed Keras models".
    """
    if mode not in MODES:
        raise UsageError(f"mode must be one of {', '.join(MODES)}, not '{mode}'")
    if not isinstance(min_channels_per_group, int) or min_channels_per_group < 1:
        raise UsageError("min_channels_per_group must be a positive integer")
    if not isinstance(keep_last, int) or keep_last < 0:
        raise UsageError("keep_last must be a non-negative integer")
    if init not in INITS:
        raise UsageError(f"init must be one of {', '.join(INITS)}, not '{init}'")
    if init == FIT and mode != LINEAR:
        raise UsageError(
            "init 'fit' needs linear mode: in paper mode BN and activation sit inside the branches"
        )
    if skip_slower and fold_slower:
        raise UsageError("choose one of skip_slower and fold_slower")
    if _is_keras(model):
        if skip_slower or fold_slower:
            flag = "skip_slower" if skip_slower else "fold_slower"
            raise UsageError(f"{flag} times sites in onnxruntime: it applies to ONNX models")
        backend = functools.partial(
            _rewrite_keras, init=init, dense_sequences=dense_sequences, factory=factory
        )
        planner = functools.partial(_rewrite_keras, dense_sequences=dense_sequences)
    elif _is_onnx(model):
        from graphopt.backends.onnx_rewrite import rewrite_onnx

        backend = functools.partial(
            rewrite_onnx,
            skip_slower=skip_slower,
            fold_slower=fold_slower,
            init=init,
            provider=provider,
            dense_sequences=dense_sequences,
        )
        # the sites and their order, without timing them
        planner = functools.partial(rewrite_onnx, dense_sequences=dense_sequences)
    else:
        raise UsageError(
            f"cannot rewrite a {type(model).__name__}: give a keras.Model or an onnx.ModelProto"
        )
    selection = Selection(tuple(include), tuple(exclude))
    if keep_last:
        _, first = planner(model, mode, min_channels_per_group, seed, name, selection)
        kept = frozenset(s.name for s in first.sites[-keep_last:])
        selection = Selection(tuple(include), tuple(exclude), keep_last, kept)
    return backend(model, mode, min_channels_per_group, seed, name, selection)


def keras_counts(model) -> tuple[int, int]:
    """(all, trainable) parameters, as Keras counts them."""
    trainable = sum(math.prod(w.shape) for w in model.trainable_weights)
    return int(model.count_params()), int(trainable)


def _rewrite_keras(
    model,
    mode,
    min_channels_per_group,
    seed,
    name,
    selection,
    init="scratch",
    dense_sequences=False,
    factory=None,
):
    from graphopt.backends.keras_rewrite import KerasRewrite, is_graph_model

    job = KerasRewrite(mode, min_channels_per_group, seed, selection, init, dense_sequences)
    if is_graph_model(model):
        new_model = job.model(model)
    else:
        from graphopt.backends.keras_subclassed import rewrite_subclassed

        new_model = rewrite_subclassed(model, job, factory)
    before, after = keras_counts(model), keras_counts(new_model)
    totals = Totals(before[0], after[0], before[1], after[1])
    report = Report(
        name or model.name, "keras", mode, min_channels_per_group, totals, job.sites, job.skipped
    )
    return new_model, report


def register_rewritten(cls):
    """Register the class of rewritten copies of the subclassed model class `cls`, so that a
    saved one reloads with keras.models.load_model in a process that did not rewrite it."""
    from graphopt.backends.keras_subclassed import rewritten_class

    return rewritten_class(cls)


def export_onnx(model, opset: int = 17):
    """A Keras model as an onnx.ModelProto via tf2onnx (rewritten sites -> grouped Conv)."""
    from graphopt.backends.keras_export import export_onnx as _export

    return _export(model, opset)


def load(source: str, *, classes: int | None = None, input_shape=None, trust_model: bool = False):
    """Load a model from a .keras/.h5/.onnx file or a `keras.applications:Name`."""
    from graphopt.backends import keras_io

    if keras_io.is_application_name(source):
        return keras_io.build_application(source, classes, input_shape)
    kind = model_kind(source)
    if kind == "onnx":
        from graphopt.backends.onnx_io import load_onnx

        return load_onnx(source)
    return keras_io.load_keras_file(source, trust_model=trust_model)


def model_kind(source: str) -> str:
    """'keras', 'onnx' or 'application'; raises InputError for anything else or a missing file."""
    from graphopt.backends.keras_io import is_application_name

    if is_application_name(source):
        return "application"
    ext = os.path.splitext(source)[1].lower()
    if ext not in (".keras", ".h5", ".hdf5", ".onnx"):
        raise InputError(
            f"{source}: unknown model kind (expected .keras, .h5, .onnx or keras.applications:Name)"
        )
    if not os.path.exists(source):
        raise InputError(f"{source}: no such file")
    if not os.path.isfile(source):
        raise InputError(f"{source}: not a file")
    if os.path.getsize(source) == 0:
        raise InputError(f"{source}: the file is empty")
    return "onnx" if ext == ".onnx" else "keras"


def save(model, path: str, source: str | None = None) -> int:
    """Write the model atomically to `path` (never over `source`); return the file size."""
    if (
        source
        and os.path.exists(source)
        and os.path.exists(path)
        and os.path.samefile(source, path)
    ):
        raise OutputError(f"{path}: refusing to overwrite the input model")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OutputError(f"{path}: folder {folder} does not exist")
    if _is_onnx(model):
        if not path.lower().endswith(".onnx"):
            raise OutputError(f"{path}: an ONNX model must be saved to a .onnx file")
        from graphopt.backends.onnx_io import save_onnx

        save_onnx(model, path)
    else:
        if not path.endswith(".keras"):
            raise OutputError(f"{path}: a Keras model is saved as .keras; name the output *.keras")
        from graphopt.backends.keras_io import save_keras

        save_keras(model, path)
    return os.path.getsize(path)
