"""Matplotlib figures of measurement records (PNG).

All functions take records as written by `tf_breakeven.recording` (a list
of dicts, or the path of a JSONL file) and return a matplotlib Figure;
`save_figures` writes the standard set next to a run.

* `plot_sharpness`: the quantity `BreakEven`'s criterion compares with its
  threshold (lambda_1; for "adam"/"rmsprop" also the preconditioned
  sharpness, for "sgd" also the batch sharpness), the threshold labelled
  with its formula, and lambda_K^1, with the break-even mark.
* `plot_conditioning`: Tr(K)/lambda_K^1 and lambda_K^*/lambda_K^1.
* `plot_cosines`: densities of pairwise gradient cosines.
* `plot_layers`: per-block top Hessian eigenvalues
  (`hessian/lambda_1/<block>`) and per-block shares of Tr(K)
  (`grad_cov/trace/<block>`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from tf_breakeven import recording, stability


def _records(records: Any) -> list[dict]:
    if isinstance(records, (str, os.PathLike)):
        return recording.read_records(records)
    return list(records)


def series(records: Any, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `key` over the records that have it, by step."""
    pairs = sorted(
        (r["step"], float(r[key]))
        for r in _records(records)
        if key in r and isinstance(r[key], (int, float))
    )
    if not pairs:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*pairs)
    return np.asarray(steps), np.asarray(values)


def break_even_step(records: Any) -> int | None:
    """The break-even step of the records (`stability.find_break_even`)."""
    return stability.find_break_even(_records(records))


# Line labels of the Hessian panel of `plot_sharpness`.
LAMBDA_1_LABEL = r"$\lambda_H^1$"
BAND_LABEL = r"$\lambda_H^1 \pm$ std"
PRECONDITIONED_LABEL = r"$\lambda_1(P^{-1}H)$"
BATCH_SHARPNESS_LABEL = r"$\mathbb{E}_B[g_B^\top H_B g_B/\|g_B\|^2]$"
MOMENTUM_THRESHOLD_LABEL = r"$2(1+\beta)/\eta$"
ADAM_THRESHOLD_LABEL = r"$(2+2\beta_1)/(\eta(1-\beta_1))$"
UNKNOWN_THRESHOLD_LABEL = "threshold"

# criterion: (curves compared with the threshold besides lambda_1, as
# (record key, line label) pairs; the threshold's label). The threshold
# values are the recorded ones; the label names the formula `BreakEven`
# used for them.
_PRECONDITIONED = ("breakeven/preconditioned_sharpness", PRECONDITIONED_LABEL)
_BATCH_SHARPNESS = ("breakeven/batch_sharpness", BATCH_SHARPNESS_LABEL)
SHARPNESS_CURVES: dict[str, tuple[tuple[tuple[str, str], ...], str]] = {
    "full_batch": ((), MOMENTUM_THRESHOLD_LABEL),
    "sgd": ((_BATCH_SHARPNESS,), MOMENTUM_THRESHOLD_LABEL),
    "adam": ((_PRECONDITIONED,), ADAM_THRESHOLD_LABEL),
    "rmsprop": ((_PRECONDITIONED,), MOMENTUM_THRESHOLD_LABEL),
}


def _is_break_even_record(record: dict) -> bool:
    """Whether `BreakEven` wrote the record (a measurement or its event)."""
    source = str(record.get("source", ""))
    return (
        source == "BreakEven"
        or source.startswith("BreakEven/")
        or "breakeven/threshold" in record
    )


def criterion_of(records: Any) -> str:
    """The `BreakEven` criterion of a run: that of the last BreakEven
    record (in the given order) whose config names one; "full_batch" when
    none does (records written before the config held it)."""
    for record in reversed(_records(records)):
        config = record.get("config") or {}
        if _is_break_even_record(record) and "criterion" in config:
            return str(config["criterion"])
    return "full_batch"


