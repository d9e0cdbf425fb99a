"""Top Hessian eigenvalues (and trace, smallest eigenvalue, density)."""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_breakeven import linalg, sharpness, spectrum
from tf_breakeven.blocks import BlocksLike
from tf_breakeven.callbacks.base import (
    Measurement,
    MeasurementCallback,
    Probe,
    Result,
)
from tf_breakeven.functional import rebatch
from tf_breakeven.hessian import (
    BlockHessianOperator,
    HessianOperator,
    block_operators,
)
from tf_breakeven.validation import ArgumentError, check_int


class TopEigenpairs(Measurement):
    """`hessian/lambda_1..k` by Lanczos, optionally warm-started.

    Also records each pair's residual norm `hessian/residual_1..k` (an
    eigenvalue of H lies within it), `hessian/converged` (1.0 when every
    pair met `tol`, else 0.0) and `hessian/lanczos_steps`.

    Attributes:
        operator: the `HessianOperator` on the probe (after `setup`).
        top_eigenvector: the last measured top eigenvector, or None (also
            after a non-finite measurement, so the next one starts fresh).
        pairs: the last `spectrum.Eigenpairs`.
    """

    def __init__(
        self,
        k: int = 1,
        *,
        num_iterations: int | None = None,
        tol: float = spectrum.DEFAULT_TOL,
        warm_start: bool = True,
        seed: int = 0,
    ):
        self.k = check_int("k", k, 1)
        self.num_iterations = num_iterations
        self.tol = linalg.check_tol(tol)
        self.warm_start = warm_start
        self.seed = seed
        self.operator: HessianOperator | None = None
        self.top_eigenvector: list[tf.Tensor] | None = None
        self.pairs: spectrum.Eigenpairs | None = None

    def keys(self) -> list[str]:
        return (
            [f"hessian/lambda_{i + 1}" for i in range(self.k)]
            + [f"hessian/residual_{i + 1}" for i in range(self.k)]
            + ["hessian/converged", "hessian/lanczos_steps"]
        )

    def config(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "num_iterations": self.num_iterations,
            "tol": self.tol,
            "warm_start": self.warm_start,
            "num_examples": self.operator.num_examples
            if self.operator
            else None,
        }

    def setup(self, model: keras.Model, probe: Probe) -> None:
        if self.operator is None or self.operator.function.model is not model:
            self.operator = HessianOperator(
                model,
                probe.data,
                loss=probe.loss,
                training=probe.training,
                jit_compile=probe.jit_compile,
            )
        if self.k > self.operator.dim:
            raise ArgumentError(
                f"k={self.k} exceeds the {self.operator.dim} parameters of "
                "the model; pass a smaller k."
            )

    def compute(self, model: keras.Model, step: int) -> Result:
        start = self.top_eigenvector if self.warm_start else None
        pairs = spectrum.eigenpairs(
            self.operator,
            self.k,
            num_iterations=self.num_iterations,
            tol=self.tol,
            seed=self.seed,
            start_vector=start,
        )
        finite = np.all(np.isfinite(pairs.eigenvalues))
        self.top_eigenvector = pairs.eigenvectors[0] if finite else None
        self.pairs = pairs
        metrics = {
            f"hessian/lambda_{i + 1}": float(v)
            for i, v in enumerate(pairs.eigenvalues)
        }
        metrics.update(
            {
                f"hessian/residual_{i + 1}": float(r) if finite else math.nan
                for i, r in enumerate(pairs.residuals)
            }
        )
        metrics["hessian/converged"] = (
            float(np.all(pairs.converged)) if finite else math.nan
        )
        metrics["hessian/lanczos_steps"] = float(pairs.num_iterations)
        return Result(metrics)


