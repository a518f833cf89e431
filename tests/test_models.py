"""The Sparse Transformer model: configs, factorized embeddings, init scaling, recomputation,
cached sampling and SavedModel export. Tiny configurations only."""

import dataclasses
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import _models_path  # noqa: F401
from tests._depth_step import traced_step
from tf_sparse_attn.models import (CONFIGS, ConfigError, FactorizedPositionEmbedding,
                                   build_model, get_config, validate)
from tf_sparse_attn.models.export import export_saved_model
from tf_sparse_attn.models.model import CausalMultiHeadAttention, bits_per_dim
from tf_sparse_attn.models.sampling import Sampler, key_table, write_samples

KINDS = ["fixed", "local,strided", "strided_merged", "strided_split", "fixed_split",
         "fixed_block,fixed_summary", "dense", "mha"]


def tiny(**changes):
    return dataclasses.replace(get_config("tiny").model, **changes)


def randomize_head(model, seed=0):
    # The logits start at zero; a random head makes comparisons of logits meaningful.
    model.head.kernel.assign(tf.random.stateless_normal(model.head.kernel.shape, [seed, 1]))


# ---------------------------------------------------------------------------- configs

def test_paper_configs():
    cifar, enwik8, imagenet = (get_config(n).model for n in ("cifar10", "enwik8", "imagenet64"))
    assert (cifar.num_layers, cifar.d_model, cifar.num_heads) == (128, 256, 2)
    assert cifar.layer_kinds()[:3] == ["local", "strided", "local"]
    assert cifar.position_shape == (32, 32, 3)
    assert (enwik8.num_layers, enwik8.d_model, enwik8.num_heads, enwik8.seq_len) == (
        30, 512, 8, 12288)
    assert (enwik8.attention, enwik8.stride, enwik8.summary) == ("fixed", 128, 32)
    assert (imagenet.num_layers, imagenet.d_model, imagenet.num_heads) == (48, 512, 16)
    assert get_config("audio_1m").model.seq_len == 2 ** 20
    for name in CONFIGS:
        validate(get_config(name))


def test_audio_1m_has_about_3m_parameters():
    m = get_config("audio_1m").model
    d = m.d_model
    per_layer = 4 * d * d + 4 * d + 2 * m.ffn_multiplier * d * d + 5 * d + m.ffn_multiplier * d
    total = m.num_layers * per_layer + (m.vocab_size + 1) * d + sum(m.position_shape) * d + (
        d * m.vocab_size + m.vocab_size + 2 * d)
    assert 2.5e6 < total < 3.5e6


