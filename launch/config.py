"""The run configuration: one dataclass, the only place a field is written.

Each `Config` field carries its flag help (and, for string fields with a
fixed set of values, its choices) in its metadata; `define_flags` makes the
absl flags from the fields and `from_flags` builds the `Config` back, so a
new field is one line here and nothing else:

* bool, int, float, str fields become `DEFINE_bool`, `DEFINE_integer`,
  `DEFINE_float`, `DEFINE_string` flags of the same name and default
  (`int | None` and `str | None` fields accept no value: default None);
* a str field with `choices` becomes a `DEFINE_enum`;
* a dict field with `multi_flag` becomes a repeatable key=value flag
  (`--model_arg=width=4` fills `model_kwargs`), values read as Python
  literals.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import typing
from typing import Any

from absl import app, flags

OPTIMIZERS = ("sgd", "momentum", "adam")
LR_SCHEDULES = ("constant", "step", "warmup")
PRECISIONS = ("float32", "mixed_bfloat16")
TRACKING = ("none", "economy", "paper", "full")
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
DEFAULT_IMAGE_SIZE = {"digits": 16}


def _field(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    choices: tuple[str, ...] | None = None,
    multi_flag: str | None = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A `Config` field with the help text (and choices) of its flag."""
    metadata = {"help": help, "choices": choices, "multi_flag": multi_flag}
    return dataclasses.field(
        default=default, default_factory=default_factory, metadata=metadata
    )


