"""One traced training step of a fixed-pattern model of a given depth, for the tests that
measure how activation memory grows with depth (on the GPU, and in a subprocess on the CPU)."""

import dataclasses

import tensorflow as tf

from tests import _models_path  # noqa: F401  pylint: disable=unused-import
from tf_sparse_attn.models import build_model, get_config
from tf_sparse_attn.models.model import bits_per_dim


def traced_step(num_layers, recompute, seq_len, d_model, batch, xla_blocks="auto"):
    """(model, step): step() runs forward and backward on fixed random tokens and returns the
    gradients; it is traced already, so that a measurement of its first run sees the step's
    memory and not the tracing's."""
    config = dataclasses.replace(
        get_config("tiny").model, num_layers=num_layers, seq_len=seq_len,
        position_shape=(seq_len // 128, 128), d_model=d_model, num_heads=4, block_size=32,
        stride=128, summary=32, recompute=recompute, xla_blocks=xla_blocks)
    model = build_model(config)
    tokens = tf.random.uniform([batch, seq_len], 0, 256, tf.int32, seed=0)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(bits_per_dim(tokens, model(tokens, training=True)))
        return tape.gradient(loss, model.trainable_weights)

    step.get_concrete_function()
    return model, step
