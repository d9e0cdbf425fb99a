"""The ghost Gram engine against the materialized one (float64 product
of loop-independent, vectorized sample gradients, itself tested against
loop references in test_gradients.py)."""

import keras
import numpy as np
import pytest
from conftest import BUILDERS, build, data_for, rel_err

import tf_breakeven as tfb
from tf_breakeven import gradients

CASES = [
    (name, m, training)
    for name in [*BUILDERS, "bert"]
    for m, training in ((1, False), (2, True))
]


@pytest.mark.parametrize("name,microbatch_size,training", CASES)
def test_ghost_gram_equals_the_materialized_gram(
    name, microbatch_size, training
):
    model = build(name)
    x, y = data_for(name)
    weights = np.random.default_rng(1).random(8).astype("float32")
    kwargs = dict(microbatch_size=microbatch_size, training=training)
    expected = tfb.gradient_gram(
        model, (x, y, weights), method="materialize", **kwargs
    )
    rows = gradients.sample_rows(
        model, (x, y, weights), method="ghost", **kwargs
    )
    assert rel_err(rows.gram(), expected) < 1e-5
    if not name.startswith("lstm") or name == "lstm_unrolled":
        assert rows.kernel.tapped  # some kernel went the ghost way


def _strided_cnn():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((9, 9, 2)),
            keras.layers.Conv2D(3, 3, strides=2, padding="same"),
            keras.layers.Activation("tanh"),
            keras.layers.Conv2D(4, 2, dilation_rate=2),
            keras.layers.Flatten(),
            keras.layers.Dense(3, kernel_regularizer="l2"),
        ]
    )
    model.compile(loss="sparse_categorical_crossentropy")
    return model


def _sequence_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,), dtype="int32"),
            keras.layers.Embedding(9, 4),
            keras.layers.Conv1D(5, 3, padding="causal"),
            keras.layers.LayerNormalization(),
            keras.layers.EinsumDense("abc,cd->abd", (None, 3)),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(3),
        ]
    )
    model.compile(loss="sparse_categorical_crossentropy")
    return model


@pytest.mark.parametrize("builder", [_strided_cnn, _sequence_model])
def test_ghost_engine_on_strided_padded_and_sequence_layers(builder):
    model = builder()
    rng = np.random.default_rng(0)
    if builder is _sequence_model:
        x = rng.integers(0, 9, (8, 6)).astype("int32")
    else:
        x = rng.normal(size=(8, 9, 9, 2)).astype("float32")
    y = rng.integers(0, 3, 8)
    for m in (1, 2):
        expected = tfb.gradient_gram(
            model, (x, y), method="materialize", microbatch_size=m
        )
        got = tfb.gradient_gram(
            model, (x, y), method="ghost", microbatch_size=m
        )
        assert rel_err(got, expected) < 1e-5
    rows = gradients.sample_rows(model, (x, y), method="ghost")
    kinds = {calls[0][0] for calls in rows.kernel.tapped.values()}
    assert kinds >= (
        {"conv", "matmul"}
        if builder is _strided_cnn
        else {"take", "conv", "einsum", "matmul"}
    )
    values, vectors = tfb.gradient_covariance_eigenpairs(
        model, (x, y), k=2, method="ghost"
    )
    ref_values, ref_vectors = tfb.gradient_covariance_eigenpairs(
        model, (x, y), k=2, method="materialize"
    )
    assert rel_err(values, ref_values) < 1e-5
    for got, want in zip(vectors[0], ref_vectors[0]):
        np.testing.assert_allclose(got, want, atol=1e-5)
    traces = tfb.gradient_trace_by_block(model, (x, y), method="ghost")
    ref = tfb.gradient_trace_by_block(model, (x, y), method="materialize")
    for key in ref:
        assert traces[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-9)


def test_statistics_take_the_method_and_bad_methods_are_refused():
    model = build("mlp_l2")
    x, y = data_for("mlp_l2")
    got = tfb.gradient_statistics(model, (x, y), method="ghost")
    want = tfb.gradient_statistics(model, (x, y), method="materialize")
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-7), key
    with pytest.raises(ValueError, match="auto"):
        tfb.gradient_gram(model, (x, y), method="fast")


def _conv_stack():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(8, 3),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("tanh"),
            keras.layers.Conv2D(8, 3),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3),
        ]
    )
    model.compile(loss="sparse_categorical_crossentropy")
    return model


def test_auto_takes_ghost_where_its_kernels_hold_the_parameters():
    # MLP and embedding: every kernel is a ghost (resp. shared-token)
    # product. The conv stack: both convolutions form their sample
    # gradients (8 samples of 16 resp. 4 positions, 18 resp. 72 inputs by
    # 8 outputs), and the Dense head that would go ghost holds 24 of the
    # 779 parameters, under a quarter: the materialized engine.
    x, y = data_for("cnn")
    conv = _conv_stack()
    rows = gradients.sample_rows(conv, (x, y), training=False)
    assert rows.method == "materialize"
    ghost_rows = gradients.sample_rows(
        conv, (x, y), method="ghost", training=False
    )
    methods = ghost_rows.kernel.layer_methods(ghost_rows.samples, 2 << 30)
    assert sorted(methods.values()) == ["ghost", "materialize", "materialize"]
    assert rel_err(ghost_rows.gram(), rows.gram()) < 1e-5
    # Rows that do not fit the budget at once: ghost whatever the layers.
    assert rows.dim == 779
    small = gradients.sample_rows(
        conv, (x, y), training=False, memory_budget=8 * 779 * 12 - 1
    )
    assert small.method == "ghost"
    for name in ("mlp", "embedding"):
        model = build(name)
        assert gradients.sample_rows(model, data_for(name)).method == "ghost"


@pytest.mark.parametrize(
    "method,budget",
    [
        ("sparse", 2**31),
        ("sparse", 8 * 4 * 3 * 5),
        ("ghost", 2**31),
        ("materialize", 2**31),
    ],
)
def test_embedding_part_equals_a_loop_over_samples(method, budget):
    # Ids with repeats inside a sample and tokens shared by some samples
    # only; a budget of 5 pairs per chunk runs the shared-token product in
    # many chunks.
    from tf_breakeven import ghost

    rng = np.random.default_rng(3)
    n, positions, vocabulary, width = 6, 5, 7, 3
    ids = rng.integers(0, vocabulary, (n, positions)).astype("int32")
    ids[0, :2] = ids[0, 2]
    ids[4] = 6
    b = rng.normal(size=(n, positions, width)).astype("float32")
    per_sample = np.zeros((n, vocabulary, width))
    for i in range(n):
        np.add.at(per_sample[i], ids[i], b[i].astype("float64"))
    flat = per_sample.reshape(n, -1)
    layer = ghost.Layer(
        index=0,
        kind="take",
        options={},
        shape=(vocabulary, width),
        n=n,
        positions=positions,
        d_in=vocabulary,
        d_out=width,
    )
    got = ghost.layer_gram(layer, ids, b, method, memory_budget=budget)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, flat @ flat.T, rtol=1e-6, atol=1e-6)
