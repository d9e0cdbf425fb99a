"""The two papers' grids at two scales, and their claims from finished runs.

Break-even (Jastrzebski et al. 2020): learning rate x batch size, trained
with SGD and tracked with the "paper" preset at log-spaced steps, plus
`ProbeLoss` at the same steps (conjecture 2 compares runs at equal
training loss).

Confusion (Sankararaman et al. 2020): networks of several widths (at one
depth) and depths (at one width), and the deepest plain network against
the same depth with BatchNormalization and skip connections; each
setting measured at initialization (fan-in Gaussian weights, inputs on
the unit sphere, per-example gradients: the regime of the paper's
theory) and along training. BatchNormalization in training mode has no
statistics for a single example, so the BN comparison uses micro-batches
of `bn_microbatch` examples for both of its settings (the plain network
is measured a second time at that size).

`--scale=quick` fits 2 CPU cores (about 15 minutes per paper, offline:
scikit-learn's digits and synthetic unit-sphere data); `--scale=paper`
uses the papers' datasets (tfds) and the zoo's models at their sizes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from tf_breakeven.launch import claims as claims_lib
from tf_breakeven.launch import report
from tf_breakeven.launch.claims import Claim
from tf_breakeven.launch.config import Config

PAPERS = ("breakeven", "confusion")
SCALES = ("quick", "paper")
PLAIN, BN_SKIP = "plain", "bn+skip"

# Record keys the claims read.
LAMBDA_H = "hessian/lambda_1"
LAMBDA_K = "grad_cov/lambda_1"
CONDITIONING = "grad_cov/trace_over_lambda_1"
COS_MIN = "confusion/cos_min"
PROBE_LOSS = "probe/loss"


@dataclasses.dataclass(frozen=True)
class BreakEvenScale:
    """The break-even grid: `learning_rates` x `batch_sizes` x seeds."""

    base: Config
    learning_rates: tuple[float, ...]
    batch_sizes: tuple[int, ...]
    seeds: int


@dataclasses.dataclass(frozen=True)
class ConfusionScale:
    """The confusion grid (see the module docstring).

    Attributes:
        init_data: "sphere" (`init_dim`-dimensional Gaussian points
            projected on the unit sphere, labels of a random linear teacher
            over `init_classes` classes) or a dataset name of
            `tf_breakeven.launch.data` whose flattened images are
            projected on the unit sphere.
        init_examples: examples whose per-example gradients are compared.
        init_widths, init_depths: the MLP grid at initialization.
        train: base configuration of the training runs.
        train_widths, train_depths: the grid of the trained model.
        bn_microbatch: micro-batch size of the BatchNorm comparison.
        seeds: seeds per setting.
    """

    init_data: str
    init_dim: int
    init_classes: int
    init_examples: int
    init_widths: tuple[int, ...]
    init_depths: tuple[int, ...]
    train: Config
    train_widths: tuple[int, ...]
    train_depths: tuple[int, ...]
    bn_microbatch: int
    seeds: int


_QUIET = {"verbose": 0, "step_tracking_every": 0}

BREAKEVEN = {
    "quick": BreakEvenScale(
        base=Config(
            model="simple_cnn",
            # Half the zoo's filters and a quarter of its dense units: a
            # Lanczos solve costs 0.6 s instead of 2.2 s on 2 cores.
            model_kwargs={"filters": (16, 32), "dense_units": 128},
            dataset="digits",
            optimizer="sgd",
            # 600 steps at every batch size: each run passes its
            # break-even point and trains well past it.
            epochs=10,
            steps_per_epoch=60,
            tracking="paper",
            measure_every="log",
            probe_fraction=0.1,
            microbatch_size=8,
            **_QUIET,
        ),
        learning_rates=(0.05, 0.2),
        batch_sizes=(32, 128),
        seeds=3,
    ),
    "paper": BreakEvenScale(
        base=Config(
            model="simple_cnn",
            dataset="cifar10",
            optimizer="sgd",
            epochs=100,
            tracking="paper",
            measure_every="log",
            probe_fraction=0.05,
            **_QUIET,
        ),
        learning_rates=(0.01, 0.03, 0.1),
        batch_sizes=(32, 128),
        seeds=3,
    ),
}

CONFUSION = {
    "quick": ConfusionScale(
        init_data="sphere",
        init_dim=64,
        init_classes=10,
        init_examples=128,
        init_widths=(16, 64, 256),
        init_depths=(2, 8),
        train=Config(
            model="mlp",
            dataset="digits",
            image_size=8,
            optimizer="sgd",
            learning_rate=0.05,
            batch_size=32,
            epochs=8,
            tracking="paper",
            probe_fraction=0.1,
            **_QUIET,
        ),
        train_widths=(16, 64, 256),
        train_depths=(2, 8),
        bn_microbatch=4,
        seeds=3,
    ),
    "paper": ConfusionScale(
        init_data="mnist",
        init_dim=784,
        init_classes=10,
        init_examples=256,
        init_widths=(64, 256, 1024),
        init_depths=(2, 8, 16),
        train=Config(
            model="wide_resnet",
            dataset="cifar10",
            optimizer="momentum",
            learning_rate=0.05,
            lr_schedule="step",
            epochs=50,
            tracking="paper",
            probe_fraction=0.01,
            **_QUIET,
        ),
        train_widths=(1, 2, 4),
        train_depths=(16, 28),
        bn_microbatch=8,
        seeds=3,
    ),
}


def confusion_settings(
    widths: tuple[int, ...], depths: tuple[int, ...], bn_microbatch: int
) -> list[dict]:
    """The settings of one confusion grid, in order.

    The widths at the shallowest depth, the depths at the middle width
    (plain networks, per-example gradients), and at the middle width and
    largest depth the plain network and the one with BN and skips at
    micro-batches of `bn_microbatch`.
    """
    width, deepest = widths[len(widths) // 2], max(depths)

    def setting(w, d, arch=PLAIN, m=1):
        return {"width": w, "depth": d, "arch": arch, "microbatch_size": m}

    settings = [setting(w, min(depths)) for w in widths]
    settings += [setting(width, d) for d in depths]
    settings += [
        setting(width, deepest, PLAIN, bn_microbatch),
        setting(width, deepest, BN_SKIP, bn_microbatch),
    ]
    unique = []
    for s in settings:
        if s not in unique:
            unique.append(s)
    return unique


def setting_name(setting: dict) -> str:
    """A directory name for a setting."""
    parts = []
    for key, value in setting.items():
        short = {
            "learning_rate": "lr",
            "batch_size": "bs",
            "width": "width",
            "depth": "depth",
            "arch": "",
            "microbatch_size": "m",
        }[key]
        parts.append(f"{short}{value}".replace("+", "_"))
    return "_".join(parts)


def breakeven_claims(points: list[dict]) -> list[Claim]:
    """The break-even paper's claims from finished runs.

    Args:
        points: per run `{"seed", "setting": {"learning_rate",
            "batch_size"}, "records", "breakeven_step", "total_steps"}`.
    """
    claims = []
    factors = (
        ("learning_rate", "a larger learning rate", max, min),
        ("batch_size", "a smaller batch size", min, max),
    )
    for key, label in ((LAMBDA_H, "lambda_H^1"), (LAMBDA_K, "lambda_K^1")):
        for factor, words, lower, _ in factors:
            comparisons = claims_lib.factor_comparisons(
                points,
                factor,
                lower,
                lambda p, key=key: report.finite_max(p["records"], key),
            )
            claims.append(
                claims_lib.factor_claim(
                    "breakeven",
                    f"Conjecture 1: {words} gives a lower maximum of "
                    f"{label} along the trajectory.",
                    comparisons,
                    factor,
                )
            )
    for factor, words, _, higher_is_lower in factors:
        comparisons = claims_lib.factor_comparisons(
            points,
            factor,
            higher_is_lower,
            lambda p: claims_lib.joined(p["records"], PROBE_LOSS, CONDITIONING),
            claims_lib.at_equal_loss,
        )
        claims.append(
            claims_lib.factor_claim(
                "breakeven",
                f"Conjecture 2: {words} gives a higher Tr(K)/lambda_K^1 "
                "(better-conditioned K), compared at equal training loss.",
                comparisons,
                factor,
            )
        )
    claims.append(claims_lib.break_even_claim(points))
    return claims


def confusion_claims(points: list[dict], stage: str) -> list[Claim]:
    """The confusion paper's claims at one stage.

    Args:
        points: `{"seed", "setting": confusion setting, "value": the
            minimum cosine}` (at initialization, or its mean along
            training).
        stage: "at initialization" or "during training".
    """
    plain = [
        p
        for p in points
        if p["setting"]["arch"] == PLAIN
        and p["setting"]["microbatch_size"] == 1
    ]
    bn = [p for p in points if p["setting"]["microbatch_size"] != 1]
    value = lambda p: p["value"]  # noqa: E731
    specs = (
        (
            plain,
            "width",
            min,
            "A wider network gives a minimum gradient cosine closer to 0 "
            "(less confusion)",
        ),
        (
            plain,
            "depth",
            max,
            "A deeper network gives a more negative minimum gradient cosine "
            "(more confusion)",
        ),
        (
            bn,
            "arch",
            lambda levels: PLAIN,
            "BatchNorm with skip connections brings a deep network's minimum "
            "gradient cosine closer to 0",
        ),
    )
    claims = []
    for group, factor, lower, words in specs:
        comparisons = claims_lib.factor_comparisons(group, factor, lower, value)
        claims.append(
            claims_lib.factor_claim(
                "confusion", f"{words}, {stage}.", comparisons, factor
            )
        )
    return claims


def training_cos_min(records: list[dict]) -> float:
    """A training run's confusion: the mean over its measurements after
    step 0 of the minimum cosine (NaN measurements left out)."""
    values = [
        float(r[COS_MIN])
        for r in records
        if r.get("step", 0) > 0 and isinstance(r.get(COS_MIN), (int, float))
    ]
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def describe(scale: Any) -> dict[str, Any]:
    """The scale's grid as JSON-safe values, for the report."""
    out = {}
    for field in dataclasses.fields(scale):
        value = getattr(scale, field.name)
        out[field.name] = (
            dataclasses.asdict(value) if isinstance(value, Config) else value
        )
    return out
