"""The deep Sparse Transformer (Child et al. 2019, sections 5 and 6) as a Keras 3 model.

Pre-LayerNorm residual blocks: x += Dropout(Attention(LN(x))); x += Dropout(W2 GELU(W1 LN(x)))
with W1 of width 4d. Dropout sits only at the end of each residual branch. The output
projections of both branches start scaled by 1/sqrt(2N) for N layers, so the residual stream's
variance does not grow with depth; the logits start at zero, so the first loss is log(256).
Positions are learned factorized embeddings (`embeddings.py`). Each layer takes its own
attention kind from the configuration's cycle (`ModelConfig.attention`).

Each block is recomputed in the backward pass (`tf.recompute_grad`): only the residual stream
between blocks stays alive, so activation memory does not grow with depth beyond it. Dropout
inside a recomputed block draws from a stateless generator seeded once per forward pass, so the
recomputation sees the same masks. `ModelConfig.recompute=False` keeps activations instead.

In training on a GPU (`ModelConfig.xla_blocks`), a block's LayerNorms, attention projections,
feed-forward, dropouts and residual additions run as two XLA programs compiled once for all
layers, before and after the attention op, which XLA cannot compile. TensorFlow's own kernels
for them launch dozens of memory-bound kernels per block. A recomputed block's backward pass
recomputes each program's forward inside the program that differentiates it, so that the
intermediates of the forward (LayerNorm statistics, the feed-forward's hidden activations,
dropout masks) need not be written to memory and read back. (XLA's stateless random numbers differ
from TensorFlow's kernels', so the dropout masks differ between the two paths.)

Tokens are the targets: the model shifts them right behind a start token (id = vocab_size), so
logits[:, t] predict tokens[:, t] from tokens[:, :t], and `model.fit(x=tokens, y=tokens)` trains
it.

>>> import numpy as np
>>> from tf_sparse_attn.models import build_model, get_config
>>> model = build_model(get_config("tiny").model)
>>> model(np.zeros([2, 128], np.int32)).shape
TensorShape([2, 128, 256])
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from tf_sparse_attn.layers.projection import DenseProjection, add_bias
from tf_sparse_attn.layers.sparse_multi_head_attention import SparseMultiHeadAttention
from tf_sparse_attn.models.config import ModelConfig
from tf_sparse_attn.models.embeddings import FactorizedPositionEmbedding

LN_EPSILON = 1e-5


@keras.saving.register_keras_serializable(package="tf_sparse_attn")
class ScaledInitializer(keras.initializers.Initializer):
    """`base` scaled by a constant: the depth scaling 1/sqrt(2N) of the output projections."""

    def __init__(self, base, scale):
        self.base = keras.initializers.get(base)
        self.scale = float(scale)

    def __call__(self, shape, dtype=None):
        return self.base(shape, dtype=dtype) * self.scale

    def get_config(self):
        return {"base": keras.initializers.serialize(self.base), "scale": self.scale}


@keras.saving.register_keras_serializable(package="tf_sparse_attn")
class CausalMultiHeadAttention(keras.layers.MultiHeadAttention):
    """`keras.layers.MultiHeadAttention` as causal self-attention with the library layers'
    interface: the dense T x T baseline the sparse layers are measured against."""

    def build(self, query_shape, value_shape=None, key_shape=None):
        super().build(query_shape, value_shape or query_shape, key_shape)

    def call(self, query, value=None, key=None, training=None, **kwargs):
        value = query if value is None else value
        # use_causal_mask builds the T x T mask from lengths read at run time, so graph
        # optimisation cannot see its size before evaluating it: it evaluated the mask in every
        # layer and every recomputed copy, then dropped it as too large to keep (minutes before
        # the first step of the 30-layer model at T=12288). At a fixed length this mask's
        # shape is known, and above the optimiser's size limit it is skipped unevaluated.
        positions = keras.ops.cumsum(keras.ops.ones_like(query[0, :, 0], dtype="int32")) - 1
        causal = keras.ops.greater_equal(positions[:, None], positions[None, :])[None]
        mask = kwargs.pop("attention_mask", None)
        if mask is not None:
            causal = keras.ops.logical_and(keras.ops.cast(mask, "bool"), causal)
        return super().call(query, value, key, training=training, attention_mask=causal,
                            **kwargs)

    # The projections under the names the sampler and the init scaling use.
    query_dense = property(lambda self: self._query_dense)
    key_dense = property(lambda self: self._key_dense)
    value_dense = property(lambda self: self._value_dense)
    output_dense = property(lambda self: self._output_dense)


def make_attention(kind: str, config: ModelConfig, name: str | None = None):
    """The library layer for one attention kind (see config.ATTENTION_KINDS)."""
    from tf_sparse_attn import layers  # pylint: disable=import-outside-toplevel

    if kind == "mha":
        return CausalMultiHeadAttention(
            num_heads=config.num_heads, key_dim=config.head_dim, dropout=0.0,
            kernel_initializer=keras.initializers.RandomNormal(stddev=config.init_scale),
            name=name)

    common = dict(num_heads=config.num_heads, key_dim=config.head_dim,
                  block_size=config.block_size, causal=True, dropout=0.0,
                  implementation=config.implementation,
                  # The layers build layouts per length; an unknown length (a serving
                  # signature) takes the configured one.
                  max_length=config.seq_len,
                  kernel_initializer=keras.initializers.RandomNormal(stddev=config.init_scale),
                  name=name)
    if kind == "dense":
        return layers.SparseMultiHeadAttention(pattern="dense", **common)
    if kind == "local":
        return layers.LocalAttention(window=config.local_window, **common)
    if kind == "strided":
        return layers.StridedAttention(stride=config.stride, combine="strided", **common)
    if kind in ("strided_merged", "strided_split"):
        return layers.StridedAttention(stride=config.stride, combine=kind.split("_")[1],
                                       **common)
    if kind in ("fixed", "fixed_split", "fixed_block", "fixed_summary"):
        combine = "merged" if kind == "fixed" else kind.split("_")[1]
        return layers.FixedAttention(stride=config.stride, summary=config.summary,
                                     num_summary_groups=config.num_summary_groups,
                                     combine=combine, **common)
    raise ValueError(f"unknown attention kind {kind!r}")


def _dropout(x, rate, seed):
    # Stateless, so a recomputed block draws the same mask from the same seed.
    return tf.nn.experimental.stateless_dropout(x, rate=rate, seed=seed)


# The arithmetic of a block around its attention, written over tensors rather than layers so
# that one XLA compilation (forward and backward) serves every layer of a model: the weights
# are arguments, not captured variables. The operations are those the Keras layers run.

def _layer_norm(x, gamma, beta, dtype):
    return keras.ops.cast(keras.ops.layer_normalization(x, gamma, beta, epsilon=LN_EPSILON), dtype)


def _project(x, kernel, bias, equation):
    return add_bias(keras.ops.einsum(equation, x, keras.ops.cast(kernel, x.dtype)), bias)


def _attention_inputs(x, gamma, beta, projections, dtype):
    """q, k, v [batch, time, heads, dim] of LN(x); projections: three (kernel, bias) pairs."""
    normed = _layer_norm(x, gamma, beta, dtype)
    return tuple(_project(normed, kernel, bias, "abc,cde->abde") for kernel, bias in projections)


def _feed_forward_residual(x, h, output_projection, gamma, beta, w_in, b_in, w_out, b_out,
                           seeds, rate):
    """x + Dropout(h), then that plus Dropout(W_out GELU(W_in LN(.))): all of a block after its
    attention. output_projection: None when h is the attention layer's output, else the
    (kernel, bias) that takes h, the attended heads [batch, time, heads, dim], to it. seeds:
    the two dropout seeds, or None without dropout."""
    dtype = h.dtype
    if output_projection is not None:
        h = _project(h, *output_projection, "abcd,cde->abe")
    if seeds is not None:
        h = _dropout(h, rate, seeds[0])
    x = x + h
    f = _layer_norm(x, gamma, beta, dtype)
    f = keras.activations.gelu(add_bias(keras.ops.matmul(f, keras.ops.cast(w_in, dtype)), b_in))
    f = add_bias(keras.ops.matmul(f, keras.ops.cast(w_out, dtype)), b_out)
    if seeds is not None:
        f = _dropout(f, rate, seeds[1])
    return x + f


# The backward pass of a recomputed block recomputes each program's forward inside the program
# that differentiates it: XLA then keeps the intermediates (LayerNorm statistics, the GELU's
# input, dropout masks) on chip or recomputes them, where a forward program called under a tape
# writes every intermediate the backward reads to memory.

def _attention_inputs_after(x, gamma, beta, projections, dtype, after):
    """_attention_inputs that waits for `after`, the block's output gradient: without that
    data dependency the recomputations of all blocks could run as soon as the forward pass
    ends, and all their outputs be alive at once."""
    x = x + keras.ops.cast(keras.ops.reshape(after, [-1])[0] * 0, x.dtype)
    return _attention_inputs(x, gamma, beta, projections, dtype)


def _attention_inputs_grad(x, gamma, beta, projections, dtype, dq, dk, dv, dx_rest):
    """(dx + dx_rest, dgamma, dbeta, the projections' (dkernel, dbias) pairs) for the
    gradients dq, dk, dv of _attention_inputs' outputs."""
    with tf.GradientTape() as tape:
        tape.watch([x, gamma, beta, projections])
        q, k, v = _attention_inputs(x, gamma, beta, projections, dtype)
    dx, dgamma, dbeta, dprojections = tape.gradient(
        [q, k, v], [x, gamma, beta, projections], output_gradients=[dq, dk, dv])
    return dx + dx_rest, dgamma, dbeta, dprojections


def _feed_forward_residual_grad(x, h, output_projection, gamma, beta, w_in, b_in, w_out, b_out,
                                seeds, rate, dy):
    """The gradients of _feed_forward_residual, given dy for its output, with respect to its
    tensor arguments but the seeds, in their order (output_projection's as a pair)."""
    sources = [x, h, output_projection, gamma, beta, w_in, b_in, w_out, b_out]
    with tf.GradientTape() as tape:
        tape.watch(sources)
        y = _feed_forward_residual(*sources, seeds, rate)
    return tape.gradient(y, sources, output_gradients=dy)


_layer_norm_xla = tf.function(_layer_norm, jit_compile=True)
_attention_inputs_xla = tf.function(_attention_inputs, jit_compile=True)
_feed_forward_residual_xla = tf.function(_feed_forward_residual, jit_compile=True)
_attention_inputs_after_xla = tf.function(_attention_inputs_after, jit_compile=True)
_attention_inputs_grad_xla = tf.function(_attention_inputs_grad, jit_compile=True)
_feed_forward_residual_grad_xla = tf.function(_feed_forward_residual_grad, jit_compile=True)


def xla_enabled(setting) -> bool:
    """Whether an XLA setting (True, False or "auto": when TensorFlow sees a GPU) is on here:
    ModelConfig.xla_blocks, FusedAdamW's jit_compile."""
    if setting == "auto":
        return bool(tf.config.list_logical_devices("GPU"))
    return bool(setting)


@keras.saving.register_keras_serializable(package="tf_sparse_attn")
class TransformerBlock(keras.layers.Layer):
    """One pre-LayerNorm residual block: attention then a GELU feed-forward of width 4d.

    call(x, training=None, seed=None): seed, an int [2] tensor, fixes the dropout masks (the
    block's own seed, advanced once per training call, when None)."""

    def __init__(self, config: ModelConfig, kind: str, **kwargs):
        # The block reads its sublayers' float32 weights for the XLA programs, which cast them
        # there; the sublayers still cast theirs under mixed precision, and call() its input.
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.config = config
        self.kind = kind
        d = config.d_model
        depth_scale = 1.0 / math.sqrt(2 * config.num_layers)
        normal = keras.initializers.RandomNormal(stddev=config.init_scale)
        self.attention_norm = keras.layers.LayerNormalization(epsilon=LN_EPSILON,
                                                              name="attention_norm")
        self.attention = make_attention(kind, config, name="attention")
        self.ffn_norm = keras.layers.LayerNormalization(epsilon=LN_EPSILON, name="ffn_norm")
        # Dense layers whose bias gradient is a matrix product (see tf_sparse_attn's
        # projections): the reduction TensorFlow uses is slow for long sequences on the GPU.
        self.ffn_in = DenseProjection(config.ffn_multiplier * d, activation="gelu",
                                      kernel_initializer=normal, name="ffn_in")
        self.ffn_out = DenseProjection(d, kernel_initializer=ScaledInitializer(
            normal, depth_scale), name="ffn_out")
        self.depth_scale = depth_scale
        self.rate = float(config.dropout)

    def build(self, input_shape):
        d = self.config.d_model
        self.attention_norm.build((None, None, d))
        self.ffn_norm.build((None, None, d))
        self.ffn_in.build((None, None, d))
        self.ffn_out.build((None, None, self.config.ffn_multiplier * d))
        self.attention.build((None, None, d))
        if self.rate > 0:
            # [stream, counter]: the dropout seed of the next training call. A weight rather
            # than a SeedGenerator so that checkpoints and backups carry it, and a resumed run
            # draws the masks an uninterrupted one would.
            self.dropout_seed = self.add_weight(
                name="dropout_seed", shape=(2,), dtype="int64", trainable=False,
                initializer=keras.initializers.Constant(
                    [int(np.random.randint(0, 2 ** 31 - 1)), 0]))
        # The attention layer takes one initializer for all its projections; the output one
        # then takes the depth scaling.
        kernel = self.attention.output_dense.kernel
        kernel.assign(kernel * self.depth_scale)
        self.built = True

    def _residual(self, x, training, seed):
        if training and xla_enabled(self.config.xla_blocks):
            return self._residual_xla(x, seed)
        h = self.attention(self.attention_norm(x), training=training)
        if seed is not None:
            h = _dropout(h, self.rate, seed[0])
        x = x + h
        h = self.ffn_out(self.ffn_in(self.ffn_norm(x)))
        if seed is not None:
            h = _dropout(h, self.rate, seed[1])
        return x + h

    def _feed_forward_weights(self):
        """(gamma, beta, w_in, b_in, w_out, b_out): the weights after the attention that
        _feed_forward_residual takes besides its output projection."""
        ffn_norm, ffn_in, ffn_out = self.ffn_norm, self.ffn_in, self.ffn_out
        return (ffn_norm.gamma.value, ffn_norm.beta.value, ffn_in.kernel.value,
                ffn_in.bias.value, ffn_out.kernel.value, ffn_out.bias.value)

    def _fused_weights(self):
        """The block's weights as the XLA programs take them, when its attention is a library
        layer whose projections join them (else None): ((gamma, beta, three (kernel, bias)
        pairs) before the op, ((kernel, bias) of the output projection, gamma, beta, w_in,
        b_in, w_out, b_out) after it)."""
        attention = self.attention
        if not (isinstance(attention, SparseMultiHeadAttention) and attention.use_bias and
                attention.dropout == 0):
            return None
        norm = self.attention_norm

        def weights(layer):
            return layer.kernel.value, layer.bias.value

        before = (norm.gamma.value, norm.beta.value,
                  [weights(p) for p in (attention.query_dense, attention.key_dense,
                                        attention.value_dense)])
        return before, (weights(attention.output_dense), *self._feed_forward_weights())

    def _attend(self, q, k, v):
        # pylint: disable-next=protected-access
        return self.attention._attend(q, k, v, None, self.attention.causal)

    def _fused_forward(self, x, fused, seed):
        """The block through the XLA programs and the op, with weights as _fused_weights."""
        (gamma, beta, projections), after = fused
        dtype = self.attention_norm.compute_dtype
        h = self._attend(*_attention_inputs_xla(x, gamma, beta, projections, dtype))
        return _feed_forward_residual_xla(x, h, *after, seed, self.rate)

    def _residual_xla(self, x, seed):
        """_residual in training, with everything but attention itself in XLA programs shared
        by all blocks: for the library's layers, their projections too (only the op runs
        outside); for MultiHeadAttention, the layer as a whole."""
        fused = self._fused_weights()
        if fused is not None:
            return self._fused_forward(x, fused, seed)
        norm = self.attention_norm
        h = self.attention(_layer_norm_xla(x, norm.gamma.value, norm.beta.value,
                                           norm.compute_dtype), training=True)
        return _feed_forward_residual_xla(x, h, None, *self._feed_forward_weights(), seed,
                                          self.rate)

    def _recomputed_residual_xla(self, x, seed, fused):
        """_residual_xla recomputed in the backward pass, as tf.recompute_grad does, but with
        each XLA program's forward recomputed inside the program that differentiates it. Only x
        and the weights stay alive for the backward pass; it recomputes q, k, v and the
        attention, then runs the feed-forward's backward, the op's, and that of the LayerNorm
        and projections before the op."""
        dtype = self.attention_norm.compute_dtype

        @tf.custom_gradient
        def block(x, *weights):
            (gamma, beta, projections), after = tf.nest.pack_sequence_as(fused, weights)
            # Called on stopped gradients, the programs are their inference versions, which
            # return nothing for a tape to keep.
            y = self._fused_forward(*tf.nest.map_structure(
                tf.stop_gradient, (x, ((gamma, beta, projections), after))), seed)

            def grad(dy):
                q, k, v = _attention_inputs_after_xla(x, gamma, beta, projections, dtype, dy)
                with tf.GradientTape() as tape:
                    tape.watch([q, k, v])
                    h = self._attend(q, k, v)
                dx, dh, *d_after = _feed_forward_residual_grad_xla(x, h, *after, seed,
                                                                   self.rate, dy)
                dq, dk, dv = tape.gradient(h, [q, k, v], output_gradients=dh)
                dx, *d_before = _attention_inputs_grad_xla(x, gamma, beta, projections, dtype,
                                                           dq, dk, dv, dx)
                return [dx, *tf.nest.flatten((d_before, d_after))]

            return y, grad

        return block(x, *[tf.convert_to_tensor(w) for w in tf.nest.flatten(fused)])

    def call(self, x, training=None, seed=None):
        x = keras.ops.cast(x, self.compute_dtype)
        if training and self.rate > 0:
            if seed is None:
                seed = self.dropout_seed.assign_add(tf.constant([0, 1], tf.int64))
            seed = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=2)
        else:
            seed = None
        if training and self.config.recompute:
            fused = self._fused_weights() if xla_enabled(self.config.xla_blocks) else None
            if fused is not None:
                return self._recomputed_residual_xla(x, seed, fused)
            return tf.recompute_grad(lambda h: self._residual(h, True, seed))(x)
        return self._residual(x, training, seed)

    def get_config(self):
        config = super().get_config()
        config.update(config=self.config.__dict__.copy(), kind=self.kind)
        return config

    @classmethod
    def from_config(cls, config):
        model_config = dict(config.pop("config"))
        model_config["position_shape"] = tuple(model_config["position_shape"])
        return cls(ModelConfig(**model_config), **config)


