r"""Sweep the papers' grids: one workdir per configuration.

    # break-even: learning rate x batch size
    python -m tf_breakeven.launch.sweep --grid=breakeven \
        --learning_rates=0.01,0.1 --batch_sizes=32,128 --model=simple_cnn \
        --dataset=cifar10 --epochs=20 --workdir=/tmp/sweep_be
    # confusion: width x depth, with BN / skip switches
    python -m tf_breakeven.launch.sweep --grid=confusion --model=wide_resnet \
        --widths=1,2,4 --depths=10,16 --batch_norms=False --skips=False \
        --workdir=/tmp/sweep_conf

Finished runs (with a summary.json) are skipped, unfinished ones resume.
`--shard_index/--num_shards` take every num_shards-th configuration, so any
scheduler can spread the grid over machines. All flags of
`tf_breakeven.launch.train` set the base configuration. Installed as the
console script `tf-breakeven-sweep`.
"""

from __future__ import annotations

import ast
import itertools
import os

from absl import app, flags

from tf_breakeven.launch import cli

# Defines --workdir and the flags of every `Config` field (the base run).
from tf_breakeven.launch import train as train_flags

FLAGS = flags.FLAGS

flags.DEFINE_enum(
    "grid", "breakeven", ["breakeven", "confusion"], "Which paper's grid."
)
flags.DEFINE_list("learning_rates", ["0.01", "0.1"], "breakeven grid: eta.")
flags.DEFINE_list("batch_sizes", ["32", "128"], "breakeven grid: S.")
flags.DEFINE_list("widths", ["1", "2"], "confusion grid: width.")
flags.DEFINE_list("depths", ["10", "16"], "confusion grid: depth.")
flags.DEFINE_list("batch_norms", ["False"], "confusion grid: batch_norm.")
flags.DEFINE_list("skips", ["False"], "confusion grid: skip_connections.")
flags.DEFINE_integer("shard_index", 0, "This shard's index.")
flags.DEFINE_integer("num_shards", 1, "Number of shards.")


def _values(strings: list[str]) -> list:
    return [ast.literal_eval(s) for s in strings]


def grid_points() -> list[tuple[str, dict]]:
    """(name, overrides) for every point of the chosen grid, in order."""
    points = []
    if FLAGS.grid == "breakeven":
        for lr, batch in itertools.product(
            _values(FLAGS.learning_rates), _values(FLAGS.batch_sizes)
        ):
            points.append(
                (
                    f"lr{lr}_bs{batch}",
                    {"learning_rate": float(lr), "batch_size": int(batch)},
                )
            )
    else:
        for width, depth, bn, skip in itertools.product(
            _values(FLAGS.widths),
            _values(FLAGS.depths),
            _values(FLAGS.batch_norms),
            _values(FLAGS.skips),
        ):
            points.append(
                (
                    f"width{width}_depth{depth}_bn{bn}_skip{skip}",
                    {
                        "model_kwargs": {
                            "width": width,
                            "depth": depth,
                            "batch_norm": bn,
                            "skip_connections": skip,
                        }
                    },
                )
            )
    return points


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from tf_breakeven.launch import experiment, validation

    base = train_flags.config_from_flags()
    points = experiment.shard(
        grid_points(), FLAGS.shard_index, FLAGS.num_shards
    )
    runs = []
    for name, overrides in points:
        kwargs = {**base.model_kwargs, **overrides.pop("model_kwargs", {})}
        try:
            config = base.replace(model_kwargs=kwargs, **overrides)
        except ValueError as err:
            raise app.UsageError(f"grid point {name}: {err}") from None
        validation.check_config(config)  # every point, before any runs
        runs.append((os.path.join(FLAGS.workdir, name), config))
    experiment.run_all(runs)


def run() -> None:
    """Console script `tf-breakeven-sweep` (and `python -m`)."""
    cli.run(main, __name__)


if __name__ == "__main__":
    run()
