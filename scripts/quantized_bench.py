"""FP8 checkpoints: ckptavg's streaming dequantization (export) and average against their floors and against the
in-memory way DeepSeek's `fp8_cast_bf16.py` works, all measured in the same run.

    python scripts/quantized_bench.py [--models 2] [--size-gb 1] [--dir /tmp/ckptavg-fp8] [--repeat 3]

Inputs (made here, seeded): N folders in the DeepSeek-V3 layout, `F8_E4M3` weights with F32 `weight_scale_inv`
over 128x128 blocks, BF16 norms, config.json with quantization_config. Rows, warm page cache:
  read floor      `cat` of the input files (the bytes read once)
  write floor     `dd conv=fsync` of the output's size (the bf16 output written once)
  ckptavg export  one checkpoint dequantized to bf16, streamed (`ckptavg export IN -o OUT`)
  in-memory cast  the fp8_cast_bf16.py recipe: every tensor loaded, `weight.float() * scale` expanded per block,
                  saved as bf16 (no fsync)
  ckptavg average N checkpoints averaged as their values (`ckptavg average ... -o OUT`)
  in-memory mean  the same recipe over N checkpoints, summed in FP32, saved as bf16
Each output is compared with the float64 mean of the dequantized inputs rounded once to bf16.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import measure, print_table, timed, warm  # noqa: E402  (scripts/ is on the path)

BLOCK = 128
HIDDEN = 4096


def make_inputs(root: Path, models: int, size_gb: float) -> list[Path]:
    """N FP8 checkpoints of one run: shared weights plus noise, 4096 x 11008 matrices like an MLP's (whole 128 x 128 blocks)."""
    matrices = max(1, int(size_gb * 1e9 / (HIDDEN * 11008)))
    folders = []
    for m in range(models):
        folder = root / f"checkpoint-{(m + 1) * 100}"
        if not (folder / "model.safetensors").exists():
            folder.mkdir(parents=True, exist_ok=True)
            start, noise = torch.Generator().manual_seed(0), torch.Generator().manual_seed(m + 1)
            state = {}
            for i in range(matrices):
                w = torch.randn(HIDDEN, 11008, generator=start) + 0.05 * torch.randn(HIDDEN, 11008, generator=noise)
                scale = w.reshape(HIDDEN // BLOCK, BLOCK, 11008 // BLOCK, BLOCK).abs().amax(dim=(1, 3)) / 448
                expand = scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
                state[f"layers.{i}.mlp.weight"] = (w / expand).to(torch.float8_e4m3fn)
                state[f"layers.{i}.mlp.weight_scale_inv"] = scale
                state[f"layers.{i}.norm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
            save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
            config = {
                "model_type": "deepseek_v3",
                "quantization_config": {"quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK]},
            }
            (folder / "config.json").write_text(json.dumps(config))
        folders.append(folder)
    return folders


IN_MEMORY = textwrap.dedent(
    """
    import sys, torch
    from safetensors.torch import load_file, save_file
    out, paths = sys.argv[1], sys.argv[2:]
    total = None
    for path in paths:
        state = load_file(path + "/model.safetensors")
        plain = {}
        for name, value in state.items():
            if name.endswith("_scale_inv"):
                continue
            if value.dtype == torch.float8_e4m3fn:
                scale = state[name + "_scale_inv"].repeat_interleave(128, 0).repeat_interleave(128, 1)
                value = value.float() * scale[: value.shape[0], : value.shape[1]]
            plain[name] = value.float()
        total = plain if total is None else {k: total[k] + v for k, v in plain.items()}
    save_file({k: (v / len(paths)).bfloat16().contiguous() for k, v in total.items()}, out)
    """
)


def dequantized(path: Path) -> dict[str, torch.Tensor]:
    state = load_file(path / "model.safetensors")
    out = {}
    for name, value in state.items():
        if name.endswith("_scale_inv"):
            continue
        if value.dtype == torch.float8_e4m3fn:
            scale = state[name + "_scale_inv"].double().repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
            value = value.double() * scale
        out[name] = value.double()
    return out


def errors(inputs: list[Path], output: Path) -> dict:
    """Max |error| and the share of values that are not the float64 mean rounded once, over the weights."""
    got = load_file(output / "model.safetensors" if output.is_dir() else output)
    worst, wrong, total = 0.0, 0, 0
    states = [dequantized(p) for p in inputs]
    for name in got:
        exact = (sum(s[name] for s in states) / len(states)).to(torch.bfloat16)
        diff = (got[name].double() - exact.double()).abs()
        worst = max(worst, float(diff.max()))
        wrong += int((got[name].view(torch.int16) != exact.view(torch.int16)).sum())
        total += exact.numel()
    return {"max_abs_error": worst, "wrongly_rounded_share": wrong / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=2)
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/ckptavg-fp8"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    inputs = make_inputs(args.dir, args.models, args.size_gb)
    files = [str(p / "model.safetensors") for p in inputs]
    ckptavg = [sys.executable, "-m", "ckptavg"]
    script = args.dir / "in_memory.py"
    script.write_text(IN_MEMORY)
    tables = {
        f"export: one FP8 checkpoint ({Path(files[0]).stat().st_size / 1e9:.2f} GB) dequantized to bf16": (inputs[:1], "export"),
        f"average: {len(inputs)} FP8 checkpoints averaged as their values, bf16 out": (inputs, "average"),
    }
    for title, (chosen, command) in tables.items():
        chosen_files = [str(p / "model.safetensors") for p in chosen]
        read = sum(Path(f).stat().st_size for f in chosen_files)
        out_bytes = sum(2 * t.numel() for t in load_file(chosen_files[0]).values() if t.dtype != torch.float32 or t.dim() != 2)
        warm(chosen_files)
        floor_read = min(timed(["sh", "-c", 'cat "$@" > /dev/null', "cat", *chosen_files])[0] for _ in range(args.repeat))
        target = args.dir / "floor.bin"
        floor_write = min(
            timed(["dd", "if=/dev/zero", f"of={target}", "bs=16M", f"count={max(1, out_bytes >> 24)}", "conv=fsync"])[0]
            for _ in range(args.repeat)
        )
        target.unlink()
        ours_cmd = [*ckptavg, command, *map(str, chosen), "-o", str(args.dir / "out"), "--quiet"]
        ours = measure(
            f"ckptavg {command}", "warm", ours_cmd, args.repeat, chosen_files, args.dir / "out", keep=args.dir / f"ours-{command}"
        )
        peer = measure(
            "in-memory (fp8_cast_bf16)",
            "warm",
            [sys.executable, str(script), str(args.dir / "peer.safetensors"), *map(str, chosen)],
            args.repeat,
            chosen_files,
            None,
        )
        ours.error = errors(chosen, args.dir / f"ours-{command}")
        peer.error = errors(chosen, args.dir / "peer.safetensors")
        floors = {"warm": max(floor_read, floor_write)}
        print_table(
            f"{title}; read floor {floor_read:.2f} s, durable write floor {floor_write:.2f} s", [ours, peer], read, floors
        )


if __name__ == "__main__":
    main()
