"""out_format="same" (`--format same`) and training_state for PyTorch pickles: the merge written back in the newest
input's layout (fairseq, Lightning, timm, plain dicts), loaded and resumed by the frameworks themselves.

Every expected value is computed here: the float64 mean of the inputs read with torch.load, rounded once.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import assert_equal_nested, make_state, save_layout
from torch import nn

import ckptavg
from ckptavg.errors import UsageError


def mean_of(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The float64 mean of floating tensors rounded once to their dtype; other tensors from the newest."""
    out = {}
    for name, newest in states[-1].items():
        if newest.is_floating_point():
            out[name] = (sum(s[name].double() for s in states) / len(states)).to(newest.dtype)
        else:
            out[name] = newest
    return out


def assert_same_tensors(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name


def load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


# ------------------------------------------------------------------------------------------------------- fairseq


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.proj = nn.Linear(6, 6)
        self.norm = nn.BatchNorm1d(6)


def fairseq_run(root: Path, cfg: object = None) -> list[Path]:
    """Three checkpoints laid out as fairseq's trainer saves them: model, args/cfg, optimizer_history, extra_state
    (with a numpy RNG state), last_optimizer_state (a real Adam's), saved with pickle protocol 2 as torch.save does."""
    import numpy as np

    torch.manual_seed(0)
    root.mkdir(parents=True, exist_ok=True)
    model = _Tiny()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    paths = []
    for epoch in (1, 2, 3):
        tokens = torch.randint(0, 11, (8,))
        model.norm(model.proj(model.embed(tokens))).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        state = {
            "args": argparse.Namespace(arch="tiny", lr=[0.01], max_tokens=4096, seed=1),
            "cfg": cfg,
            "model": model.state_dict(),
            "criterion": {},
            "optimizer_history": [
                {"criterion_name": "CrossEntropyCriterion", "optimizer_name": "Adam", "lr_scheduler_state": {"best": 2.5}}
            ],
            "task_state": {},
            "extra_state": {
                "epoch": epoch,
                "train_iterator": {"epoch": epoch, "iterations_in_epoch": 0, "shuffle": True},
                "previous_training_time": 1.5 * epoch,
                "rng": np.random.RandomState(epoch).get_state(),
            },
            "last_optimizer_state": optimizer.state_dict(),
        }
        paths.append(root / f"checkpoint{epoch}.pt")
        torch.save(state, paths[-1])
    return paths


def test_fairseq_args_kept_and_model_is_the_mean(tmp_path):
    paths = fairseq_run(tmp_path / "run")
    out = tmp_path / "averaged.pt"
    report = ckptavg.average(paths, out, out_format="same", verify=True)
    assert report.verified
    inputs = [load(p) for p in paths]
    got = load(out)
    assert_same_tensors(got["model"], mean_of([s["model"] for s in inputs]))
    newest = inputs[-1]
    assert type(got["args"]) is argparse.Namespace and vars(got["args"]) == vars(newest["args"])
    for key in ("optimizer_history", "extra_state", "criterion", "task_state"):
        assert_equal_nested(got[key], newest[key], key)
    assert "last_optimizer_state" not in got  # training_state="drop"
    assert got["ckptavg"]["inputs"][-1]["path"] == str(paths[-1]) and got["ckptavg"]["training_state"] == "drop"
    assert list(got) == [k for k in newest if k != "last_optimizer_state"] + ["ckptavg"]
    mapped = torch.load(out, weights_only=False, mmap=True)
    assert_same_tensors(mapped["model"], got["model"])


def test_room_for_the_newest_training_state_is_checked_before_writing(tmp_path, monkeypatch):
    """With training_state="newest" the output holds the newest input's optimizer state too: the room checked is at
    least the newest input's size, not the merged weights' alone."""
    import shutil
    from collections import namedtuple

    from ckptavg.errors import OutputError
    from ckptavg.output import SPACE_MARGIN

    paths = fairseq_run(tmp_path / "run")
    free = SPACE_MARGIN + paths[-1].stat().st_size - 1
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - free, free))
    with pytest.raises(OutputError, match="not enough free space"):
        ckptavg.average(paths, tmp_path / "kept.pt", out_format="same", training_state="newest")
    assert not (tmp_path / "kept.pt").exists()
    with pytest.raises(OutputError, match="not enough free space"):
        ckptavg.sweep(paths, tmp_path / "sweep", recipes=["mean"], out_format="same", training_state="newest")
    ckptavg.average(paths, tmp_path / "dropped.pt", out_format="same")  # the merged weights alone fit
    assert (tmp_path / "dropped.pt").exists()


