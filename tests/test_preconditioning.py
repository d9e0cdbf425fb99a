"""Preconditioned sharpness of Adam, AdamW and RMSprop, and BreakEven's
optimizer-aware criteria, against dense float64 references.

P is rebuilt here from the optimizer's slots by the formulas Keras' update
uses, and checked against the step Keras actually took; the reference
sharpness is the top eigenvalue of P^-1/2 H P^-1/2 with H the exact
jacobian Hessian.
"""

import math

import keras
import numpy as np
import pytest
from conftest import (
    assert_unchanged,
    build,
    cross_entropy,
    data_for,
    flat,
    floatx,
    jacobian_hessian,
    plain_gradient,
    snapshot,
)

import tf_breakeven as tfb
from tf_breakeven import preconditioning, stability
from tf_breakeven.callbacks import Probe, StabilityMeasurement, TopEigenpairs

N = 12


def _slot(optimizer, variable, name):
    wanted = variable.path.replace("/", "_") + "_" + name
    (found,) = [v for v in optimizer.variables if v.name == wanted]
    return np.asarray(found.numpy(), np.float64).ravel()


def _slots(model, name):
    optimizer = model.optimizer
    return np.concatenate(
        [_slot(optimizer, v, name) for v in model.trainable_variables]
    )


def _trained(optimizer, steps=3, model_name="mlp"):
    """A float64 model after `steps` full-batch steps; returns the weights
    before the last step and the gradient that step used."""
    model = build(model_name, "float64")
    x, y = data_for(model_name, N)
    with floatx("float64"):  # a float64 loss: Keras' own gradient is exact
        model.compile(optimizer=optimizer, loss=cross_entropy())
    model.fit(x, y, epochs=steps - 1, batch_size=N, verbose=0)
    before = flat(model.trainable_variables)
    gradient = plain_gradient(model, model.trainable_variables, x, y, True)
    model.fit(x, y, epochs=1, batch_size=N, verbose=0)
    return model, (x, y), before, gradient


def _lr(optimizer):
    return float(np.asarray(optimizer.learning_rate))


def _reference_p(model):
    """P by the formulas of the module docstring, from the raw slots."""
    opt = model.optimizer
    if isinstance(opt, keras.optimizers.RMSprop):
        second = _slots(model, "velocity")
        if opt.centered:
            second = second - _slots(model, "average_gradient") ** 2
        return np.sqrt(second + opt.epsilon)
    t = float(opt.iterations.numpy())
    b1, b2 = (float(np.float32(b)) for b in (opt.beta_1, opt.beta_2))
    v = _slots(model, "velocity_hat" if opt.amsgrad else "velocity")
    return (1 - b1**t) * (np.sqrt(v) + opt.epsilon) / np.sqrt(1 - b2**t)


ADAM_LIKE = {
    "adam": lambda: keras.optimizers.Adam(0.01),
    "amsgrad": lambda: keras.optimizers.Adam(0.02, amsgrad=True),
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1),
}


@pytest.mark.parametrize("name", sorted(ADAM_LIKE))
def test_adam_p_reproduces_the_step_keras_took(name):
    model, _, before, _ = _trained(ADAM_LIKE[name]())
    opt = model.optimizer
    p = np.concatenate(
        [a.ravel() for a in preconditioning.preconditioner(model)]
    )
    np.testing.assert_allclose(p, _reference_p(model), rtol=1e-12)
    decay = opt.weight_decay or 0.0
    # AdamW decays the weights first, then takes the Adam step.
    expected = (
        before * (1 - _lr(opt) * decay)
        - _lr(opt) * _slots(model, "momentum") / p
    )
    np.testing.assert_allclose(
        flat(model.trainable_variables), expected, rtol=1e-10, atol=1e-13
    )


@pytest.mark.parametrize("centered", [False, True])
def test_rmsprop_p_reproduces_the_step_keras_took(centered):
    model, _, before, gradient = _trained(
        keras.optimizers.RMSprop(0.01, centered=centered)
    )
    p = np.concatenate(
        [a.ravel() for a in preconditioning.preconditioner(model)]
    )
    np.testing.assert_allclose(p, _reference_p(model), rtol=1e-12)
    step = flat(model.trainable_variables) - before
    # Keras rounds some constants of its update through float32 (measured
    # 3.7e-6 here); sqrt(v) + eps instead of sqrt(v + eps) is 1.2% off.
    np.testing.assert_allclose(
        step, -_lr(model.optimizer) * gradient / p, rtol=2e-5
    )


