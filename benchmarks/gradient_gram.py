"""Cost of the Gram matrix of sample gradients, against two baselines.

For each model (see `benchmarks/common.py`) and micro-batch size M, on one
random batch of N examples (n = N / M samples), times:

* `Gram`: `tfb.gradient_gram(model, (x, y), microbatch_size=M,
  method="materialize")`, the vectorized sample gradients and their float64
  product (public API, numpy result), and `vectorized`: the library's
  stacked sample gradients alone (its internal `tf.function`, float32, no
  Gram matrix);
* `ghost`: the same call with `method="ghost"` (the Gram from layer inputs
  and output gradients, no sample gradient of a tapped kernel formed), and
  `auto`: what `method="auto"` (the default) chose;
* `loop`: a `tf.function` computing one sample's gradient (traced once),
  called in a Python loop over the n samples; `loop+Gram` also flattens
  each to float64, stacks them and forms the Gram matrix as the library does;
* `grad`: one gradient of the mean loss over the whole batch (the floor: one
  backward pass);
* `matmul`: the float64 [n, P] x [P, n] product alone (random rows), a
  cost any method that materializes the sample gradients as rows pays.

M = 1 runs with `training=False` for models with BatchNormalization (a
single example has no batch statistics) and `training=True` otherwise;
M > 1 runs with `training=True`.

Timing: one fresh process per (model, M) makes the first call of each
function (trace + run, reported on its own), then `--repeats` rounds calling
every function once; times are medians, ratios are medians of per-round
ratios (both calls in the same round, which cancels drifts in the load of a
shared machine). The two Gram matrices are compared (largest difference
relative to the largest entry).

Memory: one more fresh process per (model, M, method) runs only that
method twice and reports its peak resident memory
(`getrusage(RUSAGE_SELF).ru_maxrss`) in total and above the base taken
after importing TensorFlow, warming it up on a tiny model and building the
model and data (the increase includes tracing).

    python benchmarks/gradient_gram.py --batch_size=128 --repeats=5
"""

from __future__ import annotations

import sys
import time

import common
from absl import app, flags

