"""The Keras layers a rewrite inserts: a grouped pointwise convolution and the channel interleave.

Both are registered for Keras serialisation (package "graphopt"), so a saved model reloads with
`keras.models.load_model` once graphopt is imported.
"""

from __future__ import annotations

import functools
import math

import keras
import numpy as np
from keras import activations, constraints, initializers, ops, regularizers

from graphopt.quiet import silenced_stderr

# How a grouped pointwise conv computes (GroupedPointwiseConv._how) depends on whether
# TensorFlow can train its own grouped convolution here (tf_grouped_conv_trains: oneDNN or
# cuDNN). All timings: forward+backward of each of EfficientNetB0's site convs at batch 32 on
# 2 CPU cores (benchmarks/keras_grouped_conv.py).
#
# Groups of one input or one output channel (B0's squeeze-excitation sites: 1152 -> 48 in 48
# groups, then 48 -> 48) are elementwise products everywhere: 0.45 -> 0.16 ms for that K and
# 0.19 -> 0.02 ms for that L (AVX-512 machine, oneDNN).
#
# Where the grouped convolution trains (AVX-512 machine, oneDNN), 1-D and 2-D convs use it,
# unless the dense form is small: at most DENSE_MAX_INTENSITY multiply-adds per channel read or
# written at each position (Cin*F/(Cin+F): the dense form is memory-bound) or at most
# DENSE_MAX_MACS multiply-adds per sample (spatial dims known). The grouped convolution has a
# fixed cost of about 0.5 ms whatever the size and uses few channels per group poorly. All site
# convs took 21.0 ms as the layer computes them against 32.6 as grouped convolutions at 32x32,
# 43.3 against 51.9 at 64x64 and 192.9 against 210.8 at 224x224 (e.g. 32 -> 16 in 2 groups on
# 112x112 20.4 against 24.5 ms); left grouped: 80 -> 80 in 10 groups on 14x14, 1.21 ms dense
# against 1.03. As grouped convolutions they took 211 ms at 224x224 against 298 ms as batched
# matmuls.
DENSE_MAX_INTENSITY = 36
DENSE_MAX_MACS = 163840
# Elsewhere (TensorFlow's own CPU kernels, as on the AMD EPYC Zen 3 machine: AVX2, oneDNN off;
# other Keras backends; 3-D convs) a conv is one dense matmul with the block-diagonal kernel up
# to MATMUL_DENSE_MAX_INTENSITY, else matmuls batched over the groups, which pay two transposes
# each way and run small per-group matmuls poorly. On the Zen 3 machine, summed over B0's site
# convs: 48.3 / 90.8 / 617.4 ms at 32x32 / 64x64 / 224x224, against 46.6 / 89.3 / 612.8 for
# the fastest form of each conv, 66.2 / 114.0 / 739.2 all dense and 53.3 / 118.8 / 991.9 all
# batched (the earlier rule for other backends, dense up to intensity 36 or 163,840
# multiply-adds or below 16 groups: 57.5 / 101.7 / 713.9). E.g. 32 -> 16 in 2 groups on
# 112x112 60.6 ms dense against 129.3 batched; 1152 -> 192 in 64 groups on 7x7 16.7 against
# 12.4.
MATMUL_DENSE_MAX_INTENSITY = 64


@functools.cache
def tf_grouped_conv_trains() -> bool:
    """Whether TensorFlow can differentiate its grouped convolution on the default device.

    oneDNN's CPU kernels and cuDNN can. TensorFlow's own CPU kernels compute it forward but
    raise "Gradients for grouped convolutions are not supported on CPU" in the backward pass,
    so a model that used it there could not be trained at all. On Linux, TensorFlow turns
    oneDNN on only for CPUs with AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX (not on AVX2 ones
    such as AMD EPYC Zen 3, nor on most ARM CPUs) unless TF_ENABLE_ONEDNN_OPTS=1.
    """
    import tensorflow as tf

    strides = [1, 1, 1, 1]
    # eagerly, also when first asked while a model is traced; silenced: where the gradient
    # fails, TensorFlow logs it ("Local rendezvous is aborting ... Gradients for grouped
    # convolutions are not supported on CPU"), which reads as if the model could not train
    with tf.init_scope(), silenced_stderr():
        x, kernel, dy = tf.ones((1, 1, 1, 4)), tf.ones((1, 1, 2, 2)), tf.ones((1, 1, 1, 2))
        try:  # the two gradients, as the ops the tape would record (init_scope pauses tapes)
            tf.raw_ops.Conv2DBackpropInput(
                input_sizes=x.shape,
                filter=kernel,
                out_backprop=dy,
                strides=strides,
                padding="VALID",
            )
            tf.raw_ops.Conv2DBackpropFilter(
                input=x,
                filter_sizes=kernel.shape,
                out_backprop=dy,
                strides=strides,
                padding="VALID",
            )
        except tf.errors.OpError:  # InvalidArgumentError here; any failure means no
            return False
    return True


