"""What every renderer shares: the consoles, JSON, errors, paths and table rows fitted to the terminal."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:  # the CLI starts (and --help answers) without importing torch
    from ckptavg.averaging import AverageReport


stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def stdout_console() -> Console:
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


def fit_text(text: Text, width: int) -> Text:
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


class PathCell:
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


class Rows:
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


def count_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in counts.items()) or "-"


def shared_weights_from(report: AverageReport) -> str | None:
    """The weights_from every input shares, when they all share one (None: their tensors as stored)."""
    found = {i.weights_from for i in report.inputs}
    return found.pop() if len(found) == 1 else None


def one_line(text: str) -> str:
    """`text` with line breaks and other control characters escaped (`\\n`): names from a file may hold them."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def print_error(message: str) -> None:
    message = one_line(message)
    if stderr.is_terminal:
        stderr.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True)
    else:
        sys.stderr.write(f"error: {message}\n")