_MODELS = flags.DEFINE_list(
    "models", ["cnn", "resnet20"], "Models (see benchmarks/common.py)."
)
_MICROBATCH_SIZES = flags.DEFINE_list(
    "microbatch_sizes", ["1", "4"], "Micro-batch sizes M."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Examples N.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds.")
_BUDGET_MB = flags.DEFINE_integer(
    "memory_budget_mb", 1024, "gradient_gram memory_budget in MiB."
)
_MEMORY = flags.DEFINE_bool("memory", True, "Also measure peak memory.")
_TIMEOUT = flags.DEFINE_float("timeout", 1800, "Seconds allowed per run.")
_WORKER = flags.DEFINE_string("worker", None, "Internal: model,M,what.")

_MEMORY_METHODS = ("grad", "gram", "ghost", "loop")


def _calls(model, x, y, m, training) -> dict:
    """The timed functions `() -> result`, by name."""
    import tensorflow as tf

    import tf_breakeven as tfb
    from tf_breakeven import gradients

    kernel = gradients.gradient_kernel(model, training=training)
    samples = gradients.prepare_samples(model, (x, y), m, training)
    gradient = common.gradient_function(model, training)

    @tf.function
    def flat_gradient(xs, ys):
        grads = gradient(xs, ys)
        return tf.concat(
            [tf.reshape(tf.cast(g, tf.float64), [-1]) for g in grads], 0
        )

    pieces = [
        (
            tf.nest.map_structure(lambda t, i=i: t[i * m : (i + 1) * m], x),
            y[i * m : (i + 1) * m],
        )
        for i in range(_BATCH_SIZE.value // m)
    ]

    def loop_gram():
        rows = tf.stack([flat_gradient(*piece) for piece in pieces])
        return tf.matmul(rows, rows, transpose_b=True).numpy()

    def gram(method):
        return lambda: tfb.gradient_gram(
            model,
            (x, y),
            method=method,
            microbatch_size=m,
            training=training,
            memory_budget=_BUDGET_MB.value << 20,
        )

    return {
        "grad": lambda: gradient(x, y),
        "gram": gram("materialize"),
        "ghost": gram("ghost"),
        "rows": lambda: kernel.sample_gradients(*samples),
        "loop": loop_gram,
        "looprows": lambda: [gradient(*piece) for piece in pieces][-1],
    }


def _worker(spec: str) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    import tf_breakeven as tfb
    from tf_breakeven import gradients
    from tf_breakeven.functional import has_batch_norm
    from tf_breakeven.gradients import chunk_size

    name, m, what = spec.split(",")
    m = int(m)
    tiny = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    tiny.compile(loss="mse")  # warm-up: loads lazily imported TF code
    tfb.gradient_gram(tiny, (tf.ones((4, 4)), tf.ones((4, 2))))
    common.gradient_function(tiny)(tf.ones((4, 4)), tf.ones((4, 2)))
    model, x, y = common.build(name, _BATCH_SIZE.value)
    training = m > 1 or not has_batch_norm(model)
    n = _BATCH_SIZE.value // m
    dim = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    chunks = -(-n // chunk_size(n, dim, _BUDGET_MB.value << 20))
    result = {"training": training, "n": n, "params": dim, "chunks": chunks}
    result["base_mb"] = common.peak_rss_mb()
    calls = _calls(model, x, y, m, training)
    if what != "time":  # memory of one method alone
        try:
            for _ in range(2):
                common.block(calls[what]())
        except Exception as error:  # noqa: BLE001 (reported, not hidden)
            result["error"] = common.short_error(error)
        result["peak_mb"] = common.peak_rss_mb()
        return result
    # What "auto" picks for the timed configuration (N, M, mode, budget).
    result["auto"] = gradients.sample_rows(
        model,
        (x, y),
        method="auto",
        microbatch_size=m,
        training=training,
        memory_budget=_BUDGET_MB.value << 20,
    ).method
    rows = tf.random.normal([n, dim], dtype=tf.float64)
    calls["matmul"] = lambda: tf.matmul(rows, rows, transpose_b=True)
    outputs, times = {}, {}
    for key, call in list(calls.items()):
        try:
            start = time.perf_counter()
            outputs[key] = common.block(call())
            result[f"{key}_first_s"] = time.perf_counter() - start
            times[key] = []
        except Exception as error:  # noqa: BLE001 (reported, not hidden)
            result[f"{key}_error"] = common.short_error(error)
            del calls[key]
    for _ in range(_REPEATS.value):
        for key, call in calls.items():
            times[key].append(common.timed(call))
    for key, values in times.items():
        result[f"{key}_s"] = common.median(values)
        result[f"{key}_all_s"] = values
    pairs = [("rows", "grad"), ("looprows", "rows"), ("gram", "grad")]
    pairs += [("ghost", "grad"), ("ghost", "gram")]
    for a, b in pairs:
        if a in times and b in times:
            ratios = [s / t for s, t in zip(times[a], times[b])]
            result[f"{a}/{b}"] = common.median(ratios)
    if "gram" in times and "loop" in times:
        ratios = [s / t for s, t in zip(times["loop"], times["gram"])]
        result["loop/gram"] = common.median(ratios)
        gram, loop = outputs["gram"], outputs["loop"]
        result["diff"] = float(np.abs(gram - loop).max() / np.abs(loop).max())
    if "ghost" in outputs and "gram" in outputs:
        ghost, gram = outputs["ghost"], outputs["gram"]
        scale = np.abs(gram).max()
        result["ghost_diff"] = float(np.abs(ghost - gram).max() / scale)
    return result


_SAMPLE_HEADERS = (
    "model|M|training|n|params|grad ms|vectorized ms|loop ms|"
    "loop/vectorized|vectorized/grad"
).split("|")
_GRAM_HEADERS = (
    "model|M|Gram ms|loop+Gram ms|loop/Gram|Gram/grad|matmul ms|Gram 1st s|"
    "loop 1st s|chunks|Gram vs loop"
).split("|")
_GHOST_HEADERS = (
    "model|M|auto|ghost ms|Gram ms|grad ms|ghost/grad|ghost/Gram|ghost 1st s|"
    "ghost vs Gram"
).split("|")
_MEMORY_HEADERS = (
    "model|M|base|grad peak|Gram peak|ghost peak|loop+Gram peak|grad +|"
    "Gram +|ghost +|loop+Gram +"
).split("|")


def _table_rows(name: str, m: str, r: dict, memory: dict) -> list:
    """The rows of the four tables for one (model, M)."""
    nan = float("nan")

    def ms(key):
        return 1e3 * r.get(f"{key}_s", nan)

    samples = [name, m, r.get("training", "?"), r.get("n", "?")]
    samples += [r.get("params", "?"), ms("grad"), ms("rows"), ms("looprows")]
    samples += [r.get("looprows/rows", nan), r.get("rows/grad", nan)]
    gram = [name, m, ms("gram"), ms("loop"), r.get("loop/gram", nan)]
    gram += [r.get("gram/grad", nan), ms("matmul")]
    gram += [r.get("gram_first_s", nan), r.get("loop_first_s", nan)]
    gram += [r.get("chunks", "?"), r.get("diff", nan)]
    ghost = [name, m, r.get("auto", "?"), ms("ghost"), ms("gram"), ms("grad")]
    ghost += [r.get("ghost/grad", nan), r.get("ghost/gram", nan)]
    ghost += [r.get("ghost_first_s", nan), r.get("ghost_diff", nan)]
    peaks = [memory.get(k, {}).get("peak_mb", nan) for k in _MEMORY_METHODS]
    bases = [memory.get(k, {}).get("base_mb", nan) for k in _MEMORY_METHODS]
    usage = [name, m, bases[0], *peaks, *(p - b for p, b in zip(peaks, bases))]
    return [samples, gram, ghost, usage]


def main(argv: list[str]) -> None:
    del argv
    if _WORKER.value:
        common.print_result(_worker(_WORKER.value))
        return
    load = common.load_line()
    tables, errors = [[], [], [], []], []
    for name in _MODELS.value:
        for m in _MICROBATCH_SIZES.value:
            runs = {}
            what = ["time"] + (list(_MEMORY_METHODS) if _MEMORY.value else [])
            for key in what:
                args = [
                    f"--worker={name},{m},{key}",
                    f"--batch_size={_BATCH_SIZE.value}",
                    f"--repeats={_REPEATS.value}",
                    f"--memory_budget_mb={_BUDGET_MB.value}",
                ]
                runs[key] = common.run_worker(__file__, args, _TIMEOUT.value)
                print(name, m, key, runs[key], file=sys.stderr, flush=True)
                errors += [
                    f"{name} M={m} {key} {k}: {v}"
                    for k, v in runs[key].items()
                    if k.endswith("error")
                ]
            rows = _table_rows(name, m, runs.pop("time"), runs)
            for table, row in zip(tables, rows):
                table.append(row)
    print(
        f"N = {_BATCH_SIZE.value}; times: median of {_REPEATS.value} rounds "
        "after the first call; ratios: median of per-round ratios; "
        f"gradient_gram memory_budget = {_BUDGET_MB.value} MiB\n\n"
        "Sample gradients only (no Gram matrix):\n"
    )
    print(common.markdown_table(_SAMPLE_HEADERS, tables[0]))
    print("\nGram matrix (float64):\n")
    print(common.markdown_table(_GRAM_HEADERS, tables[1]))
    print("\nGhost engine against the materialized Gram and a gradient:\n")
    print(common.markdown_table(_GHOST_HEADERS, tables[2]))
    if _MEMORY.value:
        print("\nPeak RSS (MiB): base after build; peak; peak - base\n")
        print(common.markdown_table(_MEMORY_HEADERS, tables[3]))
    for error in errors:
        print(f"\n* {error}")
    print(f"\nAt the start: {load}; at the end: {common.load_line()}")


if __name__ == "__main__":
    app.run(main)
