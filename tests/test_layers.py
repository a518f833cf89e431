"""The public layers: the shared layer test for each, MultiHeadAttention equivalence, the
combinations of factorized heads against float64 references, and bad input."""

import zlib

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_sparse_attn as tsa
from tf_sparse_attn.layouts import BlockLayout
from tests.layer_test_utils import BATCH, FEATURES, random_inputs, run_layer_test
from tests.reference import attention_reference


COMMON = dict(num_heads=2, key_dim=4, block_size=4)

PUBLIC_LAYERS = {
    "sparse_mha_fixed": (tsa.SparseMultiHeadAttention,
                         dict(pattern="fixed", stride=8, summary=4, value_dim=6)),
    "sparse_mha_layout": (tsa.SparseMultiHeadAttention,
                          dict(pattern=BlockLayout.local(32, block_size=4, window=6),
                               output_shape=(3, 4))),
    "local": (tsa.LocalAttention, dict(window=6)),
    "strided_merged": (tsa.StridedAttention, dict(stride=4)),
    "strided_split_bidirectional": (tsa.StridedAttention,
                                    dict(stride=4, combine="split", causal=False)),
    "fixed_groups": (tsa.FixedAttention, dict(stride=8, summary=4, num_summary_groups=2)),
}


@pytest.mark.parametrize("implementation", ["op", "portable"])
@pytest.mark.parametrize("name", sorted(PUBLIC_LAYERS))
def test_shared_layer_test(name, implementation, request, tmp_path):
    if implementation == "op":
        request.getfixturevalue("op_library")
    cls, kwargs = PUBLIC_LAYERS[name]
    init = dict(COMMON, implementation=implementation, **kwargs)
    # The masking check relies on padded keys: skip for a fixed-length layout.
    run_layer_test(cls, init, str(tmp_path), seed=zlib.crc32(name.encode()) % 1000,
                   masking=not isinstance(kwargs.get("pattern"), BlockLayout))


def test_op_layers_opt_out_of_xla(op_library):
    assert tsa.LocalAttention(window=4, implementation="op", **COMMON).supports_jit is False
    assert tsa.LocalAttention(window=4, implementation="portable", **COMMON).supports_jit
    assert tsa.LocalAttention(window=4, **COMMON).implementation == "op"


def test_drop_in_for_multi_head_attention():
    """A dense causal layer with MultiHeadAttention's weights is MultiHeadAttention."""
    x = random_inputs(11)
    mha = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, value_dim=5)
    expected = mha(x, x, use_causal_mask=True)
    ours = tsa.SparseMultiHeadAttention(num_heads=2, key_dim=4, value_dim=5, pattern="dense",
                                        block_size=8, implementation="portable")
    ours(x)
    ours.set_weights(mha.get_weights())
    np.testing.assert_allclose(ours(x), expected, atol=2e-6)
    np.testing.assert_allclose(ours(x, use_causal_mask=False), mha(x, x), atol=2e-6)
    assert [w.path.split("/", 1)[1] for w in ours.weights] == \
        [w.path.split("/", 1)[1] for w in mha.weights]


def _projections(layer, x):
    q = layer.query_dense(x).numpy()
    k = layer.key_dense(x).numpy()
    v = layer.value_dense(x).numpy()
    return q, k, v


def _expected_output(layer, x, mask, key_mask=None):
    """float64 attention over the token mask [H or 1, T, T], through the layer's projections."""
    q, k, v = _projections(layer, x)
    mask = np.asarray(mask)[None]
    if key_mask is not None:
        mask = mask & key_mask[:, None, None, :]
    out, _ = attention_reference(q, k, v, mask, 1 / np.sqrt(layer.key_dim))
    return layer.output_dense(out.astype("float32")).numpy()


def _natural_mask(layout, causal, length):
    return layout.to_mask(causal=causal)[:, :length, :length]


def _strided_sets(stride, length, causal):
    i = np.arange(length)[:, None]
    j = np.arange(length)[None, :]
    order = (j <= i) if causal else np.ones((length, length), bool)
    local = order & (np.abs(i - j) < stride)
    strided = order & ((i - j) % stride == 0)
    return local, strided


