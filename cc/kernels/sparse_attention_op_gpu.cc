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
#include "tensorflow/core/util/determinism.h"
#include "xla/stream_executor/stream.h"

namespace Eigen {
struct GpuDevice;
}  // namespace Eigen

namespace tf_sparse_attn {

using GPUDevice = Eigen::GpuDevice;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Status;
using ::tensorflow::Tensor;


namespace {

::tensorflow::se::Stream* OpStream(OpKernelContext* ctx) {
  return ctx->op_device_context()->stream();
}

void* RawStream(OpKernelContext* ctx) { return OpStream(ctx)->platform_specific_handle().stream; }

Status KernelError(const char* what, const char* message) {
  return ::tensorflow::errors::Internal(what, ": ", message);
}

// Device copies of work lists: offsets, entries and (paired key tiles) the halves' first keys,
// one int32 tensor. Keyed by everything the lists depend on. A hit compares the layout in place
// against the stored copy (memcmp, no allocation, no key built per call) and costs no transfer
// or stream synchronisation; the most recent entry is tried first, so a training step that
// alternates forward and backward layouts finds its own in one or two comparisons.
class WorkCache {
 public:
  struct Lists {
    Tensor device;  // int32 [offsets..., entries..., halves...]
    int64_t entries_at = 0;
    int64_t halves_at = -1;  // where the halves start; -1 when the tiles are not paired
    int tile_rows = gpu::kTile;
  };

  static WorkCache* Get() {
    static WorkCache* cache = new WorkCache();  // never destroyed: outlives late op calls
    return cache;
  }

  using Kind = gpu::ListKind;

