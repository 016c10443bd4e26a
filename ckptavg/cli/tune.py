"""`ckptavg tune`: the merge chosen by evaluation (candidates, greedy soup, guards)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ckptavg.cli.params import (
    BudgetOpt,
    DebugOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    KeyOpt,
    OrderOpt,
    OutFormatOpt,
    OverwriteOpt,
    QuietOpt,
    RankTimeoutOpt,
    ShardOpt,
    StrictOpt,
    StripOpt,
    TrainingStateOpt,
    UseEmaOpt,
    VerifyOpt,
    library_keywords,
)
from ckptavg.cli.running import app, deferred, run_and_render
from ckptavg.render import (
    print_tune,
    stderr,
    tune_candidate_line,
)


@app.command()
def tune(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            metavar="CHECKPOINT",
            help="Checkpoint files or folders of one run, as for average (local or hf://ORG/REPO).",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", metavar="OUT", help="The winner's folder, as average -o writes it, with the whole table."),
    ] = None,
    eval_command: Annotated[
        str | None,
        typer.Option(
            "--eval",
            metavar="CMD",
            help=(
                "Shell command run once per candidate, {model} replaced by its folder; it prints a number, or a JSON "
                "object of metrics, on its last line. A failure fails that candidate, not the run."
            ),
        ),
    ] = None,
    eval_text: Annotated[
        Path | None,
        typer.Option(
            "--eval-text",
            metavar="FILE",
            help="Instead of --eval: perplexity of a causal LM on a .txt or .jsonl (text) file (needs ckptavg[eval]).",
        ),
    ] = None,
    eval_tokens: Annotated[
        int | None,
        typer.Option("--eval-tokens", metavar="N", help="--eval-text: at most N tokens (default 8192)."),
    ] = None,
    eval_timeout: Annotated[
        float | None,
        typer.Option("--eval-timeout", metavar="S", help="Stop an evaluation (and all it started) after S seconds."),
    ] = None,
    recipes: Annotated[
        list[str] | None,
        typer.Option(
            "--recipe",
            metavar="RECIPE",
            help=(
                "A candidate weighting, as for sweep (repeatable). Default: last 2, 4, 8, ..., all; EMA and WSM "
                "minus-sqrt over the same windows. The newest checkpoint alone (last-1) is always the baseline."
            ),
            show_default=False,
        ),
    ] = None,
    greedy_soup: Annotated[
        bool, typer.Option("--greedy-soup", help="Also score each input alone and build the greedy soup, one more candidate.")
    ] = False,
    metric: Annotated[
        str | None,
        typer.Option(
            "--metric", metavar="NAME", help="The metric to optimise: a key of --eval's JSON (perplexity with --eval-text)."
        ),
    ] = None,
    mode: Annotated[
        str | None,
        typer.Option("--mode", metavar="min|max", help="Lower or higher is better (default: said by the metric's name)."),
    ] = None,
    guards: Annotated[
        list[str] | None,
        typer.Option(
            "--guard",
            metavar="GUARD",
            help="METRIC:TOL[:min|max]: a candidate losing more than TOL on METRIC against the baseline cannot win (repeatable).",
            show_default=False,
        ),
    ] = None,
    keep_candidates: Annotated[
        Path | None,
        typer.Option("--keep-candidates", metavar="DIR", help="Keep every candidate's folder in DIR (else removed once scored)."),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot", metavar="FILE", help="Draw the score per candidate to FILE (.svg, .png or .pdf; needs ckptavg[plot])."
        ),
    ] = None,
    order: OrderOpt = "auto",
    dtype: DtypeOpt = None,
    device: DeviceOpt = "auto",
    max_shard_size: ShardOpt = None,
    key: KeyOpt = None,
    use_ema: UseEmaOpt = False,
    strip_prefix: StripOpt = None,
    overwrite: OverwriteOpt = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List the candidates and their weights; evaluate and write nothing.")
    ] = False,
    memory_budget: BudgetOpt = None,
    verify: VerifyOpt = False,
    strict: StrictOpt = False,
    rank_timeout: RankTimeoutOpt = 120.0,
    out_format: OutFormatOpt = "auto",
    training_state: TrainingStateOpt = "drop",
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Choose the merge by evaluation: average the checkpoints several ways, score each candidate, write the best.

    The candidates are written with one read of the inputs, evaluated one at a time and removed once scored. The winner (the best score among those no --guard holds back) is written to OUT like an average output; its ckptavg.json and model card hold the whole table. Run again after an interruption, it reuses the scores already measured. Under torchrun, every rank writes its share of the candidates and rank 0 evaluates them.

    Example:

        ckptavg tune run/checkpoint-* -o best --eval-text held.txt --greedy-soup

        ckptavg tune ckpt-* -o best --eval 'python eval.py {model}' --metric acc
    """  # noqa: E501  (typer keeps a docstring's line breaks in --help: a paragraph stays on one line)
    keywords = library_keywords(locals())
    tune_checkpoints = deferred("ckptavg.tuning.run", "tune")

    def on_candidate(row: Any) -> None:
        if not quiet:
            stderr.print(tune_candidate_line(row), markup=False, highlight=False, soft_wrap=True)

    run_and_render(
        lambda on_progress, on_plan: tune_checkpoints(
            inputs, output, **keywords, on_candidate=on_candidate, on_progress=on_progress
        ),
        print_tune,
        json_output,
        quiet,
        inputs=len(inputs),
    )
