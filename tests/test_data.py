"""launch.data: the real pipelines, under `tfds.testing.mock_data` offline.

mock_data generates the same seeded random examples for every split and
every load, so a pipeline's output is compared with the raw examples it
came from, preprocessed here by hand from the documented constants.
"""

import socket

import keras_hub
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from tf_breakeven.launch import data

NUM_MOCK = 64
SMALL_IMAGES = ["mnist", "fashion_mnist", "cifar10", "cifar100"]


def mocked(name, **kwargs):
    with tfds.testing.mock_data(num_examples=NUM_MOCK):
        return data.load(name, **kwargs)


def raw_examples(name, split, **kwargs):
    with tfds.testing.mock_data(num_examples=NUM_MOCK):
        return list(tfds.as_numpy(tfds.load(name, split=split, **kwargs)))


def first(dataset):
    return tf.nest.map_structure(np.asarray, next(iter(dataset)))


def unbatched(dataset):
    xs, ys = zip(*tfds.as_numpy(dataset))
    return np.concatenate(xs), np.concatenate(ys)


def normalized(image, name):
    meta = data.IMAGE_DATASETS[name]
    return (image / 255.0 - np.array(meta.mean)) / np.array(meta.std)


# -- names and arguments ---------------------------------------------------


def test_available_lists_every_dataset():
    assert data.available() == [
        "digits",
        "mnist",
        "fashion_mnist",
        "cifar10",
        "cifar100",
        "imagenet2012",
        "imdb_reviews",
        "glue/mnli",
    ]


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("svhn", {}, "available: digits, mnist"),
        ("mnist", {"augment": True}, "`augment` applies to cifar10"),
        (
            "cifar10",
            {"image_size": 64},
            "`image_size` applies to digits, imagenet2012",
        ),
        ("digits", {"sequence_length": 8}, "applies to imdb_reviews"),
        ("imdb_reviews", {"preset": "/nonexistent"}, "applies to glue/mnli"),
        ("glue/mnli", {"preset": "/nonexistent"}, "local keras-hub preset"),
        ("digits", {"probe_fraction": 0.0}, r"in \(0, 1\]"),
        ("digits", {"batch_size": 0}, "`batch_size` must be >= 1"),
    ],
    ids=[
        "unknown",
        "augment",
        "image_size",
        "sequence_length",
        "preset_name",
        "preset_dir",
        "probe_fraction",
        "batch_size",
    ],
)
def test_bad_arguments_raise(name, kwargs, match):
    kwargs = {"batch_size": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        data.load(name, **kwargs)


@pytest.mark.parametrize("name", ["mnist", "glue/mnli", "imagenet2012"])
def test_missing_dataset_fails_fast_offline(name, tmp_path, monkeypatch):
    """Fails at tfds' look-up on disk, before any network attempt (so it
    cannot hang on a timeout), with what to do."""
    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(ValueError) as error:
        data.load(name, batch_size=8, data_dir=str(tmp_path))
    assert attempts == []
    message = str(error.value)
    assert str(tmp_path) in message and "never downloaded" in message
    if name == "imagenet2012":
        assert "ILSVRC2012_img_train.tar" in message
        assert "<data_dir>/downloads/manual/" in message
        assert "tfds build imagenet2012 --data_dir=" in message
    else:
        assert f"tfds build {name} --data_dir=<dir>" in message
        assert "--data_dir=<dir>" in message


# -- digits (offline default) ---------------------------------------------


@pytest.fixture(scope="module")
def digits_split():
    digits = load_digits()
    x = digits.images[..., None] / 16.0
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=360, stratify=digits.target, random_state=0
    )
    return x_train, x_test, y_train, y_test


