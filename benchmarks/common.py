"""Models, random data and timing helpers shared by the benchmark scripts.

The benchmark models are built here (not imported from a model zoo) so the
numbers in BENCHMARKS.md stay reproducible while the zoo changes. Model
names carry their sequence length where there is one:

* `cnn`: the Keras CIFAR-10 example network at 32x32x3 (conv32-conv32-pool-
  conv64-conv64-pool-dense512-dense10; dropout omitted), 1.25M parameters.
* `resnet<depth>` (e.g. `resnet20`, `resnet8`): a CIFAR ResNet (He et al.
  2016) with BatchNormalization, three stages of (depth - 2) / 6 basic
  blocks with 16/32/64 filters, at 32x32x3.
* `lstm<T>` (e.g. `lstm128`): Embedding(10000, 32) -> LSTM(64, unroll=True)
  -> Dense(2) on T tokens; `lstmrolled<T>` is the same with `unroll=False`
  (a `tf.while_loop`).
* `bert<T>` (e.g. `bert128`): a 2-layer keras-hub BertBackbone (vocabulary
  1000, hidden 64, 2 heads, intermediate 128, max sequence 128, dropout 0.1
  as keras-hub sets it) with a 3-class BertTextClassifier head on T tokens.
* `zoo:<name>`: a model of the repository's zoo
  (`tf_breakeven.models.get_model`) in a small-but-real configuration, see
  `ZOO` (these follow the zoo, so their numbers may change with it), and
  `zoo:wrn28_10` (`LARGE`: WideResNet-28-10, 36.5M parameters, named
  explicitly, not in the zoo table's default list).
* `peers:simple_cnn`, `peers:resnet32`: the zoo models `benchmarks/peers.py`
  compares with their PyTorch twins (`peer_model`: dropout off, seeded
  random BatchNormalization moving statistics; `peer_batch`: 10 classes).

Every model is compiled with sparse categorical cross-entropy on logits.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import re  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_breakeven.functional import Batch, ModelFunction, dense  # noqa: E402

_LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
_MODEL_NAME = re.compile(r"^(cnn|resnet|lstmrolled|lstm|bert)(\d*)$")


def _cnn() -> keras.Model:
    conv = keras.layers.Conv2D
    return keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            conv(32, 3, padding="same", activation="relu"),
            conv(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            conv(64, 3, padding="same", activation="relu"),
            conv(64, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(10),
        ],
        name="cnn",
    )


def _resnet(depth: int) -> keras.Model:
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"ResNet depth must be 6k + 2 >= 8; got {depth}.")
    layers = keras.layers

    def conv_bn(h, filters, strides=1, relu=True):
        h = layers.Conv2D(filters, 3, strides, "same", use_bias=False)(h)
        h = layers.BatchNormalization()(h)
        return layers.ReLU()(h) if relu else h

    inputs = keras.Input((32, 32, 3))
    h = conv_bn(inputs, 16)
    for stage, filters in enumerate((16, 32, 64)):
        for block in range((depth - 2) // 6):
            strides = 2 if stage > 0 and block == 0 else 1
            shortcut = h
            if strides != 1:
                shortcut = layers.Conv2D(filters, 1, strides, use_bias=False)(h)
                shortcut = layers.BatchNormalization()(shortcut)
            h = conv_bn(conv_bn(h, filters, strides), filters, relu=False)
            h = layers.ReLU()(layers.Add()([h, shortcut]))
    h = layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, layers.Dense(10)(h), name=f"resnet{depth}")


def _lstm(seq_len: int, unroll: bool) -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((seq_len,), dtype="int32"),
            keras.layers.Embedding(10_000, 32),
            keras.layers.LSTM(64, unroll=unroll),
            keras.layers.Dense(2),
        ],
        name=f"lstm{'' if unroll else 'rolled'}{seq_len}",
    )


def _bert(seq_len: int) -> keras.Model:
    import keras_hub

    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=1000,
        num_layers=2,
        num_heads=2,
        hidden_dim=64,
        intermediate_dim=128,
        max_sequence_length=128,
    )
    return keras_hub.models.BertTextClassifier(
        backbone=backbone, num_classes=3, preprocessor=None
    )


# zoo name -> (registry name, builder arguments, vocabulary or None).
ZOO = {
    "simple_cnn": ("simple_cnn", {}, None),  # with its dropout .25/.25/.5
    "simple_cnn_bn": ("simple_cnn", {"batch_norm": True}, None),
    "resnet32": ("resnet32", {}, None),
    "wide_resnet": ("wide_resnet", {"depth": 16, "width": 2}, None),
    "densenet_bc": ("densenet_bc", {"depth": 40, "growth_rate": 12}, None),
    "mlp": ("mlp", {"width": 512, "depth": 4, "input_shape": (784,)}, None),
    # The ghost Gram's wide MLP (784-1024-1024-10, 1.86M parameters).
    "wide_mlp": (
        "mlp",
        {"width": 1024, "depth": 2, "input_shape": (784,)},
        None,
    ),
    # IMDB LSTM defaults (vocabulary 20000, embedding 128, 128 units,
    # unrolled) at 128 tokens; bert_tiny (2 layers, 2 heads, hidden 128,
    # intermediate 512, vocabulary 30522, 512 positions, dropout 0.1), 3
    # classes, at 128 tokens.
    "lstm": ("lstm", {"sequence_length": 128}, 20000),
    "bert": ("bert", {"config": "bert_tiny", "num_classes": 3}, 30522),
}


# Too large for the zoo table's every call (36.5M parameters: its
# materialized Gram rows at N = 128 need 56 GB); named explicitly.
LARGE = {"wrn28_10": ("wide_resnet", {"depth": 28, "width": 10}, None)}


def _zoo(name: str, batch_size: int, rng) -> tuple[Any, Any]:
    from tf_breakeven import models

    known = {**ZOO, **LARGE}
    if name not in known:
        raise ValueError(f"Unknown zoo model {name!r}; one of {sorted(known)}.")
    registry_name, kwargs, vocabulary = known[name]
    model = models.get_model(registry_name, **kwargs)
    if registry_name == "bert":
        shape = (batch_size, 128)
        x = {
            "token_ids": rng.integers(0, vocabulary, shape, "int32"),
            "segment_ids": np.zeros(shape, "int32"),
            "padding_mask": np.ones(shape, "int32"),
        }
        return model, x
    shape = (batch_size, *model.input_shape[1:])
    if vocabulary:
        return model, rng.integers(0, vocabulary, shape, "int32")
    return model, rng.normal(size=shape).astype("float32")


def peer_model(name: str, seed: int, tiny: bool = False) -> keras.Model:
    """A zoo model as `benchmarks/peers.py` builds it in every process.

    "simple_cnn" (dropout off) or "resnet32" at 32x32x3 (10x10x3 and a few
    hundred parameters with `tiny`), 10 classes, compiled with the loss
    only; the BatchNormalization moving statistics are seeded random, so
    inference-mode BN is not the identity.
    """
    from tf_breakeven import models

    keras.utils.set_random_seed(seed)
    shape = (10, 10, 3) if tiny else (32, 32, 3)
    if name == "simple_cnn":
        extra = {"filters": (4, 8), "dense_units": 16} if tiny else {}
        extra |= {"conv_dropout": 0.0, "dense_dropout": 0.0}
    elif name == "resnet32":
        extra = {"depth": 8, "base_filters": 4} if tiny else {}
    else:
        raise ValueError(f"Unknown peer model {name!r}: simple_cnn/resnet32.")
    model = models.get_model(name, num_classes=10, input_shape=shape, **extra)
    model.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            rng = np.random.default_rng(len(layer.name))
            size = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(0, 0.1, size))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, size))
    return model


def peer_batch(model, batch_size: int, seed: int) -> tuple[Any, Any]:
    """`peer_model`'s batch: NHWC float32 images, int32 labels (numpy)."""
    rng = np.random.default_rng(seed)
    shape = (batch_size, *model.input_shape[1:])
    x = rng.normal(size=shape).astype("float32")
    return x, rng.integers(0, 10, batch_size).astype("int32")


