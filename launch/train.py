r"""Train a zoo model with the break-even / confusion tracking on.

    python -m tf_breakeven.launch.train        # offline default: digits
    tf-breakeven-train                         # the same, console script
    python -m tf_breakeven.launch.train --model=resnet32 --dataset=cifar10 \
        --learning_rate=0.1 --batch_size=128 --epochs=200 --tracking=paper \
        --workdir=/tmp/resnet32_lr0.1

The flags are made from the fields of `tf_breakeven.launch.config.Config`
(plus --workdir); `tf_breakeven.launch.experiment.train_and_evaluate(config,
workdir)` does the rest. Installed as the console script
`tf-breakeven-train`.
Run again with the same --workdir to resume a killed run.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from tf_breakeven.launch import cli
from tf_breakeven.launch import config as config_lib

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", "workdir/default", "Output directory.")
for _name in config_lib.define_flags(FLAGS):
    flags.declare_key_flag(_name)  # listed by --help


def config_from_flags() -> config_lib.Config:
    """The checked `Config` of the parsed flags.

    Raises:
        app.UsageError: flag values no run can take
            (`tf_breakeven.launch.validation.check_config`).
    """
    from tf_breakeven.launch import validation

    try:
        config = config_lib.from_flags(FLAGS)
    except ValueError as err:
        raise app.UsageError(str(err)) from None
    validation.check_config(config)
    return config


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    from tf_breakeven.launch import experiment

    config = config_from_flags()
    try:
        # A ValueError before training is a configuration the run cannot
        # take (a dataset not on disk, a model too deep for the images, no
        # TPU): shown as a usage error, without a traceback. Errors while
        # training keep theirs.
        run, callbacks = experiment.prepare(config, FLAGS.workdir)
    except ValueError as err:
        raise app.UsageError(str(err)) from None
    summary = experiment.finish(run, config, callbacks, FLAGS.workdir)
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


def run() -> None:
    """Console script `tf-breakeven-train` (and `python -m`)."""
    cli.run(main, __name__)


if __name__ == "__main__":
    run()
