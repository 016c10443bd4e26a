"""One error family for the whole tool: each error names a path and a one-line problem."""

from __future__ import annotations

from pathlib import Path

EXIT_BAD_INPUT = 1
EXIT_USAGE = 2
EXIT_OUTPUT = 3
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


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
