"""Peak memory of `ckptavg average --adapter-mode merged` on a base model of about 1 GB (the target: < 400 MB).

    python scripts/adapter_memory.py [--dir /tmp/ckptavg-adapters] [--adapters 3]

Builds (once) a Llama-shaped base of ~1.07 GB in fp32 with transformers and N LoRA adapters (r=16 on
q/k/v/o and the MLP projections, random factors) with peft, then runs the CLI under /usr/bin/time -v for the
merged and the exact mode, and prints wall time and peak RSS of each, with `import torch` alone for reference.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build(root: Path, adapters: int) -> tuple[Path, list[Path]]:
    import peft
    import torch
    import transformers

    base = root / "base"
    if not (base / "config.json").exists():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=32000,
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=16,
            num_attention_heads=16,
            num_key_value_heads=16,
            tie_word_embeddings=False,
        )
        transformers.LlamaForCausalLM(config).save_pretrained(base, max_shard_size="5GB")
    runs = []
    for i in range(adapters):
        folder = root / "run" / f"checkpoint-{(i + 1) * 100}"
        if not (folder / "adapter_config.json").exists():
            model = transformers.LlamaForCausalLM.from_pretrained(base)
            targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets))
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if p.requires_grad:
                        p.copy_(0.02 * torch.randn(p.shape, generator=g))
            model.save_pretrained(folder)
        runs.append(folder)
    return base, runs


def measure(command: list[str]) -> tuple[float, int]:
    started = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(result.stderr[-2000:])
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1)) * 1024
    return seconds, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/ckptavg-adapters")
    parser.add_argument("--adapters", type=int, default=3)
    args = parser.parse_args()
    root = Path(args.dir)
    base, runs = build(root, args.adapters)
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    cli = [sys.executable, "-m", "ckptavg"]
    rows = [("import torch alone", measure([sys.executable, "-c", "import torch"]))]
    for mode in ("merged", "exact"):
        out = root / f"out-{mode}"
        extra = ["--base", str(base)] if mode == "merged" else []
        rows.append(
            (
                f"average --adapter-mode {mode}",
                measure([*cli, "average", *map(str, runs), "-o", str(out), "--overwrite", "-q", "--adapter-mode", mode, *extra]),
            )
        )
    print(f"base model {size / 1e9:.2f} GB fp32, {args.adapters} LoRA adapters (r=16, 7 targets x 16 layers)")
    for label, (seconds, rss) in rows:
        print(f"{label:36s} {seconds:6.2f} s   peak RSS {rss / 1e6:7.1f} MB")


if __name__ == "__main__":
    main()
