"""Step-indexed measurement records: durable JSONL and TensorBoard.

One JSON object per measurement and line:
`{"step": 120, "epoch": 1, "wall_time": 1.7e9, "source": "HessianSpectrum",
"config": {...}, "hessian/lambda_1": 41.2, ...}` — metric keys at the top
level, the probe configuration under "config". NaN is written as `NaN`
(Python's json reads it back). Each line is written whole (short writes are
continued) and fsync'ed, so a killed process loses at most the line being
written; `read_records` skips a half-written last line, and the next write
removes it first.

Faults: a write that fails (a full disk, a read-only directory) truncates
the file back to its last complete record and raises `RecordsError`, an
`OSError` naming the file, the cause and the fix: the records before are
intact and a run resumed from its checkpoint measures the lost steps again.

Resuming: a run restarted from a checkpoint taken after step s calls
`Recorder.resume(s)`, which drops the records of steps after s (they will
be measured again) and a torn last line, so the file continues with no
duplicated or lost steps. The records kept are left byte for byte; when
they are the start of the file (the usual case) the file is truncated in
place, which needs no free space.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

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


class RecordsError(OSError):
    """The records file could not be written; the records before are intact.

    `errno`, `strerror` and `filename` are the cause's; the message names
    the file, the cause and the fix.
    """

    def __str__(self) -> str:
        return str(self.args[0])


def _fix(code: int | None) -> str:
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "free space on its disk"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make its directory writable"
    return "fix the cause"


def records_error(path: str, error: OSError, doing: str) -> RecordsError:
    """A `RecordsError` for `error` raised while `doing` `path`."""
    cause = error.strerror or str(error)
    fault = RecordsError(
        f"could not {doing} {path}: {cause}. The records written before "
        f"are intact; {_fix(error.errno)} and rerun with the same --workdir "
        "(or from the same checkpoint) to resume."
    )
    fault.errno, fault.strerror, fault.filename = error.errno, cause, path
    return fault


class _Line(NamedTuple):
    start: int  # byte offset of the line
    end: int  # byte offset after its newline (or the end of the file)
    record: dict | None  # None: a torn last line


def _scan(data: bytes, path: str) -> list[_Line]:
    """The non-empty lines of a records file; only the last may be torn."""
    lines, start = [], 0
    while start < len(data):
        newline = data.find(b"\n", start)
        end = len(data) if newline < 0 else newline + 1
        if data[start:end].strip():
            lines.append(_Line(start, end, None))
        start = end
    for i, line in enumerate(lines):
        try:
            lines[i] = line._replace(
                record=json.loads(data[line.start : line.end])
            )
        except (json.JSONDecodeError, UnicodeDecodeError):
            if i < len(lines) - 1:
                number = data.count(b"\n", 0, line.start) + 1
                raise ValueError(
                    f"{path}: line {number} is not valid JSON; the file is "
                    "corrupted beyond a torn last line."
                ) from None
            logging.warning("Skipping a half-written last line in %s", path)
    return lines


def _read_bytes(path: str) -> bytes:
    if not os.path.exists(path):
        return b""
    with open(path, "rb") as f:
        return f.read()


def read_records(path: str | os.PathLike, source: str | None = None) -> list:
    """Records of a JSONL file, optionally only those of one `source`."""
    path = os.fspath(path)
    records = [
        line.record
        for line in _scan(_read_bytes(path), path)
        if line.record is not None
    ]
    if source is not None:
        records = [r for r in records if r.get("source") == source]
    return records


def _complete_length(fd: int) -> int:
    """Size of the file up to its last newline (a torn tail excluded)."""
    end = os.fstat(fd).st_size
    while end > 0:
        chunk = os.pread(fd, min(end, 1 << 16), end - min(end, 1 << 16))
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            return end - len(chunk) + newline + 1
        end -= len(chunk)
    return 0


def _repair_tail(fd: int, path: str) -> int:
    """Ends the file after a complete line; returns its size."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size
    complete = _complete_length(fd)
    tail = os.pread(fd, size - complete, complete)
    try:
        json.loads(tail)
    except (json.JSONDecodeError, UnicodeDecodeError):
        logging.warning("Removing a half-written last line of %s", path)
        os.ftruncate(fd, complete)
        return complete
    _write_all(fd, b"\n")  # a whole record without its newline
    return size + 1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:  # not seen on Linux; never loop forever
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def _fsync_append(path: str, line: str) -> None:
    """Appends one whole line, fsync'ed; on failure, truncates it away."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = _repair_tail(fd, path)
        try:
            _write_all(fd, line.encode("utf-8"))
            os.fsync(fd)
        except OSError:
            try:  # leave no partial line behind
                os.ftruncate(fd, size)
                os.fsync(fd)
            except OSError:
                pass  # a torn last line: skipped when read, then repaired
            raise
    finally:
        os.close(fd)


def _truncate(path: str, size: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def _rewrite(path: str, data: bytes, lines: list[_Line]) -> None:
    """Replaces `path` atomically by `lines` of `data`, bytes unchanged."""
    fd, tmp = tempfile.mkstemp(
        dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp"
    )
    try:
        with os.fdopen(fd, "wb") as f:
            for line in lines:
                chunk = data[line.start : line.end]
                f.write(chunk if chunk.endswith(b"\n") else chunk + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def drop_after(path: str, step: int) -> int:
    """Drops the records of steps after `step` and a torn last line.

    Returns the number of records dropped. Kept records are unchanged byte
    for byte; if they start the file it is truncated in place.
    """
    data = _read_bytes(path)
    lines = _scan(data, path)
    kept = [
        line
        for line in lines
        if line.record is not None and int(line.record.get("step", 0)) <= step
    ]
    if len(kept) == len(lines):
        return 0
    if all(a is b for a, b in zip(kept, lines)):
        _truncate(path, kept[-1].end if kept else 0)
    else:
        _rewrite(path, data, kept)
    return sum(line.record is not None for line in lines) - len(kept)


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
            directory = os.path.dirname(os.path.abspath(self.path))
            try:
                os.makedirs(directory, exist_ok=True)
            except OSError as error:
                raise records_error(
                    self.path, error, "create the directory of"
                ) from error
        self._writer = None
        self._resumed_at: int | None = None

    def _tensorboard(self):
        if self._writer is None and self.tensorboard_dir:
            import tensorflow as tf

            self._writer = tf.summary.create_file_writer(self.tensorboard_dir)
        return self._writer

    def resume(self, step: int) -> None:
        """Drops records after `step` (and a torn last line); idempotent.

        Raises:
            RecordsError: the file could not be rewritten (it is unchanged
                or, truncated in place, holds the records up to `step`).
        """
        if self._resumed_at == step:
            return
        if self.path:
            try:
                dropped = drop_after(self.path, step)
            except OSError as error:
                raise records_error(
                    self.path,
                    error,
                    f"drop the records after the restored step {step} from",
                ) from error
            if dropped:
                logging.info(
                    "Resuming at step %d: dropped %d records measured after "
                    "it from %s.",
                    step,
                    dropped,
                    self.path,
                )
        self._resumed_at = step

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

        Raises `RecordsError` if the line cannot be written (the file is
        left with the records before it).

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
            try:
                _fsync_append(self.path, json.dumps(record) + "\n")
            except OSError as error:
                raise records_error(
                    self.path, error, f"write the step {int(step)} record to"
                ) from error
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
