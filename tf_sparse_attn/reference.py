"""Dense masked attention from a layout's token mask: the slow, obviously correct reference the
tests compare the op and the portable path against. O(T^2) memory; not for real lengths.

>>> import numpy as np
>>> from tf_sparse_attn.layouts import BlockLayout
>>> from tf_sparse_attn.reference import reference_attention
>>> q = k = v = np.random.normal(size=(1, 64, 2, 8)).astype("float32")
>>> out = reference_attention(q, k, v, BlockLayout.dense(64, block_size=16))
>>> tuple(out.shape)
(1, 64, 2, 8)
"""

from __future__ import annotations

import functools
import math

import numpy as np
from keras import ops

from tf_sparse_attn.portable import _time_of, check_arguments
from tf_sparse_attn.layouts import BlockLayout

__all__ = ["reference_attention"]


@functools.lru_cache(maxsize=32)
def _token_mask(layout: BlockLayout, causal: bool) -> np.ndarray:
    return layout.to_mask(causal=causal)


def reference_attention(q, k, v, layout: BlockLayout, causal: bool = True,
                        scale: float | None = None, return_lse: bool = False, key_mask=None):
    """Attention over `layout.to_mask(causal)`, computed densely in float32; arguments and
    results as `tf_sparse_attn.sparse_attention`."""
    q, k, v = (ops.convert_to_tensor(t) for t in (q, k, v))
    check_arguments(q, k, v, layout, causal)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    dtype = q.dtype
    time = _time_of(q)
    allowed = ops.convert_to_tensor(_token_mask(layout, causal))[None, :, :time, :time]
    if key_mask is not None:
        allowed = ops.logical_and(allowed, ops.cast(key_mask, "bool")[:, None, None, :])
    q32, k32, v32 = (ops.cast(t, "float32") for t in (q, k, v))
    scores = ops.einsum("bqhd,bkhd->bhqk", q32, k32) * scale
    scores = ops.where(allowed, scores, float("-inf"))
    peak = ops.max(scores, axis=-1, keepdims=True)
    peak = ops.stop_gradient(ops.where(ops.isfinite(peak), peak, 0.0))
    weights = ops.exp(scores - peak)
    total = ops.sum(weights, axis=-1)
    safe_total = ops.where(total > 0, total, 1.0)
    out = ops.einsum("bhqk,bkhd->bqhd", weights / safe_total[..., None], v32)
    out = ops.cast(out, dtype)
    if not return_lse:
        return out
    return out, ops.where(total > 0, ops.log(safe_total) + peak[..., 0], float("-inf"))
