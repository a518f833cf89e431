// CPU kernels of block-sparse attention. Framework-free: they see SparseAttentionParams and a
// parallel-for callback only, so they can be tested and reused without TensorFlow.
//
// Work is split into units that each own a disjoint set of output rows (a query block for out,
// lse and dq; a key block for dk and dv), and each unit is computed by one thread in a fixed
// order: results do not depend on how the units are scheduled.
#ifndef TF_SPARSE_ATTN_CC_KERNELS_SPARSE_ATTENTION_CPU_H_
#define TF_SPARSE_ATTN_CC_KERNELS_SPARSE_ATTENTION_CPU_H_

#include <cstdint>
#include <functional>

#include "cc/kernels/sparse_attention_params.h"

namespace tf_sparse_attn {
namespace cpu {

// Runs fn(begin, end) over sub-ranges covering [0, n), possibly concurrently. cost_per_unit is a
// rough number of cycles one index takes, used to choose the granularity.
using ParallelFor = std::function<void(int64_t n, int64_t cost_per_unit,
                                       const std::function<void(int64_t, int64_t)>& fn)>;

// Computes p.out and p.lse from p.q, p.k, p.v, p.key_bias and the CSR layout.
// All pointers must be valid host memory; p must have passed validation.
void SparseAttentionForward(const SparseAttentionParams& p, const ParallelFor& parallel_for);

// Computes p.dq (from the CSR layout) and p.dk, p.dv (from the CSC layout) given p.out, p.lse,
// p.d_out and p.d_lse.
void SparseAttentionBackward(const SparseAttentionParams& p, const ParallelFor& parallel_for);

// The instruction set the kernels dispatch to on this machine: "avx512", "avx2" or "generic".
// The environment variable TF_SPARSE_ATTN_CPU_ISA ("avx2" or "generic"), read once, caps it.
const char* SparseAttentionCpuIsa();

}  // namespace cpu
}  // namespace tf_sparse_attn

#endif  // TF_SPARSE_ATTN_CC_KERNELS_SPARSE_ATTENTION_CPU_H_
