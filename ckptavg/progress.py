"""What a long job tells its caller as it goes: bytes and tensors done of the whole. Plain data, no torch, so
that the commands that only read headers and the progress display import it without the engine."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    bytes_done: int
    bytes_total: int
    tensors_done: int
    tensors_total: int
    tensor: str


ProgressFn = Callable[[Progress], None]
