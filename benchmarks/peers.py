"""Ours against the PyTorch peers on the same architectures and weights.

For the zoo's SimpleCNN (`simple_cnn`, 1.25M parameters) and ResNet-32
(`resnet32`, 0.46M) at 32x32x3 with 10 classes, on one random batch, in
inference mode (dropout off, BatchNormalization on its moving statistics),
this script builds the same network in PyTorch, copies the Keras weights
into it (so both frameworks measure the same function: the script checks
the logits, the Grams and the top eigenvalues agree), and times:

* one gradient of the mean loss: ours (a `tf.function`) / `torch.autograd`;
* one Hessian-vector product: `tfb.HessianOperator.matvec` (its default
  method) / PyHessian's double backward (`torch.autograd.grad` of g.v);
* the top eigenvalue with 20 iterations: our Lanczos
  (`HessianOperator.eigenpairs(k=1, num_iterations=20, tol=0.0)`; `tol`
  only where the library has it, so that all 20 steps run) / PyHessian's
  power iteration (`hessian.eigenvalues(maxIter=20, tol=0)`);
* each library's default top-eigenvalue call, against PyHessian's
  `eigenvalues()` (maxIter 100, tol 1e-3, on its existing `hessian`
  object): ours as `top_tol`, `operator.eigenpairs(k=1)` on an existing
  operator, and as `top_default`, `tfb.hessian_eigenvalues(model, data,
  k=1, training=False)` (a new operator on every call); each one's error
  relative to a converged value (60-step float32 Lanczos, `tol=0.0` as
  above). Where the library's `Eigenpairs` has them, the `residuals`,
  `converged` and `num_iterations` fields of the `top_tol` result (and
  the steps run by the fixed-work call and the reference) are reported;
* the [N x N] Gram of the N per-example gradients: `tfb.gradient_gram`
  (M = 1) / `torch.func.vmap(grad)` (rows, then one float64 product) /
  BackPACK's `BatchGrad` (where BackPACK supports the network).

Each side runs in a fresh process of its own (`common.run_worker`; this
script with `--worker=ours` or `--worker=torch`), the two one after the
other for each model, never at the same time, so their thread pools do not
compete: TensorFlow uses its default pools, and the torch worker calls
`torch.set_num_threads(os.cpu_count())`, all the machine's cores. Both
workers build the Keras model the same deterministic way (seeded
initializers, seeded moving statistics; the check `same Keras weights`
compares a hash of all weights) and the batch from the same numpy seed;
the torch worker builds it with Keras only to copy the weights into the
torch twin (`peers_torch.from_keras`) before anything is timed, and runs
no TensorFlow computation after that. Within a worker, each call is made
once (the first call, which traces, reported apart), then `--repeats`
rounds call every one of that side's functions once. Times are medians
over the rounds; a ratio is ours' median over the peer's median (the two
sides no longer share rounds). The parent process only collects the
workers' results (times, the top eigenvalues, the Grams as nested lists,
the logits) and prints the tables.

PyTorch and its peers are an optional extra:

    pip install torch --index-url https://download.pytorch.org/whl/cpu
    pip install -e ".[bench]"
    python benchmarks/peers.py --batch_size=128 --repeats=3

Without torch the script prints how to install it and exits (status 0).
`--tiny` runs small configurations (10x10 images, a few hundred parameters)
as a quick check that both sides compute the same numbers.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
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
_TIMEOUT = flags.DEFINE_float("timeout", 3600, "Seconds allowed per worker.")
_WORKER = flags.DEFINE_enum(
    "worker", None, ["ours", "torch"], "Internal: run one side on --models."
)

_INSTALL = (
    "benchmarks/peers.py compares with PyTorch peers and needs them "
    "installed: pip install torch --index-url "
    'https://download.pytorch.org/whl/cpu && pip install -e ".[bench]"'
)
# Fields of the library's Eigenpairs result reported when it has them.
_RESULT_FIELDS = ("residuals", "converged", "num_iterations")


def _missing() -> list[str]:
    """The peer packages that cannot be found (none is imported here)."""
    missing = []
    for module in ("torch", "pyhessian", "backpack"):
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(module)
    return missing


def _keras_model(name: str, tiny: bool):
    """The Keras model, built the same way in every process."""
    if name not in ("simple_cnn", "resnet32"):
        raise app.UsageError(f"--models: {name!r} is not simple_cnn/resnet32")
    return common.peer_model(name, _SEED.value, tiny)


def _data(model) -> tuple[np.ndarray, np.ndarray]:
    """The batch (NHWC images, int32 labels), from --seed."""
    return common.peer_batch(model, _BATCH_SIZE.value, _SEED.value)


def _weights_hash(model) -> str:
    """A hash of all the Keras weights (trainable and moving statistics)."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
    return digest.hexdigest()[:16]


