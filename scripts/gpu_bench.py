"""The benchmark of scripts/gpu_check.sh (issue 15): `ckptavg average --device cuda` and `--device cpu` against
the disk's read floor, cold and warm, all in one run.

    python scripts/gpu_bench.py --json bench.json [--models 8] [--size-gb 1] [--repeat 2] [--dir DIR]

Inputs: N bf16 checkpoints of about --size-gb each (sharded safetensors folders, 2048 x 8192 matrices and
8192-element vectors, seeded), made on a local disk: --dir, else the first of /tmp, /var/tmp and the folder above
the repository that is not a tmpfs (a cold cache means nothing there) and has room. They are kept for a rerun.
Rows, measured round-robin `--repeat` times each (median, min-max):
  read floor (cat)       `cat` of every input file to /dev/null, warm and cold (cold: sync, then posix_fadvise
                         DONTNEED on every input; no root needed)
  startup                `import torch`, which every run pays
  ckptavg --device cuda  end to end, output fsynced, warm and cold; skipped without CUDA
  ckptavg --device cpu   the same on every core
Each ckptavg run goes through a small runner that reports its peak RSS (VmHWM) and, on CUDA, torch's peak
GPU memory (max_memory_allocated and max_memory_reserved; the CUDA context itself is not counted). x floor is
the median over the read floor's median with the same cache. The CUDA and CPU outputs are compared byte for
byte. The torchrun row runs two ranks with --device cuda (warm cache) and compares their output with the CPU's.
No numpy: only torch, safetensors and ckptavg from this working tree.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from bench import evict, input_files, warm, write_sharded  # noqa: E402

from ckptavg.merge.engine import CUDA_MEMORY_BUDGET  # noqa: E402
from ckptavg.verify import sha256_of  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p), "COLUMNS": "200"}

# Runs the ckptavg command line in this process, then reports what the process used.
RUNNER = r"""
import json, resource, sys
stats, code = {}, 0
try:
    from ckptavg.cli import main
    main(sys.argv[2:])
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
finally:
    try:  # VmHWM: this process's own peak (getrusage's also counts the parent's, forked before the exec)
        with open("/proc/self/status") as f:
            stats["peak_rss"] = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        stats["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        stats["gpu_peak_allocated"] = torch.cuda.max_memory_allocated()
        stats["gpu_peak_reserved"] = torch.cuda.max_memory_reserved()
    with open(sys.argv[1], "w") as f:
        json.dump(stats, f)
sys.exit(code)
"""


def make_checkpoints(root: Path, n: int, size_gb: float) -> list[Path]:
    """n bf16 checkpoints of about size_gb each under root (kept between runs). A seeded normal draw is slow
    (single-threaded, about 0.3 GB/s), so four matrices are drawn once and each tensor is one of them scaled
    and shifted by its checkpoint and layer: every tensor differs, and 8 GB are made at the disk's speed."""
    rows, cols = 2048, 8192
    layers = max(1, round(size_gb * 1e9 / (rows * cols * 2)))
    config = {"model_type": "gpu-bench", "torch_dtype": "bfloat16", "layers": layers}
    g = torch.Generator().manual_seed(0)
    pool = [torch.empty(rows, cols, dtype=torch.bfloat16).normal_(generator=g) for _ in range(4)]
    norm = torch.empty(cols, dtype=torch.bfloat16).normal_(generator=g)
    paths = []
    for k in range(n):
        path = root / f"checkpoint-{(k + 1) * 1000}"
        paths.append(path)
        if path.exists():
            continue
        tensors = {}
        for i in range(layers):
            tensors[f"layers.{i}.weight"] = pool[(i + k) % len(pool)] * (1 + 0.01 * k) + 0.001 * i
            tensors[f"layers.{i}.norm"] = norm + 0.01 * (k + i)
        write_sharded(path, tensors, config)
        print(f"made {path}", file=sys.stderr, flush=True)
    return paths


def fs_type(path: Path) -> str:
    """The type of the filesystem holding path, from /proc/mounts (longest mount point that contains it)."""
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                _, mount, fstype, *_ = line.split()
                if (str(path) + "/").startswith(mount.rstrip("/") + "/") and len(mount) >= len(best):
                    best, kind = mount, fstype
    except OSError:
        pass
    return kind


def choose_dir(given: Path | None, needed: float) -> tuple[Path | None, str]:
    """A folder on a local disk with `needed` bytes free, or None and why."""
    candidates = [given] if given else [Path("/tmp"), Path("/var/tmp"), ROOT.parent]
    why = []
    for base in candidates:
        if not base.is_dir() and base is not given:
            continue
        folder = base if given else base / "ckptavg-gpu-bench"
        folder.mkdir(parents=True, exist_ok=True)
        kind = fs_type(folder.resolve())
        existing = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        free = shutil.disk_usage(folder).free + existing
        if kind in ("tmpfs", "ramfs"):
            why.append(f"{folder} is a {kind}")
        elif free < needed:
            why.append(f"{folder} has {free / 1e9:.1f} GB free, {needed / 1e9:.1f} GB needed")
        else:
            return folder, kind
    return None, "; ".join(why)


def run_ckptavg(argv: list[str], stats_file: Path) -> tuple[float, dict]:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, str(stats_file), *argv], capture_output=True, text=True, env=ENV, cwd=ROOT
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"ckptavg {' '.join(argv[:2])}... exited {result.returncode}: {result.stderr.strip()[-1500:]}")
    return wall, json.loads(stats_file.read_text())


