"""Merge strategies as weights over the ordered inputs (oldest first).

A strategy gives `scales` and a `divisor`: the output is sum(scale_i * x_i) / divisor. Keeping integer
scales (1 for the mean, 1..N for linear) makes the sum exact in the accumulator, so the mean is rounded
once, correctly, and identical inputs come back bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

from ckptavg.errors import UsageError

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
    if not 0.0 <= decay < 1.0:
        raise UsageError(None, f"--ema DECAY must be in [0, 1), got {decay}")
    return Weights("ema", [decay ** (n - 1)] + [(1 - decay) * decay ** (n - i) for i in range(2, n + 1)])


def ema_half_life(steps: list[int], half_life: float) -> Weights:
    """An EMA in training steps: e_1 = x_1, e_i = a_i e_(i-1) + (1 - a_i) x_i with a_i = 0.5^((s_i - s_(i-1)) / H),
    so irregularly spaced checkpoints get the weights an in-training EMA of half-life H steps would give them.
    In closed form x_i gets (1 - a_i) times the product of the a_j after it (x_1: the product of all a_j)."""
    if not half_life > 0 or half_life != half_life:
        raise UsageError(None, f"--ema-half-life STEPS must be positive, got {half_life}")
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
        raise UsageError(None, f"--weights has {len(values)} values for {n} inputs")
    if any(v < 0 for v in values) or sum(values) <= 0:
        raise UsageError(None, "--weights must be non-negative with a positive sum")
    return Weights("weighted", list(values), sum(values))


def parse_weights(spec: str | None, ema_decay: float | None, n: int, half_life: float | None = None, steps: list[int | None] | None = None) -> Weights:
    """The weights asked for on the command line by --weights, --ema or --ema-half-life (which needs the
    inputs' steps, oldest first)."""
    given = [flag for flag, value in (("--weights", spec), ("--ema", ema_decay), ("--ema-half-life", half_life)) if value is not None]
    if len(given) > 1:
        raise UsageError(None, f"{' and '.join(given)} are alternatives; give one")
    if half_life is not None:
        if steps is None or any(s is None for s in steps):
            raise UsageError(None, "--ema-half-life needs the training step of every input (from checkpoint-N, trainer_state.json, step= or global_step)")
        return ema_half_life([int(s) for s in steps if s is not None], half_life)
    if ema_decay is not None:
        return ema(n, ema_decay)
    if spec is None or spec == "uniform":
        return uniform(n)
    if spec == "linear":
        return linear(n)
    try:
        values = [float(v) for v in spec.split(",")]
    except ValueError as e:
        raise UsageError(None, f"--weights takes 'uniform', 'linear' or numbers like 1,2,3, not {spec!r}") from e
    return explicit(values, n)
