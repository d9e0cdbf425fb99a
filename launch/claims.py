"""The papers' claims as verdicts: per-seed numbers in, a verdict out.

Every claim compares two settings, one the claim says gives the lower
value of a quantity and one it says gives the higher (a larger against a
smaller learning rate, a wider against a narrower network), seed by seed.
`compare` applies one criterion to all of them (`CRITERION`, written into
the report):

* "reproduced": every seed's value of the claimed-higher setting exceeds
  every seed's value of the claimed-lower one (complete separation), and
  the gap of the means exceeds `GAP_IN_STDS` pooled seed standard
  deviations;
* "not reproduced": the same holds in the opposite direction;
* "inconclusive": neither (overlapping seeds, a small gap, or fewer than
  two finite seeds per setting).

A claim made for every level of another factor (larger learning rate is
better at each batch size) is one comparison per level; `combine` gives
the claim "reproduced" if every comparison is, "not reproduced" if any is
contradicted, else "inconclusive".

The functions here are pure (records and numbers in, dicts out), so a
planted effect can be tested without training anything.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
INCONCLUSIVE = "inconclusive"
VERDICTS = (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE)
GAP_IN_STDS = 2.0
NUM_LOSS_LEVELS = 4
# The break-even point is "early" when every run reaches it within this
# fraction of its steps, and contradicted when a run reaches it only after
# LATE_FRACTION (or never does, in a run at least as long).
EARLY_FRACTION = 0.25
LATE_FRACTION = 0.5

CRITERION = (
    f"A comparison of two settings over seeds is **{REPRODUCED}** when "
    "every seed of the setting the claim says is higher lies above every "
    "seed of the setting it says is lower (complete separation) and the "
    f"gap of the two means exceeds {GAP_IN_STDS:g} pooled seed standard "
    f"deviations; **{NOT_REPRODUCED}** when the same holds the other way "
    f"round; **{INCONCLUSIVE}** otherwise (overlap, a small gap, or fewer "
    "than two finite seeds per setting). A claim made at several levels "
    "of another factor is reproduced when every comparison is, not "
    "reproduced when any comparison is contradicted, inconclusive "
    "otherwise. The break-even point is early when every run reaches it "
    f"within the first {EARLY_FRACTION:.0%} of its steps, and not "
    f"reproduced when some run reaches it only after {LATE_FRACTION:.0%} "
    "of its steps or never."
)


@dataclasses.dataclass
class Claim:
    """One entry of claims.json.

    Attributes:
        paper: "breakeven" or "confusion".
        claim: what is claimed, in words.
        verdict: one of `VERDICTS`.
        effect: the numbers behind it (per seed, per comparison, the gap
            and its size in pooled standard deviations).
        seeds: the seeds that entered the verdict.
        figure: the figure's path relative to the report (None: none).
    """

    paper: str
    claim: str
    verdict: str
    effect: dict
    seeds: list[int]
    figure: str | None = None

    def to_json(self) -> dict:
        return _jsonable(dataclasses.asdict(self))


def _jsonable(value: Any) -> Any:
    """JSON-safe: non-finite floats become None, keys strings."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _finite(values: Mapping[int, float]) -> dict[int, float]:
    return {
        int(s): float(v)
        for s, v in values.items()
        if v is not None and math.isfinite(v)
    }


