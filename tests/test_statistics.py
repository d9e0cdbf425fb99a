"""Tests for tf_breakeven.statistics against explicit P-dimensional references.

Every reference below is computed from the gradient vectors themselves (a
P x P covariance, explicit loops over pairs), never from the Gram matrix.
"""

import itertools

import numpy as np
import pytest
import tensorflow as tf

from tf_breakeven import statistics

RTOL = 1e-10
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
EXPECTED_KEYS = {
    "grad_cov/lambda_1",
    "grad_cov/trace",
    "grad_cov/frobenius",
    "grad_cov/trace_over_lambda_1",
    "grad_cov/condition",
    "grad_cov_uncentered/lambda_1",
    "grad_cov_uncentered/trace",
    "grad_cov_uncentered/frobenius",
    "grad_cov_uncentered/trace_over_lambda_1",
    "grad_cov_uncentered/condition",
    "grad_cov/norm_ratio_top_k",
    "confusion/eta",
    "confusion/cos_min",
    "confusion/cos_mean",
    "confusion/cos_max",
    "confusion/cos_q05",
    "confusion/cos_q25",
    "confusion/cos_q50",
    "confusion/cos_q75",
    "confusion/cos_q95",
    "confusion/num_zero_norm",
    "grad/norm",
    "grad/diversity",
    "grad/noise_scale",
    "probe/num_samples",
    "probe/microbatch_size",
}


def _gradients(n, dim, seed, zero_rows=()):
    """Random sample gradients sharing a mean direction, some rows zeroed."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=dim)
    grads = 0.7 * mean + rng.normal(size=(n, dim)) * rng.uniform(
        0.5, 2.0, size=(n, 1)
    )
    grads[list(zero_rows)] = 0.0
    return grads


def _gram(grads):
    return grads @ grads.T


def _low_rank_gradients(n, dim, scales, seed):
    """Gradients whose centered covariance has rank len(scales)."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(dim, len(scales))))
    coords = rng.normal(size=(n, len(scales))) * np.asarray(scales)
    return rng.normal(size=dim) + coords @ basis.T


CASES = {
    "n8_lt_P50": {"n": 8, "dim": 50, "seed": 0},
    "n16_lt_P50": {"n": 16, "dim": 50, "seed": 1},
    "n12_gt_P6": {"n": 12, "dim": 6, "seed": 2},
    "n10_zero_row": {"n": 10, "dim": 50, "seed": 3, "zero_rows": (4,)},
}
CASE_IDS = list(CASES)


@pytest.fixture(params=CASE_IDS)
def grads(request):
    return _gradients(**CASES[request.param])


def _explicit_cov(grads, centered):
    """K (or K_u) as an explicit P x P matrix."""
    center = grads.mean(axis=0) if centered else np.zeros(grads.shape[1])
    cov = np.zeros((grads.shape[1], grads.shape[1]))
    for g in grads:
        cov += np.outer(g - center, g - center)
    return cov / len(grads)


def _explicit_spectrum(grads, centered):
    """Descending eigenvalues of the P x P K, padded with zeros to length n."""
    values = np.linalg.eigvalsh(_explicit_cov(grads, centered))[::-1]
    values = np.maximum(values, 0.0)
    n = len(grads)
    return np.concatenate([values, np.zeros(max(n - values.size, 0))])[:n]


def _explicit_cosines(grads):
    cosines = []
    for i, j in itertools.combinations(range(len(grads)), 2):
        norm_i, norm_j = np.linalg.norm(grads[i]), np.linalg.norm(grads[j])
        if norm_i > 0 and norm_j > 0:
            cosines.append(grads[i] @ grads[j] / (norm_i * norm_j))
    return np.asarray(cosines)


def _explicit_condition(values, rtol):
    nonzero = values[values > rtol * values[0]]
    return nonzero[-1] / values[0]


def _explicit_norm_ratio(grads, k):
    cov = _explicit_cov(grads, centered=True)
    values, vectors = np.linalg.eigh(cov)
    rank = int(np.sum(values > 1e-5 * values[-1]))
    top = vectors[:, ::-1][:, : min(k, rank)]
    mean = grads.mean(axis=0)
    return np.linalg.norm(mean) / np.linalg.norm(top.T @ mean)


def _close(actual, expected, scale=None):
    atol = 0.0 if scale is None else RTOL * scale
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=atol)