@pytest.mark.parametrize("overrides,message", [
    ({"model.attention": "local,strided", "model.seq_len": 96, "model.position_shape": (6, 16)},
     "cannot take seq_len=96"),
    ({"model.num_heads": 3}, "not divisible by num_heads"),
    ({"model.position_shape": (4, 16)}, "covers 64 positions"),
    ({"model.attention": "sparse"}, "unknown attention kind"),
    ({"model.seq_len": 100, "model.position_shape": (100,)}, "multiple of block_size"),
    ({"data.task": "cifar10"}, "32, 32, 3"),
    ({"train.mixed_precision": "fp8"}, "mixed_precision"),
    ({"model.xla_blocks": "yes"}, "xla_blocks"),
])
def test_bad_configs_fail_clearly(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(get_config("tiny", overrides))


def test_overrides_parse_and_reject_unknown_fields():
    config = get_config("tiny", ["model.num_layers=3", "train.mixed_precision=none",
                                 "model.position_shape=(2, 64)", "model.recompute=false"])
    assert config.model.num_layers == 3 and config.train.mixed_precision is None
    assert config.model.position_shape == (2, 64) and config.model.recompute is False
    with pytest.raises(ConfigError, match="no field"):
        get_config("tiny", ["model.depth=3"])
    with pytest.raises(ConfigError, match="unknown config"):
        get_config("huge")
    assert type(config).from_json(config.to_json()) == config


# ------------------------------------------------------------------ embeddings and init

def test_factorized_position_embedding():
    layer = FactorizedPositionEmbedding((3, 4, 5), 8)
    positions = np.arange(60)
    out = layer(positions).numpy()
    tables = [t.numpy() for t in layer.tables]
    for t in (0, 7, 23, 59):
        r, c, ch = t // 20, (t // 5) % 4, t % 5
        np.testing.assert_allclose(out[t], tables[0][r] + tables[1][c] + tables[2][ch],
                                   rtol=1e-6)
    np.testing.assert_allclose(layer.full().numpy(), out, rtol=1e-6)
    np.testing.assert_allclose(layer.full(10).numpy(), out[:10], rtol=1e-6)
    assert layer.count_params() == (3 + 4 + 5) * 8
    # (t div l, t mod l) for sequences.
    seq = FactorizedPositionEmbedding((4, 16), 2)
    seq.build()
    assert [i.numpy().tolist() for i in seq.axis_indices(np.array([0, 17, 63]))] == [
        [0, 1, 3], [0, 1, 15]]


def test_zero_logits_and_depth_scaled_output_projections():
    config = tiny(num_layers=8, d_model=64, init_scale=0.02)
    model = build_model(config)
    logits = model(np.random.randint(0, 256, [2, config.seq_len]))
    assert float(tf.reduce_max(tf.abs(logits))) == 0.0
    bits = float(tf.reduce_mean(bits_per_dim(np.zeros([2, config.seq_len]), logits)))
    assert bits == pytest.approx(8.0, abs=1e-5)
    scale = 1 / math.sqrt(2 * config.num_layers)
    ffn_in = np.concatenate([b.ffn_in.kernel.numpy().ravel() for b in model.blocks])
    ffn_out = np.concatenate([b.ffn_out.kernel.numpy().ravel() for b in model.blocks])
    attn_q = np.concatenate([b.attention.query_dense.kernel.numpy().ravel()
                             for b in model.blocks])
    attn_o = np.concatenate([b.attention.output_dense.kernel.numpy().ravel()
                             for b in model.blocks])
    assert ffn_in.std() == pytest.approx(0.02, rel=0.05)
    assert attn_q.std() == pytest.approx(0.02, rel=0.05)
    assert ffn_out.std() == pytest.approx(0.02 * scale, rel=0.05)
    assert attn_o.std() == pytest.approx(0.02 * scale, rel=0.05)


def test_attention_kinds_build_the_right_layers():
    model = build_model(tiny(attention="local,strided", num_layers=2))
    first, second = (b.attention for b in model.blocks)
    assert first.pattern == "local" and second.combine == "strided"
    assert len(model.blocks[0].attention.layouts_for(128)) == 1


# ------------------------------------------------------------------------- recompute

@pytest.mark.parametrize("attention,xla_blocks", [("fixed", False), ("local,strided", False),
                                                   ("local,strided", True)])
def test_recomputed_gradients_equal_plain(attention, xla_blocks):
    model = build_model(tiny(attention=attention, dropout=0.2, xla_blocks=xla_blocks))
    randomize_head(model)
    tokens = np.random.default_rng(0).integers(0, 256, [2, 128])
    seed = tf.constant([7, 11])

    def gradients(recompute):
        for block in model.blocks:
            block.config = dataclasses.replace(block.config, recompute=recompute)
        with tf.GradientTape() as tape:
            x = model.embed(tokens)
            for block in model.blocks:
                x = block(x, training=True, seed=seed)
            logits = model.head(model.final_norm(x))
            loss = tf.reduce_mean(bits_per_dim(tokens, logits))
        return loss, tape.gradient(loss, model.trainable_weights)

    loss_r, grads_r = gradients(True)
    loss_p, grads_p = gradients(False)
    assert float(loss_r) == pytest.approx(float(loss_p), rel=1e-6)
    assert all(g is not None for g in grads_r)
    grads_r, grads_p = ([tf.convert_to_tensor(g).numpy() for g in grads]
                        for grads in (grads_r, grads_p))
    # tf.recompute_grad reruns the same kernels. The XLA programs' recomputing backward passes
    # are other compilations, whose float32 sums round differently: there, gradients are
    # compared at the scale of the largest (the keys' bias gradients are zero up to rounding).
    atol = 1e-6 * max(np.abs(g).max() for g in grads_p) if xla_blocks else 1e-7
    for weight, a, b in zip(model.trainable_weights, grads_r, grads_p):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol, err_msg=weight.path)
    # Dropout is live: another seed gives another loss.
    for block in model.blocks:
        block.config = dataclasses.replace(block.config, recompute=True)
    x = model.embed(tokens)
    for block in model.blocks:
        x = block(x, training=True, seed=tf.constant([1, 2]))
    other = tf.reduce_mean(bits_per_dim(tokens, model.head(model.final_norm(x))))
    assert float(other) != pytest.approx(float(loss_r), rel=1e-6)


def _block_gradients(model, tokens):
    with tf.GradientTape() as tape:
        logits = model(tokens, training=True)
        loss = tf.reduce_mean(bits_per_dim(tokens, logits))
    return loss, [tf.convert_to_tensor(g) for g in tape.gradient(loss, model.trainable_weights)]


