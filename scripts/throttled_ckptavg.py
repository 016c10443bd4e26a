"""`ckptavg` with its input reads throttled to a simulated per-node (and optionally filesystem-wide) bandwidth,
to check the many-node model of docs/distributed.md on one machine. Not part of the product: it wraps
ckptavg's read function from outside, then runs ckptavg's own command line.

    CKPTAVG_SIM_NODE_BW=100e6 CKPTAVG_SIM_RANKS_PER_NODE=1 [CKPTAVG_SIM_FS_BW=200e6] CKPTAVG_SIM_DIR=/dev/shm/sim1 \
        python -m torch.distributed.run --standalone --nproc-per-node 4 scripts/throttled_ckptavg.py average IN... -o OUT
    CKPTAVG_SIM_NODE_BW=100e6 python scripts/throttled_ckptavg.py average IN... -o OUT        # one process, one node

Environment:
  CKPTAVG_SIM_NODE_BW         bytes/s of one simulated node's link (required; 0 = no node limit)
  CKPTAVG_SIM_RANKS_PER_NODE  ranks per simulated node (default 1): rank r is on node r // this, and the ranks of
                              a node share its bandwidth (one queue per node, so a rank that finishes early leaves
                              its share to the others, as on a real link)
  CKPTAVG_SIM_FS_BW           bytes/s of the whole simulated filesystem, shared by every rank (optional)
  CKPTAVG_SIM_DIR             folder for the shared queues (a fresh one per job; default: /dev/shm/ckptavg-sim-
                              <torchrun's run id>); each rank also writes rank-<r>.json there at exit (bytes it read,
                              reads, its first and last read, its peak RSS)

Every read of input bytes goes through `read_exact` (ckptavg/formats/base.py): the CPU engine's workers call the
name imported into ckptavg.merge.engine, the sources' read_into (CUDA reader, strided and extent sources) the one
in ckptavg.formats.base, the DCP reader the one in ckptavg.formats.dcp. Each of those names is replaced by a
wrapper that books the bytes on its node's queue (and the filesystem's), does the real read, and sleeps until the
booked slot ends. A queue is a shared "next free instant" (CLOCK_MONOTONIC, the same for every process of the
machine) in a small file under an flock: a read of n bytes is booked at max(now, next free) for n / bandwidth
seconds. There is no burst credit: a link that was idle does not read faster afterwards. Header reads (open() +
read of a few KB per shard) are not throttled.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import struct
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class Queue:
    """A link of `rate` bytes/s shared by every thread and process that opens the same file."""

    def __init__(self, path: Path, rate: float) -> None:
        self.rate = rate
        self._lock = threading.Lock()  # flock does not exclude threads that share one open file
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def book(self, nbytes: int) -> float:
        """The instant at which a read of nbytes, asked for now, has gone through the link."""
        with self._lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                raw = os.pread(self._fd, 8, 0)
                free = struct.unpack("d", raw)[0] if len(raw) == 8 else 0.0
                end = max(time.monotonic(), free) + nbytes / self.rate
                os.pwrite(self._fd, struct.pack("d", end), 0)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        return end


def install() -> None:
    rank = int(os.environ.get("RANK", "0"))
    per_node = int(os.environ.get("CKPTAVG_SIM_RANKS_PER_NODE", "1"))
    node_bw = float(os.environ["CKPTAVG_SIM_NODE_BW"])
    fs_bw = float(os.environ.get("CKPTAVG_SIM_FS_BW", "0") or 0)
    folder = Path(
        os.environ.get("CKPTAVG_SIM_DIR") or f"/dev/shm/ckptavg-sim-{os.environ.get('TORCHELASTIC_RUN_ID', os.getpid())}"
    )
    folder.mkdir(parents=True, exist_ok=True)
    queues = []
    if node_bw > 0:
        queues.append(Queue(folder / f"node-{rank // per_node}.clock", node_bw))
    if fs_bw > 0:
        queues.append(Queue(folder / "fs.clock", fs_bw))

    import ckptavg.formats.base as base
    import ckptavg.formats.dcp
    import ckptavg.merge.engine  # noqa: F401  (imported so that its name of read_exact is replaced too)

    real = base.read_exact
    stats = {"rank": rank, "node": rank // per_node, "bytes": 0, "reads": 0, "first": None, "last": None}
    stats_lock = threading.Lock()

    def read_exact(path, offset, out, fd=-1):  # type: ignore[no-untyped-def]
        n = len(out)
        started = time.monotonic()
        end = max([q.book(n) for q in queues], default=0.0)
        real(path, offset, out, fd)
        delay = end - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        with stats_lock:
            stats["bytes"] += n
            stats["reads"] += 1
            stats["first"] = started if stats["first"] is None else stats["first"]
            stats["last"] = time.monotonic()

    patched = []
    for name, module in list(sys.modules.items()):
        if name.startswith("ckptavg") and getattr(module, "read_exact", None) is real:
            module.read_exact = read_exact  # type: ignore[attr-defined]
            patched.append(name)

    def report() -> None:
        peak = 0
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
        except OSError:
            pass
        (folder / f"rank-{rank}.json").write_text(json.dumps({**stats, "peak_rss_bytes": peak, "patched": patched}))

    atexit.register(report)


if __name__ == "__main__":
    install()
    from ckptavg.cli import main

    main()
