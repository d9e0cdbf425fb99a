"""`GradientConfusion`: pairwise cosines of sample gradients."""

from __future__ import annotations

from typing import Any

import numpy as np

from tf_breakeven import gradients
from tf_breakeven.callbacks.base import MeasurementCallback
from tf_breakeven.callbacks.gradient_noise import GramMeasurement


class GradientConfusion(MeasurementCallback):
    """Gradient confusion and pairwise cosine similarities.

    The confusion paper's protocol with the probe set split into
    mini-batches of `microbatch_size` examples (e.g. 128), or single
    examples (1): logs `confusion/*` keys over all pairs, and records the
    cosine histogram (TensorBoard histogram `confusion/cosines`; the JSONL
    record holds counts over 100 bins in [-1, 1]).

    Args:
        data: probe set.
        microbatch_size: M, examples per sample gradient.
        k: kept for symmetry with `GradientCovariance` (recorded).
        memory_budget: bytes for the sample-gradient rows held at once.
        **kwargs: `schedule`, `recorder`, `loss`, `training`, `jit_compile`
            (see `MeasurementCallback`).
    """

    prefixes = ("confusion/", "probe/")

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
            cosines=True,
        )
        super().__init__(measurement, data, **kwargs)

    @property
    def cosines(self) -> np.ndarray | None:
        """The pairwise cosines of the last measurement."""
        return self.measurement.last_cosines
