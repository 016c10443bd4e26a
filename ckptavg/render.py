"""Rich rendering for the CLI: progress on stderr, summaries and plans on stdout, JSON for scripts."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from ckptavg.sizes import human_bytes

if TYPE_CHECKING:  # the CLI starts (and --help answers) without importing torch
    from ckptavg.averaging import AverageReport
    from ckptavg.progress import Progress
    from ckptavg.sweeping import SweepReport
    from ckptavg.tuning.report import CandidateResult, TuneReport

stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def _stdout() -> Console:
    # Piped output keeps whole paths on one line, so scripts can grep it; a terminal gets its own width.
    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 1000)


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
        else:  # the range, then the ends: in training order the first input is the oldest
            first, last = ("first", "last") if report.order == "given" else ("oldest", "newest")
            parts.append(f"weights {min(weights):.3g}..{max(weights):.3g} ({first} {weights[0]:.3g}, {last} {weights[-1]:.3g})")
    if report.bytes_to_read:
        parts.append(f"{human_bytes(report.bytes_to_read)} to read")
    return ", ".join(parts)


def sweep_plan_line(report: SweepReport) -> str:
    """One line for a sweep's plan: inputs, the candidates, the passes over the inputs, bytes to read."""
    n = len(report.inputs)
    steps = [i.step for i in report.inputs if i.step is not None]
    where = f" (steps {min(steps)}..{max(steps)})" if len(set(steps)) > 1 else ""
    k = len(report.candidates)
    names = ", ".join(c.name for c in report.candidates[:6]) + (", ..." if k > 6 else "")
    passes = "one read" if report.passes == 1 else f"{report.passes} reads"
    parts = [f"{n} input{'' if n == 1 else 's'}{where}", f"{k} candidate{'' if k == 1 else 's'} ({names})", passes]
    if report.bytes_to_read:
        parts.append(f"{human_bytes(report.bytes_to_read)} to read")
    return ", ".join(parts)


