"""Put inputs in training order: by step when every input has one, else by epoch, else as given."""

from __future__ import annotations

from ckptavg.formats.base import Checkpoint

ORDERS = ("auto", "given")


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
