"""Block-sparse attention in stock operations, for XLA, Keras's JAX and PyTorch backends, and
SavedModels that a stock TensorFlow Serving loads.

`portable_sparse_attention` takes the arguments of `tf_sparse_attn.sparse_attention` and gives
the same result, through `keras.ops` only. Each query block gathers the key blocks its layout
row lists (a padded, ELL-style table built once per layout in NumPy, one per range of query
blocks where rows grow along the sequence), so memory grows with T * (key blocks per row) *
block_size, never with T^2, and the token rules inside a block are
those of `BlockLayout.to_mask()`: causal, and the window / min_distance rules in windowed
blocks.

>>> import numpy as np
>>> from tf_sparse_attn.layouts import BlockLayout
>>> from tf_sparse_attn.portable import portable_sparse_attention
>>> q, k, v = (np.random.normal(size=(2, 100, 4, 16)).astype("float32") for _ in range(3))
>>> layout = BlockLayout.local(seq_len=128, block_size=16, window=32)
>>> out, lse = portable_sparse_attention(q, k, v, layout, return_lse=True)
>>> tuple(out.shape), tuple(lse.shape)
((2, 100, 4, 16), (2, 4, 100))
"""

from __future__ import annotations

import functools
import math

import keras
import numpy as np
from keras import ops

from tf_sparse_attn.layouts import WINDOWED, BlockLayout, token_orders

__all__ = ["portable_sparse_attention", "merge_attention"]


@functools.lru_cache(maxsize=128)
def _ell_table(layout: BlockLayout):
    """(cols, valid, windowed), each [layout_heads, num_query_blocks, width]: the key blocks of
    every row padded to the longest row. Padded slots point at block 0 and are invalid."""
    rows = layout.num_heads * layout.num_query_blocks
    counts = np.diff(layout.row_offsets)
    width = max(int(counts.max()) if counts.size else 0, 1)
    row_of = np.repeat(np.arange(rows), counts)
    slot = np.arange(layout.nnz) - np.repeat(layout.row_offsets[:-1], counts)
    cols = np.zeros((rows, width), np.int32)
    valid = np.zeros((rows, width), bool)
    windowed = np.zeros((rows, width), bool)
    cols[row_of, slot] = layout.col_indices
    valid[row_of, slot] = True
    windowed[row_of, slot] = (layout.block_flags & WINDOWED) != 0
    shape = (layout.num_heads, layout.num_query_blocks, width)
    return cols.reshape(shape), valid.reshape(shape), windowed.reshape(shape)


@functools.lru_cache(maxsize=128)
def _row_groups(layout: BlockLayout, max_groups: int = 4):
    """Contiguous ranges of query blocks, each with its own table width: [(first, end, cols,
    valid, windowed)], the tables cut to the longest row of the range. In a causal layout the
    rows grow along the sequence, so one table padded to the longest row pays about twice the
    attended products (and gathered keys); four ranges pay about 1.25 times. Ranges are kept
    only where they save a fifth of the padded products."""
    cols, valid, windowed = _ell_table(layout)
    counts = valid.sum(axis=-1).max(axis=0)  # per query block, the longest over layout heads
    rows = len(counts)
    groups = min(max_groups, rows)
    edges = [round(rows * g / groups) for g in range(groups + 1)]
    ranges = [(a, c) for a, c in zip(edges[:-1], edges[1:]) if c > a]
    widths = [max(int(counts[a:c].max()), 1) for a, c in ranges]
    split = sum((c - a) * w for (a, c), w in zip(ranges, widths))
    if rows == 0 or split > 0.8 * rows * cols.shape[-1]:
        ranges, widths = [(0, rows)], [cols.shape[-1]]
    return [(a, c, cols[:, a:c, :w], valid[:, a:c, :w], windowed[:, a:c, :w])
            for (a, c), w in zip(ranges, widths)]


def check_arguments(q, k, v, layout, causal):
    """The checks every path makes before any computation: ValueError or TypeError naming
    the argument, never an error from deep inside a backend."""
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        # A TensorShape of unknown rank has rank None (and no len); other backends' shapes
        # are tuples.
        rank = tensor.shape.rank if hasattr(tensor.shape, "rank") else len(tensor.shape)
        if rank is not None and rank != 4:
            raise ValueError(f"{name} must be [batch, time, heads, head_dim], got shape "
                             f"{tuple(tensor.shape)}")
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    if layout.causal and not causal:
        raise ValueError(f"{layout} was built for causal attention and lacks the blocks a "
                         "bidirectional call needs; build it with causal=False")
    length = q.shape[1]
    if length is not None and length > layout.seq_len:
        raise ValueError(f"sequence length {length} exceeds the layout's seq_len "
                         f"{layout.seq_len}")
    if k.shape[1] is not None and length is not None and k.shape[1] != length:
        raise ValueError(f"q has {length} positions but k has {k.shape[1]}: block layouts are "
                         "square (self-attention over one sequence)")
    heads = q.shape[2]
    if heads is not None and layout.num_heads not in (1, heads):
        raise ValueError(f"the layout has {layout.num_heads} heads; q has {heads} (a layout "
                         "has 1 head, shared, or one per attention head)")


