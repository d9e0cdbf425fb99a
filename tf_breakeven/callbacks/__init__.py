"""Keras callbacks that measure curvature and gradient noise during `fit`.

One driver (`base.MeasurementCallback`: schedule, step, resume, NaN policy,
recorder, epoch logs) runs one measurement (`base.Measurement`: keys,
setup, compute) per callback, one file each:

* `HessianSpectrum` (`hessian_spectrum.py`): top-k eigenvalues, trace,
  smallest eigenvalue, density;
* `BreakEven` (`break_even.py`): a Hessian measurement composed with a
  stability criterion, and the break-even step;
* `GradientCovariance` (`gradient_covariance.py`) and `GradientConfusion`
  (`gradient_confusion.py`): statistics of the sample-gradient Gram
  matrix (`gradient_noise.py`);
* `ProbeLoss` (`probe_loss.py`): the loss on the probe set at the same
  steps (to compare runs at equal training loss).

Measurements never change training (they run through
`model.stateless_call`), never raise on a diverging run (NaN values are
recorded as such, with a log line), and check their configuration in
`on_train_begin`, raising `ValueError` with the fix.
"""

from tf_breakeven.callbacks.base import (
    Measurement,
    MeasurementCallback,
    Probe,
    Result,
)
from tf_breakeven.callbacks.break_even import (
    BreakEven,
    StabilityMeasurement,
    read_learning_rate,
    read_momentum,
)
from tf_breakeven.callbacks.gradient_confusion import GradientConfusion
from tf_breakeven.callbacks.gradient_covariance import GradientCovariance
from tf_breakeven.callbacks.gradient_noise import GramCallback, GramMeasurement
from tf_breakeven.callbacks.hessian_spectrum import (
    HessianSpectrum,
    HessianSpectrumMeasurement,
    TopEigenpairs,
)
from tf_breakeven.callbacks.probe_loss import ProbeLoss

__all__ = [
    "BreakEven",
    "GradientConfusion",
    "GradientCovariance",
    "GramCallback",
    "GramMeasurement",
    "HessianSpectrum",
    "HessianSpectrumMeasurement",
    "Measurement",
    "MeasurementCallback",
    "Probe",
    "ProbeLoss",
    "Result",
    "StabilityMeasurement",
    "TopEigenpairs",
    "read_learning_rate",
    "read_momentum",
]
