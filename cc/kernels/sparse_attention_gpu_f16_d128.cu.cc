// Tensor-core kernels for one (dtype, head size): one translation unit each keeps the CUDA build
// parallel and every unit small.
#if GOOGLE_CUDA

#include "cc/kernels/sparse_attention_kernels.cuh"

namespace tf_sparse_attn {
namespace gpu {
namespace internal {

template <>
const char* MmaForward<ElementType::kFloat16, 128>(const SparseAttentionParams& p,
                                                 const TileWork& w, void* stream) {
  return detail::MmaForwardImpl<ElementType::kFloat16, 128>(p, w, stream);
}

template <>
const char* MmaBackward<ElementType::kFloat16, 128>(const SparseAttentionParams& p,
                                                  const TileWork& w, void* stream) {
  return detail::MmaBackwardImpl<ElementType::kFloat16, 128>(p, w, stream);
}

}  // namespace internal
}  // namespace gpu
}  // namespace tf_sparse_attn

#endif  // GOOGLE_CUDA
