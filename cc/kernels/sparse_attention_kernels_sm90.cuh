// The forward, dq and dk/dv kernels on Hopper's warpgroup products (wgmma, sm_90a), head_dim 64:
// included at the end of sparse_attention_kernels.cuh, whose helpers they share with the sm_80
// kernels (the tile setup, the gathers, the step reader, the softmax, the masking and the
// epilogues).
//
// Where the sm_80 forward has every warp load each K and V fragment from shared memory with
// ldmatrix and issue 16x8 products one at a time, a warpgroup (four warps, 64 query rows) here
// issues one asynchronous 64x64x16 product that reads its operands from shared memory itself.
// Q, K and V are loaded in the layout the tensor cores read (128-byte rows in the 128-byte
// swizzle); the scores come back in mma.sync's accumulator layout, so that the softmax code is
// shared, and the probabilities go into P V from registers.
//
// The kernels compile to nothing for other targets; the host runs them only where
// WgmmaAvailable() says the build carries sm_90a code and the device is compute capability 9.0.
#ifndef TF_SPARSE_ATTN_CC_KERNELS_SPARSE_ATTENTION_KERNELS_SM90_CUH_
#define TF_SPARSE_ATTN_CC_KERNELS_SPARSE_ATTENTION_KERNELS_SM90_CUH_

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define TSA_WGMMA_DEVICE 1
#endif

namespace tf_sparse_attn {
namespace gpu {
namespace detail {

// 64-element (128-byte) rows in the 128-byte swizzle that wgmma reads: piece c of row r goes
// to piece c ^ (r % 8) of its row; tiles start at multiples of 1024 bytes.
struct Swizzled128Rows {
  static __device__ __forceinline__ int At(int r, int c) { return r * 64 + ((c ^ (r & 7)) << 3); }
  static constexpr bool kMulAddRowAddresses = true;  // see GatherRowPairs
};

// Shared-memory matrix descriptor of a 128-byte-swizzled tile for wgmma: the tile's address
// in 16-byte units (bits 0-13), the leading-dimension offset (bits 16-29: unused by a K-major
// tile, and by an N-major one of one 128-byte row, set to 16 bytes), the stride between groups
// of 8 rows (bits 32-45: 1024 bytes) and the swizzle mode (bits 62-63: 1 = 128 bytes).
// Advancing along a K-major row by 16 elements adds 32 bytes to the address, which the
// hardware swizzles like the stores did.
__device__ __forceinline__ uint64_t SwizzledTileDesc(const void* tile) {
  return static_cast<uint64_t>((SmemAddr(tile) & 0x3FFFF) >> 4) | (uint64_t{16 >> 4} << 16) |
         (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}
// What to add to a descriptor to move its operand on by 16 elements along K: 32 bytes along a
// K-major row, or 16 rows of 128 bytes of an M- or N-major tile.
constexpr uint64_t kDescAlongRow16 = 32 >> 4;
constexpr uint64_t kDescDownRows16 = 16 * 128 >> 4;

// Orders this thread's ordinary shared-memory writes (cp.async included) before reads by the
// tensor cores' asynchronous proxy.
__device__ __forceinline__ void FenceSharedForAsyncProxy() {
#if defined(TSA_WGMMA_DEVICE)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// The kernel's dynamic shared memory from its first 1024-byte boundary, where swizzled tiles
// must start (the kernels ask for 1024 bytes of slack).
__device__ __forceinline__ unsigned char* SwizzledTileSmem() {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  return smem_raw + ((1024 - (SmemAddr(smem_raw) & 1023)) & 1023);
}

// The step loop's barrier (NextStep) for kernels whose tensor cores read the loaded tiles.
__device__ __forceinline__ void NextStepForAsyncProxy() {
  CpAsyncWait<0>();
  FenceSharedForAsyncProxy();
  __syncthreads();
}

// Register operands (A and accumulators) written by ordinary instructions before the
// asynchronous products that read them.
__device__ __forceinline__ void WgmmaFence() {
#if defined(TSA_WGMMA_DEVICE)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void WgmmaCommit() {
#if defined(TSA_WGMMA_DEVICE)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
// Waits until at most N of the product groups this warpgroup has committed are still running
// (they finish in the order committed): N = 0 waits for all.
template <int N>
__device__ __forceinline__ void WgmmaWait() {
#if defined(TSA_WGMMA_DEVICE)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Keeps the compiler from moving ordinary accesses of the products' register operands across
// WgmmaFence or WgmmaWait (which name no registers): the instructions that write them
// before a fence, and those that read the results after a wait, stay on their side of it.
template <int N>
__device__ __forceinline__ void PinRegisters(float (&d)[N][4]) {
#pragma unroll
  for (int n = 0; n < N; ++n) {
#pragma unroll
    for (int x = 0; x < 4; ++x) asm volatile("" : "+f"(d[n][x])::"memory");
  }
}
template <int N>
__device__ __forceinline__ void PinRegisters(uint32_t (&a)[N][4]) {
#pragma unroll
  for (int n = 0; n < N; ++n) {
#pragma unroll
    for (int x = 0; x < 4; ++x) asm volatile("" : "+r"(a[n][x])::"memory");
  }
}

// The 64x64 float32 accumulator of a warpgroup product as inline-assembly operands %0-%31,
// d[n][x] being register 4 n + x of the instruction's list.
#define TSA_WGMMA_ACC_LIST                                                                     \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"                                    \
  "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}"
#define TSA_WGMMA_ACC_OPERANDS(d)                                                              \
  "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]),    \
      "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]),               \
      "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),               \
      "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]),               \
      "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]),               \
      "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])

// Expands ASM(TYPES) with the instruction's operand types for element type E.
#define TSA_WGMMA_FOR_TYPES(E, ASM)       \
  if constexpr (E == ElementType::kBFloat16) { \
    ASM("bf16.bf16");                      \
  } else {                                 \
    ASM("f16.f16");                        \
  }

// d (+)= a b for the warpgroup: a 64x16 A from registers (each warp its 16 rows, in mma.sync's
// A fragment layout), a 16x64 B from the swizzled tile at desc_b, N-major (rows B[k][.], as
// V's rows are). d is 64x64 float32, each warp's 16 rows in mma.sync's accumulator layout per
// 8 columns. accumulate == false overwrites d.
template <ElementType E>
__device__ __forceinline__ void Wgmma64x64x16NMajorB(float (&d)[8][4], const uint32_t (&a)[4],
                                                     uint64_t desc_b, bool accumulate) {
#if defined(TSA_WGMMA_DEVICE)
#define TSA_WGMMA_ASM(TYPES)                                                                  \
  asm volatile("{\n.reg .pred acc;\nsetp.ne.b32 acc, %37, 0;\n"                               \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPES " " TSA_WGMMA_ACC_LIST      \
               ", {%32,%33,%34,%35}, %36, acc, 1, 1, 1;\n}\n"                                  \
               : TSA_WGMMA_ACC_OPERANDS(d)                                                    \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b),                     \
                 "r"(accumulate ? 1 : 0))
  TSA_WGMMA_FOR_TYPES(E, TSA_WGMMA_ASM);
#undef TSA_WGMMA_ASM
#endif
}

