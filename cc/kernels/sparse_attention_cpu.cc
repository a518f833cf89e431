// CPU block-sparse attention, flash-attention style: per query block an online softmax over the
// key blocks of its CSR row (forward, dq), per key block a walk over its CSC column (dk, dv).
//
// Speed comes from two things. First, every operand is repacked once per call into float32
// blocks laid out for the block products (K^T as [head_dim, block], V as [block, value_dim] and
// so on), so the inner loops are contiguous broadcast-multiply-adds whatever the input dtype
// and the [batch, time, heads, dim] strides. Second, on x86-64 the compute kernels are compiled
// three times (AVX-512, AVX2+FMA, baseline SSE2) with GCC vector extensions and chosen at run
// time, because the op library is built without -march flags and must still load on any CPU.
#include "cc/kernels/sparse_attention_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <limits>
#include <memory>
#include <vector>

// Vector types wider than the baseline ISA appear only inside always-inline helpers that are
// inlined into functions compiled for that ISA; the ABI note GCC emits for them is moot.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace tf_sparse_attn {
namespace cpu {
namespace {

#define TSA_INLINE inline __attribute__((always_inline))

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();

// ------------------------------------------------------------------------------------------
// Element conversions. Written out instead of using Eigen's types so that this file needs no
// framework headers; round to nearest even like Eigen.

inline float BitsToFloat(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint32_t FloatToBits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
}

struct Float32Storage {
  using type = float;
  static float Load(float x) { return x; }
  static float Store(float x) { return x; }
};

struct BFloat16Storage {
  using type = uint16_t;
  static float Load(uint16_t x) { return BitsToFloat(static_cast<uint32_t>(x) << 16); }
  static uint16_t Store(float f) {
    const uint32_t x = FloatToBits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
    return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
  }
};

struct Float16Storage {
  using type = uint16_t;
  static float Load(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exponent = (h >> 10) & 0x1fu;
    const uint32_t mantissa = h & 0x3ffu;
    if (exponent == 0x1fu) return BitsToFloat(sign | 0x7f800000u | (mantissa << 13));
    if (exponent != 0) return BitsToFloat(sign | ((exponent + 112u) << 23) | (mantissa << 13));
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // 2^-24
    return sign ? -magnitude : magnitude;
  }
  static uint16_t Store(float f) {
    const uint32_t x = FloatToBits(f);
    const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
    const uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u);
    if (ax >= 0x477ff000u) return sign | 0x7c00u;  // rounds to 65520 or more: infinity
    if (ax >= 0x38800000u) {                        // a normal half: rebias, round, shift
      return sign | static_cast<uint16_t>((ax + 0xc8000fffu + ((ax >> 13) & 1u)) >> 13);
    }
    // Subnormal half: adding 0.5 (whose ulp is 2^-24) rounds to a multiple of 2^-24 in the FPU.
    const float rounded = BitsToFloat(ax) + 0.5f;
    return sign | static_cast<uint16_t>(FloatToBits(rounded) - 0x3f000000u);
  }
};

// ------------------------------------------------------------------------------------------
// Vector helpers (W floats per vector).

template <int W>
struct Vec {
  typedef float V __attribute__((vector_size(W * sizeof(float))));
  typedef int32_t VI __attribute__((vector_size(W * sizeof(float))));
  typedef float VU __attribute__((vector_size(W * sizeof(float)), aligned(sizeof(float))));
};

template <int W>
TSA_INLINE typename Vec<W>::V VLoad(const float* ptr) {
  return *reinterpret_cast<const typename Vec<W>::VU*>(ptr);
}

template <int W>
TSA_INLINE void VStore(float* ptr, const typename Vec<W>::V& v) {
  *reinterpret_cast<typename Vec<W>::VU*>(ptr) = v;
}

template <int W>
TSA_INLINE typename Vec<W>::V VSplat(float x) {
  return typename Vec<W>::V{} + x;
}

// exp for x <= 88 with about 1 ulp error (Cephes' polynomial after a base-2 range reduction);
// below -87.3 (where float leaves its normal range) and for -inf it returns exactly 0, so
// masked scores contribute nothing.
template <int W>
TSA_INLINE typename Vec<W>::V VExp(const typename Vec<W>::V& x) {
  typedef typename Vec<W>::V V;
  typedef typename Vec<W>::VI VI;
  const V lo = VSplat<W>(-87.33654f);
  const V hi = VSplat<W>(88.0f);
  V xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const V fx = xc * 1.44269504088896341f + 0.5f;
  V nf = __builtin_convertvector(__builtin_convertvector(fx, VI), V);
  nf = nf > fx ? nf - 1.0f : nf;  // conversion truncates; floor is wanted
  V r = xc - nf * 0.693359375f;
  r = r + nf * 2.12194440e-4f;
  V y = VSplat<W>(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const VI pow2n = (__builtin_convertvector(nf, VI) + 127) << 23;
  const V result = y * (V)pow2n;  // same-size vector cast: a bit cast
  return x < lo ? V{} : result;
}

// row[j] = row[j] * scale + bias[j] (bias may be null).
template <int W>
TSA_INLINE void ScaleBias(float* row, int n, float scale, const float* bias) {
  int j = 0;
  if (bias != nullptr) {
    for (; j + W <= n; j += W) VStore<W>(row + j, VLoad<W>(row + j) * scale + VLoad<W>(bias + j));
    for (; j < n; ++j) row[j] = row[j] * scale + bias[j];
  } else {
    for (; j + W <= n; j += W) VStore<W>(row + j, VLoad<W>(row + j) * scale);
    for (; j < n; ++j) row[j] *= scale;
  }
}

template <int W>
TSA_INLINE float RowMax(const float* row, int n) {
  typedef typename Vec<W>::V V;
  float result = kNegInf;
  int j = 0;
  if (n >= W) {
    V m = VLoad<W>(row);
    for (j = W; j + W <= n; j += W) {
      const V x = VLoad<W>(row + j);
      m = x > m ? x : m;
    }
    for (int l = 0; l < W; ++l) result = std::max(result, m[l]);
  }
  for (; j < n; ++j) result = std::max(result, row[j]);
  return result;
}

template <int W>
TSA_INLINE void ScaleRow(float* row, int n, float factor) {
  int j = 0;
  for (; j + W <= n; j += W) VStore<W>(row + j, VLoad<W>(row + j) * factor);
  for (; j < n; ++j) row[j] *= factor;
}

// row[j] = exp(row[j] - shift); returns the sum.
template <int W>
TSA_INLINE float ExpShiftSum(float* row, int n, float shift) {
  typedef typename Vec<W>::V V;
  V acc = V{};
  int j = 0;
  for (; j + W <= n; j += W) {
    const V e = VExp<W>(VLoad<W>(row + j) - shift);
    VStore<W>(row + j, e);
    acc += e;
  }
  float sum = 0.f;
  for (int l = 0; l < W; ++l) sum += acc[l];
  for (; j < n; ++j) {
    row[j] = std::exp(row[j] - shift);
    sum += row[j];
  }
  return sum;
}

// row[j] = exp(row[j] - shift[j]).
template <int W>
TSA_INLINE void ExpShiftEach(float* row, int n, const float* shift) {
  int j = 0;
  for (; j + W <= n; j += W) VStore<W>(row + j, VExp<W>(VLoad<W>(row + j) - VLoad<W>(shift + j)));
  for (; j < n; ++j) row[j] = std::exp(row[j] - shift[j]);
}

// ------------------------------------------------------------------------------------------
// C[m x n] (+)= A[m x k] B[k x n], row major with leading dimensions; register tiles of R rows
// and NV vectors of columns.

template <int W, int NV, int R, bool kAccumulate>
TSA_INLINE void GemmTile(int k, const float* a, int lda, const float* b, int ldb, float* c,
                         int ldc) {
  typedef typename Vec<W>::V V;
  V acc[R][NV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = kAccumulate ? VLoad<W>(c + static_cast<int64_t>(r) * ldc + v * W) : V{};
    }
  }
  for (int p = 0; p < k; ++p) {
    V bv[NV];
    const float* brow = b + static_cast<int64_t>(p) * ldb;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = VLoad<W>(brow + v * W);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const V av = VSplat<W>(a[static_cast<int64_t>(r) * lda + p]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) VStore<W>(c + static_cast<int64_t>(r) * ldc + v * W, acc[r][v]);
  }
}

// One column panel of NW vectors (NW * W columns from column j): rows in tiles of MR, then
// the remaining rows one at a time.
template <int W, int NW, int MR, bool kAccumulate>
TSA_INLINE void GemmPanel(int m, int j, int k, const float* a, int lda, const float* b, int ldb,
                          float* c, int ldc) {
  int i = 0;
  for (; i + MR <= m; i += MR) {
    GemmTile<W, NW, MR, kAccumulate>(k, a + static_cast<int64_t>(i) * lda, lda, b + j, ldb,
                                     c + static_cast<int64_t>(i) * ldc + j, ldc);
  }
  for (; i < m; ++i) {
    GemmTile<W, NW, 1, kAccumulate>(k, a + static_cast<int64_t>(i) * lda, lda, b + j, ldb,
                                    c + static_cast<int64_t>(i) * ldc + j, ldc);
  }
}

template <int W, int MR, bool kAccumulate>
TSA_INLINE void Gemm(int m, int n, int k, const float* a, int lda, const float* b, int ldb,
                     float* c, int ldc) {
  int j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    GemmPanel<W, 2, MR, kAccumulate>(m, j, k, a, lda, b, ldb, c, ldc);
  }
  for (; j + W <= n; j += W) GemmPanel<W, 1, MR, kAccumulate>(m, j, k, a, lda, b, ldb, c, ldc);
  for (; j < n; ++j) {
    for (int i = 0; i < m; ++i) {
      float sum = kAccumulate ? c[static_cast<int64_t>(i) * ldc + j] : 0.f;
      for (int p = 0; p < k; ++p) {
        sum += a[static_cast<int64_t>(i) * lda + p] * b[static_cast<int64_t>(p) * ldb + j];
      }
      c[static_cast<int64_t>(i) * ldc + j] = sum;
    }
  }
}