def test_digits_split_and_normalization(digits_split):
    x_train, x_test, y_train, y_test = digits_split
    spec = data.load("digits", batch_size=100, drop_remainder=False)
    assert (spec.num_train, spec.num_test) == (1437, 360)
    assert spec.input_shape == (8, 8, 1) and spec.num_classes == 10
    assert spec.steps_per_epoch == 15
    train_x, train_y = unbatched(spec.train)
    assert train_x.dtype == np.float32 and train_y.dtype == np.int32
    # Standardized with the train split's pixel statistics.
    np.testing.assert_allclose(train_x.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(train_x.std(), 1.0, atol=1e-5)
    mean, std = x_train.mean(), x_train.std()
    test_x, test_y = unbatched(spec.test)  # in order, unshuffled
    np.testing.assert_allclose(test_x, (x_test - mean) / std, atol=1e-5)
    np.testing.assert_array_equal(test_y, y_test)
    # The shuffled train split holds exactly the train examples.
    order = np.lexsort(train_x.reshape(len(train_x), -1).T)
    expected = (x_train - mean) / std
    reference = np.lexsort(expected.reshape(len(expected), -1).T)
    np.testing.assert_allclose(train_x[order], expected[reference], atol=1e-5)
    np.testing.assert_array_equal(train_y[order], y_train[reference])


def test_digits_upsampled_for_simple_cnn(digits_split):
    _, x_test, _, _ = digits_split
    spec = data.load(
        "digits", batch_size=100, image_size=16, drop_remainder=False
    )
    assert spec.input_shape == (16, 16, 1)
    test_x, _ = unbatched(spec.test)
    # Bilinear resize of the originals, then standardized.
    resized = tf.image.resize(x_test.astype(np.float32), [16, 16]).numpy()
    train_x, _ = unbatched(spec.train)
    np.testing.assert_allclose(train_x.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(train_x.std(), 1.0, atol=1e-5)
    # The test images are the resized originals, up to the train statistics.
    slope, intercept = np.polyfit(resized.ravel(), test_x.ravel(), 1)
    np.testing.assert_allclose(test_x, slope * resized + intercept, atol=1e-4)


def test_train_epochs_depend_only_on_seed_and_epoch():
    def labels(dataset):
        return np.concatenate([y.numpy() for _, y in dataset])

    spec = data.load("digits", batch_size=100)
    two = labels(spec.train_epochs(0, 2))
    assert two.size == 2 * 1400  # 14 full batches an epoch
    np.testing.assert_array_equal(two, labels(spec.train_epochs(0, 2)))
    np.testing.assert_array_equal(two[1400:], labels(spec.train_epochs(1, 2)))
    assert not np.array_equal(two[:1400], two[1400:])
    again = data.load("digits", batch_size=100, seed=1)
    assert not np.array_equal(two, labels(again.train_epochs(0, 2)))


@pytest.mark.parametrize("start, end", [(0, 14), (5, 9), (12, 31), (28, 29)])
def test_train_steps_are_the_batches_of_the_epoch_stream(start, end):
    # A run of `end` steps resumed at step `start` gets the batches the
    # uninterrupted run did, whether or not a Keras epoch is one data pass
    # (14 batches here).
    def labels(dataset):
        return [y.numpy() for _, y in dataset]

    spec = data.load("digits", batch_size=100)
    stream = labels(spec.train_epochs(0, 3))
    assert len(stream) == 42
    resumed = labels(spec.train_epochs.steps(start, end).take(end - start))
    assert len(resumed) == end - start
    for a, b in zip(stream[start:end], resumed):
        np.testing.assert_array_equal(a, b)
    # Enough batches for the whole run, even past the passes it spans.
    assert len(labels(spec.train_epochs.steps(start, end))) >= end - start


def test_digits_shuffle_is_seeded_and_reshuffled_each_epoch():
    def epochs(seed, count=2):
        spec = data.load("digits", batch_size=64, seed=seed)
        return [first(spec.train) for _ in range(count)]

    (x0, y0), (x1, y1) = epochs(0)
    (again_x0, again_y0), (again_x1, _) = epochs(0)
    np.testing.assert_array_equal(x0, again_x0)
    np.testing.assert_array_equal(y0, again_y0)
    np.testing.assert_array_equal(x1, again_x1)
    assert not np.array_equal(x0, x1)  # a new order every epoch
    (other, _), _ = epochs(1)
    assert not np.array_equal(x0, other)
    spec = data.load("digits", batch_size=64)
    assert spec.steps_per_epoch == 22  # 1437 // 64, remainder dropped
    assert sum(1 for _ in spec.train) == 22
    sizes = [len(y) for _, y in spec.train.repeat(2)]
    assert sizes == [64] * 44


def test_digits_probe_is_a_seeded_subset_fixed_across_epochs(digits_split):
    x_train = digits_split[0]
    spec = data.load("digits", batch_size=32, probe_batch_size=50)
    assert spec.num_probe == round(0.05 * 1437) == 72
    probe_x, probe_y = unbatched(spec.probe)
    assert [len(y) for _, y in spec.probe] == [50, 22]
    again_x, again_y = unbatched(spec.probe)
    np.testing.assert_array_equal(probe_x, again_x)
    np.testing.assert_array_equal(probe_y, again_y)
    expected = (x_train - x_train.mean()) / x_train.std()
    distances = np.abs(
        probe_x.reshape(72, 1, -1) - expected.reshape(1, len(expected), -1)
    ).max(-1)
    assert np.all(distances.min(1) < 1e-5)  # every probe example is in train
    other = data.load("digits", batch_size=32, seed=1, probe_fraction=0.1)
    assert other.num_probe == 144
    assert not np.array_equal(unbatched(other.probe)[0][:72], probe_x)


def test_max_examples_caps_both_splits():
    spec = data.load("digits", batch_size=16, max_examples=100)
    assert (spec.num_train, spec.num_test, spec.num_probe) == (100, 100, 5)
    assert sum(len(y) for _, y in spec.test) == 100


# -- tfds images ------------------------------------------------------------


@pytest.mark.parametrize("name", SMALL_IMAGES)
def test_small_images_normalized_with_the_standard_constants(name):
    spec = mocked(name, batch_size=8, probe_fraction=0.25, probe_batch_size=5)
    meta = data.IMAGE_DATASETS[name]
    assert spec.input_shape == meta.shape
    assert (spec.num_train, spec.num_test, spec.num_probe) == (64, 64, 16)
    raw = raw_examples(name, "test", as_supervised=True)
    test_x, test_y = unbatched(spec.test)  # unshuffled: the raw order
    assert test_x.dtype == np.float32 and test_x.shape == (64, *meta.shape)
    expected = np.stack([normalized(x, name) for x, _ in raw])
    np.testing.assert_allclose(test_x, expected, atol=1e-5)
    np.testing.assert_array_equal(test_y, [y for _, y in raw])
    train_x, train_y = first(spec.train)
    assert train_x.shape == (8, *meta.shape) and train_y.dtype == np.int32
    assert np.all((0 <= train_y) & (train_y < meta.num_classes))
    probe_x, _ = unbatched(spec.probe)
    assert [len(y) for _, y in spec.probe] == [5, 5, 5, 1]
    np.testing.assert_array_equal(probe_x, unbatched(spec.probe)[0])
    train_raw = np.stack([normalized(x, name) for x, _ in raw])
    distances = np.abs(probe_x[:, None] - train_raw[None]).max((2, 3, 4))
    assert np.all(distances.min(1) < 1e-5)
    assert len(set(distances.argmin(1))) == 16  # drawn without replacement


@pytest.mark.parametrize("name", SMALL_IMAGES)
def test_small_images_are_deterministic_given_the_seed(name):
    batch = first(mocked(name, batch_size=8, seed=3).train)
    again = first(mocked(name, batch_size=8, seed=3).train)
    other = first(mocked(name, batch_size=8, seed=4).train)
    np.testing.assert_array_equal(batch[0], again[0])
    np.testing.assert_array_equal(batch[1], again[1])
    assert not np.array_equal(batch[0], other[0])


def crops_and_flips(image, name):
    """Every 4-pixel-padded crop of `image`, flipped or not (normalized)."""
    meta = data.IMAGE_DATASETS[name]
    padded = np.pad(image / 255.0, [(4, 4), (4, 4), (0, 0)])
    padded = (padded - np.array(meta.mean)) / np.array(meta.std)
    crops = [padded[i : i + 32, j : j + 32] for i in range(9) for j in range(9)]
    return np.stack(crops + [c[:, ::-1] for c in crops])


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_augmentation_is_a_seeded_crop_and_flip(name):
    plain = mocked(name, batch_size=8, seed=5, drop_remainder=False)
    augmented = mocked(name, batch_size=8, seed=5, augment=True)
    plain_x, plain_y = unbatched(plain.train)
    aug_x, aug_y = unbatched(augmented.train)
    np.testing.assert_array_equal(aug_y, plain_y)  # same shuffle
    assert not np.allclose(aug_x, plain_x)
    raw = np.stack(
        [x for x, _ in raw_examples(name, "train", as_supervised=True)]
    )
    for clean, changed in zip(plain_x[:16], aug_x[:16]):
        source = raw[
            np.abs(normalized(raw, name) - clean).max((1, 2, 3)).argmin()
        ]
        options = crops_and_flips(source, name)
        assert np.abs(options - changed).max((1, 2, 3)).min() < 1e-5
    # New crops every epoch, the same epochs for the same seed; the probe
    # and the test split are never augmented.
    second_epoch = unbatched(augmented.train)[0]
    assert not np.allclose(second_epoch, aug_x)
    again = mocked(name, batch_size=8, seed=5, augment=True)
    np.testing.assert_array_equal(unbatched(again.train)[0], aug_x)
    np.testing.assert_array_equal(unbatched(again.train)[0], second_epoch)
    repeated = unbatched(
        mocked(name, batch_size=8, seed=5, augment=True).train.repeat(2)
    )[0]
    np.testing.assert_array_equal(
        repeated, np.concatenate([aug_x, second_epoch])
    )
    np.testing.assert_array_equal(
        unbatched(augmented.probe)[0], unbatched(plain.probe)[0]
    )
    np.testing.assert_array_equal(
        unbatched(augmented.test)[0], unbatched(plain.test)[0]
    )


def test_imagenet_central_crop_and_seeded_inception_crop():
    meta = data.IMAGE_DATASETS["imagenet2012"]
    spec = mocked("imagenet2012", batch_size=4, image_size=24)
    assert spec.input_shape == (24, 24, 3) and spec.num_classes == 1000
    # The records hold JPEGs (lossy): decode the same bytes for reference.
    raw = raw_examples(
        "imagenet2012",
        "validation",
        as_supervised=True,
        decoders={"image": tfds.decode.SkipDecoding()},
    )
    test_x, test_y = unbatched(spec.test)
    assert test_x.shape == (64, 24, 24, 3)
    for jpeg, got in zip([x for x, _ in raw[:8]], test_x):
        image = tf.io.decode_jpeg(jpeg).numpy()
        height, width, _ = image.shape
        side = int(0.875 * min(height, width))
        top, left = (height - side) // 2, (width - side) // 2
        crop = image[top : top + side, left : left + side]
        resized = tf.image.resize(crop, [24, 24]).numpy()
        expected = normalized(resized, "imagenet2012")
        np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_array_equal(test_y, [y for _, y in raw])
    augmented = mocked(
        "imagenet2012", batch_size=4, image_size=24, augment=True
    )
    again = mocked("imagenet2012", batch_size=4, image_size=24, augment=True)
    batch, labels = first(augmented.train)
    np.testing.assert_array_equal(batch, first(again.train)[0])
    assert batch.shape == (4, 24, 24, 3) and labels.dtype == np.int32
    unit = batch * np.array(meta.std) + np.array(meta.mean)
    assert unit.min() >= -1e-5 and unit.max() <= 1 + 1e-5
    plain_batch = first(
        mocked("imagenet2012", batch_size=4, image_size=24).train
    )
    np.testing.assert_array_equal(labels, plain_batch[1])
    assert not np.allclose(batch, plain_batch[0])


# -- text ---------------------------------------------------------------------


def test_imdb_standardization_strips_markup_and_punctuation():
    text = data._standardize(tf.constant("A <br />Great, film!"))
    assert text.numpy().decode().split() == ["a", "great", "film"]


def test_imdb_tokenized_with_a_vocabulary_from_the_training_split():
    spec = mocked("imdb_reviews", batch_size=8, sequence_length=12)
    assert (spec.sequence_length, spec.input_shape) == (12, None)
    vocabulary = spec.preprocessor.get_vocabulary()
    assert vocabulary[:2] == ["", "[UNK]"]
    assert spec.vocabulary_size == len(vocabulary) <= 20000
    raw = raw_examples("imdb_reviews", "test", as_supervised=True)
    test_x, test_y = unbatched(spec.test)
    assert test_x.dtype == np.int32 and test_x.shape == (64, 12)
    index = {word: i for i, word in enumerate(vocabulary)}
    for text, ids in zip([t for t, _ in raw], test_x):
        words = text.decode().lower().split()[:12]
        expected = [index.get(w, 1) for w in words]
        np.testing.assert_array_equal(ids, expected + [0] * (12 - len(words)))
    np.testing.assert_array_equal(test_y, [y for _, y in raw])
    assert set(test_y) <= {0, 1}
    train_x, _ = first(spec.train)
    assert train_x.max() < spec.vocabulary_size and train_x.min() >= 0
    small = mocked("imdb_reviews", batch_size=8, vocabulary_size=10, seed=1)
    assert small.vocabulary_size == 10
    assert small.sequence_length == 80  # the LSTM zoo model's default
    np.testing.assert_array_equal(
        small.preprocessor.get_vocabulary(), vocabulary[:10]
    )
    assert unbatched(small.train)[0].max() == 9


def check_bert_inputs(spec, tokenizer, sequence_length):
    raw = raw_examples("glue/mnli", "validation_matched")
    inputs, labels = unbatched_dict(spec.test)
    np.testing.assert_array_equal(labels, [e["label"] for e in raw])
    assert set(labels) <= {0, 1, 2}
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    for row, example in enumerate(raw):
        premise = np.asarray(tokenizer(example["premise"])).tolist()
        hypothesis = np.asarray(tokenizer(example["hypothesis"])).tolist()
        used = len(premise) + len(hypothesis) + 3
        assert used <= sequence_length  # nothing truncated
        pad = sequence_length - used
        expected = [cls, *premise, sep, *hypothesis, sep]
        expected += [tokenizer.pad_token_id] * pad
        np.testing.assert_array_equal(inputs["token_ids"][row], expected)
        segments = [0] * (len(premise) + 2) + [1] * (len(hypothesis) + 1)
        np.testing.assert_array_equal(
            inputs["segment_ids"][row], segments + [0] * pad
        )
        np.testing.assert_array_equal(
            inputs["padding_mask"][row], [1] * used + [0] * pad
        )
    for value in inputs.values():
        assert value.dtype == np.int32 and value.shape[1] == sequence_length


def unbatched_dict(dataset):
    batches = list(tfds.as_numpy(dataset))
    inputs = {
        key: np.concatenate([x[key] for x, _ in batches])
        for key in batches[0][0]
    }
    return inputs, np.concatenate([y for _, y in batches])


@pytest.fixture(scope="module")
def mnli():
    return mocked("glue/mnli", batch_size=8, sequence_length=48)


def test_mnli_bert_inputs_from_a_vocabulary_built_on_the_data(mnli):
    tokenizer = mnli.preprocessor.tokenizer
    vocabulary = tokenizer.get_vocabulary()
    assert vocabulary[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert mnli.vocabulary_size == len(vocabulary)
    assert (mnli.num_classes, mnli.sequence_length) == (3, 48)
    assert mnli.input_shape is None
    check_bert_inputs(mnli, tokenizer, 48)
    again = mocked("glue/mnli", batch_size=8, sequence_length=48)
    assert again.preprocessor.tokenizer.get_vocabulary() == vocabulary
    batch, again_batch = first(mnli.train), first(again.train)
    for key in batch[0]:
        np.testing.assert_array_equal(batch[0][key], again_batch[0][key])
    np.testing.assert_array_equal(batch[1], again_batch[1])
    assert batch[0]["token_ids"].max() < mnli.vocabulary_size
    assert sum(len(y) for _, y in mnli.probe) == mnli.num_probe == 3


def test_mnli_uses_the_tokenizer_of_a_local_preset(tmp_path):
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocabulary += list(letters) + [f"##{c}" for c in letters]
    tokenizer = keras_hub.models.BertTokenizer(
        vocabulary=vocabulary, lowercase=True
    )
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(vocabulary),
        num_layers=1,
        num_heads=1,
        hidden_dim=2,
        intermediate_dim=2,
        max_sequence_length=48,
    )
    backbone.save_to_preset(str(tmp_path))  # a preset is a model's directory
    tokenizer.save_to_preset(str(tmp_path))
    spec = mocked(
        "glue/mnli", batch_size=8, sequence_length=48, preset=str(tmp_path)
    )
    assert spec.vocabulary_size == len(vocabulary)
    assert spec.preprocessor.tokenizer.get_vocabulary() == vocabulary
    check_bert_inputs(spec, tokenizer, 48)
    with pytest.raises(ValueError, match="drop `vocabulary_size`"):
        data.load(
            "glue/mnli", batch_size=8, preset=str(tmp_path), vocabulary_size=9
        )
