// CUDA kernels of the block-sparse attention, included by one translation unit per
// (dtype, head size) so that the build parallelises and each unit stays small.
//
// Tensor-core path (float16, bfloat16): flash-attention style with mma.sync m16n8k16 (f32
// accumulate), ldmatrix and cp.async, i.e. sm_80 instructions that also run on sm_90. At
// head_dim 64 on Hopper, the forward, dq and (on 64-key tiles) dk/dv kernels of
// sparse_attention_kernels_sm90.cuh, on warpgroup products, take their place.
//   forward  one CTA per (128 or 64 query rows, batch*head), warps of 16 rows (32 on 128-row
//            tiles at head_dim <= 64); key tiles of 64 gathered from the work list 16 rows at a
//            time, double-buffered; online softmax in the log2 domain; writes out and lse.
//   dq       one CTA per 64 query rows, 4 warps; recomputes P from lse, dP = dO V^T,
//            dS = P (dP - delta); computes delta itself and leaves it for dk, dv.
//   dk, dv   one CTA per 64 key rows walking the transposed work list: 64 contiguous keys, or
//            two halves of 32 that the host paired because the same queries attend them, or
//            32 contiguous keys (see KeyTiling); computes S^T and dP^T so that P^T and dS^T
//            come out of the accumulators already in the A-operand layout.
// Deterministic by default: every output element is owned by one thread of one CTA. Where the
// host passes a float32 dq accumulator (TileWork::dq_accum), the dk/dv kernel also computes
// dS K and adds it to the accumulator straight from registers (16-byte vector reductions on
// sm_90, atomics per element before it), and the dq kernel with its second computation of S
// and dP is skipped: two products of seven per pair fewer, at the price of a summation order
// that varies (gpu::PreferAtomicDq decides; never where the sm_90a kernels run).
//
// Scalar path (float32, other head sizes): one warp per row, the same work lists.
#ifndef TF_SPARSE_ATTN_CC_KERNELS_SPARSE_ATTENTION_KERNELS_CUH_
#define TF_SPARSE_ATTN_CC_KERNELS_SPARSE_ATTENTION_KERNELS_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cc/kernels/sparse_attention_gpu.h"
#include "cc/kernels/sparse_attention_params.h"

