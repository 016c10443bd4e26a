"""Option values as a Python caller may pass them: each wrong type or value is a UsageError naming the option.

The command line hands over typed values already; a Python caller can pass anything (`ema="0.9"`, `dtype=None`,
`memory_budget=-1`, `adapter_rank=True`), and should hear which option is wrong rather than see a TypeError
from deep inside. Messages name the option by its keyword through `errors.option`: the CLI shows `--ema 1.5: ...`,
Python `ema=1.5: ...`.
Checked before any input is opened or the output examined, so a bad value is always the error reported.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Collection

from ckptavg.errors import UsageError, option
from ckptavg.sizes import parse_size


def check_number(
    name: str,
    value: object,
    low: float | None = None,
    low_open: bool = False,
    high: float | None = None,
    high_open: bool = False,
    what: str = "a number",
) -> float:
    """A finite real number (not a bool) within [low, high] (an open end with `low_open`/`high_open`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UsageError(None, f"{option(name, repr(value))}: expected {what}, not {type(value).__name__}")
    if not math.isfinite(value):
        where = "" if low is None and high is None else f" {_range(low, low_open, high, high_open)}"
        raise UsageError(None, f"{option(name, repr(value))}: expected a finite number{where}")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        raise UsageError(None, f"{option(name, repr(value))}: expected {what} {_range(low, low_open, high, high_open)}")
    return float(value)


def _range(low: float | None, low_open: bool, high: float | None, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"above {low:g}" if low_open else f">= {low:g}"
    return f"below {high:g}" if high_open else f"<= {high:g}"


def check_int(name: str, value: object, low: int | None = None, what: str = "a whole number") -> int:
    """An int (not a bool, not a float) of at least `low`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UsageError(None, f"{option(name, repr(value))}: expected {what}, not {type(value).__name__}")
    if low is not None and value < low:
        raise UsageError(None, f"{option(name, repr(value))}: expected {what} >= {low}")
    return int(value)


def check_choice(name: str, value: object, choices: Collection[str]) -> str:
    """One of the names `choices`."""
    if not isinstance(value, str) or value not in choices:
        raise UsageError(None, f"{option(name, repr(value))}: expected one of {', '.join(choices)}")
    return value


SIZE = "expected a size above 0 like 5GB, 500MB or 2GiB (or a number of bytes)"


def check_size(name: str, value: object) -> int:
    """A positive byte count, or a size as typed ("5GB", "500MB", "2GiB")."""
    if isinstance(value, str):
        try:
            return parse_size(value)
        except UsageError as e:
            raise UsageError(None, f"{option(name, repr(value))}: {SIZE}") from e
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise UsageError(None, f"{option(name, repr(value))}: {SIZE}")
    return int(value)


def check_text(name: str, value: object) -> str | None:
    """None or a string (a name, a key, a metric)."""
    if value is not None and not isinstance(value, str):
        raise UsageError(None, f"{option(name, repr(value))}: expected a string, not {type(value).__name__}")
    return value


def check_prefixes(name: str, value: object) -> tuple[str, ...]:
    """Strings, one per prefix; one string alone is one prefix (not its characters)."""
    if isinstance(value, str):
        return (value,)
    try:
        prefixes = tuple(value)  # type: ignore[call-overload]
    except TypeError:
        raise UsageError(None, f"{option(name, repr(value))}: expected a list of strings") from None
    for prefix in prefixes:
        if not isinstance(prefix, str):
            raise UsageError(
                None, f"{option(name, repr(list(prefixes)))}: expected strings, one per prefix, not {type(prefix).__name__}"
            )
    return prefixes


def check_path(name: str, value: object) -> str | os.PathLike:
    """A path: a str or an os.PathLike (a Python caller's `3` or `None` is named, not a TypeError from pathlib)."""
    if not isinstance(value, (str, os.PathLike)):
        raise UsageError(None, f"{name} {value!r}: expected a path (str or os.PathLike), not {type(value).__name__}")
    return value
