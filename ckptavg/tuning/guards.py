"""Guards: `METRIC:TOL[:min|max]`. A candidate that loses more than TOL (in METRIC's units) on METRIC against the
baseline cannot win, whatever its score. METRIC is better in the run's direction (mode) unless the guard says
`:min` (lower is better) or `:max`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ckptavg.errors import UsageError, option

FORM = "METRIC:TOL[:min|max], e.g. accuracy:0.01:max"


@dataclass(frozen=True)
class Guard:
    metric: str
    tolerance: float
    mode: str | None = None  # None: the run's mode

    @property
    def text(self) -> str:
        return f"{self.metric}:{self.tolerance:g}" + (f":{self.mode}" if self.mode else "")


def parse_guard(text: object) -> Guard:
    """One guard from its text; a UsageError naming it when malformed."""
    if not isinstance(text, str):
        raise UsageError(None, f"{option('guards', repr(text))}: expected {FORM}")
    body, mode = text, None
    head, _, tail = text.rpartition(":")
    if tail in ("min", "max") and head:
        body, mode = head, tail
    metric, colon, number = body.rpartition(":")
    if not colon or not metric.strip():
        raise UsageError(None, f"{option('guards', text)}: expected {FORM}")
    try:
        tolerance = float(number)
    except ValueError:
        raise UsageError(None, f"{option('guards', text)}: the tolerance {number!r} is not a number ({FORM})") from None
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise UsageError(None, f"{option('guards', text)}: the tolerance must be a finite number >= 0")
    return Guard(metric.strip(), tolerance, mode)


def parse_guards(texts: Sequence[str] | str | None) -> list[Guard]:
    if texts is None:
        return []
    if isinstance(texts, str):
        texts = [texts]
    guards = [parse_guard(t) for t in texts]
    seen = set()
    for guard in guards:
        if guard.metric in seen:
            raise UsageError(None, f"{option('guards', guard.text)}: {guard.metric} is guarded twice")
        seen.add(guard.metric)
    return guards


def loss(guard: Guard, value: float, baseline: float, mode: str) -> float:
    """How much worse `value` is than `baseline` on the guard's metric (negative when better)."""
    direction = guard.mode or mode
    return value - baseline if direction == "min" else baseline - value


def broken_guards(guards: list[Guard], metrics: dict[str, float], baseline: dict[str, float] | None, mode: str) -> list[str]:
    """Why the candidate with `metrics` cannot win, one line per guard it breaks (empty: it may)."""
    broken = []
    for guard in guards:
        if baseline is None or guard.metric not in baseline:
            broken.append(f"guard {guard.text}: the baseline has no {guard.metric} to compare with")
        elif guard.metric not in metrics:
            broken.append(f"guard {guard.text}: no {guard.metric} reported")
        else:
            lost = loss(guard, metrics[guard.metric], baseline[guard.metric], mode)
            if lost > guard.tolerance:
                broken.append(f"guard {guard.text}: {guard.metric} {metrics[guard.metric]:.6g} loses {lost:.6g} to the baseline")
    return broken