  Status Lookup(OpKernelContext* ctx, const SparseAttentionParams& p, Kind kind, Lists* lists) {
    const gpu::LayoutSide side = gpu::SideOf(p, kind);
    const int32_t *off = side.offsets, *idx = side.indices, *flg = side.flags;
    const int nrows = side.rows;
    const int nnz = off[nrows];
    const intptr_t device = reinterpret_cast<intptr_t>(ctx->device());
    const Header header = {static_cast<int>(kind) * 2 + (gpu::HasMma(p) ? 1 : 0),
                           p.block_size, p.q_len, p.kv_len, p.layout_heads, p.causal ? 1 : 0,
                           p.window, p.min_distance, nrows, nnz, static_cast<int64_t>(device)};
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
    const gpu::HostWorkLists built = gpu::BuildWorkLists(p, kind);
    const std::vector<int32_t>& offsets = built.offsets;
    const std::vector<int32_t>& entries = built.entries;
    const std::vector<int32_t>& halves = built.halves;
    // The entries start at an even word, so that the kernels read each (token, info) pair as
    // one 8-byte load.
    const int64_t entries_at = (static_cast<int64_t>(offsets.size()) + 1) & ~int64_t{1};
    const int64_t total = entries_at + static_cast<int64_t>(entries.size()) + halves.size();
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
    made.lists.entries_at = entries_at;
    if (!halves.empty()) {
      made.lists.halves_at = made.lists.entries_at + static_cast<int64_t>(entries.size());
    }
    made.lists.tile_rows = built.tile_rows;
    int32_t* dst = made.lists.device.flat<int32_t>().data();
    void* stream = RawStream(ctx);
    if (const char* err = gpu::CopyToDevice(dst, offsets.data(), offsets.size() * 4, stream))
      return KernelError("copying the block layout", err);
    if (const char* err =
            gpu::CopyToDevice(dst + entries_at, entries.data(), entries.size() * 4, stream))
      return KernelError("copying the block layout", err);
    if (!halves.empty()) {
      if (const char* err = gpu::CopyToDevice(dst + made.lists.halves_at, halves.data(),
                                              halves.size() * 4, stream))
        return KernelError("copying the block layout", err);
    }
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

// How dq is summed: "deterministic" (its own kernel), "atomic" (reductions from the dk/dv
// kernel into a float32 accumulator) or, with TF_SPARSE_ATTN_GPU_DQ unset, whichever
// PreferAtomicDq picks for the layout. Op determinism
// (tf.config.experimental.enable_op_determinism) always gets the deterministic kernels.
Status UseAtomicDq(const SparseAttentionParams& p, int key_tile, bool wgmma, bool* atomic) {
  *atomic = false;
  if (!gpu::HasMma(p) || ::tsl::OpDeterminismRequired()) return ::tensorflow::OkStatus();
  const char* mode = std::getenv("TF_SPARSE_ATTN_GPU_DQ");
  if (mode == nullptr || mode[0] == '\0') {
    *atomic = gpu::PreferAtomicDq(p, key_tile, wgmma);
  } else if (std::strcmp(mode, "atomic") == 0) {
    *atomic = true;
  } else if (std::strcmp(mode, "deterministic") != 0) {
    return ::tensorflow::errors::InvalidArgument(
        "TF_SPARSE_ATTN_GPU_DQ = '", mode, "' must be 'atomic', 'deterministic' or unset");
  }
  return ::tensorflow::OkStatus();
}

// Whether the forward, dq and dk/dv kernels run on warpgroup products: tensor-core problems at
// head_dim 64, where the build and the device allow (TileWork::wgmma).
// TF_SPARSE_ATTN_GPU_WGMMA=0 keeps the sm_80 kernels.
Status UseWgmma(const SparseAttentionParams& p, bool* wgmma) {
  *wgmma = false;
  const char* mode = std::getenv("TF_SPARSE_ATTN_GPU_WGMMA");
  if (mode != nullptr && mode[0] != '\0' && std::strcmp(mode, "0") != 0 &&
      std::strcmp(mode, "1") != 0) {
    return ::tensorflow::errors::InvalidArgument("TF_SPARSE_ATTN_GPU_WGMMA = '", mode,
                                                 "' must be '0', '1' or unset");
  }
  *wgmma = (mode == nullptr || std::strcmp(mode, "0") != 0) && gpu::HasMma(p) &&
           p.head_dim == 64 && gpu::WgmmaAvailable();
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
    TF_RETURN_IF_ERROR(WorkCache::Get()->Lookup(ctx, p, gpu::ListKind::kForward, &q));
    const size_t rows = size_t(p.batch) * p.q_len * p.heads;
    TF_RETURN_IF_ERROR(MaybePoison(ctx, {{p.out, rows * p.value_dim * ElementBytes(p)},
                                         {p.lse, rows * sizeof(float)}}));
    gpu::TileWork w;
    const int32_t* base = q.device.flat<int32_t>().data();
    w.q_offsets = base;
    w.q_entries = base + q.entries_at;
    w.query_tile = q.tile_rows;
    TF_RETURN_IF_ERROR(UseWgmma(p, &w.wgmma));
    if (const char* err = gpu::LaunchForward(p, w, RawStream(ctx)))
      return KernelError("BlockSparseAttention GPU kernel", err);
    return ::tensorflow::OkStatus();
  }

  static Status Backward(OpKernelContext* ctx, const SparseAttentionParams& p) {
    TF_RETURN_IF_ERROR(CheckSupported(p));
    WorkCache::Lists q, k;
    TF_RETURN_IF_ERROR(WorkCache::Get()->Lookup(ctx, p, gpu::ListKind::kDq, &q));
    TF_RETURN_IF_ERROR(WorkCache::Get()->Lookup(ctx, p, gpu::ListKind::kKey, &k));
    const size_t qrows = size_t(p.batch) * p.q_len * p.heads;
    const size_t krows = size_t(p.batch) * p.kv_len * p.heads;
    // delta, then for the tensor-core kernels lse2 (TileWork::lse2).
    const bool with_lse2 = gpu::HasMma(p);
    Tensor delta;
    TF_RETURN_IF_ERROR(ctx->allocate_temp(
        ::tensorflow::DT_FLOAT,
        ::tensorflow::TensorShape({std::max<int64_t>(1, int64_t(qrows) * (with_lse2 ? 2 : 1))}),
        &delta));
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
    if (k.halves_at >= 0) w.k_halves = kb + k.halves_at;
    w.key_tile = k.tile_rows;
    w.delta = delta.flat<float>().data();
    if (with_lse2) w.lse2 = w.delta + qrows;
    TF_RETURN_IF_ERROR(UseWgmma(p, &w.wgmma));
    bool atomic = false;
    TF_RETURN_IF_ERROR(UseAtomicDq(p, w.key_tile, w.wgmma, &atomic));
    Tensor dq_accum;
    if (atomic) {
      TF_RETURN_IF_ERROR(ctx->allocate_temp(
          ::tensorflow::DT_FLOAT,
          ::tensorflow::TensorShape({std::max<int64_t>(1, int64_t(qrows) * p.head_dim)}),
          &dq_accum));
      w.dq_accum = dq_accum.flat<float>().data();
    }
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
