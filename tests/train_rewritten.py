"""Run in a fresh process by the tests: load a rewritten .keras and train it for one epoch.

Prints one JSON line: the per-batch losses.
"""

from __future__ import annotations

import json
import sys

import keras
import numpy as np

import graphopt  # noqa: F401  (registers the layers the saved model uses)


class _Losses(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))


def main(path: str, samples: int) -> None:
    model = keras.models.load_model(path)
    shape = tuple(model.inputs[0].shape[1:])
    classes = model.outputs[0].shape[-1]
    rng = np.random.default_rng(0)
    y = rng.integers(0, classes, samples)
    # Learnable on purpose: the class sets the image's brightness.
    x = rng.normal(size=(samples,) + shape) * 10 + y.reshape((-1,) + (1,) * len(shape)) * 20
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    record = _Losses()
    model.fit(x.astype("float32"), y, batch_size=32, epochs=1, verbose=0, callbacks=[record])
    print(json.dumps({"losses": record.losses}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
