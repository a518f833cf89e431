"""Configurations of the Sparse Transformer: model, optimisation and data, and a registry of the
paper's runs (Child et al. 2019, table 2) plus small ones for CPUs and tests.

A configuration is three frozen dataclasses; `get_config(name, overrides)` returns a copy with
dotted overrides applied, and `validate(config)` checks everything the patterns and data need
before any weights or data are touched.

>>> from tf_sparse_attn.models.config import get_config
>>> config = get_config("enwik8")
>>> config.model.num_layers, config.model.d_model, config.model.seq_len
(30, 512, 12288)
>>> get_config("tiny", ["model.num_layers=3"]).model.num_layers
3
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
from typing import Any

# One kind per layer, each a construction of the library's layers:
#   dense           causal attention to every earlier position
#   local           the previous `window` positions (the paper's A(1))
#   strided         (i - j) mod stride == 0 only (the paper's A(2) alone)
#   strided_merged  one head attends to local and strided positions together
#   strided_split   half of the heads local, half strided
#   fixed           the fixed pattern, block and summary merged in every head
#   fixed_split     half of the heads on the block, half on the summary positions
#   fixed_block, fixed_summary: the two fixed parts alone (for interleaving)
#   mha             keras.layers.MultiHeadAttention, causal: the dense baseline
ATTENTION_KINDS = ("dense", "local", "strided", "strided_merged", "strided_split", "fixed",
                   "fixed_split", "fixed_block", "fixed_summary", "mha")
STRIDED_KINDS = ("strided", "strided_merged", "strided_split")
FIXED_KINDS = ("fixed", "fixed_split", "fixed_block", "fixed_summary")
TASKS = ("bytes", "enwik8", "cifar10", "imagenet64", "audio")
AUDIO_SOURCES = ("wav", "nsynth", "groove")
AUDIO_ENCODINGS = ("mulaw", "bytes")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The network.

    attention: a comma-separated cycle of ATTENTION_KINDS, one per layer: "local,strided"
      interleaves local and strided layers (the CIFAR-10 model), "fixed" gives every layer
      the merged fixed pattern (the enwik8 model).
    position_shape: the factorisation of positions: (rows, columns, channels) for images,
      (seq_len // stride, stride) for audio and bytes; its product is seq_len.
    """

    seq_len: int = 256
    vocab_size: int = 256
    num_layers: int = 4
    d_model: int = 128
    num_heads: int = 4
    ffn_multiplier: int = 4
    attention: str = "fixed"
    block_size: int = 32
    stride: int = 128
    window: int | None = None  # window of the "local" kind; None: `stride`
    summary: int = 32
    num_summary_groups: int = 1
    position_shape: tuple[int, ...] = (2, 128)
    dropout: float = 0.0
    recompute: bool = True
    # In training, each block's LayerNorms, attention projections, feed-forward, dropouts and
    # residual additions run as XLA programs (one compilation shared by every layer; the
    # attention op stays outside):
    # True, False, or "auto" for on when TensorFlow sees a GPU. On the CPU, TensorFlow's own
    # kernels are faster.
    xla_blocks: Any = "auto"
    implementation: str | None = None  # None: "op" when the library loads, else "portable"
    init_scale: float = 0.02  # std of the normal initialisers before depth scaling

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def local_window(self) -> int:
        return self.window if self.window is not None else self.stride

    def layer_kinds(self) -> list[str]:
        cycle = [kind.strip() for kind in self.attention.split(",") if kind.strip()]
        return [cycle[i % len(cycle)] for i in range(self.num_layers)]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation: AdamW with decoupled weight decay, linear warm-up then cosine decay."""

    batch_size: int = 16
    steps: int = 1000  # total optimizer steps, the length of the schedule
    steps_per_epoch: int = 100  # an epoch is a reporting and checkpoint unit
    learning_rate: float = 3.5e-4
    warmup_steps: int = 100
    min_learning_rate_ratio: float = 0.1
    weight_decay: float = 0.01
    beta_1: float = 0.9
    beta_2: float = 0.95
    clip_norm: float = 1.0
    mixed_precision: str | None = None  # None, "bfloat16" or "float16"
    jit_compile: Any = "auto"
    validation_steps: int = 10
    backup_every: int = 50  # steps between backups for resuming a killed run
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the data comes from. task: one of TASKS.

    bytes: a local file (`path`), or the Python standard library's sources when path is None.
    enwik8: the enwik8 file at `path` (first 90M bytes train, 5M validation, 5M test).
    cifar10, imagenet64: TFDS, prepared under `data_dir`.
    audio: `source` "wav" (a file, directory or glob at `path`), "nsynth" or "groove" (TFDS under
      `data_dir`), as 8-bit mu-law or raw 8-bit samples (`encoding`).
    """

    task: str = "bytes"
    path: str | None = None
    data_dir: str | None = None
    source: str = "wav"
    encoding: str = "mulaw"
    sample_rate: int = 16000  # of written audio samples (nsynth and groove: 16 kHz)
    max_bytes: int | None = None  # cap on a byte corpus read into memory (None: all)


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    model: ModelConfig
    train: TrainConfig
    data: DataConfig

    @property
    def metric_name(self) -> str:
        return "bits_per_byte" if self.data.task in ("bytes", "enwik8") else "bits_per_dim"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict) -> Config:
        model = dict(values["model"])
        model["position_shape"] = tuple(model["position_shape"])
        return cls(name=values["name"], model=ModelConfig(**model),
                   train=TrainConfig(**values["train"]), data=DataConfig(**values["data"]))

    @classmethod
    def from_json(cls, text: str) -> Config:
        return cls.from_dict(json.loads(text))

    def replace(self, **sections) -> Config:
        return dataclasses.replace(self, **sections)


