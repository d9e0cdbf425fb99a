"""Sample gradients, their Gram matrix and statistics vs loop references."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import (
    assert_unchanged,
    build,
    cast_inputs,
    data_for,
    flat,
    plain_gradient,
    rel_err,
    snapshot,
)

import tf_breakeven as tfb


def _take(x, start, stop):
    return tf.nest.map_structure(lambda a: a[start:stop], x)


def loop_gradients(model, x, y, microbatch_size=1, training=True, w=None):
    """Gradients of consecutive micro-batches, one Python call each."""
    params = [v.value for v in model.trainable_variables]
    n = len(y) // microbatch_size
    rows = []
    for i in range(n):
        lo, hi = i * microbatch_size, (i + 1) * microbatch_size
        rows.append(
            plain_gradient(
                model,
                params,
                _take(x, lo, hi),
                y[lo:hi],
                training,
                None if w is None else w[lo:hi],
            )
        )
    return np.stack(rows)


@pytest.mark.parametrize(
    "name",
    ["mlp", "mlp_l2", "cnn", "embedding", "lstm", "lstm_unrolled", "bert"],
)
def test_per_example_gradients_equal_a_loop(name):
    model = build(name)
    x, y = data_for(name, n=6)
    x = cast_inputs(x, "float32")
    grads = tfb.per_example_gradients(model, (x, y), training=False)
    assert [tuple(g.shape) for g in grads] == [
        (6, *v.shape) for v in model.trainable_variables
    ]
    got = np.concatenate([g.numpy().reshape(6, -1) for g in grads], axis=1)
    reference = loop_gradients(model, x, y, training=False)
    assert rel_err(got, reference) < 1e-5


def _explicit_statistics(rows, microbatch_size):
    """Every statistic from the P-dimensional gradients, float64 numpy."""
    n = rows.shape[0]
    mean = rows.mean(axis=0)
    centered = rows - mean
    out = {}
    for prefix, vectors in (
        ("grad_cov", centered),
        ("grad_cov_uncentered", rows),
    ):
        cov = vectors.T @ vectors / n
        eig = np.clip(np.linalg.eigvalsh(cov)[::-1], 0, None)
        lam1 = eig[0]
        nonzero = eig[eig > 1e-5 * lam1]
        out[f"{prefix}/lambda_1"] = lam1
        out[f"{prefix}/trace"] = np.trace(cov)
        out[f"{prefix}/frobenius"] = np.linalg.norm(cov)
        out[f"{prefix}/trace_over_lambda_1"] = np.trace(cov) / lam1
        out[f"{prefix}/condition"] = nonzero[-1] / lam1
    gram = rows @ rows.T
    off = gram[~np.eye(n, dtype=bool)]
    norms = np.linalg.norm(rows, axis=1)
    cosines = [
        rows[i] @ rows[j] / (norms[i] * norms[j])
        for i in range(n)
        for j in range(i + 1, n)
    ]
    out["confusion/eta"] = -off.min()
    out["confusion/cos_min"] = min(cosines)
    out["confusion/cos_mean"] = np.mean(cosines)
    out["grad/norm"] = np.linalg.norm(mean)
    out["grad/diversity"] = np.sum(norms**2) / np.sum(rows.sum(0) ** 2)
    out["grad/noise_scale"] = (
        microbatch_size * np.trace(centered.T @ centered / n) / np.sum(mean**2)
    )
    return out


@pytest.mark.parametrize("microbatch_size", [1, 4], ids=["M1", "M4"])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_statistics_equal_float64_numpy_from_loop_gradients(
    name, microbatch_size
):
    model = build(name)
    x, y = data_for(name, n=24)
    x = cast_inputs(x, "float32")
    stats = tfb.gradient_statistics(
        model, (x, y), microbatch_size=microbatch_size, training=False
    )
    rows = loop_gradients(model, x, y, microbatch_size, training=False)
    expected = _explicit_statistics(rows, microbatch_size)
    for key, value in expected.items():
        np.testing.assert_allclose(stats[key], value, rtol=1e-4, err_msg=key)
    assert stats["probe/microbatch_size"] == microbatch_size
    assert stats["probe/num_samples"] == 24 // microbatch_size


def test_chunked_gram_equals_unchunked_and_honours_sample_weight(rng):
    model = build("cnn")
    x, y = data_for("cnn", n=10)
    x = x.astype("float32")
    w = rng.uniform(0.2, 3.0, size=10).astype("float32")
    dim = flat(model.trainable_variables).size
    whole = tfb.gradient_gram(model, (x, y, w), training=False)
    chunked = tfb.gradient_gram(
        model, (x, y, w), training=False, memory_budget=3 * 24 * dim
    )
    # Same numbers up to float32 roundoff (the last chunk has another shape,
    # so its convolutions may be batched differently).
    assert rel_err(chunked, whole) < 1e-6
    rows = loop_gradients(model, x, y, training=False, w=w)
    assert rel_err(whole, rows @ rows.T) < 1e-5


def test_float64_sample_weights_are_not_rounded_to_float32(rng):
    """A float64 model's Gram with float64 weights is float64-exact.

    Joining the probe batches once cast the weights to float32, a 3e-8
    relative error in every sample gradient (caught by
    tests/test_references.py). Reference: a loop of plain float64
    gradients; 1e-12 leaves rounding room only.
    """
    model = build("mlp", "float64")
    x, y = data_for("mlp", n=6)
    w = rng.uniform(0.3, 2.0, size=6)  # not float32-representable
    for data in (
        (x, y, w),
        tf.data.Dataset.from_tensor_slices((x, y, w)).batch(4),
    ):
        gram = tfb.gradient_gram(model, data)
        rows = loop_gradients(model, x, y, w=w)
        assert rel_err(gram, rows @ rows.T) < 1e-12


def test_dataset_microbatches_span_batches_in_data_order():
    model = build("mlp")
    x, y = data_for("mlp", n=12)
    x = x.astype("float32")
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)
    gram = tfb.gradient_gram(model, dataset, microbatch_size=3)
    rows = loop_gradients(model, x, y, 3)
    assert rel_err(gram, rows @ rows.T) < 1e-5


def test_batch_norm_microbatches_use_their_own_statistics():
    model = build("cnn_bn")
    x, y = data_for("cnn_bn", n=8)
    x = x.astype("float32")
    gram = tfb.gradient_gram(model, (x, y), microbatch_size=4, training=True)
    rows = loop_gradients(model, x, y, 4, training=True)
    assert rel_err(gram, rows @ rows.T) < 1e-5


def test_probes_leave_the_model_bitwise_unchanged():
    model = build("bn_dropout")
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = data_for("bn_dropout", n=8)
    x = x.astype("float32")
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    before = snapshot(model)
    first = tfb.gradient_gram(model, (x, y), microbatch_size=2)
    tfb.per_example_gradients(model, (x, y), training=False)
    stats = tfb.gradient_statistics(model, (x, y), microbatch_size=4)
    op = tfb.HessianOperator(model, (x, y))
    pair = op.eigenpairs(k=2)
    op.trace(num_samples=6)
    op.spectral_density(num_iterations=5)
    op.directional_curvature(pair.eigenvectors[0])
    assert_unchanged(before, snapshot(model))
    # The same probe twice gives bitwise-equal numbers.
    np.testing.assert_array_equal(
        first, tfb.gradient_gram(model, (x, y), microbatch_size=2)
    )
    again = tfb.gradient_statistics(model, (x, y), microbatch_size=4)
    assert stats.keys() == again.keys()
    for key in stats:
        assert stats[key] == again[key] or (
            np.isnan(stats[key]) and np.isnan(again[key])
        ), key
    np.testing.assert_array_equal(
        pair.eigenvalues, op.eigenpairs(k=2).eigenvalues
    )


@pytest.mark.parametrize("method", ["materialize", "ghost"])
def test_gram_traces_once_per_chunk_shape(method):
    model = build("mlp")
    x, y = data_for("mlp", n=8)
    x = x.astype("float32")
    for _ in range(3):
        tfb.gradient_gram(model, (x, y), method=method)
    if method == "materialize":
        kernel = tfb.gradients.gradient_kernel(model)
        functions = [kernel.flat_sample_gradients]
    else:
        kernel = tfb.gradients.ghost_kernel(model)
        functions = [kernel.signals, kernel.parts]
    for function in functions:
        assert function.experimental_get_tracing_count() == 1


@pytest.mark.parametrize(
    "name,method",
    [
        ("cnn", "materialize"),
        ("cnn", "ghost"),
        ("embedding", "ghost"),
        ("lstm_unrolled", "ghost"),
    ],
)
def test_jit_compiled_gram_matches_eager(name, method):
    # Under XLA an embedding takes the dense same-token product (no
    # tf.unique): checked against the eager materialized engine.
    model = build(name)
    x, y = data_for(name, n=6)
    plain = tfb.gradient_gram(model, (x, y), method="materialize")
    jitted = tfb.gradient_gram(model, (x, y), method=method, jit_compile=True)
    assert rel_err(jitted, plain) < 1e-5


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"microbatch_size": 0}, "microbatch_size"),
        ({"microbatch_size": 3}, "does not divide"),
        ({"memory_budget": 10, "method": "materialize"}, "memory_budget"),
    ],
    ids=["zero_microbatch", "not_dividing", "tiny_budget"],
)
def test_bad_gram_arguments_raise(kwargs, match):
    model = build("mlp")
    x, y = data_for("mlp", n=8)
    with pytest.raises(ValueError, match=match):
        tfb.gradient_gram(model, (x.astype("float32"), y), **kwargs)


def test_batch_norm_single_examples_in_training_mode_raise():
    model = build("cnn_bn")
    x, y = data_for("cnn_bn", n=4)
    with pytest.raises(ValueError, match="training=False"):
        tfb.gradient_gram(model, (x.astype("float32"), y), training=True)
    with pytest.raises(ValueError, match="microbatch_size >= 2"):
        tfb.per_example_gradients(model, (x.astype("float32"), y))


@pytest.mark.parametrize("centered", [True, False], ids=["K", "K_uncentered"])
@pytest.mark.parametrize("budget", [None, "chunked"])
def test_covariance_eigenvectors_in_parameter_space(centered, budget):
    model = build("mlp")
    x, y = data_for("mlp", n=16)
    x = x.astype("float32")
    dim = flat(model.trainable_variables).size
    kwargs = {} if budget is None else {"memory_budget": 3 * 24 * dim}
    values, vectors = tfb.gradient_covariance_eigenpairs(
        model, (x, y), k=3, microbatch_size=2, centered=centered, **kwargs
    )
    rows = loop_gradients(model, x, y, 2)
    vectors_ = rows - rows.mean(0) if centered else rows
    cov = vectors_.T @ vectors_ / len(rows)
    expected = np.linalg.eigvalsh(cov)[::-1][:3]
    np.testing.assert_allclose(values, expected, rtol=1e-5)
    u = np.stack([flat(v) for v in vectors])
    np.testing.assert_allclose(u @ u.T, np.eye(3), atol=1e-5)
    for j in range(3):
        residual = cov @ u[j] - values[j] * u[j]
        assert np.linalg.norm(residual) < 1e-4 * values[0]