def std_band(
    records: Any, key: str = "hessian/lambda_1"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, value - std, value + std) of the records holding both `key`
    and `key + "_std"`, by step; the band is centred on the value measured
    with the spread, not on another callback's value at that step."""
    triples = sorted(
        (r["step"], float(r[key]), float(r[key + "_std"]))
        for r in _records(records)
        if isinstance(r.get(key), (int, float))
        and isinstance(r.get(key + "_std"), (int, float))
    )
    if not triples:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    steps, values, stds = (np.asarray(column) for column in zip(*triples))
    return steps, values - stds, values + stds


def _plot_hessian_panel(ax: plt.Axes, records: list[dict]) -> None:
    """lambda_1 (with its std band), the criterion's compared curves and
    the threshold, in that order (see `plot_sharpness`)."""
    criterion = criterion_of(records)
    curves, threshold_label = SHARPNESS_CURVES.get(
        criterion, ((), UNKNOWN_THRESHOLD_LABEL)
    )
    steps, values = series(records, "hessian/lambda_1")
    ax.plot(steps, values, "o-", ms=3, label=LAMBDA_1_LABEL)
    b_steps, low, high = std_band(records)
    if b_steps.size:
        ax.fill_between(
            b_steps, low, high, color="C0", alpha=0.2, label=BAND_LABEL
        )
    for i, (key, label) in enumerate(curves):
        c_steps, c_values = series(records, key)
        if c_steps.size:
            ax.plot(
                c_steps, c_values, "s-", ms=3, color=f"C{i + 2}", label=label
            )
    t_steps, threshold = series(records, "breakeven/threshold")
    if t_steps.size:
        ax.plot(t_steps, threshold, "k--", lw=1, label=threshold_label)
    ax.set_ylabel(LAMBDA_1_LABEL if not curves else "sharpness")


