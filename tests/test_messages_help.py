"""Messages and help: usage errors are one `error:` line with exit 2 (the parser's too, through the real entry
point), --help reads at 80 columns, torch's dtype names are taken, and glob patterns no shell expanded are."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import reference_average
from safetensors.torch import load_file

import ckptavg
from ckptavg.cli import app
from ckptavg.errors import InputError, UsageError
from ckptavg.globbing import expand, expand_one
from ckptavg.inspection import inspect_checkpoint
from ckptavg.selection import Policy

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
COMMANDS = ("average", "select", "inspect", "export", "tune")


def entry_point(*args: object, columns: int | None = None) -> subprocess.CompletedProcess:
    """`ckptavg ARGS...` as a user runs it: a new process through `python -m ckptavg`, stdout and stderr piped."""
    env = {**ENV, "COLUMNS": str(columns)} if columns else ENV
    return subprocess.run(
        [sys.executable, "-m", "ckptavg", *map(str, args)], check=False, capture_output=True, text=True, env=env, timeout=120
    )


def steps_in(run: Path) -> list[Path]:
    """The plain torch loop's step_N.pt files in step order (step_3 ... step_12)."""
    return sorted(run.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))


def state_of(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model_state_dict"]


def one_error_line(stderr: str) -> str:
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and "Usage:" not in stderr and "Traceback" not in stderr, (
        stderr
    )
    return stderr.removeprefix("error: ").rstrip("\n")


# --- a bad --filter regex, and the --debug hint ------------------------------------------------------------


def test_a_bad_filter_regex_is_a_usage_error_naming_the_option(torch_run, cli):
    ckpt = steps_in(torch_run)[0]
    for extra in (("--tensors",), ("--diff", ckpt)):
        result = cli("inspect", ckpt, *extra, "--filter", "[")
        assert result.code == 2 and result.out == ""
        line = one_error_line(result.err)
        assert line.startswith("--filter '['") and "unterminated character set" in line and "internal error" not in line
    with pytest.raises(UsageError, match="unterminated character set") as caught:  # the library: before any file is read
        inspect_checkpoint(torch_run / "missing.pt", pattern="[")
    assert "--" not in str(caught.value)  # neutral words; the CLI says --filter


def test_internal_error_hints_at_debug_only_without_it(torch_run, cli, monkeypatch):
    import ckptavg.inspection

    def broken(*args, **kwargs):
        raise ValueError("boom")

    monkeypatch.setattr(ckptavg.inspection, "inspect_checkpoint", broken)
    plain = cli("inspect", steps_in(torch_run)[0])
    assert (
        plain.code == 1 and one_error_line(plain.err) == "internal error: ValueError: boom (run with --debug for the traceback)"
    )
    debug = cli("inspect", steps_in(torch_run)[0], "--debug")
    assert debug.code == 1 and "Traceback" in debug.err and "--debug" not in debug.err
    assert debug.err.rstrip("\n").splitlines()[-1] == "error: internal error: ValueError: boom"


# --- the parser's errors: one line, exit 2 -----------------------------------------------------------------


def test_parser_errors_are_one_error_line_through_the_real_entry_point(tmp_path):
    typo = entry_point("average", tmp_path / "a", "--wieghts", "1,2", "-o", tmp_path / "out")
    assert (
        typo.returncode == 2
        and typo.stdout == ""
        and typo.stderr == "error: no such option --wieghts (did you mean --weights?)\n"
    )
    command = entry_point("averag", tmp_path / "a")
    assert command.returncode == 2 and command.stdout == ""
    assert one_error_line(command.stderr) == "no such command 'averag' (did you mean 'average'?)"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("average",), "missing argument CHECKPOINT"),
        (("average", "a", "-o"), "option -o requires an argument"),
        (("select", "a", "--last", "x"), "invalid value for --last: input should be a valid integer"),
        (("inspect", "a", "b"), "got unexpected extra argument(s) (b)"),
        (("export", "a", "--bogus"), "no such option --bogus"),
        (("--versoin",), "no such option --versoin (did you mean --version?)"),
    ],
)
def test_every_parsing_error_is_one_lower_case_line(args, expected, cli):
    result = cli(*args)
    assert result.code == 2 and result.out == ""
    assert one_error_line(result.err).startswith(expected), result.err


def test_no_arguments_still_prints_the_help(cli):
    result = cli()
    assert result.code == 2 and "Usage: ckptavg" in result.out + result.err and "error:" not in result.err


# --- --help at 80 columns ----------------------------------------------------------------------------------


def examples(command: str) -> list[str]:
    """The example lines of a command's docstring (each line of a continued one on its own)."""
    doc = next(c.callback.__doc__ for c in app.registered_commands if c.callback.__name__ == command)
    return [line.strip() for line in doc.split("Example:")[1].splitlines() if line.strip()]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_reads_at_80_columns(command):
    result = entry_point(command, "--help", columns=80)
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    for example in examples(command):  # whole on a line: no `--json` wrapped to column 0
        assert any(example in line for line in lines), (example, result.stdout)
    # the descriptions start by column 40 (at 54 behind `uniform|linear|W1,W2,...`, leaving them 24 columns)
    json_row = next(line for line in lines if line.startswith("│ --json "))
    assert json_row.index("Print the result") <= 40, result.stdout
    assert any(line.startswith("│ --debug ") for line in lines), "--debug is listed in every command's help"


