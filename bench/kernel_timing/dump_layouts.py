"""Writes the benchmark's layouts (bench_gpu.py: dense, local, strided, fixed) as the int32 files
kernel_timing reads: block_size, T, window, min_distance, CSR length + 1, nnz, then the CSR
(offsets, indices, flags) and the CSC (offsets, indices, flags).

    python bench/kernel_timing/dump_layouts.py OUTPUT_DIR [--lengths 4096,16384]
"""

import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import bench_gpu  # noqa: E402  pylint: disable=wrong-import-position


def layout_ints(layout) -> np.ndarray:
    header = [layout.block_size, layout.seq_len, layout.window, layout.min_distance,
              len(layout.row_offsets), len(layout.col_indices)]
    csr = [layout.row_offsets, layout.col_indices, layout.block_flags]
    csc = [layout.col_offsets, layout.row_indices, layout.csc_flags]
    return np.concatenate([header] + csr + csc).astype(np.int32)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir")
    parser.add_argument("--lengths", default="4096,16384")
    args = parser.parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    for pattern in ("dense", "local", "strided", "fixed"):
        for length in (int(t) for t in args.lengths.split(",")):
            path = os.path.join(args.output_dir, f"{pattern}_{length}.bin")
            layout_ints(bench_gpu.build_layout(pattern, length)).tofile(path)
            print(path)


if __name__ == "__main__":
    main()
