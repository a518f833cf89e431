"""The projections with a matrix-product bias gradient: same values and gradients as Keras's
own layers, and a bias gradient at least as accurate as TensorFlow's reduction."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_sparse_attn.layers.projection import DenseProjection, EinsumProjection, add_bias


def _grads(layer, x, weight):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * weight)
    grads = tape.gradient(loss, [x] + layer.trainable_variables)
    return [y.numpy()] + [g.numpy() for g in grads]


@pytest.mark.parametrize("kind", ["einsum", "dense"])
def test_matches_keras_layers_in_float32(kind):
    rng = np.random.default_rng(1)
    x = tf.constant(rng.standard_normal((2, 37, 16)), tf.float32)
    if kind == "einsum":
        args = dict(equation="abc,cde->abde", output_shape=(None, 4, 8), bias_axes="de")
        ours, theirs = EinsumProjection(**args), keras.layers.EinsumDense(**args)
        out_shape = (2, 37, 4, 8)
    else:
        ours, theirs = (cls(12, activation="gelu") for cls in (DenseProjection, keras.layers.Dense))
        out_shape = (2, 37, 12)
    ours.build(x.shape)
    theirs.build(x.shape)
    weights = [rng.standard_normal(w.shape).astype("float32") for w in theirs.get_weights()]
    ours.set_weights(weights)
    theirs.set_weights(weights)
    weight = tf.constant(rng.standard_normal(out_shape), tf.float32)
    for a, b in zip(_grads(ours, x, weight), _grads(theirs, x, weight)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bias_gradient_against_float64_sum_in_bfloat16():
    rng = np.random.default_rng(2)
    d_out = tf.cast(tf.constant(rng.standard_normal((4000, 3, 5))), tf.bfloat16)
    exact = d_out.numpy().astype(np.float64).sum(axis=0)
    x = tf.cast(tf.constant(rng.standard_normal((4000, 3, 5))), tf.bfloat16)
    bias = tf.cast(tf.constant(rng.standard_normal((3, 5))), tf.bfloat16)
    with tf.GradientTape() as tape:
        tape.watch(bias)
        loss = tf.reduce_sum(tf.cast(add_bias(x, bias), tf.float32) * tf.cast(d_out, tf.float32))
    got = tape.gradient(loss, bias).numpy().astype(np.float64)
    # float32 accumulation, one bfloat16 rounding of the result (8 bits of mantissa).
    np.testing.assert_allclose(got, exact, rtol=2 ** -7, atol=1e-2)


def test_bias_not_trailing_falls_back_to_broadcast_add():
    x = tf.constant(np.arange(24, dtype="float32").reshape(2, 3, 4))
    bias = tf.constant([[1.0], [2.0], [3.0]])  # [3, 1] broadcasts but is not x's trailing dims
    with tf.GradientTape() as tape:
        tape.watch(bias)
        y = add_bias(x, bias)
        loss = tf.reduce_sum(y)
    np.testing.assert_array_equal(y.numpy(), x.numpy() + bias.numpy())
    np.testing.assert_array_equal(tape.gradient(loss, bias).numpy(), [[8.0], [8.0], [8.0]])