// d (+)= a b with both operands in swizzled tiles: A 64x16 at desc_a (the warpgroup's 64
// rows), K-major (rows A[m][.]) or, kMMajorA, M-major (rows A[k][.]); B 16x64 at desc_b,
// K-major (rows B[n][.], as K's rows are in Q K^T) or, kNMajorB, N-major (rows B[k][.]).
// d as above.
template <ElementType E, bool kMMajorA = false, bool kNMajorB = false>
__device__ __forceinline__ void Wgmma64x64x16Shared(float (&d)[8][4], uint64_t desc_a,
                                                    uint64_t desc_b, bool accumulate) {
#if defined(TSA_WGMMA_DEVICE)
#define TSA_WGMMA_ASM(TYPES)                                                                  \
  asm volatile("{\n.reg .pred acc;\nsetp.ne.b32 acc, %34, 0;\n"                               \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPES " " TSA_WGMMA_ACC_LIST      \
               ", %32, %33, acc, 1, 1, %35, %36;\n}\n"                                         \
               : TSA_WGMMA_ACC_OPERANDS(d)                                                    \
               : "l"(desc_a), "l"(desc_b), "r"(accumulate ? 1 : 0), "n"(kMMajorA ? 1 : 0),     \
                 "n"(kNMajorB ? 1 : 0))
  TSA_WGMMA_FOR_TYPES(E, TSA_WGMMA_ASM);
#undef TSA_WGMMA_ASM
#endif
}

