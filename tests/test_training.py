"""TrackingModel: same trajectory as Keras, statistics equal direct calls."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import build, cross_entropy, data_for

import tf_breakeven as tfb
from tf_breakeven import statistics, training
from tf_breakeven.functional import Batch
from tf_breakeven.step_probes import PowerIteration, StepContext


def _data(name="mlp", n=32):
    x, y = data_for(name, n=n, seed=7)
    return x.astype("float32"), y


def _model(name="mlp", tracking=None, lr=0.1, momentum=0.0):
    keras.utils.set_random_seed(0)
    base = build(name, compile_loss=False)
    model = base if tracking is None else training.track(base, tracking)
    model.compile(
        optimizer=keras.optimizers.SGD(lr, momentum=momentum),
        loss=cross_entropy(),
    )
    return model


def _fit(model, data, **kwargs):
    kwargs = {
        "batch_size": 8,
        "epochs": 2,
        "verbose": 0,
        "shuffle": False,
        **kwargs,
    }
    return model.fit(*data, **kwargs)


# The tracked step runs Keras' update computation, but inside a different
# graph: grappler and oneDNN may fuse or order its ops differently (on some
# CPUs, not on others), so the guarantee is float32 roundoff, not bits.
ROUNDOFF = {"rtol": 1e-5, "atol": 1e-6}


def _assert_same_variables(plain, tracked):
    assert len(plain.variables) == len(tracked.variables)
    for a, b in zip(plain.variables, tracked.variables):
        np.testing.assert_allclose(
            a.numpy(), b.numpy(), **ROUNDOFF, err_msg=a.path
        )


@pytest.mark.parametrize("name", ["mlp", "bn_dropout"])
def test_tracking_never_changes_the_trajectory(name):
    data = _data(name)
    plain = _model(name, momentum=0.9)
    _fit(plain, data)
    config = training.TrackingConfig(
        every=2, gram=True, microbatch_size=2, hessian_every=3
    )
    tracked = _model(name, config, momentum=0.9)
    history = _fit(tracked, data)
    # mlp is stateless: its Gram steps are fused (the update is the mean of
    # the micro-batch gradients). bn_dropout keeps Keras' own update.
    assert tracked.fusable == (name == "mlp")
    _assert_same_variables(plain, tracked)
    assert set(tracked.tracking_keys) <= set(history.history)


@pytest.mark.parametrize("name", ["mlp", "bn_dropout"])
def test_one_tracked_step_is_keras_step_to_roundoff(name):
    # One step from the same weights on the same batch: each variable's
    # change differs from Keras' by float32 roundoff of the gradient (a
    # different update, such as the mean of micro-batch gradients under
    # dropout or batch statistics, is off by far more).
    x, y = _data(name, n=8)
    plain = _model(name, momentum=0.9)
    start = [v.numpy() for v in plain.variables]
    plain.train_on_batch(x, y)
    config = {"every": 1, "gram": True, "microbatch_size": 2}
    tracked = _model(name, config, momentum=0.9)
    assert all(
        np.array_equal(a, v.numpy()) for a, v in zip(start, tracked.variables)
    )
    tracked.train_on_batch(x, y)
    for initial, a, b in zip(start, plain.variables, tracked.variables):
        if initial.dtype.kind != "f":  # seed states and counters
            np.testing.assert_array_equal(a.numpy(), b.numpy())
            continue
        plain_change = a.numpy().astype(np.float64) - initial
        tracked_change = b.numpy().astype(np.float64) - initial
        error = np.linalg.norm(tracked_change - plain_change)
        assert error <= 1e-5 * np.linalg.norm(plain_change) + 1e-7, a.path


def test_tracking_without_gram_keeps_keras_update_and_loss():
    data = _data()
    plain = _model(momentum=0.9)
    plain_history = _fit(plain, data)
    tracked = _model(tracking={"every": 1, "hessian_every": 2}, momentum=0.9)
    history = _fit(tracked, data)
    _assert_same_variables(plain, tracked)
    # The public compute_loss / metrics route logs Keras' own loss.
    np.testing.assert_allclose(
        history.history["loss"], plain_history.history["loss"], rtol=1e-6
    )


def test_train_on_batch_tracks_like_fit():
    x, y = _data(n=8)
    tracking = {"gram": True, "microbatch_size": 2, "hessian_every": 1}
    fitted = _model(tracking=tracking)
    logs = {k: v[-1] for k, v in _fit(fitted, (x, y), epochs=1).history.items()}
    model = _model(tracking=tracking)
    assert model.train_on_batch(x, y, return_dict=True) == pytest.approx(logs)


def test_statistics_of_a_step_equal_the_direct_api():
    x, y = _data(n=8)
    model = _model(tracking={"gram": True, "microbatch_size": 2}, lr=0.1)
    expected = tfb.gradient_statistics(model, (x, y), microbatch_size=2)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(
            keras.losses.sparse_categorical_crossentropy(
                y, model(x, training=True), from_logits=True
            )
        )
    grad_norm = float(
        tf.linalg.global_norm(tape.gradient(loss, model.trainable_variables))
    )
    history = _fit(model, (x, y), epochs=1)
    logs = {k: v[-1] for k, v in history.history.items()}
    assert logs["grad/step_norm"] == pytest.approx(grad_norm, rel=1e-5)
    assert logs["grad/update_norm"] == pytest.approx(0.1 * grad_norm, rel=1e-5)
    for key in training.GRAM_KEYS:
        assert logs[key] == pytest.approx(
            expected[key[len("batch/") :]], rel=1e-5
        ), key


@pytest.mark.parametrize(
    "name, m",
    [
        ("mlp_l2", 1),
        ("cnn", 2),
        ("bn_dropout", 2),
        ("embedding", 1),
        ("lstm", 2),
    ],
)
def test_ghost_step_statistics_equal_the_materialized_gram(name, m):
    # The ghost engine of a tracked step (Keras' update plus one signal
    # pass) against the materialized Gram of the same batch: L2 cross
    # terms, convolution patches, micro-batch BatchNormalization coupling
    # and dropout masks, embedding ids.
    x, y = data_for(name, n=8, seed=7)
    model = _model(
        name, {"gram": True, "microbatch_size": m, "method": "ghost"}
    )
    model.optimizer.learning_rate.assign(0.0)
    logs = _fit(model, (x, y), epochs=1).history
    # After the step (lr 0: the same weights): dropout masks come from the
    # seed state Keras' forward pass of the step left, as in the probe.
    expected = tfb.gradient_statistics(
        model, (x, y), microbatch_size=m, method="materialize"
    )
    for key in training.GRAM_KEYS:
        assert logs[key][-1] == pytest.approx(
            expected[key[len("batch/") :]], rel=1e-5
        ), key


def test_auto_step_engine_is_chosen_from_the_batch_shapes():
    from tf_breakeven import step_probes

    def batch(x, y):
        return Batch(tf.constant(x), tf.constant(y), None)

    x, y = _data(n=8)
    small = _model(tracking={"gram": True, "microbatch_size": 2})
    # Fusable, rows fit: the fused materialized pass (one pass, no extra).
    assert small.fusable
    engine = step_probes.gram_engine(small, batch(x, y), 2, "auto")
    assert engine == "materialize"
    # Not fusable (state): the per-layer costs decide. 4 samples of P = 2
    # rows: a 4x6 kernel costs (4 * 2)^2 * (4 + 6) = 640 multiply-adds as
    # a ghost product, 4 * 2 * 24 + 4 * 4 * 24 = 576 materialized; a 32x32
    # kernel 64 * 64 = 4096 against 8 * 1024 + 16 * 1024 = 24576.
    bn = _model("bn_dropout", {"gram": True, "microbatch_size": 2})
    xb, yb = data_for("bn_dropout", n=8, seed=7)
    assert not bn.fusable
    assert step_probes.gram_engine(bn, batch(xb, yb), 2, "auto") == (
        "materialize"
    )
    keras.utils.set_random_seed(0)
    wide = training.track(
        keras.Sequential(
            [
                keras.Input((32,)),
                keras.layers.Dense(32),
                keras.layers.BatchNormalization(),
                keras.layers.Dense(3),
            ]
        ),
        gram=True,
        microbatch_size=2,
    )
    wide.compile(optimizer="sgd", loss=cross_entropy())
    xw = np.random.default_rng(0).normal(size=(8, 32)).astype("float32")
    assert step_probes.gram_engine(wide, batch(xw, yb), 2, "auto") == "ghost"
    assert step_probes.gram_engine(wide, batch(xw, yb), 2, "materialize") == (
        "materialize"
    )
    with pytest.raises(ValueError, match="method"):
        training.TrackingConfig(gram=True, method="fast")


def test_partial_last_batch_uses_its_first_multiple_of_m():
    x, y = _data(n=10)  # one batch of 10 with M = 4: samples 0-3, 4-7
    model = _model(tracking={"gram": True, "microbatch_size": 4}, lr=0.0)
    expected = tfb.gradient_statistics(model, (x[:8], y[:8]), microbatch_size=4)
    logs = _fit(model, (x, y), epochs=1, batch_size=10).history
    for key in ("grad_cov/lambda_1", "confusion/cos_min", "grad/norm"):
        assert logs["batch/" + key][-1] == pytest.approx(
            expected[key], rel=1e-5
        ), key


def test_the_step_logs_nine_of_the_gram_statistics_keys():
    # Derived from the one key list, the same nine keys as ever.
    assert training.GRAM_KEYS == (
        "batch/grad_cov/lambda_1",
        "batch/grad_cov/trace",
        "batch/grad_cov/trace_over_lambda_1",
        "batch/confusion/eta",
        "batch/confusion/cos_min",
        "batch/confusion/cos_mean",
        "batch/grad/norm",
        "batch/grad/diversity",
        "batch/grad/noise_scale",
    )
    keys = statistics.metric_keys()
    assert all(key[len("batch/") :] in keys for key in training.GRAM_KEYS)


def test_tracking_is_a_graph_conditional_not_a_retrace(monkeypatch):
    traces = []
    original = training.TrackingModel.train_step

    def counting(self, data):
        traces.append(1)  # Python runs only while tracing
        return original(self, data)

    monkeypatch.setattr(training.TrackingModel, "train_step", counting)
    model = _model(tracking={"every": 3, "gram": True, "hessian_every": 2})
    _fit(model, _data(), epochs=3)
    assert len(traces) == 1


def test_running_hessian_estimate_converges_on_a_fixed_batch():
    x, y = _data(n=8)
    model = _model(tracking={"hessian_every": 1}, lr=0.0)
    history = _fit(model, (x, y), epochs=200)
    running = history.history["hessian/lambda_1_running"][-1]
    top = tfb.hessian_eigenvalues(model, (x, y), k=2)
    assert abs(top[0]) > 1.2 * abs(top[1])  # a clear gap: power converges
    assert running == pytest.approx(top[0], rel=1e-3)


@pytest.mark.parametrize("scale", [np.nan, 1e30], ids=["nan", "overflow"])
def test_running_hessian_keeps_its_direction_through_a_non_finite_batch(
    scale,
):
    # Least squares: H = 2 X^T X / N (with the bias column), so inputs of
    # 1e30 overflow the product to Inf and NaN inputs make it NaN.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8, 3)).astype("float32")
    y = rng.normal(size=(8, 1)).astype("float32")
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model = training.track(base, hessian_every=1)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    _fit(model, (x, y), epochs=50)
    (probe,) = [
        p for p in model._probes.probes if isinstance(p, PowerIteration)
    ]
    good = probe.vector.numpy()
    assert np.all(np.isfinite(good))

    def update(inputs):
        context = StepContext(
            model,
            Batch(tf.constant(inputs), tf.constant(y), None),
            tf.constant(0, "int64"),
            tf.constant(True),
            gradients=[],
        )
        previous = {"hessian/lambda_1_running": tf.constant(0.0, "float64")}
        values = probe.update(context, previous)
        return float(values["hessian/lambda_1_running"])

    bad = x.copy()
    bad[0] *= scale
    assert not np.isfinite(update(bad))  # the diverging batch: NaN/Inf
    np.testing.assert_array_equal(probe.vector.numpy(), good)  # kept
    design = np.hstack([x, np.ones((8, 1))]).astype(np.float64)
    top = np.linalg.eigvalsh(2 * design.T @ design / 8)[-1]
    assert update(x) == pytest.approx(top, rel=1e-3)  # and recovers


def _step_function(train_function):
    """The `tf.function` of one step inside Keras' `train_function`."""
    seen, todo = set(), [train_function]
    while todo:
        fn = todo.pop()
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        if getattr(fn, "__name__", "") == "one_step_on_data" and hasattr(
            fn, "experimental_get_compiler_ir"
        ):
            return fn
        todo.extend(
            getattr(fn, attr)
            for attr in ("__wrapped__", "python_function")
            if hasattr(fn, attr)
        )
        for cell in getattr(fn, "__closure__", None) or ():
            if callable(cell.cell_contents):
                todo.append(cell.cell_contents)
    raise AssertionError("no one_step_on_data tf.function in train_function")


