"""SparseMultiHeadAttention: `keras.layers.MultiHeadAttention` over a block-sparse layout."""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import constraints, initializers, ops, regularizers

from tf_sparse_attn.layers.projection import EinsumProjection
from tf_sparse_attn.layouts import PATTERNS, BlockLayout, make_layout, padded_length
from tf_sparse_attn.portable import merge_attention, portable_sparse_attention
from tf_sparse_attn.reference import reference_attention

try:  # The Keras mask attached to a tensor; Keras exposes no public accessor for it.
    from keras.src.backend import get_keras_mask, set_keras_mask
except ImportError:  # pragma: no cover
    def get_keras_mask(x):
        return getattr(x, "_keras_mask", None)

    def set_keras_mask(x, mask):
        try:
            x._keras_mask = mask  # pylint: disable=protected-access
        except AttributeError:
            pass

IMPLEMENTATIONS = ("op", "portable", "reference")

__all__ = ["SparseMultiHeadAttention", "IMPLEMENTATIONS", "default_implementation"]


def default_implementation() -> str:
    """"op" where the compiled op library loads into the TensorFlow backend, else "portable"."""
    if keras.backend.backend() != "tensorflow":
        return "portable"
    from tf_sparse_attn._load import op_library_available  # pylint: disable=import-outside-toplevel
    return "op" if op_library_available() else "portable"


def _resolve_implementation(implementation):
    if implementation is None:
        return default_implementation()
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got "
                         f"{implementation!r}")
    if implementation == "op":
        if keras.backend.backend() != "tensorflow":
            raise ValueError("implementation='op' runs on Keras's TensorFlow backend only (the "
                             f"backend is {keras.backend.backend()!r}); use 'portable'")
        from tf_sparse_attn._load import load_op_library  # pylint: disable=import-outside-toplevel
        try:
            load_op_library()
        except ImportError as error:
            raise ValueError(f"implementation='op' needs the compiled op library: {error}") \
                from error
    return implementation


def _check_positive_int(name, value, optional=False):
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if optional else ''}, "
                         f"got {name}={value!r}")
    return int(value)


def layout_to_config(layout: BlockLayout) -> dict:
    """A JSON-serializable description of a layout, for `get_config`."""
    heads, rows, cols, flags = layout.coo()
    return {"class_name": "BlockLayout", "block_size": layout.block_size,
            "num_blocks": layout.num_query_blocks, "num_heads": layout.num_heads,
            "causal": layout.causal, "window": layout.window,
            "min_distance": layout.min_distance, "reorder_stride": layout.reorder_stride,
            "description": layout.description, "heads": heads.tolist(), "rows": rows.tolist(),
            "cols": cols.tolist(), "flags": flags.tolist()}


def layout_from_config(config: dict) -> BlockLayout:
    """Inverse of `layout_to_config`."""
    config = dict(config)
    config.pop("class_name", None)
    blocks = [config.pop(name) for name in ("heads", "rows", "cols", "flags")]
    return BlockLayout.from_blocks(*blocks, **config)


