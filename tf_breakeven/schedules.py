"""When to measure: schedules over global training steps and epochs.

A schedule answers two questions for a callback: does a measurement happen
at the end of global step `step` (1-based: the number of optimizer updates
done so far), and does one happen at the end of epoch `epoch` (0-based, as
Keras counts). Schedules compose with `|` (measure when either fires).

The break-even point lives early in training, so `LogSpaced` (dense early,
sparse late) is the cheap default; `EveryEpoch` is the papers' protocol.
"""

from __future__ import annotations

from collections.abc import Iterable

from tf_breakeven.validation import check_int


class Schedule:
    """Base class: override `at_step` and/or `at_epoch_end`."""

    def at_step(self, step: int) -> bool:
        """True if a measurement is due after global step `step` (>= 1)."""
        del step
        return False

    def at_epoch_end(self, epoch: int) -> bool:
        """True if a measurement is due at the end of epoch `epoch` (>= 0)."""
        del epoch
        return False

    def fires_within(self, total_steps: int | None, epochs: int) -> bool:
        """Whether the schedule fires at all in a run of this length."""
        if any(self.at_epoch_end(e) for e in range(epochs)):
            return True
        if total_steps is None:
            return True  # unknown length: assume it can
        return any(self.at_step(s) for s in self._candidate_steps(total_steps))

    def _candidate_steps(self, total_steps: int) -> Iterable[int]:
        return range(1, total_steps + 1)

    def __or__(self, other: Schedule) -> Schedule:
        return Union(self, other)

    def get_config(self) -> dict:
        return {"class": type(self).__name__}


class EveryNSteps(Schedule):
    """Every `n` global steps, starting after step `start` (default n)."""

    def __init__(self, n: int, start: int | None = None):
        self.n = check_int("n", n)
        self.start = self.n if start is None else check_int("start", start)

    def at_step(self, step: int) -> bool:
        return step >= self.start and (step - self.start) % self.n == 0

    def get_config(self) -> dict:
        return {**super().get_config(), "n": self.n, "start": self.start}


class EveryEpoch(Schedule):
    """At the end of every `every`-th epoch (and of epoch 0)."""

    def __init__(self, every: int = 1):
        self.every = check_int("every", every)

    def at_epoch_end(self, epoch: int) -> bool:
        return epoch % self.every == 0

    def get_config(self) -> dict:
        return {**super().get_config(), "every": self.every}


class AtSteps(Schedule):
    """At an explicit list of global steps."""

    def __init__(self, steps: Iterable[int]):
        self.steps = sorted({check_int("steps[i]", int(s)) for s in steps})
        if not self.steps:
            raise ValueError("`steps` is empty; pass at least one step >= 1.")
        self._set = set(self.steps)

    def at_step(self, step: int) -> bool:
        return step in self._set

    def _candidate_steps(self, total_steps: int) -> Iterable[int]:
        return [s for s in self.steps if s <= total_steps]

    def get_config(self) -> dict:
        return {**super().get_config(), "steps": list(self.steps)}


class LogSpaced(Schedule):
    """Steps spaced evenly in log scale: dense early, sparse late.

    `per_decade` measurements per factor of 10 from step `first` on (rounded
    to distinct integers), e.g. per_decade=10 gives 1, 2, 3, 4, 5, 6, 8, 10,
    13, 16, 20, 25, 32, 40, 50, 63, 79, 100, ... With `last`, stops there
    and includes `last` itself.
    """

    def __init__(
        self, last: int | None = None, *, first: int = 1, per_decade: int = 10
    ):
        self.first = check_int("first", first)
        self.per_decade = check_int("per_decade", per_decade)
        self.last = None if last is None else check_int("last", last)
        if self.last is not None and self.last < self.first:
            raise ValueError(
                f"`last` ({self.last}) must be >= `first` ({self.first})."
            )
        self._steps: set[int] = set()
        self._covered = 0  # exponent index generated so far

    def _grow(self, step: int) -> None:
        while True:
            value = round(self.first * 10 ** (self._covered / self.per_decade))
            if value > step:
                return
            self._steps.add(value)
            self._covered += 1

    def at_step(self, step: int) -> bool:
        if step < self.first or (self.last is not None and step > self.last):
            return False
        if step == self.last:
            return True
        self._grow(step)
        return step in self._steps

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "first": self.first,
            "last": self.last,
            "per_decade": self.per_decade,
        }


class Union(Schedule):
    """Fires when any of its schedules fires."""

    def __init__(self, *schedules: Schedule):
        if not schedules or not all(isinstance(s, Schedule) for s in schedules):
            raise ValueError("Union needs one or more Schedule objects.")
        self.schedules = schedules

    def at_step(self, step: int) -> bool:
        return any(s.at_step(step) for s in self.schedules)

    def at_epoch_end(self, epoch: int) -> bool:
        return any(s.at_epoch_end(epoch) for s in self.schedules)

    def fires_within(self, total_steps: int | None, epochs: int) -> bool:
        return any(s.fires_within(total_steps, epochs) for s in self.schedules)

    def get_config(self) -> dict:
        return {
            "class": "Union",
            "schedules": [s.get_config() for s in self.schedules],
        }


def get(schedule: Schedule | str | int) -> Schedule:
    """A schedule from a Schedule, "epoch", or an int n (every n steps)."""
    if isinstance(schedule, Schedule):
        return schedule
    if schedule == "epoch":
        return EveryEpoch()
    if isinstance(schedule, int) and not isinstance(schedule, bool):
        return EveryNSteps(schedule)
    raise ValueError(
        f"Unknown schedule {schedule!r}: pass a tf_breakeven.schedules "
        "Schedule, 'epoch', or an int n for every n steps."
    )