def _time_of(x):
    """The static time dimension when known, else a scalar tensor."""
    return x.shape[1] if x.shape[1] is not None else ops.shape(x)[1]


def portable_sparse_attention(q, k, v, layout: BlockLayout, causal: bool = True,
                              scale: float | None = None, return_lse: bool = False,
                              key_mask=None):
    """Block-sparse attention in `keras.ops`; arguments and results as `sparse_attention`.

    Args:
      q: [batch, time, heads, head_dim] float16, bfloat16 or float32.
      k: [batch, time, heads, head_dim], same dtype.
      v: [batch, time, heads, value_dim], same dtype.
      layout: a `BlockLayout` with seq_len >= time; time is padded up to it and cropped back.
      causal: key j <= query i only. A causal layout cannot be used with causal=False.
      scale: score scale, 1/sqrt(head_dim) by default.
      return_lse: also return the float32 log-sum-exp of each query's scores,
        [batch, heads, time] (-inf for a query that attends to nothing).
      key_mask: optional boolean [batch, time]; False keys are not attended.

    Returns:
      out [batch, time, heads, value_dim] in q's dtype, and lse if return_lse.
    """
    q, k, v = (ops.convert_to_tensor(t) for t in (q, k, v))
    check_arguments(q, k, v, layout, causal)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    dtype = keras.backend.standardize_dtype(q.dtype)
    heads, head_dim, value_dim = q.shape[2], q.shape[3], v.shape[3]
    b, nb, padded = layout.block_size, layout.num_query_blocks, layout.seq_len
    time = _time_of(q)
    static_time = q.shape[1]
    pad = padded - time

    def pad_time(x):
        if isinstance(pad, int) and pad == 0:
            return x
        return ops.pad(x, [[0, 0], [0, pad]] + [[0, 0]] * (len(x.shape) - 2))

    perms = token_orders(layout)

    def to_layout_order(x, axis=1):
        return x if perms is None else ops.take(x, perms[0], axis=axis)

    def to_natural_order(x, axis=1):
        return x if perms is None else ops.take(x, perms[1], axis=axis)

    # Padded keys come after every real query, so causality hides them (in the strided order
    # too: there a key is attended only by queries of the same residue at or after it).
    key_valid = None
    if key_mask is not None or (not causal and static_time != padded):
        batch = ops.shape(q)[0]
        key_valid = ops.arange(padded)[None, :] < time
        key_valid = ops.broadcast_to(key_valid, (batch, padded))
        if key_mask is not None:
            key_valid = ops.logical_and(key_valid, pad_time(ops.cast(key_mask, "bool")))
        key_valid = to_layout_order(key_valid)

    q, k, v = (to_layout_order(pad_time(t)) for t in (q, k, v))

    # Head-major blocks: [batch, heads, blocks, block, dim].
    def blocks(x, dim):
        x = ops.reshape(x, (-1, nb, b, heads, dim))
        return ops.transpose(x, (0, 3, 1, 2, 4))

    qb, kb, vb = blocks(q, head_dim), blocks(k, head_dim), blocks(v, value_dim)

    def attend(first, end, cols, valid, windowed):
        """Query blocks first..end-1 against their tables: (out normalised, float32
        [batch, heads, end - first, block, value_dim]; lse [batch, heads, end - first, block])."""
        n, width = end - first, cols.shape[-1]

        def gather(x, dim):  # -> [batch, heads, n, width * block, dim]
            if layout.num_heads == 1:
                x = ops.take(x, cols[0], axis=2)
            else:
                flat = ops.reshape(x, (-1, heads * nb, b, dim))
                index = cols + (np.arange(heads, dtype=np.int32) * nb)[:, None, None]
                x = ops.take(flat, index, axis=1)
            return ops.reshape(x, (-1, heads, n, width * b, dim))

        kg, vg = gather(kb, head_dim), gather(vb, value_dim)
        qg = qb if (first, end) == (0, nb) else qb[:, :, first:end]

        # float16 overflows past 65504, so its queries are scaled before the product; the
        # other dtypes keep full precision by scaling the float32 scores.
        if dtype == "float16":
            scores = ops.einsum("zhnqd,zhnkd->zhnqk", qg * ops.cast(scale, dtype), kg)
            scores = ops.cast(scores, "float32")
        else:
            scores = ops.cast(ops.einsum("zhnqd,zhnkd->zhnqk", qg, kg), "float32") * scale

        # Token rules, from the small tables: [layout_heads, n, block, width * block].
        query_pos = (np.arange(first, end) * b)[:, None] + np.arange(b)[None, :]
        key_pos = (cols[..., None] * b + np.arange(b)).reshape(layout.num_heads, n, width * b)
        slot_valid = np.repeat(valid, b, axis=-1)
        slot_windowed = np.repeat(windowed, b, axis=-1)
        query_pos = ops.convert_to_tensor(query_pos.astype(np.int32))[None, :, :, None]
        key_pos = ops.convert_to_tensor(key_pos.astype(np.int32))[:, :, None, :]
        allowed = ops.convert_to_tensor(slot_valid)[:, :, None, :]
        if causal:
            allowed = ops.logical_and(allowed, key_pos <= query_pos)
        if layout.window or layout.min_distance:
            distance = ops.abs(query_pos - key_pos)
            rule = distance >= layout.min_distance
            if layout.window:
                rule = ops.logical_and(rule, distance < layout.window)
            outside = ops.logical_not(ops.convert_to_tensor(slot_windowed))[:, :, None, :]
            allowed = ops.logical_and(allowed, ops.logical_or(outside, rule))
        allowed = allowed[None]  # [1, layout_heads, n, block, width * block]
        if key_valid is not None:
            key_ok = ops.take(ops.reshape(key_valid, (-1, nb, b)), cols, axis=1)
            key_ok = ops.reshape(key_ok, (-1, layout.num_heads, n, 1, width * b))
            allowed = ops.logical_and(allowed, key_ok)

        scores = ops.where(allowed, scores, float("-inf"))
        peak = ops.max(scores, axis=-1, keepdims=True)
        # The softmax does not depend on the shift, so no gradient flows through it.
        peak = ops.stop_gradient(ops.where(ops.isfinite(peak), peak, 0.0))
        weights = ops.exp(scores - peak)
        total = ops.sum(weights, axis=-1)
        attended = total > 0
        safe_total = ops.where(attended, total, 1.0)
        out = ops.einsum("zhnqk,zhnkd->zhnqd", ops.cast(weights, v.dtype), vg)
        out = ops.cast(out, "float32") / safe_total[..., None]
        lse = ops.where(attended, ops.log(safe_total) + peak[..., 0], float("-inf"))
        return out, lse

    parts = [attend(*group) for group in _row_groups(layout)]
    out = parts[0][0] if len(parts) == 1 else ops.concatenate([o for o, _ in parts], axis=2)
    lse = parts[0][1] if len(parts) == 1 else ops.concatenate([l for _, l in parts], axis=2)
    out = ops.reshape(ops.transpose(out, (0, 2, 3, 1, 4)), (-1, padded, heads, value_dim))
    out = ops.cast(to_natural_order(out)[:, :time], dtype)
    if not return_lse:
        return out
    lse = to_natural_order(ops.reshape(lse, (-1, heads, padded)), axis=2)[:, :, :time]
    return out, lse