namespace tf_sparse_attn {
namespace gpu {
namespace detail {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = __builtin_huge_valf();

template <ElementType E> struct Elem;
template <> struct Elem<ElementType::kFloat32> {
  using T = float;
  static __device__ __forceinline__ float ToFloat(T x) { return x; }
  static __device__ __forceinline__ T FromFloat(float x) { return x; }
};
template <> struct Elem<ElementType::kFloat16> {
  using T = __half;
  using T2 = __half2;
  static __device__ __forceinline__ float ToFloat(T x) { return __half2float(x); }
  static __device__ __forceinline__ T FromFloat(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ uint32_t Pack(float lo, float hi) {
    T2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};
template <> struct Elem<ElementType::kBFloat16> {
  using T = __nv_bfloat16;
  using T2 = __nv_bfloat162;
  static __device__ __forceinline__ float ToFloat(T x) { return __bfloat162float(x); }
  static __device__ __forceinline__ T FromFloat(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ uint32_t Pack(float lo, float hi) {
    T2 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

inline const char* LastError() {
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// ---------------------------------------------------------------------------------------------
// Small PTX wrappers.

__device__ __forceinline__ uint32_t SmemAddr(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// 16-byte asynchronous copy; src_bytes == 0 fills the destination with zeros (rows past the
// end and missing chunks), so that masked products never meet uninitialised shared memory.
__device__ __forceinline__ void CpAsync16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(SmemAddr(dst)), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void CpAsync4(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(SmemAddr(dst)), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
// The one barrier of a double-buffered step loop: the step's loads (the only group in flight)
// have landed and are visible to every warp, and every warp has finished the previous step, so
// that the buffer it read may be refilled right after. A step therefore issues the next step's
// loads after this call, not before, and needs no barrier at its end.
__device__ __forceinline__ void NextStep() {
  CpAsyncWait<0>();
  __syncthreads();
}

__device__ __forceinline__ void Ldmatrix4(uint32_t (&r)[4], const void* ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddr(ptr)));
}
__device__ __forceinline__ void Ldmatrix4T(uint32_t (&r)[4], const void* ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddr(ptr)));
}

template <ElementType E>
__device__ __forceinline__ void Mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1) {
  if constexpr (E == ElementType::kBFloat16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Fragment addressing (lane = 0..31, tiles of 16 rows x 16 columns in a row-major smem array
// with row stride S elements):
//   A operand (rows = M, columns = K):            row lane&15,              column (lane>>4)*8
//   B operand from [N][K] storage (non-trans):    row (lane&7)+(lane>>4)*8, column ((lane>>3)&1)*8
//     -> r[0], r[1] = b0, b1 of n-tile 0; r[2], r[3] = b0, b1 of n-tile 1
//   B operand from [K][N] storage (trans):        row (lane&7)+((lane>>3)&1)*8, column (lane>>4)*8
template <int S>
__device__ __forceinline__ int OffsetA(int lane) { return (lane & 15) * S + (lane >> 4) * 8; }
template <int S>
__device__ __forceinline__ int OffsetBn(int lane) {
  return ((lane & 7) + (lane >> 4) * 8) * S + ((lane >> 3) & 1) * 8;
}
template <int S>
__device__ __forceinline__ int OffsetBt(int lane) {
  return ((lane & 7) + ((lane >> 3) & 1) * 8) * S + (lane >> 4) * 8;
}

// 2^x in one MUFU instruction. exp2f adds range handling for results below 2^-126; those flush
// to zero here, which no softmax weight notices: it is relative to the row maximum's weight of
// 1, far below bf16 or f16 resolution.
__device__ __forceinline__ float FastExp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

template <bool B>
using Flag = std::integral_constant<bool, B>;

// Calls f(Flag<a>(), Flag<b>()): the per-element score loops take their masking and bias cases
// as compile-time flags, so each case compiles to its own straight-line copy instead of one
// copy that tests the flags (and loads bias it may not use) for every element.
template <typename F>
__device__ __forceinline__ void Specialize(bool a, bool b, F&& f) {
  if (a) {
    if (b) f(Flag<true>(), Flag<true>()); else f(Flag<true>(), Flag<false>());
  } else {
    if (b) f(Flag<false>(), Flag<true>()); else f(Flag<false>(), Flag<false>());
  }
}

// The same for one flag: f(Flag<a>()).
template <typename F>
__device__ __forceinline__ void Specialize(bool a, F&& f) {
  if (a) f(Flag<true>()); else f(Flag<false>());
}

__device__ __forceinline__ float WarpSum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// lse of a row in the log2 domain, with rows that attended nothing (lse = -inf) mapped to +inf
// so that exp2(score - lse) is 0 there rather than NaN.
__device__ __forceinline__ float Lse2(float lse) { return lse == -kInf ? kInf : lse * kLog2e; }

// The lane's rows g and g + 8 of the 16-row m-tile whose first token is row0, in a tile whose
// first token is tile0, and their layout rows relative to the tile's first, as work-list
// entries count them.
__device__ __forceinline__ void MTileRows(const SparseAttentionParams& p, int tile0, int row0,
                                          int g, int (&rows)[2], int (&sub)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    rows[r] = row0 + g + 8 * r;
    sub[r] = rows[r] / p.block_size - tile0 / p.block_size;
  }
}

// Where 16-byte piece c of row r of a tile goes in shared memory (in elements), for the
// tensor-core kernels' tiles: rows of S elements, padded so that ldmatrix rows fall into
// distinct banks.
template <int S>
struct PaddedRows {
  static __device__ __forceinline__ int At(int r, int c) { return r * S + c * 8; }
  // How GatherRowPairs addresses rows (see there).
  static constexpr bool kMulAddRowAddresses = false;
};

// Copies ROWS (a multiple of 16) gathered rows of two [batch, len, heads, D] tensors read at
// the same tokens (K and V, or Q and dO) into shared memory laid out as Rows (PaddedRows or
// another placement of 16-byte pieces with an At(row, piece)). Row r comes from
// token entries[2 * (r / 16)] + r % 16; chunks >= nvalid are zero-filled. Each thread copies
// one 16-byte column of every (THREADS / kSegs)-th row from its own: a loop of constant trip
// count that unrolls with the row arithmetic folded, and one token offset serves both tensors.
// (A strided loop from threadIdx.x for one tensor at a time spent about a quarter of the dk/dv
// kernel's instructions; this took 11-15% off every kernel.)
template <typename T, int D, typename Rows, int ROWS, int THREADS>
__device__ __forceinline__ void GatherRowPairs(T* dst_a, T* dst_b, const T* src_a,
                                               const T* src_b, int64_t token_stride,
                                               const int32_t* entries, int nvalid) {
  constexpr int kSegs = D / 8;  // 16-byte pieces in a row
  static_assert(THREADS % kSegs == 0 && (ROWS * kSegs) % THREADS == 0,
                "every thread copies the same number of whole pieces");
  constexpr int kRowsPerPass = THREADS / kSegs;
  const int c = static_cast<int>(threadIdx.x % kSegs), r0 = static_cast<int>(threadIdx.x / kSegs);
  src_a += c * 8;
  src_b += c * 8;
  // Callers pass token 0 for rows past the list, whose copies read nothing.
  // Rows::kMulAddRowAddresses: a row's address in each tensor as one 32 x 32 -> 64-bit
  // multiply-add of the token by the token stride in bytes (which fits 32 bits: heads * D *
  // sizeof(T)), instead of a 64-bit product scaled and added per tensor. Fewer instructions:
  // the sm_90a kernels, bound by their issue slots, gained (H200, dense, d = 64: dq 1-2%,
  // dk/dv 1.5%); the sm_80 ones at head_dim 128 lost 2.5%.
  const uint32_t stride_bytes = static_cast<uint32_t>(token_stride * sizeof(T));
  auto copy_row = [&](int r, int token, bool valid) {
    const int at = Rows::At(r, c);
    if constexpr (Rows::kMulAddRowAddresses) {
      const uint64_t offset = static_cast<uint64_t>(static_cast<uint32_t>(token)) * stride_bytes;
      CpAsync16(dst_a + at, reinterpret_cast<const char*>(src_a) + offset, valid ? 16 : 0);
      CpAsync16(dst_b + at, reinterpret_cast<const char*>(src_b) + offset, valid ? 16 : 0);
    } else {
      const int64_t offset = static_cast<int64_t>(token) * token_stride;
      CpAsync16(dst_a + at, src_a + offset, valid ? 16 : 0);
      CpAsync16(dst_b + at, src_b + offset, valid ? 16 : 0);
    }
  };
  if constexpr (kRowsPerPass % kChunk == 0) {
    // Every pass moves on by whole chunks, so the thread's rows are all row r0 % 16 of their
    // chunks, and their entries lie at fixed distances from its first: one base address and
    // immediate offsets instead of an address per row (with ReadStep's paired loads, H200,
    // dense, d = 64: dq 5% faster, dk/dv 2%).
    constexpr int kChunksPerPass = kRowsPerPass / kChunk;
    const int chunk0 = r0 / kChunk, row_in_chunk = r0 % kChunk;
    const int32_t* first = entries + 2 * chunk0;
#pragma unroll
    for (int k = 0; k < ROWS * kSegs / THREADS; ++k) {
      const bool valid = chunk0 + k * kChunksPerPass < nvalid;
      copy_row(r0 + k * kRowsPerPass,
               valid ? first[2 * k * kChunksPerPass] + row_in_chunk : 0, valid);
    }
  } else {
#pragma unroll
    for (int k = 0; k < ROWS * kSegs / THREADS; ++k) {
      const int r = r0 + k * kRowsPerPass;
      const bool valid = (r >> 4) < nvalid;
      copy_row(r, valid ? entries[2 * (r >> 4)] + (r & 15) : 0, valid);
    }
  }
}

// Loads ROWS contiguous rows starting at token `first` (rows past `len` zero-filled), laid out
// as Rows.
template <typename T, int D, typename Rows, int ROWS, int THREADS>
__device__ __forceinline__ void LoadRows(T* dst, const T* src, int64_t token_stride, int first,
                                         int len) {
  constexpr int kSegs = D / 8, kPieces = ROWS * kSegs;
#pragma unroll
  for (int pass = 0; pass < (kPieces + THREADS - 1) / THREADS; ++pass) {
    const int idx = static_cast<int>(threadIdx.x) + pass * THREADS;
    if (kPieces % THREADS != 0 && idx >= kPieces) break;
    const int r = idx / kSegs, c = idx % kSegs;
    const int token = first + r;
    const bool valid = token < len;
    CpAsync16(dst + Rows::At(r, c), src + (valid ? token : 0) * token_stride + c * 8,
              valid ? 16 : 0);
  }
}

// The N work-list entries of one step from entry e (those >= e1 are empty): each chunk's first
// token and info. Returns whether any pair of the step may be masked (a partial or empty
// chunk), i.e. whether the token rules apply.
template <int N>
__device__ __forceinline__ bool ReadStep(const int32_t* ent, int e, int e1, int (&first)[N],
                                         int32_t (&info)[N]) {
  // An entry's two words are 8-byte aligned (the op places every list at an even word of its
  // allocation): one load each.
  const int2* pairs = reinterpret_cast<const int2*>(ent) + e;
  bool partial = false;
#pragma unroll
  for (int c = 0; c < N; ++c) {
    const bool valid = e + c < e1;
    const int2 entry = valid ? pairs[c] : make_int2(0, 0);
    first[c] = entry.x;
    info[c] = entry.y;
    partial |= !valid || (info[c] & kInfoPartial);
  }
  return partial;
}

// The double-buffered step loop of the tensor-core kernels over their work-list entries, NC
// chunks a step: each step starts at `barrier` (NextStep, or NextStepForAsyncProxy where the
// tensor cores read the tiles; skipped at the first step unless kBarrierFirst, for kernels
// whose prologue waited already), then issues the next step's loads into the other buffer,
// then runs body(buf, e, first, info, partial) with the step's entries (ReadStep).
template <int NC, bool kBarrierFirst, typename Barrier, typename Load, typename Body>
__device__ __forceinline__ void ForEachStep(int ngroups, int e0, int e1, const int32_t* ent,
                                            Barrier&& barrier, Load&& load_group, Body&& body) {
  for (int grp = 0; grp < ngroups; ++grp) {
    const int buf = grp & 1;
    if (kBarrierFirst || grp > 0) barrier();
    if (grp + 1 < ngroups) load_group(grp + 1, buf ^ 1);
    CpAsyncCommit();
    const int e = e0 + grp * NC;
    int first[NC];
    int32_t info[NC];
    const bool partial = ReadStep(ent, e, e1, first, info);
    body(buf, e, first, info, partial);
  }
}

// The gathered-side token of accumulator element x of n-tile n (8 columns each, two per
// chunk), for the lane's column pair t4.
template <int N>
__device__ __forceinline__ int StepToken(const int (&first)[N], int n, int x, int t4) {
  return first[n >> 1] + (n & 1) * 8 + 2 * t4 + (x & 1);
}

// Accumulator tiles 2kk and 2kk+1 (16 rows x 16 columns of f32) as the A operand of the next
// product, rounded to E.
template <ElementType E>
__device__ __forceinline__ void PackA(uint32_t (&a)[4], const float (&lo)[4],
                                      const float (&hi)[4]) {
  a[0] = Elem<E>::Pack(lo[0], lo[1]);
  a[1] = Elem<E>::Pack(lo[2], lo[3]);
  a[2] = Elem<E>::Pack(hi[0], hi[1]);
  a[3] = Elem<E>::Pack(hi[2], hi[3]);
}

// ---------------------------------------------------------------------------------------------
// Tensor-core forward.

// The first part of a step of the forward's online softmax for a 16-row m-tile: the step's
// scores s (NT n-tiles of 8 keys: raw products when kRaw, see QueryCta) are masked where
// kMasked, and scaled and biased unless kRaw; their row maxima go to mx (this lane's part of
// them). step_bias: the step's key bias in shared memory, or nullptr.
template <bool kMasked, bool kRaw, int NT>
__device__ __forceinline__ void MaskedScoreMaxima(const SparseAttentionParams& p,
                                                  float (&s)[NT][4], float (&mx)[2], float sl,
                                                  const float* step_bias, const int (&ks)[NT / 2],
                                                  const int32_t (&info)[NT / 2],
                                                  const int (&sub)[2], const int (&row_i)[2],
                                                  int t4) {
  static_assert(NT > 0 && (NT & (NT - 1)) == 0, "the maxima's trees halve NT");
#pragma unroll
  for (int n = 0; n < NT; ++n) {
#pragma unroll
    for (int x = 0; x < 4; ++x) {
      float v = s[n][x];
      if constexpr (!kRaw) {
        v *= sl;
        if (step_bias != nullptr) v += step_bias[n * 8 + 2 * t4 + (x & 1)] * kLog2e;
      }
      if constexpr (kMasked) {
        const int c = n >> 1;
        const int j = StepToken(ks, n, x, t4);
        if (!EntryAllows(p, info[c], sub[x >> 1], row_i[x >> 1], j)) v = -kInf;
      }
      s[n][x] = v;
    }
  }
  // The maxima as trees, log2(2 NT) deep: the exponentials wait for them, and a chain of 2 NT
  // dependent maxima a row was the longest stretch of the step's critical path.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float t[NT];
#pragma unroll
    for (int n = 0; n < NT; ++n) t[n] = fmaxf(s[n][2 * r], s[n][2 * r + 1]);
#pragma unroll
    for (int half = NT / 2; half > 0; half /= 2) {
#pragma unroll
      for (int n = 0; n < half; ++n) t[n] = fmaxf(t[n], t[n + half]);
    }
    mx[r] = t[0];
  }
}

// The rest of the step: the rows' maxima m and sums l and their outputs o are rescaled to the
// new maxima (mx, this lane's maxima of the step), and s is left holding the unnormalised
// probabilities.
template <int NT, int DN>
__device__ __forceinline__ void RescaleAndExponentiate(float (&s)[NT][4], float (&o)[DN][4],
                                                       float (&m)[2], float (&l)[2],
                                                       float (&mx)[2], float to_log2) {
  float m_use[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    const float m_new = fmaxf(m[r], mx[r] * to_log2);
    m_use[r] = m_new == -kInf ? 0.f : m_new;
    const float alpha = FastExp2(m[r] - m_use[r]);
    m[r] = m_new;
    l[r] *= alpha;
#pragma unroll
    for (int n = 0; n < DN; ++n) {
      o[n][2 * r] *= alpha;
      o[n][2 * r + 1] *= alpha;
    }
  }
#pragma unroll
  for (int n = 0; n < NT; ++n) {
#pragma unroll
    for (int x = 0; x < 4; ++x) {
      const float pv = FastExp2(fmaf(s[n][x], to_log2, -m_use[x >> 1]));
      s[n][x] = pv;
      l[x >> 1] += pv;
    }
  }
}

// One step of the forward's online softmax for a 16-row m-tile, the partial and raw cases
// taken at run time: only the score loop is compiled once per case.
template <int NT, int DN>
__device__ __forceinline__ void OnlineSoftmaxStep(const SparseAttentionParams& p,
                                                  float (&s)[NT][4], float (&o)[DN][4],
                                                  float (&m)[2], float (&l)[2], bool partial,
                                                  bool raw, float sl, float to_log2,
                                                  const float* step_bias, const int (&ks)[NT / 2],
                                                  const int32_t (&info)[NT / 2],
                                                  const int (&sub)[2], const int (&row_i)[2],
                                                  int t4) {
  float mx[2];
  Specialize(partial, raw, [&](auto masked, auto unscaled) {
    MaskedScoreMaxima<decltype(masked)::value, decltype(unscaled)::value>(
        p, s, mx, sl, step_bias, ks, info, sub, row_i, t4);
  });
  RescaleAndExponentiate(s, o, m, l, mx, to_log2);
}

// Writes a 16-row m-tile's outputs, normalised by the row sums, and lse (natural log) at
// lse_row0 + row; rows past q_len are skipped.
template <ElementType E, int DN>
__device__ __forceinline__ void WriteForwardRows(const SparseAttentionParams& p,
                                                 typename Elem<E>::T* out, int64_t stride,
                                                 int64_t lse_row0, const float (&o)[DN][4],
                                                 const float (&m)[2], const float (&l)[2],
                                                 const int (&row_i)[2], int t4) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = l[r];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int i = row_i[r];
    if (i >= p.q_len) continue;
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
    for (int n = 0; n < DN; ++n) {
      *reinterpret_cast<uint32_t*>(out + i * stride + n * 8 + 2 * t4) =
          Elem<E>::Pack(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
    }
    if (t4 == 0) p.lse[lse_row0 + i] = sum > 0.f ? (m[r] + log2f(sum)) * kLn2 : -kInf;
  }
}

// Where a forward or dq CTA works: its tile of ROWS queries (causal rows late in the sequence
// carry the most work, so they start first, tile-major over (batch, head) so that the heaviest
// tiles of every head go in the first waves), its (batch, head), the bases of its q, k, v, out,
// d_out and key bias, and its span [e0, e1) of work-list entries, whose keys LoadKeyStep
// gathers.
template <typename T, int D, int ROWS>
struct QueryCta {
  int bh, q0, e0, e1;
  int64_t stride;  // between tokens of one tensor
  int64_t q_base;  // this (batch, head)'s first query in q, out, d_out and dq
  const T *q, *k, *v, *d_out;
  T* out;
  const float* bias;
  // The forward's scores: without a key bias and with a positive scale, row maxima are taken
  // over the raw products (scaling keeps their order) and the scale folds into the one FFMA
  // before ex2 (`raw`); otherwise the scores are scaled (by sl, into log2 units) and biased
  // first. Scores are then score * log2(e) / to_log2.
  float sl, to_log2;
  bool raw;

  __device__ __forceinline__ QueryCta(const SparseAttentionParams& p, const TileWork& w) {
    const int bhs = p.batch * p.heads, tiles = (p.q_len + ROWS - 1) / ROWS;
    const int tile = tiles - 1 - static_cast<int>(blockIdx.x / bhs);
    bh = blockIdx.x % bhs;
    const int b = bh / p.heads, h = bh % p.heads;
    q0 = tile * ROWS;
    stride = static_cast<int64_t>(p.heads) * D;
    q_base = static_cast<int64_t>(b) * p.q_len * stride + h * D;
    const int64_t kv_base = static_cast<int64_t>(b) * p.kv_len * stride + h * D;
    q = static_cast<const T*>(p.q) + q_base;
    k = static_cast<const T*>(p.k) + kv_base;
    v = static_cast<const T*>(p.v) + kv_base;
    out = static_cast<T*>(p.out) + q_base;
    d_out = p.d_out != nullptr ? static_cast<const T*>(p.d_out) + q_base : nullptr;
    bias = p.key_bias ? p.key_bias + static_cast<int64_t>(b) * p.kv_len : nullptr;
    const int32_t* list = w.q_offsets + p.layout_head(h) * tiles + tile;
    e0 = list[0];
    e1 = list[1];
    sl = p.scale * kLog2e;
    raw = bias == nullptr && sl > 0.f;
    to_log2 = raw ? sl : 1.f;
  }

  // Gathers step grp's KN keys from the CTA's list (KN / 16 chunks; those past the list
  // zero-filled) into K and V shared buffers laid out as Rows, and their key bias when there
  // is one.
  template <typename Rows, int KN, int THREADS>
  __device__ __forceinline__ void LoadKeyStep(T* sK, T* sV, float* sBias, const int32_t* ent,
                                              int grp) const {
    const int e = e0 + grp * (KN / kChunk);
    const int nvalid = min(KN / kChunk, e1 - e);
    GatherRowPairs<T, D, Rows, KN, THREADS>(sK, sV, k, v, stride, ent + 2 * e, nvalid);
    const int tid = threadIdx.x;
    if (bias != nullptr && tid < KN) {
      const int chunk = tid >> 4;
      const bool valid = chunk < nvalid;
      const int token = valid ? ent[2 * (e + chunk)] + (tid & 15) : 0;
      CpAsync4(sBias + tid, bias + token, valid ? 4 : 0);
    }
  }
};

template <int D, int ROWS>
struct FwdConfig {
  static constexpr int kRows = ROWS;  // kTile or kFwdTile
  // 16-row m-tiles per warp. Two on 128-row tiles at D <= 64: each K or V fragment read from
  // shared memory then feeds four products instead of two, which halves the shared-memory
  // traffic per product that bounds the one-m-tile kernel. At D = 128 the second tile's
  // accumulators would not fit in registers.
  static constexpr int kMTiles = (D <= 64 && ROWS == kFwdTile) ? 2 : 1;
  static constexpr int kWarps = ROWS / (16 * kMTiles);
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kS = D + 8;  // padded row: ldmatrix rows fall into distinct banks
  static constexpr int kKeys = 64;  // keys per step: 4 chunks
  // One m-tile at D <= 64: 128 registers hold the kernel (148 unbounded) so that 16 warps fit
  // per SM. Two m-tiles: up to 255 registers, 8 warps per SM. D = 128: 8 warps per SM.
  static constexpr int kMinBlocks = kMTiles == 2 ? 2 : (D <= 64 ? 2 * kFwdTile / ROWS : 1);
  static constexpr size_t SmemBytes(size_t elem) {
    return elem * (kRows * kS + 4 * kKeys * kS) + sizeof(float) * 2 * kKeys;
  }
};

template <ElementType E, int D, int ROWS>
__global__ void __launch_bounds__(FwdConfig<D, ROWS>::kThreads,
                                  FwdConfig<D, ROWS>::kMinBlocks)
    MmaForwardKernel(const SparseAttentionParams p, const TileWork w) {
  using Cfg = FwdConfig<D, ROWS>;
  using T = typename Elem<E>::T;
  constexpr int S = Cfg::kS, KN = Cfg::kKeys, NT = KN / 8;
  constexpr int TH = Cfg::kThreads, MT = Cfg::kMTiles, WR = 16 * MT;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + ROWS * S;
  T* sV = sK + 2 * KN * S;
  float* sBias = reinterpret_cast<float*>(sV + 2 * KN * S);

  const QueryCta<T, D, ROWS> cta(p, w);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const int ngroups = (cta.e1 - cta.e0 + 3) / 4;
  const int32_t* ent = w.q_entries;

  auto load_group = [&](int grp, int buf) {
    cta.template LoadKeyStep<PaddedRows<S>, KN, TH>(sK + buf * KN * S, sV + buf * KN * S,
                                                    sBias + buf * KN, ent, grp);
  };

  LoadRows<T, D, PaddedRows<S>, ROWS, TH>(sQ, cta.q, cta.stride, cta.q0, p.q_len);
  if (ngroups > 0) load_group(0, 0);
  CpAsyncCommit();
  CpAsyncWait<0>();
  __syncthreads();

  // The warp's rows: m-tile mt holds rows warp * WR + mt * 16 + (g, g + 8) of the tile.
  uint32_t qf[MT][D / 16][4];
  float o[MT][D / 8][4];
  float m[MT][2], l[MT][2];
  int row_i[MT][2], sub[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const T* rows = sQ + (warp * WR + mt * 16) * S;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) Ldmatrix4(qf[mt][kk], rows + kk * 16 + OffsetA<S>(lane));
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.f;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      m[mt][r] = -kInf;
      l[mt][r] = 0.f;
    }
    MTileRows(p, cta.q0, cta.q0 + warp * WR + mt * 16, g, row_i[mt], sub[mt]);
  }

  ForEachStep<4, false>(
      ngroups, cta.e0, cta.e1, ent, [&] { NextStep(); }, load_group,
      [&](int buf, int e, const int (&ks)[4], const int32_t (&info)[4], bool partial) {
    const T* cK = sK + buf * KN * S;
    const T* cV = sV + buf * KN * S;
    float s[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int n = 0; n < NT; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t kf[4];
        Ldmatrix4(kf, cK + np * 16 * S + kk * 16 + OffsetBn<S>(lane));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          Mma<E>(s[mt][2 * np], qf[mt][kk], kf[0], kf[1]);
          Mma<E>(s[mt][2 * np + 1], qf[mt][kk], kf[2], kf[3]);
        }
      }
    }

    const float* step_bias = cta.bias != nullptr ? sBias + buf * KN : nullptr;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      OnlineSoftmaxStep(p, s[mt], o[mt], m[mt], l[mt], partial, cta.raw, cta.sl, cta.to_log2,
                        step_bias, ks, info, sub[mt], row_i[mt], t4);
    }
#pragma unroll
    for (int kk = 0; kk < KN / 16; ++kk) {
      uint32_t pa[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) PackA<E>(pa[mt], s[mt][2 * kk], s[mt][2 * kk + 1]);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t vf[4];
        Ldmatrix4T(vf, cV + kk * 16 * S + dp * 16 + OffsetBt<S>(lane));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          Mma<E>(o[mt][2 * dp], pa[mt], vf[0], vf[1]);
          Mma<E>(o[mt][2 * dp + 1], pa[mt], vf[2], vf[3]);
        }
      }
    }
  });

