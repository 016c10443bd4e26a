"""`ckptavg select`: the checkpoints to average or keep, by step, window, metric."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ckptavg.cli.params import DebugOpt, JsonOpt, KeyOpt, QuietOpt
from ckptavg.cli.running import app
from ckptavg.distributed import follower
from ckptavg.errors import UsageError
from ckptavg.render import (
    ProgressDisplay,
    print_json,
    print_selection,
)


@app.command()
def select(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            metavar="CHECKPOINT",
            help=(
                "Checkpoint folders or files: runs/*/checkpoint-*, ckpts/*.ckpt; hf://ORG/REPO (its checkpoints: checkpoint-N/ "
                "folders, step branches or Trainer commits, printed pinned to a commit)."
            ),
            show_default=False,
        ),
    ],
    last: Annotated[
        int | None, typer.Option("--last", metavar="N", help="The N newest (of those that pass the filters).")
    ] = None,
    top_k: Annotated[
        int | None, typer.Option("--top-k", metavar="K", help="The K best by --metric. With --last: the union of both.")
    ] = None,
    metric: Annotated[
        str | None,
        typer.Option(
            "--metric",
            metavar="NAME",
            help="Metric name, e.g. eval_loss (trainer_state.json, checkpoint entries, --metrics file).",
        ),
    ] = None,
    mode: Annotated[
        str | None,
        typer.Option(
            "--mode",
            metavar="min|max",
            help=(
                "min: lower is better (losses); max: higher is better (accuracy). Default: what the checkpoints record "
                "(Lightning's ModelCheckpoint mode, timm's CheckpointSaver, the Trainer's greater_is_better), else the metric's "
                "name (loss, error, perplexity: min; acc*, top1, bleu, f1, score: max), else an error asking for it."
            ),
            show_default=False,
        ),
    ] = None,
    every: Annotated[int | None, typer.Option("--every", metavar="K", help="Only steps that are multiples of K.")] = None,
    min_step: Annotated[int | None, typer.Option("--min-step", metavar="S", help="Only steps >= S.")] = None,
    max_step: Annotated[
        str | None,
        typer.Option("--max-step", metavar="S|best", help="Only steps <= S; 'best': up to the best checkpoint by --metric."),
    ] = None,
    after_warmup: Annotated[
        float | None,
        typer.Option("--after-warmup", metavar="FRACTION", help="Only steps after this fraction of the run, e.g. 0.5."),
    ] = None,
    window_steps: Annotated[
        int | None, typer.Option("--window-steps", metavar="S", help="Only steps within S of the newest candidate's.")
    ] = None,
    window_tokens: Annotated[
        str | None,
        typer.Option(
            "--window-tokens", metavar="T", help="Only checkpoints within T tokens seen (500M, 20B) of the newest candidate."
        ),
    ] = None,
    min_interval: Annotated[
        int | None,
        typer.Option("--min-interval", metavar="S", help="From the newest back, keep checkpoints at least S steps apart."),
    ] = None,
    skip_nonfinite: Annotated[
        bool, typer.Option("--skip-nonfinite", help="Drop checkpoints holding NaN or Inf (reads every tensor, streaming).")
    ] = False,
    skip_spikes: Annotated[
        bool, typer.Option("--skip-spikes", help="Drop checkpoints whose metric jumps beyond median + k*MAD of its neighbours.")
    ] = False,
    spike_k: Annotated[float, typer.Option("--spike-k", metavar="K", help="k for --skip-spikes.")] = 3.0,
    metrics_file: Annotated[
        Path | None,
        typer.Option(
            "--metrics", metavar="FILE", help="CSV, JSON or JSONL of metrics by step or path (e.g. an eval job's output)."
        ),
    ] = None,
    key: KeyOpt = None,
    invert: Annotated[
        bool,
        typer.Option(
            "--invert",
            help=(
                "Print the checkpoints NOT chosen, e.g. for deletion; never the newest, one without the --metric, an unreadable "
                "or incomplete one, or one without a step."
            ),
        ),
    ] = False,
    print0: Annotated[
        bool,
        typer.Option(
            "--print0",
            "-0",
            help="End each path with a NUL instead of a newline, for xargs -0: safe with spaces and newlines in paths.",
        ),
    ] = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Print the checkpoints to average or keep, one path per line (NUL-terminated with --print0), in step order.

    Filters (--min-step, --max-step, --after-warmup, --every, --window-steps, --window-tokens, --skip-spikes, --min-interval, --skip-nonfinite) narrow the candidates; --last N and --top-k K then choose among them, and together choose the union (the K best plus the N newest). --skip-nonfinite reads tensors, so it reads only the candidates that could be chosen, and a non-finite one among the last N is replaced by the next older finite one. Checkpoints without a step, unreadable or incomplete ones (a save in progress) are reported and never printed. Nothing is ever deleted by ckptavg.

    Example:

        ckptavg average $(ckptavg select runs/*/checkpoint-* --last 8) -o merged

        ckptavg select ckpts/* --metric eval_loss --top-k 3 --last 1 --invert -0 \\
            | xargs -0 -r rm -r
    """  # noqa: E501  (one line per paragraph: typer keeps the line breaks)
    if follower():  # under torchrun, rank 0 alone reads and prints
        return
    import ckptavg
    from ckptavg.errors import InputError

    if max_step is not None and max_step != "best" and not max_step.isdigit():
        raise UsageError(None, f"--max-step takes a step or 'best', not {max_step!r}")
    if print0 and json_output:
        raise UsageError(None, "--print0 and --json: choose one (--json lists the paths in JSON)")
    display = ProgressDisplay(enabled=not quiet, inputs=len(inputs))
    with display.running():
        selection = ckptavg.select(
            inputs,
            last=last,
            top_k=top_k,
            metric=metric,
            mode=mode,
            every=every,
            min_step=min_step,
            max_step=int(max_step) if max_step and max_step.isdigit() else max_step,
            after_warmup=after_warmup,
            skip_nonfinite=skip_nonfinite,
            skip_spikes=skip_spikes,
            spike_k=spike_k,
            window_steps=window_steps,
            window_tokens=window_tokens,
            min_interval=min_interval,
            metrics_file=metrics_file,
            key=key,
            on_progress=display.update,
        )
    print_selection(selection, quiet, json_output=json_output, invert=invert)
    if json_output:
        print_json(selection.to_dict())
    else:
        end = "\0" if print0 else "\n"
        sys.stdout.write("".join(c.path + end for c in (selection.inverted if invert else selection.chosen)))
        sys.stdout.flush()
    if not selection.chosen and not invert:
        hint = f"; {selection.metric_hint}" if selection.metric_hint else ""
        raise InputError(
            None, f"no checkpoint chosen ({len(selection.candidates)} candidates, {len(selection.ignored)} ignored){hint}"
        )
