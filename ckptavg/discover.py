"""What a checkpoint says about itself without reading tensors: its step, epoch and metrics.

Steps come from the folder or file name (`checkpoint-N`, Lightning `step=N`/`epoch=N`, fairseq
`checkpoint_E_U.pt`), from `trainer_state.json`, or from the checkpoint's own entries (`global_step`,
`step`, `epoch`); a model ckptavg wrote has them in its recipe (`ckptavg.json`): an export is at its
input's step, an average at its newest input's, so that exports and averages can be ordered and averaged
again. Metrics come from `trainer_state.json`'s log history, from entries stored in the
checkpoint (`metrics`, `best_metric`, Lightning's ModelCheckpoint state), or from a metrics file. Tokens seen come
from `trainer_state.json` (`num_input_tokens_seen`) or the checkpoint's entries (metrics.checkpoint_tokens).
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NAME_PATTERNS = (
    (re.compile(r"^checkpoint-(\d+)$"), "step", "folder name"),
    (re.compile(r"^checkpoint_(\d+)$"), "step", "accelerate folder name (save count)"),
    (re.compile(r"step=(\d+)"), "step", "file name"),
    (re.compile(r"^checkpoint_\d+_(\d+)\."), "step", "file name"),
    (re.compile(r"(?:global_step|step|iter)[_-]?(\d+)"), "step", "name"),
    (re.compile(r"epoch=(\d+)"), "epoch", "file name"),
    (re.compile(r"^checkpoint(\d+)\.pt$"), "epoch", "file name"),
    (re.compile(r"^checkpoint-(\d+)\.pth\.tar$"), "epoch", "file name (timm)"),
)
RECIPE_FILE = "ckptavg.json"  # what ckptavg records about an output it wrote (output.py)
STEP_KEYS = ("global_step", "global_steps", "step", "num_updates", "iteration", "iter")


@dataclass
class StepInfo:
    step: int | None = None
    epoch: int | None = None
    source: str | None = None


def steps_from_name(name: str) -> StepInfo:
    info = StepInfo()
    for pattern, which, source in NAME_PATTERNS:
        match = pattern.search(name)
        if match and getattr(info, which) is None:
            setattr(info, which, int(match.group(1)))
            info.source = info.source or source
    return info


def steps_from_path(path: Path) -> StepInfo:
    """Step and epoch from where a checkpoint is: a folder's name and trainer_state.json; for a file, its
    name, then its folder's (`checkpoint-N/model.safetensors`, DeepSpeed `global_stepN/..._model_states.pt`)."""
    folder = path if path.is_dir() else path.parent
    infos = [] if folder == path else [steps_from_name(path.name)]
    recipe = read_recipe(folder)
    written = recipe.get("written") if recipe else None
    if folder == path or isinstance(written, list) and path.name in written:  # a ckptavg output, or its one weights file
        infos.insert(0, steps_from_recipe(recipe, RECIPE_FILE))
    infos.append(steps_from_name(folder.name))
    if folder == path or folder.name.startswith("checkpoint"):
        infos.append(steps_from_trainer_state(read_trainer_state(folder)))
    return merge_steps(*infos)


def read_trainer_state(folder: Path) -> dict | None:
    """The Hugging Face Trainer's trainer_state.json of a checkpoint folder, or None."""
    path = folder / "trainer_state.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_recipe(folder: Path) -> dict | None:
    """The recipe (ckptavg.json) of a folder ckptavg wrote, or None."""
    path = folder / RECIPE_FILE
    if not path.is_file():
        return None
    try:
        return recipe_from_text(path.read_text())
    except OSError:
        return None


def recipe_from_text(text: str | bytes | None) -> dict | None:
    """A recipe from its JSON text (a .safetensors output's `ckptavg` metadata entry, a .pt output's record)."""
    try:
        data = json.loads(text) if text is not None else None
    except ValueError:
        return None
    return data if isinstance(data, dict) and data.get("tool") == "ckptavg" else None


def recipe_in_zip(path: Path) -> dict | None:
    """The recipe a .pt output of ckptavg keeps as a record of its zip archive (torch.load ignores it)."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = (i for i in archive.infolist() if i.filename.count("/") == 1 and i.filename.endswith("/" + RECIPE_FILE))
            info = next(records, None)
            if info is None or info.file_size > 1 << 24:
                return None
            return recipe_from_text(archive.read(info))
    except (OSError, zipfile.BadZipFile, NotImplementedError, RuntimeError, ValueError):
        return None


def steps_from_recipe(recipe: dict | None, where: str) -> StepInfo:
    """The step and epoch of a model ckptavg wrote: an export's input's, an average's newest input's (by step,
    else by epoch); `where` names the recipe in the source, e.g. "ckptavg.json (exported from step 300)"."""
    inputs = [i for i in (recipe or {}).get("inputs") or [] if isinstance(i, dict)]
    for which in ("step", "epoch"):
        known = [i for i in inputs if _int(i.get(which)) is not None]
        if known:
            newest = max(known, key=lambda i: i[which])
            break
    else:
        return StepInfo()
    at = f"step {newest[which]}" if which == "step" else f"epoch {newest[which]}"
    exported = (recipe or {}).get("strategy") == "export"
    how = f"exported from {at}" if exported else f"averaged from {len(inputs)} checkpoints, the newest at {at}"
    return StepInfo(step=_int(newest.get("step")), epoch=_int(newest.get("epoch")), source=f"{where} ({how})")


def steps_from_trainer_state(state: dict | None) -> StepInfo:
    """The Trainer's global_step, when trainer_state.json has one."""
    return StepInfo(step=_int((state or {}).get("global_step")), source="trainer_state.json")


