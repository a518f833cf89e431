// The one framework-free description of a block-sparse attention problem that every kernel
// (CPU functor, CUDA launcher) receives. It holds raw pointers and sizes only, so the kernels
// depend neither on TensorFlow's headers nor on each other.
//
// Layout of the tensors (contiguous, row major):
//   q        [batch, q_len,  heads, head_dim]
//   k        [batch, kv_len, heads, head_dim]
//   v        [batch, kv_len, heads, value_dim]
//   out      [batch, q_len,  heads, value_dim]     (d_out likewise; dq, dk, dv like q, k, v)
//   lse      [batch, heads, q_len]  float32        (d_lse likewise)
//   key_bias [batch, kv_len]        float32, added to every score of that key (-inf masks it);
//            nullptr when absent.
//
// The block layout, for layout_heads (1 = shared by all heads, or == heads) heads:
//   row_offsets [layout_heads * num_q_blocks + 1]: entries of (layout head lh, query block qb)
//               are col_indices[row_offsets[lh * num_q_blocks + qb] .. row_offsets[... + 1]).
//   col_indices [nnz]: key blocks, strictly increasing inside a row.
//   block_flags [nnz]: bit kBlockWindowed set: the window / min_distance rules apply inside it.
//   col_offsets, row_indices, csc_flags: the same layout transposed (CSC), for dk and dv.
#ifndef TF_SPARSE_ATTN_CC_KERNELS_SPARSE_ATTENTION_PARAMS_H_
#define TF_SPARSE_ATTN_CC_KERNELS_SPARSE_ATTENTION_PARAMS_H_

#include <cstdint>

#if defined(__CUDACC__)
#define TSA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TSA_HOST_DEVICE inline
#endif

namespace tf_sparse_attn {

enum class ElementType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

enum BlockFlag : int32_t { kBlockWindowed = 1 };

struct SparseAttentionParams {
  ElementType dtype = ElementType::kFloat32;

  int batch = 0;
  int q_len = 0;
  int kv_len = 0;
  int heads = 0;
  int head_dim = 0;
  int value_dim = 0;

  int block_size = 0;
  int num_q_blocks = 0;   // q_len / block_size
  int num_kv_blocks = 0;  // kv_len / block_size
  int layout_heads = 1;   // 1 or heads
  int nnz = 0;

  float scale = 1.f;
  bool causal = true;
  int window = 0;        // > 0: |i - j| < window inside windowed blocks
  int min_distance = 0;  // |i - j| >= min_distance inside windowed blocks

  // Forward inputs (also read by the backward pass).
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const float* key_bias = nullptr;
  const int32_t* row_offsets = nullptr;
  const int32_t* col_indices = nullptr;
  const int32_t* block_flags = nullptr;

  // Forward outputs; inputs of the backward pass.
  void* out = nullptr;
  float* lse = nullptr;

  // Backward only.
  const void* d_out = nullptr;
  const float* d_lse = nullptr;
  const int32_t* col_offsets = nullptr;
  const int32_t* row_indices = nullptr;
  const int32_t* csc_flags = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;

  TSA_HOST_DEVICE int layout_head(int head) const { return layout_heads == 1 ? 0 : head; }
};

// Whether query position i may attend key position j inside a block the layout holds. This is
// the single definition of the token-level rules; every kernel calls it for partial blocks.
TSA_HOST_DEVICE bool TokenAllowed(const SparseAttentionParams& p, int i, int j, int32_t flags) {
  if (p.causal && j > i) return false;
  if (flags & kBlockWindowed) {
    const int distance = i >= j ? i - j : j - i;
    if (p.window > 0 && distance >= p.window) return false;
    if (distance < p.min_distance) return false;
  }
  return true;
}

}  // namespace tf_sparse_attn

#endif  // TF_SPARSE_ATTN_CC_KERNELS_SPARSE_ATTENTION_PARAMS_H_
