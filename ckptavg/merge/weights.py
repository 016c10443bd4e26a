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


def explicit(values: list[float], n: int) -> Weights:
    if len(values) != n:
        raise UsageError(None, f"--weights has {len(values)} values for {n} inputs")
    if any(v < 0 for v in values) or sum(values) <= 0:
        raise UsageError(None, "--weights must be non-negative with a positive sum")
    return Weights("weighted", list(values), sum(values))


def parse_weights(spec: str | None, ema_decay: float | None, n: int) -> Weights:
    """The weights asked for on the command line by --weights or --ema."""
    if spec is not None and ema_decay is not None:
        raise UsageError(None, "--weights and --ema are alternatives; give one")
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
