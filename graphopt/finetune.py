"""Fine-tuning by distillation: the original model (teacher, frozen) teaches the rewritten one
(student), with or without labels, on one device or many (tf.distribute).

`finetune(teacher, student, data)` returns `(model, FinetuneResult)`. The student given is never
modified: it is copied into the strategy's scope, trained with Keras' `fit`, and the trained
weights are copied into a plain model whose BatchNormalization statistics are re-estimated from
the training data (see `reestimate_batchnorm`) before it is evaluated and returned.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from graphopt import checkpoint
from graphopt.data import DEFAULT_PREPROCESS, Samples, load_samples
from graphopt.errors import GraphoptError, InputError, UsageError, runtime_reason
from graphopt.quality import few_held_out

TRAIN_ONLY = ("all", "sites")
BN_SAMPLES = 2048
"""Training samples whose batch statistics become the BatchNormalization statistics."""
TEACHER_CACHE_BYTES = int(os.environ.get("PWGROUP_TEACHER_CACHE_BYTES", 2 << 30))
"""The teacher's outputs are computed once and kept when they take no more than this."""


@dataclass
class Evaluation:
    """One model on the held-out samples: top-1 agreement with the teacher (class-score outputs),
    relative L2 error against the teacher (other outputs), accuracy (with labels)."""

    agreement: float | None = None
    relative_error: float | None = None
    accuracy: float | None = None

    def text(self) -> str:
        parts = []
        if self.agreement is not None:
            parts.append(f"agreement {100 * self.agreement:.2f}%")
        if self.relative_error is not None:
            parts.append(f"relative error {self.relative_error:.4f}")
        if self.accuracy is not None:
            parts.append(f"accuracy {100 * self.accuracy:.2f}%")
        return ", ".join(parts) or "-"


@dataclass
class Epoch:
    epoch: int
    loss: float
    seconds: float
    steps: int
    evaluation: Evaluation


@dataclass
class FinetuneResult:
    """What a fine-tuning run did and how the student compares before and after."""

    teacher: str
    student: str
    train_samples: int
    held_out_samples: int
    labels: bool
    epochs: int
    batch_size: int
    lr: float
    temperature: float
    alpha: float
    train_only: str
    strategy: str
    replicas: int
    workers: int
    outputs: list[str]
    teacher_cached: bool
    teacher_eval: Evaluation
    before: Evaluation
    after: Evaluation
    history: list[Epoch] = field(default_factory=list)
    bn_reestimated: int = 0
    """BatchNormalizations whose statistics were estimated again (those downstream of weights
    that changed)."""
    kept_start: bool = False
    """The closing figure was worse than the starting one: the starting weights are kept."""
    resumed_at: int | None = None
    seconds: float = 0.0
    chief: bool = True  # only the chief (worker 0) writes the model
    checkpoint: str | None = None  # this worker's BackupAndRestore folder

    def to_dict(self) -> dict:
        data = asdict(self)
        del data["chief"], data["checkpoint"]
        return {"schema_version": 1, "kind": "finetune", **data}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def to_text(self) -> str:
        lines = [
            f"fine-tuned {self.student} from {self.teacher}",
            f"  {self.train_samples:,} training samples"
            f" ({'with' if self.labels else 'without'} labels),"
            f" {self.held_out_samples:,} held out; {self.epochs} epoch{'s' * (self.epochs != 1)},"
            f" batch {self.batch_size},"
            f" lr {self.lr:g} (cosine), T {self.temperature:g}"
            + (f", alpha {self.alpha:g}" if self.labels else "")
            + f"; train {self.train_only}; {self.strategy}"
            + (f" ({self.replicas} replicas, {self.workers} workers)" if self.replicas > 1 else ""),
        ]
        if self.resumed_at:
            lines.append(f"  resumed at epoch {self.resumed_at}")
        lines += few_held_out(self.held_out_samples)
        if self.teacher_eval.accuracy is not None:
            lines.append(f"  original: accuracy {100 * self.teacher_eval.accuracy:.2f}%")
        lines.append(f"  before:   {self.before.text()}")
        lines.append(f"  after:    {self.after.text()}")
        if self.kept_start:
            lines.append(
                "  fine-tuning made the student worse on the held-out samples: the starting "
                "weights are kept (the figures above are those of the trained weights)"
            )
        lines.append(f"  {self.seconds:.0f} s")
        return "\n".join(lines) + "\n"


