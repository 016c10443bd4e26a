"""The app the commands register on, and how a command runs: its job under the progress display, then its
report rendered (or its JSON), with --push-to-hub after it."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from ckptavg.cli.params import DebugOpt
from ckptavg.distributed import follower
from ckptavg.errors import CkptavgError, UsageError
from ckptavg.render import ProgressDisplay, print_json
from ckptavg.version import __version__

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Merge the checkpoints of a training run into one better model.",
)


def _print_version(value: bool) -> None:
    if value:
        print(f"ckptavg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=_print_version, help="Print the version and exit.")
    ] = False,
    debug: DebugOpt = False,
) -> None:
    """Merge the checkpoints of a training run into one better model."""


def push_after(
    repo: str | None,
    output: Path | None,
    out_format: str,
    dry_run: bool,
    private: bool,
    revision: str | None,
    message: str | None,
) -> Callable[[Any], Any]:
    """--push-to-hub: checked now, before any work; returns what uploads a finished report's output (hub.py)."""
    if not repo:
        if private or revision or message:
            raise UsageError(
                None,
                f"{'--private' if private else '--revision' if revision else '--commit-message'} applies with --push-to-hub REPO",
            )
        return lambda report: report
    deferred("ckptavg.hub", "check_push")(repo, output, out_format, dry_run)
    if follower():  # under torchrun, rank 0 uploads the job's output once
        return lambda report: report
    push = deferred("ckptavg.hub", "push_report")
    return lambda report: push(report, repo, private=private or None, revision=revision, commit_message=message)


def deferred(module: str, name: str) -> Callable[..., Any]:
    """`module.name`, imported when it is called: the progress display is up before torch is imported."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    return call


def run_and_render(
    run: Callable[..., Any], render: Callable[[Any], None], json_output: bool, quiet: bool, inputs: int = 0
) -> None:
    """Run a job with the progress display wired to its callbacks (a status line from the start, while torch
    is imported and the `inputs` are opened), print its warnings on stderr (also with --json; not with --quiet),
    then its report as JSON or for people."""
    quiet = quiet or follower()  # in a torchrun job, rank 0 speaks for every rank
    display = ProgressDisplay(enabled=not quiet, inputs=inputs)
    failed: CkptavgError | None = None
    with display.running():
        try:
            report = run(on_progress=display.update, on_plan=display.on_plan)
        except CkptavgError as e:  # a failure after the output was written (a push) still has its report
            if getattr(e, "report", None) is None:
                raise
            report, failed = e.report, e  # type: ignore[attr-defined]
    if follower():
        return
    display.warn(report)
    if json_output:
        print_json(report.to_dict())
    elif not quiet:
        render(report)
    if failed is not None:
        raise failed
