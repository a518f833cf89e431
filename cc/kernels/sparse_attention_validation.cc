#include "cc/kernels/sparse_attention_validation.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/framework/types.h"
#include "tensorflow/core/platform/errors.h"

namespace tf_sparse_attn {

using ::tensorflow::DataType;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Status;
using ::tensorflow::Tensor;
using ::tensorflow::errors::InvalidArgument;

namespace {

// Kernels index positions, dimensions and within-batch offsets with 32-bit ints.
constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

enum ForwardInput { kQ = 0, kK, kV, kKeyBias, kRowOffsets, kColIndices, kBlockFlags };
enum BackwardInput {
  kOut = 7, kLse, kDOut, kDLse, kColOffsets, kRowIndices, kCscFlags
};

Status ElementTypeOf(DataType dtype, ElementType* out) {
  switch (dtype) {
    case ::tensorflow::DT_FLOAT: *out = ElementType::kFloat32; return ::tensorflow::OkStatus();
    case ::tensorflow::DT_HALF: *out = ElementType::kFloat16; return ::tensorflow::OkStatus();
    case ::tensorflow::DT_BFLOAT16: *out = ElementType::kBFloat16; return ::tensorflow::OkStatus();
    default:
      return InvalidArgument("q has unsupported dtype ", ::tensorflow::DataTypeString(dtype),
                             "; expected float32, float16 or bfloat16");
  }
}

Status CheckRank(const Tensor& t, const char* name, int rank, const char* layout) {
  if (t.dims() != rank) {
    return InvalidArgument(name, " must have rank ", rank, " (", layout, "), got shape ",
                           t.shape().DebugString());
  }
  return ::tensorflow::OkStatus();
}

Status CheckDim(const Tensor& t, const char* name, int dim, int64_t expected,
                const char* what) {
  if (t.dim_size(dim) != expected) {
    return InvalidArgument(name, " dimension ", dim, " (", what, ") is ", t.dim_size(dim),
                           " but must be ", expected, " to match q/k/v; ", name, " has shape ",
                           t.shape().DebugString());
  }
  return ::tensorflow::OkStatus();
}

Status CheckInt32(int64_t value, const char* what) {
  if (value > kInt32Max) {
    return InvalidArgument(what, " = ", value, " does not fit in a 32-bit integer (max ",
                           kInt32Max, "), which the kernels use for it");
  }
  return ::tensorflow::OkStatus();
}

// Like CheckInt32 on a * b * c, without overflowing int64 on the way: a tensor with no
// elements may have dimensions whose product exceeds any integer type.
Status CheckProductInt32(int64_t a, int64_t b, int64_t c, const char* what) {
  int64_t product = 1;
  for (int64_t factor : {a, b, c}) {
    if (factor > kInt32Max || product * factor > kInt32Max) {
      return InvalidArgument(what, " = ", a, " * ", b, " * ", c,
                             " does not fit in a 32-bit integer (max ", kInt32Max,
                             "), which the kernels use for offsets inside one batch item");
    }
    product *= factor;
  }
  return ::tensorflow::OkStatus();
}

// Checks one compressed layout (CSR or CSC): `offsets` holds groups * per_head + 1 entries, or
// per_head + 1 when the layout is shared by all heads; `indices` entries lie in [0, extent) and
// strictly increase inside each group; `flags` has one entry per index and uses bit 0 only.
// All sizes are checked before any entry is read.
Status CheckCompressedLayout(const Tensor& offsets_t, const Tensor& indices_t,
                             const Tensor& flags_t, const char* offsets_name,
                             const char* indices_name, const char* flags_name,
                             const char* group_kind, const char* index_kind, int64_t per_head,
                             int64_t extent, int64_t heads, int* layout_heads, int* nnz) {
  TF_RETURN_IF_ERROR(CheckRank(offsets_t, offsets_name, 1, "a vector"));
  TF_RETURN_IF_ERROR(CheckRank(indices_t, indices_name, 1, "a vector"));
  TF_RETURN_IF_ERROR(CheckRank(flags_t, flags_name, 1, "a vector"));

  const int64_t num_offsets = offsets_t.dim_size(0);
  int64_t lh = 0;
  if (num_offsets == per_head + 1) {
    lh = 1;
  } else if (num_offsets == heads * per_head + 1) {
    lh = heads;
  } else {
    return InvalidArgument(
        offsets_name, " has ", num_offsets, " entries but must have layout_heads * ", per_head,
        " + 1 with layout_heads 1 (one layout shared by all heads) or ", heads,
        " (one layout per head): ", per_head + 1, " or ", heads * per_head + 1, " entries (",
        per_head, " ", group_kind, "s = time / block_size)");
  }
  if (indices_t.dim_size(0) > kInt32Max) {
    return InvalidArgument(indices_name, " has ", indices_t.dim_size(0),
                           " entries; at most ", kInt32Max, " are supported");
  }
  if (flags_t.dim_size(0) != indices_t.dim_size(0)) {
    return InvalidArgument(flags_name, " has ", flags_t.dim_size(0), " entries but ",
                           indices_name, " has ", indices_t.dim_size(0),
                           "; they must have one entry per layout block");
  }
  const int64_t count = indices_t.dim_size(0);

  const int32_t* offsets = offsets_t.flat<int32_t>().data();
  const int32_t* indices = indices_t.flat<int32_t>().data();
  const int32_t* flags = flags_t.flat<int32_t>().data();

  if (offsets[0] != 0) {
    return InvalidArgument(offsets_name, "[0] = ", offsets[0], " but must be 0");
  }
  for (int64_t g = 0; g + 1 < num_offsets; ++g) {
    if (offsets[g + 1] < offsets[g]) {
      return InvalidArgument(offsets_name, " must be non-decreasing, but ", offsets_name, "[",
                             g + 1, "] = ", offsets[g + 1], " < ", offsets_name, "[", g,
                             "] = ", offsets[g]);
    }
    if (offsets[g + 1] > count) {
      return InvalidArgument(offsets_name, "[", g + 1, "] = ", offsets[g + 1],
                             " exceeds the number of entries of ", indices_name, " (", count,
                             ")");
    }
  }
  if (offsets[num_offsets - 1] != count) {
    return InvalidArgument(offsets_name, "[", num_offsets - 1, "] = ", offsets[num_offsets - 1],
                           " (the last entry) must equal the size of ", indices_name, " (",
                           count, ")");
  }
  for (int64_t g = 0; g + 1 < num_offsets; ++g) {
    const int64_t begin = offsets[g], end = offsets[g + 1];
    for (int64_t e = begin; e < end; ++e) {
      if (indices[e] < 0 || indices[e] >= extent) {
        return InvalidArgument(indices_name, "[", e, "] = ", indices[e], " is out of range [0, ",
                               extent, ") of ", index_kind, "s (layout head ", g / per_head,
                               ", ", group_kind, " ", g % per_head, ")");
      }
      if (e > begin && indices[e] <= indices[e - 1]) {
        return InvalidArgument(indices_name, " must be strictly increasing inside each ",
                               group_kind, ", but ", indices_name, "[", e, "] = ", indices[e],
                               " <= ", indices_name, "[", e - 1, "] = ", indices[e - 1],
                               " (layout head ", g / per_head, ", ", group_kind, " ",
                               g % per_head, ")");
      }
    }
  }
  for (int64_t e = 0; e < count; ++e) {
    if (flags[e] & ~static_cast<int32_t>(kBlockWindowed)) {
      return InvalidArgument(flags_name, "[", e, "] = ", flags[e],
                             " uses bits other than bit 0 (windowed), which are reserved");
    }
  }
  *layout_heads = static_cast<int>(lh);
  *nnz = static_cast<int>(count);
  return ::tensorflow::OkStatus();
}

// Checks that tensor `t` has exactly `expected` shape, naming it on failure.
Status CheckShape(const Tensor& t, const char* name, const ::tensorflow::TensorShape& expected,
                  const char* layout) {
  if (t.shape() != expected) {
    return InvalidArgument(name, " must have shape ", expected.DebugString(), " (", layout,
                           "), got ", t.shape().DebugString());
  }
  return ::tensorflow::OkStatus();
}

}  // namespace

Status AttentionAttrs::FromConstruction(OpKernelConstruction* ctx, AttentionAttrs* attrs) {
  TF_RETURN_IF_ERROR(ctx->GetAttr("block_size", &attrs->block_size));
  TF_RETURN_IF_ERROR(ctx->GetAttr("scale", &attrs->scale));
  TF_RETURN_IF_ERROR(ctx->GetAttr("causal", &attrs->causal));
  TF_RETURN_IF_ERROR(ctx->GetAttr("window", &attrs->window));
  TF_RETURN_IF_ERROR(ctx->GetAttr("min_distance", &attrs->min_distance));
  if (attrs->block_size < 1 || attrs->block_size > kMaxBlockSize) {
    return InvalidArgument("block_size = ", attrs->block_size, " must be in [1, ",
                           kMaxBlockSize, "]");
  }
  if (!std::isfinite(attrs->scale)) {
    return InvalidArgument("scale = ", attrs->scale, " must be finite");
  }
  if (attrs->window < 0) {
    return InvalidArgument("window = ", attrs->window, " must be >= 0 (0: no window)");
  }
  if (attrs->min_distance < 0) {
    return InvalidArgument("min_distance = ", attrs->min_distance, " must be >= 0");
  }
  return ::tensorflow::OkStatus();
}

Status ValidateForwardInputs(OpKernelContext* ctx, const AttentionAttrs& attrs,
                             SparseAttentionParams* p) {
  if (ctx->num_inputs() < 7) {
    return InvalidArgument("expected at least 7 inputs, got ", ctx->num_inputs());
  }
  const Tensor& q = ctx->input(kQ);
  const Tensor& k = ctx->input(kK);
  const Tensor& v = ctx->input(kV);
  const Tensor& key_bias = ctx->input(kKeyBias);

  TF_RETURN_IF_ERROR(ElementTypeOf(q.dtype(), &p->dtype));
  if (k.dtype() != q.dtype() || v.dtype() != q.dtype()) {
    return InvalidArgument("q, k and v must have the same dtype, got ",
                           ::tensorflow::DataTypeString(q.dtype()), ", ",
                           ::tensorflow::DataTypeString(k.dtype()), ", ",
                           ::tensorflow::DataTypeString(v.dtype()));
  }
  if (key_bias.dtype() != ::tensorflow::DT_FLOAT) {
    return InvalidArgument("key_bias must be float32, got ",
                           ::tensorflow::DataTypeString(key_bias.dtype()));
  }
  for (int i = kRowOffsets; i <= kBlockFlags; ++i) {
    if (ctx->input(i).dtype() != ::tensorflow::DT_INT32) {
      return InvalidArgument(i == kRowOffsets ? "row_offsets"
                             : i == kColIndices ? "col_indices" : "block_flags",
                             " must be int32, got ",
                             ::tensorflow::DataTypeString(ctx->input(i).dtype()));
    }
  }

  TF_RETURN_IF_ERROR(CheckRank(q, "q", 4, "[batch, q_len, heads, head_dim]"));
  TF_RETURN_IF_ERROR(CheckRank(k, "k", 4, "[batch, kv_len, heads, head_dim]"));
  TF_RETURN_IF_ERROR(CheckRank(v, "v", 4, "[batch, kv_len, heads, value_dim]"));
  const int64_t batch = q.dim_size(0), q_len = q.dim_size(1), heads = q.dim_size(2),
                head_dim = q.dim_size(3);
  const int64_t kv_len = k.dim_size(1), value_dim = v.dim_size(3);
  TF_RETURN_IF_ERROR(CheckDim(k, "k", 0, batch, "batch"));
  TF_RETURN_IF_ERROR(CheckDim(v, "v", 0, batch, "batch"));
  TF_RETURN_IF_ERROR(CheckDim(v, "v", 1, kv_len, "kv_len, the length of k"));
  TF_RETURN_IF_ERROR(CheckDim(k, "k", 2, heads, "heads"));
  TF_RETURN_IF_ERROR(CheckDim(v, "v", 2, heads, "heads"));
  TF_RETURN_IF_ERROR(CheckDim(k, "k", 3, head_dim, "head_dim"));
  if (heads < 1) return InvalidArgument("q has ", heads, " heads; at least 1 is required");
  if (head_dim < 1) return InvalidArgument("q has head_dim ", head_dim, "; must be >= 1");
  if (value_dim < 1) return InvalidArgument("v has value_dim ", value_dim, "; must be >= 1");
  if (q_len < 1) return InvalidArgument("q has q_len 0; must be >= 1");
  if (kv_len < 1) return InvalidArgument("k has kv_len 0; must be >= 1");

  const int64_t bs = attrs.block_size;
  if (q_len % bs != 0) {
    return InvalidArgument("q_len = ", q_len, " (dimension 1 of q) must be a multiple of ",
                           "block_size = ", bs, "; pad the sequence");
  }
  if (kv_len % bs != 0) {
    return InvalidArgument("kv_len = ", kv_len, " (dimension 1 of k and v) must be a multiple ",
                           "of block_size = ", bs, "; pad the sequence");
  }

  // Positions, dimensions and offsets inside one batch item are 32-bit in the kernels.
  TF_RETURN_IF_ERROR(CheckInt32(batch, "batch (dimension 0 of q)"));
  TF_RETURN_IF_ERROR(CheckProductInt32(q_len, heads, head_dim, "q_len * heads * head_dim of q"));
  TF_RETURN_IF_ERROR(CheckProductInt32(kv_len, heads, head_dim, "kv_len * heads * head_dim of k"));
  TF_RETURN_IF_ERROR(
      CheckProductInt32(kv_len, heads, value_dim, "kv_len * heads * value_dim of v"));
  TF_RETURN_IF_ERROR(
      CheckProductInt32(q_len, heads, value_dim, "q_len * heads * value_dim of out"));
  // window and min_distance need no upper bound: they are only compared with distances.

  if (key_bias.NumElements() != 0) {
    TF_RETURN_IF_ERROR(CheckRank(key_bias, "key_bias", 2,
                                 "[batch, kv_len], or a tensor with no elements for none"));
    if (key_bias.dim_size(0) != batch || key_bias.dim_size(1) != kv_len) {
      return InvalidArgument("key_bias must have shape [batch, kv_len] = [", batch, ", ",
                             kv_len, "] or have no elements, got ",
                             key_bias.shape().DebugString());
    }
  }

  const int64_t num_q_blocks = q_len / bs, num_kv_blocks = kv_len / bs;
  int layout_heads = 0, nnz = 0;
  TF_RETURN_IF_ERROR(CheckCompressedLayout(
      ctx->input(kRowOffsets), ctx->input(kColIndices), ctx->input(kBlockFlags), "row_offsets",
      "col_indices", "block_flags", "query block", "key block", num_q_blocks, num_kv_blocks,
      heads, &layout_heads, &nnz));

  p->batch = static_cast<int>(batch);
  p->q_len = static_cast<int>(q_len);
  p->kv_len = static_cast<int>(kv_len);
  p->heads = static_cast<int>(heads);
  p->head_dim = static_cast<int>(head_dim);
  p->value_dim = static_cast<int>(value_dim);
  p->block_size = static_cast<int>(bs);
  p->num_q_blocks = static_cast<int>(num_q_blocks);
  p->num_kv_blocks = static_cast<int>(num_kv_blocks);
  p->layout_heads = layout_heads;
  p->nnz = nnz;
  p->scale = attrs.scale;
  p->causal = attrs.causal;
  p->window = attrs.window;
  p->min_distance = attrs.min_distance;

  p->q = q.data();
  p->k = k.data();
  p->v = v.data();
  p->key_bias = key_bias.NumElements() == 0 ? nullptr : key_bias.flat<float>().data();
  p->row_offsets = ctx->input(kRowOffsets).flat<int32_t>().data();
  p->col_indices = ctx->input(kColIndices).flat<int32_t>().data();
  p->block_flags = ctx->input(kBlockFlags).flat<int32_t>().data();
  return ::tensorflow::OkStatus();
}

Status ValidateBackwardInputs(OpKernelContext* ctx, const AttentionAttrs& attrs,
                              SparseAttentionParams* p) {
  if (ctx->num_inputs() < 14) {
    return InvalidArgument("expected 14 inputs, got ", ctx->num_inputs());
  }
  TF_RETURN_IF_ERROR(ValidateForwardInputs(ctx, attrs, p));

  const Tensor& q = ctx->input(kQ);
  const Tensor& out = ctx->input(kOut);
  const Tensor& lse = ctx->input(kLse);
  const Tensor& d_out = ctx->input(kDOut);
  const Tensor& d_lse = ctx->input(kDLse);
  if (out.dtype() != q.dtype() || d_out.dtype() != q.dtype()) {
    return InvalidArgument("out and d_out must have the dtype of q (",
                           ::tensorflow::DataTypeString(q.dtype()), "), got ",
                           ::tensorflow::DataTypeString(out.dtype()), " and ",
                           ::tensorflow::DataTypeString(d_out.dtype()));
  }
  if (lse.dtype() != ::tensorflow::DT_FLOAT || d_lse.dtype() != ::tensorflow::DT_FLOAT) {
    return InvalidArgument("lse and d_lse must be float32");
  }
  for (int i = kColOffsets; i <= kCscFlags; ++i) {
    if (ctx->input(i).dtype() != ::tensorflow::DT_INT32) {
      return InvalidArgument(i == kColOffsets ? "col_offsets"
                             : i == kRowIndices ? "row_indices" : "csc_flags",
                             " must be int32");
    }
  }
  const ::tensorflow::TensorShape out_shape({p->batch, p->q_len, p->heads, p->value_dim});
  const ::tensorflow::TensorShape lse_shape({p->batch, p->heads, p->q_len});
  TF_RETURN_IF_ERROR(CheckShape(out, "out", out_shape, "[batch, q_len, heads, value_dim]"));
  TF_RETURN_IF_ERROR(CheckShape(d_out, "d_out", out_shape, "[batch, q_len, heads, value_dim]"));
  TF_RETURN_IF_ERROR(CheckShape(lse, "lse", lse_shape, "[batch, heads, q_len]"));
  TF_RETURN_IF_ERROR(CheckShape(d_lse, "d_lse", lse_shape, "[batch, heads, q_len]"));

  const Tensor& col_offsets_t = ctx->input(kColOffsets);
  const Tensor& row_indices_t = ctx->input(kRowIndices);
  const Tensor& csc_flags_t = ctx->input(kCscFlags);
  int csc_layout_heads = 0, csc_nnz = 0;
  TF_RETURN_IF_ERROR(CheckCompressedLayout(
      col_offsets_t, row_indices_t, csc_flags_t, "col_offsets", "row_indices", "csc_flags",
      "key block", "query block", p->num_kv_blocks, p->num_q_blocks, p->heads,
      &csc_layout_heads, &csc_nnz));
  if (csc_layout_heads != p->layout_heads) {
    return InvalidArgument("col_offsets describes ", csc_layout_heads,
                           " layout head(s) but row_offsets describes ", p->layout_heads,
                           "; the CSC layout must be the transpose of the CSR layout");
  }
  if (csc_nnz != p->nnz) {
    return InvalidArgument("row_indices has ", csc_nnz, " entries but col_indices has ", p->nnz,
                           "; the CSC layout (col_offsets, row_indices, csc_flags) must be the "
                           "transpose of the CSR layout (row_offsets, col_indices, block_flags)");
  }

  // Walking the CSR rows in order visits each CSC column's entries in increasing query block
  // order, which is the order the (validated, strictly increasing) CSC column stores them in:
  // one cursor per column suffices to match every entry.
  const int32_t* col_offsets = col_offsets_t.flat<int32_t>().data();
  const int32_t* row_indices = row_indices_t.flat<int32_t>().data();
  const int32_t* csc_flags = csc_flags_t.flat<int32_t>().data();
  const int nqb = p->num_q_blocks, nkb = p->num_kv_blocks;
  std::vector<int32_t> cursor(col_offsets, col_offsets + static_cast<int64_t>(p->layout_heads) *
                                                             nkb);
  for (int lh = 0; lh < p->layout_heads; ++lh) {
    for (int qb = 0; qb < nqb; ++qb) {
      const int64_t row = static_cast<int64_t>(lh) * nqb + qb;
      for (int32_t e = p->row_offsets[row]; e < p->row_offsets[row + 1]; ++e) {
        const int kb = p->col_indices[e];
        const int64_t col = static_cast<int64_t>(lh) * nkb + kb;
        const int32_t c = cursor[col];
        if (c >= col_offsets[col + 1] || row_indices[c] != qb) {
          return InvalidArgument(
              "the CSC layout (col_offsets, row_indices, csc_flags) is not the transpose of the "
              "CSR layout: col_indices[", e, "] puts key block ", kb, " in query block ", qb,
              " of layout head ", lh, ", but row_indices has no matching entry for it in column ",
              col, " (col_offsets[", col, "] .. col_offsets[", col + 1, "])");
        }
        if (csc_flags[c] != p->block_flags[e]) {
          return InvalidArgument("csc_flags[", c, "] = ", csc_flags[c],
                                 " differs from block_flags[", e, "] = ", p->block_flags[e],
                                 " for the same block (layout head ", lh, ", query block ", qb,
                                 ", key block ", kb, ")");
        }
        cursor[col] = c + 1;
      }
    }
  }
  // Equal nnz and one distinct CSC entry consumed per CSR entry: every column is exhausted.

  p->out = const_cast<void*>(static_cast<const void*>(out.data()));
  p->lse = const_cast<float*>(lse.flat<float>().data());
  p->d_out = d_out.data();
  p->d_lse = d_lse.flat<float>().data();
  p->col_offsets = col_offsets;
  p->row_indices = row_indices;
  p->csc_flags = csc_flags;
  return ::tensorflow::OkStatus();
}

}  // namespace tf_sparse_attn