def _value(name: str, result):
    """The JSON value the parent checks, or None for timed-only calls."""
    if name.endswith("/gram"):
        return np.asarray(result, np.float64).tolist()
    if "/top" in name:
        eigenvalues = getattr(result, "eigenvalues", result)
        return float(np.ravel(eigenvalues)[0])
    return None


def _jsonable(value):
    """A numpy/TensorFlow/Python value as plain lists and scalars."""
    return np.asarray(value).tolist()


def _every_step() -> dict:
    """`{"tol": 0.0}` where `eigenpairs` has a tolerance, else `{}`.

    With a tolerance (`spectrum.DEFAULT_TOL`) `num_iterations` is only the most
    Lanczos steps; the fixed-work comparison and the converged reference
    run all of theirs.
    """
    from tf_breakeven import spectrum

    parameters = inspect.signature(spectrum.eigenpairs).parameters
    return {"tol": 0.0} if "tol" in parameters else {}


def _fields(result) -> dict:
    """The accuracy fields of an `Eigenpairs` that has them, as JSON."""
    return {
        field: _jsonable(getattr(result, field))
        for field in _RESULT_FIELDS
        if getattr(result, field, None) is not None
    }


def _time_calls(
    calls: dict, repeats: int, force=lambda result: result
) -> tuple[dict, dict]:
    """First calls, then `repeats` rounds of every call that worked.

    `force(result)` waits for a result (TensorFlow: `common.block`; torch
    on the CPU returns finished tensors). Returns the JSON part of the
    worker's result (first-call times, medians, all times, check values,
    errors) and the first call's results.
    """
    out = {"first": {}, "median": {}, "values": {}, "errors": {}}
    results = {}
    for name, fn in list(calls.items()):
        start = time.perf_counter()
        try:
            results[name] = force(fn())
        except Exception as error:  # noqa: BLE001 - e.g. a peer that
            # cannot run this network; reported in the checks table.
            out["errors"][name] = common.short_error(error)
            del calls[name]
            continue
        out["first"][name] = time.perf_counter() - start
        out["values"][name] = _value(name, results[name])
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            force(fn())
            times[name].append(time.perf_counter() - start)
    out["median"] = {name: common.median(t) for name, t in times.items()}
    out["times"] = times
    return out, results


def _ours_worker(name: str) -> dict:
    """Our side: the model, its logits, timed calls and reference values."""
    import tensorflow as tf

    import tf_breakeven as tfb

    model = _keras_model(name, _TINY.value)
    x_np, y_np = _data(model)
    x, y = tf.constant(x_np), tf.constant(y_np)
    data = (x, y)
    gradient = common.gradient_function(model, training=False)
    operator = tfb.HessianOperator(model, data, training=False)
    rng = np.random.default_rng(1)
    vector = [
        tf.constant(rng.normal(size=v.shape), v.dtype)
        for v in model.trainable_variables
    ]
    iterations = _ITERATIONS.value
    every_step = _every_step()
    calls = {
        "ours/gradient": lambda: gradient(x, y),
        "ours/hvp": lambda: operator.matvec(vector),
        "ours/top_fixed": lambda: operator.eigenpairs(
            k=1, num_iterations=iterations, **every_step
        ),
        "ours/top_tol": lambda: operator.eigenpairs(k=1),
        "ours/top_default": lambda: tfb.hessian_eigenvalues(
            model, data, k=1, training=False
        ),
        "ours/gram": lambda: tfb.gradient_gram(
            model, data, microbatch_size=1, training=False
        ),
    }
    out, results = _time_calls(calls, _REPEATS.value, common.block)
    out["parameters"] = sum(
        int(np.prod(v.shape)) for v in model.trainable_variables
    )
    out["weights"] = _weights_hash(model)
    out["hvp_method"] = operator.method
    out["logits"] = model(x, training=False).numpy().tolist()
    converged = operator.eigenpairs(k=1, num_iterations=60, **every_step)
    out["converged"] = float(converged.eigenvalues[0])
    out["fields"] = {
        key: _fields(result)
        for key, result in (
            ("ours/top_fixed", results.get("ours/top_fixed")),
            ("ours/top_tol", results.get("ours/top_tol")),
            ("converged", converged),
        )
    }
    return out


