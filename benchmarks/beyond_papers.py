"""What the measurements beyond the papers cost next to lambda_1.

For each of `--models` (zoo names, see `benchmarks/common.py`), on one
batch of `--batch_size` random examples in inference mode, with the
default solver tolerance:

* `hvp`: one Hessian-vector product;
* `lambda_1`: `HessianOperator.eigenpairs(k=1)`, the reference;
* `preconditioned`: `tfb.preconditioned_hessian_eigenvalues` after one
  Adam step (reading P from the slots included);
* `batch_sharpness`: `tfb.batch_sharpness` over 4 mini-batches of a
  quarter of the batch;
* `alignment`: `sharpness.alignment` with the measured top eigenvector
  (one gradient, one HVP);
* `probe_splits`: lambda_1 on each of 4 quarters of the probe,
  warm-started from the full probe's eigenvector (`HessianSpectrum(...,
  probe_splits=4)`);
* `blocks`: `tfb.hessian_eigenvalues(..., blocks="layer")`, every layer's
  diagonal block (all blocks share one compiled solver).

Times are medians over `--repeats` rounds after a first call, whose time
(tracing included) is reported too.

    python benchmarks/beyond_papers.py --models=zoo:simple_cnn,zoo:resnet32
"""

from __future__ import annotations

import sys
import time

import common
from absl import app, flags

_MODELS = flags.DEFINE_list(
    "models", ["zoo:simple_cnn", "zoo:resnet32"], "Zoo or benchmark models."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Probe examples.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed rounds.")


def _calls(name: str) -> tuple[dict, object, int]:
    """The timed calls on one model, the model (kept alive: operators hold
    it weakly) and its number of layer blocks."""
    import keras
    import tensorflow as tf

    import tf_breakeven as tfb
    from tf_breakeven import sharpness
    from tf_breakeven.callbacks.hessian_spectrum import split_operators

    model, x, y = common.build(name, _BATCH_SIZE.value)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=model.loss)
    model.fit(x, y, batch_size=_BATCH_SIZE.value, epochs=1, verbose=0)
    data = (x, y)
    op = tfb.HessianOperator(model, data, training=False)
    top = op.eigenpairs(k=1).eigenvectors
    vector = [tf.ones_like(v) for v in model.trainable_variables]
    parts = split_operators(op, 4)
    blocks = tfb.blocks.variable_blocks(model, "layer")
    calls = {
        "hvp": lambda: op.matvec(vector),
        "lambda_1": lambda: op.eigenpairs(k=1).eigenvalues,
        "preconditioned": lambda: tfb.preconditioned_hessian_eigenvalues(
            model, data, training=False
        ),
        "batch_sharpness": lambda: tfb.batch_sharpness(
            model, data, _BATCH_SIZE.value // 4, training=False
        ),
        "alignment": lambda: sharpness.alignment(op, top),
        "probe_splits": lambda: [
            p.eigenpairs(k=1, start_vector=top[0]).eigenvalues for p in parts
        ],
        "blocks": lambda: tfb.hessian_eigenvalues(
            model, data, blocks="layer", training=False
        ),
    }
    return calls, model, len(blocks)


def main(argv):
    del argv
    print(common.load_line())
    for name in _MODELS.value:
        calls, model, num_blocks = _calls(name)
        first = {}
        for key, fn in calls.items():
            start = time.perf_counter()
            common.block(fn())
            first[key] = time.perf_counter() - start
        times = {key: [] for key in calls}
        for _ in range(_REPEATS.value):
            for key, fn in calls.items():
                times[key].append(common.timed(fn))
        reference = common.median(times["lambda_1"])
        rows = [
            [
                key,
                f"{common.median(times[key]):.3f}",
                f"{common.median(times[key]) / reference:.2f}",
                f"{first[key]:.1f}",
            ]
            for key in calls
        ]
        params = sum(int(v.numpy().size) for v in model.trainable_variables)
        print(
            f"\n{name}: {params} parameters, {num_blocks} layer blocks, "
            f"batch {_BATCH_SIZE.value}"
        )
        print(
            common.markdown_table(
                ["measurement", "s", "x lambda_1", "first call s"], rows
            )
        )
    print(common.load_line())


if __name__ == "__main__":
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    app.run(main)
