"""Degenerate requests and inputs: exact answers, NaN with one log line, or
an `ArgumentError` that says how to fix the call; never another exception.

References are numpy float64 on explicit matrices, or the full Hessian of a
tiny model by `tape.jacobian` (`conftest.jacobian_hessian`); none comes from
the code under test.
"""

from __future__ import annotations

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import (
    build,
    data_for,
    flat,
    floatx,
    jacobian_hessian,
    jacobian_hessian_of,
    plain_gradient,
    second_derivative_along,
    split_flat,
    twin,
    unflat,
)

import tf_breakeven as tfb
from tf_breakeven import linalg, statistics
from tf_breakeven.validation import ArgumentError

# ------------------------------------------------------------ test matrices


def _orthogonal(dim, seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))
    return q * np.sign(np.diag(r))


def _with_spectrum(eigenvalues, seed):
    eigenvalues = np.asarray(eigenvalues, np.float64)
    q = _orthogonal(len(eigenvalues), seed)
    matrix = (q * eigenvalues) @ q.T
    return (matrix + matrix.T) / 2


def _gaussian(dim, seed):
    g = np.random.default_rng(seed).normal(size=(dim, dim))
    return (g + g.T) / np.sqrt(2 * dim)


# Small operators, where every solver parameter can reach the dimension.
MATRICES = {
    "dim1": lambda: np.array([[2.5]]),
    "dim2": lambda: np.array([[1.0, 2.0], [2.0, -3.0]]),
    "gaussian7": lambda: _gaussian(7, seed=1),
    "repeated_and_zero9": lambda: _with_spectrum(
        [3, 3, 3, 1, 0, 0, -2, -2, 5], seed=2
    ),
    "negative_definite5": lambda: _with_spectrum([-1, -2, -3, -4, -5], seed=3),
    "rank_one8": lambda: _with_spectrum([4, 0, 0, 0, 0, 0, 0, 0], seed=4),
}
DTYPES = {"float32": tf.float32, "float64": tf.float64}
# Rounding tolerance relative to the operator's scale.
TOL = {tf.float32: 2e-5, tf.float64: 1e-11}


def _matvec(matrix, dtype=tf.float64):
    operator = tf.constant(matrix, dtype)
    return lambda v: tf.linalg.matvec(operator, v)


def _scale(matrix):
    return max(1.0, float(np.abs(np.linalg.eigvalsh(matrix)).max()))


def _beyond(dim):
    """Counts at and beyond `dim`, including Hutch++'s old crash m // 3 > d."""
    return sorted({dim, dim + 1, 2 * dim + 1, 3 * dim, 3 * dim + 4, 400})


TRACE_CASES = [
    pytest.param(estimator, name, m, id=f"{estimator}-{name}-m{m}")
    for estimator in ("hutchpp", "hutchinson")
    for name in MATRICES
    for m in _beyond(MATRICES[name]().shape[0])
]
ESTIMATORS = {
    "hutchpp": linalg.hutchpp_trace,
    "hutchinson": linalg.hutchinson_trace,
}


# ------------------------------------- solver parameters at/beyond the dim


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("estimator, name, num_samples", TRACE_CASES)
def test_more_probes_than_dimensions_give_the_exact_trace(
    estimator, name, num_samples, dtype
):
    matrix = MATRICES[name]()
    dim = matrix.shape[0]
    if estimator == "hutchpp" and num_samples < 3:
        pytest.skip("Hutch++ needs num_samples >= 3")
    estimate = ESTIMATORS[estimator](
        _matvec(matrix, dtype), dim, num_samples, seed=7, dtype=dtype
    )
    assert abs(float(estimate) - np.trace(matrix)) <= TOL[dtype] * (
        dim * _scale(matrix)
    )


def test_trace_just_below_the_dimension_is_still_an_estimate():
    # The exact path must not swallow the stochastic regime: with m < dim
    # on a full-rank operator, different seeds give different estimates.
    matrix = _gaussian(12, seed=9) + 3 * np.eye(12)
    for estimator in ESTIMATORS.values():
        estimates = {
            float(estimator(_matvec(matrix), 12, 11, seed=s, dtype=tf.float64))
            for s in range(4)
        }
        assert len(estimates) > 1


def _residuals(matrix, values, vectors):
    return np.linalg.norm(matrix @ vectors.T - vectors.T * values, axis=0)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize(
    "extra", [0, 1, 50], ids=["m=dim", "m=dim+1", "m>>dim"]
)
@pytest.mark.parametrize("which", ["largest", "smallest"])
@pytest.mark.parametrize("name", MATRICES)
def test_eigsh_with_k_and_iterations_at_and_beyond_the_dimension(
    name, which, extra, dtype
):
    matrix = MATRICES[name]()
    dim = matrix.shape[0]
    reference = np.linalg.eigvalsh(matrix)
    if which == "largest":
        reference = reference[::-1]
    result = linalg.eigsh(
        _matvec(matrix, dtype),
        dim,
        dim,
        which=which,
        num_iterations=dim + extra,
        seed=3,
        dtype=dtype,
    )
    values = result.eigenvalues.numpy().astype(np.float64)
    vectors = result.eigenvectors.numpy().astype(np.float64)
    tol = TOL[dtype] * _scale(matrix) * 10
    np.testing.assert_allclose(values, reference, atol=tol)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=tol)
    assert np.all(_residuals(matrix, values, vectors) <= 100 * tol)


@pytest.mark.parametrize("name", MATRICES)
def test_lanczos_at_the_dimension_recovers_every_eigenvalue(name):
    matrix = MATRICES[name]()
    dim = matrix.shape[0]
    result = linalg.lanczos(_matvec(matrix), dim, dim, seed=5, dtype=tf.float64)
    values, _ = linalg.tridiagonal_eigh(result.alphas, result.betas)
    scale = _scale(matrix)
    np.testing.assert_allclose(
        values.numpy(), np.linalg.eigvalsh(matrix), atol=1e-11 * scale
    )
    basis = result.basis.numpy()
    np.testing.assert_allclose(basis @ basis.T, np.eye(dim), atol=1e-11)


def test_lanczos_beyond_the_dimension_is_an_argument_error():
    with pytest.raises(ArgumentError, match=r"pass num_iterations <= dim"):
        linalg.lanczos(_matvec(np.eye(3)), 3, 4, dtype=tf.float64)


@pytest.mark.parametrize(
    "extra", [0, 1, 50], ids=["m=dim", "m=dim+1", "m>>dim"]
)
@pytest.mark.parametrize("name", MATRICES)
def test_slq_at_and_beyond_the_dimension_is_the_exact_spectrum(name, extra):
    matrix = MATRICES[name]()
    dim = matrix.shape[0]
    nodes, weights = linalg.slq(
        _matvec(matrix), dim, 3, dim + extra, seed=2, dtype=tf.float64
    )
    nodes, weights = nodes.numpy(), weights.numpy()
    assert nodes.shape == weights.shape == (3, dim)  # clipped to dim
    reference = np.linalg.eigvalsh(matrix)
    for run in range(3):
        np.testing.assert_allclose(
            nodes[run], reference, atol=1e-10 * _scale(matrix)
        )
    assert np.all(weights >= 0)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-12)


@pytest.mark.parametrize("num_iterations", [0, 1, 10, 500])
@pytest.mark.parametrize(
    "name", ["dim1", "dim2", "negative_definite5", "rank_one8"]
)
def test_power_iteration_at_and_beyond_the_dimension(name, num_iterations):
    matrix = MATRICES[name]()
    dim = matrix.shape[0]
    values = np.linalg.eigvalsh(matrix)
    dominant = values[np.argmax(np.abs(values))]
    result = linalg.power_iteration(
        _matvec(matrix), dim, num_iterations=num_iterations, dtype=tf.float64
    )
    value = float(result.eigenvalues[0])
    vector = result.eigenvectors.numpy()[0]
    assert np.isfinite(value)
    assert abs(np.linalg.norm(vector) - 1.0) < 1e-12
    # The Rayleigh quotient of a unit vector lies within the spectrum.
    assert values[0] - 1e-12 <= value <= values[-1] + 1e-12
    if num_iterations == 500 or dim == 1:
        assert abs(value - dominant) < 1e-9 * abs(dominant)