def _torch_worker(name: str) -> dict:
    """The peers' side: Keras builds the weights, then torch only.

    Runs torch on all the machine's cores (`torch.set_num_threads(
    os.cpu_count())`), with its global seed set to --seed (the peers' random
    vectors: PyHessian's start vectors, the HVP's vector).
    """
    import peers_torch
    import torch

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(_SEED.value)
    model = _keras_model(name, _TINY.value)
    x_np, y_np = _data(model)
    weights = _weights_hash(model)
    twin = peers_torch.from_keras(model)
    del model  # nothing of TensorFlow runs from here on
    xt = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous()
    yt = torch.from_numpy(y_np).long()
    with torch.no_grad():
        logits = twin(xt).numpy().tolist()
    calls = peers_torch.peers(twin, xt, yt, _ITERATIONS.value)
    out, _ = _time_calls(calls, _REPEATS.value)
    out |= {"weights": weights, "logits": logits}
    out["threads"] = torch.get_num_threads()
    return out


_PAIRS = (
    ("one gradient", "ours/gradient", "torch/gradient"),
    ("one HVP", "ours/hvp", "pyhessian/hvp"),
    ("top eigenvalue, {iterations} iterations", "ours/top_fixed",
     "pyhessian/top_fixed"),
    ("default top-eigenvalue call, existing operator (top_tol)",
     "ours/top_tol", "pyhessian/top"),
    ("default top-eigenvalue call, new operator (top_default)",
     "ours/top_default", "pyhessian/top"),
    ("Gram of per-example gradients", "ours/gram", "torch.func/gram"),
    ("Gram of per-example gradients", "ours/gram", "backpack/gram"),
)  # fmt: skip


def _cell(value):
    """A check value for the table: floats to 3 digits, lists compact."""
    if isinstance(value, list):
        return "[" + ", ".join(str(_cell(v)) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.3g}"
    return value


def _derived_ratios(medians: dict) -> dict:
    """HVP / gradient on each side, and each solver's cost per step over
    one HVP minus 1 (its overhead; issue 11 asks <= 5% for Lanczos)."""
    nan = float("nan")
    get = medians.get
    iterations = _ITERATIONS.value
    return {
        "HVP / gradient, ours": get("ours/hvp", nan)
        / get("ours/gradient", nan),
        "HVP / gradient, PyHessian / torch": get("pyhessian/hvp", nan)
        / get("torch/gradient", nan),
        "Lanczos step / HVP - 1, ours": get("ours/top_fixed", nan)
        / iterations
        / get("ours/hvp", nan)
        - 1,
        "power step / HVP - 1, PyHessian": get("pyhessian/top_fixed", nan)
        / iterations
        / get("pyhessian/hvp", nan)
        - 1,
    }


