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
    """The `Config` of the parsed flags."""
    return config_lib.from_flags(FLAGS)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    from tf_breakeven.launch.experiment import train_and_evaluate

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


def run() -> None:
    """Console script `tf-breakeven-train` (and `python -m`)."""
    cli.run(main, __name__)


if __name__ == "__main__":
    run()
