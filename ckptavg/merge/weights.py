"""Merge strategies as weights over the ordered inputs (oldest first).

A strategy gives `scales` and a `divisor`: the output is sum(scale_i * x_i) / divisor. Keeping integer
scales (1 for the mean, 1..N for linear) makes the sum exact in the accumulator, so the mean is rounded
once, correctly, and identical inputs come back bit for bit.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from ckptavg.checks import check_number
from ckptavg.errors import UsageError, option

STRATEGIES = ("mean", "linear", "weighted", "ema")


@dataclass(frozen=True)
class Weights:
    strategy: str
    scales: list[float]
    divisor: float = 1.0

    @property
    def normalized(self) -> list[float]:
        return [s / self.divisor for s in self.scales]


def uniform(n: int) -> Weights:
    return Weights("mean", [1.0] * n, float(n))


def linear(n: int) -> Weights:
    """1, 2, ..., n: later checkpoints count more (the WMA of pre-training model merging)."""
    return Weights("linear", [float(i + 1) for i in range(n)], n * (n + 1) / 2)


def ema(n: int, decay: float) -> Weights:
    """Closed form of e_1 = x_1, e_i = d * e_{i-1} + (1 - d) * x_i: x_1 gets d^(n-1), x_i gets (1-d) d^(n-i)."""
    decay = check_number("ema", decay, 0, False, 1, True, what="a decay")
    return Weights("ema", [decay ** (n - 1)] + [(1 - decay) * decay ** (n - i) for i in range(2, n + 1)])


def ema_half_life(steps: list[int], half_life: float) -> Weights:
    """An EMA in training steps: e_1 = x_1, e_i = a_i e_(i-1) + (1 - a_i) x_i with a_i = 0.5^((s_i - s_(i-1)) / H),
    so irregularly spaced checkpoints get the weights an in-training EMA of half-life H steps would give them.
    In closed form x_i gets (1 - a_i) times the product of the a_j after it (x_1: the product of all a_j)."""
    half_life = check_number("ema_half_life", half_life, 0, True, what="a number of steps")
    decays = [0.5 ** ((b - a) / half_life) for a, b in zip(steps, steps[1:])]
    scales = []
    for i in range(len(steps)):
        later = 1.0
        for a in decays[i:]:
            later *= a
        scales.append(later if i == 0 else (1 - decays[i - 1]) * later)
    return Weights("ema", scales)


def oldest_weight_warning(weights: Weights, span: str) -> str | None:
    """An EMA starts from its first input (e_1 = x_1): when that input keeps more than half the weight, the
    result is mostly the oldest checkpoint, which is rarely what was meant."""
    normalized = weights.normalized
    if weights.strategy != "ema" or len(normalized) < 2 or normalized[0] <= 0.5:
        return None
    return f"the EMA gives the oldest input {normalized[0]:.0%} of the weight (e_1 = x_1 starts the average); {span}"


def explicit(values: list[float], n: int) -> Weights:
    if len(values) != n:
        given, wanted = f"{len(values)} weight{'s' if len(values) != 1 else ''}", f"{n} checkpoint{'s' if n != 1 else ''}"
        raise UsageError(None, f"{option('weights')} gives {given} for {wanted}")
    return Weights("weighted", list(values), sum(values))


def check_weights(spec: object, ema_decay: object = None, half_life: object = None) -> str | list[float] | None:
    """The strategy asked for, checked before any input is read: None, "uniform" or "linear", or the explicit
    weights as floats, from text ("1,2,3", as on the command line) or a sequence of numbers ([1, 2, 3]). Each
    weight must be a finite number >= 0 (not a bool), their sum positive; only their count waits for the inputs."""
    given = [
        option(name) for name, value in (("weights", spec), ("ema", ema_decay), ("ema_half_life", half_life)) if value is not None
    ]
    if len(given) > 1:
        raise UsageError(None, f"{' and '.join(given)} are alternatives; give one")
    if ema_decay is not None:
        check_number("ema", ema_decay, 0, False, 1, True, what="a decay")
    if half_life is not None:
        check_number("ema_half_life", half_life, 0, True, what="a number of steps")
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec in ("uniform", "linear"):
            return spec
        try:
            values: list[object] = [float(v) for v in spec.split(",")]
        except ValueError:
            raise UsageError(None, f"{option('weights', repr(spec))}: expected uniform, linear or numbers like 1,2,3") from None
    elif isinstance(spec, Iterable) and not isinstance(spec, (bytes, Mapping, AbstractSet)):
        values = list(spec)
        spec = values  # shown as a list (a generator's repr says nothing)
    else:
        values = []
    if not values:
        raise UsageError(
            None, f"{option('weights', repr(spec))}: expected uniform, linear or numbers like 1,2,3 (from Python also a list)"
        )
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise UsageError(None, f"{option('weights', repr(spec))}: {value!r} is not a number")
        if not (math.isfinite(value) and value >= 0):
            raise UsageError(None, f"{option('weights', repr(spec))}: every weight must be a finite number >= 0, not {value!r}")
    if not sum(values) > 0:  # type: ignore[arg-type]
        raise UsageError(None, f"{option('weights', repr(spec))}: every weight is 0; give at least one a positive weight")
    return [float(v) for v in values]  # type: ignore[arg-type]


def parse_weights(
    spec: str | Sequence[float] | None,
    ema_decay: float | None,
    n: int,
    half_life: float | None = None,
    steps: list[int | None] | None = None,
) -> Weights:
    """The weights asked for by --weights (text or a sequence of numbers), --ema or --ema-half-life (which needs
    the inputs' steps, oldest first)."""
    checked = check_weights(spec, ema_decay, half_life)
    if half_life is not None:
        if steps is None or any(s is None for s in steps):
            raise UsageError(
                None,
                (
                    f"{option('ema_half_life')} needs the training step of every input (from checkpoint-N, trainer_state.json, "
                    "step= or global_step)"
                ),
            )
        return ema_half_life([int(s) for s in steps if s is not None], half_life)
    if ema_decay is not None:
        return ema(n, ema_decay)
    if checked is None or checked == "uniform":
        return uniform(n)
    if checked == "linear":
        return linear(n)
    return explicit(checked, n)  # type: ignore[arg-type]
