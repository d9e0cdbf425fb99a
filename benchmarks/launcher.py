r"""Steps per second of the launcher, with and without tracking, 1 vs 2
replicas.

    python benchmarks/launcher.py --epochs=3

Runs `tf_breakeven.launch.experiment.train_and_evaluate` on the offline
digits data (SimpleCNN, 16x16, batch 128) in a fresh process per
configuration and reports training steps per second from Keras' epoch
timing (the first epoch, which traces, is excluded). "2 replicas" is
MirroredStrategy over two logical CPU devices of the same 2 cores: it
shows the overhead of the distributed path, not a speed-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("epochs", 4, "Epochs per run (the first is excluded).")
flags.DEFINE_list("trackings", ["none", "economy", "paper"], "Presets.")

_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import tensorflow as tf
    replicas, tracking, epochs, workdir = sys.argv[1:5]
    if int(replicas) > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * int(replicas))
    import keras
    from tf_breakeven.launch import config as config_lib, experiment

    times = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.start)

    original = experiment.tracking_callbacks
    experiment.tracking_callbacks = lambda *a: original(*a) + [Timer()]
    config = config_lib.Config(
        epochs=int(epochs), tracking=tracking, verbose=0,
        strategy="mirrored" if int(replicas) > 1 else "default",
        step_tracking_every=0 if tracking == "none" else 10)
    experiment.train_and_evaluate(config, workdir)
    steps = 1437 // 128
    print("RESULT " + json.dumps({"steps_per_s": steps / (sum(times[1:])
          / len(times[1:])), "first_epoch_s": times[0]}))
    """
)


def _run(replicas: int, tracking: str) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        script = os.path.join(workdir, "run.py")
        with open(script, "w") as f:
            f.write(_SCRIPT)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(
            [
                sys.executable,
                script,
                str(replicas),
                tracking,
                str(FLAGS.epochs),
                os.path.join(workdir, "run"),
            ],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def main(argv):
    del argv
    rows = [
        "| replicas | tracking | steps/s | first epoch (s) |",
        "|---|---|---|---|",
    ]
    for replicas in (1, 2):
        for tracking in FLAGS.trackings:
            result = _run(replicas, tracking)
            rows.append(
                f"| {replicas} | {tracking} | {result['steps_per_s']:.1f} | "
                f"{result['first_epoch_s']:.1f} |"
            )
    print(f"load average at end: {os.getloadavg()}")
    print("\n".join(rows))


if __name__ == "__main__":
    app.run(main)
