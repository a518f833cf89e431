// GPU registration of BlockSparseAttention / BlockSparseAttentionGrad: the runner that turns the
// host-side block layout into the kernels' per-tile work lists (cached in device memory, since a
// model reuses a handful of layouts for every step), and the launch on the op's stream.
#if GOOGLE_CUDA

#include <algorithm>
#include <array>
#include <cstdlib>
#include <initializer_list>
#include <cstring>
#include <list>
#include <mutex>
#include <utility>
#include <vector>

#include "cc/kernels/sparse_attention_gpu.h"
#include "cc/kernels/sparse_attention_op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"
#include "xla/stream_executor/stream.h"

namespace Eigen {
struct GpuDevice;
}  // namespace Eigen

namespace tf_sparse_attn {

using GPUDevice = Eigen::GpuDevice;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Status;
using ::tensorflow::Tensor;

namespace gpu {

void BuildTileWork(const SparseAttentionParams& p, bool transposed, int tile_rows,
                   const int32_t* offsets_in, const int32_t* indices_in, const int32_t* flags_in,
                   std::vector<int32_t>* offsets, std::vector<int32_t>* entries) {
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

}  // namespace gpu

namespace {

::tensorflow::se::Stream* OpStream(OpKernelContext* ctx) {
  return ctx->op_device_context()->stream();
}

void* RawStream(OpKernelContext* ctx) { return OpStream(ctx)->platform_specific_handle().stream; }

Status KernelError(const char* what, const char* message) {
  return ::tensorflow::errors::Internal(what, ": ", message);
}

// Device copies of work lists: offsets followed by entries, one int32 tensor. Keyed by
// everything the lists depend on. A hit compares the layout in place against the stored copy
// (memcmp, no allocation, no key built per call) and costs no transfer or stream
// synchronisation; the most recent entry is tried first, so a training step that alternates
// forward and backward layouts finds its own in one or two comparisons.
class WorkCache {
 public:
  struct Lists {
    Tensor device;  // int32 [offsets..., entries...]
    int64_t entries_at = 0;
    int tile_rows = gpu::kTile;
  };

  static WorkCache* Get() {
    static WorkCache* cache = new WorkCache();  // never destroyed: outlives late op calls
    return cache;
  }

  // Which lists: those of dq (query tiles of kTile rows), of the forward (query tiles of
  // kFwdTile or kTile rows) or of dk/dv (key tiles of kTile or kNarrowKeyTile rows). Where two
  // tile heights are possible, the tensor-core kernels get the one the layout favours.
  enum class Kind { kDq = 0, kForward = 1, kKey = 2 };

