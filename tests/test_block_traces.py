"""Per-block traces Tr(K_b) of the gradient covariance, and variable blocks.

References never go through tf_breakeven: sample gradients come from a
Python loop of plain float64 gradients (one call per micro-batch), their
columns from the layout of `conftest.flat`, and Tr(K_b) from centering
those rows in numpy.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import build, cross_entropy, data_for, flat, plain_gradient

import tf_breakeven as tfb
from tf_breakeven import blocks, schedules
from tf_breakeven import callbacks as cb
from tf_breakeven.gradients import gradient_trace_by_block


def _take(x, start, stop):
    return tf.nest.map_structure(lambda a: a[start:stop], x)


def loop_rows(model, x, y, microbatch_size=1, w=None):
    """Gradients of consecutive micro-batches, one Python call each."""
    params = [v.value for v in model.trainable_variables]
    rows = []
    for lo in range(0, len(y), microbatch_size):
        hi = lo + microbatch_size
        weight = None if w is None else w[lo:hi]
        rows.append(
            plain_gradient(
                model, params, _take(x, lo, hi), y[lo:hi], True, weight
            )
        )
    return np.stack(rows)


def reference_traces(model, rows, groups):
    """`{name: Tr(K_b)}` for groups `{name: [variables]}`, numpy float64."""
    sizes = [int(np.prod(v.shape)) for v in model.trainable_variables]
    offsets = np.cumsum([0] + sizes)
    position = {id(v): i for i, v in enumerate(model.trainable_variables)}
    centered = rows - rows.mean(axis=0)
    out = {}
    for name, variables in groups.items():
        columns = np.concatenate(
            [
                np.arange(
                    offsets[position[id(v)]], offsets[position[id(v)] + 1]
                )
                for v in variables
            ]
        )
        out[name] = np.sum(centered[:, columns] ** 2) / len(rows)
    return out


def layer_groups(model):
    return {
        layer.name: list(layer.trainable_variables)
        for layer in model.layers
        if layer.trainable_variables
    }


def _mapping(model):
    """Kernels (one as a variable, the rest as paths) and the first bias;
    the other biases are in no block."""
    kernels = [
        layer.kernel for layer in model.layers if hasattr(layer, "kernel")
    ]
    first_bias = next(
        layer.bias for layer in model.layers if hasattr(layer, "bias")
    )
    given = {
        "kernels": [kernels[0]] + [k.path for k in kernels[1:]],
        "bias": first_bias.path,
    }
    groups = {"kernels": kernels, "bias": [first_bias]}
    return given, groups


def _probe(name, n, weighted):
    x, y = data_for(name, n=n)
    w = np.random.default_rng(3).uniform(0.3, 2.0, n) if weighted else None
    return x, y, w


def _assert_close(got, expected, rtol=1e-6):
    assert list(got) == list(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=rtol, err_msg=key)


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
@pytest.mark.parametrize("microbatch_size", [1, 2], ids=["M1", "M2"])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_traces_equal_float64_numpy_from_loop_gradients(
    name, microbatch_size, weighted
):
    model = build(name, "float64")
    x, y, w = _probe(name, 12, weighted)
    data = (x, y) if w is None else (x, y, w)
    rows = loop_rows(model, x, y, microbatch_size, w)
    by_layer = gradient_trace_by_block(
        model, data, microbatch_size=microbatch_size
    )
    _assert_close(by_layer, reference_traces(model, rows, layer_groups(model)))
    given, groups = _mapping(model)
    by_mapping = gradient_trace_by_block(
        model, data, blocks=given, microbatch_size=microbatch_size
    )
    _assert_close(by_mapping, reference_traces(model, rows, groups))


def test_chunked_traces_equal_unchunked():
    model = build("cnn", "float64")
    x, y, w = _probe("cnn", 10, weighted=True)
    dim = flat(model.trainable_variables).size
    chunked = gradient_trace_by_block(
        model, (x, y, w), memory_budget=3 * 24 * dim
    )
    rows = loop_rows(model, x, y, w=w)
    _assert_close(chunked, reference_traces(model, rows, layer_groups(model)))


class _Scaled(keras.Model):
    """A Dense layer times the model's own weight (a block "other")."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(3)
        self.scale = self.add_weight(
            shape=(3,), initializer="ones", name="scale"
        )

    def call(self, x, training=None):
        return self.dense(x) * self.scale


def _scaled():
    keras.utils.set_random_seed(0)
    model = _Scaled()
    model(np.zeros((1, 4), "float32"))
    model.compile(loss=cross_entropy())
    return model


@pytest.mark.parametrize("name", ["mlp", "subclassed"])
def test_layer_traces_sum_to_grad_cov_trace(name):
    model = build("mlp") if name == "mlp" else _scaled()
    x, y = data_for("mlp", n=12)
    x = x.astype("float32")
    traces = gradient_trace_by_block(model, (x, y), microbatch_size=2)
    if name == "subclassed":
        assert list(traces) == [model.dense.name, "other"]
    stats = tfb.gradient_statistics(model, (x, y), microbatch_size=2)
    assert sum(traces.values()) == pytest.approx(
        stats["grad_cov/trace"], rel=1e-9
    )


class _DirectAtMeasurement(keras.callbacks.Callback):
    """Runs `fn(model)` right after `probe` measured, at the same step."""

    def __init__(self, probe, fn):
        super().__init__()
        self.probe, self.fn, self.pairs = probe, fn, []

    def on_train_batch_end(self, batch, logs=None):
        if len(self.pairs) < len(self.probe.records):
            self.pairs.append((self.probe.records[-1], self.fn(self.model)))