// d (+)= a b for a 16x32 B: 32 rows of a K-major swizzled tile at desc_b (as Q's rows are in
// K Q^T), A as in Wgmma64x64x16Shared (K-major), d 64x32 float32 (four n-tiles of 8 columns).
template <ElementType E>
__device__ __forceinline__ void Wgmma64x32x16Shared(float (&d)[4][4], uint64_t desc_a,
                                                    uint64_t desc_b, bool accumulate) {
#if defined(TSA_WGMMA_DEVICE)
#define TSA_WGMMA_ASM(TYPES)                                                                  \
  asm volatile("{\n.reg .pred acc;\nsetp.ne.b32 acc, %18, 0;\n"                               \
               "wgmma.mma_async.sync.aligned.m64n32k16.f32." TYPES                            \
               " {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}"                      \
               ", %16, %17, acc, 1, 1, 0, 0;\n}\n"                                             \
               : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]),    \
                 "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]),    \
                 "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]),    \
                 "+f"(d[3][3])                                                                \
               : "l"(desc_a), "l"(desc_b), "r"(accumulate ? 1 : 0))
  TSA_WGMMA_FOR_TYPES(E, TSA_WGMMA_ASM);
#undef TSA_WGMMA_ASM
#endif
}

#undef TSA_WGMMA_FOR_TYPES
#undef TSA_WGMMA_ACC_OPERANDS
#undef TSA_WGMMA_ACC_LIST

// d = A B^T over head_dim 64, in four products of 16 along it: A's 64 rows at desc_a, B's N
// (64 or 32) rows at desc_b, both K-major swizzled tiles. The products are only issued: the
// caller fences before them and commits and waits after.
template <ElementType E, int N>
__device__ __forceinline__ void WgmmaRowProducts(float (&d)[N / 8][4], uint64_t desc_a,
                                                 uint64_t desc_b) {
  static_assert(N == 64 || N == 32, "64 or 32 columns");
#pragma unroll
  for (int kk = 0; kk < 64 / 16; ++kk) {
    if constexpr (N == 64) {
      Wgmma64x64x16Shared<E>(d, desc_a + kk * kDescAlongRow16, desc_b + kk * kDescAlongRow16,
                             kk > 0);
    } else {
      Wgmma64x32x16Shared<E>(d, desc_a + kk * kDescAlongRow16, desc_b + kk * kDescAlongRow16,
                             kk > 0);
    }
  }
}

// d += A B over KS pieces of 16 along K: A's pieces from registers (mma.sync's A layout, as
// PackA writes them), B's rows from desc_b, N-major, 16 rows a piece. Issued only, as above.
template <ElementType E, int KS>
__device__ __forceinline__ void WgmmaAddFromRegisters(float (&d)[8][4],
                                                      const uint32_t (&a)[KS][4],
                                                      uint64_t desc_b) {
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
    Wgmma64x64x16NMajorB<E>(d, a[kk], desc_b + kk * kDescDownRows16, true);
  }
}

template <int ROWS>
struct WgmmaFwdConfig {
  static constexpr int kD = 64;       // head_dim: one 128-byte swizzled row
  static constexpr int kRows = ROWS;  // kFwdTile or kTile: one warpgroup per 64 rows
  static constexpr int kThreads = 2 * ROWS;
  // Keys per step, and per part of a step: S and the softmax for 64 keys at a time. The kernel
  // issues more instructions than anything else bounds it by (H200, dense, T = 16384: 60% of
  // issue slots busy, each warp ~480 instructions a step, ~200 of them the softmax's), and a
  // step's gathers, list reads and barrier cost the same for 128 keys as for 64. Whole steps
  // of 128 keys (S 64x128 in registers) spilled at the 128 registers that two CTAs allow.
  // Tall tiles hold long lists (BuildWorkLists chooses them where they cost at most 1.1x the
  // products of 64-row ones), where 128-key steps waste little on a list's last step; 64-row
  // tiles keep 64-key steps for short lists (local, strided).
  static constexpr int kKeys = ROWS == kFwdTile ? 128 : 64;
  static constexpr int kPartKeys = 64;
  static constexpr int kChunks = kKeys / kChunk;
  static constexpr int kTileElems = kKeys * kD;
  // Two CTAs of two warpgroups per SM (16 warps): 128 registers a thread.
  static constexpr int kMinBlocks = 4 * 64 / ROWS;
  // Q, then K and V tiles (two of each), all swizzled and 1024-byte aligned (hence the slack),
  // then the key bias.
  static constexpr size_t SmemBytes(size_t elem) {
    return 1024 + elem * (ROWS * kD + 4 * kTileElems) + sizeof(float) * 2 * kKeys;
  }
};