def tokens_from_trainer_state(state: dict | None) -> tuple[int | None, str | None]:
    """(tokens seen, where) from the Trainer's num_input_tokens_seen; 0 is "not counted" (transformers writes 0 unless
    include_num_input_tokens_seen is on), so it is None."""
    tokens = _int((state or {}).get("num_input_tokens_seen"))
    return (tokens, "trainer_state.json num_input_tokens_seen") if tokens else (None, None)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def steps_from_entries(top: dict) -> StepInfo:
    """global_step / step / epoch stored in a checkpoint's top-level dict (fairseq: optimizer_history)."""
    step = next((_int(top.get(k)) for k in STEP_KEYS if _int(top.get(k)) is not None), None)
    history = top.get("optimizer_history")
    if step is None and isinstance(history, list) and history and isinstance(history[-1], dict):
        step = _int(history[-1].get("num_updates"))
    info = StepInfo(step=step, epoch=_int(top.get("epoch")))
    if info.step is not None or info.epoch is not None:
        info.source = "checkpoint"
    return info


def merge_steps(*infos: StepInfo) -> StepInfo:
    """The first known step and epoch, in the order given."""
    merged = StepInfo()
    for info in infos:
        for which in ("step", "epoch"):
            if getattr(merged, which) is None and getattr(info, which) is not None:
                setattr(merged, which, getattr(info, which))
                merged.source = merged.source or info.source
    return merged


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return None


def trainer_state_metrics(state: dict, step: int | None) -> dict[str, float]:
    """Every numeric value logged at `step` in log_history (eval_loss, loss, learning_rate, ...)."""
    metrics: dict[str, float] = {}
    for entry in state.get("log_history") or []:
        if isinstance(entry, dict) and step is not None and entry.get("step") == step:
            for key, value in entry.items():
                number = _number(value)
                if number is not None and key not in ("step", "epoch"):
                    metrics[key] = number
    return metrics


@dataclass
class MetricsTable:
    """Metrics from a file (CSV, JSON or JSONL) keyed by step or by checkpoint path/name."""

    by_step: dict[int, dict[str, float]] = field(default_factory=dict)
    by_name: dict[str, dict[str, float]] = field(default_factory=dict)

    def lookup(self, path: Path, step: int | None) -> dict[str, float]:
        found: dict[str, float] = {}
        if step is not None:
            found.update(self.by_step.get(step, {}))
        for key in (str(path), path.name, str(path.resolve())):
            found.update(self.by_name.get(key, {}))
        return found


def load_metrics_file(path: Path) -> MetricsTable:
    """Read records with a `step` or `path`/`checkpoint` column and numeric metric columns.

    Accepts CSV (header row), JSON (a list of records, or an object keyed by step or path whose values are
    records) and JSONL (one record per line).
    """
    from ckptavg.errors import InputError

    try:
        text = path.read_text()
    except OSError as e:
        raise InputError(path, f"cannot read metrics file: {e.strerror}") from e
    records: list[dict] = []
    try:
        if path.suffix == ".csv":
            import csv

            records = list(csv.DictReader(text.splitlines()))
        elif path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
            if isinstance(data, list):
                records = data
            elif isinstance(data, dict):
                for key, value in data.items():
                    if isinstance(value, dict):
                        records.append({("step" if key.isdigit() else "path"): key, **value})
    except (ValueError, json.JSONDecodeError) as e:
        raise InputError(path, f"metrics file is not valid {path.suffix.lstrip('.') or 'JSON'}: {e}") from e
    table = MetricsTable()
    for record in records:
        if not isinstance(record, dict):
            raise InputError(path, "metrics file: every record must be an object with a step or path")
        values = {}
        for key, value in record.items():
            if key in ("step", "path", "checkpoint", "global_step"):
                continue
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            values[key] = number
        step = record.get("step", record.get("global_step"))
        name = record.get("path", record.get("checkpoint"))
        if step not in (None, ""):
            table.by_step.setdefault(int(float(step)), {}).update(values)
        elif name:
            table.by_name.setdefault(str(name).rstrip("/"), {}).update(values)
        else:
            raise InputError(path, "metrics file: a record has neither a step nor a path")
    return table