// ------------------------------------------------------------------------------------------
// Token rules at block granularity.

enum class BlockKind { kEmpty, kFull, kPartial };

// Range of |d| over the integers d in [lo, hi].
TSA_INLINE void DistanceRange(int64_t lo, int64_t hi, int64_t* min_dist, int64_t* max_dist) {
  if (lo <= 0 && hi >= 0) {
    *min_dist = 0;
    *max_dist = std::max(-lo, hi);
  } else if (lo > 0) {
    *min_dist = lo;
    *max_dist = hi;
  } else {
    *min_dist = -hi;
    *max_dist = -lo;
  }
}

// Whether TokenAllowed holds for every (kFull), no (kEmpty) or some pair of the block whose
// first query is i0 and first key j0. Every difference d = i - j in [i0 - j0 - bs + 1,
// i0 - j0 + bs - 1] occurs in the block, so the answer is exact, not a bound.
TSA_INLINE BlockKind Classify(const SparseAttentionParams& p, int64_t i0, int64_t j0,
                              int32_t flags) {
  const int64_t bs = p.block_size;
  const int64_t dmin = i0 - (j0 + bs - 1), dmax = i0 + bs - 1 - j0;
  int64_t lo = dmin;
  bool full = true;
  if (p.causal) {
    if (dmax < 0) return BlockKind::kEmpty;
    if (dmin < 0) full = false;
    lo = std::max<int64_t>(lo, 0);
  }
  if (flags & kBlockWindowed) {
    const int64_t allowed_max =
        p.window > 0 ? static_cast<int64_t>(p.window) - 1 : std::numeric_limits<int64_t>::max();
    const int64_t allowed_min = p.min_distance;
    if (allowed_min > allowed_max) return BlockKind::kEmpty;
    int64_t reach_min, reach_max;
    DistanceRange(lo, dmax, &reach_min, &reach_max);
    if (reach_max < allowed_min || reach_min > allowed_max) return BlockKind::kEmpty;
    int64_t all_min, all_max;
    DistanceRange(dmin, dmax, &all_min, &all_max);
    if (all_min < allowed_min || all_max > allowed_max) full = false;
  }
  return full ? BlockKind::kFull : BlockKind::kPartial;
}

