"""Benchmark `ckptavg average` against its floors and its peers, all measured in the same run.

    python scripts/bench.py --models 8 --size-gb 1 --dir /tmp/ckptavg-bench [--repeat 3] [--scaling] \
        [--plot docs/bench.svg] [--json results.json] [--mergekit PATH | --no-mergekit]

Inputs are made here, deterministic (seeded), Llama-shaped, of the size asked for:
  bf16  N sharded safetensors folders (config.json + index), the main comparison
  fp32  the same in FP32 (accumulated in FP64 by ckptavg)
  pt    N PyTorch training checkpoints {"model": FP32 weights, "optimizer": Adam state, "step"}: the
        weights are a third of each file
Rows, each run --repeat times (median, min-max), with a warm page cache and a cold one (the inputs
evicted with posix_fadvise DONTNEED after a sync; no root needed, other files stay cached):
  read floor   `cat` of every input file to /dev/null (the bytes ckptavg reads, once)
  fold floor   ckptavg's cache-blocked FP32 fold of in-memory inputs, one thread per core (no I/O)
  durable write, startup   `dd conv=fsync` of the output's size and `import torch`: costs every durable,
               torch-based tool pays on top of the floors (the peers below do not fsync)
  ckptavg      `ckptavg average` end to end, output fsynced (wall time and peak RSS from /usr/bin/time -v),
               and with --no-fsync as the peers write
  naive        a load-everything script: every checkpoint in memory, FP32 sum, save_file
  fairseq      fairseq's average_checkpoints.py recipe (written here): a running sum in the weights' own
               dtype (only fp16 is widened), so bf16 sums are rounded at every step
  mergekit     `mergekit-yaml` linear merge (safetensors inputs only); installed from PyPI into
               DIR/mergekit-venv when missing, skipped with a note when that fails
Each tool's output is then checked against a float64 reference (the exact mean rounded once): max abs
error and the share of values not correctly rounded. --scaling adds ckptavg's time and peak RSS as the
number of inputs (2, 4, 8, 16) and the model size (0.5, 1, 2, 4 x --size-gb, 4 inputs) grow, drawn by --plot.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ckptavg.merge.engine import CACHE_BLOCK_ELEMENTS, fold_block  # noqa: E402  (after the project is put on the path)

# What both peer scripts share: loading one checkpoint whole (a sharded folder or a .pt's "model"), the
# argument list, and the output file.
PEER_LOAD = r"""
import json, sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
def load(path):
    if path.is_dir():
        state = {}
        for shard in sorted(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())):
            state.update(load_file(path / shard))
        return state
    return torch.load(path, map_location="cpu", weights_only=True)["model"]
inputs, out = [Path(p) for p in sys.argv[1:-1]], Path(sys.argv[-1])
"""
PEER_SAVE = r"""
out.mkdir()
save_file(merged, out / "model.safetensors", metadata={"format": "pt"})
"""

NAIVE = (
    PEER_LOAD
    + r"""
states = [load(p) for p in inputs]
merged = {}
for name in states[0]:
    acc = states[0][name].float()
    for s in states[1:]:
        acc += s[name].float()
    merged[name] = (acc / len(states)).to(states[0][name].dtype)
"""
    + PEER_SAVE
)

FAIRSEQ = (
    PEER_LOAD
    + r"""
params = None
for path in inputs:
    state = load(path)
    if params is None:
        params = {k: (p.float() if p.dtype == torch.float16 else p.clone()) for k, p in state.items()}
    else:
        for k, p in state.items():
            params[k] += p.float() if p.dtype == torch.float16 else p
    del state
