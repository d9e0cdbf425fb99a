"""Matrix-free symmetric eigen and trace solvers.

Every solver takes `matvec`, a callable mapping a 1-D tensor of shape `[dim]`
to a 1-D tensor of shape `[dim]` that applies a symmetric operator, so the
solvers know nothing about Keras and are tested on explicit matrices.

All solvers run eagerly and inside `tf.function(jit_compile=True)`: shapes are
static, iterations are `tf.while_loop`s, branches are `tf.cond`s and nothing
is copied to the host while iterating. Randomness comes only from integer
Philox draws of `tf.random.stateless_uniform` seeded with `[seed, counter]`:
the same `seed` gives bitwise-equal results, and eager and jit-compiled calls
draw the same stream. `seed` may be a Python int or an integer scalar tensor
(a tensor seed lets a `tf.function` draw fresh probes without retracing).

Tridiagonal eigenproblems are solved with `tf.linalg.eigh` in float64, which
also compiles under XLA on CPU. XLA's iterative eigensolver gives eigenvalues
that agree with LAPACK to ~1e-13 but eigenvectors whose residual
`||T v - lambda v||` is only ~1e-7 (measured for m <= 60), which bounds the
accuracy of jit-compiled Ritz vectors and quadrature weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf

from tf_breakeven.validation import (
    ArgumentError,
    check_int,
    check_nonnegative,
)

try:  # TensorFlow's own test for an XLA context (no public API has one)
    from tensorflow.python.ops.control_flow_util import (
        GraphOrParentsInXlaContext as _xla_context,
    )
except ImportError:  # pragma: no cover (then the XLA-safe ops everywhere)
    _xla_context = None

Matvec = Callable[[tf.Tensor], tf.Tensor]
Seed = int | tf.Tensor

# A Lanczos step breaks down when the new residual norm is below eps^(2/3)
# (the floor ARPACK uses in its convergence tests) times the largest
# ||A v_j|| seen so far, a lower bound on ||A||. Zeroing such a beta perturbs
# the tridiagonal matrix by at most that much. In floating point the residual
# of an exhausted Krylov space is amplified rounding noise and can exceed the
# threshold (seen: 3e-4 ||A|| in float32 for a repeated eigenvalue). Missing
# a breakdown is harmless: after two Gram-Schmidt passes the noise is still
# orthogonal to the basis and the iteration simply continues from it.
_BREAKDOWN_EPS_POWER = 2.0 / 3.0
# A second reorthogonalization pass runs when the first one shrank the
# vector below this fraction of its norm (Daniel, Gragg, Kaufman and
# Stewart 1976: 1/sqrt(2)).
_REORTHOGONALIZE_RATIO = 0.7071067811865476
# Lanczos rows are padded to a multiple of this many entries (64 bytes of
# float32, 128 of float64: Eigen's largest alignment) so that a leading
# slice of the stacked basis starts aligned and shares its buffer.
_ALIGN = 16
# Random draws use only integer stateless samplers: TF's float samplers
# (stateless_normal/uniform) give different streams eagerly and under XLA,
# while the Philox integer streams agree bitwise.
_RNG_ALG = "philox"
_RNG_BITS = 24
# How to fix a Hutch++ call with too few matvecs.
HUTCHPP_HINT = (
    "Hutch++ splits its matvecs in three; pass num_samples >= 3, or use "
    "Hutchinson (one matvec per probe)."
)
# Default Gaussian width of `spectral_density` as a fraction of the range.
_SIGMA_FRACTION = 1e-2
# Default grid padding of `spectral_density`, in units of sigma.
_GRID_PAD_SIGMAS = 6.0


class LanczosResult(NamedTuple):
    """Output of `lanczos`.

    Attributes:
        alphas: `[m]` diagonal of the tridiagonal matrix T = V A V^T.
        betas: `[m - 1]` off-diagonal of T; a zero marks a breakdown (an
            invariant subspace was found and the iteration restarted).
        basis: `[m, dim]` orthonormal Lanczos vectors V as rows.
    """

    alphas: tf.Tensor
    betas: tf.Tensor
    basis: tf.Tensor


class EigenResult(NamedTuple):
    """Output of `eigsh` and `power_iteration`.

    Attributes:
        eigenvalues: `[k]` eigenvalue estimates.
        eigenvectors: `[k, dim]` unit-norm eigenvector estimates as rows.
        residuals: `[k]` residual norms `||A u - theta u||` of the pairs
            (for `eigsh` the Ritz bound `|beta_n s_n|`, which equals it in
            exact arithmetic); every pair has an eigenvalue of A within its
            residual.
        converged: `[k]` booleans, `residual <= tol * |theta|`.
        num_iterations: the number of iterations run (a scalar tensor).
    """

    eigenvalues: tf.Tensor
    eigenvectors: tf.Tensor
    residuals: Any = None
    converged: Any = None
    num_iterations: Any = None


# ----------------------------------------------------------------- helpers


def flatten_tensors(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
    """Concatenates tensors, each reshaped to 1-D, into one 1-D tensor.

    Args:
        tensors: non-empty sequence of tensors of one dtype.

    Returns:
        A 1-D tensor with `sum(t.size for t in tensors)` entries.
    """
    if len(tensors) == 0:
        raise ArgumentError("`tensors` is empty; pass at least one tensor.")
    return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)


def unflatten_tensors(
    flat: tf.Tensor, shapes: Sequence[Sequence[int] | tf.TensorShape]
) -> list[tf.Tensor]:
    """Splits a 1-D tensor into tensors of the given shapes.

    Inverse of `flatten_tensors`.

    Args:
        flat: 1-D tensor with `sum(prod(shape))` entries.
        shapes: fully defined shapes, e.g. `[v.shape for v in variables]`.

    Returns:
        A list of tensors with the given shapes.
    """
    shapes = [tf.TensorShape(s) for s in shapes]
    if not shapes:
        raise ArgumentError("`shapes` is empty; pass at least one shape.")
    for shape in shapes:
        if not shape.is_fully_defined():
            raise ArgumentError(
                f"Shape {shape} is not fully defined; pass static shapes."
            )
    sizes = [shape.num_elements() for shape in shapes]
    flat = tf.convert_to_tensor(flat)
    if flat.shape.rank is not None and flat.shape.rank != 1:
        raise ArgumentError(
            f"`flat` must be 1-D; got shape {flat.shape}. Flatten it first."
        )
    if flat.shape[0] is not None and flat.shape[0] != sum(sizes):
        raise ArgumentError(
            f"`flat` has {flat.shape[0]} entries but `shapes` hold "
            f"{sum(sizes)}; pass the shapes the vector was flattened from."
        )
    parts = tf.split(flat, sizes)
    return [tf.reshape(p, s) for p, s in zip(parts, shapes, strict=True)]


def as_flat_matvec(
    list_matvec: Callable[[list[tf.Tensor]], Sequence[tf.Tensor]],
    shapes: Sequence[Sequence[int] | tf.TensorShape],
) -> Matvec:
    """Adapts an operator over a list of tensors to a flat matvec.

    Args:
        list_matvec: maps a list of tensors with `shapes` (e.g. a direction
            in a model's variable space) to a list of the same shapes.
        shapes: the shapes of the list elements.

    Returns:
        A callable mapping a `[dim]` tensor to a `[dim]` tensor, with
        `dim = sum(prod(shape))`, usable by every solver of this module.
    """
    shapes = [tf.TensorShape(s) for s in shapes]

    def matvec(vector: tf.Tensor) -> tf.Tensor:
        return flatten_tensors(list_matvec(unflatten_tensors(vector, shapes)))

    return matvec


def _check_dtype(dtype: Any) -> tf.DType:
    dtype = tf.as_dtype(dtype)
    if not dtype.is_floating:
        raise ArgumentError(
            f"`dtype` must be a floating dtype; got {dtype.name}. "
            "Pass tf.float32 or tf.float64."
        )
    return dtype


def _seed(seed: Seed, counter: Any) -> tf.Tensor:
    return tf.stack(
        [tf.cast(seed, tf.int64), tf.cast(counter, tf.int64)], axis=0
    )


def _rademacher(shape, seed: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    bits = tf.random.stateless_uniform(
        shape, seed=seed, minval=0, maxval=2, dtype=tf.int32, alg=_RNG_ALG
    )
    return tf.cast(2 * bits - 1, dtype)


def _normal(shape, seed: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """Box-Muller on 24-bit integer uniforms (same stream eager and XLA)."""
    ints = tf.random.stateless_uniform(
        [2, *shape],
        seed=seed,
        minval=0,
        maxval=2**_RNG_BITS,
        dtype=tf.int32,
        alg=_RNG_ALG,
    )
    uniform = (tf.cast(ints, dtype) + 0.5) * (2.0**-_RNG_BITS)  # in (0, 1)
    radius = tf.sqrt(-2.0 * tf.math.log(uniform[0]))
    return radius * tf.cos((2.0 * np.pi) * uniform[1])


def _apply(matvec: Matvec, vector: tf.Tensor, dim: int) -> tf.Tensor:
    out = tf.convert_to_tensor(matvec(vector))
    if not out.shape.is_compatible_with([dim]):
        raise ArgumentError(
            f"`matvec` returned shape {out.shape} for an input of shape "
            f"[{dim}]; it must map [dim] to [dim] (use `as_flat_matvec` for "
            "operators over lists of tensors)."
        )
    if out.dtype != vector.dtype:
        raise ArgumentError(
            f"`matvec` returned {out.dtype.name} for a {vector.dtype.name} "
            "input; pass the operator's dtype as `dtype`."
        )
    return tf.reshape(out, [dim])


def _finite_or_nan(value: tf.Tensor) -> tf.Tensor:
    """`value` where finite, NaN elsewhere (a +-Inf answer is a diverged
    operator, reported like a NaN one)."""
    return tf.where(
        tf.math.is_finite(value), value, tf.constant(np.nan, value.dtype)
    )


def _project_out_rows(
    vector: tf.Tensor, basis: tf.Tensor, num_rows: tf.Tensor
) -> tf.Tensor:
    """One classical Gram-Schmidt pass against rows `0..num_rows - 1` of
    the stacked basis: two matrix products that read those rows once each.

    The rows are a leading slice of a basis whose row length is a multiple
    of `_ALIGN` entries, which TensorFlow takes without a copy (a slice
    along axis 0 that starts on an aligned address shares the buffer).
    """
    # Under XLA shapes are static: all rows (those past num_rows are zero).
    rows = basis if _in_xla() else basis[:num_rows]
    coefficients = tf.matmul(rows, vector[:, tf.newaxis])
    return vector - tf.matmul(coefficients, rows, transpose_a=True)[0]


def _unit_start(
    start_vector: Any, dim: int, seed: Seed, counter: Any, dtype: tf.DType
) -> tf.Tensor:
    """The normalized start vector, or a seeded random one if absent/zero."""
    random = _normal([dim], _seed(seed, counter), dtype)
    random = random / tf.norm(random)
    if start_vector is None:
        return random
    start = tf.cast(start_vector, dtype)
    if start.shape.num_elements() not in (None, dim):
        raise ArgumentError(
            f"`start_vector` has shape {start.shape} but the operator "
            f"dimension is {dim}; pass a vector of {dim} entries."
        )
    start = tf.reshape(start, [dim])
    norm = tf.norm(start)
    return tf.where(norm > 0, tf.math.divide_no_nan(start, norm), random)


# ----------------------------------------------------------------- Lanczos


def _lanczos_residual(
    w: tf.Tensor, alpha: tf.Tensor, j: tf.Tensor, basis: tf.Tensor, betas
) -> tf.Tensor:
    """`w = A v_j` made orthogonal to the Lanczos vectors `v_0..v_j`.

    The three-term recurrence removes the large components along v_j and
    v_{j-1}; one classical Gram-Schmidt pass over the rows in use then
    removes what rounding left along the others, and a second pass runs
    only when the first removed a large part (Daniel, Gragg, Kaufman and
    Stewart's test, as in ARPACK), as after a breakdown.

    Partial reorthogonalization (Simon 1984: orthogonalize against the
    basis only when an estimate of the lost orthogonality passes
    sqrt(eps)) was measured and rejected: with float32 Hessian-vector
    products, which are symmetric only to their rounding, it gave the top
    three Hessian eigenvalues of the zoo's SimpleCNN and MLP 1e-5 relative
    errors (2.7e-8 with full reorthogonalization) at thresholds from
    eps^(1/2) to eps^(3/4), and saved 20% of a step only where the HVP is
    cheaper than the pass (the MLP).
    """
    previous = tf.maximum(j - 1, 0)
    beta_previous = tf.where(
        j > 0, tf.gather(betas, previous), tf.zeros([], w.dtype)
    )
    w = w - alpha * basis[j]
    w = w - beta_previous * basis[previous]
    norm_before = tf.norm(w)
    w = _project_out_rows(w, basis, j + 1)
    return tf.cond(
        tf.norm(w) < _REORTHOGONALIZE_RATIO * norm_before,
        lambda: _project_out_rows(w, basis, j + 1),
        lambda: w,
    )


def _fresh_direction(
    basis: tf.Tensor,
    num_rows: tf.Tensor,
    seed: tf.Tensor,
    dim: int,
    subspace: tf.Tensor | None = None,
) -> tf.Tensor:
    """A seeded random unit vector orthogonal to the first `num_rows` rows
    (a restart), inside `subspace` when given: Gram-Schmidt twice ("twice
    is enough"); padded like the rows."""
    fresh = _normal([dim], seed, basis.dtype)
    if subspace is not None:
        fresh = fresh * subspace
    fresh = _padded(fresh, basis.shape[1])
    for _ in range(2):
        fresh = _project_out_rows(fresh, basis, num_rows)
    return tf.math.divide_no_nan(fresh, tf.norm(fresh))


def _in_xla() -> bool:
    """Whether the graph being built is compiled by XLA (`jit_compile`,
    TPU)."""
    if _xla_context is None:
        return True
    return bool(_xla_context(tf.compat.v1.get_default_graph()))


def _write_row(basis: tf.Tensor, j: tf.Tensor, row: tf.Tensor) -> tf.Tensor:
    """`basis` with row j replaced: in place where TensorFlow can reuse the
    buffer (`InplaceUpdate`; a scatter would copy the whole basis,
    docs/pitfalls.md#P28), a dynamic update slice under XLA (which has no
    InplaceUpdate and updates loop state in place itself)."""
    if _in_xla():
        return tf.tensor_scatter_nd_update(basis, [[j]], row[tf.newaxis])
    return tf.raw_ops.InplaceUpdate(x=basis, i=[j], v=row[tf.newaxis])


def _padded(vector: tf.Tensor, width: int) -> tf.Tensor:
    """`vector` [dim] with zeros appended up to `width`."""
    extra = width - vector.shape[0]
    return tf.pad(vector, [[0, extra]]) if extra else vector


def _lanczos(
    matvec: Matvec,
    dim: int,
    num_iterations: int,
    start_vector: Any,
    seed: Seed,
    counter: Any,
    dtype: tf.DType,
    stop: Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor] | None = None,
    subspace: tf.Tensor | None = None,
) -> tuple[LanczosResult, tf.Tensor]:
    """Lanczos without input checks; draws seeds [seed, counter + 0..m].

    This function is long because the loop body, its state and the
    early-stopping hook belong together.

    After each step n (n = 1..m), `stop(n, alphas, betas)` (a boolean
    scalar; `betas[n - 1]` is the norm of the residual of step n) may end
    the iteration early; entries past n stay zero. With `subspace` (a
    `[dim]` 0/1 vector; the operator must map it into itself) the start
    and restart vectors are masked to it and at most its dimension of steps
    run. Returns the result (with the `[m]` betas) and the number of steps
    taken.
    """
    m = num_iterations
    eps = float(np.finfo(dtype.as_numpy_dtype).eps)
    rtol = eps**_BREAKDOWN_EPS_POWER
    v0 = _unit_start(start_vector, dim, seed, counter, dtype)
    limit = tf.constant(m)
    if subspace is not None:
        subspace = tf.cast(subspace, dtype)
        limit = tf.minimum(limit, tf.cast(tf.reduce_sum(subspace), tf.int32))
        masked = v0 * subspace
        v0 = tf.math.divide_no_nan(masked, tf.norm(masked))
    # One spare row so that step j can always store v_{j+1} (it is dropped).
    # Rows padded to a multiple of _ALIGN entries: their leading slices
    # are then views, and `_write_row` writes a row without copying.
    width = -(-dim // _ALIGN) * _ALIGN
    basis = _write_row(tf.zeros([m + 1, width], dtype), 0, _padded(v0, width))
    alphas = tf.zeros([m], dtype)
    betas = tf.zeros([m], dtype)

    def body(j, basis, alphas, betas, anorm, done):
        v = basis[j]
        w = _padded(_apply(matvec, v[:dim], dim), width)
        alpha = tf.tensordot(v, w, 1)
        anorm = tf.maximum(anorm, tf.norm(w))
        w = _lanczos_residual(w, alpha, j, basis, betas)
        beta = tf.norm(w)
        # Seed [seed, counter + 1 + j] for a restart after step j.
        restart_seed = _seed(
            seed, tf.cast(counter, tf.int64) + 1 + tf.cast(j, tf.int64)
        )
        v_next, beta = tf.cond(
            beta <= rtol * anorm,
            lambda: (
                _fresh_direction(basis, j + 1, restart_seed, dim, subspace),
                tf.zeros_like(beta),
            ),
            lambda: (w / beta, beta),
        )
        basis = _write_row(basis, j + 1, v_next)
        alphas = tf.tensor_scatter_nd_update(alphas, [[j]], [alpha])
        betas = tf.tensor_scatter_nd_update(betas, [[j]], [beta])
        if stop is not None:
            done = stop(j + 1, alphas, betas)
        return j + 1, basis, alphas, betas, anorm, done

    steps, basis, alphas, betas, _, _ = tf.while_loop(
        lambda j, *rest: tf.logical_and(j < limit, tf.logical_not(rest[-1])),
        body,
        (
            tf.constant(0),
            basis,
            alphas,
            betas,
            tf.zeros([], dtype),
            tf.constant(False),
        ),
        maximum_iterations=m,
    )
    return LanczosResult(alphas, betas, basis[:m, :dim]), steps


def lanczos(
    matvec: Matvec,
    dim: int,
    num_iterations: int,
    *,
    start_vector: tf.Tensor | None = None,
    seed: Seed = 0,
    dtype: Any = tf.float32,
) -> LanczosResult:
    """Lanczos tridiagonalization with full reorthogonalization.

    Each new vector has the three-term recurrence subtracted and is then
    orthogonalized against every earlier Lanczos vector by one classical
    Gram-Schmidt pass (a second one when the first removed more than
    1 - 1/sqrt(2) of its norm, as in ARPACK); the vectors are rows of one
    stacked basis updated in place, so a pass is two matrix products that
    read the vectors so far once each, and no step copies the basis. When
    the residual vanishes (the Krylov space is invariant, e.g. for repeated or
    zero eigenvalues), the beta is set to 0 and the iteration continues from
    a fresh seeded random vector orthogonal to the basis, so
    `num_iterations == dim` recovers the whole spectrum including
    multiplicities and zero eigenvalues.

    Args:
        matvec: symmetric operator mapping `[dim]` to `[dim]`.
        dim: operator dimension.
        num_iterations: number of Lanczos steps m (matvecs), `1 <= m <= dim`.
        start_vector: optional `[dim]` start (normalized; warm start). If
            None or zero, a seeded random Gaussian vector is used.
        seed: int or integer scalar tensor; the start vector uses
            `[seed, 0]` and a restart after step j uses `[seed, j + 1]`.
        dtype: working dtype of the vectors.

    Returns:
        `LanczosResult(alphas [m], betas [m - 1], basis [m, dim])`.

    References:
        Lanczos (1950); Golub and Van Loan, Matrix Computations, 4th ed.,
        chapter 10 (full reorthogonalization).
    """
    dim = check_int("dim", dim, 1)
    m = check_int("num_iterations", num_iterations, 1)
    if m > dim:
        raise ArgumentError(
            f"num_iterations={m} exceeds the operator dimension {dim}; "
            "pass num_iterations <= dim (dim steps already span the space)."
        )
    dtype = _check_dtype(dtype)
    result, _ = _lanczos(matvec, dim, m, start_vector, seed, 0, dtype)
    return result._replace(betas=result.betas[: m - 1])


def tridiagonal_eigh(
    alphas: tf.Tensor, betas: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """Eigendecomposition of a symmetric tridiagonal matrix in float64.

    Args:
        alphas: `[..., m]` diagonal.
        betas: `[..., m - 1]` off-diagonal.

    Returns:
        `(eigenvalues [..., m] ascending, eigenvectors [..., m, m])`, float64,
        with eigenvectors as columns (as `np.linalg.eigh`). A matrix with a
        NaN or Inf entry (a diverging operator) gives NaN eigenvalues and
        eigenvectors instead of an error: it is decomposed as zeros, so
        `tf.linalg.eigh` never sees it (also under XLA).
    """
    alphas = tf.cast(alphas, tf.float64)
    betas = tf.cast(betas, tf.float64)
    if alphas.shape.rank is None or alphas.shape.rank < 1:
        raise ArgumentError(
            "`alphas` must have a static rank >= 1; pass the `alphas` of "
            "a `LanczosResult`."
        )
    m = alphas.shape[-1]
    num_betas = betas.shape[-1] if betas.shape.rank else None
    if m is not None and num_betas is not None and num_betas != m - 1:
        raise ArgumentError(
            f"`betas` must have {m - 1} entries (len(alphas) - 1); got "
            f"{num_betas}."
        )
    pad = [[0, 0]] * (alphas.shape.rank - 1) + [[0, 1], [1, 0]]
    upper = tf.pad(tf.linalg.diag(betas), pad)
    tridiagonal = (
        tf.linalg.diag(alphas) + upper + tf.linalg.matrix_transpose(upper)
    )
    # Per matrix of the batch: [..., 1, 1], broadcast over its entries.
    finite = tf.reduce_all(
        tf.math.is_finite(tridiagonal), axis=[-2, -1], keepdims=True
    )
    values, vectors = tf.linalg.eigh(
        tf.where(finite, tridiagonal, tf.zeros_like(tridiagonal))
    )
    nan = tf.constant(np.nan, tf.float64)
    return (
        tf.where(finite[..., 0], values, nan),
        tf.where(finite, vectors, nan),
    )


# ------------------------------------------------------------- eigenpairs


def eigsh_config(
    dim: int,
    k: int = 1,
    *,
    which: str = "largest",
    num_iterations: int | None = None,
) -> int:
    """Validates `eigsh` arguments and returns the number of iterations used.

    Args:
        dim: operator dimension.
        k: number of eigenpairs.
        which: "largest" or "smallest".
        num_iterations: requested Lanczos steps or None for the default
            `min(dim, max(2 * k + 20, 30))`.

    Returns:
        The number of Lanczos steps, clipped to `dim`.
    """
    dim = check_int("dim", dim, 1)
    k = check_int("k", k, 1)
    if k > dim:
        raise ArgumentError(
            f"k={k} exceeds the operator dimension {dim}; pass k <= dim."
        )
    if which not in ("largest", "smallest"):
        raise ArgumentError(
            f"`which` must be 'largest' or 'smallest'; got {which!r}. "
            "Pass one of them."
        )
    if num_iterations is None:
        return min(dim, max(2 * k + 20, 30))
    num_iterations = check_int("num_iterations", num_iterations, 1)
    if num_iterations < k:
        raise ArgumentError(
            f"num_iterations={num_iterations} is smaller than k={k}; pass "
            "num_iterations >= k (or None for the default)."
        )
    return min(num_iterations, dim)


def _ritz(
    alphas: tf.Tensor,
    betas: tf.Tensor,
    steps: tf.Tensor,
    k: int,
    which: str,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Top or bottom k Ritz pairs of the first `steps` Lanczos steps.

    `alphas` and `betas` are the `[m]` coefficients of `_lanczos` (entries
    past `steps` unused). The leading `steps x steps` block of T is
    decomposed inside a static `[m, m]` matrix whose other diagonal entries
    lie beyond the block's Gershgorin bound on the side away from the
    wanted end, so they never rank among the k (for `steps >= k`).

    Returns:
        float64 `(values [k], vectors [m, k], residuals [k])`: the Ritz
        values (descending for "largest", ascending for "smallest"), the
        eigenvectors of T (zero past `steps`) and the residual bounds
        `|beta_steps * s_steps|`.
    """
    alphas = tf.cast(alphas, tf.float64)
    betas = tf.cast(betas, tf.float64)
    m = alphas.shape[0]
    active = tf.range(m) < steps

    def largest_active(values):
        return tf.reduce_max(tf.where(active, tf.abs(values), 0.0))

    radius = largest_active(alphas) + 2.0 * largest_active(betas)
    far = (2.0 * radius + 1.0) * (-1.0 if which == "largest" else 1.0)
    diagonal = tf.where(active, alphas, far)
    inner = tf.where(tf.range(m - 1) < steps - 1, betas[: m - 1], 0.0)
    values, vectors = tridiagonal_eigh(diagonal, inner)
    if which == "largest":
        values, vectors = values[::-1][:k], vectors[:, ::-1][:, :k]
    else:
        values, vectors = values[:k], vectors[:, :k]
    vectors = tf.where(active[:, tf.newaxis], vectors, 0.0)
    last = tf.gather(vectors, steps - 1)
    residuals = tf.abs(tf.gather(betas, steps - 1) * last)
    return values, vectors, residuals


def _converged(values, residuals, tol) -> tf.Tensor:
    return residuals <= tf.cast(tol, residuals.dtype) * tf.abs(
        tf.cast(values, residuals.dtype)
    )


def _stopping_rule(k: int, which: str, tol: float) -> Callable[..., Any]:
    """`stop(steps, alphas, betas)` for `_lanczos`: True once the k wanted
    Ritz pairs meet `tol`, or when the operator gave a non-finite value."""

    def stop(steps, alphas, betas):
        values, _, residuals = _ritz(alphas, betas, steps, k, which)
        finite = tf.reduce_all(tf.math.is_finite(values))
        converged = tf.reduce_all(_converged(values, residuals, tol))
        return tf.logical_or(
            tf.logical_not(finite), tf.logical_and(steps >= k, converged)
        )

    return stop


def eigsh(
    matvec: Matvec,
    dim: int,
    k: int = 1,
    *,
    which: str = "largest",
    num_iterations: int | None = None,
    tol: float = 0.0,
    start_vector: tf.Tensor | None = None,
    seed: Seed = 0,
    dtype: Any = tf.float32,
    subspace: tf.Tensor | None = None,
) -> EigenResult:
    """Extreme eigenpairs of a symmetric operator by Lanczos (Ritz pairs).

    This function is long because its docstring states the stopping rule
    and what it guarantees.

    With `tol > 0` the iteration stops at the first step n >= k at which
    every wanted Ritz pair has a residual bound `|beta_n s_n| <= tol *
    |theta|` (the stopping rule of ARPACK), or when the operator gives a
    non-finite value; `tol=0` runs all `num_iterations`. Each Ritz value is
    then within `tol * |theta|` of an eigenvalue of A, and usually much
    closer (the error of a Ritz value shrinks like the square of its
    residual). The test costs one `[m, m]` tridiagonal eigensolve per step,
    negligible next to a matvec, and stays on the device.

    The bound is to *an* eigenvalue, not necessarily the wanted one: a
    random start that happens to weigh the top eigenvector little lets the
    top Ritz value settle first on the next eigenvalue and meet a loose
    `tol` there. How often depends on `tol` against the relative gap; on a
    SimpleCNN whose two top eigenvalues are 3.5% apart, 5 of 64 random
    starts stopped 3.5% low at `tol=1e-2` and none at `tol=1e-3`; on an
    MLP one start in 24 stopped 32% low at `tol=2e-3` but not at 1e-3
    (`benchmarks/stopping_rule.py`, BENCHMARKS.md section 15).

    A single-vector Lanczos sees one copy of a repeated eigenvalue until its
    Krylov space is exhausted, so with `tol > 0` it can stop before finding
    the other copies; `tol=0` with `num_iterations=dim` finds them all.

    Args:
        matvec: symmetric operator mapping `[dim]` to `[dim]`.
        dim: operator dimension.
        k: number of eigenpairs, `1 <= k <= dim`.
        which: "largest" (algebraically largest, sorted descending) or
            "smallest" (algebraically smallest, sorted ascending); negative
            eigenvalues count by sign, not magnitude.
        num_iterations: the most Lanczos steps; default `min(dim, max(2 * k
            + 20, 30))`. Values above `dim` are clipped to `dim`, which makes
            the result exact up to rounding.
        tol: relative residual at which to stop (>= 0; 0 = never early).
        start_vector: optional `[dim]` warm start (e.g. the previous top
            eigenvector).
        seed: int or integer scalar tensor for the random start/restarts.
        dtype: working dtype; the tridiagonal problem is solved in float64.
        subspace: optional `[dim]` 0/1 vector (a tensor, so one trace serves
            many): the eigenpairs of the operator restricted to the
            coordinates it selects, for an operator that maps them into
            themselves (e.g. `mask * A(mask * v)`, a diagonal block of A).
            At most that many steps run; it must select at least k
            coordinates.

    Returns:
        `EigenResult`: eigenvalues `[k]` in dtype, eigenvectors `[k, dim]`
        (the Ritz vectors `S^T V` as unit rows), float64 residual bounds,
        `converged` flags (against `tol`; all False when `tol=0` unless the
        residual is exactly zero) and the number of steps run.

    References:
        Golub and Van Loan, Matrix Computations, 4th ed., chapter 10;
        Lehoucq, Sorensen and Yang, ARPACK Users' Guide (1998), 4.6.
    """
    m = eigsh_config(dim, k, which=which, num_iterations=num_iterations)
    tol = check_tol(tol)
    dtype = _check_dtype(dtype)
    stop = _stopping_rule(k, which, tol) if tol > 0 else None
    result, steps = _lanczos(
        matvec,
        dim,
        m,
        start_vector,
        seed,
        0,
        dtype,
        stop=stop,
        subspace=subspace,
    )
    values, vectors, residuals = _ritz(
        result.alphas, result.betas, steps, k, which
    )
    ritz = tf.matmul(tf.cast(vectors, dtype), result.basis, transpose_a=True)
    ritz = tf.math.l2_normalize(ritz, axis=1)
    return EigenResult(
        tf.cast(values, dtype),
        ritz,
        residuals,
        _converged(values, residuals, tol),
        steps,
    )


def check_tol(tol: Any) -> float:
    """`tol` as a float >= 0, or an `ArgumentError` saying how to fix it."""
    return check_nonnegative(
        "tol", tol, hint="Pass e.g. tol=1e-3, or 0.0 to run every iteration."
    )


def power_iteration(
    matvec: Matvec,
    dim: int,
    *,
    num_iterations: int = 20,
    start_vector: tf.Tensor | None = None,
    seed: Seed = 0,
    dtype: Any = tf.float32,
) -> EigenResult:
    """Dominant eigenpair by power iteration.

    Finds the eigenvalue of largest MAGNITUDE (which may be negative), not
    the algebraically largest one; use `eigsh` for that. Convergence is
    linear with rate |lambda_2 / lambda_1| and fails if +lambda and -lambda
    are both dominant. Uses `num_iterations + 1` matvecs.

    Args:
        matvec: symmetric operator mapping `[dim]` to `[dim]`.
        dim: operator dimension.
        num_iterations: power steps (>= 0); 0 returns the Rayleigh quotient
            of the start vector.
        start_vector: optional `[dim]` warm start.
        seed: int or integer scalar tensor for the random start.
        dtype: working dtype.

    Returns:
        `EigenResult(eigenvalues [1], eigenvectors [1, dim])`: the Rayleigh
        quotient of the last iterate and that unit iterate (both NaN if the
        quotient is not finite).
    """
    dim = check_int("dim", dim, 1)
    num_iterations = check_int("num_iterations", num_iterations, 0)
    dtype = _check_dtype(dtype)
    v = _unit_start(start_vector, dim, seed, 0, dtype)

    def body(i, v, w):
        norm = tf.norm(w)
        v = tf.where(norm > 0, tf.math.divide_no_nan(w, norm), v)
        return i + 1, v, _apply(matvec, v, dim)

    _, v, w = tf.while_loop(
        lambda i, *_: i < num_iterations,
        body,
        (tf.constant(0), v, _apply(matvec, v, dim)),
        maximum_iterations=num_iterations,
    )
    value = _finite_or_nan(tf.tensordot(v, w, 1))
    vector = tf.where(tf.math.is_finite(value), v, tf.constant(np.nan, dtype))
    return EigenResult(value[tf.newaxis], vector[tf.newaxis])


# ------------------------------------------------------------------ traces


def _sum_quadratic_forms(
    matvec: Matvec, dim: int, probe: Callable, count: int, dtype: tf.DType
) -> tf.Tensor:
    """Sum over i < count of z_i^T A z_i with z_i = probe(i)."""

    def body(i, total):
        z = probe(i)
        return i + 1, total + tf.tensordot(z, _apply(matvec, z, dim), 1)

    _, total = tf.while_loop(
        lambda i, _: i < count,
        body,
        (tf.constant(0), tf.zeros([], dtype)),
        maximum_iterations=count,
    )
    return total


def _exact_trace(matvec: Matvec, dim: int, dtype: tf.DType) -> tf.Tensor:
    """sum_i e_i^T A e_i over the dim basis vectors (dim matvecs)."""
    return _finite_or_nan(
        _sum_quadratic_forms(
            matvec, dim, lambda i: tf.one_hot(i, dim, dtype=dtype), dim, dtype
        )
    )


def hutchinson_trace(
    matvec: Matvec,
    dim: int,
    num_samples: int,
    *,
    seed: Seed = 0,
    dtype: Any = tf.float32,
) -> tf.Tensor:
    """Hutchinson trace estimate with Rademacher probes.

    Unbiased, with variance `2 (||A||_F^2 - sum_i a_ii^2) / num_samples`.
    With `num_samples >= dim` the trace is computed exactly from the dim
    basis vectors instead (dim matvecs, no randomness).

    Args:
        matvec: symmetric operator mapping `[dim]` to `[dim]`.
        dim: operator dimension.
        num_samples: number of probes (= matvecs at most), >= 1.
        seed: int or integer scalar tensor; probe i uses `[seed, i]`.
        dtype: working dtype.

    Returns:
        Scalar trace estimate in `dtype`; NaN if it is not finite.

    References:
        Hutchinson, "A stochastic estimator of the trace of the influence
        matrix for Laplacian smoothing splines" (1989).
    """
    dim = check_int("dim", dim, 1)
    num_samples = check_int("num_samples", num_samples, 1)
    dtype = _check_dtype(dtype)
    if num_samples >= dim:
        return _exact_trace(matvec, dim, dtype)

    def probe(i):
        return _rademacher([dim], _seed(seed, i), dtype)

    total = _sum_quadratic_forms(matvec, dim, probe, num_samples, dtype)
    return _finite_or_nan(total / num_samples)


def hutchpp_trace(
    matvec: Matvec,
    dim: int,
    num_samples: int,
    *,
    seed: Seed = 0,
    dtype: Any = tf.float32,
) -> tf.Tensor:
    """Hutch++ trace estimate using `num_samples` matvecs in total.

    With `s = num_samples // 3`: a sign matrix S [dim, s] gives Q = qr(A S);
    the estimate is `tr(Q^T A Q)` (s matvecs) plus Hutchinson on the
    deflated `(I - QQ^T) A (I - QQ^T)` with the remaining
    `num_samples - 2 s` probes. It is exact when rank(A) <= s and needs
    O(1/eps) instead of O(1/eps^2) matvecs for relative error eps on PSD A.
    With `num_samples >= dim` the trace is computed exactly from the dim
    basis vectors instead (dim matvecs, no randomness).

    Args:
        matvec: symmetric operator mapping `[dim]` to `[dim]`.
        dim: operator dimension.
        num_samples: total matvecs (at most), >= 3.
        seed: int or integer scalar tensor; S uses `[seed, 0]` and residual
            probe i uses `[seed, i + 1]`.
        dtype: working dtype.

    Returns:
        Scalar trace estimate in `dtype`; NaN if it is not finite.

    References:
        Meyer, Musco, Musco and Woodruff, "Hutch++: Optimal Stochastic Trace
        Estimation", SOSA 2021.
    """
    dim = check_int("dim", dim, 1)
    num_samples = check_int("num_samples", num_samples, 3, hint=HUTCHPP_HINT)
    dtype = _check_dtype(dtype)
    if num_samples >= dim:
        return _exact_trace(matvec, dim, dtype)
    s = num_samples // 3
    num_probes = num_samples - 2 * s
    sketch = _rademacher([s, dim], _seed(seed, 0), dtype)
    images = tf.map_fn(
        lambda z: _apply(matvec, z, dim),
        sketch,
        fn_output_signature=tf.TensorSpec([dim], dtype),
    )
    q, _ = tf.linalg.qr(tf.transpose(images))  # [dim, s], orthonormal
    q_rows = tf.transpose(q)

    def residual_probe(i):
        z = _rademacher([dim], _seed(seed, i + 1), dtype)
        return z - tf.linalg.matvec(q, tf.linalg.matvec(q_rows, z))

    low_rank = _sum_quadratic_forms(
        matvec, dim, lambda i: tf.gather(q_rows, i), s, dtype
    )
    residual = _sum_quadratic_forms(
        matvec, dim, residual_probe, num_probes, dtype
    )
    return _finite_or_nan(low_rank + residual / num_probes)


# ---------------------------------------------------------------- density


def slq(
    matvec: Matvec,
    dim: int,
    num_runs: int,
    num_iterations: int,
    *,
    seed: Seed = 0,
    dtype: Any = tf.float32,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Stochastic Lanczos quadrature of the spectral density.

    Each run starts Lanczos from a seeded uniformly random unit vector v;
    the Ritz values theta_k and squared first components tau_k^2 of the
    tridiagonal eigenvectors form a Gauss quadrature of the measure
    `sum_i (v^T u_i)^2 delta(t - lambda_i)`, whose expectation is the
    spectral density `(1/dim) sum_i delta(t - lambda_i)`. In particular
    `sum_k w_k theta_k = v^T A v` estimates `tr(A) / dim`.

    Args:
        matvec: symmetric operator mapping `[dim]` to `[dim]`.
        dim: operator dimension.
        num_runs: number of independent start vectors, >= 1.
        num_iterations: Lanczos steps per run, >= 1; clipped to `dim`.
        seed: int or integer scalar tensor; run r draws the seeds
            `[seed, r * (m + 1) + c]` for c in 0..m.
        dtype: working dtype of the Lanczos vectors.

    Returns:
        `(nodes, weights)`, float64 tensors of shape `[num_runs, m]`; nodes
        ascending per run, weights of each run summing to 1.

    References:
        Ghorbani, Krishnan and Xiao, "An Investigation into Neural Net
        Optimization via Hessian Eigenvalue Density", ICML 2019.
    """
    dim = check_int("dim", dim, 1)
    num_runs = check_int("num_runs", num_runs, 1)
    m = min(check_int("num_iterations", num_iterations, 1), dim)
    dtype = _check_dtype(dtype)

    def run(r):
        result, _ = _lanczos(matvec, dim, m, None, seed, r * (m + 1), dtype)
        return result.alphas, result.betas[: m - 1]

    alphas, betas = tf.map_fn(
        run,
        tf.range(num_runs, dtype=tf.int64),
        fn_output_signature=(
            tf.TensorSpec([m], dtype),
            tf.TensorSpec([m - 1], dtype),
        ),
    )
    nodes, vectors = tridiagonal_eigh(alphas, betas)
    return nodes, tf.square(vectors[:, 0, :])


def spectral_density(
    nodes: Any,
    weights: Any,
    *,
    grid: int | np.ndarray | None = None,
    num_points: int = 1000,
    sigma: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-smoothed spectral density from SLQ nodes and weights.

    `density(t) = (1 / num_runs) sum_runs sum_k w_k N(t; node_k, sigma^2)`.

    Args:
        nodes: `[num_runs, m]` (or `[m]` for one run) quadrature nodes.
        weights: weights of the same shape, each run summing to 1.
        grid: evaluation points (1-D array), or an int number of points, or
            None for `num_points` points on `[min - pad, max + pad]` with
            `pad = 6 sigma`, so the density integrates to 1 on the grid.
        num_points: grid size when `grid` is None.
        sigma: kernel width; default `0.01 * (max(nodes) - min(nodes))`, or
            `0.01 * max(1, max |nodes|)` when all nodes coincide.

    Returns:
        `(grid, density)` float64 numpy arrays. Non-finite nodes or weights
        (a diverging operator) give a NaN density, on the given grid or on
        a NaN grid of `num_points` points (there is no range to span).
    """
    nodes = np.asarray(nodes, np.float64)
    weights = np.asarray(weights, np.float64)
    if nodes.shape != weights.shape or nodes.ndim not in (1, 2):
        raise ArgumentError(
            f"`nodes` {nodes.shape} and `weights` {weights.shape} must have "
            "the same shape [num_runs, m] or [m]; pass `slq` outputs."
        )
    if nodes.size == 0:
        raise ArgumentError("`nodes` is empty; pass `slq` outputs.")
    nodes, weights = np.atleast_2d(nodes), np.atleast_2d(weights)
    _check_sigma(sigma)
    if not (np.all(np.isfinite(nodes)) and np.all(np.isfinite(weights))):
        # A diverging operator: no range to span, a NaN density.
        grid = _density_grid(grid, num_points, lambda n: np.full(n, np.nan))
        return grid, np.full(grid.shape, np.nan)
    low, high = float(nodes.min()), float(nodes.max())
    if sigma is None:
        span = high - low
        if span <= 0:
            span = max(1.0, abs(high))
        sigma = _SIGMA_FRACTION * span
    pad = _GRID_PAD_SIGMAS * sigma
    grid = _density_grid(
        grid, num_points, lambda n: np.linspace(low - pad, high + pad, n)
    )
    z = (grid[:, None] - nodes.reshape(-1)[None, :]) / sigma
    kernel = np.exp(-0.5 * z**2) / (sigma * np.sqrt(2.0 * np.pi))
    density = kernel @ weights.reshape(-1) / nodes.shape[0]
    return grid, density


def _check_sigma(sigma: float | None) -> None:
    if sigma is not None and not sigma > 0:
        raise ArgumentError(
            f"`sigma` must be > 0; got {sigma}. Pass None for 1% of the "
            "spectral range."
        )


def _density_grid(
    grid: Any, num_points: int, default: Callable[[int], np.ndarray]
) -> np.ndarray:
    """The evaluation grid: given, or `default(num_points)` points."""
    if isinstance(grid, (int, np.integer)):
        grid, num_points = None, int(grid)
    if grid is None:
        grid = default(check_int("num_points", num_points, 2))
    grid = np.asarray(grid, np.float64)
    if grid.ndim != 1 or grid.size < 1:
        raise ArgumentError(
            f"`grid` must be 1-D and non-empty; got shape {grid.shape}."
        )
    return grid