OPTIMIZERS = {
    **ADAM_LIKE,
    "rmsprop": lambda: keras.optimizers.RMSprop(0.01),
    "rmsprop_centered_momentum": lambda: keras.optimizers.RMSprop(
        0.01, centered=True, momentum=0.5
    ),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_preconditioned_eigenvalues_match_the_dense_reference(name):
    model, (x, y), _, _ = _trained(OPTIMIZERS[name](), steps=4)
    scale = 1 / np.sqrt(_reference_p(model))
    hessian = jacobian_hessian(model, x, y, True)
    reference = np.linalg.eigvalsh(scale[:, None] * hessian * scale[None])
    before = snapshot(model)
    got = tfb.preconditioned_hessian_eigenvalues(model, (x, y), k=3, tol=0.0)
    assert_unchanged(before, snapshot(model))
    np.testing.assert_allclose(got, reference[::-1][:3], rtol=1e-9)


def test_preconditioned_eigenvectors_are_those_of_the_scaled_hessian():
    model, (x, y), _, _ = _trained(keras.optimizers.Adam(0.01), steps=4)
    scale = 1 / np.sqrt(_reference_p(model))
    matrix = scale[:, None] * jacobian_hessian(model, x, y, True) * scale[None]
    pairs = tfb.preconditioned_hessian_eigenpairs(model, (x, y), k=2, tol=0.0)
    for value, vector in zip(pairs.eigenvalues, pairs.eigenvectors):
        u = flat(vector)
        np.testing.assert_allclose(matrix @ u, value * u, atol=1e-9)
    assert np.all(pairs.residuals < 1e-8)


def test_thresholds_follow_the_optimizer():
    adam = keras.optimizers.Adam(0.5, beta_1=0.9)
    assert preconditioning.threshold(adam) == pytest.approx(76.0)
    assert preconditioning.threshold(adam, 0.25) == pytest.approx(152.0)
    rms = keras.optimizers.RMSprop(0.5, momentum=0.5)
    assert preconditioning.threshold(rms) == pytest.approx(6.0)
    assert stability.adam_threshold(1.0, 0.9) == pytest.approx(38.0)
    with pytest.raises(ValueError, match="Adam, AdamW or RMSprop"):
        preconditioning.threshold(keras.optimizers.SGD(0.1))


def test_bad_optimizers_raise_with_the_fix():
    x, y = data_for("mlp", N)
    model = build("mlp", "float64")
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=cross_entropy())
    with pytest.raises(ValueError, match="Adam, AdamW and RMSprop"):
        tfb.preconditioned_hessian_eigenvalues(model, (x, y))
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss=cross_entropy())
    with pytest.raises(ValueError, match="taken no step"):
        tfb.preconditioned_hessian_eigenvalues(model, (x, y))
    uncompiled = build("mlp", "float64", compile_loss=False)
    with pytest.raises(ValueError, match="No optimizer"):
        tfb.preconditioned_hessian_eigenvalues(uncompiled, (x, y))


def test_a_passed_optimizer_overrides_the_compiled_one():
    model, (x, y), _, _ = _trained(keras.optimizers.Adam(0.01))
    adam = model.optimizer
    want = tfb.preconditioned_hessian_eigenvalues(model, (x, y), tol=0.0)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=cross_entropy())
    got = tfb.preconditioned_hessian_eigenvalues(
        model, (x, y), optimizer=adam, tol=0.0
    )
    np.testing.assert_array_equal(got, want)
    other = build("mlp", "float64")
    with pytest.raises(ValueError, match="the optimizer that trains"):
        tfb.preconditioned_hessian_eigenvalues(other, (x, y), optimizer=adam)


def _measurement(model, data, **kwargs):
    measurement = StabilityMeasurement(
        TopEigenpairs(1, tol=0.0, num_iterations=40), **kwargs
    )
    measurement.setup(model, Probe(data))
    return measurement


@pytest.mark.parametrize(
    "make, criterion",
    [
        (lambda: keras.optimizers.Adam(0.01), "adam"),
        (lambda: keras.optimizers.AdamW(0.01), "adam"),
        (lambda: keras.optimizers.RMSprop(0.01, momentum=0.3), "rmsprop"),
        (lambda: keras.optimizers.SGD(0.1), "full_batch"),
    ],
)
def test_auto_criterion_follows_the_optimizer(make, criterion):
    model, data, _, _ = _trained(make())
    measurement = _measurement(model, data)
    assert measurement.criterion == criterion
    metrics = measurement.compute(model, 3).metrics
    opt = model.optimizer
    eta = _lr(opt)
    if criterion == "full_batch":
        assert "breakeven/preconditioned_sharpness" not in metrics
        assert metrics["breakeven/threshold"] == pytest.approx(2 / eta)
        return
    scale = 1 / np.sqrt(_reference_p(model))
    hessian = jacobian_hessian(model, *data, True)
    top = np.linalg.eigvalsh(scale[:, None] * hessian * scale[None])[-1]
    if criterion == "adam":
        threshold = (2 + 2 * opt.beta_1) / (eta * (1 - opt.beta_1))
    else:
        threshold = 2 * (1 + opt.momentum) / eta
    got = metrics["breakeven/preconditioned_sharpness"]
    assert got == pytest.approx(top, rel=1e-9)
    assert metrics["breakeven/threshold"] == pytest.approx(threshold)
    assert metrics["breakeven/stability"] == pytest.approx(top / threshold)
    assert metrics["breakeven/preconditioned_residual"] < 1e-8 * top
    assert metrics["hessian/lambda_1"] == pytest.approx(
        np.linalg.eigvalsh(hessian)[-1], rel=1e-9
    )


