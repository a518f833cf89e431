"""Export a trained Sparse Transformer as a SavedModel that serves next-token log-probabilities.

The serving signature (`serving_default`, also `serve`) takes `tokens`, int32 [batch, n] with
0 <= n < seq_len, and returns

- `log_probs` [batch, n + 1, vocab]: log p(x_i | x_<i) for i = 0..n, so row i scores token i
  and row n is the distribution of the token that follows the input;
- `next_token_log_probs` [batch, vocab]: row n alone.

implementation="portable" (the default) exports stock TensorFlow operations that TensorFlow
Serving loads as it is; "op" exports the fused custom op, which needs the op library loaded
(`import tf_sparse_attn`) wherever the SavedModel is loaded.

    python -m tf_sparse_attn.models.export runs/default /tmp/sparse_transformer/1

>>> import numpy as np, tempfile, tensorflow as tf
>>> from tf_sparse_attn.models import build_model, get_config
>>> from tf_sparse_attn.models.export import export_saved_model
>>> path = export_saved_model(build_model(get_config("tiny").model), tempfile.mkdtemp())
>>> served = tf.saved_model.load(path).signatures["serving_default"]
>>> served(tokens=tf.constant([[1, 2, 3]]))["next_token_log_probs"].shape
TensorShape([1, 256])
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_sparse_attn.models.model import SparseTransformer, build_model  # noqa: E402


def with_implementation(model: SparseTransformer, implementation: str) -> SparseTransformer:
    """The same model (same weights) on another attention implementation."""
    if all(block.attention.implementation == implementation for block in model.blocks):
        return model
    config = dataclasses.replace(model.config, implementation=implementation)
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(model.dtype_policy)
    try:
        twin = build_model(config, name=model.name)
    finally:
        keras.mixed_precision.set_global_policy(policy)
    twin.set_weights(model.get_weights())
    return twin


def serving_function(model: SparseTransformer):
    seq_len = model.config.seq_len

    def serve(tokens):
        tokens = tf.cast(tokens, tf.int32)
        length = tf.shape(tokens)[1]
        tf.debugging.assert_less(length, seq_len,
                                 message=f"tokens must be shorter than seq_len={seq_len}")
        # One more position than given: the model's logits at position n depend on tokens
        # before n only, so the appended token is never seen.
        padded = tf.pad(tokens, [[0, 0], [0, 1]])
        log_probs = tf.nn.log_softmax(tf.cast(model(padded, training=False), tf.float32))
        return {"log_probs": log_probs, "next_token_log_probs": log_probs[:, -1]}

    return serve


def export_saved_model(model: SparseTransformer, path: str,
                       implementation: str = "portable") -> str:
    """Writes `model` as a SavedModel at `path` with the serving signature above."""
    if implementation not in ("portable", "op"):
        raise ValueError(f"implementation must be 'portable' or 'op', got {implementation!r}")
    model = with_implementation(model, implementation)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serve", serving_function(model),
        input_signature=[tf.TensorSpec([None, None], tf.int32, name="tokens")])
    archive.write_out(path, verbose=False)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tf_sparse_attn.models.export",
                                     description="Export a training run as a SavedModel.")
    parser.add_argument("run_dir", help="training output directory")
    parser.add_argument("export_dir", help="SavedModel directory to write (e.g. .../1 for "
                        "TensorFlow Serving's versioned layout)")
    parser.add_argument("--weights", help="weights file (default: RUN_DIR/model.weights.h5)")
    parser.add_argument("--implementation", default="portable", choices=("portable", "op"))
    args = parser.parse_args(argv)
    from tf_sparse_attn.models.config import ConfigError  # pylint: disable=import-outside-toplevel
    from tf_sparse_attn.models.sample import load_run  # pylint: disable=import-outside-toplevel
    try:
        _, model = load_run(args.run_dir, args.weights, args.implementation)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(export_saved_model(model, args.export_dir, args.implementation))
    return 0


if __name__ == "__main__":
    sys.exit(main())