#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    WriteForwardRows<E>(p, cta.out, cta.stride, static_cast<int64_t>(cta.bh) * p.q_len, o[mt],
                        m[mt], l[mt], row_i[mt], t4);
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core dq.

// Sum over 8 products of two packed 16-byte vectors of 16-bit floats.
template <ElementType E>
__device__ __forceinline__ float Dot8(const uint4& a, const uint4& b) {
  const uint32_t x[4] = {a.x, a.y, a.z, a.w}, y[4] = {b.x, b.y, b.z, b.w};
  float acc = 0.f;
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    float2 fx, fy;
    if constexpr (E == ElementType::kBFloat16) {
      fx = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&x[u]));
      fy = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&y[u]));
    } else {
      fx = __half22float2(*reinterpret_cast<const __half2*>(&x[u]));
      fy = __half22float2(*reinterpret_cast<const __half2*>(&y[u]));
    }
    acc = fmaf(fx.x, fy.x, acc);
    acc = fmaf(fx.y, fy.y, acc);
  }
  return acc;
}

// delta = rowsum(dO * O) - d_lse for the warp's 16 query rows starting at `row0`, computed by
// the dq kernel itself rather than by a kernel of its own: a separate pass over O and dO cost
// as much as a tenth of the backward of the sparsest layouts. Two lanes share a row, half of
// its columns each. The result goes to w.delta, which the dk/dv kernel launched after dq
// reads, and to `delta` for the rows g and g + 8 of the caller's fragments.
template <ElementType E, int D>
__device__ __forceinline__ void RowDelta(const SparseAttentionParams& p, const TileWork& w,
                                         int bh, int64_t qoff, int row0, int lane,
                                         float (&delta)[2]) {
  using T = typename Elem<E>::T;
  const int64_t stride = static_cast<int64_t>(p.heads) * D;
  const int i = row0 + (lane >> 1), half = lane & 1;
  float acc = 0.f;
  if (i < p.q_len) {
    const uint4* o = reinterpret_cast<const uint4*>(static_cast<const T*>(p.out) + qoff +
                                                    i * stride + half * (D / 2));
    const uint4* d = reinterpret_cast<const uint4*>(static_cast<const T*>(p.d_out) + qoff +
                                                    i * stride + half * (D / 2));
#pragma unroll
    for (int c = 0; c < D / 16; ++c) acc += Dot8<E>(__ldg(o + c), __ldg(d + c));
  }
  acc += __shfl_xor_sync(0xffffffffu, acc, 1);
  const int64_t at = static_cast<int64_t>(bh) * p.q_len + i;
  // d lse_i / d s_ij = P_ij, so d_lse enters dS = P (dP - delta) with the opposite sign.
  if (i < p.q_len && p.d_lse != nullptr) acc -= p.d_lse[at];
  if (i < p.q_len && half == 0) w.delta[at] = acc;
  const int g = lane >> 2;
  delta[0] = __shfl_sync(0xffffffffu, acc, 2 * g);
  delta[1] = __shfl_sync(0xffffffffu, acc, 2 * (g + 8));
}

