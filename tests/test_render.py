"""What the CLI shows people: progress on and off a terminal, warnings, and summaries that fit 80 columns."""

from __future__ import annotations

import io
import json
import os
import re
import select
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import make_state, save_layout
from rich.console import Console

import ckptavg
from ckptavg.cli.running import run_and_render
from ckptavg.progress import Progress
from ckptavg.render import ProgressDisplay, Throttle, human_bytes, print_export, print_summary
from ckptavg.verify import VerifyProgress

VENV_BIN = Path(sys.executable).parent
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
PLAIN_LINE = re.compile(
    r"^ckptavg: (averaging|exporting|verifying) \d+% [\d.]+ [KMGT]?B of [\d.]+ [KMGT]?B"
    r"(, [\d.]+ [KMGT]?B/s)?(, \d+(\.\d)? (s|min|h) left)?$"
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def console(width: int, terminal: bool) -> Console:
    return Console(
        file=io.StringIO(), width=width, force_terminal=terminal, color_system=None, highlight=False, soft_wrap=not terminal
    )


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """Three Trainer-like checkpoints under runs/, given by relative paths as a user would type them."""
    monkeypatch.chdir(tmp_path)
    for s in range(3):
        save_layout(make_state(s), Path("runs"), "hf-trainer", step=(s + 1) * 100)
    return [f"runs/checkpoint-{(s + 1) * 100}" for s in range(3)]


# --- off a terminal: a plain line about every 10% or 30 s, nothing for short runs -------------------------


def test_throttle_every_tenth_or_thirty_seconds_and_never_in_the_first_second():
    clock = FakeClock()
    throttle = Throttle(clock)
    clock.now += 0.5
    assert not throttle.due(0.5)  # half done in half a second: a short run prints nothing
    clock.now += 0.75
    assert throttle.due(0.55)  # over a second, and past a 10% mark not yet reported
    assert not throttle.due(0.58)  # the same 10% bucket
    clock.now += 1
    assert throttle.due(0.61)
    clock.now += 29
    assert not throttle.due(0.65)  # 29 s later, same bucket: not yet
    clock.now += 1
    assert throttle.due(0.66)  # 30 s since the last line: a line even without a new 10%
    assert not throttle.due(0.67)
    clock.now += 1
    assert throttle.due(1.0)


def plan_report(runs_paths, **changes):
    report = ckptavg.average(runs_paths, None, dry_run=True)
    return replace(report, **changes)


def test_plain_progress_lines_for_a_long_run_off_a_terminal(runs):
    clock, out = FakeClock(), console(200, terminal=False)
    display = ProgressDisplay(True, inputs=3, console=out, clock=clock)
    total = 3_000_000_000
    with display.running():
        display.on_plan(plan_report(runs, bytes_to_read=total))
        for i in range(1, 201):  # 200 chunks over 100 s
            clock.now += 0.5
            display.update(Progress(total * i // 200, total, i // 20, 10, f"layer.{i}.weight"))
        for i in range(1, 41):  # then --verify reads 1 GB back over 20 s
            clock.now += 0.5
            display.update(VerifyProgress(10**9 * i // 40, 10**9, 0, 1, "model.safetensors"))
    lines = out.file.getvalue().splitlines()
    assert "\x1b" not in out.file.getvalue()  # never a rich bar, no escape codes
    assert lines[0] == "ckptavg: plan: 3 inputs (steps 100..300), mean, equal weights, 3.00 GB to read"
    progress = lines[1:]
    assert all(PLAIN_LINE.match(line) for line in progress), progress
    averaging = [line for line in progress if " averaging " in line]
    verifying = [line for line in progress if " verifying " in line]
    assert 9 <= len(averaging) <= 11 and 9 <= len(verifying) <= 11  # about every 10%
    assert averaging[3].startswith("ckptavg: averaging 40% 1.20 GB of 3.00 GB, 30.00 MB/s, ")
    assert averaging[-1].startswith("ckptavg: averaging 100% 3.00 GB of 3.00 GB")


def test_plain_progress_of_a_stalled_run_every_thirty_seconds(runs):
    clock, out = FakeClock(), console(200, terminal=False)
    display = ProgressDisplay(True, inputs=3, console=out, clock=clock)
    with display.running():
        display.on_plan(plan_report(runs))
        for i in range(1, 121):  # 0.01% a second: no 10% mark in 2 minutes
            clock.now += 1
            display.update(Progress(i, 10000, 0, 10, "x"))
    progress = out.file.getvalue().splitlines()[1:]
    assert len(progress) == 4  # at 30, 60, 90 and 120 s


def test_short_run_prints_nothing_off_a_terminal(runs):
    clock, out = FakeClock(), console(200, terminal=False)
    display = ProgressDisplay(True, inputs=3, console=out, clock=clock)
    with display.running():
        display.on_plan(plan_report(runs))
        for i in range(1, 11):
            clock.now += 0.05
            display.update(Progress(i, 10, i, 10, "x"))
    assert out.file.getvalue() == ""


def test_quiet_prints_no_progress_and_no_warning(runs):
    clock, out = FakeClock(), console(200, terminal=False)
    display = ProgressDisplay(False, inputs=3, console=out, clock=clock)
    with display.running():
        display.on_plan(plan_report(runs, warnings=["inputs look unrelated"]))
        for i in range(1, 11):
            clock.now += 10
            display.update(Progress(i, 10, i, 10, "x"))
    assert out.file.getvalue() == ""


def test_slowed_engine_prints_plain_lines_on_stderr_and_stdout_stays_json(runs, tmp_path):
    """The real command, off a terminal, with an engine slowed to about 2 s."""
    slow = (
        "import sys, time\n"
        "import ckptavg.merge.engine as engine\n"
        "run = engine.Engine.run\n"
        "def slow_run(self, writer, on_progress=None):\n"
        "    def slow(p):\n"
        "        time.sleep(0.3)\n"
        "        on_progress(p)\n"
        "    return run(self, writer, slow)\n"
        "engine.Engine.run = slow_run\n"
        "from ckptavg.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", slow, "average", *runs, "-o", "merged", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "80"},
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["strategy"] == "mean"
    lines = result.stderr.splitlines()
    assert lines[0].startswith("ckptavg: plan: 3 inputs (steps 100..300), mean, equal weights"), lines
    assert 1 <= len(lines[1:]) <= 11 and all(PLAIN_LINE.match(line) for line in lines[1:]), lines
    assert lines[-1].startswith("ckptavg: averaging 100% ")


# --- on a terminal: within a second, fitted to the width --------------------------------------------------


def read_pty(command: list[str], cwd: Path, columns: int = 80) -> tuple[float | None, bytes, int]:
    """Run `command` with stderr on a pseudo-terminal: (seconds to its first byte, all it wrote, exit code)."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    started = time.monotonic()
    process = subprocess.Popen(
        command,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=slave,
        env={**os.environ, "COLUMNS": str(columns), "TERM": "xterm"},
    )
    os.close(slave)
    first, data = None, b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 0.05)
            if ready:
                try:
                    piece = os.read(master, 65536)
                except OSError:  # the other end closed
                    break
                if not piece:
                    break
                first = time.monotonic() - started if first is None else first
                data += piece
            elif process.poll() is not None:
                break
    finally:
        os.close(master)
    return first, data, process.wait(timeout=60)


def test_status_line_within_a_second_on_a_terminal(runs, tmp_path):
    first, data, code = read_pty([str(VENV_BIN / "ckptavg"), "average", *runs, "-o", "merged", "--verify"], tmp_path)
    assert code == 0
    text = ANSI.sub("", data.decode())
    assert "opening 3 inputs…" in text
    assert first is not None and first < 1.0, f"first output after {first:.2f} s"


def frames(display: ProgressDisplay, width: int) -> list[str]:
    out = console(width, terminal=True)
    out.print(display)
    return out.file.getvalue().splitlines()


@pytest.mark.parametrize("width", [80, 60, 40])
def test_progress_display_fits_the_width_and_never_wraps(runs, width):
    clock = FakeClock()
    display = ProgressDisplay(True, inputs=12, console=console(width, terminal=True), clock=clock)
    clock.now += 1.3
    (line,) = frames(display, width)
    assert line.endswith(" opening 12 inputs…  1 s")
    report = plan_report(runs, bytes_to_read=12_345_678_901)
    report.inputs = [
        replace(report.inputs[0], path=f"/data/experiments/a-very-long-run-name/checkpoint-{s}", step=s)
        for s in range(100, 1300, 100)
    ]
    display.on_plan(report)
    states = [
        None,
        Progress(5_000_000_000, 12_345_678_901, 17, 290, "model.layers.17.self_attn.q_proj.weight" * 3),
        Progress(12_345_678_901, 12_345_678_901, 289, 290, "lm_head.weight"),
        VerifyProgress(3_000_000_000, 9_000_000_000, 1, 4, "model-00002-of-00004.safetensors"),
    ]
    for state in states:
        if state is not None:
            clock.now += 7
            display.update(state)
        lines = frames(display, width)
        assert len(lines) == 3, lines  # plan, bar, detail: one line each, none wrapped
        assert all(len(line) <= width for line in lines), lines
        assert lines[0].startswith("plan 12 inputs (steps 100..1200)")
        assert re.match(r"(averaging|verifying) +━{10,} +\d+%", lines[1]), lines[1]
    assert lines[1].startswith("verifying") and re.search(" 33%( |$)", lines[1])
    assert lines[2].startswith("reading the output back")


def test_progress_bar_at_80_columns_shows_bytes_rate_and_time_left(runs):
    clock = FakeClock()
    display = ProgressDisplay(True, inputs=3, console=console(80, terminal=True), clock=clock)
    display.on_plan(plan_report(runs, bytes_to_read=3 * 10**9))
    clock.now += 10
    display.update(Progress(10**9, 3 * 10**9, 3, 6, "layer.0.weight"))
    plan, bar, detail = frames(display, 80)
    assert plan == "plan 3 inputs (steps 100..300), mean, equal weights, 3.00 GB to read"
    assert bar.endswith(" 33%  1.00 GB of 3.00 GB  100.00 MB/s  20 s left") and len(bar) == 80
    assert detail == "tensor 3/6 layer.0.weight"


# --- warnings ---------------------------------------------------------------------------------------------


def fake_run(report):
    def run(on_progress, on_plan):
        on_plan(report)
        return report

    return run


@pytest.mark.parametrize("json_output", [False, True])
def test_warnings_go_to_stderr_even_with_json(runs, capsys, json_output):
    report = plan_report(runs, warnings=["input 2 was saved by another model (12 of 40 tensors differ in shape)", "second\nline"])
    run_and_render(fake_run(report), print_summary, json_output, quiet=False, inputs=3)
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "warning: input 2 was saved by another model (12 of 40 tensors differ in shape)",
        "warning: second\\nline",
    ]
    if json_output:
        assert json.loads(captured.out)["warnings"] == report.warnings
    else:
        assert "warning" not in captured.out


def test_quiet_silences_warnings(runs, capsys):
    report = plan_report(runs, warnings=["something looks wrong"])
    run_and_render(fake_run(report), print_summary, False, quiet=True, inputs=3)
    assert capsys.readouterr() == ("", "")


def test_warnings_added_after_the_plan_are_printed_once(runs, capsys):
    report = plan_report(runs, warnings=["at the plan"])

    def run(on_progress, on_plan):
        on_plan(report)
        report.warnings.append("after writing")
        return report

    run_and_render(run, print_summary, True, quiet=False, inputs=3)
    assert capsys.readouterr().err.splitlines() == ["warning: at the plan", "warning: after writing"]


# --- summaries --------------------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    return [w for w in re.split(r"[\s│┃━╇─┼]+", text) if w]


def assert_fits(render, report, width=80):
    """Every line fits `width`, and no word was cut: each word of the unwrapped text is whole in the wrapped one."""
    wide, narrow = console(1000, terminal=False), console(width, terminal=True)
    render(report, console=wide)
    render(report, console=narrow)
    lines = narrow.file.getvalue().splitlines()
    assert all(len(line) <= width for line in lines), [line for line in lines if len(line) > width]
    missing = set(words(wide.file.getvalue())) - set(words(narrow.file.getvalue()))
    assert not missing, (missing, narrow.file.getvalue())
    return narrow.file.getvalue(), wide.file.getvalue()


def test_summary_fits_80_columns(runs):
    report = ckptavg.average(runs, "merged", verify=True)
    report.notes.append(
        "a long note that has to wrap at eighty columns because it goes on and on about the inputs and the output"
    )
    for item in report.inputs:
        item.weights_from = "state_dict_ema (--use-ema), prefix model. stripped (--strip-prefix)"
    narrow, wide = assert_fits(print_summary, report)
    assert "sha256" in narrow and "peak memory" in wide


def test_export_summary_fits_80_columns_and_says_only_what_applies(runs):
    from ckptavg.exporting import export

    report = export(runs[0], "model", dtype="bf16")
    narrow, wide = assert_fits(print_export, report)
    for absent in ("ordered by", "accumulated", "weight", "strategy", "checkpoints"):
        assert absent not in wide, absent
    assert "input        runs/checkpoint-100 (safetensors, step 100)" in wide
    assert "bfloat16 x4" in wide
    assert re.search(r"size +[\d.]+ KB -> [\d.]+ KB \(\d+% smaller\)", wide)


def test_export_command_summary(cli, runs):
    result = cli("export", runs[0], "-o", "model", "--dtype", "bf16")
    assert result.code == 0, result.err
    assert "input        runs/checkpoint-100 (safetensors, step 100)" in result.out
    assert "ordered by" not in result.out and "accumulated" not in result.out and "1.0000" not in result.out


def test_one_checkpoint_points_at_export(cli, runs):
    result = cli("average", runs[0], "-o", "merged")
    assert result.code == 0, result.err
    assert "1 checkpoints" not in result.out
    assert "mean of 1 checkpoint on cpu: nothing was averaged; `ckptavg export` writes one checkpoint's weights" in result.out


def test_dry_run_without_output_says_so_and_what_it_would_read(cli, runs):
    result = cli("average", *runs, "--dry-run")
    assert result.code == 0, result.err
    plan = json.loads(cli("average", *runs, "--dry-run", "--json").out)
    assert plan["bytes_to_read"] > 0  # the lead fills it for dry runs
    assert "output       no output given (dry run)" in result.out
    assert f"dry run      would read {human_bytes(plan['bytes_to_read'])}; nothing written" in result.out
    assert "write -" not in result.out


def test_dry_run_with_output(runs):
    report = plan_report(runs, output="merged", bytes_to_read=65_000)
    out = console(1000, terminal=False)
    print_summary(report, console=out)
    assert "output       merged (not written: dry run)" in out.file.getvalue()
    assert "dry run      would read 65.00 KB; nothing written" in out.file.getvalue()


# --- weights_from and notes shared by several inputs ------------------------------------------------------


def summary_text(report) -> str:
    out = console(1000, terminal=False)
    print_summary(report, console=out)
    return out.file.getvalue()


def test_shared_weights_from_is_said_once_without_a_column(runs):
    report = plan_report(runs)
    for item in report.inputs:
        item.weights_from = "state_dict_ema (--use-ema)"
    text = summary_text(report)
    assert text.count("state_dict_ema (--use-ema)") == 1
    assert "weights from state_dict_ema (--use-ema) (all 3 inputs)" in text
    assert "┃ weights from" not in text


def test_different_weights_from_get_a_column(runs):
    report = plan_report(runs)
    report.inputs[0].weights_from = "model_ema (--use-ema)"
    report.inputs[1].weights_from = "ema (--use-ema)"
    text = summary_text(report)
    assert "┃ weights from" in text.splitlines()[1]
    assert "model_ema (--use-ema)" in text and "ema (--use-ema)" in text
    assert re.search(r"│ 0\.3333 │ -\s*$", text, re.M)  # the third has none


def test_no_weights_from_no_column_and_no_line(runs):
    text = summary_text(plan_report(runs))
    assert "weights from" not in text


def test_a_note_several_inputs_share_is_said_once(runs):
    report = plan_report(runs)
    for item in report.inputs:
        item.notes.append("weights from 'model'")
    report.inputs[0].notes.append("legacy (pre-zip) PyTorch format")
    report.inputs[2].notes.append("skipped 2 non-tensor entries")
    report.inputs[0].notes.append("skipped 2 non-tensor entries")
    notes = [line for line in summary_text(report).splitlines() if line.startswith("note")]
    assert "note         3 inputs: weights from 'model'" in notes
    assert "note         runs/checkpoint-100: legacy (pre-zip) PyTorch format" in notes
    assert "note         2 of 3 inputs (#1, #3): skipped 2 non-tensor entries" in notes
    assert sum("weights from 'model'" in n for n in notes) == 1


def test_pt_inputs_say_where_the_weights_were_once(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = [save_layout(make_state(s), Path(f"c{s}"), "pt", step=s + 1) for s in range(3)]
    result = cli("average", *paths, "-o", "merged")
    assert result.code == 0, result.err
    assert result.out.count("'model_state_dict'") == 1, result.out


# --- --verify reports its progress ------------------------------------------------------------------------


def test_verify_reports_bytes_checked(runs):
    seen = []
    ckptavg.average(runs, "merged", verify=True, on_progress=seen.append)
    checks = [p for p in seen if getattr(p, "phase", None) == "verifying"]
    assert checks and all(isinstance(p, VerifyProgress) for p in checks)
    engine = [p for p in seen if not isinstance(p, VerifyProgress)]
    assert seen.index(checks[0]) > seen.index(engine[-1])  # after the engine's progress
    done = [p.bytes_done for p in checks]
    assert done == sorted(done) and checks[-1].bytes_done == checks[-1].bytes_total
    total = sum(p.stat().st_size for p in Path("merged").iterdir() if p.name != "ckptavg.json")
    assert checks[-1].bytes_total == total
    assert checks[-1].tensors_done == checks[-1].tensors_total == 4  # model.safetensors, config, tokenizer config, README.md
