"""The plot of a tune run: each candidate's score as a bar drawn from the baseline's score (so a bar's length is its
gain or loss), the winner in its own colour, failed and held-back candidates marked. Drawn with matplotlib (the
`plot` extra) on its Agg backend: no display."""

from __future__ import annotations

from pathlib import Path
from typing import Any

WINNER, BASELINE, OTHER, HELD_BACK = "#2a9d8f", "#6c757d", "#8ecae6", "#e9c46a"


def plot_scores(report: Any, path: Path) -> None:
    """Write the plot of `report` (a TuneReport) to `path` (.svg, .png or .pdf, by its suffix)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    rows = report.candidates
    figure = Figure(figsize=(7.5, 0.38 * len(rows) + 1.4), layout="constrained")
    axes = figure.add_subplot()
    labels, values, colours = [], [], []
    for row in rows:
        labels.append(row.name + (" (failed)" if row.failure else " (held back)" if row.held_back else ""))
        values.append(row.score if row.score is not None else 0.0)
        colours.append(WINNER if row.winner else BASELINE if row.baseline else HELD_BACK if row.held_back else OTHER)
    positions = list(range(len(rows)))[::-1]  # the table's order from the top
    baseline = next((r for r in rows if r.baseline and r.score is not None), None)
    origin = baseline.score if baseline is not None else 0.0
    axes.barh(positions, [v - origin for v in values], left=origin, color=colours, height=0.6)
    axes.scatter(
        [v for v, r in zip(values, rows) if r.score is not None],
        [p for p, r in zip(positions, rows) if r.score is not None],
        color="black",
        s=8,
        zorder=3,
    )
    axes.set_yticks(positions, labels)
    scored = [r.score for r in rows if r.score is not None]
    if baseline is not None:
        axes.axvline(origin, color=BASELINE, linestyle="--", linewidth=1, label=f"baseline ({baseline.name}): {origin:.4g}")
    if scored:
        low, high = min(scored), max(scored)
        pad = (high - low) * 0.35 or abs(high) * 0.05 or 1.0
        axes.set_xlim(low - pad, high + pad)
        for position, row in zip(positions, rows):
            if row.score is not None:
                delta = f" ({row.delta:+.3g})" if row.delta is not None and not row.baseline else ""
                axes.text(row.score, position + 0.32, f"{row.score:.4g}{delta}", ha="center", fontsize=7)
    better = "lower is better" if report.mode == "min" else "higher is better"
    axes.set_xlabel(f"{report.metric} ({better})")
    winner = f"; winner: {report.winner}" if report.winner else ""
    axes.set_title(f"ckptavg tune: {report.metric} per candidate{winner}", fontsize=10)
    if baseline is not None:
        axes.legend(loc="lower right", fontsize=8)
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # an SVG's text stays text: small, searchable
        figure.savefig(path)
