"""What people see at 80 columns: paths shortened rather than broken, a compact `select` table for long runs, a
chart that marks every chosen checkpoint, `--diff` numbers kept whole, and the wording of the summaries."""

from __future__ import annotations

import io
import json
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import save_file
from test_render import read_pty
from test_select import fake_run

import ckptavg
from ckptavg.checkpoint import LoadOptions
from ckptavg.inspection import diff_checkpoints
from ckptavg.render import plan_line, print_diff, print_export, print_selection, print_summary, shorten_path
from ckptavg.selection import Policy, gather, select

ROOT = Path(__file__).parents[1]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
STEPS = [500 * i for i in range(1, 121)]


def terminal(width: int = 80) -> Console:
    return Console(file=io.StringIO(), width=width, force_terminal=True, color_system=None, highlight=False)


def lines_of(console: Console) -> list[str]:
    return console.file.getvalue().splitlines()


@pytest.fixture(scope="module")
def long_run(tmp_path_factory) -> list[Path]:
    """120 Trainer-like checkpoints deep under a long absolute path, eval_loss recorded with four decimals."""
    root = tmp_path_factory.mktemp("render80") / "experiments" / "a-rather-long-run-name" / "run1"
    losses = {s: round(2.0 / (1 + s / 5000) + 0.03 * ((s * 7919) % 11) / 11, 4) for s in STEPS}
    return fake_run(root, STEPS, losses)


# --- paths: shortened from the left, never wrapped -------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "expected"),
    [
        (80, "/data/exp/run1/checkpoint-7000"),
        (25, "…/run1/checkpoint-7000"),
        (20, "…/checkpoint-7000"),
        (12, "…kpoint-7000"),
        (1, "…"),
    ],
)
def test_shorten_path_keeps_the_tail_from_a_folder_boundary(width, expected):
    assert shorten_path("/data/exp/run1/checkpoint-7000", width) == expected


def test_input_table_shortens_absolute_paths_instead_of_wrapping_them(long_run):
    paths = long_run[13:19]  # checkpoint-7000 .. checkpoint-9500
    report = ckptavg.average(paths, None, dry_run=True)
    out = terminal()
    print_summary(report, console=out)
    lines = lines_of(out)
    assert all(len(line) <= 80 for line in lines), lines
    names = [p.name for p in paths]
    assert len(str(paths[0])) > 40  # too long for the column: it has to give way
    found = re.findall(r"checkpoint-\d+", out.file.getvalue())
    assert found == names, lines  # each name whole, once, on one line: never `checkpoint-7` / `000`
    for path in paths:
        assert any(re.search(rf"(^| )(…/\S*)?{re.escape(path.name)} ", line) for line in lines), path
    assert [i["path"] for i in json.loads(json.dumps(report.to_dict()))["inputs"]] == [str(p) for p in paths]


# --- select: a compact table and chart for a long run ----------------------------------------------------


def table_rows(lines: list[str]) -> list[list[str]]:
    return [[cell.strip() for cell in line.split("│")] for line in lines if "│" in line]


def test_select_table_for_120_checkpoints_fits_in_a_screen(long_run):
    selection = select(gather(long_run), Policy(last=5))
    out = terminal()
    print_selection(selection, quiet=False, console=out)
    lines = lines_of(out)
    assert len(lines) <= 14, lines  # 243 lines before: every row wrapped, all 120 shown
    assert all(len(line) <= 80 for line in lines)
    assert lines[0].rstrip() == "5 of 120 chosen (among the last 5); the other 115: not among the last 5"
    header = lines[1]
    assert "metric" not in header and "why" not in header  # no --metric; the reasons are said once, in the title
    rows = table_rows(lines)
    shown = [row for row in rows if row[0] != "…"]
    more = [int(re.fullmatch(r"… (\d+) more not chosen", row[1]).group(1)) for row in rows if row[0] == "…"]
    assert len(shown) + sum(more) == 120
    assert [row[0] for row in shown] == [str(s) for s in STEPS[:3] + STEPS[-5:]]
    assert [row[-1] for row in shown] == ["no"] * 3 + ["yes"] * 5
    assert all(row[1].endswith(f"checkpoint-{row[0]}") for row in shown)


