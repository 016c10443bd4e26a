"""Rich rendering for the CLI: progress on stderr, summaries and plans on stdout, JSON for scripts."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

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


SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


def human_seconds(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def plan_line(report: AverageReport) -> str:
    """One line for the plan: inputs (and their steps), strategy and weights, bytes to read. ASCII only: it
    also goes to logs."""
    n = len(report.inputs)
    steps = [i.step for i in report.inputs if i.step is not None]
    where = ""
    if steps:
        where = f" (step {steps[0]})" if len(set(steps)) == 1 else f" (steps {min(steps)}..{max(steps)})"
    parts = [f"{n} input{'' if n == 1 else 's'}{where}", report.strategy]
    weights = [i.weight for i in report.inputs]
    if n > 1:
        if max(weights) - min(weights) < 1e-9:
            parts.append("equal weights")
        elif n <= 4:
            parts.append("weights " + ", ".join(f"{w:.3g}" for w in weights))
        else:
            parts.append(f"weights {weights[0]:.3g} .. {weights[-1]:.3g}")
    if report.bytes_to_read:
        parts.append(f"{human_bytes(report.bytes_to_read)} to read")
    return ", ".join(parts)


class Throttle:
    """When a plain (off-terminal) progress line is due: each time the work crosses another `step` (10%), or
    `interval` seconds (30 s) after the last line; never in the first `quiet_for` seconds, so a short run
    prints nothing."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, step: float = 0.1, interval: float = 30.0, quiet_for: float = 1.0) -> None:
        self.clock, self.step, self.interval, self.quiet_for = clock, step, interval, quiet_for
        self.started = self.last_time = clock()
        self.last_bucket = 0

    def due(self, fraction: float) -> bool:
        now = self.clock()
        if now - self.started < self.quiet_for:
            return False
        bucket = int(min(max(fraction, 0.0), 1.0) / self.step + 1e-9)
        if bucket > self.last_bucket or now - self.last_time >= self.interval:
            self.last_bucket, self.last_time = max(bucket, self.last_bucket), now
            return True
        return False


