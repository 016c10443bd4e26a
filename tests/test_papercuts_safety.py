"""Papercuts that made results unsafe or silent: `select --print0` for paths with spaces, `inspect --diff` that
compared nothing yet exited 0 (and its CI checks), output names with a file suffix ckptavg does not write,
`--max-shard-size` with a single file, and `select --skip-nonfinite` reading only what could be chosen, with
progress."""

from __future__ import annotations

import copy
import io
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from test_select import fake_run

import ckptavg
from ckptavg.errors import UsageError
from ckptavg.inspection import ReadProgress, first_nonfinite
from ckptavg.output import output_layout
from ckptavg.render import ProgressDisplay
from ckptavg.selection import Policy, gather, select

CKPTAVG = f"{shlex.quote(sys.executable)} -m ckptavg"
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}


def shell(command: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c", command], cwd=cwd, capture_output=True, text=True, env=ENV, timeout=120
    )


def steps_of(paths) -> list[int]:
    return sorted(int(Path(p).name.split("-")[1]) for p in paths)


# --- select --print0 --------------------------------------------------------------------------------------


@pytest.fixture
def spaced_run(hf_run, tmp_path) -> Path:
    """A copy of a transformers.Trainer run in a folder whose name holds a space."""
    run = tmp_path / "my run"
    shutil.copytree(hf_run, run)
    return run


def test_print0_feeds_xargs_0_with_spaces_in_paths(spaced_run, cli, monkeypatch):
    monkeypatch.chdir(spaced_run.parent)
    steps = steps_of(spaced_run.glob("checkpoint-*"))
    given = sorted(Path("my run").glob("checkpoint-*"))
    nul = cli("select", *given, "--last", "2", "--invert", "--print0")
    assert nul.code == 0 and nul.out == "".join(f"my run/checkpoint-{s}\0" for s in steps[:-2])
    assert cli("select", *given, "--last", "2", "--invert", "-0").out == nul.out
    listed = subprocess.run(["xargs", "-0", "-r", "ls", "-d"], input=nul.out, capture_output=True, text=True)
    assert listed.returncode == 0 and listed.stdout.splitlines() == [f"my run/checkpoint-{s}" for s in steps[:-2]]

    # what one path per line does to these paths: `ls my` and `ls run/checkpoint-N`
    lines = cli("select", *given, "--last", "2", "--invert").out
    split = subprocess.run(["xargs", "-r", "ls", "-d"], input=lines, capture_output=True, text=True)
    assert split.returncode != 0 and split.stdout == ""


def test_readme_deletion_recipe_with_print0_deletes_exactly_the_inverted_folders(spaced_run):
    steps = steps_of(spaced_run.glob("checkpoint-*"))
    done = shell(f"{CKPTAVG} select 'my run'/checkpoint-* --last 2 --invert --print0 | xargs -0 -r rm -r", spaced_run.parent)
    assert done.returncode == 0, done.stderr
    assert steps_of(spaced_run.glob("checkpoint-*")) == steps[-2:]
    assert sorted(p.name for p in spaced_run.parent.iterdir()) == ["my run"]  # no `my` or `run` touched beside it


def test_print0_with_json_is_a_usage_error(cli, tmp_path):
    paths = fake_run(tmp_path, [1, 2])
    result = cli("select", *paths, "--print0", "--json")
    assert result.code == 2 and result.out == "" and result.err.count("\n") == 1 and "--print0" in result.err


# --- inspect --diff: nothing compared is never clean; CI checks ---------------------------------------------


def _model(width: int = 16, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.BatchNorm1d(width), torch.nn.Linear(width, 2))
    with torch.no_grad():
        model[1].bias.uniform_(-0.1, 0.1)  # as trained: no parameter all zeros, so every cosine is an angle
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """State dicts saved by torch: a model, the same wrapped by DataParallel (`module.` names), a copy moved a
    little with a BatchNorm that counted more batches, and a wider model."""
    root = tmp_path_factory.mktemp("diff")
    model = _model()
    paths = {name: root / f"{name}.pt" for name in ("plain", "wrapped", "moved", "wider")}
    torch.save(model.state_dict(), paths["plain"])
    torch.save(torch.nn.DataParallel(copy.deepcopy(model)).state_dict(), paths["wrapped"])
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    moved[1].num_batches_tracked += 5
    torch.save(moved.state_dict(), paths["moved"])
    torch.save(_model(width=17).state_dict(), paths["wider"])
    return paths


