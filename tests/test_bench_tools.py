"""The benchmark tools' own logic: the profile summary's interval union and kernel names, the
layout files the kernel timing tool reads, the commit that stamps the tables, the op calls
that the GPU benchmark times, and the model benchmark's choice of cases."""

import os
import subprocess
import sys

import numpy as np

from tests.reference import TOLERANCE, attention_reference, relative_error
from tf_sparse_attn.layouts import transpose_csr

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)
sys.path.insert(0, os.path.join(BENCH, "kernel_timing"))

import bench_model  # noqa: E402  pylint: disable=wrong-import-position
import dump_layouts  # noqa: E402  pylint: disable=wrong-import-position
import profile_layer  # noqa: E402  pylint: disable=wrong-import-position
import results  # noqa: E402  pylint: disable=wrong-import-position


def test_union_length_counts_overlaps_once():
    rng = np.random.default_rng(0)
    starts = rng.integers(0, 1000, 200)
    intervals = [(int(s), int(s + rng.integers(1, 50))) for s in starts]
    covered = np.zeros(1100, bool)
    for lo, hi in intervals:
        covered[lo:hi] = True
    assert profile_layer.union_length(intervals) == covered.sum()
    assert profile_layer.union_length([]) == 0


def test_model_cases_by_name_or_part_of_one():
    def names(only):
        return [case[0] for case in bench_model.selected_cases(only)]

    assert names(None) == [case[0] for case in bench_model.GPU_CASES]
    # A whole name is that case alone, though "enwik8 fixed, no recompute" contains it.
    assert names(["enwik8 fixed"]) == ["enwik8 fixed"]
    assert names(["enwik8 strided", "audio"]) == ["enwik8 strided", "audio 1M strided"]
    assert names(["fixed"]) == ["enwik8 fixed", "enwik8 fixed, no recompute"]
    assert names(["nothing of that name"]) == []


def test_short_name_drops_namespaces_and_arguments():
    name = ("void tf_sparse_attn::gpu::detail::MmaDqKernel<(tf_sparse_attn::ElementType)2, 64>"
            "(tf_sparse_attn::SparseAttentionParams, tf_sparse_attn::gpu::TileWork)")
    assert profile_layer.short_name(name) == "MmaDqKernel<(ElementType)2, 64>"
    assert len(profile_layer.short_name("k" * 200, width=40)) == 40


def test_layout_file_holds_csr_and_csc():
    layout = dump_layouts.bench_gpu.build_layout("fixed", 1024)
    ints = dump_layouts.layout_ints(layout)
    block, length, window, min_distance, rows1, nnz = ints[:6]
    assert (block, length) == (layout.block_size, 1024)
    assert (window, min_distance) == (layout.window, layout.min_distance)
    csr = ints[6:]
    np.testing.assert_array_equal(csr[:rows1], layout.row_offsets)
    np.testing.assert_array_equal(csr[rows1:rows1 + nnz], layout.col_indices)
    col_offsets, row_indices, _ = transpose_csr(layout.row_offsets, layout.col_indices,
                                                layout.block_flags, layout.num_query_blocks,
                                                layout.num_key_blocks)
    csc = csr[rows1 + 2 * nnz:]
    np.testing.assert_array_equal(csc[:rows1], col_offsets)
    np.testing.assert_array_equal(csc[rows1:rows1 + nnz], row_indices)
    assert len(ints) == 6 + 2 * rows1 + 4 * nnz


def test_tables_name_the_commit_and_mark_a_modified_tree(tmp_path, monkeypatch):
    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    git("init", "-q")
    (tmp_path / "RESULTS.md").write_text("# Benchmark results\n")
    git("add", "RESULTS.md")
    git("commit", "-qm", "first")
    monkeypatch.setattr(results, "RESULTS", str(tmp_path / "RESULTS.md"))
    head = git("rev-parse", "--short", "HEAD").strip()
    assert results.commit() == head
    (tmp_path / "RESULTS.md").write_text("# Benchmark results\nchanged\n")
    assert results.commit() == head + " + changes"


def test_op_calls_compute_the_benchmarked_attention_and_gradients():
    from tf_sparse_attn._load import load_op_library  # pylint: disable=import-outside-toplevel

    bench_gpu = dump_layouts.bench_gpu
    length, dim = 256, 32
    fwd, fwd_bwd, fwd_bwd_in_graph = bench_gpu.op_calls(load_op_library(), "fixed", length, dim)
    q, k, v, d_out = bench_gpu.random_inputs(length, dim, 1)[0]
    mask = bench_gpu.build_layout("fixed", length).to_mask(causal=True)
    out, _, grads = attention_reference(q.numpy(), k.numpy(), v.numpy(), mask, dim ** -0.5,
                                        d_out.numpy())
    tol = TOLERANCE["bfloat16"]
    assert relative_error(fwd(q, k, v).numpy(), out) < tol
    for name, got, want in zip(("dq", "dk", "dv"), fwd_bwd(q, k, v, d_out), grads):
        err = relative_error(got.numpy(), want)
        assert err < 4 * tol, f"{name}: relative error {err:.2e} vs float64"
    # The in-graph calls each answer for their own inputs: the second set is the first's
    # inputs reversed, not a copy the graph could share.
    sets = [(q, k, v, d_out), (d_out, v, k, q)]
    for inputs, grads_in_graph in zip(sets, fwd_bwd_in_graph(sets)):
        want = fwd_bwd(*inputs)
        for got, expected in zip(grads_in_graph, want):
            np.testing.assert_array_equal(got.numpy(), expected.numpy())
