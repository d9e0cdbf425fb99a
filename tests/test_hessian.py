"""HessianOperator and the curvature API against exact references."""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import (
    build,
    cast_inputs,
    data_for,
    fd_hvp,
    flat,
    jacobian_hessian,
    rel_err,
    twin,
    unflat,
)

import tf_breakeven as tfb
from tf_breakeven import functional


def _random_vector(model, rng):
    return rng.normal(size=flat(model.trainable_variables).size)


# Models without normalization layers: the jacobian Hessian is exact.
@pytest.mark.parametrize("name", ["mlp", "mlp_l2", "cnn", "embedding"])
def test_hvp_equals_full_hessian_times_vector(name, rng):
    model = build(name, "float64")
    x, y = data_for(name)
    x = cast_inputs(x, "float64")
    hessian = jacobian_hessian(model, x, y, training=True)
    v = _random_vector(model, rng)
    hv = flat(tfb.hessian_vector_product(model, (x, y), unflat(v, model)))
    assert rel_err(hv, hessian @ v) < 1e-10


# Exactness where stock second-order autodiff is wrong or fragile: the
# reference is float64 finite differences of a float64 copy.
@pytest.mark.parametrize(
    "name,training",
    [
        ("cnn_bn", True),
        ("cnn_bn", False),
        ("layer_norm", True),
        ("group_norm", True),
        ("dropout", True),
        ("embedding", True),
        ("lstm", True),
        ("lstm_unrolled", True),
        ("bert", False),
    ],
    ids=lambda p: str(p),
)
def test_hvp_matches_float64_finite_differences(name, training, rng):
    model32, model64 = twin(name)
    x, y = data_for(name)
    v = _random_vector(model32, rng)
    reference = fd_hvp(model64, cast_inputs(x, "float64"), y, v, training)
    hv32 = flat(
        tfb.hessian_vector_product(
            model32,
            (cast_inputs(x, "float32"), y),
            unflat(v.astype(np.float32), model32),
            training=training,
        )
    )
    hv64 = flat(
        tfb.hessian_vector_product(
            model64,
            (cast_inputs(x, "float64"), y),
            unflat(v, model64),
            training=training,
        )
    )
    assert rel_err(hv64, reference) < 1e-6
    if name != "dropout":
        # Dropout masks drawn in float32 differ from float64 ones, so the
        # float32 twin is a different function there.
        assert rel_err(hv32, reference) < 1e-4


def test_stock_moments_are_still_wrong_so_the_workaround_is_needed(
    monkeypatch, rng
):
    """Canary for docs/pitfalls.md#P1: fails once TF gets moments right.

    If this fails after an upgrade, `functional.exact_moments` may be
    removable; `test_hvp_matches_float64_finite_differences` keeps checking
    that the Hessian stays exact either way.
    """
    _, model64 = twin("cnn_bn", seed=3)
    x, y = data_for("cnn_bn")
    x = cast_inputs(x, "float64")
    v = _random_vector(model64, rng)
    reference = fd_hvp(model64, x, y, v, training=True)
    monkeypatch.setattr(functional, "exact_moments", contextlib.nullcontext)
    stock = flat(
        tfb.hessian_vector_product(
            model64, (x, y), unflat(v, model64), training=True
        )
    )
    assert rel_err(stock, reference) > 1e-3


def test_method_auto_picks_double_backward_for_every_model():
    # The faster to trace and run on every zoo model (BENCHMARKS.md), and
    # the one that works through a rolled LSTM.
    for name in ("lstm", "lstm_unrolled", "mlp", "cnn_bn"):
        op = tfb.HessianOperator(build(name), data_for(name))
        assert op.method == "backward_over_backward"


def test_dataset_hessian_is_the_mean_over_all_examples(rng):
    model = build("mlp", "float64")
    x, y = data_for("mlp", n=10)
    w = rng.uniform(0.5, 2.0, size=10)
    hessian = jacobian_hessian(model, x, y, training=True, sample_weight=w)
    dataset = tf.data.Dataset.from_tensor_slices((x, y, w)).batch(4)
    v = _random_vector(model, rng)
    hv = flat(tfb.hessian_vector_product(model, dataset, unflat(v, model)))
    assert rel_err(hv, hessian @ v) < 1e-10


