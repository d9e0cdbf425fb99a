"""Cost of one Hessian-vector product relative to one gradient.

For each model (see `benchmarks/common.py`), on one random batch in training
mode, times:

* one gradient of the mean loss: a `tf.function` differentiating
  `ModelFunction(model).loss_sum` (the function the HVP differentiates),
* one `tfb.HessianOperator(...).matvec` with
  `method="forward_over_backward"` (the library default) and with
  `method="backward_over_backward"` (the double-backward baseline),

and reports the medians of `--repeats` calls (after a warm-up call; calls of
the three functions are interleaved so load from other processes hits all
of them alike), the ratios HVP / gradient (target <= 2.0; the median over
repeats of each HVP call's time over the gradient call just before it,
which cancels slow drifts in the load), the first-call
time of each (tracing + first run; for the HVP it includes constructing the
operator, which traces the forward loss once to check the data) and the
largest relative difference between the two HVP methods. `bob/grad FLOPs`
is the ratio of the static float-operation counts (TF profiler; ops with
FLOP statistics: convolutions and matmuls) of the traced double-backward
HVP and gradient graphs: the arithmetic floor of an exact HVP. The
forward-over-backward graph cannot be counted this way: TF's
ForwardAccumulator builds each op's JVP by transposing its backward function
inside nested functions whose unused parts are only pruned at run time.

Every model runs in its own fresh process (clean trace caches and a fair
first call; a crash in one model does not end the benchmark).

    python benchmarks/hessian_vector_product.py --batch_size=128 --repeats=7
"""

from __future__ import annotations

import sys
import time

import common
from absl import app, flags

