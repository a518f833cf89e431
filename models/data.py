"""tf.data pipelines: every task becomes batches of byte-valued token sequences (x, x).

The model shifts its input right itself (see model.py), so each example is one sequence of
`seq_len` tokens in [0, 256) that is both input and target.

- bytes: a local file, or by default the Python standard library's sources (every machine with
  Python has them: the built-in corpus that needs no download).
- enwik8: a local file, split the standard way: the first 90M bytes train, the next 5M
  validation, the last 5M test.
- cifar10, imagenet64: TFDS `cifar10` and `downsampled_imagenet/64x64`, prepared under
  `data_dir`; an image is its pixels in row, column, channel order.
- audio: local WAV files, or TFDS `nsynth` / `groove`, as 8-bit mu-law or raw 8-bit samples.

Byte streams are cut into windows at offsets that are a pure function of (seed, example index),
so the batches of step s are the same whether or not a run was interrupted before s.

>>> import numpy as np
>>> from tf_sparse_attn.models.data import stream_dataset
>>> data = np.frombuffer(b"hello sparse world " * 100, np.uint8)
>>> x, y = next(iter(stream_dataset(data, seq_len=16, batch_size=2, train=True)))
>>> x.shape, bool((x == y).numpy().all())
(TensorShape([2, 16]), True)
"""

from __future__ import annotations

import glob
import os
import sysconfig
import wave

import numpy as np
import tensorflow as tf

from tf_sparse_attn.models.config import Config, ConfigError

ENWIK8_SPLIT = (90_000_000, 5_000_000, 5_000_000)
MU = 255.0
TFDS_IMAGES = {"cifar10": ("cifar10", "train", "test"),
               "imagenet64": ("downsampled_imagenet/64x64", "train", "validation")}
TFDS_AUDIO = {"nsynth": ("nsynth", "train", "valid"),
              "groove": ("groove/full-16000hz", "train", "validation")}


class DataError(ValueError):
    """Data that is missing or unusable, reported before training starts."""


# ------------------------------------------------------------------------------ byte corpora