def test_solvers_at_and_beyond_the_dimension_compile_with_xla():
    matrix = MATRICES["repeated_and_zero9"]()
    mv = _matvec(matrix)

    @tf.function(jit_compile=True)
    def solve():
        return (
            linalg.hutchpp_trace(mv, 9, 400, seed=1, dtype=tf.float64),
            linalg.hutchinson_trace(mv, 9, 9, seed=1, dtype=tf.float64),
            linalg.eigsh(mv, 9, 9, num_iterations=20, dtype=tf.float64),
            linalg.slq(mv, 9, 2, 30, seed=1, dtype=tf.float64),
        )

    hutchpp, hutchinson, pairs, (nodes, _) = solve()
    trace = np.trace(matrix)
    assert abs(float(hutchpp) - trace) < 1e-11 * 9 * 5
    assert abs(float(hutchinson) - trace) < 1e-11 * 9 * 5
    reference = np.linalg.eigvalsh(matrix)
    # XLA's eigh is less accurate than LAPACK (linalg's docstring).
    np.testing.assert_allclose(
        pairs.eigenvalues.numpy(), reference[::-1], atol=1e-8
    )
    np.testing.assert_allclose(nodes.numpy()[0], reference, atol=1e-8)


# ------------------------------------------- a tiny model's full Hessian


@pytest.fixture(scope="module")
def mlp_hessian():
    _, model64 = twin("mlp", seed=3)
    x, y = data_for("mlp", n=12, seed=3)
    hessian = jacobian_hessian(model64, x, y, training=True)
    return model64, (x, y), hessian


@pytest.mark.parametrize("method", ["hutch++", "hutchinson"])
@pytest.mark.parametrize("factor", [1, 2, 3, 8], ids=lambda f: f"m={f}d")
def test_hessian_trace_with_more_probes_than_parameters(
    mlp_hessian, method, factor
):
    model64, data, hessian = mlp_hessian
    dim = hessian.shape[0]  # 51
    estimate = tfb.hessian_trace(
        model64, data, num_samples=factor * dim, method=method
    )
    scale = np.abs(np.linalg.eigvalsh(hessian)).sum()
    assert abs(estimate - np.trace(hessian)) < 1e-10 * scale


def test_hessian_trace_issue_example_75_parameters_400_probes():
    # The reported crash: m // 3 = 133 > d = 75.
    keras.utils.set_random_seed(0)
    with floatx("float64"):
        model = keras.Sequential(
            [
                keras.Input((2,)),
                keras.layers.Dense(12, activation="tanh"),
                keras.layers.Dense(3),
            ]
        )
    model.compile(loss="mse")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(10, 2)), rng.normal(size=(10, 3))
    shapes = [v.shape for v in model.trainable_variables]
    assert sum(int(np.prod(s)) for s in shapes) == 75

    def loss(theta):
        pred = model.stateless_call(split_flat(theta, shapes), [], x)[0]
        return tf.reduce_mean(tf.square(pred - y))

    hessian = jacobian_hessian_of(loss, flat(model.trainable_variables))
    for method in ("hutch++", "hutchinson"):
        estimate = tfb.hessian_trace(
            model, (x, y), num_samples=400, method=method
        )
        assert abs(estimate - np.trace(hessian)) < 1e-10 * np.abs(
            np.trace(hessian)
        )


def test_hessian_eigenvalues_with_k_and_iterations_beyond_the_dimension(
    mlp_hessian,
):
    model64, data, hessian = mlp_hessian
    dim = hessian.shape[0]
    reference = np.linalg.eigvalsh(hessian)
    scale = np.abs(reference).max()
    top = tfb.hessian_eigenvalues(
        model64, data, k=dim, num_iterations=dim + 30, tol=0.0
    )
    np.testing.assert_allclose(top, reference[::-1], atol=1e-9 * scale)
    bottom = tfb.hessian_eigenvalues(
        model64, data, k=3, which="smallest", num_iterations=10 * dim, tol=0.0
    )
    np.testing.assert_allclose(bottom, reference[:3], atol=1e-9 * scale)
    grid, density = tfb.hessian_spectral_density(
        model64, data, num_iterations=dim + 30, num_runs=2
    )
    assert np.all(np.isfinite(density))
    assert abs(np.trapezoid(density, grid) - 1) < 1e-3


# -------------------------------------------- NaN and Inf: NaN, one line


def _nonfinite_matrix(kind):
    matrix = MATRICES["gaussian7"]()
    matrix[2, 2] = {"nan": np.nan, "inf": np.inf, "neg_inf": -np.inf}[kind]
    return matrix


