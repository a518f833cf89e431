// Kernel-only timing of the GPU launchers, without TensorFlow: CUDA-event time per call of the
// forward, the whole backward, dq alone and the backward with dq summed by the dk/dv kernel
// (bf16, batch 2, 8 heads) on a layout written by dump_layouts.py, with the work lists the op
// would build; where the sm_90a kernels run, the sm_80 ones too, with the largest differences
// between their outputs. Prints checksums of the outputs, so that two builds of the kernels can
// be compared on the same inputs.
//
//   kernel_timing LAYOUT.bin HEAD_DIM LABEL [wide|narrow|paired]
//
// The optional last argument forces dk/dv's key tiling instead of the one the op would pick.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include "bench/kernel_timing/layout_file.h"
#include "cc/kernels/sparse_attention_kernels.cuh"

using namespace tf_sparse_attn;       // NOLINT
using namespace tf_sparse_attn::gpu;  // NOLINT

#define CHECK_CUDA(x)                                                                 \
  do {                                                                                \
    cudaError_t e = (x);                                                              \
    if (e != cudaSuccess) {                                                           \
      std::printf("CUDA error %s at line %d\n", cudaGetErrorString(e), __LINE__);     \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (0)

namespace {

int32_t* ToDevice(const std::vector<int32_t>& v) {
  int32_t* d;
  CHECK_CUDA(cudaMalloc(&d, std::max<size_t>(4, v.size() * 4)));
  CHECK_CUDA(cudaMemcpy(d, v.data(), v.size() * 4, cudaMemcpyHostToDevice));
  return d;
}

// Deterministic values in [-1, 1): a hash of the index, so that no run times zeros.
__global__ void FillHashed(__nv_bfloat16* x, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    h ^= h >> 15;
    x[i] = __float2bfloat16((h & 0xffff) / 32768.f - 1.f);
  }
}

std::vector<float> ToHost(const __nv_bfloat16* d, size_t n) {
  std::vector<__nv_bfloat16> h(n);
  CHECK_CUDA(cudaMemcpy(h.data(), d, n * 2, cudaMemcpyDeviceToHost));
  std::vector<float> f(n);
  for (size_t i = 0; i < n; ++i) f[i] = __bfloat162float(h[i]);
  return f;
}

double AbsSum(const __nv_bfloat16* d, size_t n) {
  double s = 0;
  for (float x : ToHost(d, n)) s += std::fabs(x);
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::printf("usage: %s LAYOUT.bin HEAD_DIM LABEL [wide|narrow|paired]\n", argv[0]);
    return 2;
  }
  const std::vector<int32_t> all = ReadLayoutFile(argv[1]);
  const int D = std::atoi(argv[2]);
  SparseAttentionParams p;
  SetLayout(all, &p);
  const int T = p.q_len;
  p.dtype = ElementType::kBFloat16;
  p.batch = 2;
  p.heads = 8;
  p.head_dim = p.value_dim = D;
  p.scale = 1.f / std::sqrt(float(D));
  p.causal = true;

  const HostWorkLists fwd_lists = BuildWorkLists(p, ListKind::kForward);
  const HostWorkLists dq_lists = BuildWorkLists(p, ListKind::kDq);
  HostWorkLists key_lists = BuildWorkLists(p, ListKind::kKey);
  if (argc > 4) {
    bool known = false;
    for (KeyTiling tiling : {KeyTiling::kWide, KeyTiling::kNarrow, KeyTiling::kPaired}) {
      if (std::strcmp(argv[4], KeyTilingName(tiling)) != 0) continue;
      key_lists = BuildKeyLists(p, tiling);
      known = true;
    }
    if (!known) {
      std::printf("unknown key tiling %s: wide, narrow or paired\n", argv[4]);
      return 2;
    }
  }
  TileWork forward, backward;
  forward.query_tile = fwd_lists.tile_rows;
  forward.q_offsets = ToDevice(fwd_lists.offsets);
  forward.q_entries = ToDevice(fwd_lists.entries);
  backward.q_offsets = ToDevice(dq_lists.offsets);
  backward.q_entries = ToDevice(dq_lists.entries);
  backward.key_tile = key_lists.tile_rows;
  backward.k_offsets = ToDevice(key_lists.offsets);
  backward.k_entries = ToDevice(key_lists.entries);
  if (!key_lists.halves.empty()) backward.k_halves = ToDevice(key_lists.halves);

  const size_t n = size_t(2) * T * 8 * D;
  __nv_bfloat16 *q, *k, *v, *o, *d_out, *dq, *dk, *dv;
  for (auto ptr : {&q, &k, &v, &o, &d_out, &dq, &dk, &dv}) CHECK_CUDA(cudaMalloc(ptr, n * 2));
  float *lse, *delta;
  CHECK_CUDA(cudaMalloc(&lse, size_t(2) * 8 * T * 4));
  CHECK_CUDA(cudaMalloc(&delta, size_t(2) * 2 * 8 * T * 4));  // delta, then lse2
  FillHashed<<<1024, 256>>>(q, n, 1);
  FillHashed<<<1024, 256>>>(k, n, 2);
  FillHashed<<<1024, 256>>>(v, n, 3);
  FillHashed<<<1024, 256>>>(d_out, n, 4);
  p.q = q;
  p.k = k;
  p.v = v;
  p.out = o;
  p.lse = lse;
  p.d_out = d_out;
  p.dq = dq;
  p.dk = dk;
  p.dv = dv;
  backward.delta = delta;
  backward.lse2 = delta + size_t(2) * 8 * T;

  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  const char* err = nullptr;
  // KT_REPS=1 times a single launch with no warm-up: enough for compute-sanitizer.
  const char* reps_env = std::getenv("KT_REPS");
  const int reps = reps_env != nullptr ? std::max(1, std::atoi(reps_env)) : 20;
  const int warmups = reps_env != nullptr ? 0 : 3;
  auto time_ms = [&](auto launch) {
    for (int i = 0; i < warmups; ++i) err = err ? err : launch();
    CHECK_CUDA(cudaDeviceSynchronize());
    cudaEventRecord(start);
    for (int i = 0; i < reps; ++i) err = err ? err : launch();
    cudaEventRecord(stop);
    CHECK_CUDA(cudaEventSynchronize(stop));
    float ms;
    cudaEventElapsedTime(&ms, start, stop);
    return ms / reps;
  };
  // Where the sm_90a kernels run by default, the sm_80 ones run first on the same inputs: their
  // times, and the largest difference of each output from theirs, relative to the largest
  // element of the sm_80 output.
  const bool wgmma = WgmmaAvailable() && D == 64;  // as the op sets TileWork::wgmma
  forward.wgmma = backward.wgmma = wgmma;
  TileWork fused = backward;  // dq summed into a float32 accumulator by the dk/dv kernel
  CHECK_CUDA(cudaMalloc(&fused.dq_accum, n * 4));
  auto sm80 = [](TileWork work) {
    work.wgmma = false;
    return work;
  };
  auto outputs = [&](std::initializer_list<const __nv_bfloat16*> tensors) {
    CHECK_CUDA(cudaDeviceSynchronize());
    std::vector<std::vector<float>> all;
    for (const __nv_bfloat16* t : tensors) all.push_back(ToHost(t, n));
    return all;
  };
  auto rel_diff = [](const std::vector<float>& a, const std::vector<float>& ref) {
    double diff = 0.0, scale = 0.0;
    for (size_t i = 0; i < ref.size(); ++i) {
      diff = std::max(diff, double(std::fabs(a[i] - ref[i])));
      scale = std::max(scale, double(std::fabs(ref[i])));
    }
    return scale > 0.0 ? diff / scale : diff;
  };
  float fwd_sm80 = 0.f, bwd_sm80 = 0.f, fused_sm80 = 0.f;
  std::vector<std::vector<float>> ref_fwd, ref_bwd, ref_fused;
  if (wgmma) {
    fwd_sm80 = time_ms([&] { return LaunchForward(p, sm80(forward), nullptr); });
    ref_fwd = outputs({o});
    bwd_sm80 = time_ms([&] { return LaunchBackward(p, sm80(backward), nullptr); });
    ref_bwd = outputs({dq, dk, dv});
    fused_sm80 = time_ms([&] { return LaunchBackward(p, sm80(fused), nullptr); });
    ref_fused = outputs({dq, dk, dv});
  }
  double diffs[7] = {0, 0, 0, 0, 0, 0, 0};  // out; dq, dk, dv; accumulator dq, dk, dv
  auto compare = [&](const std::vector<std::vector<float>>& ref,
                     std::initializer_list<const __nv_bfloat16*> tensors, double* diff) {
    if (ref.empty()) return;
    const std::vector<std::vector<float>> got = outputs(tensors);
    for (size_t t = 0; t < got.size(); ++t) diff[t] = rel_diff(got[t], ref[t]);
  };
  const float fwd = time_ms([&] { return LaunchForward(p, forward, nullptr); });
  compare(ref_fwd, {o}, diffs);
  const double out_sum = AbsSum(o, n);
  const float bwd = time_ms([&] { return LaunchBackward(p, backward, nullptr); });
  compare(ref_bwd, {dq, dk, dv}, diffs + 1);
  const double dq_sum = AbsSum(dq, n), dk_sum = AbsSum(dk, n), dv_sum = AbsSum(dv, n);
  float dq_only = 0.f;
  auto dq_kernel = [&](auto head_dim) {
    return detail::LaunchDq<ElementType::kBFloat16, decltype(head_dim)::value>(p, backward,
                                                                                nullptr);
  };
  if (D == 64) dq_only = time_ms([&] { return dq_kernel(std::integral_constant<int, 64>()); });
  if (D == 128) dq_only = time_ms([&] { return dq_kernel(std::integral_constant<int, 128>()); });
  const float bwd_fused = time_ms([&] { return LaunchBackward(p, fused, nullptr); });
  compare(ref_fused, {dq, dk, dv}, diffs + 4);
  if (err != nullptr) {
    std::printf("%s: launch error %s\n", argv[3], err);
    return 1;
  }
  CHECK_CUDA(cudaDeviceSynchronize());
  std::printf("%-24s d=%3d T=%6d tiles q%d k%d %s %s | fwd %7.3f | bwd %7.3f (dq %7.3f dk/dv "
              "%7.3f) | fwd+bwd %7.3f ms | dq accumulator: bwd %7.3f fwd+bwd %7.3f ms | sm80: "
              "fwd %7.3f bwd %7.3f accumulator bwd %7.3f | max diff from sm80 / max: out %.1e "
              "dq %.1e dk %.1e dv %.1e accumulator dq %.1e dk %.1e dv %.1e | sums out %.6e dq "
              "%.6e dk %.6e dv %.6e | accumulator dq %.6e dk %.6e dv %.6e\n",
              argv[3], D, T, forward.query_tile, backward.key_tile,
              KeyTilingName(KeyTilingOf(key_lists)), wgmma ? "wgmma" : "sm80", fwd, bwd, dq_only,
              bwd - dq_only, fwd + bwd, bwd_fused, fwd + bwd_fused, fwd_sm80, bwd_sm80,
              fused_sm80, diffs[0], diffs[1], diffs[2], diffs[3], diffs[4], diffs[5], diffs[6],
              out_sum, dq_sum, dk_sum, dv_sum, AbsSum(dq, n), AbsSum(dk, n), AbsSum(dv, n));
  return 0;
}
