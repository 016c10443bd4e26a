"""Merge strategies as weights over the ordered inputs (oldest first).

A strategy gives `scales` and a `divisor`: the output is sum(scale_i * x_i) / divisor. Keeping integer
scales (1 for the mean, 1..N for linear) makes the sum exact in the accumulator, so the mean is rounded
once, correctly, and identical inputs come back bit for bit.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from ckptavg.checks import check_number
from ckptavg.errors import UsageError, option

STRATEGIES = ("mean", "linear", "weighted", "ema", "wsm", "ema-sigma-rel")

# WSM's decay curves g on [0, 1] (arXiv 2507.17634): the learning-rate decay a merge of the window stands for.
WSM_CURVES: dict[str, Callable[[float], float]] = {
    "linear": lambda x: 1 - x,
    "cosine": lambda x: (1 + math.cos(math.pi * x)) / 2,
    "minus-sqrt": lambda x: 1 - math.sqrt(x),
}
WSM_REVERSE = "__reverse"
# The relative widths a power-function EMA of exponent gamma > 0 can have: sigma_rel(0) = 1 / (2 sqrt 3).
SIGMA_REL_MAX = 1 / (2 * math.sqrt(3))


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


def wsm(n: int, curve: str) -> Weights:
    """Warmup-Stable-Merge (arXiv 2507.17634): the merge of n checkpoints (oldest first) that stands for decaying
    the learning rate along `curve` ("linear", "cosine", "minus-sqrt", each optionally + "__reverse").

    With d_k = g(k/n): c_(n-1) = d_(n-1), c_k = d_k - d_(k+1) for 0 < k < n-1, c_0 = 1 - sum of the others. linear
    gives the uniform mean; minus-sqrt (1 - sqrt x, which falls fast early) gives the oldest checkpoint the largest
    weight. "__reverse" reverses the list of weights."""
    name = check_wsm_curve(curve)
    g = WSM_CURVES[name.removesuffix(WSM_REVERSE)]
    if n == 1:
        scales = [1.0]
    else:
        d = [g(k / n) for k in range(n)]
        later = [d[k] - d[k + 1] for k in range(1, n - 1)] + [d[n - 1]]
        scales = [1 - math.fsum(later)] + later
    if name.endswith(WSM_REVERSE):
        scales.reverse()
    return Weights(f"wsm:{name}", scales)


def check_wsm_curve(curve: object) -> str:
    """A WSM curve's name ("minus-sqrt", "cosine__reverse"), as given after `wsm:`."""
    if not isinstance(curve, str) or curve.removesuffix(WSM_REVERSE) not in WSM_CURVES:
        names = ", ".join(f"wsm:{name}" for name in WSM_CURVES)
        raise UsageError(
            None, f"{option('weights', f'wsm:{curve}')}: unknown WSM curve; expected {names} (each also with {WSM_REVERSE})"
        )
    return curve


def sigma_rel_of(gamma: float) -> float:
    """The relative width of the power-function EMA profile p(t) ~ t^gamma (EDM2, arXiv 2312.02696)."""
    return math.sqrt(gamma + 1) / ((gamma + 2) * math.sqrt(gamma + 3))


def gamma_of(sigma_rel: float) -> float:
    """The exponent gamma > 0 whose profile has relative width `sigma_rel` in (0, 1/(2 sqrt 3)): sigma_rel_of
    falls monotonically from 1/(2 sqrt 3) at gamma = 0 towards 0, so bisection finds it."""
    sigma_rel = check_sigma_rel(sigma_rel)
    low, high = 0.0, 1.0
    while sigma_rel_of(high) > sigma_rel:
        low, high = high, high * 2
    for _ in range(200):
        mid = (low + high) / 2
        if mid in (low, high):
            break
        low, high = (mid, high) if sigma_rel_of(mid) > sigma_rel else (low, mid)
    return (low + high) / 2


def check_sigma_rel(sigma_rel: object) -> float:
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, numbers.Real) or not 0 < sigma_rel < SIGMA_REL_MAX:
        raise UsageError(
            None,
            f"{option('ema_sigma_rel', repr(sigma_rel))}: expected a relative width in (0, {SIGMA_REL_MAX:.4f}), "
            "the range of a power-function EMA (1/(2*sqrt(3)) is the widest: every step weighted alike)",
        )
    return float(sigma_rel)


