"""Ours against the PyTorch peers on the same architectures and weights.

For the zoo's SimpleCNN (`simple_cnn`, 1.25M parameters) and ResNet-32
(`resnet32`, 0.46M) at 32x32x3 with 10 classes, on one random batch, in
inference mode (dropout off, BatchNormalization on its moving statistics),
this script builds the same network in PyTorch, copies the Keras weights
into it (so both frameworks measure the same function: the script checks
the logits and the top eigenvalue agree), and times in interleaved rounds:

* one gradient of the mean loss: ours (a `tf.function`) / `torch.autograd`;
* one Hessian-vector product: `tfb.HessianOperator.matvec` (its default
  method) / PyHessian's double backward (`torch.autograd.grad` of g.v);
* the top eigenvalue with 20 iterations: our Lanczos
  (`HessianOperator.eigenpairs(k=1, num_iterations=20)`) / PyHessian's
  power iteration (`hessian.eigenvalues(maxIter=20, tol=0)`);
* each library's default top-eigenvalue call (ours:
  `tfb.hessian_eigenvalues(model, data, k=1)`; PyHessian:
  `eigenvalues()`, maxIter 100, tol 1e-3) and its error relative to a
  converged value (60-step float32 Lanczos);
* the [N x N] Gram of the N per-example gradients: `tfb.gradient_gram`
  (M = 1) / `torch.func.vmap(grad)` (rows, then one float64 product) /
  BackPACK's `BatchGrad` (where BackPACK supports the network).

Every time is the median over `--repeats` rounds after a warm-up (first
calls, which trace, are reported apart), every ratio the median of
per-round ratios. PyTorch and its peers are an optional extra:

    pip install torch --index-url https://download.pytorch.org/whl/cpu
    pip install -e ".[bench]"
    python benchmarks/peers.py --batch_size=128 --repeats=3

Without torch the script prints how to install it and exits (status 0).
`--tiny` runs small configurations (10x10 images, a few hundred parameters)
as a quick check that both sides compute the same numbers.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import time

import common
import numpy as np
from absl import app, flags

_MODELS = flags.DEFINE_list(
    "models", ["simple_cnn", "resnet32"], "Zoo models: simple_cnn, resnet32."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Examples per batch.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed rounds per quantity.")
_ITERATIONS = flags.DEFINE_integer(
    "iterations", 20, "Solver iterations of the fixed-work comparison."
)
_TINY = flags.DEFINE_bool("tiny", False, "Small configurations (a check).")
_SEED = flags.DEFINE_integer("seed", 0, "Weights and data seed.")

_INSTALL = (
    "benchmarks/peers.py compares with PyTorch peers and needs them "
    "installed: pip install torch --index-url "
    'https://download.pytorch.org/whl/cpu && pip install -e ".[bench]"'
)


def _missing() -> list[str]:
    """The peer packages that cannot be imported."""
    missing = []
    for module in ("torch", "pyhessian", "backpack"):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    return missing


def _keras_model(name: str, tiny: bool):
    import keras

    from tf_breakeven import models

    keras.utils.set_random_seed(_SEED.value)
    shape = (10, 10, 3) if tiny else (32, 32, 3)
    if name == "simple_cnn":
        extra = {"filters": (4, 8), "dense_units": 16} if tiny else {}
        extra |= {"conv_dropout": 0.0, "dense_dropout": 0.0}
        model = models.get_model(
            name, num_classes=10, input_shape=shape, **extra
        )
    elif name == "resnet32":
        extra = {"depth": 8, "base_filters": 4} if tiny else {}
        model = models.get_model(
            name, num_classes=10, input_shape=shape, **extra
        )
    else:
        raise app.UsageError(f"--models: {name!r} is not simple_cnn/resnet32")
    model.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    # Non-trivial moving statistics, so inference-mode BN is not identity.
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            rng = np.random.default_rng(len(layer.name))
            size = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(0, 0.1, size))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, size))
    return model


class _Timer:
    """Interleaved rounds: `add(name, fn)`, then `run(repeats)`."""

    def __init__(self):
        self.functions, self.first, self.times = {}, {}, {}

    def add(self, name, fn):
        start = time.perf_counter()
        result = fn()
        self.first[name] = time.perf_counter() - start
        self.functions[name] = fn
        self.times[name] = []
        return result

    def run(self, repeats):
        for _ in range(repeats):
            for name, fn in self.functions.items():
                start = time.perf_counter()
                fn()
                self.times[name].append(time.perf_counter() - start)

    def median(self, name):
        return common.median(self.times[name])

    def ratio(self, top, bottom):
        return common.median(
            [a / b for a, b in zip(self.times[top], self.times[bottom])]
        )


def _ours(model, x, y, iterations):
    import tensorflow as tf

    import tf_breakeven as tfb

    data = (x, y)
    gradient = common.gradient_function(model, training=False)
    operator = tfb.HessianOperator(model, data, training=False)
    rng = np.random.default_rng(1)
    vector = [
        tf.constant(rng.normal(size=v.shape), v.dtype)
        for v in model.trainable_variables
    ]
    return {
        "gradient": lambda: common.block(gradient(x, y)),
        "hvp": lambda: common.block(operator.matvec(vector)),
        "top_fixed": lambda: float(
            operator.eigenpairs(k=1, num_iterations=iterations).eigenvalues[0]
        ),
        "top_default": lambda: float(
            tfb.hessian_eigenvalues(model, data, k=1, training=False)[0]
        ),
        "gram": lambda: tfb.gradient_gram(
            model, data, microbatch_size=1, training=False
        ),
        "converged": lambda: float(
            operator.eigenpairs(k=1, num_iterations=60).eigenvalues[0]
        ),
    }


def _report(name, timer, checks):
    rows = []
    pairs = [
        ("one gradient", "ours/gradient", "torch/gradient"),
        ("one HVP", "ours/hvp", "pyhessian/hvp"),
        (
            f"top eigenvalue, {_ITERATIONS.value} iterations",
            "ours/top_fixed",
            "pyhessian/top_fixed",
        ),
        ("default top-eigenvalue call", "ours/top_default", "pyhessian/top"),
        ("Gram of per-example gradients", "ours/gram", "torch.func/gram"),
        ("Gram of per-example gradients", "ours/gram", "backpack/gram"),
    ]
    for label, ours, peer in pairs:
        if peer not in timer.times:
            rows.append([label, timer.median(ours), peer, "n/a", "n/a"])
            continue
        rows.append(
            [
                label,
                timer.median(ours),
                peer.split("/")[0],
                timer.median(peer),
                timer.ratio(ours, peer),
            ]
        )
    print(f"\n### {name}\n")
    print(
        common.markdown_table(
            ["quantity", "ours (s)", "peer", "peer (s)", "ours / peer"], rows
        )
    )
    print()
    print(
        common.markdown_table(
            ["check", "value"], [[k, v] for k, v in checks.items()]
        )
    )
    print()
    print(
        common.markdown_table(
            ["first call (s)", "value"],
            [[k, v] for k, v in timer.first.items()],
        )
    )


def _run_model(name):
    import peers_torch
    import torch

    model = _keras_model(name, _TINY.value)
    rng = np.random.default_rng(_SEED.value)
    n = _BATCH_SIZE.value
    x_np = rng.normal(size=(n, *model.input_shape[1:])).astype("float32")
    y_np = rng.integers(0, 10, n).astype("int32")
    import tensorflow as tf

    x, y = tf.constant(x_np), tf.constant(y_np)
    twin = peers_torch.from_keras(model)
    xt = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous()
    yt = torch.from_numpy(y_np).long()
    logits = model(x, training=False).numpy()
    with torch.no_grad():
        torch_logits = twin(xt).numpy()
    checks = {
        "parameters": sum(
            int(np.prod(v.shape)) for v in model.trainable_variables
        ),
        "max |logits ours - torch|": float(np.abs(logits - torch_logits).max()),
    }
    timer, values = _Timer(), {}
    ours = _ours(model, x, y, _ITERATIONS.value)
    peers = peers_torch.peers(twin, xt, yt, _ITERATIONS.value)
    for key in ("gradient", "hvp", "top_fixed", "top_default", "gram"):
        values[f"ours/{key}"] = timer.add(f"ours/{key}", ours[key])
    for key, fn in peers.items():
        try:
            values[key] = timer.add(key, fn)
        except Exception as error:  # a peer that cannot run this network
            checks[f"{key} unsupported"] = common.short_error(error)
    timer.run(_REPEATS.value)
    converged = ours["converged"]()
    checks["converged lambda_1 (60-step Lanczos)"] = converged
    for key in (
        "ours/top_fixed",
        "ours/top_default",
        "pyhessian/top_fixed",
        "pyhessian/top",
    ):
        if key in values:
            checks[f"relative error {key}"] = abs(
                values[key] - converged
            ) / abs(converged)
    reference = values["ours/gram"]
    for key in ("torch.func/gram", "backpack/gram"):
        if key in values:
            checks[f"max |Gram {key} - ours| / max |ours|"] = float(
                np.abs(values[key] - reference).max() / np.abs(reference).max()
            )
    _report(name, timer, checks)


def main(argv):
    del argv
    missing = _missing()
    if missing:
        print(f"Skipped: {', '.join(missing)} not installed. {_INSTALL}")
        return
    if importlib.util.find_spec("triton") is not None:
        # Seen with torch 2.14.1 (the CUDA wheel from PyPI): torch.func's
        # first call imports triton, which segfaults beside TensorFlow.
        raise app.UsageError(
            "triton is installed (it comes with PyPI's CUDA wheel of torch) "
            "and crashes when imported next to TensorFlow: pip uninstall "
            "triton, or use the CPU wheel of torch."
        )
    print(common.load_line())
    for name in _MODELS.value:
        _run_model(name)
    print(common.load_line())


if __name__ == "__main__":
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    app.run(main)