@keras.saving.register_keras_serializable(package="tf_sparse_attn")
class SparseMultiHeadAttention(keras.layers.Layer):
    """Multi-head self-attention restricted to a block-sparse pattern (Child et al. 2019).

    A drop-in for `keras.layers.MultiHeadAttention` used as self-attention: the same
    projections (sub-layers "query", "key", "value", "attention_output", so
    `set_weights(mha.get_weights())` carries weights over), the same call signature, and
    the same output, `[batch, time, output_shape or query's last dim]`, but each query only
    attends to the keys its pattern allows, so time and memory grow with
    T * (keys per query) instead of T^2. Causal by default; `causal=False` (or
    `use_causal_mask=False` in a call) for encoders.

    Patterns (`pattern=`, positions from 0, causal form):

    - "dense": j <= i.
    - "local" (needs `window`): i - window < j <= i.
    - "strided" (needs `stride`): j <= i and (i - j) mod stride == 0.
    - "fixed" (needs `stride`, `summary`): j <= i and (j // stride == i // stride or
      j mod stride >= stride - summary); `num_summary_groups > 1` gives heads different
      summary sub-blocks.
    - or any `BlockLayout`, which fixes the longest sequence to its `seq_len`.

    Layouts are built once per sequence length and cached. Sequences are padded to whole
    blocks (and, for "strided", to a multiple of stride * block_size) inside the layer, so
    any length works; choose `block_size` no larger than the typical length / stride for
    "strided". When the length is unknown while tracing (an `Input(shape=(None, d))` being
    exported), the layer uses the layout for `max_length`.

    Masks: Keras masks of `value` / `key` (e.g. from `Embedding(mask_zero=True)`) or
    `value_mask` / `key_mask` hide keys; a query that is left with no key outputs the
    projection of zeros. The query's mask is passed on to the output. Dense
    `attention_mask`s and `return_attention_scores` are not supported: they would need the
    T x T matrix that this layer avoids.

    Args:
      num_heads: number of attention heads.
      key_dim: size of each head for query and key.
      value_dim: size of each head for value; `key_dim` if None.
      pattern: a name from `tf_sparse_attn.layouts.PATTERNS` or a `BlockLayout`.
      block_size: tokens per layout block (the sparsity's granularity).
      causal: attend to earlier positions only (the default).
      window, stride, summary, num_summary_groups: the pattern's parameters.
      max_length: the layout's length when the sequence length is not static.
      dropout: dropout rate on the attention output (per head, before the output
        projection). The fused kernel never forms attention probabilities, so unlike
        `MultiHeadAttention` the probabilities themselves are not dropped.
      use_bias, output_shape, kernel_initializer, bias_initializer, kernel_regularizer,
        bias_regularizer, activity_regularizer, kernel_constraint, bias_constraint, seed:
        as in `keras.layers.MultiHeadAttention`.
      implementation: "op" (the fused custom op; TensorFlow backend), "portable" (stock
        operations: XLA, JAX and PyTorch backends, SavedModels that need no custom op),
        "reference" (dense masked; for tests), or None for "op" where the op library loads,
        else "portable". All three give the same result. Layers on the op set
        `supports_jit = False`, so `model.fit` does not try to compile them with XLA.

    Call arguments:
      query: `[batch, time, dim]`.
      value: `[batch, time, dim]`, the query itself when None (self-attention). Block
        layouts are square: value must be as long as query.
      key: `[batch, time, dim]`, `value` when None.
      query_mask, value_mask, key_mask: boolean `[batch, time]`; filled from Keras masks.
      attention_mask, return_attention_scores: accepted for signature compatibility; any
        value other than None / False raises ValueError.
      training: whether dropout is active.
      use_causal_mask: overrides `causal` for this call when not None.

    Example:

    >>> import numpy as np
    >>> import tf_sparse_attn as tsa
    >>> layer = tsa.SparseMultiHeadAttention(num_heads=2, key_dim=8, pattern="local",
    ...                                      window=16, block_size=8)
    >>> x = np.random.normal(size=(2, 40, 16)).astype("float32")
    >>> tuple(layer(x).shape)
    (2, 40, 16)
    """

    # Subclasses that need their own state before the layouts can be checked turn this off
    # and call `_check_layouts()` at the end of their own __init__.
    _check_layouts_on_init = True

    def __init__(self, num_heads, key_dim, value_dim=None, pattern="dense", block_size=32,
                 causal=True, window=None, stride=None, summary=None, num_summary_groups=1,
                 max_length=None, dropout=0.0, use_bias=True, output_shape=None,
                 implementation=None, kernel_initializer="glorot_uniform",
                 bias_initializer="zeros", kernel_regularizer=None, bias_regularizer=None,
                 activity_regularizer=None, kernel_constraint=None, bias_constraint=None,
                 seed=None, **kwargs):
        num_heads = _check_positive_int("num_heads", num_heads)
        key_dim = _check_positive_int("key_dim", key_dim)
        value_dim = _check_positive_int("value_dim", value_dim, optional=True)
        block_size = _check_positive_int("block_size", block_size)
        window = _check_positive_int("window", window, optional=True)
        stride = _check_positive_int("stride", stride, optional=True)
        summary = _check_positive_int("summary", summary, optional=True)
        num_summary_groups = _check_positive_int("num_summary_groups", num_summary_groups)
        max_length = _check_positive_int("max_length", max_length, optional=True)
        if isinstance(pattern, dict):
            pattern = layout_from_config(pattern)
        if not isinstance(pattern, BlockLayout) and pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {PATTERNS} or a BlockLayout, got "
                             f"pattern={pattern!r}")
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a rate in [0, 1), got dropout={dropout!r}")
        if output_shape is not None:
            if isinstance(output_shape, (int, np.integer)):
                output_shape = (output_shape,)
            try:
                output_shape = tuple(_check_positive_int("output_shape", int(d))
                                     for d in output_shape)
            except (TypeError, ValueError) as error:
                raise ValueError("output_shape must be a positive integer or a tuple of them, "
                                 f"got output_shape={output_shape!r}") from error
            if not output_shape:
                raise ValueError("output_shape must not be empty")
        super().__init__(**kwargs)
        self.supports_masking = True
        self._num_heads = num_heads
        self._key_dim = key_dim
        self._value_dim = value_dim or key_dim
        self._pattern = pattern
        self._block_size = block_size
        self._causal = bool(causal)
        self._window = window
        self._stride = stride
        self._summary = summary
        self._num_summary_groups = num_summary_groups
        self._max_length = max_length
        self._dropout = float(dropout)
        self._use_bias = bool(use_bias)
        self._output_shape = output_shape
        self._implementation_arg = implementation
        self._implementation = _resolve_implementation(implementation)
        if self._implementation == "op":
            # XLA cannot compile a custom op: model.fit's jit_compile="auto" then stays off.
            self.supports_jit = False
            if self.compute_dtype not in ("float16", "bfloat16", "float32"):
                raise ValueError(f"implementation='op' computes in float16, bfloat16 or float32, "
                                 f"not in the dtype policy's {self.compute_dtype}; use another "
                                 "dtype or implementation='portable'")
        self._kernel_initializer = initializers.get(kernel_initializer)
        self._bias_initializer = initializers.get(bias_initializer)
        self._kernel_regularizer = regularizers.get(kernel_regularizer)
        self._bias_regularizer = regularizers.get(bias_regularizer)
        self._activity_regularizer = regularizers.get(activity_regularizer)
        self._kernel_constraint = constraints.get(kernel_constraint)
        self._bias_constraint = constraints.get(bias_constraint)
        self.seed = seed
        if self._check_layouts_on_init:
            self._check_pattern_arguments()
            self._check_layouts()

    # -------------------------------------------------------------------- properties

    @property
    def num_heads(self):
        return self._num_heads

    @property
    def key_dim(self):
        return self._key_dim

    @property
    def value_dim(self):
        return self._value_dim

    @property
    def dropout(self):
        return self._dropout

    @property
    def use_bias(self):
        return self._use_bias

    @property
    def pattern(self):
        return self._pattern

    @property
    def block_size(self):
        return self._block_size

    @property
    def causal(self):
        return self._causal

    @property
    def implementation(self):
        """The implementation in use: "op", "portable" or "reference"."""
        return self._implementation

    @property
    def query_dense(self):
        return self._query_dense

    @property
    def key_dense(self):
        return self._key_dense

    @property
    def value_dense(self):
        return self._value_dense

    @property
    def output_dense(self):
        return self._output_dense

    # -------------------------------------------------------------------- layouts

    def _check_pattern_arguments(self):
        """Rejects parameters that the chosen pattern would silently ignore."""
        uses = {"dense": (), "local": ("window",), "strided": ("stride",),
                "fixed": ("stride", "summary", "num_summary_groups")}
        used = uses.get(self._pattern, ()) if isinstance(self._pattern, str) else ()
        given = {"window": self._window, "stride": self._stride, "summary": self._summary,
                 "num_summary_groups": None if self._num_summary_groups == 1
                 else self._num_summary_groups}
        for name, value in given.items():
            if value is not None and name not in used:
                what = (f"pattern={self._pattern!r}" if isinstance(self._pattern, str)
                        else "a BlockLayout pattern (its parameters are fixed)")
                raise ValueError(f"{name}={value} does not apply to {what}")
        for name in used:
            if name != "num_summary_groups" and given[name] is None:
                raise ValueError(f"pattern={self._pattern!r} needs {name}")

    def _check_layouts(self):
        """Builds the layouts for a short sequence now, so that incompatible parameters fail
        at construction with the layout's message rather than at the first call."""
        if isinstance(self._pattern, BlockLayout):
            layout = self._pattern
            if layout.num_heads not in (1, self._num_heads):
                raise ValueError(f"num_heads={self._num_heads} does not match the layout's "
                                 f"{layout.num_heads} heads (a layout has 1 head, shared, or "
                                 "one per attention head)")
            if layout.causal and not self._causal:
                raise ValueError(f"causal=False needs a layout built for bidirectional "
                                 f"attention; {layout} is causal")
            return
        self._build_layouts(self._probe_length(), self._causal)

    def _probe_length(self):
        if self._pattern == "strided":
            return padded_length("strided", 1, self._block_size, self._stride)
        return self._block_size

    def _build_layouts(self, seq_len, causal):
        """The layouts for sequences of up to `seq_len` tokens, as a tuple. make_layout and the
        subclasses' builders cache them, so each length is built once."""
        if isinstance(self._pattern, BlockLayout):
            layout = self._pattern
            if seq_len > layout.seq_len:
                raise ValueError(f"the sequence has {seq_len} positions but the pattern "
                                 f"(a BlockLayout) covers {layout.seq_len}: build the layout "
                                 "for the longest sequence")
            if layout.causal and not causal:
                raise ValueError(f"use_causal_mask=False needs a layout built for "
                                 f"bidirectional attention; {layout} is causal")
            return (layout,)
        per_head = self._pattern == "fixed" and self._num_summary_groups > 1
        return (make_layout(self._pattern, seq_len, block_size=self._block_size,
                            causal=causal, window=self._window, stride=self._stride,
                            summary=self._summary,
                            num_heads=self._num_heads if per_head else 1,
                            num_summary_groups=self._num_summary_groups),)

    def layouts_for(self, seq_len, causal=None):
        """The layouts this layer uses for sequences of `seq_len` tokens (a tuple: one per
        pass; merged strided heads take two)."""
        return self._build_layouts(int(seq_len), self._causal if causal is None else causal)

    def _sequence_length(self, query):
        length = query.shape[1]
        if length is None:
            if isinstance(self._pattern, BlockLayout):
                return self._pattern.seq_len
            if self._max_length is None:
                raise ValueError(
                    f"{self.name}: the sequence length is not known while tracing (an input of "
                    "shape (batch, None, dim)); the layout is built per length, so give the "
                    "layer max_length=<longest sequence> or use a fixed length")
            return self._max_length
        if self._max_length is not None and length > self._max_length:
            raise ValueError(f"{self.name}: the query has {length} positions, more than "
                             f"max_length={self._max_length}")
        return length

    # -------------------------------------------------------------------- attention

    def _attention(self, q, k, v, layout, causal, key_mask=None, return_lse=False):
        """One pass of the chosen implementation over `layout`."""
        if self._implementation == "op":
            from tf_sparse_attn.ops import sparse_attention  # pylint: disable=import-outside-toplevel
            function = sparse_attention
        elif self._implementation == "portable":
            function = portable_sparse_attention
        else:
            function = reference_attention
        return function(q, k, v, layout, causal=causal, scale=1.0 / math.sqrt(self._key_dim),
                        return_lse=return_lse, key_mask=key_mask)

    def _merge(self, out1, lse1, out2, lse2):
        return merge_attention(out1, lse1, out2, lse2)

    def _attend(self, q, k, v, key_mask, causal):
        """Attention of projected q, k, v `[batch, time, heads, dim]` -> `[batch, time,
        heads, value_dim]`. Subclasses combining several layouts override this."""
        (layout,) = self.layouts_for(self._sequence_length(q), causal)
        return self._attention(q, k, v, layout, causal, key_mask=key_mask)

    # -------------------------------------------------------------------- Keras API

    def _check_shapes(self, query_shape, value_shape=None, key_shape=None):
        for name, shape in (("query", query_shape), ("value", value_shape),
                            ("key", key_shape)):
            if shape is not None and len(shape) != 3:
                raise ValueError(f"{self.__class__.__name__} expects {name} of shape "
                                 f"[batch, time, features], got {name} of shape {tuple(shape)}")
        if query_shape[-1] is None:
            raise ValueError(f"the last dimension of query must be known, got {query_shape}")
        length = query_shape[1]
        for name, shape in (("value", value_shape), ("key", key_shape)):
            if shape is None:
                continue
            if shape[-1] is None:
                raise ValueError(f"the last dimension of {name} must be known, got {shape}")
            if length is not None and shape[1] is not None and shape[1] != length:
                raise ValueError(
                    f"{name} has {shape[1]} positions but query has {length}: sparse block "
                    f"layouts are square, so {self.__class__.__name__} is self-attention over "
                    "one sequence (use keras.layers.MultiHeadAttention for cross-attention)")
        if isinstance(self._pattern, BlockLayout) and length is not None and \
                length > self._pattern.seq_len:
            raise ValueError(f"query has {length} positions but the pattern (a BlockLayout) "
                             f"covers {self._pattern.seq_len}")
        if self._max_length is not None and length is not None and length > self._max_length:
            raise ValueError(f"query has {length} positions, more than "
                             f"max_length={self._max_length}")

    def _sublayer_kwargs(self):
        # Fresh initializer objects per projection: a shared seeded instance would give
        # every projection the same initial weights.
        kernel_initializer = self._kernel_initializer.__class__.from_config(
            self._kernel_initializer.get_config())
        bias_initializer = self._bias_initializer.__class__.from_config(
            self._bias_initializer.get_config())
        return dict(kernel_initializer=kernel_initializer, bias_initializer=bias_initializer,
                    kernel_regularizer=self._kernel_regularizer,
                    bias_regularizer=self._bias_regularizer,
                    activity_regularizer=self._activity_regularizer,
                    kernel_constraint=self._kernel_constraint,
                    bias_constraint=self._bias_constraint, dtype=self.dtype_policy)

    def build(self, query_shape, value_shape=None, key_shape=None):
        query_shape = tuple(query_shape)
        value_shape = query_shape if value_shape is None else tuple(value_shape)
        key_shape = value_shape if key_shape is None else tuple(key_shape)
        self._check_shapes(query_shape, value_shape, key_shape)
        heads = self._num_heads

        def projection(name, size, shape):
            layer = EinsumProjection(
                "abc,cde->abde", output_shape=(None, heads, size),
                bias_axes="de" if self._use_bias else None, name=name,
                **self._sublayer_kwargs())
            layer.build(shape)
            return layer

        self._query_dense = projection("query", self._key_dim, query_shape)
        self._key_dense = projection("key", self._key_dim, key_shape)
        self._value_dense = projection("value", self._value_dim, value_shape)
        out_dims = self._output_shape or (query_shape[-1],)
        letters = "fghijklmn"[:len(out_dims)]
        self._output_dense = EinsumProjection(
            f"abcd,cd{letters}->ab{letters}", output_shape=(None,) + tuple(out_dims),
            bias_axes=letters if self._use_bias else None, name="attention_output",
            **self._sublayer_kwargs())
        self._output_dense.build(query_shape[:2] + (heads, self._value_dim))
        self._dropout_layer = keras.layers.Dropout(self._dropout, seed=self.seed)
        self.built = True

    def call(self, query, value=None, key=None, query_mask=None, value_mask=None,
             key_mask=None, attention_mask=None, return_attention_scores=False, training=None,
             use_causal_mask=None):
        if attention_mask is not None:
            raise ValueError(
                f"{self.__class__.__name__} does not take attention_mask: a dense [T, S] mask "
                "would defeat the sparsity. Mask keys with value_mask / key_mask (or Keras "
                "masks), and choose the pattern for the rest")
        if return_attention_scores:
            raise ValueError(
                f"{self.__class__.__name__} cannot return attention scores "
                "(return_attention_scores=True): the fused kernel never forms them")
        # Keras fills query_mask / value_mask / key_mask from the inputs' masks only when
        # two or more tensors are passed; a lone query's mask is read here.
        if query_mask is None:
            query_mask = get_keras_mask(query)
        if value is None:
            value = query
            if value_mask is None:
                value_mask = query_mask
        if key is None:
            key = value
        self._check_shapes(tuple(query.shape), tuple(value.shape), tuple(key.shape))
        # The masks are applied here; the projections must not see (and drop) them.
        for tensor in (query, value, key):
            set_keras_mask(tensor, None)

        key_valid = None
        for mask in (value_mask, key_mask):
            if mask is not None:
                mask = ops.cast(mask, "bool")
                key_valid = mask if key_valid is None else ops.logical_and(key_valid, mask)

        causal = self._causal if use_causal_mask is None else bool(use_causal_mask)
        q = self._query_dense(query)
        k = self._key_dense(key)
        v = self._value_dense(value)
        attended = self._attend(q, k, v, key_valid, causal)
        attended = self._dropout_layer(attended, training=training)
        output = self._output_dense(attended)
        if query_mask is not None:
            set_keras_mask(output, query_mask)
        return output

    def compute_output_shape(self, query_shape, value_shape=None, key_shape=None):
        query_shape = tuple(query_shape)
        self._check_shapes(query_shape, None if value_shape is None else tuple(value_shape),
                           None if key_shape is None else tuple(key_shape))
        if self._output_shape:
            return query_shape[:-1] + tuple(self._output_shape)
        return query_shape

    def compute_output_spec(self, query, value=None, key=None, query_mask=None,
                            value_mask=None, key_mask=None, attention_mask=None,
                            return_attention_scores=False, training=None,
                            use_causal_mask=None):
        if attention_mask is not None or return_attention_scores:
            # Let call() raise its explanation.
            self.call(query, value, key, attention_mask=attention_mask,
                      return_attention_scores=return_attention_scores)
        shape = self.compute_output_shape(
            query.shape, None if value is None else value.shape,
            None if key is None else key.shape)
        return keras.KerasTensor(shape, dtype=self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        pattern = self._pattern
        config.update({
            "num_heads": self._num_heads,
            "key_dim": self._key_dim,
            "value_dim": self._value_dim,
            "pattern": layout_to_config(pattern) if isinstance(pattern, BlockLayout)
            else pattern,
            "block_size": self._block_size,
            "causal": self._causal,
            "window": self._window,
            "stride": self._stride,
            "summary": self._summary,
            "num_summary_groups": self._num_summary_groups,
            "max_length": self._max_length,
            "dropout": self._dropout,
            "use_bias": self._use_bias,
            "output_shape": self._output_shape,
            # The request, not its resolution: a model saved where the op library loads still
            # loads where it does not.
            "implementation": self._implementation_arg,
            "kernel_initializer": initializers.serialize(self._kernel_initializer),
            "bias_initializer": initializers.serialize(self._bias_initializer),
            "kernel_regularizer": regularizers.serialize(self._kernel_regularizer),
            "bias_regularizer": regularizers.serialize(self._bias_regularizer),
            "activity_regularizer": regularizers.serialize(self._activity_regularizer),
            "kernel_constraint": constraints.serialize(self._kernel_constraint),
            "bias_constraint": constraints.serialize(self._bias_constraint),
            "seed": self.seed,
        })
        return config
