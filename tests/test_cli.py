"""The command line: JSON for scripts, the plan, the summary, and the docs that describe them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from conftest import make_state, read_output, reference_average, save_layout

import ckptavg

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_json_summary(cli, tmp_path):
    paths = [save_layout(make_state(s), tmp_path, "hf-trainer", step=(s + 1) * 100) for s in range(3)]
    result = cli("average", *paths, "-o", tmp_path / "out", "--json", "--weights", "linear")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["strategy"] == "linear" and report["order"] == "step"
    assert [i["step"] for i in report["inputs"]] == [100, 200, 300]
    assert [round(i["weight"], 6) for i in report["inputs"]] == [round(w / 6, 6) for w in (1, 2, 3)]
    assert report["copied_from_newest"] == ["norm.num_batches_tracked", "mask"]
    assert report["output_files"] == ["model.safetensors", "README.md", "ckptavg.json"]
    assert report["copied_files"] == ["config.json", "tokenizer_config.json"]
    for key in (
        "tensors",
        "parameters",
        "bytes_read",
        "bytes_written",
        "seconds",
        "gb_per_s",
        "peak_rss_bytes",
        "version",
        "device",
    ):
        assert key in report
    # integer tensors (8 + 7 bytes) are read from the newest input only
    assert report["peak_rss_bytes"] > 0 and report["bytes_read"] == sum(i["bytes"] for i in report["inputs"]) - 2 * 15


def test_summary_shows_order_and_notes(cli, tmp_path):
    paths = [save_layout(make_state(s), tmp_path, "hf-trainer", step=step) for s, step in enumerate((900, 1000, 80))]
    result = cli("average", *paths, "-o", tmp_path / "out")
    assert result.code == 0, result.err
    order = [int(m) for m in re.findall(r"checkpoint-(\d+)", result.out.split("strategy")[0])]
    assert order == [80, 900, 1000]
    assert "copied from the newest input" in result.out and "peak memory" in result.out
    assert result.err == ""  # no progress bar when stderr is not a terminal


def test_dry_run_prints_plan_and_writes_nothing(cli, tmp_path):
    paths = [save_layout(make_state(s), tmp_path / f"c{s}", "pt") for s in range(2)]
    result = cli("average", *paths, "-o", tmp_path / "out", "--dry-run")
    assert result.code == 0 and "nothing written" in result.out
    assert not (tmp_path / "out").exists()


def test_quiet_prints_nothing(cli, tmp_path):
    paths = [save_layout(make_state(s), tmp_path / f"c{s}", "safetensors") for s in range(2)]
    result = cli("average", *paths, "-o", tmp_path / "out", "--quiet")
    assert result.code == 0 and result.out == "" and result.err == ""


def test_many_inputs(tmp_path):
    states = [make_state(s, torch.bfloat16) for s in range(40)]
    paths = [save_layout(s, tmp_path / f"c{i}", "safetensors") for i, s in enumerate(states)]
    ckptavg.average(paths, tmp_path / "out")
    out, ref = read_output(tmp_path / "out"), reference_average(states)
    assert all(torch.equal(out[k], ref[k]) for k in ref)


def test_version_and_help_do_not_need_torch(cli):
    assert cli("--version").out.strip() == f"ckptavg {ckptavg.__version__}"
    result = cli("average", "--help")
    assert result.code == 0 and "Example" in result.out


def test_readme_starts_with_the_two_commands_and_documents_every_command():
    from ckptavg.cli import app

    head = README.split("## ")[0]
    assert "scripts/demo.sh" in head and "scripts/test.sh" in head
    for command in app.registered_commands:
        assert command.callback.__doc__, command.callback.__name__
        assert f"ckptavg {command.callback.__name__}" in README
