"""`ckptavg tune` end to end on a real Trainer run of a tiny causal LM (the lm_run fixture): the table, the
winner written to OUT, the same scores from a user's script, the greedy soup on real averages, failing and
hanging evaluations, guards, a kill and a rerun that resumes."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import read_output
from safetensors.torch import load_file
from tune_eval import perplexity

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TOKENS = 400


def _checkpoints(run: Path) -> list[Path]:
    return sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def _mean(paths: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    """The float64 reference of a weighted mean of checkpoint folders."""
    states = [load_file(p / "model.safetensors") for p in paths]
    return {k: sum(w * s[k].double() for w, s in zip(weights, states)) for k in states[0]}


def test_tune_with_eval_text_writes_the_winner_and_the_table(lm_run, cli, tmp_path):
    run, held_out = lm_run
    out = tmp_path / "best"
    plot = tmp_path / "tune.svg"
    r = cli(
        "tune", *_checkpoints(run), "-o", out, "--eval-text", held_out, "--eval-tokens", TOKENS, "--device", "cpu",
        "--recipe", "last:2,4", "--recipe", "ema:0.6", "--plot", plot, "--json",
    )  # fmt: skip
    assert r.code == 0, r.err
    report = json.loads(r.out)
    rows = {c["name"]: c for c in report["candidates"]}
    assert list(rows) == ["last-1", "last-2", "last-4", "ema-0.6"]
    assert report["baseline"] == "last-1" and rows["last-1"]["baseline"] and rows["last-1"]["delta"] == 0
    assert (report["metric"], report["mode"]) == ("perplexity", "min")
    # every score is the perplexity an independent computation gives the candidate's weights
    paths = _checkpoints(run)
    for name, row in rows.items():
        assert row["failure"] is None and row["metrics"]["tokens"] == TOKENS - 13  # 13 windows of 32 or fewer
        assert row["delta"] == pytest.approx(row["score"] - rows["last-1"]["score"])
    assert rows["last-1"]["score"] == pytest.approx(perplexity(str(paths[-1]), str(held_out), TOKENS)[0], rel=1e-5)
    winner = min(rows.values(), key=lambda c: c["score"])
    assert report["winner"] == winner["name"] and winner["winner"] and sum(c["winner"] for c in rows.values()) == 1
    assert report["gain"] == winner["delta"] <= 0  # the baseline is a candidate: the winner is never worse
    # OUT holds the winner's weights (the mean of its inputs with its weights), the model files, the table
    expected = _mean([Path(p) for p in winner["inputs"]], winner["weights"])
    written = read_output(out)
    for name, tensor in expected.items():
        torch.testing.assert_close(written[name].double(), tensor, rtol=1e-6, atol=1e-6)
    assert perplexity(str(out), str(held_out), TOKENS)[0] == pytest.approx(winner["score"], rel=1e-5)
    recipe = json.loads((out / "ckptavg.json").read_text())
    assert "sweep" not in recipe and recipe["tune"]["winner"] == winner["name"]
    assert [c["name"] for c in recipe["tune"]["candidates"]] == list(rows)
    assert set(recipe["written"]) | {"ckptavg.json"} == {p.name for p in out.iterdir()}
    card = (out / "README.md").read_text()
    assert "## Chosen by evaluation" in card and f"| **winner** | {winner['name']} |" in card and "| last-1 |" in card
    assert plot.read_text().lstrip().startswith("<?xml") and "ema-0.6" in plot.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "tune.svg"]  # no staging, no state left
    # the table for people: the winner marked, the delta to the baseline
    r = cli("tune", *paths[-2:], "-o", tmp_path / "b2", "--eval-text", held_out, "--eval-tokens", TOKENS, "--device", "cpu")
    assert r.code == 0, r.err
    assert "baseline" in r.out and "winner" in r.out and "ema-0.333" in r.out and "ckptavg: last-1: " in r.err


def test_a_users_script_gives_the_same_scores(lm_run, cli, tmp_path):
    run, held_out = lm_run
    paths = _checkpoints(run)[-2:]
    command = f"{sys.executable} {TESTS / 'tune_eval.py'} {{model}} {held_out} {TOKENS}"
    by_script = cli(
        "tune", *paths, "-o", tmp_path / "a", "--eval", command, "--metric", "perplexity", "--recipe", "mean", "--json"
    )
    assert by_script.code == 0, by_script.err
    builtin = cli(
        "tune", *paths, "-o", tmp_path / "b", "--eval-text", held_out, "--eval-tokens", TOKENS, "--device", "cpu",
        "--recipe", "mean", "--json",
    )  # fmt: skip
    assert builtin.code == 0, builtin.err
    a, b = json.loads(by_script.out), json.loads(builtin.out)
    assert a["mode"] == "min"  # said by the metric's name
    assert [c["name"] for c in a["candidates"]] == [c["name"] for c in b["candidates"]] == ["last-1", "mean"]
    for x, y in zip(a["candidates"], b["candidates"]):
        assert x["score"] == pytest.approx(y["score"], rel=1e-5)  # GPT-2 written out in float64 vs transformers in float32
        assert x["metrics"]["nll"] == pytest.approx(y["metrics"]["nll"], rel=1e-5)
    assert a["winner"] == b["winner"]


def test_greedy_soup_on_real_averages(lm_run, tmp_path):
    import ckptavg

    run, held_out = lm_run
    paths = _checkpoints(run)[-4:]
    report = ckptavg.tune(
        paths, tmp_path / "soup", eval_text=held_out, eval_tokens=TOKENS, device="cpu", recipes=[], greedy_soup=True
    )
    soup = report.soup
    alone = {s["name"]: s["alone"] for s in soup["steps"]}
    steps = {f"step-{p.name.split('-')[1]}": p for p in paths}
    for name, score in alone.items():  # each input alone, measured independently
        assert score == pytest.approx(perplexity(str(steps[name]), str(held_out), TOKENS)[0], rel=1e-5)
    assert soup["order"] == sorted(alone, key=alone.get)
    running = soup["steps"][0]["alone"]
    for step in soup["steps"][1:]:  # each kept only if the mean with it is no worse
        assert step["kept"] == (step["with_it"] <= running)
        running = step["with_it"] if step["kept"] else running
    row = report.row("greedy-soup")
    assert [Path(p).name for p in row.inputs] == sorted((steps[n].name for n in soup["kept"]), key=lambda n: int(n.split("-")[1]))
    mean = tmp_path / "kept-mean"
    ckptavg.average([steps[n] for n in soup["kept"]], mean)
    assert row.score == pytest.approx(perplexity(str(mean), str(held_out), TOKENS)[0], rel=1e-5) == pytest.approx(running)


SCRIPT = """
import json, os, subprocess, sys, time
name = os.path.basename(sys.argv[1].rstrip('/'))
log = os.environ.get('TUNE_LOG')
if log:
    with open(log, 'a') as f:
        f.write(name + '\\n')
