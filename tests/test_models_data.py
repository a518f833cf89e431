"""The models' data pipelines, on data the tests make or TFDS's mock data: nothing downloads."""

import numpy as np
import pytest
import tensorflow as tf

from tests import _models_path  # noqa: F401
from tf_sparse_attn.models import data, get_config
from tf_sparse_attn.models.config import apply_overrides


def _batches(ds, n):
    return [x.numpy() for x, _ in ds.take(n)]


def test_stream_windows_are_a_function_of_the_step():
    corpus = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)
    first = _batches(data.stream_dataset(corpus, 32, 4, train=True, seed=3), 5)
    resumed = _batches(data.stream_dataset(corpus, 32, 4, train=True, seed=3, start_step=3), 2)
    np.testing.assert_array_equal(first[3], resumed[0])
    np.testing.assert_array_equal(first[4], resumed[1])
    other_seed = _batches(data.stream_dataset(corpus, 32, 4, train=True, seed=4), 1)
    assert not np.array_equal(first[0], other_seed[0])
    # Every window is a contiguous slice of the corpus, inputs equal targets.
    x, y = next(iter(data.stream_dataset(corpus, 32, 4, train=True)))
    np.testing.assert_array_equal(x, y)
    text = corpus.tobytes()
    for row in x.numpy():
        assert bytes(row.astype(np.uint8)) in text


def test_evaluation_stream_is_consecutive_and_bounded():
    corpus = np.arange(1000, dtype=np.uint8)
    batches = _batches(data.stream_dataset(corpus, 10, 3, train=False, max_batches=2), 10)
    assert len(batches) == 2
    np.testing.assert_array_equal(batches[0].ravel(), np.arange(30) % 256)


def test_builtin_corpus_is_python_sources():
    corpus = data.python_sources_corpus(max_bytes=200_000)
    assert corpus.dtype == np.uint8 and corpus.size == 200_000
    assert b"def " in corpus.tobytes() and b"import " in corpus.tobytes()
    train, valid, test = data.split_bytes(corpus)
    assert (train.size, valid.size, test.size) == (180_000, 10_000, 10_000)


def test_enwik8_split_and_errors(tmp_path):
    path = tmp_path / "enwik8"
    payload = np.random.default_rng(1).integers(0, 256, 20_000, dtype=np.uint8)
    path.write_bytes(payload.tobytes())
    train, valid, test = data.enwik8_splits(str(path))
    assert (train.size, valid.size, test.size) == (18_000, 1_000, 1_000)
    np.testing.assert_array_equal(np.concatenate([train, valid, test]), payload)
    # The standard split is 90M / 5M / 5M of the first 100M bytes.
    big = np.zeros(1000, np.uint8)
    assert [s.size for s in data.split_bytes(big, (900, 50, 50))] == [900, 50, 50]

    config = get_config("tiny", {"data.task": "enwik8", "data.path": str(path)})
    train_ds, valid_ds = data.make_datasets(config)
    x, _ = next(iter(train_ds))
    assert x.shape == (config.train.batch_size, config.model.seq_len)
    assert next(iter(valid_ds))[0].shape[1] == config.model.seq_len

    with pytest.raises(data.DataError, match="not found"):
        data.make_datasets(apply_overrides(config, {"data.path": str(tmp_path / "missing")}))
    with pytest.raises(data.DataError, match="needs data.path"):
        data.make_datasets(apply_overrides(config, {"data.path": None}))
    short = tmp_path / "short"
    short.write_bytes(b"x" * 50)
    with pytest.raises(data.DataError, match="fewer than one sequence"):
        data.make_datasets(apply_overrides(config, {"data.path": str(short)}))


@pytest.mark.parametrize("task,shape", [("cifar10", (32, 32, 3)), ("imagenet64", (64, 64, 3))])
def test_image_pipelines(task, shape):
    import tensorflow_datasets as tfds

    config = get_config("tiny", {"data.task": task, "model.seq_len": int(np.prod(shape)),
                                 "model.position_shape": shape})
    with tfds.testing.mock_data(num_examples=6):
        train_ds, valid_ds = data.make_datasets(config)
        x, y = next(iter(train_ds))
        ex = next(iter(tfds.load(data.TFDS_IMAGES[task][0], split="train")))
    assert x.shape == (config.train.batch_size, np.prod(shape)) and x.dtype == tf.int32
    np.testing.assert_array_equal(x, y)
    assert 0 <= int(tf.reduce_min(x)) and int(tf.reduce_max(x)) < 256
    assert next(iter(valid_ds))[0].shape[1] == np.prod(shape)
    # Row, column, channel order.
    image = np.arange(np.prod(shape)).reshape(shape) % 256
    tokens = data.image_tokens(tf.constant(image, tf.uint8), shape).numpy()
    assert tokens[shape[2]] == image[0, 1, 0] and tokens[shape[1] * shape[2]] == image[1, 0, 0]
    del ex


