"""Benchmark `ckptavg average` against its floor and its peers, all measured in the same run.

    python scripts/bench.py --models 8 --size-gb 1 --dir /tmp/ckptavg-bench [--mergekit PATH/TO/mergekit-yaml]

It writes N synthetic bf16 checkpoints of a Llama-shaped model (sharded safetensors + config.json), warms the
page cache, then measures:
  read floor   `cat` of every input file to /dev/null (the bytes read once)
  fold floor   folding N in-memory bf16 chunks into an FP32 accumulator with ckptavg's own cache-blocked fold
  write        `dd conv=fsync` of as many bytes as the output has (what a durable output costs on this disk)
  startup      `python -c "import torch"` (every torch-based tool pays it once)
  ckptavg      `ckptavg average` end to end (wall time and peak RSS from /usr/bin/time -v)
  naive        a load-everything-then-average script (safetensors load_file, FP32 sum, save_file)
  mergekit     `mergekit-yaml` linear merge of the same inputs, when --mergekit is given
and prints each one's wall time, input GB/s, ratio to the floor (the larger of the two floors) and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ckptavg.merge.engine import CACHE_BLOCK_BYTES, fold  # noqa: E402

NAIVE = r"""
import json, sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
inputs, out = [Path(p) for p in sys.argv[1:-1]], Path(sys.argv[-1])
states = []
for folder in inputs:
    state = {}
    for shard in sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())):
        state.update(load_file(folder / shard))
    states.append(state)
merged = {}
for name in states[0]:
    acc = states[0][name].float()
    for s in states[1:]:
        acc += s[name].float()
    merged[name] = (acc / len(states)).to(states[0][name].dtype)
out.mkdir()
save_file(merged, out / "model.safetensors", metadata={"format": "pt"})
"""


def llama_shape(size_gb: float) -> dict:
    hidden, inter, vocab = 2048, 5632, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((size_gb * 1e9 / 2 - 2 * vocab * hidden) / per_layer))
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": vocab,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
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


def make_checkpoints(root: Path, n: int, size_gb: float, shard_gb: float = 0.5) -> list[Path]:
    from safetensors.torch import save_file

    config = llama_shape(size_gb)
    shapes = llama_tensors(config)
    folders = []
    for k in range(n):
        folder = root / f"checkpoint-{(k + 1) * 1000}"
        folders.append(folder)
        if (folder / "model.safetensors.index.json").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config))
        g = torch.Generator().manual_seed(k)
        shards, current, size = [], {}, 0
        for name, shape in shapes.items():
            current[name] = torch.empty(shape, dtype=torch.bfloat16).normal_(generator=g)
            size += current[name].numel() * 2
            if size >= shard_gb * 1e9:
                shards.append(current)
                current, size = {}, 0
        if current:
            shards.append(current)
        weight_map = {}
        for j, shard in enumerate(shards, 1):
            file = f"model-{j:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, folder / file, metadata={"format": "pt"})
            weight_map.update({name: file for name in shard})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        print(f"made {folder}", file=sys.stderr)
    return folders


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS bytes of a command, from /usr/bin/time -v."""
    started = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed:\n{result.stderr[-2000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1)) * 1024
    return wall, rss


def input_files(folders: list[Path]) -> list[str]:
    return [str(p) for folder in folders for p in sorted(folder.glob("*.safetensors"))]


def fold_floor(n: int, total_bytes: int) -> float:
    """Seconds to fold total_bytes of bf16 inputs into an FP32 accumulator at the rate measured in memory."""
    count = 32 * 1024 * 1024  # elements per input chunk (64 MB of bf16)
    inputs = [torch.empty(count, dtype=torch.bfloat16).normal_() for _ in range(n)]
    acc = torch.empty(CACHE_BLOCK_BYTES // 4)
    out = torch.empty(count, dtype=torch.bfloat16)
    fold(inputs, [1.0] * n, float(n), acc, out)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        fold(inputs, [1.0] * n, float(n), acc, out)
        best = min(best, time.perf_counter() - started)
    return total_bytes / (n * count * 2 / best)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/ckptavg-bench"))
    parser.add_argument("--mergekit", help="path to mergekit-yaml, to compare with its linear merge")
    parser.add_argument("--ckptavg", default=str(Path(sys.executable).parent / "ckptavg"))
    parser.add_argument("--skip-naive", action="store_true")
    args = parser.parse_args()

    folders = make_checkpoints(args.dir / "inputs", args.models, args.size_gb)
    files = input_files(folders)
    total = sum(Path(f).stat().st_size for f in files)
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    read_s, _ = timed(["sh", "-c", 'cat "$@" > /dev/null', "cat", *files])
    fold_s = fold_floor(args.models, total)
    floor = max(read_s, fold_s)
    output_bytes = total // args.models
    scratch = args.dir / "dd.tmp"
    write_s, _ = timed(["dd", "if=/dev/zero", f"of={scratch}", "bs=16M", f"count={max(1, output_bytes >> 24)}", "conv=fsync"])
    scratch.unlink()
    startup_s, _ = timed([sys.executable, "-c", "import torch"])
    rows = [
        ("read floor (cat)", read_s, None),
        ("fold floor (FP32, in memory)", fold_s, None),
        ("output write (dd conv=fsync)", write_s, None),
        ("startup (import torch)", startup_s, None),
    ]

    def run(label: str, cmd: list[str], out: Path) -> None:
        subprocess.run(["rm", "-rf", str(out)], check=True)
        wall, rss = timed(cmd)
        rows.append((label, wall, rss))
        subprocess.run(["rm", "-rf", str(out)], check=True)

    out = args.dir / "out"
    run("ckptavg average", [args.ckptavg, "average", *map(str, folders), "-o", str(out), "--quiet"], out)
    if not args.skip_naive:
        run("naive load-all script", [sys.executable, "-c", NAIVE, *map(str, folders), str(out)], out)
    if args.mergekit:
        config = args.dir / "mergekit.yml"
        models = "\n".join(f"  - model: {f}\n    parameters:\n      weight: 1.0" for f in folders)
        config.write_text(f"merge_method: linear\ndtype: bfloat16\nmodels:\n{models}\n")
        run("mergekit linear", [args.mergekit, str(config), str(out), "--lazy-unpickle", "--no-copy-tokenizer"], out)

    print(f"\n{args.models} x {args.size_gb:g} GB bf16 checkpoints, {total / 1e9:.2f} GB in {len(files)} files, warm page cache, {torch.get_num_threads()} threads")
    print(f"{'':30s} {'wall s':>8s} {'GB/s':>7s} {'x floor':>8s} {'peak RSS':>10s}")
    for label, seconds, rss in rows:
        rss_text = f"{rss / 1e9:.2f} GB" if rss else "-"
        print(f"{label:30s} {seconds:8.2f} {total / seconds / 1e9:7.2f} {seconds / floor:8.2f} {rss_text:>10s}")


if __name__ == "__main__":
    main()
