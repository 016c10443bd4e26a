"""What the copies check costs: its time against the whole `ckptavg average` of the same inputs.

    python scripts/same_weights_cost.py [--models 4] [--size-gb 0.15] [--dir /tmp/ckptavg-same-weights]

Generates N bf16 checkpoints of one run laid out like a transformer's (per layer four matrices, their biases
and two norms, so a few hundred tensors: the sample reads 3 small ranges of each), then times, in one
process, the whole average with and without the check (cold page cache for the inputs, alternating, medians),
the check alone (`ckptavg.same_weights.same_weight_groups`, cold and warm), and the check with a copy of the
newest input among them (the case that reads one pair in full before the run is refused).
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
from same_run_cost import write_run  # noqa: E402

HIDDEN = 1024


def make_inputs(root: Path, models: int, size_gb: float) -> list[Path]:
    import torch

    layers = max(1, int(size_gb * 1e9 / 2 / (4 * HIDDEN * HIDDEN)))
    start = torch.Generator().manual_seed(0)
    base: dict[str, torch.Tensor] = {}
    for i in range(layers):
        for part in ("q", "k", "v", "o"):
            base[f"layers.{i}.{part}.weight"] = torch.randn(HIDDEN, HIDDEN, generator=start)
            base[f"layers.{i}.{part}.bias"] = torch.randn(HIDDEN, generator=start)
        for norm in ("norm1", "norm2"):
            base[f"layers.{i}.{norm}.weight"] = torch.ones(HIDDEN)
    return write_run(root, base, models)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--size-gb", type=float, default=0.15)
    parser.add_argument("--dir", default="/tmp/ckptavg-same-weights")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    paths = make_inputs(root, args.models, args.size_gb)
    folders = [p.parent for p in paths]

    import ckptavg
    import ckptavg.averaging
    from ckptavg.checkpoint import open_checkpoint
    from ckptavg.formats.base import FILES
    from ckptavg.same_weights import refuse_copies, same_weight_groups

    in_run: list[float] = []

    def timed_check(checkpoints: list) -> None:
        started = time.perf_counter()
        refuse_copies(checkpoints)
        in_run.append(time.perf_counter() - started)

    def cold_run(check: bool) -> float:
        out = root / "merged"
        shutil.rmtree(out, ignore_errors=True)
        ckptavg.averaging.refuse_copies = timed_check if check else (lambda checkpoints: None)
        evict([str(p) for p in paths])
        started = time.perf_counter()
        ckptavg.average(folders, out, check_same_run=False)
        return time.perf_counter() - started

    with_check, without = [], []
    for i in range(args.repeat):  # alternating, each first in turn
        for check in (i % 2 == 0, i % 2 == 1):
            (with_check if check else without).append(cold_run(check))
    ckptavg.averaging.refuse_copies = refuse_copies

    def check_alone(inputs: list[Path], cold: bool) -> tuple[float, list]:
        checkpoints = [open_checkpoint(f) for f in inputs]
        if cold:
            evict([str(f / "model.safetensors") for f in inputs])
        started = time.perf_counter()
        groups = same_weight_groups(checkpoints)
        seconds = time.perf_counter() - started
        FILES.close()
        return seconds, groups

    alone_cold, groups = check_alone(folders, cold=True)
    assert groups == []
    alone_warm, _ = check_alone(folders, cold=False)
    copy = root / "checkpoint-last"
    if not copy.exists():
        shutil.copytree(folders[-1], copy)
    copy_cold, groups = check_alone([*folders, copy], cold=True)
    assert groups == [[len(folders) - 1, len(folders)]], groups
    gb = sum(p.stat().st_size for p in paths) / 1e9
    tensors = len(open_checkpoint(folders[0]).tensors)
    FILES.close()
    a, b = statistics.median(without), statistics.median(with_check)
    print(
        f"inputs: {args.models} x {gb / args.models:.3f} GB bf16, {tensors} tensors each; cold page cache, medians of "
        f"{args.repeat}"
    )
    print(f"average without the check:   {a:7.3f} s  ({min(without):.3f}-{max(without):.3f})")
    print(f"average with the check:      {b:7.3f} s  ({min(with_check):.3f}-{max(with_check):.3f})  = {b / a - 1:+.2%}")
    print(
        f"the check inside those runs: {statistics.median(in_run):7.3f} s  = {statistics.median(in_run) / b:6.2%} of the run "
        f"(median; {min(in_run):.3f}-{max(in_run):.3f})"
    )
    print(f"the check alone, cold:       {alone_cold:7.3f} s  = {alone_cold / a:6.2%} of the run")
    print(f"the check alone, warm:       {alone_warm:7.3f} s  = {alone_warm / a:6.2%} of the run")
    print(
        f"with a copy of the newest, cold (one pair read in full, then refused): "
        f"{copy_cold:.3f} s = {copy_cold / a:.2%} of the run"
    )


if __name__ == "__main__":
    main()
