"""`ckptavg inspect`: what a checkpoint holds; --check and --diff stream its tensors."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer

from ckptavg.cli.params import DebugOpt, JsonOpt, KeyOpt, StripOpt, UseEmaOpt
from ckptavg.cli.running import app
from ckptavg.distributed import follower
from ckptavg.errors import UsageError
from ckptavg.render import (
    ProgressDisplay,
    print_diff,
    print_inspect,
    print_json,
)


@app.command()
def inspect(
    path: Annotated[
        Path,
        typer.Argument(
            metavar="CHECKPOINT",
            help="A checkpoint file or folder, or hf://ORG/REPO@REVISION/FOLDER on the Hub (revision and folder optional).",
            show_default=False,
        ),
    ],
    tensors: Annotated[bool, typer.Option("--tensors", help="List every tensor: name, dtype, shape, bytes.")] = False,
    pattern: Annotated[
        str | None, typer.Option("--filter", metavar="REGEX", help="Only tensors whose name matches (with --tensors or --diff).")
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", help="Stream every tensor: report NaN/Inf and all-zero tensors; exit 1 when any.")
    ] = False,
    diff: Annotated[
        Path | None,
        typer.Option(
            "--diff",
            metavar="B",
            help=(
                "Compare with checkpoint B: per-tensor L2, relative L2, cosine, max |a-b|. Nothing compared (no tensor of the "
                "same name and shape) is exit 1."
            ),
        ),
    ] = None,
    fail_if_different: Annotated[
        bool,
        typer.Option(
            "--fail-if-different",
            help="With --diff: exit 1 unless A and B hold the same tensors, same shapes, same values (for CI).",
        ),
    ] = False,
    max_rel_l2: Annotated[
        float | None,
        typer.Option(
            "--max-rel-l2",
            metavar="X",
            help=(
                "With --diff: exit 1 when the relative L2 of all floating tensors exceeds X, or a tensor is missing on one side "
                "or of another shape."
            ),
            show_default=False,
        ),
    ] = None,
    min_cosine: Annotated[
        float | None,
        typer.Option(
            "--min-cosine",
            metavar="X",
            help=(
                "With --diff: exit 1 when a floating tensor's cosine is below X, or a tensor is missing on one side or of "
                "another shape."
            ),
            show_default=False,
        ),
    ] = None,
    key: KeyOpt = None,
    use_ema: UseEmaOpt = False,
    strip_prefix: StripOpt = None,
    json_output: JsonOpt = False,
    quiet: Annotated[
        bool,
        typer.Option("--quiet", "-q", help="No progress bar and no report; errors and the exit code only (--json still prints)."),
    ] = False,
    debug: DebugOpt = False,
) -> None:
    """Show what a checkpoint holds: layout, tensors, dtypes, step, metrics and training state.

    Reads headers and pickle structure only (nothing in a pickle is run); --check and --diff stream the tensors, with a progress bar on a terminal.

    Example:

        ckptavg inspect runs/checkpoint-1000 --json

        ckptavg inspect epoch=3-step=400.ckpt --tensors --filter 'attn'

        ckptavg inspect merged --diff runs/checkpoint-1000 --max-rel-l2 0.01
    """  # noqa: E501  (one line per paragraph: typer keeps the line breaks)
    if follower():
        return
    import ckptavg
    from ckptavg.errors import InputError
    from ckptavg.inspection import diff_problems

    asked = (
        ("--fail-if-different", fail_if_different),
        ("--max-rel-l2", max_rel_l2 is not None),
        ("--min-cosine", min_cosine is not None),
    )
    checks = [flag for flag, on in asked if on]
    if checks and diff is None:
        raise UsageError(None, f"{checks[0]} applies with --diff B")
    if max_rel_l2 is not None and not max_rel_l2 >= 0:
        raise UsageError(None, f"--max-rel-l2 {max_rel_l2:g}: expected a number >= 0")
    if min_cosine is not None and not -1 <= min_cosine <= 1:
        raise UsageError(None, f"--min-cosine {min_cosine:g}: expected a number in [-1, 1]")
    where = {"key": key, "use_ema": use_ema, "strip_prefixes": tuple(strip_prefix or ())}
    display = ProgressDisplay(enabled=not quiet, inputs=1 if diff is None else 2)
    if diff is not None:
        with display.running():
            report = ckptavg.diff(path, diff, pattern=pattern, on_progress=display.update, **where)
        if json_output:
            print_json(report.to_dict())
        elif not quiet:
            print_diff(report)
        problems = diff_problems(report, fail_if_different, max_rel_l2, min_cosine)
        if problems:
            raise InputError(None, f"{report.a} vs {report.b}: {'; '.join(problems)}")
        return
    with display.running() if check else contextlib.nullcontext():
        report = ckptavg.inspect(path, tensors=tensors, pattern=pattern, check=check, on_progress=display.update, **where)
    if json_output:
        print_json(report.to_dict())
    elif not quiet:
        print_inspect(report)
    if report.issues:
        raise InputError(
            report.path,
            f"{len(report.issues)} tensor(s) with NaN, Inf or only zeros: {', '.join(i.name for i in report.issues[:3])}",
        )