def test_fairseq_cfg_is_a_dictconfig_again(tmp_path):
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create(
        {"model": {"_name": "tiny", "dropout": 0.1}, "optimization": {"lr": [0.01], "max_update": 100}, "task": {"data": "x"}}
    )
    paths = fairseq_run(tmp_path / "run", cfg=cfg)
    out = tmp_path / "averaged.pt"
    ckptavg.average(paths, out, out_format="same", training_state="newest")
    got, newest = load(out), load(paths[-1])
    assert isinstance(got["cfg"], omegaconf.DictConfig)
    assert omegaconf.OmegaConf.to_container(got["cfg"]) == omegaconf.OmegaConf.to_container(cfg)
    assert got["cfg"].model.dropout == 0.1 and got["cfg"].optimization.lr == [0.01]
    assert_same_tensors(got["model"], mean_of([load(p)["model"] for p in paths]))
    assert_equal_nested(got["last_optimizer_state"], newest["last_optimizer_state"], "last_optimizer_state")


# ------------------------------------------------------------------------------------------------------ Lightning


def _lightning_module():
    """The LightningModule of tests/runs.py's lightning_fit, importable here (that one is local to its function)."""
    import lightning as L
    from runs import _Tiny as RunTiny

    class Module(L.LightningModule):
        def __init__(self, lr: float = 0.05, width: int = 16) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.model = RunTiny()

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.mse_loss(self.model(x), y)

        def validation_step(self, batch, _):
            x, y = batch
            self.log("val_loss", nn.functional.mse_loss(self.model(x), y))

        def configure_optimizers(self):
            optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
            return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 2)}

    return Module


def _epochs(folder: Path) -> list[Path]:
    return sorted(folder.glob("epoch=*.ckpt"), key=lambda p: int(p.name.split("=")[1].split("-")[0]))


def test_lightning_load_from_checkpoint_and_drop(lightning_ckpts, tmp_path):
    paths = _epochs(lightning_ckpts)[-3:]
    out = tmp_path / "merged.ckpt"
    ckptavg.average(paths, out, out_format="same")
    inputs = [load(p) for p in paths]
    merged = mean_of([s["state_dict"] for s in inputs])
    got = load(out)
    assert_same_tensors(got["state_dict"], merged)
    for key in ("optimizer_states", "lr_schedulers"):
        assert key in inputs[-1] and key not in got
    for key in ("hyper_parameters", "epoch", "global_step", "pytorch-lightning_version", "loops", "callbacks"):
        assert_equal_nested(got[key], inputs[-1][key], key)
    model = _lightning_module().load_from_checkpoint(out)
    assert model.hparams.lr == inputs[-1]["hyper_parameters"]["lr"]
    assert_same_tensors(model.state_dict(), merged)