def test_diff_with_names_behind_a_prefix_compares_nothing_says_so_and_fails(cli, saved):
    result = cli("inspect", saved["wrapped"], "--diff", saved["plain"])
    assert result.code == 1
    assert "nothing compared" in result.out and "relative L2" not in result.out and "identical" not in result.out
    assert result.err.count("\n") == 1 and result.err.startswith("error: ")
    assert "nothing compared" in result.err and "--strip-prefix module." in result.err

    as_json = cli("inspect", saved["wrapped"], "--diff", saved["plain"], "--json")
    data = json.loads(as_json.out)
    assert as_json.code == 1 and data["compared"] == 0 and not data["identical"] and "--strip-prefix module." in data["hint"]

    fixed = cli(
        "inspect", saved["wrapped"], "--diff", saved["plain"], "--strip-prefix", "module.", "--fail-if-different", "--json"
    )
    assert fixed.code == 0, fixed.err
    assert json.loads(fixed.out)["identical"] and json.loads(fixed.out)["compared"] == len(torch.load(saved["plain"]))


def test_a_shape_mismatch_reports_and_fails_any_check(cli, saved):
    report = cli("inspect", saved["plain"], "--diff", saved["wider"])
    assert report.code == 0, report.err  # other tensors were compared: a report, not a verdict
    assert "not compared: " in report.out and "of another shape" in report.out
    for check in (["--fail-if-different"], ["--max-rel-l2", "1e9"], ["--min-cosine", "-1"]):
        result = cli("inspect", saved["plain"], "--diff", saved["wider"], *check)
        assert result.code == 1, check
        assert "shape mismatch" in result.err and result.err.count("\n") == 1


def test_thresholds_against_an_independent_float64_reference(cli, saved):
    a, b = torch.load(saved["plain"]), torch.load(saved["moved"])
    floats = [n for n, t in a.items() if t.is_floating_point()]
    dd = sum(float((a[n].double() - b[n].double()).pow(2).sum()) for n in floats)
    aa = sum(float(a[n].double().pow(2).sum()) for n in floats)
    relative = math.sqrt(dd / aa)
    x, y = ({n: t[n].double().flatten() for n in floats} for t in (a, b))
    norms = {n: float(x[n].norm() * y[n].norm()) for n in floats}
    cosine = min(float(torch.dot(x[n], y[n])) / norms[n] if norms[n] else float(torch.equal(x[n], y[n])) for n in floats)
    assert 0 < relative < 0.1 and cosine < 1

    def run(*args: str):
        return cli("inspect", saved["plain"], "--diff", saved["moved"], "--quiet", *args)

    assert run("--max-rel-l2", f"{relative * 1.001}").code == 0
    below = run("--max-rel-l2", f"{relative * 0.999}")
    assert below.code == 1 and "above --max-rel-l2" in below.err and below.out == ""
    assert run("--min-cosine", f"{cosine - 1e-9}").code == 0
    assert run("--min-cosine", f"{cosine + 1e-9}").code == 1
    # the integer buffer (num_batches_tracked) differs: outside the distances, but different all the same
    different = run("--fail-if-different")
    assert different.code == 1 and "floating tensor(s) differ" in different.err
    assert "integer/bool tensor(s) differ" in different.err
    assert cli("inspect", saved["plain"], "--diff", saved["plain"], "--fail-if-different").code == 0


def test_diff_checks_are_usage_errors_without_diff_or_out_of_range(cli, saved):
    moved = saved["moved"]
    for args in (["--fail-if-different"], ["--diff", moved, "--min-cosine", "2"], ["--diff", moved, "--max-rel-l2", "-1"]):
        result = cli("inspect", saved["plain"], *args)
        assert result.code == 2 and result.err.count("\n") == 1, args


def test_a_filter_that_matches_nothing_compares_nothing(cli, saved):
    result = cli("inspect", saved["plain"], "--diff", saved["moved"], "--filter", "attn")
    assert result.code == 1 and "--filter" in result.err and "nothing compared" in result.err


# --- output names: file suffixes ckptavg does not write ----------------------------------------------------


@pytest.mark.parametrize("name", ["merged.ckpt", "x.gguf", "m.onnx", "m.zip", "m.npz", "M.SAFETENSORS", "model.PT"])
@pytest.mark.parametrize("command", ["average", "export"])
def test_an_output_named_like_a_file_ckptavg_does_not_write_is_refused(cli, torch_run, tmp_path, name, command):
    inputs = sorted(torch_run.glob("*.pt"))[: 2 if command == "average" else 1]
    result = cli(command, *inputs, "-o", tmp_path / name)
    assert result.code == 2 and result.out == ""
    assert result.err.count("\n") == 1 and result.err.startswith(f"error: {tmp_path / name}: ")
    if name.endswith(".ckpt"):
        assert "Lightning" in result.err and "in its inputs' layout: --format same" in result.err
    assert ".safetensors" in result.err and ".pt" in result.err
    assert list(tmp_path.iterdir()) == []  # no folder of that name, no staging or lock left