template <int D>
struct DqConfig {
  // Four CTAs (16 warps) per SM at D <= 64: 128 registers hold dq without spills (168
  // unbounded, which allowed three), and shared memory takes four. (Two m-tiles per warp, as
  // in the forward, needed 255 registers and so halved the warps per SM: no faster on dense
  // layouts, 35% slower on local ones.)
  static constexpr int kMinBlocks = D <= 64 ? 4 : 1;
  static constexpr int kThreads = 128;  // 4 warps of 16 query rows
  static constexpr int kS = D + 8;
  static constexpr int kKeys = 64;
  static constexpr size_t SmemBytes(size_t elem) {
    return elem * (2 * kTile * kS + 4 * kKeys * kS) + sizeof(float) * 2 * kKeys;
  }
};

// The dq kernels' prologue: the tile's Q and dO (laid out as Rows) and the first step's loads
// (load_group) in flight; the lane's rows g and g + 8 of the warp's 16, their layout rows, and
// their lse (log2 units, see Lse2, also left in w.lse2 for dk/dv) and delta, computed here
// (RowDelta).
template <ElementType E, int D, typename Rows, int THREADS, typename Load>
__device__ __forceinline__ void DqPrologue(const SparseAttentionParams& p, const TileWork& w,
                                           const QueryCta<typename Elem<E>::T, D, kTile>& cta,
                                           typename Elem<E>::T* sQ, typename Elem<E>::T* sdO,
                                           int ngroups, Load&& load_group, int warp, int lane,
                                           int (&row_i)[2], int (&sub)[2], float (&lse2)[2],
                                           float (&delta)[2]) {
  LoadRows<typename Elem<E>::T, D, Rows, kTile, THREADS>(sQ, cta.q, cta.stride, cta.q0,
                                                         p.q_len);
  LoadRows<typename Elem<E>::T, D, Rows, kTile, THREADS>(sdO, cta.d_out, cta.stride, cta.q0,
                                                         p.q_len);
  if (ngroups > 0) load_group(0, 0);
  CpAsyncCommit();
  const int row0 = cta.q0 + warp * 16;
  MTileRows(p, cta.q0, row0, lane >> 2, row_i, sub);
  RowDelta<E, D>(p, w, cta.bh, cta.q_base, row0, lane, delta);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const bool in = row_i[r] < p.q_len;
    const int64_t at = static_cast<int64_t>(cta.bh) * p.q_len + row_i[r];
    lse2[r] = in ? Lse2(p.lse[at]) : kInf;
    if (in && (lane & 3) == 0) w.lse2[at] = lse2[r];
  }
}

// For DqScores: dP is ready.
struct DpReady {
  __device__ __forceinline__ void operator()() const {}
};

// A dq step's scores s become dS = P (dP - delta) for a 16-row m-tile: P from the scores and
// lse (masked where the step is partial, biased by step_bias unless nullptr) first, then
// wait_dp() (where dP's products may still be running), then dS; in one pass where dP is
// ready (DpReady: two passes made the sm_80 kernel spill).
template <int NT, typename WaitDp>
__device__ __forceinline__ void DqScores(const SparseAttentionParams& p, float (&s)[NT][4],
                                         float (&dp)[NT][4], bool partial, float sl,
                                         const float (&lse2)[2], const float (&delta)[2],
                                         const float* step_bias, const int (&ks)[NT / 2],
                                         const int32_t (&info)[NT / 2], const int (&sub)[2],
                                         const int (&row_i)[2], int t4, WaitDp&& wait_dp) {
  constexpr bool kOnePass = std::is_same_v<std::decay_t<WaitDp>, DpReady>;
  Specialize(partial, step_bias != nullptr, [&](auto masked, auto biased) {
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        float shift = -lse2[x >> 1];
        if constexpr (biased) shift += step_bias[n * 8 + 2 * t4 + (x & 1)] * kLog2e;
        float v = fmaf(s[n][x], sl, shift);
        if constexpr (masked) {
          const int c = n >> 1;
          const int j = StepToken(ks, n, x, t4);
          if (!EntryAllows(p, info[c], sub[x >> 1], row_i[x >> 1], j)) v = -kInf;
        }
        s[n][x] = FastExp2(v);
        if constexpr (kOnePass) s[n][x] *= dp[n][x] - delta[x >> 1];
      }
    }
  });
  if constexpr (!kOnePass) {
    wait_dp();
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
      for (int x = 0; x < 4; ++x) s[n][x] *= dp[n][x] - delta[x >> 1];
    }
  }
}

// Writes the lane's rows of dq (scaled).
template <ElementType E, int D, int ROWS>
__device__ __forceinline__ void WriteDqRows(const SparseAttentionParams& p,
                                            const QueryCta<typename Elem<E>::T, D, ROWS>& cta,
                                            const float (&dq)[D / 8][4], const int (&row_i)[2],
                                            int t4) {
  using T = typename Elem<E>::T;
  T* out = static_cast<T*>(p.dq) + cta.q_base;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = row_i[r];
    if (i >= p.q_len) continue;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      *reinterpret_cast<uint32_t*>(out + i * cta.stride + n * 8 + 2 * t4) =
          Elem<E>::Pack(dq[n][2 * r] * p.scale, dq[n][2 * r + 1] * p.scale);
    }
  }
}

template <ElementType E, int D>
__global__ void __launch_bounds__(DqConfig<D>::kThreads, DqConfig<D>::kMinBlocks)
    MmaDqKernel(const SparseAttentionParams p, const TileWork w) {
  using Cfg = DqConfig<D>;
  using T = typename Elem<E>::T;
  constexpr int S = Cfg::kS, KN = Cfg::kKeys, NT = KN / 8, TH = Cfg::kThreads;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sdO = sQ + kTile * S;
  T* sK = sdO + kTile * S;
  T* sV = sK + 2 * KN * S;
  float* sBias = reinterpret_cast<float*>(sV + 2 * KN * S);

  const QueryCta<T, D, kTile> cta(p, w);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, t4 = lane & 3;
  const int ngroups = (cta.e1 - cta.e0 + 3) / 4;
  const int32_t* ent = w.q_entries;

  auto load_group = [&](int grp, int buf) {
    cta.template LoadKeyStep<PaddedRows<S>, KN, TH>(sK + buf * KN * S, sV + buf * KN * S,
                                                    sBias + buf * KN, ent, grp);
  };

  int row_i[2], sub[2];
  float lse2[2], delta[2];
  DqPrologue<E, D, PaddedRows<S>, TH>(p, w, cta, sQ, sdO, ngroups, load_group, warp, lane,
                                      row_i, sub, lse2, delta);
  const float sl = p.scale * kLog2e;
  float dq[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;

  ForEachStep<4, true>(
      ngroups, cta.e0, cta.e1, ent, [&] { NextStep(); }, load_group,
      [&](int buf, int e, const int (&ks)[4], const int32_t (&info)[4], bool partial) {
    const T* cK = sK + buf * KN * S;
    const T* cV = sV + buf * KN * S;

    float s[NT][4], dp[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
      dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t qa[4], da[4];
      Ldmatrix4(qa, sQ + warp * 16 * S + kk * 16 + OffsetA<S>(lane));
      Ldmatrix4(da, sdO + warp * 16 * S + kk * 16 + OffsetA<S>(lane));
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t kf[4], vf[4];
        Ldmatrix4(kf, cK + np * 16 * S + kk * 16 + OffsetBn<S>(lane));
        Ldmatrix4(vf, cV + np * 16 * S + kk * 16 + OffsetBn<S>(lane));
        Mma<E>(s[2 * np], qa, kf[0], kf[1]);
        Mma<E>(s[2 * np + 1], qa, kf[2], kf[3]);
        Mma<E>(dp[2 * np], da, vf[0], vf[1]);
        Mma<E>(dp[2 * np + 1], da, vf[2], vf[3]);
      }
    }
    DqScores(p, s, dp, partial, sl, lse2, delta,
             cta.bias != nullptr ? sBias + buf * KN : nullptr, ks, info, sub, row_i, t4,
             DpReady());
#pragma unroll
    for (int kk = 0; kk < KN / 16; ++kk) {
      uint32_t pa[4];
      PackA<E>(pa, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int dd = 0; dd < D / 16; ++dd) {
        uint32_t kf[4];
        Ldmatrix4T(kf, cK + kk * 16 * S + dd * 16 + OffsetBt<S>(lane));
        Mma<E>(dq[2 * dd], pa, kf[0], kf[1]);
        Mma<E>(dq[2 * dd + 1], pa, kf[2], kf[3]);
      }
    }
  });

  WriteDqRows<E>(p, cta, dq, row_i, t4);
}