class ConfigError(ValueError):
    """A configuration the model or its data cannot run with."""


# ------------------------------------------------------------------------------ registry

def _tiny() -> Config:
    # Small enough for unit tests, long enough for every kind: strided needs stride * block.
    model = ModelConfig(seq_len=128, num_layers=2, d_model=32, num_heads=2, attention="fixed",
                        block_size=8, stride=16, summary=8, position_shape=(8, 16))
    train = TrainConfig(batch_size=4, steps=20, steps_per_epoch=10, learning_rate=3e-3,
                        warmup_steps=2, validation_steps=2, backup_every=5, jit_compile=False)
    return Config("tiny", model, train, DataConfig(task="bytes", max_bytes=2_000_000))


def _default() -> Config:
    # The no-argument run: trains on the Python sources in a few minutes on two CPU cores.
    model = ModelConfig(seq_len=256, num_layers=4, d_model=128, num_heads=4, attention="fixed",
                        block_size=16, stride=64, summary=16, position_shape=(4, 64),
                        dropout=0.0)
    train = TrainConfig(batch_size=16, steps=400, steps_per_epoch=100, learning_rate=3e-3,
                        warmup_steps=30, weight_decay=0.01, validation_steps=8,
                        backup_every=50, jit_compile=False)
    return Config("default", model, train, DataConfig(task="bytes", max_bytes=8_000_000))


def _cifar10() -> Config:
    # Table 2: 128 layers, d=256, 2 heads, strided; a row of 32 RGB pixels is 96 positions.
    model = ModelConfig(seq_len=3072, num_layers=128, d_model=256, num_heads=2,
                        attention="local,strided", block_size=32, stride=96,
                        position_shape=(32, 32, 3), dropout=0.25)
    train = TrainConfig(batch_size=16, steps=375_000, steps_per_epoch=3125,
                        learning_rate=3.5e-4, warmup_steps=5000, mixed_precision="bfloat16",
                        validation_steps=100, backup_every=500)
    return Config("cifar10", model, train, DataConfig(task="cifar10"))


def _imagenet64() -> Config:
    # Table 2: 48 layers, d=512, 16 heads, strided; a row of 64 RGB pixels is 192 positions.
    model = ModelConfig(seq_len=12288, num_layers=48, d_model=512, num_heads=16,
                        attention="local,strided", block_size=32, stride=192,
                        position_shape=(64, 64, 3), dropout=0.0)
    train = TrainConfig(batch_size=8, steps=1_000_000, steps_per_epoch=5000,
                        learning_rate=3.5e-4, warmup_steps=5000, mixed_precision="bfloat16",
                        validation_steps=100, backup_every=500)
    return Config("imagenet64", model, train, DataConfig(task="imagenet64"))


