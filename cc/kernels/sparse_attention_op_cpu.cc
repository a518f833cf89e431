// CPU registration of the block-sparse attention kernels.
#include "cc/kernels/sparse_attention_cpu.h"
#include "cc/kernels/sparse_attention_op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/types.h"
#include "tensorflow/core/lib/core/threadpool.h"

namespace tf_sparse_attn {

using CPUDevice = Eigen::ThreadPoolDevice;

namespace {

cpu::ParallelFor MakeParallelFor(tensorflow::OpKernelContext* ctx) {
  tensorflow::thread::ThreadPool* pool =
      ctx->device()->tensorflow_cpu_worker_threads()->workers;
  return [pool](int64_t n, int64_t cost_per_unit,
                const std::function<void(int64_t, int64_t)>& fn) {
    pool->ParallelFor(n, cost_per_unit, fn);
  };
}

}  // namespace

template <>
struct SparseAttentionRunner<CPUDevice> {
  static tensorflow::Status Forward(tensorflow::OpKernelContext* ctx,
                                    const SparseAttentionParams& p) {
    cpu::SparseAttentionForward(p, MakeParallelFor(ctx));
    return tensorflow::OkStatus();
  }
  static tensorflow::Status Backward(tensorflow::OpKernelContext* ctx,
                                     const SparseAttentionParams& p) {
    cpu::SparseAttentionBackward(p, MakeParallelFor(ctx));
    return tensorflow::OkStatus();
  }
};

#define TSA_REGISTER_CPU(T)                                                             \
  REGISTER_KERNEL_BUILDER(                                                              \
      Name("BlockSparseAttention").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("T"), \
      BlockSparseAttentionOp<CPUDevice, T>);                                            \
  REGISTER_KERNEL_BUILDER(Name("BlockSparseAttentionGrad")                              \
                              .Device(tensorflow::DEVICE_CPU)                           \
                              .TypeConstraint<T>("T"),                                  \
                          BlockSparseAttentionGradOp<CPUDevice, T>);

TSA_REGISTER_CPU(float);
TSA_REGISTER_CPU(Eigen::half);
TSA_REGISTER_CPU(Eigen::bfloat16);

#undef TSA_REGISTER_CPU

}  // namespace tf_sparse_attn
