"""Dense and EinsumDense whose bias gradient is a matrix product on the TensorFlow backend.

TensorFlow differentiates a broadcast bias add with a reduction over every token (BiasAddGrad or
a column Sum). On the GPU those run far below memory speed for long sequences: at T=12288 the
bias gradients of a sparse attention layer's four projections took 0.95 ms, a third of the
layer's step. As ones[1, tokens] @ dY[tokens, features] the same sum is one matrix product,
reading dY once and accumulating in float32 (TensorFlow's CPU reduction of a bfloat16 bias
gradient accumulates in bfloat16). Other backends, and a bias that is not the output's trailing
dims, keep Keras's own add; the weights and their names are those of the Keras layers.
"""

from __future__ import annotations

import keras
from keras import ops


def _add_bias_tf(x, bias):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    @tf.custom_gradient
    def add(x, bias):
        def grad(dy):
            rows = tf.reshape(dy, [-1, tf.size(bias)])
            ones = tf.ones([1, tf.shape(rows)[0]], dy.dtype)
            d_bias = tf.reshape(tf.matmul(ones, rows), tf.shape(bias))
            return dy, d_bias
        return x + bias, grad

    return add(x, bias)


def add_bias(x, bias):
    """x + bias, where bias spans x's trailing dimensions."""
    bias = ops.cast(bias, x.dtype)
    trailing = tuple(x.shape[x.ndim - len(bias.shape):]) if len(bias.shape) <= x.ndim else None
    if keras.backend.backend() != "tensorflow" or trailing != tuple(bias.shape):
        return ops.add(x, bias)
    return _add_bias_tf(x, bias)


class EinsumProjection(keras.layers.EinsumDense):
    """keras.layers.EinsumDense with `add_bias` before its activation."""

    def call(self, inputs, training=None):
        if self.bias is None:
            return super().call(inputs, training=training)
        x = add_bias(ops.einsum(self.equation, inputs, self.kernel), self.bias)
        return self.activation(x) if self.activation is not None else x


class DenseProjection(keras.layers.Dense):
    """keras.layers.Dense with `add_bias` before its activation."""

    def call(self, inputs, training=None):
        if self.bias is None:
            return super().call(inputs, training=training)
        x = add_bias(ops.matmul(inputs, self.kernel), self.bias)
        return self.activation(x) if self.activation is not None else x
