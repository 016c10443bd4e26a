"""The command line: parses arguments, calls the library, renders the result. No merging logic here."""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import re
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from typer._click import exceptions as click_errors  # typer's own copy of click: the classes its parser raises

from ckptavg import distributed, signals
from ckptavg.distributed import follower, under_torchrun
from ckptavg.errors import EXIT_SIGINT, EXIT_SIGTERM, EXIT_USAGE, CkptavgError, Interrupted, UsageError, options_spelled
from ckptavg.render import (
    ProgressDisplay,
    print_diff,
    print_error,
    print_export,
    print_inspect,
    print_json,
    print_selection,
    print_summary,
    print_sweep,
    print_tune,
    stderr,
    tune_candidate_line,
)
from ckptavg.version import __version__

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Merge the checkpoints of a training run into one better model.",
)

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


def _print_version(value: bool) -> None:
    if value:
        print(f"ckptavg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=_print_version, help="Print the version and exit.")
    ] = False,
    debug: DebugOpt = False,
) -> None:
    """Merge the checkpoints of a training run into one better model."""


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
    adapter_mode: Annotated[
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
    ] = "exact",
    base: Annotated[
        Path | None,
        typer.Option(
            "--base",
            metavar="MODEL",
            help="The adapters' base model (a local folder or file, or hf://ORG/REPO@REVISION), for --adapter-mode merged.",
        ),
    ] = None,
    adapter_rank: Annotated[
        int | None,
        typer.Option(
            "--adapter-rank",
            metavar="R",
            help="Truncate the exact average of LoRA adapters to rank R by SVD; the summary gives each module's error.",
        ),
    ] = None,
    rank_timeout: RankTimeoutOpt = 120.0,
    requantize: RequantizeOpt = False,
    out_format: Annotated[
        str,
        typer.Option(
            "--format",
            metavar="FORMAT",
            help="auto (by OUT's name), safetensors, pt, or same (the newest input's own layout).",
            show_default=False,
        ),
    ] = "auto",
    training_state: TrainingStateOpt = "drop",
    strict: Annotated[
        bool,
        typer.Option(
            "--strict",
            help=(
                "Treat every warning (inputs that look like different runs, an EMA that is mostly its oldest input, ...) as an "
                "error: exit 1, nothing written. For CI."
            ),
        ),
    ] = False,
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
    pushed = _push_after(push_to_hub, output, out_format, dry_run, private, revision, commit_message)

    def run(**callbacks: Any) -> Any:
        from ckptavg.averaging import average_with  # imported under the progress display: torch takes a while
        from ckptavg.options import AverageOptions

        options = AverageOptions(
            weights=weights,
            ema=ema,
            ema_half_life=ema_half_life,
            ema_sigma_rel=ema_sigma_rel,
            order=order,
            dtype=dtype,
            accum=accum_dtype,
            device=device,
            max_shard_size=max_shard_size,
            key=key,
            use_ema=use_ema,
            strip_prefixes=strip_prefix or (),
            overwrite=overwrite,
            dry_run=dry_run,
            out_format=out_format,
            memory_budget=memory_budget,
            fsync=not no_fsync,
            verify=verify,
            strict=strict,
            adapter_mode=adapter_mode,
            base=base,
            adapter_rank=adapter_rank,
            rank_timeout=rank_timeout,
            requantize=requantize,
            training_state=training_state,
        )
        return pushed(average_with(inputs, output, options, **callbacks))

    _run_and_render(
        run,
        print_summary,
        json_output,
        quiet,
        inputs=len(inputs),
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
    adapter_mode: Annotated[
        str,
        typer.Option("--adapter-mode", metavar="MODE", help="PEFT adapters: exact, params or merged, as for average."),
    ] = "exact",
    base: Annotated[
        Path | None,
        typer.Option("--base", metavar="MODEL", help="The adapters' base model, for --adapter-mode merged."),
    ] = None,
    adapter_rank: Annotated[
        int | None,
        typer.Option("--adapter-rank", metavar="R", help="Truncate the exact average of LoRA adapters to rank R by SVD."),
    ] = None,
    requantize: RequantizeOpt = False,
    strict: Annotated[bool, typer.Option("--strict", help="Treat every warning as an error: exit 1, nothing written.")] = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Average the same checkpoints several ways from one read: one complete output per candidate weighting.

    Each input byte is read once; every chunk is folded into each candidate's output, and each candidate's weight files are byte for byte those `ckptavg average` writes with the same inputs and weighting. Memory stays within --memory-budget whatever the number of candidates. DIR is written as a whole: a failure leaves nothing.

    Example:

        ckptavg sweep runs/checkpoint-* -o sweep --recipe mean --recipe last:2,4 --recipe ema:0.9,0.99

        ckptavg sweep ckpt_*.pt -o sweep --recipe linear --recipe ema-half-life:500 --json
    """  # noqa: E501  (typer keeps a docstring's line breaks in --help: a paragraph stays on one line)
    sweep_checkpoints = _deferred("ckptavg.sweeping", "sweep")
    _run_and_render(
        lambda **callbacks: sweep_checkpoints(
            inputs,
            output,
            recipes=recipes or [],
            order=order,
            dtype=dtype,
            accum=accum_dtype,
            device=device,
            max_shard_size=max_shard_size,
            key=key,
            use_ema=use_ema,
            strip_prefixes=strip_prefix or (),
            overwrite=overwrite,
            dry_run=dry_run,
            memory_budget=memory_budget,
            fsync=not no_fsync,
            verify=verify,
            strict=strict,
            adapter_mode=adapter_mode,
            base=base,
            adapter_rank=adapter_rank,
            requantize=requantize,
            **callbacks,
        ),
        print_sweep,
        json_output,
        quiet,
        inputs=len(inputs),
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
    strict: Annotated[bool, typer.Option("--strict", help="Treat every warning as an error: exit 1, nothing written.")] = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Choose the merge by evaluation: average the checkpoints several ways, score each candidate, write the best.

    The candidates are written with one read of the inputs, evaluated one at a time and removed once scored. The winner (the best score among those no --guard holds back) is written to OUT like an average output; its ckptavg.json and model card hold the whole table. Run again after an interruption, it reuses the scores already measured.

    Example:

        ckptavg tune run/checkpoint-* -o best --eval-text held.txt --greedy-soup

        ckptavg tune ckpt-* -o best --eval 'python eval.py {model}' --metric acc
    """  # noqa: E501  (typer keeps a docstring's line breaks in --help: a paragraph stays on one line)
    tune_checkpoints = _deferred("ckptavg.tuning.run", "tune")

    def on_candidate(row: Any) -> None:
        if not quiet:
            stderr.print(tune_candidate_line(row), markup=False, highlight=False, soft_wrap=True)

    _run_and_render(
        lambda on_progress, on_plan: tune_checkpoints(
            inputs,
            output,
            eval_command=eval_command,
            eval_text=eval_text,
            eval_tokens=eval_tokens,
            eval_timeout=eval_timeout,
            recipes=recipes,
            greedy_soup=greedy_soup,
            metric=metric,
            mode=mode,
            guards=guards or (),
            keep_candidates=keep_candidates,
            plot=plot,
            dry_run=dry_run,
            overwrite=overwrite,
            order=order,
            dtype=dtype,
            device=device,
            max_shard_size=max_shard_size,
            key=key,
            use_ema=use_ema,
            strip_prefixes=strip_prefix or (),
            memory_budget=memory_budget,
            verify=verify,
            strict=strict,
            on_candidate=on_candidate,
            on_progress=on_progress,
        ),
        print_tune,
        json_output,
        quiet,
        inputs=len(inputs),
    )


def _push_after(
    repo: str | None,
    output: Path | None,
    out_format: str,
    dry_run: bool,
    private: bool,
    revision: str | None,
    message: str | None,
) -> Callable[[Any], Any]:
    """--push-to-hub: checked now, before any work; returns what uploads a finished report's output (hub.py)."""
    if not repo:
        if private or revision or message:
            raise UsageError(
                None,
                f"{'--private' if private else '--revision' if revision else '--commit-message'} applies with --push-to-hub REPO",
            )
        return lambda report: report
    _deferred("ckptavg.hub", "check_push")(repo, output, out_format, dry_run)
    if follower():  # under torchrun, rank 0 uploads the job's output once
        return lambda report: report
    push = _deferred("ckptavg.hub", "push_report")
    return lambda report: push(report, repo, private=private or None, revision=revision, commit_message=message)


def _deferred(module: str, name: str) -> Callable[..., Any]:
    """`module.name`, imported when it is called: the progress display is up before torch is imported."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    return call


def _run_and_render(
    run: Callable[..., Any], render: Callable[[Any], None], json_output: bool, quiet: bool, inputs: int = 0
) -> None:
    """Run a job with the progress display wired to its callbacks (a status line from the start, while torch
    is imported and the `inputs` are opened), print its warnings on stderr (also with --json; not with --quiet),
    then its report as JSON or for people."""
    quiet = quiet or follower()  # in a torchrun job, rank 0 speaks for every rank
    display = ProgressDisplay(enabled=not quiet, inputs=inputs)
    failed: CkptavgError | None = None
    with display.running():
        try:
            report = run(on_progress=display.update, on_plan=display.on_plan)
        except CkptavgError as e:  # a failure after the output was written (a push) still has its report
            if getattr(e, "report", None) is None:
                raise
            report, failed = e.report, e  # type: ignore[attr-defined]
    if follower():
        return
    display.warn(report)
    if json_output:
        print_json(report.to_dict())
    elif not quiet:
        render(report)
    if failed is not None:
        raise failed


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


@app.command()
def inspect(
    path: Annotated[
        Path,
        typer.Argument(
            metavar="CHECKPOINT",
            help="A checkpoint file or folder, or hf://ORG/REPO@REVISION/FOLDER on the Hub (revision and folder optional).",
            show_default=False,
        ),
    ],
    tensors: Annotated[bool, typer.Option("--tensors", help="List every tensor: name, dtype, shape, bytes.")] = False,
    pattern: Annotated[
        str | None, typer.Option("--filter", metavar="REGEX", help="Only tensors whose name matches (with --tensors or --diff).")
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", help="Stream every tensor: report NaN/Inf and all-zero tensors; exit 1 when any.")
    ] = False,
    diff: Annotated[
        Path | None,
        typer.Option(
            "--diff",
            metavar="B",
            help=(
                "Compare with checkpoint B: per-tensor L2, relative L2, cosine, max |a-b|. Nothing compared (no tensor of the "
                "same name and shape) is exit 1."
            ),
        ),
    ] = None,
    fail_if_different: Annotated[
        bool,
        typer.Option(
            "--fail-if-different",
            help="With --diff: exit 1 unless A and B hold the same tensors, same shapes, same values (for CI).",
        ),
    ] = False,
    max_rel_l2: Annotated[
        float | None,
        typer.Option(
            "--max-rel-l2",
            metavar="X",
            help=(
                "With --diff: exit 1 when the relative L2 of all floating tensors exceeds X, or a tensor is missing on one side "
                "or of another shape."
            ),
            show_default=False,
        ),
    ] = None,
    min_cosine: Annotated[
        float | None,
        typer.Option(
            "--min-cosine",
            metavar="X",
            help=(
                "With --diff: exit 1 when a floating tensor's cosine is below X, or a tensor is missing on one side or of "
                "another shape."
            ),
            show_default=False,
        ),
    ] = None,
    key: KeyOpt = None,
    use_ema: UseEmaOpt = False,
    strip_prefix: StripOpt = None,
    json_output: JsonOpt = False,
    quiet: Annotated[
        bool,
        typer.Option("--quiet", "-q", help="No progress bar and no report; errors and the exit code only (--json still prints)."),
    ] = False,
    debug: DebugOpt = False,
) -> None:
    """Show what a checkpoint holds: layout, tensors, dtypes, step, metrics and training state.

    Reads headers and pickle structure only (nothing in a pickle is run); --check and --diff stream the tensors, with a progress bar on a terminal.

    Example:

        ckptavg inspect runs/checkpoint-1000 --json

        ckptavg inspect epoch=3-step=400.ckpt --tensors --filter 'attn'

        ckptavg inspect merged --diff runs/checkpoint-1000 --max-rel-l2 0.01
    """  # noqa: E501  (one line per paragraph: typer keeps the line breaks)
    if follower():
        return
    import ckptavg
    from ckptavg.errors import InputError
    from ckptavg.inspection import diff_problems

    asked = (
        ("--fail-if-different", fail_if_different),
        ("--max-rel-l2", max_rel_l2 is not None),
        ("--min-cosine", min_cosine is not None),
    )
    checks = [flag for flag, on in asked if on]
    if checks and diff is None:
        raise UsageError(None, f"{checks[0]} applies with --diff B")
    if max_rel_l2 is not None and not max_rel_l2 >= 0:
        raise UsageError(None, f"--max-rel-l2 {max_rel_l2:g}: expected a number >= 0")
    if min_cosine is not None and not -1 <= min_cosine <= 1:
        raise UsageError(None, f"--min-cosine {min_cosine:g}: expected a number in [-1, 1]")
    where = {"key": key, "use_ema": use_ema, "strip_prefixes": tuple(strip_prefix or ())}
    display = ProgressDisplay(enabled=not quiet, inputs=1 if diff is None else 2)
    if diff is not None:
        with display.running():
            report = ckptavg.diff(path, diff, pattern=pattern, on_progress=display.update, **where)
        if json_output:
            print_json(report.to_dict())
        elif not quiet:
            print_diff(report)
        problems = diff_problems(report, fail_if_different, max_rel_l2, min_cosine)
        if problems:
            raise InputError(None, f"{report.a} vs {report.b}: {'; '.join(problems)}")
        return
    with display.running() if check else contextlib.nullcontext():
        report = ckptavg.inspect(path, tensors=tensors, pattern=pattern, check=check, on_progress=display.update, **where)
    if json_output:
        print_json(report.to_dict())
    elif not quiet:
        print_inspect(report)
    if report.issues:
        raise InputError(
            report.path,
            f"{len(report.issues)} tensor(s) with NaN, Inf or only zeros: {', '.join(i.name for i in report.issues[:3])}",
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
    export_checkpoint = _deferred("ckptavg.exporting", "export")
    pushed = _push_after(push_to_hub, output, out_format, dry_run, private, revision, commit_message)

    _run_and_render(
        lambda **callbacks: pushed(
            export_checkpoint(
                checkpoint,
                output,
                merge=merge,
                base=base,
                dtype=dtype,
                key=key,
                use_ema=use_ema,
                strip_prefixes=strip_prefix or (),
                max_shard_size=max_shard_size,
                device=device,
                overwrite=overwrite,
                dry_run=dry_run,
                out_format=out_format,
                memory_budget=memory_budget,
                fsync=not no_fsync,
                verify=verify,
                rank_timeout=rank_timeout,
                requantize=requantize,
                training_state=training_state,
                **callbacks,
            )
        ),
        print_export,
        json_output,
        quiet,
        inputs=1,
    )


def _on_sigterm(signum: int, frame: object) -> None:
    raise Interrupted("SIGTERM", EXIT_SIGTERM)


def _take_debug(args: list[str]) -> tuple[list[str], bool]:
    """--debug wherever it is given (before or after the command, before a `--`): (the other args, given?)."""
    end = args.index("--") if "--" in args else len(args)
    head = [a for a in args[:end] if a != "--debug"]
    return head + args[end:], len(head) < end


def _flag_type_column(self: Any, ctx: Any) -> str | None:
    # Typer shows a `<bool>` type beside every flag in --help; a flag takes no value, so show none.
    return None if getattr(self, "is_flag", False) else _option_type_column(self, ctx)


_option_type_column = typer.core.TyperOption.display_type_rich
typer.core.TyperOption.display_type_rich = _flag_type_column  # type: ignore[method-assign]
typer.core.TyperArgument.display_type_rich = lambda self, ctx: None  # type: ignore[method-assign]  # its metavar says it


def parser_message(e: typer.TyperException) -> str:
    """A parsing error of click's in the words of ckptavg's other errors: one line, lower case, its suggestion kept
    ("no such option --wieghts (did you mean --weights?)") instead of click's usage block and capitalised Error."""
    if isinstance(e, click_errors.NoSuchOption):  # its possibilities come best first (difflib)
        return f"no such option {e.option_name}" + (f" (did you mean {e.possibilities[0]}?)" if e.possibilities else "")
    text = e.format_message() if isinstance(e, click_errors.ClickException) else str(e)
    # "No such command 'averag'. Did you mean 'average'?", "Invalid value for '--ema': Input should be ...",
    # "Missing argument 'CHECKPOINT'." become "no such command 'averag' (did you mean 'average'?)", "invalid value
    # for --ema: input should be ...", "missing argument CHECKPOINT"
    text = re.sub(r"\.? Did you mean (.+)\?$", r" (did you mean \1?)", text.strip())
    text = re.sub(r"'(--?[\w-]+|[A-Z_]+)'", r"\1", text).removesuffix(".")
    return re.sub(r"(^|: )([A-Z])(?=[a-z])", lambda m: m.group(1) + m.group(2).lower(), text)


def exit_now(code: int) -> None:
    """Exit with `code` at once. After a Ctrl-C, Python may still end a process that handled it by the signal
    itself (it does when the interrupt landed in code run through PyRun_*, e.g. while torch imports), which a
    parent sees as -2, not 130; the staged output and the lock are already cleaned up by then."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _tell_torchrun(message: str) -> None:
    """Under torchrun, leave the error in the file its agent reads, so that its failure report shows this line
    (instead of "To enable traceback see ...")."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path and under_torchrun():
        try:
            with open(path, "w") as f:
                json.dump(
                    {"message": {"message": message, "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))}}},
                    f,
                )
        except OSError:
            pass


# The library names an option by its Python keyword; these commands call the parameter otherwise.
_PARAMETER_OF = {"out": "output", "accum": "accum_dtype", "strip_prefixes": "strip_prefix"}


@functools.cache
def _flags() -> dict[str, str]:
    """Each parameter's flag, as its command declares it first (`-o`, `--memory-budget`)."""
    flags: dict[str, str] = {}
    for command in typer.main.get_command(app).commands.values():  # type: ignore[attr-defined]
        for param in command.params:
            if isinstance(param, typer.core.TyperOption) and param.name:
                flags.setdefault(param.name, param.opts[0])
    return flags


def flag_spelling(name: str, value: str | None) -> str:
    """An option a message names, as it is typed on this command line: `--memory-budget 1GB`; a switch
    (value True) is its flag alone."""
    flag = _flags().get(_PARAMETER_OF.get(name, name)) or "--" + name.replace("_", "-")
    return flag if value in (None, "True") else f"{flag} {value}"


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the app and turns every error into one line on stderr and an exit code."""
    with options_spelled(flag_spelling):
        _main(argv)


def _main(argv: list[str] | None) -> None:
    args = sys.argv[1:] if argv is None else argv
    args, debug = _take_debug(args)
    debug = debug or os.environ.get("CKPTAVG_DEBUG") == "1"
    signal.signal(signal.SIGTERM, _on_sigterm)
    signals.keep_ignored_after_commit = True
    distributed.world.ignore_signals_when_done = under_torchrun()  # read by World when the job ends
    silent = follower()  # a torchrun rank other than 0: rank 0 reports the job's errors
    try:
        code = app(args=args, prog_name="ckptavg", standalone_mode=False)
        if code == EXIT_SIGINT:  # typer turns KeyboardInterrupt into this return value
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            sys.exit(code)
    except CkptavgError as e:
        if debug:
            traceback.print_exc()
        if not silent or getattr(e, "reported", True) is False:
            print_error(e.message)
            _tell_torchrun(e.message)
        sys.exit(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.TyperException as e:  # usage errors from the argument parser
        if isinstance(e, click_errors.NoArgsIsHelpError):  # `ckptavg` alone: the help
            e.show()
        else:
            print_error(parser_message(e))
        sys.exit(getattr(e, "exit_code", EXIT_USAGE) or EXIT_USAGE)
    except (typer.Abort, KeyboardInterrupt):
        if not silent:
            print_error("interrupted by SIGINT; nothing was written")
        exit_now(EXIT_SIGINT)
    except OSError as e:
        if debug:
            traceback.print_exc()
        where = f"{e.filename}: " if e.filename else ""
        print_error(f"{where}{e.strerror or e}")
        sys.exit(1)
    except Exception as e:
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (run with --debug for the traceback)"
        print_error(f"internal error: {type(e).__name__}: {e}{hint}")
        sys.exit(1)
