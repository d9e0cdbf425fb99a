"""`train_and_evaluate(config, workdir)`: one run, end to end.

Builds the dataset, the zoo model and the optimizer under the chosen
strategy, adds the tracking callbacks, trains (Keras `fit`, or the custom
loop of `tf_breakeven.launch.loop` for multi-worker), and leaves in the workdir:

    config.json        the configuration
    records.jsonl      one line per measurement (chief only)
    tensorboard/       scalars and histograms (ours and Keras')
    history.csv        per-epoch logs (CSVLogger)
    backup/            BackupAndRestore state: a killed run resumes here
    model.keras        the final model
    figures/*.png      trajectories (sharpness, conditioning, cosines)
    summary.json       final metrics, break-even step, paths; marks done
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from absl import app, logging

import tf_breakeven as tfb
from tf_breakeven import models
from tf_breakeven.launch import config as config_lib
from tf_breakeven.launch import data as data_lib
from tf_breakeven.launch import distribute_utils, validation
from tf_breakeven.launch.config import Config

SUMMARY = "summary.json"


def summary_path(workdir: str) -> str:
    return os.path.join(workdir, SUMMARY)


def is_done(workdir: str) -> bool:
    """Whether a run finished in `workdir` (its summary exists)."""
    return os.path.exists(summary_path(workdir))


def _model_arguments(config: Config, spec: Any) -> dict:
    """The zoo model's arguments: the dataset's sizes, then --model_arg.

    With a `preset` (BERT) the preset fixes the architecture: only the
    number of classes comes from the dataset.
    """
    arguments = {"num_classes": spec.num_classes}
    preset = "preset" in config.model_kwargs
    if getattr(spec, "input_shape", None) is not None:
        arguments["input_shape"] = tuple(spec.input_shape)
    elif not preset:
        arguments["vocabulary_size"] = spec.vocabulary_size
        key = validation.sequence_argument(config.model)
        arguments[key] = spec.sequence_length
    arguments.update(config.model_kwargs)
    return arguments


def make_learning_rate(config: Config, total_steps: int):
    """The learning rate or schedule of `config.lr_schedule`."""
    lr = config.learning_rate
    if config.lr_schedule == "constant":
        return lr
    if config.lr_schedule == "step":
        boundaries = [max(1, total_steps // 2), max(2, total_steps * 3 // 4)]
        return keras.optimizers.schedules.PiecewiseConstantDecay(
            boundaries, [lr, lr / 10, lr / 100]
        )
    return _Warmup(lr, max(1, config.warmup_steps))


class _Warmup(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to `learning_rate` over `steps`, then flat."""

    def __init__(self, learning_rate: float, steps: int):
        self.learning_rate = learning_rate
        self.steps = steps

    def __call__(self, step):
        fraction = keras.ops.minimum(
            1.0, keras.ops.cast(step + 1, "float32") / self.steps
        )
        return self.learning_rate * fraction

    def get_config(self):
        return {"learning_rate": self.learning_rate, "steps": self.steps}


def make_optimizer(config: Config, total_steps: int) -> keras.Optimizer:
    learning_rate = make_learning_rate(config, total_steps)
    if config.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate)
    momentum = config.momentum if config.optimizer == "momentum" else 0.0
    return keras.optimizers.SGD(learning_rate, momentum=momentum)


def measurement_schedule(config: Config) -> Any:
    """The `schedule=` of the tracking callbacks for `config.measure_every`.

    None keeps the preset's own: "epoch" (the flag's default) leaves
    "economy" at its log-spaced steps and measures "paper" and "full" each
    epoch.
    """
    if config.measure_every == "epoch":
        return None if config.tracking == "economy" else "epoch"
    if config.measure_every == "log":
        return tfb.schedules.LogSpaced(per_decade=3)
    return int(config.measure_every)