def compare(lower: Mapping[int, float], higher: Mapping[int, float]) -> dict:
    """The seed criterion on `{seed: value}` of the two settings.

    Args:
        lower: the values of the setting the claim says gives the lower
            value, by seed.
        higher: those of the setting it says gives the higher value.

    Returns:
        `{"verdict", "lower", "higher", "gap", "pooled_std", "gap_in_stds",
        "separated"}`: gap = mean(higher) - mean(lower) (positive as
        claimed), separated = "as claimed", "against" or None.
    """
    lower, higher = _finite(lower), _finite(higher)
    result = {"lower": lower, "higher": higher, "verdict": INCONCLUSIVE}
    if len(lower) < 2 or len(higher) < 2:
        result.update(gap=math.nan, pooled_std=math.nan, separated=None)
        result["gap_in_stds"] = math.nan
        return result
    lo, hi = np.array(list(lower.values())), np.array(list(higher.values()))
    gap = float(hi.mean() - lo.mean())
    dof = lo.size + hi.size - 2
    pooled = math.sqrt(
        ((lo.size - 1) * lo.var(ddof=1) + (hi.size - 1) * hi.var(ddof=1)) / dof
    )
    separated = None
    if lo.max() < hi.min():
        separated = "as claimed"
    elif hi.max() < lo.min():
        separated = "against"
    large = abs(gap) > GAP_IN_STDS * pooled
    if separated == "as claimed" and large:
        result["verdict"] = REPRODUCED
    elif separated == "against" and large:
        result["verdict"] = NOT_REPRODUCED
    result.update(
        gap=gap,
        pooled_std=pooled,
        gap_in_stds=gap / pooled
        if pooled > 0
        else math.copysign(math.inf, gap),
        separated=separated,
    )
    return result


def combine(verdicts: Iterable[str]) -> str:
    """A claim's verdict from those of its comparisons (see the module)."""
    verdicts = list(verdicts)
    if verdicts and all(v == REPRODUCED for v in verdicts):
        return REPRODUCED
    if NOT_REPRODUCED in verdicts:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def value_at_loss(
    losses: Sequence[float], values: Sequence[float], level: float
) -> float:
    """The value where a run's training loss first reaches `level`.

    `losses` and `values` are measured at the same steps, in step order.
    Linear in the loss between the last measurement above `level` and the
    first at or below it; NaN if the run never reaches it. A run that
    starts at or below `level` gives its first value.
    """
    for i, loss in enumerate(losses):
        if not math.isfinite(loss) or loss > level:
            continue
        if i == 0 or not math.isfinite(losses[i - 1]):
            return float(values[i])
        before, after = losses[i - 1], loss
        weight = (before - level) / (before - after)
        return float(values[i - 1] + weight * (values[i] - values[i - 1]))
    return math.nan


def loss_levels(trajectories: Iterable[Sequence[float]], count: int) -> list:
    """`count` loss levels every trajectory passes through.

    Geometrically spaced strictly between the highest loss any run has
    reached at its lowest (the slowest run's progress) and the lowest
    starting loss; [] when the ranges do not overlap.
    """
    starts, bests = [], []
    for losses in trajectories:
        finite = [v for v in losses if math.isfinite(v)]
        if not finite:
            return []
        starts.append(finite[0])
        bests.append(min(finite))
    if not starts:
        return []
    top, bottom = min(starts), max(bests)
    if not bottom < top or bottom <= 0:
        return []
    grid = np.geomspace(top, bottom, count + 2)[1:-1]
    return [float(v) for v in grid]


