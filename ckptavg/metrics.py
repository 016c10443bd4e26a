"""Metrics stored inside a PyTorch checkpoint: `metrics`, `best_metric`, timm's `metric`, Lightning's ModelCheckpoint state;
and which way each metric is better: recorded by the trainer (Lightning's ModelCheckpoint mode, timm's CheckpointSaver,
the Trainer's greater_is_better), else said by its name (a loss: lower; an accuracy: higher)."""

from __future__ import annotations

import re
from pathlib import Path, PurePath
from typing import Any

from ckptavg.errors import HostileInputError, InputError
from ckptavg.formats.torch_io import PickleFile, as_dict
from ckptavg.formats.unpickle import TensorRef

# Words that say which way a metric is better, matched on its last component (eval_accuracy, val/acc, test_loss_epoch).
LOWER_WORDS = {"perplexity", "ppl", "wer", "cer", "mse", "mae", "rmse", "nll"}
HIGHER_WORDS = {"top1", "top5", "bleu", "f1", "auc", "map", "score", "precision", "recall", "exact_match"}
HIGHER_PREFIXES = ("acc", "rouge")
LOWER_PARTS = ("loss", "error")  # anywhere in the last component: val_loss, train_loss_epoch, word_error_rate
TIMM_EVAL_METRICS = {"top1": "top-1 accuracy", "top5": "top-5 accuracy", "loss": "the eval loss"}


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


TOKEN_KEYS = ("tokens", "consumed_tokens")
SAMPLE_KEYS = ("consumed_train_samples",)
SEQUENCE_KEYS = ("seq_length", "seq_len", "sequence_length", "max_seq_length", "max_seq_len")


def checkpoint_tokens(pickle_file: PickleFile) -> tuple[int | None, str | None]:
    """(tokens seen, where) from a checkpoint's entries: `tokens` or `consumed_tokens`, else `consumed_train_samples`
    times a sequence length recorded beside it (Megatron keeps both in `args`); at the top level, then in `args`.
    A count of 0 is "not recorded"."""
    top = as_dict(pickle_file.obj) or {}
    places = [("", top)] + [("args.", args) for args in [as_dict(top.get("args"))] if args]
    counts: dict[str, int] = {}  # {"args.seq_length": 2048, ...}: the positive whole numbers under those keys
    for prefix, entries in places:
        for key in (*TOKEN_KEYS, *SAMPLE_KEYS, *SEQUENCE_KEYS):
            value = scalar(pickle_file, entries.get(key), prefix + key)
            if value is not None and value > 0 and value.is_integer():
                counts[prefix + key] = int(value)

    def first(keys: tuple[str, ...]) -> str | None:
        return next((prefix + key for prefix, _ in places for key in keys if prefix + key in counts), None)

    if tokens := first(TOKEN_KEYS):
        return counts[tokens], f"checkpoint {tokens}"
    samples, length = first(SAMPLE_KEYS), first(SEQUENCE_KEYS)
    if samples and length:
        return counts[samples] * counts[length], f"checkpoint {samples} x {length}"
    return None, None


def mode_from_name(metric: str) -> tuple[str, str] | None:
    """("min" or "max", the word that says so) from a metric's name, matched on its last component: the part after
    the last "/", its last word (Lightning's _epoch/_step suffixes dropped); a loss or an error anywhere in that part."""
    last = metric.lower().rsplit("/", 1)[-1]
    words = [w for w in re.split(r"[_.\-\s]+", last) if w]
    while len(words) > 1 and words[-1] in ("epoch", "step"):
        words.pop()
    if not words:
        return None
    word = "exact_match" if words[-2:] == ["exact", "match"] else words[-1]
    if word in HIGHER_WORDS or word.startswith(HIGHER_PREFIXES):
        return "max", word
    if word in LOWER_WORDS:
        return "min", word
    part = next((p for p in LOWER_PARTS if p in last), None)
    return ("min", part) if part else None


def recorded_modes(pickle_file: PickleFile) -> dict[str, tuple[str, str]]:
    """{metric: ("min" or "max", where the checkpoint records it)} from its own entries: Lightning's ModelCheckpoint
    (its callbacks key holds monitor and mode), timm's CheckpointSaver history or train.py's eval_metric."""
    top = as_dict(pickle_file.obj) or {}
    name = pickle_file.path.name
    found: dict[str, tuple[str, str]] = {}
    for key, state in (as_dict(top.get("callbacks")) or {}).items():
        monitor = (as_dict(state) or {}).get("monitor")
        recorded = re.search(r"'mode': '(min|max)'", str(key))
        if str(key).startswith("ModelCheckpoint") and isinstance(monitor, str) and recorded:
            mode = recorded.group(1)
            found.setdefault(monitor, (mode, f"Lightning's ModelCheckpoint in {name} monitors it with mode={mode!r}"))
    if "metric" in top and (timm := _timm_mode(pickle_file, top)):
        found.setdefault("metric", timm)
    return found


def _timm_mode(pickle_file: PickleFile, top: dict) -> tuple[str, str] | None:
    """timm's CheckpointSaver keeps its history best first (the `saver` entry of recent timm): the order of two different
    values shows its `decreasing` flag. Else train.py's args: its saver is decreasing only for eval_metric 'loss'."""
    name = pickle_file.path.name
    history = (as_dict(top.get("saver")) or {}).get("checkpoint_files")
    ranked = []
    for entry in history if isinstance(history, (list, tuple)) else []:
        value = (
            scalar(pickle_file, entry[1], "saver/checkpoint_files")
            if isinstance(entry, (list, tuple)) and len(entry) == 2
            else None
        )
        if value is not None:
            ranked.append(value)
    if len(set(ranked)) > 1 and ranked in (sorted(ranked), sorted(ranked, reverse=True)):
        lower = ranked == sorted(ranked)
        which = "lower" if lower else "higher"
        return ("min" if lower else "max"), f"timm's CheckpointSaver in {name} ranks {which} values first (decreasing={lower})"
    eval_metric = (as_dict(top.get("args")) or {}).get("eval_metric")
    if isinstance(eval_metric, str):
        what = f" ({TIMM_EVAL_METRICS[eval_metric]})" if eval_metric in TIMM_EVAL_METRICS else ""
        lower = eval_metric == "loss"
        return (
            "min" if lower else "max"
        ), f"timm records eval_metric {eval_metric!r}{what} in {name}, {'lower' if lower else 'higher'} is better (train.py)"
    return None


def trainer_modes(folder: Path) -> dict[str, tuple[str, str]]:
    """The Trainer's metric_for_best_model and greater_is_better, from training_args.bin (read by the restricted
    unpickler: the TrainingArguments are an inert record, nothing in it runs), under both its names (accuracy and
    eval_accuracy, as the Trainer logs it)."""
    path = folder / "training_args.bin"
    if not path.is_file():
        return {}
    try:
        args = as_dict(PickleFile(path).obj) or {}
    except HostileInputError:
        raise
    except (InputError, OSError):
        return {}
    metric, greater = args.get("metric_for_best_model"), args.get("greater_is_better")
    if not isinstance(metric, str) or not isinstance(greater, bool):
        return {}
    why = f"the Trainer's training_args.bin in {folder.name} has metric_for_best_model={metric!r}, greater_is_better={greater}"
    mode = ("max" if greater else "min", why)
    return {metric: mode, metric if metric.startswith("eval_") else f"eval_{metric}": mode}
