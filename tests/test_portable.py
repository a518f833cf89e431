"""The portable path (keras.ops) and the dense reference against float64 ground truth and the
custom op, under XLA, and on Keras's JAX and PyTorch backends."""

import importlib.util
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from tf_sparse_attn import BlockLayout, sparse_attention
from tf_sparse_attn.portable import merge_attention, portable_sparse_attention
from tf_sparse_attn.reference import reference_attention
from tests.reference import TOLERANCE, attention_reference, random_qkv, relative_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLEMENTATIONS = {"portable": portable_sparse_attention, "reference": reference_attention,
                   "op": sparse_attention}


def layouts(causal):
    return {
        "dense": BlockLayout.dense(64, 8, causal),
        "local": BlockLayout.local(64, 8, 11, causal),
        "strided": BlockLayout.strided(64, 4, 4, causal),
        "strided_exclusive": BlockLayout.strided(64, 4, 4, causal, exclude_window=4),
        "fixed": BlockLayout.fixed(64, 4, 16, 4, causal),
        "fixed_per_head": BlockLayout.fixed(64, 4, 16, 4, causal, num_heads=3,
                                            num_summary_groups=2),
        "fixed_split": BlockLayout.stack([BlockLayout.fixed(64, 4, 16, 4, causal, part="block")]
                                         + [BlockLayout.fixed(64, 4, 16, 4, causal,
                                                              part="summary")] * 2),
        "local_fixed_union": BlockLayout.union(BlockLayout.local(64, 8, 5, causal),
                                               BlockLayout.fixed(64, 8, 32, 8, causal)),
    }


def inputs(seed, time, dtype=tf.float32, batch=2, heads=3, dim=8, value_dim=6):
    rng = np.random.default_rng(seed)
    return (*random_qkv(rng, batch, time, heads, dim, value_dim, dtype), rng)


def run(function, q, k, v, layout, causal, key_mask, d_out, d_lse):
    with tf.GradientTape() as tape:
        tape.watch([q, k, v])
        out, lse = function(q, k, v, layout, causal=causal, return_lse=True, key_mask=key_mask)
        loss = tf.reduce_sum(tf.cast(out, tf.float64) * d_out) + tf.reduce_sum(
            tf.where(tf.math.is_finite(lse), tf.cast(lse, tf.float64) * d_lse, 0.0))
    return out, lse, tape.gradient(loss, [q, k, v])


def expected(layout, causal, time, qkv, key_mask, d_out, d_lse):
    mask = layout.to_mask(causal)[:, :time, :time]
    if key_mask is not None:
        mask = mask[None] & np.asarray(key_mask)[:, None, None, :]
    return attention_reference(*qkv, mask, 1 / math.sqrt(qkv[0].shape[-1]), d_out, d_lse)