def joined(
    records: list[dict], loss_key: str, value_key: str
) -> tuple[list[float], list[float]]:
    """(losses, values) at the steps where both were recorded, in order."""
    loss = {r["step"]: r[loss_key] for r in records if loss_key in r}
    value = {r["step"]: r[value_key] for r in records if value_key in r}
    steps = sorted(set(loss) & set(value))
    return (
        [_number(loss[s]) for s in steps],
        [_number(value[s]) for s in steps],
    )


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def at_equal_loss(
    lower_runs: Mapping[int, tuple[list, list]],
    higher_runs: Mapping[int, tuple[list, list]],
    count: int = NUM_LOSS_LEVELS,
) -> dict:
    """`compare` at equal training loss.

    Args:
        lower_runs, higher_runs: `{seed: (losses, values)}` of the two
            settings (`joined`).
        count: loss levels (`loss_levels` over all the runs).

    Returns:
        `compare` of each seed's mean over the levels of its value at the
        level, with "levels" and "per_level" ({setting: [[per seed]]}).
    """
    runs = [*lower_runs.values(), *higher_runs.values()]
    levels = loss_levels([losses for losses, _ in runs], count)

    def at_levels(group):
        return {
            seed: [value_at_loss(losses, values, lv) for lv in levels]
            for seed, (losses, values) in group.items()
        }

    lower, higher = at_levels(lower_runs), at_levels(higher_runs)
    result = compare(
        {s: _mean(v) for s, v in lower.items()},
        {s: _mean(v) for s, v in higher.items()},
    )
    result.update(levels=levels, per_level={"lower": lower, "higher": higher})
    return result


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def factor_comparisons(
    points: list[dict],
    factor: str,
    claimed_lower: Callable[[list], Any],
    value: Callable[[dict], Any],
    compare_fn: Callable[[dict, dict], dict] = compare,
) -> list[dict]:
    """One comparison per level of the other settings.

    Args:
        points: dicts with a "seed", a "setting" dict (e.g. learning_rate,
            batch_size) and whatever `value` reads.
        factor: the setting varied (e.g. "learning_rate").
        claimed_lower: picks, from the sorted values of `factor`, the one
            the claim says gives the lower value (`min` or `max`); the
            other extreme is the claimed-higher one.
        value: a point's number (or what `compare_fn` takes).
        compare_fn: `compare` or `at_equal_loss`.

    Returns:
        `compare_fn`'s dict per group of points that agree on every
        setting but `factor`, with "at" (those settings), "lower_setting"
        and "higher_setting" (the two values of `factor`).
    """
    groups: dict[tuple, list[dict]] = {}
    for point in points:
        others = tuple(
            sorted((k, v) for k, v in point["setting"].items() if k != factor)
        )
        groups.setdefault(others, []).append(point)
    comparisons = []
    for others, group in sorted(groups.items(), key=lambda g: str(g[0])):
        levels = sorted({p["setting"][factor] for p in group})
        if len(levels) < 2:
            continue
        low = claimed_lower(levels)
        high = levels[-1] if low == levels[0] else levels[0]

        result = compare_fn(
            _by_seed(group, factor, low, value),
            _by_seed(group, factor, high, value),
        )
        result.update(at=dict(others), lower_setting=low, higher_setting=high)
        comparisons.append(result)
    return comparisons


def _by_seed(group: list[dict], factor: str, level: Any, value) -> dict:
    return {p["seed"]: value(p) for p in group if p["setting"][factor] == level}


def factor_claim(
    paper: str,
    claim: str,
    comparisons: list[dict],
    factor: str,
    figure: str | None = None,
) -> Claim:
    """A `Claim` from `factor_comparisons`."""
    seeds = sorted(
        {s for c in comparisons for s in [*c["lower"], *c["higher"]]}
    )
    return Claim(
        paper=paper,
        claim=claim,
        verdict=combine(c["verdict"] for c in comparisons),
        effect={"factor": factor, "comparisons": comparisons},
        seeds=seeds,
        figure=figure,
    )


def break_even_claim(runs: list[dict], figure: str | None = None) -> Claim:
    """The break-even point comes early in training (see `CRITERION`).

    Args:
        runs: dicts with "seed", "setting", "breakeven_step" (None: never
            reached) and "total_steps".
    """
    per_run = []
    for run in runs:
        step, total = run["breakeven_step"], run["total_steps"]
        fraction = None if step is None or not total else step / total
        per_run.append(
            {
                "setting": run["setting"],
                "seed": run["seed"],
                "breakeven_step": step,
                "total_steps": total,
                "fraction": fraction,
            }
        )
    fractions = [r["fraction"] for r in per_run]
    if per_run and all(
        f is not None and f <= EARLY_FRACTION for f in fractions
    ):
        verdict = REPRODUCED
    elif any(f is None or f > LATE_FRACTION for f in fractions):
        verdict = NOT_REPRODUCED
    else:
        verdict = INCONCLUSIVE
    reached = [f for f in fractions if f is not None]
    effect = {
        "runs": per_run,
        "reached": len(reached),
        "median_fraction": float(np.median(reached)) if reached else None,
        "early_fraction": EARLY_FRACTION,
        "late_fraction": LATE_FRACTION,
    }
    return Claim(
        paper="breakeven",
        claim="The break-even point (the first step at which the stability "
        "condition is violated) comes early in training.",
        verdict=verdict,
        effect=effect,
        seeds=sorted({r["seed"] for r in runs}),
        figure=figure,
    )