class Throttle:
    """When a plain (off-terminal) progress line is due: each time the work crosses another `step` (10%), or
    `interval` seconds (30 s) after the last line; never in the first `quiet_for` seconds, so a short run
    prints nothing."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, step: float = 0.1, interval: float = 30.0, quiet_for: float = 1.0
    ) -> None:
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

    def __init__(
        self, enabled: bool, inputs: int = 0, console: Console | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
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
    def on_plan(self, report: AverageReport | SweepReport) -> None:
        if hasattr(report, "candidates"):  # a sweep: its candidates, made in one pass
            self.plan, self.verb = sweep_plan_line(report), "sweeping"  # type: ignore[arg-type]
        else:
            self.plan = plan_line(report)  # type: ignore[arg-type]
            self.verb = "exporting" if report.strategy == "export" else "averaging"  # type: ignore[union-attr]
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
        out.append(
            _fit(
                Text.assemble((label, "bold"), ("━" * filled, "magenta"), ("━" * (bar_width - filled), "grey23"), tail_text),
                width,
            )
        )
        if p is not None and getattr(p, "detail", ""):  # a read (select --skip-nonfinite, inspect --check/--diff)
            detail = p.detail
        elif p is not None and self.phase == "verifying":
            detail = (
                f"reading the output back from the disk: {p.tensor} (file {min(p.tensors_done + 1, p.tensors_total)} of "
                f"{p.tensors_total})"
            )
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
            self._live = Live(
                self, console=self.console, transient=True, refresh_per_second=10, redirect_stdout=False, redirect_stderr=False
            )
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


def shorten_path(path: str, width: int) -> str:
    """`path` in at most `width` cells: whole when it fits, else its longest tail after `…` that starts at a
    folder boundary (`…/run1/checkpoint-500`), else the last characters of its name."""
    if cell_len(path) <= width:
        return path
    if width <= 1:
        return "…" * width
    for i, ch in enumerate(path):
        if ch in "/\\" and cell_len(path[i:]) < width:
            return "…" + path[i:]
    tail = path
    while tail and cell_len(tail) >= width:
        tail = tail[1:]
    return "…" + tail


class _PathCell:
    """A path in a table cell, shortened from the left to the column's width (see shorten_path), never
    wrapped: `checkpoint-7` / `000` on two lines reads as two names. --json and piped output keep it whole."""

    def __init__(self, path: str) -> None:
        self.path = one_line(path)

    @property
    def shortest(self) -> int:
        """The width of `…/name`, or of the whole path when shorter."""
        name = self.path.rstrip("/\\").rsplit("/", 1)[-1]
        return min(cell_len(self.path), cell_len(name) + 2)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(self.shortest, cell_len(self.path))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield Text(shorten_path(self.path, options.max_width), no_wrap=True, overflow="crop")


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
    """The weights_from every input shares, when they all share one (None: their tensors as stored)."""
    found = {i.weights_from for i in report.inputs}
    return found.pop() if len(found) == 1 else None


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
            _PathCell(item.path),
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


def _output_rows(row: _Rows, report: AverageReport) -> None:
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
        f"{_rate(report)}, peak memory "
        f"{human_bytes(report.peak_rss_bytes)}{' (the largest rank)' if report.world_size > 1 else ''}",
    )


RATE_FROM_BYTES = 100_000_000  # below, a read rate measures the start-up (torch, opening files), not the disk


def _rate(report: AverageReport) -> str:
    """` (1.23 GB/s)` for a run that read enough to make the rate mean something, else nothing."""
    if report.bytes_read < RATE_FROM_BYTES or report.seconds <= 0:
        return ""
    return f" ({human_bytes(report.bytes_read / report.seconds)}/s)"


def print_summary(report: AverageReport, console: Console | None = None) -> None:
    """What `average` did (or would do): the inputs table, strategy, tensors, notes, output and cost."""
    out = console or _stdout()
    row = _Rows(out)
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
    shared = _shared_weights_from(report)
    if shared:
        row("weights from", shared if n == 1 else f"{shared} (all {n} inputs)")
    row(
        "tensors",
        (
            f"{report.tensors} ({report.parameters:,} parameters); output {_counts(report.output_dtypes)}; accumulated in "
            f"{_counts(report.accumulate)}"
        ),
    )
    for note in grouped_notes(report):
        row("note", note)
    _output_rows(row, report)


def _weights_cell(weights: list[float], steps: list[int | None]) -> str:
    """A candidate's weights, oldest first; for many inputs the range and the ends."""
    if len(weights) <= 6:
        return " ".join(f"{w:.3g}" for w in weights)
    return f"{weights[0]:.3g} .. {weights[-1]:.3g} (min {min(weights):.3g}, max {max(weights):.3g})"


def candidates_table(report: SweepReport) -> Table:
    """The candidates of a sweep: name, recipe, the inputs each averages (by step where known) and their weights."""
    table = Table(title=f"{len(report.candidates)} candidates", title_justify="left", show_edge=False)
    table.add_column("candidate", no_wrap=True)
    table.add_column("recipe", no_wrap=True)
    table.add_column("inputs", no_wrap=True)
    table.add_column("weights, oldest first", overflow="fold")
    for c in report.candidates:
        known = [s for s in c.steps if s is not None]
        if len(known) == len(c.steps) and known:
            inputs = f"{len(c.steps)} (steps {known[0]}..{known[-1]})" if len(known) > 1 else f"1 (step {known[0]})"
        else:
            inputs = str(len(c.inputs))
        table.add_row(c.name, c.recipe, inputs, _weights_cell(c.weights, c.steps))
    return table


def print_sweep(report: SweepReport, console: Console | None = None) -> None:
    """What `sweep` did (or would do): the candidates table, notes, the output folder and the one read's cost."""
    out = console or _stdout()
    row = _Rows(out)
    out.print(candidates_table(report))
    n = len(report.inputs)
    order = "in the order given" if report.order == "given" else f"ordered by {report.order}"
    row("inputs", f"{n} checkpoint{'' if n == 1 else 's'}, {order}")
    row("tensors", f"{report.tensors} ({report.parameters:,} parameters) per candidate, on {report.device}")
    for note in report.notes:
        row("note", note)
    if report.dry_run:
        row("output", f"{report.output} (not written: dry run)" if report.output else "no output given (dry run)")
        row("dry run", f"would read {human_bytes(report.bytes_to_read)} once for all candidates; nothing written")
        return
    row("output", f"{report.output}: {', '.join(c.name + '/' for c in report.candidates)}, sweep.json")
    if report.verified:
        row("verified", "every candidate's tensors read back from the disk match what was written")
    passes = "in one read" if report.passes == 1 else f"in {report.passes} reads"
    row(
        "done",
        f"read {human_bytes(report.bytes_read)} {passes}, wrote {human_bytes(report.bytes_written)} in {report.seconds:.2f} s"
        f"{_rate(report)}, peak memory {human_bytes(report.peak_rss_bytes)}",  # type: ignore[arg-type]
    )


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.5g}"


