"""Statistics of the probe set's sample-gradient Gram matrix.

The measurement shared by `GradientCovariance` and `GradientConfusion`:
the Gram matrix of micro-batch gradients (`tf_breakeven.gradients`) and
its statistics (`tf_breakeven.statistics`), restricted to the keys of the
callback's prefixes; optionally each block's share `grad_cov/trace/<block>`
of Tr(K), from the same sample gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_breakeven import gradients, statistics
from tf_breakeven.blocks import BlocksLike, variable_blocks
from tf_breakeven.callbacks.base import (
    Measurement,
    MeasurementCallback,
    Probe,
    Result,
)
from tf_breakeven.validation import ArgumentError, check_int

BLOCK_TRACE = "grad_cov/trace/"


class GramMeasurement(Measurement):
    """The Gram statistics (`statistics.metric_keys`) under `prefixes`.

    Args:
        prefixes: which keys to report (e.g. `("confusion/", "probe/")`).
        method: the Gram engine, "auto", "ghost" or "materialize" (see
            `gradients.gradient_gram`).
        microbatch_size: M, examples per sample gradient.
        k: top-k directions of `grad_cov/norm_ratio_top_k`.
        memory_budget: bytes for the sample-gradient rows (materialized)
            or for each layer's part (ghost) held at once.
        cosines: also return the pairwise cosines as a histogram.
        blocks: None, "layer" or a mapping `{name: variables}` (see
            `tf_breakeven.blocks`): also return `grad_cov/trace/<name>`,
            Tr(K) restricted to each block. The names are known from
            `setup` on (they depend on the model). Needs a prefix that
            covers "grad_cov/".
    """

    def __init__(
        self,
        prefixes: Sequence[str],
        *,
        method: str = "auto",
        microbatch_size: int = 1,
        k: int = 5,
        memory_budget: int = gradients.DEFAULT_MEMORY_BUDGET,
        cosines: bool = False,
        blocks: BlocksLike | None = None,
    ):
        self.prefixes = tuple(prefixes)
        self.method = gradients.check_method(method)
        self.microbatch_size = check_int("microbatch_size", microbatch_size, 1)
        self.k = k
        self.memory_budget = memory_budget
        self.cosines = cosines
        self._keys = [
            key
            for key in statistics.metric_keys()
            if key.startswith(self.prefixes)
        ]
        self.blocks = _check_blocks(blocks, self.prefixes)
        self.block_indices: dict[str, list[int]] = {}
        self.probe: Probe | None = None
        self.last_cosines: np.ndarray | None = None

    def keys(self) -> list[str]:
        return self._keys + [BLOCK_TRACE + name for name in self.block_indices]

    def config(self) -> dict[str, Any]:
        config = {
            "method": self.method,
            "microbatch_size": self.microbatch_size,
            "k": self.k,
        }
        if self.blocks is not None:
            config["blocks"] = list(self.block_indices)
        return config

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
        if self.blocks is not None:
            self.block_indices = variable_blocks(model, self.blocks)
        self.probe = probe

    def compute(self, model: keras.Model, step: int) -> Result:
        probe = self.probe
        rows = gradients.sample_rows(
            model,
            probe.data,
            method=self.method,
            microbatch_size=self.microbatch_size,
            loss=probe.loss,
            training=probe.training,
            memory_budget=self.memory_budget,
            jit_compile=probe.jit_compile,
        )
        gram = rows.gram()
        stats = gradients.statistics_from_gram(
            gram, microbatch_size=self.microbatch_size, k=self.k
        )
        metrics = {key: stats[key] for key in self._keys}
        if self.block_indices:
            traces = rows.block_traces(self.block_indices)
            metrics.update(
                {BLOCK_TRACE + name: value for name, value in traces.items()}
            )
        histograms = {}
        if self.cosines:
            self.last_cosines = statistics.pairwise_cosines(gram)
            histograms["confusion/cosines"] = self.last_cosines
        return Result(metrics, histograms)


def _check_blocks(
    blocks: BlocksLike | None, prefixes: tuple[str, ...]
) -> BlocksLike | None:
    """`blocks`, unless the prefixes would drop the keys it asks for."""
    if blocks is not None and not BLOCK_TRACE.startswith(prefixes):
        raise ArgumentError(
            f"`blocks` adds the keys {BLOCK_TRACE}<block>, which a "
            f"measurement of {prefixes} does not report; pass `blocks` to "
            "GradientCovariance."
        )
    return blocks


class GramCallback(MeasurementCallback):
    """A callback of Gram statistics: the keys under `prefixes`.

    Subclasses set `prefixes` (and `cosines` to record the pairwise cosine
    histogram) and document their keys.

    Args:
        data: probe set.
        method: the Gram engine: "auto" (default: the ghost engine when
            it is the cheaper one for the model, else sample gradients),
            "ghost" or "materialize"; see `gradients.gradient_gram`.
        microbatch_size: M, examples per sample gradient.
        k: top-k directions of `grad_cov/norm_ratio_top_k`.
        memory_budget: bytes for the sample-gradient rows held at once.
        blocks: None (default), "layer" or a mapping `{name: variables}`
            of trainable variables or their `.path` strings (see
            `tf_breakeven.blocks`): also log `grad_cov/trace/<name>`, the
            share Tr(K_b) of `grad_cov/trace` carried by each block's
            parameters (`gradients.gradient_trace_by_block`), from the
            same sample gradients as the Gram matrix. Blocks that
            partition the parameters ("layer") sum to `grad_cov/trace`.
            Only callbacks logging "grad_cov/" keys (`GradientCovariance`)
            accept it; the names are resolved against the model when
            training begins.
        **kwargs: `schedule`, `recorder`, `loss`, `training`, `jit_compile`
            (see `MeasurementCallback`).
    """

    prefixes: tuple[str, ...] = ()
    cosines_histogram: bool = False

    def __init__(
        self,
        data: Any,
        *,
        method: str = "auto",
        microbatch_size: int = 1,
        k: int = 5,
        memory_budget: int = gradients.DEFAULT_MEMORY_BUDGET,
        blocks: BlocksLike | None = None,
        **kwargs: Any,
    ):
        measurement = GramMeasurement(
            self.prefixes,
            method=method,
            microbatch_size=microbatch_size,
            k=k,
            memory_budget=memory_budget,
            cosines=self.cosines_histogram,
            blocks=blocks,
        )
        super().__init__(measurement, data, **kwargs)
