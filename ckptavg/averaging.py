"""`average`: the library function behind `ckptavg average`; returns the report the CLI prints."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ckptavg.checkpoint import LoadOptions, real_path
from ckptavg.checks import check_path
from ckptavg.distributed import World, job, join
from ckptavg.errors import OutputError, StrictError, UsageError, option
from ckptavg.formats.base import Checkpoint
from ckptavg.formats.dtypes import dtype_name
from ckptavg.formats.peft import WEIGHT_FILES
from ckptavg.formats.pickle_same import check_same_layout
from ckptavg.formats.trainer_same import is_trainer_folder
from ckptavg.formats.writer import (
    lay_out_files,
)
from ckptavg.globbing import expand
from ckptavg.hub import Localized, is_hub, localize
from ckptavg.merge.adapters import AdapterSummary, build_adapter_plan, check_adapters
from ckptavg.merge.plan import Plan, build_plan, output_specs
from ckptavg.merge.weights import Weights, oldest_weight_warning, parse_weights
from ckptavg.options import AverageOptions
from ckptavg.ordering import order_inputs, order_note, require_order
from ckptavg.output import (
    WriteOptions,
    check_destination,
    check_output_name,
    check_space,
    output_layout,
    staged,
    tmp_name,
)
from ckptavg.progress import ProgressFn
from ckptavg.reports import AverageReport, InputSummary
from ckptavg.same_run import different_runs
from ckptavg.same_weights import refuse_copies
from ckptavg.sizes import peak_rss
from ckptavg.version import __version__
from ckptavg.writing import OutputFiles, check_output_layout, disk_size, output_disk_bytes, run_engine, tensor_files

ADAPTER_WEIGHTS = WEIGHT_FILES[0]


def choose_device(name: str, local_rank: int | None = None) -> torch.device:
    """The device to fold on; in a job of several ranks, `cuda` and `auto` mean this rank's GPU (LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and local_rank is not None and torch.cuda.is_available():
        name = f"cuda:{local_rank % max(1, torch.cuda.device_count())}"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(None, f"{option('device', repr(name))}: expected auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(None, f"{option('device', name)}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(None, f"{option('device', name)}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise UsageError(None, f"{option('device', name)}: expected auto, cpu, cuda or cuda:N")
    return device


def average(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike | None,
    *,
    weights: str | Sequence[float] | None = None,
    ema: float | None = None,
    ema_half_life: float | None = None,
    ema_sigma_rel: float | None = None,
    order: str = "auto",
    dtype: str | None = None,
    accum: str = "auto",
    device: str = "auto",
    max_shard_size: str | int | None = None,
    key: str | None = None,
    use_ema: bool = False,
    strip_prefixes: Sequence[str] = (),
    overwrite: bool = False,
    dry_run: bool = False,
    out_format: str = "auto",
    memory_budget: str | int | None = None,
    fsync: bool = True,
    verify: bool = False,
    strict: bool = False,
    check_same_run: bool = True,
    adapter_mode: str = "exact",
    base: str | os.PathLike | None = None,
    adapter_rank: int | None = None,
    rank_timeout: float | None = None,
    requantize: bool = False,
    training_state: str = "drop",
    on_progress: ProgressFn | None = None,
    on_plan: Callable[[AverageReport], None] | None = None,
    make_weights: Callable[[int], Weights] | None = None,
) -> AverageReport:
    """Average checkpoints into one inference-only model.

    Args:
        paths: checkpoint files or folders, in any layout ckptavg reads.
        out: a folder (sharded safetensors + index + model files) or a `.safetensors` file; None only with dry_run.
        weights: None or "uniform" (mean), "linear" (1..N), "wsm:CURVE" (Warmup-Stable-Merge's weights for the decay
            curve linear, cosine or minus-sqrt, each also + "__reverse"), or one weight per input: [1, 2, 3] or "1,2,3".
        ema: decay of an exponential moving average over the ordered inputs (instead of weights).
        ema_half_life: an EMA in training steps with this half-life, honouring irregular spacing (instead of weights).
        ema_sigma_rel: the power-function EMA (EDM2) of this relative width in (0, 0.2887), over the inputs' steps
            (instead of weights).
        order: "auto" (by step, else epoch, else as given) or "given".
        dtype: output dtype of floating tensors ("bf16", "fp16", "fp32", or torch's "bfloat16", ...); None keeps the input's.
        accum: "auto" (FP32 for 16-bit inputs, FP64 for FP32), "fp32" or "fp64" (or "float32", "float64").
        device: "auto", "cpu", "cuda" or "cuda:N".
        max_shard_size: shard an output folder above this size (None: "5GB"); refused with a single-file output.
        key, use_ema, strip_prefixes: where the weights are inside each input; see LoadOptions.
        overwrite: replace an existing output.
        dry_run: build and check the plan, write nothing.
        out_format: "auto" (by the output's name: .safetensors, .pt/.pth/.bin, else a safetensors folder),
            "safetensors", "pt" (a folder then holds pytorch_model.bin), or "same": the newest input's own layout,
            for PyTorch pickles (fairseq .pt, Lightning .ckpt, timm .pth.tar, ...: its entries kept, its weights
            replaced by the merged ones; formats/pickle_same.py; a file named with its suffix), Trainer
            checkpoint-N/ and model folders (formats/trainer_same.py) and DCP saves (formats/dcp_same.py).
        memory_budget: bytes (or "64MB") of buffers the engine may use; None: 64 MiB on a CPU, 512 MiB of
            pinned memory with CUDA. Larger budgets make larger chunks, not faster CPU folds.
        fsync: make the output durable before it is renamed into place (the default). False leaves the
            writeback to the kernel: faster on a slow disk, but a power loss soon after may leave it incomplete.
        verify: read the output back from the disk before it is renamed into place, check every tensor against
            a CRC-32 kept while writing, and record each file's sha256 (in ckptavg.json for a folder, and in
            the report's `sha256`).
        strict: treat every warning (different runs, an EMA dominated by its oldest input, ...) as an error.
        adapter_mode: for PEFT adapters: "exact" (an adapter whose change is exactly the mean of the changes),
            "params" (the parameter-wise mean, with its error against exact) or "merged" (a full model: base + the
            mean change; needs `base`).
        base: the base model of the adapters, for adapter_mode="merged".
        adapter_rank: truncate the exact average of LoRA adapters to this rank by SVD (each module's error reported).
        check_same_run: compare a small sample of every input to warn when they look like different runs.
        training_state: with out_format="same": "drop" (the default) leaves out the newest input's optimizer,
            scheduler, scaler and RNG entries; "newest" keeps them, so that training resumes from the merge.
        requantize: write FP8 weights (read dequantized) in their inputs' scheme again: the same dtype, block size
            and scale names, new scales from each block's absolute maximum; config.json keeps its quantization_config.
        rank_timeout: under torchrun (or inside an initialised torch.distributed process group), the seconds a
            rank may show no sign of life before the job fails naming it (default 120).
        on_progress: called with a Progress (bytes and tensors done and to do, current tensor) as the work advances.
        on_plan: called with the report of the plan before data is read.
        make_weights: the strategy as a function of the number of inputs, instead of weights/ema.

    Returns:
        The AverageReport.

    Raises:
        CkptavgError: bad inputs (InputError...), bad options (UsageError), unwritable output (OutputError).
    """
    options = AverageOptions.pick(locals())
    return average_with(paths, out, options, on_progress=on_progress, on_plan=on_plan, make_weights=make_weights)


def average_with(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike | None,
    options: AverageOptions,
    *,
    on_progress: ProgressFn | None = None,
    on_plan: Callable[[AverageReport], None] | None = None,
    make_weights: Callable[[int], Weights] | None = None,
) -> AverageReport:
    """`average` with its options as one object, as the command line builds them: each value checked first
    (before any input is opened or the output looked at), then open the inputs → plan → write."""
    started = time.perf_counter()
    paths = check_paths(paths, out, options.base)
    options = options.check()
    paths, out_path, layout = check_inputs_and_output(paths, out, options)
    world = join(options.rank_timeout)
    leader = world is None or world.leader
    with job.failures_shared(world):
        inputs = open_inputs(paths, out_path, options, world)
        plan, report = plan_run(inputs, out_path, options, world, make_weights)
        if world is not None:
            report.world_size = world.size
            job.agree(world, [plan], out_path, options.out_format, options.shard_bytes)
        if on_plan and leader:
            on_plan(report)
        if options.dry_run:
            report.seconds = time.perf_counter() - started
            report.peak_rss_bytes = peak_rss()
            return report
        assert out_path is not None
        assert layout is not None
        write_options = options.write_options(inputs.device)
        report.bytes_read = _write_output(plan, report, out_path, layout, write_options, on_progress, world)
        report.output_disk_bytes = disk_size(out_path) if leader else 0
        report.seconds = time.perf_counter() - started
        report.peak_rss_bytes = max(peak_rss(), world.peak_rss if world else 0)  # of the largest rank
        return report


@dataclass
class OpenedInputs:
    """The opened inputs of a run: the local paths of any hf:// ones, each checkpoint, the adapters' base model,
    and the device this rank folds on."""

    local: Localized
    checkpoints: list[Checkpoint]
    base: Checkpoint | None
    device: torch.device


def check_paths(paths: object, out: object, base: object) -> list[str | os.PathLike]:
    """The inputs as a list (one path alone is one input, not its characters), each a str or os.PathLike."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else paths
    if not isinstance(items, Iterable) or isinstance(items, (bytes, Mapping)):
        raise UsageError(None, f"paths {paths!r}: expected a list of checkpoint paths")
    for name, value in (("out", out), ("base", base)):
        if value is not None:
            check_path(name, value)
    return [check_path("paths", p) for p in items]


def check_inputs_and_output(
    paths: list[str | os.PathLike], out: str | os.PathLike | None, options: AverageOptions
) -> tuple[list[str | os.PathLike], Path | None, tuple[str, bool] | None]:
    """The inputs, any pattern no shell expanded (run/checkpoint-*) expanded, the output's name and its layout
    (kind, one file?: decided here once, from the name and the format asked for), before either is opened."""
    paths = expand(paths)
    if not paths:
        raise UsageError(None, "no inputs given")
    out_path = Path(out) if out is not None else None
    if out_path is None and not options.dry_run:
        raise UsageError(None, f"no output given: pass {option('out', 'OUT')} (or {option('dry_run', True)})")
    layout = output_layout(out_path, options.out_format) if out_path is not None else None
    if out_path is not None and layout is not None:
        if layout[1] and layout[0] != "same" and options.max_shard_size is not None:  # "same": once the inputs are open
            raise UsageError(
                None,
                f"{out_path.name} is one file, never sharded: {option('max_shard_size')} applies to an output folder "
                "(leave it out, or name a folder)",
            )
        check_output_name(out_path)
    return paths, out_path, layout


def open_inputs(
    paths: list[str | os.PathLike], out_path: Path | None, options: AverageOptions, world: World | None
) -> OpenedInputs:
    """Each input opened (hf:// ones fetched into the HF cache), refused when one is given twice or holds the
    output; the output's place checked once (by rank 0): before any download, else once the inputs are open
    (so that an input named as the output is refused as such)."""
    leader = world is None or world.leader
    device = choose_device(options.device, world.local_rank if world else None)
    remote = any(is_hub(p) for p in [*paths, *([options.base] if options.base is not None else [])])
    if remote and out_path is not None and leader:
        check_destination(out_path, options.overwrite)
    local = localize(paths, options.base)
    checkpoints = [local.open(p, options.load_options) for p in local.paths]
    base_model = local.open(local.base, LoadOptions()) if local.base is not None else None
    refuse_overlaps(checkpoints + ([base_model] if base_model else []), out_path)
    refuse_copies(checkpoints)  # a last/best copy beside its epoch checkpoint: the same weights twice
    if not remote and out_path is not None and leader:
        check_destination(out_path, options.overwrite)
    return OpenedInputs(local, checkpoints, base_model, device)


def plan_run(
    inputs: OpenedInputs,
    out_path: Path | None,
    options: AverageOptions,
    world: World | None,
    make_weights: Callable[[int], Weights] | None,
) -> tuple[Plan, AverageReport]:
    """The inputs ordered and weighted, the plan and its report with what looks wrong (an error with --strict);
    the output's room checked (by rank 0)."""
    leader = world is None or world.leader
    checkpoints, ordered_by, notes = order_inputs(inputs.checkpoints, options.order)
    if options.ema_half_life is not None and (unknown := [str(c.path) for c in checkpoints if c.step is None]):
        raise UsageError(
            None,
            (
                f"{option('ema_half_life')} needs the training step of every input: none known for {', '.join(unknown[:3])}; "
                f"use {option('ema', 'DECAY')} instead"
            ),
        )
    if options.ema_sigma_rel is not None and (unknown := [str(c.path) for c in checkpoints if c.step is None]):
        raise UsageError(
            None,
            f"{option('ema_sigma_rel', options.ema_sigma_rel)} needs the training step of every input: none known for "
            f"{', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}",
        )
    steps = [c.step for c in checkpoints]
    strategy = (
        make_weights(len(checkpoints))
        if make_weights
        else parse_weights(options.weights, options.ema, len(checkpoints), options.ema_half_life, steps, options.ema_sigma_rel)
    )
    require_order(inputs.checkpoints, ordered_by, options.order, strategy.strategy)
    if note := order_note(inputs.checkpoints, checkpoints, strategy.strategy):
        notes.append(note)
    if options.requantize and world is not None:
        raise UsageError(
            None, f"{option('requantize', True)} writes one file after another; run it in one process, not under torchrun"
        )
    plan, adapter = _plan(checkpoints, strategy, inputs.base, options)
    report = _report(plan, ordered_by, out_path, inputs.device, notes)
    inputs.local.annotate(report.inputs)
    if adapter is not None:
        report.adapter = asdict(adapter)
        report.notes.append(_adapter_note(adapter, len(checkpoints)))
    report.dry_run = options.dry_run
    report.warnings.extend(
        _warnings(plan, options.ema, options.ema_half_life, steps, options.check_same_run and leader)
    )  # rank 0 samples the inputs
    if options.strict and report.warnings:
        raise StrictError(None, f"warning treated as an error ({option('strict', True)}): {report.warnings[0]}")
    if options.out_format == "same" and out_path is not None:
        report.notes.extend(check_same_layout(plan.inputs, out_path, output_specs(plan), options.training_state))
        if options.max_shard_size is not None and not is_trainer_folder(plan.inputs[-1]):
            raise UsageError(
                None,
                f"{option('max_shard_size')} applies to a folder of safetensors shards; {option('out_format', 'same')} writes "
                "this layout as the newest input holds it (leave it out)",
            )
    if out_path is not None and not options.dry_run and leader:
        check_space(out_path, output_disk_bytes([plan], options.out_format, options.training_state))
    return plan, report


def _plan(
    checkpoints: list[Checkpoint], strategy: Weights, base: Checkpoint | None, options: AverageOptions
) -> tuple[Plan, AdapterSummary | None]:
    """The plan: tensors averaged as they are, or PEFT adapters averaged by what they do (merge/adapters.py)."""
    out_dtype, rank = options.out_dtype, options.adapter_rank
    if check_adapters(checkpoints) is None:
        if base is not None or rank is not None:
            raise UsageError(
                None,
                f"{option('base' if base is not None else 'adapter_rank')} applies to PEFT adapters; the inputs are full models",
            )
        return build_plan(checkpoints, strategy, out_dtype, options.accum, options.requantize), None
    if options.requantize:
        raise UsageError(None, f"{option('requantize', True)} applies to FP8 weights; the inputs are PEFT adapters")
    return build_adapter_plan(checkpoints, strategy, options.adapter_mode, out_dtype, options.accum, base, rank)


def _adapter_note(adapter: AdapterSummary, n: int) -> str:
    if adapter.mode == "exact" and adapter.error_max is not None:
        return (
            f"{adapter.kind} adapters: the exact mean of the {n} changes truncated by SVD to rank {adapter.rank_out}; "
            f"each module's change is off the exact mean by {adapter.error_median:.2%} (median) to {adapter.error_max:.2%} "
            f"({adapter.error_worst})"
        )
    if adapter.mode == "exact":
        return (
            f"{adapter.kind} adapters averaged exactly: each module's change is the weighted mean of the {n} changes, "
            f"as one adapter of rank {adapter.rank_out} (their factors stacked, the scalings in lora_A, lora_alpha = r)"
        )
    if adapter.mode == "merged":
        return f"{adapter.kind} adapters merged into the base model {adapter.base}: base + the weighted mean of the {n} changes"
    if adapter.rank_in is None:
        return (
            f"{adapter.kind} adapters averaged parameter-wise: their effect is linear in their parameters, so this is the exact "
            "mean of their effects"
        )
    if adapter.error_max is None:
        return f"{adapter.kind} adapters averaged parameter-wise at rank {adapter.rank_in}"
    return (
        f"{adapter.kind} adapters averaged parameter-wise at rank {adapter.rank_in}: each module's change is off the exact "
        f"mean of the changes by {adapter.error_median:.2%} (median) to {adapter.error_max:.2%} ({adapter.error_worst}); "
        f"{option('adapter_mode', 'exact')} has no such error"
    )


def _warnings(
    plan: Plan, decay: float | None, half_life: float | None, steps: list[int | None], check_same_run: bool
) -> list[str]:
    """What looks wrong about this run although it can be done: an EMA that is mostly its oldest input,
    inputs that look like different training runs."""
    found = []
    if decay is not None:
        n = len(plan.inputs)
        advice = (
            f"lower the decay ({option('ema', f'{math.floor(0.5 ** (1 / max(n - 1, 1)) * 100) / 100:g}')} or less gives it at "
            f"most half) or use {option('ema_half_life', 'STEPS')}"
        )
        found.append(oldest_weight_warning(plan.weights, advice))
    if half_life is not None and steps[0] is not None and steps[-1] is not None:
        found.append(
            oldest_weight_warning(
                plan.weights, f"a half-life under the {steps[-1] - steps[0]} steps the inputs span gives it less"
            )
        )
    if check_same_run and len(plan.inputs) > 1:
        found.extend(different_runs(plan))
    return [w for w in found if w]


def refuse_overlaps(checkpoints: list[Checkpoint], out: Path | None) -> None:
    """The same weights given twice (a folder twice, a file and its folder, a symlink and its target), or an
    output that would replace a folder holding an input: each is a mistake, refused before any work."""
    seen: dict[tuple[int, int], tuple[Checkpoint, Path]] = {}
    for ckpt in checkpoints:
        for file in ckpt.files:
            identity = file_identity(file)
            if identity in seen and seen[identity][0] is not ckpt:
                first, first_file = seen[identity]
                link = ", a hard link to the same file" if real_path(first_file) != real_path(file) else ""
                same = "" if first.path == ckpt.path else f" (the same weights as {first.path}{link})"
                raise UsageError(
                    ckpt.path, f"given twice{same}; pass each checkpoint once, and {option('weights')} to weight one more"
                )
            seen.setdefault(identity, (ckpt, file))
    if out is None:
        return
    target = real_path(out)
    target_identity = file_identity(target) if target.exists() else None
    for ckpt in checkpoints:
        if target == real_path(ckpt.path) or target_identity in {
            identity for identity, (owner, _) in seen.items() if owner is ckpt
        }:
            raise OutputError(
                out,
                "is one of the inputs; ckptavg never replaces an input: choose another output (or leave it out of the inputs)",
            )
        for file in ckpt.files:
            if target in real_path(file).parents:
                raise OutputError(out, f"holds the input {ckpt.path}; writing there would replace it, choose another output")
        if ckpt.path.is_dir() and real_path(ckpt.path) in target.parents:
            raise OutputError(out, f"is inside the input {ckpt.path}; ckptavg never writes into an input: choose another output")


def file_identity(path: Path) -> tuple[int, int]:
    """(device, inode): the same file whatever path, symlink or hard link leads to it."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _write_output(
    plan: Plan,
    report: AverageReport,
    out_path: Path,
    layout: tuple[str, bool],
    options: WriteOptions,
    on_progress: ProgressFn | None,
    world: World | None = None,
) -> int:
    """Run the plan into `out_path` (a folder or one file), staged and renamed into place.

    In a job of several ranks (`world`), rank 0 stages the output and lays out its files, every rank writes its
    share of a safetensors output in place, and rank 0 finishes and renames it once all have succeeded; a .pt
    output is written by rank 0 alone. Fills the report's output and copied files and bytes written; returns
    the bytes read (by all ranks, on rank 0).
    """
    kind, single_file = check_output_layout(plan, out_path, layout)
    recipe = recipe_of(report)
    specs = output_specs(plan)
    shared = world is not None and kind == "safetensors"
    verify_shared = options.verify and shared and not single_file  # the ranks read the folder's files back between them
    try:
        if world is not None and not world.leader:
            files = (
                tensor_files(plan, specs, tmp_name(out_path), out_path, single_file, options.shard_bytes, recipe)
                if shared
                else None
            )
            return job.follow(
                [plan],
                [files] if files is not None else None,
                world,
                on_progress,
                options,
                tmp_name(out_path) if verify_shared else None,
            )
        with staged(out_path, options.overwrite, is_dir=not single_file, notes=report.notes) as tmp:
            output = OutputFiles(plan, report, out_path, tmp, kind, single_file, specs, recipe, options)
            if shared:
                assert world is not None and output.files is not None
                lay_out_files(output.files.paths, output.files.shards, output.files.metadata)
                world.post("staged", {})
                bytes_read, [crcs] = job.lead([plan], [output.files], options, world, on_progress)
                report.bytes_written = sum(p.stat().st_size for p in output.files.paths)
            else:
                if world is not None:
                    world.post("staged", {})  # the other ranks have no share of a .pt output
                bytes_read, crcs, report.bytes_written = run_engine(
                    plan, output.open_writer(options), options, specs, on_progress
                )
                if world is not None:
                    job.gather_shares(world, on_progress, plan.read_bytes, job.share_report(0, [], []))
            output.finish(crcs, options, on_progress, world if verify_shared else None)
            return bytes_read
    except OSError as e:
        raise OutputError(e.filename or out_path, f"cannot write the output: {e.strerror or e}") from e


def _count_dtypes(dtypes: list[torch.dtype]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for d in dtypes:
        counts[dtype_name(d)] = counts.get(dtype_name(d), 0) + 1
    return counts


def _report(plan: Plan, ordered_by: str, out: Path | None, device: torch.device, notes: list[str]) -> AverageReport:
    inputs = [
        InputSummary(str(c.path), c.format, c.step, c.epoch, w, len(c.tensors), c.nbytes, list(c.notes), c.weights_from or None)
        for c, w in zip(plan.inputs, plan.weights.normalized)
    ]
    report = AverageReport(
        inputs=inputs,
        order=ordered_by,
        strategy=plan.weights.strategy,
        output=str(out) if out else None,
        output_files=[],
        copied_files=[],
        tensors=len(plan.entries),
        parameters=plan.parameters,
        input_dtypes=_count_dtypes([e.input_dtype for e in plan.entries]),
        output_dtypes=_count_dtypes([spec.dtype for spec in output_specs(plan)]),
        # an export accumulates nothing: each value passes through (scale 1), or is converted to the output dtype
        accumulate={}
        if plan.weights.strategy == "export"
        else _count_dtypes([e.accum_dtype for e in plan.entries if e.accum_dtype is not None]),
        copied_from_newest=plan.copied,
        tied=[list(pair) for pair in plan.tied],
        device=str(device),
        notes=list(notes),
        input_disk_bytes=sum(disk_size(c.path) for c in plan.inputs),
        bytes_to_read=plan.read_bytes,
    )
    if plan.copied and plan.weights.strategy != "export":
        report.notes.append(
            f"{len(plan.copied)} integer/bool tensor(s) copied from the newest input, not averaged: {', '.join(plan.copied[:3])}"
        )
    if plan.tied:
        report.notes.append(
            f"{len(plan.tied)} tied tensor(s) computed once and written under both names: {plan.tied[0][0]} = {plan.tied[0][1]}"
        )
    return report


def recipe_of(report: AverageReport) -> dict:
    return {
        "tool": "ckptavg",
        "version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "strategy": report.strategy,
        "order": report.order,
        "inputs": [
            {
                "path": i.path,
                "step": i.step,
                "epoch": i.epoch,
                "weight": i.weight,
                "format": i.format,
                **({"hub": i.hub} if i.hub else {}),
            }
            for i in report.inputs
        ],
        "input_dtypes": report.input_dtypes,
        "output_dtypes": report.output_dtypes,
        "accumulate": report.accumulate,
        "copied_from_newest": report.copied_from_newest,
        "tied": report.tied,
    } | ({"world_size": report.world_size} if report.world_size > 1 else {})
