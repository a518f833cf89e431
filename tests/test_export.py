"""SavedModel export (model.export(path, format="tf_saved_model")), reloaded in a fresh
process: the portable export with plain TensorFlow, never importing this package, and through
`saved_model_cli run`; the op export after importing the package. Outputs must equal the
original model's."""

import os
import shutil
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from tensorflow.core.protobuf import saved_model_pb2

import tf_sparse_attn as tsa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTH, FEATURES = 40, 16


def build_model(implementation, length=LENGTH, max_length=None):
    """Two sparse layers (strided merged, fixed split with summary groups) in a small
    residual stack, so the export holds several layouts and both reorderings."""
    common = dict(num_heads=2, key_dim=8, block_size=2, implementation=implementation,
                  max_length=max_length)
    inputs = keras.Input(shape=(length, FEATURES), name="features")
    h = inputs + tsa.StridedAttention(stride=4, **common)(inputs)
    h = keras.layers.LayerNormalization()(h)
    h = h + tsa.FixedAttention(stride=8, summary=2, num_summary_groups=2, combine="split",
                               **common)(h)
    outputs = keras.layers.Dense(3)(h)
    return keras.Model(inputs, outputs)


def graph_ops(path):
    """Every op type in the SavedModel's graph and function library."""
    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    graph = proto.meta_graphs[0].graph_def
    ops = {node.op for node in graph.node}
    for function in graph.library.function:
        ops.update(node.op for node in function.node_def)
    return ops


def run_fresh(script, *args, cwd):
    """Runs `script` in a new Python process with this repository off its path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], cwd=cwd,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result.stdout


PLAIN_TF_SCRIPT = """
    import sys
    import numpy as np
    import tensorflow as tf
    path = sys.argv[1]
    loaded = tf.saved_model.load(path)
    for name in sys.argv[2:]:
        x = np.load(f"{name}_x.npy")
        expected = np.load(f"{name}_y.npy")
        for result in (loaded.serve(tf.constant(x)),
                       list(loaded.signatures["serving_default"](tf.constant(x)).values())[0]):
            np.testing.assert_allclose(result.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert not [m for m in sys.modules if m.startswith("tf_sparse_attn")], "package imported"
    print("plain tensorflow ok")
"""


def test_portable_export_loads_in_plain_tensorflow(tmp_path):
    model = build_model("portable")
    x = np.random.default_rng(0).normal(size=(2, LENGTH, FEATURES)).astype("float32")
    np.save(tmp_path / "static_x.npy", x)
    np.save(tmp_path / "static_y.npy", model.predict(x, verbose=0))
    path = str(tmp_path / "portable")
    model.export(path, format="tf_saved_model", verbose=False)
    assert not {"BlockSparseAttention", "BlockSparseAttentionGrad"} & graph_ops(path)
    out = run_fresh(PLAIN_TF_SCRIPT, path, "static", cwd=str(tmp_path))
    assert "plain tensorflow ok" in out

    # saved_model_cli, TensorFlow's own command-line runner, on the same export.
    cli = shutil.which("saved_model_cli")
    assert cli, "saved_model_cli (installed with tensorflow) is not on PATH"
    signature = subprocess.run(
        [cli, "show", "--dir", path, "--tag_set", "serve", "--signature_def",
         "serving_default"], capture_output=True, text=True, check=True).stdout
    assert "features" in signature, signature
    outdir = tmp_path / "cli_out"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    subprocess.run([cli, "run", "--dir", path, "--tag_set", "serve", "--signature_def",
                    "serving_default", "--inputs", f"features={tmp_path / 'static_x.npy'}",
                    "--outdir", str(outdir)], capture_output=True, text=True, check=True,
                   env=env, timeout=600)
    outputs = list(outdir.glob("*.npy"))
    assert len(outputs) == 1, outputs
    np.testing.assert_allclose(np.load(outputs[0]), np.load(tmp_path / "static_y.npy"),
                               rtol=1e-5, atol=1e-5)


def test_portable_export_with_unknown_length(tmp_path):
    """An Input of unknown length exports with the layouts of max_length and serves any
    length up to it."""
    model = build_model("portable", length=None, max_length=64)
    rng = np.random.default_rng(1)
    names = []
    for length in (23, 64):
        x = rng.normal(size=(1, length, FEATURES)).astype("float32")
        np.save(tmp_path / f"len{length}_x.npy", x)
        np.save(tmp_path / f"len{length}_y.npy", model.predict(x, verbose=0))
        names.append(f"len{length}")
    path = str(tmp_path / "portable_dynamic")
    model.export(path, format="tf_saved_model", verbose=False)
    out = run_fresh(PLAIN_TF_SCRIPT, path, *names, cwd=str(tmp_path))
    assert "plain tensorflow ok" in out


def test_op_export_loads_after_importing_the_package(tmp_path, op_library):
    model = build_model("op")
    x = np.random.default_rng(2).normal(size=(3, LENGTH, FEATURES)).astype("float32")
    np.save(tmp_path / "op_x.npy", x)
    np.save(tmp_path / "op_y.npy", model.predict(x, verbose=0))
    path = str(tmp_path / "op")
    model.export(path, format="tf_saved_model", verbose=False)
    assert "BlockSparseAttention" in graph_ops(path)
    script = """
        import sys
        import numpy as np
        import tensorflow as tf
        import tf_sparse_attn  # registers the op with TensorFlow
        loaded = tf.saved_model.load(sys.argv[1])
        x = np.load("op_x.npy")
        np.testing.assert_allclose(loaded.serve(tf.constant(x)).numpy(), np.load("op_y.npy"),
                                   rtol=1e-5, atol=1e-5)
        print("op export ok")
    """
    # The package is found the way an installed one would be: from the repository root.
    env_root = ROOT
    out = run_fresh(f"import sys; sys.path.insert(0, {env_root!r})\n" +
                    textwrap.dedent(script), path, cwd=str(tmp_path))
    assert "op export ok" in out