@dataclasses.dataclass
class Config:
    """Everything a run needs; `train_and_evaluate(config, workdir)`.

    Attributes:
        model: a `tf_breakeven.models.available()` name; `model_kwargs` its
            arguments (num_classes and input shape come from the dataset).
        dataset: a `tf_breakeven.launch.data.available()` name ("digits" is
            offline).
        image_size: digits / imagenet2012 image side; None: the dataset's
            default (`DEFAULT_IMAGE_SIZE`: digits are upsampled to 16 so the
            standard SimpleCNN fits, ImageNet uses 224).
        sequence_length, vocabulary_size: text datasets (None: the
            dataset's default, `tf_breakeven.launch.data.TEXT_DEFAULTS`).
        optimizer: "sgd", "momentum" (heavy ball, `momentum`) or "adam".
        lr_schedule: "constant"; "step" (divide by 10 at 50% and 75% of the
            steps, the confusion paper's schedule); "warmup" (linear from 0
            over `warmup_steps`, then constant).
        epochs, steps_per_epoch: length (steps None: the whole train set).
        precision: "float32" or "mixed_bfloat16".
        tracking: callback preset: "none", "economy", "paper" or "full";
            `probe_fraction`, `microbatch_size` (None: the preset's), `k`,
            `measure_every` ("epoch", "log", or an int n of steps) refine it.
        step_tracking_every: the tracking train step
            (`tf_breakeven.training`): gradient and update norms every n
            steps (0: plain Keras train step); with `step_tracking_gram` also
            the batch's Gram statistics (micro-batches of `microbatch_size`,
            default 4), and a power-iteration HVP every
            `step_tracking_hessian_every` steps. Not in the multi-worker
            loop.
        strategy: "default", "mirrored", "multi_worker" (custom training
            loop, see `tf_breakeven.launch.loop`) or "tpu" (with `tpu` the
            address).
    """

    model: str = _field(
        "simple_cnn", "Zoo model name (tf_breakeven.models.available())."
    )
    model_kwargs: dict = _field(
        default_factory=dict,
        help="Model argument as key=value (Python literal value), "
        "e.g. --model_arg=batch_norm=True --model_arg=width=4; repeatable.",
        multi_flag="model_arg",
    )
    dataset: str = _field("digits", "Dataset name (tf_breakeven.launch.data).")
    data_dir: str | None = _field(None, "tensorflow-datasets data directory.")
    image_size: int | None = _field(
        None,
        "Image side for digits (default 16) and imagenet2012 (default 224).",
    )
    sequence_length: int | None = _field(None, "Tokens per text example.")
    vocabulary_size: int | None = _field(None, "Text vocabulary size.")
    augment: bool = _field(False, "Data augmentation.")
    optimizer: str = _field("sgd", "Optimizer.", choices=OPTIMIZERS)
    learning_rate: float = _field(0.05, "Learning rate.")
    momentum: float = _field(0.9, "Momentum (--optimizer=momentum).")
    lr_schedule: str = _field(
        "constant",
        "constant, step (/10 at 50% and 75%) or warmup.",
        choices=LR_SCHEDULES,
    )
    warmup_steps: int = _field(0, "Warm-up steps.")
    batch_size: int = _field(128, "Global batch size.")
    epochs: int = _field(10, "Epochs.")
    steps_per_epoch: int | None = _field(
        None, "Steps per epoch (default: one pass over the training set)."
    )
    seed: int = _field(0, "Seed of data order, init, probes.")
    precision: str = _field("float32", "Compute precision.", choices=PRECISIONS)
    tracking: str = _field("paper", "Callback preset.", choices=TRACKING)
    probe_fraction: float = _field(
        0.05, "Probe set as a fraction of the training set."
    )
    microbatch_size: int | None = _field(None, "M for K and confusion.")
    k: int = _field(1, "Top Hessian eigenvalues to track.")
    measure_every: str = _field(
        "epoch", "'epoch', 'log' (log-spaced steps) or an int n of steps."
    )
    step_tracking_every: int = _field(
        10, "Tracking train step: norms every n steps (0: off)."
    )
    step_tracking_gram: bool = _field(
        False, "Tracking train step: batch Gram statistics."
    )
    step_tracking_hessian_every: int = _field(
        0,
        "Tracking train step: one power-iteration HVP every n steps (0: off).",
    )
    strategy: str = _field(
        "default", "tf.distribute strategy.", choices=STRATEGIES
    )
    tpu: str = _field("", "TPU address for --strategy=tpu.")
    jit_compile: bool = _field(False, "Compile with XLA.")
    verbose: int = _field(2, "Keras fit verbosity.")

    def __post_init__(self):
        for field in dataclasses.fields(self):
            allowed = field.metadata.get("choices")
            value = getattr(self, field.name)
            if allowed is not None and value not in allowed:
                raise ValueError(
                    f"--{field.name}={value!r} is not one of {allowed}."
                )
        for name in ("batch_size", "epochs", "k"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1.")
        if self.learning_rate <= 0:
            raise ValueError("--learning_rate must be > 0.")
        if not 0 < self.probe_fraction <= 1:
            raise ValueError("--probe_fraction must be in (0, 1].")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Config:
        return cls(**json.loads(text))

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


def _flag_type(annotation: Any) -> type:
    """bool, int, float, str or dict from a field's (optional) type."""
    arguments = [a for a in typing.get_args(annotation) if a is not type(None)]
    return arguments[0] if arguments else annotation


def _flag_name(field: dataclasses.Field) -> str:
    return field.metadata.get("multi_flag") or field.name


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """Defines one absl flag per `Config` field (see the module docstring).

    Returns:
        The flag names, for `flags.declare_key_flag` in the launcher whose
        `--help` should list them.
    """
    names = []
    hints = typing.get_type_hints(Config)
    defaults = Config()
    for field in dataclasses.fields(Config):
        kind = _flag_type(hints[field.name])
        default = getattr(defaults, field.name)
        help_text = field.metadata["help"]
        common = {"flag_values": flag_values}
        if field.metadata.get("multi_flag"):
            flags.DEFINE_multi_string(
                _flag_name(field), [], help_text, **common
            )
        elif field.metadata.get("choices"):
            flags.DEFINE_enum(
                field.name,
                default,
                field.metadata["choices"],
                help_text,
                **common,
            )
        else:
            define = {
                bool: flags.DEFINE_bool,
                int: flags.DEFINE_integer,
                float: flags.DEFINE_float,
                str: flags.DEFINE_string,
            }[kind]
            define(field.name, default, help_text, **common)
        names.append(_flag_name(field))
    return names


def parse_key_values(flag: str, pairs: list[str]) -> dict:
    """{key: Python literal (or the raw string)} from key=value strings."""
    kwargs = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise app.UsageError(f"--{flag}={pair!r} is not key=value.")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return kwargs


def from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> Config:
    """The `Config` of the flags `define_flags` made (after parsing)."""
    values = {}
    for field in dataclasses.fields(Config):
        name = _flag_name(field)
        value = flag_values[name].value
        if field.metadata.get("multi_flag"):
            value = parse_key_values(name, value)
        values[field.name] = value
    return Config(**values)
