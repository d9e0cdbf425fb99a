"""The measurement driver: one Keras callback around one measurement.

A `Measurement` knows what it computes (its keys, its setup, its compute);
`MeasurementCallback` knows when and where the numbers go:

* the schedule (`tf_breakeven.schedules`) decides when to measure, counted
  in global steps (optimizer updates, read from the optimizer at every
  epoch start, so a run resumed by `BackupAndRestore` continues its count);
* a measurement that fails numerically or returns NaN is recorded as NaN
  with a log line, never raised (a diverging run is data);
* every measurement goes to `.latest`, `.records`, an optional `Recorder`
  (JSONL + TensorBoard), and at every epoch end into the epoch logs, so
  `History`, `CSVLogger` (placed after our callbacks) and the progress bar
  show them (NaN until first measured);
* on resume the recorder drops records after the restored step and the
  measurement restores its state from the records that remain.

The per-batch hook is a cheap integer comparison (no host sync): the
expensive work only runs when the schedule fires.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, NamedTuple

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tf_breakeven import recording, schedules
from tf_breakeven.functional import one_log_line
from tf_breakeven.validation import ArgumentError

# Numerical failures of a measurement that mean "NaN", not "bug".
MEASUREMENT_ERRORS = (
    tf.errors.OpError,
    np.linalg.LinAlgError,
    FloatingPointError,
    ZeroDivisionError,
)


@dataclasses.dataclass(frozen=True)
class Probe:
    """The probe set and how the model function is evaluated on it.

    Attributes:
        data: `(x, y[, sample_weight])` or a finite `tf.data.Dataset`.
        loss: None for the compiled loss, or a Keras loss / callable.
        training: measure the training-mode or the inference function.
        jit_compile: compile the measurement functions with XLA.
    """

    data: Any
    loss: Any = None
    training: bool = True
    jit_compile: bool = False


class Result(NamedTuple):
    """What one measurement produced.

    Attributes:
        metrics: scalar values by key.
        histograms: raw values recorded as histograms (e.g. cosines).
        curves: `(x, y)` pairs recorded as curves (e.g. a density).
    """

    metrics: dict[str, float]
    histograms: dict[str, Any] = {}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}


class Measurement:
    """A quantity measured on a probe set: its keys, setup and compute."""

    def keys(self) -> list[str]:
        """The metric keys `compute` returns."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """What is recorded with each record under "config"."""
        return {}

    def setup(self, model: keras.Model, probe: Probe) -> None:
        """Builds operators and validates the probe (at train begin)."""

    def compute(self, model: keras.Model, step: int) -> Result:
        """Measures the current model."""
        raise NotImplementedError

    def restore(self, records: list[dict]) -> None:
        """Restores state from this measurement's records when resuming."""


def compute_or_nan(
    measurement: Measurement,
    model: keras.Model,
    step: int,
    name: str | None = None,
) -> Result:
    """`measurement.compute`, with the NaN policy of the callbacks.

    A numerical failure (`MEASUREMENT_ERRORS`) gives NaN for every key and
    NaN values are logged; neither raises: a diverging run is data. Either
    way the measurement logs one line: the solvers' own warnings are held
    back (`functional.one_log_line`).
    """
    name = name or type(measurement).__name__
    try:
        with one_log_line():
            result = measurement.compute(model, step)
    except MEASUREMENT_ERRORS as error:
        logging.warning(
            "%s at step %d failed (%s); recorded as NaN.", name, step, error
        )
        return Result({key: math.nan for key in measurement.keys()})
    metrics = {k: float(v) for k, v in result.metrics.items()}
    if any(math.isnan(v) for v in metrics.values()):
        logging.warning(
            "%s at step %d: NaN values (diverging run?): %s",
            name,
            step,
            sorted(k for k, v in metrics.items() if math.isnan(v)),
        )
    return result._replace(metrics=metrics)


