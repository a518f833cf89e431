"""One forward and one backward of the op on the GPU, small enough for compute-sanitizer:
    compute-sanitizer --tool memcheck python3 bench/sanitize_gpu.py
    compute-sanitizer --tool racecheck python3 bench/sanitize_gpu.py
Covers the tensor-core paths (bfloat16, head_dim 64: a fixed layout with partial tiles, a dense
one, which takes the 128-row forward tiles, and a local one, which keeps 64-row tiles), the
backward with dq summed in a float32 accumulator on the fixed and dense layouts, and the scalar
path (float32)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # noqa: E402

from tf_sparse_attn import BlockLayout, sparse_attention  # noqa: E402


def main():
    cases = [(BlockLayout.fixed(192, 16, 64, 16), tf.bfloat16, "deterministic"),
             (BlockLayout.dense(192, 16), tf.bfloat16, "deterministic"),
             (BlockLayout.local(192, 16, 32), tf.bfloat16, "deterministic"),
             (BlockLayout.fixed(192, 16, 64, 16), tf.bfloat16, "atomic"),
             (BlockLayout.dense(192, 16), tf.bfloat16, "atomic"),
             (BlockLayout.fixed(192, 16, 64, 16), tf.float32, "deterministic")]
    for layout, dtype, dq_mode in cases:
        os.environ["TF_SPARSE_ATTN_GPU_DQ"] = dq_mode
        with tf.device("/GPU:0"):
            q, k, v = (tf.cast(tf.random.normal([1, 181, 3, 64]), dtype) for _ in range(3))
            with tf.GradientTape() as tape:
                tape.watch([q, k, v])
                out = sparse_attention(q, k, v, layout)
                loss = tf.reduce_sum(tf.cast(out, tf.float32) ** 2)
            grads = tape.gradient(loss, [q, k, v])
        sums = [float(tf.reduce_sum(tf.cast(g, tf.float32))) for g in grads]
        print(dtype.name, dq_mode, float(loss), sums)


if __name__ == "__main__":
    main()
