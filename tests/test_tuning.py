"""The pieces of `tune`: the evaluation command, the perplexity evaluator, the greedy soup, guards, the state."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from ckptavg.errors import UsageError
from ckptavg.tuning.evaluation import Evaluation, check_command, read_score, run_evaluation
from ckptavg.tuning.guards import broken_guards, parse_guard, parse_guards
from ckptavg.tuning.soup import greedy_soup
from ckptavg.tuning.state import TuneState, evaluation_key, input_identity, state_path

PY = sys.executable


def _script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "score.py"
    path.write_text(body)
    return f"{PY} {path}"


def test_score_from_last_line_number_or_json(tmp_path):
    assert read_score("loading...\n12.5\n\n", None) == ({"score": 12.5}, 12.5)
    assert read_score("3\n", "loss") == ({"loss": 3.0}, 3.0)
    metrics, score = read_score('noise\n{"acc": 0.75, "loss": 1.5, "name": "x", "ok": true}\n', "acc")
    assert (metrics, score) == ({"acc": 0.75, "loss": 1.5}, 0.75)
    assert read_score('{"loss": 2}', None) == ({"loss": 2.0}, 2.0)
    for stdout, metric, why in [
        ("", None, "printed nothing"),
        ("score: 3\n", None, "not a number or a JSON object"),
        ("nan\n", None, "not a finite number"),
        ('{"acc": 1, "loss": 2}', None, "2 numeric metrics (acc, loss)"),
        ('{"acc": 1}', "loss", "no metric 'loss'"),
        ('{"acc": "high"}', "acc", "not a finite number"),
    ]:
        with pytest.raises(ValueError, match=why.replace("(", r"\(").replace(")", r"\)")):
            read_score(stdout, metric)


def test_the_command_gets_the_folder_quoted(tmp_path):
    folder = tmp_path / "it's a folder; rm -rf x"
    folder.mkdir()
    (folder / "value").write_text("4.25")
    command = _script(tmp_path, "import sys, os\nprint(open(os.path.join(sys.argv[1], 'value')).read())\n") + " {model}"
    result = run_evaluation(command, folder)
    assert result.ok and result.score == 4.25 and result.metrics == {"score": 4.25} and result.seconds > 0
    env = run_evaluation(f"{PY} -c 'import os; print(len(os.environ[\"CKPTAVG_MODEL\"]))'", folder)
    assert env.score == len(str(folder))
    with pytest.raises(UsageError, match="never sees the candidate"):
        check_command("python eval.py")


def test_a_failing_command_fails_its_candidate_with_the_stderr_tail(tmp_path):
    command = _script(tmp_path, "import sys\nfor i in range(9): print('line', i, file=sys.stderr)\nprint(1.0)\nsys.exit(3)\n")
    result = run_evaluation(command + " {model}", tmp_path)
    assert not result.ok and result.score is None
    assert result.failure.startswith("exit code 3; stderr: ")
    assert "line 8" in result.failure and "line 4" in result.failure and "line 3" not in result.failure  # the last 5 lines
    no_number = run_evaluation("echo done {model}", tmp_path)
    assert not no_number.ok and "not a number or a JSON object" in no_number.failure


def test_a_hanging_command_is_stopped_with_everything_it_started(tmp_path):
    pids = tmp_path / "pids"
    # The shell starts a child that starts a sleeping grandchild and waits: the time limit must end all of them.
    body = (
        "import os, subprocess, sys, time\n"
        f"child = subprocess.Popen(['sleep', '300'])\n"
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
        "print('working', file=sys.stderr, flush=True)\n"
        "child.wait()\n"
    )
    started = time.monotonic()
    result = run_evaluation(_script(tmp_path, body) + " {model} | cat", tmp_path, timeout=1.5)
    assert time.monotonic() - started < 15
    assert not result.ok and result.failure.startswith("no result after 1.5 s (stopped)") and "working" in result.failure
    for pid in map(int, pids.read_text().split()):
        assert not _running(pid), pid


def _running(pid: int) -> bool:
    deadline = time.monotonic() + 5  # a reparented child is reaped by init a moment later
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        if state == "Z":
            return False
        time.sleep(0.05)
    return True


def test_perplexity_is_the_models_own_loss_over_the_same_windows(lm_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    from ckptavg.tuning.perplexity import PerplexityEvaluator

    run, held_out = lm_run
    folder = run / "checkpoint-144"
    result = PerplexityEvaluator(held_out, max_tokens=300, device="cpu")(folder)
    assert result.ok, result.failure
    # Independent: the tokenizer's ids of the whole file, windows of 32 (n_positions) without overlap, the first
    # 300 tokens; each window's mean loss from the model itself (labels=), weighted by its predicted tokens.
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = transformers.AutoTokenizer.from_pretrained(folder)(held_out.read_text())["input_ids"][:300]
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), 32):
            window = torch.tensor([ids[start : start + 32]])
            if window.shape[1] > 1:
                total += model(input_ids=window, labels=window).loss.double().item() * (window.shape[1] - 1)
                count += window.shape[1] - 1
    assert result.metrics["tokens"] == count == 300 - math.ceil(300 / 32)
    assert result.score == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result.metrics["nll"] == pytest.approx(total / count, rel=1e-5)
    again = PerplexityEvaluator(held_out, max_tokens=300, device="cpu")(folder)
    assert again.score == result.score  # deterministic

    jsonl = tmp_path / "docs.jsonl"
    docs = held_out.read_text().split(" . ")[:4]
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    per_doc = PerplexityEvaluator(jsonl, max_tokens=10_000, device="cpu")(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert per_doc.metrics["tokens"] == sum(len(tokenizer(d)["input_ids"]) - 1 for d in docs)  # no window spans two


def test_perplexity_failures(lm_run, tmp_path):
    pytest.importorskip("transformers")
    from ckptavg.errors import InputError
    from ckptavg.tuning.perplexity import PerplexityEvaluator

    run, held_out = lm_run
    broken = tmp_path / "broken"
    broken.mkdir()
    result = PerplexityEvaluator(held_out, max_tokens=64, device="cpu")(broken)
    assert not result.ok and result.failure.startswith("perplexity: ")
    with pytest.raises(UsageError, match="expected a .txt or .jsonl file"):
        PerplexityEvaluator(tmp_path / "text.csv")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(InputError, match="line 2 has no `text` string"):
        PerplexityEvaluator(tmp_path / "bad.jsonl")


def test_without_transformers_the_evaluator_is_refused_with_the_install_command(monkeypatch):
    from ckptavg.tuning import perplexity

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(UsageError, match=r"pip install 'ckptavg\[eval\]'"):
        perplexity.require_transformers()


def test_greedy_soup_leaves_out_the_input_that_hurts():
    # Each input is a point; a mean's score is its squared distance to the target (lower is better). b and c
    # err in opposite directions, so their mean is better than either; d is good alone-ish but pulls the
    # mean away; e cannot be evaluated.
    target = torch.tensor([0.0, 0.0], dtype=torch.float64)
    points = {
        "a": torch.tensor([3.0, 3.0]),
        "b": torch.tensor([1.0, 0.0]),
        "c": torch.tensor([-1.2, 0.1]),
        "d": torch.tensor([0.0, 2.0]),
        "e": None,
    }

    def score_mean(names):
        if any(points[n] is None for n in names):
            return None
        mean = torch.stack([points[n].double() for n in names]).mean(0)
        return float(((mean - target) ** 2).sum())

    soup = greedy_soup(list(points), lambda n: score_mean([n]), score_mean, mode="min")
    # alone: b 1.0, c 1.45, d 4.0, a 18: b first; b+c = (-0.1, 0.05) -> 0.0125 kept; b+c+d = (-0.0667, 0.7) -> 0.494
    # worse, left out; b+c+a = (0.933, 1.033) -> 1.938 worse, left out; e never scored.
    assert soup.order == ["b", "c", "d", "a", "e"]
    assert soup.kept == ["b", "c"]
    assert soup.score == pytest.approx(0.0125)
    assert [s.with_it for s in soup.steps][:2] == [None, pytest.approx(0.0125)]
    assert soup.steps[2].with_it == pytest.approx((0.2 / 3) ** 2 + 0.7**2)
    assert soup.to_dict()["kept"] == ["b", "c"]
    # mode max: the same search with the sign turned
    flipped = greedy_soup(list(points), lambda n: _neg(score_mean([n])), lambda ns: _neg(score_mean(ns)), mode="max")
    assert flipped.kept == ["b", "c"] and flipped.score == pytest.approx(-0.0125)


def _neg(x):
    return None if x is None else -x


def test_guards_parse_and_apply():
    assert parse_guard("acc:0.01:max") == parse_guard(" acc :0.01:max")
    guard = parse_guard("gsm:0.5")
    assert (guard.metric, guard.tolerance, guard.mode) == ("gsm", 0.5, None)
    assert parse_guard("eval:loss:0.1").metric == "eval:loss"
    for bad, why in [("acc", "expected METRIC:TOL"), ("acc:x", "'x' is not a number"), ("acc:-1", ">= 0"), (":1", "expected")]:
        with pytest.raises(UsageError, match=why):
            parse_guard(bad)
    with pytest.raises(UsageError, match="guarded twice"):
        parse_guards(["a:1", "a:2:max"])
    baseline = {"loss": 2.0, "acc": 0.80}
    guards = parse_guards(["acc:0.01:max", "loss:0.05"])  # loss follows the run's mode (min)
    assert broken_guards(guards, {"loss": 1.9, "acc": 0.795}, baseline, "min") == []
    broken = broken_guards(guards, {"loss": 2.06, "acc": 0.70}, baseline, "min")
    assert len(broken) == 2 and "acc 0.7 loses 0.1" in broken[0] and "loss 2.06 loses 0.06" in broken[1]
    assert "no acc reported" in broken_guards(guards, {"loss": 1.0}, baseline, "min")[0]
    assert "baseline has no" in broken_guards(guards, {"loss": 1.0, "acc": 1.0}, None, "min")[0]
    # in a run that maximises, an unmarked guard is better higher
    assert broken_guards(parse_guards("loss:0.05"), {"loss": 1.9}, baseline, "max") == [
        "guard loss:0.05: loss 1.9 loses 0.1 to the baseline"
    ]


def test_state_reuses_scores_only_for_the_same_recipe_inputs_and_evaluation(tmp_path):
    ckpt = tmp_path / "checkpoint-1"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"x" * 10)
    inputs = [input_identity(ckpt)]
    recipe = {"inputs": [0], "weights": [1.0]}
    key = evaluation_key(recipe, inputs, {"command": "python e.py {model}"})
    path = state_path(tmp_path / "out")
    assert path == tmp_path / ".out.ckptavg-tune.json"
    state = TuneState(path)
    assert not state.found and state.get(key) is None
    state.put(key, Evaluation({"score": 1.5}, 1.5, 0.25), "last-1")
    state.put("failed", Evaluation(failure="exit code 1"), "ema-0.5")  # failures are tried again, not kept
    again = TuneState(path)
    assert again.found and again.get(key) == Evaluation({"score": 1.5}, 1.5, 0.25) and again.reused == 1
    assert again.get("failed") is None
    assert key != evaluation_key(recipe, inputs, {"command": "python e2.py {model}"})
    assert key != evaluation_key({"inputs": [0], "weights": [0.5]}, inputs, {"command": "python e.py {model}"})
    os.utime(ckpt / "model.safetensors", ns=(1, 1))
    assert key != evaluation_key(recipe, [input_identity(ckpt)], {"command": "python e.py {model}"})
    again.remove()
    assert not path.exists()
    path.write_text("not json")
    assert not TuneState(path).found
