"""`ckptavg export`: a training checkpoint as an inference-only model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ckptavg.cli.params import (
    BudgetOpt,
    CommitMessageOpt,
    DebugOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    KeyOpt,
    NoFsyncOpt,
    OverwriteOpt,
    PrivateOpt,
    PushOpt,
    PushRevisionOpt,
    QuietOpt,
    RankTimeoutOpt,
    RequantizeOpt,
    ShardOpt,
    StripOpt,
    TrainingStateOpt,
    UseEmaOpt,
    VerifyOpt,
    library_keywords,
)
from ckptavg.cli.running import app, deferred, push_after, run_and_render
from ckptavg.render import (
    print_export,
)


@app.command()
def export(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            metavar="CHECKPOINT",
            help=(
                "A training checkpoint: .pt/.pth/.ckpt/.bin or a checkpoint-N/ folder, or hf://ORG/REPO@REVISION/FOLDER on the "
                "Hub (revision and folder optional)."
            ),
            show_default=False,
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            metavar="OUT",
            help="Output folder, or a .safetensors / .pt file. Another file suffix (.ckpt, .gguf, .onnx, .zip, ...) is refused.",
        ),
    ] = None,
    dtype: DtypeOpt = None,
    out_format: Annotated[
        str,
        typer.Option(
            "--format",
            metavar="FORMAT",
            help=(
                "safetensors, pt (a torch state dict; pytorch_model.bin in a folder), or same (the checkpoint's own layout, "
                "without its training state: .pt, .ckpt, .pth.tar). auto: pt for an OUT named .pt/.pth/.bin, else safetensors."
            ),
        ),
    ] = "auto",
    key: KeyOpt = None,
    use_ema: UseEmaOpt = False,
    strip_prefix: StripOpt = None,
    max_shard_size: ShardOpt = None,
    device: DeviceOpt = "auto",
    overwrite: OverwriteOpt = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the checkpoint and print what would be written.")] = False,
    memory_budget: BudgetOpt = None,
    no_fsync: NoFsyncOpt = False,
    verify: VerifyOpt = False,
    merge: Annotated[
        bool,
        typer.Option(
            "--merge", help="A PEFT adapter: merge it into its --base model and write the full model (exact for DoRA too)."
        ),
    ] = False,
    base: Annotated[
        Path | None,
        typer.Option(
            "--base",
            metavar="MODEL",
            help="The adapter's base model (a local folder or file, or hf://ORG/REPO@REVISION), for --merge.",
        ),
    ] = None,
    rank_timeout: RankTimeoutOpt = 120.0,
    requantize: RequantizeOpt = False,
    training_state: TrainingStateOpt = "drop",
    push_to_hub: PushOpt = None,
    private: PrivateOpt = False,
    revision: PushRevisionOpt = None,
    commit_message: CommitMessageOpt = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Turn a training checkpoint into an inference-only model: the weights alone, no optimizer, scheduler, scaler, RNG or trainer state.

    Example:

        ckptavg export runs/checkpoint-1000 -o model --dtype bf16

        ckptavg export last.ckpt --use-ema --strip-prefix model. -o m.safetensors
    """  # noqa: E501  (one line per paragraph: typer keeps the line breaks, in the command list too)
    keywords = library_keywords(locals())
    export_checkpoint = deferred("ckptavg.exporting", "export")
    pushed = push_after(push_to_hub, output, out_format, dry_run, private, revision, commit_message)

    run_and_render(
        lambda **callbacks: pushed(export_checkpoint(checkpoint, output, **keywords, **callbacks)),
        print_export,
        json_output,
        quiet,
        inputs=1,
    )