what = json.loads(os.environ['TUNE_SCORES']).get(name, {'loss': 9.0})
if what == 'fail':
    print('Traceback: cannot load ' + name, file=sys.stderr)
    sys.exit(2)
if what == 'hang':
    child = subprocess.Popen(['sleep', '300'])
    open(os.environ['TUNE_PIDS'], 'a').write(f'{os.getpid()} {child.pid} ')
    child.wait()
kill_at = os.environ.get('TUNE_KILL_AT')
if kill_at and len(open(log).read().split()) == int(kill_at):
    os.kill(int(open(os.environ['TUNE_PIDFILE']).read()), 9)
    time.sleep(30)
print(json.dumps(what))
"""


@pytest.fixture
def scripted(tmp_path, monkeypatch):
    """An evaluation command whose result each candidate's folder name decides (TUNE_SCORES)."""
    script = tmp_path / "score.py"
    script.write_text(SCRIPT)
    log = tmp_path / "evaluated.log"
    monkeypatch.setenv("TUNE_LOG", str(log))

    def set_scores(scores: dict) -> tuple[str, Path]:
        monkeypatch.setenv("TUNE_SCORES", json.dumps(scores))
        return f"{sys.executable} {script} {{model}}", log

    return set_scores


def test_failing_and_hanging_evaluations_fail_their_candidate_not_the_run(lm_run, cli, tmp_path, scripted, monkeypatch):
    run, _ = lm_run
    pids = tmp_path / "pids"
    monkeypatch.setenv("TUNE_PIDS", str(pids))
    command, _ = scripted({"last-1": {"loss": 3.0}, "last-2": "fail", "last-4": "hang", "ema-0.6": {"loss": 2.5}})
    recipes = ["--recipe", "last:2,4", "--recipe", "ema:0.6"]
    started = time.monotonic()
    r = cli(
        "tune",
        *_checkpoints(run),
        "-o",
        tmp_path / "out",
        "--eval",
        command,
        "--metric",
        "loss",
        "--eval-timeout",
        2,
        *recipes,
        "--json",
    )
    assert r.code == 0, r.err
    assert time.monotonic() - started < 40
    rows = {c["name"]: c for c in json.loads(r.out)["candidates"]}
    assert rows["last-2"]["failure"] == "exit code 2; stderr: Traceback: cannot load last-2"
    assert rows["last-4"]["failure"].startswith("no result after 2 s (stopped)")
    assert rows["ema-0.6"]["winner"] and rows["ema-0.6"]["delta"] == -0.5
    assert "ckptavg: last-2: failed: exit code 2" in r.err
    for pid in map(int, pids.read_text().split()):  # the hanging script and the child it started are gone
        assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"
    command, _ = scripted({"last-1": "fail", "mean": "fail"})
    r = cli("tune", *_checkpoints(run)[-3:], "-o", tmp_path / "none", "--eval", command, "--mode", "min", "--recipe", "mean")
    assert r.code == 1 and "every candidate's evaluation failed; last-1: exit code 2" in r.err
    assert not (tmp_path / "none").exists()