# Set by graphopt.export while tracing for tf2onnx: compute with the framework's grouped
# convolution so that the ONNX graph holds a grouped Conv with the grouped kernel.
_EXPORT_AS_GROUPED_CONV = False


@keras.saving.register_keras_serializable(package="graphopt")
class GroupedPointwiseConv(keras.layers.Layer):
    """A pointwise convolution in `groups` groups that holds only the grouped kernel.

    The kernel has Keras' grouped layout `(1,)*rank + (Cin/groups, filters)`, so it is
    interchangeable with `ConvND(groups=...)`, but the layer trains at dense speed on CPU.
    """

    def __init__(
        self,
        filters: int,
        groups: int,
        rank: int = 2,
        strides=1,
        data_format: str = "channels_last",
        use_bias: bool = True,
        activation=None,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.groups = int(groups)
        self.rank = int(rank)
        self.strides = (
            tuple(strides) if isinstance(strides, (list, tuple)) else (int(strides),) * self.rank
        )
        self.data_format = data_format
        self.use_bias = bool(use_bias)
        self.activation = activations.get(activation)
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.bias_initializer = initializers.get(bias_initializer)
        self.kernel_regularizer = regularizers.get(kernel_regularizer)
        self.bias_regularizer = regularizers.get(bias_regularizer)
        self.kernel_constraint = constraints.get(kernel_constraint)
        self.bias_constraint = constraints.get(bias_constraint)
        if self.filters % self.groups:
            raise ValueError(f"filters={filters} is not divisible by groups={groups}")

    @property
    def channel_axis(self) -> int:
        return -1 if self.data_format == "channels_last" else 1

    def build(self, input_shape):
        cin = input_shape[self.channel_axis]
        if cin is None or cin % self.groups:
            raise ValueError(f"input channels {cin} not divisible by groups={self.groups}")
        self.cin = int(cin)
        self.kernel = self.add_weight(
            name="kernel",
            shape=(1,) * self.rank + (self.cin // self.groups, self.filters),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=(self.filters,),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )

    def _grouped_kernel(self):
        """(groups, Cin/groups, filters/groups): the kernel of each group."""
        cin_g, f_g = self.cin // self.groups, self.filters // self.groups
        k = ops.reshape(self.kernel, (cin_g, self.groups, f_g))
        return ops.transpose(k, (1, 0, 2))

    def _block_diagonal(self, x):
        """One matmul with the dense kernel: the grouped one stacked `groups` times, masked to
        its diagonal blocks (no transpose: 13% faster forward+backward than building it from
        the per-group kernels, on B0's small site convs)."""
        cin_g, f_g = self.cin // self.groups, self.filters // self.groups
        kernel = ops.reshape(self.kernel, (cin_g, self.filters))
        same_group = np.arange(self.cin)[:, None] // cin_g == np.arange(self.filters) // f_g
        dense = ops.tile(kernel, (self.groups, 1)) * ops.cast(same_group, kernel.dtype)
        return ops.matmul(x, dense)

    def _batched(self, x):
        lead = ops.shape(x)[:-1]
        flat = ops.reshape(x, (-1, self.groups, self.cin // self.groups))
        y = ops.matmul(ops.transpose(flat, (1, 0, 2)), self._grouped_kernel())
        y = ops.transpose(y, (1, 0, 2))
        return ops.reshape(y, tuple(lead) + (self.filters,))

    def _one_per_group(self, x):
        """Groups of one input or one output channel (a squeeze-excitation site's K and L) as
        elementwise products: a product and a sum over each group (one output), or a product
        with each input channel repeated (one input). A grouped convolution spends far more per
        call (and in its gradients) than these few multiply-adds."""
        cin_g, f_g = self.cin // self.groups, self.filters // self.groups
        kernel = ops.reshape(self.kernel, (cin_g, self.filters))
        if f_g == 1:
            lead = ops.shape(x)[:-1]
            grouped = ops.reshape(x, tuple(lead) + (self.groups, cin_g))
            return ops.sum(grouped * ops.transpose(kernel), axis=-1)
        return ops.repeat(x, f_g, axis=-1) * kernel[0]  # one input channel per group

    def _as_grouped_conv(self, x):
        """TensorFlow's grouped convolution (and for export, a grouped Conv in tf2onnx)."""
        import tensorflow as tf

        if self.rank != 3:
            return tf.nn.convolution(x, self.kernel, strides=list(self.strides), padding="VALID")
        # tf2onnx gives a grouped Conv3D group 1 (an invalid model): a pointwise conv treats
        # positions alike, so run it as a 2-D one over (D, H*W) and put the shape back.
        x = x[(slice(None),) + tuple(slice(None, None, s) for s in self.strides)]
        shape = tf.shape(x)
        flat = tf.reshape(x, tf.stack([shape[0], shape[1], shape[2] * shape[3], shape[4]]))
        kernel = tf.reshape(self.kernel, (1, 1) + tuple(self.kernel.shape[-2:]))
        y = tf.nn.convolution(flat, kernel, padding="VALID")
        return tf.reshape(y, tf.stack([shape[0], shape[1], shape[2], shape[3], self.filters]))

    def _how(self, x) -> str:
        """How this call computes (channels-last `x`): see DENSE_MAX_INTENSITY and
        MATMUL_DENSE_MAX_INTENSITY."""
        if _EXPORT_AS_GROUPED_CONV:
            return "grouped conv"
        if self.groups in (self.cin, self.filters):
            return "one per group"
        intensity = self.cin * self.filters / (self.cin + self.filters)
        if not self._grouped_conv_trains():
            return "block diagonal" if intensity <= MATMUL_DENSE_MAX_INTENSITY else "batched"
        spatial = [
            None if n is None else -(-int(n) // s) for n, s in zip(x.shape[1:-1], self.strides)
        ]
        macs = None if None in spatial else math.prod(spatial) * self.cin * self.filters
        if intensity <= DENSE_MAX_INTENSITY or (macs is not None and macs <= DENSE_MAX_MACS):
            return "block diagonal"
        return "grouped conv"

    def _grouped_conv_trains(self) -> bool:
        return (
            self.rank in (1, 2)
            and keras.backend.backend() == "tensorflow"
            and tf_grouped_conv_trains()
        )

    def call(self, inputs):
        x = inputs
        if self.data_format == "channels_first":
            x = ops.moveaxis(x, 1, -1)
        path = self._how(x)
        if path == "grouped conv":
            y = self._as_grouped_conv(x)
        else:
            if any(s > 1 for s in self.strides):
                x = x[(slice(None),) + tuple(slice(None, None, s) for s in self.strides)]
            forms = {
                "one per group": self._one_per_group,
                "block diagonal": self._block_diagonal,
                "batched": self._batched,
            }
            y = forms[path](x)
        if self.use_bias:
            y = y + self.bias
        y = self.activation(y)
        if self.data_format == "channels_first":
            y = ops.moveaxis(y, -1, 1)
        return y

    def compute_output_shape(self, input_shape):
        shape = list(input_shape)
        spatial = (
            range(1, 1 + self.rank)
            if self.data_format == "channels_last"
            else range(2, 2 + self.rank)
        )
        for axis, stride in zip(spatial, self.strides):
            if shape[axis] is not None:
                shape[axis] = (shape[axis] + stride - 1) // stride
        shape[self.channel_axis] = self.filters
        return tuple(shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            filters=self.filters,
            groups=self.groups,
            rank=self.rank,
            strides=self.strides,
            data_format=self.data_format,
            use_bias=self.use_bias,
            activation=activations.serialize(self.activation),
            kernel_initializer=initializers.serialize(self.kernel_initializer),
            bias_initializer=initializers.serialize(self.bias_initializer),
            kernel_regularizer=regularizers.serialize(self.kernel_regularizer),
            bias_regularizer=regularizers.serialize(self.bias_regularizer),
            kernel_constraint=constraints.serialize(self.kernel_constraint),
            bias_constraint=constraints.serialize(self.bias_constraint),
        )
        return config


@keras.saving.register_keras_serializable(package="graphopt")
class ChannelInterleave(keras.layers.Layer):
    """Channel shuffle of the paper: output channel j*N + i is input channel i*s + j.

    Computed as reshape -> transpose -> reshape, which works with unknown spatial dims and
    trains 2.5x faster on CPU than a gather (`ops.take`) whose gradient is a scatter
    (measured: 8 ms vs 20 ms forward+backward on (32,16,16,192), 64 groups).
    """

    def __init__(self, groups: int, axis: int = -1, **kwargs):
        super().__init__(**kwargs)
        self.groups = int(groups)
        self.axis = int(axis)

    def build(self, input_shape):
        rank = len(input_shape)
        self._last = self.axis % rank == rank - 1
        if not self._last and self.axis % rank != 1:
            raise ValueError(f"the channel axis must be 1 or the last one, not {self.axis}")
        self.step = int(input_shape[self.axis]) // self.groups

    def call(self, inputs):
        shape = ops.shape(inputs)
        if self._last:
            y = ops.reshape(inputs, (-1, self.groups, self.step))
            y = ops.transpose(y, (0, 2, 1))
        else:
            y = ops.reshape(inputs, (shape[0], self.groups, self.step, -1))
            y = ops.transpose(y, (0, 2, 1, 3))
        return ops.reshape(y, shape)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(groups=self.groups, axis=self.axis)
        return config


@keras.saving.register_keras_serializable(package="graphopt")
class PointwiseSite(keras.layers.Layer):
    """One whole site as a single layer (K, interleave, L, sum), called as the layer it
    replaces was: what a subclassed model's hand-written `call` gets in place of a pointwise
    conv, a Dense on a feature map, or a separable conv (then with its `depthwise` half first,
    given as a DepthwiseConv1D/2D config). `paper`: the layer's own activation runs in both
    branches; otherwise after the sum."""

    def __init__(self, conv: dict, groups: int, paper: bool = False, depthwise=None, **kwargs):
        super().__init__(**kwargs)
        self.conv = dict(conv)
        self.groups = int(groups)
        self.paper = bool(paper)
        self.depthwise_config = dict(depthwise) if depthwise else None
        self.depthwise = None
        if self.depthwise_config:
            kind = {1: keras.layers.DepthwiseConv1D, 2: keras.layers.DepthwiseConv2D}
            self.depthwise = kind[self.conv["rank"]](
                **self.depthwise_config, use_bias=False, name="depthwise"
            )
        activation = self.conv.get("activation")
        self.k = self._grouped("k", self.conv.get("strides", 1))
        step = self.conv["filters"] // self.groups
        self.interleave = None
        if step > 1:
            self.interleave = ChannelInterleave(self.groups, axis=self._axis, name="interleave")
        self.l = None
        self.after = None if self.paper else activations.get(activation)

    def _grouped(self, name: str, strides):
        keys = ("rank", "data_format", "use_bias", "kernel_initializer")
        return GroupedPointwiseConv(
            self.conv["filters"],
            self.groups,
            strides=strides,
            activation=self.conv.get("activation") if self.paper else None,
            name=name,
            **{key: self.conv[key] for key in keys if key in self.conv},
        )

    @property
    def _axis(self) -> int:
        return -1 if self.conv.get("data_format", "channels_last") == "channels_last" else 1

    def build(self, input_shape):
        if self.depthwise is not None:
            self.depthwise.build(input_shape)
            input_shape = self.depthwise.compute_output_shape(input_shape)
        self.k.build(input_shape)
        out_shape = self.k.compute_output_shape(input_shape)
        if self.interleave is not None:
            self.interleave.build(out_shape)
        if int(input_shape[self._axis]) >= self.conv["filters"]:
            self.l = self._grouped("l", 1)
            self.l.build(out_shape)

    def call(self, inputs):
        x = inputs if self.depthwise is None else self.depthwise(inputs)
        k_out = self.k(x)
        mixed = self.interleave(k_out) if self.interleave is not None else k_out
        out = mixed if self.l is None else k_out + self.l(mixed)
        return out if self.after is None else self.after(out)

    def compute_output_shape(self, input_shape):
        if self.depthwise is not None:
            input_shape = self.depthwise.compute_output_shape(input_shape)
        return self.k.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            conv=self.conv, groups=self.groups, paper=self.paper, depthwise=self.depthwise_config
        )
        return config


@keras.saving.register_keras_serializable(package="graphopt")
class SiteBatchNormalization(keras.layers.BatchNormalization):
    """The BatchNormalization a site holds in its branches (paper mode: the original BN after
    K, and BN' after L), trained with TensorFlow's fused kernel.

    Keras 3 normalizes in training as moments, then a batch normalization: about twenty ops
    forward and backward where the fused kernel is one each way, and a paper-mode site doubles
    the BNs of what it replaces. Same weights, same statistics update (Keras' biased batch
    variance), the same outputs; any case the fused kernel does not cover (other backends,
    dtypes, ranks or axes, masks, renorm, synchronized) goes through Keras' own code.
    """

    def _fused(self, inputs, training, mask) -> bool:
        return (
            bool(training)
            and self.trainable
            and mask is None
            and not self.renorm
            and not getattr(self, "synchronized", False)
            and keras.backend.backend() == "tensorflow"
            and len(inputs.shape) == 4
            and self.axis in (-1, 3)
            and inputs.dtype == "float32"
        )

    def call(self, inputs, training=None, mask=None):
        if not self._fused(inputs, training, mask):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        ones = tf.ones_like(self.moving_mean)
        y, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
            x=inputs,
            scale=self.gamma if self.scale else ones,
            offset=self.beta if self.center else tf.zeros_like(ones),
            mean=tf.constant([], tf.float32),
            variance=tf.constant([], tf.float32),
            epsilon=self.epsilon,
            data_format="NHWC",
            is_training=True,
        )
        count = tf.cast(tf.size(inputs) // tf.shape(inputs)[-1], tf.float32)
        variance = variance * (count - 1.0) / tf.maximum(count, 1.0)  # Bessel's correction off
        momentum = self.momentum
        self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
        self.moving_variance.assign(self.moving_variance * momentum + variance * (1.0 - momentum))
        return y
