"""Stability of SGD along the sharpest direction, and the break-even step.

`BreakEven` composes a Hessian measurement (`TopEigenpairs`) with a
stability criterion (`tf_breakeven.stability`), evaluated with the
learning rate and momentum the optimizer uses at the measured step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import keras
import numpy as np
from absl import logging

from tf_breakeven import curvature, spectrum, stability
from tf_breakeven.callbacks.base import (
    Measurement,
    MeasurementCallback,
    Probe,
    Result,
)
from tf_breakeven.callbacks.hessian_spectrum import TopEigenpairs
from tf_breakeven.validation import ArgumentError

Hyperparameter = float | Callable[[int], float] | None


def read_learning_rate(optimizer: Any) -> float:
    """The learning rate of the optimizer's next update (schedules too)."""
    value = getattr(optimizer, "learning_rate", None)
    if value is None:
        raise ArgumentError(
            f"BreakEven cannot read a learning rate from {optimizer!r}; use "
            "a keras.optimizers optimizer or pass `learning_rate=`."
        )
    return float(keras.ops.convert_to_numpy(value))


def read_momentum(optimizer: Any) -> float:
    """The heavy-ball momentum of the optimizer (0 if it has none)."""
    return float(getattr(optimizer, "momentum", 0.0))


def _resolve(override: Hyperparameter, read: Callable[[], float], step: int):
    if override is None:
        return read()
    return float(override(step) if callable(override) else override)


class StabilityMeasurement(Measurement):
    """lambda_1, the learning rate and the stability condition at a step.

    Attributes:
        hessian: the `TopEigenpairs` measurement giving lambda_1 and e.
        breakeven_step: the first violating step seen (or restored).
    """

    def __init__(
        self,
        hessian: TopEigenpairs,
        *,
        criterion: str = "full_batch",
        batch_size: int | None = None,
        dataset_size: int | None = None,
        learning_rate: Hyperparameter = None,
        momentum: Hyperparameter = None,
    ):
        if criterion not in stability.CRITERIA:
            raise ArgumentError(
                f"`criterion` must be one of {stability.CRITERIA}; got "
                f"{criterion!r}."
            )
        if criterion == "sgd" and (batch_size is None or dataset_size is None):
            raise ArgumentError(
                "criterion='sgd' needs the batch size S and training-set "
                "size N: pass batch_size=... and dataset_size=...."
            )
        self.hessian = hessian
        self.criterion = criterion
        self.batch_size = batch_size
        self.dataset_size = dataset_size
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.breakeven_step: int | None = None

    def keys(self) -> list[str]:
        keys = self.hessian.keys() + [
            "breakeven/sharpness_x_lr",
            "breakeven/threshold",
            "breakeven/stability",
        ]
        if self.criterion == "sgd":
            keys.append("breakeven/curvature_variance")
        return keys

    def config(self) -> dict[str, Any]:
        return {
            **self.hessian.config(),
            "criterion": self.criterion,
            "batch_size": self.batch_size,
            "dataset_size": self.dataset_size,
        }

    def hyperparameters(self, model: keras.Model, step: int):
        """(eta, beta) of the update after `step`."""
        optimizer = model.optimizer
        eta = _resolve(
            self.learning_rate, lambda: read_learning_rate(optimizer), step
        )
        beta = _resolve(self.momentum, lambda: read_momentum(optimizer), step)
        return eta, beta

    def setup(self, model: keras.Model, probe: Probe) -> None:
        self.hessian.setup(model, probe)
        optimizer = getattr(model, "optimizer", None)
        if self.learning_rate is None and optimizer is None:
            raise ArgumentError(
                "BreakEven needs a compiled model (to read the learning rate)"
                " or `learning_rate=`."
            )
        eta = _resolve(
            self.learning_rate, lambda: read_learning_rate(optimizer), 0
        )
        if not eta > 0:
            raise ArgumentError(
                f"BreakEven: the learning rate is {eta}; need > 0."
            )
        if self.momentum is None and not isinstance(
            optimizer, keras.optimizers.SGD
        ):
            logging.warning(
                "BreakEven: %s is not SGD; the stability thresholds assume "
                "SGD with heavy-ball momentum (taken as 0 here).",
                type(optimizer).__name__,
            )

    def restore(self, records: list[dict]) -> None:
        self.breakeven_step = stability.find_break_even(
            records, criterion=self.criterion
        )

    def curvature_variance(self) -> float:
        """s^2 = Var_i[e^T H_i e] along the last top eigenvector."""
        e = self.hessian.top_eigenvector
        if e is None:
            return math.nan
        values = curvature.probe_curvature(self.hessian.operator, e).numpy()
        return float(np.var(values.astype(np.float64)))

    def compute(self, model: keras.Model, step: int) -> Result:
        metrics = dict(self.hessian.compute(model, step).metrics)
        eta, beta = self.hyperparameters(model, step)
        lambda_1 = metrics["hessian/lambda_1"]
        metrics["breakeven/sharpness_x_lr"] = eta * lambda_1
        metrics["breakeven/threshold"] = stability.momentum_threshold(eta, beta)
        kwargs = {}
        if self.criterion == "sgd":
            variance = self.curvature_variance()
            metrics["breakeven/curvature_variance"] = variance
            kwargs = {
                "curvature_variance": variance,
                "batch_size": self.batch_size,
                "dataset_size": self.dataset_size,
            }
        metrics["breakeven/stability"] = stability.stability_ratio(
            self.criterion,
            learning_rate=eta,
            lambda_1=lambda_1,
            momentum=beta,
            **kwargs,
        )
        return Result(metrics)