// ---------------------------------------------------------------------------------------------
// Tensor-core dk, dv.

// kKeys key rows per CTA (kNarrowKeyTile for narrow tiles, else kTile), one warp per 16 of them.
// (The tiling rather than the row count: nvcc's host stubs could not tell MmaDkvKernel<E, 32,
// 32> apart.)
template <int D, KeyTiling kTiling>
struct DkvConfig {
  static constexpr int kKeys = kTiling == KeyTiling::kNarrow ? kNarrowKeyTile : kTile;
  static constexpr int kS = D + 8;
  static constexpr int kThreads = 2 * kKeys;
  // Queries per step: 64 at D <= 64; 32 at D = 128 keeps the four accumulators (S, dP, dK, dV)
  // in registers.
  // (32 queries at D = 64 with registers capped for 12 warps per SM was 8% slower on dense
  // layouts: twice the steps, each with its barrier and loads. 32 queries with two m-tiles per
  // warp, as in the forward, was 4% slower on dense layouts and 6% faster on local ones.)
  static constexpr int kQueries = D > 64 ? 32 : 64;
  // The dS^T tile [kKeys][kQueries] that the fused dq product reads back, padded like kS.
  static constexpr int kSdS = kQueries + 8;
  // Output columns of one fused dq piece: 16 queries by kDqCols, at most 32 accumulators per
  // thread.
  static constexpr int kDqCols = D < 64 ? D : 64;
  static constexpr size_t SmemBytes(size_t elem, bool fused_dq) {
    return elem * (2 * kKeys * kS + 4 * kQueries * kS + (fused_dq ? kKeys * kSdS : 0)) +
           sizeof(float) * 4 * kQueries;
  }
  // CTAs per SM that the register allocation must allow. Three for the kernel with the dq
  // accumulator at D <= 64, whose 64 KB of shared memory allow three (168 registers and about
  // 100 bytes of spills): 3-7% faster on dense and fixed layouts. The deterministic kernel
  // keeps two (about 240 registers): three was 4-8% faster on local and strided layouts but
  // 10% slower on dense ones and 30% on fixed ones at T = 4096.
  static constexpr int MinBlocks(bool fused_dq) { return fused_dq && D <= 64 ? 3 : 1; }
  // ldmatrix and cp.async need 16-byte aligned rows: every region above is a multiple of 16.
  static_assert((kS * 2) % 16 == 0 && (kSdS * 2) % 16 == 0 && (4 * kQueries * 4) % 16 == 0,
                "shared-memory regions must stay 16-byte aligned");
};

// Adds four float32 values to dst[0..3] (16-byte aligned) in global memory: one vector
// reduction, carried out by L2, on sm_90; four atomics before it.
__device__ __forceinline__ void ReduceAdd4(float* dst, const float (&v)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(dst), "f"(v[0]),
               "f"(v[1]), "f"(v[2]), "f"(v[3]));
#else
#pragma unroll
  for (int x = 0; x < 4; ++x) atomicAdd(dst + x, v[x]);
#endif
}

// dq += dS K for one step of the dk/dv kernel, from the CTA's dS^T tile in shared memory
// ([key][query], row stride kSdS) and its K rows. The warps share the step's pieces of 16
// queries by kDqCols columns, each a product over all the tile's keys, and add them to
// w.dq_accum straight from the accumulators: the four values a lane holds per n-tile are
// contiguous there (DqAccumIndex), so that each is one 16-byte reduction and a warp's 32 of
// them cover 512 contiguous bytes.
template <ElementType E, int D, KeyTiling kTiling>
__device__ __forceinline__ void FusedDqStep(const TileWork& w, const typename Elem<E>::T* sdS,
                                            const typename Elem<E>::T* sK,
                                            const int32_t* ent, int e, int e1, int64_t accum_bh,
                                            int warp, int lane) {
  using Cfg = DkvConfig<D, kTiling>;
  constexpr int S = Cfg::kS, SD = Cfg::kSdS, KT = Cfg::kKeys, DC = Cfg::kDqCols;
  constexpr int kColBlocks = D / DC, kPieces = Cfg::kQueries / 16 * kColBlocks;
#pragma unroll 1
  for (int piece = warp; piece < kPieces; piece += Cfg::kThreads / 32) {
    const int mt = piece / kColBlocks, c0 = (piece % kColBlocks) * DC;
    if (e + mt >= e1) continue;  // a chunk past the list: its dS is zero
    float acc[DC / 8][4];
#pragma unroll
    for (int n = 0; n < DC / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KT / 16; ++kk) {
      // dS^T is stored [key][query]: the transposing load gives the A operand dS.
      uint32_t a[4];
      Ldmatrix4T(a, sdS + kk * 16 * SD + mt * 16 + OffsetBn<SD>(lane));
#pragma unroll
      for (int dd = 0; dd < DC / 16; ++dd) {
        uint32_t kf[4];
        Ldmatrix4T(kf, sK + kk * 16 * S + c0 + dd * 16 + OffsetBt<S>(lane));
        Mma<E>(acc[2 * dd], a, kf[0], kf[1]);
        Mma<E>(acc[2 * dd + 1], a, kf[2], kf[3]);
      }
    }
    float* chunk = w.dq_accum + accum_bh + static_cast<int64_t>(ent[2 * (e + mt)]) * D;
#pragma unroll
    for (int n = 0; n < DC / 8; ++n) ReduceAdd4(chunk + DqAccumIndex(c0 / 8 + n, lane), acc[n]);
  }
}

// The lse (log2 units) and delta of a dk/dv step's QN gathered queries (chunks >= nvalid
// zero-filled).
// Passes of constant count: a loop from threadIdx.x compiled as a general loop (with an
// unrolled copy and a remainder) that cost the Hopper dk/dv kernel ~55 instructions a step
// for its thread's one value.
template <int QN, int THREADS>
__device__ __forceinline__ void LoadQueryStats(float* sLse2, float* sDelta, const float* lse2,
                                               const float* delta, const int32_t* ent, int e,
                                               int nvalid) {
  constexpr int kValues = 2 * QN;
#pragma unroll
  for (int pass = 0; pass < (kValues + THREADS - 1) / THREADS; ++pass) {
    const int idx = static_cast<int>(threadIdx.x) + pass * THREADS;
    if (kValues % THREADS != 0 && idx >= kValues) break;
    const int r = idx % QN;
    const int chunk = r >> 4;
    const bool valid = chunk < nvalid;
    const int token = valid ? ent[2 * (e + chunk)] + (r & 15) : 0;
    if (idx < QN) {
      CpAsync4(sLse2 + r, lse2 + token, valid ? 4 : 0);
    } else {
      CpAsync4(sDelta + r, delta + token, valid ? 4 : 0);
    }
  }
}

// Where a dk/dv CTA works: its tile of KT keys and (batch, head), the bases of its tensors,
// and its span [e0, e1) of work-list entries. Narrow and paired tiles (sparse columns, e.g. the
// fixed pattern's summaries) go tile-major over (batch, head), so that the heaviest tiles of
// every head start in the first waves instead of those of the last head starting last and
// running alone. Wide tiles (dense-like layouts) go head-major, so that the CTAs in flight
// share one head's Q and dO in L2: tile-major was 5% slower there (every head's Q and dO, 64 MB
// at T=16384 and 16 heads, exceed the 50 MB L2).
template <typename T, int D, int KT, KeyTiling kTiling>
struct DkvCta {
  int tiles, tile, b, bh, lh, k0, e0, e1;
  int64_t stride;    // between tokens of one tensor
  int64_t kv_base;   // this (batch, head)'s first key in k, v, dk and dv
  int64_t accum_bh;  // this head's dq sums in TileWork::dq_accum
  const T *q, *d_out, *k, *v;
  const float *lse2, *delta;  // this (batch, head)'s (TileWork::lse2, delta)
  const int32_t* halves;  // paired tiles: the first key of each half, -1 for an empty one

  __device__ __forceinline__ DkvCta(const SparseAttentionParams& p, const TileWork& w) {
    constexpr bool kTileMajor = kTiling != KeyTiling::kWide;
    const int bhs = p.batch * p.heads;
    tiles = (p.kv_len + KT - 1) / KT;
    tile = kTileMajor ? blockIdx.x / bhs : blockIdx.x % tiles;
    bh = kTileMajor ? blockIdx.x % bhs : blockIdx.x / tiles;
    b = bh / p.heads;
    const int h = bh % p.heads;
    lh = p.layout_head(h);
    k0 = tile * KT;
    stride = static_cast<int64_t>(p.heads) * D;
    const int64_t qoff = static_cast<int64_t>(b) * p.q_len * stride + h * D;
    kv_base = static_cast<int64_t>(b) * p.kv_len * stride + h * D;
    q = static_cast<const T*>(p.q) + qoff;
    d_out = static_cast<const T*>(p.d_out) + qoff;
    k = static_cast<const T*>(p.k) + kv_base;
    v = static_cast<const T*>(p.v) + kv_base;
    lse2 = w.lse2 + static_cast<int64_t>(bh) * p.q_len;
    delta = w.delta + static_cast<int64_t>(bh) * p.q_len;
    accum_bh = static_cast<int64_t>(bh) * p.q_len * D;
    const int32_t* list = w.k_offsets + lh * tiles + tile;
    e0 = list[0];
    e1 = list[1];
    halves = kTiling == KeyTiling::kPaired
                 ? w.k_halves + 2 * (static_cast<int64_t>(lh) * tiles + tile)
                 : nullptr;
  }

