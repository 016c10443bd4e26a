"""The sweep's engine without its disk: K candidates' plans run in one pass into writers that drop the bytes.

    python scripts/bench_sweep_fold.py --dir /tmp/ckptavg-sweep-bench [--ks 1,8] [--repeat 3]

Uses the inputs of scripts/bench_sweep.py (8 x 1 GB bf16 under DIR/bf16-1gb, made there if missing) and its
recipes, as plans built directly (uniform means of the newest N, EMA, linear). Prints, for each K, the wall and
CPU seconds of the engine's pass on a warm page cache: what reading and folding cost with no output written, to
set beside bench_sweep.py's write floor.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench import input_files, make_inputs, warm  # noqa: E402

from ckptavg.checkpoint import LoadOptions, open_checkpoint  # noqa: E402
from ckptavg.merge.engine import Engine  # noqa: E402
from ckptavg.merge.plan import build_plan  # noqa: E402
from ckptavg.merge.weights import ema, linear, uniform  # noqa: E402


class DroppingWriter:
    """A TensorWriter that counts the bytes and keeps none."""

    def __init__(self) -> None:
        self.paths: list[Path] = []
        self.bytes_written = 0

    def write(self, data: memoryview) -> None:
        self.bytes_written += len(data)

    def repeat(self, name: str) -> None:
        pass

    def finish(self) -> None:
        pass

    def abort(self) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/ckptavg-sweep-bench"), help="where the inputs are (or go)")
    parser.add_argument("--ks", default="1,8", help="numbers of candidates (default 1,8; at most 8)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per K, median (default 3)")
    args = parser.parse_args()
    paths = make_inputs(args.dir / "bf16-1gb", "bf16", 8, 1.0)
    inputs = [open_checkpoint(p, LoadOptions()) for p in paths]
    # bench_sweep.py's recipes in its order: mean, last:2, ema:0.9, linear, last:4, ema:0.99, ema-half-life:2000
    # (an EMA of decay 0.5^(1000/2000) over checkpoints 1000 steps apart), last:6.
    plans = [
        build_plan(inputs, uniform(8)),
        build_plan(inputs[-2:], uniform(2)),
        build_plan(inputs, ema(8, 0.9)),
        build_plan(inputs, linear(8)),
        build_plan(inputs[-4:], uniform(4)),
        build_plan(inputs, ema(8, 0.99)),
        build_plan(inputs, ema(8, 0.5 ** (1000 / 2000))),
        build_plan(inputs[-6:], uniform(6)),
    ]
    files = input_files(paths)
    for k in [int(k) for k in args.ks.split(",")]:
        walls, cpus = [], []
        for _ in range(args.repeat):
            warm(files)
            started, cpu = time.perf_counter(), time.process_time()
            Engine(plans[:k], torch.device("cpu")).run([DroppingWriter() for _ in range(k)])
            walls.append(time.perf_counter() - started)
            cpus.append(time.process_time() - cpu)
        wall, cpu = statistics.median(walls), statistics.median(cpus)
        print(f"K={k}: engine pass {wall:.2f} s wall, {cpu:.2f} s CPU (medians of {args.repeat})")


if __name__ == "__main__":
    main()
