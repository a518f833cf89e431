"""Learned factorized position embeddings (Child et al. 2019, section 7).

Position t of a sequence with `shape` (e.g. (rows, columns, channels) for an image, or
(T // l, l) for audio and bytes) is unravelled into one index per axis, row-major, and its
embedding is the sum of one learned vector per axis: sum_a E_a[index_a(t)]. A 64x64x3 image
needs 64 + 64 + 3 vectors instead of 12,288.

>>> import numpy as np
>>> from tf_sparse_attn.models.embeddings import FactorizedPositionEmbedding
>>> layer = FactorizedPositionEmbedding(shape=(4, 8), dim=16)
>>> layer(np.arange(32)).shape  # positions -> vectors
TensorShape([32, 16])
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf


@keras.saving.register_keras_serializable(package="tf_sparse_attn")
class FactorizedPositionEmbedding(keras.layers.Layer):
    """Sum of per-axis embeddings of the row-major multi-index of each position.

    Args:
      shape: the factorisation of positions; their number is prod(shape).
      dim: embedding width.
      embeddings_initializer: for every axis table.

    Call with int positions of any shape; returns [..., dim]. `full()` returns all prod(shape)
    embeddings at once, [prod(shape), dim], which the model adds to its token embeddings.
    """

    def __init__(self, shape, dim, embeddings_initializer="random_normal", **kwargs):
        super().__init__(**kwargs)
        self.shape = tuple(int(s) for s in shape)
        if not self.shape or min(self.shape) < 1:
            raise ValueError(f"shape must be positive sizes, got {shape!r}")
        self.dim = int(dim)
        self.num_positions = math.prod(self.shape)
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        # Row-major strides: index_a(t) = (t // strides[a]) mod shape[a].
        self._strides = tuple(int(np.prod(self.shape[a + 1:])) for a in range(len(self.shape)))

    def build(self, input_shape=None):
        self.tables = [
            self.add_weight(name=f"axis_{axis}", shape=(size, self.dim),
                            initializer=self.embeddings_initializer)
            for axis, size in enumerate(self.shape)]
        self.built = True

    def axis_indices(self, positions):
        """Per-axis indices of int positions: a list of tensors shaped like positions."""
        positions = tf.cast(positions, tf.int32)
        return [(positions // stride) % size for stride, size in zip(self._strides, self.shape)]

    def call(self, positions):
        out = None
        for table, index in zip(self.tables, self.axis_indices(positions)):
            part = tf.gather(tf.cast(table, self.compute_dtype), index)
            out = part if out is None else out + part
        return out

    def full(self, length=None):
        """Embeddings of positions 0..length-1 (default all), [length, dim], built by broadcast
        sums of the tables rather than gathers."""
        total = None
        rank = len(self.shape)
        for axis, table in enumerate(self.tables):
            view = [1] * rank + [self.dim]
            view[axis] = self.shape[axis]
            part = tf.reshape(tf.cast(table, self.compute_dtype), view)
            total = part if total is None else total + part
        total = tf.reshape(total, [self.num_positions, self.dim])
        return total if length is None else total[:length]

    def get_config(self):
        config = super().get_config()
        config.update(shape=list(self.shape), dim=self.dim,
                      embeddings_initializer=keras.initializers.serialize(
                          self.embeddings_initializer))
        return config