# ---- checks ----------------------------------------------------------------------------------


def _signature(tensors) -> list[tuple]:
    return [(tuple(t.shape)[1:], str(t.dtype)) for t in tensors]


def check_pair(teacher, student, teacher_name: str, student_name: str) -> None:
    """Same inputs and outputs, and the student is the teacher with some convs replaced."""
    for what, a, b in (
        ("inputs", teacher.inputs, student.inputs),
        ("outputs", teacher.outputs, student.outputs),
    ):
        if _signature(a) != _signature(b):
            raise InputError(
                f"{student_name}: its {what} {_signature(b)} differ from those of "
                f"{teacher_name} {_signature(a)}"
            )
    import keras

    from graphopt.backends.keras_distill import all_layers
    from graphopt.backends.keras_layers import GroupedPointwiseConv

    mine = {layer.name: layer for layer in all_layers(student)}
    for layer in all_layers(teacher):
        if not layer.weights or isinstance(layer, keras.Model):
            continue  # a nested model: its layers are checked one by one
        twin = mine.get(layer.name)
        if twin is not None and [w.shape for w in twin.weights] == [w.shape for w in layer.weights]:
            continue
        if isinstance(mine.get(f"{layer.name}_k"), GroupedPointwiseConv):
            continue  # a site (a conv, a separable conv's pointwise half): K (and L) replace it
        raise InputError(
            f"{student_name}: not a rewrite of {teacher_name} (layer '{layer.name}' of the "
            "original is missing or has other weights)"
        )
    if not any(isinstance(layer, GroupedPointwiseConv) for layer in mine.values()):
        raise InputError(
            f"{student_name}: no site of it was rewritten (it has no K or L layers), so there "
            f"is nothing to fine-tune: give the output of pwgroup rewrite {teacher_name}"
        )


def check_runs(model, samples: Samples, name: str) -> None:
    """Run `model` on two samples before anything else. TensorFlow's refusal to run its
    channels_first layers on a CPU names the model; any other failure is a problem of the
    data (the shapes were checked against the model's inputs, not what its layers need)."""
    from graphopt.backends.keras_distill import predict
    from graphopt.backends.keras_io import cpu_layouts

    try:
        with cpu_layouts(name):
            predict(model, _x(samples.take(slice(0, 2)), model))
    except GraphoptError:
        raise
    except Exception as exc:  # TensorFlow's own error, whatever its class
        raise InputError(
            f"{samples.source}: {name} does not run on these samples: {runtime_reason(exc)}"
        ) from None


def _output_kinds(teacher, targets: list[np.ndarray], labels) -> tuple[list[str], int | None]:
    """How each output is compared, and which output the labels belong to."""
    from graphopt.backends.keras_distill import LOGITS, PROBS, VALUES

    kinds = []
    for t in targets:
        sums = t.sum(axis=-1) if t.ndim >= 2 and t.shape[-1] > 1 else None
        probs = sums is not None and t.min() >= 0 and np.allclose(sums, 1.0, atol=1e-3)
        kinds.append(PROBS if probs else VALUES)
    if labels is None:
        return kinds, None
    scores = [i for i, t in enumerate(targets) if t.ndim == 2 and t.shape[-1] > 1]
    if len(scores) != 1:
        raise InputError(
            f"labels given, but the model has {len(scores)} outputs of class scores; labels "
            "need exactly one"
        )
    index = scores[0]
    if kinds[index] == VALUES:
        kinds[index] = LOGITS
    return kinds, index


def _check_labels(samples: Samples, classes: int) -> np.ndarray:
    labels = np.asarray(samples.labels)
    if labels.ndim == 2 and labels.shape[1] == classes and classes > 1:
        labels = labels.argmax(axis=1)  # one-hot
    elif labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.number):
        raise InputError(
            f"{samples.source}: labels of shape {labels.shape} do not match the model's output "
            f"of {classes} class scores (give one integer class per sample)"
        )
    if np.issubdtype(labels.dtype, np.floating) and not np.all(labels == np.round(labels)):
        raise InputError(f"{samples.source}: labels must be integer classes")
    labels = labels.astype(np.int64)
    if labels.min() < 0 or labels.max() >= classes:
        raise InputError(
            f"{samples.source}: labels range {labels.min()}..{labels.max()}, the model's "
            f"output has {classes} classes"
        )
    return labels


