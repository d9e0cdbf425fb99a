"""Which flag combinations can run, checked before the run starts.

Every check raises `absl.app.UsageError` with one message that says what
fits (the launcher prints it without a traceback and exits with 1):

* `check_config(config)`: no data and no model needed: the model and
  dataset names, whether the model takes the dataset's inputs (the table
  below), the `--model_arg` keys, `--measure_every`, the micro-batches of
  the tracking train step, and a measurement schedule that cannot fire
  within `--steps_per_epoch` x `--epochs`.
* `check_model_fits(config)`: an image model built on the dataset's image
  shape (DenseNet-121 needs at least 32x32 images, SimpleCNN 10x10).
* `check_against_data(config, num_train, num_probe, replicas)`: what needs
  the loaded dataset's size: the probe set against the micro-batches, a
  measurement schedule against the run's steps, the step tracking's
  micro-batches against the per-replica batch.

The table of what fits comes from the two registries:

* a model's inputs from the arguments of its tiny configuration
  (`tf_breakeven.models.tiny_config`): `input_shape` -> images;
  `max_sequence_length` -> BERT inputs (token ids, segment ids, padding
  mask); `sequence_length` or `vocabulary_size` -> token ids;
* a dataset's inputs from `tf_breakeven.launch.data`: a text dataset
  (`data.TEXT_DEFAULTS`) gives token ids, and glue/mnli (sentence pairs,
  see the table in `tf_breakeven.launch.data`) the BERT inputs, whose
  `token_ids` an LSTM reads alone; every other dataset gives images.
"""

from __future__ import annotations

import re

from absl import app

from tf_breakeven import models
from tf_breakeven.launch import config as config_lib
from tf_breakeven.launch import data as data_lib

IMAGES, TOKENS, BERT_INPUTS = "images", "token ids", "BERT inputs"
# Sentence-pair datasets: `data.load` packs them as BERT inputs.
BERT_INPUT_DATASETS = ("glue/mnli",)
# The arguments the launcher passes from the dataset (not --model_arg).
DATASET_ARGUMENTS = {
    "num_classes": "the dataset",
    "input_shape": "the dataset (--image_size for digits and imagenet2012)",
    "vocabulary_size": "--vocabulary_size",
    "sequence_length": "--sequence_length",
    "max_sequence_length": "--sequence_length",
}


def model_inputs(model: str) -> str | None:
    """IMAGES, TOKENS or BERT_INPUTS: what `model` takes (None: unknown)."""
    tiny = models.tiny_config(model)
    if "input_shape" in tiny:
        return IMAGES
    if "max_sequence_length" in tiny:
        return BERT_INPUTS
    if "sequence_length" in tiny or "vocabulary_size" in tiny:
        return TOKENS
    return None


def dataset_inputs(dataset: str) -> tuple[str, ...]:
    """The kinds of model input `dataset`'s examples can feed."""
    if dataset in BERT_INPUT_DATASETS:
        return (BERT_INPUTS, TOKENS)
    if dataset in data_lib.TEXT_DEFAULTS:
        return (TOKENS,)
    return (IMAGES,)


def fits(model: str, dataset: str) -> bool:
    """Whether `model` takes `dataset`'s inputs (unknown kinds: True)."""
    kind = model_inputs(model)
    return kind is None or kind in dataset_inputs(dataset)


def datasets_for(model: str) -> list[str]:
    """The datasets whose inputs `model` takes."""
    return [d for d in data_lib.available() if fits(model, d)]


def models_for(dataset: str) -> list[str]:
    """The models that take `dataset`'s inputs."""
    return [m for m in models.available() if fits(m, dataset)]


def sequence_argument(model: str) -> str:
    """The name of a text model's sequence-length argument."""
    tiny = models.tiny_config(model)
    return (
        "max_sequence_length"
        if "max_sequence_length" in tiny
        else "sequence_length"
    )


def image_shape(config: config_lib.Config) -> tuple[int, int, int] | None:
    """The image shape `config.dataset` gives (None: not an image dataset),
    known without loading it."""
    if IMAGES not in dataset_inputs(config.dataset):
        return None
    default = config_lib.DEFAULT_IMAGE_SIZE.get(config.dataset)
    if config.dataset == "digits":
        side = config.image_size or default or 8
        return (side, side, 1)
    meta = data_lib.IMAGE_DATASETS[config.dataset]
    if meta.shape is not None:
        return tuple(meta.shape)
    side = config.image_size or default or data_lib.IMAGENET_SIZE
    return (side, side, 3)


def _names(names: list[str]) -> str:
    return ", ".join(names) if names else "none"


