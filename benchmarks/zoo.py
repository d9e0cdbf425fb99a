"""Gradient, Hessian-vector product and Gram matrix costs on the model zoo.

For each zoo model (`zoo:<name>` in `benchmarks/common.py`: the
repository's `tf_breakeven.models.get_model` in a small-but-real
configuration), on one random batch of N examples, times:

* `grad`: one gradient of the mean loss (`common.gradient_function`,
  `training=True`: the function the HVP differentiates);
* `HVP`: one `tfb.HessianOperator(model, (x, y)).matvec(v)` with the
  default `method="auto"` (its choice is reported), `training=True`;
* `Gram`: `tfb.gradient_gram(model, (x, y), microbatch_size=M,
  method="materialize")` (public API, float64 numpy result), `training=True`
  except for models with BatchNormalization at M = 1 (the library refuses
  that; they run with `training=False`, and `grad_eval`, a gradient in that
  mode, is timed too so Gram/grad compares like with like);
* `ghost`: the same call with `method="ghost"`, and which engine
  `method="auto"` (the default) picks.

`--calls` restricts the calls (`grad` always runs): e.g.
`--models=zoo:wrn28_10 --calls=ghost --memory=ghost` for WideResNet-28-10,
whose materialized rows do not fit in memory.

One fresh process per model makes the first call of each function
(trace + run; for the HVP also constructing the operator), then up to
`--repeats` rounds calling every function once (fewer, at least
`--min_repeats`, once the rounds have taken `--round_seconds`). Times are
medians, ratios medians of per-round ratios (both calls in the same round).

Memory: one more fresh process per (model, method) runs only that method
twice and reports the increase of peak RSS (`getrusage` ru_maxrss) over its
value after importing TensorFlow, warming up on a tiny model and building
the model and data (the increase includes tracing). The gradient's is
taken the same way in the timing process, before anything else runs.
`matmul` is the float64 [n, P] x [P, n] product alone (as the Gram forms
it; median of 3 calls, made before the first calls).

    python benchmarks/zoo.py --batch_size=128 --repeats=7
    python benchmarks/zoo.py --models=zoo:wrn28_10 --calls=ghost \
        --memory=ghost --repeats=1 --min_repeats=1
"""

from __future__ import annotations

import functools
import sys
import time

import common
from absl import app, flags