def _enwik8() -> Config:
    # Table 2: 30 layers, d=512, 8 heads, fixed with l=128, c=32, T=12,288 (bytes).
    model = ModelConfig(seq_len=12288, num_layers=30, d_model=512, num_heads=8,
                        attention="fixed", block_size=32, stride=128, summary=32,
                        num_summary_groups=1, position_shape=(96, 128), dropout=0.4)
    train = TrainConfig(batch_size=8, steps=1_000_000, steps_per_epoch=5000,
                        learning_rate=3.5e-4, warmup_steps=5000, mixed_precision="bfloat16",
                        validation_steps=100, backup_every=500)
    return Config("enwik8", model, train, DataConfig(task="enwik8"))


def _audio() -> Config:
    # Raw audio of 65,536 8-bit mu-law samples (4 s at 16 kHz), strided l=256.
    model = ModelConfig(seq_len=65536, num_layers=24, d_model=256, num_heads=4,
                        attention="local,strided", block_size=32, stride=256,
                        position_shape=(256, 256), dropout=0.0)
    train = TrainConfig(batch_size=4, steps=200_000, steps_per_epoch=2000,
                        learning_rate=3.5e-4, warmup_steps=2000, mixed_precision="bfloat16",
                        validation_steps=50, backup_every=500)
    return Config("audio", model, train, DataConfig(task="audio", source="nsynth"))


def _audio_1m() -> Config:
    # Table 4: sequences of 1,048,576 samples with a model of about 3M parameters.
    model = ModelConfig(seq_len=1_048_576, num_layers=14, d_model=128, num_heads=2,
                        attention="local,strided", block_size=32, stride=1024,
                        position_shape=(1024, 1024), dropout=0.0)
    train = TrainConfig(batch_size=1, steps=200_000, steps_per_epoch=1000,
                        learning_rate=3.5e-4, warmup_steps=2000, mixed_precision="bfloat16",
                        validation_steps=10, backup_every=200)
    return Config("audio_1m", model, train, DataConfig(task="audio", source="wav"))


CONFIGS = {
    "tiny": _tiny,
    "default": _default,
    "cifar10": _cifar10,
    "imagenet64": _imagenet64,
    "enwik8": _enwik8,
    "audio": _audio,
    "audio_1m": _audio_1m,
}


def _parse_value(text: str, current: Any) -> Any:
    if text.lower() in ("none", "null"):
        return None
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"expected a boolean, got {text!r}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(current, tuple) and isinstance(value, (list, tuple, int)):
        return tuple(value) if not isinstance(value, int) else (value,)
    if isinstance(current, float) and isinstance(value, int):
        return float(value)
    return value


def apply_overrides(config: Config, overrides) -> Config:
    """Applies "section.field=value" strings (or a {"section.field": value} dict)."""
    items = overrides.items() if isinstance(overrides, dict) else (
        _split_override(o) for o in (overrides or ()))
    sections = {"model": config.model, "train": config.train, "data": config.data}
    for key, value in items:
        section, _, field = key.partition(".")
        if section not in sections or not field:
            raise ConfigError(f"override {key!r} must be model.X, train.X or data.X")
        current = sections[section]
        names = {f.name for f in dataclasses.fields(current)}
        if field not in names:
            raise ConfigError(f"{section} has no field {field!r}; fields: {sorted(names)}")
        if isinstance(value, str):
            value = _parse_value(value, getattr(current, field))
        sections[section] = dataclasses.replace(current, **{field: value})
    return config.replace(**sections)


def _split_override(text: str):
    key, sep, value = text.partition("=")
    if not sep:
        raise ConfigError(f"override {text!r} is not of the form section.field=value")
    return key.strip(), value.strip()


def get_config(name: str = "default", overrides=None) -> Config:
    """A registered configuration by name, with overrides applied (see `apply_overrides`)."""
    if name not in CONFIGS:
        raise ConfigError(f"unknown config {name!r}; registered: {sorted(CONFIGS)}")
    return apply_overrides(CONFIGS[name](), overrides)


# ---------------------------------------------------------------------------- validation

