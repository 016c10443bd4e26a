"""Train a tiny character-level language model for a few seconds and save checkpoints as a real run would.

    python scripts/make_examples.py train examples/run     # checkpoint-N/ folders, Trainer-style
    python scripts/make_examples.py eval examples/merged   # validation loss of a model folder or file

The corpus is ckptavg's own source code, so the example needs no download. Each checkpoint-N/ holds
model.safetensors, config.json, trainer_state.json (with eval_loss in log_history) and the optimizer and
RNG state a Trainer saves beside them, so the averaged output can be checked to leave those out.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
CONTEXT = 16


def corpus() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    text = "\n".join(p.read_text() for p in sorted((ROOT / "ckptavg").rglob("*.py")))
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(c) for c in text])
    split = int(len(ids) * 0.9)
    return ids[:split], ids[split:], vocab


class CharModel(nn.Module):
    def __init__(self, vocab: int, dim: int = 48, hidden: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mlp = nn.Sequential(nn.Linear(CONTEXT * dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())
        self.norm = nn.BatchNorm1d(hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.mlp(self.embed(x).flatten(1))))


def batches(ids: torch.Tensor, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, len(ids) - CONTEXT - 1, (size,), generator=generator)
    x = torch.stack([ids[s : s + CONTEXT] for s in starts])
    return x, ids[starts + CONTEXT]


@torch.no_grad()
def evaluate(model: nn.Module, ids: torch.Tensor) -> float:
    model.eval()
    x, y = batches(ids, 4096, torch.Generator().manual_seed(1234))
    loss = nn.functional.cross_entropy(model(x), y).item()
    model.train()
    return loss


def train(out: Path, steps: int = 800, save_every: int = 100, seconds: float = 30.0) -> None:
    torch.set_num_threads(1)  # a model this small trains faster on one thread
    torch.manual_seed(0)
    train_ids, val_ids, vocab = corpus()
    model = CharModel(len(vocab))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    history: list[dict] = []
    started = time.perf_counter()
    for step in range(1, steps + 1):
        x, y = batches(train_ids, 128, generator)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 20 == 0:
            history.append({"step": step, "loss": round(loss.item(), 4)})
        out_of_time = time.perf_counter() - started > seconds
        if step % save_every == 0 or out_of_time:
            eval_loss = evaluate(model, val_ids)
            history.append({"step": step, "eval_loss": round(eval_loss, 4)})
            folder = out / f"checkpoint-{step}"
            folder.mkdir(exist_ok=True)
            save_file(
                {k: v.detach().contiguous() for k, v in model.state_dict().items()},
                folder / "model.safetensors",
                metadata={"format": "pt"},
            )
            (folder / "config.json").write_text(
                json.dumps({"model_type": "ckptavg-demo-char-mlp", "vocab": vocab, "context": CONTEXT, "torch_dtype": "float32"})
            )
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": history}, indent=1))
            torch.save(optimizer.state_dict(), folder / "optimizer.pt")
            torch.save({"cpu_rng_state": torch.get_rng_state()}, folder / "rng_state.pth")
            print(f"step {step:5d}  train loss {loss.item():.3f}  eval loss {eval_loss:.4f}  saved {folder}", file=sys.stderr)
        if out_of_time:
            break


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.is_file():
        return load_file(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        weights: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            weights.update(load_file(path / shard))
        return weights
    return load_file(path / "model.safetensors")


def eval_path(path: Path) -> float:
    _, val_ids, vocab = corpus()
    model = CharModel(len(vocab))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_weights(path).items()})
    return evaluate(model, val_ids)


if __name__ == "__main__":
    command, *paths = sys.argv[1:]
    if command == "train":
        train(Path(paths[0]))
    elif command == "eval":
        for p in paths:
            print(f"eval loss {eval_path(Path(p)):.4f}  {p}")
    else:
        raise SystemExit(f"unknown command {command}; use train or eval")
