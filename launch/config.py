"""The run configuration: one dataclass, built from flags or by hand."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

OPTIMIZERS = ("sgd", "momentum", "adam")
LR_SCHEDULES = ("constant", "step", "warmup")
PRECISIONS = ("float32", "mixed_bfloat16")
TRACKING = ("none", "economy", "paper", "full")
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
DEFAULT_IMAGE_SIZE = {"digits": 16}


@dataclasses.dataclass
class Config:
    """Everything a run needs; `train_and_evaluate(config, workdir)`.

    Attributes:
        model: a `models.available()` name; `model_kwargs` its arguments
            (num_classes and input shape come from the dataset).
        dataset: a `launch.data.available()` name ("digits" is offline).
        image_size: digits / imagenet2012 image side; None: the dataset's
            default (`DEFAULT_IMAGE_SIZE`: digits are upsampled to 16 so the
            standard SimpleCNN fits, ImageNet uses 224).
        sequence_length, vocabulary_size: text datasets (None: the
            dataset's default, `launch.data.TEXT_DEFAULTS`).
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
            loop, see `launch.loop`) or "tpu" (with `tpu` the address).
    """

    model: str = "simple_cnn"
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None
    sequence_length: int | None = None
    vocabulary_size: int | None = None
    augment: bool = False
    optimizer: str = "sgd"
    learning_rate: float = 0.05
    momentum: float = 0.9
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    batch_size: int = 128
    epochs: int = 10
    steps_per_epoch: int | None = None
    seed: int = 0
    precision: str = "float32"
    tracking: str = "paper"
    probe_fraction: float = 0.05
    microbatch_size: int | None = None
    k: int = 1
    measure_every: str = "epoch"
    step_tracking_every: int = 10
    step_tracking_gram: bool = False
    step_tracking_hessian_every: int = 0
    strategy: str = "default"
    tpu: str = ""
    jit_compile: bool = False
    verbose: int = 2

    def __post_init__(self):
        choices = {
            "optimizer": OPTIMIZERS,
            "lr_schedule": LR_SCHEDULES,
            "precision": PRECISIONS,
            "tracking": TRACKING,
            "strategy": STRATEGIES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"--{name}={getattr(self, name)!r} is not one of {allowed}."
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