@pytest.mark.parametrize(
    ("name", "layout"),
    [
        ("m.safetensors", ("safetensors", True)),
        ("m.pt", ("pt", True)),
        ("m.pth.tar", ("pt", True)),
        ("m.bin", ("pt", True)),
        ("run.v2", ("safetensors", False)),
        ("merged-0.5", ("safetensors", False)),
        ("merged", ("safetensors", False)),
    ],
)
def test_output_layout_by_name(name, layout):
    assert output_layout(Path(name), "auto") == layout


@pytest.mark.parametrize("name", ["run.v2", "merged-0.5"])
def test_a_folder_name_with_a_dot_is_still_a_folder(cli, torch_run, tmp_path, name):
    result = cli("average", *sorted(torch_run.glob("*.pt"))[:2], "-o", tmp_path / name)
    assert result.code == 0, result.err
    assert (tmp_path / name / "model.safetensors").is_file()


def test_the_python_api_refuses_the_same_names(torch_run, tmp_path):
    with pytest.raises(UsageError, match="does not write .gguf files"):
        ckptavg.average(sorted(torch_run.glob("*.pt"))[:2], tmp_path / "x.gguf")
    with pytest.raises(UsageError, match="max_shard_size"):
        ckptavg.export(sorted(torch_run.glob("*.pt"))[0], tmp_path / "m.safetensors", max_shard_size="1MB")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["m.safetensors", "m.pt"])
def test_max_shard_size_with_a_single_file_output_is_refused(cli, torch_run, tmp_path, name):
    result = cli("export", sorted(torch_run.glob("*.pt"))[0], "-o", tmp_path / name, "--max-shard-size", "1KB")
    assert result.code == 2 and result.err.count("\n") == 1 and "never sharded" in result.err and "--max-shard-size" in result.err
    assert list(tmp_path.iterdir()) == []
    folder = cli("export", sorted(torch_run.glob("*.pt"))[0], "-o", tmp_path / "folder", "--max-shard-size", "300B")
    assert folder.code == 0, folder.err
    assert len(list((tmp_path / "folder").glob("model-*-of-*.safetensors"))) > 1


# --- select --skip-nonfinite reads only what could be chosen -------------------------------------------------


def poison(path: Path) -> None:
    """A NaN in the checkpoint's last weight tensor, saved again by torch."""
    state = torch.load(path, weights_only=True)
    weights = state["model_state_dict"]
    name = [n for n, t in weights.items() if t.is_floating_point()][-1]
    weights[name].view(-1)[0] = float("nan")
    torch.save(state, path)


class Recorder:
    """The real scan (first_nonfinite), recording which checkpoints it read and how many bytes of each."""

    def __init__(self) -> None:
        self.read: dict[str, int] = {}
        self.progress: list[ReadProgress] = []

    def __call__(self, candidate, on_bytes=None) -> str | None:
        self.read[Path(candidate.path).name] = 0

        def count(n: int) -> None:
            self.read[Path(candidate.path).name] += n
            if on_bytes is not None:
                on_bytes(n)

        return first_nonfinite(Path(candidate.path), on_bytes=count)


def test_last_n_reads_newest_first_and_replaces_a_nonfinite_one(torch_run, tmp_path):
    files = [Path(shutil.copy(p, tmp_path)) for p in sorted(torch_run.glob("*.pt"), key=lambda p: int(p.stem.split("_")[1]))]
    assert len(files) >= 4
    poison(files[-1])
    candidates = gather(files)
    size = {Path(c.path).name: c.tensor_bytes for c in candidates}
    scan = Recorder()
    selection = select(candidates, Policy(last=2, skip_nonfinite=True), has_nonfinite=scan, on_progress=scan.progress.append)

    assert [c.path for c in selection.chosen] == [str(files[-3]), str(files[-2])]  # the newest is replaced by the next older
    assert list(scan.read) == [files[-1].name, files[-2].name, files[-3].name]  # newest first, and no further
    assert scan.read[files[-2].name] == size[files[-2].name] and scan.read[files[-3].name] == size[files[-3].name]
    assert 0 < scan.read[files[-1].name] <= size[files[-1].name]
    assert scan.progress and all(p.phase == "scanning" for p in scan.progress)
    assert scan.progress[-1].bytes_done == sum(scan.read.values()) <= scan.progress[-1].bytes_total
    assert scan.progress[-1].bytes_total < sum(size.values())  # never planned to read the oldest
    assert any("read 3 of 4 checkpoints" in n for n in selection.notes)
    assert any(f"skip_nonfinite=True dropped {files[-1]}" in n for n in selection.notes)


