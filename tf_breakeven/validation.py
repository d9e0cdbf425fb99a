"""Argument validation with one policy for the whole package.

Every check raises `ArgumentError`, a `ValueError` whose message names the
argument, what it got and how to fix the call. `ArgumentError` is also a
`TypeError`, so code that caught the `TypeError` some checks raised before
keeps working (numpy's `AxisError` is both `ValueError` and `IndexError`
for the same reason).
"""

from __future__ import annotations

import math
import numbers
from typing import Any


class ArgumentError(ValueError, TypeError):
    """An argument that cannot work; the message says how to fix the call."""


def _suffix(hint: str) -> str:
    return f" {hint}" if hint else ""


def check_int(
    name: str,
    value: Any,
    minimum: int = 1,
    *,
    hint: str = "",
    quote: bool = True,
) -> int:
    """`value` as a Python int >= `minimum` (bools and floats refused).

    Args:
        name: the argument's name, quoted in the message (as `name`) unless
            `quote=False`.
        value: what the caller passed.
        minimum: the smallest allowed value.
        hint: a sentence appended to the message (how to fix the call).
        quote: whether to put the name in backticks.
    """
    label = f"`{name}`" if quote else name
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentError(
            f"{label} must be an int >= {minimum}; got {value!r} "
            f"({type(value).__name__}). It must be a Python int (or a numpy "
            f"integer), not a float, bool or string.{_suffix(hint)}"
        )
    if value < minimum:
        raise ArgumentError(
            f"{label} must be >= {minimum}; got {value}.{_suffix(hint)}"
        )
    return int(value)


def check_optional_int(
    name: str, value: Any, minimum: int = 1, *, hint: str = ""
) -> int | None:
    """None, or `check_int(name, value, minimum)`."""
    return None if value is None else check_int(name, value, minimum, hint=hint)


def check_choice(name: str, value: Any, choices: tuple) -> Any:
    """`value` if it is one of `choices`."""
    if value not in choices:
        raise ArgumentError(
            f"`{name}` must be one of {choices}; got {value!r}."
        )
    return value


def check_fraction(
    name: str, value: Any, *, low_open: bool = True, high_open: bool = False
) -> float:
    """A float in (0, 1] (or [0, 1), by the open ends)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    low_ok = number > 0 if low_open else number >= 0
    high_ok = number < 1 if high_open else number <= 1
    if isinstance(value, bool) or not (low_ok and high_ok):
        interval = (
            ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        )
        raise ArgumentError(
            f"`{name}` must be a float in {interval}; got {value!r}."
        )
    return number


def check_positive(name: str, value: Any, *, hint: str = "") -> float:
    """A finite float > 0."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not 0 < number < float("inf"):
        raise ArgumentError(
            f"`{name}` must be a number > 0; got {value!r}.{_suffix(hint)}"
        )
    return number


def check_nonnegative(name: str, value: Any, *, hint: str = "") -> float:
    """A finite float >= 0 (bools and strings refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentError(
            f"`{name}` must be a number >= 0; got {value!r}.{_suffix(hint)}"
        )
    if not math.isfinite(value) or value < 0:
        raise ArgumentError(
            f"`{name}` must be a finite number >= 0; got {value!r}."
            f"{_suffix(hint)}"
        )
    return float(value)
