"""JSONL records: durable appends, torn lines, resume without duplicates."""

import json
import math

import numpy as np
import pytest

from tf_breakeven import recording


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
    resumed = recording.Recorder(path)
    resumed.resume(2)
    _write_steps(resumed, [3, 4])
    assert [r["step"] for r in recording.read_records(path)] == [1, 2, 3, 4]
    with open(path) as f:
        assert all(json.loads(line) for line in f)


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
