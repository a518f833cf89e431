"""The shared layer test: what every public attention layer of the library must do as a Keras
layer. `run_layer_test(cls, init_kwargs)` checks, on fresh random inputs:

- get_config / from_config round trip, compute_output_shape, symbolic and eager calls;
- the same outputs in Sequential, Functional and subclassed models, and after a .keras
  save and load;
- Keras mask propagation: masked (padded) keys change nothing at the real positions;
- finite, non-zero gradients for every trainable weight, and a model.fit step;
- mixed_float16 and mixed_bfloat16 policies: compute dtype out, close to float32.
"""

from __future__ import annotations

import os

import keras
import numpy as np
import tensorflow as tf

BATCH, LENGTH, FEATURES = 2, 23, 16  # a length that is no multiple of any block size used


def random_inputs(seed, batch=BATCH, length=LENGTH, features=FEATURES):
    return np.random.default_rng(seed).normal(size=(batch, length, features)).astype("float32")


def _close(actual, expected, tol, what):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    error = np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-6)
    assert error <= tol, f"{what}: relative error {error:.3g} > {tol}"


def check_config(cls, layer):
    config = layer.get_config()
    clone = cls.from_config(config)
    assert clone.get_config() == config
    # Through Keras's own (de)serialization, as a .keras file stores it.
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is cls
    assert restored.get_config() == config


def check_calls(cls, init_kwargs, x):
    layer = cls(**init_kwargs)
    expected_shape = layer.compute_output_shape(x.shape)
    eager = layer(x)
    assert tuple(eager.shape) == tuple(expected_shape)
    assert np.isfinite(np.asarray(eager)).all()
    assert np.abs(np.asarray(eager)).max() > 0

    # Symbolic, with a static and with an unknown length.
    for length in (x.shape[1], None):
        symbolic = layer(keras.Input(shape=(length, x.shape[2])))
        assert tuple(symbolic.shape) == (None, length) + tuple(expected_shape[2:])
        assert symbolic.dtype == layer.compute_dtype

    # Self-attention written out (value = key = query) gives the same result.
    _close(layer(x, x, x), eager, 1e-6, "layer(x, x, x) vs layer(x)")

    sequential = keras.Sequential([keras.Input(shape=x.shape[1:]), layer])
    inputs = keras.Input(shape=x.shape[1:])
    functional = keras.Model(inputs, layer(inputs))

    class Wrapper(keras.Model):
        def __init__(self, attention, **kwargs):
            super().__init__(**kwargs)
            self.attention = attention

        def call(self, inputs):
            return self.attention(inputs)

    subclassed = Wrapper(layer)
    for name, model in (("Sequential", sequential), ("Functional", functional),
                        ("subclassed", subclassed)):
        _close(model(x), eager, 1e-6, f"{name} model")
        _close(model.predict(x, verbose=0), eager, 1e-5, f"{name} model.predict")
    return layer, functional, eager


def check_save_load(functional, x, expected, tmp_dir):
    path = os.path.join(tmp_dir, "model.keras")
    functional.save(path)
    loaded = keras.saving.load_model(path)
    _close(loaded(x), expected, 1e-6, ".keras save and load")
    original = functional.layers[-1]
    assert type(loaded.layers[-1]) is type(original)
    assert loaded.layers[-1].get_config() == original.get_config()


