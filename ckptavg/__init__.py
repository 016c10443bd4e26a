"""ckptavg: merge the checkpoints of a training run into one better model.

    import ckptavg
    report = ckptavg.average(["run/checkpoint-800", "run/checkpoint-900"], "merged", weights="linear")
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "average", "export", "AverageReport", "CkptavgError"]

if TYPE_CHECKING:
    from ckptavg.averaging import AverageReport, average
    from ckptavg.errors import CkptavgError
    from ckptavg.exporting import export

_LAZY = {"average": "ckptavg.averaging", "export": "ckptavg.exporting", "AverageReport": "ckptavg.averaging", "CkptavgError": "ckptavg.errors"}

# Error messages name command-line flags; from Python they name the keyword arguments instead.
_SWITCHES = {"overwrite": "overwrite=True", "strict": "strict=True", "use-ema": "use_ema=True", "dry-run": "dry_run=True", "verify": "verify=True", "no-fsync": "fsync=False"}
_KEYWORDS = {
    "order": "order", "weights": "weights", "ema": "ema", "ema-half-life": "ema_half_life", "key": "key", "strip-prefix": "strip_prefixes",
    "dtype": "dtype", "device": "device", "memory-budget": "memory_budget", "max-shard-size": "max_shard_size", "format": "out_format",
    "accum-dtype": "accum",
}
_FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9-]*)(?: ([A-Z_]+\b|[\w:]*[\d.,:][\w.,:]*|given|auto|linear|uniform|cpu|cuda|pt|safetensors))?")


def python_terms(text: str) -> str:
    """`text` with the command line's flags written as the Python API's keyword arguments."""

    def keyword(match: re.Match) -> str:
        flag, value = match.group(1), match.group(2)
        if flag in _SWITCHES:
            return _SWITCHES[flag] + (f" {value}" if value else "")
        if flag not in _KEYWORDS:
            return match.group(0)
        name = _KEYWORDS[flag]
        if value is None:
            return f"{name}=..."
        if flag == "strip-prefix":
            return f"{name}=[{value!r}]"
        return f"{name}={value}" if re.fullmatch(r"[A-Z_]+|[\d.]+", value) else f"{name}={value!r}"

    return _FLAG.sub(keyword, text).replace("-o OUT", "out=...").replace("pass -o ", "pass out=")


def _speaking_python(function: Any) -> Any:
    from ckptavg.errors import CkptavgError

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except CkptavgError as e:
            e.problem = python_terms(e.problem)
            e.args = (e.message,)
            raise

    return call


def __getattr__(name: str) -> Any:
    # Imported on first use so that `ckptavg --help` and `--version` answer without loading torch.
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        if name in ("average", "export"):
            value = _speaking_python(value)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ckptavg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
