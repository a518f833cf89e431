"""Block layouts: which key blocks each query block attends, and the token rules inside them.

A `BlockLayout` is immutable data: a CSR list of key blocks per (layout head, query block), its
CSC transpose, per-block flags, and the token rules the kernels apply inside flagged blocks. It
stands for an exact token mask, `to_mask()`, which the tests compare with the paper's sets.

Token rules (positions from 0, in the op's token order): query i may attend key j when the block
(i // b, j // b) is in the layout, j <= i if causal, and, inside blocks flagged `WINDOWED`,
|i - j| < window (when window > 0) and |i - j| >= min_distance.

The patterns (Child et al. 2019, section 4.2; causal form):

    dense           j <= i
    local(w)        i - w < j <= i
    strided(l)      j <= i and (i - j) mod l == 0     (computed in the reordered token order)
    fixed(l, c)     j <= i and (j // l == i // l or j mod l >= l - c)

Strided is computed the paper's way: tokens are reordered t -> (t mod l) * (T / l) + t // l,
after which it is causal attention inside chunks of T / l tokens. Its layout holds blocks in
that order and records `reorder_stride = l`; `to_mask()` returns the mask in natural order.

Example:

>>> from tf_sparse_attn.layouts import BlockLayout
>>> layout = BlockLayout.fixed(seq_len=256, block_size=32, stride=128, summary=32)
>>> layout.num_query_blocks, layout.nnz
(8, 24)
>>> bool(layout.to_mask()[0, 200, 127])  # a summary position of the first 128-block
True
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterable, Sequence

import numpy as np

WINDOWED = 1  # block flag: the window / min_distance rules apply inside this block

PATTERNS = ("dense", "local", "strided", "fixed")


def _frozen(array, dtype=np.int32) -> np.ndarray:
    array = np.ascontiguousarray(array, dtype=dtype)
    array.setflags(write=False)
    return array


@dataclasses.dataclass(frozen=True, eq=False)
class BlockLayout:
    """A block-sparse attention layout for one sequence length; see the module docstring.

    Attributes:
      block_size: tokens per block (query and key blocks are the same size).
      num_query_blocks / num_key_blocks: seq_len // block_size.
      num_heads: layout heads: 1 (shared by every attention head) or one per attention head.
      row_offsets: int32 [num_heads * num_query_blocks + 1], CSR offsets into col_indices.
      col_indices: int32 [nnz], key blocks of each row, strictly increasing.
      block_flags: int32 [nnz], `WINDOWED` where the token rules apply.
      col_offsets, row_indices, csc_flags: the transpose (CSC), used by the gradient.
      causal: the layout was built for causal attention (it lacks the blocks above the diagonal).
      window, min_distance: token rules inside windowed blocks (0: none).
      reorder_stride: l when the layout is in the strided (reordered) token order, else 0.
      description: a short human-readable name, e.g. "fixed(l=128, c=32)".
    """

    block_size: int
    num_query_blocks: int
    num_key_blocks: int
    num_heads: int
    row_offsets: np.ndarray
    col_indices: np.ndarray
    block_flags: np.ndarray
    col_offsets: np.ndarray
    row_indices: np.ndarray
    csc_flags: np.ndarray
    causal: bool = True
    window: int = 0
    min_distance: int = 0
    reorder_stride: int = 0
    description: str = ""

    # ----------------------------------------------------------------------------- basics

    @property
    def seq_len(self) -> int:
        return self.num_query_blocks * self.block_size

    @property
    def nnz(self) -> int:
        return int(self.col_indices.shape[0])

    @property
    def density(self) -> float:
        """Fraction of all blocks (per head, averaged) that the layout holds."""
        return self.nnz / (self.num_heads * self.num_query_blocks * self.num_key_blocks)

    def __repr__(self):
        return (f"BlockLayout({self.description or 'custom'}, seq_len={self.seq_len}, "
                f"block_size={self.block_size}, heads={self.num_heads}, nnz={self.nnz}, "
                f"causal={self.causal})")

    def coo(self):
        """(head, query block, key block, flags) of every block, in CSR order."""
        counts = np.diff(self.row_offsets)
        rows = np.repeat(np.arange(self.num_heads * self.num_query_blocks), counts)
        return (rows // self.num_query_blocks, rows % self.num_query_blocks,
                self.col_indices.copy(), self.block_flags.copy())

    @classmethod
    def from_blocks(cls, heads, rows, cols, flags, *, block_size, num_blocks, num_heads,
                    causal=True, window=0, min_distance=0, reorder_stride=0, description=""):
        """Builds a layout from block coordinates (duplicates are merged: a block is windowed
        only if every copy of it is)."""
        heads, rows, cols, flags = (np.ravel(a) for a in np.broadcast_arrays(
            *(np.asarray(a, np.int64) for a in (heads, rows, cols, flags))))
        if heads.size and (heads.min() < 0 or heads.max() >= num_heads or rows.min() < 0 or
                           rows.max() >= num_blocks or cols.min() < 0 or cols.max() >= num_blocks):
            raise ValueError("block coordinates out of range for "
                             f"num_heads={num_heads}, num_blocks={num_blocks}")
        key = (heads * num_blocks + rows) * num_blocks + cols
        order = np.argsort(key, kind="stable")
        key, flags = key[order], flags[order]
        unique_key, first = np.unique(key, return_index=True)
        # A block is windowed only if all its copies are: min over the copies.
        merged_flags = np.minimum.reduceat(flags, first) if key.size else flags
        row_id = unique_key // num_blocks
        col = unique_key % num_blocks
        row_offsets = np.zeros(num_heads * num_blocks + 1, np.int64)
        np.add.at(row_offsets, row_id + 1, 1)
        row_offsets = np.cumsum(row_offsets)
        col_offsets, row_indices, csc_flags = transpose_csr(row_offsets, col, merged_flags,
                                                            num_blocks, num_blocks)
        return cls(block_size=int(block_size), num_query_blocks=int(num_blocks),
                   num_key_blocks=int(num_blocks), num_heads=int(num_heads),
                   row_offsets=_frozen(row_offsets), col_indices=_frozen(col),
                   block_flags=_frozen(merged_flags), col_offsets=_frozen(col_offsets),
                   row_indices=_frozen(row_indices), csc_flags=_frozen(csc_flags),
                   causal=bool(causal),
                   window=int(window), min_distance=int(min_distance),
                   reorder_stride=int(reorder_stride), description=description)

    # ------------------------------------------------------------------------ token mask

    def token_permutation(self) -> np.ndarray:
        """perm[t] = position of natural token t in the op's token order."""
        t = np.arange(self.seq_len)
        if not self.reorder_stride:
            return t
        return (t % self.reorder_stride) * (self.seq_len // self.reorder_stride) + (
            t // self.reorder_stride)

    def to_mask(self, causal: bool | None = None, natural_order: bool = True) -> np.ndarray:
        """Boolean [num_heads, seq_len, seq_len] token mask (query, key). O(T^2): for tests."""
        causal = self.causal if causal is None else causal
        if self.causal and not causal:
            raise ValueError("a causal layout lacks the blocks above the diagonal and cannot "
                             "be used bidirectionally; build it with causal=False")
        b, n = self.block_size, self.seq_len
        heads, rows, cols, flags = self.coo()
        block_mask = np.zeros((self.num_heads, self.num_query_blocks, self.num_key_blocks), bool)
        windowed = np.zeros_like(block_mask)
        block_mask[heads, rows, cols] = True
        windowed[heads, rows, cols] = (flags & WINDOWED) != 0
        tokens = np.repeat(np.repeat(block_mask, b, axis=1), b, axis=2)
        token_windowed = np.repeat(np.repeat(windowed, b, axis=1), b, axis=2)
        i = np.arange(n)[:, None]
        j = np.arange(n)[None, :]
        allowed = np.ones((n, n), bool)
        if causal:
            allowed &= j <= i
        within = np.ones((n, n), bool)
        if self.window > 0:
            within &= np.abs(i - j) < self.window
        within &= np.abs(i - j) >= self.min_distance
        mask = tokens & allowed & (~token_windowed | within)
        if natural_order and self.reorder_stride:
            perm = self.token_permutation()
            mask = mask[:, perm][:, :, perm]
        return mask

    def keys_of(self, query: int, head: int = 0, causal: bool | None = None) -> np.ndarray:
        """Sorted natural-order positions of the keys that natural-order `query` attends, by the
        same rules as `to_mask()` but in O(keys) (for cached step-by-step decoding)."""
        causal = self.causal if causal is None else causal
        perm = self.token_permutation()
        i = int(perm[query])
        row = (head if self.num_heads > 1 else 0) * self.num_query_blocks + i // self.block_size
        start, end = self.row_offsets[row], self.row_offsets[row + 1]
        cols = self.col_indices[start:end]
        flags = self.block_flags[start:end]
        j = (cols[:, None] * self.block_size + np.arange(self.block_size)[None, :])
        windowed = np.broadcast_to(((flags & WINDOWED) != 0)[:, None], j.shape)
        j, windowed = j.ravel(), windowed.ravel()
        ok = np.ones(j.shape, bool)
        if causal:
            ok &= j <= i
        distance = np.abs(i - j)
        rule = distance >= self.min_distance
        if self.window > 0:
            rule &= distance < self.window
        ok &= ~windowed | rule
        j = j[ok]
        if self.reorder_stride:
            j = np.argsort(perm)[j]
        return np.sort(j)

    # ---------------------------------------------------------------------- constructors

    @staticmethod
    def _check_common(seq_len, block_size):
        if not isinstance(block_size, (int, np.integer)) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        if not isinstance(seq_len, (int, np.integer)) or seq_len < block_size:
            raise ValueError(f"seq_len={seq_len!r} must be an integer of at least one block "
                             f"(block_size={block_size})")
        if seq_len % block_size:
            raise ValueError(f"seq_len={seq_len} is not a multiple of block_size={block_size}; "
                             "pad it (sparse_attention pads for you)")
        return seq_len // block_size

    @classmethod
    def dense(cls, seq_len: int, block_size: int = 32, causal: bool = True) -> BlockLayout:
        """Every key j <= i (causal) or every key (bidirectional)."""
        n = cls._check_common(seq_len, block_size)
        rows, cols = _ranges(np.zeros(n), np.arange(1, n + 1) if causal else np.full(n, n))
        return cls.from_blocks(0, rows, cols, 0, block_size=block_size, num_blocks=n,
                               num_heads=1, causal=causal, description="dense")

    @classmethod
    def local(cls, seq_len: int, block_size: int = 32, window: int = 128,
              causal: bool = True) -> BlockLayout:
        """The previous `window` tokens including itself: i - window < j <= i (causal), or
        |i - j| < window (bidirectional). The paper's A(1) with stride l is local(l + 1)."""
        n = cls._check_common(seq_len, block_size)
        if not isinstance(window, (int, np.integer)) or window < 1:
            raise ValueError(f"window must be a positive integer, got {window!r}")
        reach = (window - 1 + block_size - 1) // block_size  # block distance still in reach
        rows, cols = _ranges(np.maximum(np.arange(n) - reach, 0),
                             np.minimum(np.arange(n) + (1 if causal else reach + 1), n))
        distance = np.abs(rows - cols)
        # Partial exactly when the farthest pair of the block is out of the window.
        farthest = distance * block_size + block_size - 1
        flags = np.where(farthest >= window, WINDOWED, 0)
        return cls.from_blocks(0, rows, cols, flags, block_size=block_size, num_blocks=n,
                               num_heads=1, causal=causal, window=window,
                               description=f"local(w={window})")

    @classmethod
    def strided(cls, seq_len: int, block_size: int = 32, stride: int = 128,
                causal: bool = True, exclude_window: int = 0) -> BlockLayout:
        """The paper's second factorized head: (i - j) mod stride == 0 (and j <= i if causal),
        in the reordered token order. `exclude_window` drops the keys with |i - j| below it,
        for a head merged with local(exclude_window) so no pair is counted twice."""
        n = cls._check_common(seq_len, block_size)
        if not isinstance(stride, (int, np.integer)) or stride < 1:
            raise ValueError(f"stride must be a positive integer, got {stride!r}")
        if seq_len % stride or (seq_len // stride) % block_size:
            raise ValueError(
                f"strided attention needs seq_len to be a multiple of stride * block_size = "
                f"{stride * block_size} (seq_len={seq_len}, stride={stride}, "
                f"block_size={block_size}), so that each of the {stride} reordered chunks "
                "is whole blocks; pad the sequence or choose a smaller block_size")
        if exclude_window < 0:
            raise ValueError(f"exclude_window must be >= 0, got {exclude_window}")
        chunk_blocks = seq_len // stride // block_size
        chunk_start = np.arange(n) // chunk_blocks * chunk_blocks
        rows, cols = _ranges(chunk_start,
                             np.arange(n) + 1 if causal else chunk_start + chunk_blocks)
        # In reordered positions a step of 1 is a natural step of `stride`.
        min_distance = -(-exclude_window // stride)
        nearest = np.maximum(np.abs(rows - cols) * block_size - (block_size - 1), 0)
        flags = np.where(nearest < min_distance, WINDOWED, 0)
        name = f"strided(l={stride}" + (f", excluding |i-j|<{exclude_window})"
                                        if exclude_window else ")")
        return cls.from_blocks(0, rows, cols, flags, block_size=block_size, num_blocks=n,
                               num_heads=1, causal=causal, min_distance=min_distance,
                               reorder_stride=stride, description=name)

    @classmethod
    def fixed(cls, seq_len: int, block_size: int = 32, stride: int = 128, summary: int = 32,
              causal: bool = True, num_heads: int = 1, num_summary_groups: int = 1,
              part: str = "both") -> BlockLayout:
        """The paper's fixed pattern: the own stride-block plus the last `summary` positions of
        every stride-block. With num_summary_groups > 1, attention head h summarises with
        sub-block g = h mod groups: positions j mod l in [l - (g+1) c, l - g c), which the
        paper found better than one shared summary (its num_verts / vertsize).

        part: "both" (the merged head), "block" (A(1): the own stride-block only) or
        "summary" (A(2): the summary positions only), the latter two for split heads."""
        if part not in ("both", "block", "summary"):
            raise ValueError(f"part must be 'both', 'block' or 'summary', got {part!r}")
        n = cls._check_common(seq_len, block_size)
        for name, value in (("stride", stride), ("summary", summary),
                            ("num_heads", num_heads), ("num_summary_groups", num_summary_groups)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if stride % block_size or summary % block_size:
            raise ValueError(f"block_size={block_size} must divide stride={stride} and "
                             f"summary={summary} so that every block is wholly in or out")
        if summary * num_summary_groups > stride:
            raise ValueError(f"summary * num_summary_groups = {summary * num_summary_groups} "
                             f"exceeds stride={stride}")
        layout_heads = num_heads if num_summary_groups > 1 else 1
        stride_blocks, summary_blocks = stride // block_size, summary // block_size
        all_heads, all_rows, all_cols = [], [], []
        row = np.arange(n)
        own_start = row // stride_blocks * stride_blocks
        own_rows, own_cols = _ranges(own_start, row + 1 if causal else
                                     np.minimum(own_start + stride_blocks, n))
        for head in range(layout_heads):
            group = head % num_summary_groups
            lo = stride_blocks - (group + 1) * summary_blocks
            summary_cols = (np.arange(0, n, stride_blocks)[:, None] + lo +
                            np.arange(summary_blocks)[None, :]).ravel()
            summary_cols = summary_cols[summary_cols < n]
            # Summary blocks before the row's own stride-block (or anywhere, bidirectional);
            # those inside it are already there.
            limit = own_start if causal else np.full(n, n)
            count = np.searchsorted(summary_cols, limit)
            sum_rows = np.repeat(row, count)
            sum_cols = summary_cols[_ranges(np.zeros(n, np.int64), count)[1]]
            if not causal:
                keep = sum_cols // stride_blocks != sum_rows // stride_blocks
                sum_rows, sum_cols = sum_rows[keep], sum_cols[keep]
            if part == "summary":
                # The summary positions of every stride-block, the own one included (j <= i).
                own_summary = (own_cols % stride_blocks >= lo) & (
                    own_cols % stride_blocks < lo + summary_blocks)
                rows = np.concatenate([own_rows[own_summary], sum_rows])
                cols = np.concatenate([own_cols[own_summary], sum_cols])
            elif part == "block":
                rows, cols = own_rows, own_cols
            else:
                rows = np.concatenate([own_rows, sum_rows])
                cols = np.concatenate([own_cols, sum_cols])
            all_heads.append(np.full(rows.size, head))
            all_rows.append(rows)
            all_cols.append(cols)
        name = f"fixed(l={stride}, c={summary}" + (
            f", groups={num_summary_groups}" if num_summary_groups > 1 else "") + (
            f", part={part})" if part != "both" else ")")
        return cls.from_blocks(np.concatenate(all_heads), np.concatenate(all_rows),
                               np.concatenate(all_cols), 0, block_size=block_size,
                               num_blocks=n, num_heads=layout_heads, causal=causal,
                               description=name)

    # ------------------------------------------------------------------------ combining

    @staticmethod
    def _check_compatible(layouts: Sequence[BlockLayout], what: str):
        if not layouts:
            raise ValueError(f"{what} needs at least one layout")
        first = layouts[0]
        for other in layouts[1:]:
            for attr in ("block_size", "num_query_blocks", "reorder_stride", "causal"):
                if getattr(other, attr) != getattr(first, attr):
                    raise ValueError(f"cannot {what} layouts with different {attr}: "
                                     f"{getattr(first, attr)} vs {getattr(other, attr)}")
        rules = {(l.window, l.min_distance) for l in layouts if (l.block_flags & WINDOWED).any()}
        if len(rules) > 1:
            raise ValueError(f"cannot {what} layouts whose token rules differ "
                             f"(window, min_distance) = {sorted(rules)}; combine such heads "
                             "with two passes merged by their log-sum-exp (merge_attention)")
        return rules.pop() if rules else (0, 0)

    @classmethod
    def union(cls, *layouts: BlockLayout) -> BlockLayout:
        """One head attending to the union of the layouts' token sets (the paper's merged head).
        Layouts with 1 head broadcast against layouts with H heads."""
        (window, min_distance) = cls._check_compatible(layouts, "unite")
        head_counts = {l.num_heads for l in layouts} - {1}
        if len(head_counts) > 1:
            raise ValueError(f"cannot unite layouts with {sorted(head_counts)} heads")
        num_heads = head_counts.pop() if head_counts else 1
        parts = []
        for layout in layouts:
            heads, rows, cols, flags = layout.coo()
            if layout.num_heads == 1 and num_heads > 1:
                size = heads.size
                heads = np.repeat(np.arange(num_heads), size)
                rows, cols, flags = (np.tile(a, num_heads) for a in (rows, cols, flags))
            parts.append((heads, rows, cols, flags))
        first = layouts[0]
        return cls.from_blocks(*(np.concatenate([p[i] for p in parts]) for i in range(4)),
                               block_size=first.block_size, num_blocks=first.num_query_blocks,
                               num_heads=num_heads, causal=first.causal, window=window,
                               min_distance=min_distance, reorder_stride=first.reorder_stride,
                               description=" | ".join(l.description for l in layouts))

    @classmethod
    def stack(cls, layouts: Iterable[BlockLayout]) -> BlockLayout:
        """Per-head layouts: the heads of each layout in turn (the paper's split heads)."""
        layouts = list(layouts)
        (window, min_distance) = cls._check_compatible(layouts, "stack")
        parts, start = [], 0
        for layout in layouts:
            heads, rows, cols, flags = layout.coo()
            parts.append((heads + start, rows, cols, flags))
            start += layout.num_heads
        first = layouts[0]
        return cls.from_blocks(*(np.concatenate([p[i] for p in parts]) for i in range(4)),
                               block_size=first.block_size, num_blocks=first.num_query_blocks,
                               num_heads=start, causal=first.causal, window=window,
                               min_distance=min_distance, reorder_stride=first.reorder_stride,
                               description="[" + ", ".join(l.description for l in layouts) + "]")


def transpose_csr(row_offsets, col_indices, block_flags, num_query_blocks, num_key_blocks):
    """The CSC form (col_offsets, row_indices, csc_flags) of a well-formed CSR layout with
    (len(row_offsets) - 1) // num_query_blocks heads: for each (head, key block), the query
    blocks that attend it, increasing, with their flags. What the gradient's dk/dv walk."""
    row_offsets = np.asarray(row_offsets, np.int64)
    col_indices = np.asarray(col_indices, np.int64)
    heads = (row_offsets.size - 1) // num_query_blocks
    row_id = np.repeat(np.arange(heads * num_query_blocks), np.diff(row_offsets))
    query_block = row_id % num_query_blocks
    key_id = (row_id // num_query_blocks) * num_key_blocks + col_indices
    order = np.lexsort((query_block, key_id))
    col_offsets = np.concatenate(
        [[0], np.cumsum(np.bincount(key_id, minlength=heads * num_key_blocks))])
    return col_offsets, query_block[order], np.asarray(block_flags)[order]


def _ranges(starts, ends):
    """(rows, cols) with cols running over [starts[r], ends[r]) for each row r, in O(nnz)."""
    starts = np.asarray(starts, np.int64)
    counts = np.maximum(np.asarray(ends, np.int64) - starts, 0)
    rows = np.repeat(np.arange(starts.size), counts)
    first = np.cumsum(counts) - counts
    cols = np.arange(rows.size) - np.repeat(first, counts) + np.repeat(starts, counts)
    return rows, cols


# ------------------------------------------------------------------- patterns by name

def padded_length(pattern: str, seq_len: int, block_size: int, stride: int | None = None) -> int:
    """The shortest length >= seq_len that `pattern` can be built for."""
    if seq_len < 1:
        raise ValueError(f"sequence length must be positive, got {seq_len}")
    unit = block_size
    if pattern == "strided":
        if not stride:
            raise ValueError("the strided pattern needs stride")
        unit = stride * block_size
    return -(-seq_len // unit) * unit


@functools.lru_cache(maxsize=128)
def token_orders(layout: BlockLayout):
    """(to_layout_order, to_natural_order): int32 index vectors that gather a padded sequence
    into the layout's token order and back, built once per layout; None for natural order."""
    if not layout.reorder_stride:
        return None
    perm = layout.token_permutation()
    return np.argsort(perm).astype(np.int32), perm.astype(np.int32)


@functools.lru_cache(maxsize=256)
def make_layout(pattern: str, seq_len: int, *, block_size: int = 32, causal: bool = True,
                window: int | None = None, stride: int | None = None,
                summary: int | None = None, num_heads: int = 1, num_summary_groups: int = 1,
                exclude_window: int = 0) -> BlockLayout:
    """A cached layout of a named pattern for sequences of up to `seq_len` tokens, padded to
    the length the pattern needs (`padded_length`).

    >>> make_layout("local", 100, block_size=16, window=32).seq_len
    112
    """
    if pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")
    length = padded_length(pattern, seq_len, block_size, stride)
    if pattern == "dense":
        return BlockLayout.dense(length, block_size, causal)
    if pattern == "local":
        if window is None:
            raise ValueError("the local pattern needs window")
        return BlockLayout.local(length, block_size, window, causal)
    if pattern == "strided":
        return BlockLayout.strided(length, block_size, stride, causal, exclude_window)
    if stride is None or summary is None:
        raise ValueError("the fixed pattern needs stride and summary")
    return BlockLayout.fixed(length, block_size, stride, summary, causal, num_heads,
                             num_summary_groups)


def attended_pairs(layout: BlockLayout) -> int:
    """Number of (head, query, key) pairs the layout attends over its whole length, without
    forming the mask (for FLOP counts in benchmarks). Blocks at the same block distance with
    the same flags hold the same pairs, so each such class is counted once."""
    _, rows, cols, flags = layout.coo()
    classes, counts = np.unique(np.stack([rows - cols, flags]), axis=1, return_counts=True)
    b = layout.block_size
    offset = np.arange(b)[:, None] - np.arange(b)[None, :]
    total = 0
    for (block_distance, flag), count in zip(classes.T, counts):
        distance = block_distance * b + offset  # i - j for every pair of the block
        ok = distance >= 0 if layout.causal else np.ones_like(distance, bool)
        if flag & WINDOWED:
            if layout.window:
                ok &= np.abs(distance) < layout.window
            ok &= np.abs(distance) >= layout.min_distance
        total += int(ok.sum()) * int(count)
    return total


def mask_picture(layout: BlockLayout, head: int = 0, cell: int = 4,
                 causal: bool | None = None) -> np.ndarray:
    """An RGB picture (uint8 [T*cell, T*cell, 3]) of one head's token mask in natural order:
    attended pairs dark, pairs inside the layout's blocks but masked by the token rules light,
    and the block grid drawn in the layout's own token order. Rows are queries, columns keys.

    >>> mask_picture(BlockLayout.local(32, 8, 5), cell=2).shape
    (64, 64, 3)
    """
    mask = layout.to_mask(causal)[head]
    n = layout.seq_len
    perm = layout.token_permutation()
    # Which (query, key) pairs lie in a block the layout holds, in natural order.
    _, rows, cols, _ = layout.coo()
    heads = layout.coo()[0]
    keep = heads == (head if layout.num_heads > 1 else 0)
    blocks = np.zeros((layout.num_query_blocks, layout.num_key_blocks), bool)
    blocks[rows[keep], cols[keep]] = True
    in_block = blocks[perm[:, None] // layout.block_size, perm[None, :] // layout.block_size]
    picture = np.full((n, n, 3), 255, np.uint8)
    picture[in_block] = (198, 219, 239)
    picture[mask] = (33, 102, 172)
    picture = np.repeat(np.repeat(picture, cell, axis=0), cell, axis=1)
    if not layout.reorder_stride and cell > 1:
        lines = np.arange(0, n * cell, layout.block_size * cell)
        picture[lines, :] = np.minimum(picture[lines, :], 200)
        picture[:, lines] = np.minimum(picture[:, lines], 200)
    return picture


def write_png(path: str, picture: np.ndarray) -> None:
    """Writes an RGB uint8 [H, W, 3] array as a PNG file, with nothing but the standard library."""
    import struct  # pylint: disable=import-outside-toplevel
    import zlib  # pylint: disable=import-outside-toplevel

    picture = np.ascontiguousarray(picture, np.uint8)
    height, width = picture.shape[:2]
    raw = b"".join(b"\x00" + picture[row].tobytes() for row in range(height))

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data +
                struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 9)))
        f.write(chunk(b"IEND", b""))
