"""LocalAttention: each position attends to the `window` positions ending at itself."""

from __future__ import annotations

import keras

from tf_sparse_attn.layers.sparse_multi_head_attention import SparseMultiHeadAttention

__all__ = ["LocalAttention"]


@keras.saving.register_keras_serializable(package="tf_sparse_attn")
class LocalAttention(SparseMultiHeadAttention):
    """Sliding-window self-attention: query i attends keys i - window < j <= i (causal), or
    |i - j| < window (bidirectional), i.e. `window` keys including itself. The local factor of
    `StridedAttention(stride=l)` is `window=l`, as the reference implementation's
    `local_attn_ctx`; the paper writes its A(1) as i - l <= j <= i, which is `window=l + 1`.

    Cost per query: about `window + block_size` keys, whatever the sequence length. All the
    arguments of `SparseMultiHeadAttention` but `pattern` apply.

    Args:
      num_heads: number of attention heads.
      key_dim: size of each head for query and key.
      window: number of keys each query attends, itself included.
      **kwargs: see `SparseMultiHeadAttention` (block_size, causal, value_dim, dropout,
        use_bias, output_shape, implementation, initializers, ...).

    Example:

    >>> import numpy as np
    >>> import tf_sparse_attn as tsa
    >>> layer = tsa.LocalAttention(num_heads=2, key_dim=8, window=16, block_size=8)
    >>> x = np.random.normal(size=(2, 50, 32)).astype("float32")
    >>> tuple(layer(x).shape)
    (2, 50, 32)
    """

    def __init__(self, num_heads, key_dim, window, **kwargs):
        super().__init__(num_heads, key_dim, pattern="local", window=window, **kwargs)

    @property
    def window(self):
        return self._window

    def get_config(self):
        config = super().get_config()
        for name in ("pattern", "stride", "summary", "num_summary_groups"):
            config.pop(name)
        return config
