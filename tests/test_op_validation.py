"""The raw ops BlockSparseAttention and BlockSparseAttentionGrad: input validation (every bad
input is an InvalidArgumentError naming the argument, never a crash) and numerics against a
float64 numpy reference built from the CSR arrays and the token rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tests.op_validation_fuzz import names_argument, transpose_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ_SCRIPT = os.path.join(ROOT, "tests", "op_validation_fuzz.py")


def _load_library():
    try:
        from tf_sparse_attn import _load  # pylint: disable=import-outside-toplevel
        return _load.load_op_library()
    except ImportError as error:
        pytest.skip(f"op library not available: {error}")


@pytest.fixture(scope="module")
def lib():
    return _load_library()


# ------------------------------------------------------------------------------------------
# Inputs.

def random_layout(rng, layout_heads, nqb, nkb, density=0.6, empty_rows=()):
    """A CSR layout with random sorted rows and random windowed flags; rows listed in
    empty_rows as (layout head, query block) get no key block."""
    row_offsets, col_indices = [0], []
    for lh in range(layout_heads):
        for qb in range(nqb):
            if (lh, qb) not in empty_rows:
                col_indices += [kb for kb in range(nkb) if rng.random() < density]
            row_offsets.append(len(col_indices))
    row_offsets = np.array(row_offsets, np.int32)
    col_indices = np.array(col_indices, np.int32)
    block_flags = (rng.random(len(col_indices)) < 0.5).astype(np.int32)
    return row_offsets, col_indices, block_flags


def token_mask(layout, layout_head, nqb, bs, q_len, kv_len, causal, window, min_distance):
    """[q_len, kv_len] bool: the pairs the layout holds and TokenAllowed accepts."""
    row_offsets, col_indices, block_flags = layout
    mask = np.zeros((q_len, kv_len), bool)
    offs = np.arange(bs)
    for qb in range(nqb):
        row = layout_head * nqb + qb
        for e in range(row_offsets[row], row_offsets[row + 1]):
            kb = col_indices[e]
            i = (qb * bs + offs)[:, None]
            j = (kb * bs + offs)[None, :]
            ok = np.ones((bs, bs), bool)
            if causal:
                ok &= j <= i
            if block_flags[e] & 1:
                distance = np.abs(i - j)
                if window > 0:
                    ok &= distance < window
                ok &= distance >= min_distance
            mask[qb * bs:(qb + 1) * bs, kb * bs:(kb + 1) * bs] = ok
    return mask


def reference(q, k, v, key_bias, layout, d_out, d_lse, *, block_size, scale, causal, window,
              min_distance):
    """out, lse, dq, dk, dv in float64 (d_lse included), from the dense token mask."""
    batch, q_len, heads, _ = q.shape
    kv_len = k.shape[1]
    nqb = q_len // block_size
    layout_heads = (len(layout[0]) - 1) // nqb
    out = np.zeros(q.shape[:3] + v.shape[3:])
    lse = np.zeros((batch, heads, q_len))
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    for h in range(heads):
        mask = token_mask(layout, 0 if layout_heads == 1 else h, nqb, block_size, q_len, kv_len,
                          causal, window, min_distance)
        for b in range(batch):
            s = scale * q[b, :, h] @ k[b, :, h].T
            if key_bias is not None:
                s = s + key_bias[b][None, :]
            s = np.where(mask, s, -np.inf)
            peak = s.max(axis=1, keepdims=True)
            peak = np.where(np.isfinite(peak), peak, 0.0)
            weights = np.exp(s - peak)
            total = weights.sum(axis=1, keepdims=True)
            p = weights / np.where(total > 0, total, 1.0)
            o = p @ v[b, :, h]
            out[b, :, h] = o
            with np.errstate(divide="ignore"):
                lse[b, h] = np.where(total[:, 0] > 0, np.log(total[:, 0]) + peak[:, 0], -np.inf)
            do = d_out[b, :, h]
            dp = do @ v[b, :, h].T
            delta = (do * o).sum(axis=1, keepdims=True)
            ds = p * (dp - delta + d_lse[b, h][:, None])
            dq[b, :, h] = scale * ds @ k[b, :, h]
            dk[b, :, h] = scale * ds.T @ q[b, :, h]
            dv[b, :, h] = p.T @ do
    return out, lse, dq, dk, dv


TOLERANCE = {tf.float32: 3e-5, tf.float16: 4e-3, tf.bfloat16: 3e-2}


def _rounded(x, dtype):
    return tf.cast(tf.cast(x, dtype), tf.float64).numpy()


def _assert_close(name, actual, expected, dtype):
    actual = np.asarray(tf.cast(actual, tf.float64))
    assert not np.isnan(actual).any(), f"{name} has NaN"
    scale = max(1.0, np.abs(expected).max())
    error = np.abs(actual - expected).max() / scale
    assert error <= TOLERANCE[dtype], f"{name}: relative error {error:.3g} > {TOLERANCE[dtype]}"


NUMERIC_CASES = {
    # name: batch, q_len, kv_len, heads, head_dim, value_dim, block_size, per-head layout,
    #       causal, window, min_distance, key_bias
    "causal_windowed_per_head": (2, 48, 48, 3, 16, 8, 8, True, True, 10, 2, True),
    "bidirectional_windowed_per_head": (2, 48, 48, 3, 16, 8, 8, True, False, 11, 3, True),
    "causal_shared_32": (1, 128, 128, 2, 64, 64, 32, False, True, 0, 0, False),
    "cross_shared_16": (2, 32, 64, 2, 32, 24, 16, False, False, 0, 0, True),
    "odd_sizes": (1, 21, 27, 2, 5, 7, 3, True, True, 5, 1, True),
}


def run_numeric_case(lib, name, dtype, seed=0):
    (batch, q_len, kv_len, heads, head_dim, value_dim, bs, per_head, causal, window,
     min_distance, with_bias) = NUMERIC_CASES[name]
    rng = np.random.default_rng(seed)
    nqb, nkb = q_len // bs, kv_len // bs
    layout_heads = heads if per_head else 1
    layout = random_layout(rng, layout_heads, nqb, nkb, empty_rows={(0, 0)})
    q = rng.standard_normal((batch, q_len, heads, head_dim))
    k = rng.standard_normal((batch, kv_len, heads, head_dim))
    v = rng.standard_normal((batch, kv_len, heads, value_dim))
    d_out = rng.standard_normal((batch, q_len, heads, value_dim))
    d_lse = rng.standard_normal((batch, heads, q_len))
    key_bias = None
    if with_bias:
        key_bias = rng.standard_normal((batch, kv_len)).astype(np.float32)
        key_bias[rng.random(key_bias.shape) < 0.15] = -np.inf
        key_bias[0, :] = np.where(np.arange(kv_len) < bs, -np.inf, key_bias[0, :])
    attrs = dict(block_size=bs, scale=float(head_dim) ** -0.5, causal=causal, window=window,
                 min_distance=min_distance)
    q, k, v, d_out = (_rounded(x, dtype) for x in (q, k, v, d_out))
    d_lse = d_lse.astype(np.float32)
    bias_t = tf.constant(key_bias if with_bias else np.zeros([0], np.float32))
    csc = transpose_layout(*layout, nqb, nkb)
    args = [tf.cast(x, dtype) for x in (q, k, v)] + [bias_t] + [tf.constant(a) for a in layout]
    out, lse = lib.block_sparse_attention(*args, **attrs)
    dq, dk, dv = lib.block_sparse_attention_grad(
        *args, out, lse, tf.cast(d_out, dtype), tf.constant(d_lse),
        *[tf.constant(a) for a in csc], **attrs)
    expected = reference(q, k, v, key_bias, layout, d_out, d_lse.astype(np.float64), **attrs)

    assert out.dtype == dtype and dq.dtype == dtype and lse.dtype == tf.float32
    _assert_close("out", out, expected[0], dtype)
    lse = lse.numpy()
    assert not np.isnan(lse).any()
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(expected[1]))
    finite = np.isfinite(expected[1])
    assert np.isfinite(lse[finite]).all()
    _assert_close("lse", np.where(finite, lse, 0), np.where(finite, expected[1], 0), dtype)
    for label, actual, want in zip(("dq", "dk", "dv"), (dq, dk, dv), expected[2:]):
        _assert_close(label, actual, want, dtype)
    # Query block 0 of layout head 0 attends nothing: zeros and -inf, never NaN.
    assert np.all(tf.cast(out, tf.float32).numpy()[:, :bs, 0] == 0)
    assert np.all(np.isneginf(lse[:, 0, :bs]))
    return [np.asarray(tf.cast(t, tf.float32)) for t in (out, lse, dq, dk, dv)]


@pytest.mark.parametrize("dtype", [tf.float32, tf.float16, tf.bfloat16], ids=lambda d: d.name)
@pytest.mark.parametrize("name", list(NUMERIC_CASES))
def test_numerics_against_float64_reference(lib, name, dtype):
    run_numeric_case(lib, name, dtype)


def _subprocess_env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **extra)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


NARROW_ISA_PROGRAM = """
import sys, numpy as np, tensorflow as tf
from tests import test_op_validation as t
lib = t._load_library()
for name in t.NUMERIC_CASES:
    for dtype in (tf.float32, tf.float16):
        t.run_numeric_case(lib, name, dtype)
