"""Sizes as people type them ("5GB", "500MB", "2GiB") and as ckptavg prints them back."""

from __future__ import annotations

import resource
from fractions import Fraction

from ckptavg.errors import UsageError

UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a plain byte count."""
    value = text.strip().upper()
    number = value.rstrip("KMGTIB")
    try:
        size = int(float(number) * UNITS[value[len(number) :]])
    except (ValueError, KeyError, OverflowError) as e:  # OverflowError: 'inf'
        raise UsageError(None, f"size {text!r} is not like 5GB, 500MB or 2GiB") from e
    if size <= 0:
        raise UsageError(None, f"size {text!r} must be positive")
    return size


def format_size(n: int) -> str:
    """The size in the largest unit that holds it exactly, so "1KB" and "16MiB" come back as typed."""
    for name, unit in sorted(((k, v) for k, v in UNITS.items() if k not in ("", "B")), key=lambda kv: -kv[1]):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{name.replace('I', 'i')}"
    return f"{n} bytes"


def peak_rss() -> int:
    """The most memory this process has held (resident), in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def human_bytes(n: float) -> str:
    """A size for people to read: 3 B, 1.50 KB, 2.14 GB (decimal units)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


# Token counts are quoted in decimal units (a 20B-token window, 15T tokens of pre-training).
TOKEN_UNITS = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
TOKENS = "expected a whole number of tokens >= 0 like 500M, 20B or 1500000 (K, M, B, T: 10^3 .. 10^12)"


def parse_tokens(text: str) -> int:
    """'500M', '20B', '1.5T' (decimal: K, M, B, T are 10^3 .. 10^12) or a plain count; a whole number >= 0."""
    value = text.strip().upper()
    unit = TOKEN_UNITS.get(value[-1:], 1) if value else 1
    number = value[:-1] if unit > 1 else value
    try:
        exact = Fraction(number) * unit  # exact: 1.5B is 1500000000, with no float rounding
    except (ValueError, ZeroDivisionError) as e:
        raise UsageError(None, f"token count {text!r}: {TOKENS}") from e
    if "/" in number or exact < 0 or exact.denominator != 1:
        raise UsageError(None, f"token count {text!r}: {TOKENS}")
    return int(exact)


def format_tokens(n: int) -> str:
    """A token count in the largest decimal unit that writes it exactly in a few digits (20B, 1.5T, 500M), else as
    it is (123456789): what parse_tokens reads back as the same count."""
    for name, unit in sorted(TOKEN_UNITS.items(), key=lambda kv: -kv[1]):
        text = f"{n / unit:.6g}{name}"
        if n >= unit and "e" not in text and parse_tokens(text) == n:
            return text
    return str(n)
