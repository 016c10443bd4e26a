"""select as a training job's retention step: what --invert never prints, incomplete checkpoints (a save in
progress), hostile pickles, timm checkpoints, and the notes that say what was dropped or kept back."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_state, save_layout
from rich.text import Text
from runs import eval_losses
from safetensors.torch import save_file
from test_select import fake_run, lines

from ckptavg.inspection import first_nonfinite
from ckptavg.render import metric_chart
from ckptavg.selection import Policy, gather, select

CKPTAVG = f"{shlex.quote(sys.executable)} -m ckptavg"


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def drop_eval_loss(folder: Path) -> None:
    """The checkpoint's own trainer_state.json loses its eval_loss entry (an eval that did not run)."""
    step = int(folder.name.split("-")[1])
    state = json.loads((folder / "trainer_state.json").read_text())
    state["log_history"] = [e for e in state["log_history"] if not (e.get("step") == step and "eval_loss" in e)]
    (folder / "trainer_state.json").write_text(json.dumps(state))


def retention(run: Path, *extra: str) -> subprocess.CompletedProcess:
    """The README's retention recipe, through a real shell, a real xargs and a real rm."""
    command = (
        f"{CKPTAVG} select {shlex.quote(str(run))}/checkpoint-* --metric eval_loss --top-k 2 --last 1 --invert "
        f"{' '.join(extra)} | xargs -r rm -r"
    )
    return subprocess.run(
        command,
        shell=True,
        capture_output=True,
        text=True,
        cwd=run,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )


def remaining(run: Path) -> set[int]:
    return {int(p.name.split("-")[1]) for p in run.glob("checkpoint-*")}


