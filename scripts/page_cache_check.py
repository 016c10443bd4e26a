"""How much of ckptavg's output stays in the page cache, with and without its posix_fadvise(DONTNEED) calls.

    python scripts/page_cache_check.py INPUT [INPUT ...]

Averages the inputs twice into a temporary folder beside the first input, then reports the output's pages
still cached (`fincore`) and how much /proc/meminfo's `Cached` grew. Linux only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def cached_mib() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("Cached:"))


def run(inputs: list[str], drop: bool) -> None:
    import ckptavg

    advise = os.posix_fadvise
    if not drop:
        os.posix_fadvise = lambda *args: None  # type: ignore[assignment]
    out = Path(tempfile.mkdtemp(dir=Path(inputs[0]).resolve().parent)) / "merged"
    try:
        before = cached_mib()
        ckptavg.average(inputs, out)
        grew = cached_mib() - before
        files = [str(p) for p in out.glob("*.safetensors")]
        resident = subprocess.run(
            ["fincore", "-b", "-n", "-o", "RES", *files], capture_output=True, text=True, check=True
        ).stdout.split()
        size = sum(Path(f).stat().st_size for f in files)
        label = "with DONTNEED" if drop else "without DONTNEED"
        print(
            f"{label:17s} output pages cached: {sum(map(int, resident)) / 1e6:6.0f} MB of {size / 1e6:.0f} MB; Cached grew "
            f"{grew} MiB"
        )
    finally:
        os.posix_fadvise = advise
        shutil.rmtree(out.parent, ignore_errors=True)


if __name__ == "__main__":
    for drop in (True, False):
        run(sys.argv[1:], drop)
