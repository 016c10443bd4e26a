"""Put inputs in training order: by step when every input has one, else by epoch, else as given."""

from __future__ import annotations

from ckptavg.errors import UsageError, option
from ckptavg.formats.base import Checkpoint

ORDERS = ("auto", "given")
# The weightings that depend on the inputs' training order, and what asked for each.
ORDER_DEPENDENT = {
    "linear": lambda: option("weights", "linear"),
    "weighted": lambda: f"explicit {option('weights')}",
    "ema": lambda: f"{option('ema')} or {option('ema_half_life')}",
    "wsm": lambda: option("weights", "wsm:CURVE"),
    "ema-sigma-rel": lambda: option("ema_sigma_rel"),
}


def order_inputs(inputs: list[Checkpoint], order: str = "auto") -> tuple[list[Checkpoint], str, list[str]]:
    """(inputs oldest first, what they were ordered by, notes)."""
    if order == "given" or len(inputs) < 2:
        return list(inputs), "given", []
    for field in ("step", "epoch"):
        values = [getattr(c, field) for c in inputs]
        if all(v is not None for v in values):
            notes = []
            if len(set(values)) < len(values):
                notes.append(f"two inputs have the same {field}; their relative order is as given")
            return sorted(inputs, key=lambda c: getattr(c, field)), field, notes
    unknown = [str(c.path) for c in inputs if c.step is None]
    return list(inputs), "given", [f"no step known for {', '.join(unknown[:3])}: inputs kept in the order given"]


def require_order(given: list[Checkpoint], ordered_by: str, order: str, strategy: str) -> None:
    """A strategy that weights inputs by their place in training needs that order known, or asked for as given."""
    family = strategy.partition(":")[0]  # wsm:minus-sqrt, ema-sigma-rel:0.05: the weighting, without its parameter
    if order == "given" or ordered_by != "given" or len(given) < 2 or family not in ORDER_DEPENDENT:
        return
    unknown = [c for c in given if c.step is None and c.epoch is None] or [c for c in given if c.step is None]
    names = ", ".join(str(c.path) for c in unknown[:3]) + (", ..." if len(unknown) > 3 else "")
    raise UsageError(
        None,
        f"cannot tell the training order of the inputs: no step or epoch known for {names}; "
        f"{ORDER_DEPENDENT[family]()} depends on that order: pass {option('order', 'given')} to use the order of the "
        "command line",
    )


def order_note(given: list[Checkpoint], ordered: list[Checkpoint], strategy: str) -> str | None:
    """Explicit weights follow training order: say so when it is not the order the paths were given in."""
    if strategy != "weighted" or [c.path for c in given] == [c.path for c in ordered]:
        return None
    return f"{option('weights')} apply in training order (oldest first), not in the order the paths were given: " + ", ".join(
        c.path.name for c in ordered
    )