def test_retention_recipe_end_to_end_keeps_best_newest_and_unranked(hf_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(hf_run, run)
    losses = eval_losses(run)
    steps = sorted(losses)
    unranked = next(s for s in steps[:-1] if s not in sorted(losses, key=losses.get)[:2])  # would be deleted if ranked
    drop_eval_loss(run / f"checkpoint-{unranked}")
    del losses[unranked]
    keep = set(sorted(losses, key=losses.get)[:2]) | {steps[-1], unranked}
    assert len(keep) < len(steps)  # something is deleted: the test is not vacuous

    done = retention(run)

    assert done.returncode == 0, done.stderr
    assert remaining(run) == keep
    assert f"no eval_loss to rank it by): {run}/checkpoint-{unranked}" in done.stderr


def test_retention_during_a_save_keeps_the_newest_complete_one(hf_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(hf_run, run)
    steps = sorted(eval_losses(run))
    saving = run / f"checkpoint-{steps[-1] + 2}"  # the Trainer is writing it: weights cut short, no trainer_state yet
    saving.mkdir()
    shutil.copy(run / f"checkpoint-{steps[-1]}" / "config.json", saving)
    shutil.copy(run / f"checkpoint-{steps[-1]}" / "model.safetensors", saving)
    truncate(saving / "model.safetensors")

    done = retention(run, "--top-k", "1")  # only the best by eval_loss: the newest is not among them

    assert done.returncode == 0, done.stderr
    losses = eval_losses(hf_run)
    assert remaining(run) == {min(losses, key=losses.get), steps[-1], steps[-1] + 2}
    assert f"ignored {saving}: unreadable or incomplete: model.safetensors: truncated" in done.stderr


@pytest.mark.parametrize(
    "selectors",
    [
        ["--top-k", "1"],
        ["--max-step", "300"],
        ["--min-step", "0", "--every", "200"],
        ["--last", "1", "--skip-spikes", "--top-k", "1"],
    ],
)
def test_invert_never_prints_the_newest(cli, tmp_path, selectors):
    losses = {100: 3.0, 200: 2.0, 300: 1.0, 400: 1.5, 500: 2.5}  # the newest is the worst
    paths = fake_run(tmp_path, list(losses), losses)
    result = cli("select", *paths, "--metric", "eval_loss", *selectors, "--invert")
    assert result.code == 0, result.err
    assert str(paths[-1]) not in lines(result)
    data = json.loads(cli("select", *paths, "--metric", "eval_loss", *selectors, "--invert", "--json").out)
    assert str(paths[-1]) not in data["inverted"]
    if str(paths[-1]) not in data["chosen"]:
        assert data["kept_back"] == {str(paths[-1]): "the newest checkpoint"}
        assert f"--invert kept back (the newest checkpoint): {paths[-1]}" in result.err


def test_invert_keeps_back_unranked_ignored_and_stepless(cli, tmp_path):
    paths = fake_run(tmp_path, [1, 2, 3, 4, 5], losses={1: 3.0, 3: 2.0, 4: 1.0, 5: 1.5})
    latest = tmp_path / "latest"
    latest.mkdir()
    save_file({"w": torch.zeros(4)}, latest / "model.safetensors")
    truncate(paths[2] / "model.safetensors")
    result = cli("select", *paths, latest, "--metric", "eval_loss", "--top-k", "1", "--invert", "--json")
    data = json.loads(result.out)
    assert data["inverted"] == [str(paths[0])]  # step 1: ranked, not best, not newest, complete
    assert data["kept_back"] == {str(paths[1]): "no eval_loss to rank it by", str(paths[4]): "the newest checkpoint"}
    assert sorted(data["ignored"]) == sorted([str(paths[2]), str(latest)])
    assert "--invert kept back (no eval_loss to rank it by)" in result.err  # notes stay on stderr with --json


INCOMPLETE = {}


def incomplete(build):
    INCOMPLETE[build.__name__] = build
    return build


@incomplete
def truncated_safetensors(folder: Path) -> str:
    truncate(folder / "model.safetensors")
    return "truncated"


@incomplete
def truncated_shard(folder: Path) -> str:
    (folder / "model.safetensors").unlink()
    save_layout(make_state(0), folder, "safetensors-sharded")
    truncate(folder / "model-00002-of-00002.safetensors", 0.9)
    return "model-00002-of-00002.safetensors: truncated"


@incomplete
def index_names_a_missing_shard(folder: Path) -> str:
    (folder / "model.safetensors").unlink()
    save_layout(make_state(0), folder, "safetensors-sharded")
    (folder / "model-00002-of-00002.safetensors").unlink()
    return "shard model-00002-of-00002.safetensors is missing"


@incomplete
def shards_without_index_yet(folder: Path) -> str:
    (folder / "model.safetensors").unlink()
    save_layout(make_state(0), folder, "safetensors-sharded")
    (folder / "model.safetensors.index.json").unlink()
    (folder / "model-00002-of-00002.safetensors").unlink()  # one complete shard: not a checkpoint on its own
    return "without its index"


@incomplete
def no_weights_yet(folder: Path) -> str:
    (folder / "model.safetensors").unlink()
    (folder / "config.json").write_text("{}")
    return "no weights found"


@incomplete
def truncated_zip_pickle(folder: Path) -> str:
    (folder / "model.safetensors").unlink()
    torch.save(make_state(0), folder / "pytorch_model.bin")
    truncate(folder / "pytorch_model.bin", 0.7)
    return "truncated zip archive"


@incomplete
def truncated_legacy_pickle(folder: Path) -> str:
    (folder / "model.safetensors").unlink()
    torch.save(make_state(0), folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    truncate(folder / "pytorch_model.bin", 0.7)
    return "truncated"


@pytest.mark.parametrize("build", INCOMPLETE.values(), ids=INCOMPLETE.keys())
def test_incomplete_checkpoint_is_skipped_with_a_note(cli, tmp_path, build):
    paths = fake_run(tmp_path / "run", [10, 20, 30, 40])
    why = build(paths[-1])  # the newest: the one a save in progress leaves
    result = cli("select", *paths, "--last", "2")
    assert result.code == 0, result.err
    assert lines(result) == [str(paths[1]), str(paths[2])]
    note = next(line for line in result.err.splitlines() if str(paths[-1]) in line)
    assert note.startswith(f"note: ignored {paths[-1]}: unreadable or incomplete") and why in note
    assert str(paths[-1]) not in cli("select", *paths, "--last", "1", "--invert").out
    skipped = cli("select", *paths, "--skip-nonfinite", "--json")  # skipped, not a failure
    assert skipped.code == 0 and json.loads(skipped.out)["ignored"] == [str(paths[-1])]
    assert cli("average", *paths, "-o", tmp_path / "merged").code == 1  # average still refuses it


def test_single_truncated_pickle_file_is_skipped(cli, torch_run, tmp_path):
    files = [Path(shutil.copy(p, tmp_path)) for p in sorted(torch_run.glob("*.pt"))]
    truncate(files[-1], 0.8)
    result = cli("select", *files, "--metric", "val_loss", "--top-k", "4", "--skip-nonfinite")
    assert result.code == 0, result.err
    assert str(files[-1]) not in lines(result) and f"ignored {files[-1]}" in result.err


def test_skip_nonfinite_ignores_a_checkpoint_that_became_unreadable(tmp_path):
    paths = fake_run(tmp_path, [1, 2, 3])
    candidates = gather(paths)
    truncate(paths[1] / "model.safetensors")  # cut short after it was described (a save over it, a full disk)
    selection = select(candidates, Policy(skip_nonfinite=True), has_nonfinite=lambda c: first_nonfinite(Path(c.path)))
    assert [c.path for c in selection.chosen] == [str(paths[0]), str(paths[2])]
    assert [c.path for c in selection.ignored] == [str(paths[1])] and "truncated" in selection.ignored[0].ignored
    assert str(paths[1]) not in [c.path for c in selection.inverted]


class Calls:
    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


@pytest.mark.parametrize("where", ["file", "shard"])
@pytest.mark.parametrize("options", [[], ["--skip-nonfinite"], ["--last", "1", "--invert"]])
def test_hostile_pickle_is_an_error_never_ignored(cli, tmp_path, where, options):
    paths = fake_run(tmp_path / "run", [1, 2, 3])
    marker = tmp_path / "pwned"
    payload = {"model_state_dict": make_state(0), "x": Calls(os.system, f"touch {marker}")}
    if where == "file":
        bad = tmp_path / "step_4.pt"
        torch.save(payload, bad)
        named = bad
    else:
        bad = tmp_path / "run" / "checkpoint-4"
        save_layout(make_state(0), bad, "bin-sharded")
        named = bad / "pytorch_model-00001-of-00002.bin"
        torch.save({**torch.load(named), "x": Calls(os.system, f"touch {marker}")}, named)
    result = cli("select", *paths, bad, *options)
    assert result.code == 1 and result.out == ""
    assert result.err.splitlines() == [
        f"error: {named}: hostile pickle: it calls posix.system, which a checkpoint never needs; refused, nothing was run"
    ]
    assert not marker.exists()


def timm_run(root: Path) -> dict[int, float]:
    """What timm's CheckpointSaver writes (train.py --checkpoint-hist 3): checkpoint-E.pth.tar with epoch and
    metric (the eval top-1) at the top level, beside last.pth.tar and model_best.pth.tar."""
    root.mkdir()
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    top1 = {0: 41.2, 1: 55.0, 2: 61.5, 3: 60.1, 4: 63.3, 5: 60.5}
    for epoch, metric in top1.items():
        with torch.no_grad():  # an epoch of training: each checkpoint holds weights of its own (copies are counted once)
            model[0].weight.add_(0.01)
        state = {
            "epoch": epoch,
            "arch": "tiny",
            "state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "version": 2,
            "args": argparse.Namespace(model="tiny", lr=0.1),
            "state_dict_ema": model.state_dict(),
            "metric": metric,
        }
        torch.save(state, root / f"checkpoint-{epoch}.pth.tar")
        shutil.copy(root / f"checkpoint-{epoch}.pth.tar", root / "last.pth.tar")
    return top1


def test_timm_metric_and_epoch(cli, tmp_path):
    top1 = timm_run(tmp_path / "output")
    files = sorted((tmp_path / "output").glob("checkpoint-*.pth.tar"))
    result = cli("select", *files, "--metric", "metric", "--mode", "max", "--top-k", "2", "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert [Path(p).name for p in data["chosen"]] == ["checkpoint-2.pth.tar", "checkpoint-4.pth.tar"]
    assert {c["step"]: c["metrics"]["metric"] for c in data["candidates"]} == pytest.approx(top1)
    assert {c["metric_sources"]["metric"] for c in data["candidates"]} == {"checkpoint"}
    assert "ordered by epoch" in result.err
    assert lines(cli("select", *files, "--last", "2")) == [str(files[4]), str(files[5])]


def spiky_run(tmp_path: Path, first: int) -> list[Path]:
    """Steps `first`..1000 by 100; step 800's loss spikes to 1.89 among neighbours of 1.07-1.10."""
    losses = {s: 1.0 + s / 1000 for s in range(first, 600, 100)}
    losses.update({600: 1.10, 700: 1.08, 800: 1.89, 900: 1.07, 1000: 1.09})
    return fake_run(tmp_path, list(losses), losses)


@pytest.mark.parametrize("first", [600, 100], ids=["five checkpoints", "five left after --min-step"])
def test_spike_among_few_checkpoints_is_dropped(cli, tmp_path, first):
    paths = spiky_run(tmp_path, first)
    result = cli("select", *paths, "--metric", "eval_loss", "--min-step", "600", "--skip-spikes", "--json")
    assert result.code == 0, result.err
    assert [Path(p).name for p in json.loads(result.out)["chosen"]] == [f"checkpoint-{s}" for s in (600, 700, 900, 1000)]
    assert f"note: --skip-spikes dropped {tmp_path}/checkpoint-800: eval_loss spike: 1.89 beyond" in result.err


def test_infinite_loss_is_a_spike_and_no_neighbour(tmp_path):
    paths = fake_run(tmp_path, [1, 2, 3, 4, 5, 6], losses={1: 2.0, 2: 1.9, 3: float("inf"), 4: 1.8, 5: float("nan"), 6: 1.75})
    selection = select(gather(paths), Policy(metric="eval_loss", skip_spikes=True))
    assert [c.step for c in selection.chosen] == [1, 2, 4, 5, 6]  # NaN: no value (chosen as unranked), never a spike
    assert "spike: inf beyond" in next(c for c in selection.candidates if c.step == 3).why[-1]
    assert next(c for c in selection.candidates if c.step == 5).why == ["no eval_loss (NaN)", "passes the filters"]


def test_too_few_to_judge_spikes_is_said(cli, tmp_path):
    paths = fake_run(tmp_path, [1, 2, 3], losses={1: 1.0, 2: 5.0, 3: 1.1})
    result = cli("select", *paths, "--metric", "eval_loss", "--skip-spikes", "--last", "3")
    assert lines(result) == [str(p) for p in paths]
    assert (
        "note: --skip-spikes: 3 checkpoint(s) with a finite eval_loss, 4 are needed to judge spikes; none dropped" in result.err
    )


def test_skip_nonfinite_says_what_it_dropped_also_with_json_not_quiet(cli, tmp_path):
    paths = fake_run(tmp_path, [1, 2, 3])
    save_file({"w": torch.tensor([1.0, float("nan"), 0.0, 0.0])}, paths[1] / "model.safetensors")
    note = f"note: --skip-nonfinite dropped {paths[1]}: non-finite: w has 1 NaN and 0 Inf"
    assert note in cli("select", *paths, "--skip-nonfinite").err
    with_json = cli("select", *paths, "--skip-nonfinite", "--json")
    assert note in with_json.err and json.loads(with_json.out)["notes"] == [note.removeprefix("note: ")]
    assert cli("select", *paths, "--skip-nonfinite", "--json", "--quiet").err == ""


def test_run_folder_says_what_to_pass(cli, tmp_path):
    fake_run(tmp_path / "run", [2, 4, 6, 8])
    result = cli("select", tmp_path / "run", "--last", "2")
    assert result.code == 1
    assert result.err.splitlines() == [
        f"error: {tmp_path}/run: holds checkpoint folders (checkpoint-2, checkpoint-4, checkpoint-6, ...), not weights; pass "
        f"{tmp_path}/run/checkpoint-* instead"
    ]


def test_metric_typo_lists_the_metrics_and_the_closest(cli, tmp_path):
    paths = fake_run(tmp_path, [1, 2, 3], losses={1: 3.0, 2: 2.0, 3: 1.0})
    result = cli("select", *paths, "--metric", "eval_lossx", "--top-k", "2")
    assert result.code == 1
    assert result.err.splitlines()[-1] == (
        "error: no checkpoint chosen (3 candidates, 0 ignored); no checkpoint has eval_lossx (did you mean eval_loss?); "
        "metrics found: eval_loss"
    )
    assert "eval_lossx" not in "".join(result.err.splitlines()[:-1])  # said once, in the error
    kept = cli("select", *paths, "--metric", "eval_lossx", "--top-k", "2", "--invert")  # a deletion list: nothing, and why
    assert kept.code == 0 and kept.out == "" and "did you mean eval_loss?" in kept.err


@pytest.mark.parametrize("n", [5, 58, 59, 300, 1000])
def test_chart_marks_every_chosen_checkpoint(n):
    chosen_at = sorted({1, 2, n // 2, n // 2 + 1, n - 2, n - 1} | set(range(3, n, 37)))
    values = [1.0 + (i % 7) / 10 for i in range(n)]
    chosen = [i in chosen_at for i in range(n)]
    top, bottom = (Text.from_markup(line).plain for line in metric_chart(list(range(0, 10 * n, 10)), values, chosen, width=80))
    assert len(top) <= 80 and len(bottom) <= 80
    bars, _, value_range = top.partition("  ")  # the legends follow the columns
    marks, step_range = bottom[: len(bars)], bottom[len(bars) + 2 :]
    assert " " not in bars and bottom[len(bars) : len(bars) + 2] == "  " and step_range == f"steps 0 .. {10 * (n - 1)}"
    assert len(bars) == min(n, 80 - 2 - max(len(value_range), len(step_range)))
    assert marks.count("▲") == len(chosen_at) and set(marks) <= {" ", "▲"}  # each under a column of its own