def sha256s(folder: Path) -> dict[str, str]:
    """sha256 of each weight file and index of an output folder (the recipe, which holds a date, left out)."""
    return {
        f.name: sha256_of(f) for f in sorted(folder.iterdir()) if f.suffix == ".safetensors" or f.name.endswith(".index.json")
    }


def torchrun_support() -> bool:
    result = subprocess.run(
        [sys.executable, "-m", "ckptavg", "average", "--help"], capture_output=True, text=True, env=ENV, cwd=ROOT
    )
    return "torchrun" in (result.stdout + result.stderr).lower()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True, help="write the figures here")
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dir", type=Path, help="where to make the inputs (default: a local disk, see above)")
    parser.add_argument("--deadline", type=float, default=0, help="seconds: start no round of runs that would end after it")
    args = parser.parse_args()
    deadline = time.monotonic() + args.deadline if args.deadline else float("inf")

    cuda = torch.cuda.is_available()
    results: dict = {
        "models": args.models,
        "size_gb": args.size_gb,
        "repeat": args.repeat,
        "cpu_count": os.cpu_count(),
        "cuda": cuda,
        "memory_budget_cuda_default": CUDA_MEMORY_BUDGET,
    }
    folder, fstype = choose_dir(args.dir, args.models * args.size_gb * 1e9 * 1.1 + 3 * args.size_gb * 1e9)
    if folder is None:
        results["skipped"] = f"no local disk with room for the inputs: {fstype}"
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        print(results["skipped"])
        return
    results["dir"], results["fs_type"] = str(folder), fstype
    started = time.perf_counter()
    paths = make_checkpoints(folder / f"bf16-{args.size_gb:g}gb", args.models, args.size_gb)
    results["make_inputs_s"] = time.perf_counter() - started
    files = input_files(paths)
    total = sum(Path(f).stat().st_size for f in files)
    results["input_bytes"] = total
    print(
        f"{args.models} inputs, {total / 1e9:.2f} GB in {folder} ({fstype}), made or found in {results['make_inputs_s']:.1f} s",
        flush=True,
    )

    devices = ["cuda", "cpu"] if cuda else ["cpu"]
    rows: dict[tuple[str, str], dict] = {}
    plan = [("read floor (cat)", "warm"), ("read floor (cat)", "cold"), ("startup (import torch)", "-")]
    plan += [(f"ckptavg --device {d}", c) for d in devices for c in ("warm", "cold")]
    for label, cache in plan:
        rows[(label, cache)] = {
            "label": label,
            "cache": cache,
            "walls": [],
            "peak_rss": [],
            "gpu_peak_allocated": [],
            "gpu_peak_reserved": [],
        }
    outputs = {d: folder / f"out-{d}" for d in devices}
    stats_file = folder / "stats.json"
    last_round = 0.0
    for r in range(args.repeat):
        round_started = time.monotonic()
        if r and time.monotonic() + 1.3 * last_round > deadline:
            results["stopped_early"] = f"{r} of {args.repeat} rounds: the next would pass the deadline"
            print(f"stopped after {r} rounds: the next would pass the deadline", flush=True)
            break
        for label, cache in plan:
            row = rows[(label, cache)]
            if row.get("error"):
                continue
            if cache == "cold":
                evict(files)
            elif cache == "warm":
                warm(files)
            try:
                if label.startswith("read floor"):
                    t = time.perf_counter()
                    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
                    wall, stats = time.perf_counter() - t, {}
                elif label.startswith("startup"):
                    t = time.perf_counter()
                    subprocess.run([sys.executable, "-c", "import torch"], check=True)
                    wall, stats = time.perf_counter() - t, {}
                else:
                    device = label.split()[-1]
                    shutil.rmtree(outputs[device], ignore_errors=True)
                    wall, stats = run_ckptavg(
                        ["average", *map(str, paths), "-o", str(outputs[device]), "--device", device, "--quiet"], stats_file
                    )
            except (RuntimeError, subprocess.CalledProcessError) as e:
                row["error"] = str(e)
                print(f"  {label} ({cache}): FAILED {e}", flush=True)
                continue
            row["walls"].append(wall)
            for key in ("peak_rss", "gpu_peak_allocated", "gpu_peak_reserved"):
                if key in stats:
                    row[key].append(stats[key])
            extra = f", peak RSS {stats['peak_rss'] / 1e9:.2f} GB" if "peak_rss" in stats else ""
            extra += f", GPU peak {stats['gpu_peak_allocated'] / 2**20:.0f} MiB" if "gpu_peak_allocated" in stats else ""
            print(f"  run {r + 1}: {label} ({cache}) {wall:.2f} s{extra}", flush=True)
        last_round = time.monotonic() - round_started

    floors = {
        c: statistics.median(rows[("read floor (cat)", c)]["walls"])
        for c in ("warm", "cold")
        if rows[("read floor (cat)", c)]["walls"]
    }
    print(
        f"\n{'':26s} {'cache':5s} {'median s':>9s} {'min-max s':>13s} {'GB/s':>6s} {'x floor':>8s} {'peak RSS':>9s} "
        f"{'GPU peak':>9s}"
    )
    for row in rows.values():
        for key in ("peak_rss", "gpu_peak_allocated", "gpu_peak_reserved"):
            row[key] = max(row[key]) if row[key] else None
        if not row["walls"]:
            print(f"{row['label']:26s} {row['cache']:5s} {row.get('error', 'no runs')[:120]}")
            continue
        row["median"], row["min"], row["max"] = statistics.median(row["walls"]), min(row["walls"]), max(row["walls"])
        row["gb_per_s"] = total / row["median"] / 1e9
        row["x_floor"] = row["median"] / floors[row["cache"]] if row["cache"] in floors else None
        rss = f"{row['peak_rss'] / 1e9:.2f} GB" if row["peak_rss"] else "-"
        gpu = f"{row['gpu_peak_allocated'] / 2**20:.0f} MiB" if row["gpu_peak_allocated"] else "-"
        x = f"{row['x_floor']:8.2f}" if row["x_floor"] else f"{'-':>8s}"
        print(
            f"{row['label']:26s} {row['cache']:5s} {row['median']:9.2f} {row['min']:6.2f}-{row['max']:<6.2f} "
            f"{row['gb_per_s']:6.2f} {x} {rss:>9s} {gpu:>9s}"
        )
    results["floors_s"] = floors
    results["rows"] = list(rows.values())

    if cuda:
        summary = {}
        for cache in ("warm", "cold"):
            gpu_row, cpu_row = rows[("ckptavg --device cuda", cache)], rows[("ckptavg --device cpu", cache)]
            if gpu_row.get("median") and cpu_row.get("median"):
                summary[f"cpu_over_cuda_{cache}"] = cpu_row["median"] / gpu_row["median"]
                summary[f"cuda_at_least_as_fast_as_cpu_{cache}"] = gpu_row["median"] <= cpu_row["median"]
        cold = rows[("ckptavg --device cuda", "cold")]
        if cold.get("x_floor"):
            summary["cuda_cold_within_1_2x_floor"] = cold["x_floor"] <= 1.2
        peaks = [rows[("ckptavg --device cuda", c)]["gpu_peak_allocated"] for c in ("warm", "cold")]
        if any(peaks):
            summary["gpu_peak_over_budget"] = max(p for p in peaks if p) / CUDA_MEMORY_BUDGET
        if all(o.exists() for o in outputs.values()):
            summary["cuda_output_equals_cpu_output"] = sha256s(outputs["cuda"]) == sha256s(outputs["cpu"])
        results["targets"] = summary
        print("\n" + json.dumps(summary, indent=1))
    else:
        results["targets"] = {"skipped": "no CUDA device: the --device cuda rows were not run"}

    if not torchrun_support():
        results["torchrun"] = {
            "skipped": "ckptavg has no torchrun support yet (`ckptavg average --help` does not mention torchrun)"
        }
    elif not cuda:
        results["torchrun"] = {"skipped": "no CUDA device"}
    else:
        out = folder / "out-torchrun"
        shutil.rmtree(out, ignore_errors=True)
        warm(files)
        # Two ranks, each folding its share on its GPU (cuda:LOCAL_RANK, both on cuda:0 with one GPU).
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "ckptavg",
            "average",
            *map(str, paths),
            "-o",
            str(out),
            "--device",
            "cuda",
            "--quiet",
        ]
        t = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT)
        results["torchrun"] = {
            "cmd": " ".join(cmd[:8]) + " ...",
            "exit": result.returncode,
            "wall_s_warm": time.perf_counter() - t,
            "stderr_tail": result.stderr[-1500:],
        }
        if result.returncode == 0 and outputs["cpu"].exists():
            results["torchrun"]["output_equals_cpu_output"] = sha256s(out) == sha256s(outputs["cpu"])
        shutil.rmtree(out, ignore_errors=True)
    print(f"torchrun: {results['torchrun']}")

    for o in outputs.values():
        shutil.rmtree(o, ignore_errors=True)
    stats_file.unlink(missing_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    if any(row.get("error") for row in results["rows"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