SOLVERS = {
    "eigsh": lambda mv, d: linalg.eigsh(mv, d, 2, dtype=tf.float64),
    "eigsh_smallest_full": lambda mv, d: linalg.eigsh(
        mv, d, d, which="smallest", dtype=tf.float64
    ),
    "slq": lambda mv, d: linalg.slq(mv, d, 2, 5, dtype=tf.float64),
    "tridiagonal_eigh": lambda mv, d: linalg.tridiagonal_eigh(
        *linalg.lanczos(mv, d, d, dtype=tf.float64)[:2]
    ),
    "power": lambda mv, d: linalg.power_iteration(mv, d, dtype=tf.float64),
    "hutchpp": lambda mv, d: linalg.hutchpp_trace(mv, d, 6, dtype=tf.float64),
    "hutchinson": lambda mv, d: linalg.hutchinson_trace(
        mv, d, 3, dtype=tf.float64
    ),
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "xla"])
@pytest.mark.parametrize("kind", ["nan", "inf", "neg_inf"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_solvers_on_a_non_finite_operator_return_nan(solver, kind, jit):
    mv = _matvec(_nonfinite_matrix(kind))
    fn = SOLVERS[solver]
    if jit:
        result = tf.function(lambda: fn(mv, 7), jit_compile=True)()
    else:
        result = fn(mv, 7)
    values = tf.nest.flatten(result)[0].numpy()
    assert np.all(np.isnan(values)), values


def test_tridiagonal_eigh_guards_each_matrix_of_a_batch():
    alphas = np.array([[1.0, 2.0, 3.0], [1.0, np.nan, 3.0]])
    betas = np.array([[0.5, 0.5], [0.5, 0.5]])
    values, vectors = linalg.tridiagonal_eigh(alphas, betas)
    tri = np.diag(alphas[0]) + np.diag(betas[0], 1) + np.diag(betas[0], -1)
    np.testing.assert_allclose(values[0], np.linalg.eigvalsh(tri), atol=1e-12)
    assert np.all(np.isfinite(vectors[0]))
    assert np.all(np.isnan(values[1])) and np.all(np.isnan(vectors[1]))


def _poisoned(kind, where):
    """The mlp and its data with one NaN/Inf in the inputs or the weights."""
    model = build("mlp")
    x, y = data_for("mlp", n=8)
    x = x.astype("float32")
    bad = {"nan": np.nan, "inf": np.inf}[kind]
    if where == "inputs":
        x[0, 1] = bad
    else:
        # The output layer's kernel: an Inf behind a tanh saturates it and
        # leaves the gradients finite (and correctly so).
        kernel = model.trainable_variables[2]
        values = kernel.numpy()
        values[0, 0] = bad
        kernel.assign(values)
    return model, (x, y)


def _density(model, data, **kwargs):
    return tfb.hessian_spectral_density(
        model, data, num_iterations=10, **kwargs
    )[1]


MEASUREMENTS = {
    "hessian_eigenvalues": lambda m, d: tfb.hessian_eigenvalues(m, d, k=2),
    "hessian_eigenvectors": lambda m, d: flat(
        tfb.hessian_eigenpairs(m, d, k=1).eigenvectors[0]
    ),
    "hessian_smallest": lambda m, d: tfb.hessian_eigenvalues(
        m, d, k=1, which="smallest"
    ),
    "hessian_spectral_density": _density,
    "hessian_density_on_a_grid": lambda m, d: _density(
        m, d, grid=np.linspace(-1, 1, 5)
    ),
    "operator_trace": lambda m, d: tfb.HessianOperator(m, d).trace(),
    "hessian_trace_hutchinson": lambda m, d: tfb.hessian_trace(
        m, d, method="hutchinson", num_samples=5
    ),
    "xla_operator_eigenpairs": lambda m, d: (
        tfb.HessianOperator(m, d, jit_compile=True).eigenpairs(k=2).eigenvalues
    ),
    "gradient_covariance_eigenvalues": lambda m, d: (
        tfb.gradient_covariance_eigenpairs(m, d, k=2)[0]
    ),
    "gradient_covariance_eigenvectors": lambda m, d: flat(
        tfb.gradient_covariance_eigenpairs(m, d, k=2)[1][0]
    ),
}


def _warnings(caplog):
    return [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and "non-finite" in r.getMessage()
    ]


@pytest.mark.parametrize("where", ["inputs", "weights"])
@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("measurement", MEASUREMENTS)
def test_non_finite_probe_gives_nan_and_one_log_line(
    measurement, kind, where, caplog
):
    model, data = _poisoned(kind, where)
    with caplog.at_level(logging.WARNING):
        values = np.asarray(MEASUREMENTS[measurement](model, data))
    assert values.size > 0 and np.all(np.isnan(values)), values
    assert len(_warnings(caplog)) == 1, [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_gradient_statistics_on_the_same_probe_agree_on_nan(kind):
    # The reference behaviour the Hessian measurements now match.
    model, data = _poisoned(kind, "inputs")
    stats = tfb.gradient_statistics(model, data)
    assert np.isnan(stats["grad_cov/lambda_1"])


def test_finite_probe_logs_nothing(caplog):
    model = build("mlp")
    x, y = data_for("mlp", n=8)
    data = (x.astype("float32"), y)
    with caplog.at_level(logging.WARNING):
        for measurement in MEASUREMENTS.values():
            assert np.all(np.isfinite(measurement(model, data)))
    assert _warnings(caplog) == []


GRAMS = {
    "nan_off_diagonal": lambda g: g.__setitem__((0, 1), np.nan),
    "nan_one_sided": lambda g: g.__setitem__((1, 0), np.nan),
    "inf_diagonal": lambda g: g.__setitem__((2, 2), np.inf),
    "all_nan": lambda g: g.fill(np.nan),
}


@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize("corrupt", GRAMS)
def test_top_directions_on_a_non_finite_gram_return_nan(corrupt, centered):
    rows = np.random.default_rng(0).normal(size=(4, 6))
    gram = rows @ rows.T
    GRAMS[corrupt](gram)
    values, coefficients = statistics.top_directions(gram, 3, centered=centered)
    assert values.shape == (3,) and coefficients.shape == (3, 4)
    assert np.all(np.isnan(values)) and np.all(np.isnan(coefficients))


# ---------------------------------------------- zero operators: zeros


def _linear_loss(y_true, y_pred):
    # Linear in the outputs of a linear model: the Hessian is exactly zero.
    del y_true
    return tf.reduce_sum(y_pred, axis=-1)


def _zero_weight_probe():
    _, model64 = twin("mlp", seed=2)
    x, y = data_for("mlp", n=8, seed=2)
    weights = np.zeros(8)
    reference = jacobian_hessian(model64, x, y, True, sample_weight=weights)
    assert not np.any(reference)
    return model64, (x, y, weights), {}


def _linear_model_probe():
    keras.utils.set_random_seed(0)
    with floatx("float64"):
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    x = np.random.default_rng(0).normal(size=(6, 4))
    return model, (x, np.zeros((6, 3))), {"loss": _linear_loss}


ZERO_PROBES = {
    "all_zero_sample_weights": _zero_weight_probe,
    "loss_linear_in_the_parameters": _linear_model_probe,
}


@pytest.mark.parametrize("probe", ZERO_PROBES)
def test_zero_hessian_gives_finite_zeros(probe, caplog):
    model, data, kwargs = ZERO_PROBES[probe]()
    with caplog.at_level(logging.WARNING):
        pairs = tfb.hessian_eigenpairs(model, data, k=2, **kwargs)
        trace = tfb.hessian_trace(model, data, num_samples=6, **kwargs)
        exact_trace = tfb.hessian_trace(model, data, num_samples=400, **kwargs)
        grid, density = tfb.hessian_spectral_density(
            model, data, num_iterations=5, **kwargs
        )
    np.testing.assert_array_equal(pairs.eigenvalues, [0.0, 0.0])
    for vector in pairs.eigenvectors:
        assert abs(np.linalg.norm(flat(vector)) - 1) < 1e-12
    assert trace == 0.0 and exact_trace == 0.0
    assert np.all(np.isfinite(grid)) and np.all(np.isfinite(density))
    assert abs(np.trapezoid(density, grid) - 1) < 1e-3
    assert _warnings(caplog) == []


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_solvers_on_the_zero_operator_give_zeros(dtype):
    dim = 6
    mv = _matvec(np.zeros((dim, dim)), dtype)
    pairs = linalg.eigsh(mv, dim, 3, dtype=dtype)
    np.testing.assert_array_equal(pairs.eigenvalues.numpy(), 0.0)
    np.testing.assert_allclose(
        np.linalg.norm(pairs.eigenvectors.numpy(), axis=1), 1.0, rtol=1e-6
    )
    nodes, weights = linalg.slq(mv, dim, 2, dim, dtype=dtype)
    np.testing.assert_array_equal(nodes.numpy(), 0.0)
    np.testing.assert_allclose(weights.numpy().sum(axis=1), 1.0, atol=1e-6)
    power = linalg.power_iteration(mv, dim, dtype=dtype)
    assert float(power.eigenvalues[0]) == 0.0
    assert np.all(np.isfinite(power.eigenvectors.numpy()))
    for m in (3, 5, 6, 50):
        assert float(linalg.hutchpp_trace(mv, dim, m, dtype=dtype)) == 0.0
        assert float(linalg.hutchinson_trace(mv, dim, m, dtype=dtype)) == 0.0
    grid, density = linalg.spectral_density(nodes, weights)
    assert np.all(np.isfinite(density))
    assert abs(np.trapezoid(density, grid) - 1) < 1e-3


def test_zero_gradients_give_no_covariance_directions():
    model, data, _ = _zero_weight_probe()
    values, vectors = tfb.gradient_covariance_eigenpairs(model, data, k=2)
    assert values.shape == (0,) and vectors == []


# ------------------------------------------- a diverging tracked run


class _BatchLogs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.batches = []

    def on_train_batch_end(self, batch, logs=None):
        self.batches.append({k: float(v) for k, v in logs.items()})


DIVERGING = {
    "fused_gram": ({"gram": True, "microbatch_size": 2}, False, False),
    "fused_gram_hessian": (
        {"gram": True, "microbatch_size": 2, "hessian_every": 1},
        False,
        False,
    ),
    "hessian_only": ({"hessian_every": 1}, False, False),
    "keras_pass_bn_gram_hessian": (
        {"gram": True, "microbatch_size": 2, "hessian_every": 1},
        True,
        False,
    ),
    "fused_gram_hessian_xla": (
        {"gram": True, "microbatch_size": 2, "hessian_every": 1},
        False,
        True,
    ),
}


@pytest.mark.parametrize("case", DIVERGING)
def test_diverging_tracked_fit_logs_nan_and_never_raises(case):
    # Least squares on a Dense model at learning rate 50 diverges in a few
    # steps (the reported `eigvalsh` crash of the tracked train step).
    tracking, batch_norm, jit = DIVERGING[case]
    keras.utils.set_random_seed(0)
    layers = [keras.Input((4,))]
    if batch_norm:
        layers.append(keras.layers.BatchNormalization())
    layers.append(keras.layers.Dense(1))
    model = tfb.track(keras.Sequential(layers), every=1, **tracking)
    model.compile(
        optimizer=keras.optimizers.SGD(50.0), loss="mse", jit_compile=jit
    )
    assert model.fusable == (tracking.get("gram", False) and not batch_norm)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = rng.normal(size=(64, 1)).astype("float32")
    logs = _BatchLogs()
    model.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[logs])
    keys = model.tracking_keys
    assert len(logs.batches) == 24
    assert all(np.isfinite(logs.batches[0][key]) for key in keys)
    diverged = [b for b in logs.batches if np.isnan(b["loss"])]
    assert diverged and np.isnan(logs.batches[-1]["loss"])
    for values in diverged:
        assert all(np.isnan(values[key]) for key in keys), values
    if tracking.get("gram"):
        assert any(key.startswith("batch/") for key in keys)


# -------------------------------------------- impossible requests


def _mlp_probe():
    model = build("mlp")
    x, y = data_for("mlp", n=8)
    return model, (x.astype("float32"), y)


IMPOSSIBLE = {
    "eigsh_k_beyond_dim": lambda: linalg.eigsh(_matvec(np.eye(3)), 3, 4),
    "lanczos_beyond_dim": lambda: linalg.lanczos(_matvec(np.eye(3)), 3, 4),
    "hutchpp_two_samples": lambda: linalg.hutchpp_trace(
        _matvec(np.eye(3)), 3, 2
    ),
    "eigsh_which": lambda: linalg.eigsh(_matvec(np.eye(3)), 3, which="middle"),
    "density_sigma_nan_nodes": lambda: linalg.spectral_density(
        [np.nan], [1.0], sigma=-1.0
    ),
    "hessian_k_beyond_dim": lambda: tfb.hessian_eigenvalues(
        *_mlp_probe(), k=52
    ),
    "hessian_iterations_below_k": lambda: tfb.hessian_eigenvalues(
        *_mlp_probe(), k=3, num_iterations=2
    ),
    "hessian_trace_two_samples": lambda: tfb.hessian_trace(
        *_mlp_probe(), num_samples=2
    ),
}


@pytest.mark.parametrize("call", IMPOSSIBLE.values(), ids=IMPOSSIBLE.keys())
def test_impossible_requests_raise_an_argument_error_with_the_fix(call):
    with pytest.raises(ArgumentError, match=r"[Pp]ass "):
        call()


# ------------------------------- every measurement on degenerate probes
#
# The float64 mlp on probes of one example, one batch (as a tuple and as a
# one-element dataset), a dataset whose last batch is ragged (with and
# without sample weights), all-zero sample weights and identical examples.
# References: the full Hessian by `tape.jacobian`, per-sample gradients by a
# Python loop of plain gradients, per-example curvature by nested tapes in a
# scalar step t, covariance eigenpairs by numpy on the explicit P x P K, and
# the statistics by the numpy `statistics.gram_statistics` of the reference
# Gram matrix.


def _probe_arrays(name):
    x, y = data_for("mlp", n=10, seed=5)
    weights = np.random.default_rng(5).uniform(0.0, 2.0, 10)
    weights[[1, 6]] = 0.0
    return {
        "one_example": (x[:1], y[:1], None, None),
        "one_batch": (x[:8], y[:8], None, None),
        "one_batch_dataset": (x[:8], y[:8], None, 8),
        "ragged_dataset": (x, y, None, 4),
        "weighted_ragged_dataset": (x, y, weights, 4),
        "zero_weights": (x[:8], y[:8], np.zeros(8), None),
        "identical_examples": (
            np.repeat(x[:1], 8, axis=0),
            np.repeat(y[:1], 8),
            None,
            None,
        ),
    }[name]


PROBES = (
    "one_example",
    "one_batch",
    "one_batch_dataset",
    "ragged_dataset",
    "weighted_ragged_dataset",
    "zero_weights",
    "identical_examples",
)


def _probe_data(x, y, weights, batch):
    parts = (x, y) if weights is None else (x, y, weights)
    if batch is None:
        return parts
    return tf.data.Dataset.from_tensor_slices(parts).batch(batch)


_CACHE = {}


def _cached(key, build_fn):
    if key not in _CACHE:
        _CACHE[key] = build_fn()
    return _CACHE[key]


def _model64():
    return _cached("model64", lambda: twin("mlp", seed=5)[1])


def _reference_rows(model64, x, y, weights, microbatch_size):
    params = [tf.constant(v.numpy()) for v in model64.trainable_variables]
    rows = []
    for start in range(0, len(y), microbatch_size):
        part = slice(start, start + microbatch_size)
        w = None if weights is None else weights[part]
        rows.append(plain_gradient(model64, params, x[part], y[part], True, w))
    return np.stack(rows)


def _reference_curvature(model64, x, y, weights, direction):
    """e^T H_i e for every example: d^2/dt^2 of w_i l_i(theta + t e)."""
    shapes = [v.shape for v in model64.trainable_variables]

    def losses(theta):
        params = split_flat(theta, shapes)
        y_pred = model64.stateless_call(params, [], x, training=True)[0]
        losses = keras.losses.sparse_categorical_crossentropy(
            y, y_pred, from_logits=True
        )
        return losses if weights is None else losses * weights

    return second_derivative_along(
        losses, flat(model64.trainable_variables), direction
    )


class _Reference:
    """Everything exact about one probe of the float64 mlp."""

    def __init__(self, name):
        model = _model64()
        self.x, self.y, self.weights, batch = _probe_arrays(name)
        self.data = _probe_data(self.x, self.y, self.weights, batch)
        self.hessian = jacobian_hessian(
            model, self.x, self.y, True, sample_weight=self.weights
        )
        self.eigenvalues = np.linalg.eigvalsh(self.hessian)
        self.scale = max(1.0, float(np.abs(self.eigenvalues).max()))
        self.direction = np.random.default_rng(0).normal(size=len(self.hessian))
        self.curvature = _reference_curvature(
            model, self.x, self.y, self.weights, self.direction
        )
        self._rows = {}

    def rows(self, microbatch_size):
        if microbatch_size not in self._rows:
            self._rows[microbatch_size] = _reference_rows(
                _model64(), self.x, self.y, self.weights, microbatch_size
            )
        return self._rows[microbatch_size]


def _reference(name):
    return _cached(("reference", name), lambda: _Reference(name))


def _close(got, expected, atol):
    np.testing.assert_allclose(
        np.asarray(got, np.float64), expected, rtol=0, atol=atol, equal_nan=True
    )


def _check_eigenpairs(model, ref):
    dim = len(ref.hessian)
    pairs = tfb.hessian_eigenpairs(
        model, ref.data, k=2, num_iterations=dim, tol=0.0
    )
    _close(pairs.eigenvalues, ref.eigenvalues[::-1][:2], 1e-9 * ref.scale)
    vectors = np.stack([flat(v) for v in pairs.eigenvectors])
    _close(np.linalg.norm(vectors, axis=1), [1.0, 1.0], 1e-9)
    residuals = ref.hessian @ vectors.T - vectors.T * pairs.eigenvalues
    _close(residuals, 0.0, 1e-7 * ref.scale)
    return pairs.eigenvalues


def _check_smallest(model, ref):
    op = tfb.HessianOperator(model, ref.data)
    values = op.eigenpairs(
        k=1, which="smallest", num_iterations=op.dim, tol=0.0
    ).eigenvalues
    _close(values, ref.eigenvalues[:1], 1e-9 * ref.scale)
    return values


def _check_matvec(model, ref):
    vector = unflat(ref.direction, model)
    got = flat(tfb.hessian_vector_product(model, ref.data, vector))
    _close(got, ref.hessian @ ref.direction, 1e-10 * ref.scale * 10)
    return got


def _check_trace(model, ref):
    value = tfb.hessian_trace(model, ref.data, num_samples=len(ref.hessian))
    _close(value, np.trace(ref.hessian), 1e-9 * ref.scale * len(ref.hessian))
    return value


def _check_density(model, ref):
    grid, density = tfb.hessian_spectral_density(
        model, ref.data, num_iterations=len(ref.hessian), grid=400
    )
    assert np.all(np.isfinite(grid)) and np.all(np.isfinite(density))
    assert abs(np.trapezoid(density, grid) - 1) < 1e-3
    # The nodes are the exact eigenvalues: the grid spans them and the
    # density's mean is a convex combination of them.
    low, high = ref.eigenvalues[0], ref.eigenvalues[-1]
    assert grid[0] <= low + 1e-9 * ref.scale
    assert grid[-1] >= high - 1e-9 * ref.scale
    mean = np.trapezoid(grid * density, grid)
    slack = 1e-3 * ref.scale
    assert low - slack <= mean <= high + slack
    return density


def _check_curvature(model, ref):
    got = tfb.directional_curvature(
        model, ref.data, unflat(ref.direction, model)
    ).numpy()
    size = max(1.0, float(np.abs(ref.curvature).max()))
    _close(got, ref.curvature, 1e-9 * size)
    # The mean of e^T H_i e is e^T H e.
    quadratic = ref.direction @ ref.hessian @ ref.direction
    _close(got.mean(), quadratic, 1e-9 * size)
    return got


def _check_gram(microbatch_size):
    def check(model, ref):
        gram = tfb.gradient_gram(
            model, ref.data, microbatch_size=microbatch_size
        )
        rows = ref.rows(microbatch_size)
        expected = rows @ rows.T
        _close(gram, expected, 1e-10 * max(1.0, np.abs(expected).max()))
        return gram

    return check


def _check_statistics(microbatch_size):
    def check(model, ref):
        stats = tfb.gradient_statistics(
            model, ref.data, microbatch_size=microbatch_size
        )
        rows = ref.rows(microbatch_size)
        expected = statistics.gram_statistics(
            rows @ rows.T, microbatch_size=microbatch_size
        )
        assert stats.keys() == expected.keys()
        for key, value in expected.items():
            if np.isfinite(value):
                assert abs(stats[key] - value) <= 1e-7 * max(1, abs(value)), (
                    key,
                    stats[key],
                    value,
                )
            else:
                assert stats[key] == value or (
                    np.isnan(stats[key]) and np.isnan(value)
                ), (key, stats[key], value)
        return np.array(list(stats.values()))

    return check


def _check_covariance(model, ref):
    values, vectors = tfb.gradient_covariance_eigenpairs(model, ref.data, k=3)
    rows = ref.rows(1)
    centered = rows - rows.mean(axis=0)
    covariance = centered.T @ centered / len(rows)
    expected = np.linalg.eigvalsh(covariance)[::-1]
    top = max(float(expected[0]), 0.0)
    # Documented floors: rtol 1e-5 of lambda_1, and 1e-13 of the largest
    # squared sample-gradient norm (roundoff of centering).
    floor = max(1e-5 * top, 1e-13 * float(np.max(np.sum(rows**2, axis=1))))
    rank = int(np.sum(expected > floor))
    assert len(values) == min(3, rank) == len(vectors)
    _close(values, expected[: len(values)], 1e-9 * max(top, 1e-300))
    for value, vector in zip(values, vectors):
        u = flat(vector)
        _close(np.linalg.norm(u), 1.0, 1e-6)
        _close(covariance @ u, value * u, 1e-6 * top)
    return values


DEGENERATE_MEASUREMENTS = {
    "hessian_eigenpairs": _check_eigenpairs,
    "operator_smallest_eigenvalue": _check_smallest,
    "hessian_vector_product": _check_matvec,
    "hessian_trace": _check_trace,
    "hessian_spectral_density": _check_density,
    "directional_curvature": _check_curvature,
    "gradient_gram": _check_gram(1),
    "gradient_gram_microbatch_2": _check_gram(2),
    "gradient_statistics": _check_statistics(1),
    "gradient_statistics_microbatch_2": _check_statistics(2),
    "gradient_covariance_eigenpairs": _check_covariance,
}
# (measurement, probe) -> what the ArgumentError's message must say.
REFUSED = {
    ("gradient_gram_microbatch_2", "one_example"): "pass a divisor of 1",
    ("gradient_statistics", "one_example"): "larger probe set",
    ("gradient_statistics_microbatch_2", "one_example"): "divisor of 1",
    ("gradient_covariance_eigenpairs", "one_example"): "larger probe set",
}


def _library_warnings(caplog):
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and "tf_breakeven" in r.pathname
    ]


@pytest.mark.parametrize("probe", PROBES)
@pytest.mark.parametrize("measurement", DEGENERATE_MEASUREMENTS)
def test_every_measurement_on_degenerate_probes(measurement, probe, caplog):
    ref = _reference(probe)
    check = DEGENERATE_MEASUREMENTS[measurement]
    if (measurement, probe) in REFUSED:
        with pytest.raises(ArgumentError, match=REFUSED[measurement, probe]):
            check(_model64(), ref)
        return
    with caplog.at_level(logging.WARNING):
        values = np.asarray(check(_model64(), ref), np.float64)
    # NaN (a degenerate statistic) comes with exactly one log line.
    expected_lines = 1 if np.any(np.isnan(values)) else 0
    assert len(_library_warnings(caplog)) == expected_lines, caplog.text


def test_degenerate_statistics_follow_the_documented_conventions():
    # K = 0 for identical examples: zero covariance, NaN conditioning, an
    # infinite norm ratio, and cosines of exactly 1 (the gradients are
    # parallel). All-zero weights: zero gradients, every ratio NaN.
    same = tfb.gradient_statistics(
        _model64(), _reference("identical_examples").data
    )
    assert same["grad_cov/lambda_1"] == 0 and same["grad_cov/trace"] == 0
    assert np.isnan(same["grad_cov/condition"])
    assert np.isnan(same["grad_cov/trace_over_lambda_1"])
    assert same["grad_cov/norm_ratio_top_k"] == np.inf
    assert same["confusion/cos_min"] == pytest.approx(1.0, abs=1e-12)
    assert same["grad/diversity"] == pytest.approx(1 / 8, rel=1e-12)
    assert same["grad/noise_scale"] == 0
    zero = tfb.gradient_statistics(_model64(), _reference("zero_weights").data)
    assert zero["grad/norm"] == 0 and zero["grad_cov/lambda_1"] == 0
    assert zero["confusion/num_zero_norm"] == 8
    for key in ("confusion/cos_min", "grad/diversity", "grad/noise_scale"):
        assert np.isnan(zero[key]), key


def test_all_zero_weights_match_keras_reduction():
    # Keras' `sum_over_batch_size` divides by the batch size, not by the
    # sum of the weights, so all-zero weights give a loss of 0 (not 0/0).
    model = _model64()
    x, y, weights, _ = _probe_arrays("zero_weights")
    keras_loss = model.compute_loss(
        x=x, y=y, y_pred=model(x), sample_weight=weights
    )
    assert float(keras_loss) == 0.0
    assert np.all(tfb.hessian_eigenvalues(model, (x, y, weights), k=2) == 0)


# --------------------------------------- callbacks in a short fit on them


def _fit_model():
    # SGD at 1e-30 leaves float64 weights bitwise unchanged, so what the
    # callbacks measure during the fit is what direct calls measure after.
    def build_fn():
        model = twin("mlp", seed=5)[1]
        model.compile(optimizer=keras.optimizers.SGD(1e-30), loss=model.loss)
        return model

    return _cached("fit_model", build_fn)


def _fit(model, callbacks):
    x, y = data_for("mlp", n=10, seed=6)
    # 10 examples in batches of 4: the last training batch is ragged too.
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=callbacks)


