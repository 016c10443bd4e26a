"""Writing one output: its tensor files (or .pt file, or the newest input's pickle again) filled by the engine,
then what goes beside them (index, model files, card, ckptavg.json) and --verify's read-back. `average` and
`sweep` write each output this way."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ckptavg.card import write_card
from ckptavg.checkpoint import LoadOptions
from ckptavg.distributed import World, job
from ckptavg.errors import UsageError, option
from ckptavg.formats.dcp_same import KIND as SAME_DCP
from ckptavg.formats.dcp_same import DcpSameWriter, dcp_same_layout, verify_dcp_same
from ckptavg.formats.deepspeed import save_folder
from ckptavg.formats.deepspeed_same import DeepSpeedSameWriter, copy_beside, output_files, same_deepspeed_layout, timed_verify
from ckptavg.formats.peft import CONFIG_FILE as ADAPTER_CONFIG
from ckptavg.formats.peft import WEIGHT_FILES
from ckptavg.formats.pickle_same import SameLayoutWriter
from ckptavg.formats.quantized import DequantizedSource, Fp8Requantizer
from ckptavg.formats.torch_writer import TorchWriter, check_pt_dtypes
from ckptavg.formats.trainer_same import KIND as TRAINER_SAME
from ckptavg.formats.trainer_same import copy_training_files
from ckptavg.formats.trainer_same import output_layout as trainer_same_layout
from ckptavg.formats.writer import (
    SafetensorsWriter,
    TensorSpec,
    TensorWriter,
    shard_file_names,
    split_shards,
    write_index,
    write_text,
)
from ckptavg.merge.engine import Engine
from ckptavg.merge.plan import OUTPUT_DTYPES, Plan, output_specs
from ckptavg.output import (
    RECIPE_FILE,
    TensorFiles,
    WriteOptions,
    copy_model_files,
)
from ckptavg.progress import ProgressFn
from ckptavg.reports import AverageReport
from ckptavg.verify import ChecksumWriter, verify_output

ADAPTER_WEIGHTS = WEIGHT_FILES[0]


def tensor_files(
    plan: Plan, specs: list[TensorSpec], tmp: Path, out_path: Path, single_file: bool, shard_bytes: int, recipe: dict
) -> TensorFiles:
    if plan.output_kind == "adapter":
        return TensorFiles([ADAPTER_WEIGHTS], [tmp / ADAPTER_WEIGHTS], [specs], {"format": "pt"})
    if single_file:
        return TensorFiles(
            [out_path.name], [tmp], [specs], {"format": "pt", "ckptavg": json.dumps(recipe, separators=(",", ":"))}
        )
    shards = split_shards(specs, shard_bytes)
    names = shard_file_names(len(shards))
    return TensorFiles(names, [tmp / name for name in names], shards, {"format": "pt"})


def check_output_layout(plan: Plan, out_path: Path, layout: tuple[str, bool]) -> tuple[str, bool]:
    """The output's `layout` (kind, one file?), refused when the plan cannot be written so (an adapter as one
    file, a dtype .pt cannot hold)."""
    kind, single_file = layout
    if kind == "same" and (dcp := dcp_same_layout(plan.inputs[-1])) is not None:
        return dcp
    if kind == "same" and (trainer := trainer_same_layout(plan.inputs[-1])) is not None:
        return trainer
    if kind == "same" and (own := same_deepspeed_layout(plan.inputs[-1])):
        return own
    if plan.output_kind == "adapter" and (single_file or kind != "safetensors"):
        raise UsageError(
            None,
            (
                f"{option('out', out_path.name)}: an adapter is written as a folder (adapter_model.safetensors + "
                "adapter_config.json); name a folder"
            ),
        )
    if kind == "pt" and (problem := check_pt_dtypes(output_specs(plan))):
        raise UsageError(None, f"{option('out_format', 'pt')} cannot hold {problem}; use safetensors")
    return kind, single_file


class OutputFiles:
    """One output being written into its staging path `tmp`: its tensor files (or .pt file), then, once the
    engine has filled them, what goes beside them (index, model files, card, recipe, --verify)."""

    def __init__(
        self,
        plan: Plan,
        report: AverageReport,
        out_path: Path,
        tmp: Path,
        kind: str,
        single_file: bool,
        specs: list[TensorSpec],
        recipe: dict,
        options: WriteOptions,
    ) -> None:
        self.plan, self.report, self.out_path, self.tmp = plan, report, out_path, tmp
        self.kind, self.single_file, self.specs, self.recipe = kind, single_file, specs, recipe
        self.files: TensorFiles | None = None
        self.crcs: dict[str, int] = {}  # each tensor's CRC-32, kept while writing with --verify
        if kind == SAME_DCP:
            report.output_files = []  # the newest input's .distcp files kept, listed once written
        elif kind == "same":
            report.output_files = [out_path.name]
        elif kind == "same-deepspeed":
            report.output_files = output_files(plan.inputs[-1])
        elif kind == "pt":
            report.output_files = [out_path.name] if single_file else ["pytorch_model.bin"]
        else:
            self.files = tensor_files(plan, specs, tmp, out_path, single_file, options.shard_bytes, recipe)
            report.output_files = list(self.files.names)

    def open_writer(self, options: WriteOptions) -> TensorWriter:
        """The writer the engine fills: the newest input's pickle again (--format same), the .pt file, or the
        safetensors files."""
        if self.files is not None:
            return SafetensorsWriter(self.files.paths, self.files.shards, self.files.metadata, durable=options.fsync)
        if self.kind == SAME_DCP:
            newest = self.plan.inputs[-1]
            return DcpSameWriter(self.tmp, self.specs, newest, options.training_state, self.out_path, durable=options.fsync)
        if self.kind == "same-deepspeed":
            return DeepSpeedSameWriter(self.tmp, self.specs, self.plan.inputs[-1], options.training_state, durable=options.fsync)
        if self.kind == "same":
            return SameLayoutWriter(
                self.tmp, self.specs, self.plan.inputs[-1], options.training_state, self.recipe, durable=options.fsync
            )
        if not self.single_file and len(self.specs) and self.plan.output_bytes > options.shard_bytes:
            self.report.notes.append(
                f"{option('out_format', 'pt')} writes one file; {option('max_shard_size')} applies to safetensors"
            )
        return TorchWriter(
            self.tmp if self.single_file else self.tmp / self.report.output_files[0],
            self.specs,
            durable=options.fsync,
            recipe=json.dumps(self.recipe) if self.single_file else None,
        )

    def finish(
        self, crcs: dict[str, int], options: WriteOptions, on_progress: ProgressFn | None, world: World | None = None
    ) -> None:
        """Once the weights are written: a folder's index, model files, card and recipe; --verify's read-back."""
        plan, report, tmp, out_path, recipe = self.plan, self.report, self.tmp, self.out_path, self.recipe
        if self.kind == SAME_DCP:  # a DCP save: its files, the recipe beside (no model card, no model files)
            report.output_files = sorted(p.name for p in tmp.iterdir())
            if options.verify:
                started = time.perf_counter()
                report.sha256 = verify_dcp_same(tmp, out_path, self.specs, crcs, options.read_back.key)
                report.verified, report.verify_seconds = True, time.perf_counter() - started
                recipe["verified"] = True
                recipe["files"] = {
                    name: {"bytes": (tmp / name).stat().st_size, "sha256": sha} for name, sha in report.sha256.items()
                }
            recipe["training_state"] = options.training_state
            recipe["written"] = list(report.output_files)
            write_text(tmp / RECIPE_FILE, json.dumps(recipe, indent=2) + "\n")
            report.output_files.append(RECIPE_FILE)
            return
        if self.single_file:
            if options.verify:
                verify_staged(tmp, out_path, self.specs, crcs, report, on_progress, read_back=options.read_back)
            return
        if self.kind == "same-deepspeed":
            report.copied_files = copy_beside(plan.inputs[-1], tmp, options.training_state, report.notes)
        else:
            finish_folder(plan, report, tmp, self.files, options)
            if self.kind == TRAINER_SAME:  # the newest input's Trainer files beside the weights (formats/trainer_same.py)
                report.copied_files += copy_training_files(plan.inputs[-1], tmp, options.training_state, durable=options.fsync)
                recipe["training_state"] = options.training_state
            report.output_files.append(
                write_card(tmp, recipe, out_path.name, verified=options.verify)
            )  # README.md; --verify covers it
        if options.verify:  # after the copies, so that the recipe records every file's sha256
            if self.kind == "same-deepspeed":
                timed_verify(tmp, out_path, self.specs, crcs, report, options.read_back)
            else:
                verify_staged(tmp, out_path, self.specs, crcs, report, on_progress, world)
            recipe["verified"] = True
            recipe["files"] = {name: {"bytes": (tmp / name).stat().st_size, "sha256": sha} for name, sha in report.sha256.items()}
        recipe["written"] = report.output_files + report.copied_files
        write_text(tmp / RECIPE_FILE, json.dumps(recipe, indent=2) + "\n")
        report.output_files.append(RECIPE_FILE)


def finish_folder(plan: Plan, report: AverageReport, tmp: Path, files: TensorFiles | None, options: WriteOptions) -> None:
    """Beside the weights of a folder output: the index, an adapter's config, and the model files copied from
    the newest input."""
    if files is not None and len(files.names) > 1:
        write_index(tmp / "model.safetensors.index.json", files.shards, files.names, {"format": "pt"})
        report.output_files.append("model.safetensors.index.json")
    if plan.adapter_config is not None:
        write_text(tmp / ADAPTER_CONFIG, json.dumps(plan.adapter_config, indent=2) + "\n")
        report.output_files.append(ADAPTER_CONFIG)
    files_from = plan.files_from or plan.inputs[-1].folder
    if files_from is not None:
        out_dtype = OUTPUT_DTYPES[options.dtype] if options.dtype else plan.dequantized
        report.copied_files = copy_model_files(files_from, tmp, out_dtype, dequantized=plan.dequantized is not None)
    else:
        report.notes.append("no config or tokenizer copied: the newest input is a file, not a model folder")


def run_engine(
    plan: Plan, writer: TensorWriter, options: WriteOptions, specs: list[TensorSpec], on_progress: ProgressFn | None
) -> tuple[int, dict[str, int], int]:
    """Run the whole plan into `writer`: (bytes read, each tensor's CRC-32 with --verify, bytes written)."""
    target, checked = engine_target(plan, writer, options, specs)
    engine = Engine(plan, options.device, options.memory_budget)
    try:
        engine.run(target, on_progress)
        target.finish()
    finally:
        writer.abort()
    return engine.bytes_read, checked.crcs if checked else {}, writer.bytes_written


def engine_target(
    plan: Plan, writer: TensorWriter, options: WriteOptions, specs: list[TensorSpec]
) -> tuple[TensorWriter, ChecksumWriter | None]:
    """What the engine writes into for `writer`: CRC-32s kept on the way with --verify, FP8 weights quantized
    again with requantize; and the checksum keeper, if any."""
    checked = ChecksumWriter(writer, specs) if options.verify else None
    target = checked or writer
    if plan.requantize:  # the engine writes the merged values; the FP8 codes and scales are what reach the file
        target = Fp8Requantizer(
            target, [(e.nbytes, e.sources[0] if isinstance(e.sources[0], DequantizedSource) else None) for e in plan.entries]
        )
    return target, checked


def verify_staged(
    tmp: Path,
    out: Path,
    specs: list[TensorSpec],
    crcs: dict[str, int],
    report: AverageReport,
    on_progress: ProgressFn | None = None,
    world: World | None = None,
    read_back: LoadOptions = LoadOptions(),
) -> None:
    """--verify: read the staged output back and check it against the CRC-32s kept while writing. The ranks of
    a job that wrote a folder read its files back between them (rank 0 hands them out, by size)."""
    started = time.perf_counter()
    if world is None:
        # on_progress is told of a VerifyProgress: bytes checked / to check
        hashes = verify_output(tmp, out, specs, crcs, on_progress, read_back=read_back)
    else:
        hashes = job.verify_shared(world, tmp, out, specs, crcs, on_progress)
    report.sha256 = {name: sha for name, sha in hashes.items() if sha is not None}
    report.verified = True
    report.verify_seconds = time.perf_counter() - started


def disk_size(path: Path) -> int:
    """Bytes on disk of a file, or of every file under a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def output_disk_bytes(plans: list[Plan], out_format: str, training_state: str) -> int:
    """The room the outputs of `plans` need: their tensors. With --format same the output is the newest input's
    save again: keeping its training state, at least its size (optimizer, scheduler and RNG state beside the
    merged weights); a DeepSpeed save (its tag folder alone) whatever the training state, as its optimizer
    partitions hold the merged FP32 masters, less the Adam moments (8 bytes an averaged element) with "drop".
    Each input's size is measured once, however many candidates share it."""
    sizes: dict[Path, int] = {}

    def size(path: Path) -> int:
        if path not in sizes:
            sizes[path] = disk_size(path)
        return sizes[path]

    total = 0
    for plan in plans:
        needed = plan.output_bytes
        newest = plan.inputs[-1]
        if out_format == "same" and same_deepspeed_layout(newest) is not None:
            averaged = sum(entry.numel for entry in plan.entries if entry.weights is not None)
            tag = save_folder(newest.path) or newest.path
            moments = 8 * averaged if training_state == "drop" else 0
            needed = max(needed + 4 * averaged, size(tag) - moments)
        elif out_format == "same" and training_state == "newest":
            needed = max(needed, size(newest.path))
        total += needed
    return total
