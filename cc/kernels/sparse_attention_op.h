// OpKernels of BlockSparseAttention and BlockSparseAttentionGrad, shared by every device: they
// validate the inputs, allocate the outputs, fill a SparseAttentionParams and hand it to the
// device's SparseAttentionRunner. Each device file specialises the runner and registers the
// kernels (the GPU registration marks the layout inputs as HostMemory).
#ifndef TF_SPARSE_ATTN_CC_KERNELS_SPARSE_ATTENTION_OP_H_
#define TF_SPARSE_ATTN_CC_KERNELS_SPARSE_ATTENTION_OP_H_

#include "cc/kernels/sparse_attention_params.h"
#include "cc/kernels/sparse_attention_validation.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"

namespace tf_sparse_attn {

// Specialised per device:
//   static tensorflow::Status Forward(tensorflow::OpKernelContext* ctx,
//                                     const SparseAttentionParams& p);
//   static tensorflow::Status Backward(tensorflow::OpKernelContext* ctx,
//                                      const SparseAttentionParams& p);
// The layout pointers in p point at host memory; a device runner copies them where it needs
// them. The runners are called only when the outputs have at least one element.
template <typename Device>
struct SparseAttentionRunner;

template <typename Device, typename T>
class BlockSparseAttentionOp : public tensorflow::OpKernel {
 public:
  explicit BlockSparseAttentionOp(tensorflow::OpKernelConstruction* ctx)
      : tensorflow::OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, AttentionAttrs::FromConstruction(ctx, &attrs_));
  }

  void Compute(tensorflow::OpKernelContext* ctx) override {
    SparseAttentionParams p;
    OP_REQUIRES_OK(ctx, ValidateForwardInputs(ctx, attrs_, &p));

    tensorflow::Tensor* out = nullptr;
    tensorflow::Tensor* lse = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            0, tensorflow::TensorShape({p.batch, p.q_len, p.heads, p.value_dim}),
                            &out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            1, tensorflow::TensorShape({p.batch, p.heads, p.q_len}), &lse));
    if (out->NumElements() == 0) return;  // batch 0
    p.out = out->data();
    p.lse = lse->flat<float>().data();
    OP_REQUIRES_OK(ctx, SparseAttentionRunner<Device>::Forward(ctx, p));
  }

 private:
  AttentionAttrs attrs_;
};

template <typename Device, typename T>
class BlockSparseAttentionGradOp : public tensorflow::OpKernel {
 public:
  explicit BlockSparseAttentionGradOp(tensorflow::OpKernelConstruction* ctx)
      : tensorflow::OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, AttentionAttrs::FromConstruction(ctx, &attrs_));
  }

  void Compute(tensorflow::OpKernelContext* ctx) override {
    SparseAttentionParams p;
    OP_REQUIRES_OK(ctx, ValidateBackwardInputs(ctx, attrs_, &p));

    tensorflow::Tensor* dq = nullptr;
    tensorflow::Tensor* dk = nullptr;
    tensorflow::Tensor* dv = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, ctx->input(0).shape(), &dq));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, ctx->input(1).shape(), &dk));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, ctx->input(2).shape(), &dv));
    if (dq->NumElements() == 0 && dk->NumElements() == 0 && dv->NumElements() == 0) return;
    p.dq = dq->data();
    p.dk = dk->data();
    p.dv = dv->data();
    OP_REQUIRES_OK(ctx, SparseAttentionRunner<Device>::Backward(ctx, p));
  }

 private:
  AttentionAttrs attrs_;
};

}  // namespace tf_sparse_attn

#endif  // TF_SPARSE_ATTN_CC_KERNELS_SPARSE_ATTENTION_OP_H_