def build(name: str, batch_size: int, seed: int = 0) -> tuple[Any, Any, Any]:
    """Builds a compiled benchmark model and one random batch for it.

    Args:
        name: a model name (see the module docstring).
        batch_size: examples in the batch.
        seed: seed of Keras initializers and of the data.

    Returns:
        `(model, x, y)` with `x`, `y` tensors (a dict `x` for BERT).
    """
    if name.startswith("peers:"):
        model = peer_model(name.removeprefix("peers:"), seed)
        x, y = peer_batch(model, batch_size, seed)
        return model, tf.constant(x), tf.constant(y)
    match = _MODEL_NAME.match(name)
    if not (match or name.startswith("zoo:")):
        raise ValueError(f"Unknown model {name!r}; see benchmarks/common.py.")
    kind, number = match.groups() if match else ("zoo", "")
    number = int(number or 0)
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    classes = 10
    if kind == "zoo":
        model, x = _zoo(name.removeprefix("zoo:"), batch_size, rng)
        classes = model.output_shape[-1]
    elif kind == "cnn":
        model = _cnn()
        x = rng.normal(size=(batch_size, 32, 32, 3)).astype("float32")
    elif kind == "resnet":
        model = _resnet(number or 20)
        x = rng.normal(size=(batch_size, 32, 32, 3)).astype("float32")
    elif kind in ("lstm", "lstmrolled"):
        model = _lstm(number or 128, unroll=kind == "lstm")
        x = rng.integers(0, 10_000, (batch_size, number or 128), "int32")
        classes = 2
    else:
        model = _bert(number or 128)
        shape = (batch_size, number or 128)
        x = {
            "token_ids": rng.integers(0, 1000, shape, "int32"),
            "segment_ids": np.zeros(shape, "int32"),
            "padding_mask": np.ones(shape, "int32"),
        }
        classes = 3
    model.compile(optimizer="sgd", loss=_LOSS)
    y = rng.integers(0, classes, (batch_size,), "int32")
    x = tf.nest.map_structure(tf.convert_to_tensor, x)
    return model, x, tf.convert_to_tensor(y)