def test_a_guard_holds_back_the_best_score(lm_run, cli, tmp_path, scripted):
    run, _ = lm_run
    command, _ = scripted(
        {
            "last-1": {"loss": 3.0, "gsm": 0.50},
            "last-2": {"loss": 2.0, "gsm": 0.40},  # the best loss, but loses 0.10 on gsm
            "last-4": {"loss": 2.5, "gsm": 0.495},  # loses 0.005: within the tolerance
            "ema-0.6": {"loss": 2.8, "gsm": 0.60},
        }
    )
    args = ["tune", *_checkpoints(run), "--eval", command, "--metric", "loss", "--recipe", "last:2,4", "--recipe", "ema:0.6"]
    r = cli(*args, "-o", tmp_path / "a", "--guard", "gsm:0.01:max", "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    rows = {c["name"]: c for c in report["candidates"]}
    assert report["winner"] == "last-4" and report["guards"] == ["gsm:0.01:max"]
    assert rows["last-2"]["held_back"] == ["guard gsm:0.01:max: gsm 0.4 loses 0.1 to the baseline"]
    assert rows["last-4"]["held_back"] == []
    r = cli(*args, "-o", tmp_path / "b", "--json")
    assert json.loads(r.out)["winner"] == "last-2"
    r = cli(*args, "-o", tmp_path / "c", "--guard", "gsm")
    assert r.code == 2 and "--guard gsm: expected METRIC:TOL" in r.err


def test_killed_and_run_again_it_reuses_the_scores(lm_run, cli, tmp_path, scripted, monkeypatch):
    run, _ = lm_run
    pidfile = tmp_path / "tune.pid"
    scores = {"last-1": {"loss": 3.0}, "last-2": {"loss": 2.0}, "last-4": {"loss": 2.5}, "ema-0.6": {"loss": 2.8}}
    command, log = scripted(scores)
    out = tmp_path / "out"
    args = [*_checkpoints(run), "-o", out, "--eval", command, "--metric", "loss", "--recipe", "last:2,4", "--recipe", "ema:0.6"]
    env = dict(os.environ, TUNE_KILL_AT="3", TUNE_PIDFILE=str(pidfile), PYTHONPATH=str(ROOT))
    # the shell's pid is the ckptavg process's (exec); the third evaluation SIGKILLs it
    shell = f"echo $$ > {pidfile} && exec " + shlex.join([sys.executable, "-m", "ckptavg", "tune", *map(str, args)])
    killed = subprocess.run(["sh", "-c", shell], env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert log.read_text().split() == ["last-1", "last-2", "last-4"]
    state = tmp_path / ".out.ckptavg-tune.json"
    assert not out.exists() and len(json.loads(state.read_text())["scores"]) == 2
    assert (tmp_path / ".out.tune.ckptavg-partial").is_dir()  # the killed run's candidates
    r = cli("tune", *args, "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert log.read_text().split() == ["last-1", "last-2", "last-4", "last-4", "ema-0.6"]  # the first two not again
    assert [c["reused"] for c in report["candidates"]] == [True, True, False, False]
    assert report["reused"] == 2 and report["evaluated"] == 2 and report["winner"] == "last-2"
    assert any("found the scores of an interrupted run" in n for n in report["notes"])
    assert any("removed what an interrupted tune left: .out.tune.ckptavg-partial" in n for n in report["notes"])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []
    # the same arguments but another command: nothing reused
    command, _ = scripted(scores)
    r = cli(
        "tune",
        *_checkpoints(run),
        "-o",
        tmp_path / "again",
        "--eval",
        command + " ",
        "--metric",
        "loss",
        "--recipe",
        "mean",
        "--json",
    )
    assert r.code == 0, r.err
    assert json.loads(r.out)["reused"] == 0


def test_dry_run_lists_the_default_candidates_and_their_weights(lm_run, cli):
    run, held_out = lm_run
    r = cli("tune", *_checkpoints(run), "--eval-text", held_out, "--dry-run", "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    rows = {c["name"]: c for c in report["candidates"]}
    names = ["last-1", "last-2", "last-4", "last-8", "mean", "ema-0.333", "ema-0.6", "ema-0.778", "ema-0.846"]
    assert list(rows)[: len(names)] == names and report["dry_run"] and report["winner"] is None
    assert rows["last-4"]["weights"] == [0.25] * 4 and len(rows["last-4"]["inputs"]) == 4
    d = 0.6  # ema:D over 12 inputs: x1 gets d^11, x_i (1 - d) d^(12 - i)
    assert rows["ema-0.6"]["weights"] == pytest.approx([d**11] + [(1 - d) * d ** (12 - i) for i in range(2, 13)])
    # WSM's minus-sqrt over the newest 4: d_k = 1 - sqrt(k/4), c_3 = d_3, c_k = d_k - d_(k+1), c_0 = 1 - the others
    d = [1 - (k / 4) ** 0.5 for k in range(4)]
    c = [d[1] - d[2], d[2] - d[3], d[3]]
    assert rows["wsm-minus-sqrt-last-4"]["weights"] == pytest.approx([1 - sum(c), *c])
    assert rows["wsm-minus-sqrt-last-4"]["steps"] == [108, 120, 132, 144] and "wsm-minus-sqrt" in rows
    r = cli("tune", *_checkpoints(run), "--eval-text", held_out, "--dry-run")
    assert r.code == 0 and "ema-0.846" in r.out and "nothing evaluated or written" in r.out


def test_bad_options_are_refused_before_any_work(lm_run, cli, tmp_path):
    run, held_out = lm_run
    paths = _checkpoints(run)[-2:]
    for args, message in [
        ([], "give one evaluation: --eval CMD or --eval-text FILE"),
        (["--eval", "python e.py {model}", "--eval-text", held_out], "give one of them"),
        (["--eval", "python e.py"], "--eval 'python e.py': the command never sees the candidate"),
        (["--eval", "python e.py {model}"], "say whether the score is better lower or higher: --mode min or --mode max"),
        (["--eval-text", held_out, "--metric", "accuracy"], "--metric accuracy: the perplexity evaluator reports"),
        (["--eval-text", held_out, "--plot", tmp_path / "p.jpg"], "--plot p.jpg: expected an .svg, .png or .pdf file"),
        (["--eval-text", held_out, "--recipe", "ema:2"], "a decay must lie in [0, 1)"),
        (["--eval-text", held_out, "--eval-timeout", "0", "--eval", "x {model}"], "give one of them"),
    ]:
        r = cli("tune", *paths, "-o", tmp_path / "out", *args)
        assert r.code == 2 and message in r.err, (args, r.err)
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    r = cli("tune", *paths, "-o", existing, "--eval-text", held_out, "--overwrite")
    assert r.code == 3 and "notes.txt" in r.err and (existing / "notes.txt").exists()


def test_keep_candidates_keeps_every_folder_scored(lm_run, cli, tmp_path, scripted):
    run, _ = lm_run
    command, log = scripted({"last-1": {"loss": 3.0}, "mean": {"loss": 2.0}})
    keep = tmp_path / "kept"
    paths = _checkpoints(run)[-3:]
    r = cli(
        "tune",
        *paths,
        "-o",
        tmp_path / "out",
        "--eval",
        command,
        "--metric",
        "loss",
        "--recipe",
        "mean",
        "--keep-candidates",
        keep,
    )
    assert r.code == 0, r.err
    assert sorted(p.name for p in keep.iterdir()) == ["last-1", "mean"]
    assert read_output(keep / "mean").keys() == read_output(tmp_path / "out").keys()
    for name, tensor in read_output(keep / "mean").items():
        assert torch.equal(tensor, read_output(tmp_path / "out")[name])  # the winner is the kept candidate's weights
    assert json.loads((keep / "mean" / "ckptavg.json").read_text())["sweep"]["candidate"] == "mean"
    inside = cli("tune", *paths, "-o", paths[0] / "best", "--eval", command, "--metric", "loss", "--recipe", "mean")
    assert inside.code == 3 and "ckptavg never writes into an input" in inside.err
    assert log.read_text().split() == ["last-1", "mean"]  # refused before any evaluation


def test_sigterm_during_an_evaluation_ends_it_and_keeps_the_scores(lm_run, tmp_path, scripted, monkeypatch):
    run, _ = lm_run
    pids = tmp_path / "pids"
    command, log = scripted({"last-1": {"loss": 3.0}, "mean": "hang"})
    out = tmp_path / "out"
    env = dict(os.environ, TUNE_PIDS=str(pids), PYTHONPATH=str(ROOT))
    args = [sys.executable, "-m", "ckptavg", "tune", *map(str, _checkpoints(run)[-2:]), "-o", str(out), "--eval", command]
    tune = subprocess.Popen([*args, "--metric", "loss", "--recipe", "mean"], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (pids.exists() and len(pids.read_text().split()) == 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    tune.send_signal(signal.SIGTERM)
    try:
        _, err = tune.communicate(timeout=60)
    finally:
        tune.kill()  # a tune that did not stop is not left running
    assert tune.returncode == 143, err
    for pid in map(int, pids.read_text().split()):  # the evaluation and the child it started are gone
        assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"
    assert not out.exists() and not (tmp_path / ".out.tune.ckptavg-partial").exists()
    assert len(json.loads((tmp_path / ".out.ckptavg-tune.json").read_text())["scores"]) == 1  # last-1's, for a rerun
