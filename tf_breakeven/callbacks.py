"""Keras callbacks that measure curvature and gradient noise during `fit`.

Each callback owns a probe set, a schedule (`tf_breakeven.schedules`) and
optionally a `Recorder`. When its schedule fires it measures, keeps the
values in `.latest` and `.records`, writes a record, and at every epoch end
puts the latest values into the epoch logs, so `History`, `CSVLogger` and
the progress bar show them (place our callbacks before `CSVLogger` in the
list; keys are present from the first epoch on, NaN until measured).

Measurements never change training (they run through
`model.stateless_call`), never raise on a diverging run (NaN values are
recorded as such, with a log line), and check their configuration in
`on_train_begin`, raising `ValueError` with the fix.

Note: a callback that overrides a per-batch hook turns off Keras' async
dispatch of batch callbacks; the hook here is a cheap integer check and the
expensive work only runs when the schedule fires.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tf_breakeven import gradients as gradients_lib
from tf_breakeven import recording, schedules, stability, statistics
from tf_breakeven.hessian import HessianOperator

_MEASUREMENT_ERRORS = (
    tf.errors.OpError,
    np.linalg.LinAlgError,
    FloatingPointError,
    ZeroDivisionError,
)


def _as_recorder(recorder: Any) -> recording.Recorder | None:
    if recorder is None or isinstance(recorder, recording.Recorder):
        return recorder
    return recording.Recorder(path=recorder)


class MeasurementCallback(keras.callbacks.Callback):
    """Base class: schedule, step counting, records and epoch logs.

    Subclasses implement `metric_keys()` and `compute()`.

    Args:
        data: the probe set, `(x, y[, sample_weight])` or a finite
            `tf.data.Dataset` of such batches.
        schedule: a `Schedule`, "epoch", or an int n (every n steps).
        recorder: a `Recorder`, a JSONL path, or None.
        loss: None for the compiled loss, or a Keras loss / callable.
        training: measure the training-mode (default) or inference function.
        jit_compile: compile the measurement functions with XLA (TPUs need
            it; slower on CPU).
    """

    def __init__(
        self,
        data: Any,
        *,
        schedule: schedules.Schedule | str | int = "epoch",
        recorder: recording.Recorder | str | None = None,
        loss: Any = None,
        training: bool = True,
        jit_compile: bool = False,
    ):
        super().__init__()
        self.data = data
        self.schedule = schedules.get(schedule)
        self.recorder = _as_recorder(recorder)
        self.loss = loss
        self.training = training
        self.jit_compile = jit_compile
        self.latest: dict[str, float] = {}
        self.records: list[dict] = []
        self._step = 0
        self._epoch = 0
        self._epoch_start_step = 0
        self._last_measured_step: int | None = None

    @property
    def source(self) -> str:
        return type(self).__name__

    # To implement.
    def metric_keys(self) -> list[str]:
        raise NotImplementedError

    def compute(self) -> tuple[dict[str, float], dict[str, Any]]:
        """Returns (metrics, arrays) measured on the current model.

        `arrays` maps keys to raw values (recorded as histograms) or to
        `(x, y)` tuples (recorded as curves).
        """
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule.get_config(),
            "training": self.training,
        }

    def setup(self) -> None:
        """Builds operators and validates data; called in on_train_begin."""

    # Keras hooks.
    def on_train_begin(self, logs=None):
        params = self.params or {}
        epochs = int(params.get("epochs") or 1)
        steps = params.get("steps")
        total = None if steps is None else int(steps) * epochs
        if not self.schedule.fires_within(total, epochs):
            raise ValueError(
                f"{self.source}: the schedule {self.schedule.get_config()} "
                f"never fires in this run ({epochs} epochs of {steps} steps); "
                "pass schedule='epoch' or steps within the run."
            )
        self.setup()
        self._synced = False
        self.latest = {key: math.nan for key in self.metric_keys()}

    def restored_state(self) -> dict[str, float]:
        """Values to restore from existing records when resuming."""
        return {}

    def _sync_step(self) -> None:
        # Read here, not in on_train_begin: BackupAndRestore restores the
        # optimizer in its own on_train_begin, which may run after ours.
        optimizer = getattr(self.model, "optimizer", None)
        self._step = (
            int(optimizer.iterations.numpy())
            if optimizer is not None and optimizer.built
            else 0
        )
        if not self._synced:
            self._synced = True
            if self.recorder is not None:
                self.recorder.resume(self._step)
            self.latest.update(self.restored_state())

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._sync_step()
        self._epoch_start_step = self._step

    def on_train_batch_end(self, batch, logs=None):
        step = self._epoch_start_step + int(batch) + 1
        previous, self._step = self._step, step
        if any(self.schedule.at_step(s) for s in range(previous + 1, step + 1)):
            self.measure()

    def on_epoch_end(self, epoch, logs=None):
        if (
            self.schedule.at_epoch_end(epoch)
            and self._last_measured_step != self._step
        ):
            self.measure()
        if logs is not None:
            logs.update(self.latest)

    def on_train_end(self, logs=None):
        if self.recorder is not None:
            self.recorder.close()

    def measure(self) -> dict[str, float]:
        """Measures now, records and returns the values."""
        start = time.perf_counter()
        arrays: dict[str, Any] = {}
        try:
            metrics, arrays = self.compute()
        except _MEASUREMENT_ERRORS as error:
            metrics = {key: math.nan for key in self.metric_keys()}
            logging.warning(
                "%s at step %d failed (%s); recorded as NaN.",
                self.source,
                self._step,
                error,
            )
        metrics = {k: float(v) for k, v in metrics.items()}
        if any(math.isnan(v) for v in metrics.values()):
            logging.warning(
                "%s at step %d: NaN values (diverging run?): %s",
                self.source,
                self._step,
                sorted(k for k, v in metrics.items() if math.isnan(v)),
            )
        self.latest.update(metrics)
        record = {
            "step": self._step,
            "epoch": self._epoch,
            "source": self.source,
            **metrics,
        }
        if self.recorder is not None:
            record = self.recorder.write(
                step=self._step,
                epoch=self._epoch,
                source=self.source,
                metrics=metrics,
                config=self.config(),
                histograms={
                    k: v for k, v in arrays.items() if not isinstance(v, tuple)
                },
                curves={
                    k: v for k, v in arrays.items() if isinstance(v, tuple)
                },
            )
        self.records.append(record)
        self._last_measured_step = self._step
        logging.info(
            "%s at step %d: %.2fs",
            self.source,
            self._step,
            time.perf_counter() - start,
        )
        return metrics


class HessianSpectrum(MeasurementCallback):
    """Top-k Hessian eigenvalues on a probe set (Lanczos).

    Logs `hessian/lambda_1` ... `hessian/lambda_k`, and optionally
    `hessian/trace` (Hutch++), `hessian/lambda_min` (smallest eigenvalue)
    and the spectral density (recorded as a TensorBoard histogram).

    Args:
        data: probe set.
        k: number of top eigenvalues.
        num_iterations: Lanczos steps (None: `linalg.eigsh`'s default).
        warm_start: start Lanczos from the previous top eigenvector; with
            few `num_iterations` this is the cheap tracking mode.
        trace: also estimate Tr(H) with `trace_samples` HVPs.
        smallest: also compute the smallest eigenvalue.
        density: also compute the SLQ spectral density.
        seed: solver seed (the same for every measurement).
        **kwargs: `schedule`, `recorder`, `loss`, `training`.
    """

    def __init__(
        self,
        data: Any,
        k: int = 1,
        *,
        num_iterations: int | None = None,
        warm_start: bool = True,
        trace: bool = False,
        trace_samples: int = 30,
        smallest: bool = False,
        density: bool = False,
        seed: int = 0,
        **kwargs: Any,
    ):
        super().__init__(data, **kwargs)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"`k` must be an int >= 1; got {k!r}.")
        self.k = k
        self.num_iterations = num_iterations
        self.warm_start = warm_start
        self.trace = trace
        self.trace_samples = trace_samples
        self.smallest = smallest
        self.density = density
        self.seed = seed
        self.operator: HessianOperator | None = None
        self.top_eigenvector: list[tf.Tensor] | None = None

    def metric_keys(self) -> list[str]:
        keys = [f"hessian/lambda_{i + 1}" for i in range(self.k)]
        if self.trace:
            keys.append("hessian/trace")
        if self.smallest:
            keys.append("hessian/lambda_min")
        return keys

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "k": self.k,
            "num_iterations": self.num_iterations,
            "warm_start": self.warm_start,
            "num_examples": self.operator.num_examples
            if self.operator
            else None,
        }

    def setup(self) -> None:
        if (
            self.operator is None
            or self.operator.function.model is not self.model
        ):
            self.operator = HessianOperator(
                self.model,
                self.data,
                loss=self.loss,
                training=self.training,
                jit_compile=self.jit_compile,
            )
        if self.k > self.operator.dim:
            raise ValueError(
                f"k={self.k} exceeds the {self.operator.dim} parameters of "
                "the model; pass a smaller k."
            )

    def _top(self):
        start = self.top_eigenvector if self.warm_start else None
        pairs = self.operator.eigenpairs(
            self.k,
            num_iterations=self.num_iterations,
            seed=self.seed,
            start_vector=start,
        )
        finite = np.all(np.isfinite(pairs.eigenvalues))
        self.top_eigenvector = pairs.eigenvectors[0] if finite else None
        return pairs

    def compute(self):
        pairs = self._top()
        metrics = {
            f"hessian/lambda_{i + 1}": float(v)
            for i, v in enumerate(pairs.eigenvalues)
        }
        histograms = {}
        if self.trace:
            metrics["hessian/trace"] = self.operator.trace(
                num_samples=self.trace_samples, seed=self.seed
            )
        if self.smallest:
            metrics["hessian/lambda_min"] = float(
                self.operator.eigenpairs(
                    1, which="smallest", seed=self.seed
                ).eigenvalues[0]
            )
        if self.density:
            grid, density = self.operator.spectral_density(
                num_iterations=min(80, self.operator.dim),
                seed=self.seed,
                grid=200,
            )
            histograms["hessian/density"] = (grid, density)
        self._pairs = pairs
        return metrics, histograms


def _learning_rate(optimizer) -> float:
    value = getattr(optimizer, "learning_rate", None)
    if value is None:
        raise ValueError(
            f"BreakEven cannot read a learning rate from {optimizer!r}; use "
            "a keras.optimizers optimizer or pass `learning_rate=`."
        )
    return float(keras.ops.convert_to_numpy(value))


class BreakEven(HessianSpectrum):
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
        **kwargs: those of `HessianSpectrum`.
    """

    def __init__(
        self,
        data: Any,
        *,
        criterion: str = "full_batch",
        batch_size: int | None = None,
        dataset_size: int | None = None,
        on_break_even: Callable[[int, Mapping[str, float]], None] | None = None,
        learning_rate: float | Callable[[int], float] | None = None,
        momentum: float | Callable[[int], float] | None = None,
        **kwargs: Any,
    ):
        super().__init__(data, **kwargs)
        if criterion not in stability.CRITERIA:
            raise ValueError(
                f"`criterion` must be one of {stability.CRITERIA}; got "
                f"{criterion!r}."
            )
        if criterion == "sgd" and (batch_size is None or dataset_size is None):
            raise ValueError(
                "criterion='sgd' needs the batch size S and training-set "
                "size N: pass batch_size=... and dataset_size=...."
            )
        self.criterion = criterion
        self.batch_size = batch_size
        self.dataset_size = dataset_size
        self.on_break_even = on_break_even
        self._learning_rate = learning_rate
        self._momentum = momentum
        self.breakeven_step: int | None = None

    def metric_keys(self) -> list[str]:
        keys = super().metric_keys() + [
            "breakeven/sharpness_x_lr",
            "breakeven/threshold",
            "breakeven/stability",
        ]
        if self.criterion == "sgd":
            keys.append("breakeven/curvature_variance")
        return keys

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "criterion": self.criterion,
            "batch_size": self.batch_size,
            "dataset_size": self.dataset_size,
        }

    def _hyper(self, override, read) -> float:
        if override is None:
            return read()
        return float(override(self._step) if callable(override) else override)

    def setup(self) -> None:
        super().setup()
        optimizer = getattr(self.model, "optimizer", None)
        if self._learning_rate is None and optimizer is None:
            raise ValueError(
                "BreakEven needs a compiled model (to read the learning rate)"
                " or `learning_rate=`."
            )
        eta = self._hyper(
            self._learning_rate, lambda: _learning_rate(optimizer)
        )
        if not eta > 0:
            raise ValueError(
                f"BreakEven: the learning rate is {eta}; need > 0."
            )
        if self._momentum is None and not isinstance(
            optimizer, keras.optimizers.SGD
        ):
            logging.warning(
                "BreakEven: %s is not SGD; the stability thresholds assume "
                "SGD with heavy-ball momentum (taken as 0 here).",
                type(optimizer).__name__,
            )

    def restored_state(self) -> dict[str, float]:
        if self.recorder is None or not self.recorder.path:
            return {}
        records = [
            r
            for r in recording.read_records(self.recorder.path, self.source)
            if r["step"] <= self._step
        ]
        self.breakeven_step = stability.find_break_even(
            records, criterion=self.criterion
        )
        return {}

    def compute(self):
        metrics, histograms = super().compute()
        optimizer = self.model.optimizer
        eta = self._hyper(
            self._learning_rate, lambda: _learning_rate(optimizer)
        )
        beta = self._hyper(
            self._momentum, lambda: float(getattr(optimizer, "momentum", 0.0))
        )
        lambda_1 = metrics["hessian/lambda_1"]
        metrics["breakeven/sharpness_x_lr"] = eta * lambda_1
        metrics["breakeven/threshold"] = stability.momentum_threshold(eta, beta)
        kwargs = {}
        if self.criterion == "sgd":
            variance = math.nan
            if self.top_eigenvector is not None:
                curvature = self.operator.directional_curvature(
                    self.top_eigenvector
                ).numpy()
                variance = float(np.var(curvature.astype(np.float64)))
            metrics["breakeven/curvature_variance"] = variance
            kwargs = {
                "curvature_variance": variance,
                "batch_size": self.batch_size,
                "dataset_size": self.dataset_size,
            }
        ratio = stability.stability_ratio(
            self.criterion,
            learning_rate=eta,
            lambda_1=lambda_1,
            momentum=beta,
            **kwargs,
        )
        metrics["breakeven/stability"] = ratio
        return metrics, histograms

    def measure(self) -> dict[str, float]:
        metrics = super().measure()
        ratio = metrics.get("breakeven/stability", math.nan)
        if self.breakeven_step is None and stability.is_unstable(
            self.criterion, ratio
        ):
            self.breakeven_step = self._step
            self.records[-1]["breakeven_step"] = self._step
            if self.recorder is not None:
                self.recorder.write(
                    step=self._step,
                    epoch=self._epoch,
                    source=f"{self.source}/event",
                    metrics={"breakeven_step": self._step},
                    config=self.config(),
                )
            logging.info("Break-even point reached at step %d.", self._step)
            if self.on_break_even is not None:
                self.on_break_even(self._step, dict(metrics))
        return metrics