@keras.saving.register_keras_serializable(package="tf_sparse_attn")
class SparseTransformer(keras.Model):
    """The autoregressive Sparse Transformer over byte-valued tokens.

    call(tokens [batch, time] ints in [0, vocab_size), training=None) -> float32 logits
    [batch, time, vocab_size]; logits[:, t] predict tokens[:, t] from tokens[:, :t].
    """

    def __init__(self, config: ModelConfig, **kwargs):
        if isinstance(config, dict):
            config = dict(config)
            config["position_shape"] = tuple(config["position_shape"])
            config = ModelConfig(**config)
        super().__init__(**kwargs)
        self.config = config
        self.start_token = config.vocab_size
        d = config.d_model
        normal = keras.initializers.RandomNormal(stddev=config.init_scale)
        self.token_embedding = keras.layers.Embedding(
            config.vocab_size + 1, d, embeddings_initializer=normal, name="token_embedding")
        self.position_embedding = FactorizedPositionEmbedding(
            config.position_shape, d, embeddings_initializer=normal, name="position_embedding")
        self.blocks = [TransformerBlock(config, kind, name=f"block_{i}")
                       for i, kind in enumerate(config.layer_kinds())]
        self.final_norm = keras.layers.LayerNormalization(epsilon=LN_EPSILON, name="final_norm")
        # float32 logits whatever the policy: the softmax over 256 values wants the range.
        self.head = keras.layers.Dense(config.vocab_size, kernel_initializer="zeros",
                                       bias_initializer="zeros", dtype="float32", name="logits")

    def build(self, input_shape=None):
        d = self.config.d_model
        self.token_embedding.build((None, None))
        self.position_embedding.build()
        for block in self.blocks:
            block.build((None, None, d))
        self.final_norm.build((None, None, d))
        self.head.build((None, None, d))
        self.built = True

    def embed(self, tokens):
        """Shifted token embeddings plus position embeddings, [batch, time, d]."""
        tokens = tf.cast(tokens, tf.int32)
        batch, time = tf.shape(tokens)[0], tf.shape(tokens)[1]
        shifted = tf.concat([tf.fill([batch, 1], self.start_token), tokens[:, :-1]], axis=1)
        x = self.token_embedding(shifted)
        return x + self.position_embedding.full()[None, :time]

    def call(self, tokens, training=None):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, training=training)
        return self.head(self.final_norm(x))

    def get_config(self):
        config = super().get_config()
        config.update(config=self.config.__dict__.copy())
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def build_model(config: ModelConfig, **kwargs) -> SparseTransformer:
    """A built SparseTransformer (weights created eagerly, so callbacks and optimizers that need
    variables before the first step find them)."""
    model = SparseTransformer(config, **kwargs)
    model.build((None, config.seq_len))
    return model


def bits_per_dim(y_true, logits):
    """Cross-entropy in bits of each position: the paper's bits per dim (per byte for text)."""
    nats = keras.losses.sparse_categorical_crossentropy(y_true, logits, from_logits=True)
    return nats / np.log(2.0)


def count_parameters(model) -> int:
    return int(sum(np.prod(v.shape) for v in model.trainable_weights))