def validate(config: Config) -> Config:
    """Raises ConfigError with a clear message for a configuration that cannot run: a sequence
    length a pattern cannot take, heads that do not divide the width, a position factorisation
    that does not cover the sequence, an unknown task. Returns the config."""
    m, t, d = config.model, config.train, config.data
    where = f"config {config.name!r}"
    for name in ("seq_len", "vocab_size", "num_layers", "d_model", "num_heads", "block_size",
                 "ffn_multiplier"):
        value = getattr(m, name)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}: model.{name} must be a positive integer, got {value!r}")
    if m.vocab_size > 256:
        raise ConfigError(f"{where}: model.vocab_size={m.vocab_size}; tokens are bytes (<= 256)")
    if m.d_model % m.num_heads:
        raise ConfigError(f"{where}: d_model={m.d_model} is not divisible by "
                          f"num_heads={m.num_heads}")
    if math.prod(m.position_shape) != m.seq_len:
        raise ConfigError(f"{where}: position_shape={m.position_shape} covers "
                          f"{math.prod(m.position_shape)} positions, not seq_len={m.seq_len}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"{where}: dropout must be in [0, 1), got {m.dropout}")
    if m.implementation not in (None, "op", "portable", "reference"):
        raise ConfigError(f"{where}: implementation must be None, 'op', 'portable' or "
                          f"'reference', got {m.implementation!r}")
    if m.xla_blocks not in ("auto", True, False):
        raise ConfigError(f"{where}: model.xla_blocks must be True, False or 'auto', got "
                          f"{m.xla_blocks!r}")
    kinds = m.layer_kinds()
    if not kinds:
        raise ConfigError(f"{where}: model.attention={m.attention!r} names no layer kind")
    for kind in set(kinds):
        if kind not in ATTENTION_KINDS:
            raise ConfigError(f"{where}: unknown attention kind {kind!r} in "
                              f"model.attention={m.attention!r}; kinds: {ATTENTION_KINDS}")
        if kind.endswith("_split") and m.num_heads % 2:
            raise ConfigError(f"{where}: {kind} divides the heads between two patterns and "
                              f"needs an even num_heads, got {m.num_heads}")
        try:
            _check_kind(kind, m)
        except ValueError as error:
            raise ConfigError(f"{where}: attention {kind!r} cannot take seq_len={m.seq_len}: "
                              f"{error}") from error
    if m.implementation == "op":
        from tf_sparse_attn._load import load_op_library  # pylint: disable=import-outside-toplevel
        try:
            load_op_library()
        except ImportError as error:
            raise ConfigError(f"{where}: implementation='op' but {error}") from error

    for name in ("batch_size", "steps", "steps_per_epoch"):
        value = getattr(t, name)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}: train.{name} must be a positive integer, got {value!r}")
    if t.mixed_precision not in (None, "bfloat16", "float16"):
        raise ConfigError(f"{where}: train.mixed_precision must be None, 'bfloat16' or "
                          f"'float16', got {t.mixed_precision!r}")
    if d.task not in TASKS:
        raise ConfigError(f"{where}: unknown task {d.task!r}; tasks: {TASKS}")
    if d.task == "audio":
        if d.source not in AUDIO_SOURCES:
            raise ConfigError(f"{where}: data.source must be one of {AUDIO_SOURCES}")
        if d.encoding not in AUDIO_ENCODINGS:
            raise ConfigError(f"{where}: data.encoding must be one of {AUDIO_ENCODINGS}")
    image_shape = {"cifar10": (32, 32, 3), "imagenet64": (64, 64, 3)}.get(d.task)
    if image_shape and m.seq_len != math.prod(image_shape):
        raise ConfigError(f"{where}: {d.task} images are {image_shape}, "
                          f"{math.prod(image_shape)} positions, but seq_len={m.seq_len}")
    return config


def _check_kind(kind: str, m: ModelConfig):
    """Builds the layouts of one kind at the configured length, so their own checks speak."""
    from tf_sparse_attn.layouts import BlockLayout  # pylint: disable=import-outside-toplevel

    if m.seq_len % m.block_size:
        raise ValueError(f"it is not a multiple of block_size={m.block_size}")
    if kind == "dense":
        BlockLayout.dense(m.seq_len, m.block_size)
    if kind == "local":
        BlockLayout.local(m.seq_len, m.block_size, m.local_window)
    if kind in STRIDED_KINDS:
        BlockLayout.strided(m.seq_len, m.block_size, m.stride)
    if kind in FIXED_KINDS:
        if m.seq_len % m.stride:
            raise ValueError(f"it is not a multiple of stride={m.stride}")
        BlockLayout.fixed(m.seq_len, m.block_size, m.stride, m.summary,
                          num_heads=m.num_heads, num_summary_groups=m.num_summary_groups)