class MeasurementCallback(keras.callbacks.Callback):
    """Runs a `Measurement` on a schedule during `fit`.

    Args:
        measurement: what to measure.
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
        measurement: Measurement,
        data: Any,
        *,
        schedule: schedules.Schedule | str | int = "epoch",
        recorder: recording.Recorder | str | None = None,
        loss: Any = None,
        training: bool = True,
        jit_compile: bool = False,
    ):
        super().__init__()
        self.measurement = measurement
        self.probe = Probe(data, loss, training, jit_compile)
        self.schedule = schedules.get(schedule)
        self.recorder = recording.as_recorder(recorder)
        self.latest: dict[str, float] = {}
        self.records: list[dict] = []
        self.step = 0  # global steps done (optimizer updates)
        self._epoch = 0
        self._epoch_start = 0  # `step` when the epoch began
        self._last_measured: int | None = None
        self._resumed = False

    @property
    def source(self) -> str:
        """The record source: the callback's class name."""
        return type(self).__name__

    def metric_keys(self) -> list[str]:
        return self.measurement.keys()

    def config(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule.get_config(),
            "training": self.probe.training,
            **self.measurement.config(),
        }

    # Keras hooks.
    def on_train_begin(self, logs=None):
        params = self.params or {}
        epochs = int(params.get("epochs") or 1)
        steps = params.get("steps")
        total = None if steps is None else int(steps) * epochs
        if not self.schedule.fires_within(total, epochs):
            raise ArgumentError(
                f"{self.source}: the schedule {self.schedule.get_config()} "
                f"never fires in this run ({epochs} epochs of {steps} steps); "
                "pass schedule='epoch' or steps within the run."
            )
        self.measurement.setup(self.model, self.probe)
        self._resumed = False
        self.latest = {key: math.nan for key in self.metric_keys()}

    def on_epoch_begin(self, epoch, logs=None):
        # The step is read here, not in on_train_begin: BackupAndRestore
        # restores the optimizer in its own on_train_begin, which may run
        # after ours (docs/pitfalls.md#P18).
        self._epoch = epoch
        optimizer = getattr(self.model, "optimizer", None)
        self.step = (
            int(optimizer.iterations.numpy())
            if optimizer is not None and optimizer.built
            else 0
        )
        self._epoch_start = self.step
        if not self._resumed:
            self._resumed = True
            self._resume()

    def on_train_batch_end(self, batch, logs=None):
        previous, self.step = self.step, self._epoch_start + int(batch) + 1
        if any(
            self.schedule.at_step(s) for s in range(previous + 1, self.step + 1)
        ):
            self.measure()

    def on_epoch_end(self, epoch, logs=None):
        if (
            self.schedule.at_epoch_end(epoch)
            and self._last_measured != self.step
        ):
            self.measure()
        if logs is not None:
            logs.update(self.latest)

    def on_train_end(self, logs=None):
        if self.recorder is not None:
            self.recorder.close()

    def _resume(self) -> None:
        """Drops records after the restored step; restores the state."""
        if self.recorder is None:
            return
        self.recorder.resume(self.step)
        self.measurement.restore(
            self.recorder.records(source=self.source, until_step=self.step)
        )

    def measure(self) -> dict[str, float]:
        """Measures now, records and returns the values."""
        start = time.perf_counter()
        result = compute_or_nan(
            self.measurement, self.model, self.step, self.source
        )
        self.latest.update(result.metrics)
        record = {
            "step": self.step,
            "epoch": self._epoch,
            "source": self.source,
            **result.metrics,
        }
        if self.recorder is not None:
            record = self.recorder.write(
                step=self.step,
                epoch=self._epoch,
                source=self.source,
                metrics=result.metrics,
                config=self.config(),
                histograms=result.histograms,
                curves=result.curves,
            )
        self.records.append(record)
        self._last_measured = self.step
        logging.info(
            "%s at step %d: %.2fs",
            self.source,
            self.step,
            time.perf_counter() - start,
        )
        return result.metrics
