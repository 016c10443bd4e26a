"""select: step windows, metrics from every source, retention with --invert, spikes, health checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_state
from runs import eval_losses
from safetensors.torch import save_file

from ckptavg.selection import Policy, find_spikes, gather, select


def fake_run(root: Path, steps: list[int], losses: dict[int, float] | None = None) -> list[Path]:
    """checkpoint-N folders with trainer_state.json holding eval_loss at N (only where `losses` has it)."""
    folders = []
    history = []
    for step in steps:
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file({"w": torch.full((4,), float(step))}, folder / "model.safetensors")
        if losses and step in losses:
            history.append({"step": step, "eval_loss": losses[step]})
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": list(history)}))
        folders.append(folder)
    return folders


def lines(result) -> list[str]:
    return [line for line in result.out.splitlines() if line]


def test_steps_are_numbers_not_strings(cli, tmp_path):
    paths = fake_run(tmp_path, [9000, 10000, 500, 20000])
    result = cli("select", *paths, "--last", "2")
    assert result.code == 0, result.err
    assert lines(result) == [str(tmp_path / "checkpoint-10000"), str(tmp_path / "checkpoint-20000")]


def test_candidates_without_step_are_ignored_and_reported(cli, tmp_path):
    paths = fake_run(tmp_path, [100, 200])
    for name in ("latest", "checkpoint-final"):
        (tmp_path / name).mkdir()
        save_file({"w": torch.zeros(4)}, tmp_path / name / "model.safetensors")
    everything = sorted(tmp_path.iterdir())
    result = cli("select", *everything)
    assert lines(result) == [str(p) for p in paths]
    assert "ignored" in result.err and "latest" in result.err and "checkpoint-final" in result.err
    inverted = cli("select", *everything, "--last", "1", "--invert")
    assert lines(inverted) == [str(paths[0])]  # never the ones without a step


def test_top_k_matches_trainer_state_of_a_real_hf_run(cli, hf_run):
    losses = eval_losses(hf_run)
    expected = sorted(sorted(losses, key=losses.get)[:2])
    result = cli("select", *sorted(hf_run.glob("checkpoint-*")), "--metric", "eval_loss", "--top-k", "2")
    assert result.code == 0, result.err
    assert lines(result) == [str(hf_run / f"checkpoint-{s}") for s in expected]


def test_retention_keeps_best_and_latest(cli, hf_run):
    losses = eval_losses(hf_run)
    steps = sorted(losses)
    keep = set(sorted(losses, key=losses.get)[:2]) | {steps[-1]}
    result = cli(
        "select", *sorted(hf_run.glob("checkpoint-*")), "--metric", "eval_loss", "--top-k", "2", "--last", "1", "--invert"
    )
    assert result.code == 0, result.err
    assert lines(result) == [str(hf_run / f"checkpoint-{s}") for s in steps if s not in keep]


def test_json_lists_candidates_with_metrics_and_why(cli, hf_run):
    result = cli("select", *sorted(hf_run.glob("checkpoint-*")), "--metric", "eval_loss", "--top-k", "1", "--json")
    data = json.loads(result.out)
    assert [c["step"] for c in data["candidates"]] == sorted(eval_losses(hf_run))
    chosen = [c for c in data["candidates"] if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["why"] == ["top-1 by eval_loss (#1)"]
    assert chosen[0]["metric_sources"]["eval_loss"] == "trainer_state.json"
    assert data["chosen"] == [chosen[0]["path"]]


def test_lightning_metrics_come_from_model_checkpoint_state(lightning_ckpts):
    ckpt = torch.load(sorted(lightning_ckpts.glob("*.ckpt"))[-1], weights_only=False)
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint"))
    expected = {Path(p).name: float(v) for p, v in state["best_k_models"].items()}
    candidates = gather(sorted(lightning_ckpts.glob("*.ckpt")))
    assert {Path(c.path).name: c.metrics["val_loss"] for c in candidates} == pytest.approx(expected)
    assert [c.step for c in candidates] == sorted(c.step for c in candidates)
    best = min(expected, key=expected.get)
    chosen = select(candidates, Policy(metric="val_loss", top_k=1)).chosen
    assert [Path(c.path).name for c in chosen] == [best]


def test_plain_torch_loop_metrics_and_steps(torch_run):
    candidates = gather(sorted(torch_run.glob("*.pt")))
    assert sorted(c.step for c in candidates) == [3, 6, 9, 12]
    for c in candidates:
        saved = torch.load(c.path, weights_only=False)
        assert c.metrics["val_loss"] == pytest.approx(saved["metrics"]["val_loss"])


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl"])
def test_metrics_file(cli, tmp_path, suffix):
    paths = fake_run(tmp_path / "run", [100, 200, 300, 400])
    scores = {100: 0.9, 200: 0.95, 300: 0.7, 400: 0.8}
    file = tmp_path / f"metrics{suffix}"
    if suffix == ".csv":
        file.write_text("step,accuracy\n" + "".join(f"{s},{v}\n" for s, v in scores.items()))
    elif suffix == ".json":
        file.write_text(json.dumps({str(s): {"accuracy": v} for s, v in scores.items()}))
    else:
        file.write_text(
            "".join(
                json.dumps({"path": str(tmp_path / "run" / f"checkpoint-{s}"), "accuracy": v}) + "\n" for s, v in scores.items()
            )
        )
    result = cli("select", *paths, "--metrics", file, "--metric", "accuracy", "--mode", "max", "--top-k", "2")
    assert result.code == 0, result.err
    assert lines(result) == [str(paths[0]), str(paths[1])]


def test_missing_metric_is_reported_not_dropped(cli, tmp_path):
    paths = fake_run(tmp_path, [1, 2, 3, 4], losses={1: 3.0, 2: 2.0, 4: 1.0})
    result = cli("select", *paths, "--metric", "eval_loss", "--top-k", "2", "--last", "1", "--json")
    data = json.loads(result.out)
    third = next(c for c in data["candidates"] if c["step"] == 3)
    assert "no eval_loss" in third["why"] and not third["chosen"]
    assert data["chosen"] == [str(paths[1]), str(paths[3])]
    assert "no eval_loss for 1 checkpoint" in cli("select", *paths, "--metric", "eval_loss", "--top-k", "2").err


def test_window_filters(cli, tmp_path):
    paths = fake_run(tmp_path, list(range(100, 1100, 100)))
    by_step = {int(p.name.split("-")[1]): str(p) for p in paths}
    assert lines(cli("select", *paths, "--every", "300")) == [by_step[s] for s in (300, 600, 900)]
    assert lines(cli("select", *paths, "--min-step", "800")) == [by_step[s] for s in (800, 900, 1000)]
    assert lines(cli("select", *paths, "--max-step", "200")) == [by_step[s] for s in (100, 200)]
    assert lines(cli("select", *paths, "--after-warmup", "0.75", "--last", "2")) == [by_step[s] for s in (900, 1000)]
    assert lines(cli("select", *paths, "--after-warmup", "0.75")) == [by_step[s] for s in (800, 900, 1000)]


def test_window_ending_at_best(cli, tmp_path):
    losses = {100: 3.0, 200: 2.0, 300: 1.5, 400: 1.0, 500: 1.2, 600: 1.4}
    paths = fake_run(tmp_path, list(losses), losses)
    result = cli("select", *paths, "--metric", "eval_loss", "--max-step", "best", "--last", "3")
    assert lines(result) == [str(tmp_path / f"checkpoint-{s}") for s in (200, 300, 400)]


def test_spikes_are_skipped(cli, tmp_path):
    losses = {s: 2.0 - s / 2000 for s in range(100, 1100, 100)}
    losses[600] = 5.0  # a loss spike
    paths = fake_run(tmp_path, list(losses), losses)
    result = cli("select", *paths, "--metric", "eval_loss", "--skip-spikes", "--last", "5", "--json")
    data = json.loads(result.out)
    spike = next(c for c in data["candidates"] if c["step"] == 600)
    assert not spike["chosen"] and "spike" in spike["why"][0]
    assert [Path(p).name for p in data["chosen"]] == [f"checkpoint-{s}" for s in (500, 700, 800, 900, 1000)]


def test_find_spikes_against_hand_computed_threshold():
    import statistics

    values = [1.0, 1.1, 0.9, 1.0, 4.0, 1.05, 0.95]
    flagged = find_spikes(values, k=3.0, window=2, mode="min")
    assert [i for i, f in enumerate(flagged) if f] == [4]
    neighbours = [0.9, 1.0, 1.05, 0.95]
    median = statistics.median(neighbours)
    local = statistics.median(abs(v - median) for v in neighbours) * 1.4826
    others = values[:4] + values[5:]  # the spike does not raise its own bar
    diffs = [b - a for a, b in zip(others, others[1:])]
    noise = statistics.median(abs(d - statistics.median(diffs)) for d in diffs) * 1.4826 / 2**0.5
    assert flagged[4] == pytest.approx((4.0, median + 3.0 * max(local, noise)))
    assert [i for i, f in enumerate(find_spikes([-v for v in values], 3.0, 2, "max")) if f] == [4]


def test_skip_nonfinite_streams_tensors(cli, tmp_path):
    paths = fake_run(tmp_path, [1, 2, 3])
    state = make_state(0)
    state["layer.0.weight"][0, 0] = float("nan")
    save_file({"w": torch.tensor([1.0, float("inf"), 0.0, 0.0])}, paths[1] / "model.safetensors")
    result = cli("select", *paths, "--skip-nonfinite", "--json")
    data = json.loads(result.out)
    bad = next(c for c in data["candidates"] if c["step"] == 2)
    assert not bad["chosen"] and "1 Inf" in bad["why"][0]
    assert data["chosen"] == [str(paths[0]), str(paths[2])]


def test_select_feeds_average(cli, tmp_path):
    paths = fake_run(tmp_path / "run", [10, 20, 30, 40])
    chosen = lines(cli("select", *paths, "--last", "2"))
    result = cli("average", *chosen, "-o", tmp_path / "merged", "--json")
    assert json.loads(result.out)["inputs"][0]["step"] == 30


def test_usage_errors(cli, tmp_path):
    paths = fake_run(tmp_path, [1, 2])
    assert cli("select", *paths, "--top-k", "2").code == 2  # needs --metric
    assert cli("select", *paths, "--metric", "x", "--mode", "sideways", "--top-k", "1").code == 2
    assert cli("select", *paths, "--max-step", "soon").code == 2
    assert cli("select", *paths, "--after-warmup", "2").code == 2
    nothing = cli("select", *paths, "--min-step", "100")
    assert nothing.code == 1 and nothing.err.startswith("error: no checkpoint chosen")
    assert cli("select", tmp_path / "missing").code == 1


def test_trainer_best_model_checkpoint_is_marked(tmp_path):
    paths = fake_run(tmp_path, [1, 2, 3], losses={1: 2.0, 2: 1.0, 3: 1.5})
    state = json.loads((paths[-1] / "trainer_state.json").read_text())
    state["best_model_checkpoint"] = f"/elsewhere/{paths[1].name}"
    (paths[-1] / "trainer_state.json").write_text(json.dumps(state))
    assert [c.trainer_best for c in gather(paths)] == [False, True, False]


def test_unreadable_checkpoint_is_ignored_not_chosen_nor_inverted(cli, torch_run, tmp_path):
    good = sorted(torch_run.glob("*.pt"))
    broken = tmp_path / "step_99.pt"
    broken.write_bytes(good[0].read_bytes()[:200])
    result = cli("select", *good, broken, "--last", "2", "--json")
    data = json.loads(result.out)
    assert str(broken) in data["ignored"] and str(broken) not in data["chosen"] + data["not_chosen"]
    inverted = cli("select", *good, broken, "--last", "2", "--invert")
    assert str(broken) not in inverted.out and "ignored" in inverted.err
