"""What the different-runs check costs: its time against the whole `ckptavg average` of the same inputs.

    python scripts/same_run_cost.py [--models 4] [--size-gb 0.5] [--dir /tmp/ckptavg-same-run]

Generates N bf16 checkpoints of one run (a shared start plus noise, many matrices like a transformer's),
then times, in one process, the whole average with and without the check (cold page cache for the inputs,
alternating, medians), and the check alone (`ckptavg.same_run.different_runs` on the same plan, cold and warm).
Prints the ratios the issue bounds (< 5% of the run).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import evict  # noqa: E402  (scripts/ is on the path: this script's folder)


def make_inputs(root: Path, models: int, size_gb: float) -> list[Path]:
    import torch

    rows = 2048
    matrices = max(1, int(size_gb * 1e9 / 2 / (rows * rows)))
    start = torch.Generator().manual_seed(0)
    return write_run(root, {f"layers.{i}.weight": torch.randn(rows, rows, generator=start) for i in range(matrices)}, models)


def write_run(root: Path, base: dict, models: int) -> list[Path]:
    """`models` bf16 checkpoints of one run, `checkpoint-100/`, `checkpoint-200/`, ...: `base` plus a little noise
    each (written once: an existing one is kept)."""
    import torch
    from safetensors.torch import save_file

    paths = []
    for m in range(models):
        path = root / f"checkpoint-{(m + 1) * 100}" / "model.safetensors"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            g = torch.Generator().manual_seed(m + 1)
            save_file({k: (v + 0.05 * torch.randn(v.shape, generator=g)).bfloat16() for k, v in base.items()}, path)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--size-gb", type=float, default=0.5)
    parser.add_argument("--dir", default="/tmp/ckptavg-same-run")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    paths = make_inputs(root, args.models, args.size_gb)
    folders = [p.parent for p in paths]

    import ckptavg
    from ckptavg.checkpoint import open_checkpoint
    from ckptavg.formats.base import FILES
    from ckptavg.merge.plan import build_plan
    from ckptavg.merge.weights import uniform
    from ckptavg.same_run import different_runs

    def cold_run(check: bool) -> float:
        out = root / "merged"
        shutil.rmtree(out, ignore_errors=True)
        evict([str(p) for p in paths])
        started = time.perf_counter()
        report = ckptavg.average(folders, out, check_same_run=check)
        assert report.warnings == [], report.warnings
        return time.perf_counter() - started

    with_check, without = [], []
    for _ in range(args.repeat):
        without.append(cold_run(False))
        with_check.append(cold_run(True))

    checkpoints = [open_checkpoint(f) for f in folders]
    plan = build_plan(checkpoints, uniform(len(checkpoints)))
    evict([str(p) for p in paths])
    started = time.perf_counter()
    assert different_runs(plan) == []
    alone_cold = time.perf_counter() - started
    started = time.perf_counter()
    different_runs(plan)
    alone_warm = time.perf_counter() - started
    FILES.close()
    gb = sum(p.stat().st_size for p in paths) / 1e9
    a, b = statistics.median(without), statistics.median(with_check)
    print(
        f"inputs: {args.models} x {gb / args.models:.2f} GB bf16, {len(plan.entries)} tensors; cold page cache, medians of "
        f"{args.repeat}"
    )
    print(f"average without the check:   {a:7.3f} s  ({min(without):.3f}-{max(without):.3f})")
    print(f"average with the check:      {b:7.3f} s  ({min(with_check):.3f}-{max(with_check):.3f})  = {b / a - 1:+.2%}")
    print(
        f"the check alone, cold:       {alone_cold:7.3f} s  = {alone_cold / a:6.2%} of the run "
        "(its reads are the first ones the run makes)"
    )
    print(f"the check alone, warm:       {alone_warm:7.3f} s  = {alone_warm / a:6.2%} of the run")


if __name__ == "__main__":
    main()
