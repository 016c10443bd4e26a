"""ckptavg: merge the checkpoints of a training run into one better model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "average", "AverageReport"]

if TYPE_CHECKING:
    from ckptavg.averaging import AverageReport, average


def __getattr__(name: str) -> Any:
    # Imported on first use so that `ckptavg --help` and `--version` answer without loading torch.
    if name in ("average", "AverageReport"):
        from ckptavg import averaging

        globals()[name] = value = getattr(averaging, name)
        return value
    raise AttributeError(f"module 'ckptavg' has no attribute {name!r}")
