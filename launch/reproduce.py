r"""Reproduce a paper's claims with one command, and say which hold.

    python -m tf_breakeven.launch.reproduce --paper=breakeven --scale=quick \
        --workdir=/tmp/reproduce_be
    python -m tf_breakeven.launch.reproduce --paper=confusion --scale=quick \
        --workdir=/tmp/reproduce_conf
    # the papers' datasets (tfds, on disk) and model sizes, on 8 machines:
    python -m tf_breakeven.launch.reproduce --paper=breakeven --scale=paper \
        --workdir=/shared/be --shard_index=$i --num_shards=8

Runs the grid each claim needs over several seeds (`tf_breakeven.launch.
papers`: its grids, scales and claims), then writes

    W/report/claims.md     every claim, its verdict, the numbers and a
                           figure, and the criterion behind the verdicts
    W/report/claims.json   [{"paper", "claim", "verdict", "effect",
                             "seeds", "figure"}, ...]

and, for the training runs, the sweep report of
`tf_breakeven.launch.report` (trajectories, summary table) in W/report.
Training runs live in W/runs/<setting>_seed<s> (finished ones are skipped,
killed ones resume, as in `tf_breakeven.launch.sweep`); measurements at
initialization in W/init/<setting>_seed<s>.json. `--shard_index` and
`--num_shards` split all of it; the report is written by whichever
invocation finds every part finished. The verdict criterion
(`tf_breakeven.launch.claims.CRITERION`) is written into the report.
Installed as the console script `tf-breakeven-reproduce`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

from absl import app, flags, logging

from tf_breakeven.launch import cli
from tf_breakeven.launch import papers as papers_lib

FLAGS = flags.FLAGS

flags.DEFINE_enum(
    "paper", None, list(papers_lib.PAPERS), "Which paper.", required=True
)
flags.DEFINE_enum(
    "scale", "quick", list(papers_lib.SCALES), "quick (offline) or paper."
)
flags.DEFINE_string("workdir", None, "Output directory.", required=True)
flags.DEFINE_integer("seeds", None, "Seeds per setting (default: scale's).")
flags.DEFINE_integer("epochs", None, "Training epochs (default: scale's).")
flags.DEFINE_integer(
    "steps_per_epoch", None, "Steps per epoch (default: whole epochs)."
)
flags.DEFINE_list("learning_rates", None, "breakeven: the learning rates.")
flags.DEFINE_list("batch_sizes", None, "breakeven: the batch sizes.")
flags.DEFINE_integer(
    "batch_size", None, "confusion: training batch size (scale's)."
)
flags.DEFINE_list("widths", None, "confusion: widths of the trained model.")
flags.DEFINE_list("depths", None, "confusion: depths of the trained model.")
flags.DEFINE_list("init_widths", None, "confusion: MLP widths at init.")
flags.DEFINE_list("init_depths", None, "confusion: MLP depths at init.")
flags.DEFINE_integer(
    "init_examples", None, "confusion: examples compared at initialization."
)
flags.DEFINE_float(
    "probe_fraction", None, "Probe share of the training set (scale's)."
)
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory.")
flags.DEFINE_bool(
    "tiny", False, "Tiny zoo models (tf_breakeven.models.tiny_config): tests."
)
flags.DEFINE_integer("shard_index", 0, "This shard's index.")
flags.DEFINE_integer("num_shards", 1, "Number of shards.")


@dataclasses.dataclass(frozen=True)
class Task:
    """One unit of work: a training run or a measurement at init."""

    kind: str  # "train" or "init"
    path: str  # run directory, or the measurement's JSON file
    seed: int
    setting: dict
    config: Any = None  # the run's Config ("train")


def _override(values: list[str] | None, default: tuple, kind: type) -> tuple:
    if values is None:
        return default
    if not values:
        raise app.UsageError("A grid flag needs at least one value.")
    try:
        return tuple(kind(v) for v in values)
    except ValueError:
        raise app.UsageError(
            f"{values} are not {kind.__name__} values."
        ) from None


def _base(config, tiny: bool):
    """The scale's base configuration with the flags' overrides."""
    from tf_breakeven import models

    changes: dict[str, Any] = {}
    if FLAGS.epochs is not None:
        changes["epochs"] = FLAGS.epochs
    if FLAGS.steps_per_epoch is not None:
        changes["steps_per_epoch"] = FLAGS.steps_per_epoch
    if FLAGS.data_dir is not None:
        changes["data_dir"] = FLAGS.data_dir
    if FLAGS.probe_fraction is not None:
        changes["probe_fraction"] = FLAGS.probe_fraction
    if tiny:
        kwargs = models.tiny_config(config.model)
        kwargs.pop("num_classes", None)
        kwargs.pop("input_shape", None)
        changes["model_kwargs"] = {**kwargs, **config.model_kwargs}
    try:
        return config.replace(**changes)
    except ValueError as err:
        raise app.UsageError(str(err)) from None


def _check_counts() -> None:
    for name, minimum in (
        ("seeds", 1),
        ("init_examples", 2),
        ("batch_size", 1),
    ):
        value = FLAGS[name].value
        if value is not None and value < minimum:
            raise app.UsageError(f"--{name}={value} must be >= {minimum}.")


def scale() -> Any:
    """The chosen paper's scale, with the flags' overrides."""
    _check_counts()
    if FLAGS.paper == "breakeven":
        chosen = papers_lib.BREAKEVEN[FLAGS.scale]
        return dataclasses.replace(
            chosen,
            base=_base(chosen.base, FLAGS.tiny),
            learning_rates=_override(
                FLAGS.learning_rates, chosen.learning_rates, float
            ),
            batch_sizes=_override(FLAGS.batch_sizes, chosen.batch_sizes, int),
            seeds=FLAGS.seeds or chosen.seeds,
        )
    chosen = papers_lib.CONFUSION[FLAGS.scale]
    train = _base(chosen.train, FLAGS.tiny)
    if FLAGS.batch_size is not None:
        train = train.replace(batch_size=FLAGS.batch_size)
    return dataclasses.replace(
        chosen,
        train=train,
        init_widths=_override(FLAGS.init_widths, chosen.init_widths, int),
        init_depths=_override(FLAGS.init_depths, chosen.init_depths, int),
        train_widths=_override(FLAGS.widths, chosen.train_widths, int),
        train_depths=_override(FLAGS.depths, chosen.train_depths, int),
        init_examples=FLAGS.init_examples or chosen.init_examples,
        seeds=FLAGS.seeds or chosen.seeds,
    )


def breakeven_tasks(workdir: str, grid: papers_lib.BreakEvenScale) -> list:
    tasks = []
    for lr in grid.learning_rates:
        for batch in grid.batch_sizes:
            setting = {"learning_rate": lr, "batch_size": batch}
            for seed in range(grid.seeds):
                config = grid.base.replace(
                    learning_rate=lr, batch_size=batch, seed=seed
                )
                name = f"{papers_lib.setting_name(setting)}_seed{seed}"
                path = os.path.join(workdir, "runs", name)
                tasks.append(Task("train", path, seed, setting, config))
    return tasks


def confusion_tasks(workdir: str, grid: papers_lib.ConfusionScale) -> list:
    tasks = []
    stages = (
        ("init", grid.init_widths, grid.init_depths),
        ("train", grid.train_widths, grid.train_depths),
    )
    for kind, widths, depths in stages:
        settings = papers_lib.confusion_settings(
            widths, depths, grid.bn_microbatch
        )
        for setting in settings:
            for seed in range(grid.seeds):
                name = f"{papers_lib.setting_name(setting)}_seed{seed}"
                if kind == "init":
                    path = os.path.join(workdir, "init", name + ".json")
                    tasks.append(Task("init", path, seed, setting))
                    continue
                bn = setting["arch"] == papers_lib.BN_SKIP
                kwargs = {
                    **grid.train.model_kwargs,
                    "width": setting["width"],
                    "depth": setting["depth"],
                    "batch_norm": bn,
                    "skip_connections": bn,
                }
                config = grid.train.replace(
                    model_kwargs=kwargs,
                    microbatch_size=setting["microbatch_size"],
                    seed=seed,
                )
                path = os.path.join(workdir, "runs", name)
                tasks.append(Task("train", path, seed, setting, config))
    return tasks


def is_done(task: Task) -> bool:
    from tf_breakeven.launch import experiment

    if task.kind == "init":
        return os.path.exists(task.path)
    return experiment.is_done(task.path)


def run_task(task: Task, grid: Any) -> None:
    """Runs one task unless it is finished."""
    if is_done(task):
        logging.info("Skipping finished %s", task.path)
        return
    logging.info("Running %s", task.path)
    if task.kind == "init":
        from tf_breakeven.launch import initialization

        result = initialization.measure(grid, task.setting, task.seed)
        os.makedirs(os.path.dirname(task.path), exist_ok=True)
        temporary = task.path + ".tmp"
        with open(temporary, "w") as f:
            json.dump({"seed": task.seed, "setting": task.setting, **result}, f)
        os.replace(temporary, task.path)
        return
    train_run(task.config, task.path)


def train_run(config, workdir: str) -> None:
    """One training run with `ProbeLoss` beside the preset's callbacks."""
    import tf_breakeven as tfb
    from tf_breakeven.launch import experiment

    def probe_loss(run, config):
        return [
            tfb.ProbeLoss(
                run.spec.probe,
                schedule=experiment.measurement_schedule(config) or "epoch",
                recorder=run.recorder,
            )
        ]

    experiment.run_one(workdir, config, probe_loss)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    from tf_breakeven.launch import experiment, validation, verdicts

    grid = scale()
    make_tasks = (
        breakeven_tasks if FLAGS.paper == "breakeven" else confusion_tasks
    )
    tasks = make_tasks(FLAGS.workdir, grid)
    for task in tasks:
        if task.config is not None:
            validation.check_config(task.config)  # all, before any runs
    for task in experiment.shard(tasks, FLAGS.shard_index, FLAGS.num_shards):
        run_task(task, grid)
    missing = [t.path for t in tasks if not is_done(t)]
    if missing:
        sys.stdout.write(
            f"{len(missing)} of {len(tasks)} parts are not finished (other "
            "shards?); the report is written once all are.\n"
        )
        return
    paths = verdicts.write(FLAGS.workdir, FLAGS.paper, tasks, grid)
    sys.stdout.write(
        "".join(f"{name}: {path}\n" for name, path in paths.items())
    )
    for claim in verdicts.read(paths["claims.json"]):
        sys.stdout.write(f"[{claim['verdict']}] {claim['claim']}\n")


def run() -> None:
    """Console script `tf-breakeven-reproduce` (and `python -m`)."""
    cli.run(main, __name__)


if __name__ == "__main__":
    run()
