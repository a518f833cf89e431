"""tf.distribute.MirroredStrategy: a model with the sparse layers trains under model.fit across
two logical CPU devices, with the losses and weights of a single-device run."""

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Logical devices must be configured before TensorFlow initialises its runtime, hence a
# fresh process.
SCRIPT = textwrap.dedent("""
    import sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
    import keras
    import numpy as np
    import tf_sparse_attn as tsa

    def build(implementation):
        inputs = keras.Input(shape=(32, 16))
        h = inputs + tsa.StridedAttention(num_heads=2, key_dim=8, stride=4, block_size=2,
                                          implementation=implementation)(inputs)
        h = h + tsa.FixedAttention(num_heads=2, key_dim=8, stride=8, summary=2, block_size=2,
                                   num_summary_groups=2, implementation=implementation)(h)
        outputs = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(h))
        return keras.Model(inputs, outputs)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 32, 16)).astype("float32")
    y = rng.normal(size=(16, 1)).astype("float32")
    for implementation in sys.argv[1:]:
        keras.utils.set_random_seed(1)
        single = build(implementation)
        initial = single.get_weights()
        single.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        expected = single.fit(x, y, batch_size=8, epochs=3, shuffle=False,
                              verbose=0).history["loss"]

        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        assert strategy.num_replicas_in_sync == 2
        with strategy.scope():
            mirrored = build(implementation)
            mirrored.set_weights(initial)
            mirrored.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        losses = mirrored.fit(x, y, batch_size=8, epochs=3, shuffle=False,
                              verbose=0).history["loss"]
        assert losses[-1] < losses[0], losses
        np.testing.assert_allclose(losses, expected, rtol=1e-4)
        for a, b in zip(mirrored.get_weights(), single.get_weights()):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        print("mirrored ok", implementation, losses)
""")


def test_mirrored_strategy_matches_single_device(op_library):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", SCRIPT, "op", "portable"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "mirrored ok op" in result.stdout
    assert "mirrored ok portable" in result.stdout
