"""What a Lanczos step costs on top of its Hessian-vector product.

Issue 11 asks for a solver overhead of at most 5% of one HVP per Lanczos
iteration. Two measurements, in this process, interleaved in rounds:

* `solver`: `linalg.eigsh(matvec, P, 1, num_iterations=m, tol=0.0)` with
  a diagonal matvec (one elementwise product, `--dim` = P entries), so
  the time per step is the solver's own work: the three-term recurrence,
  the Gram-Schmidt pass over the vectors so far, norms, bookkeeping;
* for each of `--models` (zoo names, see `benchmarks/common.py`):
  `tfb.HessianOperator(model, (x, y), training=False)`, one `matvec`, m
  normalized `flat_matvec` calls in a `tf.while_loop` (a power iteration,
  PyHessian's step: the HVP as a solver loop runs it) and one
  `eigenpairs(k=1, num_iterations=m, tol=0.0)`; overhead = (Lanczos
  time / m) / HVP time - 1, and "over a power step" the same against the
  loop's time per step (on a noisy machine the standalone HVP can come
  out slower than a whole Lanczos step).

Times are medians over `--repeats` rounds after a first call.

    python benchmarks/lanczos_overhead.py --dim=1250858 --iterations=20
"""

from __future__ import annotations

import sys

import common
import numpy as np
from absl import app, flags

_DIM = flags.DEFINE_integer("dim", 1_250_858, "Solver-only dimension P.")
_ITERATIONS = flags.DEFINE_integer("iterations", 20, "Lanczos steps m.")
_MODELS = flags.DEFINE_list(
    "models", ["zoo:simple_cnn", "zoo:resnet32"], "Zoo models ('' for none)."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Examples per batch.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds.")


def _calls() -> tuple[dict, list]:
    """The timed calls, and the models they need alive."""
    import tensorflow as tf

    import tf_breakeven as tfb
    from tf_breakeven import linalg

    m, dim = _ITERATIONS.value, _DIM.value
    diagonal = tf.constant(np.linspace(1.0, 2.0, dim), tf.float32)
    solver = tf.function(
        lambda: (
            linalg.eigsh(
                lambda v: diagonal * v, dim, 1, num_iterations=m, tol=0.0
            ).eigenvalues
        )
    )
    calls = {"solver": solver}
    models = []  # operators hold their models weakly: keep them alive
    for name in filter(None, _MODELS.value):
        model, x, y = common.build(name, _BATCH_SIZE.value)
        models.append(model)
        operator = tfb.HessianOperator(model, (x, y), training=False)
        vector = [tf.ones_like(v) for v in model.trainable_variables]
        calls[f"{name}/hvp"] = lambda op=operator, v=vector: op.matvec(v)
        calls[f"{name}/loop"] = _hvp_loop(operator, m)
        calls[f"{name}/lanczos"] = lambda op=operator: (
            op.eigenpairs(k=1, num_iterations=m, tol=0.0).eigenvalues
        )
    return calls, models


def _hvp_loop(operator, m: int):
    """m normalized HVPs in a `tf.while_loop` (a power iteration): the
    HVP as a solver loop runs it, without the solver's own work."""
    import tensorflow as tf

    def run():
        def body(i, v):
            w = operator.flat_matvec(v)
            return i + 1, w / tf.norm(w)

        start = tf.ones([operator.dim], operator.dtype)
        start = start / tf.norm(start)
        return tf.while_loop(lambda i, _: i < m, body, (0, start))[1]

    return tf.function(run)


def main(argv):
    del argv
    print(common.load_line())
    calls, models = _calls()
    times = common.interleaved(calls, _REPEATS.value)
    m = _ITERATIONS.value
    rows = [["solver alone, per step", _DIM.value, "", "", 1e3 * common.median(
        times["solver"]) / m, "", ""]]  # fmt: skip
    for name in filter(None, _MODELS.value):
        hvp = common.median(times[f"{name}/hvp"])
        loop = common.median(times[f"{name}/loop"]) / m
        step = common.median(times[f"{name}/lanczos"]) / m
        rows.append(
            [name, "", 1e3 * hvp, 1e3 * loop, 1e3 * step, step / hvp - 1]
            + [step / loop - 1]
        )
    headers = ["what", "P", "HVP ms", "power step ms", "Lanczos step ms"]
    headers += ["overhead", "over a power step"]
    print(common.markdown_table(headers, rows))
    print(common.load_line())
    del models


if __name__ == "__main__":
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    app.run(main)