def test_select_table_and_chart_with_a_metric_show_every_chosen_checkpoint(long_run):
    selection = select(gather(long_run), Policy(top_k=5, last=2, metric="eval_loss"))
    chosen = [c.step for c in selection.chosen]
    assert len(chosen) == 7
    out = terminal()
    print_selection(selection, quiet=False, console=out)
    lines = lines_of(out)
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    rows = table_rows(lines)
    assert [int(row[0]) for row in rows if row[-2 if len(row) == 5 else -1] == "yes"] == chosen
    assert any(re.match(r"^ +step ┃ checkpoint +┃ eval_loss ┃ chosen", line) for line in lines)
    bars, marks = lines[-2], lines[-1]
    columns = len(bars.partition("  ")[0])
    assert marks[:columns].count("▲") == 7 and marks[columns:].startswith("  steps 500 .. 60000")
    assert bars.endswith(
        f"  {min(c.metrics['eval_loss'] for c in selection.candidates):.4g} .. "
        f"{max(c.metrics['eval_loss'] for c in selection.candidates):.4g}"
    )


def test_select_through_the_cli_on_an_80_column_terminal(long_run, tmp_path):
    command = ["env", f"PYTHONPATH={ROOT}", sys.executable, "-m", "ckptavg", "select", *map(str, long_run), "--last", "5"]
    _, data, code = read_pty(command, tmp_path, columns=80)
    assert code == 0
    text = ANSI.sub("", data.decode())
    assert text.count("\n") <= 16, text  # 244 before
    assert "… 112 more not chosen" in text


# --- inspect --diff: numbers whole ------------------------------------------------------------------------


def test_diff_summary_keeps_every_number_whole_at_80_columns(tmp_path):
    folder = tmp_path / "an-experiment-with-a-long-name"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    a = {f"block{i}.weight": torch.randn(16, 16, generator=g) for i in range(3)} | {
        "step": torch.tensor(3),
        "only_a": torch.zeros(2),
    }
    b = {
        k: v + 1e-3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 1 for k, v in a.items() if k != "only_a"
    }
    save_file(a, folder / "checkpoint-70000.safetensors")
    save_file(b | {"only_b": torch.ones(2)}, folder / "checkpoint-75000.safetensors")
    report = diff_checkpoints(folder / "checkpoint-70000.safetensors", folder / "checkpoint-75000.safetensors", LoadOptions())
    wide, narrow = terminal(1000), terminal(80)
    print_diff(report, console=wide)
    print_diff(report, console=narrow)
    assert all(len(line) <= 80 for line in lines_of(narrow))
    summary = next(line for line in lines_of(wide) if line.startswith("summary"))
    numbers = [word for word in re.split(r"[\s,;:]+", summary) if re.fullmatch(r"[\d.e+-]+", word)]
    assert len(numbers) >= 6 and len(summary) > 80  # it has to wrap at 80
    words = set(re.split(r"[\s,;:]+", narrow.file.getvalue()))
    assert [n for n in numbers if n not in words] == [], narrow.file.getvalue()


# --- wording ----------------------------------------------------------------------------------------------


def test_plan_line_gives_the_range_of_the_weights_and_the_ends_by_age(long_run):
    paths = long_run[:6]
    given = [3, 1, 2, 4, 5, 6]  # the smallest is the second: neither end
    w = [x / sum(given) for x in given]
    report = ckptavg.average(paths, None, dry_run=True, weights=",".join(map(str, given)))
    assert plan_line(report).split(", ")[2:4] == [
        f"weights {min(w):.3g}..{max(w):.3g} (oldest {w[0]:.3g}",
        f"newest {w[-1]:.3g})",
    ]
    report = ckptavg.average(paths[::-1], None, dry_run=True, weights=",".join(map(str, given)), order="given")
    assert f"weights {min(w):.3g}..{max(w):.3g} (first {w[0]:.3g}, last {w[-1]:.3g})" in plan_line(report)
    out = terminal(1000)
    print_summary(report, console=out)
    assert lines_of(out)[0].rstrip() == "inputs, in the order given"


