"""Loads the compiled op library that sits beside this file."""

import functools
import os

import tensorflow as tf

LIBRARY_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sparse_attention_ops.so")


@functools.lru_cache(maxsize=None)
def load_op_library():
    """The loaded op module; raises ImportError with the reason when it cannot be loaded."""
    if not os.path.exists(LIBRARY_PATH):
        raise ImportError(
            f"the tf_sparse_attn op library is missing ({LIBRARY_PATH}); build it with "
            "`pip install --no-build-isolation -e .`, or use implementation='portable'")
    try:
        return tf.load_op_library(LIBRARY_PATH)
    except tf.errors.NotFoundError as error:
        raise ImportError(
            f"the tf_sparse_attn op library does not load into TensorFlow {tf.__version__}: it "
            f"was built for another version; rebuild it ({error})") from error


def op_library_available() -> bool:
    try:
        load_op_library()
    except ImportError:
        return False
    return True
