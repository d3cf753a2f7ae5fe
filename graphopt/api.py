"""The public face: rewrite(), load(), save(); dispatches to the backend that fits the model."""

from __future__ import annotations

import functools
import math
import os
import sys

from graphopt.errors import (
    InputError,
    InternalError,
    OutputError,
    UnsupportedModelError,
    UsageError,
)
from graphopt.plan import DEFAULT_MIN_CHANNELS_PER_GROUP, FIT, INITS, LINEAR, MODES, Selection
from graphopt.report import Report, Totals
from graphopt.runtime import require_keras


def _is_keras(model) -> bool:
    keras = sys.modules.get("keras")  # a Keras model exists only once Keras was imported
    return keras is not None and isinstance(model, keras.Model)


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
    calibration=None,
    calibrate: bool = True,
    groups: str = "rule",
    min_agreement: float | None = None,
    max_output_error: float | None = None,
    max_site_error: float | None = None,
    held_out: float = 0.25,
    preprocess: str = "0..1",
    progress=None,
    dense_sequences: bool = False,
    factory=None,
    distill_steps: int = 0,
    scores: tuple[str, ...] = (),
):
    """Replace the pointwise convs of a Keras model or onnx.ModelProto; return (new, report).

    With `calibration` (samples of the model's inputs: an array, a dict of arrays, an iterable
    of feeds, a tf.data.Dataset or a path, see graphopt.data), each site's new weights are
    fitted to reproduce the original on those samples, site by site in network order
    (`calibrate=False` only measures), and `report.quality` holds the agreement with the
    original on the `held_out` share of them. `min_agreement` (top-1) and `max_output_error`
    leave the most damaging sites as they were until the held-out figure holds;
    `groups="auto"` gives each site the largest group count whose held-out site error stays
    within `max_site_error` (by default the loosest bound of a ladder at which the agreement
    targets hold, or 0.1 without targets). `progress` is called with a line per step.

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
    layer computing the site; see docs/library.md, "Subclassed Keras models".
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
    calibrating = _check_calibration_options(
        calibration, calibrate, groups, min_agreement, max_output_error, max_site_error, held_out
    )
    if not isinstance(distill_steps, int) or distill_steps < 0:
        raise UsageError("distill_steps must be a non-negative integer")
    if distill_steps and not calibrating:
        raise UsageError("distill_steps trains after calibration: it needs calibration data")
    if distill_steps and _is_onnx(model):
        raise UsageError(
            "distill_steps trains the rewritten model, and pwgroup cannot train ONNX models "
            "yet: calibrate without it, or rewrite the Keras model"
        )
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
    if calibration is None:
        new_model, report = backend(model, mode, min_channels_per_group, seed, name, selection)
        check_accounting(report)
        return new_model, report
    from graphopt.calibrate import (
        Calibration,
        Distill,
        Quality,
        Targets,
        check_runs,
        check_scores,
        measure,
        quiet,
    )
    from graphopt.data import load_samples

    if _is_keras(model):
        from graphopt.backends.keras_calib import KerasCalibration as Adapter
        from graphopt.backends.keras_io import input_specs
        from graphopt.backends.keras_rewrite import is_graph_model

        if not is_graph_model(model):
            raise UnsupportedModelError(
                f"model '{model.name}' is a subclassed Keras model: calibration reads sites' "
                "inputs through the functional graph, which it has not"
            )
    else:
        from graphopt.backends.onnx_calib import OnnxCalibration as Adapter
        from graphopt.backends.onnx_io import input_specs
    samples = load_samples(calibration, input_specs(model), preprocess=preprocess)
    adapter = Adapter(model, mode, min_channels_per_group, seed, name, dense_sequences)
    scores = check_scores(adapter, scores)
    check_runs(adapter, samples, name)
    if not calibrating:  # nothing is fitted: every sample measures
        new_model, report = backend(model, mode, min_channels_per_group, seed, name, selection)
        check_accounting(report)
        outputs = measure(adapter, new_model, samples, scores)
        report.quality = Quality(0, len(samples), False, outputs)
        return new_model, report
    fit, held = samples.split(held_out, seed)
    targets = Targets(min_agreement, max_output_error, max_site_error, groups == "auto")
    job = Calibration(
        adapter, fit, held, selection, min_channels_per_group, targets, progress or quiet, seed,
        Distill(distill_steps), scores,
    )  # fmt: skip
    new_model, report = job.run()
    check_accounting(report)
    return new_model, report


def _check_calibration_options(
    data, calibrate, groups, min_agreement, max_output_error, max_site_error, held_out
) -> bool:
    """True when the rewrite is to be calibrated; UsageError for options that need data."""
    if groups not in ("rule", "auto"):
        raise UsageError(f"groups must be 'rule' or 'auto', not '{groups}'")
    for label, value in (
        ("min_agreement", min_agreement),
        ("max_output_error", max_output_error),
        ("max_site_error", max_site_error),
    ):
        if value is not None and not (isinstance(value, (int, float)) and value >= 0):
            raise UsageError(f"{label} must be a non-negative number")
    if not 0 < held_out < 1:
        raise UsageError("held_out is the share of the data kept for measuring: between 0 and 1")
    if min_agreement is not None and min_agreement > 1:
        raise UsageError("min_agreement is a share of positions: between 0 and 1")
    needs_data = groups == "auto" or any(
        v is not None for v in (min_agreement, max_output_error, max_site_error)
    )
    if data is None:
        if needs_data:
            raise UsageError(
                "--groups auto, --min-agreement, --max-output-error and --max-site-error "
                "need calibration data (--calibrate DATA)"
            )
        return False
    if needs_data and not calibrate:
        raise UsageError("accuracy targets and --groups auto need calibration, not --measure")
    return calibrate


def check_accounting(report: Report) -> None:
    """The model changes by exactly what its sites change (BN' included in its site); anything
    else means the rewrite touched what it should not have, so the result must not be used."""
    t = report.totals
    changed = t.params_after - t.params_before
    by_sites = sum(s.params_after - s.params_before for s in report.sites)
    if changed != by_sites:
        raise InternalError(
            f"{report.model}: the rewritten model has {changed:+,} parameters but its sites "
            f"account for {by_sites:+,}"
        )


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
    weights=None,
    found: dict | None = None,
    dense_sequences=False,
    factory=None,
):
    """The Keras rewrite; `weights` (site name -> Fitted) are given K/L, `found` receives
    what the rewrite found of each site (see KerasRewrite.found)."""
    from graphopt.backends.keras_rewrite import KerasRewrite, is_graph_model

    job = KerasRewrite(
        mode,
        min_channels_per_group,
        seed,
        selection,
        init,
        weights=dict(weights or {}),
        dense_sequences=dense_sequences,
    )
    if is_graph_model(model):
        new_model = job.model(model)
    else:
        from graphopt.backends.keras_subclassed import rewrite_subclassed

        new_model = rewrite_subclassed(model, job, factory)
    if found is not None:
        found.update(job.found)
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
    kind = model_kind(source)
    if kind == "onnx":
        from graphopt.backends.onnx_io import load_onnx

        return load_onnx(source)
    require_keras(f"{source}: a Keras model")
    from graphopt.backends import keras_io

    if kind == "application":
        return keras_io.build_application(source, classes, input_shape)
    return keras_io.load_keras_file(source, trust_model=trust_model)


def model_kind(source: str) -> str:
    """'keras', 'onnx' or 'application'; raises InputError for anything else or a missing file."""
    from graphopt.backends.keras_io import is_application_name  # imports no Keras

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

        return save_onnx(model, path)
    else:
        if not path.endswith(".keras"):
            raise OutputError(f"{path}: a Keras model is saved as .keras; name the output *.keras")
        from graphopt.backends.keras_io import save_keras

        save_keras(model, path)
    return os.path.getsize(path)
