"""The deep Sparse Transformer for images, audio and bytes (Child et al. 2019): configurations,
the Keras model with recomputed blocks, tf.data pipelines, training with `model.fit`, cached
sampling and SavedModel export.

Train the built-in default (bytes of the Python standard library, a few minutes on a CPU):

    python -m tf_sparse_attn.models.train

>>> from tf_sparse_attn.models import build_model, get_config
>>> model = build_model(get_config("tiny").model)
>>> model.count_params() > 0
True
"""

from tf_sparse_attn.models.config import (CONFIGS, Config, ConfigError, DataConfig, ModelConfig,
                                          TrainConfig, get_config, validate)
from tf_sparse_attn.models.embeddings import FactorizedPositionEmbedding
from tf_sparse_attn.models.model import SparseTransformer, TransformerBlock, build_model

__all__ = [
    "CONFIGS",
    "Config",
    "ConfigError",
    "DataConfig",
    "FactorizedPositionEmbedding",
    "ModelConfig",
    "SparseTransformer",
    "TrainConfig",
    "TransformerBlock",
    "build_model",
    "get_config",
    "validate",
]