_MODELS = flags.DEFINE_list(
    "models",
    ["cnn", "resnet20", "lstm32", "lstm128", "lstmrolled128", "bert128"],
    "Models (cnn, resnet<depth>, lstm<T>, lstmrolled<T>, bert<T>, zoo:<name>).",
)
_METHODS = flags.DEFINE_list(
    "methods",
    ["forward_over_backward", "backward_over_backward"],
    "HessianOperator methods to time.",
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Examples per batch.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed calls per function.")
_TIMEOUT = flags.DEFINE_float("timeout", 1200, "Seconds allowed per model.")
_WORKER = flags.DEFINE_string("worker", None, "Internal: run one model.")

_SHORT = {"forward_over_backward": "fob", "backward_over_backward": "bob"}


def _warm_up_tensorflow() -> None:
    """Loads TF's lazily imported autodiff code on a throwaway model."""
    import keras
    import tensorflow as tf

    import tf_breakeven as tfb

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(loss="mse")
    x, y = tf.ones((2, 4)), tf.ones((2, 2))
    common.gradient_function(model)(x, y)
    vector = [tf.ones_like(v) for v in model.trainable_variables]
    for method in _SHORT:
        tfb.HessianOperator(model, (x, y), method=method).matvec(vector)


def _flops(concrete_function) -> float:
    """Float operations of a traced graph (ops with FLOP statistics)."""
    import tensorflow as tf

    profiler = tf.compat.v1.profiler
    options = profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    graph = concrete_function.graph
    return float(profiler.profile(graph, options=options).total_float_ops)


def _worker(name: str) -> dict:
    """Times one model in this process; returns the result dict."""
    import numpy as np
    import tensorflow as tf

    import tf_breakeven as tfb

    _warm_up_tensorflow()
    model, x, y = common.build(name, _BATCH_SIZE.value)
    params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    result = {"model": name, "params": params}
    calls, first = {}, {}
    gradient = common.gradient_function(model)
    calls["grad"] = lambda: gradient(x, y)
    first["grad"] = common.timed(calls["grad"])

    rng = np.random.default_rng(1)
    vector = [
        tf.constant(rng.normal(size=v.shape), tf.float32)
        for v in model.trainable_variables
    ]
    products, ops = {}, {}
    for method in _METHODS.value:
        key = _SHORT.get(method, method)
        try:
            start = time.perf_counter()
            op = tfb.HessianOperator(model, (x, y), method=method)
            products[key] = op.matvec(vector)
            common.block(products[key])
            first[key] = time.perf_counter() - start
            calls[key] = lambda op=op: op.matvec(vector)
            ops[key] = op
        except Exception as error:  # noqa: BLE001 (reported, not hidden)
            result[f"{key}_error"] = common.short_error(error)
    times = {key: [] for key in calls}
    for call in calls.values():
        common.timed(call)  # warm-up
    for _ in range(_REPEATS.value):
        for key, call in calls.items():
            times[key].append(common.timed(call))
    for key in calls:
        result[f"{key}_ratio"] = common.median(
            [t / g for t, g in zip(times[key], times["grad"])]
        )
        result[f"{key}_s"] = common.median(times[key])
        result[f"{key}_all_s"] = times[key]
        result[f"{key}_first_s"] = first[key]
    if "bob" in ops and not ops["bob"].function.has_rolled_recurrence:
        # Static FLOPs (a while loop's body would not be counted).
        bob = ops["bob"].kernel.hvp.get_concrete_function(vector, x, y, None)
        grad = gradient.get_concrete_function(x, y)
        result["bob_flops_ratio"] = _flops(bob) / _flops(grad)
    if len(products) == 2:
        a, b = (
            tf.concat([tf.reshape(t, [-1]) for t in p], 0)
            for p in products.values()
        )
        result["fob_bob_rel_diff"] = float(
            tf.reduce_max(tf.abs(a - b)) / tf.reduce_max(tf.abs(b))
        )
    return result


def _row(result: dict) -> list:
    nan = float("nan")

    def ms(key):
        return 1e3 * result.get(f"{key}_s", nan)

    def ratio(key):
        return result.get(f"{key}_ratio", nan)

    return [
        result["model"],
        result.get("params", "?"),
        ms("grad"),
        ms("fob"),
        ms("bob"),
        ratio("fob"),
        ratio("bob"),
        result.get("grad_first_s", nan),
        result.get("fob_first_s", nan),
        result.get("bob_first_s", nan),
        result.get("fob_bob_rel_diff", nan),
        result.get("bob_flops_ratio", nan),
    ]


def main(argv: list[str]) -> None:
    del argv
    if _WORKER.value:
        common.print_result(_worker(_WORKER.value))
        return
    load = common.load_line()
    print(
        f"batch {_BATCH_SIZE.value}, training=True; times: median of "
        f"{_REPEATS.value} calls after a warm-up; ratios: median of per-round"
        " ratios; first call = trace + run (HVP: + operator construction)\n"
    )
    results, errors = [], []
    for name in _MODELS.value:
        args = [
            f"--worker={name}",
            f"--batch_size={_BATCH_SIZE.value}",
            f"--repeats={_REPEATS.value}",
            f"--methods={','.join(_METHODS.value)}",
        ]
        result = common.run_worker(__file__, args, _TIMEOUT.value)
        result.setdefault("model", name)
        print(f"{name}: {result}", file=sys.stderr, flush=True)
        results.append(result)
        errors += [
            f"{name} {k.removesuffix('_error')}: {v}"
            for k, v in result.items()
            if k.endswith("error")
        ]
    headers = [
        "model",
        "params",
        "grad ms",
        "HVP fob ms",
        "HVP bob ms",
        "fob/grad",
        "bob/grad",
        "grad 1st s",
        "fob 1st s",
        "bob 1st s",
        "fob vs bob",
        "bob/grad FLOPs",
    ]
    print(common.markdown_table(headers, [_row(r) for r in results]))
    for error in errors:
        print(f"\n* {error}")
    print(f"\nAt the start: {load}; at the end: {common.load_line()}")


if __name__ == "__main__":
    app.run(main)