def _direct_hessian(model, data):
    top = tfb.hessian_eigenpairs(model, data, k=2)
    return top, {
        "hessian/lambda_1": top.eigenvalues[0],
        "hessian/lambda_2": top.eigenvalues[1],
        "hessian/trace": tfb.hessian_trace(model, data, num_samples=30),
        "hessian/lambda_min": tfb.hessian_eigenvalues(
            model, data, k=1, which="smallest"
        )[0],
    }


def _direct_break_even(model, data):
    top = tfb.hessian_eigenpairs(model, data, k=1)
    curvature = tfb.directional_curvature(model, data, top.eigenvectors[0])
    return {
        "hessian/lambda_1": top.eigenvalues[0],
        "breakeven/sharpness_x_lr": 1e-30 * top.eigenvalues[0],
        "breakeven/curvature_variance": float(np.var(curvature.numpy())),
    }


CALLBACKS = {
    "HessianSpectrum": lambda data: tfb.HessianSpectrum(
        data, k=2, trace=True, smallest=True, density=True
    ),
    "BreakEven": lambda data: tfb.BreakEven(
        data, criterion="sgd", batch_size=4, dataset_size=10
    ),
    "GradientCovariance": lambda data: tfb.GradientCovariance(data),
    "GradientConfusion": lambda data: tfb.GradientConfusion(data),
    "GramCallback": lambda data: type(
        "AllGram", (tfb.callbacks.GramCallback,), {"prefixes": ("",)}
    )(data, microbatch_size=2),
}
CALLBACK_REFUSED = {
    ("GradientCovariance", "one_example"): "larger probe set",
    ("GradientConfusion", "one_example"): "larger probe set",
    ("GramCallback", "one_example"): "divisor of 1",
}