@pytest.mark.parametrize("centered", [True, False], ids=["centered", "raw"])
def test_eigenvalues_match_explicit_covariance(grads, centered):
    expected = _explicit_spectrum(grads, centered)
    actual = statistics.covariance_eigenvalues(
        grads @ grads.T, centered=centered
    )
    assert actual.shape == (len(grads),)
    assert np.all(np.diff(actual) <= 0)
    _close(actual, expected, scale=expected[0])


@pytest.mark.parametrize("centered", [True, False], ids=["centered", "raw"])
def test_covariance_statistics_match_explicit(grads, centered):
    values = _explicit_spectrum(grads, centered)
    stats = statistics.covariance_statistics(grads @ grads.T, centered=centered)
    cov = _explicit_cov(grads, centered)
    _close(stats["lambda_1"], values[0])
    _close(stats["trace"], np.trace(cov))
    _close(stats["frobenius"], np.sqrt(np.sum(values**2)))
    _close(stats["frobenius"], np.linalg.norm(cov))
    _close(stats["trace_over_lambda_1"], np.trace(cov) / values[0])
    _close(stats["condition"], _explicit_condition(values, 1e-5))


def test_pairwise_cosines_match_explicit_loop(grads):
    expected = _explicit_cosines(grads)
    actual = statistics.pairwise_cosines(grads @ grads.T)
    _close(actual, expected)


@pytest.mark.parametrize("microbatch_size", [1, 4], ids=["M1", "M4"])
def test_gram_statistics_match_explicit(grads, microbatch_size):
    n = len(grads)
    stats = statistics.gram_statistics(
        grads @ grads.T, microbatch_size=microbatch_size
    )
    assert set(stats) == EXPECTED_KEYS
    assert all(type(value) is float for value in stats.values())

    for prefix, centered in [("grad_cov", True), ("grad_cov_uncentered", 0)]:
        values = _explicit_spectrum(grads, centered)
        cov = _explicit_cov(grads, centered)
        _close(stats[f"{prefix}/lambda_1"], values[0])
        _close(stats[f"{prefix}/trace"], np.trace(cov))
        _close(stats[f"{prefix}/frobenius"], np.linalg.norm(cov))
        _close(
            stats[f"{prefix}/trace_over_lambda_1"], np.trace(cov) / values[0]
        )
        _close(stats[f"{prefix}/condition"], _explicit_condition(values, 1e-5))

    _close(stats["grad_cov/norm_ratio_top_k"], _explicit_norm_ratio(grads, 5))

    inner = [
        grads[i] @ grads[j] for i, j in itertools.permutations(range(n), 2)
    ]
    _close(stats["confusion/eta"], -min(inner))
    cosines = _explicit_cosines(grads)
    _close(stats["confusion/cos_min"], cosines.min())
    _close(stats["confusion/cos_mean"], cosines.mean())
    _close(stats["confusion/cos_max"], cosines.max())
    for q in QUANTILES:
        _close(
            stats[f"confusion/cos_q{round(100 * q):02d}"],
            np.quantile(cosines, q),
        )
    num_zero = sum(not np.any(g) for g in grads)
    assert stats["confusion/num_zero_norm"] == num_zero

    mean = grads.mean(axis=0)
    sum_grad = grads.sum(axis=0)
    _close(stats["grad/norm"], np.linalg.norm(mean))
    _close(
        stats["grad/diversity"],
        sum(g @ g for g in grads) / (sum_grad @ sum_grad),
    )
    trace_k = np.trace(_explicit_cov(grads, centered=True))
    _close(stats["grad/noise_scale"], microbatch_size * trace_k / (mean @ mean))
    assert stats["probe/num_samples"] == n
    assert stats["probe/microbatch_size"] == microbatch_size


def test_noise_scale_scales_with_microbatch_size():
    gram = _gram(_gradients(8, 50, seed=5))
    one = statistics.gram_statistics(gram, microbatch_size=1)
    four = statistics.gram_statistics(gram, microbatch_size=4)
    _close(four["grad/noise_scale"], 4 * one["grad/noise_scale"])


