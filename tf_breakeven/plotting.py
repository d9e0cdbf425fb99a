"""Matplotlib figures of measurement records (PNG).

All functions take records as written by `tf_breakeven.recording` (a list
of dicts, or the path of a JSONL file) and return a matplotlib Figure;
`save_figures` writes the standard set next to a run.
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


def plot_sharpness(records: Any, *, title: str = "") -> plt.Figure:
    """lambda_H^1 and lambda_K^1 trajectories with 2(1+beta)/eta and the
    break-even mark (the break-even paper's figures 1-2)."""
    records = _records(records)
    fig, (ax_h, ax_k) = plt.subplots(1, 2, figsize=(10, 4))
    steps, values = series(records, "hessian/lambda_1")
    ax_h.plot(steps, values, "o-", ms=3, label=r"$\lambda_H^1$")
    t_steps, threshold = series(records, "breakeven/threshold")
    if t_steps.size:
        ax_h.plot(t_steps, threshold, "k--", lw=1, label=r"$2(1+\beta)/\eta$")
    k_steps, k_values = series(records, "grad_cov/lambda_1")
    ax_k.plot(k_steps, k_values, "o-", ms=3, color="C1", label=r"$\lambda_K^1$")
    point = break_even_step(records)
    for ax in (ax_h, ax_k):
        if point is not None:
            ax.axvline(point, color="r", lw=1, label="break-even")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("step")
    ax_h.set_ylabel(r"$\lambda_H^1$")
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


def save_figures(records: Any, directory: str | os.PathLike) -> list[str]:
    """Writes sharpness.png, conditioning.png and cosines.png; returns paths.

    A figure is skipped when the records hold none of its quantities.
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
    paths = []
    for name, fig in figures:
        path = os.path.join(directory, name)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