// ------------------------------------------------------------------------------------------
// Packed operands of a group of (batch, head) pairs, all float32. Index g is the pair's
// position in the group; blocks of one pair are consecutive.

struct Packed {
  const SparseAttentionParams* p = nullptr;
  int bh0 = 0;  // b * heads + h of the group's first pair
  // Per key block.
  float* kt = nullptr;  // [G][nkb][head_dim][bs]
  float* vp = nullptr;  // [G][nkb][bs][value_dim]
  float* kp = nullptr;  // [G][nkb][bs][head_dim]     backward only
  float* vt = nullptr;  // [G][nkb][value_dim][bs]    backward only
  // Per query block, backward only.
  float* qp = nullptr;   // [G][nqb][bs][head_dim]
  float* qt = nullptr;   // [G][nqb][head_dim][bs]
  float* dop = nullptr;  // [G][nqb][bs][value_dim]
  float* dot = nullptr;  // [G][nqb][value_dim][bs]
  float* lse_shift = nullptr;  // [G][q_len] lse, with -inf (empty rows) replaced by +inf
  float* dd = nullptr;         // [G][q_len] delta - d_lse, delta = sum(d_out * out)

  int64_t KBlock(int g, int kb) const {
    return (static_cast<int64_t>(g) * p->num_kv_blocks + kb) * p->block_size;
  }
  int64_t QBlock(int g, int qb) const {
    return (static_cast<int64_t>(g) * p->num_q_blocks + qb) * p->block_size;
  }
  const float* Kt(int g, int kb) const { return kt + KBlock(g, kb) * p->head_dim; }
  const float* Kp(int g, int kb) const { return kp + KBlock(g, kb) * p->head_dim; }
  const float* Vp(int g, int kb) const { return vp + KBlock(g, kb) * p->value_dim; }
  const float* Vt(int g, int kb) const { return vt + KBlock(g, kb) * p->value_dim; }
  const float* Qp(int g, int qb) const { return qp + QBlock(g, qb) * p->head_dim; }
  const float* Qt(int g, int qb) const { return qt + QBlock(g, qb) * p->head_dim; }
  const float* DOp(int g, int qb) const { return dop + QBlock(g, qb) * p->value_dim; }
  const float* DOt(int g, int qb) const { return dot + QBlock(g, qb) * p->value_dim; }
  const float* Row(const float* per_query, int g, int qb) const {
    return per_query + static_cast<int64_t>(g) * p->q_len +
           static_cast<int64_t>(qb) * p->block_size;
  }
};

// Masks the pairs of a partial block that TokenAllowed rejects. transposed: rows are keys.
TSA_INLINE void MaskBlock(const SparseAttentionParams& p, int i0, int j0, int32_t flags,
                          bool transposed, float* s) {
  const int bs = p.block_size;
  for (int r = 0; r < bs; ++r) {
    float* row = s + static_cast<int64_t>(r) * bs;
    for (int c = 0; c < bs; ++c) {
      const int i = transposed ? i0 + c : i0 + r;
      const int j = transposed ? j0 + r : j0 + c;
      if (!TokenAllowed(p, i, j, flags)) row[c] = kNegInf;
    }
  }
}

// Scores of one (query block, key block) pair, query-major: scale * Q K^T plus the key bias,
// with the token rules applied where the block is partial. The forward pass and dq share it, so
// the two see bit-identical scores.
template <int W, int MR>
TSA_INLINE void QueryMajorScores(const Packed& pk, int g, const float* qp, const float* bias_b,
                                 int i0, int kb, int32_t flags, BlockKind kind, float* s) {
  const SparseAttentionParams& p = *pk.p;
  const int bs = p.block_size, j0 = kb * bs;
  Gemm<W, MR, false>(bs, bs, p.head_dim, qp, p.head_dim, pk.Kt(g, kb), bs, s, bs);
  for (int r = 0; r < bs; ++r) {
    ScaleBias<W>(s + static_cast<int64_t>(r) * bs, bs, p.scale, bias_b ? bias_b + j0 : nullptr);
  }
  if (kind == BlockKind::kPartial) MaskBlock(p, i0, j0, flags, /*transposed=*/false, s);
}

