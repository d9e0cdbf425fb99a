"""How often a residual tolerance stops Lanczos on the wrong eigenvalue.

A Ritz value whose residual bound `|beta_m s_m|` is below `tol * |theta|`
lies within that distance of *some* eigenvalue of the operator, not
necessarily of the largest: when the random start happens to weigh the top
eigenvector little against one just below it, the Ritz value first settles
on the lower one and meets the tolerance there (BENCHMARKS.md section 15).
How likely that is depends on the start, so this script measures it over
many seeds.

For each of `--models` (see `benchmarks/common.py`) with the weights and
data of `--seed`, on one random batch in inference mode, it runs
`--iterations` Lanczos steps (`linalg.lanczos`, full reorthogonalization,
no early stop) from the random start of each seed in `0..--starts - 1`,
then replays each stopping rule on the recorded coefficients (a rule only
decides where to stop, it does not change the steps): `tol` stops at the
first step m >= `min_steps` whose top Ritz value has a relative residual
bound `<= tol`. For each rule it prints the mean and largest number of
steps, the largest relative error of the Ritz value at the stop (against
the largest Ritz value any start reached at the last step), and how many
starts stopped with an error above 1e-3 and above 1e-2.

    python benchmarks/stopping_rule.py --models=peers:simple_cnn --starts=24
"""

from __future__ import annotations

import sys

import common
import numpy as np
from absl import app, flags

_MODELS = flags.DEFINE_list(
    "models",
    ["peers:simple_cnn", "peers:resnet32"],
    "Models (benchmarks/common.py names).",
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Examples per batch.")
_SEED = flags.DEFINE_integer("seed", 0, "Weights and data seed.")
_ITERATIONS = flags.DEFINE_integer("iterations", 30, "Lanczos steps.")
_STARTS = flags.DEFINE_integer("starts", 16, "Random starts (seeds 0..n-1).")
_TOLS = flags.DEFINE_list(
    "tols", ["1e-2", "5e-3", "2e-3", "1e-3"], "Residual tolerances."
)
_MIN_STEPS = flags.DEFINE_list(
    "min_steps", ["1", "10"], "Least steps before the tolerance counts."
)


def _runs(operator, m: int, starts: int) -> list[tuple]:
    import tensorflow as tf

    from tf_breakeven import linalg

    run = tf.function(
        lambda seed: linalg.lanczos(
            operator.flat_matvec,
            operator.dim,
            m,
            seed=seed,
            dtype=operator.dtype,
        )
    )
    out = []
    for seed in range(starts):
        result = run(tf.constant(seed))
        alphas = result.alphas.numpy().astype(np.float64)
        betas = result.betas.numpy().astype(np.float64)
        out.append(common.ritz_by_step(alphas, betas))
    return out


def _replay(runs, top: float, tol: float, min_steps: int) -> list:
    steps, errors = [], []
    for values, residuals in runs:
        hits = [
            m
            for m in range(max(min_steps, 1), len(values) + 1)
            if residuals[m - 1] <= tol
        ]
        m = hits[0] if hits else len(values)
        steps.append(m)
        errors.append(abs(top - values[m - 1]) / abs(top))
    errors = np.array(errors)
    return [
        f"{np.mean(steps):.1f}",
        max(steps),
        f"{errors.max():.1e}",
        int(np.sum(errors > 1e-3)),
        int(np.sum(errors > 1e-2)),
    ]


def main(argv):
    del argv
    import tf_breakeven as tfb

    print(common.load_line())
    rows = []
    for name in _MODELS.value:
        model, x, y = common.build(name, _BATCH_SIZE.value, _SEED.value)
        operator = tfb.HessianOperator(model, (x, y), training=False)
        runs = _runs(operator, _ITERATIONS.value, _STARTS.value)
        top = max(values[-1] for values, _ in runs)
        spread = max(abs(values[-1] - top) / top for values, _ in runs)
        print(f"{name}: top {top:.6g}, final spread {spread:.1e}")
        for min_steps in (int(s) for s in _MIN_STEPS.value):
            for tol in (float(t) for t in _TOLS.value):
                row = [name, tol, min_steps]
                rows.append(row + _replay(runs, top, tol, min_steps))
        del model, operator
    headers = ["model", "tol", "min steps", "mean steps", "most steps"]
    headers += ["largest error", "errors > 1e-3", "errors > 1e-2"]
    print(f"{_STARTS.value} random starts each")
    print(common.markdown_table(headers, rows))
    print(common.load_line())


if __name__ == "__main__":
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    app.run(main)