print("ok")
"""


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_narrower_instruction_sets(lib, isa):
    """The kernels built for older CPUs give the same results (run in a fresh process, since
    the choice is made once per process)."""
    proc = subprocess.run([sys.executable, "-c", NARROW_ISA_PROGRAM], cwd=ROOT, timeout=300,
                          env=_subprocess_env(TF_SPARSE_ATTN_CPU_ISA=isa),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


SINGLE_THREAD_PROGRAM = """
import sys, numpy as np, tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
from tests import test_op_validation as t
results = t.run_numeric_case(t._load_library(), "causal_shared_32", tf.float32, seed=3)
np.savez(sys.argv[1], *results)
"""


def test_results_do_not_depend_on_threads(lib, tmp_path):
    path = str(tmp_path / "single_thread.npz")
    proc = subprocess.run([sys.executable, "-c", SINGLE_THREAD_PROGRAM, path], cwd=ROOT,
                          timeout=300, env=_subprocess_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single = np.load(path)
    threaded = run_numeric_case(lib, "causal_shared_32", tf.float32, seed=3)
    for i, array in enumerate(threaded):
        np.testing.assert_array_equal(array, single[f"arr_{i}"])


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16], ids=lambda d: d.name)
def test_every_low_precision_value_round_trips(lib, dtype):
    """One allowed key per query makes out = v exactly: every bit pattern of the dtype
    (subnormals, infinities, NaN included) must survive the kernel's conversions."""
    bits = np.arange(65536, dtype=np.uint16)
    values = tf.bitcast(tf.constant(bits), dtype)
    n = bits.size
    v = tf.reshape(values, [1, n, 1, 1])
    q = k = tf.zeros([1, n, 1, 1], dtype)
    diagonal = (np.arange(n + 1, dtype=np.int32), np.arange(n, dtype=np.int32),
                np.zeros(n, np.int32))
    out, _ = lib.block_sparse_attention(q, k, v, tf.zeros([0]), *diagonal, block_size=1,
                                        scale=1.0, causal=True)
    got = tf.bitcast(tf.reshape(out, [-1]), tf.uint16).numpy()
    as_float = tf.cast(values, tf.float32).numpy()
    want_nan = np.isnan(as_float)
    # 0 + 1 * (-0) accumulates to +0, and TensorFlow runs CPU kernels with denormal floats
    # flushed to zero (bfloat16 subnormals are float32 subnormals).
    flushed = (bits == 0x8000) | ((as_float != 0) & (np.abs(as_float) < np.finfo(np.float32).tiny))
    want = np.where(flushed, 0, bits)
    np.testing.assert_array_equal(got[~want_nan], want[~want_nan])
    assert np.isnan(tf.cast(tf.reshape(out, [-1]), tf.float32).numpy()[want_nan]).all()