def test_preconditioned_sharpness_is_nan_before_the_first_step():
    model = build("mlp", "float64")
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=cross_entropy())
    measurement = _measurement(model, data_for("mlp", N))
    metrics = measurement.compute(model, 0).metrics
    assert math.isnan(metrics["breakeven/preconditioned_sharpness"])
    assert math.isnan(metrics["breakeven/stability"])
    assert math.isfinite(metrics["hessian/lambda_1"])


def test_an_explicit_adaptive_criterion_needs_that_optimizer():
    model = build("mlp", "float64")
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=cross_entropy())
    with pytest.raises(ValueError, match="criterion='auto'"):
        _measurement(model, data_for("mlp", N), criterion="adam")


def _warmup(start, end, steps):
    return keras.optimizers.schedules.PolynomialDecay(
        start, steps, end_learning_rate=end, power=1.0
    )


@pytest.mark.parametrize(
    "make, criterion, decay_steps",
    [
        (lambda s: keras.optimizers.Adam(s), "adam", 30),
        (lambda s: keras.optimizers.RMSprop(s), "rmsprop", 300),
    ],
)
def test_detector_finds_the_step_a_warmup_crosses_the_threshold(
    make, criterion, decay_steps
):
    """A learning-rate warm-up lowers the threshold until the
    preconditioned sharpness crosses it; the break-even step is the first
    recorded step at or above it, and each recorded threshold is the
    optimizer's formula at that step's learning rate."""
    steps = 30
    schedule = _warmup(1e-3 if criterion == "adam" else 1e-4, 3.0, decay_steps)
    model = build("mlp", "float64")
    x, y = data_for("mlp", N)
    model.compile(optimizer=make(schedule), loss=cross_entropy())
    reached = []
    callback = tfb.BreakEven(
        (x, y),
        schedule=1,
        tol=1e-8,
        on_break_even=lambda step, metrics: reached.append(step),
    )
    model.fit(x, y, epochs=steps, batch_size=N, verbose=0, callbacks=[callback])
    assert callback.criterion == criterion
    records = callback.records
    first = None
    for record in records:
        eta = float(schedule(record["step"]))
        want = 38 / eta if criterion == "adam" else 2 / eta
        assert record["breakeven/threshold"] == pytest.approx(want, rel=1e-6)
        above = (
            record["breakeven/preconditioned_sharpness"]
            >= record["breakeven/threshold"]
        )
        if above and first is None:
            first = record["step"]
    assert first is not None and first > 1, "the run must cross from below"
    assert callback.breakeven_step == first and reached == [first]


def test_the_new_measurements_compile_with_xla():
    """TPUs need jit_compile=True: the preconditioned solver, the block
    operators and batch sharpness compile and give the eager numbers."""
    model, data, _, _ = _trained(keras.optimizers.Adam(0.01))
    for jit in (False, True):
        got = [
            tfb.preconditioned_hessian_eigenvalues(
                model, data, tol=0.0, jit_compile=jit
            )[0],
            tfb.batch_sharpness(model, data, 4, jit_compile=jit),
            *(
                values[0]
                for values in tfb.hessian_eigenvalues(
                    model, data, blocks="layer", tol=0.0, jit_compile=jit
                ).values()
            ),
        ]
        if not jit:
            eager = np.asarray(got, np.float64)
    np.testing.assert_allclose(np.asarray(got, np.float64), eager, rtol=1e-10)


def test_mixed_precision_reads_p_through_the_loss_scale_optimizer():
    """Keras wraps the optimizer of a mixed_float16 model in a
    LossScaleOptimizer; P comes from the Adam inside it and still gives
    the step (float32 slots: to float32 roundoff)."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(6, activation="tanh"),
                keras.layers.Dense(3, dtype="float32"),
            ]
        )
    finally:
        keras.config.set_dtype_policy(previous)
    x, y = data_for("mlp", N)
    x = x.astype("float32")
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=cross_entropy())
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    model.fit(x, y, epochs=2, batch_size=N, verbose=0)
    before = flat(model.trainable_variables)
    model.fit(x, y, epochs=1, batch_size=N, verbose=0)
    adam = preconditioning.unwrap(model.optimizer)
    p = np.concatenate(
        [a.ravel() for a in preconditioning.preconditioner(model)]
    )
    names = [v.name for v in adam.variables]
    momentum = np.concatenate(
        [
            adam.variables[names.index(v.path.replace("/", "_") + "_momentum")]
            .numpy()
            .ravel()
            for v in model.trainable_variables
        ]
    )
    step = -_lr(adam) * momentum / p
    np.testing.assert_allclose(
        flat(model.trainable_variables) - before,
        step,
        rtol=1e-4,
        atol=1e-4 * np.max(np.abs(step)),
    )
    assert preconditioning.threshold(model.optimizer) == pytest.approx(
        38 / _lr(adam)
    )