def _delta(row: CandidateResult, base: float | None) -> str:
    if row.baseline:
        return "baseline"
    if row.delta is None:
        return ""
    percent = f" ({row.delta / abs(base) * 100:+.1f}%)" if base else ""
    return f"{row.delta:+.4g}{percent}"


def tune_table(report: TuneReport) -> Table:
    """The candidates of a tune run: recipe, inputs, weights (dry run) or score, delta to the baseline, the
    other metrics, seconds, and why one failed or cannot win; the winner marked."""
    better = "lower is better" if report.mode == "min" else "higher is better"
    title = f"{len(report.candidates)} candidates" + ("" if report.dry_run else f", {report.metric} ({better})")
    table = Table(title=title, title_justify="left", show_edge=False)
    table.add_column("", no_wrap=True)
    table.add_column("candidate", no_wrap=True)
    table.add_column("recipe", no_wrap=True)
    table.add_column("inputs", no_wrap=True)
    if report.dry_run:
        table.add_column("weights, oldest first", overflow="fold")
        for c in report.candidates:
            table.add_row("", c.name, c.recipe, _inputs_cell(c.steps, c.inputs), _weights_cell(c.weights, c.steps))
        return table
    names = dict.fromkeys(k for c in report.candidates for k in c.metrics if k != report.metric)
    # the other metrics, those that tell the candidates apart (perplexity's token count is the same for all)
    others = [k for k in names if len({c.metrics.get(k) for c in report.candidates if c.failure is None}) > 1][:3]
    table.add_column(report.metric, justify="right", no_wrap=True)
    table.add_column("vs baseline", justify="right", no_wrap=True)
    for name in others:
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("s", justify="right", no_wrap=True)
    notes = [
        c.failure and f"failed: {c.failure}" or "; ".join(c.held_back) or ("score reused" if c.reused else "")
        for c in report.candidates
    ]
    if any(notes):
        table.add_column("note", overflow="fold")
    base = report.row(report.baseline).score
    for c, note in zip(report.candidates, notes):
        table.add_row(
            "*" if c.winner else "",
            Text(c.name, style="bold green" if c.winner else ""),
            c.recipe,
            _inputs_cell(c.steps, c.inputs),
            _score(c.score),
            _delta(c, base),
            *(_score(c.metrics.get(k)) for k in others),
            f"{c.seconds:.1f}",
            *([Text(one_line(note), style="red" if c.failure else "yellow" if c.held_back else "dim")] if any(notes) else []),
        )
    return table


def _inputs_cell(steps: list[int | None], inputs: list[str]) -> str:
    known = [s for s in steps if s is not None]
    if len(known) == len(steps) and known:
        return f"{len(steps)} (steps {known[0]}..{known[-1]})" if len(known) > 1 else f"1 (step {known[0]})"
    return str(len(inputs))


