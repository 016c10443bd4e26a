"""Real training runs, made by the real libraries, for select / inspect / export tests.

Each builder trains a tiny model for a few steps on CPU and returns the folder of checkpoints it saved.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


def hf_trainer_run(root: Path, count_tokens: bool = False) -> Path:
    """transformers.Trainer: checkpoint-2 ... checkpoint-10 with eval_loss in trainer_state.json (and with
    `count_tokens`, num_input_tokens_seen: 64 a step, 4 sequences of 16 tokens)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    data = [{"input_ids": torch.randint(0, 64, (16,)), "labels": None} for _ in range(48)]
    for item in data:
        item["labels"] = item["input_ids"]
    args = transformers.TrainingArguments(
        output_dir=str(root),
        max_steps=10,
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        logging_steps=2,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=5e-3,
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        include_num_input_tokens_seen=count_tokens,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:16])
    trainer.train()
    return root


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _regression(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return x, x.sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)


def lightning_fit(
    root: Path, callbacks: list | None = None, max_epochs: int = 4, compiled: bool = False, scheduler: bool = True
) -> Path:
    """lightning.Trainer with ModelCheckpoint(monitor='val_loss', save_top_k=-1) and `callbacks`: epoch=E-step=S.ckpt
    files of a LightningModule around _Tiny (torch.compile'd with `compiled`, names then model._orig_mod.*)."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    class Module(L.LightningModule):
        def __init__(self, lr: float = 0.05, width: int = 16) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.model = torch.compile(_Tiny(), backend="eager") if compiled else _Tiny()

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.mse_loss(self.model(x), y)

        def validation_step(self, batch, _):
            x, y = batch
            self.log("val_loss", nn.functional.mse_loss(self.model(x), y))

        def configure_optimizers(self):
            optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
            if not scheduler:
                return optimizer
            return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 2)}

    L.seed_everything(0, verbose=False)
    x, y = _regression()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=root, monitor="val_loss", save_top_k=-1, filename="{epoch}-{step}")
    trainer = L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        callbacks=[*(callbacks or []), checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    trainer.fit(Module(), loader, loader)
    return root


def lightning_run(root: Path) -> Path:
    """A plain Lightning run: 4 epochs, Adam with a StepLR scheduler."""
    return lightning_fit(root)


def plain_torch_run(root: Path) -> Path:
    """A hand-written loop: step_N.pt dicts with model_state_dict, optimizer_state_dict and metrics."""
    torch.manual_seed(0)
    model = _Tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = _regression()
    root.mkdir(parents=True, exist_ok=True)
    for step in range(1, 13):
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 3 == 0:
            model.eval()
            with torch.no_grad():
                val = nn.functional.mse_loss(model(x), y).item()
            model.train()
            torch.save(
                {
                    "step": step,
                    "epoch": 0,
                    "model_state_dict": model.state_dict(),
                    "optimizer_state_dict": optimizer.state_dict(),
                    "metrics": {"val_loss": val},
                    "rng_state": torch.get_rng_state(),
                },
                root / f"step_{step}.pt",
            )
    return root


def eval_losses(checkpoint_folder: Path) -> dict[int, float]:
    """Independent reading of eval_loss per step from the run's final trainer_state.json."""
    last = max(checkpoint_folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((last / "trainer_state.json").read_text())
    return {e["step"]: e["eval_loss"] for e in state["log_history"] if "eval_loss" in e}
