"""Which of a repo folder's files are weights and which are the model files an output copies."""

from __future__ import annotations

import fnmatch

from ckptavg.formats.detect import TRAINING_STATE_FILES, WEIGHT_SUFFIXES
from ckptavg.formats.peft import CONFIG_FILE as ADAPTER_CONFIG
from ckptavg.formats.peft import WEIGHT_FILES as ADAPTER_WEIGHTS
from ckptavg.output import MODEL_FILE_PATTERNS, MODEL_FILES


def folder_files(files: dict[str, int], subfolder: str) -> dict[str, int]:
    """The files directly inside `subfolder` (not in its sub-folders), by name."""
    prefix = f"{subfolder}/" if subfolder else ""
    return {p[len(prefix):]: s for p, s in files.items() if p.startswith(prefix) and "/" not in p[len(prefix):]}


def weight_names(names: set[str] | dict[str, int]) -> list[str]:
    """The weight files of a folder by their names, in the order ckptavg's reader picks them
    (formats/detect.py `weight_files_in`), so that the cached folder opens as the remote one would; an adapter's
    weights with its config."""
    names = set(names)
    if ADAPTER_CONFIG in names:
        found = [n for n in ADAPTER_WEIGHTS if n in names][:1]
        return [*found, ADAPTER_CONFIG] if found else []
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json", "model.safetensors", "pytorch_model.bin"):
        if name in names:
            return [name]
    indexes = sorted(n for n in names if n.endswith(".safetensors.index.json")) or sorted(n for n in names if n.endswith(".bin.index.json"))
    if indexes:
        return indexes
    safetensors = sorted(n for n in names if n.endswith(".safetensors"))
    if safetensors:
        return safetensors
    return sorted(n for n in names if n.endswith(WEIGHT_SUFFIXES) and n not in TRAINING_STATE_FILES and not n.startswith("rng_state"))


def model_file_names(names: set[str] | dict[str, int]) -> list[str]:
    """The config, tokenizer and custom-code files an output copies (output.py `model_files`), by name."""
    names = set(names)
    found = [n for n in MODEL_FILES if n in names]
    for pattern in MODEL_FILE_PATTERNS:
        found.extend(n for n in sorted(names) if fnmatch.fnmatchcase(n, pattern) and n not in found)
    return found
