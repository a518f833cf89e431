"""Every pattern's token mask against masks written straight from the paper's set definitions."""

import numpy as np
import pytest

from tf_sparse_attn.layouts import BlockLayout, attended_pairs, make_layout, padded_length

CAUSAL = [True, False]


def paper_mask(seq_len, kind, causal, *, window=None, stride=None, summary=None, group=0):
    """Masks from Child et al. (2019) section 4.2, written per pair, independent of blocks."""
    i = np.arange(seq_len)[:, None]
    j = np.arange(seq_len)[None, :]
    base = (j <= i) if causal else np.ones((seq_len, seq_len), bool)
    if kind == "dense":
        return base
    if kind == "local":  # i - w < j <= i
        return base & (np.abs(i - j) < window)
    if kind == "strided":  # A(2): (i - j) mod l == 0
        return base & ((i - j) % stride == 0)
    if kind == "fixed":  # A(1): same l-block; A(2): the summary positions of every l-block
        lo = stride - (group + 1) * summary
        return base & ((j // stride == i // stride) | ((j % stride >= lo) & (j % stride < lo + summary)))
    raise AssertionError(kind)


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("seq_len,block", [(128, 16), (256, 32), (192, 64)])
def test_dense(seq_len, block, causal):
    layout = BlockLayout.dense(seq_len, block, causal)
    np.testing.assert_array_equal(layout.to_mask()[0], paper_mask(seq_len, "dense", causal))


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("seq_len,block", [(128, 16), (256, 32)])
@pytest.mark.parametrize("window", [1, 5, 16, 17, 33, 100])
def test_local(seq_len, block, window, causal):
    layout = BlockLayout.local(seq_len, block, window, causal)
    mask = layout.to_mask()[0]
    np.testing.assert_array_equal(mask, paper_mask(seq_len, "local", causal, window=window))
    assert attended_pairs(layout) == mask.sum()


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("seq_len,block,stride", [(256, 16, 4), (256, 16, 8), (512, 32, 16), (384, 16, 8)])
def test_strided(seq_len, block, stride, causal):
    layout = BlockLayout.strided(seq_len, block, stride, causal)
    mask = layout.to_mask()[0]
    np.testing.assert_array_equal(mask, paper_mask(seq_len, "strided", causal, stride=stride))
    assert attended_pairs(layout) == mask.sum()
    assert layout.reorder_stride == stride


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("exclude", [1, 8, 9, 20])
def test_strided_excluding_local_window_is_disjoint_from_local(exclude, causal):
    seq_len, block, stride = 256, 16, 8
    strided = BlockLayout.strided(seq_len, block, stride, causal, exclude_window=exclude).to_mask()[0]
    local = BlockLayout.local(seq_len, block, exclude, causal).to_mask()[0]
    assert not (strided & local).any()
    np.testing.assert_array_equal(
        strided | local,
        paper_mask(seq_len, "strided", causal, stride=stride) | paper_mask(seq_len, "local", causal, window=exclude))


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("seq_len,block,stride,summary", [(256, 16, 64, 16), (512, 32, 128, 32), (320, 16, 64, 32), (176, 16, 32, 16)])
def test_fixed(seq_len, block, stride, summary, causal):
    layout = BlockLayout.fixed(seq_len, block, stride, summary, causal)
    mask = layout.to_mask()[0]
    np.testing.assert_array_equal(mask, paper_mask(seq_len, "fixed", causal, stride=stride, summary=summary))
    assert attended_pairs(layout) == mask.sum()


@pytest.mark.parametrize("causal", CAUSAL)
def test_fixed_per_head_summary_groups(causal):
    layout = BlockLayout.fixed(256, 16, 64, 16, causal, num_heads=6, num_summary_groups=3)
    assert layout.num_heads == 6
    mask = layout.to_mask()
    for head in range(6):
        np.testing.assert_array_equal(
            mask[head], paper_mask(256, "fixed", causal, stride=64, summary=16, group=head % 3))
    assert not np.array_equal(mask[0], mask[1])


@pytest.mark.parametrize("causal", CAUSAL)
def test_union_and_stack(causal):
    local = BlockLayout.local(256, 16, 20, causal)
    fixed = BlockLayout.fixed(256, 16, 64, 16, causal)
    merged = BlockLayout.union(local, fixed).to_mask()[0]
    np.testing.assert_array_equal(
        merged, paper_mask(256, "local", causal, window=20) | paper_mask(256, "fixed", causal, stride=64, summary=16))
    stacked = BlockLayout.stack([local, fixed, local])
    assert stacked.num_heads == 3
    mask = stacked.to_mask()
    np.testing.assert_array_equal(mask[1], fixed.to_mask()[0])
    np.testing.assert_array_equal(mask[2], local.to_mask()[0])


def test_csc_is_the_transpose():
    layout = BlockLayout.stack([BlockLayout.local(256, 16, 40), BlockLayout.fixed(256, 16, 64, 16)])
    heads, rows, cols, flags = layout.coo()
    csr = set(zip(heads, rows, cols, flags))
    counts = np.diff(layout.col_offsets)
    ids = np.repeat(np.arange(layout.num_heads * layout.num_key_blocks), counts)
    csc = set(zip(ids // layout.num_key_blocks, layout.row_indices, ids % layout.num_key_blocks, layout.csc_flags))
    assert csr == csc
    for start, end in zip(layout.col_offsets[:-1], layout.col_offsets[1:]):
        assert np.all(np.diff(layout.row_indices[start:end]) > 0)


def test_arrays_are_immutable():
    layout = BlockLayout.dense(64, 16)
    with pytest.raises(ValueError):
        layout.col_indices[0] = 3


@pytest.mark.parametrize("call,match", [
    (lambda: BlockLayout.dense(100, 16), "multiple of block_size"),
    (lambda: BlockLayout.dense(8, 16), "at least one block"),
    (lambda: BlockLayout.local(128, 16, 0), "window"),
    (lambda: BlockLayout.strided(256, 16, 5), "stride \\* block_size"),
    (lambda: BlockLayout.fixed(256, 16, 64, 8), "must divide"),
    (lambda: BlockLayout.fixed(256, 16, 64, 48, num_heads=2, num_summary_groups=2), "exceeds stride"),
    (lambda: BlockLayout.union(BlockLayout.dense(64, 16), BlockLayout.dense(128, 16)), "num_query_blocks"),
    (lambda: BlockLayout.union(BlockLayout.local(64, 16, 3), BlockLayout.local(64, 16, 5)), "token rules"),
    (lambda: BlockLayout.dense(64, 16).to_mask(causal=False), "causal layout"),
    (lambda: make_layout("nope", 64), "unknown pattern"),
    (lambda: make_layout("fixed", 64), "stride and summary"),
])
def test_bad_parameters_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_make_layout_pads_and_caches():
    assert padded_length("strided", 1000, 16, 8) == 1024
    layout = make_layout("strided", 1000, block_size=16, stride=8)
    assert layout.seq_len == 1024
    assert make_layout("strided", 1000, block_size=16, stride=8) is layout


def test_long_layouts_build_in_linear_memory():
    layout = make_layout("fixed", 1 << 20, block_size=64, stride=1024, summary=64)
    # Row r holds its own stride-block up to r plus one summary block per earlier stride-block.
    n, per = layout.num_query_blocks, 16
    expected = sum((r % per) + 1 + r // per for r in range(n))
    assert layout.nnz == expected


@pytest.mark.parametrize("causal", CAUSAL)
def test_fixed_parts_split_the_merged_head(causal):
    both = BlockLayout.fixed(256, 16, 64, 16, causal).to_mask()[0]
    block = BlockLayout.fixed(256, 16, 64, 16, causal, part="block").to_mask()[0]
    summary = BlockLayout.fixed(256, 16, 64, 16, causal, part="summary").to_mask()[0]
    i, j = np.arange(256)[:, None], np.arange(256)[None, :]
    base = (j <= i) if causal else np.ones((256, 256), bool)
    np.testing.assert_array_equal(block, base & (j // 64 == i // 64))
    np.testing.assert_array_equal(summary, base & (j % 64 >= 48))
    np.testing.assert_array_equal(block | summary, both)


@pytest.mark.parametrize("layout", [
    BlockLayout.local(256, 16, 21),
    BlockLayout.strided(256, 16, 8, exclude_window=9),
    BlockLayout.strided(256, 16, 8, causal=False),
    BlockLayout.fixed(256, 16, 64, 16, num_heads=2, num_summary_groups=2),
], ids=lambda l: l.description)
def test_keys_of_matches_mask_rows(layout):
    mask = layout.to_mask()
    for head in range(layout.num_heads):
        for query in (0, 1, 17, 100, 255):
            np.testing.assert_array_equal(layout.keys_of(query, head), np.flatnonzero(mask[head, query]))


def test_mask_picture_round_trips_through_png(tmp_path):
    import tensorflow as tf

    from tf_sparse_attn.layouts import mask_picture, write_png

    layout = BlockLayout.fixed(64, 8, 16, 8, num_heads=2, num_summary_groups=2)
    picture = mask_picture(layout, head=1, cell=3)
    assert picture.shape == (192, 192, 3)
    dark = (picture == (33, 102, 172)).all(-1)[1::3, 1::3]  # one pixel per cell
    np.testing.assert_array_equal(dark, layout.to_mask()[1])
    write_png(str(tmp_path / "mask.png"), picture)
    decoded = tf.io.decode_png(tf.io.read_file(str(tmp_path / "mask.png"))).numpy()
    np.testing.assert_array_equal(decoded, picture)
