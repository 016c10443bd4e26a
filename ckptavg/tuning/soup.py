"""Greedy soup (Wortsman et al. 2022, "Model soups", arXiv 2203.05482): score each input alone, rank them best
first, then add each to the running uniform mean only if the score of that mean does not get worse.

The scoring is passed in as callables, so the search itself knows nothing of files or evaluations: `score_alone`
scores one input, `score_mean` the uniform mean of several (None when the evaluation failed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

Score = float | None


def better_or_equal(a: float, b: float, mode: str) -> bool:
    """`a` is no worse than `b` when lower is better (mode "min") or higher is (mode "max")."""
    return a <= b if mode == "min" else a >= b


@dataclass
class SoupStep:
    """One input tried: its score alone, the score of the mean with it added (None for the first, which starts
    the soup, or when that evaluation failed), and whether it was kept."""

    name: str
    alone: Score
    with_it: Score
    kept: bool


@dataclass
class Soup:
    """The greedy soup: the inputs in the order tried (best alone first), what was kept, and the soup's score."""

    steps: list[SoupStep] = field(default_factory=list)
    score: Score = None

    @property
    def order(self) -> list[str]:
        return [s.name for s in self.steps]

    @property
    def kept(self) -> list[str]:
        return [s.name for s in self.steps if s.kept]

    def to_dict(self) -> dict:
        return {
            "order": self.order,
            "kept": self.kept,
            "score": self.score,
            "steps": [{"name": s.name, "alone": s.alone, "with_it": s.with_it, "kept": s.kept} for s in self.steps],
        }


def greedy_soup(
    names: Sequence[str],
    score_alone: Callable[[str], Score],
    score_mean: Callable[[list[str]], Score],
    mode: str = "min",
) -> Soup:
    """The greedy soup of the inputs `names` (see the module's docstring). Inputs whose evaluation failed alone
    are tried last and never kept; with none scored, the soup is empty and its score None."""
    alone = {name: score_alone(name) for name in names}
    scored = [n for n in names if alone[n] is not None]
    sign = 1.0 if mode == "min" else -1.0
    # Best first; ties keep the given order (sorted is stable), so the same scores give the same soup.
    ranked = sorted(scored, key=lambda n: sign * alone[n])  # type: ignore[operator]
    soup = Soup()
    for name in ranked:
        if not soup.kept:
            soup.steps.append(SoupStep(name, alone[name], None, True))
            soup.score = alone[name]
            continue
        score = score_mean([*soup.kept, name])
        keep = score is not None and better_or_equal(score, soup.score, mode)  # type: ignore[arg-type]
        soup.steps.append(SoupStep(name, alone[name], score, keep))
        if keep:
            soup.score = score
    soup.steps += [SoupStep(n, None, None, False) for n in names if alone[n] is None]
    return soup