class HessianSpectrumMeasurement(TopEigenpairs):
    """Top-k eigenvalues plus optional trace, smallest, density, per-block
    top eigenvalues, the spread over probe splits and gradient alignment."""

    def __init__(
        self,
        k: int = 1,
        *,
        trace: bool = False,
        trace_samples: int = 30,
        smallest: bool = False,
        density: bool = False,
        blocks: BlocksLike | None = None,
        probe_splits: int | None = None,
        alignment: bool = False,
        **kwargs: Any,
    ):
        super().__init__(k, **kwargs)
        self.trace = trace
        self.trace_samples = trace_samples
        self.smallest = smallest
        self.density = density
        self.blocks = blocks
        self.probe_splits = (
            None
            if probe_splits is None
            else check_int(
                "probe_splits",
                probe_splits,
                2,
                hint="the number of disjoint probe parts (at least 2)",
            )
        )
        self.alignment = bool(alignment)
        self.block_operators: dict[str, BlockHessianOperator] = {}
        self.split_operators: list[HessianOperator] = []
        self._block_vectors: dict[str, list[tf.Tensor] | None] = {}

    def keys(self) -> list[str]:
        keys = super().keys()
        if self.trace:
            keys.append("hessian/trace")
        if self.smallest:
            keys.append("hessian/lambda_min")
        for name in self.block_operators:
            keys += [f"hessian/lambda_1/{name}", f"hessian/residual_1/{name}"]
        if self.probe_splits:
            keys.append("hessian/lambda_1_std")
        if self.alignment:
            keys += [sharpness.CURVATURE_KEY, sharpness.IN_TOP_K_KEY]
        return keys

    def config(self) -> dict[str, Any]:
        config = super().config()
        if self.block_operators:
            config["blocks"] = list(self.block_operators)
        if self.probe_splits:
            config["probe_splits"] = self.probe_splits
        return config

    def setup(self, model: keras.Model, probe: Probe) -> None:
        super().setup(model, probe)
        if self.blocks is not None:
            self.block_operators = block_operators(
                model,
                probe.data,
                self.blocks,
                loss=probe.loss,
                training=probe.training,
                jit_compile=probe.jit_compile,
            )
            self._block_vectors = dict.fromkeys(self.block_operators)
        if self.probe_splits:
            self.split_operators = split_operators(
                self.operator, self.probe_splits
            )

    def compute(self, model: keras.Model, step: int) -> Result:
        metrics = dict(super().compute(model, step).metrics)
        curves = {}
        if self.trace:
            metrics["hessian/trace"] = spectrum.trace(
                self.operator, num_samples=self.trace_samples, seed=self.seed
            )
        if self.smallest:
            metrics["hessian/lambda_min"] = float(
                spectrum.eigenpairs(
                    self.operator, 1, which="smallest", seed=self.seed
                ).eigenvalues[0]
            )
        if self.density:
            curves["hessian/density"] = spectrum.spectral_density(
                self.operator,
                num_iterations=min(80, self.operator.dim),
                seed=self.seed,
                grid=200,
            )
        for name, operator in self.block_operators.items():
            pairs = self._top(operator, self._block_vectors[name])
            self._block_vectors[name] = _finite_vector(pairs)
            metrics[f"hessian/lambda_1/{name}"] = float(pairs.eigenvalues[0])
            metrics[f"hessian/residual_1/{name}"] = float(pairs.residuals[0])
        if self.split_operators:
            values = [
                self._top(op, self.top_eigenvector).eigenvalues[0]
                for op in self.split_operators
            ]
            metrics["hessian/lambda_1_std"] = float(np.std(values, ddof=1))
        if self.alignment:
            metrics.update(
                sharpness.alignment(self.operator, self.pairs.eigenvectors)
            )
        return Result(metrics, curves=curves)

    def _top(
        self, operator: HessianOperator, start: Any
    ) -> spectrum.Eigenpairs:
        """The top eigenpair of `operator` with this measurement's solver
        settings, warm-started from `start` when `warm_start`."""
        return operator.eigenpairs(
            1,
            num_iterations=self.num_iterations,
            tol=self.tol,
            seed=self.seed,
            start_vector=start if self.warm_start else None,
        )


def _finite_vector(pairs: spectrum.Eigenpairs) -> list[tf.Tensor] | None:
    """The top eigenvector, or None after a non-finite measurement."""
    finite = np.all(np.isfinite(pairs.eigenvalues))
    return pairs.eigenvectors[0] if finite else None


