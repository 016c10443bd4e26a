"""`select`'s table of candidates and its chart of the metric over the run."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ckptavg.render.common import PathCell, stderr

if TYPE_CHECKING:  # the CLI starts (and --help answers) without importing torch
    pass


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
            PathCell(c.path),
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
        return cell.shortest if isinstance(cell, PathCell) else cell_len(cell.plain if isinstance(cell, Text) else str(cell))

    others = sum(
        max(least(c) for c in [column.header, *column.cells]) + 2 for i, column in enumerate(table.columns) if i != index
    )
    separators = len(table.columns) - 1
    shortest = max(least(c) for c in [table.columns[index].header, *table.columns[index].cells])
    table.columns[index].max_width = max(shortest, width - others - separators - 2)
