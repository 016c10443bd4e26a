"""Benchmark `ckptavg sweep` against separate `ckptavg average` runs, all measured in the same run.

    python scripts/bench_sweep.py --models 8 --size-gb 1 --dir /tmp/ckptavg-sweep-bench [--ks 1,4,8] [--repeat 1] \
        [--no-fsync] [--json results.json]

Inputs: N Llama-shaped bf16 sharded safetensors folders (checkpoint-1000 ... checkpoint-N000), made by
scripts/bench.py's make_inputs (deterministic, kept in DIR between runs). The page cache is warmed before each
row (the inputs are read once first), so the rows compare the tools, not the disk.

Rows, each run --repeat times (median): one `average` (the mean of all N, the unit of the ratios); for each
K, one `sweep` of the first K recipes below, and the K `average` runs that write the same outputs. Wall time
and peak RSS come from /usr/bin/time -v. The outputs are removed after each run (disk).

Floors, measured in the same run: reading the inputs once (`dd` to /dev/null, warm), writing K outputs' bytes
once (K x one input's bytes in 64 MiB writes to a file in DIR, fsynced unless --no-fsync), and folding the K
candidates' inputs at the cores' speed (scripts/bench.py's fold_floor: one mean's cache-blocked fold on inputs in
memory, one thread per core, scaled to the input bytes the K candidates fold). "x floor" is a row's wall over the
largest of the three for its K: what no tool making those outputs from those inputs can beat on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench import fold_floor, input_files, make_inputs, timed, warm  # noqa: E402  (scripts/bench.py, after the path is set)

# The candidates, in the order K takes them, and the `average` options that write the same output
# (None: the inputs are the newest `last` of them).
RECIPES: list[tuple[str, list[str], int | None]] = [
    ("mean", [], None),
    ("last:2", [], 2),
    ("ema:0.9", ["--ema", "0.9"], None),
    ("linear", ["--weights", "linear"], None),
    ("last:4", [], 4),
    ("ema:0.99", ["--ema", "0.99"], None),
    ("ema-half-life:2000", ["--ema-half-life", "2000"], None),
    ("last:6", [], 6),
]


def ckptavg(*args: str) -> list[str]:
    return [sys.executable, "-m", "ckptavg", *args, "--quiet"]


def run(cmd: list[str], files: list[str], out: Path) -> tuple[float, int]:
    """Wall seconds and peak RSS of `cmd` on a warm page cache; its output removed afterwards."""
    warm(files)
    try:
        return timed(cmd)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        os.sync()  # the removal's writes and discards land here, not in the next row's time


def write_floor(folder: Path, nbytes: int, fsync: bool) -> tuple[float, int]:
    """Seconds to write `nbytes` once, as K outputs are written: 64 MiB pieces, with O_DIRECT as ckptavg writes
    a durable safetensors output (through the page cache with --no-fsync, or where the file system refuses it),
    fsynced at the end."""
    import mmap
    import time

    piece = memoryview(mmap.mmap(-1, 64 << 20))  # page-aligned, as O_DIRECT wants
    path = folder / "write-floor.bin"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    started = time.perf_counter()
    try:
        fd = os.open(path, flags | (getattr(os, "O_DIRECT", 0) if fsync else 0), 0o644)
    except OSError:
        fd = os.open(path, flags, 0o644)
    try:
        for start in range(0, nbytes, len(piece)):
            n = min(len(piece), nbytes - start)
            os.write(fd, piece[: n + -n % 4096])
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    wall = time.perf_counter() - started
    path.unlink()
    os.sync()
    return wall, 0


def median_of(repeat: int, measure) -> tuple[float, int]:
    results = [measure() for _ in range(repeat)]
    return statistics.median(r[0] for r in results), max(r[1] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=8, help="inputs N (default 8)")
    parser.add_argument("--size-gb", type=float, default=1.0, help="size of each input in GB (default 1)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/ckptavg-sweep-bench"), help="where inputs and outputs go")
    parser.add_argument("--ks", default="1,4,8", help="numbers of candidates (default 1,4,8; at most 8)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per row, median (default 1)")
    parser.add_argument("--no-fsync", action="store_true", help="pass --no-fsync to every run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    if max(ks) > len(RECIPES) or args.models < 6:
        parser.error(f"K is at most {len(RECIPES)} and the recipes need at least 6 inputs")
    os.environ["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    inputs = make_inputs(args.dir / f"bf16-{args.size_gb:g}gb", "bf16", args.models, args.size_gb)
    files = input_files(inputs)
    extra = ["--no-fsync"] if args.no_fsync else []
    out = args.dir / "out"
    shutil.rmtree(out, ignore_errors=True)

    def average(recipe: tuple[str, list[str], int | None]) -> list[str]:
        _, options, last = recipe
        chosen = inputs[-last:] if last else inputs
        return ckptavg("average", *map(str, chosen), "-o", str(out), *options, *extra)

    rows = []
    args.dir.mkdir(parents=True, exist_ok=True)
    # dd reads into its own memory, as any tool must (cat to /dev/null may splice, skipping the copy).
    read_cmd = ["sh", "-c", 'for f; do dd if="$f" of=/dev/null bs=16M status=none; done', "read", *files]
    read_floor = median_of(args.repeat, lambda: run(read_cmd, files, out))[0]
    one_output = sum(Path(f).stat().st_size for f in files) // args.models
    write_floors = {
        k: median_of(args.repeat, lambda k=k: write_floor(args.dir, k * one_output, not args.no_fsync))[0] for k in ks
    }
    # Folding at the cores' speed: the K candidates fold sum(inputs of each) models' bytes, at the rate of one
    # mean's cache-blocked fold on inputs already in memory, one thread per core.
    fold_floors = {
        k: fold_floor(
            args.models, torch.bfloat16, sum(last or args.models for _, _, last in RECIPES[:k]) * one_output, os.cpu_count() or 1
        )
        for k in ks
    }
    run(average(RECIPES[0]), files, out)  # unmeasured: the first run also pays for cold Python and torch imports
    one = median_of(args.repeat, lambda: run(average(RECIPES[0]), files, out))
    rows.append(("average (mean of all)", 1, *one))
    for k in ks:
        recipes = [r for r, _, _ in RECIPES[:k]]
        sweep_cmd = ckptavg("sweep", *map(str, inputs), "-o", str(out), *[a for r in recipes for a in ("--recipe", r)], *extra)
        swept = median_of(args.repeat, lambda: run(sweep_cmd, files, out))
        rows.append((f"sweep, {k} candidate{'s' if k > 1 else ''}", k, *swept))

        def separate(k: int = k) -> tuple[float, int]:
            walls, peaks = zip(*(run(average(recipe), files, out) for recipe in RECIPES[:k]))
            return sum(walls), max(peaks)

        rows.append((f"{k} separate average runs", k, *median_of(args.repeat, separate)))

    gb = sum(Path(f).stat().st_size for f in files) / 1e9
    print(f"\n{args.models} x {args.size_gb:g} GB bf16 inputs ({gb:.2f} GB), warm page cache, {os.cpu_count()} cores")
    print(f"recipes in K order: {', '.join(r for r, _, _ in RECIPES[: max(ks)])}\n")
    floor_text = ", ".join(f"K={k} {w:.1f} s" for k, w in write_floors.items())
    fold_text = ", ".join(f"K={k} {w:.1f} s" for k, w in fold_floors.items())
    print(f"floors: read the inputs once {read_floor:.1f} s; write K outputs once {floor_text}; fold K candidates {fold_text}\n")
    print("| run | K | wall | vs one average | x floor | peak RSS |")
    print("|---|---|---|---|---|---|")
    for label, k, wall, rss in rows:
        floor = max(read_floor, write_floors[k], fold_floors[k])
        print(f"| {label} | {k} | {wall:.1f} s | {wall / one[0]:.2f}x | {wall / floor:.2f}x | {rss / 1e9:.2f} GB |")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "models": args.models,
                    "size_gb": args.size_gb,
                    "fsync": not args.no_fsync,
                    "read_floor_s": read_floor,
                    "write_floor_s": write_floors,
                    "fold_floor_s": fold_floors,
                    "rows": [{"run": label, "k": k, "wall_s": wall, "peak_rss_bytes": rss} for label, k, wall, rss in rows],
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