class _GramCallback(MeasurementCallback):
    """Shared machinery of the Gram-matrix callbacks."""

    prefixes: Sequence[str] = ()

    def __init__(
        self,
        data: Any,
        *,
        microbatch_size: int = 1,
        k: int = 5,
        memory_budget: int = gradients_lib.DEFAULT_MEMORY_BUDGET,
        **kwargs: Any,
    ):
        super().__init__(data, **kwargs)
        if isinstance(microbatch_size, bool) or microbatch_size < 1:
            raise ValueError(
                f"`microbatch_size` must be >= 1; got {microbatch_size!r}."
            )
        self.microbatch_size = microbatch_size
        self.k = k
        self.memory_budget = memory_budget
        self._keys = [
            key
            for key in statistics.gram_statistics(np.eye(2), k=1)
            if key.startswith(tuple(self.prefixes))
        ]

    def metric_keys(self) -> list[str]:
        return list(self._keys)

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "microbatch_size": self.microbatch_size,
            "k": self.k,
        }

    def setup(self) -> None:
        # Validates the probe (divisibility, BN with M = 1, shapes) now
        # rather than at the first measurement.
        gradients_lib._prepare(
            self.model, self.data, self.microbatch_size, self.training
        )

    def compute(self):
        gram = gradients_lib.gradient_gram(
            self.model,
            self.data,
            microbatch_size=self.microbatch_size,
            loss=self.loss,
            training=self.training,
            memory_budget=self.memory_budget,
            jit_compile=self.jit_compile,
        )
        stats = statistics.gram_statistics(
            gram, microbatch_size=self.microbatch_size, k=self.k
        )
        metrics = {key: stats[key] for key in self._keys}
        return metrics, self.histograms(gram)

    def histograms(self, gram: np.ndarray) -> dict[str, Any]:
        return {}


class GradientCovariance(_GramCallback):
    """Spectrum and conditioning of the gradient covariance K.

    Logs the `grad_cov/*`, `grad_cov_uncentered/*`, `grad/*` and `probe/*`
    keys of `tf_breakeven.statistics.gram_statistics`, from gradients of
    micro-batches of `microbatch_size` examples (the paper: M = 128 on ~5%
    of the training set).
    """

    prefixes = ("grad_cov/", "grad_cov_uncentered/", "grad/", "probe/")


class GradientConfusion(_GramCallback):
    """Gradient confusion and pairwise cosine similarities.

    The confusion paper's protocol with the probe set split into
    mini-batches of `microbatch_size` examples (e.g. 128), or single
    examples (1): logs `confusion/*` keys over all pairs, and records the
    cosine histogram (TensorBoard histogram `confusion/cosines`; the JSONL
    record holds counts over 100 bins in [-1, 1]).
    """

    prefixes = ("confusion/", "probe/")

    def histograms(self, gram: np.ndarray) -> dict[str, Any]:
        cosines = statistics.pairwise_cosines(gram)
        self.cosines = cosines
        return {"confusion/cosines": cosines}
