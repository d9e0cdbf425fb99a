"""First-call (trace) cost of our HVP and Gram against a training step's.

Question: is the one-time cost of tracing (and compiling) our first
Hessian-vector product and our first Gram matrix at most 3x that of the
model's own first training step?

For each zoo model (`zoo:<name>` in `benchmarks/common.py`, one random
batch of `--batch_size` examples), each measurement runs in a fresh
process (`common.run_worker`, at most `--timeout` seconds) that first
warms TensorFlow up on a tiny model (a training step, both HVP methods
and a Gram: this loads TensorFlow's lazily imported code, so that the
first calls below pay only for the benchmark model), then:

* trains: compiles the model with `keras.optimizers.SGD(0.01)` and its
  loss (sparse categorical cross-entropy on logits; Keras' default
  `jit_compile="auto"`, which means no XLA on a CPU-only machine, as our
  calls run) and times the first `model.train_on_batch(x, y)` and 3
  further calls;
* then, in one process per HVP method of `--methods` (default
  "forward_over_backward" and "backward_over_backward"; "auto" works too,
  the method it chose is reported), so that no two methods share trace
  caches: times the first `tfb.HessianOperator(model, (x, y),
  method=method).matvec(v)` (construction included) and 3 further
  `matvec` calls on the same operator;
* or, in one more process: times the first `tfb.gradient_gram(model,
  (x, y), method=..., microbatch_size=1, training=..., memory_budget=...)`
  and 3 further calls (`--gram_method`, default "auto": the engine it
  chose is reported; `--methods=` with no value measures the Gram alone),
  `training=False` for models with BatchNormalization (the library
  refuses M = 1 in training mode there), True otherwise, as in
  `benchmarks/zoo.py`; `--memory_budget_mb` (default 16 GiB) is large
  enough for the rows of one chunk.

The trace cost of a call is its first call's time minus the median of the
3 further calls ("trace s" = "first s" - "steady s"); the ratios divide
the HVP's or Gram's trace cost by the training step's trace cost measured
in the same process. The table has one row per (model, HVP method); the
Gram columns come from the model's Gram process, so they repeat across the
model's rows. A second table gives the training step as measured in every
process (an idea of its run-to-run noise).

    python benchmarks/first_call.py --batch_size=128
"""

from __future__ import annotations

import sys
import time

import common
from absl import app, flags

_MODELS = flags.DEFINE_list(
    "models",
    [f"zoo:{name}" for name in common.ZOO],
    "Models (zoo:<name>, see common.ZOO).",
)
_METHODS = flags.DEFINE_list(
    "methods",
    ["forward_over_backward", "backward_over_backward"],
    "HessianOperator methods, one process each.",
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Examples per batch.")
_CALLS = flags.DEFINE_integer("calls", 3, "Calls after the first (steady).")
_GRAM_METHOD = flags.DEFINE_enum(
    "gram_method",
    "auto",
    ["auto", "ghost", "materialize"],
    "gradient_gram method (auto: its choice is reported).",
)
_BUDGET_MB = flags.DEFINE_integer(
    "memory_budget_mb", 16384, "gradient_gram memory_budget in MiB."
)
_TIMEOUT = flags.DEFINE_float("timeout", 1200, "Seconds allowed per process.")
_WORKER = flags.DEFINE_string("worker", None, "Internal: model,what.")

_LIMIT = 3.0  # the question's bound on the trace-cost ratios


def _warm_up() -> None:
    """Loads TF's lazily imported code on a throwaway model."""
    import keras
    import tensorflow as tf

    import tf_breakeven as tfb

    tiny = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    tiny.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    x, y = tf.ones((4, 4)), tf.ones((4, 2))
    tiny.train_on_batch(x, y)
    vector = [tf.ones_like(v) for v in tiny.trainable_variables]
    for method in ("forward_over_backward", "backward_over_backward"):
        tfb.HessianOperator(tiny, (x, y), method=method).matvec(vector)
    tfb.gradient_gram(tiny, (x, y))


def _first_and_steady(call, calls: int) -> dict:
    """`{first_s, steady_s, trace_s}` of `call` (result forced)."""
    first = common.timed(call)
    steady = common.median([common.timed(call) for _ in range(calls)])
    return {"first_s": first, "steady_s": steady, "trace_s": first - steady}


def _worker(spec: str) -> dict:
    """Training step, then one HVP method or the Gram, in this process."""
    import keras
    import numpy as np
    import tensorflow as tf

    import tf_breakeven as tfb
    from tf_breakeven import gradients
    from tf_breakeven.functional import has_batch_norm

    name, what = spec.split(",")
    _warm_up()
    model, x, y = common.build(name, _BATCH_SIZE.value)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=model.loss)
    params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    result = {"params": params}
    calls = _CALLS.value
    try:
        step = lambda: model.train_on_batch(x, y)  # noqa: E731
        result["train"] = _first_and_steady(step, calls)
    except Exception as error:  # noqa: BLE001 (reported, not hidden)
        result["train_error"] = common.short_error(error)
    try:
        if what == "gram":
            training = not has_batch_norm(model)
            result["gram_training"] = training
            options = {
                "method": _GRAM_METHOD.value,
                "microbatch_size": 1,
                "training": training,
                "memory_budget": _BUDGET_MB.value << 20,
            }
            result["gram"] = _first_and_steady(
                lambda: tfb.gradient_gram(model, (x, y), **options), calls
            )
            # The engine used, asked after the timed calls (it traces).
            rows = gradients.sample_rows(model, (x, y), **options)
            result["gram_method"] = rows.method
        else:
            method = what.removeprefix("hvp:")
            rng = np.random.default_rng(1)
            vector = [
                tf.constant(rng.normal(size=v.shape), v.dtype)
                for v in model.trainable_variables
            ]
            operators = []

            def hvp():
                if not operators:  # the first call builds the operator
                    operators.append(
                        tfb.HessianOperator(model, (x, y), method=method)
                    )
                return operators[0].matvec(vector)

            result["hvp"] = _first_and_steady(hvp, calls)
            result["hvp_method"] = operators[0].method
    except Exception as error:  # noqa: BLE001 (reported, not hidden)
        result[f"{what}_error"] = common.short_error(error)
    return result