def test_zero_batch_gives_empty_outputs(lib):
    q = tf.zeros([0, 16, 2, 4])
    layout = [tf.constant([0, 1, 2], tf.int32), tf.constant([0, 1], tf.int32),
              tf.constant([0, 0], tf.int32)]
    out, lse = lib.block_sparse_attention(q, q, q, tf.zeros([0]), *layout, block_size=8,
                                          scale=1.0)
    assert out.shape == (0, 16, 2, 4) and lse.shape == (0, 2, 16)
    dq, dk, dv = lib.block_sparse_attention_grad(q, q, q, tf.zeros([0]), *layout, out, lse, out,
                                                 lse, *layout, block_size=8, scale=1.0)
    assert dq.shape == dk.shape == dv.shape == (0, 16, 2, 4)


# ------------------------------------------------------------------------------------------
# Validation: one direct case per check, each asserting the message names the argument.

def _valid_inputs():
    """batch 2, q_len 16, kv_len 24, 2 heads, head_dim 4, value_dim 3, block 8: a shared
    layout of 2 query blocks x 3 key blocks."""
    rng = np.random.default_rng(0)
    inputs = dict(
        q=rng.standard_normal((2, 16, 2, 4)).astype(np.float32),
        k=rng.standard_normal((2, 24, 2, 4)).astype(np.float32),
        v=rng.standard_normal((2, 24, 2, 3)).astype(np.float32),
        key_bias=np.zeros((2, 24), np.float32),
        row_offsets=np.array([0, 2, 5], np.int32),
        col_indices=np.array([0, 2, 0, 1, 2], np.int32),
        block_flags=np.array([0, 1, 0, 0, 1], np.int32),
    )
    csc = transpose_layout(inputs["row_offsets"], inputs["col_indices"], inputs["block_flags"],
                           2, 3)
    inputs.update(
        out=np.zeros((2, 16, 2, 3), np.float32), lse=np.zeros((2, 2, 16), np.float32),
        d_out=np.zeros((2, 16, 2, 3), np.float32), d_lse=np.zeros((2, 2, 16), np.float32),
        col_offsets=csc[0], row_indices=csc[1], csc_flags=csc[2])
    return inputs