def test_mean_loss_equals_keras_evaluate(rng):
    model = build("mlp_l2")
    x, y = data_for("mlp_l2", n=8)
    w = rng.uniform(0.5, 2.0, size=8).astype("float32")
    fn = functional.ModelFunction(model, training=False)
    losses = fn.per_example_losses(
        fn.read_parameters(), fn.read_state(), x.astype("float32"), y, w
    )
    expected = model.evaluate(
        x.astype("float32"), y, sample_weight=w, verbose=0, batch_size=8
    )
    np.testing.assert_allclose(
        float(tf.reduce_mean(losses)), expected, rtol=1e-6
    )


def _spectrum_case():
    model32, model64 = twin("mlp", seed=5)
    x, y = data_for("mlp", n=16, seed=5)
    hessian = jacobian_hessian(model64, x, y, training=True)
    return model32, model64, (x, y), np.linalg.eigh(hessian)


def test_full_lanczos_recovers_the_whole_spectrum():
    _, model64, data, (eigenvalues, _) = _spectrum_case()
    dim = eigenvalues.size
    top = tfb.hessian_eigenvalues(model64, data, k=dim, num_iterations=dim)
    scale = np.abs(eigenvalues).max()
    np.testing.assert_allclose(top, eigenvalues[::-1], atol=1e-8 * scale)


def test_top_and_bottom_eigenpairs_match_eigh_in_float32():
    model32, _, (x, y), (eigenvalues, eigenvectors) = _spectrum_case()
    data = (x.astype("float32"), y)
    top = tfb.hessian_eigenpairs(model32, data, k=2)
    np.testing.assert_allclose(
        top.eigenvalues, eigenvalues[::-1][:2], rtol=1e-4
    )
    for j in range(2):
        overlap = abs(flat(top.eigenvectors[j]) @ eigenvectors[:, -1 - j])
        assert overlap > 1 - 1e-4
    bottom = tfb.hessian_eigenvalues(model32, data, k=2, which="smallest")
    assert bottom[0] <= bottom[1]
    np.testing.assert_allclose(
        bottom, eigenvalues[:2], atol=1e-4 * np.abs(eigenvalues).max()
    )


def test_default_call_stops_on_the_residual_bound_and_reports_it():
    _, model64, data, (eigenvalues, _) = _spectrum_case()
    hessian = jacobian_hessian(model64, *data, training=True)
    for tol in (1e-2, 1e-5):
        pairs = tfb.hessian_eigenpairs(model64, data, k=2, tol=tol)
        values, vectors = pairs  # still unpacks as before
        assert pairs.tol == tol
        assert np.all(pairs.converged)
        assert 2 <= pairs.num_iterations < eigenvalues.size
        true_residuals = [
            np.linalg.norm(hessian @ flat(u) - lam * flat(u))
            for lam, u in zip(values, vectors)
        ]
        np.testing.assert_allclose(
            pairs.residuals,
            true_residuals,
            rtol=1e-5,
            atol=1e-10 * np.abs(eigenvalues).max(),  # float64 roundoff
        )
        assert np.all(pairs.residuals <= tol * np.abs(values))
        # An eigenvalue of H lies within each residual: here the top two.
        assert np.all(
            np.abs(values - eigenvalues[::-1][:2]) <= pairs.residuals + 1e-12
        )
    full = tfb.hessian_eigenpairs(model64, data, k=2, tol=0.0)
    assert full.num_iterations == min(30, eigenvalues.size)


def _count_eigsh_traces(monkeypatch):
    """A list that gains an entry each time `linalg.eigsh` is traced."""
    traces = []
    eigsh = tfb.linalg.eigsh

    def counting(*args, **kwargs):
        traces.append(1)  # Python runs only while tracing
        return eigsh(*args, **kwargs)

    monkeypatch.setattr(tfb.linalg, "eigsh", counting)
    return traces


