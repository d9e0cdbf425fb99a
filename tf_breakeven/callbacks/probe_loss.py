"""`ProbeLoss`: the loss on the probe set, at the measurements' steps.

Comparing runs "at equal training loss" (the break-even paper's second
conjecture: runs at different learning rates reach a loss at different
steps) needs the training loss at the steps where the other quantities
were measured, not the epoch's running mean that Keras logs. `ProbeLoss`
records it, on the same schedule as the other callbacks.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from tf_breakeven import functional
from tf_breakeven.callbacks.base import (
    Measurement,
    MeasurementCallback,
    Probe,
    Result,
)

KEY = "probe/loss"


class ProbeLossMeasurement(Measurement):
    """`probe/loss`: the mean over the probe's examples of `w_i * l_i`
    (plus the regularization losses), the loss the other measurements
    differentiate. One traced function per batch shape."""

    def __init__(self):
        self._function: functional.ModelFunction | None = None
        self._batches: list[functional.Batch] = []
        self._loss_sum = None

    def keys(self) -> list[str]:
        return [KEY]

    def setup(self, model: keras.Model, probe: Probe) -> None:
        self._function = functional.ModelFunction(
            model, probe.loss, training=probe.training
        )
        self._batches = functional.probe_batches(probe.data)
        self._num_examples = functional.num_examples(self._batches)
        self._loss_sum = tf.function(
            self._function.loss_sum,
            jit_compile=probe.jit_compile,
            reduce_retracing=True,
        )

    def compute(self, model: keras.Model, step: int) -> Result:
        params = self._function.primal_parameters()
        state = self._function.read_state()
        total = tf.add_n(
            [self._loss_sum(params, state, batch) for batch in self._batches]
        )
        return Result({KEY: float(total) / self._num_examples})


class ProbeLoss(MeasurementCallback):
    """Logs `probe/loss`, the model's loss on the probe set.

    The probe is usually a seeded subset of the training set (see
    `tf_breakeven.make_probe`), so this is the training loss at exactly the
    measured steps. It runs through `model.stateless_call`, like every
    measurement: no variable, moving statistic or seed state changes.

    Args:
        data: the probe set, `(x, y[, sample_weight])` or a finite
            `tf.data.Dataset` of batches.
        training: False (default): the inference-mode loss (dropout off,
            BatchNormalization with its moving statistics), as
            `model.evaluate` reports it; True: the function SGD optimizes
            (dropout masks from the model's seed state, fixed per step).
        **kwargs: `schedule`, `recorder`, `loss`, `jit_compile` (see
            `MeasurementCallback`).
    """

    def __init__(self, data: Any, *, training: bool = False, **kwargs: Any):
        super().__init__(
            ProbeLossMeasurement(), data, training=training, **kwargs
        )
