"""`--verify`: the output is read back from the disk and checked against what the engine handed the writer.

While writing, `ChecksumWriter` keeps a CRC-32 of every tensor's bytes. After the writer has finished (and
before the output is renamed into place), `verify_output` opens the staged output with ckptavg's own readers,
drops its pages from the page cache (clean after the fsync, so the bytes come from the disk), reads every file
once, and checks that each tensor has the name, dtype, shape and CRC-32 that were written. It returns the
sha256 of every file, which the recipe records. An optional callback is told how many bytes have been checked
(a `VerifyProgress`, whose `phase` is "verifying"), so a progress bar can move while it reads.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

from ckptavg.checkpoint import LoadOptions, open_checkpoint
from ckptavg.errors import InputError, OutputError
from ckptavg.formats.base import TensorSource
from ckptavg.formats.dtypes import dtype_name
from ckptavg.formats.writer import TensorSpec, TensorWriter
from ckptavg.progress import Progress, ProgressFn

READ_PIECE = 16 << 20


@dataclass(frozen=True)
class VerifyProgress(Progress):
    """Progress of the read-back: bytes of the output checked and to check; `tensors_done`/`tensors_total` count
    files, and `tensor` is the file being read."""

    phase: ClassVar[str] = "verifying"


class _Counter:
    """Bytes checked so far across the output's files, reported to `on_progress` after each piece."""

    def __init__(self, on_progress: ProgressFn | None, total: int, files: int) -> None:
        self.on_progress, self.total, self.files = on_progress, total, files
        self.done = 0
        self.files_done = 0
        self.name = ""

    def start(self, path: Path) -> Callable[[int], None] | None:
        self.name = path.name
        self.report()
        return self.advance if self.on_progress else None

    def advance(self, n: int) -> None:
        self.done += n
        self.report()

    def finish(self) -> None:
        self.files_done += 1

    def report(self) -> None:
        if self.on_progress:
            self.on_progress(VerifyProgress(self.done, self.total, self.files_done, self.files, self.name))


class ChecksumWriter:
    """A TensorWriter that passes every call on to `writer` and keeps a CRC-32 of each tensor's bytes.

    `specs` are the tensors in the order the engine writes them (the plan's order).
    """

    def __init__(self, writer: TensorWriter, specs: list[TensorSpec]) -> None:
        self.writer = writer
        self.specs = specs
        self.crcs: dict[str, int] = {}
        self._position = 0
        self._written = 0
        self._crc = 0

    @property
    def bytes_written(self) -> int:
        return self.writer.bytes_written

    def _advance_if_full(self) -> None:
        while self._position < len(self.specs) and self._written == self.specs[self._position].nbytes:
            self.crcs[self.specs[self._position].name] = self._crc
            self._position += 1
            self._written, self._crc = 0, 0

    def write(self, data: memoryview) -> None:
        self._advance_if_full()
        self._crc = zlib.crc32(data, self._crc)
        self._written += len(data)
        self.writer.write(data)
        self._advance_if_full()

    def repeat(self, name: str) -> None:
        self._advance_if_full()
        self.crcs[self.specs[self._position].name] = self.crcs[name]
        self._position += 1
        self.writer.repeat(name)
        self._advance_if_full()

    def finish(self) -> None:
        self._advance_if_full()
        self.writer.finish()

    def abort(self) -> None:
        self.writer.abort()


def crc32_combine(crc_a: int, crc_b: int, length_b: int) -> int:
    """crc32(A + B) from crc32(A), crc32(B) and len(B), as zlib's crc32_combine (which Python does not expose):
    appending a zero byte to A maps its CRC linearly over GF(2), so appending len(B) of them is that map
    raised to len(B), built by squaring; then B's own CRC is added. Lets the CRCs of ranges written by
    several processes make the CRC of a whole tensor."""
    one_bit = [0xEDB88320] + [1 << n for n in range(31)]  # the map of one zero bit, as its 32 columns
    power = one_bit
    for _ in range(3):
        power = _gf2_square(power)  # one zero byte
    while length_b:
        if length_b & 1:
            crc_a = _gf2_apply(power, crc_a)
        length_b >>= 1
        power = _gf2_square(power)
    return crc_a ^ crc_b


def _gf2_apply(columns: list[int], vector: int) -> int:
    result, bit = 0, 0
    while vector:
        if vector & 1:
            result ^= columns[bit]
        vector >>= 1
        bit += 1
    return result