def ema_sigma_rel(steps: list[int], sigma_rel: float) -> Weights:
    """The power-function EMA of relative width `sigma_rel` (EDM2, arXiv 2312.02696) over checkpoints at `steps`
    t_1 < ... < t_N: each stands for the training since the one before (t_0 = 0), so input i gets
    (t_i^(g+1) - t_(i-1)^(g+1)) / t_N^(g+1), the profile t^g integrated over its interval."""
    gamma = gamma_of(sigma_rel)
    for before, after in zip(steps, steps[1:]):
        if after < before:
            raise UsageError(
                None,
                f"{option('ema_sigma_rel', sigma_rel)}: the inputs must be in training order (step {after} after {before})",
            )
    if not steps or steps[-1] <= 0:
        raise UsageError(
            None,
            f"{option('ema_sigma_rel', sigma_rel)}: the newest input is at step {steps[-1] if steps else None}; "
            "a power-function EMA needs training steps above 0",
        )
    newest = steps[-1]
    ends = [(t / newest) ** (gamma + 1) for t in steps]
    scales = [b - a for a, b in zip([0.0] + ends, ends)]
    return Weights(f"ema-sigma-rel:{sigma_rel:g}", scales, math.fsum(scales))


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


def check_weights(
    spec: object, ema_decay: object = None, half_life: object = None, sigma_rel: object = None
) -> str | list[float] | None:
    """The strategy asked for, checked before any input is read: None, "uniform", "linear" or "wsm:CURVE", or the
    explicit weights as floats, from text ("1,2,3", as on the command line) or a sequence of numbers ([1, 2, 3]).
    Each weight must be a finite number >= 0 (not a bool), their sum positive; only their count waits for the inputs."""
    given = [
        option(name)
        for name, value in (
            ("weights", spec),
            ("ema", ema_decay),
            ("ema_half_life", half_life),
            ("ema_sigma_rel", sigma_rel),
        )
        if value is not None
    ]
    if len(given) > 1:
        raise UsageError(None, f"{' and '.join(given)} are alternatives; give one")
    if ema_decay is not None:
        check_number("ema", ema_decay, 0, False, 1, True, what="a decay")
    if half_life is not None:
        check_number("ema_half_life", half_life, 0, True, what="a number of steps")
    if sigma_rel is not None:
        check_sigma_rel(sigma_rel)
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec in ("uniform", "linear"):
            return spec
        if spec.startswith("wsm:"):
            return f"wsm:{check_wsm_curve(spec.removeprefix('wsm:'))}"
        try:
            values: list[object] = [float(v) for v in spec.split(",")]
        except ValueError:
            raise UsageError(
                None, f"{option('weights', repr(spec))}: expected uniform, linear, wsm:CURVE or numbers like 1,2,3"
            ) from None
    elif isinstance(spec, Iterable) and not isinstance(spec, (bytes, Mapping, AbstractSet)):
        values = list(spec)
        spec = values  # shown as a list (a generator's repr says nothing)
    else:
        values = []
    if not values:
        raise UsageError(
            None,
            f"{option('weights', repr(spec))}: expected uniform, linear, wsm:CURVE or numbers like 1,2,3 "
            "(from Python also a list)",
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
    sigma_rel: float | None = None,
) -> Weights:
    """The weights asked for by --weights (text or a sequence of numbers), --ema, --ema-half-life or --ema-sigma-rel
    (which need the inputs' steps, oldest first)."""
    checked = check_weights(spec, ema_decay, half_life, sigma_rel)
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
    if sigma_rel is not None:
        return ema_sigma_rel(_training_steps("ema_sigma_rel", sigma_rel, steps), sigma_rel)
    if ema_decay is not None:
        return ema(n, ema_decay)
    if checked is None or checked == "uniform":
        return uniform(n)
    if checked == "linear":
        return linear(n)
    if isinstance(checked, str):
        return wsm(n, checked.removeprefix("wsm:"))
    return explicit(checked, n)


def _training_steps(name: str, value: object, steps: list[int | None] | None) -> list[int]:
    """The inputs' steps, oldest first, for a weighting by training time: refused unless every one is known."""
    if steps is None or any(s is None for s in steps):
        raise UsageError(
            None,
            f"{option(name, value)} needs the training step of every input (from checkpoint-N, trainer_state.json, step= or "
            "global_step)",
        )
    return [int(s) for s in steps if s is not None]
