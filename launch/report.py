r"""Turn a sweep into the papers' figures and a summary table.

    python -m tf_breakeven.launch.report --workdir=/tmp/sweep_be
    tf-breakeven-report --workdir=/tmp/sweep_be      # the console script

Reads every run under --workdir (a directory with config.json and
records.jsonl) and writes into --workdir/report (or --out):
    trajectories.png   lambda_H^1 and lambda_K^1 per run against steps, with
                       the 2(1+beta)/eta lines and break-even marks
                       (break-even paper, figs. 1-2)
    max_vs_lr_bs.png   max lambda_K^1, max lambda_H^1 and max Tr(K)/lambda_K^1
                       against eta (one line per S) and S (one per eta)
    confusion.png      min cosine against width and depth (confusion paper)
    cosines.png        cosine KDEs at the last measurement of every run
    summary.md, summary.csv

The figures are drawn on `matplotlib.figure.Figure` objects, not through
pyplot, so neither importing this module nor writing a report changes the
process's plotting backend (a notebook keeps its own).
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from collections import defaultdict

from absl import app, flags
from matplotlib.figure import Figure

import tf_breakeven as tfb
from tf_breakeven.launch import cli

FLAGS = flags.FLAGS

COLUMNS = (
    "run",
    "model",
    "learning_rate",
    "batch_size",
    "width",
    "depth",
    "batch_norm",
    "skip_connections",
    "final_loss",
    "final_accuracy",
    "breakeven_step",
    "max_lambda_H",
    "max_preconditioned_sharpness",
    "max_lambda_K",
    "max_trK_over_lambda_K",
    "min_cos",
)


def load_runs(workdir: str) -> list[dict]:
    """Every run directory under `workdir`, with config and records."""
    runs = []
    for name in sorted(os.listdir(workdir)):
        path = os.path.join(workdir, name)
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            continue
        with open(config_path) as f:
            config = json.load(f)
        records = tfb.read_records(os.path.join(path, "records.jsonl"))
        summary_path = os.path.join(path, "summary.json")
        summary = {}
        if os.path.exists(summary_path):
            with open(summary_path) as f:
                summary = json.load(f)
        runs.append(
            {
                "name": name,
                "config": config,
                "records": records,
                "summary": summary,
            }
        )
    return runs


def finite_max(records: list[dict], key: str) -> float:
    """The largest finite number recorded under `key` (NaN: none)."""
    values = [r[key] for r in records if key in r]
    values = [
        v for v in values if isinstance(v, (int, float)) and math.isfinite(v)
    ]
    return max(values) if values else math.nan


def _min(records, key):
    values = [r[key] for r in records if key in r]
    values = [
        v for v in values if isinstance(v, (int, float)) and math.isfinite(v)
    ]
    return min(values) if values else math.nan


def table(runs: list[dict]) -> list[dict]:
    rows = []
    for run in runs:
        config, records = run["config"], run["records"]
        kwargs = config.get("model_kwargs", {})
        final = run["summary"].get("final", {})
        rows.append(
            {
                "run": run["name"],
                "model": config["model"],
                "learning_rate": config["learning_rate"],
                "batch_size": config["batch_size"],
                "width": kwargs.get("width"),
                "depth": kwargs.get("depth"),
                "batch_norm": kwargs.get("batch_norm"),
                "skip_connections": kwargs.get("skip_connections"),
                "final_loss": final.get("loss"),
                "final_accuracy": final.get("accuracy"),
                "breakeven_step": tfb.plotting.break_even_step(records),
                "max_lambda_H": finite_max(records, "hessian/lambda_1"),
                "max_preconditioned_sharpness": finite_max(
                    records, "breakeven/preconditioned_sharpness"
                ),
                "max_lambda_K": finite_max(records, "grad_cov/lambda_1"),
                "max_trK_over_lambda_K": finite_max(
                    records, "grad_cov/trace_over_lambda_1"
                ),
                "min_cos": _min(records, "confusion/cos_min"),
            }
        )
    return rows


def _compared_key(records: list[dict]) -> str:
    """What the run's break-even threshold is compared with: lambda_1, or
    for Adam and RMSprop runs the preconditioned sharpness."""
    criterion = tfb.plotting.criterion_of(records)
    if criterion in tfb.stability.PRECONDITIONED:
        return "breakeven/preconditioned_sharpness"
    return "hessian/lambda_1"


def plot_trajectories(runs: list[dict]) -> Figure:
    """lambda_H^1 (solid; for Adam/RMSprop runs also the preconditioned
    sharpness, dash-dotted) with each run's threshold (dashed), and
    lambda_K^1, per run."""
    fig = Figure(figsize=(11, 4))
    (ax_h, ax_k) = fig.subplots(1, 2)
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        records = run["records"]
        label = run["name"]
        steps, values = tfb.plotting.series(records, "hessian/lambda_1")
        ax_h.plot(steps, values, "-", color=color, label=label)
        compared = _compared_key(records)
        if compared != "hessian/lambda_1":
            steps, values = tfb.plotting.series(records, compared)
            ax_h.plot(steps, values, "-.", color=color, lw=0.8)
        t_steps, thresholds = tfb.plotting.series(
            records, "breakeven/threshold"
        )
        if t_steps.size:
            ax_h.plot(t_steps, thresholds, color=color, ls="--", lw=0.8)
        point = tfb.plotting.break_even_step(records)
        if point is not None:
            ax_h.axvline(point, color=color, ls=":", lw=0.8)
        steps, values = tfb.plotting.series(records, "grad_cov/lambda_1")
        ax_k.plot(steps, values, "-", color=color, label=label)
    for ax, name in ((ax_h, r"$\lambda_H^1$"), (ax_k, r"$\lambda_K^1$")):
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("step")
        ax.set_ylabel(name)
    ax_h.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _lines(ax, rows, x_key, group_key, y_key):
    groups = defaultdict(list)
    for row in rows:
        if row[x_key] is not None:
            groups[row[group_key]].append((row[x_key], row[y_key]))
    for group, points in sorted(groups.items(), key=lambda g: str(g[0])):
        points.sort()
        xs, ys = zip(*points)
        ax.plot(xs, ys, "o-", label=f"{group_key}={group}")
    ax.set_xlabel(x_key)
    ax.set_ylabel(y_key)
    ax.legend(fontsize=7)


def plot_max_vs_lr_bs(rows: list[dict]) -> Figure:
    keys = ("max_lambda_K", "max_lambda_H", "max_trK_over_lambda_K")
    fig = Figure(figsize=(13, 7))
    axes = fig.subplots(2, 3)
    for j, key in enumerate(keys):
        _lines(axes[0, j], rows, "learning_rate", "batch_size", key)
        axes[0, j].set_xscale("log")
        _lines(axes[1, j], rows, "batch_size", "learning_rate", key)
        axes[1, j].set_xscale("log")
    fig.tight_layout()
    return fig


def plot_confusion(rows: list[dict]) -> Figure:
    fig = Figure(figsize=(10, 4))
    (ax_w, ax_d) = fig.subplots(1, 2)
    _lines(ax_w, rows, "width", "depth", "min_cos")
    _lines(ax_d, rows, "depth", "width", "min_cos")
    fig.tight_layout()
    return fig


def plot_cosines(runs: list[dict]) -> Figure:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for run in runs:
        measured = [
            r
            for r in run["records"]
            if "confusion/cosines" in r.get("histograms", {})
        ]
        if measured:
            grid, density = tfb.plotting.cosine_density(
                measured[-1]["histograms"]["confusion/cosines"]
            )
            ax.plot(grid, density, label=run["name"])
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _cell(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def write_report(workdir: str, out: str | None = None) -> dict:
    """Writes the figures and tables; returns {name: path}."""
    out = out or os.path.join(workdir, "report")
    os.makedirs(out, exist_ok=True)
    runs = load_runs(workdir)
    if not runs:
        raise ValueError(
            f"No runs under {workdir}: expected directories with config.json"
            " (run `python -m tf_breakeven.launch.sweep` first)."
        )
    rows = table(runs)
    paths = {}
    figures = {
        "trajectories.png": plot_trajectories(runs),
        "max_vs_lr_bs.png": plot_max_vs_lr_bs(rows),
        "confusion.png": plot_confusion(rows),
        "cosines.png": plot_cosines(runs),
    }
    for name, fig in figures.items():
        paths[name] = os.path.join(out, name)
        fig.savefig(paths[name], dpi=100)
    paths["summary.csv"] = os.path.join(out, "summary.csv")
    with open(paths["summary.csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    paths["summary.md"] = os.path.join(out, "summary.md")
    with open(paths["summary.md"], "w") as f:
        f.write("| " + " | ".join(COLUMNS) + " |\n")
        f.write("|" + "---|" * len(COLUMNS) + "\n")
        for row in rows:
            f.write("| " + " | ".join(_cell(row[c]) for c in COLUMNS) + " |\n")
    return paths


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    paths = write_report(FLAGS.workdir, FLAGS.out)
    sys.stdout.write(
        "".join(f"{name}: {path}\n" for name, path in paths.items())
    )


def _define_flags() -> None:
    # Defined when the report runs as a program, not when it is imported:
    # `tf_breakeven.launch.reproduce` writes this report from a process
    # whose own --workdir is already defined.
    flags.DEFINE_string("workdir", None, "Sweep directory.", required=True)
    flags.DEFINE_string(
        "out", None, "Output directory (default workdir/report)."
    )


def run() -> None:
    """Console script `tf-breakeven-report` (and `python -m`)."""
    _define_flags()
    cli.run(main, __name__)


if __name__ == "__main__":
    run()
