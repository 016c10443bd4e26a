"""Copies of one checkpoint are counted once, and a metric is ranked the way it is better.

The copies are made by the producers themselves: timm's CheckpointSaver on a filesystem without hard links (its own
fallback, shutil.copy2, for last.pth.tar and model_best.pth.tar), Lightning's ModelCheckpoint(save_last=True)
(last.ckpt saved again at the step of the newest epoch=E-step=S.ckpt), and fairseq's layout: checkpoint_last.pt and
checkpoint_best.pt are copies of an epoch checkpoint (fairseq's PathManager.copy is shutil.copyfile). The direction
comes from where the trainers record it: Lightning's ModelCheckpoint mode, timm's eval_metric and saver history, the
Trainer's greater_is_better; else from the metric's name; else --mode is asked for.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import read_output, reference_average
from runs import _regression, _Tiny, eval_losses
from test_select import fake_run
from torch import nn

from ckptavg.checkpoint import open_checkpoint
from ckptavg.metrics import mode_from_name
from ckptavg.same_weights import same_weight_groups

TIMM_TOP1 = (40.0, 72.5, 55.0, 68.0)  # eval top-1 per epoch: best at epoch 1, so model_best is not last
FAIRSEQ_BEST = 2  # checkpoint_best.pt is a copy of checkpoint2.pt, checkpoint_last.pt of checkpoint3.pt


def timm_top1_run(root: Path) -> Path:
    """timm's CheckpointSaver as train.py drives it with --eval-metric top1 (decreasing=False), where os.link fails:
    the saver falls back to shutil.copy2, so last.pth.tar and model_best.pth.tar are copies, not hard links."""
    from trainer_runs import _timm_utils

    CheckpointSaver, _ = _timm_utils()
    torch.manual_seed(0)
    root.mkdir(parents=True)
    model = _Tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    args = argparse.Namespace(model="tiny", epochs=4, eval_metric="top1", checkpoint_hist=10)
    saver = CheckpointSaver(
        model=model, optimizer=optimizer, args=args, checkpoint_dir=str(root), recovery_dir=str(root), max_history=10
    )
    x, y = _regression()
    with mock.patch("os.link", side_effect=OSError(95, "Operation not supported")):
        for epoch, top1 in enumerate(TIMM_TOP1):
            for i in range(0, len(x), 16):
                loss = nn.functional.mse_loss(model(x[i : i + 16]), y[i : i + 16])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            saver.save_checkpoint(epoch, metric=top1)
    return root


def lightning_acc_run(root: Path) -> Path:
    """Lightning with ModelCheckpoint(monitor='val_acc', mode='max', save_top_k=-1, save_last=True): 4 epochs,
    epoch=E-step=S.ckpt and last.ckpt (saved again after the newest)."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _Tiny()

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.mse_loss(self.model(x), y)

        def validation_step(self, batch, _):
            x, y = batch
            self.log("val_acc", ((self.model(x) - y).abs() < 1.0).float().mean())  # share of predictions within 1

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.05)

    L.seed_everything(0, verbose=False)
    x, y = _regression()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=root, monitor="val_acc", mode="max", save_top_k=-1, save_last=True, filename="{epoch}-{step}"
    )
    trainer = L.Trainer(
        max_epochs=4,
        accelerator="cpu",
        callbacks=[checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    trainer.fit(Module(), loader, loader)
    return root


def fairseq_run(root: Path) -> Path:
    """fairseq's layout: checkpoint{E}.pt written by torch.save (model, optimizer_history with num_updates,
    extra_state), then checkpoint_best.pt and checkpoint_last.pt copied from one of them, as save_checkpoint does."""
    root.mkdir(parents=True)
    torch.manual_seed(0)
    model = _Tiny()
    for epoch in (1, 2, 3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        state = {
            "model": model.state_dict(),
            "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "num_updates": 100 * epoch}],
            "extra_state": {"train_iterator": {"epoch": epoch}, "val_loss": 3.0 / epoch},
            "last_optimizer_state": {},
        }
        torch.save(state, root / f"checkpoint{epoch}.pt")
    shutil.copyfile(root / f"checkpoint{FAIRSEQ_BEST}.pt", root / "checkpoint_best.pt")
    shutil.copyfile(root / "checkpoint3.pt", root / "checkpoint_last.pt")
    return root


@pytest.fixture(scope="module")
def timm_copies(tmp_path_factory):
    import importlib.util

    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed")
    return timm_top1_run(tmp_path_factory.mktemp("timm-copies") / "output")


@pytest.fixture(scope="module")
def lightning_copies(tmp_path_factory):
    pytest.importorskip("lightning")
    return lightning_acc_run(tmp_path_factory.mktemp("lightning-copies") / "ckpts")


@pytest.fixture(scope="module")
def fairseq_copies(tmp_path_factory):
    return fairseq_run(tmp_path_factory.mktemp("fairseq") / "checkpoints")


# (fixture, glob, the copy refused first, the checkpoint it copies, the checkpoints named for their step or epoch)
RUNS = {
    "timm": (
        "timm_copies",
        "*.pth.tar",
        "model_best.pth.tar",
        "checkpoint-1.pth.tar",
        [f"checkpoint-{e}.pth.tar" for e in range(4)],
    ),
    "lightning": (
        "lightning_copies",
        "*.ckpt",
        "last.ckpt",
        "epoch=3-step=16.ckpt",
        [f"epoch={e}-step={4 * (e + 1)}.ckpt" for e in range(4)],
    ),
    "fairseq": (
        "fairseq_copies",
        "*.pt",
        "checkpoint_best.pt",
        f"checkpoint{FAIRSEQ_BEST}.pt",
        [f"checkpoint{e}.pt" for e in (1, 2, 3)],
    ),
}


def lines(result) -> list[str]:
    return [line for line in result.out.splitlines() if line]


def weights_of(path: Path) -> dict[str, torch.Tensor]:
    entry = torch.load(path, weights_only=False)
    return entry["state_dict"] if "state_dict" in entry else entry["model"]


@pytest.mark.parametrize("run", list(RUNS))
def test_average_of_a_folder_with_copies_is_refused_naming_both(cli, tmp_path, request, run):
    fixture, pattern, copy, original, named = RUNS[run]
    root = request.getfixturevalue(fixture)
    assert not any((root / copy).samefile(root / n) for n in named)  # a copy, not a hard link
    result = cli("average", *sorted(root.glob(pattern)), "-o", tmp_path / "out")
    assert result.code == 2, result.err
    assert (
        result.err.strip().splitlines()[-1]
        == f"error: {root / copy}: holds the same weights as {root / original} (a copy); drop one of them"
    )
    assert not (tmp_path / "out").exists()

    strip = ["--strip-prefix", "model."] if run == "lightning" else []
    dropped = cli("average", *(root / n for n in named), *strip, "-o", tmp_path / "out.safetensors")
    assert dropped.code == 0, dropped.err
    states = [{k.removeprefix("model."): v for k, v in weights_of(root / n).items()} for n in named]
    got, want = read_output(tmp_path / "out.safetensors"), reference_average(states)
    assert got.keys() == want.keys() and all(torch.equal(got[name], want[name]) for name in want)


@pytest.mark.parametrize("run", list(RUNS))
def test_select_prints_each_set_of_weights_once(cli, request, run):
    fixture, pattern, copy, original, named = RUNS[run]
    root = request.getfixturevalue(fixture)
    files = sorted(root.glob(pattern))
    result = cli("select", *files, "--last", "10")
    assert result.code == 0, result.err
    assert sorted(lines(result)) == sorted(str(root / n) for n in named)
    assert (
        f"note: ignored {root / copy}: holds the same weights as {root / original} (a copy); only that one is a candidate"
        in result.err
    )
    data = json.loads(cli("select", *files, "--last", "10", "--json").out)
    assert data["copies"][str(root / copy)] == str(root / original)
    assert len(data["copies"]) == len(files) - len(named)
    # --invert never offers a copy for deletion: resuming needs checkpoint_last.pt / last.ckpt / last.pth.tar
    inverted = cli("select", *files, "--last", "1", "--invert")
    assert inverted.code == 0 and lines(inverted) and all(Path(p).name in named for p in lines(inverted))


def test_select_counts_hard_links_once(cli, timm_ckpts):
    """timm's usual layout (hard links where the filesystem has them): last and model_best are the same files."""
    result = cli("select", *sorted(timm_ckpts.glob("*.pth.tar")), "--last", "10")
    assert result.code == 0, result.err
    assert lines(result) == [str(timm_ckpts / f"checkpoint-{e}.pth.tar") for e in range(4)]
    assert (
        f"note: ignored {timm_ckpts / 'last.pth.tar'}: "
        f"holds the same weights as {timm_ckpts / 'checkpoint-3.pth.tar'} (a link to the same file)" in result.err
    )


def test_timm_top1_without_mode_picks_the_highest(cli, timm_copies):
    files = sorted(timm_copies.glob("checkpoint-*.pth.tar"))
    result = cli("select", *files, "--metric", "metric", "--top-k", "2", "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    best = sorted(range(4), key=lambda e: -TIMM_TOP1[e])[:2]
    assert [Path(p).name for p in data["chosen"]] == [f"checkpoint-{e}.pth.tar" for e in sorted(best)]
    assert data["mode"] == "max" and data["policy"]["mode"] == "max"
    assert (
        data["mode_source"]
        == "timm records eval_metric 'top1' (top-1 accuracy) in checkpoint-0.pth.tar, higher is better (train.py)"
    )
    assert f"note: mode max for 'metric': {data['mode_source']}; --mode min to override" in result.err
    # later checkpoints also carry the saver's history, best first: its order is the `decreasing` flag itself
    later = json.loads(cli("select", *files[2:], "--metric", "metric", "--top-k", "1", "--json").out)
    assert later["mode_source"] == "timm's CheckpointSaver in checkpoint-2.pth.tar ranks higher values first (decreasing=False)"


def test_lightning_accuracy_takes_the_checkpoint_callbacks_mode(cli, lightning_copies):
    files = sorted(lightning_copies.glob("*.ckpt"))
    callbacks = torch.load(lightning_copies / "last.ckpt", weights_only=False)["callbacks"]
    state = next(v for k, v in callbacks.items() if k.startswith("ModelCheckpoint"))
    scores = {Path(p).name: float(v) for p, v in state["best_k_models"].items()}  # val_acc of every epoch, as Lightning kept it
    highest = sorted(sorted(scores, key=lambda n: -scores[n])[:2])
    lowest = sorted(sorted(scores, key=lambda n: scores[n])[:2])
    assert highest != lowest
    result = cli("select", *files, "--metric", "val_acc", "--top-k", "2")
    assert result.code == 0, result.err
    assert [Path(p).name for p in lines(result)] == highest
    assert "note: mode max for 'val_acc': Lightning's ModelCheckpoint in " in result.err and "mode='max'" in result.err

    overridden = cli("select", *files, "--metric", "val_acc", "--top-k", "2", "--mode", "min", "--json")  # --mode always wins
    assert overridden.code == 0, overridden.err
    data = json.loads(overridden.out)
    assert [Path(p).name for p in data["chosen"]] == lowest
    assert data["mode"] == "min" and data["mode_source"] == "--mode"
    assert "note: mode min for 'val_acc' (--mode), although Lightning's ModelCheckpoint" in overridden.err


def test_best_follows_the_same_direction(cli, lightning_copies):
    files = sorted(lightning_copies.glob("epoch=*.ckpt"))
    data = json.loads(cli("select", *files, "--metric", "val_acc", "--max-step", "best", "--json").out)
    scores = {c["step"]: c["metrics"]["val_acc"] for c in data["candidates"]}
    best = max(scores, key=scores.get)
    assert best != min(scores, key=scores.get)
    assert data["mode"] == "max" and [c["step"] for c in data["candidates"] if c["chosen"]] == [
        s for s in sorted(scores) if s <= best
    ]


def test_spikes_follow_the_same_direction(cli, tmp_path):
    """An accuracy that drops for one evaluation is a spike; a loss-like reading of it (--mode min) sees none there."""
    paths = fake_run(tmp_path, [100, 200, 300, 400, 500, 600])
    accuracy = {100: 0.80, 200: 0.81, 300: 0.42, 400: 0.82, 500: 0.83, 600: 0.83}
    metrics = tmp_path / "eval.json"
    metrics.write_text(json.dumps({str(s): {"eval_accuracy": a} for s, a in accuracy.items()}))
    result = cli("select", *paths, "--metrics", metrics, "--metric", "eval_accuracy", "--skip-spikes", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["chosen"] == [str(p) for p in paths if not p.name.endswith("-300")]
    assert "mode max for 'eval_accuracy': from the name" in result.err
    as_loss = json.loads(
        cli("select", *paths, "--metrics", metrics, "--metric", "eval_accuracy", "--skip-spikes", "--mode", "min", "--json").out
    )
    assert str(tmp_path / "checkpoint-300") in as_loss["chosen"]


def test_name_says_the_direction_else_mode_is_asked_for(cli, tmp_path, fairseq_copies):
    files = [fairseq_copies / f"checkpoint{e}.pt" for e in (1, 2, 3)]
    metrics = tmp_path / "eval.json"
    metrics.write_text(
        json.dumps({str(100 * e): {"valid_accuracy": a, "valid_quality": a} for e, a in zip((1, 2, 3), (0.61, 0.74, 0.70))})
    )
    named = cli("select", *files, "--metrics", metrics, "--metric", "valid_accuracy", "--top-k", "1", "--json")
    assert named.code == 0, named.err
    data = json.loads(named.out)
    assert [Path(p).name for p in data["chosen"]] == ["checkpoint2.pt"]
    assert data["mode"] == "max" and data["mode_source"] == "from the name (accuracy: higher is better)"
    assert "note: mode max for 'valid_accuracy': from the name (accuracy: higher is better); --mode min to override" in named.err

    unknown = cli("select", *files, "--metrics", metrics, "--metric", "valid_quality", "--top-k", "1")
    assert unknown.code == 2 and unknown.out == ""
    assert "error: --metric valid_quality: no checkpoint records whether higher or lower is better" in unknown.err
    assert "pass --mode max" in unknown.err and "--mode min" in unknown.err
    given = cli("select", *files, "--metrics", metrics, "--metric", "valid_quality", "--top-k", "1", "--mode", "max")
    assert [Path(p).name for p in lines(given)] == ["checkpoint2.pt"]
    listed = cli(
        "select", *files, "--metrics", metrics, "--metric", "valid_quality", "--last", "2"
    )  # nothing ranked by it: no direction needed
    assert listed.code == 0 and len(lines(listed)) == 2


def test_trainer_greater_is_better_is_read_from_training_args(cli, tmp_path, hf_run):
    run = Path(shutil.copytree(hf_run, tmp_path / "run"))
    for folder in run.glob("checkpoint-*"):
        args = torch.load(folder / "training_args.bin", weights_only=False)  # the run's own TrainingArguments (a test trusts it)
        args.metric_for_best_model, args.greater_is_better = "loss", False
        torch.save(args, folder / "training_args.bin")  # as the Trainer writes it
    losses = eval_losses(run)
    result = cli("select", *sorted(run.glob("checkpoint-*")), "--metric", "eval_loss", "--top-k", "2", "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert [c["step"] for c in data["candidates"] if c["chosen"]] == sorted(sorted(losses, key=losses.get)[:2])
    assert data["mode"] == "min"
    assert (
        "the Trainer's training_args.bin in checkpoint-" in data["mode_source"]
        and "greater_is_better=False" in data["mode_source"]
    )


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("eval_loss", "min"),
        ("val/acc", "max"),
        ("eval_accuracy", "max"),
        ("train_loss_epoch", "min"),
        ("val_acc_step", "max"),
        ("top1", "max"),
        ("eval_exact_match", "max"),
        ("eval_rougeL", "max"),
        ("perplexity", "min"),
        ("eval_wer", "min"),
        ("valid_ppl", "min"),
        ("word_error_rate", "min"),
        ("eval_f1", "max"),
        ("bleu", "max"),
        ("metric", None),
        ("eval_runtime", None),
    ],
)
def test_direction_from_the_name(name, mode):
    found = mode_from_name(name)
    assert (found[0] if found else None) == mode


@pytest.mark.parametrize("direct", [True, False], ids=["O_DIRECT", "plain preads"])
def test_copies_are_found_without_reading_whole_tensors(fairseq_copies, monkeypatch, direct):
    """Checkpoints of one run differ in their sampled bytes: only the copy and its original are read in full. The
    sample is read with O_DIRECT where it can be, else with plain preads (a filesystem without it, tmpfs)."""
    from ckptavg import same_weights

    if not direct:
        monkeypatch.delattr(same_weights.os, "O_DIRECT", raising=False)
    files = sorted(fairseq_copies.glob("*.pt"))
    checkpoints = [open_checkpoint(p) for p in files]
    compared = []
    real = same_weights._identical
    monkeypatch.setattr(same_weights, "_identical", lambda a, b: compared.append((a.path.name, b.path.name)) or real(a, b))
    groups = same_weight_groups(checkpoints)
    assert [[files[i].name for i in g] for g in groups] == [
        ["checkpoint2.pt", "checkpoint_best.pt"],
        ["checkpoint3.pt", "checkpoint_last.pt"],
    ]
    assert sorted(compared) == [("checkpoint2.pt", "checkpoint_best.pt"), ("checkpoint3.pt", "checkpoint_last.pt")]


def test_a_copied_deepspeed_save_is_found(tmp_path, deepspeed_zero2_ckpts):
    """ZeRO-2 weights are extents of the optimizer partitions (read through their sources), sampled like any."""
    copy = Path(shutil.copytree(deepspeed_zero2_ckpts / "global_step6", tmp_path / "global_step6_backup"))
    folders = [deepspeed_zero2_ckpts / f"global_step{s}" for s in (2, 4, 6)] + [copy]
    assert same_weight_groups([open_checkpoint(f) for f in folders]) == [[2, 3]]
