"""The GPU kernels' work lists, checked on the host: tests/work_lists_check.cc builds them with
the op's own code (cc/kernels/sparse_attention_work_lists.cc) for a layout and expands them back
into the (query, key) pairs the kernels compute, which must be exactly the pairs the layout
allows, each once. Runs without a GPU, so the tilings the GPU picks (tall forward tiles, narrow
and paired key tiles) are checked on every machine."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tf_sparse_attn.layouts import BlockLayout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, os.path.join(ROOT, "bench", "kernel_timing"))

import dump_layouts  # noqa: E402  pylint: disable=wrong-import-position


@pytest.fixture(scope="module")
def checker(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.fail("no C++ compiler: the op library could not have been built either")
    binary = str(tmp_path_factory.mktemp("work_lists") / "work_lists_check")
    subprocess.run([compiler, "-O2", "-std=c++17", f"-I{ROOT}",
                    os.path.join(ROOT, "tests", "work_lists_check.cc"),
                    os.path.join(ROOT, "cc", "kernels", "sparse_attention_work_lists.cc"),
                    "-o", binary], check=True)
    return binary


def run_check(checker, tmp_path, layout, head_dim=64, ints=None):
    path = tmp_path / "layout.bin"
    (dump_layouts.layout_ints(layout) if ints is None else ints).tofile(path)
    result = subprocess.run([checker, str(path), str(int(layout.causal)), str(head_dim)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    return {kind: dict(kv.split("=") for kv in rest.split()) for kind, rest in lines.items()}


KINDS = {"dq", "forward", "key", "key_wide", "key_narrow", "key_paired"}

LAYOUTS = {
    "dense": lambda bs, causal: BlockLayout.dense(1024, bs, causal=causal),
    "local": lambda bs, causal: BlockLayout.local(1024, bs, window=96, causal=causal),
    "strided": lambda bs, causal: BlockLayout.strided(2048, bs, stride=32, causal=causal,
                                                      exclude_window=64),
    "fixed": lambda bs, causal: BlockLayout.fixed(1024, bs, stride=128, summary=max(bs, 32),
                                                  causal=causal),
    "fixed_split_heads": lambda bs, causal: BlockLayout.fixed(
        1024, bs, stride=128, summary=max(bs, 32), causal=causal, num_heads=4,
        num_summary_groups=2),
}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("pattern", sorted(LAYOUTS))
def test_lists_cover_the_layout_exactly(checker, tmp_path, pattern, block_size, causal):
    layout = LAYOUTS[pattern](block_size, causal)
    lists = run_check(checker, tmp_path, layout)
    assert set(lists) == KINDS


@pytest.mark.parametrize("block_size", [16, 32])
def test_fixed_summary_columns_take_paired_key_tiles(checker, tmp_path, block_size):
    # The summary columns (the last 32 keys of each 128-stride) are attended by every later
    # query: 64 contiguous keys would mask half their products, 32 double the steps.
    layout = BlockLayout.fixed(4096, block_size, stride=128, summary=32)
    lists = run_check(checker, tmp_path, layout)
    assert lists["key"]["tiling"] == "paired"
    assert lists["key"]["tile_rows"] == "64"


def test_dense_keeps_wide_key_tiles(checker, tmp_path):
    lists = run_check(checker, tmp_path, BlockLayout.dense(2048, 64))
    assert lists["key"]["tiling"] == "wide"


def test_a_corrupted_list_is_caught(checker, tmp_path):
    # The checker itself must fail on a wrong layout file: move one block of the CSC to
    # another row, so that the transposed lists disagree with the CSR.
    layout = BlockLayout.fixed(1024, 32, stride=128, summary=32)
    ints = dump_layouts.layout_ints(layout)
    row_indices_at = 6 + 2 * len(layout.row_offsets) + 2 * len(layout.col_indices)
    ints[row_indices_at + 5] = (ints[row_indices_at + 5] + 3) % (1024 // 32)
    with pytest.raises(AssertionError, match="MISMATCH"):
        run_check(checker, tmp_path, layout, ints=ints)


@pytest.mark.parametrize("seed", range(6))
def test_random_layouts(checker, tmp_path, seed):
    # Irregular layouts, per-head, some blocks windowed, every query block attending a few
    # random key columns: the lists of every tiling (the one picked and each key tiling
    # forced) must still hold exactly the layout's pairs.
    rng = np.random.default_rng(seed)
    block_size = int(rng.choice([16, 32, 64]))
    num_blocks, num_heads = 2048 // block_size, int(rng.integers(1, 4))
    heads, rows, cols = [], [], []
    for h in range(num_heads):
        columns = rng.choice(num_blocks, size=max(2, num_blocks // 8), replace=False)
        for r in range(num_blocks):
            picked = np.concatenate([columns, [r], rng.integers(0, num_blocks, 3)])
            heads += [h] * len(picked)
            rows += [r] * len(picked)
            cols += list(picked)
    flags = rng.integers(0, 2, len(rows))
    layout = BlockLayout.from_blocks(heads, rows, cols, flags, block_size=block_size,
                                     num_blocks=num_blocks, num_heads=num_heads,
                                     causal=bool(seed % 2), window=int(rng.integers(0, 200)),
                                     min_distance=int(rng.integers(0, 20)))
    lists = run_check(checker, tmp_path, layout)
    assert set(lists) == KINDS
