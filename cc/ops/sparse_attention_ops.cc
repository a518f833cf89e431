// Interfaces of the block-sparse attention ops. Kernels live in cc/kernels/.
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tf_sparse_attn {

using ::tensorflow::Status;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

namespace {

// q [B, Tq, H, D], k [B, Tk, H, D], v [B, Tk, H, Dv]: checks what is known statically and
// returns the merged dimensions. The kernels check everything again at run time.
Status AttentionShapes(InferenceContext* c, DimensionHandle* batch, DimensionHandle* q_len,
                       DimensionHandle* heads, DimensionHandle* value_dim) {
  ShapeHandle q, k, v;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &q));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 4, &k));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 4, &v));
  DimensionHandle unused;
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(q, 0), c->Dim(k, 0), batch));
  TF_RETURN_IF_ERROR(c->Merge(*batch, c->Dim(v, 0), batch));
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(k, 1), c->Dim(v, 1), &unused));
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(q, 2), c->Dim(k, 2), heads));
  TF_RETURN_IF_ERROR(c->Merge(*heads, c->Dim(v, 2), heads));
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(q, 3), c->Dim(k, 3), &unused));
  *q_len = c->Dim(q, 1);
  *value_dim = c->Dim(v, 3);
  for (int i = 4; i <= 6; ++i) {  // row_offsets / col_indices / block_flags are vectors
    ShapeHandle vec;
    TF_RETURN_IF_ERROR(c->WithRank(c->input(i), 1, &vec));
  }
  return ::tensorflow::OkStatus();
}

}  // namespace

REGISTER_OP("BlockSparseAttention")
    .Input("q: T")
    .Input("k: T")
    .Input("v: T")
    .Input("key_bias: float")
    .Input("row_offsets: int32")
    .Input("col_indices: int32")
    .Input("block_flags: int32")
    .Output("out: T")
    .Output("lse: float")
    .Attr("T: {half, bfloat16, float}")
    .Attr("block_size: int >= 1")
    .Attr("scale: float")
    .Attr("causal: bool = true")
    .Attr("window: int >= 0 = 0")
    .Attr("min_distance: int >= 0 = 0")
    .SetShapeFn([](InferenceContext* c) {
      DimensionHandle batch, q_len, heads, value_dim;
      TF_RETURN_IF_ERROR(AttentionShapes(c, &batch, &q_len, &heads, &value_dim));
      c->set_output(0, c->MakeShape({batch, q_len, heads, value_dim}));
      c->set_output(1, c->MakeShape({batch, heads, q_len}));
      return ::tensorflow::OkStatus();
    })
    .Doc(R"doc(
Fused block-sparse attention: softmax(scale * q k^T + key_bias) v over the pairs that the CSR
block layout and the token rules (causal, window, min_distance) allow, without forming the
score matrix. Rows with no allowed key give out = 0 and lse = -inf.

q: [batch, q_len, heads, head_dim].
k: [batch, kv_len, heads, head_dim].
v: [batch, kv_len, heads, value_dim].
key_bias: [batch, kv_len] added to the scores of each key (-inf masks a key), or shape [0].
row_offsets: [layout_heads * q_len / block_size + 1], layout_heads 1 or heads.
col_indices: [nnz] key blocks, strictly increasing inside each row.
block_flags: [nnz] bit 0: the window and min_distance rules apply inside this block.
out: [batch, q_len, heads, value_dim].
lse: [batch, heads, q_len] log-sum-exp of each query's scores.
)doc");

REGISTER_OP("BlockSparseAttentionGrad")
    .Input("q: T")
    .Input("k: T")
    .Input("v: T")
    .Input("key_bias: float")
    .Input("row_offsets: int32")
    .Input("col_indices: int32")
    .Input("block_flags: int32")
    .Input("out: T")
    .Input("lse: float")
    .Input("d_out: T")
    .Input("d_lse: float")
    .Input("col_offsets: int32")
    .Input("row_indices: int32")
    .Input("csc_flags: int32")
    .Output("dq: T")
    .Output("dk: T")
    .Output("dv: T")
    .Attr("T: {half, bfloat16, float}")
    .Attr("block_size: int >= 1")
    .Attr("scale: float")
    .Attr("causal: bool = true")
    .Attr("window: int >= 0 = 0")
    .Attr("min_distance: int >= 0 = 0")
    .SetShapeFn([](InferenceContext* c) {
      DimensionHandle batch, q_len, heads, value_dim;
      TF_RETURN_IF_ERROR(AttentionShapes(c, &batch, &q_len, &heads, &value_dim));
      for (int i = 11; i <= 13; ++i) {
        ShapeHandle vec;
        TF_RETURN_IF_ERROR(c->WithRank(c->input(i), 1, &vec));
      }
      c->set_output(0, c->input(0));
      c->set_output(1, c->input(1));
      c->set_output(2, c->input(2));
      return ::tensorflow::OkStatus();
    })
    .Doc(R"doc(
Gradient of BlockSparseAttention with respect to q, k and v, given d_out and d_lse. Recomputes
the scores from q, k and lse; dk and dv walk the transposed (CSC) layout, so every output
element is written by one thread and the result is deterministic.
)doc");

}  // namespace tf_sparse_attn
