"""Rich rendering for the CLI: progress on stderr, summaries and plans on stdout, JSON for scripts; one module
per report (average and export, sweep and tune, select, inspect), what they share in common.py."""

from ckptavg.render.average import print_export, print_summary
from ckptavg.render.common import print_error, print_json, shorten_path, stderr
from ckptavg.render.inspection import print_diff, print_inspect
from ckptavg.render.progress import ProgressDisplay, Throttle, plan_line
from ckptavg.render.runs import print_sweep, print_tune, tune_candidate_line
from ckptavg.render.selection import metric_chart, print_selection
from ckptavg.sizes import human_bytes

__all__ = [
    "ProgressDisplay",
    "Throttle",
    "human_bytes",
    "metric_chart",
    "plan_line",
    "print_diff",
    "print_error",
    "print_export",
    "print_inspect",
    "print_json",
    "print_selection",
    "print_summary",
    "print_sweep",
    "print_tune",
    "shorten_path",
    "stderr",
    "tune_candidate_line",
]
