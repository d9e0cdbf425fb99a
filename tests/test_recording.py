"""JSONL records: durable appends, torn lines, resume without duplicates,
and the faults a run meets: kill -9 mid-write, a full disk, a read-only
directory."""

import errno
import json
import math
import os
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time

import keras
import numpy as np
import pytest

import tf_breakeven as tfb
from tf_breakeven import recording

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_steps(recorder, steps):
    for step in steps:
        recorder.write(
            step=step, epoch=0, source="S", metrics={"m": float(step)}
        )


def test_records_round_trip_with_nan_and_histograms(tmp_path):
    path = tmp_path / "run" / "records.jsonl"
    recorder = recording.Recorder(path)
    recorder.write(
        step=3,
        epoch=1,
        source="S",
        metrics={"a": 1.5, "b": math.nan},
        config={"k": 2},
        histograms={"confusion/cosines": [-0.5, 0.2, 0.2]},
        curves={"density": (np.array([0.0, 1.0]), np.array([0.5, 0.5]))},
    )
    (record,) = recording.read_records(path)
    assert record["step"] == 3 and record["a"] == 1.5
    assert math.isnan(record["b"])
    assert record["config"] == {"k": 2}
    hist = record["histograms"]["confusion/cosines"]
    assert sum(hist["counts"]) == 3 and hist["edges"][0] == -1.0
    assert record["curves"]["density"] == {"x": [0.0, 1.0], "y": [0.5, 0.5]}


def test_torn_last_line_is_skipped_and_repaired_on_resume(tmp_path):
    path = tmp_path / "records.jsonl"
    recorder = recording.Recorder(path)
    _write_steps(recorder, [1, 2, 3])
    with open(path, "a") as f:
        f.write('{"step": 4, "epo')  # crash mid-write
    assert [r["step"] for r in recording.read_records(path)] == [1, 2, 3]
    first_two = b"".join(path.read_bytes().splitlines(keepends=True)[:2])
    resumed = recording.Recorder(path)
    resumed.resume(2)
    assert path.read_bytes() == first_two  # kept records byte for byte
    _write_steps(resumed, [3, 4])
    assert [r["step"] for r in recording.read_records(path)] == [1, 2, 3, 4]
    with open(path) as f:
        assert all(json.loads(line) for line in f)


def test_a_write_after_a_torn_line_removes_it_first(tmp_path):
    """A killed run's torn line never ends up in the middle of the file,
    even if the next writer does not call `resume`."""
    path = tmp_path / "records.jsonl"
    _write_steps(recording.Recorder(path), [1, 2])
    with open(path, "a") as f:
        f.write('{"step": 3, "epo')
    _write_steps(recording.Recorder(path), [3])
    assert [r["step"] for r in recording.read_records(path)] == [1, 2, 3]
    # A whole record that lost only its newline is kept.
    with open(path, "a") as f:
        f.write('{"step": 4, "source": "S"}')
    _write_steps(recording.Recorder(path), [5])
    assert [r["step"] for r in recording.read_records(path)] == [1, 2, 3, 4, 5]