def check_names(config: config_lib.Config) -> None:
    """The model and dataset are registered and the model takes the data."""
    if config.model not in models.available():
        raise app.UsageError(
            f"--model={config.model!r} is not a zoo model; use one of "
            f"{_names(models.available())}."
        )
    if config.dataset not in data_lib.available():
        raise app.UsageError(
            f"--dataset={config.dataset!r} is unknown; use one of "
            f"{_names(data_lib.available())}."
        )
    if not fits(config.model, config.dataset):
        kind = model_inputs(config.model)
        given = " or ".join(dataset_inputs(config.dataset))
        datasets = [
            d
            for d in datasets_for(config.model)
            if _builds(config.model, config.model_kwargs, d)
        ]
        others = [
            m
            for m in models_for(config.dataset)
            if _builds(m, {}, config.dataset)
        ]
        raise app.UsageError(
            f"--model={config.model} takes {kind}, but --dataset="
            f"{config.dataset} gives {given}: use a dataset such as "
            f"{_names(datasets)} (or, for --dataset={config.dataset}, a "
            f"model such as {_names(others)})."
        )


def _builds(model: str, kwargs: dict, dataset: str) -> bool:
    """Whether `model` builds on `dataset`'s default images (True for
    the others)."""
    shape = image_shape(config_lib.Config(dataset=dataset))
    if model_inputs(model) != IMAGES or shape is None:
        return True
    return _build_error(model, kwargs, shape) is None


def check_model_arguments(config: config_lib.Config) -> None:
    """Every --model_arg key is an argument the model accepts and none is
    one the launcher sets from the dataset."""
    for key in config.model_kwargs:
        if key in DATASET_ARGUMENTS and not (
            key != "num_classes" and "preset" in config.model_kwargs
        ):
            raise app.UsageError(
                f"--model_arg={key}=... is set by the launcher from "
                f"{DATASET_ARGUMENTS[key]}; drop it."
            )
    accepted = models.accepted_arguments(config.model)
    unknown = sorted(set(config.model_kwargs) - set(accepted))
    if unknown:
        raise app.UsageError(
            f"--model_arg: unknown key(s) {unknown} for model "
            f"{config.model!r}; accepted: {', '.join(accepted)}"
        )


def measure_every_steps(config: config_lib.Config) -> int | None:
    """--measure_every as a number of steps (None: "epoch" or "log")."""
    value = config.measure_every
    if value in ("epoch", "log"):
        return None
    try:
        steps = int(value)
    except ValueError:
        steps = 0
    if steps < 1:
        raise app.UsageError(
            f"--measure_every={value!r} must be 'epoch', 'log' or a "
            "positive number of steps."
        )
    return steps


def _check_counts(config: config_lib.Config) -> None:
    positive = {
        "steps_per_epoch": config.steps_per_epoch,
        "microbatch_size": config.microbatch_size,
        "image_size": config.image_size,
        "sequence_length": config.sequence_length,
        "vocabulary_size": config.vocabulary_size,
    }
    for name, value in positive.items():
        if value is not None and value < 1:
            raise app.UsageError(f"--{name}={value} must be >= 1.")
    for name in (
        "warmup_steps",
        "step_tracking_every",
        "step_tracking_hessian_every",
    ):
        if getattr(config, name) < 0:
            raise app.UsageError(
                f"--{name}={getattr(config, name)} must be >= 0."
            )


def step_microbatch_size(config: config_lib.Config) -> int | None:
    """M of the tracking train step's Gram statistics (None: not used)."""
    used = (
        config.step_tracking_every
        and config.step_tracking_gram
        and config.strategy != "multi_worker"
    )
    return (config.microbatch_size or 4) if used else None


