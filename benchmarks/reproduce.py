r"""Wall time of `tf_breakeven.launch.reproduce` per paper (target: at most
15 minutes each at --scale=quick on 2 CPU cores).

    python benchmarks/reproduce.py                   # both papers, quick
    python benchmarks/reproduce.py --papers=confusion

Runs each paper's reproduction in a fresh process and a fresh workdir
(nothing is resumed), then prints the wall time, the load average at the
end (how quiet the machine was), and the verdicts of claims.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("papers", ["breakeven", "confusion"], "Papers to run.")
flags.DEFINE_string("scale", "quick", "quick or paper.")
flags.DEFINE_string("workdir", None, "Where to run (default: a temp dir).")


def main(argv: list[str]) -> None:
    del argv
    root = FLAGS.workdir or tempfile.mkdtemp(prefix="reproduce_bench_")
    rows = []
    for paper in FLAGS.papers:
        workdir = os.path.join(root, paper)
        start = time.perf_counter()
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "tf_breakeven.launch.reproduce",
                f"--paper={paper}",
                f"--scale={FLAGS.scale}",
                f"--workdir={workdir}",
            ],
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - start
        if result.returncode:
            sys.stdout.write(result.stderr[-3000:])
            raise SystemExit(f"{paper}: exit code {result.returncode}")
        with open(os.path.join(workdir, "report", "claims.json")) as f:
            verdicts = [c["verdict"] for c in json.load(f)]
        rows.append((paper, seconds, os.getloadavg()[0], verdicts))
    sys.stdout.write("| paper | wall time (min) | load avg | verdicts |\n")
    sys.stdout.write("|---|---|---|---|\n")
    for paper, seconds, load, verdicts in rows:
        counts = {v: verdicts.count(v) for v in sorted(set(verdicts))}
        sys.stdout.write(
            f"| {paper} | {seconds / 60:.1f} | {load:.2f} | {counts} |\n"
        )
    sys.stdout.write(f"reports under {root}\n")


if __name__ == "__main__":
    app.run(main)