  // The warp's key rows (16 of them, as rows g and g + 8 of the lane: -1 in an empty half) and
  // their layout rows relative to the tile's (or half's) first, as the entries' info counts
  // them.
  __device__ __forceinline__ void WarpRows(const SparseAttentionParams& p, int warp, int g,
                                           int (&row_j)[2], int (&sub)[2]) const {
    if constexpr (kTiling == KeyTiling::kPaired) {
      constexpr int kHalf = kNarrowKeyTile;
      const int half = warp / (kHalf / 16), first = halves[half];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        row_j[r] = first < 0 ? -1 : first + (warp % (kHalf / 16)) * 16 + g + 8 * r;
        sub[r] = kHalfSubs * half +
                 (first < 0 ? 0 : row_j[r] / p.block_size - first / p.block_size);
      }
    } else {
      MTileRows(p, k0, k0 + warp * 16, g, row_j, sub);
    }
  }

  // The key bias of the lane's two rows, in log2 units (0 without a bias).
  __device__ __forceinline__ void KeyBias2(const SparseAttentionParams& p, const int (&row_j)[2],
                                           float (&bias2)[2]) const {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      bias2[r] = 0.f;
      if (p.key_bias != nullptr && row_j[r] >= 0 && row_j[r] < p.kv_len)
        bias2[r] = p.key_bias[static_cast<int64_t>(b) * p.kv_len + row_j[r]] * kLog2e;
    }
  }

  // Gathers step grp's QN queries from the CTA's list, Q and dO laid out as Rows, with their
  // lse (log2 units) and delta (chunks past the list zero-filled).
  template <typename Rows, int QN, int THREADS>
  __device__ __forceinline__ void LoadQueryStep(T* sQ, T* sdO, float* sLse2, float* sDelta,
                                                const int32_t* ent, int grp) const {
    constexpr int NC = QN / 16;
    const int e = e0 + grp * NC;
    const int nvalid = min(NC, e1 - e);
    GatherRowPairs<T, D, Rows, QN, THREADS>(sQ, sdO, q, d_out, stride, ent + 2 * e, nvalid);
    LoadQueryStats<QN, THREADS>(sLse2, sDelta, lse2, delta, ent, e, nvalid);
  }
};

// Loads a dk/dv CTA's K and V rows, laid out as Rows: KT contiguous keys, or a paired tile's
// two halves (an empty half zero-filled).
template <typename T, int D, typename Rows, int KT, int THREADS, KeyTiling kTiling>
__device__ __forceinline__ void LoadKeyTile(T* sK, T* sV, const DkvCta<T, D, KT, kTiling>& cta,
                                            int kv_len) {
  if constexpr (kTiling == KeyTiling::kPaired) {
    constexpr int kHalf = kNarrowKeyTile;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int first = cta.halves[h];
      const int len = first < 0 ? 0 : kv_len;
      const int at = Rows::At(h * kHalf, 0);
      LoadRows<T, D, Rows, kHalf, THREADS>(sK + at, cta.k, cta.stride, max(first, 0), len);
      LoadRows<T, D, Rows, kHalf, THREADS>(sV + at, cta.v, cta.stride, max(first, 0), len);
    }
  } else {
    LoadRows<T, D, Rows, KT, THREADS>(sK, cta.k, cta.stride, cta.k0, kv_len);
    LoadRows<T, D, Rows, KT, THREADS>(sV, cta.v, cta.stride, cta.k0, kv_len);
  }
}

// The dk/dv kernels' prologue: the tile's K and V (laid out as Rows) and the first step's
// loads (load_group) in flight; the lane's key rows, their layout rows and their key bias in
// log2 units.
template <typename Rows, int THREADS, typename T, int D, int KT, KeyTiling kTiling,
          typename Load>
__device__ __forceinline__ void DkvPrologue(const SparseAttentionParams& p,
                                            const DkvCta<T, D, KT, kTiling>& cta, T* sK, T* sV,
                                            int ngroups, Load&& load_group, int warp, int g,
                                            int (&row_j)[2], int (&sub)[2], float (&bias2)[2]) {
  LoadKeyTile<T, D, Rows, KT, THREADS>(sK, sV, cta, p.kv_len);
  cta.WarpRows(p, warp, g, row_j, sub);
  if (ngroups > 0) load_group(0, 0);
  CpAsyncCommit();
  cta.KeyBias2(p, row_j, bias2);
}

// A dk/dv step's S^T and dP^T (the warp's 16 key rows by NT n-tiles of 8 queries) become P^T
// and dS^T = P^T (dP^T - delta), masked where the step is partial. cLse2 and cDelta: the step's
// queries' lse (log2 units) and delta. Compiled apart without a key bias, whose zero would
// otherwise cost an addition per score.
template <int NT>
__device__ __forceinline__ void TransposedProbabilities(
    const SparseAttentionParams& p, float (&s)[NT][4], float (&dp)[NT][4], bool partial,
    float sl, const float (&bias2)[2], const float* cLse2, const float* cDelta,
    const int (&qs)[NT / 2], const int32_t (&info)[NT / 2], const int (&sub)[2],
    const int (&row_j)[2], int t4) {
  Specialize(partial, p.key_bias != nullptr, [&](auto masked, auto biased) {
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        const int col = n * 8 + 2 * t4 + (x & 1);
        const float shift = biased ? bias2[x >> 1] - cLse2[col] : -cLse2[col];
        float v = fmaf(s[n][x], sl, shift);
        if constexpr (masked) {
          const int c = n >> 1;
          const int i = StepToken(qs, n, x, t4);
          if (!EntryAllows(p, info[c], sub[x >> 1], i, row_j[x >> 1])) v = -kInf;
        }
        const float pv = FastExp2(v);
        s[n][x] = pv;
        dp[n][x] = pv * (dp[n][x] - cDelta[col]);
      }
    }
  });
}

// Writes the warp's rows of dk (scaled) and dv.
template <ElementType E, int D, int KT, KeyTiling kTiling>
__device__ __forceinline__ void WriteKeyRows(const SparseAttentionParams& p,
                                             const DkvCta<typename Elem<E>::T, D, KT, kTiling>& cta,
                                             const float (&dk)[D / 8][4],
                                             const float (&dv)[D / 8][4], const int (&row_j)[2],
                                             int t4) {
  // dk and dv from their bases only here: pointers kept from the start stay live across the
  // step loop (the kernel with the dq accumulator, capped for three CTAs, spilled 184 bytes
  // instead of 68).
  using T = typename Elem<E>::T;
  T* dkp = static_cast<T*>(p.dk) + cta.kv_base;
  T* dvp = static_cast<T*>(p.dv) + cta.kv_base;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = row_j[r];
    if (j < 0 || j >= p.kv_len) continue;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      *reinterpret_cast<uint32_t*>(dkp + j * cta.stride + n * 8 + 2 * t4) =
          Elem<E>::Pack(dk[n][2 * r] * p.scale, dk[n][2 * r + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(dvp + j * cta.stride + n * 8 + 2 * t4) =
          Elem<E>::Pack(dv[n][2 * r], dv[n][2 * r + 1]);
    }
  }
}

// kFusedDq: also adds dS K into w.dq_accum (see the top of this file).
template <ElementType E, int D, KeyTiling kTiling, bool kFusedDq>
__global__ void __launch_bounds__(DkvConfig<D, kTiling>::kThreads,
                                  DkvConfig<D, kTiling>::MinBlocks(kFusedDq))
    MmaDkvKernel(const SparseAttentionParams p, const TileWork w) {
  using Cfg = DkvConfig<D, kTiling>;
  using T = typename Elem<E>::T;
  constexpr int S = Cfg::kS, QN = Cfg::kQueries, NT = QN / 8, NC = QN / 16;
  constexpr int KT = Cfg::kKeys, TH = Cfg::kThreads, SD = Cfg::kSdS;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + KT * S;
  T* sQ = sV + KT * S;
  T* sdO = sQ + 2 * QN * S;
  float* sLse2 = reinterpret_cast<float*>(sdO + 2 * QN * S);
  float* sDelta = sLse2 + 2 * QN;
  T* sdS = reinterpret_cast<T*>(sDelta + 2 * QN);  // only when kFusedDq

  const DkvCta<T, D, KT, kTiling> cta(p, w);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const int e0 = cta.e0, e1 = cta.e1;
  const int ngroups = (e1 - e0 + NC - 1) / NC;
  const int32_t* ent = w.k_entries;

  auto load_group = [&](int grp, int buf) {
    cta.template LoadQueryStep<PaddedRows<S>, QN, TH>(sQ + buf * QN * S, sdO + buf * QN * S,
                                                      sLse2 + buf * QN, sDelta + buf * QN, ent,
                                                      grp);
  };

  int row_j[2], sub[2];
  float bias2[2];
  DkvPrologue<PaddedRows<S>, TH>(p, cta, sK, sV, ngroups, load_group, warp, g, row_j, sub,
                                 bias2);
  const float sl = p.scale * kLog2e;
  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    dk[n][0] = dk[n][1] = dk[n][2] = dk[n][3] = 0.f;
    dv[n][0] = dv[n][1] = dv[n][2] = dv[n][3] = 0.f;
  }

  ForEachStep<NC, true>(
      ngroups, e0, e1, ent, [&] { NextStep(); }, load_group,
      [&](int buf, int e, const int (&qs)[NC], const int32_t (&info)[NC], bool partial) {
    const T* cQ = sQ + buf * QN * S;
    const T* cdO = sdO + buf * QN * S;
    const float* cLse2 = sLse2 + buf * QN;
    const float* cDelta = sDelta + buf * QN;

    float s[NT][4], dp[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
      dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t ka[4], va[4];
      Ldmatrix4(ka, sK + warp * 16 * S + kk * 16 + OffsetA<S>(lane));
      Ldmatrix4(va, sV + warp * 16 * S + kk * 16 + OffsetA<S>(lane));
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t qf[4], df[4];
        Ldmatrix4(qf, cQ + np * 16 * S + kk * 16 + OffsetBn<S>(lane));
        Ldmatrix4(df, cdO + np * 16 * S + kk * 16 + OffsetBn<S>(lane));
        Mma<E>(s[2 * np], ka, qf[0], qf[1]);
        Mma<E>(s[2 * np + 1], ka, qf[2], qf[3]);
        Mma<E>(dp[2 * np], va, df[0], df[1]);
        Mma<E>(dp[2 * np + 1], va, df[2], df[3]);
      }
    }
    TransposedProbabilities(p, s, dp, partial, sl, bias2, cLse2, cDelta, qs, info, sub, row_j,
                            t4);
#pragma unroll
    for (int kk = 0; kk < QN / 16; ++kk) {
      uint32_t pa[4], da[4];
      PackA<E>(pa, s[2 * kk], s[2 * kk + 1]);
      PackA<E>(da, dp[2 * kk], dp[2 * kk + 1]);
#pragma unroll
      for (int dd = 0; dd < D / 16; ++dd) {
        uint32_t of[4], qf[4];
        Ldmatrix4T(of, cdO + kk * 16 * S + dd * 16 + OffsetBt<S>(lane));
        Ldmatrix4T(qf, cQ + kk * 16 * S + dd * 16 + OffsetBt<S>(lane));
        Mma<E>(dv[2 * dd], pa, of[0], of[1]);
        Mma<E>(dv[2 * dd + 1], pa, of[2], of[3]);
        Mma<E>(dk[2 * dd], da, qf[0], qf[1]);
        Mma<E>(dk[2 * dd + 1], da, qf[2], qf[3]);
      }
      if constexpr (kFusedDq) {
        // The warp's rows of dS^T, as the tile's dq product needs every key row of the CTA.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          uint32_t* row = reinterpret_cast<uint32_t*>(sdS + (warp * 16 + g + 8 * r) * SD);
          row[kk * 8 + t4] = da[r];
          row[kk * 8 + 4 + t4] = da[r + 2];
        }
      }
    }
    if constexpr (kFusedDq) {
      // Every warp's rows of dS^T are in place. The next step's first barrier keeps them until
      // every warp has read them.
      __syncthreads();
      FusedDqStep<E, D, kTiling>(w, sdS, sK, ent, e, e1, cta.accum_bh, warp, lane);
    }
  });

  WriteKeyRows<E>(p, cta, dk, dv, row_j, t4);
}

