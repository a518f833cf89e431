"""FixedAttention: the Sparse Transformer's fixed pattern and its factorized heads."""

from __future__ import annotations

import functools

import keras

from tf_sparse_attn.layers.sparse_multi_head_attention import SparseMultiHeadAttention
from tf_sparse_attn.layers.strided_attention import _interleaved
from tf_sparse_attn.layouts import BlockLayout, padded_length

__all__ = ["FixedAttention"]

COMBINES = ("merged", "split", "block", "summary")


@functools.lru_cache(maxsize=128)
def fixed_layout(seq_len, block_size, stride, summary, causal, num_heads, num_summary_groups,
                 combine):
    """The cached layout of a `FixedAttention` for sequences of up to `seq_len` tokens."""
    length = padded_length("fixed", seq_len, block_size)

    def part(name, heads):
        return BlockLayout.fixed(length, block_size, stride, summary, causal, num_heads=heads,
                                 num_summary_groups=num_summary_groups, part=name)

    if combine == "merged":
        return part("both", num_heads)
    if combine in ("block", "summary"):
        return part(combine, num_heads)
    block_heads = (num_heads + 1) // 2
    summary_heads = num_heads - block_heads
    block = part("block", 1)
    summaries = part("summary", summary_heads)
    # A layout with one head is shared; stacking needs one entry per attention head.
    pieces = [block] * block_heads + (
        [summaries] if summaries.num_heads == summary_heads else [summaries] * summary_heads)
    return BlockLayout.stack(pieces)


@keras.saving.register_keras_serializable(package="tf_sparse_attn")
class FixedAttention(SparseMultiHeadAttention):
    """Fixed-pattern self-attention (Child et al. 2019, section 4.2), for data without a
    period, such as text: query i attends the earlier positions of its own stride-block,
    A(1) (j // stride == i // stride), and the last `summary` positions of every stride-block
    before it, A(2) (j mod stride >= stride - summary), which carry information forward.

    With `num_summary_groups = g > 1`, head h summarises with its own sub-block, positions
    j mod stride in [stride - (h mod g + 1) * summary, stride - (h mod g) * summary): the
    paper found several such sub-blocks better than one shared one.

    Section 5.1's three ways of combining the two factors, each one line:

    - interleaved, one factor per layer, alternating:
      `FixedAttention.interleaved(num_layers, num_heads, key_dim, stride, summary)`; or a
      single factor with `combine="block"` / `combine="summary"`.
    - merged (the default): every head attends to A(1) and A(2) together.
    - split: the first ceil(num_heads / 2) heads attend A(1), the others A(2).

    `block_size` must divide `stride` and `summary` (every block is then wholly in or out,
    which the kernels run fastest).

    Args:
      num_heads: number of attention heads.
      key_dim: size of each head for query and key.
      stride: the block length l.
      summary: the summary length c (c <= l).
      num_summary_groups: how many different summary sub-blocks the heads use.
      combine: "merged", "split", "block" or "summary".
      **kwargs: see `SparseMultiHeadAttention` (block_size, causal, value_dim, dropout,
        use_bias, output_shape, implementation, initializers, ...).

    Example:

    >>> import numpy as np
    >>> import tf_sparse_attn as tsa
    >>> layer = tsa.FixedAttention(num_heads=4, key_dim=8, stride=16, summary=4,
    ...                            num_summary_groups=2, block_size=4)
    >>> x = np.random.normal(size=(2, 50, 32)).astype("float32")
    >>> tuple(layer(x).shape)
    (2, 50, 32)
    """

    _check_layouts_on_init = False

    def __init__(self, num_heads, key_dim, stride, summary, num_summary_groups=1,
                 combine="merged", **kwargs):
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got combine={combine!r}")
        for name in ("pattern", "window"):
            if name in kwargs:
                raise ValueError(f"FixedAttention sets {name} itself; got {name}="
                                 f"{kwargs[name]!r}")
        super().__init__(num_heads, key_dim, pattern="fixed", stride=stride, summary=summary,
                         num_summary_groups=num_summary_groups, **kwargs)
        self._combine = combine
        if combine == "split" and self._num_heads < 2:
            raise ValueError(f"combine='split' divides the heads between the two factors and "
                             f"needs num_heads >= 2, got num_heads={self._num_heads}")
        self._check_pattern_arguments()
        self._check_layouts()

    @classmethod
    def interleaved(cls, num_layers, num_heads, key_dim, stride, summary, name=None, **kwargs):
        """`num_layers` layers alternating the block and the summary factor (block first):
        the paper's interleaved combination, one pattern per residual block."""
        return _interleaved(cls, ("block", "summary"), num_layers, name,
                            (num_heads, key_dim, stride, summary), kwargs)

    @property
    def stride(self):
        return self._stride

    @property
    def summary(self):
        return self._summary

    @property
    def num_summary_groups(self):
        return self._num_summary_groups

    @property
    def combine(self):
        return self._combine

    def _build_layouts(self, seq_len, causal):
        return (fixed_layout(seq_len, self._block_size, self._stride, self._summary,
                             bool(causal), self._num_heads, self._num_summary_groups,
                             self._combine),)

    def get_config(self):
        config = super().get_config()
        for name in ("pattern", "window"):
            config.pop(name)
        config["combine"] = self._combine
        return config