def split_operators(
    operator: HessianOperator, parts: int
) -> list[HessianOperator]:
    """`operator` on `parts` disjoint, equal, consecutive parts of its probe
    (N // parts examples each, in batches of the probe's first batch size;
    the last N % parts examples are left out)."""
    total = operator.num_examples
    size = total // parts
    if size < 1:
        raise ArgumentError(
            f"probe_splits={parts} exceeds the {total} probe examples; pass "
            "at most as many splits as examples (and at least 2)."
        )
    batch = int(tf.nest.flatten(operator.batches[0].x)[0].shape[0])
    return [
        operator.with_inputs(
            rebatch(
                operator.batches,
                min(batch, size),
                start=r * size,
                stop=(r + 1) * size,
            )
        )
        for r in range(parts)
    ]


class HessianSpectrum(MeasurementCallback):
    """Top-k Hessian eigenvalues on a probe set (Lanczos).

    Logs `hessian/lambda_1` ... `hessian/lambda_k` with their residuals
    (`TopEigenpairs`), and optionally `hessian/trace` (Hutch++),
    `hessian/lambda_min` (smallest eigenvalue), the spectral density
    (recorded as a curve), per-block top eigenvalues, their spread over
    probe splits, and the gradient's alignment with the top eigenspace.

    Args:
        data: probe set.
        k: number of top eigenvalues.
        num_iterations: the most Lanczos steps (None: `linalg.eigsh`'s
            default).
        tol: stop once every pair's residual is below `tol` times its
            eigenvalue (default 1e-3; 0.0 runs all `num_iterations`).
        warm_start: start Lanczos from the previous top eigenvector; with
            few `num_iterations` this is the cheap tracking mode.
        trace: also estimate Tr(H) with `trace_samples` HVPs.
        smallest: also compute the smallest eigenvalue.
        density: also compute the SLQ spectral density.
        blocks: "layer" or `{name: variables}` (`tf_breakeven.blocks`):
            also the top eigenvalue of each diagonal Hessian block,
            `hessian/lambda_1/<name>`, and its residual
            `hessian/residual_1/<name>`.
        probe_splits: R >= 2: also lambda_1 on each of R disjoint equal
            parts of the probe (consecutive, N // R examples each; with
            `warm_start`, started from the full probe's eigenvector) and
            their standard deviation (ddof=1), `hessian/lambda_1_std`.
        alignment: also `hessian/gradient_curvature` (g^T H g / ||g||^2)
            and `hessian/gradient_in_top_k` (the share of ||g||^2 in the
            span of the k measured eigenvectors), g the probe gradient
            (`tf_breakeven.sharpness`).
        seed: solver seed (the same for every measurement).
        **kwargs: `schedule`, `recorder`, `loss`, `training`, `jit_compile`
            (see `MeasurementCallback`).
    """

    def __init__(
        self,
        data: Any,
        k: int = 1,
        *,
        num_iterations: int | None = None,
        tol: float = spectrum.DEFAULT_TOL,
        warm_start: bool = True,
        trace: bool = False,
        trace_samples: int = 30,
        smallest: bool = False,
        density: bool = False,
        blocks: BlocksLike | None = None,
        probe_splits: int | None = None,
        alignment: bool = False,
        seed: int = 0,
        **kwargs: Any,
    ):
        measurement = HessianSpectrumMeasurement(
            k,
            num_iterations=num_iterations,
            tol=tol,
            warm_start=warm_start,
            trace=trace,
            trace_samples=trace_samples,
            smallest=smallest,
            density=density,
            blocks=blocks,
            probe_splits=probe_splits,
            alignment=alignment,
            seed=seed,
        )
        super().__init__(measurement, data, **kwargs)

    @property
    def operator(self) -> HessianOperator | None:
        return self.measurement.operator

    @property
    def top_eigenvector(self) -> list[tf.Tensor] | None:
        return self.measurement.top_eigenvector
