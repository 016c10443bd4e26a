"""`ckptavg average`: checkpoints averaged into one model (mean, weighted, linear, EMA, WSM)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ckptavg.cli.params import (
    AccumOpt,
    AdapterModeOpt,
    AdapterRankOpt,
    BaseOpt,
    BudgetOpt,
    CommitMessageOpt,
    DebugOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    KeyOpt,
    NoFsyncOpt,
    OrderOpt,
    OutFormatOpt,
    OverwriteOpt,
    PrivateOpt,
    PushOpt,
    PushRevisionOpt,
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
from ckptavg.cli.running import app, deferred, push_after, run_and_render
from ckptavg.render import (
    print_summary,
)


@app.command()
def average(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            metavar="CHECKPOINT",
            help=(
                "Checkpoint files or folders: safetensors (sharded too), .pt/.bin/.ckpt, checkpoint-N/, PEFT adapters, "
                "torch.distributed.checkpoint and DeepSpeed saves; or hf://ORG/REPO on the Hugging Face Hub, with @REVISION and "
                "/FOLDER optional (hf://org/run@main/checkpoint-500)."
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
            help=(
                "Output folder (sharded safetensors + index + config/tokenizer; an adapter for adapters), or one file: "
                ".safetensors, .pt/.pth/.bin/.pth.tar. Another file suffix (.ckpt, .gguf, .onnx, .zip, ...) is refused."
            ),
        ),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            "--weights",
            metavar="SPEC",
            help="uniform (default), linear (1..N), wsm:linear|cosine|minus-sqrt (Warmup-Stable-Merge) or numbers like 1,2,3.",
        ),
    ] = None,
    ema: Annotated[
        float | None,
        typer.Option(
            "--ema",
            metavar="DECAY",
            help="Exponential moving average over the ordered inputs: e_i = DECAY*e_(i-1) + (1-DECAY)*x_i.",
        ),
    ] = None,
    ema_half_life: Annotated[
        float | None,
        typer.Option(
            "--ema-half-life",
            metavar="STEPS",
            help=(
                "EMA in training steps: each input's weight decays by half every STEPS steps, whatever the spacing of the "
                "checkpoints (needs every input's step)."
            ),
        ),
    ] = None,
    ema_sigma_rel: Annotated[
        float | None,
        typer.Option(
            "--ema-sigma-rel",
            metavar="S",
            help="Power-function EMA (EDM2) of relative width S in (0, 0.2887), over the inputs' steps.",
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
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the inputs and print the plan; write nothing.")] = False,
    memory_budget: BudgetOpt = None,
    no_fsync: NoFsyncOpt = False,
    verify: VerifyOpt = False,
    adapter_mode: AdapterModeOpt = "exact",
    base: BaseOpt = None,
    adapter_rank: AdapterRankOpt = None,
    rank_timeout: RankTimeoutOpt = 120.0,
    requantize: RequantizeOpt = False,
    out_format: OutFormatOpt = "auto",
    training_state: TrainingStateOpt = "drop",
    strict: StrictOpt = False,
    push_to_hub: PushOpt = None,
    private: PrivateOpt = False,
    revision: PushRevisionOpt = None,
    commit_message: CommitMessageOpt = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Average checkpoints into one inference-only model (mean, weighted, linear or EMA).

    Tensors are streamed one chunk at a time, so memory stays bounded whatever the model size. Floating tensors are accumulated in FP32 (FP64 for FP32 inputs) and rounded once; integer tensors such as num_batches_tracked are copied from the newest input.

    Example:

        ckptavg average runs/checkpoint-* -o merged

        ckptavg average ckpt_*.pt --ema 0.9 --dtype bf16 -o m.safetensors --json

        ckptavg average hf://org/run/checkpoint-{800,900} -o m --push-to-hub org/m
    """  # noqa: E501  (typer keeps a docstring's line breaks in --help: a paragraph stays on one line)
    keywords = library_keywords(locals())
    average_checkpoints = deferred("ckptavg.averaging", "average")  # imported under the progress display
    pushed = push_after(push_to_hub, output, out_format, dry_run, private, revision, commit_message)

    def run(**callbacks: Any) -> Any:
        return pushed(average_checkpoints(inputs, output, **keywords, **callbacks))

    run_and_render(
        run,
        print_summary,
        json_output,
        quiet,
        inputs=len(inputs),
    )