template <typename Kernel>
inline const char* Launch(Kernel kernel, dim3 grid, size_t smem, void* stream,
                          const SparseAttentionParams& p, const TileWork& w, int threads) {
  if (grid.x == 0 || grid.y == 0) return nullptr;
  if (smem > 48 * 1024) {
    cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return cudaGetErrorString(err);
  }
  kernel<<<grid, threads, smem, static_cast<cudaStream_t>(stream)>>>(p, w);
  return LastError();
}

// One-dimensional grids of tiles x (batch * heads), tile-major (see the kernels).
inline const char* FlatGrid(int64_t tiles, const SparseAttentionParams& p, dim3* grid) {
  const int64_t blocks = tiles * p.batch * p.heads;
  if (blocks > 0x7fffffff) return "the GPU kernels take tiles * batch * heads below 2^31";
  *grid = dim3(static_cast<unsigned>(blocks));
  return nullptr;
}

// The sm_90a forward at head_dim 64 (sparse_attention_kernels_sm90.cuh).
template <ElementType E>
const char* WgmmaForwardImpl(const SparseAttentionParams& p, const TileWork& w, void* stream);

template <ElementType E, int D>
const char* MmaForwardImpl(const SparseAttentionParams& p, const TileWork& w, void* stream) {
  using T = typename Elem<E>::T;
  if constexpr (D == 64) {
    if (w.wgmma) return WgmmaForwardImpl<E>(p, w, stream);
  }
  dim3 grid;
  if (const char* err = FlatGrid(ForwardTiles(p, w), p, &grid)) return err;
  if (w.query_tile == kFwdTile) {
    using Cfg = FwdConfig<D, kFwdTile>;
    return Launch(MmaForwardKernel<E, D, kFwdTile>, grid, Cfg::SmemBytes(sizeof(T)), stream, p,
                  w, Cfg::kThreads);
  }
  using Cfg = FwdConfig<D, kTile>;
  return Launch(MmaForwardKernel<E, D, kTile>, grid, Cfg::SmemBytes(sizeof(T)), stream, p, w,
                Cfg::kThreads);
}

// The sm_90a dk/dv kernel at head_dim 64 on 64-key tiles (sparse_attention_kernels_sm90.cuh).
template <ElementType E, KeyTiling kTiling, bool kFusedDq>
const char* WgmmaDkvImpl(const SparseAttentionParams& p, const TileWork& w, void* stream);

template <ElementType E, int D, bool kFusedDq>
const char* LaunchDkv(const SparseAttentionParams& p, const TileWork& w, void* stream) {
  using T = typename Elem<E>::T;
  if constexpr (D == 64) {
    if (w.wgmma && KeyTilingOf(w) == KeyTiling::kWide)
      return WgmmaDkvImpl<E, KeyTiling::kWide, kFusedDq>(p, w, stream);
    if (w.wgmma && KeyTilingOf(w) == KeyTiling::kPaired)
      return WgmmaDkvImpl<E, KeyTiling::kPaired, kFusedDq>(p, w, stream);
  }
  dim3 grid;
  if (const char* err = FlatGrid(KeyTiles(p, w), p, &grid)) return err;
  auto launch = [&](auto tiling) {
    using Cfg = DkvConfig<D, decltype(tiling)::value>;
    return Launch(MmaDkvKernel<E, D, decltype(tiling)::value, kFusedDq>, grid,
                  Cfg::SmemBytes(sizeof(T), kFusedDq), stream, p, w, Cfg::kThreads);
  };
  switch (KeyTilingOf(w)) {
    case KeyTiling::kNarrow:
      return launch(std::integral_constant<KeyTiling, KeyTiling::kNarrow>());
    case KeyTiling::kPaired:
      return launch(std::integral_constant<KeyTiling, KeyTiling::kPaired>());
    default:
      return launch(std::integral_constant<KeyTiling, KeyTiling::kWide>());
  }
}

// The sm_90a dq kernel at head_dim 64 (sparse_attention_kernels_sm90.cuh).
template <ElementType E>
const char* WgmmaDqImpl(const SparseAttentionParams& p, const TileWork& w, void* stream);

// The deterministic path's dq kernel, which also leaves delta for dk/dv.
template <ElementType E, int D>
const char* LaunchDq(const SparseAttentionParams& p, const TileWork& w, void* stream) {
  using T = typename Elem<E>::T;
  if constexpr (D == 64) {
    if (w.wgmma) return WgmmaDqImpl<E>(p, w, stream);
  }
  dim3 grid;
  if (const char* err = FlatGrid(QueryTiles(p), p, &grid)) return err;
  return Launch(MmaDqKernel<E, D>, grid, DqConfig<D>::SmemBytes(sizeof(T)), stream, p, w,
                DqConfig<D>::kThreads);
}

template <ElementType E, int D>
const char* MmaBackwardImpl(const SparseAttentionParams& p, const TileWork& w, void* stream) {
  if (w.dq_accum != nullptr) {
    // delta and a zeroed accumulator, one pass over the key tiles, then dq from the sums.
    const size_t accum_bytes = sizeof(float) * p.batch * p.heads * p.q_len * D;
    const cudaError_t zeroed =
        cudaMemsetAsync(w.dq_accum, 0, accum_bytes, static_cast<cudaStream_t>(stream));
    if (zeroed != cudaSuccess) return cudaGetErrorString(zeroed);
    if (const char* err = internal::LaunchDelta(p, w, stream)) return err;
    if (const char* err = LaunchDkv<E, D, true>(p, w, stream)) return err;
    return internal::LaunchDqFromAccum(p, w, stream);
  }
  // No delta kernel: dq computes delta (RowDelta) before dk/dv, launched after it, reads it.
  if (const char* err = LaunchDq<E, D>(p, w, stream)) return err;
  return LaunchDkv<E, D, false>(p, w, stream);
}

// ---------------------------------------------------------------------------------------------
// Scalar kernels: one warp per row, each lane holding head_dim / 32 (at most 8) elements.

constexpr int kSimtWarps = 8;
constexpr int kSimtPer = 8;

template <ElementType E>
__device__ __forceinline__ void LoadRow(float (&x)[kSimtPer], const typename Elem<E>::T* row,
                                        int n, int lane) {
#pragma unroll
  for (int u = 0; u < kSimtPer; ++u) {
    const int d = lane + 32 * u;
    x[u] = d < n ? Elem<E>::ToFloat(row[d]) : 0.f;
  }
}

template <ElementType E>
__global__ void __launch_bounds__(256) SimtForwardKernel(const SparseAttentionParams p,
                                                          const TileWork w) {
  using T = typename Elem<E>::T;
  // Causal rows late in the sequence carry the most work: start them first.
  const int tile = gridDim.x - 1 - blockIdx.x, bh = blockIdx.y;
  const int b = bh / p.heads, h = bh % p.heads;
  const int lh = p.layout_head(h);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int D = p.head_dim, Dv = p.value_dim;
  const int64_t qs = static_cast<int64_t>(p.heads) * D, vs = static_cast<int64_t>(p.heads) * Dv;
  const T* qb = static_cast<const T*>(p.q) + static_cast<int64_t>(b) * p.q_len * qs + h * D;
  const T* kb = static_cast<const T*>(p.k) + static_cast<int64_t>(b) * p.kv_len * qs + h * D;
  const T* vb = static_cast<const T*>(p.v) + static_cast<int64_t>(b) * p.kv_len * vs + h * Dv;
  T* ob = static_cast<T*>(p.out) + static_cast<int64_t>(b) * p.q_len * vs + h * Dv;
  const float* bias = p.key_bias ? p.key_bias + static_cast<int64_t>(b) * p.kv_len : nullptr;
  const int32_t* list = w.q_offsets + lh * gridDim.x + tile;
  const int e0 = list[0], e1 = list[1];
  const int q0 = tile * kTile, sub0 = q0 / p.block_size;
  for (int r = warp; r < kTile; r += kSimtWarps) {
    const int i = q0 + r;
    if (i >= p.q_len) break;
    const int sub = i / p.block_size - sub0;
    float q[kSimtPer], o[kSimtPer];
    LoadRow<E>(q, qb + i * qs, D, lane);
#pragma unroll
    for (int u = 0; u < kSimtPer; ++u) o[u] = 0.f;
    float m = -kInf, l = 0.f;
    for (int e = e0; e < e1; ++e) {
      const int ks = w.q_entries[2 * e];
      const int32_t info = w.q_entries[2 * e + 1];
      if (!((info >> sub) & 1)) continue;
      for (int jj = 0; jj < kChunk; ++jj) {
        const int j = ks + jj;
        if (!EntryAllows(p, info, sub, i, j)) continue;
        float kr[kSimtPer], vr[kSimtPer];
        LoadRow<E>(kr, kb + j * qs, D, lane);
        float dot = 0.f;
#pragma unroll
        for (int u = 0; u < kSimtPer; ++u) dot += q[u] * kr[u];
        float sc = WarpSum(dot) * p.scale + (bias ? bias[j] : 0.f);
        if (sc == -kInf) continue;
        LoadRow<E>(vr, vb + j * vs, Dv, lane);
        const float m_new = fmaxf(m, sc);
        const float alpha = expf(m - m_new);
        const float pe = expf(sc - m_new);
        l = l * alpha + pe;
#pragma unroll
        for (int u = 0; u < kSimtPer; ++u) o[u] = o[u] * alpha + pe * vr[u];
        m = m_new;
      }
    }
    const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
    for (int u = 0; u < kSimtPer; ++u) {
      const int d = lane + 32 * u;
      if (d < Dv) ob[i * vs + d] = Elem<E>::FromFloat(o[u] * inv);
    }
    if (lane == 0) p.lse[static_cast<int64_t>(bh) * p.q_len + i] = l > 0.f ? m + logf(l) : -kInf;
  }
}