// Scratch layout of one forward unit: s [bs*bs], row_max [bs], row_sum [bs].
// qp is the unit's query block [bs, head_dim]; o receives the normalised output
// [bs, value_dim], lse the log-sum-exp of each row.
template <int W, int MR>
TSA_INLINE void ForwardUnitBody(const Packed& pk, int g, int qb, const float* qp, float* s,
                                float* row_max, float* row_sum, float* o, float* lse) {
  const SparseAttentionParams& p = *pk.p;
  const int bs = p.block_size, dv = p.value_dim;
  const int bh = pk.bh0 + g, b = bh / p.heads, h = bh % p.heads;
  const int64_t row = static_cast<int64_t>(p.layout_head(h)) * p.num_q_blocks + qb;
  const int i0 = qb * bs;
  const float* bias_b = p.key_bias ? p.key_bias + static_cast<int64_t>(b) * p.kv_len : nullptr;

  std::fill(o, o + static_cast<int64_t>(bs) * dv, 0.f);
  std::fill(row_max, row_max + bs, kNegInf);
  std::fill(row_sum, row_sum + bs, 0.f);

  for (int32_t e = p.row_offsets[row]; e < p.row_offsets[row + 1]; ++e) {
    const int kb = p.col_indices[e];
    const int32_t flags = p.block_flags[e];
    const int j0 = kb * bs;
    const BlockKind kind = Classify(p, i0, j0, flags);
    if (kind == BlockKind::kEmpty) continue;

    QueryMajorScores<W, MR>(pk, g, qp, bias_b, i0, kb, flags, kind, s);
    for (int r = 0; r < bs; ++r) {
      float* srow = s + static_cast<int64_t>(r) * bs;
      const float m_old = row_max[r];
      const float m_new = std::max(m_old, RowMax<W>(srow, bs));
      if (m_new == kNegInf) {  // nothing allowed in this row yet: contributes zeros
        std::fill(srow, srow + bs, 0.f);
        continue;
      }
      const float sum = ExpShiftSum<W>(srow, bs, m_new);
      if (m_old != m_new && m_old != kNegInf) {
        const float correction = std::exp(m_old - m_new);
        row_sum[r] *= correction;
        ScaleRow<W>(o + static_cast<int64_t>(r) * dv, dv, correction);
      }
      row_sum[r] += sum;
      row_max[r] = m_new;
    }
    Gemm<W, MR, true>(bs, dv, bs, s, bs, pk.Vp(g, kb), dv, o, dv);
  }

  for (int r = 0; r < bs; ++r) {
    float* orow = o + static_cast<int64_t>(r) * dv;
    if (row_sum[r] > 0.f) {
      ScaleRow<W>(orow, dv, 1.f / row_sum[r]);
      lse[r] = row_max[r] + std::log(row_sum[r]);
    } else {
      std::fill(orow, orow + dv, 0.f);
      lse[r] = kNegInf;
    }
  }
}

// dq of one query block, unscaled by p.scale: sum over its key blocks of dS K.
// Scratch: s, dp [bs*bs].
template <int W, int MR>
TSA_INLINE void DqUnitBody(const Packed& pk, int g, int qb, float* s, float* dp, float* dq) {
  const SparseAttentionParams& p = *pk.p;
  const int bs = p.block_size, d = p.head_dim, dv = p.value_dim;
  const int bh = pk.bh0 + g, b = bh / p.heads, h = bh % p.heads;
  const int64_t row = static_cast<int64_t>(p.layout_head(h)) * p.num_q_blocks + qb;
  const int i0 = qb * bs;
  const float* bias_b = p.key_bias ? p.key_bias + static_cast<int64_t>(b) * p.kv_len : nullptr;
  const float* lse_shift = pk.Row(pk.lse_shift, g, qb);
  const float* dd = pk.Row(pk.dd, g, qb);
  const float* qp = pk.Qp(g, qb);
  const float* dop = pk.DOp(g, qb);

  std::fill(dq, dq + static_cast<int64_t>(bs) * d, 0.f);
  for (int32_t e = p.row_offsets[row]; e < p.row_offsets[row + 1]; ++e) {
    const int kb = p.col_indices[e];
    const int32_t flags = p.block_flags[e];
    const int j0 = kb * bs;
    const BlockKind kind = Classify(p, i0, j0, flags);
    if (kind == BlockKind::kEmpty) continue;

    QueryMajorScores<W, MR>(pk, g, qp, bias_b, i0, kb, flags, kind, s);
    Gemm<W, MR, false>(bs, bs, dv, dop, dv, pk.Vt(g, kb), bs, dp, bs);
    for (int r = 0; r < bs; ++r) {
      float* srow = s + static_cast<int64_t>(r) * bs;
      const float* dprow = dp + static_cast<int64_t>(r) * bs;
      const float shift = lse_shift[r], offset = dd[r];
      // P = exp(s - lse); dS = P * (dP - delta + d_lse), written over P.
      ExpShiftSum<W>(srow, bs, shift);
      int c = 0;
      for (; c + W <= bs; c += W) {
        VStore<W>(srow + c, VLoad<W>(srow + c) * (VLoad<W>(dprow + c) - offset));
      }
      for (; c < bs; ++c) srow[c] = srow[c] * (dprow[c] - offset);
    }
    Gemm<W, MR, true>(bs, d, bs, s, bs, pk.Kp(g, kb), d, dq, d);
  }
}