# ---- evaluation ------------------------------------------------------------------------------


def evaluate(outputs, targets, kinds, labels=None, labelled=None) -> Evaluation:
    """Compare a model's outputs with the teacher's (and with labels)."""
    from graphopt.backends.keras_distill import VALUES

    agree, errors = [], []
    for out, target, kind in zip(outputs, targets, kinds):
        if kind == VALUES:
            errors.append(float(np.linalg.norm(out - target) / max(np.linalg.norm(target), 1e-12)))
        else:
            agree.append(float(np.mean(out.argmax(-1) == target.argmax(-1))))
    accuracy = None
    if labels is not None and labelled is not None:
        accuracy = float(np.mean(outputs[labelled].argmax(-1) == labels))
    return Evaluation(
        float(np.mean(agree)) if agree else None,
        float(np.mean(errors)) if errors else None,
        accuracy,
    )


def _x(samples: Samples, model):
    """What Keras takes: the one array, or a dict by input name."""
    if len(model.inputs) == 1:
        return next(iter(samples.inputs.values()))
    return dict(samples.inputs)


# ---- the run ---------------------------------------------------------------------------------


@dataclass
class _Setup:
    train: Samples
    held: Samples
    targets: list[np.ndarray]  # the teacher on the training samples ([] when not cached)
    held_targets: list[np.ndarray]
    kinds: list[str]
    labelled: int | None
    labels: np.ndarray | None
    held_labels: np.ndarray | None


def _prepare(teacher, student, names, data, validation_data, validation_split, preprocess, limit,
             seed):  # fmt: skip
    from graphopt.backends.keras_distill import predict
    from graphopt.backends.keras_io import input_specs

    specs = input_specs(teacher)
    samples = load_samples(data, specs, preprocess=preprocess, limit=limit)
    for model, name in zip((teacher, student), names):
        check_runs(model, samples, name)
    if validation_data is not None:
        train, held = samples, load_samples(validation_data, specs, preprocess=preprocess)
    else:
        if not 0 < validation_split < 1:
            raise UsageError("validation_split must be between 0 and 1")
        train, held = samples.split(validation_split, seed=seed)
    held_targets = predict(teacher, _x(held, teacher))
    out_bytes = sum(math.prod(t.shape[1:]) * 4 for t in held_targets) * len(train)
    cached = out_bytes <= TEACHER_CACHE_BYTES
    targets = predict(teacher, _x(train, teacher)) if cached else []
    probe = targets or predict(teacher, _x(train.take(slice(0, 256)), teacher))
    kinds, labelled = _output_kinds(teacher, probe, train.labels)
    if held.labels is not None and labelled is None:
        kinds, labelled = _output_kinds(teacher, probe, held.labels)
    labels = held_labels = None
    if labelled is not None:
        classes = int(held_targets[labelled].shape[-1])
        if train.labels is not None:
            labels = _check_labels(train, classes)
        if held.labels is not None:
            held_labels = _check_labels(held, classes)
    return _Setup(train, held, targets, held_targets, kinds, labelled, labels, held_labels)