def _expected_callback_metrics(name, model, data):
    if name == "HessianSpectrum":
        return _direct_hessian(model, data)[1]
    if name == "BreakEven":
        return _direct_break_even(model, data)
    microbatch_size = 2 if name == "GramCallback" else 1
    return tfb.gradient_statistics(model, data, microbatch_size=microbatch_size)


@pytest.mark.parametrize("probe", PROBES)
@pytest.mark.parametrize("callback", CALLBACKS)
def test_callbacks_in_a_fit_on_degenerate_probes(callback, probe, caplog):
    model = _fit_model()
    data = _reference(probe).data
    instance = CALLBACKS[callback](data)
    if (callback, probe) in CALLBACK_REFUSED:
        with pytest.raises(
            ArgumentError, match=CALLBACK_REFUSED[callback, probe]
        ):
            _fit(model, [instance])
        return
    with caplog.at_level(logging.WARNING):
        _fit(model, [instance])
    (record,) = instance.records
    metrics = {k: v for k, v in record.items() if isinstance(v, float)}
    nan = any(np.isnan(v) for v in metrics.values())
    assert len(_library_warnings(caplog)) == (1 if nan else 0), caplog.text
    expected = _expected_callback_metrics(callback, model, data)
    for key, value in expected.items():
        if key not in metrics:
            continue
        if np.isnan(value):
            assert np.isnan(metrics[key]), key
        else:
            assert metrics[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (
                key
            )
    assert set(metrics) <= set(instance.metric_keys())


# ------------------------- NaN probes: exactly one log line per measurement


def _poisoned_fit_model():
    def build_fn():
        model = build("mlp")
        model.compile(optimizer=keras.optimizers.SGD(1e-30), loss=model.loss)
        return model

    return _cached("poisoned_fit_model", build_fn)


@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("callback", CALLBACKS)
def test_callback_on_a_non_finite_probe_logs_one_line(callback, kind, caplog):
    # Known defect: the callback's NaN line came with the spectrum's own
    # non-finite warning (two lines, or five with trace, smallest and
    # density).
    _, (x, y) = _poisoned(kind, "inputs")
    model = _poisoned_fit_model()
    instance = CALLBACKS[callback]((x, y))
    with caplog.at_level(logging.WARNING):
        model.fit(
            x[1:],
            y[1:],
            batch_size=7,
            epochs=2,
            verbose=0,
            callbacks=[instance],
        )
    assert len(instance.records) == 2
    for record in instance.records:
        assert np.isnan(record[instance.metric_keys()[0]])
    assert len(_library_warnings(caplog)) == 2, caplog.text


@pytest.mark.parametrize("where", ["inputs", "weights"])
@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_gradient_statistics_on_a_non_finite_probe_logs_one_line(
    kind, where, caplog
):
    # Known defect: it returned NaN silently.
    model, data = _poisoned(kind, where)
    with caplog.at_level(logging.WARNING):
        stats = tfb.gradient_statistics(model, data, microbatch_size=2)
    assert np.isnan(stats["grad_cov/lambda_1"])
    assert stats["probe/num_samples"] == 4
    warnings = _library_warnings(caplog)
    assert len(warnings) == 1 and "non-finite" in warnings[0], warnings


# ---------------------------------------- float16 and bfloat16 models
#
# The same weights in a float32 model and in models whose layers compute in
# float16 / bfloat16 (variables in that dtype, or float32 variables under a
# mixed policy). Derivatives are taken in float32 and the loss is computed
# in float32 (Keras' own mixed-precision convention), so the only error is
# the half-precision forward and backward pass. Measured on this mlp (max
# |error| / max |float32 value|): at most 7e-4 for float16; for bfloat16
# at most 4e-3, and 2.2e-2 for the per-example curvature.
HALF_TOLERANCE = {
    "float16": 3e-3,
    "mixed_float16": 3e-3,
    "bfloat16": 5e-2,
    "mixed_bfloat16": 5e-2,
}


def _half_models(policy):
    def build_fn():
        reference = build("mlp")
        model = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(6, activation="tanh", dtype=policy),
                keras.layers.Dense(3, dtype=policy),
            ]
        )
        model.set_weights(
            [
                w.astype(v.dtype)
                for w, v in zip(reference.get_weights(), model.weights)
            ]
        )
        model.compile(loss=keras.losses.SparseCategoricalCrossentropy(True))
        return reference, model

    return _cached(("half", policy), build_fn)


