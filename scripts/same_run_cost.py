"""What the different-runs check costs: its time against the whole `ckptavg average` of the same inputs.

    python scripts/same_run_cost.py [--models 4] [--size-gb 0.5] [--dir /tmp/ckptavg-same-run]

Generates N bf16 checkpoints of one run (a shared start plus noise, many matrices like a transformer's),
then times, in one process: the whole average (cold page cache for the inputs), and the check alone
(`ckptavg.same_run.different_runs` on the same plan, cold and warm). Prints the ratio the issue bounds (< 5%).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def drop_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def make_inputs(root: Path, models: int, size_gb: float) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    rows = 2048
    matrices = max(1, int(size_gb * 1e9 / 2 / (rows * rows)))
    start = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.weight": torch.randn(rows, rows, generator=start) for i in range(matrices)}
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

    out = root / "merged"
    shutil.rmtree(out, ignore_errors=True)
    drop_cache(paths)
    started = time.perf_counter()
    report = ckptavg.average(folders, out)
    whole = time.perf_counter() - started
    assert report.warnings == [], report.warnings

    checkpoints = [open_checkpoint(f) for f in folders]
    plan = build_plan(checkpoints, uniform(len(checkpoints)))
    drop_cache(paths)
    started = time.perf_counter()
    assert different_runs(plan) == []
    cold = time.perf_counter() - started
    started = time.perf_counter()
    different_runs(plan)
    warm = time.perf_counter() - started
    FILES.close()
    gb = sum(p.stat().st_size for p in paths) / 1e9
    print(f"inputs: {args.models} x {gb / args.models:.2f} GB bf16, {len(plan.entries)} tensors")
    print(f"average (cold inputs):       {whole:7.3f} s")
    print(f"same-run check, cold:        {cold:7.3f} s  = {cold / whole:6.2%} of the run")
    print(f"same-run check, warm:        {warm:7.3f} s  = {warm / whole:6.2%} of the run")


if __name__ == "__main__":
    main()