class ProgressDisplay:
    """What a running command shows on stderr, and its warnings.

    On a terminal: a status line at once ("opening N inputs…", while torch is imported and the inputs are
    opened), then the plan, a bar while the engine runs and another while --verify reads the output back (or
    while `select --skip-nonfinite` and `inspect --check/--diff` read tensors: their progress has a `phase`),
    all fitted to the terminal's width and cleared at the end. Off a terminal (CI logs): a plain line about
    every 10% or 30 s of a run that lasts over a second, never a bar. Warnings are `warning: ...` lines. With
    `enabled` false (--quiet): nothing at all.
    """

    def __init__(self, enabled: bool, inputs: int = 0, console: Console | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.console = console or stderr
        self.enabled = enabled
        self.terminal = self.console.is_terminal
        self.inputs = inputs
        self.clock = clock
        self.started = clock()
        self.phase = "opening"  # opening, then the verb (averaging / exporting), then verifying
        self.verb = "averaging"
        self.plan = ""
        self.progress: Progress | None = None
        self.phase_started = self.started
        self.throttle: Throttle | None = None
        self._plan_printed = False
        self._warned = 0
        self._live = None

    # callbacks of average() / export()
    def on_plan(self, report: AverageReport) -> None:
        self.plan = plan_line(report)
        self.verb = "exporting" if report.strategy == "export" else "averaging"
        self.phase, self.phase_started, self.progress = self.verb, self.clock(), None
        self.throttle = Throttle(self.clock)
        self.warn(report)

    def update(self, progress: Progress) -> None:
        phase = getattr(progress, "phase", self.verb)
        if phase != self.phase:
            self.phase, self.phase_started = phase, self.clock()
            self.throttle = Throttle(self.clock)
        self.progress = progress
        if self.enabled and not self.terminal and self.throttle is not None:
            fraction = progress.bytes_done / progress.bytes_total if progress.bytes_total else 1.0
            if self.throttle.due(fraction):
                if not self._plan_printed and self.plan:
                    self._plan_printed = True
                    self._write(f"ckptavg: plan: {self.plan}")
                self._write(f"ckptavg: {self.status_text()}")

    def warn(self, report: AverageReport) -> None:
        """Print the report's warnings not printed yet, one `warning: ...` line each."""
        new, self._warned = report.warnings[self._warned :], len(report.warnings)
        if not self.enabled:
            return
        for message in new:
            if self.terminal:
                self.console.print(Text.assemble(("warning:", "bold yellow"), " ", one_line(message)))
            else:
                self._write(f"warning: {one_line(message)}")

    # what is shown
    def _write(self, line: str) -> None:
        self.console.file.write(line + "\n")
        self.console.file.flush()

    def _rate_and_eta(self) -> tuple[float, float | None]:
        p = self.progress
        elapsed = self.clock() - self.phase_started
        if p is None or elapsed <= 0 or p.bytes_done <= 0:
            return 0.0, None
        rate = p.bytes_done / elapsed
        return rate, max(p.bytes_total - p.bytes_done, 0) / rate

    def status_text(self) -> str:
        """The plain progress line: `averaging 40% 1.20 GB of 3.00 GB, 0.90 GB/s, 12 s left`."""
        p = self.progress
        if p is None:
            return self.phase
        fraction = p.bytes_done / p.bytes_total if p.bytes_total else 1.0
        rate, eta = self._rate_and_eta()
        text = f"{self.phase} {fraction:.0%} {human_bytes(p.bytes_done)} of {human_bytes(p.bytes_total)}"
        if rate:
            text += f", {human_bytes(rate)}/s"
        if eta is not None:
            text += f", {human_seconds(eta)} left"
        return text

    def lines(self, width: int) -> list[Text]:
        """The terminal display at `width` columns: every line fits, none wraps."""
        elapsed = self.clock() - self.started
        if self.phase == "opening":
            spin = SPINNER[int(elapsed * 10) % len(SPINNER)]
            what = f"opening {self.inputs} input{'' if self.inputs == 1 else 's'}…" if self.inputs else "starting…"
            return [_fit(Text.assemble((spin, "cyan"), " ", what, (f"  {elapsed:.0f} s", "dim")), width)]
        out = [_fit(Text.assemble(("plan ", "dim"), self.plan), width)] if self.plan else []
        p = self.progress
        done, total = (p.bytes_done, p.bytes_total) if p else (0, 0)
        fraction = done / total if total else 0.0
        rate, eta = self._rate_and_eta()
        tail = [f"{fraction:>4.0%}", f"{human_bytes(done)} of {human_bytes(total)}"]
        if rate:
            tail.append(f"{human_bytes(rate)}/s")
        if eta is not None:
            tail.append(f"{human_seconds(eta)} left")
        label = f"{self.phase:<9} "
        while True:
            tail_text = " " + "  ".join(tail)
            bar_width = width - len(label) - len(tail_text)
            if bar_width >= 10 or len(tail) == 1:
                break
            tail.pop()
        bar_width = max(bar_width, 1)
        filled = int(bar_width * min(fraction, 1.0))
        out.append(_fit(Text.assemble((label, "bold"), ("━" * filled, "magenta"), ("━" * (bar_width - filled), "grey23"), tail_text), width))
        if p is not None and getattr(p, "detail", ""):  # a read (select --skip-nonfinite, inspect --check/--diff)
            detail = p.detail
        elif p is not None and self.phase == "verifying":
            detail = f"reading the output back from the disk: {p.tensor} (file {min(p.tensors_done + 1, p.tensors_total)} of {p.tensors_total})"
        elif p is not None and done >= total:
            detail = "writing the last chunks to the disk…"
        elif p is not None:
            detail = f"tensor {p.tensors_done}/{p.tensors_total} {p.tensor}"
        else:
            detail = "reading…"
        out.append(_fit(Text(one_line(detail), style="dim"), width))
        return out

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for line in self.lines(options.max_width):
            yield line

    @contextmanager
    def running(self) -> Iterator[ProgressDisplay]:
        """Shows the terminal display (when enabled and on a terminal) for the duration of the block."""
        if self.enabled and self.terminal:
            self._live = Live(self, console=self.console, transient=True, refresh_per_second=10, redirect_stdout=False, redirect_stderr=False)
            self._live.start()
        try:
            yield self
        finally:
            if self._live is not None:
                self._live.stop()
                self._live = None


def _fit(text: Text, width: int) -> Text:
    text.no_wrap = True
    text.overflow = "ellipsis"
    text.truncate(width, overflow="ellipsis")
    return text


class _Rows:
    """The label / value lines of a summary. A value wraps at spaces under its own column at a terminal's
    width (a word longer than the line, such as a long path, is folded), never mid-word at the edge."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def __call__(self, label: str, value: str | Text) -> None:
        grid = Table.grid(padding=(0, 1))
        grid.add_column(no_wrap=True, min_width=12)
        grid.add_column(overflow="fold")
        grid.add_row(label, value if isinstance(value, Text) else Text(value))
        self.console.print(grid)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in counts.items()) or "-"


def _shared_weights_from(report: AverageReport) -> str | None:
    """The weights_from every input shares, when they all share one."""
    found = {i.weights_from for i in report.inputs}
    return found.pop() if len(found) == 1 else None


def inputs_table(report: AverageReport) -> Table:
    """The inputs in the order used; a `weights from` column only when the inputs do not all share one."""
    column_for_weights = _shared_weights_from(report) is None
    table = Table(title=f"inputs, ordered by {report.order}", title_justify="left", show_edge=False)
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("input", overflow="fold", ratio=1)
    for column in ("format", "step", "epoch", "weight"):
        table.add_column(column, justify="left" if column == "format" else "right", no_wrap=True)
    if column_for_weights:
        table.add_column("weights from", overflow="fold")
    for i, item in enumerate(report.inputs, 1):
        row = [
            str(i), Text(item.path), item.format,
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


def _output_rows(row: _Rows, report: AverageReport) -> None:
    """Where the output went, --verify, and what the run cost; for a dry run what it would read instead."""
    if report.dry_run:
        row("output", f"{report.output} (not written: dry run)" if report.output else "no output given (dry run)")
        row("dry run", f"would read {human_bytes(report.bytes_to_read)}; nothing written")
        return
    row("output", f"{report.output}: {', '.join(report.output_files)}")
    if report.copied_files:
        row("copied", ", ".join(report.copied_files))
    if report.verified:
        row("verified", f"every tensor read back from the disk matches what was written ({report.verify_seconds:.2f} s)")
        for name, sha in report.sha256.items():
            row("sha256", f"{sha}  {name}")
    if report.pushed and "error" in report.pushed:
        row("not pushed", f"to {report.pushed['repo']}@{report.pushed['revision']}: the upload failed (below); the output above is complete")
    elif report.pushed:
        row("pushed", f"to {report.pushed['repo']}@{report.pushed['revision']}: {report.pushed['commit_url']}")
    row(
        "done",
        f"read {human_bytes(report.bytes_read)}, wrote {human_bytes(report.bytes_written)} in {report.seconds:.2f} s "
        f"({report.gb_per_s:.2f} GB/s), peak memory {human_bytes(report.peak_rss_bytes)}{' (the largest rank)' if report.world_size > 1 else ''}",
    )


def print_summary(report: AverageReport, console: Console | None = None) -> None:
    """What `average` did (or would do): the inputs table, strategy, tensors, notes, output and cost."""
    out = console or _stdout()
    row = _Rows(out)
    out.print(inputs_table(report))
    n = len(report.inputs)
    if n == 1:
        row("strategy", f"{report.strategy} of 1 checkpoint on {report.device}: nothing was averaged; `ckptavg export` writes one checkpoint's weights")
    else:
        ranks = f" ({report.world_size} ranks, each its share)" if report.world_size > 1 else ""
        row("strategy", f"{report.strategy} of {n} checkpoints on {report.device}{ranks}")
    shared = _shared_weights_from(report)
    if shared:
        row("weights from", shared if n == 1 else f"{shared} (all {n} inputs)")
    row("tensors", f"{report.tensors} ({report.parameters:,} parameters); output {_counts(report.output_dtypes)}; accumulated in {_counts(report.accumulate)}")
    for note in grouped_notes(report):
        row("note", note)
    _output_rows(row, report)


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


def adapter_line(a: dict) -> str:
    """One line (wrapped by the terminal) saying what a PEFT adapter is and holds."""
    targets = a.get("target_modules")
    targets = ", ".join(targets) if isinstance(targets, list) else (targets or "-")
    base = a.get("base_model_name_or_path") or "-"
    if a.get("revision"):
        base += f"@{a['revision']}"
    extras = [k for k in ("rank_pattern", "alpha_pattern") if a.get(k)] + (["lora_bias"] if a.get("lora_bias") else [])
    return (
        f"adapter      {a['kind']} r={a.get('r', '-')} lora_alpha={a.get('lora_alpha', '-')}{' ' + ', '.join(extras) if extras else ''}; "
        f"targets {targets}; modules_to_save {', '.join(a.get('modules_to_save') or []) or '-'}; base {base}; "
        f"{a['lora_parameters']:,} LoRA parameters in {a['modules']} modules, {a['full_parameters']:,} in full tensors"
    )


def print_inspect(report) -> None:
    out = _stdout()
    out.print(f"[bold]{escape(report.path)}[/]  {report.format}, {len(report.files)} file(s), {human_bytes(sum(f['bytes'] for f in report.files))}")
    out.print(f"tensors      {report.tensors} ({report.parameters:,} parameters, {human_bytes(report.tensor_bytes)})")
    out.print("dtypes       " + ", ".join(f"{k} {human_bytes(v)}" for k, v in report.bytes_by_dtype.items()))
    out.print(f"step         {report.step if report.step is not None else '-'}   epoch {report.epoch if report.epoch is not None else '-'}")
    if report.adapter:
        out.print(adapter_line(report.adapter), markup=False, soft_wrap=True)
    if report.metrics:
        out.print("metrics      " + ", ".join(f"{k}={v:.5g}" for k, v in report.metrics.items()), markup=False)
    state = ", ".join(f"{k} {human_bytes(v)}" for k, v in report.training_state.items()) or "none (weights only)"
    out.print(f"training     {state}")
    if report.model_type or report.architectures:
        out.print(f"model        {report.model_type or '-'} {' '.join(report.architectures)}  (config.json)", markup=False)
    if report.prefix:
        if report.wrapper_prefix:
            hint = f"  ({report.wrapper_prefix} added by {report.wrapper}: --strip-prefix {report.wrapper_prefix} removes it)"
        elif report.model_type or report.architectures:
            hint = "  (the model's own names, as config.json says: keep it)"
        else:
            hint = ""
        out.print(f"prefix       {report.prefix}{hint}", markup=False)
    if report.weights_key:
        out.print(f"weights      under {report.weights_key!r}", markup=False)
    if report.top_level_keys:
        out.print("keys         " + ", ".join(report.top_level_keys), markup=False)
    if report.opaque_globals:
        out.print("not run      " + ", ".join(report.opaque_globals[:6]) + (" ..." if len(report.opaque_globals) > 6 else ""), markup=False)
    for note in report.notes:
        out.print(f"note         {note}", markup=False)
    for item in report.leftovers:
        files = ", ".join(f"{f['path']} ({human_bytes(f['bytes'])})" for f in item.files)
        out.print(f"{'in progress' if item.live else 'leftover':<12} {files}", markup=False)
        out.print(f"             {item.advice}", markup=False)
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
    if report.tensors:
        out.print(table)
    else:
        out.print(table.title)
    if len(report.tensors) > limit:
        out.print(f"[dim]{len(report.tensors) - limit} more tensors (--json lists all)[/]")
    for label, names in (("only in A", report.only_in_a), ("only in B", report.only_in_b)):
        if names:
            out.print(f"{label}    {len(names)}: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}", markup=False)
    for item in report.shape_mismatch:
        out.print(f"shape        {item['name']}: {item['a']} vs {item['b']}", markup=False)
    if report.integer_tensors:
        names = report.integer_differs
        which = f": {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}" if names else ""
        out.print(
            f"integers     {len(names)} of {report.integer_tensors} integer/bool tensors differ{which} (not in the distances)",
            markup=False,
        )
    if not report.compared:
        out.print(f"summary      nothing compared: {report.hint or 'no tensor of the same name and shape in both'}", markup=False)
        return
    verdict = "identical" if report.identical else f"relative L2 {report.relative:.4g}, min cosine {report.min_cosine:.6f}, max |a-b| {report.max_abs:.4g}"
    unmatched = [
        f"{len(names)} {label}"
        for names, label in ((report.only_in_a, "only in A"), (report.only_in_b, "only in B"), (report.shape_mismatch, "of another shape"))
        if names
    ]
    also = f"; not compared: {', '.join(unmatched)}" if unmatched else ""
    out.print(f"summary      {len(report.tensors)} floating tensors compared: {verdict}{also}", markup=False)


def print_export(report: AverageReport, console: Console | None = None) -> None:
    """What `export` did (or would do): the input, its weights, output dtypes, size before and after; no
    weights, order or accumulator, which mean nothing for one checkpoint."""
    out = console or _stdout()
    row = _Rows(out)
    for item in report.inputs:
        where = ", ".join(
            [item.format]
            + ([f"step {item.step}"] if item.step is not None else [])
            + ([f"epoch {item.epoch}"] if item.epoch is not None else [])
        )
        row("input", f"{item.path} ({where})")
        if item.weights_from:
            row("weights from", item.weights_from)
    row("tensors", f"{report.tensors} ({report.parameters:,} parameters); output {_counts(report.output_dtypes)}")
    for note in list(report.notes) + [n for item in report.inputs for n in item.notes]:
        row("note", note)
    before, after = report.input_disk_bytes, report.output_disk_bytes
    if not report.dry_run and before:
        change = (1 - after / before) * 100
        row("size", f"{human_bytes(before)} -> {human_bytes(after)} ({abs(change):.0f}% {'smaller' if change >= 0 else 'larger'})")
    elif before:
        row("size", f"{human_bytes(before)} on disk now, training state included")
    _output_rows(row, report)