@pytest.mark.parametrize("implementation", ["portable", "reference"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", sorted(layouts(True)))
def test_matches_float64(name, causal, implementation):
    layout = layouts(causal)[name]
    for seed, time, masked in ((1, 64, False), (2, 53, True), (3, 37, False)):
        (q, k, v), qkv, rng = inputs(seed, time)
        key_mask = rng.random((2, time)) > 0.25 if masked else None
        d_out = rng.standard_normal((2, time, 3, 6))
        d_lse = rng.standard_normal((2, 3, time))
        out, lse, grads = run(IMPLEMENTATIONS[implementation], q, k, v, layout, causal,
                              key_mask, d_out, d_lse)
        ref_out, ref_lse, ref_grads = expected(layout, causal, time, qkv, key_mask, d_out,
                                               d_lse)
        assert relative_error(out, ref_out) < 2e-5
        assert relative_error(lse, ref_lse) < 2e-5
        for which, grad, ref in zip("qkv", grads, ref_grads):
            assert relative_error(grad, ref) < 1e-4, f"d{which}"


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_half_precision(dtype):
    layout = layouts(True)["fixed_per_head"]
    (q, k, v), qkv, rng = inputs(4, 61, dtype)
    d_out = rng.standard_normal((2, 61, 3, 6))
    d_lse = np.zeros((2, 3, 61))
    out, lse, grads = run(portable_sparse_attention, q, k, v, layout, True, None, d_out, d_lse)
    ref_out, ref_lse, ref_grads = expected(layout, True, 61, qkv, None, d_out, d_lse)
    assert out.dtype == dtype and lse.dtype == tf.float32
    assert relative_error(out, ref_out) < TOLERANCE[dtype.name]
    assert relative_error(lse, ref_lse) < TOLERANCE[dtype.name]
    for grad, ref in zip(grads, ref_grads):
        assert grad.dtype == dtype
        assert relative_error(grad, ref) < 4 * TOLERANCE[dtype.name]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", ["local", "strided", "fixed_per_head", "fixed_split"])
def test_portable_matches_op(name, causal, op_library):
    layout = layouts(causal)[name]
    (q, k, v), _, rng = inputs(5, 45)
    key_mask = rng.random((2, 45)) > 0.2
    d_out = rng.standard_normal((2, 45, 3, 6))
    d_lse = rng.standard_normal((2, 3, 45))
    results = [run(IMPLEMENTATIONS[impl], q, k, v, layout, causal, key_mask, d_out, d_lse)
               for impl in ("portable", "op")]
    (out_p, lse_p, grads_p), (out_o, lse_o, grads_o) = results
    assert relative_error(out_p, out_o) < 2e-5
    assert relative_error(lse_p, lse_o) < 2e-5
    for grad_p, grad_o in zip(grads_p, grads_o):
        assert relative_error(grad_p, grad_o) < 1e-4


def test_merged_strided_passes_equal_the_union():
    """Local in natural order and strided (excluding the local keys) in reordered order,
    merged by lse, is one softmax over the union: the paper's merged strided head."""
    for causal in (True, False):
        local = BlockLayout.local(64, 4, 4, causal)
        strided = BlockLayout.strided(64, 4, 4, causal, exclude_window=4)
        (q, k, v), qkv, _ = inputs(6, 64)
        out1, lse1 = portable_sparse_attention(q, k, v, local, causal, return_lse=True)
        out2, lse2 = portable_sparse_attention(q, k, v, strided, causal, return_lse=True)
        out, lse = merge_attention(out1, lse1, out2, lse2)
        union = local.to_mask(causal) | strided.to_mask(causal)
        ref_out, ref_lse = attention_reference(*qkv, union, 1 / math.sqrt(8))
        assert relative_error(out, ref_out) < 2e-5
        assert relative_error(lse, ref_lse) < 2e-5


def test_memory_is_linear_in_length():
    """The portable path's largest intermediate grows with T, not T^2 (local pattern)."""
    def largest(time):
        layout = BlockLayout.local(time, 16, 32)
        spec = tf.TensorSpec([1, time, 1, 8])
        graph = tf.function(lambda q, k, v: portable_sparse_attention(q, k, v, layout)) \
            .get_concrete_function(spec, spec, spec).graph
        return max(int(np.prod(t.shape)) for op in graph.get_operations()
                   for t in op.outputs if t.shape.is_fully_defined())

    assert largest(4096) <= 2.2 * largest(2048)
    assert largest(4096) < 4096 * 4096 // 8


@pytest.mark.parametrize("name", ["strided", "fixed_per_head", "local_fixed_union"])
def test_xla_jit_compile(name):
    layout = layouts(True)[name]
    (q, k, v), _, rng = inputs(7, 50)
    key_mask = tf.constant(rng.random((2, 50)) > 0.2)

    def step(q, k, v, key_mask):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            out = portable_sparse_attention(q, k, v, layout, key_mask=key_mask)
            loss = tf.reduce_sum(out * out)
        return out, tape.gradient(loss, [q, k, v])

    eager_out, eager_grads = step(q, k, v, key_mask)
    compiled = tf.function(step, jit_compile=True)
    xla_out, xla_grads = compiled(q, k, v, key_mask)
    # The compiled graph really went through XLA.
    hlo = compiled.experimental_get_compiler_ir(q, k, v, key_mask)(stage="hlo")
    assert "HloModule" in hlo
    assert relative_error(xla_out, eager_out) < 1e-5
    for a, b in zip(xla_grads, eager_grads):
        assert relative_error(a, b) < 1e-4


# ------------------------------------------------------------------- other Keras backends

BACKEND_SCRIPT = textwrap.dedent("""
    import math, sys
    import numpy as np
    import keras
    from keras import ops
    assert keras.backend.backend() == sys.argv[1]
    import tf_sparse_attn as tsa
    from tests.reference import attention_reference

    def check(layer, length, mask):
        x = np.random.default_rng(0).normal(size=(2, length, 16)).astype("float32")
        out = ops.convert_to_numpy(layer(x))
        q, k, v = (ops.convert_to_numpy(d(x)) for d in
                   (layer.query_dense, layer.key_dense, layer.value_dense))
        ref, _ = attention_reference(q, k, v, mask, 1 / math.sqrt(layer.key_dim))
        ref = ops.convert_to_numpy(layer.output_dense(ref.astype("float32")))
        err = np.abs(out - ref).max()
        assert err < 3e-5, (layer.name, err)

    n = 45
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    strided = tsa.StridedAttention(num_heads=2, key_dim=8, stride=4, block_size=2)
    assert strided.implementation == "portable"
    check(strided, n, ((j <= i) & ((i - j < 4) | ((i - j) % 4 == 0)))[None])
    fixed = tsa.FixedAttention(num_heads=2, key_dim=8, stride=8, summary=2,
                               num_summary_groups=2, block_size=2, causal=False)
    masks = [(j // 8 == i // 8) | ((j % 8 >= 8 - 2 * (h + 1)) & (j % 8 < 8 - 2 * h))
             for h in range(2)]
    check(fixed, n, np.stack(masks))

    # Training compiles the step with the backend's own compiler (jax.jit; torch runs eagerly).
    inputs = keras.Input(shape=(32, 16))
    model = keras.Model(inputs, tsa.LocalAttention(num_heads=2, key_dim=8, window=6,
                                                   block_size=4)(inputs))
    model.compile(optimizer="sgd", loss="mse")
    x = np.random.default_rng(1).normal(size=(4, 32, 16)).astype("float32")
    history = model.fit(x, x, epochs=2, batch_size=2, verbose=0)
    losses = history.history["loss"]
    assert np.isfinite(losses).all() and losses[1] < losses[0], losses
    print("backend ok", sys.argv[1])
""")


@pytest.mark.parametrize("backend, module", [("jax", "jax"), ("torch", "torch")])
def test_other_keras_backends(backend, module):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=ROOT + os.pathsep +
               os.environ.get("PYTHONPATH", ""), CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-c", BACKEND_SCRIPT, backend], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert f"backend ok {backend}" in result.stdout
