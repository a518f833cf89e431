"""Feeds the raw BlockSparseAttention / BlockSparseAttentionGrad ops random malformed inputs.

Run as a script (tests/test_op_validation.py starts it in a subprocess, so that a crash in a
kernel fails that test instead of killing pytest):

    python tests/op_validation_fuzz.py --examples 300

Every malformed case must raise InvalidArgumentError whose message names the bad argument;
every well-formed case must run and give no NaN. Exits 0 and prints a JSON summary on success.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def load_library():
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        from tf_sparse_attn import _load  # pylint: disable=import-outside-toplevel
    except ImportError:
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "tf_sparse_attn", "_sparse_attention_ops.so")
        return tf.load_op_library(path)
    return _load.load_op_library()


def transpose_layout(row_offsets, col_indices, block_flags, num_q_blocks, num_kv_blocks):
    """The CSC form of a CSR layout, in numpy."""
    layout_heads = (len(row_offsets) - 1) // num_q_blocks
    entries = []
    for lh in range(layout_heads):
        for qb in range(num_q_blocks):
            row = lh * num_q_blocks + qb
            for e in range(row_offsets[row], row_offsets[row + 1]):
                entries.append((lh * num_kv_blocks + col_indices[e], qb, block_flags[e]))
    entries.sort()
    counts = np.zeros(layout_heads * num_kv_blocks + 1, np.int64)
    for column, _, _ in entries:
        counts[column + 1] += 1
    return (np.cumsum(counts).astype(np.int32),
            np.array([qb for _, qb, _ in entries], np.int32),
            np.array([f for _, _, f in entries], np.int32))


def names_argument(message: str, name: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", message) is not None


class Case:
    """One call of the op: arrays and attributes, mutable by the malformations below."""

    def __init__(self, draw, grad: bool):
        self.grad = grad
        self.batch = draw(st.integers(0, 2))
        self.heads = draw(st.integers(1, 3))
        self.block_size = draw(st.sampled_from([1, 2, 3, 4, 8]))
        self.nqb = draw(st.integers(1, 4))
        self.nkb = draw(st.integers(1, 4))
        self.head_dim = draw(st.integers(1, 5))
        self.value_dim = draw(st.integers(1, 5))
        layout_heads = draw(st.sampled_from([1, self.heads]))
        row_offsets, col_indices = [0], []
        for _ in range(layout_heads * self.nqb):
            cols = draw(st.lists(st.integers(0, self.nkb - 1), unique=True, max_size=self.nkb))
            col_indices += sorted(cols)
            row_offsets.append(len(col_indices))
        self.row_offsets = np.array(row_offsets, np.int32)
        self.col_indices = np.array(col_indices, np.int32)
        self.block_flags = np.array(
            draw(st.lists(st.integers(0, 1), min_size=len(col_indices),
                          max_size=len(col_indices))), np.int32)
        self.attrs = dict(block_size=self.block_size,
                          scale=draw(st.floats(-2.0, 2.0, allow_nan=False)),
                          causal=draw(st.booleans()),
                          window=draw(st.integers(0, 12)),
                          min_distance=draw(st.integers(0, 4)))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        q_len, kv_len = self.nqb * self.block_size, self.nkb * self.block_size
        self.q = rng.standard_normal((self.batch, q_len, self.heads, self.head_dim))
        self.k = rng.standard_normal((self.batch, kv_len, self.heads, self.head_dim))
        self.v = rng.standard_normal((self.batch, kv_len, self.heads, self.value_dim))
        if draw(st.booleans()):
            self.key_bias = rng.standard_normal((self.batch, kv_len)).astype(np.float32)
            self.key_bias[rng.random(self.key_bias.shape) < 0.2] = -np.inf
        else:
            self.key_bias = np.zeros([0], np.float32)
        self.dtype = draw(st.sampled_from([tf.float32, tf.float16, tf.bfloat16]))
        self.col_offsets, self.row_indices, self.csc_flags = transpose_layout(
            self.row_offsets, self.col_indices, self.block_flags, self.nqb, self.nkb)
        self.out = rng.standard_normal((self.batch, q_len, self.heads, self.value_dim))
        self.d_out = rng.standard_normal(self.out.shape)
        self.lse = rng.standard_normal((self.batch, self.heads, q_len)).astype(np.float32)
        self.d_lse = rng.standard_normal(self.lse.shape).astype(np.float32)

    def ensure_entry(self):
        """Makes sure the layout has at least one block (kept valid)."""
        if len(self.col_indices) == 0:
            self.col_indices = np.array([0], np.int32)
            self.block_flags = np.array([0], np.int32)
            self.row_offsets = self.row_offsets.copy()
            self.row_offsets[1:] = 1
            self.col_offsets, self.row_indices, self.csc_flags = transpose_layout(
                self.row_offsets, self.col_indices, self.block_flags, self.nqb, self.nkb)

    def run(self, lib):
        cast = lambda x: tf.cast(tf.constant(x), self.dtype)  # noqa: E731
        forward = (cast(self.q), cast(self.k), cast(self.v), tf.constant(self.key_bias),
                   tf.constant(self.row_offsets), tf.constant(self.col_indices),
                   tf.constant(self.block_flags))
        if not self.grad:
            return lib.block_sparse_attention(*forward, **self.attrs)
        return lib.block_sparse_attention_grad(
            *forward, cast(self.out), tf.constant(self.lse), cast(self.d_out),
            tf.constant(self.d_lse), tf.constant(self.col_offsets),
            tf.constant(self.row_indices), tf.constant(self.csc_flags), **self.attrs)


def _int32_outside(draw, low, high):
    """An int32 outside [low, high)."""
    choices = []
    if low > INT32_MIN:
        choices.append(st.integers(INT32_MIN, low - 1))
    if high <= INT32_MAX:
        choices.append(st.integers(high, INT32_MAX))
    return draw(st.one_of(*choices))


# Each malformation mutates a well-formed case and returns the argument the error must name.
def col_out_of_range(draw, c):
    c.ensure_entry()
    e = draw(st.integers(0, len(c.col_indices) - 1))
    c.col_indices = c.col_indices.copy()
    c.col_indices[e] = _int32_outside(draw, 0, c.nkb)
    return "col_indices"


def col_not_increasing(draw, c):
    rows = [r for r in range(len(c.row_offsets) - 1)
            if c.row_offsets[r + 1] - c.row_offsets[r] >= 2]
    if rows:
        r = draw(st.sampled_from(rows))
        e = draw(st.integers(c.row_offsets[r], c.row_offsets[r + 1] - 2))
        c.col_indices = c.col_indices.copy()
        c.col_indices[e + 1] = draw(st.integers(0, int(c.col_indices[e])))
    else:  # put a duplicated block into the first row
        kb = draw(st.integers(0, c.nkb - 1))
        c.col_indices = np.concatenate([[kb, kb], c.col_indices]).astype(np.int32)
        c.block_flags = np.concatenate([[0, 0], c.block_flags]).astype(np.int32)
        c.row_offsets = c.row_offsets + 2
        c.row_offsets[0] = 0
    return "col_indices"


def offsets_first_nonzero(draw, c):
    c.row_offsets = c.row_offsets.copy()
    c.row_offsets[0] = draw(st.integers(INT32_MIN, INT32_MAX).filter(lambda x: x != 0))
    return "row_offsets"


def offsets_last_mismatch(draw, c):
    c.row_offsets = c.row_offsets.copy()
    nnz = len(c.col_indices)
    c.row_offsets[-1] = draw(st.integers(INT32_MIN, INT32_MAX).filter(lambda x: x != nnz))
    return "row_offsets"


def offsets_decreasing(draw, c):
    if len(c.row_offsets) < 3:
        return offsets_last_mismatch(draw, c)
    g = draw(st.integers(1, len(c.row_offsets) - 2))
    c.row_offsets = c.row_offsets.copy()
    c.row_offsets[g] = draw(st.integers(INT32_MIN, int(c.row_offsets[g - 1]) - 1))
    return "row_offsets"


def offsets_past_end(draw, c):
    if len(c.row_offsets) < 3:
        return offsets_last_mismatch(draw, c)
    g = draw(st.integers(1, len(c.row_offsets) - 2))
    c.row_offsets = c.row_offsets.copy()
    c.row_offsets[g:-1] = draw(st.integers(len(c.col_indices) + 1, INT32_MAX))
    return "row_offsets"


def offsets_wrong_length(draw, c):
    valid = {c.nqb + 1, c.heads * c.nqb + 1}
    length = draw(st.integers(0, 3 * c.heads * c.nqb + 3).filter(lambda n: n not in valid))
    values = sorted(draw(st.lists(st.integers(0, len(c.col_indices)), min_size=length,
                                  max_size=length)))
    c.row_offsets = np.array(values, np.int32)
    return "row_offsets"


def offsets_wrong_rank(draw, c):
    c.row_offsets = (np.array(c.row_offsets[0], np.int32) if draw(st.booleans())
                     else c.row_offsets[None, :])
    return "row_offsets"


def flags_wrong_length(draw, c):
    n = draw(st.integers(0, len(c.col_indices) + 3).filter(lambda n: n != len(c.col_indices)))
    c.block_flags = np.zeros([n], np.int32)
    return "block_flags"


def flags_reserved_bits(draw, c):
    c.ensure_entry()
    e = draw(st.integers(0, len(c.block_flags) - 1))
    c.block_flags = c.block_flags.copy()
    c.block_flags[e] = draw(st.integers(INT32_MIN, INT32_MAX).filter(lambda x: x & ~1 != 0))
    return "block_flags"


def q_wrong_rank(draw, c):
    c.q = c.q[..., None] if draw(st.booleans()) else np.zeros(c.q.shape[1:])
    return "q"


def k_wrong_batch(draw, c):
    c.k = np.zeros((c.batch + draw(st.integers(1, 2)),) + c.k.shape[1:])
    return "k"


def v_wrong_heads(draw, c):
    shape = list(c.v.shape)
    shape[2] = c.heads + draw(st.integers(1, 2))
    c.v = np.zeros(shape)
    return "v"


def k_wrong_head_dim(draw, c):
    shape = list(c.k.shape)
    shape[3] = c.head_dim + draw(st.integers(1, 2))
    c.k = np.zeros(shape)
    return "k"


def v_wrong_length(draw, c):
    shape = list(c.v.shape)
    shape[1] += draw(st.sampled_from([-1, 1])) * c.block_size
    c.v = np.zeros(shape)
    return "v"


def q_len_not_multiple(draw, c):
    if c.block_size == 1:
        return q_wrong_rank(draw, c)
    shape = list(c.q.shape)
    shape[1] += draw(st.integers(1, c.block_size - 1))
    c.q = np.zeros(shape)
    return "q_len"


def kv_len_not_multiple(draw, c):
    if c.block_size == 1:
        return k_wrong_batch(draw, c)
    extra = draw(st.integers(1, c.block_size - 1))
    c.k = np.zeros((c.k.shape[0], c.k.shape[1] + extra) + c.k.shape[2:])
    c.v = np.zeros((c.v.shape[0], c.v.shape[1] + extra) + c.v.shape[2:])
    return "kv_len"


def value_dim_zero(draw, c):
    c.v = np.zeros(c.v.shape[:3] + (0,))
    return "v"


def key_bias_wrong_shape(draw, c):
    kv_len = c.nkb * c.block_size
    shape = draw(st.sampled_from([(c.batch + 1, kv_len), (max(c.batch, 1), kv_len + 1),
                                  (kv_len + 1,), (max(c.batch, 1), kv_len, 1)]))
    c.key_bias = np.ones(shape, np.float32)
    return "key_bias"


def scale_not_finite(draw, c):
    c.attrs["scale"] = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    return "scale"


def block_size_too_large(draw, c):
    c.attrs["block_size"] = draw(st.integers(1025, INT32_MAX))
    return "block_size"


FORWARD_MALFORMATIONS = [
    col_out_of_range, col_not_increasing, offsets_first_nonzero, offsets_last_mismatch,
    offsets_decreasing, offsets_past_end, offsets_wrong_length, offsets_wrong_rank,
    flags_wrong_length, flags_reserved_bits, q_wrong_rank, k_wrong_batch, v_wrong_heads,
    k_wrong_head_dim, v_wrong_length, q_len_not_multiple, kv_len_not_multiple, value_dim_zero,
    key_bias_wrong_shape, scale_not_finite, block_size_too_large,
]


def grad_tensor_wrong_shape(draw, c):
    name = draw(st.sampled_from(["out", "d_out", "lse", "d_lse"]))
    shape = list(getattr(c, name).shape)
    axis = draw(st.integers(0, len(shape) - 1))
    shape[axis] += 1
    setattr(c, name, np.zeros(shape, getattr(c, name).dtype))
    return name


def csc_offsets_wrong_length(draw, c):
    valid = {c.nkb + 1, c.heads * c.nkb + 1}
    length = draw(st.integers(0, 3 * c.heads * c.nkb + 3).filter(lambda n: n not in valid))
    c.col_offsets = np.zeros([length], np.int32)
    return "col_offsets"


def csc_offsets_broken(draw, c):
    c.col_offsets = c.col_offsets.copy()
    g = draw(st.integers(0, len(c.col_offsets) - 1))
    current = int(c.col_offsets[g])
    c.col_offsets[g] = draw(st.integers(INT32_MIN, INT32_MAX).filter(lambda x: x != current))
    # Moving an inner boundary inside a still-monotone range gives another valid CSC that is
    # no longer the transpose: either way row_indices or col_offsets is at fault.
    return ("col_offsets", "row_indices")


def csc_row_out_of_range(draw, c):
    c.ensure_entry()
    e = draw(st.integers(0, len(c.row_indices) - 1))
    c.row_indices = c.row_indices.copy()
    c.row_indices[e] = _int32_outside(draw, 0, c.nqb)
    return "row_indices"


def csc_not_transpose(draw, c):
    c.ensure_entry()
    if c.nqb == 1:
        return csc_row_out_of_range(draw, c)
    e = draw(st.integers(0, len(c.row_indices) - 1))
    c.row_indices = c.row_indices.copy()
    current = int(c.row_indices[e])
    c.row_indices[e] = draw(st.integers(0, c.nqb - 1).filter(lambda x: x != current))
    return "row_indices"


def csc_missing_entry(draw, c):
    c.ensure_entry()
    e = draw(st.integers(0, len(c.row_indices) - 1))
    column = int(np.searchsorted(c.col_offsets, e, side="right")) - 1
    c.row_indices = np.delete(c.row_indices, e)
    c.csc_flags = np.delete(c.csc_flags, e)
    c.col_offsets = c.col_offsets.copy()
    c.col_offsets[column + 1:] -= 1
    return "row_indices"


def csc_flag_differs(draw, c):
    c.ensure_entry()
    e = draw(st.integers(0, len(c.csc_flags) - 1))
    c.csc_flags = c.csc_flags.copy()
    c.csc_flags[e] ^= 1
    return "csc_flags"


def csc_flags_wrong_length(draw, c):
    n = draw(st.integers(0, len(c.row_indices) + 3).filter(lambda n: n != len(c.row_indices)))
    c.csc_flags = np.zeros([n], np.int32)
    return "csc_flags"


GRAD_MALFORMATIONS = [
    grad_tensor_wrong_shape, csc_offsets_wrong_length, csc_offsets_broken, csc_row_out_of_range,
    csc_not_transpose, csc_missing_entry, csc_flag_differs, csc_flags_wrong_length,
]


def expect_invalid(lib, case, names, counters, label):
    names = (names,) if isinstance(names, str) else names
    try:
        case.run(lib)
    except tf.errors.InvalidArgumentError as error:
        message = error.message
        if not any(names_argument(message, n) for n in names):
            raise AssertionError(f"{label}: error does not name {names}: {message}") from None
        counters[label] = counters.get(label, 0) + 1
        return
    raise AssertionError(f"{label}: malformed input accepted (expected an error naming {names})")


def expect_valid(lib, case, counters):
    results = case.run(lib)
    for r in results:
        if np.isnan(r.numpy().astype(np.float32)).any():
            raise AssertionError("NaN in the outputs of a well-formed call")
    counters["valid"] = counters.get("valid", 0) + 1


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=300)
    parser.add_argument("--random", action="store_true",
                        help="draw new examples each run instead of a fixed sequence")
    args = parser.parse_args()
    lib = load_library()
    counters = {}
    common = dict(deadline=None, database=None, derandomize=not args.random,
                  suppress_health_check=list(HealthCheck))

    # One search per malformation, so that each is exercised whatever hypothesis favours.
    malformations = ([(m, None) for m in FORWARD_MALFORMATIONS]
                     + [(m, True) for m in GRAD_MALFORMATIONS])
    per_kind = max(3, args.examples // len(malformations))

    def malformed_search(malform, grad_only):
        @settings(max_examples=per_kind, **common)
        @given(st.data())
        def search(data):
            grad = True if grad_only else data.draw(st.booleans())
            case = Case(data.draw, grad)
            names = malform(data.draw, case)
            expect_invalid(lib, case, names, counters, malform.__name__)
        return search

    @settings(max_examples=max(20, args.examples // 3), **common)
    @given(st.data())
    def well_formed(data):
        case = Case(data.draw, data.draw(st.booleans()))
        expect_valid(lib, case, counters)

    @settings(max_examples=max(20, args.examples // 3), **common)
    @given(st.data())
    def garbage_layout(data):
        """Arbitrary arrays as the layout: the op may accept them only if they are valid."""
        grad = data.draw(st.booleans())
        case = Case(data.draw, grad)
        small = st.integers(-2, 6) | st.sampled_from([INT32_MIN, INT32_MAX, 2**30])
        arrays = lambda: data.draw(  # noqa: E731
            st.lists(small, max_size=12).map(lambda x: np.array(x, np.int32)))
        if grad and data.draw(st.booleans()):
            case.col_offsets, case.row_indices, case.csc_flags = arrays(), arrays(), arrays()
            names = ("col_offsets", "row_indices", "csc_flags")
        else:
            case.row_offsets, case.col_indices, case.block_flags = arrays(), arrays(), arrays()
            names = ("row_offsets", "col_indices", "block_flags")
        try:
            case.run(lib)
            counters["garbage_accepted"] = counters.get("garbage_accepted", 0) + 1
        except tf.errors.InvalidArgumentError as error:
            if not any(names_argument(error.message, n) for n in names):
                raise AssertionError(f"garbage layout: error names none of {names}: "
                                     f"{error.message}") from None
            counters["garbage_rejected"] = counters.get("garbage_rejected", 0) + 1

    for malform, grad_only in malformations:
        malformed_search(malform, grad_only)()
    well_formed()
    garbage_layout()
    print(json.dumps(counters, sort_keys=True))


if __name__ == "__main__":
    main()
