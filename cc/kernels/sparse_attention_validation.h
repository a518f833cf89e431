// Input validation shared by the CPU and GPU kernels of BlockSparseAttention and
// BlockSparseAttentionGrad. A SavedModel is untrusted data: every shape, size and layout entry
// is checked here, before any kernel reads q/k/v memory, and each failure is an
// InvalidArgument error that names the offending argument.
#ifndef TF_SPARSE_ATTN_CC_KERNELS_SPARSE_ATTENTION_VALIDATION_H_
#define TF_SPARSE_ATTN_CC_KERNELS_SPARSE_ATTENTION_VALIDATION_H_

#include "cc/kernels/sparse_attention_params.h"
#include "tensorflow/core/framework/op_kernel.h"

namespace tf_sparse_attn {

// Upper bound on block_size: kernels keep [block_size, block_size] score tiles in scratch.
constexpr int kMaxBlockSize = 1024;

struct AttentionAttrs {
  int block_size = 0;
  float scale = 1.f;
  bool causal = true;
  int window = 0;
  int min_distance = 0;

  static tensorflow::Status FromConstruction(tensorflow::OpKernelConstruction* ctx,
                                             AttentionAttrs* attrs);
};

// Validates every input of BlockSparseAttention (inputs 0..6) and fills params: dtype, sizes,
// attributes and all input data pointers (key_bias is nullptr when the tensor has no elements).
// The layout tensors (inputs 4..6) must be host-readable: the GPU kernel registers them as
// HostMemory.
tensorflow::Status ValidateForwardInputs(tensorflow::OpKernelContext* ctx,
                                         const AttentionAttrs& attrs,
                                         SparseAttentionParams* params);

// The same for BlockSparseAttentionGrad (inputs 0..13), which also fills out, lse, d_out, d_lse
// and the CSC layout (col_offsets, row_indices, csc_flags). Inputs 4..6 and 11..13 must be
// host-readable. The CSC layout must be exactly the transpose of the CSR one, flags included.
tensorflow::Status ValidateBackwardInputs(tensorflow::OpKernelContext* ctx,
                                          const AttentionAttrs& attrs,
                                          SparseAttentionParams* params);

}  // namespace tf_sparse_attn

#endif  // TF_SPARSE_ATTN_CC_KERNELS_SPARSE_ATTENTION_VALIDATION_H_
