"""ckptavg never deletes or replaces what it did not write: --overwrite, outputs among the inputs, hard links."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_state, read_output, reference_average, save_layout


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and mtime: what must not change when ckptavg refuses."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def run(tmp_path, hf_run):
    """A copy of a real transformers Trainer run: checkpoint-2 ... checkpoint-10 with optimizer and trainer state."""
    return Path(shutil.copytree(hf_run, tmp_path / "run"))


def refused(result, code: int, *needles: str) -> None:
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert result.code == code, result.err
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_overwrite_never_replaces_a_training_checkpoint_given_as_input(cli, run):
    before = tree(run)
    result = cli("average", *sorted(run.glob("checkpoint-*")), "-o", run / "checkpoint-10", "--overwrite")
    refused(result, 3, "checkpoint-10", "is one of the inputs")
    assert tree(run) == before


def test_overwrite_never_replaces_a_training_checkpoint_left_out_of_the_inputs(cli, run):
    before = tree(run)
    result = cli("average", run / "checkpoint-2", run / "checkpoint-4", "-o", run / "checkpoint-10", "--overwrite")
    refused(result, 3, "is a training checkpoint", "trainer_state.json", "--overwrite replaces only an output ckptavg wrote")
    assert tree(run) == before


def test_overwrite_never_replaces_a_folder_of_other_files(cli, tmp_path, run):
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = cli("average", run / "checkpoint-2", run / "checkpoint-4", "-o", out, "--overwrite")
    refused(result, 3, "not a ckptavg output", "notes.txt")
    assert (out / "notes.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


@pytest.mark.parametrize("name", ["merged", "merged.safetensors", "merged.pt"])
def test_overwrite_replaces_a_previous_ckptavg_output(cli, tmp_path, run, name):
    out = tmp_path / name
    assert cli("average", run / "checkpoint-2", run / "checkpoint-4", "-o", out).code == 0
    result = cli("average", run / "checkpoint-6", run / "checkpoint-8", "-o", out, "--overwrite")
    assert result.code == 0, result.err
    again = cli("average", run / "checkpoint-6", run / "checkpoint-8", "-o", tmp_path / ("x" + name))
    assert again.code == 0
    if name.endswith(".pt"):
        a, b = torch.load(out, weights_only=True), torch.load(tmp_path / ("x" + name), weights_only=True)
    else:
        a, b = read_output(out), read_output(tmp_path / ("x" + name))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_overwrite_refuses_a_ckptavg_output_with_files_added_since(cli, tmp_path, run):
    out = tmp_path / "merged"
    assert cli("average", run / "checkpoint-2", run / "checkpoint-4", "-o", out).code == 0
    (out / "eval_results.json").write_text("{}")
    result = cli("average", run / "checkpoint-6", run / "checkpoint-8", "-o", out, "--overwrite")
    refused(result, 3, "files added since", "eval_results.json")
    assert (out / "eval_results.json").exists()


def test_overwrite_refuses_a_foreign_safetensors_file(cli, tmp_path, run):
    out = save_layout(make_state(0), tmp_path / "theirs", "safetensors")
    before = out.read_bytes()
    result = cli("average", run / "checkpoint-2", run / "checkpoint-4", "-o", out, "--overwrite")
    refused(result, 3, "did not write")
    assert out.read_bytes() == before


def test_output_inside_an_input_is_refused(cli, run):
    before = tree(run)
    result = cli("average", run / "checkpoint-2", run / "checkpoint-4", "-o", run / "checkpoint-4" / "merged")
    refused(result, 3, "inside the input")
    assert tree(run) == before


def test_output_inside_an_input_is_refused_for_a_weights_file_input(cli, run):
    inputs = [run / "checkpoint-2" / "model.safetensors", run / "checkpoint-4" / "model.safetensors"]
    result = cli("average", *inputs, "-o", run / "checkpoint-4" / "model.safetensors", "--overwrite")
    refused(result, 3, "is one of the inputs")


@pytest.mark.parametrize("out", [".", "..", "./"])
def test_the_working_folder_is_not_an_output(cli, tmp_path, run, out, monkeypatch):
    monkeypatch.chdir(run)
    before = tree(run)
    result = cli("average", "checkpoint-2", "checkpoint-4", "-o", out, "--overwrite")
    refused(result, 2, "not a new output")
    assert tree(run) == before


def test_an_output_folder_that_cannot_hold_files(cli, tmp_path, run):
    result = cli("average", run / "checkpoint-2", run / "checkpoint-4", "-o", "/proc/out")
    refused(result, 3, "/proc/out", "cannot be written")
    assert "free space" not in result.err


def test_a_hard_link_is_the_same_checkpoint_given_twice(cli, tmp_path):
    a = save_layout(make_state(0), tmp_path / "a", "pt")
    b = save_layout(make_state(1), tmp_path / "b", "pt")
    os.link(a, tmp_path / "last.pt")
    result = cli("average", a, b, tmp_path / "last.pt", "-o", tmp_path / "out")
    refused(result, 2, "given twice", "hard link")
    assert not (tmp_path / "out").exists()


def test_pth_tar_output_is_a_file(cli, tmp_path):
    states = [make_state(s) for s in range(2)]
    paths = [save_layout(s, tmp_path / f"in{i}", "safetensors") for i, s in enumerate(states)]
    out = tmp_path / "model.pth.tar"
    assert cli("average", *paths, "-o", out).code == 0
    assert out.is_file()
    loaded = torch.load(out, weights_only=True, mmap=True)
    expected = reference_average(states)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