@pytest.mark.parametrize("method", ["auto", "ghost"])
def test_xla_tracked_step_is_compiled_and_matches_the_plain_graph(method):
    # "auto" takes the fused materialized pass on this model.
    data = _data(n=16)
    tracking = {
        "every": 1,
        "gram": True,
        "microbatch_size": 2,
        "hessian_every": 1,
        "method": method,
    }
    runs = {}
    for jit in (False, True):
        model = _model(tracking=tracking, momentum=0.9)
        model.jit_compile = jit
        runs[jit] = model, _fit(model, data, epochs=2).history
    # Keras drops jit_compile with only a warning when a layer cannot be
    # compiled: check that it kept it, and that the step function fit ran
    # is XLA's (only jit-compiled functions have a compiler IR).
    xla_model = runs[True][0]
    assert xla_model.jit_compile is True
    step = _step_function(xla_model.train_function)
    hlo = step.experimental_get_compiler_ir(tuple(map(tf.constant, data)))()
    assert "HloModule" in hlo
    with pytest.raises(ValueError, match="jit_compile"):
        _step_function(
            runs[False][0].train_function
        ).experimental_get_compiler_ir(tuple(map(tf.constant, data)))()
    plain_history, xla_history = runs[False][1], runs[True][1]
    assert set(plain_history) == set(xla_history)
    for key in plain_history:
        np.testing.assert_allclose(
            xla_history[key], plain_history[key], rtol=1e-4, err_msg=key
        )
    _assert_same_variables(runs[False][0], xla_model)


