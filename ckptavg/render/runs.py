"""`sweep`'s table of candidates and `tune`'s table of scores, with the delta to the baseline."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ckptavg.render.average import read_rate
from ckptavg.render.common import Rows, one_line, stdout_console
from ckptavg.sizes import human_bytes

if TYPE_CHECKING:  # the CLI starts (and --help answers) without importing torch
    from ckptavg.sweeping import SweepReport
    from ckptavg.tuning.report import CandidateResult, TuneReport


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
    out = console or stdout_console()
    row = Rows(out)
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
        f"{read_rate(report)}, peak memory {human_bytes(report.peak_rss_bytes)}",  # type: ignore[arg-type]
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
    out = console or stdout_console()
    row = Rows(out)
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