def test_average_help_is_short_and_export_says_its_default():
    average = entry_point("average", "--help", columns=80).stdout
    assert len(average.splitlines()) < 150  # 209 lines before the metavars were shortened
    assert "uniform|linear|W1,W2" not in average and "--weights                 SPEC" in average
    export = " ".join(entry_point("export", "--help", columns=80).stdout.replace("│", " ").split())  # the words, unwrapped
    assert "safetensors (default)" not in export
    assert "auto: pt for an OUT named .pt/.pth/.bin, else safetensors. [default: auto]" in export


# --- torch's dtype names ----------------------------------------------------------------------------------


def test_torch_dtype_names_are_aliases_of_the_short_ones(torch_run, tmp_path, cli):
    ckpts = steps_in(torch_run)[:2]
    reports = {}
    for name in ("bf16", "bfloat16", "torch.bfloat16"):
        out = tmp_path / f"{name}.safetensors"
        result = cli(
            "average", *ckpts, "-o", out, "--dtype", name, "--accum-dtype", "float64" if name != "bf16" else "fp64", "--json"
        )
        assert result.code == 0, result.err
        reports[name] = json.loads(result.out)
        got = load_file(out)
        expected = reference_average([state_of(c) for c in ckpts])
        for key, value in expected.items():
            want = value.to(torch.bfloat16) if value.is_floating_point() else value
            assert torch.equal(got[key], want), key
    assert len({json.dumps({k: r[k] for k in ("output_dtypes", "accumulate", "strategy")}) for r in reports.values()}) == 1
    export = cli("export", ckpts[0], "-o", tmp_path / "half.safetensors", "--dtype", "float16", "-q")
    assert export.code == 0 and load_file(tmp_path / "half.safetensors")["body.0.weight"].dtype == torch.float16
    refused = cli("average", *ckpts, "-o", tmp_path / "x.safetensors", "--dtype", "int8")
    assert refused.code == 2 and "expected one of bf16, fp16, fp32" in one_error_line(refused.err)


# --- --min-step above --max-step ----------------------------------------------------------------------------


def test_min_step_above_max_step_is_a_usage_error(torch_run, cli):
    result = cli("select", *steps_in(torch_run), "--min-step", "3000", "--max-step", "2000")
    assert result.code == 2 and result.out == ""
    assert one_error_line(result.err) == "--min-step 3000 is above --max-step 2000: no step can pass both"
    with pytest.raises(UsageError):
        Policy(min_step=3000, max_step=2000).check()
    Policy(min_step=6, max_step=6).check()
    Policy(min_step=3000, max_step="best", metric="val_loss").check()
    single = cli("select", *steps_in(torch_run), "--min-step", "6", "--max-step", "6")
    assert single.code == 0 and single.out == f"{steps_in(torch_run)[1]}\n"


# --- glob patterns no shell expanded -------------------------------------------------------------------------


def test_patterns_are_expanded_in_natural_order(torch_run):
    pattern = str(torch_run / "step_*.pt")
    assert expand([pattern]) == steps_in(torch_run)  # step_3 ... step_12, not step_12 first as sorted() puts it
    assert sorted(str(p) for p in steps_in(torch_run)) != [str(p) for p in steps_in(torch_run)]
    assert expand(["hf://org/run/checkpoint-*", "hf://org/run@main"]) == ["hf://org/run/checkpoint-*", "hf://org/run@main"]
    with pytest.raises(InputError, match="pattern matched nothing"):
        expand([str(torch_run / "nothing-*")])
    with pytest.raises(UsageError, match="pattern matched 4 paths"):
        expand_one(pattern)


def test_select_expands_a_pattern_given_without_a_shell(torch_run):
    result = entry_point("select", torch_run / "step_*.pt", "--last", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(p) for p in steps_in(torch_run)[-2:]]


def test_the_python_api_expands_a_pattern_in_step_order(torch_run, tmp_path):
    out = tmp_path / "linear.safetensors"
    report = ckptavg.average([str(torch_run / "step_*.pt")], out, weights="linear", order="given")
    assert [Path(i["path"]) for i in report.to_dict()["inputs"]] == steps_in(torch_run)
    expected = reference_average([state_of(p) for p in steps_in(torch_run)], weights=[1, 2, 3, 4])
    got = load_file(out)
    assert all(torch.equal(got[k], v) for k, v in expected.items())


def test_a_pattern_matching_nothing_or_several_for_one_checkpoint(torch_run, cli):
    nothing = cli("select", torch_run / "checkpoint-*")
    assert (
        nothing.code == 1
        and one_error_line(nothing.err) == f"{torch_run / 'checkpoint-*'}: pattern matched nothing (no such file or folder)"
    )
    several = cli("inspect", torch_run / "step_*.pt")
    assert several.code == 2 and "pattern matched 4 paths" in one_error_line(several.err)
    one = cli("inspect", torch_run / "step_1*.pt", "--json")
    assert one.code == 0 and json.loads(one.out)["step"] == 12


def test_an_existing_path_with_brackets_is_taken_as_it_is(torch_run, tmp_path, cli):
    literal = tmp_path / "run[1]" / "step_[3].pt"
    literal.parent.mkdir()
    shutil.copy(steps_in(torch_run)[0], literal)
    (tmp_path / "run1").mkdir()
    shutil.copy(steps_in(torch_run)[1], tmp_path / "run1" / "step_3.pt")  # what run[1]/step_[3].pt matches as a pattern
    result = cli("inspect", literal, "--json")
    assert result.code == 0 and json.loads(result.out)["path"] == str(literal) and json.loads(result.out)["step"] == 3
    assert expand([literal]) == [literal]
    assert expand([str(tmp_path / "run[1]" / "step_[3].pt")]) == [str(literal)]