def test_only_the_last_line_may_be_torn(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"step": 1}\n{"st\n{"step": 3')
    with pytest.raises(ValueError, match="line 2"):
        recording.read_records(path)


def test_corruption_in_the_middle_raises(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        recording.read_records(path)


def test_tensorboard_events_are_written(tmp_path):
    recorder = recording.Recorder(tensorboard_dir=tmp_path / "tb")
    recorder.write(
        step=1,
        epoch=0,
        source="S",
        metrics={"hessian/lambda_1": 2},
        histograms={"confusion/cosines": [0.1, -0.2]},
    )
    recorder.close()
    (events,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    import tensorflow as tf

    seen = {}
    for event in tf.compat.v1.train.summary_iterator(str(events)):
        for value in event.summary.value:
            seen[value.tag] = (event.step, tf.make_ndarray(value.tensor))
    step, scalar = seen["hessian/lambda_1"]
    assert step == 1 and float(scalar) == 2.0
    step, histogram = seen["confusion/cosines"]
    # TensorBoard histograms are [left, right, count] rows; 2 values.
    assert step == 1 and histogram[:, 2].sum() == 2


# -- faults ----------------------------------------------------------------


def _fd_path(fd):
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _full_disk(monkeypatch, under, *, after=0, partial=True, call="write"):
    """Fails `os.write` (or `os.fsync`) on files under `under` with ENOSPC.

    The first `after` calls succeed; the failing write first writes half
    of its bytes, as a disk that fills up in the middle of a line does.
    Returns the list of failures raised.
    """
    under, real, calls, raised = str(under), getattr(os, call), [], []

    def faulty(fd, *args):
        if not _fd_path(fd).startswith(under):
            return real(fd, *args)
        calls.append(fd)
        if len(calls) <= after:
            return real(fd, *args)
        if call == "write" and partial and not raised and len(args[0]) > 1:
            raised.append("partial")
            return real(fd, bytes(args[0][: len(args[0]) // 2]))
        raised.append(errno.ENOSPC)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, call, faulty)
    return raised


@pytest.mark.parametrize("call", ["write", "fsync"])
def test_full_disk_raises_naming_the_file_and_keeps_earlier_records(
    tmp_path, monkeypatch, call
):
    path = tmp_path / "records.jsonl"
    recorder = recording.Recorder(path)
    _write_steps(recorder, [1, 2, 3])
    before = path.read_bytes()
    raised = _full_disk(monkeypatch, tmp_path, call=call)
    with pytest.raises(recording.RecordsError) as error:
        _write_steps(recorder, [4])
    assert errno.ENOSPC in raised
    assert call == "fsync" or raised[0] == "partial"  # half a line written
    assert isinstance(error.value, OSError)
    assert error.value.errno == errno.ENOSPC
    message = str(error.value)
    assert f"could not write the step 4 record to {path}" in message
    assert "No space left on device" in message
    assert "free space" in message and "same --workdir" in message
    # The partial line was truncated away: the file is as before the fault.
    assert path.read_bytes() == before
    monkeypatch.undo()  # space freed: the same recorder goes on
    _write_steps(recorder, [4, 5])
    assert [r["step"] for r in recording.read_records(path)] == [1, 2, 3, 4, 5]


def test_resume_on_a_full_disk_truncates_in_place(tmp_path, monkeypatch):
    """Dropping the records after the checkpoint needs no free space."""
    path = tmp_path / "records.jsonl"
    _write_steps(recording.Recorder(path), [1, 2, 3, 4])
    first_two = b"".join(path.read_bytes().splitlines(keepends=True)[:2])
    inode = os.stat(path).st_ino
    _full_disk(monkeypatch, tmp_path, partial=False)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tempfile, "mkstemp", no_space)
    recording.Recorder(path).resume(2)
    assert path.read_bytes() == first_two
    assert os.stat(path).st_ino == inode


def test_a_failed_rewrite_leaves_the_file_and_no_temporary(
    tmp_path, monkeypatch
):
    """Records out of step order cannot be truncated away: they are
    rewritten through a temporary file, which a full disk removes."""
    path = tmp_path / "records.jsonl"
    _write_steps(recording.Recorder(path), [1, 5, 2])
    before = path.read_bytes()
    _full_disk(monkeypatch, tmp_path, call="fsync")
    with pytest.raises(recording.RecordsError, match="No space left") as err:
        recording.Recorder(path).resume(2)
    assert str(path) in str(err.value)
    assert "after the restored step 2" in str(err.value)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["records.jsonl"]
    monkeypatch.undo()
    recording.Recorder(path).resume(2)
    kept = before.splitlines(keepends=True)
    assert path.read_bytes() == kept[0] + kept[2]


def test_short_writes_are_continued(tmp_path, monkeypatch):
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, data[:7]))
    path = tmp_path / "records.jsonl"
    _write_steps(recording.Recorder(path), [1, 2])
    monkeypatch.undo()
    assert [r["m"] for r in recording.read_records(path)] == [1.0, 2.0]


def _read_only(monkeypatch, directory):
    """chmod 0o555 `directory` (and 0o444 its files); if that does not stop
    writes (root), refuses them with EACCES as the kernel would."""
    for name in os.listdir(directory):
        os.chmod(directory / name, 0o444)
    os.chmod(directory, 0o555)
    probe = str(directory / "probe")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT))
    except PermissionError:
        return "chmod"
    os.remove(probe)
    real_open, real_mkdir, inside = os.open, os.mkdir, str(directory)
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def refuse(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

    def open_(path, flags, *args, **kwargs):
        if flags & writing and os.fspath(path).startswith(inside):
            refuse(path)
        return real_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if os.fspath(path).startswith(inside):
            refuse(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "mkdir", mkdir)
    return "emulated"


def test_read_only_directory_raises_naming_the_file(tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    path = workdir / "records.jsonl"
    _write_steps(recording.Recorder(path), [1, 2, 3])
    before = path.read_bytes()
    how = _read_only(monkeypatch, workdir)
    try:
        recorder = recording.Recorder(path)
        recorder.resume(3)  # nothing to drop: reads only
        with pytest.raises(recording.RecordsError) as error:
            _write_steps(recorder, [4])
        assert error.value.errno == errno.EACCES, how
        assert f"to {path}: Permission denied" in str(error.value)
        assert "make its directory writable" in str(error.value)
        with pytest.raises(recording.RecordsError, match="Permission denied"):
            recording.Recorder(path).resume(2)
        with pytest.raises(recording.RecordsError, match="create the dir"):
            recording.Recorder(workdir / "sub" / "records.jsonl")
        assert path.read_bytes() == before
    finally:
        monkeypatch.undo()
        os.chmod(workdir, stat.S_IRWXU)
        os.chmod(path, 0o644)
    resumed = recording.Recorder(path)
    resumed.resume(2)
    _write_steps(resumed, [3, 4])
    assert [r["step"] for r in recording.read_records(path)] == [1, 2, 3, 4]


_WRITER = textwrap.dedent(
    """
    import importlib.util, os, sys, time
    import numpy as np
    spec = importlib.util.spec_from_file_location("recording", sys.argv[1])
    recording = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recording)
    real_write = os.write
    def slow_write(fd, data):  # a slow disk: 256 bytes a call
        time.sleep(0.001)
        return real_write(fd, bytes(data[:256]))
    os.write = slow_write
    recorder = recording.Recorder(sys.argv[2])
    x = np.linspace(0.0, 1.0, 200)
    for step in range(1, 100000):
        recorder.write(step=step, epoch=0, source="S",
                       metrics={"m": float(step)}, curves={"c": (x, x * step)})
        print(step, flush=True)
    """
)


def _kill_mid_line(process, path, min_records, timeout=120):
    """SIGKILLs `process` while it is stopped in the middle of a line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        os.kill(process.pid, signal.SIGSTOP)
        data = path.read_bytes() if path.exists() else b""
        if data.count(b"\n") >= min_records and not data.endswith(b"\n"):
            os.kill(process.pid, signal.SIGKILL)
            return data
        os.kill(process.pid, signal.SIGCONT)
        time.sleep(0.005)
    pytest.fail(f"no torn line seen (rc={process.poll()})")


def test_kill_9_while_writing_many_records_then_resume(tmp_path):
    path = tmp_path / "records.jsonl"
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    process = subprocess.Popen(
        [sys.executable, str(script), recording.__file__, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        data = _kill_mid_line(process, path, min_records=20)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        out, _ = process.communicate(timeout=60)
    assert path.read_bytes() == data and not data.endswith(b"\n")
    acknowledged = [int(line) for line in out.split()]
    steps = [r["step"] for r in recording.read_records(path)]
    # Every acknowledged write is there, whole; the torn one is skipped.
    assert steps == list(range(1, len(steps) + 1))
    assert acknowledged and acknowledged[-1] <= steps[-1] <= len(steps)
    for r in recording.read_records(path):
        assert r["curves"]["c"]["y"][-1] == pytest.approx(r["step"])
    # Resumed from a checkpoint three steps back: no gap, no duplicate, the
    # records kept unchanged.
    checkpoint = steps[-1] - 3
    resumed = recording.Recorder(path)
    resumed.resume(checkpoint)
    lines = data.splitlines(keepends=True)
    assert path.read_bytes() == b"".join(lines[:checkpoint])
    _write_steps(resumed, range(checkpoint + 1, checkpoint + 6))
    steps = [r["step"] for r in recording.read_records(path)]
    assert steps == list(range(1, checkpoint + 6))


class _WeightNorm(tfb.callbacks.Measurement):
    """Squared norm of the weights: a cheap, exact function of the state."""

    def keys(self):
        return ["weights/norm2"]

    def compute(self, model, step):
        norm2 = sum(float(np.sum(np.square(w))) for w in model.get_weights())
        return tfb.callbacks.Result({"weights/norm2": norm2})


def _fit(workdir, epochs=3):
    """4 steps an epoch, measured every step, backed up every epoch."""
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(32, 3)).astype("float32")
    y = x @ np.array([[1.0], [-2.0], [0.5]], "float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.05), "mse")
    callback = tfb.callbacks.MeasurementCallback(
        _WeightNorm(), (x, y), schedule=1, recorder=workdir / "records.jsonl"
    )
    backup = keras.callbacks.BackupAndRestore(str(workdir / "backup"))
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=[callback, backup],
    )


@pytest.mark.parametrize("failing_step", [6, 8])  # mid-epoch, epoch end
def test_full_disk_stops_fit_clearly_and_a_rerun_resumes(
    tmp_path, monkeypatch, failing_step
):
    _fit(tmp_path / "uninterrupted")
    expected = recording.read_records(tmp_path / "uninterrupted/records.jsonl")
    workdir = tmp_path / "run"
    path = workdir / "records.jsonl"
    _full_disk(monkeypatch, workdir, after=failing_step - 1)
    with pytest.raises(recording.RecordsError) as error:
        _fit(workdir)
    message = str(error.value)
    assert f"write the step {failing_step} record to {path}" in message
    assert "No space left on device" in message
    steps = [r["step"] for r in recording.read_records(path)]
    assert steps == list(range(1, failing_step))  # none lost, none torn
    monkeypatch.undo()  # space freed; the rerun resumes from the backup
    rerun = time.time()
    _fit(workdir)
    got = recording.read_records(path)
    assert [r["step"] for r in got] == list(range(1, 13))
    # Restored at the end of epoch 0 (step 4): the epoch whose record
    # failed made no backup, even when it failed at its last step.
    assert [r["wall_time"] > rerun for r in got] == [False] * 4 + [True] * 8
    assert [r["weights/norm2"] for r in got] == [
        r["weights/norm2"] for r in expected
    ]