def _fixed_sets(stride, summary, length, causal, group=0):
    i = np.arange(length)[:, None]
    j = np.arange(length)[None, :]
    order = (j <= i) if causal else np.ones((length, length), bool)
    block = order & (j // stride == i // stride)
    lo = stride - (group + 1) * summary
    summaries = order & (j % stride >= lo) & (j % stride < lo + summary)
    return block, summaries


@pytest.mark.parametrize("implementation", ["op", "portable", "reference"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("combine", ["merged", "split", "local", "strided"])
def test_strided_combinations(combine, causal, implementation, request):
    """Each combination attends exactly the paper's sets, written here from the formulas."""
    if implementation == "op":
        request.getfixturevalue("op_library")
    heads, length, stride = 4, 37, 4
    layer = tsa.StridedAttention(num_heads=heads, key_dim=4, stride=stride, combine=combine,
                                 block_size=2, causal=causal, implementation=implementation)
    x = random_inputs(zlib.crc32(f"{combine}{causal}".encode()) % 1000, length=length)
    key_mask = np.random.default_rng(5).random((BATCH, length)) > 0.2
    out = layer(x, value_mask=key_mask).numpy()
    local, strided = _strided_sets(stride, length, causal)
    mask = {"merged": (local | strided)[None], "local": local[None],
            "strided": strided[None],
            "split": np.stack([local] * 2 + [strided] * 2)}[combine]
    np.testing.assert_allclose(out, _expected_output(layer, x, mask, key_mask), atol=3e-5)


@pytest.mark.parametrize("implementation", ["op", "portable", "reference"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("combine", ["merged", "split", "block", "summary"])
def test_fixed_combinations(combine, causal, implementation, request):
    if implementation == "op":
        request.getfixturevalue("op_library")
    heads, length, stride, summary = 4, 45, 8, 2
    layer = tsa.FixedAttention(num_heads=heads, key_dim=4, stride=stride, summary=summary,
                               num_summary_groups=2, combine=combine, block_size=2,
                               causal=causal, implementation=implementation)
    x = random_inputs(zlib.crc32(f"fixed{combine}{causal}".encode()) % 1000, length=length)
    out = layer(x).numpy()
    masks = []
    for head in range(heads):
        if combine == "split":
            part, group = ("block", 0) if head < 2 else ("summary", (head - 2) % 2)
        else:
            part, group = combine, head % 2
        block, summaries = _fixed_sets(stride, summary, length, causal, group)
        masks.append({"merged": block | summaries, "block": block,
                      "summary": summaries}[part])
    np.testing.assert_allclose(out, _expected_output(layer, x, np.stack(masks)), atol=3e-5)


def test_interleaved_helpers():
    layers = tsa.StridedAttention.interleaved(4, num_heads=2, key_dim=4, stride=4,
                                              block_size=4, name="attn")
    assert [l.combine for l in layers] == ["local", "strided"] * 2
    assert [l.name for l in layers] == [f"attn_{i}" for i in range(4)]
    fixed = tsa.FixedAttention.interleaved(3, 2, 4, stride=8, summary=4, block_size=4)
    assert [l.combine for l in fixed] == ["block", "summary", "block"]
    # Stacked in a model, they run.
    x = random_inputs(2)
    h = x
    for layer in layers:
        h = layer(h)
    assert h.shape == x.shape


def test_layouts_are_cached_per_length():
    layer = tsa.FixedAttention(num_heads=2, key_dim=4, stride=8, summary=4, block_size=4,
                               implementation="portable")
    assert layer.layouts_for(100)[0] is layer.layouts_for(100)[0]
    assert layer.layouts_for(100)[0].seq_len == 100
    assert layer.layouts_for(101)[0].seq_len == 104


def test_unknown_length_uses_max_length(tmp_path):
    layer = tsa.LocalAttention(num_heads=2, key_dim=4, window=6, block_size=4, max_length=64,
                               implementation="portable")
    x = random_inputs(4)
    expected = layer(x).numpy()
    fn = tf.function(layer, input_signature=[tf.TensorSpec([None, None, FEATURES])])
    np.testing.assert_allclose(fn(tf.constant(x)), expected, atol=1e-6)
    unbounded = tsa.LocalAttention(num_heads=2, key_dim=4, window=6, block_size=4,
                                   implementation="portable")
    unbounded(x)
    fn = tf.function(unbounded, input_signature=[tf.TensorSpec([None, None, FEATURES])])
    with pytest.raises(ValueError, match="max_length"):
        fn.get_concrete_function()


def test_embedding_mask_propagates_to_keys():
    """Embedding(mask_zero=True) → our layer: left-padded tokens are hidden from every query."""
    tokens = np.array([[0, 0, 0, 5, 6, 7, 8, 9], [3, 4, 5, 6, 7, 8, 9, 1]])
    inputs = keras.Input(shape=(8,), dtype="int32")
    embedded = keras.layers.Embedding(10, FEATURES, mask_zero=True)(inputs)
    attention = tsa.LocalAttention(num_heads=2, key_dim=4, window=4, block_size=4,
                                   implementation="portable")
    model = keras.Model(inputs, attention(embedded))
    out = model(tokens).numpy()
    embedding = model.layers[1]
    x = embedding(tokens).numpy()
    key_mask = tokens != 0
    layout = attention.layouts_for(8)[0]
    expected = _expected_output(attention, x, _natural_mask(layout, True, 8), key_mask)
    # Queries with no visible key (positions 0-2 of the first row) output the bias only.
    np.testing.assert_allclose(out, expected, atol=3e-5)
    assert not np.allclose(out, attention(x).numpy(), atol=1e-3)


# ----------------------------------------------------------------------------- bad input

def test_bad_ranks_name_the_argument():
    layer = tsa.LocalAttention(num_heads=2, key_dim=4, window=4, implementation="portable")
    with pytest.raises(ValueError, match="query"):
        layer(np.zeros((2, 8), "float32"))
    with pytest.raises(ValueError, match="query"):
        layer(keras.Input(shape=(8, 4, 4)))
    layer(np.zeros((2, 8, 4), "float32"))
    with pytest.raises(ValueError, match="value"):
        layer(np.zeros((2, 8, 4), "float32"), np.zeros((2, 8), "float32"))


def test_lengths_the_pattern_cannot_take():
    layer = tsa.FixedAttention(num_heads=2, key_dim=4, stride=8, summary=4, block_size=4,
                               implementation="portable")
    with pytest.raises(ValueError, match="value has 12 positions"):
        layer(np.zeros((2, 8, 4), "float32"), np.zeros((2, 12, 4), "float32"))
    with pytest.raises(ValueError, match="value has 12 positions"):
        layer(keras.Input(shape=(8, 4)), keras.Input(shape=(12, 4)))
    fixed_length = tsa.SparseMultiHeadAttention(
        num_heads=2, key_dim=4, pattern=BlockLayout.dense(16, block_size=4),
        implementation="portable")
    with pytest.raises(ValueError, match="covers 16"):
        fixed_length(np.zeros((1, 20, 4), "float32"))
    bounded = tsa.LocalAttention(num_heads=2, key_dim=4, window=4, max_length=16,
                                 implementation="portable")
    with pytest.raises(ValueError, match="max_length"):
        bounded(np.zeros((1, 20, 4), "float32"))


@pytest.mark.parametrize("make, name", [
    (lambda: tsa.FixedAttention(2, 4, stride=12, summary=4, block_size=8), "block_size"),
    (lambda: tsa.FixedAttention(2, 4, stride=8, summary=4, num_summary_groups=3,
                                block_size=4),
     "num_summary_groups"),
    (lambda: tsa.FixedAttention(1, 4, stride=8, summary=4, combine="split"), "num_heads"),
    (lambda: tsa.FixedAttention(2, 4, stride=8, summary=4, combine="both"), "combine"),
    (lambda: tsa.StridedAttention(2, 4, stride=0), "stride"),
    (lambda: tsa.StridedAttention(2, 4, stride=4, window=3), "window"),
    (lambda: tsa.LocalAttention(2, 4, window=-1), "window"),
    (lambda: tsa.SparseMultiHeadAttention(2, 4, pattern="local"), "window"),
    (lambda: tsa.SparseMultiHeadAttention(2, 4, pattern="dense", stride=4), "stride"),
    (lambda: tsa.SparseMultiHeadAttention(2, 4, pattern="butterfly"), "pattern"),
    (lambda: tsa.SparseMultiHeadAttention(0, 4), "num_heads"),
    (lambda: tsa.SparseMultiHeadAttention(2, 4, block_size=0), "block_size"),
    (lambda: tsa.SparseMultiHeadAttention(2, 4, implementation="fast"), "implementation"),
    (lambda: tsa.SparseMultiHeadAttention(2, 4, dropout=1.5), "dropout"),
    (lambda: tsa.SparseMultiHeadAttention(
        3, 4, pattern=BlockLayout.fixed(32, 4, 8, 4, num_heads=2, num_summary_groups=2)),
     "num_heads"),
    (lambda: tsa.SparseMultiHeadAttention(2, 4, pattern=BlockLayout.dense(16, 4),
                                          causal=False), "causal"),
])
def test_incompatible_parameters_name_the_parameter(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_op_refuses_float64(op_library):
    with pytest.raises(ValueError, match="dtype"):
        tsa.LocalAttention(num_heads=2, key_dim=4, window=4, implementation="op",
                           dtype="float64")
    # The portable path computes in any float dtype.
    layer = tsa.LocalAttention(num_heads=2, key_dim=4, window=4, block_size=4,
                               implementation="portable", dtype="float64")
    assert layer(np.ones((1, 9, 4))).dtype == "float64"


def test_dense_masks_and_scores_are_refused():
    layer = tsa.LocalAttention(num_heads=2, key_dim=4, window=4, implementation="portable")
    x = np.zeros((1, 8, 4), "float32")
    with pytest.raises(ValueError, match="attention_mask"):
        layer(x, attention_mask=np.ones((1, 8, 8), bool))
    with pytest.raises(ValueError, match="return_attention_scores"):
        layer(x, return_attention_scores=True)
