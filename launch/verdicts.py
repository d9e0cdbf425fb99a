"""claims.md and claims.json of a finished reproduction.

`write(workdir, paper, tasks, grid)` reads every task's output (training
runs' records and summaries, measurements at initialization), evaluates
the paper's claims (`tf_breakeven.launch.papers`), draws one figure per
claim and writes the report. Figures are drawn on
`matplotlib.figure.Figure` objects, never through pyplot.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

import tf_breakeven as tfb
from tf_breakeven.launch import claims as claims_lib
from tf_breakeven.launch import papers as papers_lib
from tf_breakeven.launch import report
from tf_breakeven.launch.claims import Claim


def _train_point(task: Any) -> dict:
    records = tfb.read_records(os.path.join(task.path, "records.jsonl"))
    with open(os.path.join(task.path, "summary.json")) as f:
        summary = json.load(f)
    steps = [r["step"] for r in records]
    return {
        "seed": task.seed,
        "setting": task.setting,
        "records": records,
        "breakeven_step": tfb.plotting.break_even_step(records),
        "total_steps": summary.get("total_steps") or max(steps, default=0),
    }


def _init_point(task: Any) -> dict:
    with open(task.path) as f:
        measured = json.load(f)
    value = measured["metrics"].get(papers_lib.COS_MIN)
    return {
        "seed": task.seed,
        "setting": task.setting,
        "value": math.nan if value is None else value,
    }


def evaluate(paper: str, tasks: list) -> list[Claim]:
    """The paper's claims from its finished tasks."""
    train = [_train_point(t) for t in tasks if t.kind == "train"]
    if paper == "breakeven":
        return papers_lib.breakeven_claims(train)
    init = [_init_point(t) for t in tasks if t.kind == "init"]
    for point in train:
        point["value"] = papers_lib.training_cos_min(point["records"])
    return papers_lib.confusion_claims(
        init, "at initialization"
    ) + papers_lib.confusion_claims(train, "during training")


def _label(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _comparison_panel(ax, comparison: dict, factor: str) -> None:
    low = f"{factor}={_label(comparison['lower_setting'])}"
    high = f"{factor}={_label(comparison['higher_setting'])}"
    if "levels" in comparison:  # at equal training loss
        levels = comparison["levels"]
        for name, color, label in (
            ("lower", "C0", low),
            ("higher", "C1", high),
        ):
            for i, values in enumerate(comparison["per_level"][name].values()):
                ax.plot(
                    levels,
                    values,
                    "o-",
                    color=color,
                    label=label if i == 0 else None,
                )
        if levels:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.invert_xaxis()
        ax.set_xlabel("training loss (probe)")
        ax.legend(fontsize=7)
    else:
        lower, higher = comparison["lower"], comparison["higher"]
        for seed in sorted(set(lower) | set(higher)):
            xs = [x for x, d in ((0, lower), (1, higher)) if seed in d]
            ys = [d[seed] for d in (lower, higher) if seed in d]
            ax.plot(xs, ys, "o-", color="0.6", lw=0.8)
        for x, d in ((0, lower), (1, higher)):
            if d:
                mean = sum(d.values()) / len(d)
                ax.plot([x - 0.15, x + 0.15], [mean, mean], "k-", lw=2)
        ax.set_xticks([0, 1], [low, high], fontsize=7)
        ax.set_xlim(-0.5, 1.5)
    at = ", ".join(f"{k}={_label(v)}" for k, v in comparison["at"].items())
    ax.set_title(f"{at}\n{comparison['verdict']}", fontsize=8)


def plot_claim(claim: Claim, ylabel: str) -> Figure:
    """Per-seed values of the compared settings, one panel per comparison
    (against training loss for the equal-loss claims); for the break-even
    point, each run's step as a fraction of its training."""
    if "runs" in claim.effect:
        fig = Figure(figsize=(6, 3.5))
        ax = fig.subplots()
        runs = claim.effect["runs"]
        labels = [
            ", ".join(_label(v) for v in r["setting"].values())
            + f" s{r['seed']}"
            for r in runs
        ]
        fractions = [
            math.nan if r["fraction"] is None else r["fraction"] for r in runs
        ]
        ax.plot(range(len(runs)), fractions, "o")
        for limit in (claims_lib.EARLY_FRACTION, claims_lib.LATE_FRACTION):
            ax.axhline(limit, color="0.5", ls="--", lw=0.8)
        ax.set_xticks(range(len(runs)), labels, rotation=90, fontsize=6)
        ax.set_ylim(0, 1)
        ax.set_ylabel("break-even step / total steps")
        fig.tight_layout()
        return fig
    comparisons = claim.effect["comparisons"]
    fig = Figure(figsize=(3.2 * max(1, len(comparisons)), 3.5))
    axes = fig.subplots(1, max(1, len(comparisons)), squeeze=False)[0]
    for ax, comparison in zip(axes, comparisons):
        _comparison_panel(ax, comparison, claim.effect["factor"])
        ax.set_ylabel(ylabel, fontsize=8)
    fig.tight_layout()
    return fig


def _ylabel(claim: Claim) -> str:
    text = claim.claim
    for name in ("lambda_H^1", "lambda_K^1", "Tr(K)/lambda_K^1"):
        if name in text:
            return "Tr(K)/lambda_K^1" if "Tr(K)" in text else f"max {name}"
    return "min cosine"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if not math.isfinite(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def _spread(values: dict) -> str:
    finite = [v for v in values.values() if math.isfinite(v)]
    if not finite:
        return "nan"
    mean = sum(finite) / len(finite)
    if len(finite) < 2:
        return f"{mean:.4g}"
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))
    return f"{mean:.4g} ± {std:.2g} (n={len(finite)})"


