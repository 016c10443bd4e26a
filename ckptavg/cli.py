"""The command line: parses arguments, calls the library, renders the result. No merging logic here."""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer

from ckptavg import __version__
from ckptavg.errors import EXIT_SIGINT, EXIT_SIGTERM, EXIT_USAGE, CkptavgError, Interrupted
from ckptavg.render import ProgressBar, print_error, print_json, print_summary

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="Merge the checkpoints of a training run into one better model.",
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as one JSON document on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summary; errors only.")]
KeyOpt = Annotated[Optional[str], typer.Option("--key", help="Entry of a PyTorch checkpoint that holds the weights, e.g. state_dict or model (a/b for nested).")]
UseEmaOpt = Annotated[bool, typer.Option("--use-ema", help="Take the EMA weights each checkpoint carries (state_dict_ema, model_ema, ema, ...).")]
StripOpt = Annotated[Optional[list[str]], typer.Option("--strip-prefix", help="Remove this prefix from tensor names (repeatable), e.g. module. or _orig_mod.")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="Output dtype of floating tensors: bf16, fp16 or fp32 (default: the input's).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu, cuda or cuda:N.")]
ShardOpt = Annotated[str, typer.Option("--max-shard-size", help="Shard the output folder above this size, e.g. 5GB, 500MB.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists (it is then never read as an input).")]


def _print_version(value: bool) -> None:
    if value:
        print(f"ckptavg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version, help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an error.")] = False,
) -> None:
    """Merge the checkpoints of a training run into one better model."""


@app.command()
def average(
    inputs: Annotated[list[Path], typer.Argument(help="Checkpoint files or folders (safetensors, sharded, .pt/.bin/.ckpt, checkpoint-N/).", show_default=False)],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Output folder (sharded safetensors + index + config/tokenizer), or a .safetensors file.")] = None,
    weights: Annotated[Optional[str], typer.Option("--weights", help="uniform (default), linear (1..N, newer counts more) or numbers like 1,2,3 (normalised).")] = None,
    ema: Annotated[Optional[float], typer.Option("--ema", metavar="DECAY", help="Exponential moving average over the ordered inputs: e_i = DECAY*e_(i-1) + (1-DECAY)*x_i.")] = None,
    order: Annotated[str, typer.Option("--order", help="auto: by training step (else epoch, else as given); given: command-line order.")] = "auto",
    dtype: DtypeOpt = None,
    accum_dtype: Annotated[str, typer.Option("--accum-dtype", help="Accumulator: auto (FP32 for 16-bit inputs, FP64 for FP32), fp32 or fp64.")] = "auto",
    device: DeviceOpt = "auto",
    max_shard_size: ShardOpt = "5GB",
    key: KeyOpt = None,
    use_ema: UseEmaOpt = False,
    strip_prefix: StripOpt = None,
    overwrite: OverwriteOpt = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the inputs and print the plan; write nothing.")] = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Average checkpoints into one inference-only model (mean, weighted, linear or EMA).

    Tensors are streamed one chunk at a time, so memory stays bounded whatever the model size. Floating tensors are accumulated in FP32 (FP64 for FP32 inputs) and rounded once; integer tensors such as num_batches_tracked are copied from the newest input.

    Example:

        ckptavg average runs/checkpoint-* -o merged

        ckptavg average ckpt_*.pt --ema 0.9 --dtype bf16 -o merged.safetensors --json
    """
    from ckptavg.averaging import average as average_checkpoints

    progress = ProgressBar(enabled=not quiet)
    with progress.running():
        report = average_checkpoints(
            inputs, output,
            weights=weights, ema=ema, order=order, dtype=dtype, accum=accum_dtype, device=device,
            max_shard_size=max_shard_size, key=key, use_ema=use_ema, strip_prefixes=strip_prefix or (),
            overwrite=overwrite, dry_run=dry_run, on_progress=progress.update, on_plan=progress.start,
        )
    if json_output:
        print_json(report.to_dict())
    elif not quiet:
        print_summary(report)


def _on_sigterm(signum: int, frame: object) -> None:
    raise Interrupted("SIGTERM", EXIT_SIGTERM)


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the app and turns every error into one line on stderr and an exit code."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("CKPTAVG_DEBUG") == "1"
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = app(args=args, prog_name="ckptavg", standalone_mode=False)
        if code == EXIT_SIGINT:  # typer turns KeyboardInterrupt into this return value
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            sys.exit(code)
    except CkptavgError as e:
        if debug:
            traceback.print_exc()
        print_error(e.message)
        sys.exit(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.TyperException as e:  # usage errors from the argument parser
        e.show()
        sys.exit(getattr(e, "exit_code", EXIT_USAGE) or EXIT_USAGE)
    except (typer.Abort, KeyboardInterrupt):
        print_error("interrupted by SIGINT; nothing was written")
        sys.exit(EXIT_SIGINT)
    except OSError as e:
        if debug:
            traceback.print_exc()
        where = f"{e.filename}: " if e.filename else ""
        print_error(f"{where}{e.strerror or e}")
        sys.exit(1)
    except Exception as e:
        if debug:
            traceback.print_exc()
        print_error(f"internal error: {type(e).__name__}: {e} (run with --debug for the traceback)")
        sys.exit(1)
