"""`GradientCovariance`: spectrum and conditioning of the covariance K."""

from __future__ import annotations

from typing import Any

from tf_breakeven import gradients
from tf_breakeven.callbacks.base import MeasurementCallback
from tf_breakeven.callbacks.gradient_noise import GramMeasurement


class GradientCovariance(MeasurementCallback):
    """Spectrum and conditioning of the gradient covariance K.

    Logs the `grad_cov/*`, `grad_cov_uncentered/*`, `grad/*` and `probe/*`
    keys of `tf_breakeven.statistics.gram_statistics`, from gradients of
    micro-batches of `microbatch_size` examples (the paper: M = 128 on ~5%
    of the training set).

    Args:
        data: probe set.
        microbatch_size: M, examples per sample gradient.
        k: top-k directions of `grad_cov/norm_ratio_top_k`.
        memory_budget: bytes for the sample-gradient rows held at once.
        **kwargs: `schedule`, `recorder`, `loss`, `training`, `jit_compile`
            (see `MeasurementCallback`).
    """

    prefixes = ("grad_cov/", "grad_cov_uncentered/", "grad/", "probe/")

    def __init__(
        self,
        data: Any,
        *,
        microbatch_size: int = 1,
        k: int = 5,
        memory_budget: int = gradients.DEFAULT_MEMORY_BUDGET,
        **kwargs: Any,
    ):
        measurement = GramMeasurement(
            self.prefixes,
            microbatch_size=microbatch_size,
            k=k,
            memory_budget=memory_budget,
        )
        super().__init__(measurement, data, **kwargs)
