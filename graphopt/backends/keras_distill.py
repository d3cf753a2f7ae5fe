"""Keras side of fine-tuning: the teacher/student `Distiller` model, the tf.distribute strategy,
the tf.data pipeline and the re-estimation of BatchNormalization statistics.

The training loop is Keras' own `fit` (callbacks, `BackupAndRestore`, `strategy.scope()`), with
a `keras.Model` subclass whose `compute_loss` is the distillation loss, as in the Keras
knowledge-distillation example.
"""

from __future__ import annotations

import json
import os
import time

import keras
import numpy as np
from keras import ops

from graphopt.backends.keras_layers import GroupedPointwiseConv
from graphopt.errors import UsageError

STRATEGIES = ("auto", "one", "mirrored", "multiworker")
PROBS, LOGITS, VALUES = "probabilities", "logits", "values"
"""What an output holds: class probabilities (softmax), class logits (labels name them), or
other values (MSE)."""


# ---- strategies ------------------------------------------------------------------------------


def _cluster() -> dict:
    try:
        return json.loads(os.environ.get("TF_CONFIG") or "{}")
    except ValueError:
        raise UsageError("TF_CONFIG is not valid JSON") from None


def _workers_in(config: dict) -> int:
    cluster = config.get("cluster", {})
    return len(cluster.get("worker", [])) + len(cluster.get("chief", []))