// dk (unscaled) and dv of one key block: the transposed problem, rows are keys.
// Scratch: st, dpt [bs*bs].
template <int W, int MR>
TSA_INLINE void DkdvUnitBody(const Packed& pk, int g, int kb, float* st, float* dpt, float* dk,
                             float* dvout) {
  const SparseAttentionParams& p = *pk.p;
  const int bs = p.block_size, d = p.head_dim, dv = p.value_dim;
  const int bh = pk.bh0 + g, b = bh / p.heads, h = bh % p.heads;
  const int64_t col = static_cast<int64_t>(p.layout_head(h)) * p.num_kv_blocks + kb;
  const int j0 = kb * bs;
  const float* bias =
      p.key_bias ? p.key_bias + static_cast<int64_t>(b) * p.kv_len + j0 : nullptr;
  const float* kp = pk.Kp(g, kb);
  const float* vp = pk.Vp(g, kb);

  std::fill(dk, dk + static_cast<int64_t>(bs) * d, 0.f);
  std::fill(dvout, dvout + static_cast<int64_t>(bs) * dv, 0.f);
  for (int32_t e = p.col_offsets[col]; e < p.col_offsets[col + 1]; ++e) {
    const int qb = p.row_indices[e];
    const int32_t flags = p.csc_flags[e];
    const int i0 = qb * bs;
    const BlockKind kind = Classify(p, i0, j0, flags);
    if (kind == BlockKind::kEmpty) continue;
    const float* lse_shift = pk.Row(pk.lse_shift, g, qb);
    const float* dd = pk.Row(pk.dd, g, qb);

    Gemm<W, MR, false>(bs, bs, d, kp, d, pk.Qt(g, qb), bs, st, bs);
    for (int r = 0; r < bs; ++r) {
      float* row = st + static_cast<int64_t>(r) * bs;
      const float bias_r = bias ? bias[r] : 0.f;
      int c = 0;
      for (; c + W <= bs; c += W) VStore<W>(row + c, VLoad<W>(row + c) * p.scale + bias_r);
      for (; c < bs; ++c) row[c] = row[c] * p.scale + bias_r;
    }
    if (kind == BlockKind::kPartial) MaskBlock(p, i0, j0, flags, /*transposed=*/true, st);
    for (int r = 0; r < bs; ++r) ExpShiftEach<W>(st + static_cast<int64_t>(r) * bs, bs, lse_shift);
    Gemm<W, MR, false>(bs, bs, dv, vp, dv, pk.DOt(g, qb), bs, dpt, bs);
    Gemm<W, MR, true>(bs, dv, bs, st, bs, pk.DOp(g, qb), dv, dvout, dv);
    for (int r = 0; r < bs; ++r) {
      float* dsrow = dpt + static_cast<int64_t>(r) * bs;
      const float* prow = st + static_cast<int64_t>(r) * bs;
      int c = 0;
      for (; c + W <= bs; c += W) {
        VStore<W>(dsrow + c, VLoad<W>(prow + c) * (VLoad<W>(dsrow + c) - VLoad<W>(dd + c)));
      }
      for (; c < bs; ++c) dsrow[c] = prow[c] * (dsrow[c] - dd[c]);
    }
    Gemm<W, MR, true>(bs, d, bs, dpt, bs, pk.Qp(g, qb), d, dk, d);
  }
}

// The three builds of the compute kernels. The target attribute makes GCC generate the
// always-inline bodies (and the vector extensions in them) for that instruction set.
#if defined(__x86_64__) || defined(__i386__)
#define TSA_X86 1
#define TSA_AVX512 "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,bmi2"
#define TSA_AVX2 "avx2,fma,f16c,bmi2"

__attribute__((target(TSA_AVX512))) void ForwardUnitAvx512(const Packed& pk, int g, int qb,
                                                            const float* qp, float* s,
                                                            float* mx, float* sm, float* o,
                                                            float* lse) {
  ForwardUnitBody<16, 8>(pk, g, qb, qp, s, mx, sm, o, lse);
}
__attribute__((target(TSA_AVX2))) void ForwardUnitAvx2(const Packed& pk, int g, int qb,
                                                        const float* qp, float* s, float* mx,
                                                        float* sm, float* o, float* lse) {
  ForwardUnitBody<8, 4>(pk, g, qb, qp, s, mx, sm, o, lse);
}
#endif  // TSA_X86
void ForwardUnitGeneric(const Packed& pk, int g, int qb, const float* qp, float* s, float* mx,
                        float* sm, float* o, float* lse) {
  ForwardUnitBody<4, 4>(pk, g, qb, qp, s, mx, sm, o, lse);
}

#ifdef TSA_X86
__attribute__((target(TSA_AVX512))) void DqUnitAvx512(const Packed& pk, int g, int qb, float* s,
                                                       float* dp, float* dq) {
  DqUnitBody<16, 8>(pk, g, qb, s, dp, dq);
}
__attribute__((target(TSA_AVX2))) void DqUnitAvx2(const Packed& pk, int g, int qb, float* s,
                                                   float* dp, float* dq) {
  DqUnitBody<8, 4>(pk, g, qb, s, dp, dq);
}
#endif  // TSA_X86
void DqUnitGeneric(const Packed& pk, int g, int qb, float* s, float* dp, float* dq) {
  DqUnitBody<4, 4>(pk, g, qb, s, dp, dq);
}

#ifdef TSA_X86
__attribute__((target(TSA_AVX512))) void DkdvUnitAvx512(const Packed& pk, int g, int kb,
                                                         float* st, float* dpt, float* dk,
                                                         float* dv) {
  DkdvUnitBody<16, 8>(pk, g, kb, st, dpt, dk, dv);
}
__attribute__((target(TSA_AVX2))) void DkdvUnitAvx2(const Packed& pk, int g, int kb, float* st,
                                                     float* dpt, float* dk, float* dv) {
  DkdvUnitBody<8, 4>(pk, g, kb, st, dpt, dk, dv);
}
#endif  // TSA_X86
void DkdvUnitGeneric(const Packed& pk, int g, int kb, float* st, float* dpt, float* dk,
                     float* dv) {
  DkdvUnitBody<4, 4>(pk, g, kb, st, dpt, dk, dv);
}