def _half_direction(model):
    rng = np.random.default_rng(3)
    return [
        rng.normal(size=v.shape).astype(v.dtype)
        for v in model.trainable_variables
    ]


HALF_MEASUREMENTS = {
    "hessian_eigenvalues": lambda m, d: tfb.hessian_eigenvalues(m, d, k=2),
    "hessian_trace": lambda m, d: tfb.hessian_trace(m, d, num_samples=60),
    "hessian_vector_product": lambda m, d: flat(
        tfb.hessian_vector_product(m, d, _half_direction(m))
    ),
    "hessian_spectral_density": lambda m, d: tfb.hessian_spectral_density(
        m, d, num_iterations=10, grid=np.linspace(-1.0, 3.0, 9), sigma=0.25
    )[1],
    "directional_curvature": lambda m, d: tfb.directional_curvature(
        m, d, _half_direction(m)
    ).numpy(),
    "gradient_gram": lambda m, d: tfb.gradient_gram(m, d),
    "gradient_statistics": lambda m, d: np.array(
        [
            tfb.gradient_statistics(m, d)[key]
            for key in ("grad_cov/lambda_1", "grad_cov/trace", "grad/norm")
        ]
    ),
    "gradient_covariance_eigenvalues": lambda m, d: (
        tfb.gradient_covariance_eigenpairs(m, d, k=2)[0]
    ),
}


@pytest.mark.parametrize("measurement", HALF_MEASUREMENTS)
@pytest.mark.parametrize("policy", HALF_TOLERANCE)
def test_half_precision_models_match_float32(policy, measurement, caplog):
    reference, model = _half_models(policy)
    x, y = data_for("mlp", n=8, seed=4)
    data = (x.astype("float32"), y)
    fn = HALF_MEASUREMENTS[measurement]
    expected = np.asarray(fn(reference, data), np.float64)
    with caplog.at_level(logging.WARNING):
        got = np.asarray(fn(model, data), np.float64)
    assert got.shape == expected.shape
    assert np.all(np.isfinite(got))
    error = float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))
    print(f"{policy} {measurement}: relative error {error:.2e}")
    assert error < HALF_TOLERANCE[policy]
    assert _library_warnings(caplog) == []


@pytest.mark.parametrize("policy", ["float16", "mixed_bfloat16"])
def test_half_precision_callbacks_in_a_fit(policy):
    reference, _ = _half_models(policy)
    _, model = _half_models(policy)
    x, y = data_for("mlp", n=10, seed=4)
    probe = (x[:8].astype("float32"), y[:8])
    keras.utils.set_random_seed(0)
    fit_model = keras.models.clone_model(model)
    fit_model.set_weights(model.get_weights())
    fit_model.compile(
        optimizer=keras.optimizers.SGD(1e-30),
        loss=keras.losses.SparseCategoricalCrossentropy(True),
    )
    callbacks = [
        tfb.BreakEven(probe, criterion="sgd", batch_size=4, dataset_size=10),
        tfb.GradientCovariance(probe),
    ]
    fit_model.fit(
        x.astype("float32"), y, batch_size=4, verbose=0, callbacks=callbacks
    )
    expected = tfb.hessian_eigenvalues(reference, probe, k=1)[0]
    got = callbacks[0].records[0]["hessian/lambda_1"]
    assert got == pytest.approx(expected, rel=HALF_TOLERANCE[policy])
    assert np.isfinite(callbacks[0].records[0]["breakeven/curvature_variance"])
    expected = tfb.gradient_statistics(reference, probe)["grad_cov/lambda_1"]
    got = callbacks[1].records[0]["grad_cov/lambda_1"]
    assert got == pytest.approx(expected, rel=HALF_TOLERANCE[policy])


# ------------------------------- labels and losses; multi-output models


def _reference_hessian(model64, x, y, per_example):
    """Full float64 Hessian of mean(per_example(y, model(x))), by jacobian."""
    shapes = [v.shape for v in model64.trainable_variables]

    def loss(theta):
        params = split_flat(theta, shapes)
        y_pred = model64.stateless_call(params, [], x, training=True)[0]
        return tf.reduce_mean(per_example(y, y_pred))

    return jacobian_hessian_of(loss, flat(model64.trainable_variables))