  Status Lookup(OpKernelContext* ctx, const SparseAttentionParams& p, Kind kind, Lists* lists) {
    const bool transposed = kind == Kind::kKey;
    const bool choose = kind != Kind::kDq && gpu::HasMma(p);
    const int32_t* off = transposed ? p.col_offsets : p.row_offsets;
    const int32_t* idx = transposed ? p.row_indices : p.col_indices;
    const int32_t* flg = transposed ? p.csc_flags : p.block_flags;
    const int nrows = p.layout_heads * (transposed ? p.num_kv_blocks : p.num_q_blocks);
    const int nnz = off[nrows];
    const intptr_t device = reinterpret_cast<intptr_t>(ctx->device());
    const Header header = {static_cast<int>(kind) * 2 + (choose ? 1 : 0), p.block_size, p.q_len,
                           p.kv_len, p.layout_heads, p.causal ? 1 : 0, p.window,
                           p.min_distance, nrows, nnz, static_cast<int64_t>(device)};
    const size_t off_bytes = sizeof(int32_t) * (static_cast<size_t>(nrows) + 1);
    const size_t nnz_bytes = sizeof(int32_t) * static_cast<size_t>(nnz);
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = items_.begin(); it != items_.end(); ++it) {
        const Item& item = *it;
        if (item.header != header) continue;
        const int32_t* stored = item.layout.data();
        if (!Same(stored, off, off_bytes) || !Same(stored + nrows + 1, idx, nnz_bytes) ||
            !Same(stored + nrows + 1 + nnz, flg, nnz_bytes)) {
          continue;
        }
        *lists = item.lists;
        if (it != items_.begin()) items_.splice(items_.begin(), items_, it);
        return ::tensorflow::OkStatus();
      }
    }
    std::vector<int32_t> offsets, entries;
    int tile_rows = gpu::kTile;
    gpu::BuildTileWork(p, transposed, tile_rows, off, idx, flg, &offsets, &entries);
    if (choose) {
      // Products are chunks x tile rows. A taller forward tile reuses each gathered key chunk
      // for twice the queries, worth up to a tenth more products; a narrower key tile reuses
      // each query chunk for half the keys, so it has to save a fifth of them.
      const int other = transposed ? gpu::kNarrowKeyTile : gpu::kFwdTile;
      const double limit = transposed ? 0.8 : 1.1;
      std::vector<int32_t> other_offsets, other_entries;
      gpu::BuildTileWork(p, transposed, other, off, idx, flg, &other_offsets, &other_entries);
      const double base = static_cast<double>(entries.size()) * gpu::kTile;
      if (static_cast<double>(other_entries.size()) * other <= limit * base) {
        offsets.swap(other_offsets);
        entries.swap(other_entries);
        tile_rows = other;
      }
    }
    const int64_t total = static_cast<int64_t>(offsets.size()) + entries.size();
    if (total >= (int64_t{1} << 31)) {
      return ::tensorflow::errors::InvalidArgument("block layout too large for the GPU kernels");
    }
    Item made;
    made.header = header;
    made.layout.reserve(static_cast<size_t>(nrows) + 1 + 2 * static_cast<size_t>(nnz));
    made.layout.insert(made.layout.end(), off, off + nrows + 1);
    made.layout.insert(made.layout.end(), idx, idx + nnz);
    made.layout.insert(made.layout.end(), flg, flg + nnz);
    TF_RETURN_IF_ERROR(ctx->allocate_temp(::tensorflow::DT_INT32,
                                          ::tensorflow::TensorShape({total}), &made.lists.device));
    made.lists.entries_at = static_cast<int64_t>(offsets.size());
    made.lists.tile_rows = tile_rows;
    int32_t* dst = made.lists.device.flat<int32_t>().data();
    void* stream = RawStream(ctx);
    if (const char* err = gpu::CopyToDevice(dst, offsets.data(), offsets.size() * 4, stream))
      return KernelError("copying the block layout", err);
    if (const char* err =
            gpu::CopyToDevice(dst + offsets.size(), entries.data(), entries.size() * 4, stream))
      return KernelError("copying the block layout", err);
    *lists = made.lists;
    std::lock_guard<std::mutex> lock(mu_);
    items_.push_front(std::move(made));
    while (items_.size() > kMaxItems) items_.pop_back();
    return ::tensorflow::OkStatus();
  }

 private:
  using Header = std::array<int64_t, 11>;
  static bool Same(const int32_t* a, const int32_t* b, size_t bytes) {
    return bytes == 0 || std::memcmp(a, b, bytes) == 0;
  }
  struct Item {
    Header header;
    std::vector<int32_t> layout;  // offsets, indices, flags as given
    Lists lists;
  };
  static constexpr size_t kMaxItems = 32;
  std::mutex mu_;
  std::list<Item> items_;
};

size_t ElementBytes(const SparseAttentionParams& p) {
  return p.dtype == ElementType::kFloat32 ? 4 : 2;
}

// TF_SPARSE_ATTN_GPU_POISON=1 fills the outputs with NaN before the kernels run, so that a test
// sees any element that no kernel wrote.
Status MaybePoison(OpKernelContext* ctx, std::initializer_list<std::pair<void*, size_t>> outs) {
  static const bool enabled = [] {
    const char* v = std::getenv("TF_SPARSE_ATTN_GPU_POISON");
    return v != nullptr && v[0] != '\0' && v[0] != '0';
  }();
  if (!enabled) return ::tensorflow::OkStatus();
  for (const auto& out : outs) {
    if (const char* err = gpu::Poison(out.first, out.second, RawStream(ctx)))
      return KernelError("poisoning the outputs", err);
  }
  return ::tensorflow::OkStatus();
}

Status CheckSupported(const SparseAttentionParams& p) {
  const char* why = nullptr;
  if (!gpu::Supported(p, &why)) return ::tensorflow::errors::InvalidArgument(why);
  return ::tensorflow::OkStatus();
}

}  // namespace

