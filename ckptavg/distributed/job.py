"""The steps of an `average` (or of a `sweep`: K outputs from one read) in a job of several ranks: every rank
agrees on the plans, rank 0 lays out the output files, each rank writes its share in place, rank 0 gathers the
ranks' reports (bytes read, CRC-32s of their ranges), the ranks read the files back between them with --verify,
and rank 0 finishes. `averaging` and `sweeping` call `lead` on rank 0 and `follow` on the others, without
knowing these steps."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ckptavg.distributed.split import Unit, assign, fingerprint, owners, share_plans, split_work
from ckptavg.distributed.world import World, rank_progress
from ckptavg.errors import EXIT_SIGINT, Interrupted, UsageError
from ckptavg.formats.base import FILES
from ckptavg.formats.writer import RangeWriter, TensorSpec, tensor_offsets
from ckptavg.merge.engine import Engine, pass_read_bytes, rows_of
from ckptavg.merge.plan import Plan, output_specs
from ckptavg.output import TensorFiles, WriteOptions
from ckptavg.progress import Progress, ProgressFn
from ckptavg.sizes import peak_rss
from ckptavg.verify import crc32_combine, verify_output


@contextmanager
def failures_shared(world: World | None) -> Iterator[None]:
    """Around a run in a job: an error on any rank fails every rank (before the plans agree each rank gathers
    the others' errors, after it posts its own), an interrupt stops the others too, and rank 0 says why; the
    inputs' open files are closed and the job left, whatever happens."""
    try:
        yield
    except Exception as e:
        if world is not None:
            if not world.agreed:
                world.gather_error("plan", e)
            raise world.fail(e) from e
        raise
    except KeyboardInterrupt:
        if world is not None:
            world.fail(Interrupted("SIGINT", EXIT_SIGINT))
        raise
    finally:
        FILES.close()
        if world is not None:
            world.close()


def agree(world: World, plans: list[Plan], out: Path | None, out_format: str, shard_bytes: int) -> None:
    """Every rank must have built the same plans (the same inputs seen on the shared filesystem, the same
    options) before any writes: a rank that sees something else fails the job, naming what differs."""
    mine = "/".join(fingerprint(plan, [out, out_format, shard_bytes]) for plan in plans)
    for rank, theirs in enumerate(world.gather("plan", {"fingerprint": mine})):
        if theirs["fingerprint"] != mine:
            raise UsageError(
                None,
                f"rank {rank} built a different plan than rank {world.rank} (different inputs, files or options on its node?); "
                "every rank must see the same checkpoints at the same paths",
            )
    world.agreed = True


def read_bytes(plans: list[Plan]) -> int:
    """The bytes one pass over the plans reads: each input tensor once, however many outputs fold it."""
    return pass_read_bytes(rows_of(plans))


def write_share(
    plans: list[Plan], files: list[TensorFiles], options: WriteOptions, world: World, on_progress: ProgressFn | None
) -> dict:
    """Fold this rank's units and write them at their places in the files rank 0 laid out, one set of files
    per plan (a sweep's candidates, made of the same tensors, share the units and the read); returns the report
    this rank posts (bytes read, its units and, with --verify, their CRC-32s in each output, peak memory)."""
    all_units = split_work(max(plans, key=lambda plan: plan.read_bytes), world.size)
    units = assign(all_units, world.size)[world.rank]
    writers = [
        RangeWriter(output.paths, _ranges(plan, output, units), durable=options.fsync, checksums=options.verify)
        for plan, output in zip(plans, files)
    ]
    engine = Engine(share_plans(plans, units), options.device, options.memory_budget, workers=world.fold_workers)
    try:
        engine.run(writers, rank_progress(world, read_bytes(plans), len(all_units), on_progress))
        for writer in writers:
            writer.finish()
    finally:
        for writer in writers:
            writer.abort()
    world.progress(engine.bytes_read, len(units))
    return share_report(engine.bytes_read, units, [writer.crcs for writer in writers])


def _ranges(plan: Plan, files: TensorFiles, units: list[Unit]) -> list[tuple[Path, int, int]]:
    """Where each unit's bytes go in one output's files: (file, offset, length)."""
    where = tensor_offsets(files.paths, files.shards, files.metadata)
    ranges = []
    for unit in units:
        entry = plan.entries[unit.entry]
        path, offset = where[entry.name]
        ranges.append((path, offset + unit.first * entry.dtype.itemsize, unit.count * entry.dtype.itemsize))
    return ranges


def share_report(bytes_read: int, units: list[Unit], crcs: list[list[int]]) -> dict:
    return {"bytes_read": bytes_read, "units": [[u.entry, u.first, u.count] for u in units], "crcs": crcs, "peak_rss": peak_rss()}


def follow(
    plans: list[Plan],
    files: list[TensorFiles] | None,
    world: World,
    on_progress: ProgressFn | None,
    options: WriteOptions,
    verify_in: Path | None,
) -> int:
    """A rank other than 0: once rank 0 has laid out the files, write this rank's share (none for a .pt
    output), post its report, read back the files rank 0 gives it when verifying the folder `verify_in`, and
    wait for rank 0 to finish the job. Returns the bytes this rank read."""
    world.wait(["staged"], watch=[0])
    mine = write_share(plans, files, options, world, on_progress) if files is not None else share_report(0, [], [])
    world.post(f"done/{world.rank}", mine)
    if verify_in is not None:
        world.wait(["verify"], watch=[0])
        verify_my_files(world, verify_in, output_specs(plans[0]), world.read("verify"), None)
    world.wait(["finished"], watch=[0])
    return mine["bytes_read"]


def lead(
    plans: list[Plan], files: list[TensorFiles], options: WriteOptions, world: World, on_progress: ProgressFn | None
) -> tuple[int, list[dict[str, int]]]:
    """Rank 0: write its own share, then wait for every rank's. Returns (bytes read by all, each output's
    tensors' CRC-32s, combined from the ranges' with --verify)."""
    mine = write_share(plans, files, options, world, on_progress)
    reports = gather_shares(world, on_progress, read_bytes(plans), mine)
    crcs = [tensor_crcs(plan, reports, k) if options.verify else {} for k, plan in enumerate(plans)]
    return sum(r["bytes_read"] for r in reports), crcs


def gather_shares(world: World, on_progress: ProgressFn | None, read_bytes: int, mine: dict) -> list[dict]:
    """Rank 0: post its report and wait for every rank's, keeping the progress display moving with their beats."""
    world.post("done/0", mine)

    def tick() -> None:
        if on_progress is not None:
            others, units = world.others_progress
            on_progress(
                Progress(min(read_bytes, others + mine["bytes_read"]), read_bytes, units, units, "waiting for the other ranks")
            )

    keys = [f"done/{r}" for r in range(world.size)]
    world.wait(keys, watch=range(world.size), on_tick=tick)
    reports = [world.read(k) for k in keys]
    world.peak_rss = max(r["peak_rss"] for r in reports)
    return reports


def tensor_crcs(plan: Plan, reports: list[dict], output: int = 0) -> dict[str, int]:
    """Each tensor's CRC-32 in output `output` from the CRCs of the ranges the ranks wrote (in element order)."""
    pieces: dict[str, list[tuple[int, int, int]]] = {}
    for report in reports:
        for (entry, first, count), crc in zip(report["units"], report["crcs"][output] if report["crcs"] else []):
            e = plan.entries[entry]
            pieces.setdefault(e.name, []).append((first, count * e.dtype.itemsize, crc))
    crcs = {}
    for e in plan.entries:
        crc = 0
        for _, nbytes, piece in sorted(pieces.get(e.name, [])):
            crc = crc32_combine(crc, piece, nbytes)
        crcs[e.name] = crc
    return crcs


def verify_shared(
    world: World, tmp: Path, out: Path, specs: list[TensorSpec], crcs: dict[str, int], on_progress: ProgressFn | None
) -> dict[str, str | None]:
    """Rank 0's part of --verify in a job: hand the staged folder's files out among the ranks by size, check its
    own, and gather every file's sha256 from the ranks that read it."""
    files = [p for p in sorted(tmp.iterdir()) if p.is_file()]
    ranks = owners([p.stat().st_size for p in files], world.size)
    task = {"crcs": crcs, "owners": {p.name: rank for p, rank in zip(files, ranks)}, "out": str(out)}
    world.post("verify", task)
    hashes = verify_my_files(world, tmp, specs, task, on_progress)
    world.wait([f"verified/{r}" for r in range(1, world.size)], watch=range(world.size))
    for r in range(1, world.size):
        hashes.update({name: sha for name, sha in world.read(f"verified/{r}").items() if sha is not None})
    return hashes


def verify_my_files(
    world: World, tmp: Path, specs: list[TensorSpec], task: dict, on_progress: ProgressFn | None
) -> dict[str, str | None]:
    """Read back the output files rank 0 gave this rank, check their tensors' CRC-32s; post and return their sha256."""
    mine = {name for name, owner in task["owners"].items() if owner == world.rank}
    hashes = verify_output(tmp, Path(task["out"]), specs, task["crcs"], on_progress, only=mine)
    if not world.leader:
        world.post(f"verified/{world.rank}", hashes)
    return hashes
