"""One error family for the whole tool: each error names a path and a one-line problem."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path

EXIT_BAD_INPUT = 1
EXIT_USAGE = 2
EXIT_OUTPUT = 3
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


# An option named in a message is spelled by whoever shows the message: the command line as its flag
# (`--memory-budget 1GB`, `--overwrite`), the Python API as its keyword (`memory_budget='1GB'`, `overwrite=True`).
# The library names it by its keyword (the neutral name) through `option`; the CLI installs its spelling at start.
OptionSpelling = Callable[[str, "str | None"], str]

# A value that reads as itself in Python: a repr, a number, True/False/None, or a placeholder such as DECAY.
_PYTHON_LITERAL = re.compile(r"'.*'|\".*\"|\[.*\]|\(.*\)|True|False|None|-?nan|-?inf|[A-Z_]+|-?[\d.]+(?:e-?\d+)?")


def keyword_spelling(name: str, value: str | None) -> str:
    """`name=value` as a Python caller writes it: a word is quoted, a literal or placeholder is not; `name=...`
    when the message gives no value."""
    if value is None:
        return f"{name}=..."
    return f"{name}={value}" if _PYTHON_LITERAL.fullmatch(value) else f"{name}={value!r}"


_spelling: OptionSpelling = keyword_spelling


@contextlib.contextmanager
def options_spelled(spelling: OptionSpelling) -> Iterator[None]:
    """Within the block, name options the way `spelling` does (the CLI's `--flag VALUE`); the keyword spelling after."""
    global _spelling
    before, _spelling = _spelling, spelling
    try:
        yield
    finally:
        _spelling = before


def option(name: str, value: object = None) -> str:
    """The option `name` (its Python keyword: `memory_budget`), with the value the message shows, in the terms
    of whoever reads the message. A switch's value is True (`option("overwrite", True)`: `--overwrite`)."""
    return _spelling(name, None if value is None else str(value))


class CkptavgError(Exception):
    """Base error: `path: problem`, shown to the user on one line."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = str(path) if path is not None else None
        self.problem = problem
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return f"{self.path}: {self.problem}" if self.path else self.problem


class InputError(CkptavgError):
    """An input cannot be read: corrupt, truncated, unknown format, no weights."""


class UnsupportedError(InputError):
    """An input is a known layout that ckptavg does not merge: GPTQ/AWQ/bitsandbytes weights, a ZeRO-3 model-states
    file alone, a quantized scale without its weight, a complex tensor, ..."""


class MismatchError(InputError):
    """Inputs disagree on tensor names, shapes or dtypes."""


class NonFiniteError(InputError):
    """An input holds NaN or Inf."""


class HostileInputError(InputError):
    """A pickle names a callable that could run code: refused everywhere, never skipped as merely unreadable."""


class StrictError(InputError):
    """A warning turned into an error by --strict."""


class UsageError(CkptavgError):
    """A bad option or value, or a request that contradicts the inputs (copies of one checkpoint, an order that
    cannot be known): exit 2."""

    exit_code = EXIT_USAGE


class OutputError(CkptavgError):
    """The output cannot be written: exists, no space, permissions."""

    exit_code = EXIT_OUTPUT


class Interrupted(CkptavgError):
    """SIGINT or SIGTERM arrived; the exit code is 128 + the signal number."""

    def __init__(self, signal_name: str, exit_code: int) -> None:
        super().__init__(None, f"interrupted by {signal_name}; nothing was written")
        self.exit_code = exit_code