@pytest.mark.parametrize("attention", ["fixed", "dense", "mha", "strided_merged"])
def test_xla_blocks_equal_keras_layers(attention):
    """The XLA programs compute what the blocks' Keras layers compute, and every layer shares
    one compilation of them."""
    from tf_sparse_attn.models import model as model_lib  # pylint: disable=import-outside-toplevel

    # A width no other test uses, so the programs are traced here for the first time.
    width = {"fixed": 80, "dense": 96, "mha": 112, "strided_merged": 128}[attention]
    config = tiny(attention=attention, d_model=width, num_heads=2, num_layers=3)
    model = build_model(dataclasses.replace(config, xla_blocks=True))
    randomize_head(model)
    tokens = np.random.default_rng(3).integers(0, 256, [2, 128])
    programs = (model_lib._feed_forward_residual_xla, model_lib._attention_inputs_xla,
                model_lib._layer_norm_xla, model_lib._attention_inputs_after_xla,
                model_lib._feed_forward_residual_grad_xla, model_lib._attention_inputs_grad_xla)
    traces = [p.experimental_get_tracing_count() for p in programs]
    loss_x, grads_x = _block_gradients(model, tokens)
    # The library's layers have their projections compiled with the LayerNorm before them,
    # and their backward passes recompute inside the programs that differentiate;
    # keras.layers.MultiHeadAttention runs whole, after a compiled LayerNorm, and recomputes
    # through tf.recompute_grad.
    expected = [1, 0, 1, 0, 0, 0] if attention == "mha" else [1, 1, 0, 1, 1, 1]
    assert [p.experimental_get_tracing_count() - t for p, t in zip(programs, traces)] == expected
    for block in model.blocks:
        block.config = dataclasses.replace(block.config, xla_blocks=False)
    loss_k, grads_k = _block_gradients(model, tokens)
    assert float(loss_x) == pytest.approx(float(loss_k), rel=1e-6)
    # XLA's own erf and rsqrt round differently in float32; the keys' bias gradients are zero
    # up to that rounding (softmax ignores a shift common to all keys).
    scale = max(float(tf.reduce_max(tf.abs(g))) for g in grads_k)
    for weight, a, b in zip(model.trainable_weights, grads_x, grads_k):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * scale, err_msg=weight.path)
    # Outside training the Keras layers run: what a SavedModel or the sampler traces.
    for block in model.blocks:
        block.config = dataclasses.replace(block.config, xla_blocks=True)
    inference, training = model(tokens).numpy(), model(tokens, training=True).numpy()
    np.testing.assert_allclose(inference, training, rtol=1e-5, atol=1e-6 * np.abs(training).max())


def test_xla_blocks_auto_follows_the_visible_devices():
    from tf_sparse_attn.models.model import xla_enabled  # pylint: disable=import-outside-toplevel

    assert xla_enabled("auto") == bool(tf.config.list_logical_devices("GPU"))
    assert xla_enabled(True) and not xla_enabled(False)


def test_fit_with_and_without_recompute_takes_the_same_steps():
    tokens = np.random.default_rng(1).integers(0, 256, [8, 128])
    weights = []
    for recompute in (True, False):
        keras.utils.set_random_seed(0)
        model = build_model(tiny(recompute=recompute))
        model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(
            from_logits=True), jit_compile=False)
        model.fit(tokens, tokens, batch_size=4, epochs=1, shuffle=False, verbose=0)
        weights.append(model.get_weights())
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_whole_model_saves_and_loads(tmp_path):
    model = build_model(tiny(attention="local,strided", dropout=0.1))
    randomize_head(model)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    tokens = np.random.default_rng(6).integers(0, 256, [2, 128])
    assert loaded.config == model.config
    np.testing.assert_allclose(loaded(tokens).numpy(), model(tokens).numpy(), atol=1e-6)


# -------------------------------------------------------------------------- sampling

@pytest.mark.parametrize("attention", KINDS)
def test_cached_steps_equal_full_forward(attention):
    model = build_model(tiny(attention=attention, num_summary_groups=2,
                             summary=8, stride=16))
    randomize_head(model)
    tokens = np.random.default_rng(2).integers(0, 256, [2, 128])
    full = model(tokens).numpy()
    stepped = Sampler(model, batch_size=2).logits_of(tokens)
    np.testing.assert_allclose(stepped, full, rtol=1e-4, atol=1e-4)