def _ratio(result: dict, key: str) -> float:
    """`key`'s trace cost over the training step's, same process."""
    nan = float("nan")
    train = result.get("train", {}).get("trace_s", nan)
    trace = result.get(key, {}).get("trace_s", nan)
    return trace / train if train > 0 else nan


def _verdict(label: str, ratio: float) -> str:
    """`label: ratio (<= 3)`, `(> 3)` or `(n/a)` when not measured."""
    if ratio != ratio:  # NaN: a failed call or a training trace <= 0
        answer = "n/a"
    else:
        answer = f"{'<=' if ratio <= _LIMIT else '>'} {_LIMIT:g}"
    return f"{label}: {ratio:.3g} ({answer})"


def _cells(result: dict, key: str) -> list:
    nan = float("nan")
    part = result.get(key, {})
    return [part.get(k, nan) for k in ("first_s", "steady_s", "trace_s")]


def main(argv: list[str]) -> None:
    del argv
    if _WORKER.value:
        common.print_result(_worker(_WORKER.value))
        return
    print(common.load_line())
    start = time.perf_counter()
    rows, train_rows, errors, verdicts = [], [], [], []
    for name in _MODELS.value:
        runs = {}
        for what in [*(f"hvp:{m}" for m in _METHODS.value), "gram"]:
            args = [
                f"--worker={name},{what}",
                f"--batch_size={_BATCH_SIZE.value}",
                f"--calls={_CALLS.value}",
                f"--memory_budget_mb={_BUDGET_MB.value}",
                f"--gram_method={_GRAM_METHOD.value}",
            ]
            runs[what] = run = common.run_worker(__file__, args, _TIMEOUT.value)
            print(name, what, run, file=sys.stderr, flush=True)
            errors += [
                f"{name} {what} {k}: {v}"
                for k, v in run.items()
                if k.endswith("error")
            ]
            train_rows.append([name, what, *_cells(run, "train")])
        short = name.removeprefix("zoo:")
        gram = runs.pop("gram")
        gram_cells = [
            gram.get("gram_method", "?"),
            *_cells(gram, "gram"),
            _ratio(gram, "gram"),
        ]
        for what, run in runs.items():
            params = run.get("params", gram.get("params", "?"))
            hvp_ratio = _ratio(run, "hvp")
            method = run.get("hvp_method", what.removeprefix("hvp:"))
            rows.append(
                [short, params, *_cells(run, "train"), method]
                + [*_cells(run, "hvp"), hvp_ratio, *gram_cells]
            )
            verdicts.append(
                _verdict(f"{short} {method} HVP trace / train trace", hvp_ratio)
            )
        if not runs:  # --methods= (empty): the Gram alone
            nan = float("nan")
            rows.append(
                [short, gram.get("params", "?"), *_cells(gram, "train"), "-"]
                + [nan, nan, nan, nan, *gram_cells]
            )
        verdicts.append(
            _verdict(f"{short} Gram trace / train trace", gram_cells[-1])
        )
    print(
        f"\nN = {_BATCH_SIZE.value}; first = first call (trace + run; HVP: "
        f"+ operator construction), steady = median of {_CALLS.value} "
        "further calls, trace = first - steady (s); ratios against the "
        "training step's trace in the same process; gradient_gram "
        f"microbatch_size=1, memory_budget = {_BUDGET_MB.value} MiB\n"
    )
    headers = [
        "model",
        "params",
        "train first s",
        "train steady s",
        "train trace s",
        "HVP method",
        "HVP first s",
        "HVP steady s",
        "HVP trace s",
        "HVP trace / train trace",
        "Gram engine",
        "Gram first s",
        "Gram steady s",
        "Gram trace s",
        "Gram trace / train trace",
    ]
    print(common.markdown_table(headers, rows))
    print("\nThe training step in each process:\n")
    print(
        common.markdown_table(
            ["model", "process", "first s", "steady s", "trace s"],
            train_rows,
        )
    )
    print()
    for verdict in verdicts:
        print(f"* {verdict}")
    for error in errors:
        print(f"\n* {error}")
    minutes = (time.perf_counter() - start) / 60
    print(f"\nTook {minutes:.1f} minutes.")
    print(common.load_line())


if __name__ == "__main__":
    app.run(main)
