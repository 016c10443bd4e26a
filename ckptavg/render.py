"""Rich rendering for the CLI: progress on stderr, summaries and plans on stdout, JSON for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
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

    def start(self, report: AverageReport) -> None:
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

    def update(self, progress: Progress) -> None:
        if self._progress is not None:
            self._progress.update(
                self._task,
                completed=progress.bytes_done,
                total=progress.bytes_total,
                tensor=progress.tensor[-40:],
                tensors=f"{progress.tensors_done}/{progress.tensors_total}",
            )

    @contextmanager
    def running(self) -> Iterator[ProgressBar]:
        try:
            yield self
        finally:
            if self._progress is not None:
                self._progress.stop()


def inputs_table(report: AverageReport) -> Table:
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


def print_summary(report: AverageReport) -> None:
    stdout = _stdout()
    stdout.print(inputs_table(report))
    dtypes = ", ".join(f"{k} x{v}" for k, v in report.output_dtypes.items())
    accumulate = ", ".join(f"{k} x{v}" for k, v in report.accumulate.items()) or "-"
    if report.strategy == "export":
        stdout.print(f"strategy     export of the weights alone, on {report.device}")
    else:
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
    if report.verified:
        stdout.print(f"verified     every tensor read back from the disk matches what was written ({report.verify_seconds:.2f} s)")
        for name, sha in report.sha256.items():
            stdout.print(f"sha256       {sha}  {name}")
    stdout.print(
        f"done         read {human_bytes(report.bytes_read)}, wrote {human_bytes(report.bytes_written)} in {report.seconds:.2f} s "
        f"({report.gb_per_s:.2f} GB/s), peak memory {human_bytes(report.peak_rss_bytes)}"
    )


def _all_notes(report: AverageReport) -> list[str]:
    notes = list(report.notes)
    for item in report.inputs:
        notes.extend(f"{item.path}: {n}" for n in item.notes)
    return notes


def one_line(text: str) -> str:
    """`text` with line breaks and other control characters escaped (`\\n`): names from a file may hold them."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def print_error(message: str) -> None:
    message = one_line(message)
    if stderr.is_terminal:
        stderr.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True)
    else:
        sys.stderr.write(f"error: {message}\n")


SPARK = "▁▂▃▄▅▆▇█"


