// The layout files that dump_layouts.py writes, read into the layout fields of the params:
// int32 block_size, T, window, min_distance, layout rows + 1, nnz, then the CSR (offsets,
// indices, flags) and the CSC (offsets, indices, flags). Read by kernel_timing and by the
// host check of the work lists (tests/work_lists_check.cc).
#ifndef TF_SPARSE_ATTN_BENCH_KERNEL_TIMING_LAYOUT_FILE_H_
#define TF_SPARSE_ATTN_BENCH_KERNEL_TIMING_LAYOUT_FILE_H_

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cc/kernels/sparse_attention_params.h"

namespace tf_sparse_attn {

inline std::vector<int32_t> ReadLayoutFile(const char* path) {
  FILE* f = std::fopen(path, "rb");
  if (f == nullptr) {
    std::printf("cannot open %s\n", path);
    std::exit(1);
  }
  std::fseek(f, 0, SEEK_END);
  const long bytes = std::ftell(f);
  std::fseek(f, 0, SEEK_SET);
  std::vector<int32_t> v(bytes / 4);
  if (std::fread(v.data(), 4, v.size(), f) != v.size()) std::exit(1);
  std::fclose(f);
  return v;
}

// Self-attention over the file's layout (q_len = kv_len = T); the pointers point into `ints`,
// which must outlive the params. dtype, sizes, scale and causality are the caller's.
inline void SetLayout(const std::vector<int32_t>& ints, SparseAttentionParams* p) {
  const int bs = ints[0], T = ints[1], nr1 = ints[4], nnz = ints[5];
  const int32_t* csr = ints.data() + 6;
  p->q_len = p->kv_len = T;
  p->block_size = bs;
  p->num_q_blocks = p->num_kv_blocks = T / bs;
  p->layout_heads = (nr1 - 1) / (T / bs);
  p->nnz = nnz;
  p->window = ints[2];
  p->min_distance = ints[3];
  p->row_offsets = csr;
  p->col_indices = csr + nr1;
  p->block_flags = csr + nr1 + nnz;
  p->col_offsets = csr + nr1 + 2 * nnz;
  p->row_indices = p->col_offsets + nr1;
  p->csc_flags = p->row_indices + nnz;
}

}  // namespace tf_sparse_attn

#endif  // TF_SPARSE_ATTN_BENCH_KERNEL_TIMING_LAYOUT_FILE_H_
