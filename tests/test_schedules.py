"""Schedules: which steps and epochs fire."""

import pytest

from tf_breakeven import schedules


def _fired(schedule, last):
    return [s for s in range(1, last + 1) if schedule.at_step(s)]


def test_every_n_steps():
    assert _fired(schedules.EveryNSteps(3), 10) == [3, 6, 9]
    assert _fired(schedules.EveryNSteps(3, start=1), 10) == [1, 4, 7, 10]


def test_log_spaced_is_dense_early_and_sparse_late():
    fired = _fired(schedules.LogSpaced(per_decade=10), 100)
    assert fired == [
        1,
        2,
        3,
        4,
        5,
        6,
        8,
        10,
        13,
        16,
        20,
        25,
        32,
        40,
        50,
        63,
        79,
        100,
    ]
    bounded = schedules.LogSpaced(last=45, first=2, per_decade=4)
    assert _fired(bounded, 1000) == [2, 4, 6, 11, 20, 36, 45]


def test_at_steps_epochs_and_union():
    union = schedules.AtSteps([5, 2]) | schedules.EveryEpoch(2)
    assert _fired(union, 10) == [2, 5]
    assert [e for e in range(5) if union.at_epoch_end(e)] == [0, 2, 4]


def test_fires_within():
    assert not schedules.AtSteps([50]).fires_within(total_steps=10, epochs=2)
    assert schedules.AtSteps([5]).fires_within(total_steps=10, epochs=2)
    assert schedules.EveryEpoch().fires_within(total_steps=None, epochs=1)
    assert not schedules.EveryNSteps(20).fires_within(10, 1)


@pytest.mark.parametrize(
    "make",
    [
        lambda: schedules.EveryNSteps(0),
        lambda: schedules.AtSteps([]),
        lambda: schedules.LogSpaced(last=1, first=5),
        lambda: schedules.get("hourly"),
    ],
    ids=["zero_n", "empty_steps", "last_before_first", "unknown_name"],
)
def test_bad_schedules_raise(make):
    with pytest.raises(ValueError):
        make()
