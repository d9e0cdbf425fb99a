"""Stability of SGD along the sharpest direction, and the break-even step.

`BreakEven` composes a Hessian measurement (`TopEigenpairs`) with a
stability criterion (`tf_breakeven.stability`), evaluated with the
learning rate and momentum the optimizer uses at the measured step. By
default (`criterion="auto"`) the criterion follows the optimizer: the
preconditioned sharpness for Adam, AdamW and RMSprop
(`tf_breakeven.preconditioning`), the SGD conditions otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import keras
import numpy as np
from absl import logging

from tf_breakeven import (
    curvature,
    preconditioning,
    sharpness,
    spectrum,
    stability,
)
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
    """The heavy-ball momentum of the optimizer (0 if it has none; Adam's
    first moment is not one: its threshold uses beta_1)."""
    return float(getattr(preconditioning.unwrap(optimizer), "momentum", 0.0))


def _resolve(override: Hyperparameter, read: Callable[[], float], step: int):
    if override is None:
        return read()
    return float(override(step) if callable(override) else override)


def resolve_criterion(
    criterion: str,
    optimizer: Any,
    batch_size: int | None,
    dataset_size: int | None,
) -> str:
    """The criterion `"auto"` stands for with this optimizer: "adam" for
    Adam/AdamW, "rmsprop" for RMSprop, else "sgd" when S and N are known
    and "full_batch" when not. Other criteria are checked and kept."""
    kind = preconditioning.optimizer_kind(optimizer)
    if criterion == "auto":
        if kind in stability.PRECONDITIONED:
            return kind
        known = batch_size is not None and dataset_size is not None
        return "sgd" if known else "full_batch"
    if criterion in stability.PRECONDITIONED and kind != criterion:
        raise ArgumentError(
            f"criterion={criterion!r} needs a Keras "
            f"{'Adam or AdamW' if criterion == 'adam' else 'RMSprop'} "
            f"optimizer; the model's is {type(optimizer).__name__}. Pass "
            "criterion='auto'."
        )
    return criterion


def batch_sharpness_batches(
    operator: Any,
    batch_size: int | None,
    wanted: bool | None,
    criterion: str,
) -> list | None:
    """The probe's mini-batches of S for `breakeven/batch_sharpness`, or
    None when it is not recorded: `wanted=None` records it for SGD
    criteria when S is known and the probe holds a mini-batch (else an
    info line says why not); True requires it (`ArgumentError` for too
    small a probe)."""
    if wanted is None:
        wanted = (
            batch_size is not None and criterion not in stability.PRECONDITIONED
        )
        if wanted and batch_size > operator.num_examples:
            logging.info(
                "BreakEven: the probe has %d examples, fewer than one "
                "mini-batch of %d; breakeven/batch_sharpness is not "
                "recorded (pass a larger probe).",
                operator.num_examples,
                batch_size,
            )
            return None
    if not wanted:
        return None
    return sharpness.sharpness_batches(operator, batch_size)


class PreconditionedSharpness:
    """The top eigenvalue of P^{-1/2} H P^{-1/2} and its residual, P of the
    optimizer's last step, warm-started from the previous eigenvector with
    the solver settings of a `TopEigenpairs`; NaN before the optimizer's
    first step (P undefined)."""

    def __init__(self):
        self.vector: list | None = None

    def __call__(
        self, model: keras.Model, hessian: TopEigenpairs
    ) -> tuple[float, float]:
        optimizer = model.optimizer
        if not preconditioning.has_stepped(optimizer):
            return math.nan, math.nan
        operator = preconditioning.PreconditionedOperator(
            hessian.operator, preconditioning.preconditioner(model, optimizer)
        )
        pairs = spectrum.eigenpairs(
            operator,
            1,
            num_iterations=hessian.num_iterations,
            tol=hessian.tol,
            seed=hessian.seed,
            start_vector=self.vector if hessian.warm_start else None,
        )
        value = float(pairs.eigenvalues[0])
        finite = math.isfinite(value)
        self.vector = pairs.eigenvectors[0] if finite else None
        return value, float(pairs.residuals[0]) if finite else math.nan


def _check_options(
    criterion: str,
    batch_size: int | None,
    dataset_size: int | None,
    batch_sharpness: bool | None,
) -> None:
    """`ArgumentError`s, with the fix, for options that cannot work."""
    if criterion not in ("auto",) + stability.CRITERIA:
        raise ArgumentError(
            "`criterion` must be 'auto' or one of "
            f"{stability.CRITERIA}; got {criterion!r}."
        )
    if criterion == "sgd" and (batch_size is None or dataset_size is None):
        raise ArgumentError(
            "criterion='sgd' needs the batch size S and training-set "
            "size N: pass batch_size=... and dataset_size=...."
        )
    if batch_sharpness and batch_size is None:
        raise ArgumentError(
            "batch_sharpness=True needs the mini-batch size: pass "
            "batch_size=...."
        )


def _warn_if_unsupported(optimizer: Any, criterion: str) -> None:
    """A warning when the thresholds assume an SGD the optimizer is not."""
    if criterion in stability.PRECONDITIONED:
        return
    if not isinstance(preconditioning.unwrap(optimizer), keras.optimizers.SGD):
        logging.warning(
            "BreakEven: %s is not SGD; the stability thresholds assume "
            "SGD with heavy-ball momentum (taken as 0 here).",
            type(optimizer).__name__,
        )


class StabilityMeasurement(Measurement):
    """lambda_1, the learning rate and the stability condition at a step.

    Attributes:
        hessian: the `TopEigenpairs` measurement giving lambda_1 and e.
        criterion: the criterion in use (after `setup`, "auto" resolved).
        breakeven_step: the first violating step seen (or restored).
    """

    def __init__(
        self,
        hessian: TopEigenpairs,
        *,
        criterion: str = "auto",
        batch_size: int | None = None,
        dataset_size: int | None = None,
        learning_rate: Hyperparameter = None,
        momentum: Hyperparameter = None,
        batch_sharpness: bool | None = None,
    ):
        _check_options(criterion, batch_size, dataset_size, batch_sharpness)
        self.hessian = hessian
        self.requested = criterion
        self.criterion = criterion
        self.batch_size = batch_size
        self.dataset_size = dataset_size
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.batch_sharpness = batch_sharpness
        self.breakeven_step: int | None = None
        self._sharpness_batches: list | None = None
        self._preconditioned = PreconditionedSharpness()

    def keys(self) -> list[str]:
        keys = self.hessian.keys() + [
            "breakeven/sharpness_x_lr",
            "breakeven/threshold",
            "breakeven/stability",
        ]
        if self.criterion == "sgd":
            keys.append("breakeven/curvature_variance")
        if self.criterion in stability.PRECONDITIONED:
            keys += [
                "breakeven/preconditioned_sharpness",
                "breakeven/preconditioned_residual",
            ]
        if self._sharpness_batches is not None:
            keys.append("breakeven/batch_sharpness")
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
        self.criterion = resolve_criterion(
            self.requested, optimizer, self.batch_size, self.dataset_size
        )
        eta = _resolve(
            self.learning_rate, lambda: read_learning_rate(optimizer), 0
        )
        if not eta > 0:
            raise ArgumentError(
                f"BreakEven: the learning rate is {eta}; need > 0."
            )
        if self.momentum is None:
            _warn_if_unsupported(optimizer, self.criterion)
        self._sharpness_batches = batch_sharpness_batches(
            self.hessian.operator,
            self.batch_size,
            self.batch_sharpness,
            self.criterion,
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
        kwargs: dict[str, Any] = {"momentum": beta}
        compared = lambda_1
        if self.criterion == "adam":
            kwargs["beta_1"] = float(
                preconditioning.unwrap(model.optimizer).beta_1
            )
        if self.criterion in stability.PRECONDITIONED:
            compared, residual = self._preconditioned(model, self.hessian)
            metrics["breakeven/preconditioned_sharpness"] = compared
            metrics["breakeven/preconditioned_residual"] = residual
        if self.criterion == "sgd":
            variance = self.curvature_variance()
            metrics["breakeven/curvature_variance"] = variance
            kwargs.update(
                curvature_variance=variance,
                batch_size=self.batch_size,
                dataset_size=self.dataset_size,
            )
        if self._sharpness_batches is not None:
            metrics["breakeven/batch_sharpness"] = (
                sharpness.probe_batch_sharpness(
                    self.hessian.operator, self._sharpness_batches
                )
            )
        metrics["breakeven/threshold"] = stability.threshold(
            self.criterion,
            eta,
            momentum=beta,
            beta_1=kwargs.get("beta_1"),
        )
        metrics["breakeven/stability"] = stability.stability_ratio(
            self.criterion, learning_rate=eta, lambda_1=compared, **kwargs
        )
        return Result(metrics)


class BreakEven(MeasurementCallback):
    """Stability of the optimizer's step along the sharpest direction; the
    break-even step.

    At each measurement: lambda_1 (warm-started Lanczos, with its residual
    `hessian/residual_1` and `hessian/converged`), the learning rate eta
    (schedules included) and momentum beta read from the optimizer, and
    what the criterion needs:

    * "full_batch": lambda_1 against 2 (1 + beta) / eta;
    * "sgd" (the paper's eq. 1): also the variance s^2 of the per-example
      curvature along the top eigenvector, `breakeven/curvature_variance`;
    * "adam" (Adam, AdamW): the preconditioned sharpness, the top
      eigenvalue of P^{-1/2} H P^{-1/2} (`breakeven/preconditioned_sharpness`
      and its residual `breakeven/preconditioned_residual`; NaN before the
      first step), against (2 + 2 beta_1) / (eta (1 - beta_1));
    * "rmsprop": the same against 2 (1 + momentum) / eta;
    * "auto" (default): "adam" or "rmsprop" for those optimizers, else
      "sgd" when `batch_size` and `dataset_size` are given, else
      "full_batch".

    Logs `breakeven/sharpness_x_lr` (eta lambda_1), `breakeven/threshold`
    (the criterion's threshold), `breakeven/stability` (see
    `stability.stability_ratio`: >= 1 unstable) and, with SGD criteria and
    `batch_size`, `breakeven/batch_sharpness` (the mean over the probe's
    mini-batches of S of g_B^T H_B g_B / ||g_B||^2,
    `tf_breakeven.sharpness`). The first violating step is
    `breakeven_step` (attribute, and the `breakeven_step` key of that
    record); `on_break_even(step, metrics)` is then called once.

    Args:
        data: probe set.
        criterion: "auto", "full_batch", "sgd", "adam" or "rmsprop".
        batch_size, dataset_size: S and N (N for "sgd" only).
        batch_sharpness: record `breakeven/batch_sharpness`: None (default)
            when `batch_size` is given, the criterion is an SGD one and the
            probe holds a mini-batch (a warning when it does not); True
            requires it; False never.
        on_break_even: optional callable run when the point is reached.
        learning_rate, momentum: override what is read from the optimizer
            (a float or a callable of the step).
        k, num_iterations, tol, warm_start, seed: the Lanczos measurement
            (see `HessianSpectrum`; the preconditioned one uses the same).
        **kwargs: `schedule`, `recorder`, `loss`, `training`, `jit_compile`
            (see `MeasurementCallback`).
    """

    def __init__(
        self,
        data: Any,
        *,
        criterion: str = "auto",
        batch_size: int | None = None,
        dataset_size: int | None = None,
        batch_sharpness: bool | None = None,
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
            batch_sharpness=batch_sharpness,
        )
        super().__init__(measurement, data, **kwargs)
        self.on_break_even = on_break_even

    @property
    def criterion(self) -> str:
        """The criterion in use ("auto" until training begins)."""
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
