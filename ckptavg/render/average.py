"""`average`'s and `export`'s summaries: the inputs table, the notes, where the output went and what it cost."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ckptavg.render.common import PathCell, Rows, count_text, shared_weights_from, stdout_console
from ckptavg.sizes import human_bytes

if TYPE_CHECKING:  # the CLI starts (and --help answers) without importing torch
    from ckptavg.averaging import AverageReport


def inputs_table(report: AverageReport) -> Table:
    """The inputs in the order used; a `weights from` column only when the inputs do not all share one."""
    column_for_weights = len({i.weights_from for i in report.inputs}) > 1
    order = "in the order given" if report.order == "given" else f"ordered by {report.order}"
    table = Table(title=f"inputs, {order}", title_justify="left", show_edge=False)
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("input", ratio=1)
    for column in ("format", "step", "epoch", "weight"):
        table.add_column(column, justify="left" if column == "format" else "right", no_wrap=True)
    if column_for_weights:
        table.add_column("weights from", overflow="fold")
    for i, item in enumerate(report.inputs, 1):
        row = [
            str(i),
            PathCell(item.path),
            item.format,
            "-" if item.step is None else str(item.step),
            "-" if item.epoch is None else str(item.epoch),
            f"{item.weight:.4f}",
        ]
        table.add_row(*row, *([Text(item.weights_from or "-")] if column_for_weights else []))
    return table


def grouped_notes(report: AverageReport) -> list[str]:
    """The report's notes, then the inputs' notes: a note several inputs share is said once for them."""
    which: dict[str, list[int]] = {}
    for i, item in enumerate(report.inputs, 1):
        for note in item.notes:
            which.setdefault(note, []).append(i)
    notes, n = list(report.notes), len(report.inputs)
    for note, numbers in which.items():
        if len(numbers) == 1:
            notes.append(f"{report.inputs[numbers[0] - 1].path}: {note}")
        elif len(numbers) == n:
            notes.append(f"{n} inputs: {note}")
        else:
            notes.append(f"{len(numbers)} of {n} inputs ({', '.join(f'#{k}' for k in numbers)}): {note}")
    return notes


def _output_rows(row: Rows, report: AverageReport) -> None:
    """Where the output went, --verify, and what the run cost; for a dry run what it would read instead."""
    if report.dry_run:
        row("output", f"{report.output} (not written: dry run)" if report.output else "no output given (dry run)")
        row("dry run", f"would read {human_bytes(report.bytes_to_read)}; nothing written")
        return
    files = report.output_files
    if report.output and files == [Path(report.output).name]:  # a single-file output: its name once
        row("output", report.output)
    else:
        row("output", f"{report.output}: {', '.join(files)}")
    if report.copied_files:
        row("copied", ", ".join(report.copied_files))
    if report.verified:
        row("verified", f"every tensor read back from the disk matches what was written ({report.verify_seconds:.2f} s)")
        for name, sha in report.sha256.items():
            row("sha256", f"{sha}  {name}")
    if report.pushed and "error" in report.pushed:
        row(
            "not pushed",
            f"to {report.pushed['repo']}@{report.pushed['revision']}: the upload failed (below); the output above is complete",
        )
    elif report.pushed:
        row("pushed", f"to {report.pushed['repo']}@{report.pushed['revision']}: {report.pushed['commit_url']}")
    row(
        "done",
        f"read {human_bytes(report.bytes_read)}, wrote {human_bytes(report.bytes_written)} in {report.seconds:.2f} s"
        f"{read_rate(report)}, peak memory "
        f"{human_bytes(report.peak_rss_bytes)}{' (the largest rank)' if report.world_size > 1 else ''}",
    )


RATE_FROM_BYTES = 100_000_000  # below, a read rate measures the start-up (torch, opening files), not the disk


def read_rate(report: AverageReport) -> str:
    """` (1.23 GB/s)` for a run that read enough to make the rate mean something, else nothing."""
    if report.bytes_read < RATE_FROM_BYTES or report.seconds <= 0:
        return ""
    return f" ({human_bytes(report.bytes_read / report.seconds)}/s)"


def print_summary(report: AverageReport, console: Console | None = None) -> None:
    """What `average` did (or would do): the inputs table, strategy, tensors, notes, output and cost."""
    out = console or stdout_console()
    row = Rows(out)
    out.print(inputs_table(report))
    n = len(report.inputs)
    if n == 1:
        row(
            "strategy",
            (
                f"{report.strategy} of 1 checkpoint on {report.device}: nothing was averaged; `ckptavg export` writes one "
                "checkpoint's weights"
            ),
        )
    else:
        ranks = f" ({report.world_size} ranks, each its share)" if report.world_size > 1 else ""
        row("strategy", f"{report.strategy} of {n} checkpoints on {report.device}{ranks}")
    shared = shared_weights_from(report)
    if shared:
        row("weights from", shared if n == 1 else f"{shared} (all {n} inputs)")
    row(
        "tensors",
        (
            f"{report.tensors} ({report.parameters:,} parameters); output {count_text(report.output_dtypes)}; accumulated in "
            f"{count_text(report.accumulate)}"
        ),
    )
    for note in grouped_notes(report):
        row("note", note)
    _output_rows(row, report)


def print_export(report: AverageReport, console: Console | None = None) -> None:
    """What `export` did (or would do): the input, its weights, output dtypes, size before and after; no
    weights, order or accumulator, which mean nothing for one checkpoint."""
    out = console or stdout_console()
    row = Rows(out)
    for item in report.inputs:
        where = ", ".join(
            [item.format]
            + ([f"step {item.step}"] if item.step is not None else [])
            + ([f"epoch {item.epoch}"] if item.epoch is not None else [])
        )
        row("input", f"{item.path} ({where})")
        if item.weights_from:
            row("weights from", item.weights_from)
    # nothing is accumulated in an export: each value passes through, or is converted to the output dtype
    if report.adapter and report.adapter.get("mode") == "merged":
        values = ""  # a note says what merging the adapter into its base did
    elif report.input_dtypes == report.output_dtypes:
        values = ", the values unchanged"
    else:  # only the dtypes that changed: integer tensors pass through as they are
        changed = {
            k: n - report.output_dtypes.get(k, 0) for k, n in report.input_dtypes.items() if n > report.output_dtypes.get(k, 0)
        }
        values = f", converted from {count_text(changed)}"
    row("tensors", f"{report.tensors} ({report.parameters:,} parameters); output {count_text(report.output_dtypes)}{values}")
    for note in list(report.notes) + [n for item in report.inputs for n in item.notes]:
        row("note", note)
    before, after = report.input_disk_bytes, report.output_disk_bytes
    if not report.dry_run and before:
        change = (1 - after / before) * 100
        row(
            "size", f"{human_bytes(before)} -> {human_bytes(after)} ({abs(change):.0f}% {'smaller' if change >= 0 else 'larger'})"
        )
    elif before:
        row("size", f"{human_bytes(before)} on disk now, training state included")
    _output_rows(row, report)
