// Launchers of the CUDA kernels, callable from code that includes neither TensorFlow's nor
// CUDA's headers. The stream is a cudaStream_t passed as void*; an error comes back as a message
// (nullptr on success) so that the caller can turn it into its own status type.
//
// The kernels do not walk the block layout directly. A compute tile holds kTile query rows (or,
// for dk/dv, TileWork::key_tile key rows) and may span several layout rows when the block size
// is smaller than the tile, so the host first rewrites the layout as one work list per (layout
// head, tile): the sorted union of the 16-token chunks that the tile's layout rows attend, each
// with the layout rows (of the tile) that hold it. A kernel then gathers kChunk-row pieces of
// k/v (or q/d_out) into shared memory, four or two at a time, and applies TokenAllowed only to
// the gathered tiles whose entries say they are partial.
#ifndef TF_SPARSE_ATTN_CC_KERNELS_SPARSE_ATTENTION_GPU_H_
#define TF_SPARSE_ATTN_CC_KERNELS_SPARSE_ATTENTION_GPU_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include "cc/kernels/sparse_attention_params.h"

namespace tf_sparse_attn {
namespace gpu {

constexpr int kTile = 64;   // query rows of a dq tile; most key rows of a dk/dv tile
// Query rows of a tensor-core forward tile where the layout allows: each K/V piece gathered
// into shared memory then serves twice the rows, halving the forward's K/V traffic through L2.
// The host keeps kTile for layouts where 128-row tiles would add masked products (local
// windows, whose tiles' key spans grow by a tile height).
constexpr int kFwdTile = 128;
constexpr int kChunk = 16;  // rows gathered as one piece; block sizes are multiples of it

// One work-list entry is two int32: the first token of the chunk, and `info`:
//   bits 0..7   layout rows of the tile (relative to the tile's first one) that hold the chunk
//   bits 8..15  of those, the ones whose block carries kBlockWindowed
//   bit  16     some pair of the (tile, chunk) may be masked: apply the token rules
constexpr int kInfoWindowShift = 8;
constexpr int32_t kInfoPartial = 1 << 16;

// Whether (query i, key j) is allowed given a work-list entry's info and the layout row `sub` of
// the tile that the tile-side position belongs to: what the kernels apply to partial entries.
TSA_HOST_DEVICE bool EntryAllows(const SparseAttentionParams& p, int32_t info, int sub, int i,
                                 int j) {
  if (!((info >> sub) & 1)) return false;
  return TokenAllowed(p, i, j, (info >> (kInfoWindowShift + sub)) & 1);
}

// Key rows of a dk/dv tile: kTile, or kNarrowKeyTile where the layout's columns are attended by
// sets of queries that differ inside a 64-key tile (the summary columns of a fixed pattern:
// every later query attends keys 96..127 of a 128-stride and none attends keys 64..95), so that
// a 64-key tile would spend much of its products on masked pairs. The host picks per layout.
constexpr int kNarrowKeyTile = 32;

// How the dk/dv kernel forms its key tiles: kTile contiguous keys, kNarrowKeyTile contiguous
// keys, or kTile keys as two halves of kNarrowKeyTile that may lie anywhere (TileWork::k_halves):
// the host pairs narrow tiles attended by nearly the same queries (the summary columns of two
// neighbouring strides of a fixed pattern), so that a step serves 64 keys without the masked
// products of a contiguous 64-key tile.
enum class KeyTiling { kWide = 0, kNarrow = 1, kPaired = 2 };
inline const char* KeyTilingName(KeyTiling tiling) {
  if (tiling == KeyTiling::kPaired) return "paired";
  return tiling == KeyTiling::kNarrow ? "narrow" : "wide";
}
// Layout rows a half of a paired tile may span (block size 16): in an entry's info, the rows of
// the second half start at bit kHalfSubs.
constexpr int kHalfSubs = 2;

// Work lists in device memory.
struct TileWork {
  const int32_t* q_offsets = nullptr;  // [layout_heads * QueryTiles(p) + 1]
  const int32_t* q_entries = nullptr;  // 2 * q_offsets[last]
  const int32_t* k_offsets = nullptr;  // [layout_heads * KeyTiles(p, w) + 1]  (backward only)
  const int32_t* k_entries = nullptr;
  // Paired key tiles only: the first key of each half of each (layout head, tile), -1 for an
  // empty half; [layout_heads * KeyTiles(p, w) * 2].
  const int32_t* k_halves = nullptr;
  int query_tile = kTile;  // query rows of a forward tile that the q lists were built for
  // Run the sm_90a forward, dq and dk/dv kernels (dk/dv on 64-key tiles) rather than the sm_80
  // ones: set only for tensor-core problems at head_dim 64 where WgmmaAvailable().
  bool wgmma = false;
  int key_tile = kTile;    // key rows of a dk/dv tile that the k lists were built for
  float* delta = nullptr;  // [batch, heads, q_len] scratch of the backward pass
  // [batch, heads, q_len] scratch of the tensor-core backward pass (nullptr for the scalar
  // kernels): lse in log2 units with rows that attended nothing at +inf (Lse2), written with
  // delta for the dk/dv kernel, whose lanes would otherwise convert each of their queries' lse
  // at every step.
  float* lse2 = nullptr;
  // batch * heads * q_len * head_dim float32 scratch of the backward pass, or nullptr. When set
  // (tensor-core kernels only), the dk/dv kernel adds its dS K products into it, by vector
  // reductions or atomics, and a last pass writes dq from it: faster on dense-like layouts,
  // but the order of the sums varies from run to run, so dq may differ in its last bits.
  // Layout: per (batch, head), q_len / 16 chunks of 16 rows by head_dim (DqAccumIndex).
  float* dq_accum = nullptr;
};

// Position inside a 16-row chunk of the dq accumulator (TileWork::dq_accum) of the four values
// that `lane` holds in the m16n8 accumulator of n-tile `n_tile` (columns 8 n_tile ..): the
// chunk is stored in the order the MMA fragments hold it, so that a warp adds its results
// with one 16-byte reduction per lane, 512 contiguous bytes per warp. Value x is row
// (lane >> 2) + 8 (x >> 1), column 8 n_tile + 2 (lane & 3) + (x & 1) of the chunk.
TSA_HOST_DEVICE constexpr int DqAccumIndex(int n_tile, int lane) {
  return (n_tile * 32 + lane) * 4;
}

// The inverse, for the pass that writes dq from the accumulator: the row and column in its
// chunk of the first of the four values from `index` (a multiple of 4). The others are at
// column + 1, row + 8 and both.
struct DqAccumCell {
  int row, col;
};
TSA_HOST_DEVICE constexpr DqAccumCell DqAccumCellAt(int index) {
  const unsigned fragment = static_cast<unsigned>(index) / 4;  // n_tile * 32 + lane
  return {static_cast<int>(fragment % 32 / 4),
          static_cast<int>(fragment / 32 * 8 + fragment % 4 * 2)};
}

constexpr bool DqAccumCellsInvertIndex(int head_dim) {
  for (int n_tile = 0; n_tile < head_dim / 8; ++n_tile) {
    for (int lane = 0; lane < 32; ++lane) {
      const DqAccumCell cell = DqAccumCellAt(DqAccumIndex(n_tile, lane));
      if (cell.row != lane >> 2 || cell.col != 8 * n_tile + 2 * (lane & 3)) return false;
    }
  }
  return true;
}
static_assert(DqAccumCellsInvertIndex(128), "DqAccumCellAt must invert DqAccumIndex");

// Whether the tensor-core kernels take the problem (the scalar ones take the rest).
TSA_HOST_DEVICE bool HasMma(const SparseAttentionParams& p) {
  return p.dtype != ElementType::kFloat32 && p.head_dim == p.value_dim &&
         (p.head_dim == 32 || p.head_dim == 64 || p.head_dim == 128);
}

TSA_HOST_DEVICE int QueryTiles(const SparseAttentionParams& p) {
  return (p.q_len + kTile - 1) / kTile;
}
// Query tiles of the tensor-core forward (the scalar forward and dq use QueryTiles).
TSA_HOST_DEVICE int ForwardTiles(const SparseAttentionParams& p, const TileWork& w) {
  return (p.q_len + w.query_tile - 1) / w.query_tile;
}
TSA_HOST_DEVICE int KeyTiles(const SparseAttentionParams& p, const TileWork& w) {
  return (p.kv_len + w.key_tile - 1) / w.key_tile;
}

// The lists the kernels walk: dq's (query tiles of kTile rows), the forward's (kFwdTile or kTile
// query rows) or dk/dv's (kTile or kNarrowKeyTile key rows).
enum class ListKind { kDq = 0, kForward = 1, kKey = 2 };

// The side of the layout in p that the lists of `kind` walk: the CSR for query tiles, the CSC
// for key tiles. `rows` layout rows (over all layout heads), offsets[rows] entries.
struct LayoutSide {
  const int32_t* offsets;
  const int32_t* indices;
  const int32_t* flags;
  int rows;
};
inline LayoutSide SideOf(const SparseAttentionParams& p, ListKind kind) {
  if (kind == ListKind::kKey) {
    return {p.col_offsets, p.row_indices, p.csc_flags, p.layout_heads * p.num_kv_blocks};
  }
  return {p.row_offsets, p.col_indices, p.block_flags, p.layout_heads * p.num_q_blocks};
}

// The lists of one kind, built on the host.
struct HostWorkLists {
  int tile_rows = kTile;  // query rows (or key rows) of the tiles the lists were built for
  std::vector<int32_t> offsets;  // layout_heads * tiles + 1
  std::vector<int32_t> entries;  // two int32 per entry, as described above
  std::vector<int32_t> halves;   // KeyTiling::kPaired only: TileWork::k_halves
};

// Builds the lists of `kind` for the layout in p (host pointers). Where several tilings are
// possible, the tensor-core kernels get the one the layout favours.
HostWorkLists BuildWorkLists(const SparseAttentionParams& p, ListKind kind);
// The dk/dv lists of the tensor-core kernels for a given tiling (BuildWorkLists picks one).
HostWorkLists BuildKeyLists(const SparseAttentionParams& p, KeyTiling tiling);

// Whether the backward pass is faster with dq summed in a float32 accumulator by the dk/dv
// kernel (TileWork::dq_accum) for this problem, the key tile height its dk/dv lists were built
// for and whether the kernels run on warpgroup products (TileWork::wgmma). With the sm_80 dq
// kernel (H200, bf16, T = 16384, d = 64, backward, sm_90a dk/dv): dense causal 5.92 -> 4.80
// ms, fixed on paired key tiles 1.72 -> 1.51, but local 0.328 -> 0.349, strided 0.210 ->
// 0.270 and fixed at T = 4096 0.178 -> 0.186: the accumulator's own passes (zeroing, delta,
// conversion) and each step's extra barrier cost more than the two products they save where a
// query attends few keys, and narrow key tiles have twice the steps. With the sm_90a dq kernel
// the deterministic pair is never slower.
bool PreferAtomicDq(const SparseAttentionParams& p, int key_tile, bool wgmma);

// The tiling that key lists were built for, from their tile height and whether they carry
// halves: on the host, or as the kernels get them.
inline KeyTiling KeyTilingOf(int tile_rows, bool paired) {
  if (paired) return KeyTiling::kPaired;
  return tile_rows == kNarrowKeyTile ? KeyTiling::kNarrow : KeyTiling::kWide;
}
inline KeyTiling KeyTilingOf(const HostWorkLists& lists) {
  return KeyTilingOf(lists.tile_rows, !lists.halves.empty());
}
inline KeyTiling KeyTilingOf(const TileWork& w) {
  return KeyTilingOf(w.key_tile, w.k_halves != nullptr);
}

// Whether this build carries the sm_90a kernels (forward, dq and dk/dv on warpgroup products)
// and the current device can run them (compute capability 9.0).
bool WgmmaAvailable();

// Whether the GPU kernels take this problem; *why gets the reason when they do not.
bool Supported(const SparseAttentionParams& p, const char** why);

// out, lse from q, k, v.
const char* LaunchForward(const SparseAttentionParams& p, const TileWork& w, void* stream);
// dq, dk, dv; w.delta must hold batch * heads * q_len floats.
const char* LaunchBackward(const SparseAttentionParams& p, const TileWork& w, void* stream);
// Host-to-device copy on the stream (pageable source: it is staged before this returns).
const char* CopyToDevice(void* dst, const void* src, size_t bytes, void* stream);
// Fills bytes with 0xff (NaN in every float type), so that tests catch unwritten outputs.
const char* Poison(void* dst, size_t bytes, void* stream);

namespace internal {
// Tensor-core kernels: float16 / bfloat16, head_dim == value_dim == D. One translation unit
// per (dtype, D).
template <ElementType E, int D>
const char* MmaForward(const SparseAttentionParams& p, const TileWork& w, void* stream);
template <ElementType E, int D>
const char* MmaBackward(const SparseAttentionParams& p, const TileWork& w, void* stream);
// Scalar kernels for float32 and for head sizes without a tensor-core instantiation.
template <ElementType E>
const char* SimtForward(const SparseAttentionParams& p, const TileWork& w, void* stream);
template <ElementType E>
const char* SimtBackward(const SparseAttentionParams& p, const TileWork& w, void* stream);
// delta into w.delta.
const char* LaunchDelta(const SparseAttentionParams& p, const TileWork& w, void* stream);
// dq = scale * w.dq_accum in p's dtype (float16 or bfloat16) and layout.
const char* LaunchDqFromAccum(const SparseAttentionParams& p, const TileWork& w, void* stream);
}  // namespace internal

}  // namespace gpu
}  // namespace tf_sparse_attn

#endif  // TF_SPARSE_ATTN_CC_KERNELS_SPARSE_ATTENTION_GPU_H_
