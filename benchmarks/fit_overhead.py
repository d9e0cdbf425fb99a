r"""Wall-time overhead of the tracking presets on `model.fit`.

    python benchmarks/fit_overhead.py --steps=2000 --repeats=2

Trains the break-even paper's SimpleCNN (32x32x3 random data, batch 128,
SGD) for `--steps` steps without callbacks, with the "economy" preset and
with the "paper" preset, after one warm-up fit of each (tracing excluded
from the steady-state numbers, reported separately as first-fit time).
Prints a Markdown table of seconds and overhead in percent.
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import tf_breakeven as tfb  # noqa: E402
from tf_breakeven import models  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 2000, "Training steps per fit.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("steps_per_epoch", 200, "Steps per epoch.")
flags.DEFINE_integer("repeats", 2, "Timed fits per configuration.")
flags.DEFINE_list("presets", ["none", "economy", "paper"], "Presets.")


def _fit_seconds(preset: str, x, y) -> float:
    keras.utils.set_random_seed(0)
    model = models.get_model("simple_cnn", num_classes=10)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    callbacks = [] if preset == "none" else tfb.preset(preset, (x, y))
    epochs = max(1, FLAGS.steps // FLAGS.steps_per_epoch)
    start = time.perf_counter()
    model.fit(
        x,
        y,
        batch_size=FLAGS.batch_size,
        epochs=epochs,
        steps_per_epoch=FLAGS.steps_per_epoch,
        callbacks=callbacks,
        verbose=0,
    )
    return time.perf_counter() - start


def main(argv):
    del argv
    rng = np.random.default_rng(0)
    n = FLAGS.batch_size * FLAGS.steps_per_epoch
    x = rng.normal(size=(n, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, n)
    rows = []
    base = None
    for preset in FLAGS.presets:
        first = _fit_seconds(preset, x, y)  # includes tracing
        times = [_fit_seconds(preset, x, y) for _ in range(FLAGS.repeats)]
        median = statistics.median(times)
        base = median if preset == "none" else base
        overhead = (
            ""
            if base is None or preset == "none"
            else f"{100 * (median / base - 1):+.1f}%"
        )
        rows.append((preset, first, median, overhead))
    lines = [
        f"SimpleCNN, 32x32x3, batch {FLAGS.batch_size}, {FLAGS.steps} steps",
        "",
        "| preset | first fit (s) | median fit (s) | overhead |",
        "|---|---|---|---|",
    ]
    lines += [f"| {p} | {f:.1f} | {m:.1f} | {o} |" for p, f, m, o in rows]
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