merged = {k: (p.div_(len(inputs)) if p.is_floating_point() else p // len(inputs)) for k, p in params.items()}
"""
    + PEER_SAVE
)


# ---------------------------------------------------------------------------------------------- inputs


def llama_shape(size_gb: float, bytes_per_param: int) -> dict:
    hidden, inter, vocab = 2048, 5632, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((size_gb * 1e9 / bytes_per_param - 2 * vocab * hidden) / per_layer))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    }


def llama_tensors(config: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{name}.weight"] = (h, h)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def make_inputs(root: Path, kind: str, n: int, size_gb: float, first: int = 0) -> list[Path]:
    """n checkpoints of `kind` under root (kept between runs), seeded by their index."""
    dtype = torch.float32 if kind in ("fp32", "pt") else torch.bfloat16
    config = llama_shape(size_gb / 3 if kind == "pt" else size_gb, dtype.itemsize)
    config["torch_dtype"] = "float32" if dtype == torch.float32 else "bfloat16"
    shapes = llama_tensors(config)
    paths = []
    for k in range(first, first + n):
        step = (k + 1) * 1000
        path = root / (f"checkpoint-{step}.pt" if kind == "pt" else f"checkpoint-{step}")
        paths.append(path)
        if path.exists():
            continue
        g = torch.Generator().manual_seed(k)
        tensors = {name: torch.empty(shape, dtype=dtype).normal_(generator=g) for name, shape in shapes.items()}
        if kind == "pt":
            state = {
                "model": tensors,
                "optimizer": {
                    "state": {
                        i: {"step": torch.tensor(float(step)), "exp_avg": torch.randn_like(t), "exp_avg_sq": torch.rand_like(t)}
                        for i, t in enumerate(tensors.values())
                    },
                    "param_groups": [{"lr": 3e-4, "betas": (0.9, 0.95), "params": list(range(len(tensors)))}],
                },
                "step": step,
            }
            root.mkdir(parents=True, exist_ok=True)
            torch.save(state, str(path) + ".tmp")
            os.replace(str(path) + ".tmp", path)
        else:
            write_sharded(path, tensors, config)
        print(f"made {path}", file=sys.stderr)
    return paths


def write_sharded(folder: Path, tensors: dict[str, torch.Tensor], config: dict, shard_gb: float = 0.5) -> None:
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(config))
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        current[name] = t
        size += t.numel() * t.element_size()
        if size >= shard_gb * 1e9:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    weight_map = {}
    for j, shard in enumerate(shards, 1):
        file = f"model-{j:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, tmp / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tmp.rename(folder)


def input_files(paths: list[Path]) -> list[str]:
    return [str(f) for p in paths for f in (sorted(p.glob("*.safetensors")) if p.is_dir() else [p])]


def weight_bytes(paths: list[Path]) -> int:
    """Bytes of weights ckptavg reads: the safetensors files, or the model third of .pt checkpoints."""
    if paths[0].is_dir():
        return sum(Path(f).stat().st_size for f in input_files(paths))
    model = torch.load(paths[0], map_location="cpu", weights_only=True, mmap=True)["model"]
    return len(paths) * sum(t.numel() * t.element_size() for t in model.values())


# ---------------------------------------------------------------------------------------------- measuring


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS bytes of a command, from /usr/bin/time -v."""
    started = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{result.stderr[-2000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1)) * 1024
    return wall, rss


def evict(files: list[str]) -> None:
    """Drop the inputs from the page cache (their pages are clean once synced)."""
    os.sync()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(files: list[str]) -> None:
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)


def fold_floor(n: int, in_dtype: torch.dtype, total_bytes: int, threads: int) -> float:
    """Seconds to fold total_bytes of inputs into a FP32/FP64 accumulator, cache-blocked, one thread per core,
    at the rate measured on inputs already in memory."""
    acc_dtype = torch.float64 if in_dtype == torch.float32 else torch.float32
    count = (64 << 20) // in_dtype.itemsize
    inputs = [torch.empty(count, dtype=in_dtype).normal_() for _ in range(n)]
    out = torch.empty(count, dtype=in_dtype)
    block = CACHE_BLOCK_ELEMENTS

    def work(lo: int, hi: int) -> None:
        acc = torch.empty(block, dtype=acc_dtype)
        for start in range(lo, hi, block):
            stop = min(hi, start + block)
            fold_block([x[start:stop] for x in inputs], [1.0] * n, float(n), acc[: stop - start], out[start:stop])

    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    best = float("inf")
    step = -(-count // threads)
    for _ in range(3):
        started = time.perf_counter()
        workers = [threading.Thread(target=work, args=(lo, min(count, lo + step))) for lo in range(0, count, step)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - started)
    torch.set_num_threads(torch_threads)
    return total_bytes / (n * count * in_dtype.itemsize / best)


class Row:
    def __init__(self, label: str, cache: str) -> None:
        self.label, self.cache = label, cache
        self.walls: list[float] = []
        self.rss: list[int] = []
        self.error: dict | None = None
        self.note = ""

    @property
    def median(self) -> float:
        return statistics.median(self.walls)

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "cache": self.cache,
            "walls": self.walls,
            "peak_rss": self.rss,
            "error": self.error,
            "note": self.note,
        }


def measure(
    label: str, cache: str, cmd: list[str] | None, repeat: int, files: list[str], out: Path | None, keep: Path | None = None
) -> Row:
    """Run cmd `repeat` times with a warm or cold page cache; keep the last output at `keep` for the error check."""
    row = Row(label, cache)
    for i in range(repeat):
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)
        if cache == "cold":
            evict(files)
        else:
            warm(files)
        assert cmd is not None
        wall, rss = timed(cmd)
        row.walls.append(wall)
        row.rss.append(rss)
        print(f"  {label} ({cache}) run {i + 1}: {wall:.2f} s, {rss / 1e9:.2f} GB", file=sys.stderr)
    if out is not None:
        if keep is not None:
            shutil.rmtree(keep, ignore_errors=True)
            out.rename(keep)
        else:
            shutil.rmtree(out, ignore_errors=True)
    return row


