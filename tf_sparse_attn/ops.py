"""The block-sparse attention op: Python wrapper, registered gradient, and the lse merge.

>>> import tensorflow as tf
>>> from tf_sparse_attn import BlockLayout, sparse_attention
>>> q, k, v = (tf.random.normal([2, 200, 4, 32]) for _ in range(3))
>>> layout = BlockLayout.fixed(seq_len=256, block_size=32, stride=64, summary=32)
>>> out, lse = sparse_attention(q, k, v, layout, return_lse=True)
>>> out.shape, lse.shape
(TensorShape([2, 200, 4, 32]), TensorShape([2, 4, 200]))
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from tf_sparse_attn._load import load_op_library
from tf_sparse_attn.layouts import BlockLayout, token_orders, transpose_csr
# One merge for every path: written in keras.ops, it is differentiable under tf.GradientTape too.
from tf_sparse_attn.portable import check_arguments, merge_attention

__all__ = ["sparse_attention", "merge_attention", "reorder_tokens", "restore_token_order"]


def _attrs(layout: BlockLayout, scale: float, causal: bool) -> dict:
    return dict(block_size=layout.block_size, scale=float(scale), causal=bool(causal),
                window=layout.window, min_distance=layout.min_distance)


def _layout_tensors(layout: BlockLayout):
    return (tf.constant(layout.row_offsets), tf.constant(layout.col_indices),
            tf.constant(layout.block_flags))


def _permute_tokens(x: tf.Tensor, to: np.ndarray, back: np.ndarray, axis: int) -> tf.Tensor:
    """x gathered along `axis` by the permutation `to`, with the gradient gathered by its
    inverse `back`: TensorFlow's own gradient of a gather is a scatter-add, which is slow on
    the GPU and needless for a permutation."""

    @tf.custom_gradient
    def permute(x):
        def grad(dy):
            return tf.gather(dy, back, axis=axis)
        return tf.gather(x, to, axis=axis), grad

    return permute(x)


def reorder_tokens(x: tf.Tensor, layout: BlockLayout, axis: int = 1) -> tf.Tensor:
    """Puts a padded sequence (length layout.seq_len along `axis`) into the layout's token
    order: token t goes to (t mod l) * (T / l) + t // l. A no-op for natural-order layouts."""
    orders = token_orders(layout)
    return x if orders is None else _permute_tokens(x, *orders, axis)


def restore_token_order(x: tf.Tensor, layout: BlockLayout, axis: int = 1) -> tf.Tensor:
    """Inverse of `reorder_tokens`."""
    orders = token_orders(layout)
    return x if orders is None else _permute_tokens(x, orders[1], orders[0], axis)


def sparse_attention(q, k, v, layout: BlockLayout, causal: bool = True, scale: float | None = None,
                     return_lse: bool = False, key_mask=None):
    """Block-sparse attention, fused: softmax(scale * q k^T) v over the pairs `layout` allows.

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
      A query that attends to no key gets zeros.
    """
    q, k, v = (tf.convert_to_tensor(t) for t in (q, k, v))
    check_arguments(q, k, v, layout, causal)
    length = q.shape[1]
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])

    time = tf.shape(q)[1]
    padded = layout.seq_len
    pad = padded - time
    # A sequence known to fill the layout skips the pad and the crop: each is a copy of the
    # tensor (and of its gradient) even when nothing is added or cut.
    exact = length is not None and length == padded
    paddings = [[0, 0], [0, pad], [0, 0], [0, 0]]
    q_p, k_p, v_p = (t if exact else tf.pad(t, paddings) for t in (q, k, v))

    # Padded keys sit after every real query, so causality already hides them; without
    # causality (or with a user mask) they are masked through the key bias.
    need_bias = key_mask is not None or (not causal and length != padded)
    if need_bias:
        valid = tf.sequence_mask(tf.fill([tf.shape(q)[0]], time), padded)
        if key_mask is not None:
            valid &= tf.pad(tf.cast(key_mask, tf.bool), [[0, 0], [0, pad]])
        key_bias = tf.where(valid, 0.0, float("-inf"))
        key_bias = reorder_tokens(key_bias, layout, axis=1)
    else:
        key_bias = tf.zeros([0], tf.float32)

    q_p, k_p, v_p = (reorder_tokens(t, layout) for t in (q_p, k_p, v_p))
    out, lse = load_op_library().block_sparse_attention(
        q_p, k_p, v_p, key_bias, *_layout_tensors(layout), **_attrs(layout, scale, causal))
    out = restore_token_order(out, layout)
    lse = restore_token_order(lse, layout, axis=2) if return_lse else None
    if not exact:
        out = out[:, :time]
        lse = lse[:, :, :time] if return_lse else None
    return (out, lse) if return_lse else out


