"""Metrics stored inside a PyTorch checkpoint: `metrics`, `best_metric`, timm's `metric`, Lightning's ModelCheckpoint state."""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

from ckptavg.formats.torch_io import PickleFile, as_dict
from ckptavg.formats.unpickle import TensorRef


def scalar(pickle_file: PickleFile, value: Any, name: str) -> float | None:
    """A number from a Python scalar or a one-element tensor (read from the file, a few bytes)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, TensorRef) and _numel(value) == 1:
        return float(pickle_file.source(value, name).read().double().item())
    return None


def _numel(ref: TensorRef) -> int:
    n = 1
    for d in ref.shape:
        n *= d
    return n


def checkpoint_metrics(pickle_file: PickleFile) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(metrics of this checkpoint, metrics it records for other checkpoint files by name).

    The second part comes from Lightning's ModelCheckpoint `best_k_models`: {path: score of the monitor}.
    """
    top = as_dict(pickle_file.obj) or {}
    metrics: dict[str, float] = {}
    stored = as_dict(top.get("metrics")) or {}
    for key, value in stored.items():
        number = scalar(pickle_file, value, f"metrics/{key}")
        if number is not None:
            metrics[str(key)] = number
    for key in ("best_metric", "metric"):  # metric: timm's CheckpointSaver stores the eval metric of the epoch
        number = scalar(pickle_file, top.get(key), key)
        if number is not None:
            metrics.setdefault(key, number)
    others: dict[str, dict[str, float]] = {}
    callbacks = as_dict(top.get("callbacks")) or {}
    for key, state in callbacks.items():
        state = as_dict(state) or {}
        monitor = state.get("monitor")
        if not (str(key).startswith("ModelCheckpoint") and isinstance(monitor, str)):
            continue
        current = scalar(pickle_file, state.get("current_score"), f"{key}/current_score")
        if current is not None:
            metrics.setdefault(monitor, current)
        for path, score in (as_dict(state.get("best_k_models")) or {}).items():
            number = scalar(pickle_file, score, f"{key}/best_k_models")
            if number is not None:
                others.setdefault(PurePath(str(path)).name, {})[monitor] = number
    return metrics, others
