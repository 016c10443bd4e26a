"""Two inputs that hold the same weights: a checkpoint and a copy of it.

fairseq writes `checkpoint_last.pt` and `checkpoint_best.pt` as copies of an epoch checkpoint, Lightning saves
`last.ckpt` again beside the `epoch=E-step=S.ckpt` of the same step, timm copies `last.pth.tar` and
`model_best.pth.tar` where it cannot hard-link them. A glob over the folder then gives the same weights twice, and
an average would count them twice.

Cheap first: inputs are grouped by their tensors' names, shapes and dtypes; within a group, the first 64 bytes of
every tensor (read with pread, never a whole tensor) tell checkpoints of one run apart; inputs still alike are
sampled again at every tensor's middle and end, and only inputs whose samples all agree are compared in full,
streamed a chunk at a time in bounded memory.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ckptavg.discover import steps_from_name
from ckptavg.errors import UsageError
from ckptavg.formats.base import Checkpoint, TensorSource, read_exact, readable_by_range
from ckptavg.formats.quantized import stored_tensors

SAMPLE_BYTES = 64  # bytes read at each sampled place of a tensor (its start; then its middle and end)
READERS = 8  # inputs sampled at once
BLOCK = 4096  # O_DIRECT's alignment: a multiple of every disk's logical block
BATCH_SPAN = 256 << 10  # sampled places this close together in a file are read at once
CHUNK_BYTES = 4 << 20  # the full comparison reads this much of each input at a time


def same_weight_groups(checkpoints: Sequence[Checkpoint]) -> list[list[int]]:
    """Indices of the inputs that hold byte-identical tensors (the same names, shapes, dtypes and bytes), as
    groups of two or more in input order; inputs that hold weights of their own, or no bytes at all (only
    zero-element tensors: nothing to count twice), are in no group."""
    layouts: dict[tuple, list[int]] = {}
    for i, ckpt in enumerate(checkpoints):
        if ckpt.nbytes:
            layouts.setdefault(_layout(ckpt), []).append(i)
    groups = []
    for members in layouts.values():
        for alike in _alike(checkpoints, members, "head"):
            for still in _alike(checkpoints, alike, "middle and tail"):
                groups.extend(_confirm(checkpoints, still))
    return sorted(groups)


def original_of(paths: Sequence[Path]) -> int:
    """Which of several inputs holding the same weights to keep: the first named for its own step or epoch
    (checkpoint3.pt, epoch=2-step=8.ckpt), not a `last` or `best` copy; else the first."""
    return next((i for i, p in enumerate(paths) if _named_for_its_step(p)), 0)


def copy_reason(copy: Checkpoint, original: Checkpoint) -> str:
    """How `copy` holds the weights of `original`: a link to its very files (a hard link or symlink), or a copy."""
    return "a link to the same file" if _same_files(copy, original) else "a copy"


def refuse_copies(checkpoints: Sequence[Checkpoint]) -> None:
    """Refuse inputs that hold the same weights as another input (a `last`/`best` copy beside its epoch checkpoint):
    averaged, those weights would count twice. Names both, and which to drop."""
    for group in same_weight_groups(checkpoints):
        members = [checkpoints[i] for i in group]
        original = members[original_of([c.path for c in members])]
        copy = next(c for c in members if c is not original)
        how = copy_reason(copy, original)
        raise UsageError(copy.path, f"holds the same weights as {original.path} ({how}); drop one of them")


def _named_for_its_step(path: Path) -> bool:
    info = steps_from_name(path.name)
    return info.step is not None or info.epoch is not None


def _layout(ckpt: Checkpoint) -> tuple:
    return tuple(sorted((name, src.dtype_name, src.shape) for name, src in stored_tensors(ckpt.tensors).items()))


def _alike(checkpoints: Sequence[Checkpoint], members: list[int], part: str) -> list[list[int]]:
    """`members` split by their sample of `part` (see _sample), groups of two or more only."""
    if len(members) < 2:
        return []
    with ThreadPoolExecutor(min(len(members), READERS)) as pool:  # the reads of several inputs overlap their latency
        digests = list(pool.map(lambda i: _sample(checkpoints[i], part), members))
    samples: dict[bytes, list[int]] = {}
    for i, digest in zip(members, digests):
        samples.setdefault(digest, []).append(i)
    return [alike for alike in samples.values() if len(alike) > 1]


def _sample(ckpt: Checkpoint, part: str) -> bytes:
    """A digest, by name, of SAMPLE_BYTES of every tensor: its first ("head": one read per tensor tells checkpoints
    of one run apart), or its middle and last ("middle and tail", for those still alike). Tensors that cannot be
    read by range are left to the full comparison. Read in file order: one forward pass over a cold page cache."""
    ranges = []
    for name, src in stored_tensors(ckpt.tensors).items():
        if src.nbytes and readable_by_range(src):
            size = min(SAMPLE_BYTES, src.nbytes)
            starts = [0] if part == "head" else sorted({(src.nbytes - size) // 2, src.nbytes - size})
            ranges.extend((str(src.path), src.offset + start, name, src, start, size) for start in starts)
    read: dict[str, list[bytes]] = {}
    with _UncachedReads() as reads:
        for batch in _batches(sorted(ranges, key=lambda r: r[:2])):
            for (_, _, name, *_), piece in zip(batch, reads.read_batch([r[3:] for r in batch])):
                read.setdefault(name, []).append(piece)
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(read):
        for piece in read[name]:
            digest.update(piece)
    return digest.digest()


def _batches(ranges: list[tuple]) -> list[list[tuple]]:
    """Places close together in one file (small tensors side by side) read at once: one read of up to BATCH_SPAN."""
    batches: list[list[tuple]] = []
    for r in ranges:
        head = batches[-1][0] if batches else None
        stored = head is not None and type(r[3]) is type(head[3]) is TensorSource  # plain stored bytes, not extents
        if stored and r[0] == head[0] and r[1] + r[5] - head[1] <= BATCH_SPAN:
            batches[-1].append(r)
        else:
            batches.append([r])
    return batches


class _UncachedReads:
    """Small reads that leave the page cache as they found it: O_DIRECT where the filesystem allows it, else plain
    preads. A run's sequential reads of its inputs slow down when scattered pages of them are cached: with plain
    preads the sample made a cold 4 x 143 MB run ~20% slower, though it took 3% of it (scripts/same_weights_cost.py)."""

    def __init__(self) -> None:
        self.fds: dict[Path, int | None] = {}
        self.buffer = mmap.mmap(-1, BATCH_SPAN + 2 * BLOCK)  # page-aligned, as O_DIRECT needs

    def __enter__(self) -> _UncachedReads:
        return self

    def __exit__(self, *_: object) -> None:
        for fd in self.fds.values():
            if fd is not None:
                os.close(fd)
        self.buffer.close()

    def read_batch(self, places: list[tuple[TensorSource, int, int]]) -> list[bytes]:
        """The bytes [start, start + size) of each (source, start, size): one read for a batch (_batches) of one file."""
        src = places[0][0]
        if type(src) is not TensorSource:  # extents: read through the source, by range
            out = bytearray(places[0][2])
            src.read_bytes(places[0][1], memoryview(out))
            return [bytes(out)]
        offsets = [s.offset + start for s, start, _ in places]
        fd = self._direct(src.path)
        if fd is not None:
            first = offsets[0] - offsets[0] % BLOCK
            end = offsets[-1] + places[-1][2]
            try:
                got = os.preadv(fd, [memoryview(self.buffer)[: -(-(end - first) // BLOCK) * BLOCK]], first)
            except OSError:  # O_DIRECT refused at read time (some network and FUSE filesystems)
                self.fds[src.path], got = None, 0
                os.close(fd)
            if got >= end - first:
                return [self.buffer[o - first : o - first + size] for o, (_, _, size) in zip(offsets, places)]
        pieces = []
        for o, (_, _, size) in zip(offsets, places):
            out = bytearray(size)
            read_exact(src.path, o, memoryview(out))  # also says what is wrong with a truncated file
            pieces.append(bytes(out))
        return pieces

    def _direct(self, path: Path) -> int | None:
        if path not in self.fds:
            try:
                self.fds[path] = os.open(path, os.O_RDONLY | os.O_DIRECT) if hasattr(os, "O_DIRECT") else None
            except OSError:  # tmpfs and others: no O_DIRECT
                self.fds[path] = None
        return self.fds[path]


def _confirm(checkpoints: Sequence[Checkpoint], alike: list[int]) -> list[list[int]]:
    """Split inputs whose samples agree into groups of truly identical weights (compared in full)."""
    classes: list[list[int]] = []
    for i in alike:
        for members in classes:
            if _identical(checkpoints[members[0]], checkpoints[i]):
                members.append(i)
                break
        else:
            classes.append([i])
    return [members for members in classes if len(members) > 1]


def _identical(a: Checkpoint, b: Checkpoint) -> bool:
    """Every tensor byte for byte, streamed: two chunk buffers in memory, or one tensor at a time for a tensor
    that cannot be read by range (as the engine reads it). Stops at the first difference, so the tensors read by
    range go first and the smallest first: inputs that only look alike (no tensor could be sampled) part cheaply."""
    if _same_files(a, b):
        return True
    left, right = stored_tensors(a.tensors), stored_tensors(b.tensors)  # quantized weights: their codes and scales
    for name in sorted(left, key=lambda n: (not readable_by_range(left[n]), left[n].nbytes, n)):
        if not _same_tensor(left[name], right[name]):
            return False
    return True


def _same_tensor(a: TensorSource, b: TensorSource) -> bool:
    if not (readable_by_range(a) and readable_by_range(b)):
        import torch

        try:
            return torch.equal(a.read().reshape(-1).view(torch.uint8), b.read().reshape(-1).view(torch.uint8))
        finally:
            a.release()
            b.release()
    size = min(CHUNK_BYTES, a.nbytes)
    left, right = bytearray(size), bytearray(size)
    for start in range(0, a.nbytes, CHUNK_BYTES):
        n = min(CHUNK_BYTES, a.nbytes - start)
        if n < size:  # the last chunk, shorter
            left, right = bytearray(n), bytearray(n)
        a.read_bytes(start, memoryview(left))
        b.read_bytes(start, memoryview(right))
        if left != right:
            return False
    return True


def _same_files(a: Checkpoint, b: Checkpoint) -> bool:
    try:
        return len(a.files) == len(b.files) and all(os.path.samefile(x, y) for x, y in zip(a.files, b.files))
    except OSError:
        return False
