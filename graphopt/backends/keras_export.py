"""Keras -> ONNX with tf2onnx, with the rewritten sites exported as grouped Conv nodes."""

from __future__ import annotations

import contextlib

import onnx

from graphopt.backends import keras_layers
from graphopt.errors import GraphoptError

DEFAULT_OPSET = 17


@contextlib.contextmanager
def _grouped_conv_tracing():
    keras_layers._EXPORT_AS_GROUPED_CONV = True
    try:
        yield
    finally:
        keras_layers._EXPORT_AS_GROUPED_CONV = False


def export_onnx(model, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Convert a Keras model (rewritten or not) to ONNX with tf2onnx.

    Our K/L layers normally train with a dense-speed formulation; while tracing for tf2onnx
    they use TensorFlow's grouped convolution, which tf2onnx turns into `Conv(group=N)` holding
    only the grouped kernel (Keras' own `Conv2D(groups=N)` would become an unsupported
    StatefulPartitionedCall instead).
    """
    try:
        import tensorflow as tf
        import tf2onnx
    except ImportError as exc:
        raise GraphoptError(
            "exporting to ONNX needs tf2onnx: pip install 'pwgroup[export]'"
        ) from exc
    import keras

    if isinstance(model, keras.Sequential):
        # tf2onnx cannot name a Keras 3 Sequential's outputs (KeyError on 'keras_tensor_N');
        # the functional model over the same layers converts.
        model = keras.Model(model.inputs, model.outputs, name=model.name)
    signature = [tf.TensorSpec(t.shape, t.dtype, name=t.name.split(":")[0]) for t in model.inputs]
    with _grouped_conv_tracing():
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=opset)
    return proto
