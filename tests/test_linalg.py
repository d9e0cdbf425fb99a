"""Tests of `tf_breakeven.linalg` against numpy float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tf_breakeven import linalg

# ------------------------------------------------------------ test matrices


def _orthogonal(dim: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))
    return q * np.sign(np.diag(r))


def _with_spectrum(eigenvalues, seed: int = 0) -> np.ndarray:
    eigenvalues = np.asarray(eigenvalues, np.float64)
    q = _orthogonal(len(eigenvalues), seed)
    matrix = (q * eigenvalues) @ q.T
    return (matrix + matrix.T) / 2


def _gaussian_symmetric(dim: int, seed: int) -> np.ndarray:
    g = np.random.default_rng(seed).normal(size=(dim, dim))
    return (g + g.T) / np.sqrt(2 * dim)


def _repeated(dim: int = 16) -> np.ndarray:
    rest = np.linspace(-1.5, 2.5, dim - 7)
    return _with_spectrum(np.r_[3, 3, 3, 1, 0, 0, -2, rest], seed=1)


def _rank_deficient(dim: int = 40) -> np.ndarray:
    return _with_spectrum(np.r_[5, 2, 1, -1, -3, np.zeros(dim - 5)], seed=2)


def _decaying(dim: int = 60) -> np.ndarray:
    """Well separated extremes (both signs) around a tight cluster at 0."""
    top = 10.0 * 0.7 ** np.arange(8)
    bottom = -8.0 * 0.7 ** np.arange(8)
    middle = np.random.default_rng(3).uniform(-0.05, 0.05, dim - 16)
    return _with_spectrum(np.r_[top, bottom, middle], seed=3)


MATRICES = {
    "gaussian_30": lambda: _gaussian_symmetric(30, seed=4),
    "repeated_16": _repeated,
    "rank_deficient_40": _rank_deficient,
    "tiny_8": lambda: _gaussian_symmetric(8, seed=5),
}
DTYPES = {"float32": tf.float32, "float64": tf.float64}


def _matvec(matrix: np.ndarray, dtype=tf.float64):
    operator = tf.constant(matrix, dtype)
    return lambda v: tf.linalg.matvec(operator, v)


def _norm2(matrix: np.ndarray) -> float:
    return float(np.abs(np.linalg.eigvalsh(matrix)).max())


def _ritz_values(result: linalg.LanczosResult) -> np.ndarray:
    values, _ = linalg.tridiagonal_eigh(result.alphas, result.betas)
    return np.sort(values.numpy())


# ---------------------------------------------------------------- flatten


def test_flatten_unflatten_round_trip():
    tensors = [tf.reshape(tf.range(6.0), [2, 3]), tf.constant([6.0, 7.0, 8.0])]
    flat = linalg.flatten_tensors(tensors)
    np.testing.assert_array_equal(flat.numpy(), np.arange(9.0))
    back = linalg.unflatten_tensors(flat, [[2, 3], [3]])
    for got, want in zip(back, tensors, strict=True):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_as_flat_matvec_block_operator_matches_eigh():
    a = _gaussian_symmetric(6, seed=6)
    b = _gaussian_symmetric(4, seed=7)
    shapes = [(2, 3), (4,)]

    def list_matvec(parts):
        left = tf.linalg.matvec(tf.constant(a), tf.reshape(parts[0], [6]))
        right = tf.linalg.matvec(tf.constant(b), parts[1])
        return [tf.reshape(left, [2, 3]), right]

    matvec = linalg.as_flat_matvec(list_matvec, shapes)
    result = linalg.eigsh(matvec, 10, 10, dtype=tf.float64)
    block = np.zeros((10, 10))
    block[:6, :6], block[6:, 6:] = a, b
    reference = np.linalg.eigvalsh(block)
    np.testing.assert_allclose(
        result.eigenvalues.numpy(), reference[::-1], atol=1e-10
    )


# ---------------------------------------------------------------- Lanczos


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("name", MATRICES.keys())
def test_lanczos_full_dimension_recovers_whole_spectrum(name, dtype):
    matrix = MATRICES[name]()
    dim = len(matrix)
    result = linalg.lanczos(_matvec(matrix, dtype), dim, dim, dtype=dtype)
    tol = 1e-8 if dtype == tf.float64 else 1e-4
    error = np.abs(_ritz_values(result) - np.linalg.eigvalsh(matrix)).max()
    assert error <= tol * _norm2(matrix)
    basis = result.basis.numpy().astype(np.float64)
    orth_tol = 1e-10 if dtype == tf.float64 else 1e-5
    np.testing.assert_allclose(basis @ basis.T, np.eye(dim), atol=orth_tol)


def test_lanczos_tridiagonal_is_projection_of_operator():
    matrix = _gaussian_symmetric(30, seed=8)
    result = linalg.lanczos(_matvec(matrix), 30, 10, dtype=tf.float64)
    assert result.alphas.shape == [10] and result.betas.shape == [9]
    basis = result.basis.numpy()
    tridiagonal = (
        np.diag(result.alphas.numpy())
        + np.diag(result.betas.numpy(), 1)
        + np.diag(result.betas.numpy(), -1)
    )
    np.testing.assert_allclose(
        basis @ matrix @ basis.T, tridiagonal, atol=1e-12
    )


BREAKDOWNS = {
    # 11 distinct eigenvalues: the Krylov space is exhausted after 11 steps,
    # the restart sees eigenvalues {3, 1, 0} (3 steps), then {3, 0}.
    "repeated_16_float64": (_repeated, tf.float64, [10, 13]),
    # Rank 5 plus the null space: one invariant subspace of dimension 6,
    # then every restart lies in the null space.
    "rank_deficient_40_float64": (_rank_deficient, tf.float64, range(5, 39)),
    "rank_deficient_40_float32": (_rank_deficient, tf.float32, range(5, 39)),
}


@pytest.mark.parametrize(
    "make, dtype, zeros", BREAKDOWNS.values(), ids=BREAKDOWNS.keys()
)
def test_lanczos_breakdown_sets_beta_to_zero_and_restarts(make, dtype, zeros):
    matrix = make()
    dim = len(matrix)
    result = linalg.lanczos(_matvec(matrix, dtype), dim, dim, dtype=dtype)
    betas = result.betas.numpy()
    zeros = list(zeros)
    np.testing.assert_array_equal(betas[zeros], 0.0)
    assert np.all(np.delete(betas, zeros)[: zeros[0]] > 1e-2)
    assert np.all(np.isfinite(result.basis.numpy()))


def test_lanczos_warm_start_uses_normalized_start_vector():
    matrix = _gaussian_symmetric(20, seed=9)
    values, vectors = np.linalg.eigh(matrix)
    start = tf.constant(3.0 * vectors[:, -1])
    result = linalg.lanczos(
        _matvec(matrix), 20, 5, start_vector=start, dtype=tf.float64
    )
    np.testing.assert_allclose(result.basis[0].numpy(), vectors[:, -1])
    np.testing.assert_allclose(result.alphas[0].numpy(), values[-1])
    assert result.betas[0].numpy() == 0.0  # an eigenvector is invariant


@pytest.mark.parametrize("batch", [(), (3,)], ids=["single", "batched"])
def test_tridiagonal_eigh_matches_numpy(batch):
    rng = np.random.default_rng(10)
    alphas = rng.normal(size=batch + (7,)).astype(np.float32)
    betas = rng.normal(size=batch + (6,)).astype(np.float32)
    values, vectors = linalg.tridiagonal_eigh(alphas, betas)
    assert values.dtype == tf.float64
    for i in np.ndindex(batch):
        dense = (
            np.diag(alphas[i]) + np.diag(betas[i], 1) + np.diag(betas[i], -1)
        )
        dense = dense.astype(np.float64)
        np.testing.assert_allclose(
            values.numpy()[i], np.linalg.eigvalsh(dense), atol=1e-12
        )
        v = vectors.numpy()[i]
        np.testing.assert_allclose(dense @ v, v * values.numpy()[i], atol=1e-12)


# -------------------------------------------------------------- eigsh


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_eigsh_float32_default_iterations_on_decaying_spectrum(which):
    matrix = _decaying()
    values, vectors = np.linalg.eigh(matrix)
    order = slice(None, -4, -1) if which == "largest" else slice(0, 3)
    result = linalg.eigsh(_matvec(matrix, tf.float32), 60, 3, which=which)
    assert result.eigenvalues.dtype == tf.float32
    got = result.eigenvalues.numpy()
    np.testing.assert_allclose(got, values[order], rtol=1e-4)
    overlaps = np.abs(
        np.sum(result.eigenvectors.numpy() * vectors[:, order].T, 1)
    )
    assert np.all(overlaps >= 1 - 1e-4)
    np.testing.assert_allclose(
        np.linalg.norm(result.eigenvectors.numpy(), axis=1), 1.0, atol=1e-6
    )


@pytest.mark.parametrize("which", ["largest", "smallest"])
@pytest.mark.parametrize("name", MATRICES.keys())
def test_eigsh_float64_full_dimension_is_exact(name, which):
    matrix = MATRICES[name]()
    dim = len(matrix)
    values = np.linalg.eigvalsh(matrix)
    k = min(4, dim)
    result = linalg.eigsh(
        _matvec(matrix),
        dim,
        k,
        which=which,
        num_iterations=dim,
        dtype=tf.float64,
    )
    want = values[::-1][:k] if which == "largest" else values[:k]
    got = result.eigenvalues.numpy()
    assert np.abs(got - want).max() <= 1e-8 * _norm2(matrix)
    step = np.diff(got)
    assert np.all(step <= 0) if which == "largest" else np.all(step >= 0)
    # Ritz pairs are eigenpairs even inside a repeated eigenspace.
    vectors = result.eigenvectors.numpy()
    residual = vectors @ matrix - got[:, None] * vectors
    assert np.abs(residual).max() <= 1e-7 * _norm2(matrix)


def test_eigsh_clips_num_iterations_to_dim():
    matrix = _gaussian_symmetric(12, seed=11)
    mv = _matvec(matrix)
    clipped = linalg.eigsh(mv, 12, 2, num_iterations=50, dtype=tf.float64)
    exact = linalg.eigsh(mv, 12, 2, num_iterations=12, dtype=tf.float64)
    np.testing.assert_array_equal(
        clipped.eigenvalues.numpy(), exact.eigenvalues.numpy()
    )


def test_eigsh_config_default_iterations():
    assert linalg.eigsh_config(1000, 1) == 30
    assert linalg.eigsh_config(1000, 10) == 40
    assert linalg.eigsh_config(12, 1) == 12
    assert linalg.eigsh_config(100, 2, num_iterations=500) == 100


# ------------------------------------------------------------ power iteration


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["positive", "negative"])
def test_power_iteration_finds_largest_magnitude(sign):
    spectrum = np.r_[sign * 5.0, np.linspace(-2.0, 2.0, 19)]
    matrix = _with_spectrum(spectrum, seed=12)
    result = linalg.power_iteration(
        _matvec(matrix), 20, num_iterations=60, dtype=tf.float64
    )
    np.testing.assert_allclose(result.eigenvalues.numpy(), [sign * 5.0])
    _, vectors = np.linalg.eigh(matrix)
    top = vectors[:, 0] if sign < 0 else vectors[:, -1]
    overlap = abs(result.eigenvectors.numpy()[0] @ top)
    assert overlap >= 1 - 1e-10


def test_power_iteration_warm_start_from_eigenvector_converges_in_one_step():
    matrix = _with_spectrum(np.r_[4.0, np.linspace(-1.0, 1.0, 15)], seed=13)
    _, vectors = np.linalg.eigh(matrix)
    result = linalg.power_iteration(
        _matvec(matrix, tf.float32),
        16,
        num_iterations=1,
        start_vector=tf.constant(vectors[:, -1], tf.float32),
    )
    np.testing.assert_allclose(result.eigenvalues.numpy(), [4.0], rtol=1e-6)
    assert abs(result.eigenvectors.numpy()[0] @ vectors[:, -1]) >= 1 - 1e-6


# ------------------------------------------------------------------ traces


def _estimates_over_seeds(estimator, matrix, num_samples, num_seeds):
    mv = _matvec(matrix)
    dim = len(matrix)
    fn = tf.function(
        lambda s: estimator(mv, dim, num_samples, seed=s, dtype=tf.float64)
    )
    seeds = [tf.constant(s, tf.int64) for s in range(num_seeds)]
    return np.array([fn(s).numpy() for s in seeds])


def test_hutchinson_is_unbiased_with_known_variance():
    matrix = _gaussian_symmetric(20, seed=14) + np.eye(20)
    num_samples, num_seeds = 4, 200
    estimates = _estimates_over_seeds(
        linalg.hutchinson_trace, matrix, num_samples, num_seeds
    )
    off_diagonal = np.sum(matrix**2) - np.sum(np.diag(matrix) ** 2)
    variance = 2.0 * off_diagonal / num_samples
    std_error = np.sqrt(variance / num_seeds)
    assert abs(estimates.mean() - np.trace(matrix)) <= 4 * std_error
    assert 0.7 <= estimates.std() / np.sqrt(variance) <= 1.3


def test_hutchpp_is_unbiased():
    matrix = _gaussian_symmetric(20, seed=15) + np.eye(20)
    estimates = _estimates_over_seeds(linalg.hutchpp_trace, matrix, 6, 200)
    std_error = estimates.std(ddof=1) / np.sqrt(len(estimates))
    assert abs(estimates.mean() - np.trace(matrix)) <= 4 * std_error


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("num_samples", [12, 13, 14])
def test_hutchpp_is_exact_for_low_rank(num_samples, dtype):
    matrix = _with_spectrum(np.r_[4, 3, -2, 1, np.zeros(36)], seed=16)
    estimate = linalg.hutchpp_trace(
        _matvec(matrix, dtype), 40, num_samples, seed=3, dtype=dtype
    )
    tol = 1e-10 if dtype == tf.float64 else 1e-5
    scale = np.linalg.norm(matrix, "fro")
    assert abs(float(estimate) - np.trace(matrix)) <= tol * scale


def test_hutchpp_beats_hutchinson_on_low_rank_plus_small():
    rng = np.random.default_rng(17)
    matrix = _with_spectrum(np.r_[50, 40, 30, 20, 10, np.zeros(35)], seed=17)
    noise = rng.normal(size=(40, 40))
    matrix += 1e-2 * (noise + noise.T)
    trace = np.trace(matrix)
    rms = {}
    for estimator in (linalg.hutchinson_trace, linalg.hutchpp_trace):
        estimates = _estimates_over_seeds(estimator, matrix, 18, 20)
        rms[estimator.__name__] = np.sqrt(np.mean((estimates - trace) ** 2))
    assert rms["hutchpp_trace"] < 0.05 * rms["hutchinson_trace"]


# -------------------------------------------------------------------- SLQ


def test_slq_weights_moments_and_density():
    matrix = _with_spectrum(np.linspace(-2.0, 6.0, 40) ** 3 / 50, seed=18)
    dim, num_runs = 40, 16
    nodes, weights = linalg.slq(
        _matvec(matrix), dim, num_runs, 12, seed=1, dtype=tf.float64
    )
    nodes, weights = nodes.numpy(), weights.numpy()
    assert nodes.shape == weights.shape == (num_runs, 12)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-12)
    # sum_k w_k theta_k = v^T A v for a uniform unit v: mean tr(A)/dim and
    # variance 2 (dim tr(A^2) - tr(A)^2) / (dim^2 (dim + 2)).
    trace, trace_sq = np.trace(matrix), np.trace(matrix @ matrix)
    variance = 2 * (dim * trace_sq - trace**2) / (dim**2 * (dim + 2))
    first_moments = np.sum(weights * nodes, axis=1)
    bound = 4 * np.sqrt(variance / num_runs)
    assert abs(first_moments.mean() - trace / dim) <= bound

    grid, density = linalg.spectral_density(nodes, weights)
    assert grid.shape == density.shape == (1000,)
    assert abs(np.trapezoid(density, grid) - 1.0) <= 1e-3
    mean = np.trapezoid(grid * density, grid)
    assert abs(mean - first_moments.mean()) <= 1e-6 * _norm2(matrix)
    assert abs(mean - trace / dim) <= bound


def test_slq_full_dimension_nodes_are_the_eigenvalues():
    matrix = _gaussian_symmetric(20, seed=19)
    nodes, weights = linalg.slq(
        _matvec(matrix), 20, 3, 20, seed=2, dtype=tf.float64
    )
    reference = np.linalg.eigvalsh(matrix)
    np.testing.assert_allclose(
        nodes.numpy(), np.tile(reference, (3, 1)), atol=1e-8
    )
    assert np.all(weights.numpy() > 0)


def test_spectral_density_single_node_is_gaussian():
    grid = np.linspace(-1.0, 3.0, 41)
    got_grid, density = linalg.spectral_density(
        [[1.0, 2.0]], [[1.0, 0.0]], grid=grid, sigma=0.5
    )
    want = np.exp(-0.5 * ((grid - 1.0) / 0.5) ** 2) / (0.5 * np.sqrt(2 * np.pi))
    np.testing.assert_array_equal(got_grid, grid)
    np.testing.assert_allclose(density, want, rtol=1e-12)


def test_spectral_density_zero_range_and_int_grid():
    grid, density = linalg.spectral_density(
        np.zeros((2, 3)), np.full((2, 3), 1 / 3), grid=501
    )
    assert grid.shape == (501,)
    assert abs(np.trapezoid(density, grid) - 1.0) <= 1e-3


# ---------------------------------------- SLQ: Gauss quadrature per run


def _recording_matvec(matrix: np.ndarray):
    """A float64 matvec that keeps every vector it is applied to (eager)."""
    operator = tf.constant(matrix, tf.float64)
    seen = []

    def matvec(v):
        seen.append(np.array(v, np.float64))  # fails loudly if symbolic
        return tf.linalg.matvec(operator, v)

    return matvec, seen


def _slq_with_start_vectors(matrix, num_runs, m, seed):
    """`linalg.slq` eagerly, and each run's start vector as it was used.

    Each run makes exactly m matvecs, the first on its start vector v (a
    restart draws a vector without a matvec), so the starts are every m-th
    recorded vector. They are also reproduced from the documented seeds
    (`[seed, r * (m + 1)]`).
    """
    dim = matrix.shape[0]
    matvec, seen = _recording_matvec(matrix)
    nodes, weights = linalg.slq(
        matvec, dim, num_runs, m, seed=seed, dtype=tf.float64
    )
    assert len(seen) == num_runs * m
    starts = np.stack(seen[::m])
    for r, start in enumerate(starts):
        drawn = linalg._unit_start(None, dim, seed, r * (m + 1), tf.float64)
        np.testing.assert_array_equal(start, drawn.numpy())
    np.testing.assert_allclose(np.linalg.norm(starts, axis=1), 1.0, atol=1e-14)
    return nodes.numpy(), weights.numpy(), starts


def test_slq_each_run_is_the_gauss_quadrature_of_its_start_vector():
    """sum_j w_j theta_j^p == v^T A^p v for p = 0 .. 2m - 1, run by run.

    This is the defining property of m-point Gauss quadrature of the
    measure sum_i (v^T u_i)^2 delta(t - lambda_i) (Golub and Meurant,
    "Matrices, Moments and Quadrature", 2010); v^T A^p v is computed by
    repeated numpy matvecs. ||A|| = 1, so |moments| <= 1 and a float64
    Lanczos with full reorthogonalization matches them to ~1e-14: 1e-11
    leaves room for growth with p without hiding a wrong node or weight
    (an error in one weight of a well-separated node moves the moments by
    its size). The degree-2m moment is NOT exact: its error is
    (beta_1 ... beta_m)^2 > 0, checked to be far above the tolerance so
    the test is known to discriminate.
    """
    eigenvalues = np.r_[np.linspace(-1.0, 0.2, 14), 0.5, 0.55, 0.8, 1.0]
    matrix = _with_spectrum(eigenvalues, seed=30)
    m, num_runs = 6, 3
    nodes, weights, starts = _slq_with_start_vectors(matrix, num_runs, m, 7)
    assert nodes.shape == weights.shape == (num_runs, m)
    for r in range(num_runs):
        power = starts[r].copy()  # A^p v
        for p in range(2 * m + 1):
            exact = starts[r] @ power
            quadrature = np.sum(weights[r] * nodes[r] ** p)
            if p < 2 * m:
                assert abs(quadrature - exact) < 1e-11, (r, p)
            else:
                assert abs(quadrature - exact) > 1e-6, (r, p)
            power = matrix @ power


def _gaussian(t, centers, sigma):
    z = (np.asarray(t)[:, None] - np.asarray(centers)[None, :]) / sigma
    return np.exp(-0.5 * z**2) / (sigma * np.sqrt(2 * np.pi))


def _quadrature_error_bound(grid, points, degree, interval, sigma):
    """max over `points` of |f_t - p_t|, f_t(s) = N(t; s, sigma), p_t the
    Chebyshev interpolant of f_t of `degree` on `interval`, for each t.

    Two probability measures with equal moments up to `degree` integrate
    p_t alike, so when both are supported on `points` their integrals of
    f_t differ by at most twice this bound.
    """
    cheb = np.polynomial.chebyshev.Chebyshev
    bound = np.empty(len(grid))
    for k, t in enumerate(grid):
        p = cheb.interpolate(
            lambda s, t=t: _gaussian([t], s, sigma)[0], degree, domain=interval
        )
        f = _gaussian([t], points, sigma)[0]
        bound[k] = np.max(np.abs(f - p(points)))
    return bound


def _density_sd(grid, eigenvalues, sigma, num_runs):
    """Standard deviation of (1/R) sum_r v_r^T F_t v_r at each grid point,
    F_t = N(t; A, sigma), v_r uniform on the unit sphere of R^d:
    Var(v^T F v) = 2 (d tr(F^2) - tr(F)^2) / (d^2 (d + 2))."""
    d = len(eigenvalues)
    kernel = _gaussian(grid, eigenvalues, sigma)
    tr, tr_sq = kernel.sum(axis=1), (kernel**2).sum(axis=1)
    variance = 2 * (d * tr_sq - tr**2) / (d**2 * (d + 2))
    return np.sqrt(np.clip(variance, 0, None) / num_runs)


def test_slq_smoothed_density_matches_the_eigh_density():
    """SLQ density vs the exact sum_i N(t; lambda_i, sigma) / d.

    Run by run, the smoothed quadrature sum_j w_j N(t; theta_j, sigma)
    equals v^T N(t; A, sigma) v up to the Gauss quadrature error of the
    Gaussian, bounded rigorously through its degree-(2m-1) Chebyshev
    interpolant (`_quadrature_error_bound`; with m = 32 and sigma = 4% of
    the range it is below 1e-4 of the peak, so the check is sharp). The
    average over R runs differs from the exact density by the sampling
    error of v^T F v, whose variance is known exactly (`_density_sd`):
    allowed 5 sd pointwise plus the quadrature bound plus 1e-10 of the
    peak for rounding. With m = d the nodes are the eigenvalues and only
    the sampling error is left.
    """
    rng = np.random.default_rng(31)
    eigenvalues = np.sort(
        np.r_[rng.normal(0.0, 0.3, 40), rng.uniform(1.0, 3.0, 16), 5.0, 6.0]
    )
    matrix = _with_spectrum(eigenvalues, seed=31)
    dim = len(eigenvalues)
    low, high = eigenvalues[0], eigenvalues[-1]
    sigma = 0.04 * (high - low)
    grid = np.linspace(low - 4 * sigma, high + 4 * sigma, 161)
    exact = _gaussian(grid, eigenvalues, sigma).mean(axis=1)
    floor = 1e-10 * exact.max()
    num_runs = 24
    for m in (32, dim):
        nodes, weights, starts = _slq_with_start_vectors(
            matrix, num_runs, m, seed=m
        )
        # One bound for every run: the max over all runs' nodes.
        quad = _quadrature_error_bound(
            grid,
            np.r_[nodes.ravel(), eigenvalues],
            2 * m - 1,
            [low, high],
            sigma,
        )
        assert quad.max() < 1e-4 * exact.max()
        coeffs = (starts @ np.linalg.eigh(matrix)[1]) ** 2  # (v^T u_i)^2
        for r in range(num_runs):
            _, per_run = linalg.spectral_density(
                nodes[r], weights[r], grid=grid, sigma=sigma
            )
            exact_run = _gaussian(grid, eigenvalues, sigma) @ coeffs[r]
            error = np.abs(per_run - exact_run)
            assert np.all(error <= 2 * quad + floor), (m, r)
        got_grid, density = linalg.spectral_density(
            nodes, weights, grid=grid, sigma=sigma
        )
        np.testing.assert_array_equal(got_grid, grid)
        sd = _density_sd(grid, eigenvalues, sigma, num_runs)
        error = np.abs(density - exact)
        assert np.all(error <= 5 * sd + 2 * quad + floor), m
        # Sharpness: the sampling error is real and the bound is not loose
        # by orders of magnitude.
        assert np.max(np.abs(density - exact)) > 0.1 * np.max(sd)


# ------------------------------------------------------------ determinism


def _all_solvers(seed):
    matrix = _gaussian_symmetric(16, seed=20)
    mv = _matvec(matrix, tf.float32)
    lanczos = linalg.lanczos(mv, 16, 8, seed=seed)
    return {
        "lanczos": lanczos.basis,
        "eigsh": linalg.eigsh(mv, 16, 2, seed=seed).eigenvectors,
        "power": linalg.power_iteration(mv, 16, seed=seed).eigenvectors,
        "hutchinson": linalg.hutchinson_trace(mv, 16, 5, seed=seed),
        "hutchpp": linalg.hutchpp_trace(mv, 16, 6, seed=seed),
        "slq": linalg.slq(mv, 16, 2, 5, seed=seed)[1],
    }


def test_same_seed_is_bitwise_equal_and_other_seed_differs():
    first, again, other = _all_solvers(5), _all_solvers(5), _all_solvers(6)
    for name in first:
        np.testing.assert_array_equal(
            first[name].numpy(), again[name].numpy(), err_msg=name
        )
        assert not np.array_equal(first[name].numpy(), other[name].numpy()), (
            name
        )


# -------------------------------------------------------------------- XLA


def test_lanczos_and_eigsh_compile_with_xla():
    matrix = _repeated()
    mv = _matvec(matrix)
    reference = np.linalg.eigvalsh(matrix)

    @tf.function(jit_compile=True)
    def solve():
        result = linalg.lanczos(mv, 16, 16, seed=4, dtype=tf.float64)
        values, _ = linalg.tridiagonal_eigh(result.alphas, result.betas)
        top = linalg.eigsh(mv, 16, 3, num_iterations=16, dtype=tf.float64)
        power = linalg.power_iteration(mv, 16, seed=4, dtype=tf.float64)
        return result, values, top, power

    result, values, top, power = solve()
    eager_power = linalg.power_iteration(mv, 16, seed=4, dtype=tf.float64)
    np.testing.assert_allclose(
        power.eigenvectors.numpy(), eager_power.eigenvectors.numpy(), atol=1e-10
    )
    eager = linalg.lanczos(mv, 16, 16, seed=4, dtype=tf.float64)
    np.testing.assert_allclose(np.sort(values.numpy()), reference, atol=1e-10)
    np.testing.assert_allclose(_ritz_values(eager), reference, atol=1e-10)
    # Early coefficients agree; late ones amplify rounding differences.
    np.testing.assert_allclose(
        result.alphas.numpy()[:6], eager.alphas.numpy()[:6], atol=1e-10
    )
    np.testing.assert_allclose(top.eigenvalues.numpy(), [3, 3, 3], atol=1e-10)


def test_eigsh_float32_compiles_with_xla_and_matches_eager():
    matrix = _decaying()
    mv = _matvec(matrix, tf.float32)
    solve = tf.function(
        lambda: linalg.eigsh(mv, 60, 3, which="smallest"), jit_compile=True
    )
    compiled, eager = solve(), linalg.eigsh(mv, 60, 3, which="smallest")
    values, vectors = np.linalg.eigh(matrix)
    np.testing.assert_allclose(
        compiled.eigenvalues.numpy(), eager.eigenvalues.numpy(), rtol=1e-5
    )
    np.testing.assert_allclose(
        compiled.eigenvalues.numpy(), values[:3], rtol=1e-4
    )
    overlaps = np.abs(
        np.sum(compiled.eigenvectors.numpy() * vectors[:, :3].T, 1)
    )
    assert np.all(overlaps >= 1 - 1e-4)


def test_traces_and_slq_compile_with_xla():
    matrix = _rank_deficient()  # rank 5 <= 15 // 3: Hutch++ is exact
    mv = _matvec(matrix, tf.float32)
    # Distinct eigenvalues, so SLQ nodes and weights have no ties to permute.
    slq_mv = _matvec(_gaussian_symmetric(40, seed=21), tf.float32)

    @tf.function(jit_compile=True)
    def estimate():
        return (
            linalg.hutchpp_trace(mv, 40, 15, seed=2),
            linalg.hutchinson_trace(mv, 40, 5, seed=2),
            linalg.slq(slq_mv, 40, 2, 8, seed=2),
        )

    hutchpp, hutchinson, (nodes, weights) = estimate()
    np.testing.assert_allclose(
        hutchpp.numpy(), linalg.hutchpp_trace(mv, 40, 15, seed=2), rtol=1e-5
    )
    np.testing.assert_allclose(hutchpp.numpy(), np.trace(matrix), rtol=1e-5)
    np.testing.assert_allclose(
        hutchinson.numpy(),
        linalg.hutchinson_trace(mv, 40, 5, seed=2),
        rtol=1e-5,
    )
    eager_nodes, eager_weights = linalg.slq(slq_mv, 40, 2, 8, seed=2)
    np.testing.assert_allclose(nodes.numpy(), eager_nodes.numpy(), atol=1e-5)
    np.testing.assert_allclose(
        weights.numpy(), eager_weights.numpy(), atol=1e-5
    )


# ------------------------------------------------------------- validation


def _identity(v):
    return v


BAD_CALLS = {
    "eigsh_k_exceeds_dim": (
        lambda: linalg.eigsh(_identity, 5, 6),
        r"k=6 exceeds the operator dimension 5; pass k <= dim",
    ),
    "eigsh_k_zero": (
        lambda: linalg.eigsh(_identity, 5, 0),
        r"`k` must be >= 1",
    ),
    "eigsh_which_middle": (
        lambda: linalg.eigsh(_identity, 5, which="middle"),
        r"'largest' or 'smallest'",
    ),
    "eigsh_iterations_below_k": (
        lambda: linalg.eigsh(_identity, 10, 4, num_iterations=3),
        r"num_iterations >= k",
    ),
    "eigsh_dim_zero": (lambda: linalg.eigsh(_identity, 0), r"`dim` must be"),
    "lanczos_iterations_exceed_dim": (
        lambda: linalg.lanczos(_identity, 4, 5),
        r"pass num_iterations <= dim",
    ),
    "lanczos_int_dtype": (
        lambda: linalg.lanczos(_identity, 4, 2, dtype=tf.int32),
        r"floating dtype",
    ),
    "hutchinson_zero_samples": (
        lambda: linalg.hutchinson_trace(_identity, 4, 0),
        r"`num_samples` must be >= 1",
    ),
    "hutchpp_two_samples": (
        lambda: linalg.hutchpp_trace(_identity, 4, 2),
        r"`num_samples` must be >= 3",
    ),
    "slq_zero_runs": (
        lambda: linalg.slq(_identity, 4, 0, 2),
        r"`num_runs` must be >= 1",
    ),
    "matvec_wrong_shape": (
        lambda: linalg.power_iteration(lambda v: tf.concat([v, v], 0), 4),
        r"must map \[dim\] to \[dim\]",
    ),
    "density_shape_mismatch": (
        lambda: linalg.spectral_density(np.zeros((2, 3)), np.zeros((2, 4))),
        r"same shape",
    ),
    "density_negative_sigma": (
        lambda: linalg.spectral_density([0.0], [1.0], sigma=-1.0),
        r"`sigma` must be > 0",
    ),
    "start_vector_wrong_size": (
        lambda: linalg.lanczos(_identity, 4, 2, start_vector=tf.ones([5])),
        r"pass a vector of 4 entries",
    ),
    "eigsh_negative_tol": (
        lambda: linalg.eigsh(_identity, 5, tol=-1e-3),
        r"`tol` must be a finite number >= 0",
    ),
    "eigsh_nan_tol": (
        lambda: linalg.eigsh(_identity, 5, tol=float("nan")),
        r"`tol` must be a finite number >= 0",
    ),
    "eigsh_string_tol": (
        lambda: linalg.eigsh(_identity, 5, tol="1e-3"),
        r"`tol` must be a number >= 0",
    ),
    "unflatten_size_mismatch": (
        lambda: linalg.unflatten_tensors(tf.zeros([5]), [[2, 2]]),
        r"pass the shapes",
    ),
}


@pytest.mark.parametrize(
    "call, match", BAD_CALLS.values(), ids=BAD_CALLS.keys()
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_non_int_dim_raises_type_error():
    with pytest.raises(TypeError, match="must be a Python int"):
        linalg.eigsh(_identity, 5.0)


# ------------------------------------------------ tolerance-based stopping


def _true_residuals(matrix, result):
    """||A u - theta u|| of each returned pair, in float64 numpy."""
    values = np.asarray(result.eigenvalues, np.float64)
    vectors = np.asarray(result.eigenvectors, np.float64)
    return np.array(
        [np.linalg.norm(matrix @ u - t * u) for t, u in zip(values, vectors)]
    )


@pytest.mark.parametrize("which", ["largest", "smallest"])
@pytest.mark.parametrize("tol", [1e-2, 1e-4, 1e-7])
def test_eigsh_tol_stops_at_the_first_converged_step(which, tol):
    matrix = _decaying()
    exact = np.linalg.eigvalsh(matrix)
    exact = exact[::-1][:2] if which == "largest" else exact[:2]
    mv = _matvec(matrix)
    result = linalg.eigsh(
        mv, 60, 2, which=which, num_iterations=60, tol=tol, dtype=tf.float64
    )
    steps = int(result.num_iterations)
    values = np.asarray(result.eigenvalues)
    residuals = np.asarray(result.residuals)
    assert 2 <= steps < 60
    assert np.all(np.asarray(result.converged))
    assert np.all(residuals <= tol * np.abs(values))
    # The Ritz bound is the true residual of the returned pair ...
    np.testing.assert_allclose(
        residuals, _true_residuals(matrix, result), rtol=1e-6, atol=1e-12
    )
    # ... and bounds the eigenvalue error (an eigenvalue lies within it).
    assert np.all(np.abs(values - exact) <= residuals + 1e-12)
    # One step fewer (run to the end with tol=0) had not converged yet.
    before = linalg.eigsh(
        mv, 60, 2, which=which, num_iterations=steps - 1, dtype=tf.float64
    )
    assert int(before.num_iterations) == steps - 1
    assert not np.all(
        np.asarray(before.residuals)
        <= tol * np.abs(np.asarray(before.eigenvalues))
    )
    # Stopping early changes nothing about the steps that were run.
    fixed = linalg.eigsh(
        mv, 60, 2, which=which, num_iterations=steps, dtype=tf.float64
    )
    np.testing.assert_allclose(values, fixed.eigenvalues, rtol=1e-12)


def test_eigsh_tol_zero_runs_every_iteration():
    result = linalg.eigsh(
        _matvec(_decaying()), 60, 2, num_iterations=40, dtype=tf.float64
    )
    assert int(result.num_iterations) == 40
    # Converged by then: the flags say so only against tol, here 0.
    assert np.all(np.asarray(result.residuals) < 1e-8)


def test_eigsh_tol_compiles_and_matches_eager():
    mv = _matvec(_decaying(), tf.float32)

    def solve():
        return linalg.eigsh(mv, 60, 3, which="smallest", tol=1e-4)

    compiled = tf.function(solve, jit_compile=True)()
    eager = solve()
    assert int(compiled.num_iterations) == int(eager.num_iterations) < 30
    np.testing.assert_allclose(
        compiled.eigenvalues, eager.eigenvalues, rtol=1e-5
    )
    assert np.all(np.asarray(compiled.converged))


def test_eigsh_tol_is_traced_once():
    matrix = tf.Variable(_decaying(), dtype=tf.float64)
    solve = tf.function(
        lambda: linalg.eigsh(
            lambda v: tf.linalg.matvec(matrix, v),
            60,
            1,
            tol=1e-6,
            dtype=tf.float64,
        )
    )
    first = solve()
    matrix.assign(_decaying() * 2.0)
    second = solve()
    assert solve.experimental_get_tracing_count() == 1
    np.testing.assert_allclose(
        second.eigenvalues, 2.0 * np.asarray(first.eigenvalues), rtol=1e-8
    )


def test_eigsh_tol_on_zero_and_non_finite_operators():
    zero = linalg.eigsh(lambda v: 0.0 * v, 20, 2, tol=1e-3, dtype=tf.float64)
    assert int(zero.num_iterations) == 2
    np.testing.assert_array_equal(zero.eigenvalues, [0.0, 0.0])
    assert np.all(np.asarray(zero.converged))
    nan = linalg.eigsh(lambda v: v * np.nan, 20, 2, tol=1e-3, dtype=tf.float64)
    # A diverged operator stops at once and reports NaN, never converged.
    assert int(nan.num_iterations) == 1
    assert np.all(np.isnan(nan.eigenvalues))
    assert not np.any(np.asarray(nan.converged))


def test_eigsh_warm_start_from_an_eigenvector_stops_after_one_step():
    matrix = _decaying()
    top = np.linalg.eigh(matrix)[1][:, -1]
    result = linalg.eigsh(
        _matvec(matrix),
        60,
        1,
        tol=1e-6,
        start_vector=tf.constant(top),
        dtype=tf.float64,
    )
    assert int(result.num_iterations) == 1
    np.testing.assert_allclose(result.eigenvalues, [10.0], rtol=1e-12)


@pytest.mark.parametrize("which", ["largest", "smallest"])
@pytest.mark.parametrize("size", [3, 7, 25])
def test_eigsh_in_a_subspace_gives_the_diagonal_block(which, size):
    """`subspace=` solves the block of the selected coordinates exactly,
    with no spurious zeros from the rest of the space, even when the block
    is negative definite and has fewer dimensions than the steps asked for
    (the Krylov space is exhausted)."""
    dim = 40
    matrix = _gaussian_symmetric(dim, seed=size)
    chosen = np.sort(np.random.default_rng(size).choice(dim, size, False))
    mask = np.zeros(dim)
    mask[chosen] = 1.0
    block = matrix[np.ix_(chosen, chosen)] - 10.0 * np.eye(size)  # all < 0
    shifted = matrix - 10.0 * np.diag(mask)
    masked = mask[:, None] * shifted * mask[None]
    solve = tf.function(
        lambda m: linalg.eigsh(
            lambda v: tf.linalg.matvec(tf.constant(masked), v),
            dim,
            min(3, size),
            which=which,
            num_iterations=30,
            dtype=tf.float64,
            subspace=m,
        )
    )
    result = solve(tf.constant(mask))
    exact = np.linalg.eigvalsh(block)
    want = exact[::-1][: min(3, size)] if which == "largest" else exact[:3]
    np.testing.assert_allclose(result.eigenvalues, want, rtol=1e-10)
    vectors = np.asarray(result.eigenvectors)
    assert np.all(vectors[:, mask == 0] == 0)
    assert int(result.num_iterations) == min(30, size)


def test_eigsh_subspaces_share_one_trace():
    dim = 30
    matrix = _gaussian_symmetric(dim, seed=3)
    solve = tf.function(
        lambda m: linalg.eigsh(
            lambda v: m * tf.linalg.matvec(tf.constant(matrix), m * v),
            dim,
            1,
            dtype=tf.float64,
            tol=0.0,
            subspace=m,
        )
    )
    for chosen in (np.arange(0, 10), np.arange(10, 30)):
        mask = np.zeros(dim)
        mask[chosen] = 1.0
        got = solve(tf.constant(mask)).eigenvalues[0]
        want = np.linalg.eigvalsh(matrix[np.ix_(chosen, chosen)])[-1]
        assert float(got) == pytest.approx(want, rel=1e-10)
    assert solve.experimental_get_tracing_count() == 1
