"""Gradient-noise statistics computed from a Gram matrix of sample gradients.

Every function here takes the n x n Gram matrix ``G[i, j] = <g_i, g_j>`` of
n sample gradients g_1..g_n (each the gradient of one example, or of a
micro-batch of M examples) and never needs the P-dimensional gradients, so
the cost is independent of the model size once G is accumulated.

Notation (all exact identities):

- mean gradient ``g_bar = (1/n) sum_i g_i``, so
  ``||g_bar||^2 = sum(G) / n^2``.
- centered covariance ``K = (1/n) sum_i (g_i - g_bar)(g_i - g_bar)^T`` (the
  break-even paper's K). Its nonzero eigenvalues are those of
  ``C G C / n`` with ``C = I - 1 1^T / n``; its rank is at most n - 1.
- uncentered second moment ``K_u = (1/n) sum_i g_i g_i^T``, whose nonzero
  eigenvalues are those of ``G / n``.

A Gram matrix is positive semi-definite, so negative eigenvalues can only be
roundoff; they are clipped to 0. Centering through G costs precision when the
mean dominates: the centered spectrum loses about
``log10(||g_bar||^2 / Tr(K))`` significant digits relative to centering the
gradients themselves.

Metric keys returned by `gram_statistics` (Python floats) and by its
TensorFlow twin `gram_statistics_tf` (float64 scalar tensors), listed in
order by `metric_keys`:

- ``grad_cov/lambda_1``, ``grad_cov/trace``, ``grad_cov/frobenius``,
  ``grad_cov/trace_over_lambda_1``, ``grad_cov/condition``: spectrum of the
  centered K (see `covariance_statistics`).
- ``grad_cov_uncentered/<same five names>``: the same for K_u.
- ``grad_cov/norm_ratio_top_k``: ``||g_bar|| / ||P_k g_bar||`` with P_k the
  orthogonal projector onto the top-k eigenvectors of the centered K (the
  break-even paper's ``||g|| / ||g_k||``).
- ``confusion/eta``: gradient confusion ``-min_{i != j} G[i, j]``.
- ``confusion/cos_min``, ``confusion/cos_mean``, ``confusion/cos_max`` and
  one ``confusion/cos_qXX`` per requested quantile, where XX is the quantile
  as a whole percent zero-padded to two digits (0.05 -> ``cos_q05``,
  0.5 -> ``cos_q50``, 1.0 -> ``cos_q100``): statistics of the pairwise
  cosines (see `pairwise_cosines`).
- ``confusion/num_zero_norm``: samples excluded from the cosines because
  their gradient is zero.
- ``grad/norm``: ``||g_bar||``.
- ``grad/diversity``: ``sum_i ||g_i||^2 / ||sum_i g_i||^2`` (Yin et al.,
  2018).
- ``grad/noise_scale``: ``B_simple = M Tr(K) / ||g_bar||^2`` in examples
  (McCandlish et al., 2018).
- ``probe/num_samples`` (n) and ``probe/microbatch_size`` (M).

References:
  Jastrzebski et al., The Break-Even Point on Optimization Trajectories of
  Deep Neural Networks, ICLR 2020.
  Sankararaman et al., The Impact of Neural Network Overparameterization on
  Gradient Confusion and Stochastic Gradient Descent, ICML 2020.
  Yin et al., Gradient Diversity: a Key Ingredient for Scalable Distributed
  Learning, AISTATS 2018.
  McCandlish et al., An Empirical Model of Large-Batch Training, 2018.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from tf_breakeven.validation import ArgumentError, check_int

# Largest |G - G^T| accepted, relative to max |G|: loose enough for a float32
# Gram accumulated in chunks, tight enough to reject a matrix that is not a
# Gram matrix at all.
_SYMMETRY_RTOL = 1e-4
# A sample gradient whose norm is at most this fraction of the largest sample
# gradient norm counts as zero: its cosines are 0/0 (docs/pitfalls.md#P22).
_ZERO_NORM_RTOL = 1e-12
# A covariance eigenvalue at most this fraction of the largest squared
# sample-gradient norm is roundoff of centering through G (float64 eps
# times a few hundred), and counts as 0: identical sample gradients whose
# rows differ in the last bit give K = 0 exactly, not a noise spectrum
# with a meaningless condition number.
_ROUNDOFF_RTOL = 1e-13

DEFAULT_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)

_COV_NAMES = (
    "lambda_1",
    "trace",
    "frobenius",
    "trace_over_lambda_1",
    "condition",
)


def covariance_eigenvalues(gram: Any, *, centered: bool = True) -> np.ndarray:
    """Eigenvalues of the gradient covariance, from the Gram matrix.

    Args:
      gram: array-like [n, n], ``G[i, j] = <g_i, g_j>`` (numpy, list or TF
        tensor; computed in float64).
      centered: True for the covariance K around the mean gradient, False
        for the uncentered second moment K_u.

    Returns:
      float64 array of length n in descending order: the n largest
      eigenvalues of K (or K_u), with roundoff negatives clipped to 0. All
      NaN if the Gram matrix has a NaN or Inf entry.

    Raises:
      ValueError: if gram is not a symmetric [n, n] matrix with n >= 2.
    """
    matrix = _validate_gram(gram)
    values, _ = _eigh_descending(
        _covariance_matrix(matrix, centered), _roundoff(matrix)
    )
    return values


def covariance_statistics(
    gram: Any, *, centered: bool = True, rtol: float = 1e-5
) -> dict[str, float]:
    """Spectral summary of the gradient covariance, from the Gram matrix.

    Args:
      gram: array-like [n, n], ``G[i, j] = <g_i, g_j>``.
      centered: True for K (centered), False for K_u (uncentered).
      rtol: relative tolerance separating numerically-zero eigenvalues:
        an eigenvalue counts as nonzero if it exceeds ``rtol * lambda_1``.
        The centered K has rank at most n - 1, so at least one of its n
        eigenvalues is zero up to roundoff.

    Returns:
      Dict with keys ``lambda_1`` (top eigenvalue), ``trace``, ``frobenius``
      (``sqrt(sum lambda^2)``), ``trace_over_lambda_1`` (the break-even
      paper's proxy for the conditioning) and ``condition``
      (``lambda_* / lambda_1`` with lambda_* the smallest eigenvalue above
      ``rtol * lambda_1``). The last two are NaN when the covariance is 0
      (e.g. centered K of identical gradients); all are NaN if the Gram
      matrix has a NaN or Inf entry.

    Raises:
      ValueError: if gram is not a symmetric [n, n] matrix with n >= 2, or
        rtol is not in [0, 1).
    """
    matrix = _validate_gram(gram)
    rtol = _check_rtol(rtol)
    cov = _covariance_matrix(matrix, centered)
    values, _ = _eigh_descending(cov, _roundoff(matrix))
    return _spectrum_statistics(cov, values, rtol)


def pairwise_cosines(gram: Any) -> np.ndarray:
    """Cosines between all pairs of nonzero sample gradients.

    ``cos_ij = G[i, j] / sqrt(G[i, i] G[j, j])`` for i < j, clipped to
    [-1, 1]. A sample whose gradient norm is at most 1e-12 times the largest
    sample gradient norm counts as zero and is left out (its cosines are 0/0;
    `gram_statistics` reports how many were left out).

    Args:
      gram: array-like [n, n], ``G[i, j] = <g_i, g_j>``.

    Returns:
      1-D float64 array of the m (m - 1) / 2 cosines among the m nonzero
      samples, pairs in row-major order of (i, j), i < j; empty if m < 2.
      If the Gram matrix has a NaN or Inf entry: n (n - 1) / 2 NaNs.

    Raises:
      ValueError: if gram is not a symmetric [n, n] matrix with n >= 2.
    """
    cosines, _ = _cosines(_validate_gram(gram))
    return cosines


def top_directions(
    gram: Any, k: int, *, centered: bool = True, rtol: float = 1e-5
) -> tuple[np.ndarray, np.ndarray]:
    """Top eigenpairs of the gradient covariance, as combinations of g_i.

    The eigenvectors of K live in parameter space; they are returned as a
    coefficient matrix ``coefficients`` such that
    ``u_j = sum_i coefficients[j, i] g_i`` are orthonormal eigenvectors of K
    (or K_u) with eigenvalues ``eigenvalues[j]``. For the centered K each row
    of coefficients sums to 0 (u_j is a combination of the g_i - g_bar).
    Inner products with u_j need only G, e.g.
    ``<u_j, g_bar> = coefficients[j] @ G.mean(axis=1)``.

    Args:
      gram: array-like [n, n], ``G[i, j] = <g_i, g_j>``.
      k: number of directions wanted.
      centered: True for K (centered), False for K_u (uncentered).
      rtol: an eigenvalue at most ``rtol * lambda_1`` is numerically zero
        and has no direction (it cannot be normalized).

    Returns:
      ``(eigenvalues, coefficients)`` of shapes [k'] and [k', n], eigenvalues
      descending, where k' = min(k, numerical rank) may be less than k (the
      centered K has rank at most n - 1). If the Gram matrix has a NaN or
      Inf entry: k' = min(k, n) and all entries NaN.

    Raises:
      ValueError: if gram is not a symmetric [n, n] matrix with n >= 2, k is
        less than 1, or rtol is not in [0, 1).
    """
    matrix = _validate_gram(gram)
    k = _check_positive_int(k, "k", "ask for at least one direction")
    rtol = _check_rtol(rtol)
    values, vectors = _eigh_descending(
        _covariance_matrix(matrix, centered), _roundoff(matrix)
    )
    return _directions(values, vectors, k, rtol, centered)


def gram_statistics(
    gram: Any,
    *,
    microbatch_size: int = 1,
    k: int = 5,
    rtol: float = 1e-5,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
) -> dict[str, float]:
    """All Gram-based statistics under the module's metric key scheme.

    See the module docstring for the keys. Conventions at the edges:

    - A Gram matrix with a NaN or Inf entry (a diverging run) gives every
      key NaN except ``probe/num_samples`` and ``probe/microbatch_size``;
      it never raises.
    - A zero mean gradient gives ``grad/diversity`` and ``grad/noise_scale``
      inf (or NaN when the numerator is 0 too, i.e. all gradients are zero),
      as the formulas say; ``||g_bar||^2`` is clipped at 0 against roundoff.
    - ``grad_cov/norm_ratio_top_k`` uses the top min(k, rank) eigenvectors
      of the centered K; it is inf if g_bar is orthogonal to them (e.g. K =
      0) and NaN if g_bar = 0.
    - ``confusion/eta`` uses all pairs, zero gradients included (their
      inner products are 0). The cosine statistics leave zero gradients out
      and are NaN when fewer than 2 nonzero gradients remain.
    - K's eigenvalues <= 1e-13 max_i ||g_i||^2 are roundoff (0): K = 0.

    Args:
      gram: array-like [n, n], ``G[i, j] = <g_i, g_j>`` of n sample
        gradients.
      microbatch_size: number of examples M behind each sample gradient;
        scales the noise scale to examples.
      k: number of top covariance directions for the norm ratio.
      rtol: relative tolerance separating numerically-zero eigenvalues (see
        `covariance_statistics`).
      quantiles: cosine quantiles to report, each a whole percentage in
        [0, 1] such as 0.05.

    Returns:
      Dict from metric key to Python float.

    Raises:
      ValueError: if gram is not a symmetric [n, n] matrix with n >= 2,
        microbatch_size or k is less than 1, rtol is not in [0, 1), or a
        quantile is not a whole percentage in [0, 1] or is repeated.
    """
    matrix = _validate_gram(gram)
    microbatch_size, k, rtol, quantile_names = _check_arguments(
        microbatch_size, k, rtol, quantiles
    )
    stats = dict.fromkeys(_keys(quantile_names), np.nan)
    stats["probe/num_samples"] = float(matrix.shape[0])
    stats["probe/microbatch_size"] = float(microbatch_size)
    if np.all(np.isfinite(matrix)):
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            stats.update(
                _finite_statistics(
                    matrix, microbatch_size, k, rtol, quantile_names
                )
            )
    return stats


def _finite_statistics(
    matrix: np.ndarray,
    microbatch_size: int,
    k: int,
    rtol: float,
    quantile_names: dict[str, float],
) -> dict[str, float]:
    """The statistics of a finite, validated Gram matrix but ``probe/*``."""
    n = matrix.shape[0]
    stats = {}
    cov = _covariance_matrix(matrix, centered=True)
    floor = _roundoff(matrix)
    values, vectors = _eigh_descending(cov, floor)
    for name, value in _spectrum_statistics(cov, values, rtol).items():
        stats[f"grad_cov/{name}"] = value
    cov_u = _covariance_matrix(matrix, centered=False)
    values_u, _ = _eigh_descending(cov_u, floor)
    for name, value in _spectrum_statistics(cov_u, values_u, rtol).items():
        stats[f"grad_cov_uncentered/{name}"] = value

    mean_sq_norm = np.maximum(matrix.sum() / n**2, 0.0)
    _, coefficients = _directions(values, vectors, k, rtol, centered=True)
    projections = coefficients @ matrix.mean(axis=1)
    # Defined as NaN for g_bar = 0, where roundoff would decide 0/0.
    stats["grad_cov/norm_ratio_top_k"] = (
        float(np.sqrt(mean_sq_norm / np.sum(projections**2)))
        if mean_sq_norm > 0
        else np.nan
    )

    stats.update(_confusion_statistics(matrix, quantile_names))

    trace_k = np.float64(stats["grad_cov/trace"])  # numpy 0-division
    stats["grad/norm"] = float(np.sqrt(mean_sq_norm))
    stats["grad/diversity"] = float(np.trace(matrix) / (n**2 * mean_sq_norm))
    stats["grad/noise_scale"] = float(microbatch_size * trace_k / mean_sq_norm)
    return stats


def metric_keys(
    *, quantiles: Sequence[float] = DEFAULT_QUANTILES
) -> tuple[str, ...]:
    """The keys of `gram_statistics` and `gram_statistics_tf`, in order.

    Args:
      quantiles: the cosine quantiles, as passed to those functions.

    Raises:
      ValueError: if a quantile is not a whole percentage in [0, 1] or is
        repeated.
    """
    return _keys(_quantile_names(quantiles))


def gram_statistics_tf(
    gram: Any,
    *,
    microbatch_size: int = 1,
    k: int = 5,
    rtol: float = 1e-5,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
) -> dict[str, tf.Tensor]:
    """`gram_statistics` in TensorFlow: graph-friendly and XLA-compilable.

    The same keys (`metric_keys`), definitions and edge conventions as
    `gram_statistics` (tested against it to float64 roundoff), computed in
    float64 from fixed-shape tensor ops with no host synchronization, so it
    runs eagerly, inside a `tf.function` (also with an unknown n) and with
    `jit_compile=True`. Where the numpy version validates values, this one
    cannot (the values are not known while tracing):

    - A Gram matrix with a NaN or Inf entry gives NaN for every key except
      ``probe/*`` (the decompositions run on zeros instead); it never
      raises. The matrix is symmetrized, not checked for symmetry.
    - n < 2 (a batch smaller than two micro-batches inside a train step) is
      not refused: with n = 1 there are no pairs (NaN cosines, ``eta`` =
      -inf) and the centered covariance is 0.
    - Under XLA on CPU the eigensolver is iterative: eigenvalues agree with
      LAPACK to ~1e-13 relative to lambda_1, eigenvectors (so
      ``grad_cov/norm_ratio_top_k``) only to ~1e-7.

    Args:
      gram: [n, n] tensor or array-like, ``G[i, j] = <g_i, g_j>``.
      microbatch_size, k, rtol, quantiles: as for `gram_statistics`
        (Python values, fixed while tracing).

    Returns:
      Dict from metric key to float64 scalar tensor, in `metric_keys` order.

    Raises:
      ValueError: a bad argument (as `gram_statistics`), or gram of a known
        shape that is not square.
    """
    microbatch_size, k, rtol, quantile_names = _check_arguments(
        microbatch_size, k, rtol, quantiles
    )
    matrix = _tf_gram(gram)
    finite = tf.reduce_all(tf.math.is_finite(matrix))
    matrix = tf.where(finite, matrix, tf.zeros_like(matrix))
    matrix = 0.5 * (matrix + tf.transpose(matrix))
    stats = _tf_finite_statistics(
        matrix, microbatch_size, k, rtol, quantile_names
    )
    stats = {key: tf.where(finite, value, _NAN) for key, value in stats.items()}
    stats["probe/num_samples"] = tf.cast(tf.shape(matrix)[0], tf.float64)
    stats["probe/microbatch_size"] = tf.constant(
        float(microbatch_size), tf.float64
    )
    return {key: stats[key] for key in _keys(quantile_names)}


def _tf_finite_statistics(
    matrix: tf.Tensor,
    microbatch_size: int,
    k: int,
    rtol: float,
    quantile_names: dict[str, float],
) -> dict[str, tf.Tensor]:
    """`_finite_statistics` in TF, for a finite symmetrized matrix."""
    n = tf.cast(tf.shape(matrix)[0], tf.float64)
    cov = _tf_covariance(matrix, centered=True)
    floor = _tf_roundoff(matrix)
    values, vectors = _tf_eigh_descending(cov, floor)
    stats = _tf_spectrum_statistics(cov, values, rtol, "grad_cov/")
    cov_u = _tf_covariance(matrix, centered=False)
    values_u, _ = _tf_eigh_descending(cov_u, floor)
    stats.update(
        _tf_spectrum_statistics(cov_u, values_u, rtol, "grad_cov_uncentered/")
    )
    mean_sq_norm = tf.maximum(tf.reduce_sum(matrix) / n**2, 0.0)
    stats["grad_cov/norm_ratio_top_k"] = _tf_norm_ratio(
        matrix, values, vectors, mean_sq_norm, k, rtol
    )
    stats.update(_tf_confusion_statistics(matrix, quantile_names))
    stats["grad/norm"] = tf.sqrt(mean_sq_norm)
    stats["grad/diversity"] = tf.linalg.trace(matrix) / (n**2 * mean_sq_norm)
    stats["grad/noise_scale"] = (
        microbatch_size * stats["grad_cov/trace"] / mean_sq_norm
    )
    return stats


def _shape_error(shape: Any) -> ArgumentError:
    return ArgumentError(
        "gram must be a square 2-D matrix [n, n] of inner products "
        f"G[i, j] = <g_i, g_j>, got shape {shape}; build it as "
        "X @ X.T from the [n, P] matrix X of flattened sample gradients."
    )


def _validate_gram(gram: Any) -> np.ndarray:
    """Returns gram as a symmetrized float64 [n, n] array, or raises."""
    matrix = np.asarray(gram, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise _shape_error(matrix.shape)
    n = matrix.shape[0]
    if n < 2:
        raise ArgumentError(
            f"need at least 2 sample gradients, got a Gram matrix of n={n}; "
            "use a larger probe set or a smaller microbatch_size."
        )
    if not np.all(np.isfinite(matrix)):
        return matrix  # a diverging run: callers report NaN.
    with np.errstate(over="ignore", invalid="ignore"):
        asymmetry = np.max(np.abs(matrix - matrix.T))
    scale = np.max(np.abs(matrix))
    if not asymmetry <= _SYMMETRY_RTOL * scale:
        raise ArgumentError(
            "gram must be symmetric (G[i, j] = <g_i, g_j>), got "
            f"max |G - G^T| = {asymmetry:.3g} for max |G| = {scale:.3g}; "
            "pass the Gram matrix of the sample gradients, or symmetrize it "
            "with (G + G.T) / 2 if the asymmetry is accumulated roundoff."
        )
    return 0.5 * (matrix + matrix.T)


def _check_arguments(
    microbatch_size: Any, k: Any, rtol: Any, quantiles: Sequence[float]
) -> tuple[int, int, float, dict[str, float]]:
    """The validated arguments of `gram_statistics` and its TF twin."""
    microbatch_size = _check_positive_int(
        microbatch_size,
        "microbatch_size",
        "pass the number of examples behind each sample gradient",
    )
    k = _check_positive_int(k, "k", "ask for at least one direction")
    return microbatch_size, k, _check_rtol(rtol), _quantile_names(quantiles)


def _check_positive_int(value: Any, name: str, hint: str) -> int:
    return check_int(
        name, value, 1, hint=f"{hint[0].upper()}{hint[1:]}.", quote=False
    )


def _check_rtol(rtol: float) -> float:
    rtol = float(rtol)
    if not 0.0 <= rtol < 1.0:
        raise ArgumentError(
            f"rtol must be in [0, 1), got {rtol}; it is the fraction of "
            "lambda_1 below which an eigenvalue counts as zero (default 1e-5)."
        )
    return rtol


def _quantile_names(quantiles: Sequence[float]) -> dict[str, float]:
    """Maps ``confusion/cos_qXX`` names to quantiles, validating them."""
    names = {}
    for q in quantiles:
        q = float(q)
        percent = round(q * 100) if np.isfinite(q) else -1
        if not 0.0 <= q <= 1.0 or abs(q * 100 - percent) > 1e-9:
            raise ArgumentError(
                f"quantiles must be whole percentages in [0, 1] such as 0.05, "
                f"got {q}; metric keys name them by percent (cos_q05)."
            )
        name = f"confusion/cos_q{percent:02d}"
        if name in names:
            raise ArgumentError(
                f"quantile {q} is repeated in quantiles={tuple(quantiles)}; "
                "pass each quantile once."
            )
        names[name] = q
    return names


def _keys(quantile_names: dict[str, float]) -> tuple[str, ...]:
    return (
        *(f"grad_cov/{name}" for name in _COV_NAMES),
        *(f"grad_cov_uncentered/{name}" for name in _COV_NAMES),
        "grad_cov/norm_ratio_top_k",
        "confusion/eta",
        "confusion/cos_min",
        "confusion/cos_mean",
        "confusion/cos_max",
        *quantile_names,
        "confusion/num_zero_norm",
        "grad/norm",
        "grad/diversity",
        "grad/noise_scale",
        "probe/num_samples",
        "probe/microbatch_size",
    )


def _covariance_matrix(gram: np.ndarray, centered: bool) -> np.ndarray:
    """C G C / n (centered) or G / n: same nonzero spectrum as K or K_u."""
    n = gram.shape[0]
    if centered:
        with np.errstate(over="ignore", invalid="ignore"):
            gram = (
                gram
                - gram.mean(axis=0, keepdims=True)
                - gram.mean(axis=1, keepdims=True)
                + gram.mean()
            )
        gram = 0.5 * (gram + gram.T)
    return gram / n


def _roundoff(gram: np.ndarray) -> float:
    """Covariance eigenvalues at most this are roundoff (`_ROUNDOFF_RTOL`)."""
    if gram.size == 0 or not np.all(np.isfinite(gram)):
        return 0.0
    return _ROUNDOFF_RTOL * float(np.max(np.diag(gram)))


def _eigh_descending(
    matrix: np.ndarray, floor: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs, descending, values <= floor set to 0 (roundoff
    negatives included); NaN instead of raising."""
    n = matrix.shape[0]
    if np.all(np.isfinite(matrix)):
        try:
            values, vectors = np.linalg.eigh(matrix)
        except np.linalg.LinAlgError:
            pass
        else:
            values = values[::-1]
            return np.where(values > floor, values, 0.0), vectors[:, ::-1]
    return np.full(n, np.nan), np.full((n, n), np.nan)


def _numerical_rank(values: np.ndarray, rtol: float) -> int:
    if not values[0] > 0.0:
        return 0
    return int(np.count_nonzero(values > rtol * values[0]))


def _spectrum_statistics(
    cov: np.ndarray, values: np.ndarray, rtol: float
) -> dict[str, float]:
    if not np.all(np.isfinite(values)):
        return dict.fromkeys(_COV_NAMES, np.nan)
    lambda_1 = float(values[0])
    rank = _numerical_rank(values, rtol)
    return {
        "lambda_1": lambda_1,
        # Invariants of the matrix itself: exact, whatever the eigensolver.
        "trace": max(float(np.trace(cov)), 0.0),
        "frobenius": float(np.linalg.norm(cov)),
        "trace_over_lambda_1": (
            max(float(np.trace(cov)), 0.0) / lambda_1 if rank else np.nan
        ),
        "condition": float(values[rank - 1]) / lambda_1 if rank else np.nan,
    }


def _directions(
    values: np.ndarray,
    vectors: np.ndarray,
    k: int,
    rtol: float,
    centered: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients of the top eigenvectors of K in terms of the g_i."""
    n = values.shape[0]
    if not np.all(np.isfinite(values)):
        k = min(k, n)
        return np.full(k, np.nan), np.full((k, n), np.nan)
    k = min(k, _numerical_rank(values, rtol))
    top_values = values[:k]
    top_vectors = vectors[:, :k]
    if centered:
        # Exact zero-sum coefficients: u_j is a combination of g_i - g_bar.
        top_vectors = top_vectors - top_vectors.mean(axis=0, keepdims=True)
    # (C G C) v = n lambda v with |v| = 1 gives |X^T C v|^2 = n lambda.
    coefficients = (top_vectors / np.sqrt(n * top_values)).T
    return top_values.copy(), coefficients


def _confusion_statistics(
    gram: np.ndarray, quantile_names: dict[str, float]
) -> dict[str, float]:
    """Gradient confusion and cosine statistics of a finite Gram matrix."""
    n = gram.shape[0]
    cosines, num_zero = _cosines(gram)
    stats = {
        "confusion/eta": float(-gram[~np.eye(n, dtype=bool)].min()),
        "confusion/num_zero_norm": float(num_zero),
    }
    if cosines.size:
        stats["confusion/cos_min"] = float(cosines.min())
        stats["confusion/cos_mean"] = float(cosines.mean())
        stats["confusion/cos_max"] = float(cosines.max())
        for name, q in quantile_names.items():
            stats[name] = float(np.quantile(cosines, q))
    return stats


def _cosines(gram: np.ndarray) -> tuple[np.ndarray, int | float]:
    """Pairwise cosines of nonzero gradients and the number left out."""
    n = gram.shape[0]
    if not np.all(np.isfinite(gram)):
        return np.full(n * (n - 1) // 2, np.nan), np.nan
    sq_norms = np.diag(gram)
    keep = sq_norms > _ZERO_NORM_RTOL**2 * sq_norms.max()
    norms = np.sqrt(sq_norms[keep])
    kept = gram[np.ix_(keep, keep)]
    # Divide twice rather than by the outer product, which could overflow.
    cosines = kept / norms[:, None] / norms[None, :]
    upper = np.triu_indices(norms.size, k=1)
    return np.clip(cosines[upper], -1.0, 1.0), int(n - norms.size)


# ----------------------------------------- TensorFlow (gram_statistics_tf)
_NAN = float("nan")
_INF = float("inf")


def _tf_gram(gram: Any) -> tf.Tensor:
    """gram as a float64 tensor; raises if its known shape is not square."""
    matrix = tf.cast(
        tf.convert_to_tensor(gram, dtype_hint=tf.float64), tf.float64
    )
    shape = matrix.shape
    if shape.rank is not None and (
        shape.rank != 2
        or (None not in (shape[0], shape[1]) and shape[0] != shape[1])
    ):
        raise _shape_error(tuple(shape))
    return matrix


def _tf_covariance(gram: tf.Tensor, centered: bool) -> tf.Tensor:
    """`_covariance_matrix` in TF, the same operations in the same order."""
    n = tf.cast(tf.shape(gram)[0], tf.float64)
    if centered:
        gram = (
            gram
            - tf.reduce_mean(gram, axis=0, keepdims=True)
            - tf.reduce_mean(gram, axis=1, keepdims=True)
            + tf.reduce_mean(gram)
        )
        gram = 0.5 * (gram + tf.transpose(gram))
    return gram / n


def _tf_roundoff(gram: tf.Tensor) -> tf.Tensor:
    """`_roundoff` in TF (0 for an empty matrix)."""
    diagonal = tf.linalg.diag_part(gram)
    top = tf.reduce_max(tf.concat([diagonal, tf.zeros([1], gram.dtype)], 0))
    return _ROUNDOFF_RTOL * top


def _tf_eigh_descending(
    matrix: tf.Tensor, floor: Any = 0.0
) -> tuple[tf.Tensor, tf.Tensor]:
    """Eigenpairs, descending, values <= floor set to 0; NaN for a
    non-finite matrix (decomposed as zeros, so eigh never sees a NaN)."""
    finite = tf.reduce_all(tf.math.is_finite(matrix))
    values, vectors = tf.linalg.eigh(
        tf.where(finite, matrix, tf.zeros_like(matrix))
    )
    values = tf.reverse(values, [0])
    values = tf.where(finite, tf.where(values > floor, values, 0.0), _NAN)
    vectors = tf.where(finite, tf.reverse(vectors, [1]), _NAN)
    return values, vectors


def _tf_numerical_rank(values: tf.Tensor, rtol: float) -> tf.Tensor:
    above = tf.reduce_sum(tf.cast(values > rtol * values[0], tf.int32))
    return tf.where(values[0] > 0.0, above, 0)


def _tf_spectrum_statistics(
    cov: tf.Tensor, values: tf.Tensor, rtol: float, prefix: str
) -> dict[str, tf.Tensor]:
    """`_spectrum_statistics` in TF, keys prefixed."""
    lambda_1 = values[0]
    rank = _tf_numerical_rank(values, rtol)
    trace = tf.maximum(tf.linalg.trace(cov), 0.0)
    lambda_star = tf.gather(values, tf.maximum(rank - 1, 0))
    stats = {
        "lambda_1": lambda_1,
        "trace": trace,
        "frobenius": tf.norm(cov),
        "trace_over_lambda_1": tf.where(rank > 0, trace / lambda_1, _NAN),
        "condition": tf.where(rank > 0, lambda_star / lambda_1, _NAN),
    }
    finite = tf.reduce_all(tf.math.is_finite(values))
    return {
        prefix + name: tf.where(finite, value, _NAN)
        for name, value in stats.items()
    }


def _tf_norm_ratio(
    gram: tf.Tensor,
    values: tf.Tensor,
    vectors: tf.Tensor,
    mean_sq_norm: tf.Tensor,
    k: int,
    rtol: float,
) -> tf.Tensor:
    """``||g_bar|| / ||P_k g_bar||`` as in `gram_statistics`: the top
    min(k, rank) directions of `_directions`, the others masked out."""
    n = tf.cast(tf.shape(gram)[0], tf.float64)
    top_values = values[:k]
    used = tf.range(tf.shape(top_values)[0]) < tf.minimum(
        k, _tf_numerical_rank(values, rtol)
    )
    top_vectors = vectors[:, :k]
    # Exact zero-sum coefficients: u_j is a combination of g_i - g_bar.
    top_vectors = top_vectors - tf.reduce_mean(
        top_vectors, axis=0, keepdims=True
    )
    coefficients = top_vectors / tf.sqrt(n * tf.where(used, top_values, 1.0))
    projections = tf.linalg.matvec(
        coefficients, tf.reduce_mean(gram, axis=1), transpose_a=True
    )
    total = tf.reduce_sum(tf.where(used, projections, 0.0) ** 2)
    ratio = tf.sqrt(mean_sq_norm / total)
    # NaN for g_bar = 0, where roundoff would decide 0/0.
    finite = tf.reduce_all(tf.math.is_finite(values))
    return tf.where(finite & (mean_sq_norm > 0.0), ratio, _NAN)


def _tf_cosines(gram: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """All [n, n] clipped cosines, the mask of the pairs i < j of nonzero
    gradients that `_cosines` returns, and the number of zero gradients."""
    n = tf.shape(gram)[0]
    sq_norms = tf.linalg.diag_part(gram)
    keep = sq_norms > _ZERO_NORM_RTOL**2 * tf.reduce_max(sq_norms)
    norms = tf.sqrt(tf.where(keep, sq_norms, 1.0))
    cosines = gram / norms[:, None] / norms[None, :]
    index = tf.range(n)
    pairs = (index[:, None] < index[None, :]) & keep[:, None] & keep[None, :]
    num_zero = tf.cast(n - tf.reduce_sum(tf.cast(keep, tf.int32)), tf.float64)
    return tf.clip_by_value(cosines, -1.0, 1.0), pairs, num_zero


def _tf_quantile(ordered: tf.Tensor, count: tf.Tensor, q: float) -> tf.Tensor:
    """numpy's default (`linear`) quantile of the first `count` entries of
    the ascending `ordered`, with numpy's index and lerp arithmetic."""
    size = tf.cast(count, tf.float64)
    virtual = size * q + (1.0 - q) - 1.0  # alpha = beta = 1
    previous = tf.floor(virtual)
    gamma = virtual - previous
    # Beyond the ends both neighbours are the end value.
    above, below = virtual >= size - 1.0, virtual < 0.0
    last = tf.maximum(count - 1, 0)
    lower = tf.cast(previous, tf.int32)
    upper = tf.where(above, last, tf.where(below, 0, lower + 1))
    lower = tf.where(above, last, tf.where(below, 0, lower))
    a, b = tf.gather(ordered, lower), tf.gather(ordered, upper)
    diff = b - a
    return tf.where(gamma >= 0.5, b - diff * (1.0 - gamma), a + diff * gamma)


def _tf_confusion_statistics(
    gram: tf.Tensor, quantile_names: dict[str, float]
) -> dict[str, tf.Tensor]:
    """`_confusion_statistics` in TF: masks and a sort, no boolean_mask."""
    off_diagonal = ~tf.eye(tf.shape(gram)[0], dtype=tf.bool)
    cosines, pairs, num_zero = _tf_cosines(gram)
    count = tf.reduce_sum(tf.cast(pairs, tf.int32))
    # Left-out pairs sort last (+inf), after the `count` cosines.
    ordered = tf.sort(tf.reshape(tf.where(pairs, cosines, _INF), [-1]))
    cosine_stats = {
        "confusion/cos_min": ordered[0],
        "confusion/cos_mean": tf.reduce_sum(tf.where(pairs, cosines, 0.0))
        / tf.cast(count, tf.float64),
        "confusion/cos_max": tf.gather(ordered, tf.maximum(count - 1, 0)),
    }
    for name, q in quantile_names.items():
        cosine_stats[name] = _tf_quantile(ordered, count, q)
    stats = {
        "confusion/eta": -tf.reduce_min(tf.where(off_diagonal, gram, _INF)),
        "confusion/num_zero_norm": num_zero,
    }
    for name, value in cosine_stats.items():
        stats[name] = tf.where(count > 0, value, _NAN)
    return stats
