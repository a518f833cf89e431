"""Keras 3 layers for block-sparse self-attention.

- `SparseMultiHeadAttention`: any pattern name or `BlockLayout`.
- `LocalAttention(window)`, `StridedAttention(stride)`, `FixedAttention(stride, summary)`:
  the Sparse Transformer's patterns, with its three ways of combining factorized heads
  (interleaved via `.interleaved(...)`, merged, split via `combine=`).
"""

from tf_sparse_attn.layers.fixed_attention import FixedAttention
from tf_sparse_attn.layers.local_attention import LocalAttention
from tf_sparse_attn.layers.sparse_multi_head_attention import SparseMultiHeadAttention
from tf_sparse_attn.layers.strided_attention import StridedAttention

__all__ = ["FixedAttention", "LocalAttention", "SparseMultiHeadAttention", "StridedAttention"]
