"""select's windows (window_steps, window_tokens) and min_interval, on real Trainer runs and small synthetic ones;
each expected set is computed here from the definition."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_state, save_layout

import ckptavg
from ckptavg.errors import UsageError
from ckptavg.sizes import parse_tokens


def step_of(path: str | Path) -> int:
    return int(re.search(r"(\d+)$", Path(path).name.removesuffix(".pt")).group(1))


def trainer_folders(run: Path) -> list[Path]:
    return sorted(run.glob("checkpoint-*"), key=step_of)


def synthetic_run(root: Path, steps: list[int], tokens: dict[int, int] | None = None) -> list[Path]:
    """checkpoint-N folders as the Trainer writes them, trainer_state.json recording num_input_tokens_seen (0 when
    `tokens` has no entry for the step: transformers' "not counted")."""
    folders = []
    for i, step in enumerate(steps):
        folder = save_layout(make_state(i), root, "hf-trainer", step=step)
        state = {"global_step": step, "log_history": [], "num_input_tokens_seen": (tokens or {}).get(step, 0)}
        (folder / "trainer_state.json").write_text(json.dumps(state))
        folders.append(folder)
    return folders


def chosen_steps(selection) -> list[int]:
    return [step_of(c.path) for c in selection.chosen]


def kept_at_intervals(steps: list[int], interval: int) -> list[int]:
    """The definition: from the newest back, keep a step when it is at least `interval` before the last one kept."""
    kept: list[int] = []
    for step in sorted(steps, reverse=True):
        if not kept or kept[-1] - step >= interval:
            kept.append(step)
    return sorted(kept)


@pytest.mark.parametrize("window", [0, 3, 4, 5, 8, 100])
def test_window_steps_on_a_trainer_run(hf_run, window):
    folders = trainer_folders(hf_run)
    steps = [step_of(f) for f in folders]
    selection = ckptavg.select(folders, window_steps=window)
    assert chosen_steps(selection) == [s for s in steps if max(steps) - s <= window]  # the boundary included
    for c in selection.not_chosen:
        assert any(re.fullmatch(rf"outside window[-_]steps[ =]{window} of step 10", why) for why in c.why), c.why


def test_window_steps_is_a_filter_before_last_and_after_max_step(hf_run):
    folders = trainer_folders(hf_run)
    assert chosen_steps(ckptavg.select(folders, window_steps=6, last=2)) == [8, 10]
    assert chosen_steps(ckptavg.select(folders, window_steps=100, last=2)) == [8, 10]
    # the window ends at the newest candidate that passes max_step
    assert chosen_steps(ckptavg.select(folders, window_steps=2, max_step=6)) == [4, 6]


def test_window_tokens_on_a_trainer_run_that_counts_them(hf_run_tokens):
    folders = trainer_folders(hf_run_tokens)
    tokens = {step_of(f): json.loads((f / "trainer_state.json").read_text())["num_input_tokens_seen"] for f in folders}
    assert all(t > 0 for t in tokens.values())
    newest = tokens[max(tokens)]
    for window in (0, 128, 200, 256, 10_000):
        selection = ckptavg.select(folders, window_tokens=window)
        assert chosen_steps(selection) == sorted(s for s, t in tokens.items() if newest - t <= window), window
        assert all(c.tokens == tokens[step_of(c.path)] for c in selection.candidates)
        assert {c.tokens_source for c in selection.candidates} == {"trainer_state.json num_input_tokens_seen"}


def test_window_tokens_in_decimal_units(tmp_path):
    steps = [1000 * i for i in range(1, 11)]
    tokens = {s: s * 2_000_000 for s in steps}  # 2M tokens a step: 20B at the newest
    folders = synthetic_run(tmp_path / "run", steps, tokens)
    for text in ("4B", "4000M", "4.5B", "4000000000", "0.004T"):
        want = sorted(s for s in steps if tokens[max(steps)] - tokens[s] <= parse_tokens(text))
        assert chosen_steps(ckptavg.select(folders, window_tokens=text)) == want, text
    assert chosen_steps(ckptavg.select(folders, window_tokens="4B")) == [8000, 9000, 10000]
    dropped = ckptavg.select(folders, window_tokens="4B").not_chosen[-1]
    assert any(
        re.fullmatch(r"outside window[-_]tokens[ =]'?4B'? of 20B tokens \(step 10000\): at 14B", why) for why in dropped.why
    )


def test_window_tokens_refused_when_a_trainer_does_not_count_them(hf_run, cli):
    folders = trainer_folders(hf_run)
    assert all(json.loads((f / "trainer_state.json").read_text()).get("num_input_tokens_seen", 0) == 0 for f in folders)
    with pytest.raises(UsageError, match=r"needs the tokens seen by every checkpoint; none recorded for .*checkpoint-2, "):
        ckptavg.select(folders, window_tokens="1K")
    result = cli("select", *folders, "--window-tokens", "1K")
    assert result.code == 2
    (line,) = result.err.strip().splitlines()
    assert line.startswith("error: ") and "num_input_tokens_seen" in line and "include_num_input_tokens_seen" in line
    assert "(5 in all)" in line


def test_window_tokens_needs_only_the_candidates_left(tmp_path):
    """A checkpoint dropped by an earlier filter need not record its tokens."""
    steps = [100, 200, 300, 400]
    folders = synthetic_run(tmp_path / "run", steps, {200: 2000, 300: 3000, 400: 4000})
    assert chosen_steps(ckptavg.select(folders, min_step=200, window_tokens=1000)) == [300, 400]
    with pytest.raises(UsageError, match=r"none recorded for \S*checkpoint-100 \("):
        ckptavg.select(folders, window_tokens=1000)


def test_tokens_from_checkpoint_entries(tmp_path):
    """A checkpoint's own entries: consumed_train_samples x seq_length in Megatron's args, or tokens at the top."""
    paths = []
    samples = {10: 40, 20: 80, 30: 120, 40: 160}
    for i, (step, n) in enumerate(samples.items()):
        path = tmp_path / f"iter_{step}.pt"
        args = argparse.Namespace(consumed_train_samples=n, seq_length=2048, lr=0.1)
        torch.save({"model_state_dict": make_state(i), "iteration": step, "args": args}, path)
        paths.append(path)
    selection = ckptavg.select(paths, window_tokens=80 * 2048)
    assert {step_of(c.path): c.tokens for c in selection.candidates} == {s: n * 2048 for s, n in samples.items()}
    assert selection.candidates[0].tokens_source == "checkpoint args.consumed_train_samples x args.seq_length"
    assert chosen_steps(selection) == [20, 30, 40]
    for i, step in enumerate((5, 6, 7)):
        torch.save({"model_state_dict": make_state(i), "step": step, "tokens": step * 1000}, tmp_path / f"step{step}.pt")
    selection = ckptavg.select(sorted(tmp_path.glob("step*.pt")), window_tokens="1K")
    assert chosen_steps(selection) == [6, 7] and selection.candidates[0].tokens_source == "checkpoint tokens"


@pytest.mark.parametrize("interval", [1, 50, 100, 150, 200, 450, 1000])
def test_min_interval_walks_back_from_the_newest(tmp_path, interval):
    steps = [100, 200, 250, 300, 450, 500, 900, 1000]
    folders = synthetic_run(tmp_path / "run", steps)
    selection = ckptavg.select(folders, min_interval=interval)
    want = kept_at_intervals(steps, interval)
    assert chosen_steps(selection) == want
    for c in selection.not_chosen:
        (why,) = c.why
        kept_after = min(s for s in want if s > step_of(c.path))
        assert re.fullmatch(rf"within min[-_]interval[ =]{interval} of step {kept_after}, which is kept", why), why


def test_min_interval_on_a_trainer_run_with_window_and_last(hf_run):
    folders = trainer_folders(hf_run)
    assert chosen_steps(ckptavg.select(folders, min_interval=4)) == [2, 6, 10]
    assert chosen_steps(ckptavg.select(folders, min_interval=3)) == [2, 6, 10]
    assert chosen_steps(ckptavg.select(folders, min_interval=4, window_steps=6)) == [6, 10]
    assert chosen_steps(ckptavg.select(folders, min_interval=4, last=2)) == [6, 10]


def test_cli_select_with_windows(hf_run, tmp_path, cli):
    run = Path(shutil.copytree(hf_run, tmp_path / "run"))
    result = cli("select", *trainer_folders(run), "--window-steps", "4", "--min-interval", "4", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert [step_of(p) for p in report["chosen"]] == [6, 10]
    assert report["policy"]["window_steps"] == 4 and report["policy"]["min_interval"] == 4
    why = {step_of(c["path"]): c["why"] for c in report["candidates"]}
    assert any("of step 10" in w for w in why[4]) and any("of step 10, which is kept" in w for w in why[8])
    result = cli("select", *trainer_folders(run), "--window-steps", "4")
    assert result.code == 0 and [step_of(p) for p in result.out.split()] == [6, 8, 10]


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["--window-tokens", "20X"], r"window[-_]tokens.*expected a whole number of tokens >= 0 like 500M, 20B"),
        (["--window-tokens", "1.5"], r"window[-_]tokens.*expected a whole number of tokens"),
        (["--window-tokens", "-5M"], r"window[-_]tokens.*expected a whole number of tokens"),
        (["--window-steps", "-1"], r"window[-_]steps.*expected a whole number >= 0"),
        (["--min-interval", "0"], r"min[-_]interval.*expected a number of steps >= 1"),
    ],
)
def test_bad_values_are_one_line_with_exit_2(hf_run, cli, args, pattern):
    result = cli("select", *trainer_folders(hf_run), *args)
    assert result.code == 2
    (line,) = result.err.strip().splitlines()
    assert line.startswith("error: ") and re.search(pattern, line), line


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"window_tokens": True}, r"window_tokens=True: expected a whole number of tokens"),
        ({"window_tokens": 1.5}, r"window_tokens=1\.5: expected a whole number of tokens"),
        ({"window_tokens": "abc"}, r"window_tokens='abc': expected a whole number of tokens"),
        ({"window_steps": "3"}, r"window_steps='3': expected a whole number"),
        ({"min_interval": 2.0}, r"min_interval=2\.0: expected a whole number"),
    ],
)
def test_python_api_bad_values_name_the_keyword(hf_run, kwargs, pattern):
    with pytest.raises(UsageError, match=pattern):
        ckptavg.select(trainer_folders(hf_run), **kwargs)
