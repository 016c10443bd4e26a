"""`ckptavg export` of a DCP and a DeepSpeed ZeRO-3 save against the reference consolidators, in one run.

    python scripts/dist_bench.py [--dir /tmp/ckptavg-dist-bench] [--size-gb 1] [--kinds dcp,zero3]

dcp:   a DCP save of a model of SIZE GB in fp32 with its Adam moments (3 x SIZE GB on disk), written by
       torch.distributed.checkpoint in one process; against
       `python -m torch.distributed.checkpoint.format_utils dcp_to_torch SRC OUT.pt`.
zero3: a DeepSpeed ZeRO-3 save (CPU accelerator, one rank, one step) of a model of SIZE/2 GB; against the
       `zero_to_fp32.py` script DeepSpeed saves beside it (safetensors output).
Each command runs under /usr/bin/time -v with the page cache warm; wall time and peak RSS are printed with
the ratios ckptavg / reference. The issue's target: at least as fast, at most 1/4 of their peak memory.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(command: list[str], env: dict | None = None) -> tuple[float, int]:
    started = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1)) * 1024
    return seconds, rss


def warm(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass


def make_dcp(folder: Path, size_gb: float) -> None:
    if (folder / ".metadata").exists():
        return
    code = f"""
        import warnings, torch
        warnings.simplefilter("ignore")
        from torch.distributed.checkpoint.state_dict_saver import save
        n = int({size_gb} * 1e9 / 4 / 16)
        g = torch.Generator().manual_seed(0)
        model = {{f"layers.{{i}}.weight": torch.randn(n // 4096, 4096, generator=g) for i in range(16)}}
        optim = {{
            f"state.{{k}}.{{m}}": torch.randn(v.shape, generator=g) for k, v in model.items() for m in ("exp_avg", "exp_avg_sq")
        }}
        save({{"model": model, "optimizer": optim}}, checkpoint_id="{folder}")
    """
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True)


def make_zero3(root: Path, size_gb: float) -> Path:
    if (root / "latest").exists():
        return root
    code = f"""
        import os, socket, torch, warnings
        warnings.simplefilter("ignore")
        os.environ.update(DS_ACCELERATOR="cpu", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0)); os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        import deepspeed, deepspeed.ops
        deepspeed.ops.__compatible_ops__ = {{k: False for k in deepspeed.ops.__compatible_ops__}}
        deepspeed.init_distributed(dist_backend="gloo")
        n = int({size_gb} * 1e9 / 4 / 16)
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            *[
                torch.nn.Linear(4096, n // 4096, bias=False) if i % 2 == 0 else torch.nn.Linear(n // 4096, 4096, bias=False)
                for i in range(16)
            ]
        )
        config = {{
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {{"stage": 3}},
            "optimizer": {{"type": "AdamW", "params": {{"lr": 1e-3, "torch_adam": True}}}},
        }}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        loss = engine(torch.randn(1, 4096)).sum()
        engine.backward(loss)
        engine.step()
        engine.save_checkpoint("{root}", tag="global_step1")
    """
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/ckptavg-dist-bench")
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--kinds", default="dcp,zero3")
    args = parser.parse_args()
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    ckptavg = [sys.executable, "-m", "ckptavg", "export", "-q", "--overwrite"]
    env = {"PYTHONPATH": str(ROOT)}
    rows = []
    if "dcp" in args.kinds:
        source = root / "dcp"
        make_dcp(source, args.size_gb)
        warm(source)
        out = root / "dcp-ref.pt"
        ref = measure(
            [
                sys.executable,
                "-W",
                "ignore",
                "-m",
                "torch.distributed.checkpoint.format_utils",
                "dcp_to_torch",
                str(source),
                str(out),
            ]
        )
        out.unlink()
        mine = measure([*ckptavg, str(source), "-o", str(root / "dcp-out")], env)
        fast = measure([*ckptavg, "--no-fsync", str(source), "-o", str(root / "dcp-out")], env)
        rows.append((f"DCP, {args.size_gb:g} GB model + Adam moments", "dcp_to_torch_save", ref, mine, fast))
    if "zero3" in args.kinds:
        run = make_zero3(root / "zero3", args.size_gb / 2)
        warm(run)
        out = root / "zero3-ref"
        shutil.rmtree(out, ignore_errors=True)
        ref = measure(
            [sys.executable, "-W", "ignore", str(run / "zero_to_fp32.py"), str(run), str(out), "--safe_serialization"],
            {"DS_ACCELERATOR": "cpu"},
        )
        mine = measure([*ckptavg, str(run), "-o", str(root / "zero3-out")], env)
        fast = measure([*ckptavg, "--no-fsync", str(run), "-o", str(root / "zero3-out")], env)
        rows.append((f"ZeRO-3, {args.size_gb / 2:g} GB model", "zero_to_fp32.py", ref, mine, fast))
    print("ckptavg fsyncs its output by default (durable); the references do not: --no-fsync writes as they do")
    print(
        f"{'checkpoint':34s} {'reference':18s} {'ref wall':>9s} {'ref RSS':>9s} {'ckptavg':>9s} {'no-fsync':>9s} {'RSS':>8s} "
        f"{'time x':>7s} {'RSS x':>6s}"
    )
    for label, name, (rt, rr), (mt, mr), (ft, _) in rows:
        print(
            f"{label:34s} {name:18s} {rt:8.2f}s {rr / 1e9:8.2f}G {mt:8.2f}s {ft:8.2f}s {mr / 1e9:7.2f}G {mt / rt:7.2f} "
            f"{mr / rr:6.2f}"
        )


if __name__ == "__main__":
    main()