def finetune(
    teacher,
    student,
    data,
    *,
    epochs: int = 5,
    batch_size: int = 128,
    lr: float = 2e-3,
    temperature: float = 2.0,
    alpha: float = 0.5,
    train_only: str = "all",
    strategy="auto",
    validation_split: float = 0.1,
    validation_data=None,
    preprocess: str = DEFAULT_PREPROCESS,
    limit: int | None = None,
    checkpoint_dir: str | None = None,
    seed: int = 0,
    verbose="auto",
    bn_samples: int = BN_SAMPLES,
    on_epoch: Callable[[Epoch], None] | None = None,
    teacher_name: str | None = None,
    student_name: str | None = None,
    bn_reestimate: bool = True,
):
    """Distil `teacher` into `student` (a rewrite of it) on `data`; return (model, result).

    `data` as in `graphopt.data.load_samples` (labels optional: `y` in a .npz, class folders).
    Loss per output: KL divergence of class scores softened at `temperature` (MSE for other
    outputs), plus `alpha` x cross-entropy with labels when there are any. Adam with a cosine
    decay from `lr` over all steps. `train_only="sites"` trains only K, L and their
    BatchNormalization. `strategy`: "auto", "one", "mirrored", "multiworker" or a
    tf.distribute.Strategy (create it before building models); `batch_size` is global.
    `checkpoint_dir`: a `keras.callbacks.BackupAndRestore` folder (made safe against kills,
    see `keras_checkpoint`); a run started again with the same folder and the same options
    resumes after its last finished epoch, one with other options is refused (UsageError; see
    `graphopt.checkpoint` for what counts as the same models and data). `verbose`: "auto"
    (Keras' progress bar on a terminal, one line per epoch otherwise), 0 or 1.
    `bn_reestimate`: estimate again the statistics of the trainable BatchNormalizations at or
    after the first weight that changed (the others keep the student's). When the closing
    figure is worse than the student's own, the student's weights are returned
    (`result.kept_start`).
    """
    import keras

    from graphopt.backends import keras_distill as kd
    from graphopt.backends.keras_checkpoint import AtomicBackupAndRestore

    teacher_name = teacher_name or teacher.name
    student_name = student_name or student.name
    _check_options(epochs, batch_size, lr, temperature, alpha, train_only)
    if isinstance(strategy, str):
        strategy = kd.make_strategy(strategy)
    strategy_name = kd.strategy_name(strategy)
    check_pair(teacher, student, teacher_name, student_name)
    start = time.monotonic()
    index, workers, chief = kd.worker_of(strategy)
    replicas = strategy.num_replicas_in_sync
    folder = resumed_at = None
    if checkpoint_dir:
        folder = checkpoint_dir if chief else f"{checkpoint_dir}.worker-{index}"
        options = {
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": float(lr),
            "temperature": float(temperature),
            "alpha": float(alpha),
            "train_only": train_only,
            "strategy": strategy_name,
            "replicas": replicas,
            "workers": workers,
            "seed": seed,
            "teacher": checkpoint.digest_weights(teacher.get_weights()),
            "student": checkpoint.digest_weights(student.get_weights()),
        }
        checkpoint.check(folder, options)  # before the data are loaded: a quick refusal
    keras.utils.set_random_seed(seed)
    setup = _prepare(
        teacher, student, (teacher_name, student_name), data, validation_data,
        validation_split, preprocess, limit, seed,
    )  # fmt: skip
    if folder:
        options["data"] = checkpoint.digest_samples(setup.train)
        options["held_out"] = checkpoint.digest_samples(setup.held)
        resumed_at = checkpoint.check(folder, options)
    held_x = _x(setup.held, teacher)
    teacher_eval = evaluate(
        setup.held_targets, setup.held_targets, setup.kinds, setup.held_labels, setup.labelled
    )
    before = evaluate(
        kd.predict(student, held_x), setup.held_targets, setup.kinds, setup.held_labels,
        setup.labelled,
    )  # fmt: skip
    with strategy.scope():
        trainee = kd.copy_model(student)
        if train_only == "sites":
            kd.freeze_all_but_sites(trainee)
        distiller = kd.Distiller(
            trainee,
            None if setup.targets else kd.copy_model(teacher),
            setup.kinds,
            temperature,
            alpha if setup.labels is not None else 0.0,
            setup.labelled,
        )
        distiller.multiworker = workers > 1
        y = {f"t{i}": t for i, t in enumerate(setup.targets)}
        if setup.labels is not None:
            y["labels"] = setup.labels
        dataset, steps = kd.training_dataset(
            _x(setup.train, teacher), y, batch_size, seed, replicas
        )
        schedule = keras.optimizers.schedules.CosineDecay(lr, max(1, steps * epochs), alpha=0.01)
        distiller.compile(optimizer=keras.optimizers.Adam(schedule))
        distiller(_x(setup.train.take(slice(0, 2)), teacher))  # built, for BackupAndRestore
        distiller.optimizer.build(distiller.trainable_variables)
    final = kd.copy_model(student)  # outside the strategy: evaluated and returned
    if train_only == "sites":
        kd.freeze_all_but_sites(final)
    bn_batches = list(setup.train.take(slice(0, bn_samples)).batches(min(batch_size, 256)))
    bn_batches = [b if len(b) > 1 else next(iter(b.values())) for b in bn_batches]

    reestimated = [0]

    def settle() -> Evaluation:
        """The trained weights in `final`, statistics re-estimated where weights changed,
        evaluated."""
        final.set_weights(trainee.get_weights())
        if bn_reestimate:
            again, kept = kd.changed_norms(final, student)
            kd.keep_statistics(kept, student)
            reestimated[0] = kd.reestimate_batchnorm(final, bn_batches, again)
        outputs = kd.predict(final, held_x)
        return evaluate(outputs, setup.held_targets, setup.kinds, setup.held_labels, setup.labelled)

    tty = sys.stdout.isatty()
    keras_verbose = (1 if tty else 0) if verbose == "auto" else int(verbose)
    lines = verbose == "auto" or (verbose and not keras_verbose)
    prefix = f"worker {index + 1}/{workers}: " if workers > 1 else ""
    log = _EpochLog(settle, epochs, prefix if lines else None, on_epoch)
    callbacks = [kd.InterruptBetweenSteps(), kd.EpochEnd(log)]
    if folder:
        checkpoint.record(folder, options)
        if resumed_at and lines:
            print(f"{prefix}resuming from {folder} at epoch {resumed_at + 1}", flush=True)
        callbacks.insert(0, AtomicBackupAndRestore(folder))
    with warnings.catch_warnings():  # "shuffle=True ... ignored": the dataset is shuffled
        warnings.simplefilter("ignore", UserWarning)
        distiller.fit(dataset, epochs=epochs, verbose=keras_verbose, callbacks=callbacks)
    after = log.last if log.last_epoch == epochs else settle()
    kept_start = _worse(after, before)
    if kept_start:
        final.set_weights(student.get_weights())
    result = FinetuneResult(
        teacher=teacher_name,
        student=student_name,
        train_samples=len(setup.train),
        held_out_samples=len(setup.held),
        labels=setup.labels is not None,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        temperature=temperature,
        alpha=alpha,
        train_only=train_only,
        strategy=strategy_name,
        replicas=replicas,
        workers=workers,
        outputs=setup.kinds,
        teacher_cached=bool(setup.targets),
        teacher_eval=teacher_eval,
        before=before,
        after=after,
        history=log.history,
        bn_reestimated=reestimated[0],
        kept_start=kept_start,
        resumed_at=(resumed_at + 1) if resumed_at else None,
        seconds=time.monotonic() - start,
        chief=chief,
        checkpoint=folder,
    )
    return final, result