_MODELS = flags.DEFINE_list(
    "models",
    [f"zoo:{name}" for name in common.ZOO],
    "Models (zoo:<name>, see common.ZOO; the older names work too).",
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Examples N.")
_MICROBATCH = flags.DEFINE_integer("microbatch_size", 1, "Gram's M.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Most timed rounds.")
_MIN_REPEATS = flags.DEFINE_integer("min_repeats", 3, "Fewest rounds.")
_ROUND_SECONDS = flags.DEFINE_float(
    "round_seconds", 20, "Stop after min_repeats rounds past this time."
)
_BUDGET_MB = flags.DEFINE_integer(
    "memory_budget_mb", 16384, "gradient_gram memory_budget in MiB."
)
_MEMORY = flags.DEFINE_list(
    "memory",
    ["hvp", "gram", "ghost"],
    "Methods whose peak RSS to measure apart.",
)
_CALLS = flags.DEFINE_list(
    "calls", ["hvp", "gram", "ghost"], "Timed calls besides grad."
)
_TIMEOUT = flags.DEFINE_float("timeout", 900, "Seconds allowed per run.")
_WORKER = flags.DEFINE_string("worker", None, "Internal: model,what.")


def _warm_up() -> None:
    """Loads TF's lazily imported autodiff code on a throwaway model."""
    import keras
    import tensorflow as tf

    import tf_breakeven as tfb

    tiny = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    tiny.compile(loss="mse")
    x, y = tf.ones((4, 4)), tf.ones((4, 2))
    common.gradient_function(tiny)(x, y)
    vector = [tf.ones_like(v) for v in tiny.trainable_variables]
    tfb.HessianOperator(tiny, (x, y)).matvec(vector)
    tfb.gradient_gram(tiny, (x, y))


def _matmul_seconds(n: int, dim: int) -> float:
    """Median time of the float64 [n, P] x [P, n] product (3 calls)."""
    import tensorflow as tf

    rows = tf.ones([n, dim], tf.float64)  # the values do not matter
    product = lambda: tf.matmul(rows, rows, transpose_b=True)  # noqa: E731
    return common.median([common.timed(product) for _ in range(3)])


def _worker(spec: str) -> dict:
    import numpy as np
    import tensorflow as tf

    import tf_breakeven as tfb
    from tf_breakeven import gradients
    from tf_breakeven.functional import has_batch_norm
    from tf_breakeven.gradients import chunk_size

    name, what = spec.split(",")
    _warm_up()
    model, x, y = common.build(name, _BATCH_SIZE.value)
    m = _MICROBATCH.value
    training = m > 1 or not has_batch_norm(model)
    n = _BATCH_SIZE.value // m
    dim = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    budget = _BUDGET_MB.value << 20
    result = {"params": dim, "gram_training": training, "n": n}
    result["chunks"] = -(-n // chunk_size(n, dim, budget))
    rng = np.random.default_rng(1)
    vector = [
        tf.constant(rng.normal(size=v.shape), tf.float32)
        for v in model.trainable_variables
    ]
    result["base_mb"] = common.peak_rss_mb()
    gradient = common.gradient_function(model)
    ops = []

    def hvp():
        if not ops:  # the first call also builds the operator
            ops.append(tfb.HessianOperator(model, (x, y)))
            result["hvp_method"] = ops[0].method
        return ops[0].matvec(vector)

    calls = {
        "grad": lambda: gradient(x, y),
        "hvp": hvp,
    }
    for method, key in (("materialize", "gram"), ("ghost", "ghost")):
        calls[key] = functools.partial(
            tfb.gradient_gram,
            model,
            (x, y),
            method=method,
            microbatch_size=m,
            training=training,
            memory_budget=budget,
        )
    calls = {k: v for k, v in calls.items() if k == "grad" or k in _CALLS.value}
    if what == "time" and "ghost" in calls:
        result["auto"] = gradients.sample_rows(
            model,
            (x, y),
            microbatch_size=m,
            training=training,
            memory_budget=budget,
        ).method
    if not training:
        gradient_eval = common.gradient_function(model, training=False)
        calls["grad_eval"] = lambda: gradient_eval(x, y)
    if what != "time":  # memory of one method alone
        try:
            for _ in range(2):
                common.block(calls[what]())
        except Exception as error:  # noqa: BLE001 (reported, not hidden)
            result["error"] = common.short_error(error)
        result["peak_mb"] = common.peak_rss_mb()
        return result
    return _timings(calls, result, n, dim, training)


def _timings(calls: dict, result: dict, n: int, dim: int, training) -> dict:
    """Times every call of `calls` into `result` (the "time" worker)."""
    # The gradient's memory as in a process of its own, then the product
    # while nothing else holds memory (BERT: 4.5 GB of rows).
    result["grad_first_s"] = common.timed(calls["grad"])
    common.block(calls["grad"]())
    result["grad_peak_mb"] = common.peak_rss_mb()
    if "gram" in calls:  # (WRN-28-10's rows alone would take 37 GB)
        result["matmul_s"] = _matmul_seconds(n, dim)
    times = {"grad": []}
    for key, call in list(calls.items())[1:]:
        try:
            result[f"{key}_first_s"] = common.timed(call)
            times[key] = []
        except Exception as error:  # noqa: BLE001 (reported, not hidden)
            result[f"{key}_error"] = common.short_error(error)
            del calls[key]
    start = time.perf_counter()
    for rounds in range(1, _REPEATS.value + 1):
        for key, call in calls.items():
            times[key].append(common.timed(call))
        elapsed = time.perf_counter() - start
        if rounds >= _MIN_REPEATS.value and elapsed > _ROUND_SECONDS.value:
            break
    result["rounds"] = rounds
    for key, values in times.items():
        result[f"{key}_s"] = common.median(values)
        result[f"{key}_all_s"] = values
    reference = "grad" if training else "grad_eval"
    for key, base in ("hvp", "grad"), ("gram", reference), ("ghost", reference):
        if key in times and base in times:
            ratios = [s / t for s, t in zip(times[key], times[base])]
            result[f"{key}/grad"] = common.median(ratios)
    return result


_TIME_HEADERS = (
    "model|params|grad ms|HVP method|HVP ms|HVP/grad|Gram training|"
    "eval grad ms|Gram ms|Gram/grad|matmul ms|chunks|ghost ms|ghost/grad|"
    "auto|grad 1st s|HVP 1st s|Gram 1st s|ghost 1st s|rounds"
).split("|")
_MEMORY_HEADERS = "model|base MiB|grad +|HVP +|Gram +|ghost +".split("|")


def _rows(name: str, r: dict, memory: dict) -> list:
    nan = float("nan")

    def ms(key):
        return 1e3 * r.get(f"{key}_s", nan)

    timing = [name.removeprefix("zoo:"), r.get("params", "?"), ms("grad")]
    timing += [r.get("hvp_method", "?"), ms("hvp"), r.get("hvp/grad", nan)]
    training = r.get("gram_training", "?")
    timing += [training, "=" if training is True else ms("grad_eval")]
    timing += [ms("gram"), r.get("gram/grad", nan), ms("matmul")]
    timing.append(r.get("chunks", "?"))
    timing += [ms("ghost"), r.get("ghost/grad", nan), r.get("auto", "?")]
    timing += [
        r.get(f"{k}_first_s", nan) for k in ("grad", "hvp", "gram", "ghost")
    ]
    timing.append(r.get("rounds", "?"))
    usage = [name.removeprefix("zoo:"), r.get("base_mb", nan)]
    usage.append(r.get("grad_peak_mb", nan) - r.get("base_mb", nan))
    for key in ("hvp", "gram", "ghost"):
        run = memory.get(key, {})
        usage.append(run.get("peak_mb", nan) - run.get("base_mb", nan))
    return [timing, usage]


def main(argv: list[str]) -> None:
    del argv
    if _WORKER.value:
        common.print_result(_worker(_WORKER.value))
        return
    load, start = common.load_line(), time.perf_counter()
    tables, errors = [[], []], []
    for name in _MODELS.value:
        runs = {}
        for what in ["time", *_MEMORY.value]:
            args = [
                f"--worker={name},{what}",
                f"--batch_size={_BATCH_SIZE.value}",
                f"--microbatch_size={_MICROBATCH.value}",
                f"--repeats={_REPEATS.value}",
                f"--min_repeats={_MIN_REPEATS.value}",
                f"--round_seconds={_ROUND_SECONDS.value}",
                f"--memory_budget_mb={_BUDGET_MB.value}",
                f"--calls={','.join(_CALLS.value)}",
            ]
            runs[what] = common.run_worker(__file__, args, _TIMEOUT.value)
            print(name, what, runs[what], file=sys.stderr, flush=True)
            errors += [
                f"{name} {what} {k}: {v}"
                for k, v in runs[what].items()
                if k.endswith("error")
            ]
        for table, row in zip(tables, _rows(name, runs.pop("time"), runs)):
            table.append(row)
    print(
        f"N = {_BATCH_SIZE.value}, Gram M = {_MICROBATCH.value}; times: "
        f"median of up to {_REPEATS.value} rounds after the first call; "
        "ratios: median of per-round ratios; gradient_gram memory_budget = "
        f"{_BUDGET_MB.value} MiB\n"
    )
    print(common.markdown_table(_TIME_HEADERS, tables[0]))
    if _MEMORY.value:
        print("\nPeak RSS increase over the base (MiB), one process each:\n")
        print(common.markdown_table(_MEMORY_HEADERS, tables[1]))
    for error in errors:
        print(f"\n* {error}")
    minutes = (time.perf_counter() - start) / 60
    print(f"\nAt the start: {load}; at the end: {common.load_line()}")
    print(f"Took {minutes:.1f} minutes.")


if __name__ == "__main__":
    app.run(main)
