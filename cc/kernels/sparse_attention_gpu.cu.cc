// Dispatch of the CUDA kernels by dtype and head size, and the small kernels shared by all of
// them (delta = rowsum(dO * O) - d_lse for the backward pass).
#if GOOGLE_CUDA

#include <algorithm>
#include <atomic>

#include "cc/kernels/sparse_attention_gpu.h"
#include "cc/kernels/sparse_attention_kernels.cuh"

namespace tf_sparse_attn {
namespace gpu {
namespace {

// One warp per (batch, token, head) row: the d_out and out rows are contiguous there. Also
// lse2 (TileWork::lse2) unless nullptr.
template <ElementType E>
__global__ void __launch_bounds__(256) DeltaKernel(const SparseAttentionParams p, float* delta,
                                                   float* lse2) {
  using T = typename detail::Elem<E>::T;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.q_len * p.heads;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 8 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const T* o = static_cast<const T*>(p.out) + row * p.value_dim;
  const T* d = static_cast<const T*>(p.d_out) + row * p.value_dim;
  float acc = 0.f;
  for (int c = lane; c < p.value_dim; c += 32)
    acc += detail::Elem<E>::ToFloat(o[c]) * detail::Elem<E>::ToFloat(d[c]);
  acc = detail::WarpSum(acc);
  if (lane == 0) {
    const int h = static_cast<int>(row % p.heads);
    const int64_t bt = row / p.heads;
    const int i = static_cast<int>(bt % p.q_len);
    const int b = static_cast<int>(bt / p.q_len);
    const int64_t at = (static_cast<int64_t>(b) * p.heads + h) * p.q_len + i;
    // d lse_i / d s_ij = P_ij, so d_lse enters dS = P (dP - delta) with the opposite sign.
    delta[at] = acc - (p.d_lse != nullptr ? p.d_lse[at] : 0.f);
    if (lse2 != nullptr) lse2[at] = detail::Lse2(p.lse[at]);
  }
}

// dq = scale * accumulator: one thread per four accumulator values (one lane's fragment of an
// n-tile, see DqAccumIndex), which are two pairs of adjacent dq elements in two rows.
template <ElementType E>
__global__ void __launch_bounds__(256) DqFromAccumKernel(const SparseAttentionParams p,
                                                         const float* acc, int64_t n) {
  using Elem = detail::Elem<E>;
  using T = typename Elem::T;
  const int d = p.head_dim, fragments = 32 * (d / 8);  // float4s per 16-row chunk
  const int chunks = p.q_len / 16;
  const float4* src = reinterpret_cast<const float4*>(acc);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x; i < n / 4;
       i += static_cast<int64_t>(gridDim.x) * 256) {
    const float4 v = src[i];
    const int64_t chunk = i / fragments;
    const DqAccumCell cell = DqAccumCellAt(4 * static_cast<int>(i % fragments));
    const int64_t bh = chunk / chunks;
    const int t = static_cast<int>(chunk % chunks) * 16 + cell.row;
    const int b = static_cast<int>(bh / p.heads), h = static_cast<int>(bh % p.heads);
    const int col = cell.col;
    T* row = static_cast<T*>(p.dq) + ((static_cast<int64_t>(b) * p.q_len + t) * p.heads + h) * d;
    const int64_t next = static_cast<int64_t>(8) * p.heads * d;  // row t + 8
    *reinterpret_cast<uint32_t*>(row + col) = Elem::Pack(v.x * p.scale, v.y * p.scale);
    *reinterpret_cast<uint32_t*>(row + next + col) = Elem::Pack(v.z * p.scale, v.w * p.scale);
  }
}

template <ElementType E>
const char* MmaForwardFor(const SparseAttentionParams& p, const TileWork& w, void* s) {
  switch (p.head_dim) {
    case 32: return internal::MmaForward<E, 32>(p, w, s);
    case 64: return internal::MmaForward<E, 64>(p, w, s);
    default: return internal::MmaForward<E, 128>(p, w, s);
  }
}

template <ElementType E>
const char* MmaBackwardFor(const SparseAttentionParams& p, const TileWork& w, void* s) {
  switch (p.head_dim) {
    case 32: return internal::MmaBackward<E, 32>(p, w, s);
    case 64: return internal::MmaBackward<E, 64>(p, w, s);
    default: return internal::MmaBackward<E, 128>(p, w, s);
  }
}

bool Empty(const SparseAttentionParams& p) {
  return p.batch == 0 || p.heads == 0 || (p.q_len == 0 && p.kv_len == 0);
}

}  // namespace

namespace internal {
const char* LaunchDelta(const SparseAttentionParams& p, const TileWork& w, void* stream) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.q_len * p.heads;
  if (rows == 0) return nullptr;
  const unsigned blocks = static_cast<unsigned>((rows + 7) / 8);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case ElementType::kFloat32:
      DeltaKernel<ElementType::kFloat32><<<blocks, 256, 0, s>>>(p, w.delta, w.lse2);
      break;
    case ElementType::kFloat16:
      DeltaKernel<ElementType::kFloat16><<<blocks, 256, 0, s>>>(p, w.delta, w.lse2);
      break;
    case ElementType::kBFloat16:
      DeltaKernel<ElementType::kBFloat16><<<blocks, 256, 0, s>>>(p, w.delta, w.lse2);
      break;
  }
  return detail::LastError();
}

