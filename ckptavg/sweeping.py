"""`sweep`: many averages of the same checkpoints from one read, the library function behind `ckptavg sweep`.

Each recipe (ckptavg/recipes.py) makes candidates: a weighting over some of the ordered inputs. Each candidate
is planned exactly as `average` plans it, and the engine runs all the plans in one pass: every chunk of every
input is read once and folded into each candidate's output, each in its own input order, so each candidate's
weight files are byte for byte those `average` writes. DIR is staged as a whole and renamed into place at the
end: a failure leaves no candidate, never a partial one.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ckptavg.averaging import (
    AverageReport,
    InputSummary,
    OpenedInputs,
    check_inputs_and_output,
    check_paths,
    open_inputs,
    plan_run,
    recipe_of,
)
from ckptavg.distributed import World, job, join
from ckptavg.errors import OutputError, StrictError, UsageError, option
from ckptavg.formats.base import Checkpoint
from ckptavg.formats.pickle_same import check_same_layout
from ckptavg.formats.writer import lay_out_files
from ckptavg.merge.engine import Engine, ProgressFn, plans_differ
from ckptavg.merge.plan import Plan, output_specs
from ckptavg.merge.weights import oldest_weight_warning
from ckptavg.options import AverageOptions
from ckptavg.ordering import order_inputs
from ckptavg.output import SWEEP_FILE, WriteOptions, check_space, staged, tmp_name
from ckptavg.recipes import Candidate, candidates, parse_recipes
from ckptavg.sizes import peak_rss
from ckptavg.version import __version__
from ckptavg.writing import OutputFiles, check_output_layout, disk_size, engine_target, output_disk_bytes, tensor_files


@dataclass
class CandidateSummary:
    """One candidate of a sweep: its folder name, recipe, strategy, inputs (oldest first) with their weights
    (normalised: they sum to 1), and its output once written."""

    name: str
    recipe: str
    strategy: str
    inputs: list[str]
    steps: list[int | None]
    weights: list[float]
    output: str | None
    output_files: list[str] = field(default_factory=list)
    copied_files: list[str] = field(default_factory=list)
    bytes_written: int = 0
    sha256: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # about its weighting (an EMA mostly its oldest input)


@dataclass
class SweepReport:
    """What `sweep` did (or, with dry_run, would do); `to_dict()` is the --json document."""

    inputs: list[InputSummary]  # every input, oldest first (weight: 0; each candidate has its own)
    order: str
    output: str | None
    candidates: list[CandidateSummary]
    passes: int  # reads of the inputs: 1, or one per candidate when their plans differ (exact-mode adapters)
    tensors: int
    parameters: int
    device: str
    bytes_to_read: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    output_disk_bytes: int = 0
    world_size: int = 1  # processes that wrote the outputs (torchrun)
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    dry_run: bool = False
    verified: bool = False
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    version: str = __version__

    @property
    def gb_per_s(self) -> float:
        return self.bytes_read / self.seconds / 1e9 if self.seconds else 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["gb_per_s"] = round(self.gb_per_s, 3)
        return data


def sweep(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike | None,
    *,
    recipes: Sequence[str] | str,
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
    requantize: bool = False,
    rank_timeout: float = 120.0,
    training_state: str = "drop",
    on_progress: ProgressFn | None = None,
    on_plan: Callable[[SweepReport], None] | None = None,
) -> SweepReport:
    """Average the same checkpoints several ways in one read: one complete output per candidate under `out`.

    Args:
        paths: checkpoint files or folders, in any layout `average` reads.
        out: the folder to create: `out/NAME/` per candidate (as `average -o out/NAME` writes it) and
            `out/sweep.json` (each candidate's recipe, inputs and weights). None only with dry_run.
        recipes: the weightings to try, e.g. ["mean", "last:2,4", "ema:0.9,0.99", "wsm:linear"]; a list of
            values makes one candidate per value (see ckptavg/recipes.py).
        out_format: "auto" or "safetensors" (each candidate a safetensors folder), "pt" (pytorch_model.bin), or
            "same": each candidate in the newest input's own layout, as `average` writes it (a PyTorch pickle as
            the file of that name in the candidate's folder), with `training_state` as for `average`.
        memory_budget: as for `average`; the candidates' output chunks share it, so memory does not grow with
            their number.
        rank_timeout: under torchrun (as for `average`): each rank writes its share of every candidate from one
            read of its part of the inputs; a rank silent this long fails the job, naming it.
        The other options are those of `average`, applied to every candidate.

    Returns:
        The SweepReport.

    Raises:
        CkptavgError: bad inputs, options or recipes (UsageError), unwritable output (OutputError).
    """
    asked = parse_recipes(recipes)
    paths = check_paths(paths, out, base)
    options = AverageOptions.pick(locals()).check()
    return sweep_candidates(paths, out, lambda steps: candidates(asked, steps), options, on_progress, on_plan)


def sweep_candidates(
    paths: list[str | os.PathLike],
    out: str | os.PathLike | None,
    choose: Callable[[list[int | None]], list[Candidate]],
    options: AverageOptions,
    on_progress: ProgressFn | None = None,
    on_plan: Callable[[SweepReport], None] | None = None,
) -> SweepReport:
    """`sweep` with its options checked and the candidates given by `choose`, called with the training step of
    each ordered input (oldest first; None where unknown) once the inputs are open: another command's own
    candidates (`tune` asks for windows the recipe grammar does not spell) written the same way, from one read."""
    started = time.perf_counter()
    paths, out_path, layout = check_inputs_and_output(paths, out, options)
    if out_path is not None and layout is not None and layout[1] and layout[0] != "same":
        raise UsageError(None, f"{option('out', out_path.name)}: a sweep writes a folder per candidate; name a folder")
    world = join(options.rank_timeout)
    leader = world is None or world.leader
    with job.failures_shared(world):
        inputs = open_inputs(paths, out_path, options, world)
        checkpoints, ordered_by, notes = order_inputs(inputs.checkpoints, options.order)
        chosen = choose([c.step for c in checkpoints])
        plans, reports = _plan_candidates(inputs, checkpoints, chosen, options, world)
        layouts = []  # each candidate's (kind, one file?), refused here when it cannot be written so
        if out_path is not None and layout is not None:
            layouts = [check_output_layout(plan, out_path / c.name, layout) for plan, c in zip(plans, chosen)]
        if options.out_format == "same" and layouts:
            for candidate, plan, candidate_report, own in zip(chosen, plans, reports, layouts):
                target = candidate_output(plan, out_path / candidate.name, own)
                candidate_report.notes.extend(check_same_layout(plan.inputs, target, output_specs(plan), options.training_state))
        report = _sweep_report(checkpoints, ordered_by, notes, out_path, chosen, plans, reports, inputs)
        report.dry_run = options.dry_run
        if world is not None:
            report.world_size = world.size
            for candidate_report in reports:  # each candidate's recipe says how many processes wrote it
                candidate_report.world_size = world.size
            if report.passes > 1:
                raise UsageError(
                    None, "these candidates are read in a pass each (see the notes); run the sweep in one process, not torchrun"
                )
            job.agree(world, plans, out_path, options.out_format, options.shard_bytes)
        if options.strict and report.warnings:
            raise StrictError(None, f"warning treated as an error ({option('strict', True)}): {report.warnings[0]}")
        if out_path is not None and not options.dry_run and leader:
            check_space(out_path, output_disk_bytes(plans, options.out_format, options.training_state))
        if on_plan and leader:
            on_plan(report)
        if options.dry_run:
            report.seconds = time.perf_counter() - started
            report.peak_rss_bytes = peak_rss()
            return report
        assert out_path is not None
        write_options = options.write_options(inputs.device)
        _write_sweep(plans, reports, report, chosen, out_path, layouts, write_options, on_progress, world)
        report.output_disk_bytes = disk_size(out_path) if leader else 0
        report.seconds = time.perf_counter() - started
        report.peak_rss_bytes = max(peak_rss(), world.peak_rss if world else 0)  # of the largest rank
        return report


def _plan_candidates(
    inputs: OpenedInputs, checkpoints: list[Checkpoint], chosen: list[Candidate], options: AverageOptions, world: World | None
) -> tuple[list[Plan], list[AverageReport]]:
    """Each candidate planned as `average` plans it over its own inputs. Whether the inputs look like one run
    is checked once, with the candidate that reads the most of them."""
    widest = max(range(len(chosen)), key=lambda k: len(chosen[k].inputs))
    plans, reports = [], []
    for k, candidate in enumerate(chosen):
        own = OpenedInputs(inputs.local, [checkpoints[i] for i in candidate.inputs], inputs.base, inputs.device)
        checked = replace(options, check_same_run=options.check_same_run and k == widest, strict=False)
        plan, report = plan_run(own, None, checked, world, lambda n, w=candidate.weights: w)
        plans.append(plan)
        reports.append(report)
    return plans, reports


def _sweep_report(
    checkpoints: list[Checkpoint],
    ordered_by: str,
    notes: list[str],
    out_path: Path | None,
    chosen: list[Candidate],
    plans: list[Plan],
    reports: list[AverageReport],
    inputs: OpenedInputs,
) -> SweepReport:
    summaries = [
        InputSummary(str(c.path), c.format, c.step, c.epoch, 0.0, len(c.tensors), c.nbytes, list(c.notes), c.weights_from or None)
        for c in checkpoints
    ]
    inputs.local.annotate(summaries)
    made = []
    for candidate, plan, report in zip(chosen, plans, reports):
        summary = CandidateSummary(
            name=candidate.name,
            recipe=candidate.recipe,
            strategy=report.strategy,
            inputs=[i.path for i in report.inputs],
            steps=[i.step for i in report.inputs],
            weights=[i.weight for i in report.inputs],
            output=str(out_path / candidate.name) if out_path is not None else None,
        )
        if plan.weights.strategy == "ema" and (warning := oldest_weight_warning(plan.weights, "a lower decay gives it less")):
            summary.warnings.append(warning)
        made.append(summary)
    one_pass = plans_differ(plans) is None
    report = SweepReport(
        inputs=summaries,
        order=ordered_by,
        output=str(out_path) if out_path is not None else None,
        candidates=made,
        passes=1 if one_pass else len(plans),
        tensors=len(plans[0].entries),
        parameters=plans[0].parameters,
        device=str(inputs.device),
        notes=list(notes),
    )
    for candidate_report in reports:  # what is said of the inputs (notes; different runs, checked once)
        report.notes.extend(n for n in candidate_report.notes if n not in report.notes)
        report.warnings.extend(w for w in candidate_report.warnings if w not in report.warnings)
    for summary in made:
        report.warnings.extend(f"{summary.name}: {w}" for w in summary.warnings)
    if one_pass:
        report.bytes_to_read = job.read_bytes(plans)
    else:
        report.bytes_to_read = sum(p.read_bytes for p in plans)
        report.notes.append(
            "the candidates' outputs are not made of the same tensors (adapters averaged exactly stack the factors of their "
            "own inputs): each candidate reads its inputs in a pass of its own"
        )
    return report


def _write_sweep(
    plans: list[Plan],
    reports: list[AverageReport],
    report: SweepReport,
    chosen: list[Candidate],
    out_path: Path,
    layouts: list[tuple[str, bool]],
    options: WriteOptions,
    on_progress: ProgressFn | None,
    world: World | None = None,
) -> None:
    """Every candidate into its folder under the staged DIR, in one pass when the plans allow it, then
    sweep.json; DIR is renamed into place once all are complete. `layouts`: each candidate's (kind, one file?).

    In a job of several ranks (`world`), rank 0 stages DIR and lays out every candidate's files, each rank
    writes its share of all of them from one read of its units, and rank 0 finishes (and verifies) them; the
    other ranks have no share of a .pt output."""
    shared = world is not None and all(kind == "safetensors" for kind, _ in layouts)
    try:
        if world is not None and not world.leader:
            files = [
                tensor_files(plan, output_specs(plan), tmp_name(out_path) / c.name, out_path, False, options.shard_bytes, {})
                for plan, c in zip(plans, chosen)
            ]
            report.bytes_read = job.follow(plans, files if shared else None, world, on_progress, options, None)
            return
        with staged(out_path, options.overwrite, is_dir=True, notes=report.notes) as tmp:
            outputs = []
            for candidate, plan, candidate_report, (kind, single_file) in zip(chosen, plans, reports, layouts):
                (tmp / candidate.name).mkdir()
                target = candidate_output(plan, out_path / candidate.name, (kind, single_file))
                recipe = _candidate_recipe(candidate_report, candidate)
                outputs.append(
                    OutputFiles(
                        plan,
                        candidate_report,
                        target,
                        tmp / target.relative_to(out_path),
                        kind,
                        single_file,
                        output_specs(plan),
                        recipe,
                        options,
                    )
                )
            if shared:
                assert world is not None
                report.bytes_read = _write_shares(plans, outputs, options, world, on_progress)
            else:
                if world is not None:
                    world.post("staged", {})  # the other ranks have no share of a .pt output
                groups = [list(range(len(plans)))] if report.passes == 1 else [[k] for k in range(len(plans))]
                for group in groups:
                    report.bytes_read += _run_pass([plans[k] for k in group], [outputs[k] for k in group], options, on_progress)
                if world is not None:
                    job.gather_shares(world, on_progress, job.read_bytes(plans), job.share_report(0, [], []))
            for output, summary in zip(outputs, report.candidates):
                output.finish(output.crcs, options, on_progress)
                summary.output_files = output.report.output_files
                summary.copied_files = output.report.copied_files
                summary.bytes_written = output.report.bytes_written
                summary.sha256 = output.report.sha256
            report.bytes_written = sum(s.bytes_written for s in report.candidates)
            report.verified = options.verify
            written = [c.name for c in chosen] + [SWEEP_FILE]
            (tmp / SWEEP_FILE).write_text(json.dumps(_sweep_record(report, written), indent=2) + "\n")
    except OSError as e:
        raise OutputError(e.filename or out_path, f"cannot write the output: {e.strerror or e}") from e


def candidate_output(plan: Plan, folder: Path, layout: tuple[str, bool]) -> Path:
    """Where a candidate's output goes: its folder, or (a PyTorch pickle written in its own layout) the file in
    its folder named as the newest input's."""
    kind, single_file = layout
    return folder / plan.inputs[-1].files[0].name if kind == "same" and single_file else folder


def _write_shares(
    plans: list[Plan], outputs: list[OutputFiles], options: WriteOptions, world: World, on_progress: ProgressFn | None
) -> int:
    """Rank 0 of a job: lay out every candidate's files, write its share of all of them while the other ranks
    write theirs, and gather their reports; returns the bytes read by all ranks."""
    files = []
    for output in outputs:
        assert output.files is not None
        lay_out_files(output.files.paths, output.files.shards, output.files.metadata)
        files.append(output.files)
    world.post("staged", {})
    bytes_read, crcs = job.lead(plans, files, options, world, on_progress)
    for output, output_crcs in zip(outputs, crcs):
        assert output.files is not None
        output.crcs = output_crcs
        output.report.bytes_written = sum(p.stat().st_size for p in output.files.paths)
    return bytes_read


def _run_pass(plans: list[Plan], outputs: list[OutputFiles], options: WriteOptions, on_progress: ProgressFn | None) -> int:
    """One read of the inputs into every output of `outputs`; returns the bytes read."""
    targets = []
    writers = []
    for plan, output in zip(plans, outputs):
        writer = output.open_writer(options)
        writers.append(writer)
        targets.append(engine_target(plan, writer, options, output.specs))
    engine = Engine(plans, options.device, options.memory_budget)
    try:
        engine.run([target for target, _ in targets], on_progress)
        for target, _ in targets:
            target.finish()
    finally:
        for writer in writers:
            writer.abort()
    for output, writer, (_, checked) in zip(outputs, writers, targets):
        output.crcs = checked.crcs if checked else {}
        output.report.bytes_written = writer.bytes_written
    return engine.bytes_read


def _candidate_recipe(report: AverageReport, candidate: Candidate) -> dict:
    return recipe_of(report) | {"sweep": {"candidate": candidate.name, "recipe": candidate.recipe}}


def _sweep_record(report: SweepReport, written: list[str]) -> dict:
    """sweep.json: what was tried, each candidate's recipe, inputs and weights, and the files of DIR."""
    return {
        "tool": "ckptavg",
        "command": "sweep",
        "version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "order": report.order,
        "inputs": [{"path": i.path, "step": i.step, "epoch": i.epoch, "format": i.format} for i in report.inputs],
        "candidates": [
            {
                "name": c.name,
                "recipe": c.recipe,
                "strategy": c.strategy,
                "inputs": c.inputs,
                "steps": c.steps,
                "weights": c.weights,
            }
            for c in report.candidates
        ],
        "bytes_read": report.bytes_read,
        "written": written,
    }