def metric_chart(steps: list[int], values: list[float | None], chosen: list[bool], width: int = 72) -> list[str]:
    """Two lines: the metric over steps as a sparkline (lower bar = lower value), and ▲ under chosen ones.

    With more checkpoints than columns, each column stands for a run of consecutive checkpoints: it is marked
    when any of them is chosen (and shows the chosen one's value), else it shows their mean. Every chosen
    checkpoint is marked, however many there are.
    """
    import math

    def spark(value: float | None) -> str:
        if value is None:
            return "·"
        if math.isnan(value):
            return "×"
        level = 0 if high == low else round((min(max(value, low), high) - low) / (high - low) * (len(SPARK) - 1))
        return SPARK[level]

    finite = [v for v in values if v is not None and math.isfinite(v)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 0.0)
    columns = min(len(steps), width)
    bars, marks = [], []
    for col in range(columns):
        members = range(col * len(steps) // columns, (col + 1) * len(steps) // columns)
        pick = any(chosen[i] for i in members)
        known = [values[i] for i in members if values[i] is not None and (chosen[i] or not pick)]
        value = None if not known else known[0] if pick else sum(known) / len(known)
        bars.append(f"[bold green]{spark(value)}[/]" if pick else f"[dim]{spark(value)}[/]")
        marks.append("▲" if pick else " ")
    return ["".join(bars) + f"  [dim]{low:.4g} .. {high:.4g}[/]", f"[green]{''.join(marks)}[/]  [dim]steps {steps[0]} .. {steps[-1]}[/]" if steps else ""]


def print_selection(selection, quiet: bool, json_output: bool = False, invert: bool = False) -> None:
    """Notes on stderr (ignored candidates, missing metrics, what the filters dropped, what --invert kept back)
    unless quiet; the table and chart too when stderr is a terminal and stdout is not JSON."""
    metric = selection.policy.metric
    if quiet:
        return
    for c in selection.ignored:
        stderr.print(f"note: ignored {c.path}: {c.ignored}", markup=False)
    missing = [c.path for c in selection.candidates if metric and c.ignored is None and c.rank_value(metric) is None]
    if missing and not selection.metric_hint:
        stderr.print(f"note: no {metric} for {len(missing)} checkpoint(s): {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}", markup=False)
    for note in selection.notes:
        if note != selection.metric_hint or invert or selection.chosen:  # else the error says it
            stderr.print(f"note: {note}", markup=False)
    if invert:
        reasons: dict[str, list[str]] = {}
        for c in selection.kept_back:
            reasons.setdefault(c.kept_back, []).append(c.path)
        for reason, paths in reasons.items():
            shown = ", ".join(paths[:5]) + (f", ... ({len(paths)} in all)" if len(paths) > 5 else "")
            stderr.print(f"note: --invert kept back ({reason}): {shown}", markup=False)
    if json_output or not stderr.is_terminal:
        return
    table = Table(show_edge=False, title=f"{len(selection.chosen)} of {len(selection.candidates)} chosen", title_justify="left")
    for column in ("step", "checkpoint", metric or "metric", "chosen", "why"):
        table.add_column(column, justify="right" if column in ("step", metric) else "left", overflow="fold")
    for c in selection.candidates:
        value = c.metric(metric)
        why = "; ".join(c.why) or (c.ignored or "")
        if invert and c.kept_back:
            why += f"; kept back: {c.kept_back}"
        table.add_row(
            "-" if c.step is None else str(c.step), escape(c.path), "-" if value is None else f"{value:.5g}",
            "[bold green]yes[/]" if c.chosen else "no", escape(why),
        )
    stderr.print(table)
    ranked = [c for c in selection.candidates if c.ignored is None]
    if metric and any(c.metric(metric) is not None for c in ranked):
        for line in metric_chart([c.step for c in ranked], [c.metric(metric) for c in ranked], [c.chosen for c in ranked]):
            stderr.print(line)


def print_inspect(report) -> None:
    out = _stdout()
    out.print(f"[bold]{escape(report.path)}[/]  {report.format}, {len(report.files)} file(s), {human_bytes(sum(f['bytes'] for f in report.files))}")
    out.print(f"tensors      {report.tensors} ({report.parameters:,} parameters, {human_bytes(report.tensor_bytes)})")
    out.print("dtypes       " + ", ".join(f"{k} {human_bytes(v)}" for k, v in report.bytes_by_dtype.items()))
    out.print(f"step         {report.step if report.step is not None else '-'}   epoch {report.epoch if report.epoch is not None else '-'}")
    if report.metrics:
        out.print("metrics      " + ", ".join(f"{k}={v:.5g}" for k, v in report.metrics.items()), markup=False)
    state = ", ".join(f"{k} {human_bytes(v)}" for k, v in report.training_state.items()) or "none (weights only)"
    out.print(f"training     {state}")
    if report.prefix:
        wrapper = next((w for w in ("module.", "_orig_mod.", "model.") if report.prefix.startswith(w)), None)
        hint = f"  (a training wrapper's: --strip-prefix {wrapper} removes it)" if wrapper else ""
        out.print(f"prefix       {report.prefix}{hint}", markup=False)
    if report.weights_key:
        out.print(f"weights      under {report.weights_key!r}", markup=False)
    if report.top_level_keys:
        out.print("keys         " + ", ".join(report.top_level_keys), markup=False)
    if report.opaque_globals:
        out.print("not run      " + ", ".join(report.opaque_globals[:6]) + (" ..." if len(report.opaque_globals) > 6 else ""), markup=False)
    for note in report.notes:
        out.print(f"note         {note}", markup=False)
    if report.tensor_list is not None:
        table = Table(show_edge=False)
        for column in ("name", "dtype", "shape", "bytes"):
            table.add_column(column, justify="right" if column == "bytes" else "left", overflow="fold")
        for t in report.tensor_list:
            table.add_row(t.name, t.dtype, "x".join(map(str, t.shape)) or "scalar", human_bytes(t.bytes))
        out.print(table)
    if report.issues is not None:
        if not report.issues:
            out.print("check        every tensor is finite and none is all zeros")
        for issue in report.issues:
            problems = [f"{issue.nan} NaN" if issue.nan else "", f"{issue.inf} Inf" if issue.inf else "", "all zeros" if issue.all_zero else ""]
            out.print(f"check        {issue.name}: {', '.join(p for p in problems if p)}", markup=False)


def print_diff(report, limit: int = 20) -> None:
    out = _stdout()
    table = Table(show_edge=False, title=escape(f"{report.a}  vs  {report.b}"), title_justify="left")
    for column in ("tensor", "L2", "relative", "cosine", "max |a-b|"):
        table.add_column(column, justify="left" if column == "tensor" else "right", overflow="fold")
    for t in sorted(report.tensors, key=lambda t: -t.relative)[:limit]:
        table.add_row(t.name, f"{t.l2:.4g}", f"{t.relative:.4g}", f"{t.cosine:.6f}", f"{t.max_abs:.4g}")
    out.print(table)
    if len(report.tensors) > limit:
        out.print(f"[dim]{len(report.tensors) - limit} more tensors (--json lists all)[/]")
    for label, names in (("only in A", report.only_in_a), ("only in B", report.only_in_b)):
        if names:
            out.print(f"{label}    {len(names)}: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}", markup=False)
    for item in report.shape_mismatch:
        out.print(f"shape        {item['name']}: {item['a']} vs {item['b']}", markup=False)
    verdict = "identical" if report.identical else f"relative L2 {report.relative:.4g}, min cosine {report.min_cosine:.6f}, max |a-b| {report.max_abs:.4g}"
    out.print(f"summary      {len(report.tensors)} tensors compared: {verdict}")


def print_export(report) -> None:
    print_summary(report)
    before, after = report.input_disk_bytes, report.output_disk_bytes
    if not report.dry_run and before:
        _stdout().print(f"size         {human_bytes(before)} -> {human_bytes(after)} ({(1 - after / before) * 100:.0f}% smaller)")
