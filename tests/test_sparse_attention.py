"""sparse_attention (the custom op through its Python wrapper) against a float64 reference."""

import math

import numpy as np
import pytest
import tensorflow as tf

from tf_sparse_attn import BlockLayout, merge_attention, sparse_attention
from tests.reference import TOLERANCE, attention_reference, random_qkv, relative_error


def layouts(causal):
    return {
        "dense": BlockLayout.dense(128, 16, causal),
        "local": BlockLayout.local(128, 16, 21, causal),
        "strided": BlockLayout.strided(128, 16, 4, causal),
        "strided_exclusive": BlockLayout.strided(256, 32, 4, causal, exclude_window=9),
        "fixed": BlockLayout.fixed(128, 16, 32, 16, causal),
        "fixed_per_head": BlockLayout.fixed(128, 32, 64, 32, causal, num_heads=3, num_summary_groups=2),
        "local_fixed_union": BlockLayout.union(BlockLayout.local(128, 16, 9, causal),
                                               BlockLayout.fixed(128, 16, 64, 16, causal)),
    }


def check(layout, causal, dtype, time, *, heads=3, dim=16, value_dim=None, batch=2, seed=0,
          key_mask=None):
    rng = np.random.default_rng(seed)
    (q, k, v), (qn, kn, vn) = random_qkv(rng, batch, time, heads, dim, value_dim, dtype)
    d_out = rng.standard_normal((batch, time, heads, value_dim or dim))
    d_lse = rng.standard_normal((batch, heads, time))
    with tf.GradientTape() as tape:
        tape.watch([q, k, v])
        out, lse = sparse_attention(q, k, v, layout, causal=causal, return_lse=True, key_mask=key_mask)
        # lse of an empty row is -inf: keep it out of the loss, its gradient is zero anyway.
        loss = tf.reduce_sum(tf.cast(out, tf.float64) * d_out) + tf.reduce_sum(
            tf.where(tf.math.is_finite(lse), tf.cast(lse, tf.float64) * d_lse, 0.0))
    grads = tape.gradient(loss, [q, k, v])
    mask = layout.to_mask(causal)[:, :time, :time]
    if key_mask is not None:
        mask = mask[None] & np.asarray(key_mask)[:, None, None, :]
    ref_out, ref_lse, ref_grads = attention_reference(qn, kn, vn, mask, 1 / math.sqrt(dim),
                                                      d_out, np.where(np.isfinite(d_lse), d_lse, 0))
    tol = TOLERANCE[dtype.name]
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert relative_error(out.numpy(), ref_out) < tol
    assert relative_error(lse.numpy(), ref_lse) < tol
    for name, grad, ref in zip("qkv", grads, ref_grads):
        assert grad.dtype == dtype
        assert relative_error(grad.numpy(), ref) < 4 * tol, f"d{name}"


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("name", list(layouts(True)))
def test_patterns_float32(name, causal):
    layout = layouts(causal)[name]
    for time in (layout.seq_len, layout.seq_len - 37):  # full and odd, padded lengths
        check(layout, causal, tf.float32, time, seed=time)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["local", "strided", "fixed_per_head"])
def test_half_precision(name, dtype):
    check(layouts(True)[name], True, dtype, 101, seed=7)


@pytest.mark.parametrize("block_size", [16, 32, 64])
def test_block_sizes_and_value_dim(block_size):
    layout = BlockLayout.local(256, block_size, 40)
    check(layout, True, tf.float32, 200, heads=2, dim=8, value_dim=24, seed=block_size)


def test_key_mask_and_rows_with_no_keys():
    layout = BlockLayout.local(64, 16, 3, causal=False)
    key_mask = np.ones((2, 64), bool)
    key_mask[0, 10:40] = False  # queries 12..37 of batch 0 see no key in their window
    check(layout, False, tf.float32, 64, key_mask=key_mask)
    q = tf.random.normal([2, 64, 3, 16])
    out, lse = sparse_attention(q, q, q, layout, causal=False, return_lse=True, key_mask=key_mask)
    assert np.all(out.numpy()[0, 15:35] == 0)
    assert np.all(np.isneginf(lse.numpy()[0, :, 15:35]))
    assert not np.isnan(out.numpy()).any()


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_merged_local_and_strided_head(causal):
    """The paper's merged strided head: two passes over disjoint sets, merged by their lse."""
    time, stride = 250, 8
    local = BlockLayout.local(256, 16, stride, causal)
    strided = BlockLayout.strided(256, 16, stride, causal, exclude_window=stride)
    rng = np.random.default_rng(3)
    (q, k, v), (qn, kn, vn) = random_qkv(rng, 2, time, 2, 16)
    d_out = rng.standard_normal((2, time, 2, 16))
    with tf.GradientTape() as tape:
        tape.watch([q, k, v])
        out, _ = merge_attention(*sparse_attention(q, k, v, local, causal, return_lse=True),
                                 *sparse_attention(q, k, v, strided, causal, return_lse=True))
        loss = tf.reduce_sum(tf.cast(out, tf.float64) * d_out)
    grads = tape.gradient(loss, [q, k, v])
    mask = (local.to_mask(causal) | strided.to_mask(causal))[:, :time, :time]
    ref_out, _, ref_grads = attention_reference(qn, kn, vn, mask, 0.25, d_out)
    assert relative_error(out.numpy(), ref_out) < 2e-5
    for grad, ref in zip(grads, ref_grads):
        assert relative_error(grad.numpy(), ref) < 1e-4