def test_config_round_trip_and_bad_config(tmp_path):
    model = _model(tracking={"every": 4, "gram": True, "microbatch_size": 2})
    _fit(model, _data(), epochs=1)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.tracking == model.tracking
    with pytest.raises(ValueError, match="every"):
        training.TrackingConfig(every=0)
    bn = _model("cnn_bn", tracking={"gram": True})
    with pytest.raises(ValueError, match="microbatch_size >= 2"):
        _fit(bn, _data("cnn_bn"), epochs=1)


_MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    replicas = int(sys.argv[1])
    if replicas > 1:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    sys.path.insert(0, sys.argv[2])
    import keras
    from conftest import build, cross_entropy, data_for
    import tf_breakeven as tfb
    from tf_breakeven import callbacks, schedules, training
    x, y = data_for("mlp", n=32, seed=7)
    x = x.astype("float32")
    strategy = (tf.distribute.MirroredStrategy() if replicas > 1
                else tf.distribute.get_strategy())
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = training.track(build("mlp", compile_loss=False), {
            "gram": True, "microbatch_size": 2, "hessian_every": 1})
        model.compile(optimizer=keras.optimizers.SGD(0.1),
                      loss=cross_entropy())
    probe = tf.data.Dataset.from_tensor_slices((x[:16], y[:16])).batch(4)
    at_3 = schedules.AtSteps([3])
    solver = {"warm_start": False, "tol": 0.0, "num_iterations": 10}
    spectrum = callbacks.BreakEven(probe, schedule=at_3, batch_size=8,
                                   dataset_size=32, **solver)
    covariance = callbacks.GradientCovariance(
        probe, microbatch_size=2, schedule=at_3, blocks="layer")
    history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False,
                        verbose=0, callbacks=[spectrum, covariance])
    out = {k: float(v[-1]) for k, v in history.history.items()}
    # The ghost engine: a tracked step (its signals gathered over
    # replicas) and a callback, with an L2 regularizer's cross terms.
    with strategy.scope():
        keras.utils.set_random_seed(0)
        ghost_model = training.track(build("mlp_l2", compile_loss=False), {
            "gram": True, "microbatch_size": 1, "method": "ghost"})
        ghost_model.compile(optimizer=keras.optimizers.SGD(0.1),
                            loss=cross_entropy())
    ghost_covariance = callbacks.GradientCovariance(
        probe, microbatch_size=1, schedule=at_3, blocks="layer",
        method="ghost")
    ghost_history = ghost_model.fit(
        x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
        callbacks=[ghost_covariance])
    out.update({"ghost/" + k: float(v[-1])
                for k, v in ghost_history.history.items()})
    # Adam: the preconditioned sharpness; per-layer curvature, the spread
    # over probe splits and the gradient alignment.
    with strategy.scope():
        keras.utils.set_random_seed(0)
        adam_model = build("mlp", compile_loss=False)
        adam_model.compile(optimizer=keras.optimizers.Adam(0.01),
                           loss=cross_entropy())
    adaptive = callbacks.BreakEven(probe, schedule=at_3, **solver)
    layers = callbacks.HessianSpectrum(
        probe, blocks="layer", probe_splits=2, alignment=True,
        schedule=at_3, **solver)
    adam_model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
                   callbacks=[adaptive, layers])
    for name, callback in (("cb/", spectrum), ("cb/", covariance),
                           ("ghost_cb/", ghost_covariance),
                           ("adam/", adaptive), ("adam/", layers)):
        out.update({name + k: float(v)
                    for k, v in callback.records[0].items()
                    if isinstance(v, float) and "residual" not in k})
    out["criteria"] = [spectrum.criterion, adaptive.criterion]
    out["replicas"] = strategy.num_replicas_in_sync
    # The probes above ran one batch / sample share per replica.
    out["distributed_probes"] = int(
        tfb.distribute.replica_strategy(model) is not None)
    print("RESULT " + json.dumps(out))
    """
)


def _run_replicas(replicas, tmp_path):
    script = tmp_path / "mirrored.py"
    script.write_text(_MIRRORED_SCRIPT)
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run(
        [sys.executable, str(script), str(replicas), tests_dir],
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [
        line
        for line in result.stdout.splitlines()
        if line.startswith("RESULT ")
    ]
    assert lines, result.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_mirrored_strategy_gives_the_single_device_numbers(tmp_path):
    one = _run_replicas(1, tmp_path)
    two = _run_replicas(2, tmp_path)
    assert one.pop("replicas") == 1 and two.pop("replicas") == 2
    assert one.pop("distributed_probes") == 0
    assert two.pop("distributed_probes") == 1
    assert one.pop("criteria") == two.pop("criteria") == ["sgd", "adam"]
    for key in (
        "cb/breakeven/batch_sharpness",
        "cb/grad_cov/trace/",
        "ghost/batch/grad_cov/lambda_1",
        "ghost_cb/grad_cov/trace/",
        "adam/breakeven/preconditioned_sharpness",
        "adam/hessian/lambda_1/",
        "adam/hessian/lambda_1_std",
        "adam/hessian/gradient_in_top_k",
    ):
        assert any(k.startswith(key) for k in one), key
    assert one.keys() == two.keys()
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