FORWARD_NAMES = ["q", "k", "v", "key_bias", "row_offsets", "col_indices", "block_flags"]
GRAD_NAMES = FORWARD_NAMES + ["out", "lse", "d_out", "d_lse", "col_offsets", "row_indices",
                              "csc_flags"]


def _call(lib, inputs, grad, **attrs):
    attrs = dict(dict(block_size=8, scale=0.5, causal=True, window=0, min_distance=0), **attrs)
    if grad:
        return lib.block_sparse_attention_grad(*[inputs[n] for n in GRAD_NAMES], **attrs)
    return lib.block_sparse_attention(*[inputs[n] for n in FORWARD_NAMES], **attrs)


def _set(name, value):
    return lambda x: x.update({name: np.asarray(value)})


def _edit(name, fn):
    def apply(inputs):
        array = inputs[name].copy()
        result = fn(array)
        inputs[name] = array if result is None else result
    return apply


BAD_INPUTS = [
    # (case id, mutation, argument the message must name, grad only)
    ("q_rank", _set("q", np.zeros((2, 16, 8), np.float32)), "q", False),
    ("k_rank", _set("k", np.zeros((2, 24, 2, 4, 1), np.float32)), "k", False),
    ("v_rank", _set("v", np.zeros((2, 24, 6), np.float32)), "v", False),
    ("k_batch", _set("k", np.zeros((3, 24, 2, 4), np.float32)), "k", False),
    ("v_batch", _set("v", np.zeros((1, 24, 2, 3), np.float32)), "v", False),
    ("k_heads", _set("k", np.zeros((2, 24, 3, 4), np.float32)), "k", False),
    ("v_heads", _set("v", np.zeros((2, 24, 1, 3), np.float32)), "v", False),
    ("k_head_dim", _set("k", np.zeros((2, 24, 2, 5), np.float32)), "k", False),
    ("v_length", _set("v", np.zeros((2, 16, 2, 3), np.float32)), "v", False),
    ("head_dim_zero", lambda x: x.update(q=np.zeros((2, 16, 2, 0), np.float32),
                                         k=np.zeros((2, 24, 2, 0), np.float32)), "q", False),
    ("value_dim_zero", _set("v", np.zeros((2, 24, 2, 0), np.float32)), "v", False),
    ("heads_zero", lambda x: x.update(q=np.zeros((2, 16, 0, 4), np.float32),
                                      k=np.zeros((2, 24, 0, 4), np.float32),
                                      v=np.zeros((2, 24, 0, 3), np.float32)), "q", False),
    ("q_len_zero", _set("q", np.zeros((2, 0, 2, 4), np.float32)), "q", False),
    ("q_len_not_block_multiple", _set("q", np.zeros((2, 12, 2, 4), np.float32)), "q_len", False),
    ("kv_len_not_block_multiple",
     lambda x: x.update(k=np.zeros((2, 20, 2, 4), np.float32),
                        v=np.zeros((2, 20, 2, 3), np.float32)), "kv_len", False),
    ("key_bias_shape", _set("key_bias", np.zeros((2, 16), np.float32)), "key_bias", False),
    ("key_bias_rank", _set("key_bias", np.zeros((24,), np.float32)), "key_bias", False),
    ("row_offsets_length", _set("row_offsets", np.array([0, 5], np.int32)), "row_offsets", False),
    ("row_offsets_rank", _set("row_offsets", np.array([[0, 2, 5]], np.int32)), "row_offsets",
     False),
    ("row_offsets_first", _edit("row_offsets", lambda a: a.__setitem__(0, 1)), "row_offsets",
     False),
    ("row_offsets_decreasing", _set("row_offsets", np.array([0, 6, 5], np.int32)),
     "row_offsets", False),
    ("row_offsets_last", _set("row_offsets", np.array([0, 2, 4], np.int32)), "row_offsets",
     False),
    ("row_offsets_negative", _set("row_offsets", np.array([0, -1, 5], np.int32)),
     "row_offsets", False),
    ("col_indices_rank", _set("col_indices", np.zeros((5, 1), np.int32)), "col_indices", False),
    ("col_indices_too_large", _edit("col_indices", lambda a: a.__setitem__(1, 3)),
     "col_indices", False),
    ("col_indices_negative", _edit("col_indices", lambda a: a.__setitem__(2, -1)),
     "col_indices", False),
    ("col_indices_int32_max", _edit("col_indices", lambda a: a.__setitem__(4, 2**31 - 1)),
     "col_indices", False),
    ("col_indices_unsorted", _set("col_indices", np.array([2, 0, 0, 1, 2], np.int32)),
     "col_indices", False),
    ("col_indices_duplicate", _set("col_indices", np.array([0, 2, 0, 1, 1], np.int32)),
     "col_indices", False),
    ("block_flags_length", _set("block_flags", np.zeros(4, np.int32)), "block_flags", False),
    ("block_flags_reserved_bit", _edit("block_flags", lambda a: a.__setitem__(0, 2)),
     "block_flags", False),
    ("block_flags_negative", _edit("block_flags", lambda a: a.__setitem__(3, -1)),
     "block_flags", False),
    ("out_shape", _set("out", np.zeros((2, 16, 2, 4), np.float32)), "out", True),
    ("d_out_shape", _set("d_out", np.zeros((2, 8, 2, 3), np.float32)), "d_out", True),
    ("lse_shape", _set("lse", np.zeros((2, 16, 2), np.float32)), "lse", True),
    ("d_lse_shape", _set("d_lse", np.zeros((2, 2, 15), np.float32)), "d_lse", True),
    ("col_offsets_length", _set("col_offsets", np.array([0, 2, 5], np.int32)), "col_offsets",
     True),
    ("col_offsets_first", _edit("col_offsets", lambda a: a.__setitem__(0, -1)), "col_offsets",
     True),
    ("col_offsets_last", _edit("col_offsets", lambda a: a.__setitem__(3, 4)), "col_offsets",
     True),
    ("col_offsets_moved_boundary", _set("col_offsets", np.array([0, 1, 3, 5], np.int32)),
     "row_indices", True),
    ("row_indices_out_of_range", _edit("row_indices", lambda a: a.__setitem__(0, 2)),
     "row_indices", True),
    ("row_indices_not_transpose", _edit("row_indices", lambda a: a.__setitem__(2, 0)),
     "row_indices", True),
    ("row_indices_missing_entry",
     lambda x: x.update(col_offsets=np.array([0, 2, 3, 4], np.int32),
                        row_indices=np.array([0, 1, 1, 0], np.int32),
                        csc_flags=np.array([0, 0, 0, 1], np.int32)), "row_indices", True),
    ("csc_flags_differ", _edit("csc_flags", lambda a: a.__setitem__(0, 1 - a[0])), "csc_flags",
     True),
    ("csc_flags_length", _set("csc_flags", np.zeros(6, np.int32)), "csc_flags", True),
    ("csc_flags_reserved_bit", _edit("csc_flags", lambda a: a.__setitem__(1, 4)), "csc_flags",
     True),
    ("csc_layout_heads",
     _set("col_offsets", np.array([0, 2, 3, 5, 5, 5, 5], np.int32)), "col_offsets", True),
]


