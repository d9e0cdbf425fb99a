"""Step-indexed measurement records: durable JSONL and TensorBoard.

One JSON object per measurement and line:
`{"step": 120, "epoch": 1, "wall_time": 1.7e9, "source": "HessianSpectrum",
"config": {...}, "hessian/lambda_1": 41.2, ...}` — metric keys at the top
level, the probe configuration under "config". NaN is written as `NaN`
(Python's json reads it back). Each line is flushed and fsync'ed, so a
crash loses at most the line being written; `read_records` skips a
half-written last line.

Resuming: a run restarted from a checkpoint taken after step s calls
`Recorder.resume(s)`, which rewrites the file without the records of steps
after s (they will be measured again) and without a torn last line, so the
file continues with no duplicated or lost steps.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging


def _to_json(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return _to_json(value.tolist())
    if isinstance(value, (np.floating, float)):
        return float(value)
    if isinstance(value, (np.integer, int)) and not isinstance(value, bool):
        return int(value)
    return value


def _histogram(key: str, values: np.ndarray) -> dict:
    values = np.asarray(values, np.float64).ravel()
    finite = values[np.isfinite(values)]
    if "cos" in key:
        edges = np.linspace(-1.0, 1.0, 101)
    elif finite.size:
        edges = np.linspace(finite.min(), finite.max() + 1e-12, 101)
    else:
        edges = np.linspace(0.0, 1.0, 101)
    counts, edges = np.histogram(finite, bins=edges)
    return {
        "edges": _to_json(edges),
        "counts": _to_json(counts),
        "num_nonfinite": int(values.size - finite.size),
    }


def _record(step, epoch, source, metrics, config, histograms, curves) -> dict:
    """The JSON record of one measurement (see `Recorder.write`)."""
    record = {
        "step": int(step),
        "epoch": int(epoch),
        "wall_time": time.time(),
        "source": source,
        "config": _to_json(dict(config or {})),
    }
    record.update(_to_json(dict(metrics)))
    if histograms:
        record["histograms"] = {
            key: _histogram(key, values) for key, values in histograms.items()
        }
    if curves:
        record["curves"] = {
            key: {"x": _to_json(np.asarray(x)), "y": _to_json(np.asarray(y))}
            for key, (x, y) in curves.items()
        }
    return record


def _parse_lines(text: str, path: str) -> list[dict]:
    lines = text.split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i >= len(lines) - 2:  # torn last line of a crashed run
                logging.warning("Skipping a half-written last line in %s", path)
                continue
            raise ValueError(
                f"{path}: line {i + 1} is not valid JSON; the file is "
                "corrupted beyond a torn last line."
            ) from None
    return records


def read_records(path: str | os.PathLike, source: str | None = None) -> list:
    """Records of a JSONL file, optionally only those of one `source`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        records = _parse_lines(f.read(), path)
    if source is not None:
        records = [r for r in records if r.get("source") == source]
    return records


def _fsync_append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


class Recorder:
    """Writes measurements to a JSONL file and/or TensorBoard.

    Several callbacks may share one Recorder (one file, one event stream).

    Args:
        path: JSONL file (created with its directory), or None.
        tensorboard_dir: directory for TensorBoard event files, or None.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        tensorboard_dir: str | os.PathLike | None = None,
    ):
        self.path = None if path is None else os.fspath(path)
        self.tensorboard_dir = (
            None if tensorboard_dir is None else os.fspath(tensorboard_dir)
        )
        if self.path:
            os.makedirs(
                os.path.dirname(os.path.abspath(self.path)), exist_ok=True
            )
        self._writer = None
        self._resumed_at: int | None = None

    def _tensorboard(self):
        if self._writer is None and self.tensorboard_dir:
            import tensorflow as tf

            self._writer = tf.summary.create_file_writer(self.tensorboard_dir)
        return self._writer

    def resume(self, step: int) -> None:
        """Drops records after `step` (and a torn last line); idempotent."""
        if self._resumed_at == step:
            return
        self._resumed_at = step
        if not self.path or not os.path.exists(self.path):
            return
        records = read_records(self.path)
        kept = [r for r in records if int(r.get("step", 0)) <= step]
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in kept:
                f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        if len(kept) != len(records):
            logging.info(
                "Resuming at step %d: dropped %d records measured after it "
                "from %s.",
                step,
                len(records) - len(kept),
                self.path,
            )

    def records(
        self, *, source: str | None = None, until_step: int | None = None
    ) -> list[dict]:
        """Records in the file (of `source`; up to `until_step`), in order.

        What a measurement resumes from: after `resume(step)` these are the
        records the restored run keeps.
        """
        if not self.path:
            return []
        return [
            r
            for r in read_records(self.path, source)
            if until_step is None or r["step"] <= until_step
        ]

    def write(
        self,
        *,
        step: int,
        epoch: int,
        source: str,
        metrics: Mapping[str, float],
        config: Mapping[str, Any] | None = None,
        histograms: Mapping[str, np.ndarray] | None = None,
        curves: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> dict:
        """Appends one measurement; returns the record written.

        Args:
            step, epoch, source: where the measurement belongs.
            metrics: scalar values, written at the top level of the record
                and as TensorBoard scalars.
            config: probe configuration, under "config".
            histograms: raw values (e.g. pairwise cosines), written to
                TensorBoard as histograms and to the record as
                `{"edges": [...], "counts": [...]}` (100 bins over the
                finite range, or [-1, 1] for keys containing "cos").
            curves: `(x, y)` pairs (e.g. a spectral density), written to
                the record under "curves" as `{"x": [...], "y": [...]}`.
        """
        record = _record(
            step, epoch, source, metrics, config, histograms, curves
        )
        if self.path:
            _fsync_append(self.path, json.dumps(record) + "\n")
        writer = self._tensorboard()
        if writer is not None:
            import tensorflow as tf

            with writer.as_default(step=int(step)):
                for key, value in metrics.items():
                    tf.summary.scalar(key, float(value))
                for key, values in (histograms or {}).items():
                    values = np.asarray(values, np.float64)
                    values = values[np.isfinite(values)]
                    if values.size:
                        tf.summary.histogram(key, values)
            writer.flush()
        return record

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def as_recorder(
    recorder: Recorder | str | os.PathLike | None,
) -> Recorder | None:
    """A `Recorder` from a Recorder, a JSONL path, or None."""
    if recorder is None or isinstance(recorder, Recorder):
        return recorder
    return Recorder(path=recorder)