def summary_of(report, render=print_summary) -> str:
    out = terminal(1000)
    render(report, console=out)
    return out.file.getvalue()


def test_single_file_output_is_named_once_and_small_runs_show_no_rate(long_run, tmp_path):
    report = ckptavg.average(long_run[:3], tmp_path / "m.safetensors")
    text = summary_of(report)
    assert re.search(rf"^output +{re.escape(str(tmp_path / 'm.safetensors'))} *$", text, re.MULTILINE), text
    assert "m.safetensors: m.safetensors" not in text
    assert "/s)" not in text and "GB/s" not in text  # 0.00 GB/s measured the start-up
    big = summary_of(replace(report, bytes_read=3_000_000_000, seconds=2.0))
    assert "in 2.00 s (1.50 GB/s)" in big
    folder = summary_of(ckptavg.average(long_run[:3], tmp_path / "merged"))
    assert re.search(r"^output +\S+merged: model\.safetensors, ", folder, re.MULTILINE)


def test_export_says_the_values_pass_through_or_are_converted_never_accumulated(long_run, tmp_path):
    from ckptavg.exporting import export

    same = export(long_run[0], tmp_path / "same")
    assert same.to_dict()["accumulate"] == {}
    assert "tensors      1 (4 parameters); output float32 x1, the values unchanged" in summary_of(same, print_export)
    bf16 = export(long_run[0], tmp_path / "bf16", dtype="bf16")
    assert "output bfloat16 x1, converted from float32 x1" in summary_of(bf16, print_export)
    assert "accumulated" not in summary_of(bf16, print_export) + (tmp_path / "bf16" / "README.md").read_text()
    assert json.loads((tmp_path / "bf16" / "ckptavg.json").read_text())["accumulate"] == {}


def test_weights_from_is_null_for_tensors_taken_as_stored(long_run, cli):
    result = cli("average", *long_run[:2], "--dry-run", "--json")
    assert result.code == 0, result.err
    assert [i["weights_from"] for i in json.loads(result.out)["inputs"]] == [None, None]
    assert "weights from" not in summary_of(ckptavg.average(long_run[:2], None, dry_run=True))


def test_card_of_inputs_in_the_order_given(long_run, tmp_path):
    ckptavg.average(long_run[:2], tmp_path / "given", order="given")
    card = (tmp_path / "given" / "README.md").read_text()
    assert "(inputs in the order given)" in card and "ordered by given" not in card


def test_spike_threshold_has_the_metric_s_precision(tmp_path):
    losses = {100: 1.2034, 200: 1.1871, 300: 1.1795, 400: 1.8912, 500: 1.1702, 600: 1.1688}
    selection = select(gather(fake_run(tmp_path, list(losses), losses)), Policy(metric="eval_loss", skip_spikes=True))
    (spike,) = [c for c in selection.candidates if not c.chosen]
    match = re.fullmatch(r"eval_loss spike: 1\.8912 beyond (\d+\.\d+) \(neighbours' median \+ 3 x MAD\)", spike.why[0])
    assert match, spike.why
    threshold = match.group(1)
    assert len(threshold.split(".")[1]) == 4 and 1.17 < float(threshold) < 1.8912


def test_export_names_only_the_dtypes_it_converted(tmp_path):
    """An integer tensor passes through an export unchanged: it is not among the dtypes 'converted from'."""
    from safetensors.torch import save_file

    from ckptavg.exporting import export

    save_file({"w": torch.ones(4), "step": torch.tensor(3)}, tmp_path / "c.safetensors")
    text = summary_of(export(tmp_path / "c.safetensors", tmp_path / "out", dtype="bf16"), print_export)
    assert re.search(r"output .*bfloat16 x1.*, converted from float32 x1$", text, re.MULTILINE), text
    assert "converted from int64" not in text and "int64 x1, float32" not in text
