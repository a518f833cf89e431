"""Train a Sparse Transformer with `model.fit`: bits per dim (per byte for text) as the metric,
AdamW with decoupled weight decay, linear warm-up then cosine decay, gradient clipping, mixed
precision, checkpoints, resumption after interruption and TensorBoard.

With no arguments it trains the built-in default, a small model on the bytes of the Python
standard library, in a few minutes on a CPU, then writes a checkpoint and a sample:

    python -m tf_sparse_attn.models.train

Other runs:

    python -m tf_sparse_attn.models.train --config enwik8 --data /data/enwik8 --output-dir runs/e8
    python -m tf_sparse_attn.models.train --config cifar10 --data-dir ~/tensorflow_datasets
    python -m tf_sparse_attn.models.train --config audio --set data.source=wav --data clips/
    python -m tf_sparse_attn.models.train --config tiny --steps 50 --set model.attention=dense

An interrupted run started again with the same output directory resumes from its last backup
(every `train.backup_every` steps) with the same weights, optimizer state and step; the byte
pipelines also give it the same batches it would have seen.

Output directory: config.json, model.weights.h5 (final), checkpoints/ (each epoch), backup/
(while running), logs/ (TensorBoard), sample.{txt,png,wav}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_sparse_attn.models import config as config_lib  # noqa: E402
from tf_sparse_attn.models import data as data_lib  # noqa: E402
from tf_sparse_attn.models.model import (bits_per_dim, build_model,  # noqa: E402
                                         count_parameters, xla_enabled)

BACKUP_DIR = "backup"
METADATA = "training_metadata.json"


# ------------------------------------------------------------------------------- optimizer

def learning_rate_schedule(t: config_lib.TrainConfig):
    """Linear warm-up from 0 to learning_rate over warmup_steps, then cosine decay to
    min_learning_rate_ratio * learning_rate at `steps`."""
    warmup = min(t.warmup_steps, max(t.steps - 1, 0))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0, decay_steps=max(t.steps - warmup, 1),
        alpha=t.min_learning_rate_ratio, warmup_target=t.learning_rate, warmup_steps=warmup)


@keras.saving.register_keras_serializable(package="tf_sparse_attn")
class FusedAdamW(keras.optimizers.AdamW):
    """keras.optimizers.AdamW whose step (gradient clipping, weight decay and the Adam update
    of every variable) runs as one XLA program, instead of a dozen small kernels per variable:
    a 30-layer model has about 500 variables. jit_compile: True, False, or "auto" for on when
    TensorFlow sees a GPU. Gradient accumulation, EMA and distribution strategies take
    AdamW's own path.

    >>> optimizer = FusedAdamW(learning_rate=1e-3, jit_compile=True)
    >>> optimizer.get_config()["jit_compile"]
    True
    """

    def __init__(self, *args, jit_compile="auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.jit_compile = jit_compile
        self._fused_steps = {}

    def get_config(self):
        return dict(super().get_config(), jit_compile=self.jit_compile)

    def _fused(self) -> bool:
        if self.gradient_accumulation_steps or self.use_ema or tf.distribute.has_strategy():
            return False
        return xla_enabled(self.jit_compile)

    def _backend_apply_gradients(self, grads, trainable_variables):
        if not self._fused():
            return super()._backend_apply_gradients(grads, trainable_variables)
        variables = list(trainable_variables)
        key = tuple(self._var_key(v) for v in variables)
        if key not in self._fused_steps:
            # AdamW's own step (clipping, decoupled weight decay, the update), compiled whole.
            adamw_step = super()._backend_apply_gradients
            self._fused_steps[key] = tf.function(
                lambda grads: adamw_step(grads, variables), jit_compile=True)
        # Embedding gradients arrive as IndexedSlices; the update reads them densely anyway.
        return self._fused_steps[key]([tf.convert_to_tensor(g) for g in grads])


def make_optimizer(t: config_lib.TrainConfig):
    optimizer = FusedAdamW(
        learning_rate=learning_rate_schedule(t), weight_decay=t.weight_decay, beta_1=t.beta_1,
        beta_2=t.beta_2, global_clipnorm=t.clip_norm or None)
    # Decay the matrices only: not biases, LayerNorm scales and offsets, or embeddings.
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta", "embeddings",
                                                   "axis_"])
    return optimizer


def compile_model(model, config: config_lib.Config):
    t = config.train
    model.compile(
        optimizer=make_optimizer(t),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.MeanMetricWrapper(bits_per_dim, name=config.metric_name)],
        jit_compile=t.jit_compile)
    return model


def set_precision(policy: str | None):
    """Sets Keras's global dtype policy for the model about to be built."""
    keras.mixed_precision.set_global_policy(
        {None: "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}[policy])


def create_model(config: config_lib.Config, compiled: bool = True):
    """A built (and compiled) model for `config` under its precision policy."""
    set_precision(config.train.mixed_precision)
    model = build_model(config.model, name=f"sparse_transformer_{config.name}")
    return compile_model(model, config) if compiled else model


# ------------------------------------------------------------------------------- callbacks

def optimizer_step(model) -> int:
    return int(model.optimizer.iterations.value.numpy())


class StepBackup(keras.callbacks.BackupAndRestore):
    """BackupAndRestore whose backups are written atomically (a run killed while writing one
    keeps the previous one) and also record the optimizer step."""

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        partial = self._weights_path[:-len(".weights.h5")] + ".partial.weights.h5"
        self.model.save_weights(partial, overwrite=True)
        os.replace(partial, self._weights_path)
        metadata = {"epoch": self._current_epoch, "batch": self._last_batch_seen,
                    "step": optimizer_step(self.model)}
        with open(self._training_metadata_path + ".partial", "w") as f:
            json.dump(metadata, f)
        os.replace(self._training_metadata_path + ".partial", self._training_metadata_path)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        step = optimizer_step(self.model)
        if step:
            print(f"resumed from {self.backup_dir} at step {step} "
                  f"(epoch {self.model._initial_epoch + 1})", flush=True)  # pylint: disable=protected-access


class StopAtStep(keras.callbacks.Callback):
    """Stops when the optimizer has taken `steps` steps: a resumed run ends where an
    uninterrupted one would, even when it resumed mid-epoch."""

    def __init__(self, steps: int):
        super().__init__()
        self.steps = int(steps)

    def on_train_begin(self, logs=None):
        self._step = optimizer_step(self.model)

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self._step >= self.steps:
            self.model.stop_training = True


class Throughput(keras.callbacks.Callback):
    """Tokens per second of the training steps (excluding the first, compiling, epoch)."""

    def __init__(self, tokens_per_step: int):
        super().__init__()
        self.tokens_per_step = tokens_per_step
        self.rates = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._steps = time.perf_counter(), 0

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1

    def on_epoch_end(self, epoch, logs=None):
        elapsed = time.perf_counter() - self._start
        if self._steps and elapsed > 0:
            self.rates.append(self._steps * self.tokens_per_step / elapsed)
            if logs is not None:
                logs["tokens_per_second"] = self.rates[-1]


def read_backup(backup_dir: str) -> dict:
    """The metadata of a backup ({"epoch", "batch", "step"}), or {} when there is none."""
    path = os.path.join(backup_dir, METADATA)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def restore_backup(model, backup_dir: str) -> int:
    """Loads a backup's weights and optimizer state into `model`; returns its step (0 when
    there is no backup). The step comes from the restored optimizer itself, so the data
    pipeline restarts exactly where the weights are."""
    path = os.path.join(backup_dir, "latest.weights.h5")
    if not os.path.exists(path):
        return 0
    model.optimizer.build(model.trainable_variables)
    model.load_weights(path)
    return optimizer_step(model)


# ---------------------------------------------------------------------------------- train

def check_gpu_block_size(model):
    """Raises ConfigError, before any step is traced, where TensorFlow sees a GPU and a layer's
    op would run with a block size the GPU kernels do not take (multiples of 16)."""
    if not tf.config.list_logical_devices("GPU"):
        return
    for block in model.blocks:
        attention = block.attention
        if getattr(attention, "implementation", None) == "op" and attention.block_size % 16:
            raise config_lib.ConfigError(
                f"model.block_size={attention.block_size}: the GPU kernels take block sizes "
                "that are multiples of 16; set model.block_size (and stride, summary) so, or "
                "hide the GPU (CUDA_VISIBLE_DEVICES=) to train on the CPU")


def train(config: config_lib.Config, output_dir: str, *, verbose="auto", sample: bool = True,
          sample_count: int = 2, callbacks=(), download: bool = False):
    """Trains `config` into `output_dir`, resuming from a backup there. Returns
    (model, history, summary dict)."""
    config = config_lib.validate(config)
    t, m = config.train, config.model
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "config.json"), "w") as f:
        f.write(config.to_json())

    backup_dir = os.path.join(output_dir, BACKUP_DIR)
    # Seeded initialisation and dropout: a resumed run and an uninterrupted one agree.
    keras.utils.set_random_seed(t.seed)
    model = create_model(config)
    check_gpu_block_size(model)
    start_step = restore_backup(model, backup_dir)
    initial_epoch = int(read_backup(backup_dir).get("epoch", start_step // t.steps_per_epoch))
    # A missing file or an unprepared dataset fails here, before any training step.
    train_ds, valid_ds = data_lib.make_datasets(config, start_step=start_step,
                                                download=download)
    steps_per_epoch = min(t.steps_per_epoch, t.steps)
    remaining = max(t.steps - start_step, 0)
    epochs = initial_epoch + math.ceil(remaining / steps_per_epoch)
    if verbose:
        print(f"{config.name}: {m.num_layers} layers, d={m.d_model}, {m.num_heads} heads, "
              f"T={m.seq_len}, attention {m.attention}, {count_parameters(model):,} "
              f"parameters, {model.blocks[0].attention.implementation} attention, "
              f"recompute={'on' if m.recompute else 'off'}, XLA blocks="
              f"{'on' if xla_enabled(m.xla_blocks) else 'off'}; {t.steps} steps of "
              f"{t.batch_size} sequences", flush=True)

    throughput = Throughput(t.batch_size * m.seq_len)
    checkpoints = os.path.join(output_dir, "checkpoints")
    os.makedirs(checkpoints, exist_ok=True)
    all_callbacks = [
        StepBackup(backup_dir, save_freq=t.backup_every),
        keras.callbacks.ModelCheckpoint(
            os.path.join(checkpoints, "epoch-{epoch:03d}.weights.h5"), save_weights_only=True),
        StopAtStep(t.steps),
        throughput,
        *callbacks,
    ]
    all_callbacks.append(keras.callbacks.TensorBoard(
        os.path.join(output_dir, "logs"), update_freq="epoch", profile_batch=0,
        write_graph=False))
    started = time.perf_counter()
    history = model.fit(train_ds, validation_data=valid_ds, epochs=epochs,
                        steps_per_epoch=steps_per_epoch, initial_epoch=initial_epoch,
                        callbacks=all_callbacks, verbose=verbose, shuffle=False)
    elapsed = time.perf_counter() - started
    weights_path = os.path.join(output_dir, "model.weights.h5")
    model.save_weights(weights_path)

    summary = {"config": config.name, "steps": optimizer_step(model),
               "train_seconds": round(elapsed, 1), "weights": weights_path}
    metric = config.metric_name
    for key in (metric, "val_" + metric):
        if history.history.get(key):
            summary[key] = float(history.history[key][-1])
    if throughput.rates:
        summary["tokens_per_second"] = round(throughput.rates[-1], 1)
    if sample:
        from tf_sparse_attn.models import sampling  # pylint: disable=import-outside-toplevel
        tokens = sampling.Sampler(model, batch_size=sample_count).sample(
            temperature=1.0, seed=t.seed)
        summary["samples"] = sampling.write_samples(
            tokens, config.data.task, os.path.join(output_dir, "sample"),
            image_shape=m.position_shape, encoding=config.data.encoding,
            sample_rate=config.data.sample_rate)
    with open(os.path.join(output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if verbose:
        report = ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in summary.items()
                           if k in (metric, "val_" + metric))
        print(f"done: {summary['steps']} steps in {elapsed:.0f} s; {report}; "
              f"{summary.get('tokens_per_second', 0):.0f} tokens/s; weights {weights_path}",
              flush=True)
        for path in summary.get("samples", []):
            print(f"sample: {path}", flush=True)
        if config.data.task in ("bytes", "enwik8") and summary.get("samples"):
            with open(summary["samples"][0], "rb") as f:
                text = f.read(400).decode("utf-8", errors="replace")
            print("-" * 72 + "\n" + text + "\n" + "-" * 72, flush=True)
    return model, history, summary


# ------------------------------------------------------------------------------------ CLI

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m tf_sparse_attn.models.train",
        description="Train a Sparse Transformer. With no arguments: the built-in default, a "
                    "small model on the bytes of the Python standard library.")
    parser.add_argument("--config", default="default", choices=sorted(config_lib.CONFIGS),
                        help="a registered configuration (default: %(default)s)")
    parser.add_argument("--task", choices=config_lib.TASKS, help="override the data task")
    parser.add_argument("--data", dest="path", help="data file or directory (enwik8 file, "
                        "a byte corpus, WAV files)")
    parser.add_argument("--data-dir", help="TFDS data directory holding prepared datasets")
    parser.add_argument("--steps", type=int, help="total optimizer steps")
    parser.add_argument("--epochs", type=int, help="epochs of --steps-per-epoch steps "
                        "(sets the total steps)")
    parser.add_argument("--steps-per-epoch", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--output-dir", default=None,
                        help="where checkpoints, logs and samples go (default: runs/<config>)")
    parser.add_argument("--implementation", choices=("op", "portable", "reference"),
                        help="attention implementation (default: op when the library loads)")
    parser.add_argument("--no-recompute", action="store_true",
                        help="keep activations instead of recomputing blocks in backward")
    parser.add_argument("--mixed-precision", choices=("bfloat16", "float16", "none"))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override any field, e.g. --set model.num_layers=8 (repeatable)")
    parser.add_argument("--no-sample", action="store_true", help="skip the final sample")
    parser.add_argument("--download", action="store_true",
                        help="let TFDS download and prepare a missing dataset")
    parser.add_argument("--verbose", type=int, default=None, choices=(0, 1, 2),
                        help="Keras verbosity: 1 progress bars, 2 one line per epoch")
    return parser.parse_args(argv)


def config_from_args(args) -> config_lib.Config:
    overrides = list(args.set)
    pairs = {"data.task": args.task, "data.path": args.path, "data.data_dir": args.data_dir,
             "train.steps_per_epoch": args.steps_per_epoch, "train.batch_size": args.batch_size,
             "model.implementation": args.implementation}
    if args.steps is not None:
        pairs["train.steps"] = args.steps
    if args.no_recompute:
        pairs["model.recompute"] = False
    if args.mixed_precision:
        pairs["train.mixed_precision"] = None if args.mixed_precision == "none" \
            else args.mixed_precision
    config = config_lib.get_config(args.config, overrides)
    config = config_lib.apply_overrides(
        config, {k: v for k, v in pairs.items() if v is not None or k ==
                 "train.mixed_precision" and args.mixed_precision})
    if args.epochs is not None:
        config = config_lib.apply_overrides(
            config, {"train.steps": args.epochs * config.train.steps_per_epoch})
    return config_lib.validate(config)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = config_from_args(args)
        output_dir = args.output_dir or os.path.join("runs", config.name)
        verbose = args.verbose if args.verbose is not None else "auto"
        train(config, output_dir, verbose=verbose, sample=not args.no_sample,
              download=args.download)
    except (config_lib.ConfigError, data_lib.DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
