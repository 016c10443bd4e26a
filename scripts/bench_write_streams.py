"""How fast this disk takes one output written as 1, 2 or 4 concurrent streams (why the engine writes a sweep's
outputs from two threads).

    python scripts/bench_write_streams.py --dir /tmp/ckptavg-bench [--gb 8] [--repeat 2]

Each stream writes its share of GB in 64 MiB pieces and fsyncs its file; the files are removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

PIECE = bytes(64 << 20)


def write(path: Path, nbytes: int) -> None:
    with open(path, "wb") as f:
        for start in range(0, nbytes, len(PIECE)):
            f.write(PIECE[: min(len(PIECE), nbytes - start)])
        f.flush()
        os.fsync(f.fileno())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, required=True, help="a folder on the disk to measure")
    parser.add_argument("--gb", type=float, default=8.0, help="bytes written in all, in GB (default 8)")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    total = int(args.gb * 1e9)
    for _ in range(args.repeat):
        for streams in (1, 2, 4):
            paths = [args.dir / f"stream-{i}.bin" for i in range(streams)]
            threads = [threading.Thread(target=write, args=(p, total // streams)) for p in paths]
            started = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - started
            for p in paths:
                p.unlink()
            print(f"{streams} stream{'s' if streams > 1 else ''}: {args.gb:g} GB in {wall:.1f} s ({total / wall / 1e9:.2f} GB/s)")


if __name__ == "__main__":
    main()