def tracking_callbacks(
    config: Config, spec: Any, recorder: tfb.Recorder | None
) -> list[keras.callbacks.Callback]:
    """The callbacks of `config.tracking`, on the dataset's probe set.

    `tfb.preset` composes them; the launcher gives it the probe drawn by
    `tf_breakeven.launch.data` and its flags.
    """
    if config.tracking == "none":
        return []
    sgd = config.optimizer != "adam"  # the SGD criterion of eq. 1
    return tfb.preset(
        config.tracking,
        probe=spec.probe,
        recorder=recorder,
        seed=config.seed,
        batch_size=config.batch_size if sgd else None,
        dataset_size=spec.num_train if sgd else None,
        k=config.k,
        microbatch_size=config.microbatch_size,
        schedule=measurement_schedule(config),
        jit_compile=config.jit_compile,
    )


@contextlib.contextmanager
def _precision(name: str):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(
        "mixed_bfloat16" if name == "mixed_bfloat16" else "float32"
    )
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _backup_epoch(backup_dir: str) -> int:
    """The epoch `BackupAndRestore` resumes from (0 without a backup)."""
    for name in ("training_metadata.json", "training_metadata.json.bkp"):
        path = os.path.join(backup_dir, name)
        try:
            with open(path) as f:
                return int(json.load(f)["epoch"])
        except (OSError, ValueError, KeyError):
            continue
    return 0


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclasses.dataclass
class Run:
    """What `build` makes for one configuration, and where it writes.

    Attributes:
        strategy: the `tf.distribute` strategy everything is built under.
        chief: whether this process writes records, model and summary.
        outdir: this process's directory (the workdir on the chief, a
            scratch directory on the other workers).
        spec: the loaded `tf_breakeven.launch.data.DataSpec`.
        model: the compiled model.
        steps_per_epoch: training steps per epoch.
        recorder: the records' `Recorder` (None off the chief).
    """

    strategy: tf.distribute.Strategy
    chief: bool
    outdir: str
    spec: Any
    model: keras.Model
    steps_per_epoch: int
    recorder: tfb.Recorder | None

    @property
    def backup_dir(self) -> str:
        return os.path.join(self.outdir, "backup")


def load_data(config: Config) -> Any:
    """The `DataSpec` of `config.dataset` with the run's sizes and seed."""
    return data_lib.load(
        config.dataset,
        batch_size=config.batch_size,
        seed=config.seed,
        data_dir=config.data_dir,
        image_size=config.image_size
        or config_lib.DEFAULT_IMAGE_SIZE.get(config.dataset),
        augment=config.augment,
        probe_fraction=config.probe_fraction,
        sequence_length=config.sequence_length,
        vocabulary_size=config.vocabulary_size,
        # A BERT preset's tokenizer makes the ids its embedding knows.
        preset=config.model_kwargs.get("preset"),
    )


def build_model(config: Config, spec: Any, total_steps: int) -> keras.Model:
    """The zoo model (tracked if asked), compiled.

    Call it under the strategy's scope and the run's dtype policy.
    """
    model = models.get_model(config.model, **_model_arguments(config, spec))
    if config.step_tracking_every and config.strategy != "multi_worker":
        model = tfb.track(
            model,
            every=config.step_tracking_every,
            gram=config.step_tracking_gram,
            microbatch_size=config.microbatch_size or 4,
            hessian_every=config.step_tracking_hessian_every,
        )
    model.compile(
        optimizer=make_optimizer(config, total_steps),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=config.jit_compile,
    )
    return model


def build(config: Config, workdir: str) -> Run:
    """Seeds, strategy, output directory and config.json, data, model.

    Checks the configuration first (`tf_breakeven.launch.validation`: an
    impossible one raises `absl.app.UsageError` before any data is read),
    and against the data once it is loaded, before the model is built.
    """
    validation.check_config(config)
    os.makedirs(workdir, exist_ok=True)
    keras.utils.set_random_seed(config.seed)
    strategy = distribute_utils.get_strategy(config.strategy, config.tpu)
    chief = distribute_utils.is_chief(strategy)
    # Non-chief workers write their (identical) checkpoints to a scratch
    # directory, as tf.distribute expects, and no records.
    outdir = (
        workdir
        if chief
        else os.path.join(
            workdir, f"worker_scratch_{strategy.cluster_resolver.task_id}"
        )
    )
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, "config.json"), "w") as f:
        f.write(config.to_json())
    spec = load_data(config)
    validation.check_against_data(
        config, spec.num_train, spec.num_probe, strategy.num_replicas_in_sync
    )
    steps_per_epoch = config.steps_per_epoch or max(
        1, spec.num_train // config.batch_size
    )
    with _precision(config.precision), strategy.scope():
        try:
            model = build_model(config, spec, steps_per_epoch * config.epochs)
        except ValueError:
            # A model too deep for the images: say which datasets fit.
            validation.check_model_fits(config, spec.input_shape)
            raise
    recorder = (
        tfb.Recorder(
            os.path.join(workdir, "records.jsonl"),
            os.path.join(workdir, "tensorboard", "probes"),
        )
        if chief
        else None
    )
    return Run(strategy, chief, outdir, spec, model, steps_per_epoch, recorder)