def test_gradient_covariance_callback_records_layer_traces():
    model = build("mlp")
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss=cross_entropy())
    x, y = data_for("mlp", n=32, seed=7)
    x = x.astype("float32")
    probe = (x[:16], y[:16])
    callback = cb.GradientCovariance(
        probe,
        microbatch_size=2,
        blocks="layer",
        schedule=schedules.AtSteps([3]),
    )

    def direct(m):
        kwargs = {"microbatch_size": 2}
        return (
            gradient_trace_by_block(m, probe, **kwargs),
            tfb.gradient_statistics(m, probe, **kwargs),
        )

    check = _DirectAtMeasurement(callback, direct)
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=1,
        verbose=0,
        shuffle=False,
        callbacks=[callback, check],
    )
    ((record, (traces, stats)),) = check.pairs
    names = [layer.name for layer in model.layers]
    block_keys = [f"grad_cov/trace/{layer}" for layer in names]
    keys = callback.metric_keys()
    assert keys[-len(block_keys) :] == block_keys
    assert callback.config()["blocks"] == names
    for layer in names:
        assert record[f"grad_cov/trace/{layer}"] == pytest.approx(
            traces[layer], rel=1e-9
        )
    for key in keys[: -len(block_keys)]:
        assert record[key] == stats[key] or (
            math.isnan(record[key]) and math.isnan(stats[key])
        ), key


def test_only_grad_cov_callbacks_take_blocks():
    x, y = data_for("mlp", n=8)
    with pytest.raises(ValueError, match="pass `blocks` to GradientCovariance"):
        cb.GradientConfusion((x, y), blocks="layer")
    plain = cb.GradientCovariance((x, y))
    assert "blocks" not in plain.config()
    assert not any(k.startswith("grad_cov/trace/") for k in plain.metric_keys())


def _bad_blocks():
    model = build("mlp")
    other = build("mlp", seed=1)
    kernel = model.layers[0].kernel
    return model, [
        ("layers", "must be 'layer' or a mapping"),
        ({"a": [other.layers[0].kernel]}, "not a trainable variable"),
        ({"a": [kernel], "b": [kernel.path]}, "in blocks 'a' and 'b'"),
        ({"a": []}, "is empty"),
        ({}, "non-empty mapping"),
    ]


def test_bad_blocks_raise_with_a_fix():
    model, cases = _bad_blocks()
    x, y = data_for("mlp", n=8)
    for given, match in cases:
        with pytest.raises(ValueError, match=match):
            gradient_trace_by_block(
                model, (x.astype("float32"), y), blocks=given
            )


def test_fewer_than_two_samples_raise():
    model = build("mlp")
    x, y = data_for("mlp", n=2)
    with pytest.raises(ValueError, match="at least 2 sample gradients"):
        gradient_trace_by_block(
            model, (x.astype("float32"), y), microbatch_size=2
        )


def test_nan_weight_gives_nan_traces_without_raising():
    model = build("mlp")
    kernel = model.layers[0].kernel
    kernel.assign(tf.tensor_scatter_nd_update(kernel, [[0, 0]], [np.nan]))
    x, y = data_for("mlp", n=8)
    traces = gradient_trace_by_block(model, (x.astype("float32"), y))
    assert list(traces) == [layer.name for layer in model.layers]
    assert all(math.isnan(value) for value in traces.values())


def _indices(model, variables):
    position = {id(v): i for i, v in enumerate(model.trainable_variables)}
    return sorted(position[id(v)] for v in variables)


def test_layer_blocks_of_a_sequential_with_batch_norm_and_a_nested_model():
    model = build("cnn_bn")
    groups = blocks.variable_blocks(model, "layer")
    expected = {
        layer.name: _indices(model, layer.trainable_variables)
        for layer in model.layers
        if layer.trainable_variables
    }
    assert groups == expected
    bn = model.layers[1]
    assert groups[bn.name] == _indices(model, [bn.gamma, bn.beta])
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    outer = keras.Sequential([keras.Input((4,)), inner, keras.layers.Dense(2)])
    outer.layers[1].trainable = False
    assert blocks.variable_blocks(outer, "layer") == {
        inner.name: _indices(outer, inner.trainable_variables)
    }


def test_a_subclassed_models_own_weight_is_other():
    model = _scaled()
    assert blocks.variable_blocks(model, "layer") == {
        model.dense.name: _indices(model, model.dense.trainable_variables),
        "other": _indices(model, [model.scale]),
    }


def test_path_strings_name_the_same_variables():
    model = build("mlp")
    first, second = model.layers
    by_variable = blocks.variable_blocks(
        model, {"one": first.trainable_variables, "two": second.kernel}
    )
    by_path = blocks.variable_blocks(
        model,
        {
            "one": [v.path for v in first.trainable_variables],
            "two": second.kernel.path,
        },
    )
    assert (
        by_variable
        == by_path
        == {
            "one": _indices(model, first.trainable_variables),
            "two": _indices(model, [second.kernel]),
        }
    )


def test_flat_columns_locate_variables_in_the_flat_vector():
    shapes = [tf.TensorShape(s) for s in [(2, 3), (3,), (3, 4), (4,)]]
    assert blocks.flat_columns(shapes, [2, 0]) == [(0, 6), (9, 21)]
    assert blocks.flat_columns(shapes, [3]) == [(21, 25)]
    assert blocks.flat_columns(shapes, []) == []