def test_key_tables_hold_the_pattern_exactly():
    model = build_model(tiny(attention="fixed,strided_merged"))
    fixed = key_table(model.blocks[0].attention, 128)
    t = 37  # stride 16, summary 8: own block 32..37 and summaries 8..15, 24..31
    assert fixed.shape[1] == 1  # every head shares the keys
    assert fixed[t, 0][fixed[t, 0] >= 0].tolist() == list(range(8, 16)) + list(range(24, 38))
    merged = key_table(model.blocks[1].attention, 128)
    keys = merged[t, 0][merged[t, 0] >= 0].tolist()
    assert keys == sorted(set(range(22, 38)) | set(range(5, 38, 16)))
    split = key_table(build_model(tiny(attention="strided_split")).blocks[0].attention, 128)
    assert split.shape[1] == 2
    assert split[t, 0][split[t, 0] >= 0].tolist() == list(range(22, 38))
    assert split[t, 1][split[t, 1] >= 0].tolist() == list(range(5, 38, 16))


def test_sampling_with_prompt_temperature_and_writers(tmp_path):
    model = build_model(tiny())
    randomize_head(model, seed=3)
    sampler = Sampler(model, batch_size=3)
    prompt = np.tile(np.frombuffer(b"def f(", np.uint8)[None], [3, 1])
    tokens = sampler.sample(temperature=0.7, seed=1, prompt=prompt)
    assert tokens.shape == (3, 128) and (tokens[:, :6] == prompt).all()
    np.testing.assert_array_equal(tokens, sampler.sample(temperature=0.7, seed=1,
                                                         prompt=prompt))
    greedy = sampler.sample(temperature=0.0)
    assert (greedy == greedy[0]).all()  # no randomness: every row the same
    with pytest.raises(ValueError, match="outside"):
        sampler.sample(prompt=np.full([3, 2], 300))

    (text,) = write_samples(tokens, "bytes", str(tmp_path / "s"))
    assert open(text, "rb").read().startswith(b"def f(")
    image_tokens = np.random.default_rng(0).integers(0, 256, [5, 4 * 4 * 3])
    (png,) = write_samples(image_tokens, "cifar10", str(tmp_path / "img"), image_shape=(4, 4, 3))
    grid = tf.io.decode_png(tf.io.read_file(png)).numpy()
    assert grid.shape == (8, 12, 3)  # 5 images in a 2 x 3 grid
    np.testing.assert_array_equal(grid[:4, 4:8], image_tokens[1].reshape(4, 4, 3))
    wavs = write_samples(tokens[:2], "audio", str(tmp_path / "a"), sample_rate=8000)
    from tf_sparse_attn.models.data import read_wav
    samples, rate = read_wav(wavs[0])
    assert rate == 8000 and samples.shape == (128,)


# ---------------------------------------------------------------------------- export

def _op_types(path):
    loaded = tf.saved_model.load(path)
    graph = loaded.signatures["serving_default"].graph.as_graph_def()
    ops = {node.op for node in graph.node}
    for function in graph.library.function:
        ops |= {node.op for node in function.node_def}
    return loaded, ops


def test_export_portable_serves_next_token_log_probs(tmp_path):
    model = build_model(tiny(attention="local,strided"))
    randomize_head(model)
    path = export_saved_model(model, str(tmp_path / "1"), implementation="portable")
    loaded, ops = _op_types(path)
    assert not any("Sparse" in op for op in ops), sorted(ops)
    tokens = np.random.default_rng(3).integers(0, 256, [2, 20]).astype(np.int32)
    out = loaded.signatures["serving_default"](tokens=tf.constant(tokens))
    expected = tf.nn.log_softmax(model(np.pad(tokens, [[0, 0], [0, 1]]))).numpy()
    np.testing.assert_allclose(out["log_probs"].numpy(), expected, atol=1e-4)
    np.testing.assert_allclose(out["next_token_log_probs"].numpy(), expected[:, -1], atol=1e-4)
    np.testing.assert_allclose(np.exp(out["next_token_log_probs"].numpy()).sum(-1), 1.0,
                               rtol=1e-5)


def test_export_op_path(tmp_path, op_library):
    model = build_model(tiny(implementation="portable"))
    randomize_head(model)
    path = export_saved_model(model, str(tmp_path / "op"), implementation="op")
    loaded, ops = _op_types(path)
    assert any("BlockSparseAttention" in op for op in ops)
    tokens = np.random.default_rng(4).integers(0, 256, [1, 50]).astype(np.int32)
    out = loaded.signatures["serving_default"](tokens=tf.constant(tokens))
    expected = tf.nn.log_softmax(model(np.pad(tokens, [[0, 0], [0, 1]]))).numpy()
    np.testing.assert_allclose(out["log_probs"].numpy(), expected, atol=1e-4)