def _worse(after: Evaluation, before: Evaluation) -> bool:
    """Accuracy first (labels), then agreement, then relative error: is `after` worse?"""
    for name, sign in (("accuracy", 1), ("agreement", 1), ("relative_error", -1)):
        a, b = getattr(after, name), getattr(before, name)
        if a is not None and b is not None:
            return sign * (a - b) < 0
    return False


def _check_options(epochs, batch_size, lr, temperature, alpha, train_only) -> None:
    if not isinstance(epochs, int) or epochs < 1:
        raise UsageError("epochs must be a positive integer")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError("batch_size must be a positive integer")
    if not lr > 0 or not temperature > 0:
        raise UsageError("lr and temperature must be positive")
    if not 0 <= alpha <= 1:
        raise UsageError("alpha must be between 0 and 1")
    if train_only not in TRAIN_ONLY:
        raise UsageError(f"train_only must be one of {', '.join(TRAIN_ONLY)}, not '{train_only}'")


class _EpochLog:
    """After each epoch: settle the student (statistics re-estimated), evaluate, print a line."""

    def __init__(self, settle, epochs: int, prefix: str | None, on_epoch):
        self.settle, self.epochs, self.prefix, self.on_epoch = settle, epochs, prefix, on_epoch
        self.history: list[Epoch] = []
        self.last, self.last_epoch = None, 0

    def __call__(self, epoch: int, loss: float, seconds: float, steps: int) -> None:
        self.last, self.last_epoch = self.settle(), epoch + 1
        record = Epoch(epoch + 1, loss, round(seconds, 2), steps, self.last)
        self.history.append(record)
        if self.prefix is not None:
            print(
                f"{self.prefix}epoch {epoch + 1}/{self.epochs}: loss {loss:.4f}, "
                f"{self.last.text()} ({steps} steps, {seconds:.0f} s)",
                flush=True,
            )
        if self.on_epoch is not None:
            self.on_epoch(record)
