"""How often the default top-eigenvalue call stops low along a training run.

`benchmarks/stopping_rule.py` measures wrong stops of the residual
tolerance over random starts on one fixed batch. This script measures them
where the callbacks meet them: along an SGD trajectory, where the Hessian
changes at every step and the callbacks warm-start Lanczos from the last
top eigenvector by default.

It trains a tanh MLP (`--depth` hidden layers of `--width` units, 64
inputs, 10 logits) on scikit-learn's bundled 8x8 digits (1,797 images,
no download) with `keras.optimizers.SGD(lr)` for each of
`--learning_rates`, `--steps` steps of `--batch_size` random examples.
After every step it computes the top Hessian eigenvalue of the mean loss
on the first `--probe_size` images three ways, with the library's default
tolerance (`spectrum.DEFAULT_TOL`):

* warm: `tfb.hessian_eigenpairs(model, probe, start_vector=previous)`,
  started from the previous step's warm eigenvector (what the callbacks do
  with `warm_start=True`);
* cold: `tfb.hessian_eigenpairs(model, probe, seed=step + 1)`, a fresh
  random start at every step;
* reference: `tol=0.0, num_iterations=--reference_iterations`.

Every Ritz value lies below the top eigenvalue, so the error of each call
is measured against the largest of the three. The script prints, per
learning rate, how many calls stopped more than 1e-3 low, their largest
error and mean steps, and one line per wrong stop.

    python benchmarks/tracking.py --learning_rates=0.5 --steps=300
"""

from __future__ import annotations

import sys

import common
import numpy as np
from absl import app, flags

_LEARNING_RATES = flags.DEFINE_list(
    "learning_rates", ["0.5"], "SGD learning rates, one run each."
)
_STEPS = flags.DEFINE_integer("steps", 300, "Training steps per run.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Examples per step.")
_PROBE_SIZE = flags.DEFINE_integer("probe_size", 256, "Probe examples.")
_WIDTH = flags.DEFINE_integer("width", 64, "Units per hidden layer.")
_DEPTH = flags.DEFINE_integer("depth", 3, "Hidden layers.")
_SEED = flags.DEFINE_integer("seed", 0, "Weights and batch-order seed.")
_REFERENCE_ITERATIONS = flags.DEFINE_integer(
    "reference_iterations", 60, "Lanczos steps of the reference."
)
_WRONG = 1e-3  # a stop further below the top than this is counted


def _model(learning_rate: float):
    import keras

    keras.utils.set_random_seed(_SEED.value)
    layers = [keras.Input((64,))]
    layers += [
        keras.layers.Dense(_WIDTH.value, activation="tanh")
        for _ in range(_DEPTH.value)
    ]
    model = keras.Sequential(layers + [keras.layers.Dense(10)])
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _run(learning_rate: float, x, y) -> tuple[dict, list]:
    """Errors and steps of the warm and cold calls after every step."""
    import tf_breakeven as tfb

    model = _model(learning_rate)
    probe = (x[: _PROBE_SIZE.value], y[: _PROBE_SIZE.value])
    rng = np.random.default_rng(_SEED.value)
    previous = None
    calls = {"warm": ([], []), "cold": ([], [])}
    wrong = []
    for step in range(_STEPS.value):
        batch = rng.integers(0, len(x), _BATCH_SIZE.value)
        model.train_on_batch(x[batch], y[batch])
        pairs = {
            "warm": tfb.hessian_eigenpairs(model, probe, start_vector=previous),
            "cold": tfb.hessian_eigenpairs(model, probe, seed=step + 1),
        }
        previous = pairs["warm"].eigenvectors[0]
        reference = tfb.hessian_eigenpairs(
            model,
            probe,
            k=2,
            tol=0.0,
            num_iterations=_REFERENCE_ITERATIONS.value,
        )
        values = [p.eigenvalues[0] for p in pairs.values()]
        top = max(values + [reference.eigenvalues[0]])
        for name, result in pairs.items():
            error = (top - result.eigenvalues[0]) / abs(top)
            calls[name][0].append(error)
            calls[name][1].append(result.num_iterations)
            if error > _WRONG:
                second = reference.eigenvalues[1]
                wrong.append(
                    [learning_rate, step, name, top, second, error]
                    + [result.num_iterations]
                )
    return calls, wrong


def main(argv):
    del argv
    from sklearn.datasets import load_digits

    print(common.load_line())
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    rows, wrong_rows = [], []
    for learning_rate in (float(v) for v in _LEARNING_RATES.value):
        calls, wrong = _run(learning_rate, x, y)
        for name, (errors, steps) in calls.items():
            errors = np.array(errors)
            rows.append(
                [
                    learning_rate,
                    name,
                    len(errors),
                    int(np.sum(errors > _WRONG)),
                    f"{errors.max():.1e}",
                    f"{np.mean(steps):.1f}",
                ]
            )
        wrong_rows += wrong
    headers = ["lr", "start", "calls", "errors > 1e-3", "largest error"]
    print(common.markdown_table(headers + ["mean steps"], rows))
    headers = ["lr", "step", "start", "top", "second", "error", "steps"]
    print(common.markdown_table(headers, wrong_rows))
    print(common.load_line())


if __name__ == "__main__":
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    app.run(main)
