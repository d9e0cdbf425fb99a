"""Eigenpairs, trace and spectral density of a probe operator.

Thin front-ends of the `tf_breakeven.linalg` solvers for any operator
with `flat_matvec`, `dim`, `dtype`, `shapes` and `jit_compile` (a
`HessianOperator`, or one of your own). Each solver call is compiled into
one `tf.function` per operator and solver configuration, kept in one
cache, so a callback that measures every epoch traces its solver once.

An operator with NaN or Inf in it (a probe or weights of a diverging run)
gives NaN results and one warning per call, never an exception; the
solvers themselves never hand a non-finite matrix to `tf.linalg.eigh`
(`linalg.tridiagonal_eigh`), so this holds under XLA too. A zero operator
gives zeros.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
import tensorflow as tf

from tf_breakeven import linalg
from tf_breakeven.functional import check_vector, measurement_warning
from tf_breakeven.validation import check_choice, check_int


class Operator(Protocol):
    """What the solvers need of an operator."""

    dim: int
    dtype: tf.DType
    shapes: list[tf.TensorShape]
    jit_compile: bool

    def flat_matvec(self, vector: tf.Tensor) -> tf.Tensor: ...


class Eigenpairs(NamedTuple):
    """Eigenvalues (numpy, float64) and eigenvectors.

    `eigenvectors[j]` is a list of tensors shaped like
    `model.trainable_variables`, of unit total norm.
    """

    eigenvalues: np.ndarray
    eigenvectors: list[list[tf.Tensor]]


_SOLVERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_solver(
    operator: Operator, key: tuple, build: Callable[..., Any]
) -> Callable[..., Any]:
    """`tf.function(build)` for `operator` under `key`, made once."""
    per_operator = _SOLVERS.setdefault(operator, {})
    if key not in per_operator:
        per_operator[key] = tf.function(build, jit_compile=operator.jit_compile)
    return per_operator[key]


def _warn_if_nonfinite(operator: Operator, what: str, values: Any) -> None:
    """One warning when a solver's answer is NaN/Inf (never raises)."""
    if not np.all(np.isfinite(values)):
        measurement_warning(
            "%s of %s: the operator gave non-finite values (NaN or Inf in "
            "the probe inputs or the weights, e.g. a diverging run); "
            "returning NaN.",
            what,
            type(operator).__name__,
        )


def _structured(operator: Operator, flat: tf.Tensor) -> list[list[tf.Tensor]]:
    return [
        linalg.unflatten_tensors(v, operator.shapes) for v in tf.unstack(flat)
    ]


def eigenpairs(
    operator: Operator,
    k: int = 1,
    *,
    which: str = "largest",
    num_iterations: int | None = None,
    seed: int = 0,
    start_vector: Sequence[Any] | None = None,
) -> Eigenpairs:
    """Top or bottom k eigenpairs by Lanczos (see `linalg.eigsh`).

    A non-finite operator gives NaN eigenvalues and NaN eigenvectors (with
    a warning); a zero operator gives zero eigenvalues.

    Args:
        operator: e.g. a `HessianOperator`.
        k: number of eigenpairs.
        which: "largest" (descending) or "smallest" (ascending).
        num_iterations: Lanczos steps (None: `linalg.eigsh`'s default).
        seed: seed of the random start vector.
        start_vector: a warm start shaped like the trainable variables
            (e.g. the previous top eigenvector).
    """
    dim = operator.dim
    # Validate eagerly in Python before any tracing.
    linalg.eigsh_config(dim, k, which=which, num_iterations=num_iterations)

    def run(start):
        return linalg.eigsh(
            operator.flat_matvec,
            dim,
            k,
            which=which,
            num_iterations=num_iterations,
            start_vector=start,
            seed=seed,
            dtype=operator.dtype,
        )

    key = ("eigsh", k, which, num_iterations, seed, start_vector is None)
    if start_vector is None:
        result = compiled_solver(operator, key, lambda: run(None))()
    else:
        start = linalg.flatten_tensors(
            check_vector(start_vector, operator.shapes, operator.dtype)
        )
        result = compiled_solver(operator, key, run)(start)
    eigenvalues = np.asarray(result.eigenvalues, np.float64)
    _warn_if_nonfinite(operator, "eigenpairs", eigenvalues)
    return Eigenpairs(eigenvalues, _structured(operator, result.eigenvectors))


TRACE_METHODS = ("hutch++", "hutchinson")


def trace(
    operator: Operator,
    *,
    num_samples: int = 30,
    method: str = "hutch++",
    seed: int = 0,
) -> float:
    """Trace estimate by Hutch++ (default) or Hutchinson.

    Exact (from `dim` basis vectors) when `num_samples >= operator.dim`;
    NaN with a warning for a non-finite operator.
    """
    check_choice("method", method, TRACE_METHODS)
    # Validate eagerly in Python before any tracing.
    if method == "hutch++":
        check_int("num_samples", num_samples, 3, hint=linalg.HUTCHPP_HINT)
    else:
        check_int("num_samples", num_samples, 1)
    estimator = {
        "hutch++": linalg.hutchpp_trace,
        "hutchinson": linalg.hutchinson_trace,
    }[method]
    fn = compiled_solver(
        operator,
        ("trace", method, num_samples, seed),
        lambda: estimator(
            operator.flat_matvec,
            operator.dim,
            num_samples,
            seed=seed,
            dtype=operator.dtype,
        ),
    )
    value = float(fn())
    _warn_if_nonfinite(operator, "trace", value)
    return value


def spectral_density(
    operator: Operator,
    *,
    num_runs: int = 1,
    num_iterations: int = 80,
    grid: int | np.ndarray = 1000,
    sigma: float | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Spectral density by stochastic Lanczos quadrature.

    Args:
        operator: e.g. a `HessianOperator`.
        num_runs: random start vectors averaged.
        num_iterations: Lanczos steps per run (clipped to the dimension).
        grid: number of grid points, or the grid itself.
        sigma: Gaussian width (None: 1% of the spectral range).
        seed: seed of the start vectors.

    Returns:
        `(grid, density)` float64 arrays; the density integrates to 1. A
        non-finite operator gives a NaN density (and a NaN grid unless
        `grid` is an array) with a warning.
    """
    num_runs = check_int("num_runs", num_runs, 1)
    num_iterations = min(
        check_int("num_iterations", num_iterations, 1), operator.dim
    )
    fn = compiled_solver(
        operator,
        ("slq", num_runs, num_iterations, seed),
        lambda: linalg.slq(
            operator.flat_matvec,
            operator.dim,
            num_runs,
            num_iterations,
            seed=seed,
            dtype=operator.dtype,
        ),
    )
    nodes, weights = fn()
    _warn_if_nonfinite(operator, "spectral density", nodes)
    if isinstance(grid, (int, np.integer)):
        return linalg.spectral_density(
            nodes, weights, num_points=int(grid), sigma=sigma
        )
    return linalg.spectral_density(nodes, weights, grid=grid, sigma=sigma)