def check_masking(cls, init_kwargs, seed):
    """Right padding hidden by a Keras mask: the real positions see exactly what they would
    see in the unpadded sequences, causal or not."""
    layer = cls(**init_kwargs)
    x = random_inputs(seed)
    lengths = [LENGTH, LENGTH - 7]
    for i, n in enumerate(lengths):
        x[i, n:] = 0.0
    inputs = keras.Input(shape=(LENGTH, FEATURES))
    masked = keras.layers.Masking(mask_value=0.0)(inputs)
    outputs = layer(masked)
    model = keras.Model(inputs, outputs)
    result = np.asarray(model(x))
    mask = np.arange(LENGTH)[None, :] < np.array(lengths)[:, None]
    explicit = np.asarray(layer(x, value_mask=mask))
    _close(result, explicit, 1e-6, "Keras mask vs value_mask")
    for i, n in enumerate(lengths):
        alone = np.asarray(layer(x[i:i + 1, :n]))
        _close(result[i:i + 1, :n], alone, 1e-5, f"masked sample {i} vs its unpadded sequence")
    # The query's mask is passed on.
    output_mask = layer.compute_mask(masked, getattr(masked, "_keras_mask", None))
    assert output_mask is not None
    eager_masked = keras.layers.Masking(mask_value=0.0)(tf.constant(x))
    out = layer(eager_masked)
    assert getattr(out, "_keras_mask", None) is not None
    np.testing.assert_array_equal(np.asarray(out._keras_mask), mask)


def check_gradients(layer, x):
    variables = layer.trainable_weights
    assert variables, "the layer has no trainable weights"
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        # Fixed random weights, so no gradient vanishes by symmetry.
        probe = tf.constant(np.random.default_rng(7).normal(size=y.shape), y.dtype)
        loss = tf.reduce_sum(tf.cast(y * probe, tf.float32))
    grads = tape.gradient(loss, [x] + variables)
    for variable, grad in zip(["input"] + variables, grads):
        name = getattr(variable, "path", variable)
        assert grad is not None, f"no gradient for {name}"
        grad = np.asarray(grad, np.float64)
        assert np.isfinite(grad).all(), f"non-finite gradient for {name}"
        # The key bias adds q . b_k to every score of a query alike, which the softmax
        # cancels: its gradient is zero for any attention layer, MultiHeadAttention's too.
        if "key" in str(name) and str(name).endswith("bias"):
            continue
        assert np.abs(grad).max() > 0, f"zero gradient for {name}"


def check_fit(functional, x):
    model = keras.models.clone_model(functional)
    model.set_weights(functional.get_weights())
    y = np.random.default_rng(3).normal(size=model.output_shape[1:]).astype("float32")
    y = np.broadcast_to(y, (x.shape[0],) + y.shape)
    # XLA where the layer supports it (Keras's "auto" skips XLA on a CPU-only machine, so ask
    # for it); layers on the custom op must leave "auto" off XLA.
    supports_jit = all(layer.supports_jit for layer in model._flatten_layers())
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse",
                  jit_compile=True if supports_jit else "auto")
    assert model.jit_compile == supports_jit
    before = [np.array(w) for w in model.get_weights()]
    history = model.fit(x, y, batch_size=x.shape[0], epochs=2, verbose=0)
    losses = history.history["loss"]
    assert np.isfinite(losses).all()
    assert losses[1] < losses[0]
    changed = [not np.array_equal(a, np.asarray(b)) for a, b in zip(before, model.get_weights())]
    assert any(changed)


def check_mixed_precision(cls, init_kwargs, x, reference_layer, reference_out):
    for policy, tol in (("mixed_float16", 1e-2), ("mixed_bfloat16", 5e-2)):
        layer = cls(**init_kwargs, dtype=policy)
        layer(x)
        layer.set_weights(reference_layer.get_weights())
        out = layer(x)
        assert out.dtype == layer.compute_dtype, (policy, out.dtype)
        assert all(w.dtype == "float32" for w in layer.weights)
        _close(out, reference_out, tol, policy)
        check_gradients(layer, x)


def run_layer_test(cls, init_kwargs, tmp_dir, seed=0, masking=True, fit=True):
    """Runs every check on `cls(**init_kwargs)` with fresh random inputs."""
    x = random_inputs(seed)
    check_config(cls, cls(**init_kwargs))
    layer, functional, eager = check_calls(cls, init_kwargs, x)
    check_config(cls, layer)
    check_save_load(functional, x, eager, tmp_dir)
    check_gradients(layer, x)
    if fit:
        check_fit(functional, x)
    if masking:
        check_masking(cls, init_kwargs, seed + 1)
    check_mixed_precision(cls, init_kwargs, x, layer, eager)