def _gf2_square(columns: list[int]) -> list[int]:
    return [_gf2_apply(columns, c) for c in columns]


def sha256_of(path: Path, advance: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(READ_PIECE):
            digest.update(piece)
            if advance:
                advance(len(piece))
    return digest.hexdigest()


def _read_back(
    path: Path, sources: list[tuple[str, TensorSource]], advance: Callable[[int], None] | None = None
) -> tuple[str, dict[str, int]]:
    """One pass over `path` from the disk: its sha256, and the CRC-32 of each tensor's span."""
    digest = hashlib.sha256()
    crcs = {name: 0 for name, _ in sources}
    spans = sorted((src.offset, src.offset + src.nbytes, name) for name, src in sources)
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        position = 0
        while piece := os.pread(fd, READ_PIECE, position):
            digest.update(piece)
            end = position + len(piece)
            for begin, stop, name in spans:
                if begin < end and stop > position:
                    view = memoryview(piece)[max(begin, position) - position : min(stop, end) - position]
                    crcs[name] = zlib.crc32(view, crcs[name])
            position = end
            if advance:
                advance(len(piece))
    finally:
        os.close(fd)
    return digest.hexdigest(), crcs


def verify_output(
    staged: Path,
    out: Path,
    specs: list[TensorSpec],
    crcs: dict[str, int],
    on_progress: ProgressFn | None = None,
    only: Collection[str] | None = None,
    read_back: LoadOptions = LoadOptions(),
) -> dict[str, str | None]:
    """Check the staged output (a folder or one file) against the specs and CRCs of what was written.

    `on_progress`, when given, is called with a `VerifyProgress` (bytes checked of all the files to read)
    before each file and after each piece read. Returns {file name: sha256} for every file of the output.
    With `only` (file names), only those files are read back (the ranks of a job share the reading): the
    others' sha256 is None, and their tensors' CRCs are not checked here. `read_back` says where the weights are
    in the output (an output in the inputs' layout keeps them where the inputs had them).

    Raises:
        OutputError: a tensor is missing, extra, or reads back different bytes, dtype or shape.
    """
    try:
        written = open_checkpoint(staged, replace(read_back, dequantize=False))  # the bytes as written: FP8 codes and scales too
    except InputError as e:
        raise OutputError(out, f"verification failed: the output does not read back ({e.problem})") from e
    expected = {spec.name: spec for spec in specs}
    if set(written.tensors) != set(expected):
        missing = sorted(set(expected) - set(written.tensors)) or sorted(set(written.tensors) - set(expected))
        raise OutputError(out, f"verification failed: tensor {missing[0]} is missing or unexpected in the output")
    by_file: dict[Path, list[tuple[str, TensorSource]]] = {}
    for name, src in written.tensors.items():
        spec = expected[name]
        if src.dtype != spec.dtype or tuple(src.shape) != tuple(spec.shape):
            raise OutputError(
                out,
                (
                    f"verification failed: {name} reads back as {dtype_name(src.dtype)} {list(src.shape)}, written as "
                    f"{dtype_name(spec.dtype)} {list(spec.shape)}"
                ),
            )
        by_file.setdefault(src.path, []).append((name, src))
    tensor_files = sorted(by_file)
    names = {path.name for path in tensor_files}
    other_files = [p for p in (sorted(staged.iterdir()) if staged.is_dir() else [staged]) if p.is_file() and p.name not in names]
    hashes: dict[str, str | None] = {p.name: None for p in tensor_files + other_files}
    mine = [p for p in tensor_files + other_files if only is None or p.name in only]
    counter = _Counter(on_progress, sum(p.stat().st_size for p in mine), len(mine))
    for path in tensor_files:
        if path not in mine:
            continue
        hashes[path.name], read_crcs = _read_back(path, by_file[path], counter.start(path))
        counter.finish()
        for name, crc in read_crcs.items():
            if crc != crcs[name]:
                raise OutputError(
                    out,
                    (
                        f"verification failed: {name} in {path.name} reads back different bytes than were written (CRC-32 "
                        f"{crc:08x}, expected {crcs[name]:08x})"
                    ),
                )
    for path in other_files:
        if path in mine:
            hashes[path.name] = sha256_of(path, counter.start(path))
            counter.finish()
    counter.report()
    if not staged.is_dir():
        hashes = {out.name: hashes[staged.name]}
    return hashes