def _checks(ours: dict, peer: dict) -> dict:
    """The agreement checks of one model, `{label: value}`."""
    nan = float("nan")
    checks = {
        "parameters": ours["parameters"],
        "same Keras weights in both workers": ours["weights"]
        == peer["weights"],
        "torch threads": peer.get("threads", "?"),
        "ours HVP method": ours["hvp_method"],
        "max |logits ours - torch|": float(
            np.abs(np.array(ours["logits"]) - np.array(peer["logits"])).max()
        ),
    }
    converged = ours["converged"]
    checks["converged lambda_1 (60-step Lanczos)"] = converged
    values = ours["values"] | peer["values"]
    for key in (
        "ours/top_fixed",
        "ours/top_tol",
        "ours/top_default",
        "pyhessian/top_fixed",
        "pyhessian/top",
    ):
        if key in values:
            checks[f"relative error {key}"] = abs(
                values[key] - converged
            ) / abs(converged)
    fields = ours["fields"]
    for field in _RESULT_FIELDS:
        value = fields["ours/top_tol"].get(field, "absent")
        checks[f"ours/top_tol result .{field}"] = value
    for key in ("ours/top_fixed", "converged"):
        if "num_iterations" in fields[key]:  # steps actually run
            label = "60-step reference" if key == "converged" else key
            checks[f"{label} .num_iterations"] = fields[key]["num_iterations"]
    reference = np.array(values.get("ours/gram", nan))
    for key in ("torch.func/gram", "backpack/gram"):
        if key in values:
            checks[f"max |Gram {key} - ours| / max |ours|"] = float(
                np.abs(np.array(values[key]) - reference).max()
                / np.abs(reference).max()
            )
    checks.update(_derived_ratios(ours["median"] | peer["median"]))
    for key, error in (ours["errors"] | peer["errors"]).items():
        label = "failed" if key.startswith("ours/") else "unsupported"
        checks[f"{key} {label}"] = error
    return checks


def _report(name: str, ours: dict, peer: dict) -> None:
    medians = ours["median"] | peer["median"]
    nan = float("nan")
    rows = []
    for label, mine, theirs in _PAIRS:
        label = label.format(iterations=_ITERATIONS.value)
        ours_s, peer_s = medians.get(mine, nan), medians.get(theirs)
        if peer_s is None:
            rows.append([label, ours_s, theirs, "n/a", "n/a"])
            continue
        peer_name = theirs.split("/")[0]
        rows.append([label, ours_s, peer_name, peer_s, ours_s / peer_s])
    print(f"\n### {name}\n")
    print(
        common.markdown_table(
            ["quantity", "ours (s)", "peer", "peer (s)", "ours / peer"], rows
        )
    )
    print()
    checks = _checks(ours, peer)
    print(
        common.markdown_table(
            ["check", "value"], [[k, _cell(v)] for k, v in checks.items()]
        )
    )
    print()
    first = ours["first"] | peer["first"]
    print(
        common.markdown_table(
            ["first call (s)", "value"], [[k, v] for k, v in first.items()]
        )
    )


def _run_model(name: str) -> None:
    """The ours worker, then the torch worker, then the tables."""
    args = [
        f"--models={name}",
        f"--batch_size={_BATCH_SIZE.value}",
        f"--repeats={_REPEATS.value}",
        f"--iterations={_ITERATIONS.value}",
        f"--seed={_SEED.value}",
        "--tiny" if _TINY.value else "--notiny",
    ]
    results = {}
    for side in ("ours", "torch"):
        results[side] = common.run_worker(
            __file__, [f"--worker={side}", *args], _TIMEOUT.value
        )
        if "error" in results[side]:
            print(f"\n### {name}\n\n* {side} worker: {results[side]['error']}")
            return
    _report(name, results["ours"], results["torch"])


def main(argv):
    del argv
    if _WORKER.value:
        if len(_MODELS.value) != 1:
            raise app.UsageError("--worker runs exactly one of --models.")
        worker = {"ours": _ours_worker, "torch": _torch_worker}[_WORKER.value]
        common.print_result(worker(_MODELS.value[0]))
        return
    missing = _missing()
    if missing:
        print(f"Skipped: {', '.join(missing)} not installed. {_INSTALL}")
        return
    if importlib.util.find_spec("triton") is not None:
        # Seen with torch 2.14.1 (the CUDA wheel from PyPI): torch.func's
        # first call imports triton, which segfaults beside TensorFlow
        # (the torch worker imports TensorFlow to build the weights).
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