const char* LaunchDqFromAccum(const SparseAttentionParams& p, const TileWork& w, void* stream) {
  const int64_t n = static_cast<int64_t>(p.batch) * p.q_len * p.heads * p.head_dim;
  if (n == 0) return nullptr;
  if (p.head_dim % 8 != 0 || p.q_len % 16 != 0 || p.dtype == ElementType::kFloat32)
    return "the dq accumulator takes float16 or bfloat16, head_dim a multiple of 8 and q_len of 16";
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((n / 4 + 255) / 256, 8192));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (p.dtype == ElementType::kFloat16) {
    DqFromAccumKernel<ElementType::kFloat16><<<blocks, 256, 0, s>>>(p, w.dq_accum, n);
  } else {
    DqFromAccumKernel<ElementType::kBFloat16><<<blocks, 256, 0, s>>>(p, w.dq_accum, n);
  }
  return detail::LastError();
}
}  // namespace internal

bool WgmmaAvailable() {
#if defined(TSA_WITH_SM90A)
  // Per device: 0 not yet asked, 1 yes, 2 no.
  static std::atomic<int> known[64];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return false;
  int state = known[device].load(std::memory_order_relaxed);
  if (state == 0) {
    int major = 0, minor = 0;
    const bool asked =
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) ==
            cudaSuccess &&
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) == cudaSuccess;
    state = asked && major == 9 && minor == 0 ? 1 : 2;
    known[device].store(state, std::memory_order_relaxed);
  }
  return state == 1;
#else
  return false;
#endif
}

bool Supported(const SparseAttentionParams& p, const char** why) {
  if (p.block_size % kChunk != 0) {
    *why = "the GPU kernels need block_size to be a multiple of 16";
    return false;
  }
  if (p.head_dim > 32 * detail::kSimtPer || p.value_dim > 32 * detail::kSimtPer) {
    *why = "the GPU kernels take head_dim and value_dim up to 256";
    return false;
  }
  if (static_cast<int64_t>(p.batch) * p.heads > 65535) {
    *why = "the GPU kernels take batch * heads up to 65535";
    return false;
  }
  return true;
}

const char* LaunchForward(const SparseAttentionParams& p, const TileWork& w, void* stream) {
  if (Empty(p) || p.q_len == 0) return nullptr;
  if (HasMma(p)) {
    return p.dtype == ElementType::kFloat16 ? MmaForwardFor<ElementType::kFloat16>(p, w, stream)
                                            : MmaForwardFor<ElementType::kBFloat16>(p, w, stream);
  }
  switch (p.dtype) {
    case ElementType::kFloat32: return internal::SimtForward<ElementType::kFloat32>(p, w, stream);
    case ElementType::kFloat16: return internal::SimtForward<ElementType::kFloat16>(p, w, stream);
    default: return internal::SimtForward<ElementType::kBFloat16>(p, w, stream);
  }
}

const char* LaunchBackward(const SparseAttentionParams& p, const TileWork& w, void* stream) {
  if (Empty(p)) return nullptr;
  if (HasMma(p)) {
    return p.dtype == ElementType::kFloat16 ? MmaBackwardFor<ElementType::kFloat16>(p, w, stream)
                                            : MmaBackwardFor<ElementType::kBFloat16>(p, w, stream);
  }
  switch (p.dtype) {
    case ElementType::kFloat32: return internal::SimtBackward<ElementType::kFloat32>(p, w, stream);
    case ElementType::kFloat16: return internal::SimtBackward<ElementType::kFloat16>(p, w, stream);
    default: return internal::SimtBackward<ElementType::kBFloat16>(p, w, stream);
  }
}

const char* CopyToDevice(void* dst, const void* src, size_t bytes, void* stream) {
  if (bytes == 0) return nullptr;
  cudaError_t err =
      cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, static_cast<cudaStream_t>(stream));
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

const char* Poison(void* dst, size_t bytes, void* stream) {
  if (bytes == 0) return nullptr;
  cudaError_t err = cudaMemsetAsync(dst, 0xff, bytes, static_cast<cudaStream_t>(stream));
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace gpu
}  // namespace tf_sparse_attn

#endif  // GOOGLE_CUDA