# --------------------------------------------------------------------- mixed precision

def test_bfloat16_policy_trains_with_float32_logits():
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = build_model(tiny(implementation="portable"))
        tokens = np.random.default_rng(5).integers(0, 256, [4, 128])
        logits = model(tokens)
        assert logits.dtype == tf.float32
        assert model.blocks[0].attention_norm.compute_dtype == "bfloat16"
        model.compile(keras.optimizers.AdamW(1e-3), keras.losses.SparseCategoricalCrossentropy(
            from_logits=True), jit_compile=False)
        history = model.fit(tokens, tokens, batch_size=4, epochs=2, verbose=0)
        assert np.isfinite(history.history["loss"]).all()
    finally:
        keras.mixed_precision.set_global_policy(policy)


@pytest.mark.gpu
def test_recompute_keeps_activation_memory_flat_in_depth():
    """With recomputation only the residual stream between blocks stays alive, so peak memory
    grows with depth by little more than the weights; without it, by every block's
    activations."""

    def peak_bytes(num_layers, recompute):
        model, step = traced_step(num_layers, recompute, seq_len=4096, d_model=256, batch=2)
        tf.config.experimental.reset_memory_stats("GPU:0")
        grads = step()
        peak = tf.config.experimental.get_memory_info("GPU:0")["peak"]
        del grads
        return peak - 2 * 4 * model.count_params()  # less weights and gradients

    plain = peak_bytes(8, False) - peak_bytes(2, False)
    recomputed = peak_bytes(8, True) - peak_bytes(2, True)
    assert recomputed < 0.35 * plain, (recomputed, plain)


_PEAK_RSS_SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
from tests._depth_step import traced_step

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

_, step = traced_step({layers}, {recompute}, seq_len=2048, d_model=128, batch=4,
                     xla_blocks={xla_blocks!r})
# Measure the first run: a second one would reuse the pages that the allocator kept from the
# first and show no growth at all.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
before = status("VmRSS")
grads = step()
print(json.dumps(status("VmHWM") - before))
"""


@pytest.mark.parametrize("xla_blocks", [False, True])
def test_recompute_keeps_activation_memory_flat_in_depth_on_cpu(xla_blocks):
    """The CPU twin of the GPU test: peak RSS of one training step, each in its own process;
    also through the XLA programs, where the block's custom gradient does the recomputing."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def peak(layers, recompute):
        script = _PEAK_RSS_SCRIPT.format(root=root, layers=layers, recompute=recompute,
                                         xla_blocks=xla_blocks)
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
                                       CUDA_VISIBLE_DEVICES=""), timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    plain = peak(8, False) - peak(2, False)
    recomputed = peak(8, True) - peak(2, True)
    assert plain > 100 * 2 ** 20, plain  # six more layers keep their activations alive
    assert recomputed < 0.35 * plain, (recomputed, plain)


def test_causal_multi_head_attention_is_keras_causal_attention():
    """The MultiHeadAttention baseline, which passes its own causal mask, attends as
    keras.layers.MultiHeadAttention with use_causal_mask, at a fixed and an unknown length."""
    x = tf.constant(np.random.default_rng(5).normal(size=[2, 48, 16]), tf.float32)
    ours = CausalMultiHeadAttention(num_heads=2, key_dim=8)
    reference = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8)
    ours(x)
    reference(x, x)
    reference.set_weights(ours.get_weights())
    expected = reference(x, x, use_causal_mask=True)
    np.testing.assert_allclose(ours(x), expected, atol=1e-5)
    unknown_length = tf.function(ours, input_signature=[tf.TensorSpec([2, None, 16])])
    np.testing.assert_allclose(unknown_length(x), expected, atol=1e-5)
    # Causal: changing the last position leaves every earlier output as it was.
    changed = tf.concat([x[:, :-1], x[:, -1:] + 1.0], axis=1)
    np.testing.assert_allclose(ours(changed)[:, :-1], ours(x)[:, :-1], atol=1e-6)
    assert not np.allclose(ours(changed)[:, -1], ours(x)[:, -1], atol=1e-3)
    # A caller's own mask still applies, together with causality.
    padding = np.ones([2, 48, 48], bool)
    padding[:, :, :5] = False
    np.testing.assert_allclose(
        ours(x, attention_mask=padding),
        reference(x, x, attention_mask=padding, use_causal_mask=True), atol=1e-5)