class SeedStateBackup(keras.callbacks.Callback):
    """Backs up the model's seed-generator states with each epoch's backup.

    `BackupAndRestore` saves weights, not the states of the dropout seed
    generators, so a resumed run would draw other masks than the
    uninterrupted one. This saves them at every epoch end (after the
    backup, tagged with its epoch) and restores them when the backup it
    resumes from is of the same epoch (docs/pitfalls.md#P27).
    """

    def __init__(self, backup_dir: str):
        super().__init__()
        self.backup_dir = backup_dir
        self.path = os.path.join(backup_dir, "seed_states.npz")

    def _states(self) -> list:
        weights = {id(v) for v in self.model.weights}
        return [
            v
            for v in self.model.non_trainable_variables
            if id(v) not in weights
        ]

    def on_train_begin(self, logs=None):
        epoch = _backup_epoch(self.backup_dir)
        if not epoch or not os.path.exists(self.path):
            return
        with np.load(self.path) as saved:
            values = [saved[f"state_{i}"] for i in range(len(saved) - 1)]
            if int(saved["epoch"]) != epoch:
                return  # killed between the two backups: masks will differ
        states = self._states()
        if len(values) == len(states):
            for variable, value in zip(states, values):
                variable.assign(value)

    def on_epoch_end(self, epoch, logs=None):
        values = {f"state_{i}": v.numpy() for i, v in enumerate(self._states())}
        os.makedirs(self.backup_dir, exist_ok=True)
        temporary = self.path + ".tmp.npz"
        np.savez(temporary, epoch=epoch + 1, **values)
        os.replace(temporary, self.path)


def keras_callbacks(run: Run) -> list[keras.callbacks.Callback]:
    """Backup (resume: weights, then seed states), CSV history and
    TensorBoard of a Keras `fit` run."""
    return [
        keras.callbacks.BackupAndRestore(
            run.backup_dir, double_checkpoint=True
        ),
        SeedStateBackup(run.backup_dir),
        keras.callbacks.CSVLogger(
            os.path.join(run.outdir, "history.csv"), append=True
        ),
        keras.callbacks.TensorBoard(
            os.path.join(run.outdir, "tensorboard"), write_graph=False
        ),
    ]


def fit(
    run: Run, config: Config, callbacks: list[keras.callbacks.Callback]
) -> dict:
    """Trains; returns the History dict.

    Keras `fit`, after our callbacks (appended to `callbacks`) the backup,
    CSV and TensorBoard ones; under "multi_worker" the custom loop of
    `tf_breakeven.launch.loop`, which checkpoints by itself.
    """
    if config.strategy == "multi_worker":
        from tf_breakeven.launch import loop

        return loop.fit(
            run.model,
            run.spec,
            run.strategy,
            config,
            callbacks,
            backup_dir=run.backup_dir,
            steps_per_epoch=run.steps_per_epoch,
        )
    callbacks += keras_callbacks(run)
    # Epoch-seeded batches, started at the step of the epoch
    # BackupAndRestore will resume from, so a resumed run sees the batches
    # it would have.
    start = min(_backup_epoch(run.backup_dir), config.epochs - 1)
    train = run.spec.train_epochs.steps(
        start * run.steps_per_epoch, config.epochs * run.steps_per_epoch
    )
    return run.model.fit(
        train,
        epochs=config.epochs,
        steps_per_epoch=run.steps_per_epoch,
        validation_data=run.spec.test,
        callbacks=callbacks,
        verbose=config.verbose,
    ).history


