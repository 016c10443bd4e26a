"""Which of a repo folder's files are weights and which are the model files an output copies."""

from __future__ import annotations

import fnmatch

from ckptavg.formats.detect import weight_names  # noqa: F401  (the reader's own rule: a cached folder opens as the remote one)
from ckptavg.output import MODEL_FILE_PATTERNS, MODEL_FILES


def folder_files(files: dict[str, int], subfolder: str) -> dict[str, int]:
    """The files directly inside `subfolder` (not in its sub-folders), by name."""
    prefix = f"{subfolder}/" if subfolder else ""
    return {p[len(prefix) :]: s for p, s in files.items() if p.startswith(prefix) and "/" not in p[len(prefix) :]}


def model_file_names(names: set[str] | dict[str, int]) -> list[str]:
    """The config, tokenizer and custom-code files an output copies (output.py `model_files`), by name."""
    names = set(names)
    found = [n for n in MODEL_FILES if n in names]
    for pattern in MODEL_FILE_PATTERNS:
        found.extend(n for n in sorted(names) if fnmatch.fnmatchcase(n, pattern) and n not in found)
    return found
