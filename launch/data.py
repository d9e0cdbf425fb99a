"""Datasets of the two papers as deterministic tf.data pipelines.

    >>> from tf_breakeven.launch import data
    >>> spec = data.load("cifar10", batch_size=128, seed=0, augment=True)
    >>> model.fit(spec.train, epochs=..., validation_data=spec.test)
    >>> tfb.HessianOperator(model, spec.probe)

`load(name, ...)` returns a `DataSpec`: `train` (shuffled with `seed`,
reshuffled each time it is iterated, not repeated), `test` (in file order)
and `probe` (a seeded `probe_fraction` of the training examples, without
augmentation, the same batches every time), each a tf.data.Dataset of
`(x, y)` batches with int32 labels.

| name | x | preprocessing |
|---|---|---|
| digits | [8, 8, 1] float32 | scikit-learn's digits (offline), /16, then
  standardized with the train split's pixel mean and std |
| mnist, fashion_mnist | [28, 28, 1] | /255, per-channel mean/std |
| cifar10, cifar100 | [32, 32, 3] | /255, per-channel mean/std; `augment`:
  4-pixel zero-padded random crop + horizontal flip (before normalizing) |
| imagenet2012 | [S, S, 3] | Inception crop (`augment`) or central 87.5%
  crop, resized to S = `image_size`, per-channel mean/std |
| imdb_reviews | [L] int32 | lowercased, `<br />` and punctuation removed,
  TextVectorization ids (0 padding, 1 unknown) from the train split |
| glue/mnli | dict of [L] int32 | BERT `token_ids`, `segment_ids`,
  `padding_mask` of premise/hypothesis: [CLS] p [SEP] h [SEP] |

Determinism: the order and the augmentation are a function of `seed` and
of TensorFlow's global seed, which seeded tf.data ops also read when they
are built: call `keras.utils.set_random_seed` before `load`. Augmentation
uses stateless ops keyed by a seeded `Dataset.random` stream, so it differs
between epochs (iterations of `train`, or `train.repeat()`) while two runs
see the same epochs. The probe is drawn with NumPy from `seed` alone.

tfds never downloads here (`download=False`): a dataset that is not on disk
raises a `ValueError` that says how to get it. The probe's raw examples are
cached in memory (about 110 KB per ImageNet image: use a small
`probe_fraction` there). Building the mnli WordPiece vocabulary reads the
whole training split once; pass a local `preset` for the paper's setup.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE

# The text datasets' defaults: imdb as the Keras imdb_lstm example (and
# models.LSTMClassifier), mnli as BERT fine-tuning (uncased WordPiece size).
TEXT_DEFAULTS = {
    "imdb_reviews": {"sequence_length": 80, "vocabulary_size": 20000},
    "glue/mnli": {"sequence_length": 128, "vocabulary_size": 30522},
}
IMAGENET_SIZE = 224
# tfds' ImageNet records are shuffled when written; a window of encoded
# JPEGs (about 110 KB each) bounds the memory of the shuffle buffer.
IMAGENET_SHUFFLE_BUFFER = 10_000
_BERT_RESERVED = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class _Images(NamedTuple):
    test_split: str
    num_classes: int
    shape: tuple[int, int, int] | None  # None: resized to image_size
    mean: tuple[float, ...]  # of pixels scaled to [0, 1]
    std: tuple[float, ...]
    augmentation: str | None  # "crop_flip", "inception" or None


# Mean and std of each channel over all training pixels in [0, 1].
IMAGE_DATASETS = {
    "mnist": _Images("test", 10, (28, 28, 1), (0.1307,), (0.3081,), None),
    "fashion_mnist": _Images(
        "test", 10, (28, 28, 1), (0.2860,), (0.3530,), None
    ),
    "cifar10": _Images(
        "test",
        10,
        (32, 32, 3),
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        "crop_flip",
    ),
    "cifar100": _Images(
        "test",
        100,
        (32, 32, 3),
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        "crop_flip",
    ),
    "imagenet2012": _Images(
        "validation",
        1000,
        None,
        (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225),
        "inception",
    ),
}
DATASETS = ("digits", *IMAGE_DATASETS, *TEXT_DEFAULTS)
DIGITS_NUM_TEST = 360  # of 1,797: 1,437 train, a fixed stratified split


def available() -> list[str]:
    """Names accepted by `load`."""
    return list(DATASETS)


@dataclasses.dataclass
class DataSpec:
    """A loaded dataset: pipelines and what a model needs to know of them.

    Attributes:
        name: the dataset name given to `load`.
        train: `(x, y)` batches, shuffled and reshuffled every iteration
            (an epoch), augmented if asked; not repeated.
        test: `(x, y)` batches of the evaluation split, in file order.
        probe: a finite dataset of `num_probe` training examples in batches
            of `probe_batch_size`, preprocessed without augmentation, the
            same every time it is iterated (for the measurement callbacks).
        num_train: training examples (after `max_examples`).
        num_test: evaluation examples.
        num_probe: probe examples, `round(probe_fraction * num_train)`.
        num_classes: label values (labels are int32 in [0, num_classes)).
        input_shape: shape of one image (None for the text datasets,
            which have `sequence_length` and `vocabulary_size` instead).
        batch_size: examples per training batch.
        drop_remainder: whether `train` drops the last partial batch.
        sequence_length: tokens per example (text datasets).
        vocabulary_size: token ids are in [0, vocabulary_size) (text).
        preprocessor: the fitted `keras.layers.TextVectorization` (imdb) or
            `keras_hub.models.BertTextClassifierPreprocessor` (mnli).
        train_epochs: `train_epochs(start_epoch, end_epoch)` streams the
            full training batches of epochs [start, end), each epoch's
            order and augmentation a function of `(seed, epoch)` only. Unlike
            `train`, it does not depend on how many iterators were made of
            it (Keras makes extra ones under a distribution strategy), and
            a resumed run can start at its epoch: use it with
            `steps_per_epoch` (drop_remainder batches).
    """

    name: str
    train: tf.data.Dataset
    test: tf.data.Dataset
    probe: tf.data.Dataset
    num_train: int
    num_test: int
    num_probe: int
    num_classes: int
    input_shape: tuple[int, ...] | None
    batch_size: int
    drop_remainder: bool
    sequence_length: int | None = None
    vocabulary_size: int | None = None
    preprocessor: Any = None
    train_epochs: Any = None

    @property
    def steps_per_epoch(self) -> int:
        """Batches in one pass over `train`."""
        full, partial = divmod(self.num_train, self.batch_size)
        return full + int(bool(partial) and not self.drop_remainder)


def load(
    name: str,
    *,
    batch_size: int,
    seed: int = 0,
    data_dir: str | None = None,
    augment: bool = False,
    drop_remainder: bool = True,
    probe_fraction: float = 0.05,
    probe_batch_size: int = 128,
    max_examples: int | None = None,
    image_size: int | None = None,
    sequence_length: int | None = None,
    vocabulary_size: int | None = None,
    preset: str | None = None,
    shuffle_buffer: int | None = None,
) -> DataSpec:
    """Loads a dataset of the papers as tf.data pipelines.

    This function is long because its docstring documents all 14 arguments;
    the pipelines are built by `_source`, `_reshuffled`, `_EpochStream`,
    `_probe_examples` and `_batches`.

    Args:
        name: one of `available()`.
        batch_size: training (and evaluation) batch size.
        seed: decides the shuffling, the augmentation and the probe set.
        data_dir: tensorflow-datasets directory (default: tfds' own,
            `~/tensorflow_datasets` or `$TFDS_DATA_DIR`). Never downloaded
            into.
        augment: random crops and flips (cifar10, cifar100, imagenet2012
            only; other datasets raise).
        drop_remainder: drop the last partial training batch, so every
            step sees `batch_size` examples (as the stability criteria of
            the break-even paper assume) and the step is traced once.
        probe_fraction: fraction in (0, 1] of the training set in the probe.
        probe_batch_size: batch size of the probe dataset.
        max_examples: keep only the first `max_examples` examples of the
            train and evaluation splits (smoke runs).
        image_size: side of the ImageNet crops (224), or of the upsampled
            digits (default: 8, the originals).
        sequence_length: tokens per example (imdb 80, mnli 128).
        vocabulary_size: imdb words kept (20,000) or size of the WordPiece
            vocabulary built from mnli (30,522) when `preset` is None.
        preset: glue/mnli: a local keras-hub BERT preset directory whose
            tokenizer to use (never downloaded). None: a WordPiece
            vocabulary is built from the training split.
        shuffle_buffer: examples in the shuffle buffer (default: the whole
            training set; 10,000 for ImageNet).

    Returns:
        A `DataSpec`.

    Raises:
        ValueError: unknown name, an argument the dataset does not use, bad
            sizes, or a dataset that is not on disk (with how to get it).
    """
    _check_arguments(name, locals())  # every argument, by name
    source = _source(name, data_dir, image_size)
    train, test = source.train, source.test
    if max_examples is not None:
        train, test = train.take(max_examples), test.take(max_examples)
    num_train = _count(train)
    num_probe = max(1, int(round(probe_fraction * num_train)))
    batch_fn, extra = None, {"input_shape": source.input_shape}
    if name in TEXT_DEFAULTS:
        batch_fn, extra = _tokenization(
            name, train, sequence_length, vocabulary_size, preset
        )
    if shuffle_buffer is None:
        large = name == "imagenet2012"
        shuffle_buffer = IMAGENET_SHUFFLE_BUFFER if large else num_train
    shuffled, train_fn = _reshuffled(
        train, source, shuffle_buffer, seed, augment
    )
    train_epochs = _EpochStream(
        train,
        source,
        seed,
        shuffle_buffer,
        augment,
        batch_size,
        batch_fn,
        num_train,
    )
    probe = _probe_examples(train, num_train, num_probe, seed)
    return DataSpec(
        name=name,
        train=_batches(
            shuffled, batch_size, drop_remainder, train_fn, batch_fn
        ),
        test=_batches(test, batch_size, False, source.element_fn, batch_fn),
        probe=_batches(
            probe, probe_batch_size, False, source.element_fn, batch_fn
        ),
        num_train=num_train,
        num_test=_count(test),
        num_probe=num_probe,
        num_classes=source.num_classes,
        batch_size=batch_size,
        drop_remainder=drop_remainder,
        train_epochs=train_epochs,
        **extra,
    )


def _source(name: str, data_dir: str | None, image_size) -> _Source:
    if name == "digits":
        return _digits(image_size)
    if name in IMAGE_DATASETS:
        return _tfds_images(name, data_dir, image_size)
    if name == "imdb_reviews":
        return _imdb(data_dir)
    return _mnli(data_dir)


def _reshuffled(train, source, shuffle_buffer, seed, augment):
    """`DataSpec.train`'s examples (reshuffled, augmentation keys) and the
    per-example function to map over them."""
    shuffled = train.shuffle(
        shuffle_buffer, seed=seed, reshuffle_each_iteration=True
    )
    if not augment:
        return shuffled, source.element_fn
    keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    shuffled = tf.data.Dataset.zip((shuffled, keys)).map(
        lambda example, key: (*example, key)
    )
    return shuffled, source.augment_fn


@dataclasses.dataclass
class _EpochStream:
    """`DataSpec.train_epochs`: epochs [start, end) of seeded batches."""

    train: tf.data.Dataset
    source: Any  # _Source
    seed: int
    shuffle_buffer: int
    augment: bool
    batch_size: int
    batch_fn: Callable | None
    num_train: int

    def epoch_batches(self, epoch: int) -> tf.data.Dataset:
        """One epoch's full batches, a function of `(seed, epoch)` only."""
        epoch_seed = self.seed * 1_000_003 + epoch
        examples = self.train.shuffle(
            self.shuffle_buffer,
            seed=epoch_seed,
            reshuffle_each_iteration=False,
        )
        element_fn = self.source.element_fn
        if self.augment:
            keys = tf.data.Dataset.random(seed=epoch_seed)
            examples = tf.data.Dataset.zip((examples, keys)).map(
                lambda example, key: (*example, key)
            )
            element_fn = self.source.augment_fn
        examples = examples.map(element_fn, num_parallel_calls=AUTOTUNE)
        batches = examples.batch(self.batch_size, drop_remainder=True)
        if self.batch_fn is not None:
            batches = batches.map(self.batch_fn, num_parallel_calls=AUTOTUNE)
        return batches

    def steps(self, start_step: int, end_step: int) -> tf.data.Dataset:
        """Batches [start_step, end_step) of the stream `self(0, ...)`.

        What a run of `end_step` steps consumes from its step `start_step`
        on, whatever its `steps_per_epoch`: a run resumed at step s gets
        the batches an uninterrupted one would have (a Keras epoch need not
        be one pass over the data).
        """
        per_pass = self.num_train // self.batch_size
        if per_pass < 1:
            raise ValueError(
                f"{self.num_train} training examples make no full batch of "
                f"{self.batch_size}; pass a smaller --batch_size."
            )
        first = start_step // per_pass
        last = max(-(-end_step // per_pass), first + 1)
        return self(first, last).skip(start_step - first * per_pass)

    def __call__(self, start_epoch: int, end_epoch: int) -> tf.data.Dataset:
        # tf.data takes shuffle seeds as Python ints, so epochs are built
        # one by one and concatenated as a balanced tree (shallow graph).
        parts = [self.epoch_batches(e) for e in range(start_epoch, end_epoch)]
        if not parts:
            raise ValueError(
                f"No epochs in [{start_epoch}, {end_epoch}); pass "
                "end_epoch > start_epoch."
            )
        while len(parts) > 1:
            parts = [
                parts[i].concatenate(parts[i + 1])
                if i + 1 < len(parts)
                else parts[i]
                for i in range(0, len(parts), 2)
            ]
        options = tf.data.Options()
        options.deterministic = True
        return parts[0].prefetch(AUTOTUNE).with_options(options)


def _probe_examples(train, num_train, num_probe, seed) -> tf.data.Dataset:
    """The raw examples of a seeded subset, in file order, cached.

    The cache holds raw examples (JPEG bytes for ImageNet), so the training
    split is scanned once, on the first pass over the probe.
    """
    mask = np.zeros(num_train, bool)
    rng = np.random.default_rng([seed, 1])
    mask[rng.choice(num_train, num_probe, replace=False)] = True
    probe = train.enumerate().filter(lambda i, _: tf.gather(mask, i))
    return probe.map(lambda _, example: example).cache()


def _batches(dataset, size, drop_remainder, element_fn, batch_fn):
    """Per-example preprocessing, batching, then per-batch tokenization."""
    dataset = dataset.map(element_fn, num_parallel_calls=AUTOTUNE)
    dataset = dataset.batch(size, drop_remainder=drop_remainder)
    if batch_fn is not None:
        dataset = dataset.map(batch_fn, num_parallel_calls=AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    return dataset.prefetch(AUTOTUNE).with_options(options)


def _tokenization(name, train, sequence_length, vocabulary_size, preset):
    """The batch tokenizer of a text dataset and its `DataSpec` fields."""
    length = sequence_length or TEXT_DEFAULTS[name]["sequence_length"]
    size = vocabulary_size or TEXT_DEFAULTS[name]["vocabulary_size"]
    build = _imdb_vectorizer if name == "imdb_reviews" else _mnli_packer
    batch_fn, preprocessor, size = build(train, length, size, preset)
    return batch_fn, {
        "input_shape": None,
        "sequence_length": length,
        "vocabulary_size": size,
        "preprocessor": preprocessor,
    }


class _Source(NamedTuple):
    """Raw `(x, y)` examples and their per-example preprocessing."""

    train: tf.data.Dataset
    test: tf.data.Dataset
    num_classes: int
    input_shape: tuple[int, ...] | None
    element_fn: Callable  # (x, y) -> (x, y)
    augment_fn: Callable | None = None  # (x, y, key) -> (x, y)


def _check_arguments(name: str, args: dict) -> None:
    if name not in DATASETS:
        raise ValueError(
            f"Unknown dataset {name!r}; available: {', '.join(DATASETS)}."
        )
    for key in ("batch_size", "probe_batch_size"):
        value = args[key]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"`{key}` must be an int; got {args[key]!r}.")
        if args[key] < 1:
            raise ValueError(f"`{key}` must be >= 1; got {args[key]}.")
    if not 0 < args["probe_fraction"] <= 1:
        raise ValueError(
            f"`probe_fraction` must be in (0, 1]; got {args['probe_fraction']}."
        )
    for key in (
        "max_examples",
        "image_size",
        "sequence_length",
        "vocabulary_size",
        "shuffle_buffer",
    ):
        if args[key] is not None and args[key] < 1:
            raise ValueError(f"`{key}` must be >= 1; got {args[key]}.")
    users = {
        "augment": ("cifar10", "cifar100", "imagenet2012"),
        "image_size": ("digits", "imagenet2012"),
        "sequence_length": tuple(TEXT_DEFAULTS),
        "vocabulary_size": tuple(TEXT_DEFAULTS),
        "preset": ("glue/mnli",),
    }
    for key, names in users.items():
        if args[key] not in (None, False) and name not in names:
            raise ValueError(
                f"`{key}` applies to {', '.join(names)}, not {name!r}: drop "
                "it or pick one of those datasets."
            )
    if args["preset"] is not None:
        if args["vocabulary_size"] is not None:
            raise ValueError(
                "A `preset` fixes the vocabulary: drop `vocabulary_size`."
            )
        if not os.path.isdir(args["preset"]):
            raise ValueError(
                f"`preset` must be a local keras-hub preset directory (this "
                f"loader never downloads); {args['preset']!r} is not one. "
                "On a connected machine save one, e.g. `keras_hub.models."
                "BertTextClassifier.from_preset('bert_base_en_uncased', "
                "num_classes=3).save_to_preset(dir)`, and copy `dir` here."
            )


def _count(dataset: tf.data.Dataset) -> int:
    size = int(dataset.cardinality())
    if size < 0:  # unknown: count once
        size = int(dataset.reduce(np.int64(0), lambda n, _: n + 1))
    return size


def _tfds_load(name: str, split: str, data_dir: str | None, **kwargs):
    import tensorflow_datasets as tfds

    try:
        return tfds.load(
            name,
            split=split,
            data_dir=data_dir,
            download=False,
            try_gcs=False,
            shuffle_files=False,
            **kwargs,
        )
    except (
        AssertionError,  # tfds' "could not find data in ..."
        FileNotFoundError,
        tf.errors.NotFoundError,
        tfds.core.registered.DatasetNotFoundError,
    ) as err:
        raise ValueError(_missing_message(name, data_dir, err)) from err


def _missing_message(name: str, data_dir: str | None, err: Exception) -> str:
    where = data_dir or "tfds' default directory (~/tensorflow_datasets)"
    if name == "imagenet2012":
        how = (
            "ImageNet is not downloadable by tfds: get "
            "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from "
            "https://image-net.org (registration required), put them in "
            "<data_dir>/downloads/manual/, run `tfds build imagenet2012 "
            "--data_dir=<data_dir>` (no internet needed, hours), then pass "
            "--data_dir=<data_dir>."
        )
    else:
        how = (
            f"On a machine with internet run `tfds build {name} "
            f"--data_dir=<dir>` (or `tfds.load('{name}', data_dir=<dir>)`), "
            "copy <dir> here and pass --data_dir=<dir>."
        )
    return (
        f"Dataset {name!r} is not prepared in {where} and is never "
        f"downloaded here. {how} Building needs `pip install "
        "importlib_resources` with tfds 4.9 (tensorflow/datasets#11212). "
        f"(tfds: {err})"
    )


def _digits(image_size: int | None = None) -> _Source:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images[..., None].astype(np.float32) / 16.0
    labels = digits.target.astype(np.int32)
    # A fixed split: the test set is the same for every training seed.
    x_train, x_test, y_train, y_test = train_test_split(
        images,
        labels,
        test_size=DIGITS_NUM_TEST,
        stratify=labels,
        random_state=0,
    )
    if image_size is not None:
        # Bilinear upsampling, e.g. to 16x16 so the standard SimpleCNN (two
        # conv-conv-pool stages need >= 10 pixels) runs unchanged.
        size = [image_size, image_size]
        x_train = tf.image.resize(x_train, size).numpy()
        x_test = tf.image.resize(x_test, size).numpy()
    mean, std = float(x_train.mean()), float(x_train.std())

    def element_fn(image, label):
        return (image - mean) / std, label

    return _Source(
        tf.data.Dataset.from_tensor_slices((x_train, y_train)),
        tf.data.Dataset.from_tensor_slices((x_test, y_test)),
        num_classes=10,
        input_shape=tuple(x_train.shape[1:]),
        element_fn=element_fn,
    )


def _tfds_images(name: str, data_dir: str | None, image_size) -> _Source:
    meta = IMAGE_DATASETS[name]
    kwargs: dict[str, Any] = {"as_supervised": True}
    if meta.augmentation == "inception":
        import tensorflow_datasets as tfds

        # Shuffle encoded JPEGs; decode after (and only the probe's ones).
        kwargs["decoders"] = {"image": tfds.decode.SkipDecoding()}
    train = _tfds_load(name, "train", data_dir, **kwargs)
    test = _tfds_load(name, meta.test_split, data_dir, **kwargs)
    size = image_size or IMAGENET_SIZE
    mean, std = tf.constant(meta.mean), tf.constant(meta.std)

    def to_unit(image, key):  # -> float32 in [0, 1]
        if meta.augmentation == "inception":
            image = tf.io.decode_image(image, 3, expand_animations=False)
            return _inception_crop(image, size, key) / 255.0
        image = tf.cast(image, tf.float32) / 255.0
        if key is not None:
            image = _crop_flip(image, key)
        return image

    def augment_fn(image, label, key):
        return (to_unit(image, key) - mean) / std, tf.cast(label, tf.int32)

    def element_fn(image, label):
        return augment_fn(image, label, None)

    return _Source(
        train,
        test,
        num_classes=meta.num_classes,
        input_shape=meta.shape or (size, size, 3),
        element_fn=element_fn,
        augment_fn=augment_fn if meta.augmentation else None,
    )


def _crop_flip(image, key):
    """Random 4-pixel-padded crop and horizontal flip (He et al. 2016)."""
    padded = tf.pad(image, [[4, 4], [4, 4], [0, 0]])
    image = tf.image.stateless_random_crop(
        padded, tf.shape(image), seed=tf.stack([key, 0])
    )
    return tf.image.stateless_random_flip_left_right(
        image, seed=tf.stack([key, 1])
    )


def _inception_crop(image, size, key):
    """Random-area crop and flip (`key`), or the central 87.5%, resized.

    Training: 8-100% of the area, aspect ratio 3/4-4/3 (Szegedy et al.
    2015). Evaluation: the central square of 87.5% of the shorter side
    (224 of 256), as the TF reference ResNet preprocessing.
    """
    shape = tf.shape(image)
    if key is None:
        side = tf.cast(
            0.875 * tf.cast(tf.minimum(shape[0], shape[1]), tf.float32),
            tf.int32,
        )
        begin = tf.stack([(shape[0] - side) // 2, (shape[1] - side) // 2, 0])
        crop_size = tf.stack([side, side, -1])
    else:
        begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
            shape,
            tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
            seed=tf.stack([key, 0]),
            min_object_covered=0.1,
            aspect_ratio_range=(3 / 4, 4 / 3),
            area_range=(0.08, 1.0),
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
    image = tf.image.resize(tf.slice(image, begin, crop_size), [size, size])
    if key is not None:
        image = tf.image.stateless_random_flip_left_right(
            image, seed=tf.stack([key, 1])
        )
    return image


def _text_element(text, label):
    return text, tf.cast(label, tf.int32)


def _imdb(data_dir: str | None) -> _Source:
    return _Source(
        _tfds_load("imdb_reviews", "train", data_dir, as_supervised=True),
        _tfds_load("imdb_reviews", "test", data_dir, as_supervised=True),
        num_classes=2,
        input_shape=None,
        element_fn=_text_element,
    )


_PUNCTUATION = "[" + re.escape('!"#$%&()*+,-./:;<=>?@[\\]^_`{|}~') + "]"


def _standardize(text):
    text = tf.strings.lower(text)
    text = tf.strings.regex_replace(text, "<br />", " ")
    return tf.strings.regex_replace(text, _PUNCTUATION, "")


def _imdb_vectorizer(train, sequence_length, vocabulary_size, preset):
    import keras

    del preset
    vectorizer = keras.layers.TextVectorization(
        max_tokens=vocabulary_size,
        standardize=_standardize,
        output_sequence_length=sequence_length,
    )
    vectorizer.adapt(train.map(lambda text, _: text).batch(1024))

    def batch_fn(text, label):
        return tf.cast(vectorizer(text), tf.int32), label

    return batch_fn, vectorizer, int(vectorizer.vocabulary_size())


def _mnli(data_dir: str | None) -> _Source:
    def pair(example):
        return (example["premise"], example["hypothesis"]), example["label"]

    # as_supervised is not defined for glue: map the feature dict.
    return _Source(
        _tfds_load("glue/mnli", "train", data_dir).map(pair),
        _tfds_load("glue/mnli", "validation_matched", data_dir).map(pair),
        num_classes=3,
        input_shape=None,
        element_fn=_text_element,
    )


def _mnli_packer(train, sequence_length, vocabulary_size, preset):
    import keras_hub

    if preset is not None:
        tokenizer = keras_hub.models.BertTokenizer.from_preset(preset)
    else:
        texts = train.flat_map(
            lambda pair, _: tf.data.Dataset.from_tensor_slices(tf.stack(pair))
        )
        vocabulary = keras_hub.tokenizers.compute_word_piece_vocabulary(
            texts.batch(1024),
            vocabulary_size,
            lowercase=True,
            reserved_tokens=_BERT_RESERVED,
        )
        tokenizer = keras_hub.models.BertTokenizer(
            vocabulary=vocabulary, lowercase=True
        )
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        tokenizer, sequence_length=sequence_length
    )

    def batch_fn(pair, label):
        inputs, label = preprocessor(pair, label)
        return {k: tf.cast(v, tf.int32) for k, v in inputs.items()}, label

    return batch_fn, preprocessor, int(tokenizer.vocabulary_size())