def _reference_sample_gradients(model64, x, y, per_example):
    rows = []
    for i in range(len(x)):
        part = tf.nest.map_structure(lambda t, i=i: t[i : i + 1], y)
        params = [tf.constant(v.numpy()) for v in model64.trainable_variables]
        with tf.GradientTape() as tape:
            tape.watch(params)
            y_pred = model64.stateless_call(params, [], x[i : i + 1])[0]
            loss = tf.reduce_mean(per_example(part, y_pred))
        rows.append(flat(tape.gradient(loss, params)))
    return np.stack(rows)


def _binary_model():
    def build_fn():
        keras.utils.set_random_seed(2)
        with floatx("float64"):
            return keras.Sequential(
                [
                    keras.Input((4,)),
                    keras.layers.Dense(6, activation="tanh"),
                    keras.layers.Dense(1),
                ]
            )

    return _cached("binary_model", build_fn)


def _labels(kind, n=8):
    y = data_for("mlp", n=n, seed=5)[1]
    return {
        "int": y,
        "one_hot": np.eye(3)[y],
        "regression": np.random.default_rng(1).normal(size=(n, 3)),
        "binary_int": y % 2,
        "binary_float_column": (y % 2).astype("float64")[:, None],
    }[kind]


_SPARSE = keras.losses.sparse_categorical_crossentropy
_BINARY = keras.losses.binary_crossentropy


# name -> (model, loss= argument, labels, plain per-example reference)
LABEL_CASES = {
    "sparse_categorical_int": (
        _model64,
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        "int",
        lambda y, p: _SPARSE(y, p, from_logits=True),
    ),
    "categorical_one_hot": (
        _model64,
        keras.losses.CategoricalCrossentropy(from_logits=True),
        "one_hot",
        # The same loss values: a check of the one-hot path by the sparse.
        lambda y, p: _SPARSE(tf.argmax(y, -1), p, from_logits=True),
    ),
    "categorical_one_hot_by_name": (
        _model64,
        "categorical_crossentropy",
        "one_hot",
        lambda y, p: keras.losses.categorical_crossentropy(y, p),
    ),
    "mse_regression": (
        _model64,
        "mse",
        "regression",
        lambda y, p: tf.reduce_mean(tf.square(p - y), axis=-1),
    ),
    "binary_int_labels": (
        _binary_model,
        keras.losses.BinaryCrossentropy(from_logits=True),
        "binary_int",
        lambda y, p: _BINARY(
            tf.cast(y, tf.float64)[:, None], p, from_logits=True
        ),
    ),
    "binary_float_column": (
        _binary_model,
        keras.losses.BinaryCrossentropy(from_logits=True),
        "binary_float_column",
        lambda y, p: _BINARY(y, p, from_logits=True),
    ),
}


def _label_probe(case):
    model_fn, loss, labels, per_example = LABEL_CASES[case]
    x = data_for("mlp", n=8, seed=5)[0]
    return model_fn(), loss, (x, _labels(labels)), per_example


@pytest.mark.parametrize("measurement", ["hessian", "gram"])
@pytest.mark.parametrize("case", LABEL_CASES)
def test_each_loss_with_its_labels_is_measured_exactly(case, measurement):
    model, loss, (x, y), per_example = _label_probe(case)
    if measurement == "hessian":
        hessian = _reference_hessian(model, x, y, per_example)
        reference = np.linalg.eigvalsh(hessian)[::-1][:2]
        values = tfb.hessian_eigenvalues(
            model, (x, y), k=2, loss=loss, num_iterations=len(hessian), tol=0.0
        )
    else:
        rows = _reference_sample_gradients(model, x, y, per_example)
        reference = rows @ rows.T
        values = tfb.gradient_gram(model, (x, y), loss=loss)
    scale = max(1.0, float(np.abs(reference).max()))
    _close(values, reference, 1e-9 * scale)


MISMATCHED = {
    "sparse_with_one_hot": (
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        "one_hot",
        8,
        "takes class indices",
    ),
    "sparse_by_name_with_one_hot": (
        "sparse_categorical_crossentropy",
        "one_hot",
        8,
        "takes class indices",
    ),
    "categorical_with_int": (
        keras.losses.CategoricalCrossentropy(from_logits=True),
        "int",
        8,
        "takes one-hot labels",
    ),
    # 3 examples and 3 classes: Keras would broadcast [3, 1] * [3, 3].
    "categorical_with_int_broadcastable": (
        keras.losses.CategoricalCrossentropy(from_logits=True),
        "int",
        3,
        "takes one-hot labels",
    ),
}
MISMATCH_CALLS = {
    "hessian_eigenvalues": lambda m, d, loss: tfb.hessian_eigenvalues(
        m, d, loss=loss
    ),
    "directional_curvature": lambda m, d, loss: tfb.directional_curvature(
        m, d, [v.numpy() for v in m.trainable_variables], loss=loss
    ),
    "gradient_statistics": lambda m, d, loss: tfb.gradient_statistics(
        m, d, loss=loss
    ),
    "HessianSpectrum_in_a_fit": lambda m, d, loss: _fit(
        _fit_model(), [tfb.HessianSpectrum(d, loss=loss)]
    ),
}


@pytest.mark.parametrize("call", MISMATCH_CALLS)
@pytest.mark.parametrize("case", MISMATCHED)
def test_labels_that_do_not_fit_the_loss_are_an_argument_error(case, call):
    loss, labels, n, message = MISMATCHED[case]
    x = data_for("mlp", n=n, seed=5)[0]
    with pytest.raises(ArgumentError, match=message) as error:
        MISMATCH_CALLS[call](_model64(), (x, _labels(labels, n)), loss)
    assert "Pass " in str(error.value) or "pass " in str(error.value)


def _two_output_model(compiled):
    keras.utils.set_random_seed(4)
    with floatx("float64"):
        inputs = keras.Input((4,))
        hidden = keras.layers.Dense(5, activation="tanh")(inputs)
        outputs = {
            "a": keras.layers.Dense(3, name="a")(hidden),
            "b": keras.layers.Dense(1, name="b")(hidden),
        }
        if compiled.startswith("list"):
            model = keras.Model(inputs, [outputs["a"], outputs["b"]])
        else:
            model = keras.Model(inputs, outputs)
    losses = [
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        keras.losses.MeanSquaredError(),
    ]
    if compiled == "list":
        model.compile(optimizer="sgd", loss=losses)
    elif compiled == "dict":
        model.compile(optimizer="sgd", loss=dict(zip("ab", losses)))
    return model


def _two_output_data(n=6):
    x, y = data_for("mlp", n=n, seed=8)
    return x, (y, np.random.default_rng(8).normal(size=(n, 1)))


def _two_output_loss(y_true, y_pred):
    if isinstance(y_pred, dict):
        y_pred = [y_pred["a"], y_pred["b"]]
    first = _SPARSE(y_true[0], y_pred[0], from_logits=True)
    return first + tf.reduce_mean(tf.square(y_pred[1] - y_true[1]), axis=-1)


@pytest.mark.parametrize("compiled", ["list", "dict"])
@pytest.mark.parametrize(
    "call", ["hessian_trace", "gradient_gram", "GradientCovariance_in_a_fit"]
)
def test_multi_output_compiled_losses_are_refused_with_the_fix(compiled, call):
    model = _two_output_model(compiled)
    x, y = _two_output_data()
    if compiled == "dict":
        y = {"a": y[0], "b": y[1]}
    with pytest.raises(
        ArgumentError, match=r"pass\s+`loss=fn\(y_true, y_pred\)`"
    ):
        if call == "hessian_trace":
            tfb.hessian_trace(model, (x, y))
        elif call == "gradient_gram":
            tfb.gradient_gram(model, (x, y))
        else:
            model.fit(
                x,
                y,
                verbose=0,
                callbacks=[tfb.GradientCovariance((x, y), schedule=1)],
            )