def _eager(paths: list[Path], policy: Policy) -> list[str]:
    """The reference: read every candidate first, drop the non-finite ones, then choose among the rest."""
    finite = [c for c in gather(paths) if first_nonfinite(Path(c.path)) is None]
    return [c.path for c in select(finite, Policy(**{**policy.__dict__, "skip_nonfinite": False})).chosen]


POLICIES = [
    {"last": 3},
    {"top_k": 2, "metric": "eval_loss"},
    {"top_k": 2, "last": 2, "metric": "eval_loss"},
    {"max_step": "best", "last": 3, "metric": "eval_loss"},
    {"max_step": "best", "metric": "eval_loss"},
    {"min_step": 3, "every": 2, "last": 2},
    {},
]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()) or "no-selector")
@pytest.mark.parametrize("bad", [(), (8,), (7, 8), (4, 5), (2, 8)], ids=lambda b: "nan@" + "+".join(map(str, b)) or "finite")
def test_lazy_scan_chooses_what_reading_everything_chooses(tmp_path, policy, bad):
    losses = {1: 3.0, 2: 2.5, 3: 2.2, 4: 1.9, 5: 1.7, 6: 1.8, 7: 1.75, 8: 1.9}  # best at 5, then a dip at 7
    paths = fake_run(tmp_path, list(losses), losses)
    from safetensors.torch import save_file

    for step in bad:
        save_file(
            {"w": torch.tensor([1.0, float("nan"), float(step), 0.0])}, paths[step - 1] / "model.safetensors"
        )  # not copies of each other
    scan = Recorder()
    lazy = select(gather(paths), Policy(**policy, skip_nonfinite=True), has_nonfinite=scan, on_progress=scan.progress.append)
    assert [c.path for c in lazy.chosen] == _eager(paths, Policy(**policy))
    if not policy:
        assert len(scan.read) == len(paths)  # with no selector every candidate can be chosen
    elif not bad:
        assert sorted(scan.read) == sorted(Path(c.path).name for c in lazy.chosen)  # all finite: read what is chosen, no more


def test_cli_last_with_skip_nonfinite_and_the_note(cli, torch_run, tmp_path):
    files = [Path(shutil.copy(p, tmp_path)) for p in sorted(torch_run.glob("*.pt"), key=lambda p: int(p.stem.split("_")[1]))]
    poison(files[-2])
    result = cli("select", *files, "--last", "2", "--skip-nonfinite")
    assert result.code == 0, result.err
    assert result.out.splitlines() == [str(files[-3]), str(files[-1])]
    assert f"note: --skip-nonfinite read 3 of {len(files)} checkpoints" in result.err


# --- the progress display of a read ----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_scan_progress_on_a_terminal_shows_bytes_and_which_checkpoint():
    out = Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None)
    clock = Clock()
    display = ProgressDisplay(True, inputs=4, console=out, clock=clock)
    clock.now += 2
    where = "checkpoint 2 of 3: run/checkpoint-600"
    display.update(ReadProgress(235_000_000, 470_000_000, 1, 3, "run/checkpoint-600", "scanning", where))
    lines = [line.plain for line in display.lines(80)]
    assert lines[0].startswith("scanning ") and "50%" in lines[0] and "235.00 MB of 470.00 MB" in lines[0]
    assert lines[1] == "checkpoint 2 of 3: run/checkpoint-600"
    assert all(len(line) <= 80 for line in lines)


def test_scan_progress_off_a_terminal_is_plain_lines_without_an_empty_plan():
    out = Console(file=io.StringIO(), width=80, force_terminal=False)
    clock = Clock()
    display = ProgressDisplay(True, inputs=4, console=out, clock=clock)
    for i in range(1, 11):
        clock.now += 1.0
        display.update(ReadProgress(i * 47_000_000, 470_000_000, 0, 3, "c", "checking"))
    text = out.file.getvalue()
    assert "plan:" not in text and text.startswith("ckptavg: checking ") and "of 470.00 MB" in text
    quiet = Console(file=io.StringIO(), width=80, force_terminal=False)
    silent = ProgressDisplay(False, inputs=4, console=quiet, clock=clock)
    silent.update(ReadProgress(470_000_000, 470_000_000, 3, 3, "c", "checking"))
    assert quiet.file.getvalue() == ""