template <>
struct SparseAttentionRunner<GPUDevice> {
  static Status Forward(OpKernelContext* ctx, const SparseAttentionParams& p) {
    TF_RETURN_IF_ERROR(CheckSupported(p));
    WorkCache::Lists q;
    TF_RETURN_IF_ERROR(WorkCache::Get()->Lookup(ctx, p, WorkCache::Kind::kForward, &q));
    const size_t rows = size_t(p.batch) * p.q_len * p.heads;
    TF_RETURN_IF_ERROR(MaybePoison(ctx, {{p.out, rows * p.value_dim * ElementBytes(p)},
                                         {p.lse, rows * sizeof(float)}}));
    gpu::TileWork w;
    const int32_t* base = q.device.flat<int32_t>().data();
    w.q_offsets = base;
    w.q_entries = base + q.entries_at;
    w.query_tile = q.tile_rows;
    if (const char* err = gpu::LaunchForward(p, w, RawStream(ctx)))
      return KernelError("BlockSparseAttention GPU kernel", err);
    return ::tensorflow::OkStatus();
  }

  static Status Backward(OpKernelContext* ctx, const SparseAttentionParams& p) {
    TF_RETURN_IF_ERROR(CheckSupported(p));
    WorkCache::Lists q, k;
    TF_RETURN_IF_ERROR(WorkCache::Get()->Lookup(ctx, p, WorkCache::Kind::kDq, &q));
    TF_RETURN_IF_ERROR(WorkCache::Get()->Lookup(ctx, p, WorkCache::Kind::kKey, &k));
    Tensor delta;
    TF_RETURN_IF_ERROR(ctx->allocate_temp(
        ::tensorflow::DT_FLOAT,
        ::tensorflow::TensorShape({std::max<int64_t>(1, int64_t{p.batch} * p.heads * p.q_len)}),
        &delta));
    const size_t qrows = size_t(p.batch) * p.q_len * p.heads;
    const size_t krows = size_t(p.batch) * p.kv_len * p.heads;
    TF_RETURN_IF_ERROR(MaybePoison(ctx, {{p.dq, qrows * p.head_dim * ElementBytes(p)},
                                         {p.dk, krows * p.head_dim * ElementBytes(p)},
                                         {p.dv, krows * p.value_dim * ElementBytes(p)}}));
    gpu::TileWork w;
    const int32_t* qb = q.device.flat<int32_t>().data();
    const int32_t* kb = k.device.flat<int32_t>().data();
    w.q_offsets = qb;
    w.q_entries = qb + q.entries_at;
    w.k_offsets = kb;
    w.k_entries = kb + k.entries_at;
    w.key_tile = k.tile_rows;
    w.delta = delta.flat<float>().data();
    if (const char* err = gpu::LaunchBackward(p, w, RawStream(ctx)))
      return KernelError("BlockSparseAttentionGrad GPU kernel", err);
    return ::tensorflow::OkStatus();
  }
};

#define TSA_REGISTER_GPU(T)                                                        \
  REGISTER_KERNEL_BUILDER(Name("BlockSparseAttention")                             \
                              .Device(::tensorflow::DEVICE_GPU)                    \
                              .TypeConstraint<T>("T")                              \
                              .HostMemory("row_offsets")                           \
                              .HostMemory("col_indices")                           \
                              .HostMemory("block_flags"),                          \
                          BlockSparseAttentionOp<GPUDevice, T>);                   \
  REGISTER_KERNEL_BUILDER(Name("BlockSparseAttentionGrad")                         \
                              .Device(::tensorflow::DEVICE_GPU)                    \
                              .TypeConstraint<T>("T")                              \
                              .HostMemory("row_offsets")                           \
                              .HostMemory("col_indices")                           \
                              .HostMemory("block_flags")                           \
                              .HostMemory("col_offsets")                           \
                              .HostMemory("row_indices")                           \
                              .HostMemory("csc_flags"),                            \
                          BlockSparseAttentionGradOp<GPUDevice, T>);

TSA_REGISTER_GPU(float);
TSA_REGISTER_GPU(Eigen::half);
TSA_REGISTER_GPU(Eigen::bfloat16);
#undef TSA_REGISTER_GPU

}  // namespace tf_sparse_attn

#endif  // GOOGLE_CUDA
