"""Where the ghost Gram's time goes, and what one batch pass would cost.

Issue 12 asks for the N = 128 per-example ghost Gram (M = 1) at most 1.5x
one batch gradient on the wide MLP and the benchmark LSTM and BERT
configs. For each of `--models` (names of `benchmarks/common.py`), on one
random batch, in this process, interleaved in rounds:

* `grad`: one gradient of the mean loss over the batch (the yardstick);
* `gram`: `tfb.gradient_gram(model, (x, y), method="ghost")` (public API);
* `signals`: the engine's vectorized pass alone (`GhostKernel.signals`:
  every sample run as its own batch under pfor, returning the tapped
  kernels' inputs and output gradients and the other variables' sample
  gradients);
* `parts`: the per-variable Gram matrices from those signals
  (`GhostKernel.parts`), and each tapped kernel's part on its own with
  the method `ghost.layer_method` chose;
* `batched`: one forward and one backward pass of the summed loss over
  the whole batch, returning the same tapped inputs and output gradients
  and the other variables' batch gradients. For a model whose forward
  pass couples no examples (no batch statistics, no random draws) and
  M = 1, the output gradients of this pass are the samples' own; what it
  lacks is the other variables' per-sample gradients (biases, norm
  scales). It is the floor a single-pass signal computation would reach.

Training mode for models without BatchNormalization, inference mode for
the others (as `gradient_gram.py` runs M = 1). Times are medians over
`--repeats` rounds after a first call.

    python benchmarks/ghost_breakdown.py --models=lstm128,bert128 --repeats=7
"""

from __future__ import annotations

import sys

import common
from absl import app, flags

_MODELS = flags.DEFINE_list(
    "models", ["lstm128", "bert128"], "Models (see benchmarks/common.py)."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Examples N.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed rounds.")


def _batched_signals(kernel):
    """A `tf.function` (x, y) -> one batch pass's tapped signals."""
    import tensorflow as tf

    from tf_breakeven import ghost

    fn = kernel.function

    def run(x, y):
        params, state = fn.read_parameters(), fn.read_state()
        with tf.GradientTape() as tape:
            tape.watch(params)
            recorder = ghost.Recorder(fn.variables, kernel.allowed, tape)
            with recorder.active():
                losses, _, _ = fn.losses_and_regularization(params, state, x, y)
            total = tf.reduce_sum(losses)
        calls = [c for i in sorted(recorder.calls) for c in recorder.calls[i]]
        others = [params[i] for i in kernel.others]
        grads = tape.gradient(
            total,
            [c.outputs for c in calls] + others,
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        return [c.inputs for c in calls], grads

    return tf.function(run)


def _part_function(layer, method: str, budget: int):
    """A `tf.function` (a, b) -> one kernel's part of the Gram."""
    import tensorflow as tf

    from tf_breakeven import ghost

    def part(a, b):
        return ghost.layer_gram(layer, a, b, method, budget)

    return tf.function(part, autograph=False)


def _layer_calls(rows) -> dict:
    """`{label: () -> that kernel's part}` for every tapped kernel."""
    from tf_breakeven import ghost

    kernel, budget = rows.kernel, rows.memory_budget
    inputs, grads, _ = rows.signals()
    calls = {}
    for layer, a, b in kernel.layers(inputs, grads):
        method = ghost.layer_method(layer, budget, kernel.jit)
        part = _part_function(layer, method, budget)
        label = (
            f"part {layer.index} ({layer.kind}, P={layer.positions}, "
            f"{layer.d_in}x{layer.d_out}, {method})"
        )
        calls[label] = lambda part=part, a=a, b=b: part(a, b)
    return calls


def _calls(name: str) -> tuple[dict, object]:
    """The timed calls of one model, and the model (kept alive)."""
    import tf_breakeven as tfb
    from tf_breakeven import functional, gradients

    model, x, y = common.build(name, _BATCH_SIZE.value)
    training = not functional.has_batch_norm(model)
    rows = gradients.sample_rows(
        model, (x, y), method="ghost", training=training
    )
    kernel, samples = rows.kernel, tuple(rows.samples)
    signals, regularization = rows.signals(), rows.regularization()
    gradient = common.gradient_function(model, training)
    batched = _batched_signals(kernel)
    calls = {
        "grad": lambda: gradient(x, y),
        "gram": lambda: tfb.gradient_gram(
            model, (x, y), method="ghost", training=training
        ),
        "signals": lambda: kernel.signals(*samples),
        "batched": lambda: batched(x, y),
        "parts": lambda: kernel.parts(
            signals, regularization, rows.memory_budget
        ),
    }
    calls.update(_layer_calls(rows))
    return calls, model


def main(argv):
    del argv
    print(common.load_line())
    rows, kept = [], []
    for name in _MODELS.value:
        calls, model = _calls(name)
        kept.append(model)
        times = common.interleaved(calls, _REPEATS.value)
        for key, values in times.items():
            ratio = [t / g for t, g in zip(values, times["grad"])]
            rows.append(
                [name, key, 1e3 * common.median(values), common.median(ratio)]
            )
    print(common.markdown_table(["model", "call", "ms", "/ grad"], rows))
    print(common.load_line())
    del kept


if __name__ == "__main__":
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    app.run(main)