def _transpose_layout(row_offsets, col_indices, block_flags, num_q_blocks, num_kv_blocks):
    """CSC (col_offsets, row_indices, csc_flags) of a CSR layout, in graph ops, so that the
    gradient works for any layout tensor, constant or not."""
    layout_heads = (tf.size(row_offsets) - 1) // num_q_blocks
    counts = row_offsets[1:] - row_offsets[:-1]
    row_id = tf.repeat(tf.range(layout_heads * num_q_blocks), counts)
    query_block = row_id % num_q_blocks
    key_id = (row_id // num_q_blocks) * num_kv_blocks + col_indices
    order = tf.argsort(tf.cast(key_id, tf.int64) * tf.cast(num_q_blocks, tf.int64)
                       + tf.cast(query_block, tf.int64), stable=True)
    columns = layout_heads * num_kv_blocks
    col_offsets = tf.concat([[0], tf.cumsum(tf.math.bincount(
        key_id, minlength=columns, maxlength=columns, dtype=tf.int32))], axis=0)
    return col_offsets, tf.gather(query_block, order), tf.gather(block_flags, order)


def _constant_transpose(row_offsets, col_indices, block_flags, num_q_blocks, num_kv_blocks):
    """The CSC as constants when the layout tensors are constants (the usual case), or None:
    built once when the gradient is traced rather than by graph ops (a sort among them) in
    every step, whose int32/int64 results the op would then read back in host memory."""
    values = [tf.get_static_value(t) for t in (row_offsets, col_indices, block_flags)]
    if any(v is None for v in values) or num_q_blocks is None or num_kv_blocks is None:
        return None
    ro, ci, fl = (np.asarray(v).astype(np.int64) for v in values)
    if (num_q_blocks <= 0 or ro.ndim != 1 or (len(ro) - 1) % num_q_blocks or ci.shape != fl.shape
            or len(ro) < 1 or ro[0] != 0 or np.any(np.diff(ro) < 0) or ro[-1] != len(ci)
            or np.any(ci < 0) or np.any(ci >= num_kv_blocks)):
        return None  # malformed: the graph path hands it to the op, which says why
    return tuple(tf.constant(a.astype(np.int32))
                 for a in transpose_csr(ro, ci, fl, num_q_blocks, num_kv_blocks))


@tf.RegisterGradient("BlockSparseAttention")
def _block_sparse_attention_grad(op, d_out, d_lse):
    q, k, v, key_bias, row_offsets, col_indices, block_flags = op.inputs
    out, lse = op.outputs
    block_size = op.get_attr("block_size")
    if d_out is None:
        d_out = tf.zeros_like(out)
    if d_lse is None:
        d_lse = tf.zeros_like(lse)
    static_blocks = [None if t.shape[1] is None else t.shape[1] // block_size for t in (q, k)]
    csc = _constant_transpose(row_offsets, col_indices, block_flags, *static_blocks)
    if csc is None:
        csc = _transpose_layout(row_offsets, col_indices, block_flags,
                                tf.shape(q)[1] // block_size, tf.shape(k)[1] // block_size)
    dq, dk, dv = load_op_library().block_sparse_attention_grad(
        q, k, v, key_bias, row_offsets, col_indices, block_flags, out, lse, d_out, d_lse, *csc,
        block_size=block_size, scale=op.get_attr("scale"), causal=op.get_attr("causal"),
        window=op.get_attr("window"), min_distance=op.get_attr("min_distance"))
    return dq, dk, dv, None, None, None, None