def _check_step_microbatches(batch: int, m: int | None, what: str) -> None:
    if m is not None and (batch % m or batch // m < 2):
        raise app.UsageError(
            f"--step_tracking_gram splits each batch of {batch} examples "
            f"({what}) into micro-batches of --microbatch_size={m}: M must "
            f"divide the batch and leave at least two micro-batches; use a "
            f"divisor of {batch} up to {batch // 2}, or change "
            "--batch_size."
        )


def _check_schedule(config: config_lib.Config, total_steps: int) -> None:
    every = measure_every_steps(config)
    if config.tracking != "none" and every is not None and every > total_steps:
        raise app.UsageError(
            f"--measure_every={every} never fires in a run of {total_steps} "
            f"steps ({config.epochs} epochs); use at most {total_steps}, "
            "'epoch' or 'log', or train longer."
        )


def check_config(config: config_lib.Config) -> None:
    """All the checks that need neither the data nor a model."""
    check_names(config)
    check_model_arguments(config)
    _check_counts(config)
    measure_every_steps(config)
    _check_step_microbatches(
        config.batch_size, step_microbatch_size(config), "--batch_size"
    )
    if config.steps_per_epoch is not None:
        _check_schedule(config, config.steps_per_epoch * config.epochs)


_BUILDS: dict[tuple, str | None] = {}


def _build_error(model: str, kwargs: dict, shape: tuple) -> str | None:
    """None if `model` builds on `shape`, else its error on one line.

    A network that builds on smaller images builds on larger ones (more
    pixels never empty a feature map), so the smaller images of the
    datasets are tried first: a model that fits them is not built at full
    size (224x224 builds take seconds). Cached per model, arguments and
    shape.
    """
    smaller = {
        other
        for dataset in data_lib.available()
        if (other := image_shape(config_lib.Config(dataset=dataset)))
        and other[:-1] != shape[:-1]
        and all(a <= b for a, b in zip(other[:-1], shape[:-1]))
    }
    for other in sorted(smaller):
        if _built(model, kwargs, other) is None:
            return None
    return _built(model, kwargs, shape)


def _built(model: str, kwargs: dict, shape: tuple) -> str | None:
    key = (model, tuple(sorted((k, repr(v)) for k, v in kwargs.items())), shape)
    if key not in _BUILDS:
        try:
            models.get_model(model, num_classes=2, input_shape=shape, **kwargs)
            _BUILDS[key] = None
        except ValueError as err:
            _BUILDS[key] = _one_line(str(err))
    return _BUILDS[key]


def _one_line(message: str) -> str:
    """A (Keras) error message on one short line, without colour codes."""
    message = re.sub(r"\x1b\[[0-9;]*m", "", message)
    message = message.split("Arguments received by")[0]
    message = re.sub(
        r"Exception encountered when calling (\w+)\.call\(\)\.",
        r"\1:",
        message,
    )
    return " ".join(message.split())[:300]


def check_model_fits(
    config: config_lib.Config, shape: tuple[int, ...] | None = None
) -> None:
    """An image model builds on the dataset's images (`shape`, default
    `image_shape(config)`); else a usage error naming datasets that fit.
    """
    shape = tuple(shape or image_shape(config) or ())
    if model_inputs(config.model) != IMAGES or not shape:
        return
    kwargs = config.model_kwargs
    error = _build_error(config.model, kwargs, shape)
    if error is None:
        return
    fitting = [
        dataset
        for dataset in datasets_for(config.model)
        if dataset != config.dataset and _builds(config.model, kwargs, dataset)
    ]
    side = "x".join(str(d) for d in shape)
    raise app.UsageError(
        f"--model={config.model} cannot take the {side} images of "
        f"--dataset={config.dataset} ({error}); use a dataset such as "
        f"{_names(fitting)}, or a larger --image_size for digits and "
        "imagenet2012."
    )


def check_against_data(
    config: config_lib.Config,
    num_train: int,
    num_probe: int,
    replicas: int = 1,
) -> None:
    """The checks that need the loaded dataset's size (and the strategy's
    replica count)."""
    steps_per_epoch = config.steps_per_epoch or max(
        1, num_train // config.batch_size
    )
    # Every step takes a full batch (drop_remainder), also when
    # --steps_per_epoch cuts or spans passes over the data.
    if num_train < config.batch_size:
        raise app.UsageError(
            f"--batch_size={config.batch_size} is larger than the "
            f"{num_train} training examples of --dataset={config.dataset}; "
            f"use at most {num_train}."
        )
    _check_schedule(config, steps_per_epoch * config.epochs)
    if config.batch_size % replicas:
        raise app.UsageError(
            f"--batch_size={config.batch_size} does not split over the "
            f"{replicas} replicas of --strategy={config.strategy}; use a "
            f"multiple of {replicas}."
        )
    _check_step_microbatches(
        config.batch_size // replicas,
        step_microbatch_size(config),
        f"per replica, of {replicas}" if replicas > 1 else "--batch_size",
    )
    if config.tracking in ("paper", "full"):
        m = config.microbatch_size or 1
        if num_probe < 2 * m:
            need = 2 * m
            fraction = need / num_train
            fix = (
                f"--probe_fraction >= {fraction:.3g}"
                if fraction <= 1
                else f"--microbatch_size <= {num_train // 2}"
            )
            raise app.UsageError(
                f"--probe_fraction={config.probe_fraction} of the "
                f"{num_train} training examples gives a probe of "
                f"{num_probe}, too few for two micro-batches of "
                f"{m} (--microbatch_size); use {fix}."
            )
