"""Keras -> ONNX with tf2onnx, with the rewritten sites exported as grouped Conv nodes."""

from __future__ import annotations

import contextlib

import onnx

from graphopt.backends import keras_layers
from graphopt.errors import GraphoptError

DEFAULT_OPSET = 17


@contextlib.contextmanager
def _grouped_conv_tracing():
    """Trace grouped convolutions (ours, and Keras' `Conv2D(groups=N)`, e.g. ConvNeXt's
    depthwise convs) as plain `tf.nn.convolution`, which tf2onnx turns into `Conv(group=N)`.
    Keras' TF backend runs them inside an XLA-compiled function on CPU, which tf2onnx leaves
    as an unsupported StatefulPartitionedCall; only the traced graph is changed here."""
    from keras.src.backend.tensorflow import nn as tf_nn

    original = tf_nn.conv
    keras_layers._EXPORT_AS_GROUPED_CONV = True
    tf_nn.conv = _conv_traced_plainly
    try:
        yield
    finally:
        keras_layers._EXPORT_AS_GROUPED_CONV = False
        tf_nn.conv = original


def _conv_traced_plainly(
    inputs, kernel, strides=1, padding="valid", data_format=None, dilation_rate=1
):
    import tensorflow as tf
    from keras.src.backend.tensorflow import nn as tf_nn

    data_format = tf_nn.backend.standardize_data_format(data_format)
    return tf.nn.convolution(
        inputs,
        kernel,
        strides,
        padding.upper(),
        data_format=tf_nn._convert_data_format(data_format, len(inputs.shape)),
        dilations=dilation_rate,
    )


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
        proto, _ = tf2onnx.convert.from_keras(
            model,
            input_signature=signature,
            opset=opset,
            custom_op_handlers={"Erfc": (_erfc_as_one_minus_erf, [])},
        )
    return proto


def _erfc_as_one_minus_erf(ctx, node, name, args):
    """TF's exact GELU (ConvNeXt's activation) uses Erfc, which tf2onnx does not convert and
    ONNX does not have: compute it as 1 - Erf(x)."""
    import numpy as np
    from tf2onnx import utils

    dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(node.input[0]))
    node.type = "Erf"
    node.domain = ""
    one = ctx.make_const(utils.make_name(f"{name}_one"), np.array(1, dtype))
    ctx.insert_new_node_on_output(
        "Sub",
        node.output[0],
        name=utils.make_name(f"{name}_sub"),
        inputs=[one.output[0], node.output[0]],
    )
    return node