def test_solvers_are_shared_by_operators_on_data_of_the_same_shape(
    monkeypatch,
):
    _, model64, _, _ = _spectrum_case()
    traces = _count_eigsh_traces(monkeypatch)
    tops = []
    for seed in (11, 12):
        x, y = data_for("mlp", n=16, seed=seed)
        tops.append(tfb.hessian_eigenvalues(model64, (x, y), tol=1e-8)[0])
        exact = np.linalg.eigvalsh(jacobian_hessian(model64, x, y, True))
        # Each call measures its own data, not the first call's.
        assert tops[-1] == pytest.approx(exact[-1], rel=1e-7)
    assert len(traces) == 1
    assert abs(tops[0] - tops[1]) > 1e-3 * abs(tops[0])
    tfb.hessian_eigenvalues(model64, data_for("mlp", n=8, seed=13), tol=1e-8)
    assert len(traces) == 2  # a new batch shape traces once more


def test_warm_start_and_seeds_are_deterministic():
    model = build("mlp")
    data = data_for("mlp")
    op = tfb.HessianOperator(model, data)
    first = op.eigenpairs(k=1, seed=3)
    again = op.eigenpairs(k=1, seed=3)
    np.testing.assert_array_equal(first.eigenvalues, again.eigenvalues)
    warm = op.eigenpairs(
        k=1, num_iterations=2, start_vector=first.eigenvectors[0]
    )
    np.testing.assert_allclose(warm.eigenvalues, first.eigenvalues, rtol=1e-4)


def test_trace_estimators():
    _, model64, data, (eigenvalues, _) = _spectrum_case()
    hessian = jacobian_hessian(model64, *data, training=True)
    dim = hessian.shape[0]
    exact = float(np.trace(hessian))
    # Hutch++ with 3 * dim probes spans the space: exact up to roundoff.
    full = tfb.hessian_trace(model64, data, num_samples=3 * dim)
    assert abs(full - exact) < 1e-8 * np.abs(eigenvalues).sum()
    # Hutchinson: unbiased, variance 2 (||H||_F^2 - sum H_ii^2) / m.
    m = 40
    sd = np.sqrt(2 * (np.sum(hessian**2) - np.sum(np.diag(hessian) ** 2)) / m)
    estimate = tfb.hessian_trace(
        model64, data, num_samples=m, method="hutchinson", seed=1
    )
    assert abs(estimate - exact) < 4 * sd


def test_spectral_density_integrates_to_one_and_has_the_right_mean():
    _, model64, data, (eigenvalues, _) = _spectrum_case()
    dim = eigenvalues.size
    grid, density = tfb.hessian_spectral_density(
        model64, data, num_runs=4, num_iterations=dim
    )
    assert abs(np.trapezoid(density, grid) - 1) < 1e-3
    mean = np.trapezoid(grid * density, grid)
    # With num_iterations == dim every run's quadrature is exact for
    # v^T H v with v uniform on the sphere: mean tr/d, sd sqrt(2 var / d).
    sd = np.sqrt(2 * np.var(eigenvalues) / (dim + 2) / 4)
    assert abs(mean - eigenvalues.mean()) < 4 * sd + 1e-6


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "layer_norm", "dropout"])
def test_directional_curvature_per_example(name, rng):
    """e^T H_i e against second differences of each example's loss.

    The losses come from a plain float64 `stateless_call` and Keras' loss
    function, not from tf_breakeven (forward values are exact through
    normalization layers); hand-written models and exact H_i are in
    tests/test_references.py.
    """
    model32, model64 = twin(name, seed=2)
    x, y = data_for(name, n=6)
    x64 = cast_inputs(x, "float64")
    e = _random_vector(model64, rng)
    e /= np.linalg.norm(e)
    base = flat(model64.trainable_variables)
    state = [v.value for v in model64.non_trainable_variables]

    def losses(theta):
        logits = model64.stateless_call(
            unflat(theta, model64), state, x64, training=True
        )[0]
        return keras.losses.sparse_categorical_crossentropy(
            y, logits, from_logits=True
        ).numpy()

    eps = 1e-4
    reference = (
        losses(base + eps * e) - 2 * losses(base) + losses(base - eps * e)
    ) / eps**2
    curvature = tfb.directional_curvature(model64, (x64, y), unflat(e, model64))
    np.testing.assert_allclose(
        curvature.numpy(), reference, atol=1e-5 * np.abs(reference).max()
    )
    if name == "dropout":
        return  # float32 masks differ from float64 ones (see above)
    curvature32 = tfb.directional_curvature(
        model32,
        (cast_inputs(x, "float32"), y),
        unflat(e.astype(np.float32), model32),
    )
    np.testing.assert_allclose(
        curvature32.numpy(), reference, atol=1e-4 * np.abs(reference).max()
    )