def merge_attention(out1, lse1, out2, lse2):
    """Combines two attention passes over disjoint key sets into one softmax over their union:
    out = (e^lse1 o1 + e^lse2 o2) / (e^lse1 + e^lse2). Differentiable in all four inputs (the
    lse gradients flow back into each pass); a query that neither pass attends gets zeros and
    lse = -inf. out: [batch, time, heads, dim]; lse: float32 [batch, heads, time]. Returns
    (out, lse). Written in `keras.ops`, so it serves the op and the portable path alike.

    >>> import numpy as np
    >>> o, l = merge_attention(np.ones([1, 1, 1, 2], "float32"), np.zeros([1, 1, 1], "float32"),
    ...                        np.zeros([1, 1, 1, 2], "float32"), np.zeros([1, 1, 1], "float32"))
    >>> np.asarray(o)[0, 0, 0].tolist()
    [0.5, 0.5]
    """
    dtype = keras.backend.standardize_dtype(ops.convert_to_tensor(out1).dtype)
    lse1, lse2 = ops.cast(lse1, "float32"), ops.cast(lse2, "float32")
    peak = ops.maximum(lse1, lse2)
    peak = ops.where(ops.isfinite(peak), peak, 0.0)
    w1, w2 = ops.exp(lse1 - peak), ops.exp(lse2 - peak)
    total = w1 + w2
    nonzero = total > 0
    safe_total = ops.where(nonzero, total, 1.0)
    lse = ops.where(nonzero, peak + ops.log(safe_total), float("-inf"))

    def per_token(weight):  # [b, h, t] -> [b, t, h, 1]
        return ops.transpose(weight / safe_total, (0, 2, 1))[..., None]

    out = (per_token(w1) * ops.cast(out1, "float32") + per_token(w2) * ops.cast(out2, "float32"))
    return ops.cast(out, dtype), lse
