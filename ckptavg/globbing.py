"""Glob patterns that no shell expanded: `ckptavg select 'run/checkpoint-*'`, `subprocess.run([...])` without a
shell, or the Python API given `["run/checkpoint-*"]`.

An input is read as a pattern only when no file or folder of that name exists (a checkpoint folder may really be
called `run[1]`) and it holds `*`, `?` or `[`; `hf://` inputs are the Hub's and pass unchanged. Matches come in
natural order (checkpoint-200 before checkpoint-1000, which a shell's sort gets wrong); hidden files match only a
pattern that names them with a leading dot, as in a shell.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from pathlib import Path

from ckptavg.errors import InputError, UsageError

GLOB_CHARS = re.compile(r"[*?[]")


def natural_key(path: str) -> list[int | str]:
    """Numbers compared as numbers: checkpoint-200 < checkpoint-1000, epoch=3-step=400 < epoch=10-step=1300."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def is_pattern(path: str | os.PathLike) -> bool:
    """Whether `path` is a glob pattern to expand: no such file or folder, a glob character, not an hf:// input.
    A value that is not a path is left to the option checks that name it."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    text = os.fspath(path)
    if not GLOB_CHARS.search(text) or os.path.lexists(text):
        return False
    from ckptavg.hub import is_hub

    return not is_hub(text)


def expand(paths: Sequence[str | os.PathLike]) -> list[str | os.PathLike]:
    """`paths` with each unexpanded glob pattern replaced by its matches, in natural order; other paths unchanged.

    Raises:
        InputError: a pattern that matches nothing.
    """
    expanded: list[str | os.PathLike] = []
    for path in paths:
        if not is_pattern(path):
            expanded.append(path)
            continue
        matches = sorted(glob.glob(os.fspath(path)), key=natural_key)
        if not matches:
            raise InputError(path, "pattern matched nothing (no such file or folder)")
        expanded.extend(Path(m) for m in matches)
    return expanded


def expand_one(path: str | os.PathLike) -> str | os.PathLike:
    """`path`, or the one match of an unexpanded glob pattern (for commands that take one checkpoint).

    Raises:
        InputError: a pattern that matches nothing. UsageError: one that matches several.
    """
    matches = expand([path])
    if len(matches) > 1:
        shown = ", ".join(os.fspath(m) for m in matches[:3]) + (", ..." if len(matches) > 3 else "")
        raise UsageError(path, f"pattern matched {len(matches)} paths ({shown}); give one checkpoint")
    return matches[0]