struct Kernels {
  void (*forward)(const Packed&, int, int, const float*, float*, float*, float*, float*, float*);
  void (*dq)(const Packed&, int, int, float*, float*, float*);
  void (*dkdv)(const Packed&, int, int, float*, float*, float*, float*);
  const char* name;
};

const Kernels& SelectKernels() {
  static const Kernels kernels = [] {
#ifdef TSA_X86
    __builtin_cpu_init();
    // Lets tests run the narrower builds on a machine that has the wider ones.
    const char* cap = std::getenv("TF_SPARSE_ATTN_CPU_ISA");
    const std::string limit = cap ? cap : "";
    const bool allow_avx512 = limit.empty() || limit == "avx512";
    const bool allow_avx2 = allow_avx512 || limit == "avx2";
    if (allow_avx512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2")) {
      return Kernels{ForwardUnitAvx512, DqUnitAvx512, DkdvUnitAvx512, "avx512"};
    }
    if (allow_avx2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2")) {
      return Kernels{ForwardUnitAvx2, DqUnitAvx2, DkdvUnitAvx2, "avx2"};
    }
#endif  // TSA_X86
    return Kernels{ForwardUnitGeneric, DqUnitGeneric, DkdvUnitGeneric, "generic"};
  }();
  return kernels;
}

// ------------------------------------------------------------------------------------------
// Scheduling.

// Splits units [0, cost.size()) into at most max_ranges contiguous ranges of about equal total
// cost. The thread pool cuts its index space into equal-count chunks; handing it ranges of equal
// cost instead of raw units keeps skewed layouts (a causal pattern's rows grow with the query
// block) balanced across threads.
std::vector<int64_t> BalancedRanges(const std::vector<int64_t>& cost, int64_t max_ranges) {
  const int64_t n = static_cast<int64_t>(cost.size());
  int64_t total = 0;
  for (int64_t c : cost) total += c;
  std::vector<int64_t> bounds{0};
  const int64_t ranges = std::max<int64_t>(1, std::min(n, max_ranges));
  int64_t acc = 0, next = 1;
  for (int64_t u = 0; u < n; ++u) {
    acc += cost[u];
    // Close a range once the prefix cost passes its share of the total.
    if (u + 1 < n && static_cast<double>(acc) * ranges >= static_cast<double>(total) * next) {
      bounds.push_back(u + 1);
      while (static_cast<double>(acc) * ranges >= static_cast<double>(total) * next) ++next;
    }
  }
  bounds.push_back(n);
  return bounds;
}

void RunBalanced(const ParallelFor& parallel_for, const std::vector<int64_t>& cost,
                 int64_t cycles_per_cost, const std::function<void(int64_t, int64_t)>& fn) {
  if (cost.empty()) return;
  const std::vector<int64_t> bounds = BalancedRanges(cost, 256);
  const int64_t num_ranges = static_cast<int64_t>(bounds.size()) - 1;
  int64_t total = 0;
  for (int64_t c : cost) total += c;
  const int64_t per_range = std::max<int64_t>(1, total / num_ranges) * cycles_per_cost;
  parallel_for(num_ranges, per_range, [&](int64_t r0, int64_t r1) {
    if (r0 < r1) fn(bounds[r0], bounds[r1]);
  });
}

// Number of (batch, head) pairs packed at once: bounds the packed copies to about 256 MiB.
int GroupSize(const SparseAttentionParams& p, int64_t floats_per_pair) {
  const int64_t budget = int64_t{64} << 20;  // floats
  const int64_t pairs = static_cast<int64_t>(p.batch) * p.heads;
  return static_cast<int>(
      std::max<int64_t>(1, std::min(pairs, budget / std::max<int64_t>(1, floats_per_pair))));
}

// Offset of element (b, t, h, 0) of a [batch, time, heads, dim] tensor.
inline int64_t RowOffset(int b, int t, int time, int h, int heads, int dim) {
  return ((static_cast<int64_t>(b) * time + t) * heads + h) * dim;
}

// Copies rows t0 .. t0+bs-1 of one head into [bs, dim] (dst) and/or [dim, bs] (dst_t).
template <typename S>
void PackBlock(const typename S::type* src, int b, int t0, int time, int h, int heads, int dim,
               int bs, float* dst, float* dst_t) {
  for (int r = 0; r < bs; ++r) {
    const typename S::type* row = src + RowOffset(b, t0 + r, time, h, heads, dim);
    for (int c = 0; c < dim; ++c) {
      const float x = S::Load(row[c]);
      if (dst) dst[static_cast<int64_t>(r) * dim + c] = x;
      if (dst_t) dst_t[static_cast<int64_t>(c) * bs + r] = x;
    }
  }
}

template <typename S>
void StoreBlock(const float* src, float factor, typename S::type* dst, int b, int t0, int time,
                int h, int heads, int dim, int bs) {
  for (int r = 0; r < bs; ++r) {
    typename S::type* row = dst + RowOffset(b, t0 + r, time, h, heads, dim);
    const float* in = src + static_cast<int64_t>(r) * dim;
    for (int c = 0; c < dim; ++c) row[c] = S::Store(in[c] * factor);
  }
}

int64_t RowNnz(const int32_t* offsets, int64_t index) {
  return static_cast<int64_t>(offsets[index + 1]) - offsets[index];
}

