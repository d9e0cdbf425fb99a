"""Shared tiny models and exact references for the tests.

References here never go through tf_breakeven: the full Hessian comes from
`tape.jacobian` of a plain first-order gradient, finite differences use the
plain gradient of a float64 model (first derivatives are exact through
normalization layers; only second-order autodiff is affected,
docs/pitfalls.md#P1),
and per-example gradients come from a Python loop.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import contextlib  # noqa: E402

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# The fields of every claims.json entry (issue contract of the reproduce
# launcher).
CLAIM_KEYS = {"paper", "claim", "verdict", "effect", "seeds", "figure"}


def cross_entropy():
    # A fresh loss per model: a Keras loss object built for a float64 model
    # breaks a float32 model compiled with the same object.
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@contextlib.contextmanager
def floatx(dtype):
    # Keras caches a global dtype policy on first use, so floatx alone does
    # not decide the dtype of new layers: set both.
    previous = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx(dtype)
    keras.config.set_dtype_policy(dtype)
    try:
        yield
    finally:
        keras.config.set_floatx(previous[0])
        keras.config.set_dtype_policy(previous[1])


def _bert(dtype):
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=20,
        num_layers=1,
        num_heads=2,
        hidden_dim=4,
        intermediate_dim=8,
        max_sequence_length=5,
        dtype=dtype,
    )
    return keras_hub.models.BertTextClassifier(
        backbone=backbone,
        num_classes=3,
        preprocessor=None,
        dropout=0.0,
        dtype=dtype,
    )


def _sequential(input_shape, layers, input_dtype=None):
    return keras.Sequential(
        [keras.Input(input_shape, dtype=input_dtype)] + layers
    )


BUILDERS = {
    "mlp": lambda: _sequential(
        (4,),
        [keras.layers.Dense(6, activation="tanh"), keras.layers.Dense(3)],
    ),
    "mlp_l2": lambda: _sequential(
        (4,),
        [
            keras.layers.Dense(
                5,
                activation="tanh",
                kernel_regularizer=keras.regularizers.L2(0.1),
            ),
            keras.layers.Dense(3),
        ],
    ),
    "cnn": lambda: _sequential(
        (6, 6, 2),
        [
            keras.layers.Conv2D(3, 3, activation="tanh"),
            keras.layers.AveragePooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ],
    ),
    "cnn_bn": lambda: _sequential(
        (6, 6, 2),
        [
            keras.layers.Conv2D(3, 3),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("tanh"),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ],
    ),
    "layer_norm": lambda: _sequential(
        (5,),
        [
            keras.layers.Dense(6),
            keras.layers.LayerNormalization(),
            keras.layers.Activation("tanh"),
            keras.layers.Dense(3),
        ],
    ),
    "group_norm": lambda: _sequential(
        (5,),
        [
            keras.layers.Dense(6),
            keras.layers.GroupNormalization(groups=2),
            keras.layers.Activation("tanh"),
            keras.layers.Dense(3),
        ],
    ),
    "dropout": lambda: _sequential(
        (4,),
        [
            keras.layers.Dense(6, activation="tanh"),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(3),
        ],
    ),
    "bn_dropout": lambda: _sequential(
        (4,),
        [
            keras.layers.Dense(6),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("tanh"),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(3),
        ],
    ),
    "embedding": lambda: _sequential(
        (5,),
        [
            keras.layers.Embedding(7, 3),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ],
        "int32",
    ),
    "lstm": lambda: _sequential(
        (5,),
        [
            keras.layers.Embedding(7, 3),
            keras.layers.LSTM(4),
            keras.layers.Dense(3),
        ],
        "int32",
    ),
    "lstm_unrolled": lambda: _sequential(
        (5,),
        [
            keras.layers.Embedding(7, 3),
            keras.layers.LSTM(4, unroll=True),
            keras.layers.Dense(3),
        ],
        "int32",
    ),
}


def build(name, dtype="float32", seed=0, compile_loss=True):
    """Builds a tiny model; the same seed gives the same weights."""
    keras.utils.set_random_seed(seed)
    with floatx(dtype):
        model = _bert(dtype) if name == "bert" else BUILDERS[name]()
    if compile_loss:
        model.compile(loss=cross_entropy())
    return model


def twin(model_name, seed=0):
    """A float32 model and its float64 copy with identical weights."""
    model32 = build(model_name, "float32", seed)
    model64 = build(model_name, "float64", seed)
    model64.set_weights([w.astype(np.float64) for w in model32.get_weights()])
    return model32, model64


def data_for(name, n=8, seed=0):
    """Deterministic inputs and labels for a model of `BUILDERS`."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    if name == "bert":
        x = {
            "token_ids": rng.integers(0, 20, (n, 5)).astype("int32"),
            "segment_ids": np.zeros((n, 5), "int32"),
            "padding_mask": np.ones((n, 5), "int32"),
        }
    elif name in ("embedding", "lstm", "lstm_unrolled"):
        x = rng.integers(0, 7, (n, 5)).astype("int32")
    elif name.startswith("cnn"):
        x = rng.normal(size=(n, 6, 6, 2))
    elif name in ("layer_norm", "group_norm"):
        x = rng.normal(size=(n, 5))
    else:
        x = rng.normal(size=(n, 4))
    return x, y


