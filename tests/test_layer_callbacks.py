"""Per-layer curvature, the spread over probe splits, gradient alignment and
batch sharpness as the callbacks record them during `fit`, against dense
float64 references of the model the last record measured."""

import math

import keras
import numpy as np
import pytest
from conftest import (
    alignment_reference,
    build,
    cross_entropy,
    data_for,
    jacobian_hessian,
    plain_gradient,
)

import tf_breakeven as tfb

N = 16


def _fitted(callbacks, epochs=2, batch_size=4):
    model = build("mlp", "float64")
    x, y = data_for("mlp", N)
    model.compile(optimizer=keras.optimizers.SGD(0.3), loss=cross_entropy())
    model.fit(
        x,
        y,
        epochs=epochs,
        batch_size=batch_size,
        verbose=0,
        shuffle=False,
        callbacks=callbacks,
    )
    return model, x, y


def _columns(model, layer):
    """Indices of `layer`'s parameters in the flat parameter vector."""
    start, out = 0, []
    mine = {id(v) for v in layer.trainable_variables}
    for v in model.trainable_variables:
        size = int(np.prod(v.shape))
        if id(v) in mine:
            out.extend(range(start, start + size))
        start += size
    return np.asarray(out)


def _top(matrix):
    return np.linalg.eigvalsh(matrix)[-1]


def test_hessian_spectrum_blocks_splits_and_alignment_match_dense():
    splits = 3  # 16 // 3 = 5 examples each; the 16th is left out
    callback = tfb.HessianSpectrum(
        (data_for("mlp", N)),
        k=2,
        blocks="layer",
        probe_splits=splits,
        alignment=True,
        tol=0.0,
    )
    model, x, y = _fitted([callback])
    record = callback.records[-1]
    hessian = jacobian_hessian(model, x, y, True)
    for layer in model.layers:
        idx = _columns(model, layer)
        want = _top(hessian[np.ix_(idx, idx)])
        got = record[f"hessian/lambda_1/{layer.name}"]
        assert got == pytest.approx(want, rel=1e-9), layer.name
        assert record[f"hessian/residual_1/{layer.name}"] < 1e-8 * want
    size = N // splits
    parts = [
        _top(jacobian_hessian(model, x[a : a + size], y[a : a + size], True))
        for a in range(0, splits * size, size)
    ]
    assert record["hessian/lambda_1_std"] == pytest.approx(
        np.std(parts, ddof=1), rel=1e-8
    )
    g = plain_gradient(model, model.trainable_variables, x, y, True)
    curvature, inside = alignment_reference(hessian, g, 2)
    assert record["hessian/gradient_curvature"] == pytest.approx(
        curvature, rel=1e-10
    )
    assert record["hessian/gradient_in_top_k"] == pytest.approx(
        inside, rel=1e-8
    )
    assert callback.records[0]["hessian/lambda_1_std"] > 0
    assert callback.config()["blocks"] == [layer.name for layer in model.layers]
    assert callback.config()["probe_splits"] == splits


def test_bad_probe_splits_raise_with_the_fix():
    data = data_for("mlp", N)
    with pytest.raises(ValueError, match="probe_splits"):
        tfb.HessianSpectrum(data, probe_splits=1)
    with pytest.raises(ValueError, match="at most as many splits"):
        _fitted([tfb.HessianSpectrum(data, probe_splits=N + 1)], epochs=1)


def test_break_even_records_the_exact_batch_sharpness():
    batch = 4
    callback = tfb.BreakEven(
        data_for("mlp", N), batch_size=batch, dataset_size=N
    )
    model, x, y = _fitted([callback], batch_size=batch)
    assert callback.criterion == "sgd"
    quotients = []
    for a in range(0, N, batch):
        xb, yb = x[a : a + batch], y[a : a + batch]
        h = jacobian_hessian(model, xb, yb, True)
        g = plain_gradient(model, model.trainable_variables, xb, yb, True)
        quotients.append(g @ h @ g / (g @ g))
    got = callback.records[-1]["breakeven/batch_sharpness"]
    assert got == pytest.approx(np.mean(quotients), rel=1e-9)
    assert callback.records[-1]["breakeven/threshold"] == pytest.approx(
        2 / 0.3, rel=1e-6
    )


def test_batch_sharpness_needs_a_probe_of_one_mini_batch():
    data = data_for("mlp", N)
    quiet = tfb.BreakEven(data, batch_size=2 * N, dataset_size=4 * N)
    _fitted([quiet], epochs=1)
    assert "breakeven/batch_sharpness" not in quiet.records[-1]
    assert math.isfinite(quiet.records[-1]["breakeven/stability"])
    strict = tfb.BreakEven(
        data, batch_size=2 * N, dataset_size=4 * N, batch_sharpness=True
    )
    with pytest.raises(ValueError, match="larger probe"):
        _fitted([strict], epochs=1)
    with pytest.raises(ValueError, match="batch_size"):
        tfb.BreakEven(data, batch_sharpness=True)


def test_the_economy_preset_records_whether_its_estimate_converged():
    x, y = data_for("mlp", N)
    callbacks = tfb.preset("economy", (x, y), schedule=1)
    model, _, _ = _fitted(callbacks, epochs=1)
    (callback,) = callbacks
    flags = [r["hessian/converged"] for r in callback.records]
    assert flags and set(flags) <= {0.0, 1.0}
    for record in callback.records:
        # Converged means the recorded residual met the default tolerance.
        bound = tfb.spectrum.DEFAULT_TOL * abs(record["hessian/lambda_1"])
        assert record["hessian/converged"] == float(
            record["hessian/residual_1"] <= bound
        )
