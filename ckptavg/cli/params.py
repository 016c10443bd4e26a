"""The options several commands share, declared once (flag, metavar, help)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

# A command's parameters that are the CLI's own: rendering, the Hub upload, and the inputs and output (passed by position).
CLI_ONLY = frozenset(
    {"inputs", "checkpoint", "output", "json_output", "quiet", "debug", "push_to_hub", "private", "revision", "commit_message"}
)


def library_keywords(parameters: dict[str, Any]) -> dict[str, Any]:
    """A command's parameters (its `locals()` on entry) as the keyword arguments of the library function it calls:
    the CLI's own left out, and the three named for their flag's sake renamed (--strip-prefix, --accum-dtype,
    --no-fsync)."""
    keywords = {name: value for name, value in parameters.items() if name not in CLI_ONLY}
    if "strip_prefix" in keywords:
        keywords["strip_prefixes"] = tuple(keywords.pop("strip_prefix") or ())
    if "accum_dtype" in keywords:
        keywords["accum"] = keywords.pop("accum_dtype")
    if "no_fsync" in keywords:
        keywords["fsync"] = not keywords.pop("no_fsync")
    return keywords


JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as one JSON document on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summary; errors only.")]
# main() takes --debug wherever it is given, before parsing; each command declares it only so that its --help lists it.
DebugOpt = Annotated[bool, typer.Option("--debug", help="On an error, print its traceback too (or set CKPTAVG_DEBUG=1).")]
KeyOpt = Annotated[
    str | None,
    typer.Option(
        "--key",
        metavar="NAME",
        help=(
            "Where the weights are: the entry of a PyTorch checkpoint (state_dict, model; a/b for nested), the prefix of a DCP "
            "save's model entries, or module for the 16-bit copy of a DeepSpeed save."
        ),
    ),
]
UseEmaOpt = Annotated[
    bool, typer.Option("--use-ema", help="Take the EMA weights each checkpoint carries (state_dict_ema, model_ema, ema, ...).")
]
StripOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--strip-prefix", metavar="PREFIX", help="Remove this prefix from tensor names (repeatable), e.g. module. or _orig_mod."
    ),
]
DtypeOpt = Annotated[
    str | None,
    typer.Option(
        "--dtype",
        metavar="DTYPE",
        help=(
            "Output dtype of floating tensors: bf16, fp16 or fp32 (or torch's bfloat16, float16, float32). Default: the input's."
        ),
    ),
]
OrderOpt = Annotated[
    str,
    typer.Option(
        "--order", metavar="MODE", help="auto: by training step (else epoch, else as given); given: command-line order."
    ),
]
AccumOpt = Annotated[
    str,
    typer.Option(
        "--accum-dtype", metavar="DTYPE", help="Accumulator: auto (FP32 for 16-bit inputs, FP64 for FP32), fp32 or fp64."
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", metavar="DEVICE", help="auto (CUDA when present), cpu, cuda or cuda:N.")]
ShardOpt = Annotated[
    str | None,
    typer.Option(
        "--max-shard-size",
        metavar="SIZE",
        help=(
            "Shard the output folder above this size, e.g. 5GB, 500MB (default 5GB). A single-file output is never sharded: "
            "refused with one."
        ),
        show_default=False,
    ),
]
BudgetOpt = Annotated[
    str | None,
    typer.Option(
        "--memory-budget",
        metavar="SIZE",
        help=(
            "Buffers the engine may use, e.g. 64MB (default: 64MiB on a CPU, 512MiB of pinned memory with CUDA). Memory does "
            "not grow with the model or the number of inputs."
        ),
        show_default=False,
    ),
]
NoFsyncOpt = Annotated[
    bool,
    typer.Option(
        "--no-fsync",
        help=(
            "Do not wait for the output to reach the disk before renaming it into place: faster on slow disks, but a power loss "
            "soon after may leave it incomplete."
        ),
    ),
]
VerifyOpt = Annotated[
    bool,
    typer.Option(
        "--verify",
        help=(
            "Read the output back from the disk before it is renamed into place: every tensor must match a CRC-32 kept while "
            "writing. Records each file's sha256 in ckptavg.json and the --json report."
        ),
    ),
]
PushOpt = Annotated[
    str | None,
    typer.Option(
        "--push-to-hub",
        metavar="ORG/NAME",
        help=(
            "Then upload the output folder (weights, config, tokenizer, ckptavg.json, model card) to this Hub repo, created if "
            "missing. The local output is written first and kept; a failed upload exits 3."
        ),
        show_default=False,
    ),
]
PrivateOpt = Annotated[
    bool, typer.Option("--private", help="With --push-to-hub: create the repo private (an existing repo keeps its visibility).")
]
PushRevisionOpt = Annotated[
    str | None,
    typer.Option(
        "--revision",
        metavar="BRANCH",
        help="With --push-to-hub: the branch to push to, created if missing (default: main).",
        show_default=False,
    ),
]
CommitMessageOpt = Annotated[
    str | None,
    typer.Option(
        "--commit-message",
        metavar="TEXT",
        help="With --push-to-hub: the commit message (default: what was averaged or exported).",
        show_default=False,
    ),
]
RankTimeoutOpt = Annotated[
    float,
    typer.Option(
        "--rank-timeout",
        metavar="SECONDS",
        help=("Under torchrun: a rank silent this long (killed, node down) fails the job, naming it."),
    ),
]
RequantizeOpt = Annotated[
    bool,
    typer.Option(
        "--requantize",
        help=(
            "FP8 inputs: write the output in their own scheme again (dtype, block size, scale names; scales from each "
            "block's absolute maximum) instead of the exact mean in --dtype (bf16 by default)."
        ),
    ),
]
TrainingStateOpt = Annotated[
    str,
    typer.Option(
        "--training-state",
        metavar="WHAT",
        help="With --format same: drop (default) or newest (its optimizer, RNG, ... kept: resumable).",
        show_default=False,
    ),
]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace OUT if a previous ckptavg run wrote it. Never an input, a training checkpoint or a folder of other files.",
    ),
]
AdapterModeOpt = Annotated[
    str,
    typer.Option(
        "--adapter-mode",
        metavar="MODE",
        help=(
            "PEFT adapters: exact (an adapter whose change to every module is exactly the weighted mean of the changes; "
            "rank grows to the sum), params (the parameter-wise mean at the same rank, with its error against exact) or "
            "merged (a full model: --base + the mean change; exact for DoRA too)."
        ),
    ),
]
BaseOpt = Annotated[
    Path | None,
    typer.Option(
        "--base",
        metavar="MODEL",
        help="The adapters' base model (a local folder or file, or hf://ORG/REPO@REVISION), for --adapter-mode merged.",
    ),
]
AdapterRankOpt = Annotated[
    int | None,
    typer.Option(
        "--adapter-rank",
        metavar="R",
        help="Truncate the exact average of LoRA adapters to rank R by SVD; the summary gives each module's error.",
    ),
]
StrictOpt = Annotated[
    bool,
    typer.Option(
        "--strict",
        help=(
            "Treat every warning (inputs that look like different runs, an EMA that is mostly its oldest input, ...) as an "
            "error: exit 1, nothing written. For CI."
        ),
    ),
]
OutFormatOpt = Annotated[
    str,
    typer.Option(
        "--format",
        metavar="FORMAT",
        help="auto (by OUT's name), safetensors, pt, or same (the newest input's own layout).",
        show_default=False,
    ),
]