def test_operator_traces_once_per_batch_shape(rng):
    model = build("mlp")
    op = tfb.HessianOperator(model, data_for("mlp"))
    for _ in range(3):
        op.matvec(unflat(_random_vector(model, rng).astype("float32"), model))
    op.eigenpairs(k=1)
    op.eigenpairs(k=1)
    assert op.kernel.hvp.experimental_get_tracing_count() == 1


def test_jit_compiled_operator_matches_eager(rng):
    model = build("mlp")
    data = data_for("mlp")
    v = unflat(_random_vector(model, rng).astype("float32"), model)
    plain = tfb.HessianOperator(model, data)
    jitted = tfb.HessianOperator(model, data, jit_compile=True)
    np.testing.assert_allclose(
        flat(jitted.matvec(v)), flat(plain.matvec(v)), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        jitted.eigenpairs(k=2).eigenvalues,
        plain.eigenpairs(k=2).eigenvalues,
        rtol=1e-4,
    )


def _empty_dataset():
    x, y = data_for("mlp")
    return tf.data.Dataset.from_tensor_slices((x, y)).take(0).batch(2)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m, d: tfb.hessian_eigenvalues(m, d, k=10_000), "k=10000"),
        (lambda m, d: tfb.hessian_eigenvalues(m, d, k=0), "k"),
        (lambda m, d: tfb.hessian_eigenvalues(m, d, which="middle"), "which"),
        (lambda m, d: tfb.hessian_eigenvalues(m, _empty_dataset()), "empty"),
        (
            lambda m, d: tfb.hessian_eigenvalues(
                m, tf.data.Dataset.from_tensor_slices(d).batch(2).repeat()
            ),
            "infinite",
        ),
        (
            lambda m, d: tfb.hessian_eigenvalues(m, (d[0][:, :3], d[1])),
            "does not fit",
        ),
        (lambda m, d: tfb.hessian_eigenvalues(m, (d[0], d[1][:3])), "examples"),
        (
            lambda m, d: tfb.hessian_vector_product(m, d, [tf.ones([4, 6])]),
            "trainable variables",
        ),
        (
            lambda m, d: tfb.hessian_vector_product(
                m, d, [tf.ones(v.shape[::-1]) for v in m.trainable_variables]
            ),
            "shape",
        ),
        (
            lambda m, d: tfb.hessian_vector_product(m, d, tf.ones([51])),
            "list of tensors",
        ),
        (lambda m, d: tfb.hessian_trace(m, d, method="exact"), "hutch"),
        (lambda m, d: tfb.HessianOperator(m, d, method="newton"), "method"),
    ],
    ids=[
        "k_too_large",
        "k_zero",
        "bad_which",
        "empty_dataset",
        "infinite_dataset",
        "input_shape",
        "label_count",
        "vector_structure",
        "vector_shapes",
        "flat_vector",
        "trace_method",
        "hvp_method",
    ],
)
def test_bad_input_raises_value_error_with_the_fix(call, match):
    model = build("mlp")
    x, y = data_for("mlp")
    with pytest.raises(ValueError, match=match):
        call(model, (x.astype("float32"), y))


def test_uncompiled_model_without_loss_raises():
    model = build("mlp", compile_loss=False)
    with pytest.raises(ValueError, match="compile it"):
        tfb.HessianOperator(model, data_for("mlp"))


def test_every_layer_block_shares_one_compiled_solver(monkeypatch):
    """`blocks="layer"` solves each block as the full operator restricted
    to its coordinates: one solver trace for all blocks, not one each."""
    model64 = build("mlp_l2", "float64")
    x, y = data_for("mlp_l2", n=12)
    traces = _count_eigsh_traces(monkeypatch)
    got = tfb.hessian_eigenvalues(model64, (x, y), blocks="layer", tol=0.0)
    hessian = jacobian_hessian(model64, x, y, True)
    start = 0
    for layer in model64.layers:
        size = sum(int(np.prod(v.shape)) for v in layer.trainable_variables)
        block = hessian[start : start + size, start : start + size]
        want = np.linalg.eigvalsh(block)[-1]
        assert got[layer.name][0] == pytest.approx(want, rel=1e-9)
        start += size
    assert len(got) == 2 and len(traces) == 1
