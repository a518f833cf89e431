"""The CUDA kernels against the CPU op and a float64 reference (skipped where no GPU is visible).

Every call poisons the outputs with NaN first (TF_SPARSE_ATTN_GPU_POISON), so an element that no
kernel writes fails the comparison. Inputs are fresh random draws per case; lengths are odd so
that the wrapper pads and the kernels see partial tiles; batch * heads is odd.
"""

import math
import os

os.environ["TF_SPARSE_ATTN_GPU_POISON"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.python.framework import config  # noqa: E402

from tf_sparse_attn import BlockLayout, sparse_attention  # noqa: E402
from tf_sparse_attn._load import load_op_library  # noqa: E402
from tests.reference import TOLERANCE, attention_reference, relative_error  # noqa: E402

pytestmark = pytest.mark.gpu

# float32 runs in float32 arithmetic on the GPU (no TF32), so its tolerance is float32's.
DTYPES = [tf.float16, tf.bfloat16, tf.float32]


def make_layout(pattern, seq_len, block_size, causal, heads):
    if pattern == "dense":
        return BlockLayout.dense(seq_len, block_size, causal)
    if pattern == "local":
        return BlockLayout.local(seq_len, block_size, 2 * block_size + 5, causal)
    if pattern == "strided":
        return BlockLayout.strided(seq_len, block_size, seq_len // (2 * block_size), causal)
    if pattern == "strided_exclusive":
        return BlockLayout.strided(seq_len, block_size, seq_len // (2 * block_size), causal,
                                   exclude_window=3 * seq_len // (2 * block_size))
    if pattern == "fixed":
        return BlockLayout.fixed(seq_len, block_size, 4 * block_size, block_size, causal)
    if pattern == "fixed_per_head":
        return BlockLayout.fixed(seq_len, block_size, 4 * block_size, block_size, causal,
                                 num_heads=heads, num_summary_groups=2)
    if pattern == "local_fixed_union":
        return BlockLayout.union(BlockLayout.local(seq_len, block_size, block_size + 3, causal),
                                 BlockLayout.fixed(seq_len, block_size, 4 * block_size,
                                                   block_size, causal))
    raise ValueError(pattern)


PATTERNS = ["dense", "local", "strided", "strided_exclusive", "fixed", "fixed_per_head",
            "local_fixed_union"]


def run(device, q, k, v, layout, causal, d_out, d_lse, key_mask=None):
    with tf.device(device):
        q, k, v = (tf.identity(t) for t in (q, k, v))
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            out, lse = sparse_attention(q, k, v, layout, causal=causal, return_lse=True,
                                        key_mask=key_mask)
            loss = tf.reduce_sum(tf.cast(out, tf.float64) * d_out) + tf.reduce_sum(
                tf.where(tf.math.is_finite(lse), tf.cast(lse, tf.float64) * d_lse, 0.0))
        grads = tape.gradient(loss, [q, k, v])
    return [t.numpy() for t in [out, lse, *grads]]


def check(pattern, dtype, dim, block_size, causal=True, *, seed, heads=3, batch=1,
          blocks=8, trim=5, key_mask=False, compare_cpu=True):
    rng = np.random.default_rng(seed)
    layout = make_layout(pattern, blocks * block_size, block_size, causal, heads)
    time = layout.seq_len - trim
    shape = (batch, time, heads, dim)
    arrays = [rng.standard_normal(shape) for _ in range(3)]
    q, k, v = (tf.cast(tf.constant(a, tf.float32), dtype) for a in arrays)
    qn, kn, vn = (t.numpy().astype(np.float64) for t in (q, k, v))
    d_out = rng.standard_normal(shape)
    d_lse = rng.standard_normal((batch, heads, time))
    mask = layout.to_mask(causal)[:, :time, :time]
    km = None
    if key_mask:
        km = rng.random((batch, time)) > 0.3
        mask = mask[None] & km[:, None, None, :]
    got = run("/GPU:0", q, k, v, layout, causal, d_out, d_lse, km)
    ref_out, ref_lse, ref_grads = attention_reference(qn, kn, vn, mask, 1 / math.sqrt(dim),
                                                      d_out, d_lse)
    tol = TOLERANCE[tf.as_dtype(dtype).name]
    names = ["out", "lse", "dq", "dk", "dv"]
    refs = [ref_out, ref_lse, *ref_grads]
    for name, actual, expected in zip(names, got, refs):
        factor = 1 if name in ("out", "lse") else 4
        err = relative_error(actual, expected)
        assert err < factor * tol, f"{name}: relative error {err:.2e} vs float64"
    if compare_cpu:
        cpu = run("/CPU:0", q, k, v, layout, causal, d_out, d_lse, km)
        for name, actual, expected in zip(names, got, cpu):
            factor = 2 if name in ("out", "lse") else 8
            err = relative_error(actual, expected.astype(np.float64))
            assert err < factor * tol, f"{name}: relative error {err:.2e} vs the CPU op"
    return got


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("dim", [32, 64, 128])
def test_patterns(pattern, dtype, dim):
    check(pattern, dtype, dim, 16, seed=hash((pattern, dtype.name, dim)) % 2**31)


@pytest.mark.parametrize("block_size", [16, 32, 48, 64, 128])
@pytest.mark.parametrize("pattern", ["dense", "local", "fixed", "strided"])
@pytest.mark.parametrize("dtype", [tf.bfloat16, tf.float16], ids=lambda d: d.name)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_block_sizes(block_size, pattern, dtype, causal):
    blocks = max(4, 512 // block_size)
    check(pattern, dtype, 64, block_size, causal, blocks=blocks, trim=block_size // 2 + 3,
          seed=block_size * 7 + len(pattern), compare_cpu=block_size <= 64)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_bidirectional(pattern, dtype):
    check(pattern, dtype, 64, 32, causal=False, seed=11 + len(pattern))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_key_mask(dtype, causal):
    check("fixed", dtype, 64, 16, causal, batch=3, heads=5, key_mask=True, seed=5)


@pytest.mark.parametrize("dtype", [tf.bfloat16, tf.float32], ids=lambda d: d.name)
def test_other_head_dims(dtype):
    # No tensor-core instantiation for 48: the scalar kernels take it.
    check("fixed", dtype, 48, 16, seed=3)


def test_longer_sequence_many_tiles():
    check("fixed", tf.bfloat16, 64, 32, batch=2, heads=3, blocks=64, trim=7, seed=9,
          compare_cpu=False)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", [tf.bfloat16, tf.float16], ids=lambda d: d.name)
@pytest.mark.parametrize("dim", [32, 64, 128])
def test_atomic_dq(pattern, dtype, dim, monkeypatch):
    # dq summed in float32 by the dk/dv kernel, whatever the layout would pick.
    monkeypatch.setenv("TF_SPARSE_ATTN_GPU_DQ", "atomic")
    check(pattern, dtype, dim, 16, seed=hash((pattern, dtype.name, dim, "atomic")) % 2**31)


@pytest.mark.parametrize("block_size", [32, 64, 128])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_atomic_dq_block_sizes(block_size, causal, monkeypatch):
    monkeypatch.setenv("TF_SPARSE_ATTN_GPU_DQ", "atomic")
    check("fixed", tf.bfloat16, 64, block_size, causal, blocks=max(4, 512 // block_size),
          trim=block_size // 2 + 3, batch=2, key_mask=True, seed=block_size + causal)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_atomic_dq_many_steps(causal, monkeypatch):
    # 64-key tiles walking 16 steps of queries, each adding its products to the accumulator.
    monkeypatch.setenv("TF_SPARSE_ATTN_GPU_DQ", "atomic")
    check("dense", tf.bfloat16, 64, 64, causal, blocks=16, trim=37, heads=2, seed=31 + causal,
          compare_cpu=False)


def test_dense_long_sequence(monkeypatch):
    # A query attends 2,080 keys on average: the layout itself picks the accumulator, except at
    # head_dim 64 on Hopper, where the sm_90a dq kernel makes the deterministic pair as fast.
    monkeypatch.delenv("TF_SPARSE_ATTN_GPU_DQ", raising=False)
    check("dense", tf.bfloat16, 64, 64, blocks=64, trim=21, heads=2, seed=41, compare_cpu=False)


@pytest.fixture
def op_determinism():
    config.enable_op_determinism()
    try:
        yield
    finally:
        config.disable_op_determinism()


def test_deterministic(op_determinism, monkeypatch):
    # Op determinism outranks a request for atomics.
    monkeypatch.setenv("TF_SPARSE_ATTN_GPU_DQ", "atomic")
    args = dict(seed=21, heads=3, blocks=16, compare_cpu=False)
    first = check("dense", tf.bfloat16, 64, 32, **args)
    second = check("dense", tf.bfloat16, 64, 32, **args)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", [tf.bfloat16, tf.float16], ids=lambda d: d.name)
def test_sm80_kernels(pattern, dtype, monkeypatch):
    # On Hopper the head_dim 64 forward, dq and dk/dv run on warpgroup products; this keeps the
    # sm_80 kernels, which other GPUs run, covered there too (64- and 128-row tiles, masks, key
    # bias).
    monkeypatch.setenv("TF_SPARSE_ATTN_GPU_WGMMA", "0")
    check(pattern, dtype, 64, 16, seed=hash((pattern, dtype.name, "sm80")) % 2**31)
    check(pattern, dtype, 64, 32, key_mask=True, blocks=12, trim=9,
          seed=hash((pattern, dtype.name, "sm80", "mask")) % 2**31, compare_cpu=False)


@pytest.mark.parametrize("dtype", [tf.bfloat16, tf.float16], ids=lambda d: d.name)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_head_dim_64_many_steps(dtype, causal):
    # 128-row query tiles and 64-key tiles walking many steps, with a key mask: whichever kernels
    # the GPU runs by default at head_dim 64.
    check("dense", dtype, 64, 64, causal, blocks=12, trim=29, heads=2, key_mask=True,
          seed=51 + causal, compare_cpu=False)


def test_unknown_wgmma_mode_is_an_error(monkeypatch):
    monkeypatch.setenv("TF_SPARSE_ATTN_GPU_WGMMA", "yes")
    with pytest.raises(tf.errors.InvalidArgumentError, match="TF_SPARSE_ATTN_GPU_WGMMA"):
        check("dense", tf.bfloat16, 64, 16, seed=1, compare_cpu=False)


def test_unknown_dq_mode_is_an_error(monkeypatch):
    monkeypatch.setenv("TF_SPARSE_ATTN_GPU_DQ", "fast")
    with pytest.raises(tf.errors.InvalidArgumentError, match="TF_SPARSE_ATTN_GPU_DQ"):
        check("dense", tf.bfloat16, 64, 16, seed=1, compare_cpu=False)


def raw_inputs(time=64, block_size=16, dtype=tf.bfloat16):
    layout = BlockLayout.dense(time, block_size)
    q = tf.random.normal([1, time, 2, 64], dtype=tf.float32)
    q = tf.cast(q, dtype)
    return layout, q


@pytest.mark.parametrize("defect", ["offsets", "index", "unsorted", "length"])
def test_bad_layout_raises_on_gpu(defect):
    layout, q = raw_inputs()
    row_offsets = np.array(layout.row_offsets)
    col_indices = np.array(layout.col_indices)
    flags = np.array(layout.block_flags)
    time = 64
    if defect == "offsets":
        row_offsets[2] = row_offsets[-1] + 5
    elif defect == "index":
        col_indices[-1] = 1000
    elif defect == "unsorted":
        col_indices[1], col_indices[2] = col_indices[2], col_indices[1]
    else:
        time = 60  # not a multiple of the block size
    with tf.device("/GPU:0"):
        x = q[:, :time]
        with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
            out = load_op_library().block_sparse_attention(
                x, x, x, tf.zeros([0]), row_offsets, col_indices, flags, block_size=16,
                scale=0.125, causal=True)
            out[0].numpy()


def test_block_size_not_multiple_of_16_is_an_error_not_a_crash():
    layout = BlockLayout.dense(64, 8)
    q = tf.cast(tf.random.normal([1, 64, 2, 64]), tf.bfloat16)
    with tf.device("/GPU:0"):
        with pytest.raises(tf.errors.InvalidArgumentError):
            load_op_library().block_sparse_attention(
                q, q, q, tf.zeros([0]), layout.row_offsets, layout.col_indices,
                layout.block_flags, block_size=8, scale=0.125, causal=True)[0].numpy()


def test_keras_model_trains_on_gpu():
    keras = tf.keras
    layout = BlockLayout.fixed(128, 16, 64, 16)

    class Attention(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.qkv = keras.layers.Dense(3 * 4 * 32)
            self.proj = keras.layers.Dense(32)

        def call(self, x):
            b, t = tf.shape(x)[0], tf.shape(x)[1]
            q, k, v = tf.split(tf.reshape(self.qkv(x), [b, t, 4, 3 * 32]), 3, axis=-1)
            out = sparse_attention(q, k, v, layout)
            return self.proj(tf.reshape(out, [b, t, 4 * 32]))

    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 128, 32)).astype(np.float32)
    y = np.roll(x, 1, axis=1)  # predict the previous token: attention must look back
    with tf.device("/GPU:0"):
        inputs = keras.Input((128, 32))
        model = keras.Model(inputs, Attention()(inputs))
        model.compile(keras.optimizers.Adam(3e-3), "mse", jit_compile=False)
        first = model.evaluate(x, y, verbose=0)
        model.fit(x, y, epochs=25, batch_size=16, verbose=0)
        last = model.evaluate(x, y, verbose=0)
    assert np.isfinite(last) and last < 0.97 * first