def mergekit_path(args: argparse.Namespace) -> tuple[str | None, str]:
    if args.no_mergekit:
        return None, "skipped (--no-mergekit)"
    if args.mergekit:
        return args.mergekit, ""
    venv = args.dir / "mergekit-venv"
    exe = venv / "bin" / "mergekit-yaml"
    if exe.exists():
        return str(exe), ""
    constraints = args.dir / "mergekit-constraints.txt"
    constraints.write_text(f"torch=={torch.__version__.split('+')[0]}\n")
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
        subprocess.run(
            [
                str(venv / "bin" / "pip"),
                "install",
                "-q",
                "-c",
                str(constraints),
                f"torch=={torch.__version__.split('+')[0]}",
                "mergekit",
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=900,
        )
        return str(exe), ""
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        return (
            None,
            f"skipped: could not install mergekit from PyPI ({str(getattr(e, 'stderr', '') or e).strip().splitlines()[-1:]})",
        )


# ---------------------------------------------------------------------------------------------- checking


def open_tensors(path: Path):
    """name -> a function returning that tensor, for a safetensors folder/file or a .pt training checkpoint."""
    from safetensors import safe_open

    if path.suffix == ".pt":
        model = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["model"]
        return {name: (lambda t=t: t) for name, t in model.items()}
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    getters = {}
    for f in files:
        handle = safe_open(str(f), "pt")
        for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
            getters[name] = lambda h=handle, n=name: h.get_tensor(n)
    return getters


def check_errors(inputs: list[Path], outputs: dict[str, Path]) -> dict[str, dict]:
    """Max abs error and share of values not correctly rounded, per output, against the float64 mean."""
    sources = [open_tensors(p) for p in inputs]
    results = {label: open_tensors(p) for label, p in outputs.items()}
    stats = {label: {"max_abs_error": 0.0, "wrongly_rounded": 0, "values": 0} for label in outputs}
    for name in sources[0]:
        ref = sources[0][name]().double()
        for s in sources[1:]:
            ref += s[name]().double()
        ref /= len(sources)
        for label, getters in results.items():
            out = getters[name]()
            rounded = ref.to(out.dtype)
            stats[label]["max_abs_error"] = max(stats[label]["max_abs_error"], float((out.double() - ref).abs().max()))
            stats[label]["wrongly_rounded"] += int((out != rounded).sum())
            stats[label]["values"] += out.numel()
    for s in stats.values():
        s["wrongly_rounded_share"] = s["wrongly_rounded"] / max(1, s["values"])
    return stats


# ---------------------------------------------------------------------------------------------- report


def print_table(title: str, rows: list[Row], total: int, floors: dict[str, float]) -> None:
    print(f"\n{title}")
    print(
        f"{'':28s} {'cache':5s} {'median s':>9s} {'min-max s':>13s} {'GB/s':>6s} {'x floor':>8s} {'peak RSS':>9s} "
        f"{'max |err|':>10s} {'wrong %':>8s}"
    )
    for r in rows:
        rss = f"{max(r.rss) / 1e9:.2f} GB" if r.rss else "-"
        if not r.walls:
            print(f"{r.label:28s} {r.cache:5s} {r.note}")
            continue
        err = (
            f"{r.error['max_abs_error']:10.2e} {100 * r.error['wrongly_rounded_share']:7.2f}%"
            if r.error
            else f"{'-':>10s} {'-':>8s}"
        )
        print(
            f"{r.label:28s} {r.cache:5s} {r.median:9.2f} {min(r.walls):6.2f}-{max(r.walls):<6.2f} {total / r.median / 1e9:6.2f} "
            f"{r.median / floors[r.cache]:8.2f} {rss:>9s} {err}"
        )


def plot(path: Path, series: dict[str, list[tuple[float, float, float]]]) -> None:
    """An SVG with two panels (wall s and peak RSS GB against GB read), one line per series of (GB, s, RSS GB)."""
    width, height, pad = 880, 340, 56
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    panels = [("wall time (s)", 1), ("peak RSS (GB)", 2)]
    xmax = max(x for pts in series.values() for x, *_ in pts) * 1.05
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
    ]
    panel_w = width / 2
    for p, (title, col) in enumerate(panels):
        x0, y0, w, h = p * panel_w + pad, 30, panel_w - pad - 20, height - 30 - pad
        ymax = max(pt[col] for pts in series.values() for pt in pts) * 1.15 or 1
        parts.append(f'<text x="{x0 + w / 2}" y="18" text-anchor="middle" font-weight="bold">{title} vs GB of inputs read</text>')
        parts.append(
            f'<line x1="{x0}" y1="{y0 + h}" x2="{x0 + w}" y2="{y0 + h}" stroke="black"/>'
            f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y0 + h}" stroke="black"/>'
        )
        for i in range(6):
            xv, yv = xmax * i / 5, ymax * i / 5
            parts.append(f'<text x="{x0 + w * i / 5}" y="{y0 + h + 16}" text-anchor="middle">{xv:.0f}</text>')
            parts.append(f'<text x="{x0 - 6}" y="{y0 + h - h * i / 5 + 4}" text-anchor="end">{yv:.1f}</text>')
            parts.append(f'<line x1="{x0}" y1="{y0 + h - h * i / 5}" x2="{x0 + w}" y2="{y0 + h - h * i / 5}" stroke="#ddd"/>')
        parts.append(f'<text x="{x0 + w / 2}" y="{height - 12}" text-anchor="middle">GB read</text>')
        for k, (label, pts) in enumerate(series.items()):
            if not any(pt[col] for pt in pts):
                continue
            coords = " ".join(f"{x0 + w * pt[0] / xmax:.1f},{y0 + h - h * pt[col] / ymax:.1f}" for pt in sorted(pts))
            parts.append(f'<polyline points="{coords}" fill="none" stroke="{colors[k % 4]}" stroke-width="2"/>')
            for pt in pts:
                parts.append(
                    f'<circle cx="{x0 + w * pt[0] / xmax:.1f}" cy="{y0 + h - h * pt[col] / ymax:.1f}" r="3" '
                    f'fill="{colors[k % 4]}"/>'
                )
            if p == 0:
                parts.append(f'<text x="{x0 + 10}" y="{y0 + 14 + 16 * k}" fill="{colors[k % 4]}">{label}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


# ---------------------------------------------------------------------------------------------- main


def compare(args: argparse.Namespace, kind: str, mergekit: str | None, mergekit_note: str, results: dict) -> None:
    paths = make_inputs(args.dir / kind, kind, args.models, args.size_gb)
    files = input_files(paths)
    total = weight_bytes(paths)
    out, kept = args.dir / "out", args.dir / "outputs"
    kept.mkdir(exist_ok=True)
    rows: list[Row] = []
    for cache in args.caches:
        row = measure("read floor (cat)", cache, ["sh", "-c", 'cat "$@" > /dev/null', "cat", *files], args.repeat, files, None)
        rows.append(row)
    floor_row = Row("fold floor (in memory)", "-")
    in_dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    floor_row.walls = [fold_floor(args.models, in_dtype, total, os.cpu_count() or 1) for _ in range(args.repeat)]
    rows.append(floor_row)
    scratch = args.dir / "dd.tmp"
    dd = [
        "sh",
        "-c",
        f'dd if=/dev/zero of="{scratch}" bs=16M count={max(1, (total // args.models) >> 24)} conv=fsync 2>/dev/null; '
        f'rm "{scratch}"',
    ]
    rows.append(measure("durable write of the output", "-", dd, args.repeat, files, None))
    rows.append(measure("startup (import torch)", "-", [sys.executable, "-c", "import torch"], args.repeat, files, None))
    ckptavg_cmd = [args.ckptavg, "average", *map(str, paths), "-o", str(out), "--quiet"]
    outputs = {}
    for cache in args.caches:
        rows.append(measure("ckptavg average", cache, ckptavg_cmd, args.repeat, files, out, kept / f"ckptavg-{kind}"))
    outputs["ckptavg average"] = kept / f"ckptavg-{kind}"
    rows.append(measure("ckptavg average --no-fsync", "warm", [*ckptavg_cmd, "--no-fsync"], args.repeat, files, out))
    peers = [
        ("naive load-all (FP32 sum)", [sys.executable, "-c", NAIVE, *map(str, paths), str(out)]),
        ("fairseq-style running sum", [sys.executable, "-c", FAIRSEQ, *map(str, paths), str(out)]),
    ]
    if kind != "pt" and mergekit:
        config = args.dir / f"mergekit-{kind}.yml"
        models = "\n".join(f"  - model: {p}\n    parameters:\n      weight: 1.0" for p in paths)
        config.write_text(f"merge_method: linear\ndtype: {'bfloat16' if kind == 'bf16' else 'float32'}\nmodels:\n{models}\n")
        peers.append(("mergekit linear", [mergekit, str(config), str(out), "--lazy-unpickle", "--no-copy-tokenizer"]))
    for label, cmd in peers:
        try:
            rows.append(measure(label, "warm", cmd, args.peer_repeat, files, out, kept / f"{label.split()[0]}-{kind}"))
            outputs[label] = kept / f"{label.split()[0]}-{kind}"
        except RuntimeError as e:
            failed = Row(label, "warm")
            failed.note = f"failed: {str(e).splitlines()[-1][:100]}"
            rows.append(failed)
    if kind != "pt" and not mergekit:
        skipped = Row("mergekit linear", "warm")
        skipped.note = mergekit_note
        rows.append(skipped)
    if kind == "pt":
        skipped = Row("mergekit linear", "-")
        skipped.note = "not run: mergekit reads model folders, not training checkpoints"
        rows.append(skipped)
    print(f"  checking {len(outputs)} outputs against a float64 reference", file=sys.stderr)
    errors = check_errors(paths, outputs)
    for r in rows:
        if r.label in errors:
            r.error = errors[r.label]
    floors = {
        cache: max(r.median for r in rows if r.walls and r.cache in (cache, "-") and "floor" in r.label) for cache in args.caches
    }
    floors["-"] = floors.get("warm", min(floors.values()))
    title = (
        f"{kind}: {args.models} x {args.size_gb:g} GB checkpoints, {total / 1e9:.2f} GB of weights read "
        f"({sum(Path(f).stat().st_size for f in files) / 1e9:.2f} GB of files), {os.cpu_count()} cores, "
        f"median of {args.repeat} ({args.peer_repeat} for peers); x floor = over the larger of the fold floor "
        f"and the read floor with the same cache ({', '.join(f'{c} {v:.2f} s' for c, v in floors.items() if c != '-')})"
    )
    print_table(title, rows, total, floors)
    results[kind] = {"title": title, "weight_bytes": total, "floors": floors, "rows": [r.to_dict() for r in rows]}
    for p in outputs.values():
        shutil.rmtree(p, ignore_errors=True)
    if kind != "bf16" and not args.keep:
        shutil.rmtree(args.dir / kind)


def scaling(args: argparse.Namespace, results: dict) -> dict[str, list[tuple[float, float, float]]]:
    out = args.dir / "out"
    one = args.size_gb
    n_label, size_label = (
        f"N inputs of {one:g} GB (2, 4, 8, 16)",
        f"4 inputs of {', '.join(f'{one * k:g}' for k in (0.5, 1, 2, 4))} GB",
    )
    series: dict[str, list[tuple[float, float, float]]] = {n_label: [], size_label: [], "read floor (cat, warm)": []}
    table = []

    def point(label: str, paths: list[Path]) -> tuple[float, float, float, float]:
        files = input_files(paths)
        total = weight_bytes(paths)
        row = measure(
            f"ckptavg {label}",
            "warm",
            [args.ckptavg, "average", *map(str, paths), "-o", str(out), "--quiet"],
            args.repeat,
            files,
            out,
        )
        cat = measure("cat", "warm", ["sh", "-c", 'cat "$@" > /dev/null', "cat", *files], args.repeat, files, None)
        table.append((label, total, row.median, max(row.rss), cat.median))
        return total, row.median, max(row.rss) / 1e9, cat.median

    for n in (2, 4, 8, 16):
        paths = make_inputs(args.dir / "bf16", "bf16", n, one)
        total, wall, rss, cat = point(f"{n} x {one:g} GB", paths)
        series[n_label].append((total / 1e9, wall, rss))
        series["read floor (cat, warm)"].append((total / 1e9, cat, 0.0))
    for size in (one * 0.5, one, one * 2, one * 4):
        root = args.dir / "bf16" if size == one else args.dir / f"bf16-{size:g}gb"
        paths = make_inputs(root, "bf16", 4, size)
        total, wall, rss, cat = point(f"4 x {size:g} GB", paths)
        series[size_label].append((total / 1e9, wall, rss))
        if size != one and not args.keep:
            shutil.rmtree(root)
    print("\nscaling (bf16, warm cache, median): ckptavg wall and peak RSS as the bytes read grow")
    print(f"{'':14s} {'GB read':>8s} {'wall s':>7s} {'GB/s':>6s} {'cat s':>6s} {'peak RSS':>9s}")
    for label, total, wall, rss, cat in table:
        print(f"{label:14s} {total / 1e9:8.2f} {wall:7.2f} {total / wall / 1e9:6.2f} {cat:6.2f} {rss / 1e9:6.2f} GB")
    results["scaling"] = [dict(zip(("label", "bytes", "wall", "peak_rss", "cat"), t)) for t in table]
    return series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/ckptavg-bench"))
    parser.add_argument("--kinds", default="bf16,fp32,pt", help="input kinds to compare: bf16, fp32, pt")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each ckptavg and floor row")
    parser.add_argument("--peer-repeat", type=int, default=3, help="runs of each peer row")
    parser.add_argument("--caches", default="warm,cold", help="warm, cold or both")
    parser.add_argument("--mergekit", help="path to an existing mergekit-yaml")
    parser.add_argument("--no-mergekit", action="store_true")
    parser.add_argument("--ckptavg", default=str(Path(sys.executable).parent / "ckptavg"))
    parser.add_argument("--scaling", action="store_true", help="also measure as N and the model size grow")
    parser.add_argument("--plot", type=Path, help="write the scaling plot (SVG) here")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    parser.add_argument("--keep", action="store_true", help="keep the fp32, pt and scaling inputs")
    args = parser.parse_args()
    args.caches = args.caches.split(",")
    args.dir.mkdir(parents=True, exist_ok=True)

    startup, _ = timed([sys.executable, "-c", "import torch"])
    print(f"startup: `import torch` takes {startup:.2f} s here (ckptavg and every peer pay it)")
    mergekit, mergekit_note = mergekit_path(args)
    results: dict = {"startup_import_torch_s": startup, "mergekit": mergekit or mergekit_note}
    for kind in args.kinds.split(","):
        compare(args, kind, mergekit, mergekit_note, results)
    if args.scaling:
        series = scaling(args, results)
        if args.plot:
            plot(args.plot, series)
            print(f"plot: {args.plot}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