def print_tune(report: TuneReport, console: Console | None = None) -> None:
    """What `tune` did (or would do): the table, the soup, the winner and its gain over the baseline, the output."""
    out = console or _stdout()
    row = _Rows(out)
    out.print(tune_table(report))
    n = len(report.inputs)
    order = "in the order given" if report.order == "given" else f"ordered by {report.order}"
    row("inputs", f"{n} checkpoint{'' if n == 1 else 's'}, {order}")
    evaluation = report.evaluation
    if "command" in evaluation:
        row(
            "evaluation",
            f"{evaluation['command']}" + (f" (stopped after {evaluation['timeout']:g} s)" if evaluation.get("timeout") else ""),
        )
    elif "text" in evaluation:
        row("evaluation", f"perplexity on {evaluation['text']}, at most {evaluation['tokens']} tokens")
    if report.guards:
        row("guards", ", ".join(report.guards))
    soup = report.soup or {}
    if soup.get("order"):
        left_out = [s for s in soup["order"] if s not in soup["kept"]]
        text = f"kept {len(soup['kept'])} of {len(soup['order'])}, best alone first: {', '.join(soup['kept'])}"
        row("greedy soup", text + (f"; left out: {', '.join(left_out)}" if left_out else ""))
    for note in report.notes:
        row("note", note)
    if report.dry_run:
        if soup.get("planned"):
            row("greedy soup", f"would score each of the {soup['inputs']} inputs alone, then up to {soup['inputs'] - 1} means")
        row("dry run", "nothing evaluated or written")
        return
    if report.winner:
        winner = report.row(report.winner)
        if winner.baseline:
            gain = "no candidate beats it"
        else:
            base = report.row(report.baseline).score
            percent = f", {winner.delta / abs(base) * 100:+.1f}%" if base and winner.delta is not None else ""
            gain = f"{winner.delta:+.4g} vs {report.baseline}{percent}"
        row("winner", f"{winner.name}: {report.metric} {_score(winner.score)} ({gain})")
    row("output", f"{report.output}: {', '.join(report.output_files)}" if report.output else "not written")
    if report.kept_candidates:
        row("candidates", f"kept in {report.kept_candidates}")
    if report.plot:
        row("plot", report.plot)
    count = f"{report.evaluated} evaluation{'' if report.evaluated == 1 else 's'}"
    if report.reused:
        count += f", {report.reused} score{'' if report.reused == 1 else 's'} reused from an interrupted run"
    row("done", f"{count}, read {human_bytes(report.bytes_read)} in {report.seconds:.1f} s")


def tune_candidate_line(row: CandidateResult) -> str:
    """One stderr line as each candidate is scored."""
    if row.failure:
        return f"ckptavg: {row.name}: failed: {one_line(row.failure)}"
    reused = " (reused)" if row.reused else f" in {row.seconds:.1f} s"
    delta = "" if row.baseline or row.delta is None else f" ({row.delta:+.4g} vs baseline)"
    return f"ckptavg: {row.name}: {_score(row.score)}{delta}{reused}"


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


def metric_chart(steps: list[int], values: list[float | None], chosen: list[bool], width: int = 80) -> list[str]:
    """Two lines of at most `width` cells: the metric over steps as a sparkline (lower bar = lower value) with
    its range, and ▲ under each chosen checkpoint with the steps. With more checkpoints than columns, a column
    stands for a run of consecutive checkpoints (see _chart_columns) and shows their mean, or a chosen one's
    value: every chosen checkpoint is marked, each under its own column while they fit.
    """
    import math

    def spark(value: float | None) -> str:
        if value is None:
            return "·"
        if math.isnan(value):
            return "×"
        level = 0 if high == low else round((min(max(value, low), high) - low) / (high - low) * (len(SPARK) - 1))
        return SPARK[level]

    if not steps:
        return []
    finite = [v for v in values if v is not None and math.isfinite(v)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 0.0)
    value_range, step_range = f"{low:.4g} .. {high:.4g}", f"steps {steps[0]} .. {steps[-1]}"
    bars, marks = [], []
    for members in _chart_columns(chosen, max(8, width - 2 - max(len(value_range), len(step_range)))):
        picked = sum(chosen[i] for i in members)
        known = [values[i] for i in members if values[i] is not None and (chosen[i] or not picked)]
        value = None if not known else known[0] if picked else sum(known) / len(known)
        bars.append(f"[bold green]{spark(value)}[/]" if picked else f"[dim]{spark(value)}[/]")
        marks.append(" " if not picked else "▲" if picked == 1 else str(picked) if picked < 10 else "+")
    return ["".join(bars) + f"  [dim]{value_range}[/]", f"[green]{''.join(marks)}[/]  [dim]{step_range}[/]"]