def cast_inputs(x, dtype):
    return tf.nest.map_structure(
        lambda a: a.astype(dtype) if a.dtype.kind == "f" else a, x
    )


def flat(tensors):
    return np.concatenate(
        [
            np.asarray(tf.convert_to_tensor(t), np.float64).ravel()
            for t in tensors
        ]
    )


def unflat(vector, model):
    out, i = [], 0
    for v in model.trainable_variables:
        size = int(np.prod(v.shape))
        out.append(vector[i : i + size].reshape(v.shape))
        i += size
    return out


def plain_loss(model, params, x, y, training, sample_weight=None):
    """Mean loss (+ regularization) by stateless_call, stock Keras only."""
    state = [v.value for v in model.non_trainable_variables]
    y_pred, _, reg = model.stateless_call(
        params, state, x, training=training, return_losses=True
    )
    losses = keras.losses.sparse_categorical_crossentropy(
        y, y_pred, from_logits=True
    )
    if sample_weight is not None:
        losses = losses * tf.cast(sample_weight, losses.dtype)
    loss = tf.reduce_mean(losses)
    return loss + tf.add_n(reg) if reg else loss


def plain_gradient(model, params, x, y, training, sample_weight=None):
    params = [tf.convert_to_tensor(p) for p in params]
    with tf.GradientTape() as tape:
        tape.watch(params)
        loss = plain_loss(model, params, x, y, training, sample_weight)
    return flat([tf.convert_to_tensor(g) for g in tape.gradient(loss, params)])


def fd_hvp(model64, x, y, vector, training, eps=1e-6, sample_weight=None):
    """Central finite differences of the float64 gradient along `vector`."""
    base = flat(model64.trainable_variables)
    plus = unflat(base + eps * vector, model64)
    minus = unflat(base - eps * vector, model64)
    return (
        plain_gradient(model64, plus, x, y, training, sample_weight)
        - plain_gradient(model64, minus, x, y, training, sample_weight)
    ) / (2 * eps)


def split_flat(theta, shapes):
    """A flat parameter tensor as tensors of `shapes`."""
    sizes = [int(np.prod(s)) for s in shapes]
    parts = tf.split(theta, sizes)
    return [tf.reshape(p, s) for p, s in zip(parts, shapes)]


def jacobian_hessian_of(loss_fn, theta0):
    """Full Hessian of the scalar `loss_fn(theta)` by tape.jacobian, float64."""
    theta = tf.constant(theta0, tf.float64)
    with tf.GradientTape() as outer:
        outer.watch(theta)
        with tf.GradientTape() as inner:
            inner.watch(theta)
            loss = loss_fn(theta)
        grad = inner.gradient(loss, theta)
    hessian = outer.jacobian(grad, theta).numpy()
    return (hessian + hessian.T) / 2


def second_derivative_along(loss_vector_fn, theta0, direction):
    """d^2/dt^2 of every entry of `loss_vector_fn(theta0 + t e)` at t = 0."""
    t = tf.constant(0.0, tf.float64)
    theta0 = tf.constant(theta0, tf.float64)
    direction = tf.constant(direction, tf.float64)
    with tf.GradientTape() as outer:
        outer.watch(t)
        with tf.GradientTape() as inner:
            inner.watch(t)
            losses = loss_vector_fn(theta0 + t * direction)
        first = inner.jacobian(losses, t)
    return outer.jacobian(first, t).numpy()


def jacobian_hessian(model64, x, y, training, sample_weight=None):
    """Full float64 Hessian by tape.jacobian (wrong through normalization)."""
    shapes = [v.shape for v in model64.trainable_variables]
    return jacobian_hessian_of(
        lambda theta: plain_loss(
            model64, split_flat(theta, shapes), x, y, training, sample_weight
        ),
        flat(model64.trainable_variables),
    )


def snapshot(model):
    """Bitwise copy of every variable of the model and its optimizer."""
    values = {v.path: np.array(v.numpy()) for v in model.variables}
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and optimizer.built:
        values.update(
            {"opt/" + v.path: np.array(v.numpy()) for v in optimizer.variables}
        )
    values["tf_global_generator"] = np.array(
        tf.random.get_global_generator().state.numpy()
    )
    return values


def assert_unchanged(before, after):
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def alignment_reference(hessian, gradient, k):
    """(g^T H g / ||g||^2, share of ||g||^2 in the top-k eigenspace of H),
    float64 numpy from the exact Hessian."""
    _, vectors = np.linalg.eigh(hessian)
    top = vectors[:, ::-1][:, :k]
    squared = gradient @ gradient
    return (
        gradient @ hessian @ gradient / squared,
        np.sum((top.T @ gradient) ** 2) / squared,
    )
