"""Elementwise activations as NumPy functions with their derivatives, for calibration's
reconstruction: what both backends pull into a paper-mode site's branches. Each maker returns a
`reconstruct.Step`."""

from __future__ import annotations

import numpy as np

from graphopt.reconstruct import Step


def sigmoid(z):
    return 0.5 * (1 + np.tanh(0.5 * z))  # no overflow for large |z|


def _mask(condition, like):
    return condition.astype(like.dtype)


def relu() -> Step:
    return Step("act", fn=lambda z: np.maximum(z, 0), grad=lambda z: _mask(z > 0, z))


def clip(low: float, high: float) -> Step:
    """min(max(z, low), high): ReLU6 is clip(0, 6)."""
    return Step(
        "act",
        fn=lambda z: np.minimum(np.maximum(z, low), high),
        grad=lambda z: _mask((z > low) & (z < high), z),
    )


def relu_general(max_value, negative_slope: float, threshold: float) -> Step:
    """Keras' ReLU layer: `negative_slope * (z - threshold)` below the threshold, capped."""
    top = np.inf if max_value is None else float(max_value)
    if negative_slope == 0 and threshold == 0:
        return clip(0.0, top) if np.isfinite(top) else relu()

    def fn(z):
        return np.where(z >= threshold, np.minimum(z, top), negative_slope * (z - threshold))

    def grad(z):
        return np.where(z >= threshold, (z < top) * 1.0, negative_slope)

    return Step("act", fn=fn, grad=grad)


def logistic() -> Step:
    return Step("act", fn=sigmoid, grad=lambda z: sigmoid(z) * (1 - sigmoid(z)))


def tanh() -> Step:
    return Step("act", fn=np.tanh, grad=lambda z: 1 - np.tanh(z) ** 2)


def silu() -> Step:
    """z * sigmoid(z) (swish)."""
    return Step(
        "act", fn=lambda z: z * sigmoid(z), grad=lambda z: sigmoid(z) * (1 + z * (1 - sigmoid(z)))
    )


def hard_sigmoid(alpha: float, beta: float) -> Step:
    def inside(z):
        return (alpha * z + beta > 0) & (alpha * z + beta < 1)

    return Step(
        "act", fn=lambda z: np.clip(alpha * z + beta, 0.0, 1.0), grad=lambda z: alpha * inside(z)
    )


def hard_swish() -> Step:
    """z * clip(z / 6 + 1/2, 0, 1) (ONNX HardSwish, Keras' hard_silu)."""
    return Step(
        "act",
        fn=lambda z: z * np.clip(z / 6 + 0.5, 0.0, 1.0),
        grad=lambda z: np.where(z <= -3, 0.0, np.where(z >= 3, 1.0, z / 3 + 0.5)),
    )


def leaky_relu(alpha: float) -> Step:
    return Step(
        "act",
        fn=lambda z: np.where(z > 0, z, alpha * z),
        grad=lambda z: np.where(z > 0, 1.0, alpha),
    )


def elu(alpha: float) -> Step:
    return Step(
        "act",
        fn=lambda z: np.where(z > 0, z, alpha * (np.exp(np.minimum(z, 0)) - 1)),
        grad=lambda z: np.where(z > 0, 1.0, alpha * np.exp(np.minimum(z, 0))),
    )
