"""The candidates `tune` tries: the recipes asked for (the grammar of `sweep`), or a default set spanning the run;
always the newest checkpoint alone, the baseline every other candidate is measured against.

The default set over N ordered inputs, for the windows W = 2, 4, 8, ... below N, and N itself:
    last-1                    the newest checkpoint alone (the baseline)
    last-W, mean              the uniform mean of the newest W (mean: all N)
    ema-D                     the EMA whose span is W checkpoints: D = 1 - 2/(W + 1), rounded to 3 decimals
    wsm-minus-sqrt-last-W     WSM's minus-sqrt merge weights over the newest W (wsm-minus-sqrt: all N)
"""

from __future__ import annotations

from ckptavg.merge import weights as weightings
from ckptavg.recipes import Candidate, Recipe, candidates, parse_recipes

BASELINE = "last-1"
WSM_CURVE = "minus-sqrt"


def windows(n: int) -> list[int]:
    """2, 4, 8, ... below n, then n (for n >= 2)."""
    out, w = [], 2
    while w < n:
        out.append(w)
        w *= 2
    return out + [n] if n >= 2 else []


def ema_decay_for_span(span: int) -> float:
    return round(1 - 2 / (span + 1), 3)


def default_candidates(steps: list[int | None]) -> list[Candidate]:
    """The default set (see the module's docstring) over inputs with these training steps, oldest first."""
    n = len(steps)
    chosen = [baseline(n)]
    spans = windows(n)
    recipes = [Recipe("mean", None, "mean") if w == n else Recipe("last", w, f"last:{w}") for w in spans]
    decays = list(dict.fromkeys(ema_decay_for_span(w) for w in spans))
    recipes += [Recipe("ema", d, f"ema:{d:g}") for d in decays if d > 0]
    chosen += candidates(recipes, steps)
    wsm = getattr(weightings, "wsm", None)  # WSM's weightings arrive with ckptavg's recipes; none before
    if wsm is not None:
        for w in spans:
            name = f"wsm-{WSM_CURVE}" + (f"-last-{w}" if w < n else "")
            recipe = f"wsm:{WSM_CURVE}" + (f" over last:{w}" if w < n else "")
            chosen.append(Candidate(name, recipe, tuple(range(n - w, n)), wsm(w, WSM_CURVE)))
    return chosen


def asked_candidates(texts: list[str], steps: list[int | None]) -> list[Candidate]:
    """The candidates of the recipes asked for, after the baseline (unless a recipe is the baseline itself); none
    asked for: the baseline alone (with the greedy soup, the soup is the other candidate)."""
    n = len(steps)
    if not texts:
        return [baseline(n)]
    chosen = candidates(parse_recipes(texts), steps)
    same = [c for c in chosen if c.inputs == (n - 1,)]
    return [same[0], *(c for c in chosen if c is not same[0])] if same else [baseline(n), *chosen]


def baseline(n: int) -> Candidate:
    return Candidate(BASELINE, "last:1", (n - 1,), weightings.uniform(1))


def alone(k: int, name: str) -> Candidate:
    """Input k (of the ordered inputs) alone, for the greedy soup."""
    return Candidate(name, f"input {name} alone", (k,), weightings.uniform(1))


def mean_of(indices: list[int], name: str) -> Candidate:
    """The uniform mean of some inputs, a step of the greedy soup."""
    ordered = tuple(sorted(indices))
    return Candidate(name, "mean of " + ", ".join(str(i + 1) for i in ordered), ordered, weightings.uniform(len(ordered)))
