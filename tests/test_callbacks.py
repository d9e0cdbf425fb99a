"""Keras callbacks: values equal the direct API at the same step."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import (
    alignment_reference,
    build,
    cross_entropy,
    data_for,
    floatx,
    jacobian_hessian,
    plain_gradient,
)

import tf_breakeven as tfb
from tf_breakeven import callbacks as cb
from tf_breakeven import presets, recording, schedules


def _compiled(name="mlp", lr=0.05, seed=0, momentum=0.0):
    model = build(name, seed=seed)
    model.compile(
        optimizer=keras.optimizers.SGD(lr, momentum=momentum),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _train_data(name="mlp", n=32):
    x, y = data_for(name, n=n, seed=7)
    return x.astype("float32"), y


class _DirectAtMeasurement(keras.callbacks.Callback):
    """Runs `fn(model)` right after `probe` measured, at the same step."""

    def __init__(self, probe, fn):
        super().__init__()
        self.probe, self.fn, self.pairs = probe, fn, []

    def on_train_batch_end(self, batch, logs=None):
        if self.probe.records and len(self.pairs) < len(self.probe.records):
            self.pairs.append((self.probe.records[-1], self.fn(self.model)))


def _fit(model, callbacks, epochs=2, data=None, **kwargs):
    x, y = data if data is not None else _train_data()
    return model.fit(
        x,
        y,
        batch_size=8,
        epochs=epochs,
        verbose=0,
        shuffle=False,
        callbacks=callbacks,
        **kwargs,
    )


def test_hessian_spectrum_equals_direct_eigenvalues():
    model = _compiled()
    probe = _train_data(n=16)
    spectrum = cb.HessianSpectrum(
        probe,
        k=2,
        warm_start=False,
        trace=True,
        smallest=True,
        schedule=schedules.AtSteps([2, 5]),
    )

    def direct(m):
        op = tfb.HessianOperator(m, probe)
        return (
            op.eigenpairs(k=2),
            op.trace(num_samples=30),
            op.eigenpairs(1, which="smallest").eigenvalues[0],
        )

    check = _DirectAtMeasurement(spectrum, direct)
    history = _fit(model, [spectrum, check])
    assert [r["step"] for r, _ in check.pairs] == [2, 5]
    for record, (pairs, trace, smallest) in check.pairs:
        top = pairs.eigenvalues
        assert record["hessian/lambda_1"] == pytest.approx(top[0], rel=1e-6)
        assert record["hessian/lambda_2"] == pytest.approx(top[1], rel=1e-6)
        for j in range(2):
            assert record[f"hessian/residual_{j + 1}"] == pytest.approx(
                pairs.residuals[j], rel=1e-5, abs=1e-9
            )
        assert record["hessian/converged"] == float(all(pairs.converged))
        assert record["hessian/lanczos_steps"] == pairs.num_iterations
        assert record["hessian/trace"] == pytest.approx(trace, rel=1e-6)
        assert record["hessian/lambda_min"] == pytest.approx(smallest, rel=1e-6)
    # The latest values reach the epoch logs (History, CSVLogger, progbar).
    assert history.history["hessian/lambda_1"][-1] == pytest.approx(
        check.pairs[-1][1][0].eigenvalues[0], rel=1e-6
    )


@pytest.mark.parametrize("cls", [cb.GradientCovariance, cb.GradientConfusion])
def test_gram_callbacks_equal_gradient_statistics(cls):
    model = _compiled()
    probe = _train_data(n=16)
    callback = cls(probe, microbatch_size=2, schedule=schedules.AtSteps([3]))
    check = _DirectAtMeasurement(
        callback,
        lambda m: tfb.gradient_statistics(m, probe, microbatch_size=2),
    )
    _fit(model, [callback, check], epochs=1)
    ((record, direct),) = check.pairs
    keys = callback.metric_keys()
    assert keys and all(k.startswith(cls.prefixes) for k in keys)
    for key in keys:
        assert record[key] == pytest.approx(
            direct[key], rel=1e-9, nan_ok=True
        ), key


def test_break_even_full_batch_and_user_action():
    model = _compiled(lr=0.05, momentum=0.5)
    probe = _train_data(n=16)
    lambda0 = tfb.hessian_eigenvalues(model, probe)[0]
    hits = []
    # The stability is computed with this eta (training uses 0.05): tiny
    # until step 4, then far beyond 2 (1 + beta) / eta.
    eta = lambda step: 1e-6 if step < 4 else 10.0 / lambda0  # noqa: E731
    breakeven = cb.BreakEven(
        probe,
        learning_rate=eta,
        schedule=schedules.EveryNSteps(2),
        warm_start=False,
        on_break_even=lambda s, m: hits.append(s),
    )
    _fit(model, [breakeven], epochs=1)
    assert breakeven.breakeven_step == 4 and hits == [4]
    for record in breakeven.records:
        eta_r = eta(record["step"])
        lam = record["hessian/lambda_1"]
        assert record["breakeven/sharpness_x_lr"] == pytest.approx(eta_r * lam)
        assert record["breakeven/threshold"] == pytest.approx(2 * 1.5 / eta_r)
        assert record["breakeven/stability"] == pytest.approx(eta_r * lam / 3.0)
    assert "breakeven_step" in breakeven.records[1]


def test_break_even_sgd_uses_per_example_curvature_variance():
    model = _compiled(lr=0.1)
    probe = _train_data(n=16)
    breakeven = cb.BreakEven(
        probe,
        criterion="sgd",
        batch_size=8,
        dataset_size=32,
        warm_start=False,
        schedule=schedules.AtSteps([2]),
    )

    def direct(m):
        pair = tfb.hessian_eigenpairs(m, probe)
        curv = tfb.directional_curvature(m, probe, pair.eigenvectors[0])
        return pair.eigenvalues[0], float(np.var(curv.numpy().astype(float)))

    check = _DirectAtMeasurement(breakeven, direct)
    _fit(model, [breakeven, check], epochs=1)
    ((record, (lam, s2)),) = check.pairs
    assert record["breakeven/curvature_variance"] == pytest.approx(s2, rel=1e-5)
    expected = (1 - 0.1 * lam) ** 2 + s2 * 0.01 * (32 - 8) / (8 * 31)
    assert record["breakeven/stability"] == pytest.approx(expected, rel=1e-5)


def test_csv_logger_and_history_see_every_key_from_the_first_epoch(tmp_path):
    model = _compiled()
    probe = _train_data(n=16)
    spectrum = cb.HessianSpectrum(probe, schedule=schedules.EveryEpoch(2))
    csv_path = tmp_path / "log.csv"
    history = _fit(
        model, [spectrum, keras.callbacks.CSVLogger(csv_path)], epochs=3
    )
    values = history.history["hessian/lambda_1"]
    assert len(values) == 3 and not math.isnan(values[0])
    header = csv_path.read_text().splitlines()[0].split(",")
    assert "hessian/lambda_1" in header


def test_measuring_does_not_change_training_bitwise(tmp_path):
    data = _train_data()
    plain = _compiled(name="bn_dropout", momentum=0.9)
    _fit(plain, [], epochs=2, data=data)
    measured = _compiled(name="bn_dropout", momentum=0.9)
    probe = _train_data("bn_dropout", n=16)
    recorder = recording.Recorder(tmp_path / "r.jsonl", tmp_path / "tb")
    callbacks = [
        cb.BreakEven(
            probe,
            criterion="sgd",
            batch_size=8,
            dataset_size=32,
            schedule=1,
            recorder=recorder,
        ),
        cb.HessianSpectrum(probe, schedule=1, recorder=recorder, trace=True),
        cb.GradientCovariance(
            probe, microbatch_size=4, schedule=2, recorder=recorder
        ),
        cb.GradientConfusion(
            probe, microbatch_size=4, schedule="epoch", recorder=recorder
        ),
    ]
    keras.utils.set_random_seed(0)  # as _compiled did for `plain`'s fit
    _fit(measured, callbacks, epochs=2, data=data)
    for a, b in zip(plain.variables, measured.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_diverging_run_records_nan_and_never_raises(tmp_path):
    # Least squares with a step far past 2 / lambda_1: weights blow up
    # geometrically to inf, then NaN.
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer=keras.optimizers.SGD(50.0), loss="mse")
    x, _ = _train_data()
    x = x * 10
    y = np.ones((len(x), 3), "float32")
    probe = (x[:16], y[:16])
    path = tmp_path / "r.jsonl"
    callbacks = [
        cb.BreakEven(probe, schedule=1, recorder=str(path)),
        cb.GradientConfusion(
            probe, microbatch_size=2, schedule=1, recorder=str(path)
        ),
    ]
    history = _fit(model, callbacks, epochs=4, data=(x, y))
    assert math.isnan(history.history["loss"][-1])
    last = recording.read_records(path)[-1]
    assert math.isnan(last["confusion/eta"])
    assert math.isnan(history.history["hessian/lambda_1"][-1])


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p: cb.HessianSpectrum((p[0][:, :3], p[1])), "does not fit"),
        (
            lambda p: cb.HessianSpectrum(p, schedule=schedules.AtSteps([999])),
            "never fires",
        ),
        (
            lambda p: cb.GradientCovariance(p, microbatch_size=5),
            "does not divide",
        ),
    ],
    ids=["probe_shape", "schedule_never_fires", "microbatch"],
)
def test_bad_configuration_fails_at_train_begin(make, match):
    model = _compiled()
    with pytest.raises(ValueError, match=match):
        _fit(model, [make(_train_data(n=16))], epochs=1)


def test_bad_constructor_arguments():
    probe = _train_data(n=16)
    with pytest.raises(ValueError, match="k"):
        cb.HessianSpectrum(probe, k=0)
    with pytest.raises(ValueError, match="batch_size"):
        cb.BreakEven(probe, criterion="sgd")


def test_break_even_needs_a_readable_positive_learning_rate():
    model = _compiled()
    broken = cb.BreakEven(_train_data(n=16), learning_rate=0.0)
    with pytest.raises(ValueError, match="learning rate"):
        _fit(model, [broken], epochs=1)
    with pytest.raises(ValueError, match="cannot read a learning rate"):
        cb.read_learning_rate(object())


def test_resume_continues_records_without_duplicates(tmp_path):
    """A crash mid-epoch, then fit again with BackupAndRestore."""
    x, y = _train_data()
    probe = (x[:16], y[:16])
    path = tmp_path / "records.jsonl"

    class Crash(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if self.model.optimizer.iterations.numpy() == 10:
                raise RuntimeError("simulated crash")

    def run(extra):
        model = _compiled()
        callbacks = [
            cb.BreakEven(probe, schedule=1, recorder=str(path)),
            keras.callbacks.BackupAndRestore(str(tmp_path / "backup")),
        ] + extra
        _fit(model, callbacks, epochs=3, data=(x, y))
        return callbacks[0]

    with pytest.raises(RuntimeError, match="simulated"):
        run([Crash()])
    # Steps 1..10 were recorded; the last backup is from the end of epoch
    # 1 (step 8), so steps 9 and 10 are measured again after the restart.
    assert [r["step"] for r in recording.read_records(path, "BreakEven")] == (
        list(range(1, 11))
    )
    resumed = run([])
    steps = [r["step"] for r in recording.read_records(path, "BreakEven")]
    assert steps == list(range(1, 13))
    assert [r["step"] for r in resumed.records] == list(range(9, 13))


def test_presets_build_working_callbacks(tmp_path):
    x, y = _train_data(n=64)
    for name in presets.PRESETS:
        model = _compiled()
        callbacks = presets.preset(name, (x, y), recorder=str(tmp_path / name))
        history = _fit(model, callbacks, epochs=1, data=(x, y))
        assert not math.isnan(history.history["hessian/lambda_1"][-1])
    with pytest.raises(ValueError, match="preset"):
        presets.preset("luxury", (x, y))


class _WeightsByStep(keras.callbacks.Callback):
    """The weights after each update, keyed by the update count."""

    def __init__(self):
        super().__init__()
        self.weights = {}

    def on_train_begin(self, logs=None):
        self.weights[0] = self.model.get_weights()

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations)
        self.weights[step] = self.model.get_weights()


def _tanh_mlp(dtype):
    keras.utils.set_random_seed(0)
    with floatx(dtype):
        return keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(16, activation="tanh"),
                keras.layers.Dense(3),
            ]
        )


# Largest relative error of each preset's lambda_1 against the exact one:
# (first, cold measurement; warm-started later ones). Measured on this test
# (README "Presets"): economy 3.8% and 0.4% low, paper and full 3e-7.
PRESET_TOLERANCE = {
    "economy": (0.10, 0.015),
    "paper": (1e-5, 1e-5),
    "full": (1e-5, 1e-5),
}


@pytest.mark.parametrize("name", presets.PRESETS)
def test_presets_follow_the_exact_hessian_over_a_short_fit(name, tmp_path):
    # A 131-parameter tanh MLP, 3 epochs of SGD; at every measured step
    # the exact float64 Hessian (tape.jacobian) of the probe's mean loss.
    rng = np.random.default_rng(7)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = rng.integers(0, 3, 64)
    model = _tanh_mlp("float32")
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    probe = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    extra = {} if name == "economy" else {"microbatch_size": 8}
    callbacks = presets.preset(
        name, probe=probe, recorder=str(tmp_path / "r.jsonl"), **extra
    )
    weights = _WeightsByStep()
    _fit(model, callbacks + [weights], epochs=3, data=(x, y))
    exact64 = _tanh_mlp("float64")
    exact64.compile(loss=cross_entropy())
    first, warm = PRESET_TOLERANCE[name]
    checked = extras = 0
    for callback in callbacks:
        if not isinstance(callback, (cb.BreakEven, cb.HessianSpectrum)):
            continue
        assert len(callback.records) >= 3
        for i, record in enumerate(callback.records):
            exact64.set_weights(
                [w.astype(np.float64) for w in weights.weights[record["step"]]]
            )
            hessian = jacobian_hessian(exact64, x.astype(np.float64), y, True)
            exact = np.linalg.eigvalsh(hessian)[::-1]
            extras += _check_full_extras(
                record, hessian, exact64, x.astype(np.float64), y
            )
            top = record["hessian/lambda_1"]
            # A Ritz value: never above the exact top eigenvalue.
            assert top <= exact[0] * (1 + 1e-5), record["step"]
            assert top >= exact[0] * (1 - (first if i == 0 else warm))
            for j in range(2, 6):
                key = f"hessian/lambda_{j}"
                if key in record:
                    assert record[key] == pytest.approx(exact[j - 1], rel=1e-5)
            if "hessian/lambda_min" in record:
                assert record["hessian/lambda_min"] == pytest.approx(
                    exact[-1], rel=1e-2
                )
            checked += 1
    assert checked >= 3
    assert (extras >= 3) == (name == "full")


def _check_full_extras(record, hessian, model64, x, y):
    """The "full" preset's alignment and probe-split spread against the
    exact float64 Hessians (4 parts of 16 examples)."""
    if "hessian/gradient_curvature" not in record:
        return 0
    g = plain_gradient(model64, model64.trainable_variables, x, y, True)
    curvature, inside = alignment_reference(hessian, g, 5)
    assert record["hessian/gradient_curvature"] == pytest.approx(
        curvature, rel=1e-4
    )
    assert record["hessian/gradient_in_top_k"] == pytest.approx(
        inside, rel=1e-3, abs=1e-5
    )
    parts = [
        np.linalg.eigvalsh(
            jacobian_hessian(model64, x[a : a + 16], y[a : a + 16], True)
        )[-1]
        for a in range(0, 64, 16)
    ]
    assert record["hessian/lambda_1_std"] == pytest.approx(
        np.std(parts, ddof=1), rel=1e-4
    )
    return 1


def test_make_probe_is_seeded_and_sized():
    x, y = _train_data(n=40)
    a = list(presets.make_probe((x, y), 10, batch_size=4, seed=1))
    b = list(presets.make_probe((x, y), 10, batch_size=4, seed=1))
    assert sum(len(t[1]) for t in a) == 10
    for (xa, _), (xb, _) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    assert sum(len(t[1]) for t in presets.make_probe(dataset, 0.25)) == 10


def test_jit_compiled_measurements_match_eager():
    probe = _train_data(n=16)
    results = []
    for jit in (False, True):
        model = _compiled()
        callbacks = [
            cb.BreakEven(
                probe,
                schedule=schedules.AtSteps([2]),
                jit_compile=jit,
                warm_start=False,
            ),
            cb.GradientCovariance(
                probe,
                microbatch_size=2,
                schedule=schedules.AtSteps([2]),
                jit_compile=jit,
            ),
        ]
        _fit(model, callbacks, epochs=1)
        results.append({**callbacks[0].records[0], **callbacks[1].records[0]})
    eager, jitted = results
    for key in (
        "hessian/lambda_1",
        "breakeven/stability",
        "grad_cov/lambda_1",
        "grad/noise_scale",
    ):
        assert jitted[key] == pytest.approx(eager[key], rel=1e-4), key


def test_break_even_reads_learning_rate_schedules():
    model = build("mlp")
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
        [3], [0.1, 0.01]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(schedule, momentum=0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    breakeven = cb.BreakEven(_train_data(n=16), schedule=1, num_iterations=3)
    _fit(model, [breakeven], epochs=1)
    for record in breakeven.records:
        # The rate of the next update: schedule(iterations) after `step`.
        eta = 0.1 if record["step"] <= 3 else 0.01
        assert record["breakeven/threshold"] == pytest.approx(2 * 1.5 / eta)


class _ProbeLoss(cb.Measurement):
    """A user's own measurement: the probe loss in inference mode."""

    def __init__(self, fail_at=None):
        self.fail_at = fail_at

    def keys(self):
        return ["user/probe_loss"]

    def setup(self, model, probe):
        self.x, self.y = probe.data

    def compute(self, model, step):
        if step == self.fail_at:
            raise tf.errors.InvalidArgumentError(None, None, "planted")
        loss = model.evaluate(self.x, self.y, verbose=0)
        return cb.Result({"user/probe_loss": loss})


def test_a_user_measurement_runs_through_the_driver(tmp_path):
    model = _compiled()
    probe = _train_data(n=16)
    callback = cb.MeasurementCallback(
        _ProbeLoss(fail_at=4),
        probe,
        schedule=schedules.AtSteps([2, 4]),
        recorder=str(tmp_path / "r.jsonl"),
    )
    check = _DirectAtMeasurement(
        callback, lambda m: m.evaluate(*probe, verbose=0)
    )
    history = _fit(model, [callback, check], epochs=1)
    (first, direct), (failed, _) = check.pairs
    assert first["step"] == 2 and failed["step"] == 4
    assert first["user/probe_loss"] == pytest.approx(direct, rel=1e-6)
    # A numerical failure is recorded as NaN, never raised.
    assert math.isnan(failed["user/probe_loss"])
    assert math.isnan(history.history["user/probe_loss"][-1])
    records = recording.read_records(tmp_path / "r.jsonl")
    assert [r["source"] for r in records] == ["MeasurementCallback"] * 2
