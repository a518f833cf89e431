"""Autoregressive sampling with a key/value cache, and writing samples as PNG, WAV or text.

Each new position t runs through every layer once: its key and value enter the layer's cache,
and its query attends only to the positions its pattern allows, which
`BlockLayout.keys_of(t, head)` lists exactly in natural order. Per layer kind, the key lists of
all positions are tabulated once (padded with -1), so a step is a gather of at most
max-keys-per-query cached entries: O(sqrt(T)) work per step for the factorized patterns.

>>> import numpy as np
>>> from tf_sparse_attn.models import build_model, get_config
>>> from tf_sparse_attn.models.sampling import Sampler
>>> model = build_model(get_config("tiny").model)
>>> tokens = Sampler(model, batch_size=2).sample(temperature=1.0, seed=0)
>>> tokens.shape
(2, 128)
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np
import tensorflow as tf



# ------------------------------------------------------------------------------ key tables

def head_layouts(attention, seq_len: int):
    """Per attention head, the layouts whose token sets (united) that head attends, read from
    the layer itself (`layouts_for`); None when the layer is dense (every j <= t)."""
    if not hasattr(attention, "layouts_for"):  # keras.layers.MultiHeadAttention: causal dense
        return None
    layouts = attention.layouts_for(seq_len)
    heads = attention.num_heads
    if len(layouts) == 1:
        if layouts[0].description == "dense":
            return None
        return [[layouts[0]]] * heads
    if getattr(attention, "combine", None) == "split":
        # The split layers give the first ceil(heads / 2) heads the first pass.
        first = (heads + 1) // 2
        return [[layouts[0]]] * first + [[layouts[1]]] * (heads - first)
    return [list(layouts)] * heads


_TABLES = {}


def key_table(attention, seq_len: int):
    """int32 [seq_len, heads or 1, max_keys]: the natural-order key positions of every query
    and head of an attention layer, padded with -1 (one row when every head has the same
    keys); None for a dense layer. Cached per layout."""
    per_head = head_layouts(attention, seq_len)
    if per_head is None:
        return None
    # Heads with the same layouts (and, for per-head layouts, the same head) share a list.
    signatures = [tuple((id(p), head if p.num_heads > 1 else 0) for p in parts)
                  for head, parts in enumerate(per_head)]
    cache_key = (seq_len, tuple(signatures))
    if cache_key in _TABLES:
        return _TABLES[cache_key][0]
    keys_by_signature = {}
    for head, (signature, parts) in enumerate(zip(signatures, per_head)):
        if signature in keys_by_signature:
            continue
        keys = []
        for t in range(seq_len):
            sets = [p.keys_of(t, head if p.num_heads > 1 else 0) for p in parts]
            keys.append(functools.reduce(np.union1d, sets) if len(sets) > 1 else sets[0])
        keys_by_signature[signature] = keys
    width = max(1, max(len(k) for keys in keys_by_signature.values() for k in keys))
    # One row for all heads when they share their keys (the common case), else one per head.
    rows = 1 if len(keys_by_signature) == 1 else len(per_head)
    table = np.full((seq_len, rows, width), -1, np.int32)
    for head, signature in enumerate(signatures[:rows]):
        for t, keys in enumerate(keys_by_signature[signature]):
            table[t, head, :len(keys)] = keys
    # The layouts stay referenced beside the table, so their ids in the key stay theirs.
    _TABLES[cache_key] = (table, per_head)
    return table


# ------------------------------------------------------------------- attention projections

def attention_projections(attention):
    """(query, key, value, output) sub-layers of an attention layer: [B, t, d] -> [B, t, H, dh]
    and [B, t, H, dv] -> [B, t, d]."""
    return (attention.query_dense, attention.key_dense, attention.value_dense,
            attention.output_dense)


# ---------------------------------------------------------------------------------- sampler

class Sampler:
    """Cached step-by-step decoding of a SparseTransformer.

    sample(temperature, seed, prompt=None) -> int32 numpy [batch, T]
    logits_of(tokens) -> float32 numpy [batch, T, vocab]: the cached step-by-step logits under
      teacher forcing, which equal model(tokens) (the check that the cache is exact).
    """

    def __init__(self, model, batch_size: int = 1):
        self.model = model
        m = model.config
        self.config = m
        self.batch_size = int(batch_size)
        self.dtype = model.compute_dtype
        self.tables = []
        for block in model.blocks:
            table = key_table(block.attention, m.seq_len)
            self.tables.append(None if table is None else tf.constant(table))
        head_dim = m.head_dim
        self.scale = 1.0 / math.sqrt(head_dim)
        self.projections = [attention_projections(block.attention) for block in model.blocks]
        cache_shape = [m.num_heads, m.seq_len, self.batch_size, head_dim]
        # Head-major caches, [heads, time, batch, dim], so a step gathers along time per head.
        self.keys = [tf.Variable(tf.zeros(cache_shape, self.dtype), trainable=False)
                     for _ in model.blocks]
        self.values = [tf.Variable(tf.zeros(cache_shape, self.dtype), trainable=False)
                       for _ in model.blocks]

    def _attend(self, layer, q, t):
        """q [B, H, dh] of position t -> [B, H, dh] over its pattern's cached keys."""
        keys, values, table = self.keys[layer], self.values[layer], self.tables[layer]
        if table is None:
            k, v = keys, values  # [H, T, B, d]
            valid = tf.range(self.config.seq_len) <= t  # [T]
            valid = valid[None, None, :]
        else:
            index = table[t]  # [H or 1, K]
            valid = (index >= 0)[None]  # [1, H or 1, K]
            index = tf.maximum(index, 0)
            if table.shape[1] == 1:  # keys shared by every head
                k = tf.gather(keys, index[0], axis=1)  # [H, K, B, d]
                v = tf.gather(values, index[0], axis=1)
            else:
                k = tf.gather(keys, index, axis=1, batch_dims=1)
                v = tf.gather(values, index, axis=1, batch_dims=1)
        scores = tf.einsum("bhd,hkbd->bhk", tf.cast(q, tf.float32), tf.cast(k, tf.float32))
        scores = tf.where(valid, scores * self.scale, float("-inf"))
        # A query with no key at all (a summary-only head early in a stride-block) gets zeros,
        # as in the attention ops, rather than the NaN of a softmax over nothing.
        probs = tf.where(tf.reduce_any(valid, axis=-1, keepdims=True),
                         tf.nn.softmax(scores, axis=-1), 0.0)
        return tf.einsum("bhk,hkbd->bhd", probs, tf.cast(v, tf.float32))

    def _step(self, token, t):
        """token [B]: the token before position t (the start token at t = 0) -> logits [B, V]."""
        model = self.model
        x = model.token_embedding(token[:, None]) + model.position_embedding(t)[None, None]
        for layer, block in enumerate(model.blocks):
            query, key, value, output = self.projections[layer]
            h = block.attention_norm(x)
            q, k, v = query(h)[:, 0], key(h)[:, 0], value(h)[:, 0]  # [B, H, d]
            self.keys[layer][:, t].assign(tf.transpose(tf.cast(k, self.dtype), [1, 0, 2]))
            self.values[layer][:, t].assign(tf.transpose(tf.cast(v, self.dtype), [1, 0, 2]))
            attended = tf.cast(self._attend(layer, q, t), x.dtype)
            x = x + output(attended[:, None])
            x = x + block.ffn_out(block.ffn_in(block.ffn_norm(x)))
        return model.head(model.final_norm(x))[:, 0]

    @tf.function(reduce_retracing=True)
    def _run(self, forced, use_forced, temperature, seed):
        """Decodes all T positions; position t takes forced[:, t] where use_forced[t], else a
        sample. Returns (tokens [B, T], logits [B, T, V])."""
        T = self.config.seq_len
        tokens = tf.TensorArray(tf.int32, size=T)
        logits_all = tf.TensorArray(tf.float32, size=T)
        previous = tf.fill([self.batch_size], self.model.start_token)
        for t in tf.range(T):
            logits = self._step(previous, t)
            scaled = logits / tf.maximum(temperature, 1e-6)
            drawn = tf.random.stateless_categorical(
                scaled, 1, seed=tf.stack([seed, tf.cast(t, tf.int64)]), dtype=tf.int32)[:, 0]
            greedy = tf.argmax(logits, axis=-1, output_type=tf.int32)
            drawn = tf.where(temperature > 0, drawn, greedy)
            token = tf.where(use_forced[t], forced[:, t], drawn)
            tokens = tokens.write(t, token)
            logits_all = logits_all.write(t, logits)
            previous = token
        return (tf.transpose(tokens.stack(), [1, 0]),
                tf.transpose(logits_all.stack(), [1, 0, 2]))

    def _check_tokens(self, tokens, what):
        tokens = np.asarray(tokens, np.int32)
        if tokens.ndim != 2 or tokens.shape[0] != self.batch_size:
            raise ValueError(f"{what} must be [batch={self.batch_size}, length], got "
                             f"{tokens.shape}")
        if tokens.shape[1] > self.config.seq_len:
            raise ValueError(f"{what} has {tokens.shape[1]} positions; the model takes at most "
                             f"{self.config.seq_len}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            raise ValueError(f"{what} holds tokens outside [0, {self.config.vocab_size})")
        return tokens

    def sample(self, temperature: float = 1.0, seed: int = 0, prompt=None) -> np.ndarray:
        """Samples [batch, T] tokens; `prompt` [batch, n] fixes the first n (temperature 0:
        greedy)."""
        T = self.config.seq_len
        forced = np.zeros([self.batch_size, T], np.int32)
        use = np.zeros([T], bool)
        if prompt is not None:
            prompt = self._check_tokens(prompt, "prompt")
            forced[:, :prompt.shape[1]] = prompt
            use[:prompt.shape[1]] = True
        tokens, _ = self._run(tf.constant(forced), tf.constant(use),
                              tf.constant(float(temperature)), tf.constant(int(seed), tf.int64))
        return tokens.numpy()

    def logits_of(self, tokens) -> np.ndarray:
        """Step-by-step cached logits of given tokens [batch, T] (teacher forcing)."""
        tokens = self._check_tokens(tokens, "tokens")
        if tokens.shape[1] != self.config.seq_len:
            raise ValueError(f"tokens must have all {self.config.seq_len} positions")
        _, logits = self._run(tf.constant(tokens), tf.ones([self.config.seq_len], tf.bool),
                              tf.constant(1.0), tf.constant(0, tf.int64))
        return logits.numpy()


# ---------------------------------------------------------------------------------- writing

def image_grid(tokens, image_shape) -> np.ndarray:
    """[N, H*W*C] tokens -> one uint8 [rows*H, cols*W, C] grid, as square as it gets."""
    tokens = np.asarray(tokens)
    images = tokens.reshape((-1,) + tuple(image_shape)).astype(np.uint8)
    n = images.shape[0]
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    h, w, c = image_shape
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i, image in enumerate(images):
        r, q = divmod(i, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = image
    return grid


def write_samples(tokens, task: str, output_path: str, *, image_shape=None,
                  encoding: str = "mulaw", sample_rate: int = 16000) -> list[str]:
    """Writes samples by task: images as one PNG grid, audio as WAV files (one per sample),
    bytes as text. `output_path` is the file stem; returns the paths written."""
    from tf_sparse_attn.models import data  # pylint: disable=import-outside-toplevel

    tokens = np.asarray(tokens)
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    if task in ("cifar10", "imagenet64"):
        path = output_path + ".png"
        grid = image_grid(tokens, image_shape)
        tf.io.write_file(path, tf.io.encode_png(grid))
        return [path]
    if task == "audio":
        paths = []
        for i, row in enumerate(tokens):
            path = f"{output_path}_{i}.wav"
            data.write_wav(path, data.decode_audio(row, encoding).numpy(), sample_rate)
            paths.append(path)
        return paths
    path = output_path + ".txt"
    with open(path, "wb") as f:
        for i, row in enumerate(tokens):
            if i:
                f.write(b"\n\n" + b"=" * 72 + b"\n\n")
            f.write(bytes(np.asarray(row, np.uint8)))
    return [path]