@pytest.mark.parametrize("structure", ["list", "dict"])
def test_multi_output_model_with_a_loss_function_is_exact(structure):
    # The fix the refusal names: a per-example loss over all outputs (here
    # the sum Keras minimizes with one loss per output and unit weights).
    model = _two_output_model(structure + "_plain")
    x, y = _two_output_data()
    data = (x, y)
    hessian = _reference_hessian(model, x, y, _two_output_loss)
    rows = _reference_sample_gradients(model, x, y, _two_output_loss)
    scale = max(1.0, float(np.abs(hessian).max()))
    kwargs = {"loss": _two_output_loss}
    values = tfb.hessian_eigenvalues(
        model, data, k=3, num_iterations=len(hessian), tol=0.0, **kwargs
    )
    _close(values, np.linalg.eigvalsh(hessian)[::-1][:3], 1e-9 * scale)
    trace = tfb.hessian_trace(model, data, num_samples=len(hessian), **kwargs)
    _close(trace, np.trace(hessian), 1e-9 * scale * len(hessian))
    gram = tfb.gradient_gram(model, data, **kwargs)
    _close(gram, rows @ rows.T, 1e-10 * max(1.0, np.abs(rows).max() ** 2))
    direction = np.random.default_rng(0).normal(size=len(hessian))
    curvature = tfb.directional_curvature(
        model, data, unflat(direction, model), **kwargs
    ).numpy()
    _close(curvature.mean(), direction @ hessian @ direction, 1e-9 * scale * 10)
    # Keras' own loss of the compiled list model is the same function.
    compiled = _two_output_model("list")
    compiled.set_weights(model.get_weights())
    keras_loss = compiled.compute_loss(x=x, y=list(y), y_pred=compiled(x))
    pred = model(x)
    mine = tf.reduce_mean(_two_output_loss(y, pred))
    assert float(keras_loss) == pytest.approx(float(mine), rel=1e-6)


# ------------------- MirroredStrategy: probes that do not split evenly

_MIRRORED_SCRIPT = """
import json, sys
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, sys.argv[1])
import keras
from conftest import cross_entropy, data_for, twin
import tf_breakeven as tfb

strategy = tf.distribute.MirroredStrategy()
with strategy.scope():
    mirrored = twin("mlp", seed=9)[1]
    mirrored.compile(optimizer=keras.optimizers.SGD(1e-30),
                     loss=cross_entropy())
single = twin("mlp", seed=9)[1]
assert tfb.distribute.replica_strategy(mirrored) is not None
assert tfb.distribute.replica_strategy(single) is None
x, y = data_for("mlp", n=10, seed=9)
w = np.random.default_rng(9).uniform(0.5, 1.5, 10)
ragged = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
weighted = tf.data.Dataset.from_tensor_slices((x, y, w)).batch(4)
direction = [np.ones(v.shape) for v in single.trainable_variables]
CASES = {
    "gram_5_samples": lambda m: tfb.gradient_gram(m, (x[:5], y[:5])),
    "gram_one_sample": lambda m: tfb.gradient_gram(m, (x[:1], y[:1])),
    "gram_5_microbatches": lambda m: tfb.gradient_gram(
        m, (x, y), microbatch_size=2),
    "gram_ragged_weighted_dataset": lambda m: tfb.gradient_gram(m, weighted),
    "gram_chunks_of_3": lambda m: tfb.gradient_gram(
        m, (x, y), memory_budget=3 * 2 * 12 * 51),
    "statistics_7_samples": lambda m: np.array(list(
        tfb.gradient_statistics(m, (x[:7], y[:7])).values())),
    "covariance_7_samples": lambda m: tfb.gradient_covariance_eigenpairs(
        m, (x[:7], y[:7]), k=3)[0],
    "hessian_ragged_dataset": lambda m: tfb.hessian_eigenvalues(
        m, ragged, k=2, num_iterations=51),
    "hessian_trace_weighted_ragged": lambda m: tfb.hessian_trace(
        m, weighted, num_samples=51),
    "curvature_ragged_dataset": lambda m: tfb.directional_curvature(
        m, ragged, direction).numpy(),
}
out = {}
for name, fn in CASES.items():
    a = np.asarray(fn(mirrored), np.float64)
    b = np.asarray(fn(single), np.float64)
    assert a.shape == b.shape, (name, a.shape, b.shape)
    both = np.isnan(a) & np.isnan(b)
    out[name] = float(np.max(np.where(both, 0, np.abs(a - b)))
                      / max(1.0, np.nanmax(np.abs(b))))
callbacks = [tfb.GradientCovariance((x[:5], y[:5])),
             tfb.BreakEven(weighted, criterion="sgd", batch_size=4,
                           dataset_size=8)]
mirrored.fit(x[:8], y[:8], batch_size=4, verbose=0, callbacks=callbacks)
expected = tfb.gradient_statistics(single, (x[:5], y[:5]))
got = callbacks[0].records[0]
out["GradientCovariance_5_samples"] = max(
    abs(got[k] - v) / max(1.0, abs(v)) for k, v in expected.items()
    if k in got and np.isfinite(v))
top = tfb.hessian_eigenpairs(single, weighted, k=1)
variance = np.var(tfb.directional_curvature(
    single, weighted, top.eigenvectors[0]).numpy())
got = callbacks[1].records[0]
out["BreakEven_ragged_weighted"] = max(
    abs(got["hessian/lambda_1"] - top.eigenvalues[0]) / top.eigenvalues[0],
    abs(got["breakeven/curvature_variance"] - variance) / variance)
shapes = []
def double(a):
    shapes.append(tuple(a.shape))
    return 2.0 * a
rows = tf.reshape(tf.range(10.0), [5, 2])
gathered = tfb.distribute.concat_over_replicas(strategy, double, (rows,))
out["concat_deals_3_and_2_rows"] = float(
    sorted(shapes) != [(2, 2), (3, 2)]
    or not np.array_equal(gathered.numpy(), 2.0 * rows.numpy()))
print("RESULT " + json.dumps(out))
"""
MIRRORED_CASES = (
    "gram_5_samples",
    "gram_one_sample",
    "gram_5_microbatches",
    "gram_ragged_weighted_dataset",
    "gram_chunks_of_3",
    "statistics_7_samples",
    "covariance_7_samples",
    "hessian_ragged_dataset",
    "hessian_trace_weighted_ragged",
    "curvature_ragged_dataset",
    "GradientCovariance_5_samples",
    "BreakEven_ragged_weighted",
    "concat_deals_3_and_2_rows",
)


@pytest.fixture(scope="module")
def mirrored_errors(tmp_path_factory):
    import json
    import os
    import subprocess
    import sys

    script = tmp_path_factory.mktemp("mirrored") / "uneven.py"
    script.write_text(_MIRRORED_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), os.path.dirname(__file__)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = [
        line[len("RESULT ") :]
        for line in result.stdout.splitlines()
        if line.startswith("RESULT ")
    ]
    assert lines, result.stderr[-3000:]
    return json.loads(lines[-1])


@pytest.mark.parametrize("case", MIRRORED_CASES)
def test_mirrored_uneven_probes_equal_one_device(mirrored_errors, case):
    # Sample gradients are dealt out in shares that differ by at most one
    # (5 samples: 3 and 2) and gathered; batches beyond a multiple of the
    # replicas run on one device. The numbers are those of one device.
    assert mirrored_errors[case] < 1e-10, mirrored_errors


# ------------------ the tracked train step on a batch smaller than M


@pytest.mark.parametrize("microbatch_size", [2, 3, 4])
def test_tracked_fit_with_a_last_batch_smaller_than_m(microbatch_size):
    # 10 examples in batches of 4: the last has 2 < M examples.
    model = tfb.track(
        build("mlp", compile_loss=False),
        {"gram": True, "microbatch_size": microbatch_size},
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = data_for("mlp", n=10, seed=7)
    x = x.astype("float32")
    plain = build("mlp", compile_loss=False)
    plain.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    batch_logs = []
    logger = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: batch_logs.append(dict(logs))
    )
    history = model.fit(
        x, y, batch_size=4, verbose=0, shuffle=False, callbacks=[logger]
    )
    plain.fit(x, y, batch_size=4, verbose=0, shuffle=False)
    for a, b in zip(plain.weights, model.weights):  # training is unchanged
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    assert np.isfinite(history.history["loss"][-1])
    key = "batch/grad_cov/lambda_1"
    per_batch = [logs[key] for logs in batch_logs]
    # Batches of 4 hold 4 // M micro-batches, the last (2 examples) 2 // M.
    for size, value in zip((4, 4, 2), per_batch):
        if size // microbatch_size >= 2:
            assert np.isfinite(value)
        else:
            assert np.isnan(value)
