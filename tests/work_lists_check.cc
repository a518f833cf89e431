// Expands the GPU kernels' work lists (cc/kernels/sparse_attention_work_lists.cc) back into the
// (query, key) pairs the kernels compute, and compares them with the pairs the block layout
// allows by TokenAllowed: every allowed pair exactly once, nothing else, and no pair in an entry
// that claims to need no masking unless it is allowed. Host code only, so that the lists are
// tested where no GPU is. Built and run by tests/test_work_lists.py:
//   work_lists_check LAYOUT.bin CAUSAL HEAD_DIM
// where LAYOUT.bin is a layout file as bench/kernel_timing/layout_file.h reads it. Prints one
// line per list kind: its tiling and entry count; exits 1 on the first mismatch.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "bench/kernel_timing/layout_file.h"
#include "cc/kernels/sparse_attention_gpu.h"

using namespace tf_sparse_attn;       // NOLINT
using namespace tf_sparse_attn::gpu;  // NOLINT

namespace {

int Fail(const char* what, int lh, int i, int j) {
  std::printf("MISMATCH %s: layout head %d query %d key %d\n", what, lh, i, j);
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) return 2;
  const std::vector<int32_t> ints = ReadLayoutFile(argv[1]);
  SparseAttentionParams p;
  SetLayout(ints, &p);
  const int bs = p.block_size, T = p.q_len;
  p.dtype = ElementType::kBFloat16;
  p.batch = 1;
  p.heads = 1;
  p.head_dim = p.value_dim = std::atoi(argv[3]);
  p.causal = std::atoi(argv[2]) != 0;

  const int nb = T / bs;
  const size_t plane = static_cast<size_t>(T) * T;
  // expected[lh][i * T + j]: what the layout allows.
  std::vector<char> expected(p.layout_heads * plane, 0);
  for (int lh = 0; lh < p.layout_heads; ++lh) {
    for (int r = 0; r < nb; ++r) {
      const int row = lh * nb + r;
      for (int e = p.row_offsets[row]; e < p.row_offsets[row + 1]; ++e) {
        const int c = p.col_indices[e];
        for (int i = r * bs; i < r * bs + bs; ++i) {
          for (int j = c * bs; j < c * bs + bs; ++j) {
            expected[lh * plane + static_cast<size_t>(i) * T + j] =
                TokenAllowed(p, i, j, p.block_flags[e]);
          }
        }
      }
    }
  }

  // The lists the op would build, then every key tiling forced.
  struct Variant {
    const char* name;
    HostWorkLists lists;
    bool transposed;
  };
  const Variant variants[] = {
      {"dq", BuildWorkLists(p, ListKind::kDq), false},
      {"forward", BuildWorkLists(p, ListKind::kForward), false},
      {"key", BuildWorkLists(p, ListKind::kKey), true},
      {"key_wide", BuildKeyLists(p, KeyTiling::kWide), true},
      {"key_narrow", BuildKeyLists(p, KeyTiling::kNarrow), true},
      {"key_paired", BuildKeyLists(p, KeyTiling::kPaired), true},
  };
  for (const Variant& variant : variants) {
    const char* name = variant.name;
    const bool transposed = variant.transposed;
    const HostWorkLists& lists = variant.lists;
    const int rows = lists.tile_rows;
    const int tiles = (T + rows - 1) / rows;
    if (lists.offsets.size() != static_cast<size_t>(p.layout_heads) * tiles + 1) {
      return Fail("offsets length", -1, -1, -1);
    }
    std::vector<char> seen(p.layout_heads * plane, 0);
    for (int lh = 0; lh < p.layout_heads; ++lh) {
      for (int t = 0; t < tiles; ++t) {
        // The tile-side positions of the tile and their layout rows as the info counts them.
        std::vector<std::pair<int, int>> positions;
        if (transposed && KeyTilingOf(lists) == KeyTiling::kPaired) {
          for (int h = 0; h < 2; ++h) {
            const int first = lists.halves[2 * (static_cast<size_t>(lh) * tiles + t) + h];
            if (first < 0) continue;
            for (int x = first; x < std::min(first + kNarrowKeyTile, T); ++x) {
              positions.emplace_back(x, kHalfSubs * h + x / bs - first / bs);
            }
          }
        } else {
          for (int x = t * rows; x < std::min(t * rows + rows, T); ++x) {
            positions.emplace_back(x, x / bs - (t * rows) / bs);
          }
        }
        const int e0 = lists.offsets[lh * tiles + t], e1 = lists.offsets[lh * tiles + t + 1];
        for (int e = e0; e < e1; ++e) {
          const int c0 = lists.entries[2 * e];
          const int32_t info = lists.entries[2 * e + 1];
          if (e > e0 && lists.entries[2 * e - 2] >= c0) return Fail("unsorted list", lh, -1, c0);
          for (const auto& pos : positions) {
            for (int y = c0; y < c0 + kChunk && y < T; ++y) {
              const int i = transposed ? y : pos.first, j = transposed ? pos.first : y;
              const size_t at = lh * plane + static_cast<size_t>(i) * T + j;
              const bool allowed = expected[at] != 0;
              if (!(info & kInfoPartial)) {
                if (!allowed) return Fail(name, lh, i, j);
                seen[at]++;
              } else if (EntryAllows(p, info, pos.second, i, j)) {
                if (!allowed) return Fail(name, lh, i, j);
                seen[at]++;
              }
            }
          }
        }
      }
    }
    for (size_t at = 0; at < seen.size(); ++at) {
      if (seen[at] != expected[at]) {
        const int lh = static_cast<int>(at / plane), i = static_cast<int>(at % plane / T);
        return Fail(seen[at] ? "computed twice" : "missing", lh, i, static_cast<int>(at % T));
      }
    }
    std::printf("%s tile_rows=%d tiling=%s entries=%zu\n", name, rows,
                KeyTilingName(KeyTilingOf(lists)), lists.entries.size() / 2);
  }
  std::printf("OK\n");
  return 0;
}
