// The kernels' work lists built from a block layout on the host (see sparse_attention_gpu.h).
// Framework-free: the op's device cache and the kernel timing tool in bench/ both use it.
#include <algorithm>
#include <climits>
#include <utility>
#include <vector>

#include "cc/kernels/sparse_attention_gpu.h"

namespace tf_sparse_attn {
namespace gpu {

namespace {

// The lists of `kind` for tiles of `tile_rows` rows along the query side (or along the key side
// for ListKind::kKey, walking the CSC); a tile spans at most 8 layout rows. Chunks that no pair
// of the tile may attend (after causal / window pruning) are left out.
void BuildTileWork(const SparseAttentionParams& p, ListKind kind, int tile_rows,
                   std::vector<int32_t>* offsets, std::vector<int32_t>* entries) {
  const bool transposed = kind == ListKind::kKey;
  const LayoutSide side = SideOf(p, kind);
  const int32_t *offsets_in = side.offsets, *indices_in = side.indices, *flags_in = side.flags;
  const int bs = p.block_size;
  const int row_len = transposed ? p.kv_len : p.q_len;  // tokens along the tile side
  const int nrows = transposed ? p.num_kv_blocks : p.num_q_blocks;
  const int tiles = (row_len + tile_rows - 1) / tile_rows;
  offsets->assign(static_cast<size_t>(p.layout_heads) * tiles + 1, 0);
  entries->clear();
  std::vector<std::pair<int, int32_t>> items;
  for (int lh = 0; lh < p.layout_heads; ++lh) {
    for (int t = 0; t < tiles; ++t) {
      const int r0 = t * tile_rows, r1 = std::min(r0 + tile_rows, row_len) - 1;
      const int b0 = r0 / bs, b1 = r1 / bs;
      items.clear();
      for (int blk = b0; blk <= b1; ++blk) {
        const int sub = blk - b0;
        // Tile-side tokens of this layout row.
        const int a0 = std::max(r0, blk * bs), a1 = std::min(r1, blk * bs + bs - 1);
        const int row = lh * nrows + blk;
        for (int e = offsets_in[row]; e < offsets_in[row + 1]; ++e) {
          const bool windowed = (flags_in[e] & kBlockWindowed) != 0;
          for (int u = 0; u < bs / kChunk; ++u) {
            const int c0 = indices_in[e] * bs + u * kChunk, c1 = c0 + kChunk - 1;
            const int qlo = transposed ? c0 : a0, qhi = transposed ? c1 : a1;
            const int klo = transposed ? a0 : c0, khi = transposed ? a1 : c1;
            if (p.causal && klo > qhi) continue;  // every key after every query
            bool partial = p.causal && khi > qlo;
            if (windowed) {
              const int dmin = std::max(0, std::max(klo - qhi, qlo - khi));
              const int dmax = std::max(qhi - klo, khi - qlo);
              if (p.window > 0 && dmin >= p.window) continue;
              if (dmax < p.min_distance) continue;
              if ((p.window > 0 && dmax >= p.window) || dmin < p.min_distance) partial = true;
            }
            int32_t info = 1 << sub;
            if (windowed) info |= 1 << (kInfoWindowShift + sub);
            if (partial) info |= kInfoPartial;
            items.emplace_back(c0, info);
          }
        }
      }
      std::sort(items.begin(), items.end());
      const int32_t full = (1 << (b1 - b0 + 1)) - 1;
      for (size_t k = 0; k < items.size();) {
        const int c0 = items[k].first;
        int32_t info = 0;
        for (; k < items.size() && items[k].first == c0; ++k) info |= items[k].second;
        if ((info & full) != full) info |= kInfoPartial;  // some row of the tile skips it
        entries->push_back(c0);
        entries->push_back(info);
      }
      (*offsets)[static_cast<size_t>(lh) * tiles + t + 1] =
          static_cast<int32_t>(entries->size() / 2);
    }
  }
}

// Walks the union of two sorted entry lists, [a, a1) and [b, b1) of `ent`, calling
// f(chunk, ia, ib) once per chunk with its entry index in each list, -1 where a list lacks it.
template <typename F>
void ForEachUnionChunk(const int32_t* ent, int a, int a1, int b, int b1, F&& f) {
  while (a < a1 || b < b1) {
    const int ca = a < a1 ? ent[2 * a] : INT32_MAX, cb = b < b1 ? ent[2 * b] : INT32_MAX;
    f(std::min(ca, cb), ca <= cb ? a++ : -1, cb <= ca ? b++ : -1);
  }
}

// Pairs the narrow tiles of `narrow` (kNarrowKeyTile keys each) into tiles of kTile keys: per
// layout head, the tiles in order of falling entry count each take, among the next few still
// unpaired, the one whose union with it is smallest (for the fixed pattern's summary columns,
// the neighbouring stride's). A pair's entries are the union of both lists, with the layout-row
// bits of the second half moved up by kHalfSubs. Pairs come heaviest first, so that the
// kernels' tile-major grid starts them first.
HostWorkLists PairNarrowTiles(const SparseAttentionParams& p, const HostWorkLists& narrow) {
  constexpr int kCandidates = 8;
  const int ntiles = (p.kv_len + kNarrowKeyTile - 1) / kNarrowKeyTile;
  const int npairs = (ntiles + 1) / 2;
  const int32_t* ent = narrow.entries.data();
  HostWorkLists out;
  out.tile_rows = kTile;
  out.offsets.assign(static_cast<size_t>(p.layout_heads) * npairs + 1, 0);
  out.halves.reserve(static_cast<size_t>(p.layout_heads) * npairs * 2);
  std::vector<int> order(ntiles);
  std::vector<char> used(ntiles);
  for (int lh = 0; lh < p.layout_heads; ++lh) {
    const int32_t* off = narrow.offsets.data() + static_cast<size_t>(lh) * ntiles;
    auto count = [&](int t) { return off[t + 1] - off[t]; };
    for (int t = 0; t < ntiles; ++t) order[t] = t;
    std::stable_sort(order.begin(), order.end(),
                     [&](int a, int b) { return count(a) > count(b); });
    std::fill(used.begin(), used.end(), 0);
    int pair = 0;
    for (int k = 0; k < ntiles; ++k) {
      const int a = order[k];
      if (used[a]) continue;
      used[a] = 1;
      int best = -1, best_size = INT32_MAX;
      for (int m = k + 1, seen = 0; m < ntiles && seen < kCandidates; ++m) {
        const int c = order[m];
        if (used[c]) continue;
        ++seen;
        int size = 0;
        ForEachUnionChunk(ent, off[a], off[a + 1], off[c], off[c + 1],
                          [&](int, int, int) { ++size; });
        if (size < best_size) best = c, best_size = size;
      }
      if (best >= 0) used[best] = 1;
      const int half_tile[2] = {a, best};
      // Layout rows of each half (relative to its first); an empty half has none, so that every
      // entry is partial and its rows stay masked.
      int32_t full = 0;
      for (int h = 0; h < 2; ++h) {
        const int t = half_tile[h];
        out.halves.push_back(t < 0 ? -1 : t * kNarrowKeyTile);
        const int first = t < 0 ? 0 : t * kNarrowKeyTile;
        const int last = t < 0 ? 0 : std::min(first + kNarrowKeyTile, p.kv_len) - 1;
        const int rows = t < 0 ? 1 : last / p.block_size - first / p.block_size + 1;
        full |= ((1 << rows) - 1) << (kHalfSubs * h);
      }
      // Merge the two sorted lists, moving the second half's row and window bits.
      const int b0 = best >= 0 ? off[best] : 0, b1 = best >= 0 ? off[best + 1] : 0;
      ForEachUnionChunk(ent, off[a], off[a + 1], b0, b1, [&](int chunk, int ia, int ib) {
        int32_t info = ia >= 0 ? ent[2 * ia + 1] : 0;
        if (ib >= 0) {
          const int32_t other = ent[2 * ib + 1];
          info |= (other & kInfoPartial) | ((other & 0xff) << kHalfSubs) |
                  ((other & (0xff << kInfoWindowShift)) << kHalfSubs);
        }
        if ((info & full) != full) info |= kInfoPartial;
        out.entries.push_back(chunk);
        out.entries.push_back(info);
      });
      out.offsets[static_cast<size_t>(lh) * npairs + pair + 1] =
          static_cast<int32_t>(out.entries.size() / 2);
      ++pair;
    }
  }
  return out;
}

}  // namespace

HostWorkLists BuildKeyLists(const SparseAttentionParams& p, KeyTiling tiling) {
  if (tiling == KeyTiling::kPaired) {
    return PairNarrowTiles(p, BuildKeyLists(p, KeyTiling::kNarrow));
  }
  HostWorkLists lists;
  lists.tile_rows = tiling == KeyTiling::kNarrow ? kNarrowKeyTile : kTile;
  BuildTileWork(p, ListKind::kKey, lists.tile_rows, &lists.offsets, &lists.entries);
  return lists;
}

HostWorkLists BuildWorkLists(const SparseAttentionParams& p, ListKind kind) {
  if (kind == ListKind::kKey && HasMma(p)) {
    // Products are entries x tile rows. A narrow tile reuses each query chunk for half the
    // keys, so it has to save a fifth of the products to win; paired narrow tiles run like
    // wide ones.
    HostWorkLists wide = BuildKeyLists(p, KeyTiling::kWide);
    HostWorkLists narrow = BuildKeyLists(p, KeyTiling::kNarrow);
    const double wide_cost = static_cast<double>(wide.entries.size()) * kTile;
    const double narrow_products = static_cast<double>(narrow.entries.size()) * kNarrowKeyTile;
    if (narrow_products >= wide_cost) return wide;  // dense-like: nothing to skip
    HostWorkLists paired = PairNarrowTiles(p, narrow);
    const double paired_cost = static_cast<double>(paired.entries.size()) * kTile;
    const double narrow_cost = narrow_products / 0.8;
    if (wide_cost <= paired_cost && wide_cost <= narrow_cost) return wide;
    return paired_cost <= narrow_cost ? paired : narrow;
  }
  HostWorkLists lists;
  BuildTileWork(p, kind, kTile, &lists.offsets, &lists.entries);
  if (kind != ListKind::kForward || !HasMma(p)) return lists;
  // A taller forward tile reuses each gathered key chunk for twice the queries, worth up to a
  // tenth more products.
  HostWorkLists tall;
  tall.tile_rows = kFwdTile;
  BuildTileWork(p, kind, kFwdTile, &tall.offsets, &tall.entries);
  if (static_cast<double>(tall.entries.size()) * kFwdTile <=
      1.1 * static_cast<double>(lists.entries.size()) * kTile) {
    return tall;
  }
  return lists;
}

bool PreferAtomicDq(const SparseAttentionParams& p, int key_tile, bool wgmma) {
  if (!HasMma(p) || key_tile != kTile || p.q_len == 0) return false;
  // With the sm_90a dq kernel the deterministic pair is as fast or faster (H200, backward,
  // d = 64): dense causal at T = 16384 4.83 ms against 4.81, fixed 1.44 against 1.47, dense
  // at T = 4096 0.397 against 0.410.
  if (wgmma) return false;
  // Keys a query attends on average, counting whole blocks. Measured against the deterministic
  // pair (H200, backward, with the sm_80 dq kernel; d = 64 with the sm_90a dk/dv kernels): at
  // d = 64 dense causal at T = 16384 (8224 keys) gained 19%, fixed at T = 16384 (2112) 12%,
  // dense at T = 4096 (2080) 9%; fixed at T = 4096 (576) lost 4%, local (191) 6%, strided (80)
  // 29%; at d = 128 (sm_80 kernels) dense gained 14%, fixed 10%.
  constexpr double kMinKeysPerQuery = 1024;
  const double keys = static_cast<double>(p.nnz) * p.block_size /
                      (static_cast<double>(p.layout_heads) * p.num_q_blocks);
  return keys >= kMinKeysPerQuery;
}

}  // namespace gpu
}  // namespace tf_sparse_attn
