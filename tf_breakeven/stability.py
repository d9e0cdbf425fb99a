"""Stability of SGD along the sharpest direction and the break-even point.

Definitions (Jastrzebski et al. 2020, section 3; Wu et al. 2018):

* full batch, plain GD: a step of size eta is unstable along the top
  Hessian eigenvector when `eta * lambda_1 >= 2`; with heavy-ball momentum
  beta the threshold is `lambda_1 >= 2 (1 + beta) / eta`.
* SGD (paper eq. 1): with e the top eigenvector, s^2 = Var_i[e^T H_i e]
  over examples, N the training-set size and S the batch size, the step is
  unstable when
  `(1 - eta lambda_1)^2 + s^2 eta^2 (N - S) / (S (N - 1)) > 1`.

* adaptive optimizers (Cohen et al. 2022): the preconditioned sharpness
  (top eigenvalue of `P^{-1/2} H P^{-1/2}`, `tf_breakeven.preconditioning`)
  against `(2 + 2 beta_1) / (eta (1 - beta_1))` for Adam ("adam") and
  `2 (1 + momentum) / eta` for RMSprop ("rmsprop").

`stability_ratio` puts all of them on one scale: 1 is the boundary, above it the
step is unstable. The break-even point is the first measured step where the
chosen condition is violated.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

CRITERIA = ("full_batch", "sgd", "adam", "rmsprop")
# Criteria that compare the preconditioned sharpness with a threshold.
PRECONDITIONED = ("adam", "rmsprop")


def momentum_threshold(learning_rate: float, momentum: float = 0.0) -> float:
    """Largest stable lambda_1 of (heavy-ball) GD: 2 (1 + beta) / eta."""
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0; got {learning_rate}.")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1); got {momentum}.")
    return 2.0 * (1.0 + momentum) / learning_rate


def adam_threshold(learning_rate: float, beta_1: float) -> float:
    """Largest stable preconditioned sharpness of Adam:
    (2 + 2 beta_1) / (eta (1 - beta_1)) (38 / eta at beta_1 = 0.9)."""
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0; got {learning_rate}.")
    if not 0 <= beta_1 < 1:
        raise ValueError(f"beta_1 must be in [0, 1); got {beta_1}.")
    return (2.0 + 2.0 * beta_1) / (learning_rate * (1.0 - beta_1))


def threshold(
    criterion: str,
    learning_rate: float,
    *,
    momentum: float = 0.0,
    beta_1: float | None = None,
) -> float:
    """The sharpness threshold of a criterion: `adam_threshold` for
    "adam" (needs `beta_1`), else `momentum_threshold`."""
    if criterion == "adam":
        if beta_1 is None:
            raise ValueError("criterion='adam' needs beta_1.")
        return adam_threshold(learning_rate, beta_1)
    return momentum_threshold(learning_rate, momentum)


def sgd_stability(
    learning_rate: float,
    lambda_1: float,
    curvature_variance: float,
    batch_size: int,
    dataset_size: int,
) -> float:
    """Left-hand side of the break-even paper's eq. 1 (> 1: unstable)."""
    if batch_size < 1 or dataset_size < 2 or batch_size > dataset_size:
        raise ValueError(
            "Need 1 <= batch_size <= dataset_size and dataset_size >= 2; got "
            f"batch_size={batch_size}, dataset_size={dataset_size}."
        )
    eta, n, s = learning_rate, dataset_size, batch_size
    noise = curvature_variance * eta**2 * (n - s) / (s * (n - 1))
    return (1.0 - eta * lambda_1) ** 2 + noise


def stability_ratio(
    criterion: str,
    *,
    learning_rate: float,
    lambda_1: float,
    momentum: float = 0.0,
    beta_1: float | None = None,
    curvature_variance: float | None = None,
    batch_size: int | None = None,
    dataset_size: int | None = None,
) -> float:
    """The chosen stability condition as a ratio; >= 1 means unstable.

    Args:
        criterion: "full_batch" (lambda_1 over the momentum threshold),
            "sgd" (eq. 1's left-hand side; needs `curvature_variance`,
            `batch_size` and `dataset_size`; plain SGD only), "adam" or
            "rmsprop" (`lambda_1` is then the preconditioned sharpness,
            over `threshold(criterion, ...)`).
        learning_rate, lambda_1, momentum: eta, top eigenvalue, beta.
        beta_1: Adam's first-moment decay (for "adam").
        curvature_variance, batch_size, dataset_size: s^2, S and N.

    Returns:
        A float; NaN if lambda_1 (or s^2) is NaN (a diverged run).
    """
    if criterion in ("full_batch",) + PRECONDITIONED:
        return lambda_1 / threshold(
            criterion, learning_rate, momentum=momentum, beta_1=beta_1
        )
    if criterion == "sgd":
        if None in (curvature_variance, batch_size, dataset_size):
            raise ValueError(
                "criterion='sgd' needs curvature_variance, batch_size and "
                "dataset_size."
            )
        return sgd_stability(
            learning_rate,
            lambda_1,
            curvature_variance,
            batch_size,
            dataset_size,
        )
    raise ValueError(f"criterion must be one of {CRITERIA}; got {criterion!r}.")


def is_unstable(criterion: str, ratio: float) -> bool:
    """Whether a ratio from `stability_ratio` violates the condition."""
    if math.isnan(ratio):
        return False
    return ratio > 1.0 if criterion == "sgd" else ratio >= 1.0


def find_break_even(
    records: Iterable[Mapping],
    *,
    key: str = "breakeven/stability",
    criterion: str | None = None,
) -> int | None:
    """The break-even step of a run's records, or None.

    The one route to the break-even step: the first step whose record
    violates the stability condition, or that a record names as
    `breakeven_step` (the event `BreakEven` writes), whichever is first.

    Args:
        records: dicts with a "step" and `key` (e.g. read back with
            `tf_breakeven.recording.read_records`), in any order.
        key: the record key holding the stability ratio.
        criterion: which condition the ratios came from; None reads it
            from each record's "config" (default "full_batch").
    """
    steps = []
    for record in records:
        if record.get("breakeven_step") is not None:
            steps.append(int(record["breakeven_step"]))
        if key not in record or record[key] is None:
            continue
        used = criterion or (record.get("config") or {}).get(
            "criterion", "full_batch"
        )
        if is_unstable(used, float(record[key])):
            steps.append(int(record["step"]))
    return min(steps) if steps else None
