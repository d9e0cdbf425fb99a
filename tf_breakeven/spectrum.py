"""Eigenpairs, trace and spectral density of a probe operator.

Thin front-ends of the `tf_breakeven.linalg` solvers for any operator
with `flat_matvec`, `dim`, `dtype`, `shapes` and `jit_compile` (a
`HessianOperator`, or one of your own). Each solver call is compiled into
one `tf.function` per solver configuration, kept in one cache, so a
callback that measures every epoch traces its solver once. An operator
that says how to rebind it to new inputs (`solver_inputs` and
`with_inputs`, as `HessianOperator` does with its probe batches) shares
that function with every operator of the same kernel and probe shapes:
`tfb.hessian_eigenvalues(model, data)` called again on new data of the
same shapes does not trace again.

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


class _Pairs(NamedTuple):
    eigenvalues: np.ndarray
    eigenvectors: list[list[tf.Tensor]]


class Eigenpairs(_Pairs):
    """Eigenvalues (numpy, float64) and eigenvectors, with their accuracy.

    Unpacks as `(eigenvalues, eigenvectors)`. `eigenvectors[j]` is a list
    of tensors shaped like `model.trainable_variables`, of unit total norm.

    Attributes:
        residuals: float64 `[k]` residual norms `||H u_j - lambda_j u_j||`
            (Lanczos' Ritz bound); an eigenvalue of the operator lies
            within `residuals[j]` of `eigenvalues[j]`, and usually within
            `residuals[j]**2 / gap`.
        converged: `[k]` booleans, `residuals <= tol * |eigenvalues|`.
        num_iterations: Lanczos steps run (fewer than asked when every
            pair converged first).
        tol: the tolerance of the call.
    """

    def __new__(
        cls,
        eigenvalues,
        eigenvectors,
        residuals=None,
        converged=None,
        num_iterations=None,
        tol=None,
    ):
        self = super().__new__(cls, eigenvalues, eigenvectors)
        self.residuals = residuals
        self.converged = converged
        self.num_iterations = num_iterations
        self.tol = tol
        return self


# Default relative residual at which `eigenpairs` stops. Every returned
# eigenvalue is then within 1e-3 relative of an eigenvalue of the operator
# (the rigorous bound); its actual error is about residual^2 / gap. The bound
# names *an* eigenvalue: from an unlucky random start the top Ritz value can
# meet a loose tolerance on the next eigenvalue down. At 1e-2 that happened
# to 5 of 64 starts on a SimpleCNN whose two top eigenvalues are 3.5% apart;
# at 1e-3 to none, for about 30% more steps (BENCHMARKS.md section 15).
DEFAULT_TOL = 1e-3

_SOLVERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_solver(
    operator: Operator, key: tuple, build: Callable[..., Any]
) -> Callable[..., Any]:
    """The compiled `build(operator, *args)` under `key`, made once.

    Returns a callable taking `*args`. For an operator with
    `solver_inputs()` (returning `(owner, inputs_key, inputs)`) and
    `with_inputs(inputs)`, the function is cached per `owner` and
    `inputs_key` and takes `inputs` as arguments, so operators that differ
    only in their inputs share one trace; other operators get one function
    each.
    """
    rebinds = hasattr(operator, "solver_inputs")
    if rebinds:
        owner, inputs_key, inputs = operator.solver_inputs()
    else:
        owner, inputs_key, inputs = operator, (), ()
    per_owner = _SOLVERS.setdefault(owner, {})
    full_key = (key, inputs_key)
    if full_key not in per_owner:
        # Made once per cache entry: the traced function builds on a copy
        # of this operator without its inputs, rebound to the arguments.
        template = operator.with_inputs(None) if rebinds else operator

        def traced(inputs, *args):
            bound = template.with_inputs(inputs) if rebinds else template
            return build(bound, *args)

        per_owner[full_key] = tf.function(
            traced, jit_compile=operator.jit_compile
        )
    function = per_owner[full_key]
    return lambda *args: function(inputs, *args)


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
    tol: float = DEFAULT_TOL,
    seed: int = 0,
    start_vector: Sequence[Any] | None = None,
) -> Eigenpairs:
    """Top or bottom k eigenpairs by Lanczos (see `linalg.eigsh`).

    This function is long because it validates, dispatches on the warm
    start and converts the result to numpy and variable-shaped vectors.

    A non-finite operator gives NaN eigenvalues and NaN eigenvectors (with
    a warning); a zero operator gives zero eigenvalues.

    Args:
        operator: e.g. a `HessianOperator`.
        k: number of eigenpairs.
        which: "largest" (descending) or "smallest" (ascending).
        num_iterations: the most Lanczos steps (None: `linalg.eigsh`'s
            default).
        tol: relative residual at which to stop (`DEFAULT_TOL` = 1e-3);
            0.0 runs every step.
        seed: seed of the random start vector.
        start_vector: a warm start shaped like the trainable variables
            (e.g. the previous top eigenvector).

    An operator with a `subspace` attribute (a flat 0/1 tensor, among its
    `solver_inputs`) is solved restricted to those coordinates
    (`linalg.eigsh(subspace=...)`).
    """
    # Validate eagerly in Python before any tracing.
    linalg.eigsh_config(
        operator.dim, k, which=which, num_iterations=num_iterations
    )
    tol = linalg.check_tol(tol)
    options = {"which": which, "num_iterations": num_iterations, "tol": tol}

    def run(op, start=None):
        return linalg.eigsh(
            op.flat_matvec,
            op.dim,
            k,
            start_vector=start,
            seed=seed,
            dtype=op.dtype,
            subspace=getattr(op, "subspace", None),
            **options,
        )

    key = ("eigsh", k, which, num_iterations, tol, seed, start_vector is None)
    solver = compiled_solver(operator, key, run)
    if start_vector is None:
        result = solver()
    else:
        result = solver(
            linalg.flatten_tensors(
                check_vector(start_vector, operator.shapes, operator.dtype)
            )
        )
    eigenvalues = np.asarray(result.eigenvalues, np.float64)
    _warn_if_nonfinite(operator, "eigenpairs", eigenvalues)
    return Eigenpairs(
        eigenvalues,
        _structured(operator, result.eigenvectors),
        residuals=np.asarray(result.residuals, np.float64),
        converged=np.asarray(result.converged, bool),
        num_iterations=int(result.num_iterations),
        tol=tol,
    )


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
        lambda op: estimator(
            op.flat_matvec, op.dim, num_samples, seed=seed, dtype=op.dtype
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
        lambda op: linalg.slq(
            op.flat_matvec,
            op.dim,
            num_runs,
            num_iterations,
            seed=seed,
            dtype=op.dtype,
        ),
    )
    nodes, weights = fn()
    _warn_if_nonfinite(operator, "spectral density", nodes)
    if isinstance(grid, (int, np.integer)):
        return linalg.spectral_density(
            nodes, weights, num_points=int(grid), sigma=sigma
        )
    return linalg.spectral_density(nodes, weights, grid=grid, sigma=sigma)
