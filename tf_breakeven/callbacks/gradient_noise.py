"""Statistics of the probe set's sample-gradient Gram matrix.

The measurement shared by `GradientCovariance` and `GradientConfusion`:
the Gram matrix of micro-batch gradients (`tf_breakeven.gradients`) and
its statistics (`tf_breakeven.statistics`), restricted to the keys of the
callback's prefixes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_breakeven import gradients, statistics
from tf_breakeven.callbacks.base import (
    Measurement,
    MeasurementCallback,
    Probe,
    Result,
)
from tf_breakeven.validation import ArgumentError, check_int


class GramMeasurement(Measurement):
    """The Gram statistics (`statistics.metric_keys`) under `prefixes`.

    Args:
        prefixes: which keys to report (e.g. `("confusion/", "probe/")`).
        microbatch_size: M, examples per sample gradient.
        k: top-k directions of `grad_cov/norm_ratio_top_k`.
        memory_budget: bytes for the sample-gradient rows held at once.
        cosines: also return the pairwise cosines as a histogram.
    """

    def __init__(
        self,
        prefixes: Sequence[str],
        *,
        microbatch_size: int = 1,
        k: int = 5,
        memory_budget: int = gradients.DEFAULT_MEMORY_BUDGET,
        cosines: bool = False,
    ):
        self.prefixes = tuple(prefixes)
        self.microbatch_size = check_int("microbatch_size", microbatch_size, 1)
        self.k = k
        self.memory_budget = memory_budget
        self.cosines = cosines
        self._keys = [
            key
            for key in statistics.metric_keys()
            if key.startswith(self.prefixes)
        ]
        self.probe: Probe | None = None
        self.last_cosines: np.ndarray | None = None

    def keys(self) -> list[str]:
        return list(self._keys)

    def config(self) -> dict[str, Any]:
        return {"microbatch_size": self.microbatch_size, "k": self.k}

    def setup(self, model: keras.Model, probe: Probe) -> None:
        # Validates the probe (divisibility, BN with M = 1, shapes) now
        # rather than at the first measurement.
        samples = gradients.prepare_samples(
            model, probe.data, self.microbatch_size, probe.training
        )
        n = tf.nest.flatten(samples.x)[0].shape[0]
        if n < 2:
            raise ArgumentError(
                f"The probe set gives {n} sample gradient(s) of "
                f"{self.microbatch_size} examples; the statistics need at "
                "least 2: use a larger probe set or a smaller "
                "microbatch_size."
            )
        self.probe = probe

    def compute(self, model: keras.Model, step: int) -> Result:
        probe = self.probe
        gram = gradients.gradient_gram(
            model,
            probe.data,
            microbatch_size=self.microbatch_size,
            loss=probe.loss,
            training=probe.training,
            memory_budget=self.memory_budget,
            jit_compile=probe.jit_compile,
        )
        stats = gradients.statistics_from_gram(
            gram, microbatch_size=self.microbatch_size, k=self.k
        )
        histograms = {}
        if self.cosines:
            self.last_cosines = statistics.pairwise_cosines(gram)
            histograms["confusion/cosines"] = self.last_cosines
        return Result({key: stats[key] for key in self._keys}, histograms)


class GramCallback(MeasurementCallback):
    """A callback of Gram statistics: the keys under `prefixes`.

    Subclasses set `prefixes` (and `cosines` to record the pairwise cosine
    histogram) and document their keys.

    Args:
        data: probe set.
        microbatch_size: M, examples per sample gradient.
        k: top-k directions of `grad_cov/norm_ratio_top_k`.
        memory_budget: bytes for the sample-gradient rows held at once.
        **kwargs: `schedule`, `recorder`, `loss`, `training`, `jit_compile`
            (see `MeasurementCallback`).
    """

    prefixes: tuple[str, ...] = ()
    cosines_histogram: bool = False

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
            cosines=self.cosines_histogram,
        )
        super().__init__(measurement, data, **kwargs)