def test_lightning_resumes_from_newest(lightning_ckpts, tmp_path):
    import lightning as L
    from runs import _regression
    from torch.utils.data import DataLoader, TensorDataset

    paths = _epochs(lightning_ckpts)[-3:]
    out = tmp_path / "merged.ckpt"
    ckptavg.average(paths, out, out_format="same", training_state="newest")
    newest, got = load(paths[-1]), load(out)
    assert_equal_nested(got["optimizer_states"], newest["optimizer_states"], "optimizer_states")
    assert_equal_nested(got["lr_schedulers"], newest["lr_schedulers"], "lr_schedulers")
    merged = mean_of([load(p)["state_dict"] for p in paths])

    seen = {}

    class Look(L.Callback):
        def on_train_start(self, trainer, pl_module):  # after the checkpoint is restored, before a step
            seen["weights"] = {k: v.clone() for k, v in pl_module.state_dict().items()}
            seen["optimizer"] = copy.deepcopy(trainer.optimizers[0].state_dict())

    x, y = _regression()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    trainer = L.Trainer(
        max_epochs=newest["epoch"] + 2,
        accelerator="cpu",
        callbacks=[Look()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(_lightning_module()(), loader, loader, ckpt_path=out)
    assert_same_tensors(seen["weights"], merged)
    assert_equal_nested(seen["optimizer"]["state"], newest["optimizer_states"][0]["state"], "optimizer state")
    assert trainer.current_epoch == newest["epoch"] + 2 and trainer.global_step > newest["global_step"]


def test_lightning_compiled_names_kept_and_verified(lightning_compiled_ckpts, tmp_path):
    """The inputs' own names in the output (model._orig_mod.*), whatever prefixes the reader removed; --verify reads
    them back where the inputs had them."""
    paths = _epochs(lightning_compiled_ckpts)[-2:]
    out = tmp_path / "merged.ckpt"
    report = ckptavg.average(paths, out, out_format="same", strip_prefixes=["model."], verify=True)
    assert report.verified
    got = load(out)
    assert all(name.startswith("model._orig_mod.") for name in got["state_dict"])
    assert_same_tensors(got["state_dict"], mean_of([load(p)["state_dict"] for p in paths]))


# ----------------------------------------------------------------------------------------------------------- timm


def test_timm_pth_tar(timm_ckpts, tmp_path):
    paths = [timm_ckpts / f"checkpoint-{i}.pth.tar" for i in (1, 2, 3)]
    out = tmp_path / "averaged.pth.tar"
    ckptavg.average(paths, out, out_format="same")
    inputs, got = [load(p) for p in paths], load(out)
    assert_same_tensors(got["state_dict"], mean_of([s["state_dict"] for s in inputs]))
    assert "optimizer" in inputs[-1] and "optimizer" not in got
    assert type(got["args"]) is argparse.Namespace and vars(got["args"]) == vars(inputs[-1]["args"])
    for key in (k for k in inputs[-1] if k not in ("state_dict", "optimizer")):  # the EMA weights too: the newest's
        assert_equal_nested(got[key], inputs[-1][key], key)


# ------------------------------------------------------------------------------- foreign classes, export, refusals


def test_foreign_classes_written_back_without_importing_them(tmp_path, monkeypatch):
    """A class of a module that is gone when ckptavg runs: written back under its name, never imported; the
    output loads once the module is there again. Tuples stay tuples, tied tensors stay tied, views keep their
    storage."""
    module = types.ModuleType("gone_module")

    class Settings:
        def __init__(self, depth: int) -> None:
            self.depth = depth

    Settings.__module__, Settings.__qualname__ = "gone_module", "Settings"
    module.Settings = Settings
    monkeypatch.setitem(sys.modules, "gone_module", module)
    paths = []
    for seed in (1, 2):
        state = make_state(seed, tied=True)
        buffer = torch.arange(12.0)
        extra = {"settings": Settings(seed), "pair": (1, (2, "x")), "view": buffer[2:6], "whole": buffer}
        paths.append(tmp_path / f"c{seed}.pt")
        torch.save({"model_state_dict": state, "extra": extra, "step": seed * 10}, paths[-1])
    monkeypatch.delitem(sys.modules, "gone_module")
    out = tmp_path / "m.pt"
    ckptavg.average(paths, out, out_format="same", verify=True)
    assert "gone_module" not in sys.modules
    monkeypatch.setitem(sys.modules, "gone_module", module)
    got = load(out)
    states = [torch.load(p, weights_only=False)["model_state_dict"] for p in paths]
    assert_same_tensors(got["model_state_dict"], mean_of(states))
    assert got["model_state_dict"]["head.weight"].data_ptr() == got["model_state_dict"]["embed.weight"].data_ptr()
    extra = got["extra"]
    assert type(extra["settings"]) is Settings and extra["settings"].depth == 2
    assert extra["pair"] == (1, (2, "x"))
    assert torch.equal(extra["view"], torch.arange(2.0, 6.0))
    assert extra["view"].untyped_storage().data_ptr() == extra["whole"].untyped_storage().data_ptr()
    assert got["step"] == 20


def test_export_same_layout(tmp_path):
    path = save_layout(make_state(3), tmp_path / "in", "pt", step=7)
    out = tmp_path / "exported.pt"
    ckptavg.export(path, out, out_format="same")
    got, original = load(out), load(path)
    assert_same_tensors(got["model_state_dict"], original["model_state_dict"])
    assert got["step"] == 7 and "optimizer_state_dict" not in got
    ckptavg.export(path, tmp_path / "bf16.pt", out_format="same", dtype="bf16", training_state="newest")
    got = torch.load(tmp_path / "bf16.pt", weights_only=True)  # plain types only: torch's safe loader reads it
    want = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in original["model_state_dict"].items()}
    assert_same_tensors(got["model_state_dict"], want)
    assert_equal_nested(got["optimizer_state_dict"], original["optimizer_state_dict"])


def test_refusals(tmp_path, cli):
    plain = [save_layout(make_state(s), tmp_path / f"p{s}", "pt", step=s) for s in (1, 2)]
    legacy = save_layout(make_state(3), tmp_path / "legacy", "pt-legacy", step=3)  # weights under 'model'
    safetensors = save_layout(make_state(4), tmp_path / "st", "safetensors")
    folder = save_layout(make_state(5), tmp_path / "hf", "hf-trainer", step=5)
    out = tmp_path / "out.pt"
    with pytest.raises(UsageError, match="inputs of one layout: its weights are under 'model_state_dict'"):
        ckptavg.average([plain[0], legacy], out, out_format="same", order="given")
    with pytest.raises(UsageError, match="inputs of one layout: this is a safetensors file"):
        ckptavg.average([safetensors, plain[0]], out, out_format="same", order="given")
    result = cli("average", plain[0], folder, "-o", out, "--format", "same", "--order", "given")
    assert result.code == 2 and "needs inputs of one layout: this is a torch file, the newest input" in result.err
    result = cli("average", *plain, "-o", tmp_path / "out.ckpt", "--format", "same")
    assert (
        result.code != 0
        and "--format same writes one file in the layout of the newest input, model.pt: name it *.pt" in result.err
    )
    result = cli("average", *plain, "-o", out, "--training-state", "newest")
    assert result.code != 0 and "--training-state newest applies to --format same" in result.err
    result = cli("average", *plain, "-o", out, "--format", "same", "--training-state", "all")
    assert result.code != 0 and "--training-state 'all': expected one of drop, newest" in result.err
    assert not out.exists() and not (tmp_path / "out.ckpt").exists()


def test_hostile_global_refused_nothing_written(tmp_path, cli):
    class Calls:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    good = save_layout(make_state(1), tmp_path / "good", "pt", step=1)
    evil = tmp_path / "evil.pt"
    torch.save({"model_state_dict": make_state(2), "extra": {"x": Calls()}, "step": 2}, evil)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = cli("average", good, evil, "-o", tmp_path / "out.pt", "--format", "same", "--training-state", "newest")
    assert result.code != 0 and len(result.err.strip().splitlines()) == 1
    assert "hostile pickle: it calls os.system" in result.err or "posix.system" in result.err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no output, no partial file, no marker


def test_sweep_writes_each_candidate_in_the_inputs_layout(lightning_ckpts, hf_run, tmp_path, cli):
    """sweep --format same: each candidate is what `average --format same` writes with its weighting: a Lightning
    .ckpt in its folder (weights as average gives them, training state kept with newest), a Trainer folder with
    the newest input's training files."""
    paths = _epochs(lightning_ckpts)[-3:]
    result = cli("sweep", *paths, "-o", tmp_path / "sweep", "--recipe", "mean", "--recipe", "last:2", "--format", "same",
                 "--training-state", "newest", "--verify")  # fmt: skip
    assert result.code == 0, result.err
    for name, chosen in (("mean", paths), ("last-2", paths[-2:])):
        ckpt = tmp_path / "sweep" / name / paths[-1].name
        alone = tmp_path / f"{name}.ckpt"
        assert cli("average", *chosen, "-o", alone, "--format", "same", "--training-state", "newest").code == 0
        got, want = load(ckpt), load(alone)
        assert_same_tensors(got["state_dict"], mean_of([load(p)["state_dict"] for p in chosen]))
        assert_same_tensors(got["state_dict"], want["state_dict"])
        for key in ("optimizer_states", "lr_schedulers", "hyper_parameters", "loops"):
            assert_equal_nested(got[key], load(paths[-1])[key], key)
    folders = sorted(hf_run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-2:]
    swept = ckptavg.sweep(folders, tmp_path / "trainer", recipes=["mean"], out_format="same", training_state="newest")
    ckptavg.average(folders, tmp_path / "alone", out_format="same", training_state="newest")
    assert any("optimizer.pt" in n for n in swept.notes)
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"):
        assert (tmp_path / "trainer" / "mean" / name).read_bytes() == (tmp_path / "alone" / name).read_bytes(), name


def test_tune_writes_the_winner_in_the_inputs_layout(lightning_ckpts, tmp_path, cli):
    """tune --format same: each candidate is written as a Lightning .ckpt in its folder for the evaluation to read,
    and the winner's .ckpt lands in OUT with the table in ckptavg.json beside it."""
    paths = _epochs(lightning_ckpts)[-3:]
    script = tmp_path / "score.py"
    script.write_text(
        "import os, sys\n"
        f"assert os.listdir(sys.argv[1]) == [{paths[-1].name!r}], os.listdir(sys.argv[1])\n"
        "print({'last-1': 3.0, 'last-2': 1.0, 'mean': 2.0}[os.path.basename(sys.argv[1])])\n"
    )
    out = tmp_path / "best"
    result = cli("tune", *paths, "-o", out, "--eval", f"{sys.executable} {script} {{model}}", "--mode", "min",
                 "--recipe", "last:2", "--recipe", "mean", "--format", "same", "--json")  # fmt: skip
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["winner"] == "last-2" and [c["failure"] for c in report["candidates"]] == [None] * 3
    assert sorted(p.name for p in out.iterdir()) == sorted([paths[-1].name, "ckptavg.json"])
    got = load(out / paths[-1].name)
    assert_same_tensors(got["state_dict"], mean_of([load(p)["state_dict"] for p in paths[-2:]]))
    assert "optimizer_states" not in got  # --training-state drop, the default
    assert json.loads((out / "ckptavg.json").read_text())["tune"]["winner"] == "last-2"


def test_a_torch_size_is_written_back_as_a_torch_size(tmp_path):
    """The restricted unpickler reads a torch.Size as a tuple; the rewritten pickle has a torch.Size again (loaders
    such as DeepSpeed's call .numel() on them), and a plain tuple stays a tuple."""
    paths = []
    for seed in (1, 2):
        state = make_state(seed)
        paths.append(tmp_path / f"c{seed}.pt")
        torch.save({"model_state_dict": state, "shapes": {k: v.shape for k, v in state.items()}, "pair": (1, 2)}, paths[-1])
    ckptavg.average(paths, tmp_path / "out.pt", out_format="same", order="given")
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert all(type(shape) is torch.Size for shape in got["shapes"].values())
    assert got["shapes"] == {k: v.shape for k, v in make_state(2).items()} and type(got["pair"]) is tuple
