"""`train_and_evaluate(config, workdir)`: one run, end to end.

Builds the dataset, the zoo model and the optimizer under the chosen
strategy, adds the tracking callbacks, trains (Keras `fit`, or the custom
loop of `launch.loop` for multi-worker), and leaves in the workdir:

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
import json
import math
import os
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from absl import logging

import models
import tf_breakeven as tfb
from launch import config as config_lib
from launch import data as data_lib
from launch import distribute_utils
from launch.config import Config

SUMMARY = "summary.json"


def summary_path(workdir: str) -> str:
    return os.path.join(workdir, SUMMARY)


def is_done(workdir: str) -> bool:
    """Whether a run finished in `workdir` (its summary exists)."""
    return os.path.exists(summary_path(workdir))


def _model_arguments(config: Config, spec: Any) -> dict:
    arguments = {"num_classes": spec.num_classes}
    if getattr(spec, "input_shape", None) is not None:
        arguments["input_shape"] = tuple(spec.input_shape)
    else:
        arguments["vocabulary_size"] = spec.vocabulary_size
        key = (
            "max_sequence_length"
            if config.model == "bert"
            else ("sequence_length")
        )
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


def tracking_callbacks(
    config: Config, spec: Any, recorder: tfb.Recorder | None
) -> list[keras.callbacks.Callback]:
    """The callbacks of `config.tracking`, on the dataset's probe set."""
    if config.tracking == "none":
        return []
    probe = spec.probe
    size = int(sum(int(tf.shape(b[1])[0]) for b in probe))
    if config.measure_every == "epoch":
        schedule = "epoch"
    elif config.measure_every == "log":
        schedule = tfb.schedules.LogSpaced(per_decade=3)
    else:
        schedule = int(config.measure_every)
    common = {
        "recorder": recorder,
        "seed": config.seed,
        "jit_compile": config.jit_compile,
    }
    sgd = {}
    if config.optimizer != "adam":
        sgd = {
            "criterion": "sgd",
            "batch_size": config.batch_size,
            "dataset_size": spec.num_train,
        }
    if config.tracking == "economy":
        small = probe.unbatch().take(tfb.presets.ECONOMY_PROBE_SIZE)
        kwargs = {**sgd, **common}
        if config.measure_every != "epoch":
            kwargs["schedule"] = schedule
        return [tfb.presets.economy_break_even(small.batch(128), **kwargs)]
    micro = config.microbatch_size or min(128, max(1, size // 8))
    usable = size - size % micro
    if usable < 2 * micro:
        raise ValueError(
            f"The probe set has {size} examples: too few for micro-batches "
            f"of {micro}; raise --probe_fraction or lower --microbatch_size."
        )
    if usable != size:
        probe = probe.unbatch().take(usable).batch(128).cache()
    gram = {
        "microbatch_size": micro,
        "schedule": schedule,
        "recorder": recorder,
        "jit_compile": config.jit_compile,
    }
    callbacks = [
        tfb.BreakEven(
            probe,
            k=config.k,
            num_iterations=20,
            schedule=schedule,
            **sgd,
            **common,
        ),
        tfb.GradientCovariance(probe, **gram),
        tfb.GradientConfusion(probe, **gram),
    ]
    if config.tracking == "full":
        callbacks.append(
            tfb.HessianSpectrum(
                probe,
                k=max(5, config.k),
                trace=True,
                smallest=True,
                density=True,
                schedule=schedule,
                **common,
            )
        )
    return callbacks


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


def train_and_evaluate(config: Config, workdir: str) -> dict:
    """Runs one configuration; resumes if `workdir` holds a backup.

    Returns:
        The summary written to `workdir/summary.json`.
    """
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
    spec = data_lib.load(
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
    )
    steps_per_epoch = config.steps_per_epoch or max(
        1, spec.num_train // config.batch_size
    )
    backup_dir = os.path.join(outdir, "backup")
    total_steps = steps_per_epoch * config.epochs
    with _precision(config.precision), strategy.scope():
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
    recorder = (
        tfb.Recorder(
            os.path.join(workdir, "records.jsonl"),
            os.path.join(workdir, "tensorboard", "probes"),
        )
        if chief
        else None
    )
    callbacks = tracking_callbacks(config, spec, recorder)
    if config.strategy == "multi_worker":
        from launch import loop

        history = loop.fit(
            model,
            spec,
            strategy,
            config,
            callbacks,
            backup_dir=backup_dir,
            steps_per_epoch=steps_per_epoch,
        )
    else:
        callbacks += [
            keras.callbacks.BackupAndRestore(
                backup_dir, double_checkpoint=True
            ),
            keras.callbacks.CSVLogger(
                os.path.join(outdir, "history.csv"), append=True
            ),
            keras.callbacks.TensorBoard(
                os.path.join(outdir, "tensorboard"), write_graph=False
            ),
        ]
        # Epoch-seeded batches, started at the epoch BackupAndRestore will
        # resume from, so a resumed run sees the batches it would have.
        start = min(_backup_epoch(backup_dir), config.epochs - 1)
        train = spec.train_epochs(start, config.epochs)
        history = model.fit(
            train,
            epochs=config.epochs,
            steps_per_epoch=steps_per_epoch,
            validation_data=spec.test,
            callbacks=callbacks,
            verbose=config.verbose,
        ).history
    if not chief:
        return {}
    model.save(os.path.join(workdir, "model.keras"))
    records = tfb.read_records(os.path.join(workdir, "records.jsonl"))
    figures = tfb.plotting.save_figures(
        records, os.path.join(workdir, "figures")
    )
    breakeven = next(
        (c.breakeven_step for c in callbacks if isinstance(c, tfb.BreakEven)),
        None,
    )
    last = {k: _finite(float(v[-1])) for k, v in history.items() if v}
    summary = {
        "config": json.loads(config.to_json()),
        "final": last,
        "breakeven_step": breakeven,
        "num_records": len(records),
        "figures": figures,
        "max": {
            key: _finite(float(np.nanmax(values)))
            for key in (
                "hessian/lambda_1",
                "grad_cov/lambda_1",
                "grad_cov/trace_over_lambda_1",
            )
            if (values := [r[key] for r in records if key in r])
            and not np.all(np.isnan(values))
        },
        "min_cos": _finite(
            min(
                (
                    r["confusion/cos_min"]
                    for r in records
                    if "confusion/cos_min" in r
                ),
                default=math.nan,
            )
        ),
    }
    with open(summary_path(workdir), "w") as f:
        json.dump(summary, f, indent=2)
    logging.info("Run done: %s", workdir)
    return summary