// The forward (out, lse) with wgmma, head_dim 64: the sm_80 forward's grid, work lists, step
// loop and softmax, with each warp holding 16 query rows.
template <ElementType E, int ROWS>
__global__ void __launch_bounds__(WgmmaFwdConfig<ROWS>::kThreads,
                                  WgmmaFwdConfig<ROWS>::kMinBlocks)
    WgmmaForwardKernel(const SparseAttentionParams p, const TileWork w) {
#if defined(TSA_WGMMA_DEVICE)
  using Cfg = WgmmaFwdConfig<ROWS>;
  using T = typename Elem<E>::T;
  // KN keys a step, in parts of KP.
  constexpr int D = Cfg::kD, KN = Cfg::kKeys, KP = Cfg::kPartKeys, NT = KP / 8;
  constexpr int TH = Cfg::kThreads, TE = Cfg::kTileElems;
  unsigned char* smem = SwizzledTileSmem();
  T* sQ = reinterpret_cast<T*>(smem);  // [ROWS][D]
  T* sK = sQ + ROWS * D;               // [2][KN][D]
  T* sV = sK + 2 * TE;                 // [2][KN][D]
  float* sBias = reinterpret_cast<float*>(sV + 2 * TE);

  const QueryCta<T, D, ROWS> cta(p, w);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  constexpr int NC = Cfg::kChunks;
  const int ngroups = (cta.e1 - cta.e0 + NC - 1) / NC;
  const int32_t* ent = w.q_entries;

  auto load_group = [&](int grp, int buf) {
    cta.template LoadKeyStep<Swizzled128Rows, KN, TH>(sK + buf * TE, sV + buf * TE,
                                                      sBias + buf * KN, ent, grp);
  };

  LoadRows<T, D, Swizzled128Rows, ROWS, TH>(sQ, cta.q, cta.stride, cta.q0, p.q_len);
  if (ngroups > 0) load_group(0, 0);
  CpAsyncCommit();
  NextStepForAsyncProxy();

  // The warp's rows are warp * 16 + (g, g + 8): warp % 4 of the warpgroup that holds rows
  // 64 (warp / 4) ... of the tile. Q stays in shared memory as the products' A operand (held in
  // registers across the loop, it lost them to the probabilities' fragments in ptxas's
  // allocation: nvcc 13.0 reused them after the first step).
  const uint64_t q_desc = SwizzledTileDesc(sQ + (warp / 4) * 64 * D);
  float o[D / 8][4], s[NT][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
#pragma unroll
  for (int n = 0; n < NT; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
  float m[2] = {-kInf, -kInf}, l[2] = {0.f, 0.f};
  int row_i[2], sub[2];
  MTileRows(p, cta.q0, cta.q0 + warp * 16, g, row_i, sub);

  // At each step's barrier every warpgroup has waited for its products of the previous step,
  // so that their buffers may be refilled. Each part reads its own four entries (the loop's
  // copies of the step's eight go unused, and the compiler drops them): ptxas issues those
  // loads ahead of the part's products, and eight held through them spilled.
  ForEachStep<NC, false>(
      ngroups, cta.e0, cta.e1, ent, [&] { NextStepForAsyncProxy(); }, load_group,
      [&](int buf, int e, const int (&)[NC], const int32_t (&)[NC], bool) {
#pragma unroll
    for (int part = 0; part < KN / KP; ++part) {
      // A list's last step may end before its second part, which would change nothing: every
      // score masked leaves the maxima, sums and O as they were.
      if (part > 0 && e + part * (KP / kChunk) >= cta.e1) break;
      // The part's keys are rows KP part ... of the step's K and V tiles.
      const uint64_t k_desc = SwizzledTileDesc(sK + buf * TE + part * KP * D);
      PinRegisters(s);
      WgmmaFence();
      WgmmaRowProducts<E, KP>(s, q_desc, k_desc);
      WgmmaCommit();
      WgmmaWait<0>();
      PinRegisters(s);
      int ks[KP / kChunk];
      int32_t info[KP / kChunk];
      const bool partial = ReadStep(ent, e + part * (KP / kChunk), cta.e1, ks, info);

      // The rest of the part is compiled once per case (masked, raw): with only the softmax's
      // score loop specialised, the cases joined with their scores in different registers,
      // and the common raw unmasked case spent a move per score to join them.
      const float* part_bias = cta.bias != nullptr ? sBias + buf * KN + part * KP : nullptr;
      Specialize(partial, cta.raw, [&](auto masked, auto raw) {
        float mx[2];
        MaskedScoreMaxima<decltype(masked)::value, decltype(raw)::value>(
            p, s, mx, cta.sl, part_bias, ks, info, sub, row_i, t4);
        RescaleAndExponentiate(s, o, m, l, mx, cta.to_log2);
        uint32_t pa[KP / 16][4];
#pragma unroll
        for (int kk = 0; kk < KP / 16; ++kk) PackA<E>(pa[kk], s[2 * kk], s[2 * kk + 1]);
        const uint64_t v_desc = SwizzledTileDesc(sV + buf * TE + part * KP * D);
        PinRegisters(o);
        PinRegisters(pa);
        WgmmaFence();
        WgmmaAddFromRegisters<E>(o, pa, v_desc);
        WgmmaCommit();
        WgmmaWait<0>();
        PinRegisters(o);
      });
    }
  });

  WriteForwardRows<E>(p, cta.out, cta.stride, static_cast<int64_t>(cta.bh) * p.q_len, o, m, l,
                      row_i, t4);
#endif
}

template <ElementType E>
const char* WgmmaForwardImpl(const SparseAttentionParams& p, const TileWork& w, void* stream) {
  using T = typename Elem<E>::T;
  dim3 grid;
  if (const char* err = FlatGrid(ForwardTiles(p, w), p, &grid)) return err;
  if (w.query_tile == kFwdTile) {
    using Cfg = WgmmaFwdConfig<kFwdTile>;
    return Launch(WgmmaForwardKernel<E, kFwdTile>, grid, Cfg::SmemBytes(sizeof(T)), stream, p,
                  w, Cfg::kThreads);
  }
  using Cfg = WgmmaFwdConfig<kTile>;
  return Launch(WgmmaForwardKernel<E, kTile>, grid, Cfg::SmemBytes(sizeof(T)), stream, p, w,
                Cfg::kThreads);
}

// The dq kernel on warpgroup products, head_dim 64: the sm_80 dq kernel's tile (64 queries, a
// warpgroup of four warps with 16 rows each), step loop, dS and epilogue. Per step of 64 keys:
// S = Q K^T and dP = dO V^T from the swizzled tiles, as two groups, so that P's exponentials
// are computed while dP's products run; then dq += dS K with dS from registers and K read
// N-major.
struct WgmmaDqConfig {
  static constexpr int kD = 64, kKeys = 64, kThreads = 128;
  static constexpr int kTileElems = 64 * 64;
  // Four CTAs (16 warps) per SM, as the sm_80 dq kernel: 128 registers a thread.
  static constexpr int kMinBlocks = 4;
  // Q and dO, then K and V (two of each): six swizzled tiles, 1024-byte aligned (hence the
  // slack); then the key bias of two steps.
  static constexpr size_t SmemBytes(size_t elem) {
    return 1024 + elem * 6 * kTileElems + sizeof(float) * 2 * kKeys;
  }
};

template <ElementType E>
__global__ void __launch_bounds__(WgmmaDqConfig::kThreads, WgmmaDqConfig::kMinBlocks)
    WgmmaDqKernel(const SparseAttentionParams p, const TileWork w) {
#if defined(TSA_WGMMA_DEVICE)
  using Cfg = WgmmaDqConfig;
  using T = typename Elem<E>::T;
  constexpr int D = Cfg::kD, KN = Cfg::kKeys, NT = KN / 8, TH = Cfg::kThreads;
  constexpr int TE = Cfg::kTileElems;
  static_assert(kTile == 64, "one warpgroup per query tile");
  unsigned char* smem = SwizzledTileSmem();
  T* sQ = reinterpret_cast<T*>(smem);
  T* sdO = sQ + TE;
  T* sK = sdO + TE;     // [2][KN][D]
  T* sV = sK + 2 * TE;  // [2][KN][D]
  float* sBias = reinterpret_cast<float*>(sV + 2 * TE);

  const QueryCta<T, D, kTile> cta(p, w);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, t4 = lane & 3;
  const int ngroups = (cta.e1 - cta.e0 + 3) / 4;
  const int32_t* ent = w.q_entries;

  auto load_group = [&](int grp, int buf) {
    cta.template LoadKeyStep<Swizzled128Rows, KN, TH>(sK + buf * TE, sV + buf * TE,
                                                      sBias + buf * KN, ent, grp);
  };

  int row_i[2], sub[2];
  float lse2[2], delta[2];
  DqPrologue<E, D, Swizzled128Rows, TH>(p, w, cta, sQ, sdO, ngroups, load_group, warp, lane,
                                        row_i, sub, lse2, delta);
  const float sl = p.scale * kLog2e;
  const uint64_t q_desc = SwizzledTileDesc(sQ), do_desc = SwizzledTileDesc(sdO);
  static_assert(NT == D / 8, "the accumulators share one loop");
  float dq[D / 8][4], s[NT][4], dp[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n) {
#pragma unroll
    for (int x = 0; x < 4; ++x) dq[n][x] = s[n][x] = dp[n][x] = 0.f;
  }

  // At each step's barrier the step's loads have landed, and the warpgroup has finished the
  // previous step's products, so that their buffers may be refilled.
  ForEachStep<4, true>(
      ngroups, cta.e0, cta.e1, ent, [&] { NextStepForAsyncProxy(); }, load_group,
      [&](int buf, int e, const int (&ks)[4], const int32_t (&info)[4], bool partial) {
    const uint64_t k_desc = SwizzledTileDesc(sK + buf * TE);
    const uint64_t v_desc = SwizzledTileDesc(sV + buf * TE);
    PinRegisters(s);
    PinRegisters(dp);
    WgmmaFence();
    WgmmaRowProducts<E, KN>(s, q_desc, k_desc);
    WgmmaCommit();
    WgmmaRowProducts<E, KN>(dp, do_desc, v_desc);
    WgmmaCommit();
    WgmmaWait<1>();
    PinRegisters(s);
    DqScores(p, s, dp, partial, sl, lse2, delta,
             cta.bias != nullptr ? sBias + buf * KN : nullptr, ks, info, sub, row_i, t4, [&] {
      WgmmaWait<0>();
      PinRegisters(dp);
    });
    uint32_t pa[KN / 16][4];
#pragma unroll
    for (int kk = 0; kk < KN / 16; ++kk) PackA<E>(pa[kk], s[2 * kk], s[2 * kk + 1]);
    PinRegisters(dq);
    PinRegisters(pa);
    WgmmaFence();
    WgmmaAddFromRegisters<E>(dq, pa, k_desc);
    WgmmaCommit();
    WgmmaWait<0>();
    PinRegisters(dq);
  });

  WriteDqRows<E>(p, cta, dq, row_i, t4);
#endif
}

template <ElementType E>
const char* WgmmaDqImpl(const SparseAttentionParams& p, const TileWork& w, void* stream) {
  using T = typename Elem<E>::T;
  dim3 grid;
  if (const char* err = FlatGrid(QueryTiles(p), p, &grid)) return err;
  return Launch(WgmmaDqKernel<E>, grid, WgmmaDqConfig::SmemBytes(sizeof(T)), stream, p, w,
                WgmmaDqConfig::kThreads);
}

// The dk/dv kernel on warpgroup products, head_dim 64, for 64-key tiles (wide or paired): one
// warpgroup of four warps, 16 keys each, as in the sm_80 kernel, whose tile setup, loads,
// masking and epilogue it shares. Per step of 64 queries: S^T = K Q^T and dP^T = V dO^T from
// the swizzled tiles; P^T and dS^T in registers become the A operands of dV += P^T dO and
// dK += dS^T Q (dO and Q read N-major). With kFusedDq, dS^T also goes to a swizzled tile that
// dq += dS K reads M-major, and each warp adds its 16 queries' dq to the accumulator. Without,
// the step goes in two halves of 32 queries, so that three CTAs fit per SM, the second half's
// S^T and dP^T issued behind the first half's dV and dK.
struct WgmmaDkvConfig {
  static constexpr int kD = 64, kKeys = 64, kQueries = 64, kThreads = 128;
  static constexpr int kTileElems = 64 * 64;
  // K, V, Q and dO (two each), and with the fused dq the dS^T tile: swizzled tiles, 1024-byte
  // aligned (hence the slack); then lse and delta of two steps.
  static constexpr size_t SmemBytes(size_t elem, bool fused_dq) {
    return 1024 + elem * (fused_dq ? 7 : 6) * kTileElems + sizeof(float) * 4 * kQueries;
  }
  // CTAs per SM. The deterministic kernel's half steps need 146 registers, which allow three:
  // H200, T = 16384, d = 64, against two with whole steps (186 registers), dk/dv of local
  // 12% faster, strided 11%, fixed 8%, dense 2%, but fixed at T = 4096 10% slower. The fused
  // kernel keeps whole steps and two: capped for three, ptxas serialised its products (C7512).
  static constexpr int MinBlocks(bool fused_dq) { return fused_dq ? 2 : 3; }
};

template <ElementType E, KeyTiling kTiling, bool kFusedDq>
__global__ void __launch_bounds__(WgmmaDkvConfig::kThreads, WgmmaDkvConfig::MinBlocks(kFusedDq))
    WgmmaDkvKernel(const SparseAttentionParams p, const TileWork w) {
#if defined(TSA_WGMMA_DEVICE)
  using Cfg = WgmmaDkvConfig;
  using T = typename Elem<E>::T;
  constexpr int D = Cfg::kD, KT = Cfg::kKeys, QN = Cfg::kQueries, NC = QN / 16;
  constexpr int TH = Cfg::kThreads, TE = Cfg::kTileElems;
  // Queries of a step's part: the whole step with the fused dq, else half of it.
  constexpr int QP = kFusedDq ? QN : QN / 2;
  unsigned char* smem = SwizzledTileSmem();
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + TE;
  T* sQ = sV + TE;        // [2][QN][D]
  T* sdO = sQ + 2 * TE;   // [2][QN][D]
  T* sdS = sdO + 2 * TE;  // dS^T [KT][QN], only when kFusedDq
  float* sLse2 = reinterpret_cast<float*>(sdS + (kFusedDq ? TE : 0));
  float* sDelta = sLse2 + 2 * QN;

  const DkvCta<T, D, KT, kTiling> cta(p, w);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const int e0 = cta.e0, e1 = cta.e1;
  const int ngroups = (e1 - e0 + NC - 1) / NC;
  const int32_t* ent = w.k_entries;

  auto load_group = [&](int grp, int buf) {
    cta.template LoadQueryStep<Swizzled128Rows, QN, TH>(sQ + buf * TE, sdO + buf * TE,
                                                        sLse2 + buf * QN, sDelta + buf * QN, ent,
                                                        grp);
  };

  int row_j[2], sub[2];
  float bias2[2];
  DkvPrologue<Swizzled128Rows, TH>(p, cta, sK, sV, ngroups, load_group, warp, g, row_j, sub,
                                   bias2);
  const float sl = p.scale * kLog2e;
  float dk[D / 8][4], dv[D / 8][4], dq[kFusedDq ? D / 8 : 1][4], s[QP / 8][4], dp[QP / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
#pragma unroll
    for (int x = 0; x < 4; ++x) dk[n][x] = dv[n][x] = 0.f;
  }
#pragma unroll
  for (int n = 0; n < (kFusedDq ? D / 8 : 1); ++n) {
#pragma unroll
    for (int x = 0; x < 4; ++x) dq[n][x] = 0.f;
  }
#pragma unroll
  for (int n = 0; n < QP / 8; ++n) {
#pragma unroll
    for (int x = 0; x < 4; ++x) s[n][x] = dp[n][x] = 0.f;
  }
  const uint64_t k_desc = SwizzledTileDesc(sK), v_desc = SwizzledTileDesc(sV);

  // At each step's barrier the step's loads have landed, and every warp has finished the
  // previous step's products (and read dS^T), so that their buffers may be refilled. The step
  // goes in parts of QP queries (the whole step with the fused dq, else halves).
  ForEachStep<NC, true>(
      ngroups, e0, e1, ent, [&] { NextStepForAsyncProxy(); }, load_group,
      [&](int buf, int e, const int (&qs)[NC], const int32_t (&info)[NC], bool partial) {
    // The part's first rows of the Q and dO tiles (16-row pieces), and its S^T and dP^T.
    auto q_part = [&](int part) {
      return SwizzledTileDesc(sQ + buf * TE) + part * (QP / 16) * kDescDownRows16;
    };
    auto do_part = [&](int part) {
      return SwizzledTileDesc(sdO + buf * TE) + part * (QP / 16) * kDescDownRows16;
    };
    auto issue_scores = [&](int part) {
      WgmmaRowProducts<E, QP>(s, k_desc, q_part(part));
      WgmmaRowProducts<E, QP>(dp, v_desc, do_part(part));
    };
    PinRegisters(s);
    PinRegisters(dp);
    WgmmaFence();
    issue_scores(0);
    WgmmaCommit();
    WgmmaWait<0>();
    PinRegisters(s);
    PinRegisters(dp);
#pragma unroll
    for (int part = 0; part < QN / QP; ++part) {
      const int piece0 = part * QP / 16;
      const uint64_t q_desc = q_part(part), do_desc = do_part(part);
      int part_qs[QP / 16];
      int32_t part_info[QP / 16];
#pragma unroll
      for (int c = 0; c < QP / 16; ++c) {
        part_qs[c] = qs[piece0 + c];
        part_info[c] = info[piece0 + c];
      }
      TransposedProbabilities(p, s, dp, partial, sl, bias2, sLse2 + buf * QN + part * QP,
                              sDelta + buf * QN + part * QP, part_qs, part_info, sub, row_j, t4);
      uint32_t pa[QP / 16][4], da[QP / 16][4];
#pragma unroll
      for (int kk = 0; kk < QP / 16; ++kk) {
        PackA<E>(pa[kk], s[2 * kk], s[2 * kk + 1]);
        PackA<E>(da[kk], dp[2 * kk], dp[2 * kk + 1]);
      }
      if constexpr (kFusedDq) {
        // The warp's rows of dS^T, swizzled like the loaded tiles: columns 16 kk + 8 half.
#pragma unroll
        for (int kk = 0; kk < QP / 16; ++kk) {
#pragma unroll
          for (int x = 0; x < 4; ++x) {
            const int row = warp * 16 + g + 8 * (x & 1), piece = 2 * kk + (x >> 1);
            *reinterpret_cast<uint32_t*>(sdS + Swizzled128Rows::At(row, piece) + 2 * t4) =
                da[kk][x];
          }
        }
        FenceSharedForAsyncProxy();
        __syncthreads();
      }
      // dV += P^T dO and dK += dS^T Q over the part's queries, then dq += dS K.
      PinRegisters(dk);
      PinRegisters(dv);
      PinRegisters(pa);
      PinRegisters(da);
      WgmmaFence();
      WgmmaAddFromRegisters<E>(dv, pa, do_desc);
      WgmmaAddFromRegisters<E>(dk, da, q_desc);
      if constexpr (kFusedDq) {
        const uint64_t ds_desc = SwizzledTileDesc(sdS);
#pragma unroll
        for (int kk = 0; kk < KT / 16; ++kk) {
          Wgmma64x64x16Shared<E, true, true>(dq, ds_desc + kk * kDescDownRows16,
                                             k_desc + kk * kDescDownRows16, kk > 0);
        }
      }
      WgmmaCommit();
      // The next part's S^T and dP^T go in behind this part's products (their scores are
      // packed, their registers free), so that the tensor cores need not wait for the issue
      // after this part's wait.
      if (part + 1 < QN / QP) {
        issue_scores(part + 1);
        WgmmaCommit();
      }
      WgmmaWait<0>();
      PinRegisters(dk);
      PinRegisters(dv);
      PinRegisters(s);
      PinRegisters(dp);
      if constexpr (kFusedDq) {
        PinRegisters(dq);
        // The warp's 16 queries are the step's chunk `warp`, in DqAccumIndex order per n-tile.
        if (e + warp < e1) {
          float* chunk =
              w.dq_accum + cta.accum_bh + static_cast<int64_t>(ent[2 * (e + warp)]) * D;
#pragma unroll
          for (int n = 0; n < D / 8; ++n) ReduceAdd4(chunk + DqAccumIndex(n, lane), dq[n]);
        }
      }
    }
  });

  WriteKeyRows<E>(p, cta, dk, dv, row_j, t4);
#endif
}

template <ElementType E, KeyTiling kTiling, bool kFusedDq>
const char* WgmmaDkvImpl(const SparseAttentionParams& p, const TileWork& w, void* stream) {
  using T = typename Elem<E>::T;
  dim3 grid;
  if (const char* err = FlatGrid(KeyTiles(p, w), p, &grid)) return err;
  return Launch(WgmmaDkvKernel<E, kTiling, kFusedDq>, grid,
                WgmmaDkvConfig::SmemBytes(sizeof(T), kFusedDq), stream, p, w,
                WgmmaDkvConfig::kThreads);
}

}  // namespace detail
}  // namespace gpu
}  // namespace tf_sparse_attn

#endif  // TF_SPARSE_ATTN_CC_KERNELS_SPARSE_ATTENTION_KERNELS_SM90_CUH_
