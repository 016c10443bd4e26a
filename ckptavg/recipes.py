"""Recipes: the weightings `sweep` tries, as text (`last:2,4`, `ema:0.9`), each made into candidates.

A recipe names one weighting, or a list of values for one (`ema:0.9,0.99`), which makes one candidate per
value. `parse_recipes` checks the text before any input is opened; `candidates` gives each candidate its
inputs and weights once the inputs are ordered (oldest first). A candidate's weights are those `average`
gives the same inputs with the same option, so its output is the one `average` writes.

    mean                     the uniform mean of every input          (average)
    last:N[,N...]            the uniform mean of the newest N         (average of those N)
    linear                   1..N, newer counts more                  (average --weights linear)
    weights:W1,W2,...        one weight per input                     (average --weights W1,W2,...)
    ema:D[,D...]             EMA of decay D over the ordered inputs   (average --ema D)
    ema-half-life:S[,S...]   EMA of half-life S steps                 (average --ema-half-life S)
    ema-sigma-rel:S[,S...]   power-function EMA of relative width S   (average --ema-sigma-rel S)
    wsm:NAME[,NAME...]       WSM merge weights of a decay curve       (average --weights wsm:NAME)
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ckptavg.errors import UsageError, option
from ckptavg.merge import weights as weightings
from ckptavg.merge.weights import Weights

KINDS = ("mean", "last", "linear", "weights", "ema", "ema-half-life", "ema-sigma-rel", "wsm")
WITHOUT_VALUE = ("mean", "linear")
GRAMMAR = "mean, last:N, linear, weights:W1,W2,..., ema:D, ema-half-life:S, ema-sigma-rel:S or wsm:NAME"


@dataclass(frozen=True)
class Recipe:
    """One weighting asked for: its kind and value (None for mean and linear), and the text it came from."""

    kind: str
    value: float | int | str | tuple[float, ...] | None
    text: str

    @property
    def name(self) -> str:
        """The candidate's folder name: `mean`, `last-4`, `ema-0.9`, `weights-1-2-3`, `wsm-minus-sqrt`."""
        if self.value is None:
            return self.kind
        if isinstance(self.value, tuple):
            return f"{self.kind}-" + "-".join(_number(v) for v in self.value)
        return f"{self.kind}-{_number(self.value) if not isinstance(self.value, str) else self.value}"

    @property
    def spec(self) -> str:
        """The recipe of this one candidate as text (`ema:0.9` out of `ema:0.9,0.99`)."""
        if self.value is None:
            return self.kind
        if isinstance(self.value, tuple):
            return f"{self.kind}:" + ",".join(_number(v) for v in self.value)
        return f"{self.kind}:{_number(self.value) if not isinstance(self.value, str) else self.value}"


@dataclass(frozen=True)
class Candidate:
    """One output of a sweep: its name (its folder under the sweep's output), its recipe, the indices of the
    ordered inputs it averages (oldest first) and their weights."""

    name: str
    recipe: str
    inputs: tuple[int, ...]
    weights: Weights


def _number(value: float | int) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def parse_recipes(texts: Sequence[str] | str) -> list[Recipe]:
    """Each recipe of `texts` checked and split into one Recipe per value, in the order given; a UsageError
    (one line, naming the recipe) for a bad one or two that make the same candidate."""
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, Sequence) or not texts:
        raise UsageError(None, f"{option('recipes')}: give at least one recipe ({GRAMMAR})")
    recipes: list[Recipe] = []
    for text in texts:
        if not isinstance(text, str):
            raise UsageError(None, f"{option('recipes', repr(text))}: expected a recipe as text ({GRAMMAR})")
        recipes.extend(_parse_one(text.strip()))
    seen: dict[str, str] = {}
    for recipe in recipes:
        if recipe.name in seen:
            raise UsageError(
                None, f"{option('recipes', recipe.text)}: candidate {recipe.name} is already asked for by {seen[recipe.name]}"
            )
        seen[recipe.name] = recipe.text
    return recipes


