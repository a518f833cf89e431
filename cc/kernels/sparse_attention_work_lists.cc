// The kernels' work lists built from a block layout on the host (see sparse_attention_gpu.h).
// Framework-free: the op's device cache and the kernel timing tool in bench/ both use it.
#include <algorithm>
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

}  // namespace

int BuildWorkLists(const SparseAttentionParams& p, ListKind kind, std::vector<int32_t>* offsets,
                   std::vector<int32_t>* entries) {
  const bool transposed = kind == ListKind::kKey;
  BuildTileWork(p, kind, kTile, offsets, entries);
  if (kind == ListKind::kDq || !HasMma(p)) return kTile;
  // Products are chunks x tile rows. A taller forward tile reuses each gathered key chunk for
  // twice the queries, worth up to a tenth more products; a narrower key tile reuses each query
  // chunk for half the keys, so it has to save a fifth of them.
  const int other = transposed ? kNarrowKeyTile : kFwdTile;
  const double limit = transposed ? 0.8 : 1.1;
  std::vector<int32_t> other_offsets, other_entries;
  BuildTileWork(p, kind, other, &other_offsets, &other_entries);
  const double base = static_cast<double>(entries->size()) * kTile;
  if (static_cast<double>(other_entries.size()) * other > limit * base) return kTile;
  offsets->swap(other_offsets);
  entries->swap(other_entries);
  return other;
}

bool PreferAtomicDq(const SparseAttentionParams& p, int key_tile) {
  if (!HasMma(p) || key_tile != kTile || p.q_len == 0) return false;
  // Keys a query attends on average, counting whole blocks. Dense causal at T = 4096 (2080)
  // gained 10%; the sparse layouts measured (80 to 576 keys) all lost.
  constexpr double kMinKeysPerQuery = 2048;
  const double keys = static_cast<double>(p.nnz) * p.block_size /
                      (static_cast<double>(p.layout_heads) * p.num_q_blocks);
  return keys >= kMinKeysPerQuery;
}

}  // namespace gpu
}  // namespace tf_sparse_attn