def test_mu_law_round_trip_and_linear_bytes():
    audio = np.linspace(-1, 1, 2001).astype(np.float32)
    tokens = data.mu_law_encode(audio).numpy()
    assert tokens.min() == 0 and tokens.max() == 255
    assert np.all(np.diff(tokens) >= 0)
    decoded = data.mu_law_decode(tokens).numpy()
    # mu-law spends its levels near zero: small errors there, larger at full scale.
    assert np.abs(decoded - audio)[np.abs(audio) < 0.05].max() < 0.002
    assert np.abs(decoded - audio).max() < 0.04
    assert data.silence_token("mulaw") == 128
    raw = data.linear_encode(audio).numpy()
    assert raw.min() == 0 and raw.max() == 255
    assert np.abs(data.linear_decode(raw).numpy() - audio).max() <= 1 / 127.5


@pytest.mark.parametrize("encoding", ["mulaw", "bytes"])
def test_wav_pipeline(tmp_path, encoding):
    rate = 8000
    t = np.arange(3000) / rate
    for i in range(3):
        data.write_wav(str(tmp_path / f"clip{i}.wav"), 0.5 * np.sin(2 * np.pi * 220 * (i + 1) * t),
                       rate)
    samples, read_rate = data.read_wav(str(tmp_path / "clip0.wav"))
    assert read_rate == rate and samples.shape == (3000,)
    np.testing.assert_allclose(samples, 0.5 * np.sin(2 * np.pi * 220 * t), atol=1e-4)

    config = get_config("tiny", {"data.task": "audio", "data.source": "wav",
                                 "data.path": str(tmp_path), "data.encoding": encoding})
    train_ds, valid_ds = data.make_datasets(config)
    x, _ = next(iter(train_ds))
    assert x.shape == (config.train.batch_size, config.model.seq_len)
    expected = data.encode_audio(samples, encoding).numpy()
    # Each window is a crop of one clip.
    row = x.numpy()[0]
    assert any(np.array_equal(row, c[s:s + row.size])
               for c in [data.encode_audio(data.read_wav(str(p))[0], encoding).numpy()
                         for p in sorted(tmp_path.glob("*.wav"))]
               for s in range(c.size - row.size + 1))
    assert expected.size == 3000
    assert next(iter(valid_ds))[0].shape[1] == config.model.seq_len

    with pytest.raises(data.DataError, match="no WAV files"):
        data.make_datasets(apply_overrides(config, {"data.path": str(tmp_path / "none")}))


def test_short_clips_are_padded_with_silence(tmp_path):
    data.write_wav(str(tmp_path / "short.wav"), np.full(40, 0.25), 8000)
    config = get_config("tiny", {"data.task": "audio", "data.path": str(tmp_path)})
    x, _ = next(iter(data.make_datasets(config)[1]))
    assert (x.numpy()[0, 40:] == data.silence_token("mulaw")).all()


@pytest.mark.parametrize("source", ["nsynth", "groove"])
def test_tfds_audio_pipelines(source):
    import tensorflow_datasets as tfds

    config = get_config("tiny", {"data.task": "audio", "data.source": source})
    with tfds.testing.mock_data(num_examples=4):
        train_ds, valid_ds = data.make_datasets(config)
        x, _ = next(iter(train_ds))
        v, _ = next(iter(valid_ds))
    assert x.shape == (config.train.batch_size, config.model.seq_len)
    assert v.shape[1] == config.model.seq_len
    assert 0 <= int(tf.reduce_min(x)) and int(tf.reduce_max(x)) < 256


@pytest.mark.parametrize("name", ["cifar10", "audio"])
def test_unprepared_tfds_fails_with_instructions(tmp_path, name):
    config = get_config(name, {"data.data_dir": str(tmp_path)})
    with pytest.raises(data.DataError, match="tfds build"):
        data.make_datasets(config)
