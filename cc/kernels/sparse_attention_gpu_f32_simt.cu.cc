// Scalar kernels for one dtype: float32, and head sizes without a tensor-core instantiation.
#if GOOGLE_CUDA

#include "cc/kernels/sparse_attention_kernels.cuh"

namespace tf_sparse_attn {
namespace gpu {
namespace internal {

template <>
const char* SimtForward<ElementType::kFloat32>(const SparseAttentionParams& p, const TileWork& w,
                                            void* stream) {
  return detail::SimtForwardImpl<ElementType::kFloat32>(p, w, stream);
}

template <>
const char* SimtBackward<ElementType::kFloat32>(const SparseAttentionParams& p, const TileWork& w,
                                             void* stream) {
  return detail::SimtBackwardImpl<ElementType::kFloat32>(p, w, stream);
}

}  // namespace internal
}  // namespace gpu
}  // namespace tf_sparse_attn

#endif  // GOOGLE_CUDA