def plot_sharpness(records: Any, *, title: str = "") -> plt.Figure:
    """The sharpness the break-even criterion watches, its threshold, and
    lambda_K^1, with the break-even mark (the break-even paper's figures
    1-2; Cohen et al. 2022 for adaptive optimizers).

    The criterion is `criterion_of(records)`. Lines of the Hessian panel
    (left), in this order, each only when recorded:

    1. lambda_1 (`hessian/lambda_1`, label `LAMBDA_1_LABEL`; always drawn);
    2. "adam", "rmsprop": `breakeven/preconditioned_sharpness`, the top
       eigenvalue of P^{-1/2} H P^{-1/2}, label `PRECONDITIONED_LABEL`;
       "sgd": `breakeven/batch_sharpness`, the mean over mini-batches of
       g_B^T H_B g_B / ||g_B||^2, label `BATCH_SHARPNESS_LABEL`;
    3. `breakeven/threshold`, dashed, labelled with its formula:
       `ADAM_THRESHOLD_LABEL` for "adam", `MOMENTUM_THRESHOLD_LABEL`
       (2(1+beta)/eta) for the others, "threshold" for an unknown one;
    4. the break-even step (vertical, label "break-even").

    With `hessian/lambda_1_std` the panel also holds a band
    lambda_1 +- std (`std_band`, a collection labelled `BAND_LABEL`). The
    right panel holds lambda_K^1 (`grad_cov/lambda_1`), then the
    break-even step.
    """
    records = _records(records)
    fig, (ax_h, ax_k) = plt.subplots(1, 2, figsize=(10, 4))
    _plot_hessian_panel(ax_h, records)
    k_steps, k_values = series(records, "grad_cov/lambda_1")
    ax_k.plot(k_steps, k_values, "o-", ms=3, color="C1", label=r"$\lambda_K^1$")
    point = break_even_step(records)
    for ax in (ax_h, ax_k):
        if point is not None:
            ax.axvline(point, color="r", lw=1, label="break-even")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("step")
    ax_k.set_ylabel(r"$\lambda_K^1$")
    for ax in (ax_h, ax_k):
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_conditioning(records: Any, *, title: str = "") -> plt.Figure:
    """Tr(K)/lambda_K^1 (the paper's conditioning proxy) and
    lambda_K^*/lambda_K^1 over steps."""
    records = _records(records)
    fig, ax = plt.subplots(figsize=(5, 4))
    for key, label in (
        ("grad_cov/trace_over_lambda_1", r"Tr$(K)/\lambda_K^1$"),
        ("grad_cov/condition", r"$\lambda_K^*/\lambda_K^1$"),
    ):
        steps, values = series(records, key)
        if steps.size:
            ax.plot(steps, values, "o-", ms=3, label=label)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend(loc="best", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def cosine_density(
    histogram: dict, *, bandwidth: float = 0.05, points: int = 201
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian KDE of cosines from a recorded histogram (bin centers
    weighted by counts); integrates to 1 over [-1, 1] up to edge mass."""
    edges = np.asarray(histogram["edges"], np.float64)
    counts = np.asarray(histogram["counts"], np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    grid = np.linspace(-1.0, 1.0, points)
    total = counts.sum()
    if total == 0:
        return grid, np.zeros_like(grid)
    kernel = np.exp(-0.5 * ((grid[:, None] - centers[None]) / bandwidth) ** 2)
    density = kernel @ counts / (total * bandwidth * math.sqrt(2 * math.pi))
    return grid, density


def plot_cosines(
    records: Any, *, steps: Sequence[int] | None = None, title: str = ""
) -> plt.Figure:
    """KDE of pairwise gradient cosines at a few measured steps (the
    confusion paper's figures)."""
    measured = [
        r
        for r in _records(records)
        if "confusion/cosines" in r.get("histograms", {})
    ]
    if steps is None:
        picks = sorted({0, len(measured) // 2, len(measured) - 1})
        measured = [measured[i] for i in picks if 0 <= i < len(measured)]
    else:
        measured = [r for r in measured if r["step"] in set(steps)]
    fig, ax = plt.subplots(figsize=(5, 4))
    for record in measured:
        grid, density = cosine_density(
            record["histograms"]["confusion/cosines"]
        )
        ax.plot(grid, density, label=f"step {record['step']}")
    ax.set_xlabel("cosine similarity of sample gradients")
    ax.set_ylabel("density")
    if measured:
        ax.legend(loc="best", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return fig


LAYER_LAMBDA_PREFIX = "hessian/lambda_1/"
LAYER_TRACE_PREFIX = "grad_cov/trace/"


def _block_of(key: str, prefix: str) -> str | None:
    """The block name of a per-block key `prefix + name`, else None (block
    names hold no "/", so `hessian/lambda_1_std` or a deeper key is not
    one)."""
    if not key.startswith(prefix):
        return None
    name = key[len(prefix) :]
    return name if name and "/" not in name else None


def block_names(records: Any, prefix: str) -> list[str]:
    """Block names of the keys `prefix + name`, in order of first
    appearance (the order the callbacks wrote them: the model's)."""
    names: dict[str, None] = {}
    for record in _records(records):
        for key, value in record.items():
            name = _block_of(key, prefix)
            if name is not None and isinstance(value, (int, float)):
                names.setdefault(name)
    return list(names)


def block_series(
    records: Any, prefix: str
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`{block: (steps, values)}` of the keys `prefix + block` (`series`)."""
    records = _records(records)
    return {
        name: series(records, prefix + name)
        for name in block_names(records, prefix)
    }


def _shares(record: dict, names: list[str]) -> dict[str, float]:
    """`{block: part / total}` of the blocks' Tr(K) parts in one record."""
    parts = {
        name: float(record[LAYER_TRACE_PREFIX + name])
        for name in names
        if isinstance(record.get(LAYER_TRACE_PREFIX + name), (int, float))
    }
    total = sum(parts.values())
    return {
        name: part / total if total else math.nan
        for name, part in parts.items()
    }


def trace_shares(records: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`{block: (steps, share)}`: each block's part of Tr(K) over the sum of
    the blocks in the same record (one `GradientCovariance` measurement),
    by step.

    The blocks partition the parameters when they are the model's layers,
    so the sum is `grad_cov/trace`; user-given blocks may leave variables
    out, and the shares are then of the blocks' total. A zero or NaN total
    gives NaN shares at that step.
    """
    records = _records(records)
    names = block_names(records, LAYER_TRACE_PREFIX)
    rows = sorted(
        ((r["step"], _shares(r, names)) for r in records),
        key=lambda row: row[0],
    )
    result = {}
    for name in names:
        pairs = [(step, share[name]) for step, share in rows if name in share]
        steps, values = zip(*pairs)
        result[name] = (np.asarray(steps), np.asarray(values))
    return result


def _plot_blocks(
    ax: plt.Axes,
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    title: str,
    missing: str,
) -> None:
    """One line per block, labelled by its name; `missing` as the title
    when there is none."""
    for name, (steps, values) in curves.items():
        ax.plot(steps, values, "o-", ms=3, label=name)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("step")
    if curves:
        ax.set_title(title)
        ax.legend(loc="best", fontsize=8)
    else:
        ax.set_title(missing)


def plot_layers(records: Any, *, title: str = "") -> plt.Figure:
    """Per-block curvature and gradient noise: where sharpness and noise
    sit in the model.

    Left: the top eigenvalue of each block's diagonal Hessian block
    (`hessian/lambda_1/<block>`) over steps, log y. Right: each block's
    share of Tr(K) (`trace_shares`: `grad_cov/trace/<block>` over the sum
    of the blocks at that step), in [0, 1]. Lines are labelled by block
    name, in order of first appearance in the records; a panel with no
    data says so in its title.
    """
    records = _records(records)
    fig, (ax_h, ax_k) = plt.subplots(1, 2, figsize=(10, 4))
    _plot_blocks(
        ax_h,
        block_series(records, LAYER_LAMBDA_PREFIX),
        r"$\lambda_H^1$ per block",
        "no per-block Hessian eigenvalues recorded",
    )
    ax_h.set_yscale("log")
    ax_h.set_ylabel(r"$\lambda_H^1$ of the block")
    _plot_blocks(
        ax_k,
        trace_shares(records),
        r"share of Tr$(K)$ per block",
        "no per-block Tr(K) recorded",
    )
    ax_k.set_ylim(0.0, 1.0)
    ax_k.set_ylabel(r"share of Tr$(K)$")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def save_figures(records: Any, directory: str | os.PathLike) -> list[str]:
    """Writes sharpness.png, conditioning.png, cosines.png and layers.png
    (`plot_sharpness`, `plot_conditioning`, `plot_cosines`, `plot_layers`);
    returns their paths.

    A figure is skipped when the records hold none of its quantities:
    layers.png needs a `hessian/lambda_1/<block>` or
    `grad_cov/trace/<block>` key.
    """
    records = _records(records)
    os.makedirs(directory, exist_ok=True)
    keys = {k for r in records for k in r}
    hist_keys = {k for r in records for k in r.get("histograms", {})}
    figures = []
    if keys & {"hessian/lambda_1", "grad_cov/lambda_1"}:
        figures.append(("sharpness.png", plot_sharpness(records)))
    if "grad_cov/trace_over_lambda_1" in keys:
        figures.append(("conditioning.png", plot_conditioning(records)))
    if "confusion/cosines" in hist_keys:
        figures.append(("cosines.png", plot_cosines(records)))
    if any(
        _block_of(k, prefix) is not None
        for k in keys
        for prefix in (LAYER_LAMBDA_PREFIX, LAYER_TRACE_PREFIX)
    ):
        figures.append(("layers.png", plot_layers(records)))
    paths = []
    for name, fig in figures:
        path = os.path.join(directory, name)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
