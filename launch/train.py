r"""Train a zoo model with the break-even / confusion tracking on.

    python -m launch.train                      # offline default: digits
    python -m launch.train --model=resnet32 --dataset=cifar10 \
        --learning_rate=0.1 --batch_size=128 --epochs=200 --tracking=paper \
        --workdir=/tmp/resnet32_lr0.1

Flags are defined here and only here; they become a `launch.config.Config`
and `launch.experiment.train_and_evaluate(config, workdir)` does the rest.
Run again with the same --workdir to resume a killed run.
"""

from __future__ import annotations

import ast
import os
import sys

from absl import app, flags, logging

from launch import config as config_lib

FLAGS = flags.FLAGS
_D = config_lib.Config()

flags.DEFINE_string("workdir", "workdir/default", "Output directory.")
flags.DEFINE_string("model", _D.model, "Zoo model name (models.available()).")
flags.DEFINE_multi_string(
    "model_arg",
    [],
    "Model argument as key=value (Python literal value), "
    "e.g. --model_arg=batch_norm=True --model_arg=width=4; repeatable.",
)
flags.DEFINE_string("dataset", _D.dataset, "Dataset name (launch.data).")
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory.")
flags.DEFINE_integer(
    "image_size",
    None,
    "Image side for digits (default 16) and imagenet2012 (default 224).",
)
flags.DEFINE_integer("sequence_length", None, "Tokens per text example.")
flags.DEFINE_integer("vocabulary_size", None, "Text vocabulary size.")
flags.DEFINE_bool("augment", _D.augment, "Data augmentation.")
flags.DEFINE_enum(
    "optimizer", _D.optimizer, config_lib.OPTIMIZERS, "Optimizer."
)
flags.DEFINE_float("learning_rate", _D.learning_rate, "Learning rate.")
flags.DEFINE_float("momentum", _D.momentum, "Momentum (--optimizer=momentum).")
flags.DEFINE_enum(
    "lr_schedule",
    _D.lr_schedule,
    config_lib.LR_SCHEDULES,
    "constant, step (/10 at 50% and 75%) or warmup.",
)
flags.DEFINE_integer("warmup_steps", _D.warmup_steps, "Warm-up steps.")
flags.DEFINE_integer("batch_size", _D.batch_size, "Global batch size.")
flags.DEFINE_integer("epochs", _D.epochs, "Epochs.")
flags.DEFINE_integer(
    "steps_per_epoch",
    None,
    "Steps per epoch (default: one pass over the training set).",
)
flags.DEFINE_integer("seed", _D.seed, "Seed of data order, init, probes.")
flags.DEFINE_enum(
    "precision", _D.precision, config_lib.PRECISIONS, "Compute precision."
)
flags.DEFINE_enum(
    "tracking", _D.tracking, config_lib.TRACKING, "Callback preset."
)
flags.DEFINE_float(
    "probe_fraction",
    _D.probe_fraction,
    "Probe set as a fraction of the training set.",
)
flags.DEFINE_integer("microbatch_size", None, "M for K and confusion.")
flags.DEFINE_integer("k", _D.k, "Top Hessian eigenvalues to track.")
flags.DEFINE_string(
    "measure_every",
    _D.measure_every,
    "'epoch', 'log' (log-spaced steps) or an int n of steps.",
)
flags.DEFINE_enum(
    "strategy", _D.strategy, config_lib.STRATEGIES, "tf.distribute strategy."
)
flags.DEFINE_integer(
    "step_tracking_every",
    _D.step_tracking_every,
    "Tracking train step: norms every n steps (0: off).",
)
flags.DEFINE_bool(
    "step_tracking_gram",
    _D.step_tracking_gram,
    "Tracking train step: batch Gram statistics.",
)
flags.DEFINE_integer(
    "step_tracking_hessian_every",
    _D.step_tracking_hessian_every,
    "Tracking train step: one power-iteration HVP every n steps (0: off).",
)
flags.DEFINE_string("tpu", "", "TPU address for --strategy=tpu.")
flags.DEFINE_bool("jit_compile", _D.jit_compile, "Compile with XLA.")
flags.DEFINE_integer("verbose", _D.verbose, "Keras fit verbosity.")


def _model_kwargs(pairs: list[str]) -> dict:
    kwargs = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise app.UsageError(f"--model_arg={pair!r} is not key=value.")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return kwargs


def config_from_flags() -> config_lib.Config:
    return config_lib.Config(
        model=FLAGS.model,
        model_kwargs=_model_kwargs(FLAGS.model_arg),
        dataset=FLAGS.dataset,
        data_dir=FLAGS.data_dir,
        image_size=FLAGS.image_size,
        sequence_length=FLAGS.sequence_length,
        vocabulary_size=FLAGS.vocabulary_size,
        augment=FLAGS.augment,
        optimizer=FLAGS.optimizer,
        learning_rate=FLAGS.learning_rate,
        momentum=FLAGS.momentum,
        lr_schedule=FLAGS.lr_schedule,
        warmup_steps=FLAGS.warmup_steps,
        batch_size=FLAGS.batch_size,
        epochs=FLAGS.epochs,
        steps_per_epoch=FLAGS.steps_per_epoch,
        seed=FLAGS.seed,
        precision=FLAGS.precision,
        tracking=FLAGS.tracking,
        probe_fraction=FLAGS.probe_fraction,
        microbatch_size=FLAGS.microbatch_size,
        k=FLAGS.k,
        measure_every=FLAGS.measure_every,
        step_tracking_every=FLAGS.step_tracking_every,
        step_tracking_gram=FLAGS.step_tracking_gram,
        step_tracking_hessian_every=FLAGS.step_tracking_hessian_every,
        strategy=FLAGS.strategy,
        tpu=FLAGS.tpu,
        jit_compile=FLAGS.jit_compile,
        verbose=FLAGS.verbose,
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    from launch.experiment import train_and_evaluate

    config = config_from_flags()
    summary = train_and_evaluate(config, FLAGS.workdir)
    if summary:
        workdir = os.path.abspath(FLAGS.workdir)
        lines = [
            f"workdir:     {workdir}",
            f"records:     {os.path.join(workdir, 'records.jsonl')}",
            "tensorboard: tensorboard --logdir "
            + os.path.join(workdir, "tensorboard"),
            f"checkpoint:  {os.path.join(workdir, 'model.keras')}",
            "figures:     " + ", ".join(summary["figures"]),
            f"break-even step: {summary['breakeven_step']}",
        ]
        sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    app.run(main)