def _chart_columns(chosen: list[bool], columns: int) -> list[range]:
    """The checkpoints (by index) in at most `columns` runs of consecutive ones, one run per chart column.

    One each when they fit. Else each chosen checkpoint has a column of its own, and the runs of others
    between them share the remaining columns: at least one each, the rest in proportion to their length; when
    there are more runs than columns left, the shortest go into the column of the chosen one before them. Only
    with more chosen checkpoints than columns are the columns equal runs, sharing a mark (the count)."""
    n, k = len(chosen), sum(chosen)
    if n <= columns:
        return [range(i, i + 1) for i in range(n)]
    if k > columns:
        return [range(col * n // columns, (col + 1) * n // columns) for col in range(columns)]
    pieces: list[range] = []
    start = 0
    for i, pick in enumerate(chosen):
        if pick:
            pieces += ([range(start, i)] if start < i else []) + [range(i, i + 1)]
            start = i + 1
    pieces += [range(start, n)] if start < n else []
    gaps = [piece for piece in pieces if not chosen[piece.start]]
    free = columns - k
    kept = sorted(gaps, key=len, reverse=True)[:free]  # the runs with a column of their own
    extra, spare = free - len(kept), sum(len(g) - 1 for g in kept)
    exact = {g.start: extra * (len(g) - 1) / spare if spare else 0.0 for g in kept}
    share = {start: 1 + int(x) for start, x in exact.items()}
    for start in sorted(exact, key=lambda s: int(exact[s]) - exact[s])[: free - sum(share.values())]:
        share[start] += 1  # the largest remainders take the columns left
    out: list[range] = []
    carry = None  # a run without a column at the start goes into the first chosen column
    for piece in pieces:
        parts = 1 if chosen[piece.start] else share.get(piece.start, 0)
        if parts == 0 and out:
            out[-1] = range(out[-1].start, piece.stop)
        elif parts == 0:
            carry = piece.start
        else:
            first = piece.start if carry is None else carry
            carry = None
            out += [
                range(first if j == 0 else piece.start + j * len(piece) // parts, piece.start + (j + 1) * len(piece) // parts)
                for j in range(parts)
            ]
    return out


COMPACT_ABOVE = 20  # rows: a longer select table shows its first and last rows and every chosen one
COMPACT_ENDS = 3


def print_selection(
    selection, quiet: bool, json_output: bool = False, invert: bool = False, console: Console | None = None
) -> None:
    """Notes on stderr (ignored candidates, missing metrics, what the filters dropped, what --invert kept back)
    unless quiet; the table and chart too when stderr is a terminal and stdout is not JSON."""
    err = console or stderr
    metric = selection.policy.metric
    if quiet:
        return
    for c in selection.ignored:
        err.print(f"note: ignored {c.path}: {c.ignored}", markup=False)
    missing = [c.path for c in selection.candidates if metric and c.ignored is None and c.rank_value(metric) is None]
    if missing and not selection.metric_hint:
        err.print(
            f"note: no {metric} for {len(missing)} checkpoint(s): {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}",
            markup=False,
        )
    for note in selection.notes:
        if note != selection.metric_hint or invert or selection.chosen:  # else the error says it
            err.print(f"note: {note}", markup=False)
    if invert:
        reasons: dict[str, list[str]] = {}
        for c in selection.kept_back:
            reasons.setdefault(c.kept_back, []).append(c.path)
        for reason, paths in reasons.items():
            shown = ", ".join(paths[:5]) + (f", ... ({len(paths)} in all)" if len(paths) > 5 else "")
            err.print(f"note: --invert kept back ({reason}): {shown}", markup=False)
    if json_output or not err.is_terminal:
        return
    err.print(selection_table(selection, invert, err.width))
    ranked = [c for c in selection.candidates if c.ignored is None]
    if metric and any(c.metric(metric) is not None for c in ranked):
        for line in metric_chart(
            [c.step for c in ranked], [c.metric(metric) for c in ranked], [c.chosen for c in ranked], err.width
        ):
            err.print(line, soft_wrap=False, overflow="ellipsis")


def _why(c, invert: bool) -> str:
    why = "; ".join(c.why) or (c.ignored or "")
    if invert and c.kept_back:
        why += f"; kept back: {c.kept_back}"
    return why


def _shared_why(group: list, invert: bool) -> str | None:
    """The reason all of `group` (two or more) share, else None."""
    reasons = {_why(c, invert) for c in group}
    return reasons.pop() if len(group) > 1 and len(reasons) == 1 else None


def selection_table(selection, invert: bool = False, width: int | None = None) -> Table:
    """Every candidate with its step, metric (with --metric), whether chosen and why.

    A reason all the chosen (or all the others) share is said once, in the title, and no `why` column is left
    when both are. Over COMPACT_ABOVE rows: the first and last COMPACT_ENDS rows and every chosen one (unless
    more than COMPACT_ABOVE are chosen), each run of the others in one `… N more not chosen` row; --json lists
    them all. At `width` columns the paths are shortened before the reasons wrap.
    """
    metric = selection.policy.metric
    candidates = selection.candidates
    chosen = [c for c in candidates if c.chosen]
    others = [c for c in candidates if not c.chosen]
    shared = {True: _shared_why(chosen, invert), False: _shared_why(others, invert)}
    title = f"{len(chosen)} of {len(candidates)} chosen" + (f" ({shared[True]})" if shared[True] else "")
    title += f"; the other {len(others)}: {shared[False]}" if shared[False] else ""
    table = Table(show_edge=False, title=escape(title), title_justify="left")
    table.add_column("step", justify="right", no_wrap=True)
    table.add_column("checkpoint")
    if metric:
        table.add_column(metric, justify="right", no_wrap=True)
    table.add_column("chosen", no_wrap=True)
    why_column = any(group and not shared[picked] for picked, group in ((True, chosen), (False, others)))
    if why_column:
        table.add_column("why")
    n = len(candidates)
    hidden: list = []

    def add(step: str, name: object, value: str, picked: bool, why: str, style: str = "") -> None:
        row = [step, name] + ([value] if metric else []) + [Text("yes", style="bold green") if picked else "no"]
        table.add_row(*row, *([Text("" if shared[picked] else why, style=style)] if why_column else []))

    def show(c) -> None:
        value = c.metric(metric)
        add(
            "-" if c.step is None else str(c.step),
            _PathCell(c.path),
            "-" if value is None else f"{value:.5g}",
            c.chosen,
            _why(c, invert),
        )

    def flush() -> None:
        if len(hidden) == 1:
            show(hidden[0])
        elif hidden:
            picked = hidden[0].chosen
            more = Text(f"… {len(hidden)} more {'chosen' if picked else 'not chosen'}", style="dim")
            add("…", more, "", picked, _shared_why(hidden, invert) or "", "dim")
        hidden.clear()

    def key(c) -> tuple:
        return (c.chosen, None if c.chosen else _why(c, invert))  # a hidden run of others shares its reason

    for i, c in enumerate(candidates):
        middle = n > COMPACT_ABOVE and COMPACT_ENDS <= i < n - COMPACT_ENDS
        if middle and (not c.chosen or len(chosen) > COMPACT_ABOVE):
            if hidden and key(hidden[0]) != key(c):
                flush()
            hidden.append(c)
            continue
        flush()
        show(c)
    flush()
    if width is not None:
        _paths_first(table, 1, width)
    return table


def _paths_first(table: Table, index: int, width: int) -> None:
    """Cap the path column `index` so the other columns keep their natural width within `width` where the
    paths' shortest form (`…/` and the name) allows: rich would otherwise narrow the widest columns alike,
    wrapping a reason while a path could still give way."""

    def least(cell: object) -> int:
        return cell.shortest if isinstance(cell, _PathCell) else cell_len(cell.plain if isinstance(cell, Text) else str(cell))

    others = sum(
        max(least(c) for c in [column.header, *column.cells]) + 2 for i, column in enumerate(table.columns) if i != index
    )
    separators = len(table.columns) - 1
    shortest = max(least(c) for c in [table.columns[index].header, *table.columns[index].cells])
    table.columns[index].max_width = max(shortest, width - others - separators - 2)


def adapter_line(a: dict) -> str:
    """One line (wrapped by the terminal) saying what a PEFT adapter is and holds."""
    targets = a.get("target_modules")
    targets = ", ".join(targets) if isinstance(targets, list) else (targets or "-")
    base = a.get("base_model_name_or_path") or "-"
    if a.get("revision"):
        base += f"@{a['revision']}"
    extras = [k for k in ("rank_pattern", "alpha_pattern") if a.get(k)] + (["lora_bias"] if a.get("lora_bias") else [])
    return (
        f"adapter      {a['kind']} r={a.get('r', '-')} "
        f"lora_alpha={a.get('lora_alpha', '-')}{' ' + ', '.join(extras) if extras else ''}; "
        f"targets {targets}; modules_to_save {', '.join(a.get('modules_to_save') or []) or '-'}; base {base}; "
        f"{a['lora_parameters']:,} LoRA parameters in {a['modules']} modules, {a['full_parameters']:,} in full tensors"
    )


def print_inspect(report) -> None:
    out = _stdout()
    out.print(
        f"[bold]{escape(report.path)}[/]  {report.format}, {len(report.files)} file(s), "
        f"{human_bytes(sum(f['bytes'] for f in report.files))}"
    )
    out.print(f"tensors      {report.tensors} ({report.parameters:,} parameters, {human_bytes(report.tensor_bytes)})")
    out.print("dtypes       " + ", ".join(f"{k} {human_bytes(v)}" for k, v in report.bytes_by_dtype.items()))
    out.print(
        f"step         {report.step if report.step is not None else '-'}   epoch "
        f"{report.epoch if report.epoch is not None else '-'}"
    )
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
        out.print(
            "not run      " + ", ".join(report.opaque_globals[:6]) + (" ..." if len(report.opaque_globals) > 6 else ""),
            markup=False,
        )
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
            problems = [
                f"{issue.nan} NaN" if issue.nan else "",
                f"{issue.inf} Inf" if issue.inf else "",
                "all zeros" if issue.all_zero else "",
            ]
            out.print(f"check        {issue.name}: {', '.join(p for p in problems if p)}", markup=False)


def print_diff(report, limit: int = 20, console: Console | None = None) -> None:
    """The tensors that differ most, then label / value lines; a number is never cut at the edge of the line."""
    out = console or _stdout()
    row = _Rows(out)
    table = Table(show_edge=False, title=escape(f"{report.a}  vs  {report.b}"), title_justify="left")
    table.add_column("tensor", overflow="fold")
    for column in ("L2", "relative", "cosine", "max |a-b|"):
        table.add_column(column, justify="right", no_wrap=True)
    for t in sorted(report.tensors, key=lambda t: -t.relative)[:limit]:
        table.add_row(Text(t.name), f"{t.l2:.4g}", f"{t.relative:.4g}", f"{t.cosine:.6f}", f"{t.max_abs:.4g}")
    if report.tensors:
        out.print(table)
    else:
        out.print(Text(f"{report.a}  vs  {report.b}"))
    if len(report.tensors) > limit:
        out.print(f"[dim]{len(report.tensors) - limit} more tensors (--json lists all)[/]")
    for label, names in (("only in A", report.only_in_a), ("only in B", report.only_in_b)):
        if names:
            row(label, f"{len(names)}: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}")
    for item in report.shape_mismatch:
        row("shape", f"{item['name']}: {item['a']} vs {item['b']}")
    if report.integer_tensors:
        names = report.integer_differs
        which = f": {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}" if names else ""
        row("integers", f"{len(names)} of {report.integer_tensors} integer/bool tensors differ{which} (not in the distances)")
    if not report.compared:
        row("summary", f"nothing compared: {report.hint or 'no tensor of the same name and shape in both'}")
        return
    verdict = (
        "identical"
        if report.identical
        else f"relative L2 {report.relative:.4g}, min cosine {report.min_cosine:.6f}, max |a-b| {report.max_abs:.4g}"
    )
    unmatched = [
        f"{len(names)} {label}"
        for names, label in (
            (report.only_in_a, "only in A"),
            (report.only_in_b, "only in B"),
            (report.shape_mismatch, "of another shape"),
        )
        if names
    ]
    also = f"; not compared: {', '.join(unmatched)}" if unmatched else ""
    row("summary", f"{len(report.tensors)} floating tensors compared: {verdict}{also}")


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
    # nothing is accumulated in an export: each value passes through, or is converted to the output dtype
    if report.adapter and report.adapter.get("mode") == "merged":
        values = ""  # a note says what merging the adapter into its base did
    elif report.input_dtypes == report.output_dtypes:
        values = ", the values unchanged"
    else:  # only the dtypes that changed: integer tensors pass through as they are
        changed = {
            k: n - report.output_dtypes.get(k, 0) for k, n in report.input_dtypes.items() if n > report.output_dtypes.get(k, 0)
        }
        values = f", converted from {_counts(changed)}"
    row("tensors", f"{report.tensors} ({report.parameters:,} parameters); output {_counts(report.output_dtypes)}{values}")
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