def _parse_one(text: str) -> list[Recipe]:
    kind, colon, rest = text.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise UsageError(None, f"{option('recipes', text)}: unknown recipe {kind!r}; expected {GRAMMAR}")
    if kind in WITHOUT_VALUE:
        if colon:
            raise UsageError(None, f"{option('recipes', text)}: {kind} takes no value")
        return [Recipe(kind, None, text)]
    values = [v.strip() for v in rest.split(",")] if colon else []
    if not values or any(not v for v in values):
        example = {"last": "last:4", "weights": "weights:1,2,3", "ema": "ema:0.9", "wsm": "wsm:linear"}.get(kind, f"{kind}:0.05")
        raise UsageError(None, f"{option('recipes', text)}: {kind} needs a value, e.g. {example}")
    if kind == "weights":
        return [Recipe(kind, tuple(_weight(v, text) for v in values), text)]
    if kind == "last":
        return [Recipe(kind, _count(v, text), text) for v in values]
    if kind == "wsm":
        for v in values:
            if not re.fullmatch(r"[a-z][a-z0-9_-]*", v):
                raise UsageError(None, f"{option('recipes', text)}: {v!r} is not a curve name (linear, cosine, minus-sqrt, ...)")
        return [Recipe(kind, v, text) for v in values]
    return [Recipe(kind, _positive(kind, v, text), text) for v in values]


def _count(value: str, text: str) -> int:
    if not re.fullmatch(r"[0-9]+", value) or int(value) < 1:
        raise UsageError(None, f"{option('recipes', text)}: {value!r} is not a number of checkpoints (1 or more)")
    return int(value)


def _weight(value: str, text: str) -> float:
    try:
        weight = float(value)
    except ValueError:
        raise UsageError(None, f"{option('recipes', text)}: {value!r} is not a number") from None
    if not (math.isfinite(weight) and weight >= 0):
        raise UsageError(None, f"{option('recipes', text)}: every weight must be a finite number >= 0, not {value}")
    return weight


def _positive(kind: str, value: str, text: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise UsageError(None, f"{option('recipes', text)}: {value!r} is not a number") from None
    if kind == "ema" and not 0 <= number < 1:
        raise UsageError(None, f"{option('recipes', text)}: a decay must lie in [0, 1), not {value}")
    if kind != "ema" and not (math.isfinite(number) and number > 0):
        raise UsageError(None, f"{option('recipes', text)}: expected a number > 0, not {value}")
    return number


def candidates(recipes: list[Recipe], steps: list[int | None]) -> list[Candidate]:
    """Each recipe's candidate over the ordered inputs (oldest first; `steps` their training steps, None where
    unknown): its inputs and the weights `average` gives them."""
    n = len(steps)
    made = []
    for recipe in recipes:
        inputs = tuple(range(n))
        if recipe.kind == "last":
            count = int(recipe.value)  # type: ignore[arg-type]
            if count > n:
                raise UsageError(None, f"{option('recipes', recipe.text)}: last {count} of {n} input{'s' if n != 1 else ''}")
            inputs = tuple(range(n - count, n))
        made.append(Candidate(recipe.name, recipe.spec, inputs, _weights(recipe, [steps[i] for i in inputs])))
    return made


def _weights(recipe: Recipe, steps: list[int | None]) -> Weights:
    n = len(steps)
    kind, value = recipe.kind, recipe.value
    if kind in ("mean", "last"):
        return weightings.uniform(n)
    if kind == "linear":
        return weightings.linear(n)
    if kind == "weights":
        values = list(value)  # type: ignore[arg-type]
        if len(values) != n:
            raise UsageError(None, f"{option('recipes', recipe.text)}: {len(values)} weights for {n} checkpoints")
        if not sum(values) > 0:
            raise UsageError(None, f"{option('recipes', recipe.text)}: every weight is 0; give at least one a positive weight")
        return weightings.explicit(values, n)
    if kind == "ema":
        return weightings.ema(n, float(value))  # type: ignore[arg-type]
    if kind in ("ema-half-life", "ema-sigma-rel") and (unknown := steps.count(None)):
        raise UsageError(
            None,
            f"{option('recipes', recipe.text)}: {kind} needs the training step of every input; {unknown} of {n} have none",
        )
    known = [int(s) for s in steps if s is not None]
    if kind == "ema-half-life":
        return weightings.ema_half_life(known, float(value))  # type: ignore[arg-type]
    if kind == "ema-sigma-rel":
        make = getattr(weightings, "ema_sigma_rel", None)
        if make is None:
            raise UsageError(None, f"{option('recipes', recipe.text)}: ema-sigma-rel is not available in this version of ckptavg")
        return make(known, float(value))  # type: ignore[arg-type]
    make = getattr(weightings, "wsm", None)
    if make is None:
        raise UsageError(None, f"{option('recipes', recipe.text)}: wsm is not available in this version of ckptavg")
    return make(n, str(value))
