"""`ckptavg sweep`: several weightings of the same checkpoints from one read."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ckptavg.cli.params import (
    AccumOpt,
    AdapterModeOpt,
    AdapterRankOpt,
    BaseOpt,
    BudgetOpt,
    DebugOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    KeyOpt,
    NoFsyncOpt,
    OrderOpt,
    OutFormatOpt,
    OverwriteOpt,
    QuietOpt,
    RankTimeoutOpt,
    RequantizeOpt,
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
    print_sweep,
)


@app.command()
def sweep(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            metavar="CHECKPOINT",
            help="Checkpoint files or folders, as for average (local or hf://ORG/REPO).",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            metavar="DIR",
            help="The folder to create: DIR/NAME/ per candidate (what average -o writes) and DIR/sweep.json.",
        ),
    ] = None,
    recipes: Annotated[
        list[str] | None,
        typer.Option(
            "--recipe",
            metavar="RECIPE",
            help=(
                "A weighting to try (repeatable): mean, last:N, linear, weights:W1,W2,..., ema:D, ema-half-life:S, "
                "ema-sigma-rel:S or wsm:NAME; a list of values (last:2,4,8) makes one candidate per value."
            ),
            show_default=False,
        ),
    ] = None,
    order: OrderOpt = "auto",
    dtype: DtypeOpt = None,
    accum_dtype: AccumOpt = "auto",
    device: DeviceOpt = "auto",
    max_shard_size: ShardOpt = None,
    key: KeyOpt = None,
    use_ema: UseEmaOpt = False,
    strip_prefix: StripOpt = None,
    overwrite: OverwriteOpt = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Check the inputs and recipes, print the plan; write nothing.")
    ] = False,
    memory_budget: BudgetOpt = None,
    no_fsync: NoFsyncOpt = False,
    verify: VerifyOpt = False,
    adapter_mode: AdapterModeOpt = "exact",
    base: BaseOpt = None,
    adapter_rank: AdapterRankOpt = None,
    requantize: RequantizeOpt = False,
    rank_timeout: RankTimeoutOpt = 120.0,
    out_format: OutFormatOpt = "auto",
    training_state: TrainingStateOpt = "drop",
    strict: StrictOpt = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Average the same checkpoints several ways from one read: one complete output per candidate weighting.

    Each input byte is read once; every chunk is folded into each candidate's output, and each candidate's weight files are byte for byte those `ckptavg average` writes with the same inputs and weighting. Memory stays within --memory-budget whatever the number of candidates. DIR is written as a whole: a failure leaves nothing. Under torchrun, each rank writes its share of every candidate.

    Example:

        ckptavg sweep runs/checkpoint-* -o sweep --recipe mean --recipe last:2,4 --recipe ema:0.9,0.99

        ckptavg sweep ckpt_*.pt -o sweep --recipe linear --recipe ema-half-life:500 --json
    """  # noqa: E501  (typer keeps a docstring's line breaks in --help: a paragraph stays on one line)
    keywords = library_keywords(locals())
    sweep_checkpoints = deferred("ckptavg.sweeping", "sweep")
    run_and_render(
        lambda **callbacks: sweep_checkpoints(inputs, output, **keywords, **callbacks),
        print_sweep,
        json_output,
        quiet,
        inputs=len(inputs),
    )
