"""The progress display on stderr (a status line, then a bar once the plan is known) and the plan line."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.text import Text

from ckptavg.render.common import SPINNER, fit_text, human_seconds, one_line, stderr
from ckptavg.sizes import human_bytes

if TYPE_CHECKING:  # the CLI starts (and --help answers) without importing torch
    from ckptavg.averaging import AverageReport
    from ckptavg.progress import Progress
    from ckptavg.sweeping import SweepReport


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
            return [fit_text(Text.assemble((spin, "cyan"), " ", what, (f"  {elapsed:.0f} s", "dim")), width)]
        out = [fit_text(Text.assemble(("plan ", "dim"), self.plan), width)] if self.plan else []
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
            fit_text(
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
        out.append(fit_text(Text(one_line(detail), style="dim"), width))
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