def gradient_function(model: keras.Model, training: bool = True) -> Callable:
    """A `tf.function` `(x, y) -> gradient of the mean loss` (a list).

    The loss is `ModelFunction(model).loss_sum` (the function every
    tf_breakeven measurement differentiates, through `stateless_call` and
    with exact moments) divided by the batch size.
    """
    fn = ModelFunction(model, training=training)

    @tf.function
    def gradient(x, y):
        params, state = fn.read_parameters(), fn.read_state()
        with tf.GradientTape() as tape:
            tape.watch(params)
            total = fn.loss_sum(params, state, Batch(x, y, None))
        grads = tape.gradient(
            total, params, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        scale = 1.0 / tf.cast(tf.shape(y)[0], total.dtype)
        return [dense(g, p) * scale for g, p in zip(grads, params)]

    return gradient


def block(result: Any) -> Any:
    """Waits for a result by copying one element of it to numpy."""
    first = tf.nest.flatten(result)[0]
    np.asarray(first).ravel()[:1].copy()
    return result


def timed(fn: Callable[[], Any]) -> float:
    """Wall time in seconds of one call of `fn`, result forced."""
    start = time.perf_counter()
    block(fn())
    return time.perf_counter() - start


def interleaved(calls: dict[str, Callable[[], Any]], repeats: int) -> dict:
    """`{key: [seconds per round]}`: one untimed first call of each, then
    `repeats` rounds calling every function once (in the same round, so
    ratios of two calls cancel drifts in the load of a shared machine)."""
    for fn in calls.values():
        timed(fn)
    times = {key: [] for key in calls}
    for _ in range(repeats):
        for key, fn in calls.items():
            times[key].append(timed(fn))
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux: KiB), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ritz_by_step(alphas, betas) -> tuple[np.ndarray, np.ndarray]:
    """Top Ritz value and its relative residual bound `|beta_m s_m| /
    |theta|` after each step m = 1..len(alphas) of a Lanczos run, float64.

    The last step's bound is inf: `linalg.lanczos` returns one beta fewer
    than alphas, so the residual after the last step is unknown.
    """
    from tf_breakeven import linalg

    betas = np.append(np.asarray(betas, np.float64), np.inf)
    values, residuals = [], []
    for m in range(1, len(alphas) + 1):
        w, s = (
            t.numpy()
            for t in linalg.tridiagonal_eigh(alphas[:m], betas[: m - 1])
        )
        values.append(w[-1])
        residuals.append(abs(betas[m - 1] * s[-1, -1]) / abs(w[-1]))
    return np.array(values), np.array(residuals)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """Formats rows as a Markdown table (floats to 3 significant digits)."""

    def cell(value):
        if isinstance(value, float):
            return "n/a" if np.isnan(value) else f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |"]
    lines.append("|" + "|".join("---" for _ in headers) + "|")
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def run_worker(
    script: str, args: Sequence[str], timeout: float
) -> dict[str, Any]:
    """Runs `python script *args` in a fresh process; returns its result.

    The worker prints one line `RESULT <json>`. A crash, a timeout or a
    missing result line comes back as `{"error": ...}` with the tail of
    the worker's stderr, so one failing model does not stop a benchmark.
    """
    import json
    import subprocess
    import sys

    try:
        proc = subprocess.run(
            [sys.executable, script, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = [s for s in proc.stderr.splitlines() if s.strip()][-3:]
    return {"error": f"exit {proc.returncode}: " + " / ".join(tail)}


def print_result(result: dict[str, Any]) -> None:
    """The worker side of `run_worker`."""
    import json

    print("RESULT " + json.dumps(result), flush=True)


def short_error(error: BaseException) -> str:
    """The informative part of an error message, at most 200 characters.

    TensorFlow wraps errors raised while tracing in `in user code:` plus a
    traceback; this keeps the innermost `SomeError: ...` line and the line
    after it.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    found = [
        i
        for i, line in enumerate(lines)
        if re.match(r"^[\w.]*(Error|Exception)\b", line)
    ]
    if found:
        i = found[-1]
        message = " ".join(lines[i : i + 2])
    else:
        message = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return message[:200]


def load_line() -> str:
    """CPU count and load average, to judge how noisy a run was."""
    one, five, _ = os.getloadavg()
    return f"{os.cpu_count()} CPUs, load average {one:.2f} (1 min), " + (
        f"{five:.2f} (5 min)"
    )