def test_numerical_gradient():
    layout = BlockLayout.fixed(32, 8, 16, 8)
    rng = np.random.default_rng(11)
    q, k, v = (tf.constant(rng.standard_normal((1, 30, 2, 4)), tf.float32) for _ in range(3))

    def f(q, k, v):
        out, lse = sparse_attention(q, k, v, layout, return_lse=True)
        return tf.reduce_sum(out * out) + tf.reduce_sum(tf.sin(lse))

    theoretical, numerical = tf.test.compute_gradient(f, [q, k, v], delta=1e-2)
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, rtol=2e-2, atol=2e-2)


def test_graph_mode_and_deterministic():
    layout = BlockLayout.fixed(256, 32, 64, 32)
    q, k, v = (tf.random.normal([2, 256, 4, 32], seed=s) for s in (1, 2, 3))

    @tf.function
    def step(q, k, v):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            out = sparse_attention(q, k, v, layout)
            loss = tf.reduce_sum(out * out)
        return (out, *tape.gradient(loss, [q, k, v]))

    first, second = step(q, k, v), step(q, k, v)
    for a, b in zip(first, second):
        assert np.array_equal(a.numpy(), b.numpy())


def test_wrapper_rejects_bad_input():
    layout = BlockLayout.dense(64, 16)
    x = tf.random.normal([1, 64, 2, 8])
    with pytest.raises(ValueError, match="q must be"):
        sparse_attention(x[0], x, x, layout)
    with pytest.raises(ValueError, match="exceeds the layout"):
        sparse_attention(tf.random.normal([1, 80, 2, 8]), x, x, layout)
    with pytest.raises(ValueError, match="causal"):
        sparse_attention(x, x, x, layout, causal=False)
    with pytest.raises(TypeError, match="BlockLayout"):
        sparse_attention(x, x, x, "dense")


def test_gradient_with_layout_tensors_that_are_not_constants(op_library):
    """The gradient builds the transposed layout in graph ops when it cannot fold it."""
    layout = BlockLayout.stack([BlockLayout.local(128, 16, 21), BlockLayout.fixed(128, 16, 32, 16)])
    rng = np.random.default_rng(5)
    (q, k, v), (qn, kn, vn) = random_qkv(rng, 1, 128, 2, 8)
    spec = tf.TensorSpec([None], tf.int32)

    @tf.function(input_signature=[spec] * 3)
    def grads(row_offsets, col_indices, block_flags):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            out, _ = op_library.block_sparse_attention(
                q, k, v, tf.zeros([0]), row_offsets, col_indices, block_flags,
                block_size=16, scale=0.5, causal=True, window=21, min_distance=0)
            loss = tf.reduce_sum(out * out)
        return tape.gradient(loss, [q, k, v]), out

    (dq, dk, dv), out = grads(layout.row_offsets, layout.col_indices, layout.block_flags)
    ref_out, _, ref_grads = attention_reference(qn, kn, vn, layout.to_mask(), 0.5, 2 * out.numpy())
    assert relative_error(out.numpy(), ref_out) < 2e-5
    for grad, ref in zip((dq, dk, dv), ref_grads):
        assert relative_error(grad.numpy(), ref) < 1e-4


@pytest.mark.parametrize("time", [256, 200])
def test_pad_and_crop_only_for_sequences_shorter_than_the_layout(time):
    layout = BlockLayout.strided(256, 16, 16)

    @tf.function
    def step(q, k, v):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            out, lse = sparse_attention(q, k, v, layout, return_lse=True)
            loss = tf.reduce_sum(out * out) + tf.reduce_sum(lse)
        return tape.gradient(loss, [q, k, v])

    spec = tf.TensorSpec([2, time, 3, 16], tf.float32)
    graph = step.get_concrete_function(spec, spec, spec).graph
    # Copies of a data tensor; slicing the shape vector for the length does not count.
    copies = {op.type for op in graph.get_operations()
              if op.type in ("Pad", "StridedSlice") and op.inputs[0].shape.rank >= 3}
    assert copies == ({"Pad", "StridedSlice"} if time < 256 else set())
