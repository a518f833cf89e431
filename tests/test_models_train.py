"""Training with model.fit on the built-in corpus, the CLI's errors, and resuming a killed run."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import tensorflow as tf

from tests import _models_path
from tf_sparse_attn.models import get_config
from tf_sparse_attn.models.config import ConfigError
from tf_sparse_attn.models.export import main as export_main
from tf_sparse_attn.models.sample import main as sample_main
from tf_sparse_attn.models.train import main, read_backup, train

# Keras's weight saving converts variables with a NumPy 1 idiom; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def test_loss_falls_on_the_builtin_corpus(tmp_path):
    config = get_config("tiny", {"train.steps": 40, "train.steps_per_epoch": 20,
                                 "train.learning_rate": 5e-3, "train.validation_steps": 4})
    model, history, summary = train(config, str(tmp_path), verbose=0, sample_count=1)
    bits = history.history["val_bits_per_byte"]
    # Zero-initialised logits start at 8 bits per byte; text is far more predictable.
    assert bits[-1] < 6.0, bits
    assert history.history["bits_per_byte"][-1] < history.history["bits_per_byte"][0]
    assert summary["steps"] == 40
    for name in ("model.weights.h5", "config.json", "summary.json", "sample.txt",
                 "checkpoints/epoch-002.weights.h5"):
        assert (tmp_path / name).exists(), name
    events = list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert events, "TensorBoard wrote no event file"
    # A finished run leaves no backup to resume from.
    assert not (tmp_path / "backup").exists()
    assert float(model.optimizer.learning_rate.numpy()) < 5e-3  # the cosine has decayed

    # The sampling and export CLIs read the run directory.
    assert sample_main([str(tmp_path), "--num", "2", "--prompt", "import ",
                        "--temperature", "0.5", "--output", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli.txt").read_bytes().startswith(b"import ")
    assert export_main([str(tmp_path), str(tmp_path / "export" / "1")]) == 0
    served = tf.saved_model.load(str(tmp_path / "export" / "1")).signatures["serving_default"]
    log_probs = served(tokens=tf.constant([[105, 109, 112]], tf.int32))["next_token_log_probs"]
    assert log_probs.shape == (1, 256)
    assert sample_main([str(tmp_path / "nothing")]) == 2


def test_cli_rejects_bad_configs_and_missing_data_before_training(tmp_path, capsys):
    code = main(["--config", "tiny", "--output-dir", str(tmp_path / "a"),
                 "--set", "model.attention=local,strided", "--set", "model.seq_len=96",
                 "--set", "model.position_shape=(6,16)"])
    assert code == 2
    assert "cannot take seq_len=96" in capsys.readouterr().err
    code = main(["--config", "tiny", "--task", "enwik8", "--data", str(tmp_path / "nope"),
                 "--output-dir", str(tmp_path / "b")])
    assert code == 2
    assert "data file not found" in capsys.readouterr().err
    assert not (tmp_path / "b" / "checkpoints").exists()


def _train_command(output_dir, steps):
    return _models_path.module_command("tf_sparse_attn.models.train") + [
        "--config", "tiny", "--steps", str(steps), "--steps-per-epoch", "25",
        "--output-dir", str(output_dir), "--no-sample", "--verbose", "2",
        "--set", "train.backup_every=5", "--set", "model.dropout=0.1"]


def _final_weights(output_dir):
    from tf_sparse_attn.models.sample import load_run
    _, model = load_run(str(output_dir))
    return model.get_weights()


@pytest.mark.slow
def test_killed_run_resumes_with_the_same_state(tmp_path):
    # Long enough that a fast machine is still training when the backup reaches step 20.
    steps = 100
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_command(killed, steps), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    backup = {}
    while time.time() < deadline and proc.poll() is None:
        backup = read_backup(str(killed / "backup"))
        if backup.get("step", 0) >= 20:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.stdout.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    backup = read_backup(str(killed / "backup"))
    assert 20 <= backup["step"] < steps and backup["step"] % 5 == 0
    assert backup["step"] % 25 != 0 or backup["batch"] == 24  # mid-epoch or at its end

    resumed = subprocess.run(_train_command(killed, steps), env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"at step {backup['step']}" in resumed.stdout, resumed.stdout
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["steps"] == steps

    straight = tmp_path / "straight"
    run = subprocess.run(_train_command(straight, steps), env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    # Same data, same dropout seeds, same optimizer state at the resumption point: the same
    # weights at the end as a run that was never interrupted.
    for a, b in zip(_final_weights(killed), _final_weights(straight)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_fused_adamw_takes_adamw_steps():
    """FusedAdamW's one XLA program per step (clipping, decoupled weight decay with its
    exclusions, the Adam update, sparse embedding gradients) moves the weights as AdamW does."""
    import keras  # pylint: disable=import-outside-toplevel

    from tf_sparse_attn.models import build_model  # pylint: disable=import-outside-toplevel
    from tf_sparse_attn.models.train import (FusedAdamW,  # pylint: disable=import-outside-toplevel
                                             make_optimizer)

    config = get_config("tiny", {"train.steps": 6, "train.warmup_steps": 2,
                                 "train.learning_rate": 1e-2, "train.clip_norm": 0.5,
                                 "train.weight_decay": 0.1})
    tokens = np.random.default_rng(2).integers(0, 256, [8, config.model.seq_len])
    weights = []
    for fused in (True, False):
        keras.utils.set_random_seed(0)
        model = build_model(config.model)
        optimizer = make_optimizer(config.train)
        assert isinstance(optimizer, FusedAdamW)
        optimizer.jit_compile = fused
        model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=False)
        model.fit(tokens, tokens, batch_size=2, epochs=1, shuffle=False, verbose=0)
        assert len(optimizer._fused_steps) == int(fused)  # pylint: disable=protected-access
        weights.append([w.numpy() for w in model.weights])
    keras.utils.set_random_seed(0)
    initial = [w.numpy() for w in build_model(config.model).weights]
    names = [w.path for w in model.weights]
    for name, fused, plain in zip(names, *weights):
        # Adam divides by sqrt(v): where a gradient is near zero, float32 rounding of the
        # two programs' reductions moves its step by up to ~1e-4 of the learning rate.
        np.testing.assert_allclose(fused, plain, rtol=1e-5, atol=1e-6 + 1e-4 * 1e-2,
                                   err_msg=name)
    # The steps moved the weights, decayed ones included.
    assert all(not np.array_equal(start, plain) for name, start, plain in
               zip(names, initial, weights[1]) if "ffn_in/kernel" in name)
    # Serialisable with its setting.
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(FusedAdamW(
        learning_rate=1e-3, jit_compile=False)))
    assert isinstance(restored, FusedAdamW) and restored.jit_compile is False
    # "auto" fuses only where a GPU is visible.
    fused_here = FusedAdamW()._fused()  # pylint: disable=protected-access
    assert fused_here == bool(tf.config.list_logical_devices("GPU"))


@pytest.mark.gpu
def test_model_trains_on_gpu_with_xla_blocks_and_fused_adamw():
    """On a GPU the defaults compile the blocks' arithmetic and the optimizer step with XLA
    around the op; a tiny model's loss must fall through model.fit there."""
    import keras  # pylint: disable=import-outside-toplevel

    from tf_sparse_attn.models import model as model_lib  # pylint: disable=import-outside-toplevel
    from tf_sparse_attn.models.train import create_model  # pylint: disable=import-outside-toplevel

    # The tiny configuration's 8-token blocks are finer than the GPU kernels take.
    config = get_config("tiny", {"train.steps": 30, "train.warmup_steps": 5,
                                 "train.learning_rate": 5e-3, "train.mixed_precision": "bfloat16",
                                 "model.dropout": 0.1, "model.block_size": 16,
                                 "model.stride": 32, "model.summary": 16,
                                 "model.position_shape": (4, 32)})
    keras.utils.set_random_seed(0)
    model = create_model(config)
    # Text-like tokens: a repeating phrase the model can learn within a few steps.
    phrase = np.frombuffer(b"the sparse transformer attends to its pattern. ", np.uint8)
    tokens = np.resize(phrase, [16, config.model.seq_len]).astype(np.int32)
    program = model_lib._feed_forward_residual_xla  # pylint: disable=protected-access
    traces = program.experimental_get_tracing_count()
    try:
        history = model.fit(tokens, tokens, batch_size=4, epochs=6, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    losses = history.history["loss"]
    assert all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses
    assert program.experimental_get_tracing_count() > traces
    assert len(model.optimizer._fused_steps) == 1  # pylint: disable=protected-access


def test_training_on_a_gpu_refuses_blocks_finer_than_its_kernels(tmp_path, monkeypatch):
    """Where TensorFlow sees a GPU, a block size the GPU kernels do not take fails before the
    first step is traced, naming the setting; without a GPU the configuration is accepted."""
    from tf_sparse_attn.models import train as train_lib  # pylint: disable=import-outside-toplevel

    def visible_gpus(count):
        monkeypatch.setattr(tf.config, "list_logical_devices",
                            lambda kind=None: ["/device:GPU:0"] * count if kind == "GPU" else [])

    config = get_config("tiny")
    assert config.model.block_size % 16
    model = train_lib.create_model(config)
    visible_gpus(0)
    train_lib.check_gpu_block_size(model)
    visible_gpus(1)
    with pytest.raises(ConfigError, match="model.block_size=8"):
        train_lib.check_gpu_block_size(model)
    with pytest.raises(ConfigError, match="multiples of 16"):
        train_lib.train(config, str(tmp_path), verbose=0, sample=False)
    assert not os.path.exists(os.path.join(tmp_path, "backup"))
    sixteen = get_config("tiny", {"model.block_size": 16, "model.stride": 32,
                                  "model.summary": 16, "model.position_shape": (4, 32)})
    train_lib.check_gpu_block_size(train_lib.create_model(sixteen))