@pytest.mark.parametrize("centered", [True, False], ids=["centered", "raw"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_top_directions_are_eigenvectors_in_parameter_space(grads, centered, k):
    values, coefficients = statistics.top_directions(
        grads @ grads.T, k, centered=centered
    )
    assert values.shape == (k,) and coefficients.shape == (k, len(grads))
    directions = coefficients @ grads  # u_j as rows, in parameter space.
    _close(directions @ directions.T, np.eye(k), scale=1.0)
    cov = _explicit_cov(grads, centered)
    expected = _explicit_spectrum(grads, centered)[:k]
    _close(values, expected)
    residual = cov @ directions.T - directions.T * values
    _close(residual, 0.0, scale=expected[0])
    if centered:
        _close(coefficients.sum(axis=1), 0.0, scale=1.0)


@pytest.mark.parametrize("centered", [True, False], ids=["centered", "raw"])
def test_top_directions_clip_k_to_numerical_rank(centered):
    grads = _low_rank_gradients(10, 50, scales=(3.0, 2.0, 1.0), seed=6)
    values, coefficients = statistics.top_directions(
        grads @ grads.T, 8, centered=centered
    )
    # Centered: rank 3. Uncentered: the mean adds one direction.
    rank = 3 if centered else 4
    assert values.shape == (rank,) and coefficients.shape == (rank, 10)
    directions = coefficients @ grads
    _close(directions @ directions.T, np.eye(rank), scale=1.0)


@pytest.mark.parametrize("k", [1, 2, 20], ids=["k1", "k2", "k20_clipped"])
def test_norm_ratio_matches_explicit_projection(k):
    grads = _low_rank_gradients(12, 50, scales=(3.0, 2.0, 1.5, 1.0), seed=7)
    stats = statistics.gram_statistics(grads @ grads.T, k=k)
    _close(stats["grad_cov/norm_ratio_top_k"], _explicit_norm_ratio(grads, k))
    assert stats["grad_cov/norm_ratio_top_k"] >= 1.0 - 1e-12


@pytest.mark.parametrize(
    "zero_rows", [(0,), (2, 7)], ids=["one_zero", "two_zeros"]
)
def test_zero_norm_samples_are_excluded_from_cosines(zero_rows):
    grads = _gradients(10, 50, seed=8, zero_rows=zero_rows)
    gram = grads @ grads.T
    cosines = statistics.pairwise_cosines(gram)
    kept = 10 - len(zero_rows)
    assert cosines.shape == (kept * (kept - 1) // 2,)
    _close(cosines, _explicit_cosines(grads))
    stats = statistics.gram_statistics(gram)
    assert stats["confusion/num_zero_norm"] == len(zero_rows)
    cos_keys = [key for key in stats if key.startswith("confusion/cos_")]
    assert len(cos_keys) == 3 + len(QUANTILES)
    assert all(np.isfinite(stats[key]) for key in cos_keys)
    # Zero gradients still enter the confusion: their inner products are 0.
    off_diagonal = gram[~np.eye(10, dtype=bool)]
    _close(stats["confusion/eta"], -off_diagonal.min())


def test_fewer_than_two_nonzero_samples_give_nan_cosines():
    grads = _gradients(4, 50, seed=9, zero_rows=(0, 1, 3))
    gram = grads @ grads.T
    assert statistics.pairwise_cosines(gram).shape == (0,)
    stats = statistics.gram_statistics(gram)
    assert stats["confusion/num_zero_norm"] == 3
    for key in stats:
        if key.startswith("confusion/cos_"):
            assert np.isnan(stats[key]), key
    assert np.isfinite(stats["grad/noise_scale"])


def test_all_zero_gradients_give_nan_not_exceptions():
    stats = statistics.gram_statistics(np.zeros((5, 5)))
    assert stats["confusion/num_zero_norm"] == 5
    assert stats["grad/norm"] == 0.0
    assert np.isnan(stats["grad/diversity"])
    assert np.isnan(stats["grad/noise_scale"])
    assert np.isnan(stats["grad_cov/condition"])
    assert np.isnan(stats["grad_cov/norm_ratio_top_k"])


@pytest.mark.parametrize(
    "bad_value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "neg_inf"]
)
def test_non_finite_gram_gives_nan_everywhere(bad_value):
    gram = _gram(_gradients(6, 50, seed=10))
    gram[1, 3] = bad_value  # no symmetric partner: must not raise either.
    stats = statistics.gram_statistics(gram, microbatch_size=2)
    assert set(stats) == EXPECTED_KEYS
    assert stats["probe/num_samples"] == 6.0
    assert stats["probe/microbatch_size"] == 2.0
    for key, value in stats.items():
        if not key.startswith("probe/"):
            assert type(value) is float and np.isnan(value), key
    assert np.all(np.isnan(statistics.covariance_eigenvalues(gram)))
    assert np.all(np.isnan(statistics.pairwise_cosines(gram)))
    values, coefficients = statistics.top_directions(gram, 3)
    assert values.shape == (3,) and np.all(np.isnan(coefficients))
    cov = statistics.covariance_statistics(gram, centered=False)
    assert all(np.isnan(value) for value in cov.values())


def test_zero_mean_gradient_gives_infinite_noise_scale():
    base = _gradients(2, 50, seed=11)
    grads = np.concatenate([base, -base])  # g_bar = 0 exactly.
    stats = statistics.gram_statistics(grads @ grads.T)
    assert stats["grad/norm"] == 0.0
    assert stats["grad/diversity"] == np.inf
    assert stats["grad/noise_scale"] == np.inf
    assert np.isnan(stats["grad_cov/norm_ratio_top_k"])


def test_identical_gradients_have_zero_centered_covariance():
    grads = np.tile(_gradients(1, 50, seed=12), (4, 1))
    stats = statistics.gram_statistics(grads @ grads.T)
    assert stats["grad_cov/lambda_1"] == 0.0
    assert stats["grad/noise_scale"] == 0.0
    assert np.isnan(stats["grad_cov/trace_over_lambda_1"])
    assert np.isnan(stats["grad_cov/condition"])
    assert stats["grad_cov/norm_ratio_top_k"] == np.inf
    _close(stats["grad_cov_uncentered/condition"], 1.0)


def _gradients_with_centered_spectrum(n, dim, eigenvalues, seed):
    """Gradients whose centered K has exactly the given nonzero eigenvalues."""
    rng = np.random.default_rng(seed)
    coords = rng.normal(size=(n, len(eigenvalues)))
    coords, _ = np.linalg.qr(coords - coords.mean(axis=0))  # sum to zero.
    basis, _ = np.linalg.qr(rng.normal(size=(dim, len(eigenvalues))))
    spread = coords * np.sqrt(n * np.asarray(eigenvalues))
    return rng.normal(size=dim) + spread @ basis.T


@pytest.mark.parametrize(
    "rtol, expected",
    [(1e-5, 0.1), (0.05, 0.1), (0.2, 0.3), (0.5, 1.0)],
    ids=[
        "default_picks_lambda3",
        "loose_picks_lambda3",
        "skips_lambda3",
        "only_lambda1",
    ],
)
def test_condition_skips_numerically_zero_eigenvalues(rtol, expected):
    # Centered K of rank 3 in P = 50 with n = 10: seven of the n eigenvalues
    # are 0 up to roundoff and must not be taken for lambda_*.
    grads = _gradients_with_centered_spectrum(10, 50, (1.0, 0.3, 0.1), 13)
    values = _explicit_spectrum(grads, centered=True)
    _close(values[:3], [1.0, 0.3, 0.1])
    assert np.all(values[3:] < 1e-12)
    stats = statistics.covariance_statistics(grads @ grads.T, rtol=rtol)
    _close(stats["condition"], expected)
    _close(stats["condition"], _explicit_condition(values, rtol))
    _close(stats["trace_over_lambda_1"], 1.4)


def test_accepts_array_likes_and_float32():
    grads = _gradients(5, 50, seed=14)
    gram = grads @ grads.T
    from_list = statistics.gram_statistics(gram.tolist())
    from_f32 = statistics.gram_statistics(gram.astype(np.float32))
    reference = statistics.gram_statistics(gram)
    for key, value in reference.items():
        assert from_list[key] == value, key
        np.testing.assert_allclose(from_f32[key], value, rtol=1e-4, atol=1e-6)


def test_tiny_asymmetry_is_tolerated():
    gram = _gram(_gradients(6, 50, seed=15))
    noisy = gram.copy()
    noisy[0, 1] *= 1 + 1e-9
    np.testing.assert_allclose(
        statistics.covariance_eigenvalues(noisy),
        statistics.covariance_eigenvalues(gram),
        rtol=1e-8,
    )


@pytest.mark.parametrize(
    "quantiles, key",
    [((0.0, 1.0), "confusion/cos_q100"), ((0.1,), "confusion/cos_q10")],
    ids=["extremes", "decile"],
)
def test_quantile_key_names(quantiles, key):
    grads = _gradients(6, 50, seed=16)
    stats = statistics.gram_statistics(grads @ grads.T, quantiles=quantiles)
    assert key in stats
    assert len(stats) == len(EXPECTED_KEYS) - len(QUANTILES) + len(quantiles)
    cosines = _explicit_cosines(grads)
    _close(stats[key], np.quantile(cosines, quantiles[-1]))


_GOOD = np.eye(3) + 0.1


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: statistics.gram_statistics(np.ones(3)), "square 2-D"),
        (lambda: statistics.gram_statistics(np.ones((2, 3))), "square 2-D"),
        (lambda: statistics.gram_statistics(np.ones((2, 2, 2))), "square"),
        (lambda: statistics.gram_statistics(np.ones((1, 1))), "at least 2"),
        (lambda: statistics.gram_statistics(np.ones((0, 0))), "at least 2"),
        (
            lambda: statistics.gram_statistics(_GOOD + np.triu(_GOOD, 1)),
            "symmetric",
        ),
        (
            lambda: statistics.gram_statistics(_GOOD, microbatch_size=0),
            "microbatch_size must be >= 1",
        ),
        (lambda: statistics.gram_statistics(_GOOD, k=0), "k must be >= 1"),
        (lambda: statistics.gram_statistics(_GOOD, rtol=-1e-3), "rtol"),
        (lambda: statistics.gram_statistics(_GOOD, rtol=1.0), "rtol"),
        (
            lambda: statistics.gram_statistics(_GOOD, quantiles=(1.5,)),
            "whole percentages",
        ),
        (
            lambda: statistics.gram_statistics(_GOOD, quantiles=(0.025,)),
            "whole percentages",
        ),
        (
            lambda: statistics.gram_statistics(_GOOD, quantiles=(0.5, 0.5)),
            "repeated",
        ),
        (lambda: statistics.top_directions(_GOOD, 0), "k must be >= 1"),
        (lambda: statistics.top_directions(np.ones(4), 1), "square"),
        (
            lambda: statistics.covariance_statistics(_GOOD, rtol=2.0),
            "rtol",
        ),
        (lambda: statistics.covariance_eigenvalues([[1.0]]), "at least 2"),
        (lambda: statistics.pairwise_cosines(np.ones((3, 2))), "square"),
    ],
    ids=[
        "1d",
        "not_square",
        "3d",
        "n1",
        "n0",
        "asymmetric",
        "microbatch_zero",
        "k_zero",
        "rtol_negative",
        "rtol_one",
        "quantile_above_one",
        "quantile_not_whole_percent",
        "quantile_repeated",
        "top_directions_k_zero",
        "top_directions_1d",
        "covariance_statistics_rtol",
        "eigenvalues_n1",
        "cosines_not_square",
    ],
)
def test_bad_input_raises_value_error_with_fix(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_n1_message_says_how_to_fix():
    with pytest.raises(ValueError, match="smaller microbatch_size"):
        statistics.gram_statistics(np.ones((1, 1)))


@pytest.mark.parametrize(
    "kwargs",
    [{"microbatch_size": 2.0}, {"k": True}, {"microbatch_size": "4"}],
    ids=["float_microbatch", "bool_k", "str_microbatch"],
)
def test_non_integer_counts_raise_type_error(kwargs):
    with pytest.raises(TypeError, match="must be an int"):
        statistics.gram_statistics(_GOOD, **kwargs)


# ------------------------------------------------------ gram_statistics_tf
# The TF twin must equal the numpy reference to float64 roundoff.


def _tf_cases():
    """Named Gram matrices, generic and at the edges of every convention."""
    cases = {}
    for n, dim, seed in [(2, 50, 20), (3, 50, 21), (8, 50, 22), (17, 5, 23)]:
        cases[f"random_n{n}_P{dim}"] = _gram(_gradients(n, dim, seed))
    cases["rank_deficient"] = _gram(_low_rank_gradients(12, 40, [1, 0.3], 24))
    cases["zero_norm_rows"] = _gram(_gradients(9, 30, 25, zero_rows=(2, 6)))
    duplicated = _gradients(7, 30, 26)
    duplicated[[3, 5]] = duplicated[1]
    cases["duplicated"] = _gram(duplicated)
    cases["identical"] = _gram(np.tile(_gradients(1, 50, seed=12), (4, 1)))
    base = _gradients(2, 50, seed=11)
    cases["zero_mean"] = _gram(np.concatenate([base, -base]))
    cases["one_nonzero"] = _gram(_gradients(4, 50, 9, zero_rows=(0, 1, 3)))
    cases["all_zero"] = np.zeros((5, 5))
    for name, bad in [("nan", np.nan), ("inf", np.inf), ("neg_inf", -np.inf)]:
        gram = _gram(_gradients(6, 50, seed=10))
        gram[1, 3] = bad
        cases[name] = gram
    return cases


TF_CASES = _tf_cases()
# XLA's iterative CPU eigensolver: eigenvalues to ~1e-13 of lambda_1 (so
# small ones, in `condition`, to ~1e-9 relative), eigenvectors to ~1e-8.
XLA_LOOSE = {
    "grad_cov/condition": 1e-6,
    "grad_cov_uncentered/condition": 1e-6,
    "grad_cov/norm_ratio_top_k": 1e-6,
}


def _tf_statistics_fn(mode):
    def statistics_fn(gram):
        return statistics.gram_statistics_tf(gram, microbatch_size=3, k=2)

    if mode == "eager":
        return statistics_fn
    if mode == "function":  # an unknown n, as in a train step
        return tf.function(
            statistics_fn,
            input_signature=[tf.TensorSpec([None, None], tf.float64)],
        )
    return tf.function(statistics_fn, jit_compile=True)


def _assert_tf_equals_numpy(got, expected, rtol, loose=None):
    assert list(got) == list(expected)
    for key, value in expected.items():
        actual = float(got[key])
        assert got[key].dtype == tf.float64, key
        if not np.isfinite(value):
            assert actual == value or np.isnan(actual) and np.isnan(value), (
                key,
                actual,
                value,
            )
            continue
        tolerance = (loose or {}).get(key, rtol)
        assert abs(actual - value) <= tolerance * abs(value), (
            key,
            actual,
            value,
        )


@pytest.mark.parametrize("mode", ["eager", "function", "jit"])
def test_tf_statistics_equal_numpy_to_float64_roundoff(mode):
    statistics_fn = _tf_statistics_fn(mode)
    loose = XLA_LOOSE if mode == "jit" else None
    for name, gram in TF_CASES.items():
        expected = statistics.gram_statistics(gram, microbatch_size=3, k=2)
        got = statistics_fn(tf.constant(gram))
        assert tuple(got) == statistics.metric_keys()
        try:
            _assert_tf_equals_numpy(got, expected, 1e-9, loose)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from error


def test_tf_gram_statistics_equal_the_numpy_ones(rng):
    rows = rng.normal(size=(7, 20))
    rows[3] = 0.0  # a zero-norm sample
    gram = rows @ rows.T
    expected = statistics.gram_statistics(gram, microbatch_size=4)
    got = statistics.gram_statistics_tf(tf.constant(gram), microbatch_size=4)
    assert list(got) == list(expected)
    for key, value in got.items():
        assert float(value) == pytest.approx(expected[key], rel=1e-10), key


def test_tf_statistics_take_quantiles_and_float32():
    gram = _gram(_gradients(6, 50, seed=16))
    quantiles = (0.0, 0.1, 1.0)
    expected = statistics.gram_statistics(gram, quantiles=quantiles)
    got = statistics.gram_statistics_tf(tf.constant(gram), quantiles=quantiles)
    assert list(got) == list(statistics.metric_keys(quantiles=quantiles))
    _assert_tf_equals_numpy({key: got[key] for key in expected}, expected, 1e-9)
    from_f32 = statistics.gram_statistics_tf(gram.astype(np.float32))
    from_list = statistics.gram_statistics_tf(gram.tolist())
    for key, value in statistics.gram_statistics(gram).items():
        assert float(from_list[key]) == pytest.approx(value, rel=1e-9), key
        np.testing.assert_allclose(
            float(from_f32[key]), value, rtol=1e-4, atol=1e-6
        )


def test_metric_keys_are_the_keys_of_both_implementations():
    assert set(statistics.metric_keys()) == EXPECTED_KEYS
    stats = statistics.gram_statistics(_GOOD)
    assert tuple(stats) == statistics.metric_keys()
    assert tuple(statistics.gram_statistics_tf(_GOOD)) == tuple(stats)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: statistics.gram_statistics_tf(np.ones(3)), "square 2-D"),
        (lambda: statistics.gram_statistics_tf(np.ones((2, 3))), "square"),
        (
            lambda: statistics.gram_statistics_tf(_GOOD, microbatch_size=0),
            "microbatch_size must be >= 1",
        ),
        (lambda: statistics.gram_statistics_tf(_GOOD, k=0), "k must be >= 1"),
        (lambda: statistics.gram_statistics_tf(_GOOD, rtol=1.0), "rtol"),
        (
            lambda: statistics.gram_statistics_tf(_GOOD, quantiles=(0.5, 0.5)),
            "repeated",
        ),
        (lambda: statistics.metric_keys(quantiles=(0.025,)), "whole"),
    ],
    ids=["1d", "not_square", "microbatch", "k", "rtol", "repeated", "keys"],
)
def test_tf_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
