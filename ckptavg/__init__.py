"""ckptavg: merge the checkpoints of a training run into one better model."""

__version__ = "0.1.0"

from ckptavg.average import AverageReport, average  # noqa: E402

__all__ = ["__version__", "average", "AverageReport"]