class BreakEven(MeasurementCallback):
    """Stability of SGD along the sharpest direction; the break-even step.

    At each measurement: lambda_1 (warm-started Lanczos), the learning rate
    eta (schedules included) and momentum beta read from the optimizer, and
    with `criterion="sgd"` the variance s^2 of the per-example curvature
    along the top eigenvector. Logs `breakeven/sharpness_x_lr` (eta
    lambda_1), `breakeven/threshold` (2 (1 + beta) / eta),
    `breakeven/stability` (see `stability.stability_ratio`: >= 1 unstable)
    and, for "sgd", `breakeven/curvature_variance`. The first violating
    step is `breakeven_step` (attribute, and the `breakeven_step` key of
    that record); `on_break_even(step, metrics)` is then called once.

    Args:
        data: probe set.
        criterion: "full_batch" or "sgd" (the paper's eq. 1).
        batch_size, dataset_size: S and N for "sgd".
        on_break_even: optional callable run when the point is reached.
        learning_rate, momentum: override what is read from the optimizer
            (a float or a callable of the step).
        k, num_iterations, tol, warm_start, seed: the Lanczos measurement
            (see `HessianSpectrum`).
        **kwargs: `schedule`, `recorder`, `loss`, `training`, `jit_compile`
            (see `MeasurementCallback`).
    """

    def __init__(
        self,
        data: Any,
        *,
        criterion: str = "full_batch",
        batch_size: int | None = None,
        dataset_size: int | None = None,
        on_break_even: Callable[[int, Mapping[str, float]], None] | None = None,
        learning_rate: Hyperparameter = None,
        momentum: Hyperparameter = None,
        k: int = 1,
        num_iterations: int | None = None,
        tol: float = spectrum.DEFAULT_TOL,
        warm_start: bool = True,
        seed: int = 0,
        **kwargs: Any,
    ):
        hessian = TopEigenpairs(
            k,
            num_iterations=num_iterations,
            tol=tol,
            warm_start=warm_start,
            seed=seed,
        )
        measurement = StabilityMeasurement(
            hessian,
            criterion=criterion,
            batch_size=batch_size,
            dataset_size=dataset_size,
            learning_rate=learning_rate,
            momentum=momentum,
        )
        super().__init__(measurement, data, **kwargs)
        self.on_break_even = on_break_even

    @property
    def criterion(self) -> str:
        return self.measurement.criterion

    @property
    def breakeven_step(self) -> int | None:
        return self.measurement.breakeven_step

    def measure(self) -> dict[str, float]:
        metrics = super().measure()
        ratio = metrics.get("breakeven/stability", math.nan)
        if self.breakeven_step is None and stability.is_unstable(
            self.criterion, ratio
        ):
            self._reached(metrics)
        return metrics

    def _reached(self, metrics: Mapping[str, float]) -> None:
        self.measurement.breakeven_step = self.step
        self.records[-1]["breakeven_step"] = self.step
        if self.recorder is not None:
            self.recorder.write(
                step=self.step,
                epoch=self._epoch,
                source=f"{self.source}/event",
                metrics={"breakeven_step": self.step},
                config=self.config(),
            )
        logging.info("Break-even point reached at step %d.", self.step)
        if self.on_break_even is not None:
            self.on_break_even(self.step, dict(metrics))