def markdown(paper: str, claims: list[Claim], grid: dict) -> str:
    """claims.md: the criterion, the grid, then every claim."""
    counts = {
        v: sum(c.verdict == v for c in claims) for v in claims_lib.VERDICTS
    }
    lines = [
        f"# Claims of the {paper} paper",
        "",
        ", ".join(f"{n} {v}" for v, n in counts.items()) + ".",
        "",
        "## Criterion",
        "",
        claims_lib.CRITERION,
        "",
        "## Grid",
        "",
        "```json",
        json.dumps(grid, indent=1, sort_keys=True, default=str),
        "```",
        "",
    ]
    for i, claim in enumerate(claims, 1):
        lines += [f"## {i}. {claim.claim}", ""]
        lines += [f"**{claim.verdict}** (seeds {claim.seeds})", ""]
        if "comparisons" in claim.effect:
            lines += _comparison_rows(claim.effect)
        else:
            lines += _run_rows(claim.effect)
        if claim.figure:
            lines += ["", f"![{claim.claim}]({claim.figure})"]
        lines.append("")
    return "\n".join(lines)


def _comparison_rows(effect: dict) -> list[str]:
    lines = [
        "| at | claimed lower | claimed higher | gap | gap / pooled std |"
        " verdict |",
        "|---|---|---|---|---|---|",
    ]
    factor = effect["factor"]
    for c in effect["comparisons"]:
        at = ", ".join(f"{k}={_label(v)}" for k, v in c["at"].items())
        lower = f"{factor}={_label(c['lower_setting'])}: {_spread(c['lower'])}"
        higher = (
            f"{factor}={_label(c['higher_setting'])}: {_spread(c['higher'])}"
        )
        lines.append(
            f"| {at} | {lower} | {higher} | {_cell(c['gap'])} |"
            f" {_cell(c['gap_in_stds'])} | {c['verdict']} |"
        )
        if c.get("levels"):
            levels = ", ".join(f"{v:.3g}" for v in c["levels"])
            lines.append(f"| (at training losses {levels}) | | | | | |")
    return lines


def _run_rows(effect: dict) -> list[str]:
    lines = [
        "| run | seed | break-even step | of steps |",
        "|---|---|---|---|",
    ]
    for r in effect["runs"]:
        setting = ", ".join(f"{k}={_label(v)}" for k, v in r["setting"].items())
        lines.append(
            f"| {setting} | {r['seed']} | {_cell(r['breakeven_step'])} |"
            f" {r['total_steps']} |"
        )
    return lines


def write(workdir: str, paper: str, tasks: list, grid: Any) -> dict:
    """Writes claims.json, claims.md and their figures (and the sweep
    report of the training runs) into workdir/report; returns the paths."""
    out = os.path.join(workdir, "report")
    figures = os.path.join(out, "figures")
    os.makedirs(figures, exist_ok=True)
    claims = evaluate(paper, tasks)
    for i, claim in enumerate(claims, 1):
        claim.figure = os.path.join("figures", f"claim_{i}.png")
        fig = plot_claim(claim, _ylabel(claim))
        fig.savefig(os.path.join(out, claim.figure), dpi=90)
    paths = {
        "claims.json": os.path.join(out, "claims.json"),
        "claims.md": os.path.join(out, "claims.md"),
    }
    with open(paths["claims.json"], "w") as f:
        json.dump([c.to_json() for c in claims], f, indent=1)
    described = papers_lib.describe(grid)
    with open(paths["claims.md"], "w") as f:
        f.write(markdown(paper, claims, described))
    if any(t.kind == "train" for t in tasks):
        report.write_report(os.path.join(workdir, "runs"), out)
    return paths


def read(path: str) -> list[dict]:
    """The claims of a claims.json."""
    with open(path) as f:
        return json.load(f)