template <typename S>
void Forward(const SparseAttentionParams& p, const ParallelFor& parallel_for) {
  using T = typename S::type;
  const Kernels& kernels = SelectKernels();
  const int bs = p.block_size, d = p.head_dim, dv = p.value_dim;
  const int nqb = p.num_q_blocks, nkb = p.num_kv_blocks;
  const int64_t pairs = static_cast<int64_t>(p.batch) * p.heads;
  const int group = GroupSize(p, static_cast<int64_t>(p.kv_len) * (d + dv));
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);
  const int64_t block_cycles = static_cast<int64_t>(bs) * bs * (d + dv) / 4;

  // Every element is written by the packing pass before it is read: no zero-fill.
  std::unique_ptr<float[]> buffer(new float[static_cast<int64_t>(group) * p.kv_len * (d + dv)]);
  Packed pk;
  pk.p = &p;
  pk.kt = buffer.get();
  pk.vp = pk.kt + static_cast<int64_t>(group) * p.kv_len * d;

  for (int64_t bh0 = 0; bh0 < pairs; bh0 += group) {
    const int g_count = static_cast<int>(std::min<int64_t>(group, pairs - bh0));
    pk.bh0 = static_cast<int>(bh0);
    parallel_for(static_cast<int64_t>(g_count) * nkb, static_cast<int64_t>(bs) * (d + dv) * 4,
                 [&](int64_t u0, int64_t u1) {
                   for (int64_t u = u0; u < u1; ++u) {
                     const int g = static_cast<int>(u / nkb), kb = static_cast<int>(u % nkb);
                     const int bh = pk.bh0 + g, b = bh / p.heads, h = bh % p.heads;
                     PackBlock<S>(k, b, kb * bs, p.kv_len, h, p.heads, d, bs, nullptr,
                                  pk.kt + pk.KBlock(g, kb) * d);
                     PackBlock<S>(v, b, kb * bs, p.kv_len, h, p.heads, dv, bs,
                                  pk.vp + pk.KBlock(g, kb) * dv, nullptr);
                   }
                 });

    std::vector<int64_t> cost(static_cast<int64_t>(g_count) * nqb);
    for (int g = 0; g < g_count; ++g) {
      const int lh = p.layout_head((pk.bh0 + g) % p.heads);
      for (int qb = 0; qb < nqb; ++qb) {
        cost[static_cast<int64_t>(g) * nqb + qb] =
            1 + 4 * RowNnz(p.row_offsets, static_cast<int64_t>(lh) * nqb + qb);
      }
    }
    RunBalanced(parallel_for, cost, block_cycles / 4, [&](int64_t u0, int64_t u1) {
      const int64_t bb = static_cast<int64_t>(bs) * bs;
      std::vector<float> scratch(static_cast<int64_t>(bs) * d + bb + 3 * bs +
                                 static_cast<int64_t>(bs) * dv);
      float* qp = scratch.data();
      float* s = qp + static_cast<int64_t>(bs) * d;
      float* mx = s + bb;
      float* sm = mx + bs;
      float* lse = sm + bs;
      float* o = lse + bs;
      for (int64_t u = u0; u < u1; ++u) {
        const int g = static_cast<int>(u / nqb), qb = static_cast<int>(u % nqb);
        const int bh = pk.bh0 + g, b = bh / p.heads, h = bh % p.heads;
        PackBlock<S>(q, b, qb * bs, p.q_len, h, p.heads, d, bs, qp, nullptr);
        kernels.forward(pk, g, qb, qp, s, mx, sm, o, lse);
        StoreBlock<S>(o, 1.f, out, b, qb * bs, p.q_len, h, p.heads, dv, bs);
        std::copy(lse, lse + bs,
                  p.lse + static_cast<int64_t>(bh) * p.q_len + static_cast<int64_t>(qb) * bs);
      }
    });
  }
}

