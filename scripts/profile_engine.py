"""Where the engine's time goes: timers around its reader, fold, finite check and writer, per thread.

    python scripts/profile_engine.py /tmp/ckptavg-bench/inputs/* [--repeat 4] [--fsync]

Without --fsync the output is written as with --no-fsync, so the figures show the CPU-side work rather
than the disk. Each part shows wall seconds summed over its threads and, with (CPU), their CPU seconds;
`wait:<thread>` is time a thread spent blocked on its queue.
"""

from __future__ import annotations

import argparse
import collections
import queue
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TIMES: collections.defaultdict[str, float] = collections.defaultdict(float)


def timed(owner: object, name: str, label: str) -> None:
    """Add the wall and CPU time of each call to owner.name to TIMES[label] and TIMES[label + " (CPU)"]."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        started, cpu = time.perf_counter(), time.thread_time()
        try:
            return original(*args, **kwargs)
        finally:
            TIMES[label] += time.perf_counter() - started
            TIMES[label + " (CPU)"] += time.thread_time() - cpu

    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+")
    parser.add_argument("--repeat", type=int, default=1, help="name the inputs this many times (more inputs, same files)")
    parser.add_argument("--fsync", action="store_true", help="keep the output's fsync calls")
    args = parser.parse_args()

    import ckptavg
    from ckptavg.formats import writer
    from ckptavg.merge import engine

    timed(engine.Engine, "_hand_over", "main: wait for a chunk and hand it over")
    timed(engine, "fold_block", "fold workers: fold")
    timed(engine, "all_finite", "fold workers: finite check")
    timed(engine, "read_exact", "fold workers: pread")
    timed(writer.SafetensorsWriter, "write", "writer: write")
    original_get = queue.Queue.get

    def get(self, *a, **k):
        started = time.perf_counter()
        try:
            return original_get(self, *a, **k)
        finally:
            TIMES[f"wait: {threading.current_thread().name}"] += time.perf_counter() - started

    queue.Queue.get = get  # type: ignore[method-assign]
    out = Path(tempfile.mkdtemp()) / "merged"
    try:
        report = ckptavg.average(args.inputs * args.repeat, out, order="given", fsync=args.fsync)
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    print(f"{len(report.inputs)} inputs, {report.bytes_read / 1e9:.2f} GB read in {report.seconds:.2f} s; seconds per part:")
    for label, seconds in sorted(TIMES.items()):
        print(f"  {label:40s} {seconds:7.2f}")


if __name__ == "__main__":
    main()
