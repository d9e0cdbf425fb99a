"""Two ways to compute each step of a materialized ghost part, timed.

A kernel with P positions whose ghost product would cost (nP)^2 (d_in +
d_out) forms its per-sample gradients instead (`ghost.layer_gram`,
method "materialize"): rows `einsum("ipk,ipo->iko", a, b)`, then the
[n, n] product of the rows. Which implementation of each step is faster
depends on the CPU (BENCHMARKS.md sections 13 and 14c), so this script
times, for n samples of P positions and each `--shapes` entry d_in x d_out:

* the rows by XLA (`jit_compile=True`, what the library runs) and by
  TensorFlow's BatchMatMul;
* the rows' self-product `tf.matmul(r, r, transpose_b=True)` in float64
  (what the library runs) and in float32.

Times are medians over `--repeats` interleaved rounds after a first call.

    python benchmarks/part_variants.py --shapes=32x256,64x256
"""

from __future__ import annotations

import sys

import common
from absl import app, flags

_SAMPLES = flags.DEFINE_integer("samples", 128, "Samples n.")
_POSITIONS = flags.DEFINE_integer("positions", 128, "Positions P.")
_SHAPES = flags.DEFINE_list(
    "shapes", ["32x256", "64x256"], "Kernel shapes d_in x d_out."
)
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed rounds.")


def main(argv):
    del argv
    import tensorflow as tf

    rows_xla = tf.function(
        lambda a, b: tf.einsum("ipk,ipo->iko", a, b), jit_compile=True
    )
    rows_tf = tf.function(lambda a, b: tf.einsum("ipk,ipo->iko", a, b))
    product = tf.function(lambda r: tf.matmul(r, r, transpose_b=True))
    n, p = _SAMPLES.value, _POSITIONS.value
    calls = {}
    for shape in _SHAPES.value:
        d_in, d_out = (int(d) for d in shape.split("x"))
        a = tf.random.stateless_normal([n, p, d_in], [0, 1])
        b = tf.random.stateless_normal([n, p, d_out], [0, 2])
        r32 = tf.reshape(rows_tf(a, b), [n, -1])
        r64 = tf.cast(r32, tf.float64)
        calls[f"{shape}/rows, XLA"] = lambda a=a, b=b: rows_xla(a, b)
        calls[f"{shape}/rows, BatchMatMul"] = lambda a=a, b=b: rows_tf(a, b)
        calls[f"{shape}/product, float64"] = lambda r=r64: product(r)
        calls[f"{shape}/product, float32"] = lambda r=r32: product(r)
    print(common.load_line())
    times = common.interleaved(calls, _REPEATS.value)
    rows = [
        [*key.split("/"), 1e3 * common.median(t)] for key, t in times.items()
    ]
    print(common.markdown_table(["d_in x d_out", "step", "ms"], rows))
    print(common.load_line())


if __name__ == "__main__":
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    app.run(main)