template <ElementType E>
__global__ void __launch_bounds__(256) SimtDqKernel(const SparseAttentionParams p,
                                                     const TileWork w) {
  using T = typename Elem<E>::T;
  // Causal rows late in the sequence carry the most work: start them first.
  const int tile = gridDim.x - 1 - blockIdx.x, bh = blockIdx.y;
  const int b = bh / p.heads, h = bh % p.heads;
  const int lh = p.layout_head(h);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int D = p.head_dim, Dv = p.value_dim;
  const int64_t qs = static_cast<int64_t>(p.heads) * D, vs = static_cast<int64_t>(p.heads) * Dv;
  const int64_t qo = static_cast<int64_t>(b) * p.q_len * qs + h * D;
  const int64_t oo = static_cast<int64_t>(b) * p.q_len * vs + h * Dv;
  const T* qb = static_cast<const T*>(p.q) + qo;
  const T* kb = static_cast<const T*>(p.k) + static_cast<int64_t>(b) * p.kv_len * qs + h * D;
  const T* vb = static_cast<const T*>(p.v) + static_cast<int64_t>(b) * p.kv_len * vs + h * Dv;
  const T* dob = static_cast<const T*>(p.d_out) + oo;
  T* dqb = static_cast<T*>(p.dq) + qo;
  const float* bias = p.key_bias ? p.key_bias + static_cast<int64_t>(b) * p.kv_len : nullptr;
  const int32_t* list = w.q_offsets + lh * gridDim.x + tile;
  const int e0 = list[0], e1 = list[1];
  const int q0 = tile * kTile, sub0 = q0 / p.block_size;
  for (int r = warp; r < kTile; r += kSimtWarps) {
    const int i = q0 + r;
    if (i >= p.q_len) break;
    const int sub = i / p.block_size - sub0;
    const int64_t at = static_cast<int64_t>(bh) * p.q_len + i;
    const float lse = p.lse[at], delta = w.delta[at];
    float q[kSimtPer], d_o[kSimtPer], dq[kSimtPer];
    LoadRow<E>(q, qb + i * qs, D, lane);
    LoadRow<E>(d_o, dob + i * vs, Dv, lane);
#pragma unroll
    for (int u = 0; u < kSimtPer; ++u) dq[u] = 0.f;
    for (int e = (lse == -kInf ? e1 : e0); e < e1; ++e) {
      const int ks = w.q_entries[2 * e];
      const int32_t info = w.q_entries[2 * e + 1];
      if (!((info >> sub) & 1)) continue;
      for (int jj = 0; jj < kChunk; ++jj) {
        const int j = ks + jj;
        if (!EntryAllows(p, info, sub, i, j)) continue;
        float kr[kSimtPer], vr[kSimtPer];
        LoadRow<E>(kr, kb + j * qs, D, lane);
        LoadRow<E>(vr, vb + j * vs, Dv, lane);
        float dot = 0.f, dpv = 0.f;
#pragma unroll
        for (int u = 0; u < kSimtPer; ++u) {
          dot += q[u] * kr[u];
          dpv += d_o[u] * vr[u];
        }
        const float sc = WarpSum(dot) * p.scale + (bias ? bias[j] : 0.f);
        const float pe = expf(sc - lse);
        const float ds = pe * (WarpSum(dpv) - delta);
#pragma unroll
        for (int u = 0; u < kSimtPer; ++u) dq[u] += ds * kr[u];
      }
    }
#pragma unroll
    for (int u = 0; u < kSimtPer; ++u) {
      const int d = lane + 32 * u;
      if (d < D) dqb[i * qs + d] = Elem<E>::FromFloat(dq[u] * p.scale);
    }
  }
}

template <ElementType E>
__global__ void __launch_bounds__(256) SimtDkvKernel(const SparseAttentionParams p,
                                                      const TileWork w) {
  using T = typename Elem<E>::T;
  const int tile = blockIdx.x, bh = blockIdx.y;
  const int b = bh / p.heads, h = bh % p.heads;
  const int lh = p.layout_head(h);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int D = p.head_dim, Dv = p.value_dim;
  const int64_t qs = static_cast<int64_t>(p.heads) * D, vs = static_cast<int64_t>(p.heads) * Dv;
  const int64_t ko = static_cast<int64_t>(b) * p.kv_len * qs + h * D;
  const int64_t vo = static_cast<int64_t>(b) * p.kv_len * vs + h * Dv;
  const T* qb = static_cast<const T*>(p.q) + static_cast<int64_t>(b) * p.q_len * qs + h * D;
  const T* dob = static_cast<const T*>(p.d_out) + static_cast<int64_t>(b) * p.q_len * vs + h * Dv;
  const T* kb = static_cast<const T*>(p.k) + ko;
  const T* vb = static_cast<const T*>(p.v) + vo;
  T* dkb = static_cast<T*>(p.dk) + ko;
  T* dvb = static_cast<T*>(p.dv) + vo;
  const float* lseb = p.lse + static_cast<int64_t>(bh) * p.q_len;
  const float* deltab = w.delta + static_cast<int64_t>(bh) * p.q_len;
  const int32_t* list = w.k_offsets + lh * gridDim.x + tile;
  const int e0 = list[0], e1 = list[1];
  const int kt = w.key_tile;
  const int k0 = tile * kt, sub0 = k0 / p.block_size;
  for (int r = warp; r < kt; r += kSimtWarps) {
    const int j = k0 + r;
    if (j >= p.kv_len) break;
    const int sub = j / p.block_size - sub0;
    const float bj = p.key_bias ? p.key_bias[static_cast<int64_t>(b) * p.kv_len + j] : 0.f;
    float kr[kSimtPer], vr[kSimtPer], dk[kSimtPer], dv[kSimtPer];
    LoadRow<E>(kr, kb + j * qs, D, lane);
    LoadRow<E>(vr, vb + j * vs, Dv, lane);
#pragma unroll
    for (int u = 0; u < kSimtPer; ++u) dk[u] = dv[u] = 0.f;
    for (int e = e0; e < e1; ++e) {
      const int qs0 = w.k_entries[2 * e];
      const int32_t info = w.k_entries[2 * e + 1];
      if (!((info >> sub) & 1)) continue;
      for (int ii = 0; ii < kChunk; ++ii) {
        const int i = qs0 + ii;
        if (!EntryAllows(p, info, sub, i, j)) continue;
        const float lse = lseb[i];
        if (lse == -kInf) continue;
        float q[kSimtPer], d_o[kSimtPer];
        LoadRow<E>(q, qb + i * qs, D, lane);
        LoadRow<E>(d_o, dob + i * vs, Dv, lane);
        float dot = 0.f, dpv = 0.f;
#pragma unroll
        for (int u = 0; u < kSimtPer; ++u) {
          dot += q[u] * kr[u];
          dpv += d_o[u] * vr[u];
        }
        const float pe = expf(WarpSum(dot) * p.scale + bj - lse);
        const float ds = pe * (WarpSum(dpv) - deltab[i]);
#pragma unroll
        for (int u = 0; u < kSimtPer; ++u) {
          dv[u] += pe * d_o[u];
          dk[u] += ds * q[u];
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kSimtPer; ++u) {
      const int d = lane + 32 * u;
      if (d < D) dkb[j * qs + d] = Elem<E>::FromFloat(dk[u] * p.scale);
      if (d < Dv) dvb[j * vs + d] = Elem<E>::FromFloat(dv[u]);
    }
  }
}

template <ElementType E>
const char* SimtForwardImpl(const SparseAttentionParams& p, const TileWork& w, void* stream) {
  const dim3 grid(QueryTiles(p), p.batch * p.heads);
  if (grid.x == 0 || grid.y == 0) return nullptr;
  SimtForwardKernel<E><<<grid, 32 * kSimtWarps, 0, static_cast<cudaStream_t>(stream)>>>(p, w);
  return LastError();
}

template <ElementType E>
const char* SimtBackwardImpl(const SparseAttentionParams& p, const TileWork& w, void* stream) {
  if (const char* err = internal::LaunchDelta(p, w, stream)) return err;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (p.batch * p.heads == 0) return nullptr;
  if (QueryTiles(p) > 0) {
    SimtDqKernel<E><<<dim3(QueryTiles(p), p.batch * p.heads), 32 * kSimtWarps, 0, s>>>(p, w);
    if (const char* err = LastError()) return err;
  }
  if (KeyTiles(p, w) > 0) {
    SimtDkvKernel<E><<<dim3(KeyTiles(p, w), p.batch * p.heads), 32 * kSimtWarps, 0, s>>>(p, w);
  }
  return LastError();
}

}  // namespace detail
}  // namespace gpu
}  // namespace tf_sparse_attn

#include "cc/kernels/sparse_attention_kernels_sm90.cuh"

#endif  // TF_SPARSE_ATTN_CC_KERNELS_SPARSE_ATTENTION_KERNELS_CUH_
