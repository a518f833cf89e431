"""StridedAttention: the Sparse Transformer's strided pattern and its factorized heads."""

from __future__ import annotations

import keras
from keras import ops

from tf_sparse_attn.layers.sparse_multi_head_attention import (SparseMultiHeadAttention,
                                                               _check_positive_int)
from tf_sparse_attn.layouts import make_layout, padded_length

__all__ = ["StridedAttention"]

COMBINES = ("merged", "split", "local", "strided")


def _interleaved(cls, parts, num_layers, name, args, kwargs):
    num_layers = _check_positive_int("num_layers", num_layers)
    return [cls(*args, combine=parts[i % 2],
                **({"name": f"{name}_{i}"} if name else {}), **kwargs)
            for i in range(num_layers)]


@keras.saving.register_keras_serializable(package="tf_sparse_attn")
class StridedAttention(SparseMultiHeadAttention):
    """Strided self-attention (Child et al. 2019, section 4.2), for data with a period such as
    images (stride = row width) or audio.

    The pattern factorizes into two heads: A(1) "local", the previous `stride` positions
    (i - stride < j <= i: `stride` keys, itself included; the paper writes the set with
    l + 1 keys, the reference implementation with l as here), and A(2) "strided", every
    stride-th position before (j <= i and (i - j) mod stride == 0). Together they reach any
    earlier position in two steps. Section 5.1's three ways of combining them, each one line:

    - interleaved, one pattern per layer, alternating:
      `StridedAttention.interleaved(num_layers, num_heads, key_dim, stride)`; or a single
      factor with `combine="local"` / `combine="strided"`.
    - merged (the default): every head attends to the union of both sets. The two sets need
      different token orders, so the layer runs two passes (local in natural order, strided
      in the reordered order without the keys the local pass already has) and merges them
      exactly by their log-sum-exp.
    - split: the first ceil(num_heads / 2) heads are local, the others strided.

    The strided factor reorders tokens t -> (t mod stride) * (T / stride) + t // stride and
    pads T to a multiple of stride * block_size, so keep `block_size` at most T / stride.

    Args:
      num_heads: number of attention heads.
      key_dim: size of each head for query and key.
      stride: the period l.
      combine: "merged", "split", "local" or "strided".
      **kwargs: see `SparseMultiHeadAttention` (block_size, causal, value_dim, dropout,
        use_bias, output_shape, implementation, initializers, ...).

    Example:

    >>> import numpy as np
    >>> import tf_sparse_attn as tsa
    >>> layer = tsa.StridedAttention(num_heads=2, key_dim=8, stride=8, block_size=4)
    >>> x = np.random.normal(size=(2, 60, 16)).astype("float32")
    >>> tuple(layer(x).shape)
    (2, 60, 16)
    >>> [l.combine for l in tsa.StridedAttention.interleaved(3, 2, 8, stride=8, block_size=4)]
    ['local', 'strided', 'local']
    """

    _check_layouts_on_init = False

    def __init__(self, num_heads, key_dim, stride, combine="merged", **kwargs):
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got combine={combine!r}")
        stride = _check_positive_int("stride", stride)
        for name in ("pattern", "window", "summary", "num_summary_groups"):
            if name in kwargs:
                raise ValueError(f"StridedAttention sets {name} itself; got {name}="
                                 f"{kwargs[name]!r}")
        if combine == "local":
            super().__init__(num_heads, key_dim, pattern="local", window=stride, **kwargs)
        else:
            super().__init__(num_heads, key_dim, pattern="strided", stride=stride, **kwargs)
        self._combine = combine
        self._period = stride
        if combine == "split" and self._num_heads < 2:
            raise ValueError(f"combine='split' divides the heads between the two patterns and "
                             f"needs num_heads >= 2, got num_heads={self._num_heads}")
        self._check_pattern_arguments()
        self._check_layouts()

    @classmethod
    def interleaved(cls, num_layers, num_heads, key_dim, stride, name=None, **kwargs):
        """`num_layers` layers alternating the local and the strided factor (local first):
        the paper's interleaved combination, one pattern per residual block."""
        return _interleaved(cls, ("local", "strided"), num_layers, name,
                            (num_heads, key_dim, stride), kwargs)

    @property
    def stride(self):
        return self._period

    @property
    def combine(self):
        return self._combine

    def _probe_length(self):
        return padded_length("strided", 1, self._block_size, self._period)

    def _build_layouts(self, seq_len, causal):
        if self._combine in ("local", "strided"):
            return super()._build_layouts(seq_len, causal)
        local = make_layout("local", seq_len, block_size=self._block_size, causal=causal,
                            window=self._period)
        # Merged: the strided pass leaves out |i - j| < stride, which the local pass has.
        strided = make_layout("strided", seq_len, block_size=self._block_size, causal=causal,
                              stride=self._period,
                              exclude_window=self._period if self._combine == "merged" else 0)
        return local, strided

    def _attend(self, q, k, v, key_mask, causal):
        if self._combine in ("local", "strided"):
            return super()._attend(q, k, v, key_mask, causal)
        local, strided = self.layouts_for(self._sequence_length(q), causal)
        if self._combine == "merged":
            out1, lse1 = self._attention(q, k, v, local, causal, key_mask, return_lse=True)
            out2, lse2 = self._attention(q, k, v, strided, causal, key_mask, return_lse=True)
            return self._merge(out1, lse1, out2, lse2)[0]
        h = (self._num_heads + 1) // 2
        first = self._attention(q[:, :, :h], k[:, :, :h], v[:, :, :h], local, causal, key_mask)
        second = self._attention(q[:, :, h:], k[:, :, h:], v[:, :, h:], strided, causal,
                                 key_mask)
        return ops.concatenate([first, second], axis=2)

    def get_config(self):
        config = super().get_config()
        for name in ("pattern", "window", "summary", "num_summary_groups"):
            config.pop(name)
        config.update({"stride": self._period, "combine": self._combine})
        return config