def python_sources_corpus(max_bytes: int | None = None) -> np.ndarray:
    """The bytes of the Python standard library's .py files, in a fixed (sorted) order."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True))
    # Tests and vendored packages are skipped for a corpus of ordinary library code.
    files = [f for f in files if os.sep + "test" not in f and "site-packages" not in f]
    if not files:
        raise DataError(f"no Python sources found under {root}; pass a data path")
    chunks, total = [], 0
    for path in files:
        try:
            with open(path, "rb") as f:
                chunk = f.read()
        except OSError:
            continue
        chunks.append(chunk)
        total += len(chunk)
        if max_bytes and total >= max_bytes:
            break
    data = np.frombuffer(b"".join(chunks), np.uint8)
    return data[:max_bytes] if max_bytes else data


def read_bytes(path: str, max_bytes: int | None = None) -> np.ndarray:
    if not path or not os.path.isfile(path):
        raise DataError(f"data file not found: {path!r}")
    with open(path, "rb") as f:
        data = f.read(max_bytes if max_bytes else -1)
    if not data:
        raise DataError(f"data file is empty: {path!r}")
    return np.frombuffer(data, np.uint8)


def split_bytes(data: np.ndarray, sizes=None):
    """(train, validation, test). With `sizes`, consecutive slices of those lengths (enwik8's
    90M/5M/5M); otherwise 90% / 5% / 5%."""
    if sizes is None:
        n = data.size
        sizes = (n - 2 * (n // 20), n // 20, n // 20)
    bounds = np.cumsum((0,) + tuple(sizes))
    return tuple(data[bounds[i]:bounds[i + 1]] for i in range(3))


def enwik8_splits(path: str):
    """The standard enwik8 split; a shorter file (a test fixture) splits 90/5/5 instead."""
    data = read_bytes(path)
    if data.size >= sum(ENWIK8_SPLIT):
        return split_bytes(data[:sum(ENWIK8_SPLIT)], ENWIK8_SPLIT)
    return split_bytes(data)


def _check_length(name: str, data: np.ndarray, seq_len: int):
    if data.size < seq_len + 1:
        raise DataError(f"the {name} split has {data.size} bytes, fewer than one sequence of "
                        f"{seq_len} + 1; use more data or a shorter model.seq_len")


def _window_offsets(indices, limit, seed):
    """Pseudo-random offsets in [0, limit) as a pure function of (seed, index)."""
    seeds = tf.stack([tf.fill(tf.shape(indices), tf.cast(seed, tf.int64)), indices], axis=-1)
    draw = tf.map_fn(
        lambda s: tf.random.stateless_uniform([], s, maxval=limit, dtype=tf.int64), seeds)
    return draw


def stream_dataset(data: np.ndarray, seq_len: int, batch_size: int, *, train: bool,
                   seed: int = 0, start_step: int = 0, max_batches: int | None = None):
    """Batches of (x, x) windows of a byte stream.

    train=True: an endless stream of windows at random offsets, batch s a function of
    (seed, s) only, starting at batch `start_step`. train=False: consecutive non-overlapping
    windows from the start, at most `max_batches` batches (the validation split).
    """
    data = np.asarray(data, np.uint8)
    _check_length("training" if train else "evaluation", data, seq_len)
    source = tf.constant(data)
    if train:
        limit = data.size - seq_len + 1
        indices = tf.data.Dataset.range(start_step * batch_size, np.iinfo(np.int64).max)
        batches = indices.batch(batch_size, drop_remainder=True)

        def windows(index):
            offsets = _window_offsets(index, limit, seed)
            positions = offsets[:, None] + tf.range(seq_len, dtype=tf.int64)[None, :]
            return tf.cast(tf.gather(source, positions), tf.int32)

        ds = batches.map(windows, num_parallel_calls=tf.data.AUTOTUNE)
    else:
        count = data.size // seq_len
        if max_batches:
            count = min(count, max_batches * batch_size)
        chunks = np.ascontiguousarray(data[:count * seq_len].reshape(count, seq_len))
        ds = tf.data.Dataset.from_tensor_slices(chunks.astype(np.int32)).batch(
            batch_size, drop_remainder=False)
    return ds.map(lambda x: (x, x)).prefetch(tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------------- images

IMAGE_SHAPES = {"cifar10": (32, 32, 3), "imagenet64": (64, 64, 3)}


def image_tokens(image, shape):
    """A [H, W, C] uint8 image as H*W*C int32 tokens in row, column, channel order. An image
    of another size is centre-cropped or padded to `shape` (the prepared datasets never are)."""
    image = tf.image.resize_with_crop_or_pad(image, shape[0], shape[1])
    return tf.reshape(tf.cast(image, tf.int32), [-1])


def image_dataset(task: str, seq_len: int, batch_size: int, *, train: bool,
                  data_dir: str | None = None, seed: int = 0, max_batches: int | None = None,
                  download: bool = False):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    name, train_split, eval_split = TFDS_IMAGES[task]
    try:
        ds = tfds.load(name, split=train_split if train else eval_split, data_dir=data_dir,
                       download=download, shuffle_files=train)
    except (tfds.core.registered.DatasetNotFoundError, AssertionError, FileNotFoundError,
            OSError) as error:
        raise DataError(f"TFDS {name!r} is not prepared under data_dir={data_dir!r}; prepare "
                        f"it with `tfds build {name} --data_dir DIR` or train with --download "
                        f"({error})") from error
    shape = IMAGE_SHAPES[task]
    ds = ds.map(lambda ex: image_tokens(ex["image"], shape), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(lambda x: tf.ensure_shape(x, [seq_len]))
    if train:
        ds = ds.shuffle(4096, seed=seed).repeat()
    elif max_batches:
        ds = ds.take(max_batches * batch_size)
    ds = ds.batch(batch_size, drop_remainder=train)
    return ds.map(lambda x: (x, x)).prefetch(tf.data.AUTOTUNE)


# ------------------------------------------------------------------------------------ audio

def mu_law_encode(audio):
    """Float samples in [-1, 1] -> int32 tokens in [0, 256), 8-bit mu-law (mu = 255)."""
    audio = tf.clip_by_value(tf.cast(audio, tf.float32), -1.0, 1.0)
    compressed = tf.sign(audio) * tf.math.log1p(MU * tf.abs(audio)) / np.log1p(MU)
    return tf.cast(tf.floor((compressed + 1.0) / 2.0 * MU + 0.5), tf.int32)


def mu_law_decode(tokens):
    """Inverse of `mu_law_encode`: int tokens -> float32 samples in [-1, 1]."""
    compressed = tf.cast(tokens, tf.float32) / MU * 2.0 - 1.0
    return tf.sign(compressed) * (tf.pow(1.0 + MU, tf.abs(compressed)) - 1.0) / MU


def linear_encode(audio):
    """Float samples in [-1, 1] -> raw unsigned 8-bit samples (the bytes of 8-bit PCM)."""
    audio = tf.clip_by_value(tf.cast(audio, tf.float32), -1.0, 1.0)
    return tf.cast(tf.floor((audio + 1.0) * 127.5 + 0.5), tf.int32)


def linear_decode(tokens):
    return tf.cast(tokens, tf.float32) / 127.5 - 1.0


def encode_audio(audio, encoding: str):
    return mu_law_encode(audio) if encoding == "mulaw" else linear_encode(audio)


def decode_audio(tokens, encoding: str):
    return mu_law_decode(tokens) if encoding == "mulaw" else linear_decode(tokens)


def read_wav(path: str) -> tuple[np.ndarray, int]:
    """Mono float32 samples in [-1, 1] and the sample rate of a PCM WAV file (8, 16, 24 or
    32-bit; channels are averaged)."""
    try:
        with wave.open(path, "rb") as f:
            width, channels, rate = f.getsampwidth(), f.getnchannels(), f.getframerate()
            raw = f.readframes(f.getnframes())
    except (wave.Error, EOFError) as error:
        raise DataError(f"{path} is not a PCM WAV file: {error}") from error
    if width == 1:
        samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        samples = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        value = (b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16))
        value = np.where(value >= 1 << 23, value - (1 << 24), value)
        samples = value.astype(np.float32) / float(1 << 23)
    elif width == 4:
        samples = np.frombuffer(raw, "<i4").astype(np.float32) / float(1 << 31)
    else:
        raise DataError(f"{path}: unsupported sample width of {width} bytes")
    return samples.reshape(-1, channels).mean(axis=1), rate


def write_wav(path: str, samples, sample_rate: int):
    """Writes float samples in [-1, 1] as a 16-bit mono WAV file."""
    samples = np.clip(np.asarray(samples, np.float32).ravel(), -1.0, 1.0)
    with wave.open(path, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(int(sample_rate))
        f.writeframes((samples * 32767.0).round().astype("<i2").tobytes())


def wav_files(path: str) -> list[str]:
    if path and os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "**", "*.wav"), recursive=True))
    elif path and os.path.isfile(path):
        files = [path]
    else:
        files = sorted(glob.glob(path)) if path else []
    if not files:
        raise DataError(f"no WAV files at {path!r} (a .wav file, a directory or a glob)")
    return files


def _crop_or_pad(tokens, seq_len, pad_token, seed=None):
    """A window of seq_len tokens: a random crop (seed given) or the start, padded at the end
    with the silence token when the clip is shorter."""
    length = tf.shape(tokens)[0]
    short = tf.maximum(seq_len - length, 0)
    tokens = tf.pad(tokens, [[0, short]], constant_values=pad_token)
    slack = tf.shape(tokens)[0] - seq_len + 1
    start = 0 if seed is None else tf.random.stateless_uniform(
        [], seed, maxval=slack, dtype=tf.int32)
    return tf.ensure_shape(tokens[start:start + seq_len], [seq_len])


def silence_token(encoding: str) -> int:
    return int(encode_audio(tf.zeros([1]), encoding)[0])


def audio_dataset(config: Config, *, train: bool, seed: int = 0,
                  max_batches: int | None = None, download: bool = False):
    m, t, d = config.model, config.train, config.data
    seq_len, batch_size = m.seq_len, t.batch_size
    pad = silence_token(d.encoding)
    if d.source == "wav":
        files = wav_files(d.path)
        clips = [encode_audio(read_wav(f)[0], d.encoding).numpy() for f in files]
        # Hold out every 20th file for evaluation when there are enough of them.
        held = [c for i, c in enumerate(clips) if i % 20 == 19]
        kept = [c for i, c in enumerate(clips) if i % 20 != 19] or clips
        clips = kept if train else (held or clips)
        lengths = np.array([c.size for c in clips], np.int64)
        flat = tf.constant(np.concatenate(clips).astype(np.int32))
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        ds = tf.data.Dataset.from_tensor_slices((starts, lengths))
        ds = ds.map(lambda s, n: flat[s:s + n])
    else:
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

        name, train_split, eval_split = TFDS_AUDIO[d.source]
        try:
            ds = tfds.load(name, split=train_split if train else eval_split,
                           data_dir=d.data_dir, download=download, shuffle_files=train)
        except (tfds.core.registered.DatasetNotFoundError, AssertionError, FileNotFoundError,
                OSError) as error:
            raise DataError(f"TFDS {name!r} is not prepared under data_dir={d.data_dir!r}; "
                            f"prepare it with `tfds build {name} --data_dir DIR` or "
                            f"train with --download ({error})") from error
        ds = ds.map(lambda ex: encode_audio(tf.reshape(ex["audio"], [-1]), d.encoding),
                    num_parallel_calls=tf.data.AUTOTUNE)
    if train:
        ds = ds.repeat().enumerate().map(
            lambda i, x: _crop_or_pad(x, seq_len, pad, tf.stack([tf.cast(seed, tf.int64), i])),
            num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.shuffle(256, seed=seed)
    else:
        ds = ds.map(lambda x: _crop_or_pad(x, seq_len, pad))
        if max_batches:
            ds = ds.take(max_batches * batch_size)
    ds = ds.batch(batch_size, drop_remainder=train)
    return ds.map(lambda x: (x, x)).prefetch(tf.data.AUTOTUNE)


# -------------------------------------------------------------------------------- dispatch

def load_byte_splits(config: Config):
    d = config.data
    if d.task == "enwik8":
        if not d.path:
            raise DataError("the enwik8 task needs data.path, the enwik8 file "
                            "(http://mattmahoney.net/dc/enwik8.zip, unzipped)")
        return enwik8_splits(d.path)
    data = read_bytes(d.path, d.max_bytes) if d.path else python_sources_corpus(d.max_bytes)
    return split_bytes(data)


def make_datasets(config: Config, start_step: int = 0, download: bool = False):
    """(train, validation) datasets for the configured task; raises DataError (a ValueError)
    with a clear message when the data is missing or too short, before any training."""
    m, t, d = config.model, config.train, config.data
    if d.task in ("bytes", "enwik8"):
        train, valid, _ = load_byte_splits(config)
        _check_length("training", train, m.seq_len)
        if valid.size < m.seq_len:
            valid = train[-(m.seq_len * t.batch_size):]
        return (stream_dataset(train, m.seq_len, t.batch_size, train=True, seed=t.seed,
                               start_step=start_step),
                stream_dataset(valid, m.seq_len, t.batch_size, train=False,
                               max_batches=t.validation_steps))
    if d.task in TFDS_IMAGES:
        return (image_dataset(d.task, m.seq_len, t.batch_size, train=True,
                              data_dir=d.data_dir, seed=t.seed, download=download),
                image_dataset(d.task, m.seq_len, t.batch_size, train=False,
                              data_dir=d.data_dir, max_batches=t.validation_steps,
                              download=download))
    if d.task == "audio":
        return (audio_dataset(config, train=True, seed=t.seed, download=download),
                audio_dataset(config, train=False, max_batches=t.validation_steps,
                              download=download))
    raise ConfigError(f"unknown task {d.task!r}")
