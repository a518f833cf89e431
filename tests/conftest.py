"""Shared test set-up: GPU tests skip where TensorFlow sees no GPU; the op library must load."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if tf.config.list_physical_devices("GPU"):
        return
    skip = pytest.mark.skip(reason="no GPU visible to TensorFlow")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def op_library():
    """The op module. The library is always built for the tests, so a missing or unloadable
    one fails the tests that need it instead of skipping them."""
    from tf_sparse_attn._load import load_op_library

    try:
        return load_op_library()
    except ImportError as error:
        pytest.fail(f"the op library does not load: {error}")
