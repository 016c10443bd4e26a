"""Rich rendering for the CLI: progress on stderr, summaries and plans on stdout, JSON for scripts."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

if TYPE_CHECKING:  # the CLI starts (and --help answers) without importing torch
    from ckptavg.averaging import AverageReport
    from ckptavg.merge.engine import Progress

stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def _stdout() -> Console:
    # Piped output keeps whole paths on one line, so scripts can grep it; a terminal gets its own width.
    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 1000)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def print_json(data: dict) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


class ProgressBar:
    """Bytes read, tensors, throughput and ETA on stderr; silent when stderr is not a terminal or with --quiet."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and stderr.is_terminal
        self._progress: Progress | None = None
        self._task = None

    def start(self, report: "AverageReport") -> None:
        if not self.enabled or report.dry_run:
            return
        self._progress = Progress(
            TextColumn("[bold]averaging[/] {task.fields[tensor]}", justify="left"),
            BarColumn(),
            TextColumn("{task.fields[tensors]} tensors"),
            DownloadColumn(binary_units=False),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=stderr,
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task("average", total=None, tensor="", tensors="0")

    def update(self, progress: "Progress") -> None:
        if self._progress is not None:
            self._progress.update(
                self._task,
                completed=progress.bytes_done,
                total=progress.bytes_total,
                tensor=progress.tensor[-40:],
                tensors=f"{progress.tensors_done}/{progress.tensors_total}",
            )

    @contextmanager
    def running(self) -> Iterator["ProgressBar"]:
        try:
            yield self
        finally:
            if self._progress is not None:
                self._progress.stop()


def inputs_table(report: "AverageReport") -> Table:
    table = Table(title=f"inputs, ordered by {report.order}", title_justify="left", show_edge=False)
    for column in ("#", "input", "format", "step", "epoch", "weight"):
        table.add_column(column, justify="right" if column in ("#", "step", "epoch", "weight") else "left", overflow="fold")
    for i, item in enumerate(report.inputs, 1):
        table.add_row(
            str(i), item.path, item.format,
            "-" if item.step is None else str(item.step),
            "-" if item.epoch is None else str(item.epoch),
            f"{item.weight:.4f}",
        )
    return table


def print_summary(report: "AverageReport") -> None:
    stdout = _stdout()
    stdout.print(inputs_table(report))
    dtypes = ", ".join(f"{k} x{v}" for k, v in report.output_dtypes.items())
    accumulate = ", ".join(f"{k} x{v}" for k, v in report.accumulate.items()) or "-"
    stdout.print(f"strategy     {report.strategy} of {len(report.inputs)} checkpoints on {report.device}")
    stdout.print(f"tensors      {report.tensors} ({report.parameters:,} parameters); output {dtypes}; accumulated in {accumulate}")
    for note in _all_notes(report):
        stdout.print(f"note         {note}")
    if report.dry_run:
        stdout.print(f"dry run      would read {human_bytes(sum(i.bytes for i in report.inputs))} and write {report.output or '-'}; nothing written")
        return
    stdout.print(f"output       {report.output}: {', '.join(report.output_files)}")
    if report.copied_files:
        stdout.print(f"copied       {', '.join(report.copied_files)}")
    stdout.print(
        f"done         read {human_bytes(report.bytes_read)}, wrote {human_bytes(report.bytes_written)} in {report.seconds:.2f} s "
        f"({report.gb_per_s:.2f} GB/s), peak memory {human_bytes(report.peak_rss_bytes)}"
    )


def _all_notes(report: "AverageReport") -> list[str]:
    notes = list(report.notes)
    for item in report.inputs:
        notes.extend(f"{item.path}: {n}" for n in item.notes)
    return notes


def print_error(message: str) -> None:
    stderr.print(f"[bold red]error:[/] {message}", markup=True, highlight=False, soft_wrap=True) if stderr.is_terminal else sys.stderr.write(f"error: {message}\n")