def make_strategy(name: str):
    """A tf.distribute strategy by name. Call it before any model is built (multi-worker
    collectives are configured when the strategy is created)."""
    import tensorflow as tf

    if name not in STRATEGIES:
        raise UsageError(f"strategy must be one of {', '.join(STRATEGIES)}, not '{name}'")
    if name == "auto":
        if _workers_in(_cluster()) > 1:
            name = "multiworker"
        elif len(tf.config.list_logical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "one"
    if name == "one":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU")]
        if len(devices) < 2:  # no GPUs: the logical CPU devices (tests set up two)
            devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    if _workers_in(_cluster()) < 1:
        raise UsageError(
            "--strategy multiworker needs TF_CONFIG (cluster and task) in the environment"
        )
    return tf.distribute.MultiWorkerMirroredStrategy()


def strategy_name(strategy) -> str:
    kind = type(strategy).__name__
    return {
        "MirroredStrategy": "mirrored",
        "MultiWorkerMirroredStrategy": "multiworker",
        "CollectiveAllReduceStrategy": "multiworker",
    }.get(kind, "one")


def worker_of(strategy) -> tuple[int, int, bool]:
    """(this worker's index, number of workers, whether it is the chief)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    config = _cluster()
    if resolver is None or _workers_in(config) < 2:
        return 0, 1, True
    task = config.get("task", {})
    kind, index = task.get("type", "worker"), int(task.get("index", 0))
    has_chief = bool(config.get("cluster", {}).get("chief"))
    chief = kind == "chief" or (kind == "worker" and index == 0 and not has_chief)
    position = index + (1 if has_chief and kind == "worker" else 0)
    return position, _workers_in(config), chief


# ---- the models ------------------------------------------------------------------------------


def copy_model(model: keras.Model) -> keras.Model:
    """A new model with the same graph and weights (the input model is never touched)."""
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from all_layers(layer)


def site_layers(model) -> list:
    """The layers `--train-only sites` trains: K and L, and the BatchNormalization that follows
    either directly (the K branch's and BN' in paper mode)."""
    convs = [layer for layer in all_layers(model) if isinstance(layer, GroupedPointwiseConv)]
    ids = {id(c) for c in convs}
    norms = []
    for layer in all_layers(model):
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        for node in getattr(layer, "_inbound_nodes", []):
            if any(id(t._keras_history.operation) in ids for t in node.input_tensors):
                norms.append(layer)
                break
    return convs + norms


def freeze_all_but_sites(model) -> int:
    """Set `trainable` so only the sites train; return how many layers train."""
    train = {id(layer) for layer in site_layers(model)}
    for layer in all_layers(model):
        if not isinstance(layer, keras.Model):
            layer.trainable = id(layer) in train
    return len(train)


class Distiller(keras.Model):
    """The student, trained on the teacher's outputs (and on labels when there are any).

    `kinds[i]` says how output i is compared: softened KL at `temperature` for class scores,
    MSE otherwise. Targets come in `y` as `t0, t1, ...` when the teacher's outputs are cached;
    otherwise the teacher (frozen) runs on each batch. `labels` in `y` add cross-entropy on
    output `labelled` with weight `alpha` (the distillation term gets `1 - alpha`).
    """

    def __init__(self, student, teacher, kinds, temperature, alpha, labelled=None, **kwargs):
        super().__init__(**kwargs)
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.trainable = False
        self.kinds = list(kinds)
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.labelled = labelled
        self.multiworker = False
        self._kl = keras.losses.KLDivergence()
        self._mse = keras.losses.MeanSquaredError()
        self._ce = {
            PROBS: keras.losses.SparseCategoricalCrossentropy(),
            LOGITS: keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        }

    def call(self, x, training=False):
        return self.student(x, training=training)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        logs = super().compute_metrics(x, y, y_pred, sample_weight)
        if not self.multiworker:
            return logs
        # Keras 3.15 averages the logs across workers with `strategy.reduce("MEAN", v, axis=0)`,
        # which fails on a scalar ("Invalid reduction dimension 0"): give it one axis to take.
        return {k: ops.reshape(v, (1,)) for k, v in logs.items()}

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """`finetune` builds the model and the optimizer itself. Keras' own build first averages
        a distributed batch across workers, which fails under MultiWorkerMirroredStrategy
        (Keras 3.15: "Attempt to convert a value (PerReplica...) to a Tensor")."""
        if not (self.built and self.optimizer is not None and self.optimizer.built):
            super()._maybe_symbolic_build(iterator, data_batch)

    def _soft(self, scores, kind):
        logits = ops.log(ops.clip(scores, 1e-7, 1.0)) if kind == PROBS else scores
        return ops.softmax(logits / self.temperature, axis=-1)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        preds = y_pred if isinstance(y_pred, (list, tuple)) else [y_pred]
        y = y or {}
        if "t0" in y:
            targets = [y[f"t{i}"] for i in range(len(preds))]
        else:
            out = self.teacher(x, training=False)
            targets = out if isinstance(out, (list, tuple)) else [out]
        labels = y.get("labels")
        total = 0.0
        for i, (kind, target, pred) in enumerate(zip(self.kinds, targets, preds)):
            target = ops.stop_gradient(target)
            if kind == VALUES:
                term = self._mse(target, pred)
            else:
                t2 = self.temperature**2
                term = self._kl(self._soft(target, kind), self._soft(pred, kind)) * t2
            if labels is not None and i == self.labelled:
                term = (1.0 - self.alpha) * term + self.alpha * self._ce[kind](labels, pred)
            total = total + term
        return total


class InterruptBetweenSteps(keras.callbacks.Callback):
    """Ctrl-C (SIGINT) during `fit` stops training after the step that is running, by raising
    KeyboardInterrupt there. Raised inside TensorFlow's kernels instead, with oneDNN on it
    corrupted the heap now and then ("free(): invalid next size", SIGABRT) where it should
    have said which epoch the checkpoint holds. A second Ctrl-C interrupts at once."""

    def on_train_begin(self, logs=None):
        import signal
        import threading

        self.asked, self.previous = False, None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._ask)

    def _ask(self, number, frame):
        import signal

        self.asked = True
        signal.signal(signal.SIGINT, self.previous or signal.default_int_handler)

    def on_train_batch_end(self, batch, logs=None):
        if self.asked:
            self._restore()
            raise KeyboardInterrupt

    def on_train_end(self, logs=None):
        self._restore()

    def _restore(self):
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


class EpochEnd(keras.callbacks.Callback):
    """Calls `report(epoch, loss, seconds, steps)` after each epoch (after the checkpoint when
    it comes after BackupAndRestore in the callbacks)."""

    def __init__(self, report):
        super().__init__()
        self.report = report

    def on_epoch_begin(self, epoch, logs=None):
        self.start, self.steps = time.monotonic(), 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1

    def on_epoch_end(self, epoch, logs=None):
        loss = float((logs or {}).get("loss", float("nan")))
        self.report(epoch, loss, time.monotonic() - self.start, self.steps)


# ---- data ------------------------------------------------------------------------------------


def training_dataset(x, y, batch_size: int, seed: int, replicas: int):
    """Shuffled, batched (global batch, remainder dropped), sharded by data across workers."""
    import tensorflow as tf

    n = len(next(iter(x.values())) if isinstance(x, dict) else x)
    batch = max(replicas, min(batch_size, n) // replicas * replicas)
    data = tf.data.Dataset.from_tensor_slices((x, y) if y else (x,))
    data = data.shuffle(min(n, 50_000), seed=seed, reshuffle_each_iteration=True)
    data = data.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return data.with_options(options), n // batch


def predict(model, inputs, batch_size: int = 256) -> list[np.ndarray]:
    out = model.predict(inputs, batch_size=batch_size, verbose=0)
    return [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]


# ---- BatchNormalization statistics -----------------------------------------------------------


def reestimate_batchnorm(model, batches, norms=None) -> int:
    """Set the moving mean and variance of `norms` (by default every trainable
    BatchNormalization) to the average of their batch statistics over `batches` (the weights
    are left as they are); return how many.

    Training moves the new weights so fast that the moving averages (momentum 0.99) lag far
    behind them; statistics taken afresh from the data fix the model in inference mode.
    """
    if norms is None:
        norms = [
            layer
            for layer in all_layers(model)
            if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
        ]
    if not norms:
        return 0
    momenta = [layer.momentum for layer in norms]
    try:
        for i, batch in enumerate(batches):
            for layer in norms:
                layer.momentum = i / (i + 1)  # a running mean: batch i weighs 1/(i+1)
            model(batch, training=True)
    finally:
        for layer, momentum in zip(norms, momenta):
            layer.momentum = momentum
    return len(norms)


CHANGE_TOLERANCE = 1e-6
"""A weight counts as changed when it moved by more than this, relative to its largest entry
(float32 resolution is ~1e-7: `--lr 1e-12` changes nothing)."""


def _moved(new: np.ndarray, old: np.ndarray) -> bool:
    scale = float(np.max(np.abs(old))) if old.size else 0.0
    return bool(old.size and np.max(np.abs(new - old)) > CHANGE_TOLERANCE * (scale or 1.0))


def changed_norms(model, start) -> tuple[list, list]:
    """(BatchNormalizations whose statistics must be estimated again, those whose statistics
    stay as in `start`): of the trainable ones, those at or after the first layer (in the
    model's topological order) whose trainable weights moved away from `start`'s, and the rest.
    Moving statistics are not trainable weights: training itself updates them."""
    before = {w.path: w.numpy() for w in start.weights}
    moved_yet = False
    again, kept = [], []
    for layer in all_layers(model):
        if isinstance(layer, keras.Model):
            continue
        moved_yet = moved_yet or any(
            w.path in before and _moved(w.numpy(), before[w.path]) for w in layer.trainable_weights
        )
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable:
            (again if moved_yet else kept).append(layer)
    return again, kept


def keep_statistics(norms, start) -> None:
    """Put `start`'s moving statistics back into `norms` (layers matched by weight path)."""
    before = {w.path: w for w in start.weights}
    for layer in norms:
        for w in layer.non_trainable_weights:
            if w.path in before:
                w.assign(before[w.path].numpy())


def remove_checkpoint(folder: str | None) -> None:
    """Once the output is written, the checkpoint is not needed any more."""
    import shutil

    if folder:
        shutil.rmtree(folder, ignore_errors=True)