BAD_INPUT_CALLS = [(case_id, mutate, name, grad)
                   for grad in (False, True)
                   for case_id, mutate, name, grad_only in BAD_INPUTS if grad or not grad_only]


@pytest.mark.parametrize(
    "case_id,mutate,name,grad", BAD_INPUT_CALLS,
    ids=[f"{c[0]}-{'grad' if c[3] else 'forward'}" for c in BAD_INPUT_CALLS])
def test_bad_input_is_rejected_naming_it(lib, case_id, mutate, name, grad):
    del case_id
    inputs = _valid_inputs()
    _call(lib, inputs, grad)  # the unmodified inputs are accepted
    mutate(inputs)
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        _call(lib, inputs, grad)
    assert names_argument(info.value.message, name), info.value.message


@pytest.mark.parametrize("attrs,name", [
    (dict(block_size=2048), "block_size"),
    (dict(scale=float("nan")), "scale"),
    (dict(scale=float("inf")), "scale"),
])
def test_bad_attribute_is_rejected_naming_it(lib, attrs, name):
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        _call(lib, _valid_inputs(), False, **attrs)
    assert names_argument(info.value.message, name), info.value.message


@pytest.mark.parametrize("shape", [[0, 2**20, 64, 64], [0, 2**40, 2**30, 2**30]])
def test_sizes_beyond_int32_are_rejected(lib, shape):
    # A zero batch allows huge other dimensions without memory, and products of them that
    # overflow int64 if multiplied naively.
    q = tf.zeros(shape)
    nqb = 2**20 // 1024
    layout = [np.zeros(nqb + 1, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32)]
    with pytest.raises(tf.errors.InvalidArgumentError, match="32-bit") as info:
        lib.block_sparse_attention(q, q, q, tf.zeros([0]), *layout, block_size=1024, scale=1.0)
    assert names_argument(info.value.message, "q"), info.value.message


def test_dtype_mismatch_is_rejected(lib):
    inputs = {name: tf.constant(value) for name, value in _valid_inputs().items()}
    inputs["k"] = tf.cast(inputs["k"], tf.float16)
    with pytest.raises((tf.errors.InvalidArgumentError, TypeError)):
        _call(lib, inputs, False)


def test_fuzzed_malformed_inputs_in_subprocess():
    """Hundreds of hypothesis-generated malformed layouts and shapes; run in a subprocess so
    that a crash fails this test instead of the test run."""
    _load_library()
    proc = subprocess.run([sys.executable, FUZZ_SCRIPT, "--examples", "600"], cwd=ROOT,
                          timeout=600, env=_subprocess_env(), capture_output=True, text=True)
    assert proc.returncode == 0, (f"exit code {proc.returncode}\n{proc.stdout[-4000:]}\n"
                                  f"{proc.stderr[-4000:]}")
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    malformed = sum(n for kind, n in counts.items() if kind not in ("valid", "garbage_accepted"))
    assert malformed >= 500, counts
    assert counts.get("valid", 0) >= 50, counts