def _maxima(records: list[dict]) -> dict:
    return {
        key: _finite(float(np.nanmax(values)))
        for key in (
            "hessian/lambda_1",
            "grad_cov/lambda_1",
            "grad_cov/trace_over_lambda_1",
        )
        if (values := [r[key] for r in records if key in r])
        and not np.all(np.isnan(values))
    }


def write_summary(
    config: Config,
    workdir: str,
    model: keras.Model,
    history: dict,
    callbacks: list[keras.callbacks.Callback],
) -> dict:
    """Saves model and figures, writes summary.json (marks the run done)."""
    model.save(os.path.join(workdir, "model.keras"))
    records = tfb.read_records(os.path.join(workdir, "records.jsonl"))
    figures = tfb.plotting.save_figures(
        records, os.path.join(workdir, "figures")
    )
    breakeven = next(
        (c.breakeven_step for c in callbacks if isinstance(c, tfb.BreakEven)),
        None,
    )
    cosines = [
        r["confusion/cos_min"] for r in records if "confusion/cos_min" in r
    ]
    summary = {
        "config": json.loads(config.to_json()),
        "final": {k: _finite(float(v[-1])) for k, v in history.items() if v},
        "breakeven_step": breakeven,
        "total_steps": int(model.optimizer.iterations.numpy()),
        "num_records": len(records),
        "figures": figures,
        "max": _maxima(records),
        "min_cos": _finite(min(cosines, default=math.nan)),
    }
    with open(summary_path(workdir), "w") as f:
        json.dump(summary, f, indent=2)
    logging.info("Run done: %s", workdir)
    return summary


def prepare(
    config: Config, workdir: str
) -> tuple[Run, list[keras.callbacks.Callback]]:
    """`build` and the tracking callbacks: everything before training.

    A `ValueError` from here is a configuration the run cannot take (the
    launcher shows it as a usage error); errors while training are not.
    """
    run = build(config, workdir)
    return run, tracking_callbacks(config, run.spec, run.recorder)


def train_and_evaluate(config: Config, workdir: str) -> dict:
    """Runs one configuration; resumes if `workdir` holds a backup.

    Returns:
        The summary written to `workdir/summary.json` ({} off the chief).
    """
    run, callbacks = prepare(config, workdir)
    return finish(run, config, callbacks, workdir)


def finish(
    run: Run,
    config: Config,
    callbacks: list[keras.callbacks.Callback],
    workdir: str,
) -> dict:
    """Trains a `prepare`d run and writes its summary ({} off the chief)."""
    history = fit(run, config, callbacks)
    if not run.chief:
        return {}
    return write_summary(config, workdir, run.model, history, callbacks)


def shard(points: list, index: int, count: int) -> list:
    """Every `count`-th of `points` from `index`: this shard's part."""
    if count < 1 or not 0 <= index < count:
        raise app.UsageError(
            f"--shard_index={index} must be in [0, --num_shards={count})."
        )
    return points[index::count]


def run_one(
    workdir: str,
    config: Config,
    extra_callbacks: Callable[[Run, Config], list] | None = None,
) -> None:
    """Prepares and trains one run (resuming from its backup), with the
    callbacks `extra_callbacks(run, config)` after the preset's; then
    clears the Keras session for the next run.

    Raises:
        absl.app.UsageError: a configuration the run cannot take (see
            `tf_breakeven.launch.train.main`).
    """
    try:
        run, callbacks = prepare(config, workdir)
    except ValueError as err:
        raise app.UsageError(str(err)) from None
    if extra_callbacks is not None:
        callbacks += extra_callbacks(run, config)
    finish(run, config, callbacks, workdir)
    keras.backend.clear_session()


def run_all(runs: list[tuple[str, Config]]) -> None:
    """Runs every `(workdir, config)` in turn: finished runs (with a
    summary) are skipped, unfinished ones resume from their backup."""
    for workdir, config in runs:
        if is_done(workdir):
            logging.info("Skipping finished run %s", workdir)
            continue
        logging.info("Running %s", workdir)
        run_one(workdir, config)
