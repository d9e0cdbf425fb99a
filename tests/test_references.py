"""The curvature and gradient API against hand-written references (issue 10).

Every reference here is written out independently of tf_breakeven and of
Keras' losses: the forward pass of a tiny model is re-implemented in numpy
or in plain float64 TensorFlow ops, with its loss written by hand, and the
Hessian is `tape.jacobian` of the gradient of that hand-written loss (exact
in float64; the hand-written BatchNormalization takes the variance as a
plain `mean((a - mean)^2)`, so the second-order term that `tf.nn.moments`
drops, docs/pitfalls.md#P1, is in it), or an explicit formula. The hand-
written forward passes are first checked against the Keras model's own
outputs, so a reference cannot silently describe another function.

The loss is README's "Conventions": `mean_i(w_i * l_i)` plus the
regularization losses, over a dataset the mean over all examples with each
batch run through the model as its own batch. Tolerances: float64 results
against float64 references are held to 1e-10 relative (both are exact up
to rounding, ~1e-14); float32 results to 1e-4.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import (
    build,
    data_for,
    fd_hvp,
    flat,
    floatx,
    jacobian_hessian,
    jacobian_hessian_of,
    second_derivative_along,
    split_flat,
    unflat,
)

import tf_breakeven as tfb

# ------------------------------------------------------------------ helpers


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def gradient_of(loss_fn, theta0):
    theta = tf.constant(theta0, tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(theta)
        loss = loss_fn(theta)
    return tape.gradient(loss, theta).numpy()


def library_hvp(model, data, v, **kwargs):
    return flat(
        tfb.hessian_vector_product(model, data, unflat(v, model), **kwargs)
    )


def check_spectrum_and_trace(model, data, hessian, **kwargs):
    """Top-2 and bottom eigenvalue by full Lanczos and the exact trace
    (num_samples >= dim) against eigh / trace of the reference Hessian."""
    dim = hessian.shape[0]
    eigenvalues = np.linalg.eigvalsh(hessian)
    scale = np.abs(eigenvalues).max()
    top = tfb.hessian_eigenvalues(
        model, data, k=2, num_iterations=dim, tol=0.0, **kwargs
    )
    np.testing.assert_allclose(top, eigenvalues[::-1][:2], atol=1e-9 * scale)
    bottom = tfb.hessian_eigenvalues(
        model,
        data,
        k=1,
        which="smallest",
        num_iterations=dim,
        tol=0.0,
        **kwargs,
    )
    np.testing.assert_allclose(bottom, eigenvalues[:1], atol=1e-9 * scale)
    trace = tfb.hessian_trace(model, data, num_samples=dim, **kwargs)
    assert abs(trace - np.trace(hessian)) < 1e-9 * np.abs(eigenvalues).sum()


def hand_statistics(rows):
    """A few gradient statistics of sample gradients [n, P], by hand."""
    n = rows.shape[0]
    mean = rows.mean(axis=0)
    centered = rows - mean
    cov = centered.T @ centered / n
    norms = np.linalg.norm(rows, axis=1)
    cosines = (rows @ rows.T) / np.outer(norms, norms)
    return {
        "grad_cov/lambda_1": np.linalg.eigvalsh(cov)[-1],
        "grad_cov/trace": np.trace(cov),
        "grad/norm": np.linalg.norm(mean),
        "confusion/cos_min": cosines[np.triu_indices(n, 1)].min(),
        "confusion/eta": -(rows @ rows.T)[~np.eye(n, dtype=bool)].min(),
    }


# ------------------------------------- SLQ through hessian_spectral_density


def _gaussian(t, centers, sigma):
    z = (np.asarray(t)[:, None] - np.asarray(centers)[None, :]) / sigma
    return np.exp(-0.5 * z**2) / (sigma * np.sqrt(2 * np.pi))


def _interval_interpolation_error(grid, interval, degree, sigma):
    """max over [lo, hi] (4001 points) of |N(t; s, sigma) - p_t(s)|, p_t
    the degree-`degree` Chebyshev interpolant in s, for every t."""
    cheb = np.polynomial.chebyshev.Chebyshev
    points = np.linspace(*interval, 4001)
    out = np.empty(len(grid))
    for k, t in enumerate(grid):
        p = cheb.interpolate(
            lambda s, t=t: _gaussian([t], s, sigma)[0], degree, domain=interval
        )
        out[k] = np.max(np.abs(_gaussian([t], points, sigma)[0] - p(points)))
    return out


def test_hessian_spectral_density_matches_the_jacobian_eigenvalues():
    """SLQ density of a tiny MLP's Hessian vs sum_i N(t; lambda_i, s) / d.

    lambda_i: eigh of the full float64 jacobian Hessian. With R runs the
    density is the mean of R Gauss quadratures of v_r^T N(t; H, s) v_r.
    Error budget, pointwise in t: (a) sampling, 5 sd with the exact
    variance 2 (d tr F^2 - (tr F)^2) / (d^2 (d + 2)) / R of v^T F v for v
    uniform on the sphere; (b) quadrature, zero for m = d (the nodes are
    the eigenvalues) and for m < d at most twice the sup over
    [lambda_min, lambda_max] of the Gaussian's error against its
    degree-(2m-1) Chebyshev interpolant (Gauss quadrature integrates that
    polynomial exactly; nodes lie in the interval; the sup is taken on a
    4001-point grid, padded by 10%); (c) 1e-9 of the peak for rounding.
    """
    model64 = build("mlp", "float64", seed=5)
    x, y = data_for("mlp", n=16, seed=5)
    eigenvalues = np.linalg.eigvalsh(jacobian_hessian(model64, x, y, True))
    dim = eigenvalues.size
    low, high = eigenvalues[0], eigenvalues[-1]
    sigma = 0.05 * (high - low)
    grid = np.linspace(low - 4 * sigma, high + 4 * sigma, 121)
    kernel = _gaussian(grid, eigenvalues, sigma)
    exact = kernel.mean(axis=1)
    num_runs = 16
    tr, tr_sq = kernel.sum(axis=1), (kernel**2).sum(axis=1)
    variance = 2 * (dim * tr_sq - tr**2) / (dim**2 * (dim + 2))
    sd = np.sqrt(np.clip(variance, 0, None) / num_runs)
    for m in (dim, 24):
        got_grid, density = tfb.hessian_spectral_density(
            model64,
            (x, y),
            num_runs=num_runs,
            num_iterations=m,
            grid=grid,
            sigma=sigma,
            seed=3,
        )
        np.testing.assert_array_equal(got_grid, grid)
        quad = 0.0
        if m < dim:
            quad = 2.2 * _interval_interpolation_error(
                grid, [low, high], 2 * m - 1, sigma
            )
            assert quad.max() < 1e-3 * exact.max()  # the check is sharp
        error = np.abs(density - exact)
        assert np.all(error <= 5 * sd + quad + 1e-9 * exact.max()), m
        assert abs(np.trapezoid(density, grid) - 1) < 1e-3


# ----------------------------------------- directional curvature, by hand


def _softmax_regression(l2, dtype="float64"):
    """Dense(3) on 4 inputs (logits, x @ W + b), L2(l2) on W."""
    keras.utils.set_random_seed(11)
    regularizer = keras.regularizers.L2(l2) if l2 else None
    with floatx(dtype):
        model = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(3, kernel_regularizer=regularizer),
            ]
        )
    model.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    return model


def _softmax_regression_curvature(model, x, y, w, e, l2):
    """Exact per-example e^T H_i e and the mean Hessian H, float64 numpy.

    l_i = w_i (logsumexp(z_i) - z_i[y_i]) + l2 ||W||^2, z_i = x_i W + b.
    With J_i = dz_i/dtheta (theta = [vec(W) row-major, b]): H_i = w_i J_i^T
    (diag(p_i) - p_i p_i^T) J_i + 2 l2 [on the W entries].
    """
    kernel, bias = model.get_weights()
    p = softmax(x @ kernel + bias)
    identity = np.eye(3)
    reg = np.r_[np.full(kernel.size, 2 * l2), np.zeros(3)]
    curvatures, hessians = [], []
    for i in range(len(x)):
        jac = np.concatenate([np.kron(x[i][None, :], identity), identity], 1)
        logit_hessian = np.diag(p[i]) - np.outer(p[i], p[i])
        h_i = w[i] * jac.T @ logit_hessian @ jac + np.diag(reg)
        hessians.append(h_i)
        curvatures.append(e @ h_i @ e)
    return np.array(curvatures), np.mean(hessians, axis=0)


# Keras casts a regularizer's Python-float coefficient through float32 (L2's
# `ops.cast(self.l2, x.dtype)`), even for float64 weights: coefficients here
# are exact binary fractions, so the hand-written float64 loss is Keras'.
@pytest.mark.parametrize("l2", [0.0, 0.0625], ids=["plain", "l2"])
def test_directional_curvature_equals_the_written_out_hessian(l2, rng):
    """e^T H_i e of a softmax regression against its exact H_i, written out.

    Data in two batches (6 + 4) with sample weights: c_i = e^T H_i e with
    H_i the Hessian of w_i l_i + regularization (docstring of
    `probe_curvature`), mean_i c_i = e^T H e, and H e from the library's
    HVP equals the written-out mean Hessian times e. float64: 1e-10; the
    float32 copy: 1e-4 of the largest value.
    """
    model = _softmax_regression(l2)
    n = 10
    x = rng.normal(size=(n, 4))
    y = rng.integers(0, 3, n)
    w = rng.uniform(0.3, 2.0, n)
    kernel, bias = model.get_weights()
    reg = l2 * np.sum(kernel**2)
    # The hand-written loss is the model's loss.
    z = x @ kernel + bias
    hand = w * (np.log(np.exp(z).sum(1)) - z[np.arange(n), y]) + reg
    keras_losses = tfb.functional.ModelFunction(model).per_example_losses(
        model.trainable_variables, [], x, y, w
    )
    np.testing.assert_allclose(keras_losses.numpy(), hand, rtol=1e-12)

    e = rng.normal(size=kernel.size + bias.size)
    reference, hessian = _softmax_regression_curvature(model, x, y, w, e, l2)
    data = tf.data.Dataset.from_tensor_slices((x, y, w)).batch(6)
    got = tfb.directional_curvature(model, data, unflat(e, model)).numpy()
    assert got.shape == (n,)
    assert rel(got, reference) < 1e-10
    hv = library_hvp(model, data, e)
    assert rel(hv, hessian @ e) < 1e-10
    np.testing.assert_allclose(got.mean(), e @ hv, rtol=1e-10)
    op = tfb.HessianOperator(model, data)
    np.testing.assert_allclose(
        op.directional_curvature(unflat(e, model)).numpy(),
        reference,
        rtol=1e-10,
    )
    model32 = _softmax_regression(l2, "float32")
    model32.set_weights([v.astype(np.float32) for v in model.get_weights()])
    data32 = (x.astype("float32"), y, w.astype("float32"))
    got32 = tfb.directional_curvature(
        model32, data32, unflat(e.astype("float32"), model32)
    ).numpy()
    assert rel(got32, reference) < 1e-4


def test_directional_curvature_of_a_tanh_mlp_against_hand_written_losses(rng):
    """Dense(5, tanh) -> Dense(3): e^T H_i e against second derivatives of
    the hand-written float64 per-example loss along e (nested tapes on the
    scalar step t, no Keras in the reference), and their mean against
    e^T H e from the jacobian Hessian of the hand-written mean loss."""
    model = build("mlp", "float64", seed=4)
    x, y = data_for("mlp", n=7, seed=4)
    shapes = [v.shape for v in model.trainable_variables]
    theta = flat(model.trainable_variables)

    def per_example(theta):
        w1, b1, w2, b2 = split_flat(theta, shapes)
        z = tf.tanh(x @ w1 + b1) @ w2 + b2
        return tf.reduce_logsumexp(z, 1) - tf.gather(z, y, batch_dims=1)

    np.testing.assert_allclose(
        per_example(tf.constant(theta)).numpy(),
        tfb.functional.ModelFunction(model)
        .per_example_losses(model.trainable_variables, [], x, y)
        .numpy(),
        rtol=1e-12,
    )
    e = rng.normal(size=theta.size)
    e /= np.linalg.norm(e)
    reference = second_derivative_along(per_example, theta, e)
    got = tfb.directional_curvature(model, (x, y), unflat(e, model)).numpy()
    assert rel(got, reference) < 1e-10
    hessian = jacobian_hessian_of(
        lambda t: tf.reduce_mean(per_example(t)), theta
    )
    np.testing.assert_allclose(got.mean(), e @ hessian @ e, rtol=1e-10)
    np.testing.assert_allclose(
        e @ library_hvp(model, (x, y), e), e @ hessian @ e, rtol=1e-10
    )


# ------------------------------------------ loss=, weights, regularization


def _tanh_mlp(dtype="float64", softmax_output=False, l2=None, seed=6):
    """Dense(5, tanh[, L2(l2) on its kernel]) -> Dense(3[, softmax])."""
    keras.utils.set_random_seed(seed)
    regularizer = keras.regularizers.L2(l2) if l2 else None
    with floatx(dtype):
        return keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(
                    5, activation="tanh", kernel_regularizer=regularizer
                ),
                keras.layers.Dense(
                    3, activation="softmax" if softmax_output else None
                ),
            ]
        )


def _tanh_mlp_logits(theta, shapes, x):
    w1, b1, w2, b2 = split_flat(theta, shapes)
    return tf.tanh(x @ w1 + b1) @ w2 + b2


def _cross_entropy_from_logits(z, y):
    return tf.reduce_logsumexp(z, 1) - tf.gather(z, y, batch_dims=1)


def _half_squared_error(y_true, y_pred):
    """A per-example loss `fn(y_true, y_pred)` in Keras ops (the callable)."""
    target = keras.ops.one_hot(keras.ops.cast(y_true, "int32"), 3)
    return 0.5 * keras.ops.sum(
        keras.ops.square(y_pred - keras.ops.cast(target, y_pred.dtype)), -1
    )


# variant -> (softmax output?, the `loss=` argument, its hand-written
# per-example loss of the logits z)
LOSS_VARIANTS = {
    "keras_loss_object": (
        False,
        lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        _cross_entropy_from_logits,
    ),
    # The name means from_logits=False: the model outputs probabilities;
    # -log softmax(z)[y] is the same function of the logits.
    "loss_name": (
        True,
        lambda: "sparse_categorical_crossentropy",
        _cross_entropy_from_logits,
    ),
    "callable": (
        False,
        lambda: _half_squared_error,
        lambda z, y: (
            0.5
            * tf.reduce_sum(tf.square(z - tf.one_hot(y, 3, dtype=z.dtype)), 1)
        ),
    ),
}


def _weighted_data(rng, n=9):
    x = rng.normal(size=(n, 4))
    y = rng.integers(0, 3, n)
    w = rng.uniform(0.3, 2.0, n)
    return x, y, w


@pytest.mark.parametrize("variant", sorted(LOSS_VARIANTS))
def test_loss_argument_and_sample_weights_against_a_hand_written_loss(
    variant, rng
):
    """`loss=` (object, name, callable) with sample weights, uncompiled model.

    Reference: L(theta) = (1/N) sum_i w_i l_i(theta) with l_i written in
    TF ops on a hand-written forward pass; H by tape.jacobian, per-example
    and micro-batch gradients by tape.gradient. The probe is the tuple
    (x, y, w) and a dataset of batches 4 + 4 + 1 of it (the mean over all
    examples). HVP, top/bottom eigenvalues and the exact trace 1e-10 (rel.
    to the spectrum); Gram 1e-10; statistics 1e-8.
    """
    softmax_output, make_loss, per_example = LOSS_VARIANTS[variant]
    model = _tanh_mlp(softmax_output=softmax_output)  # not compiled
    loss = make_loss()
    x, y, w = _weighted_data(rng)
    n = len(y)
    shapes = [v.shape for v in model.trainable_variables]
    theta = flat(model.trainable_variables)

    def losses(theta, lo=0, hi=n):
        z = _tanh_mlp_logits(theta, shapes, x[lo:hi])
        return w[lo:hi] * per_example(z, y[lo:hi])

    library = tfb.functional.ModelFunction(model, loss)
    np.testing.assert_allclose(
        library.per_example_losses(model.trainable_variables, [], x, y, w),
        losses(tf.constant(theta)).numpy(),
        rtol=1e-12,
    )
    hessian = jacobian_hessian_of(lambda t: tf.reduce_mean(losses(t)), theta)
    dataset = tf.data.Dataset.from_tensor_slices((x, y, w)).batch(4)
    for data in ((x, y, w), dataset):
        for _ in range(2):
            v = rng.normal(size=theta.size)
            got = library_hvp(model, data, v, loss=loss)
            assert rel(got, hessian @ v) < 1e-10
    check_spectrum_and_trace(model, dataset, hessian, loss=loss)

    rows = np.stack(
        [
            gradient_of(lambda t, i=i: losses(t, i, i + 1)[0], theta)
            for i in range(n)
        ]
    )
    gram = tfb.gradient_gram(model, (x, y, w), loss=loss)
    assert rel(gram, rows @ rows.T) < 1e-10
    micro = np.stack(
        [
            gradient_of(
                lambda t, i=i: tf.reduce_mean(losses(t, i, i + 3)), theta
            )
            for i in range(0, n, 3)
        ]
    )
    stats = tfb.gradient_statistics(
        model, dataset, microbatch_size=3, loss=loss
    )
    for key, value in hand_statistics(micro).items():
        np.testing.assert_allclose(stats[key], value, rtol=1e-8, err_msg=key)


@pytest.mark.parametrize("include", [True, False], ids=["with_reg", "without"])
def test_include_regularization_against_a_hand_written_loss(include, rng):
    """L2(0.125) on the first kernel: the loss adds 0.125 ||W1||^2 to the
    mean weighted loss, or not with include_regularization=False.

    HVP, eigenvalues and trace against the jacobian Hessian of the hand-
    written loss (1e-10); e^T H_i e against second derivatives of the
    hand-written w_i l_i (+ the penalty) along e (1e-10). Sample gradients
    always carry the penalty (`per_example_gradients`: w_i l_i +
    regularization): their Gram against tape.gradient rows (1e-10).
    """
    l2 = 0.125
    model = _tanh_mlp(l2=l2)
    model.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    x, y, w = _weighted_data(rng, n=8)
    shapes = [v.shape for v in model.trainable_variables]
    theta = flat(model.trainable_variables)

    def losses(theta, penalty=include):
        z = _tanh_mlp_logits(theta, shapes, x)
        out = w * _cross_entropy_from_logits(z, y)
        if penalty:
            out += l2 * tf.reduce_sum(tf.square(split_flat(theta, shapes)[0]))
        return out

    kwargs = {"include_regularization": include}
    hessian = jacobian_hessian_of(lambda t: tf.reduce_mean(losses(t)), theta)
    data = tf.data.Dataset.from_tensor_slices((x, y, w)).batch(5)
    v = rng.normal(size=theta.size)
    assert rel(library_hvp(model, data, v, **kwargs), hessian @ v) < 1e-10
    check_spectrum_and_trace(model, data, hessian, **kwargs)
    e = rng.normal(size=theta.size)
    reference = second_derivative_along(losses, theta, e)
    got = tfb.directional_curvature(model, data, unflat(e, model), **kwargs)
    assert rel(got.numpy(), reference) < 1e-10

    rows = np.stack(
        [
            gradient_of(lambda t, i=i: losses(t, penalty=True)[i], theta)
            for i in range(len(y))
        ]
    )
    assert rel(tfb.gradient_gram(model, (x, y, w)), rows @ rows.T) < 1e-10


# ----------------------------- BatchNormalization over several probe batches


def _bn_model(dtype="float64"):
    """Dense(4) -> BatchNormalization -> tanh -> Dense(3), logits."""
    keras.utils.set_random_seed(8)
    with floatx(dtype):
        model = keras.Sequential(
            [
                keras.Input((3,)),
                keras.layers.Dense(4),
                # 2^-10: a binary fraction, exact whatever Keras casts it to.
                keras.layers.BatchNormalization(epsilon=2.0**-10),
                keras.layers.Activation("tanh"),
                keras.layers.Dense(3),
            ]
        )
    model.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    # Non-trivial scale and shift (initialized to 1 and 0).
    rng = np.random.default_rng(8)
    gamma, beta = model.layers[1].gamma, model.layers[1].beta
    gamma.assign(rng.uniform(0.5, 1.5, 4))
    beta.assign(rng.normal(0, 0.3, 4))
    return model


def _bn_losses(theta, shapes, x, y):
    """Hand-written training-mode forward; batch statistics of (x, y)."""
    w1, b1, gamma, beta, w2, b2 = split_flat(theta, shapes)
    a = x @ w1 + b1
    mean = tf.reduce_mean(a, 0)
    variance = tf.reduce_mean(tf.square(a - mean), 0)  # no stop_gradient
    h = tf.tanh(gamma * (a - mean) / tf.sqrt(variance + 2.0**-10) + beta)
    return _cross_entropy_from_logits(h @ w2 + b2, y)


def test_batch_norm_over_several_batches_against_a_hand_written_loss(rng):
    """Probe: a dataset of 3 batches of 4 with sample weights, training mode.

    Loss (README "Conventions"): (1/12) sum_b sum_{i in b} w_i l_i, each
    batch normalized by its own statistics. Reference: a hand-written
    forward pass (checked against Keras' stateless training-mode call),
    its Hessian by tape.jacobian (1e-10), and, as the pitfall recipe
    (docs/pitfalls.md#P1), central differences of Keras' own float64
    gradients batch by batch (1e-6: the eps = 1e-6 differences are good to
    ~1e-9). Checked: HVP, top/bottom eigenvalues and exact trace,
    per-example e^T H_i e (l_i coupled to its batch through the
    statistics; second derivatives of the hand-written l_i along e), and
    the Gram and statistics of micro-batches of 2 run as their own batches.
    """
    model = _bn_model()
    n, size = 12, 4
    x = rng.normal(size=(n, 3))
    y = rng.integers(0, 3, n)
    w = rng.uniform(0.3, 2.0, n)
    shapes = [v.shape for v in model.trainable_variables]
    assert [s for s in shapes] == [(3, 4), (4,), (4,), (4,), (4, 3), (3,)]
    theta = flat(model.trainable_variables)
    batches = [slice(lo, lo + size) for lo in range(0, n, size)]

    def losses(theta, parts=batches):
        return tf.concat(
            [w[s] * _bn_losses(theta, shapes, x[s], y[s]) for s in parts], 0
        )

    state = [v.value for v in model.non_trainable_variables]
    for s in batches:
        logits = model.stateless_call(
            model.trainable_variables, state, x[s], training=True
        )[0]
        np.testing.assert_allclose(
            keras.losses.sparse_categorical_crossentropy(
                y[s], logits, from_logits=True
            ).numpy(),
            _bn_losses(tf.constant(theta), shapes, x[s], y[s]).numpy(),
            rtol=1e-12,
        )

    hessian = jacobian_hessian_of(lambda t: tf.reduce_mean(losses(t)), theta)
    data = tf.data.Dataset.from_tensor_slices((x, y, w)).batch(size)
    v = rng.normal(size=theta.size)
    got = library_hvp(model, data, v)
    assert rel(got, hessian @ v) < 1e-10
    finite_differences = sum(
        fd_hvp(model, x[s], y[s], v, True, sample_weight=w[s]) * size / n
        for s in batches
    )
    assert rel(got, finite_differences) < 1e-6
    check_spectrum_and_trace(model, data, hessian)

    e = rng.normal(size=theta.size)
    reference = second_derivative_along(losses, theta, e)
    got = tfb.directional_curvature(model, data, unflat(e, model)).numpy()
    assert rel(got, reference) < 1e-10
    np.testing.assert_allclose(got.mean(), e @ hessian @ e, rtol=1e-10)

    pairs = [slice(lo, lo + 2) for lo in range(0, n, 2)]
    rows = np.stack(
        [
            gradient_of(
                lambda t, s=s: tf.reduce_mean(losses(t, parts=[s])), theta
            )
            for s in pairs
        ]
    )
    gram = tfb.gradient_gram(model, data, microbatch_size=2, training=True)
    assert rel(gram, rows @ rows.T) < 1e-10
    stats = tfb.gradient_statistics(model, data, microbatch_size=2)
    for key, value in hand_statistics(rows).items():
        np.testing.assert_allclose(stats[key], value, rtol=1e-8, err_msg=key)
