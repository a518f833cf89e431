"""tf_sparse_attn: block-sparse (Sparse Transformer) attention for TensorFlow and Keras 3.

>>> import tensorflow as tf
>>> import tf_sparse_attn as tsa
>>> layer = tsa.FixedAttention(num_heads=4, key_dim=16, stride=64, summary=16, block_size=16)
>>> layer(tf.random.normal([2, 300, 64])).shape
TensorShape([2, 300, 64])
"""

from tf_sparse_attn._load import op_library_available
from tf_sparse_attn.layouts import BlockLayout, make_layout
from tf_sparse_attn.ops import merge_attention, sparse_attention
from tf_sparse_attn.layers import (FixedAttention, LocalAttention, SparseMultiHeadAttention,
                                   StridedAttention)

__version__ = "0.1.0"

# Importing the package registers the op with TensorFlow when the library is there, so that
# a SavedModel exported with implementation="op" loads after `import tf_sparse_attn`.
op_library_available()

__all__ = [
    "BlockLayout",
    "FixedAttention",
    "LocalAttention",
    "SparseMultiHeadAttention",
    "StridedAttention",
    "make_layout",
    "merge_attention",
    "op_library_available",
    "sparse_attention",
]