template <typename S>
void Backward(const SparseAttentionParams& p, const ParallelFor& parallel_for) {
  using T = typename S::type;
  const Kernels& kernels = SelectKernels();
  const int bs = p.block_size, d = p.head_dim, dv = p.value_dim;
  const int nqb = p.num_q_blocks, nkb = p.num_kv_blocks;
  const int64_t pairs = static_cast<int64_t>(p.batch) * p.heads;
  const int group = GroupSize(p, 2 * static_cast<int64_t>(p.kv_len) * (d + dv) +
                                     2 * static_cast<int64_t>(p.q_len) * (d + dv + 1));
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* out = static_cast<const T*>(p.out);
  const T* d_out = static_cast<const T*>(p.d_out);
  T* dq = static_cast<T*>(p.dq);
  T* dk = static_cast<T*>(p.dk);
  T* dvg = static_cast<T*>(p.dv);
  const int64_t block_cycles = static_cast<int64_t>(bs) * bs * (2 * d + 2 * dv) / 4;

  const int64_t gk = static_cast<int64_t>(group) * p.kv_len;
  const int64_t gq = static_cast<int64_t>(group) * p.q_len;
  std::unique_ptr<float[]> buffer(new float[2 * gk * (d + dv) + 2 * gq * (d + dv + 1)]);
  Packed pk;
  pk.p = &p;
  float* cursor = buffer.get();
  pk.kt = cursor; cursor += gk * d;
  pk.kp = cursor; cursor += gk * d;
  pk.vp = cursor; cursor += gk * dv;
  pk.vt = cursor; cursor += gk * dv;
  pk.qp = cursor; cursor += gq * d;
  pk.qt = cursor; cursor += gq * d;
  pk.dop = cursor; cursor += gq * dv;
  pk.dot = cursor; cursor += gq * dv;
  pk.lse_shift = cursor; cursor += gq;
  pk.dd = cursor; cursor += gq;

  for (int64_t bh0 = 0; bh0 < pairs; bh0 += group) {
    const int g_count = static_cast<int>(std::min<int64_t>(group, pairs - bh0));
    pk.bh0 = static_cast<int>(bh0);
    const int64_t kv_units = static_cast<int64_t>(g_count) * nkb;
    const int64_t q_units = static_cast<int64_t>(g_count) * nqb;
    parallel_for(kv_units + q_units, static_cast<int64_t>(bs) * (d + dv) * 8,
                 [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        if (u < kv_units) {
          const int g = static_cast<int>(u / nkb), kb = static_cast<int>(u % nkb);
          const int bh = pk.bh0 + g, b = bh / p.heads, h = bh % p.heads;
          const int64_t base = pk.KBlock(g, kb);
          PackBlock<S>(k, b, kb * bs, p.kv_len, h, p.heads, d, bs, pk.kp + base * d,
                       pk.kt + base * d);
          PackBlock<S>(v, b, kb * bs, p.kv_len, h, p.heads, dv, bs, pk.vp + base * dv,
                       pk.vt + base * dv);
          continue;
        }
        const int64_t uq = u - kv_units;
        const int g = static_cast<int>(uq / nqb), qb = static_cast<int>(uq % nqb);
        const int bh = pk.bh0 + g, b = bh / p.heads, h = bh % p.heads;
        const int64_t base = pk.QBlock(g, qb);
        PackBlock<S>(q, b, qb * bs, p.q_len, h, p.heads, d, bs, pk.qp + base * d,
                     pk.qt + base * d);
        PackBlock<S>(d_out, b, qb * bs, p.q_len, h, p.heads, dv, bs, pk.dop + base * dv,
                     pk.dot + base * dv);
        for (int r = 0; r < bs; ++r) {
          const int i = qb * bs + r;
          const T* orow = out + RowOffset(b, i, p.q_len, h, p.heads, dv);
          const float* gorow = pk.dop + (base + r) * dv;
          float delta = 0.f;
          for (int c = 0; c < dv; ++c) delta += gorow[c] * S::Load(orow[c]);
          const int64_t stat = static_cast<int64_t>(bh) * p.q_len + i;
          const float lse = p.lse[stat];
          pk.lse_shift[base + r] = lse == kNegInf ? kPosInf : lse;
          pk.dd[base + r] = delta - p.d_lse[stat];
        }
      }
    });

    std::vector<int64_t> q_cost(q_units), k_cost(kv_units);
    for (int g = 0; g < g_count; ++g) {
      const int lh = p.layout_head((pk.bh0 + g) % p.heads);
      for (int qb = 0; qb < nqb; ++qb) {
        q_cost[static_cast<int64_t>(g) * nqb + qb] =
            1 + 4 * RowNnz(p.row_offsets, static_cast<int64_t>(lh) * nqb + qb);
      }
      for (int kb = 0; kb < nkb; ++kb) {
        k_cost[static_cast<int64_t>(g) * nkb + kb] =
            1 + 4 * RowNnz(p.col_offsets, static_cast<int64_t>(lh) * nkb + kb);
      }
    }
    const int64_t bb = static_cast<int64_t>(bs) * bs;
    RunBalanced(parallel_for, q_cost, block_cycles / 4, [&](int64_t u0, int64_t u1) {
      std::vector<float> scratch(2 * bb + static_cast<int64_t>(bs) * d);
      float* s = scratch.data();
      float* dp = s + bb;
      float* acc = dp + bb;
      for (int64_t u = u0; u < u1; ++u) {
        const int g = static_cast<int>(u / nqb), qb = static_cast<int>(u % nqb);
        const int bh = pk.bh0 + g, b = bh / p.heads, h = bh % p.heads;
        kernels.dq(pk, g, qb, s, dp, acc);
        StoreBlock<S>(acc, p.scale, dq, b, qb * bs, p.q_len, h, p.heads, d, bs);
      }
    });
    RunBalanced(parallel_for, k_cost, block_cycles / 4, [&](int64_t u0, int64_t u1) {
      std::vector<float> scratch(2 * bb + static_cast<int64_t>(bs) * (d + dv));
      float* st = scratch.data();
      float* dpt = st + bb;
      float* acc_k = dpt + bb;
      float* acc_v = acc_k + static_cast<int64_t>(bs) * d;
      for (int64_t u = u0; u < u1; ++u) {
        const int g = static_cast<int>(u / nkb), kb = static_cast<int>(u % nkb);
        const int bh = pk.bh0 + g, b = bh / p.heads, h = bh % p.heads;
        kernels.dkdv(pk, g, kb, st, dpt, acc_k, acc_v);
        StoreBlock<S>(acc_k, p.scale, dk, b, kb * bs, p.kv_len, h, p.heads, d, bs);
        StoreBlock<S>(acc_v, 1.f, dvg, b, kb * bs, p.kv_len, h, p.heads, dv, bs);
      }
    });
  }
}

}  // namespace

void SparseAttentionForward(const SparseAttentionParams& p, const ParallelFor& parallel_for) {
  if (p.batch == 0) return;
  switch (p.dtype) {
    case ElementType::kFloat32: return Forward<Float32Storage>(p, parallel_for);
    case ElementType::kFloat16: return Forward<Float16Storage>(p, parallel_for);
    case ElementType::kBFloat16: return Forward<BFloat16Storage>(p, parallel_for);
  }
}

void SparseAttentionBackward(const SparseAttentionParams& p, const ParallelFor& parallel_for) {
  if (p.batch == 0) return;
  switch (p.dtype) {
    case ElementType::kFloat32: return Backward<Float32Storage>(p, parallel_for);
    case ElementType::kFloat16: return Backward<Float16Storage>(p, parallel_for);
    case ElementType::kBFloat16: return Backward<BFloat16Storage>(p, parallel_for);
  }
}

const char* SparseAttentionCpuIsa() { return SelectKernels().name; }

}  // namespace cpu
}  // namespace tf_sparse_attn
