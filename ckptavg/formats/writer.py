"""A streaming safetensors writer: headers are computed from the plan, then tensor bytes are appended in order.

Unlike safetensors.torch.save_file it never holds a shard in memory: memory is one chunk, whatever the model size.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import sys
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ckptavg.formats.dtypes import SAFETENSORS_CODES, dtype_name

if TYPE_CHECKING:
    import torch

COPY_PIECE = 16 * 1024 * 1024
FLUSH_EVERY = 64 * 1024 * 1024
DIRECT_ALIGN = 4096  # O_DIRECT wants offsets, lengths and buffers aligned to the device's block: 4 KiB covers 512 B too
DIRECT_STAGING = 4 * 1024 * 1024
O_DIRECT = getattr(os, "O_DIRECT", 0)


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range(2) from libc, or None where there is no such call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


SYNC_FILE_RANGE = _sync_file_range()
WAIT_BEFORE, START_WRITE, WAIT_AFTER = 1, 2, 4


class WriteBehind:
    """Sends a file's new bytes to the disk as they are written, and drops them from the page cache once there.

    Every FLUSH_EVERY bytes it starts the writeback of the bytes just written (without waiting), waits for
    the window before it (long done, unless the disk is slower than the fold) and tells the kernel it can drop
    those pages (posix_fadvise DONTNEED). So the final fsync is short, the writer never stalls on a whole
    gigabyte of dirty pages, and a large output does not push the inputs and everything else out of the page
    cache. Where sync_file_range is missing it falls back to fdatasync every window.
    """

    def __init__(self, fd: int, durable: bool = True) -> None:
        """durable=False (--no-fsync) leaves the bytes to the kernel: no flushing, no fsync, no dropping."""
        self.fd = fd
        self.durable = durable
        self.written = 0
        self.started = 0  # writeback asked for [0, started)
        self.done = 0  # on disk and dropped: [0, done)

    def wrote(self, nbytes: int) -> None:
        self.written += nbytes
        if not self.durable or self.written - self.started < FLUSH_EVERY:
            return
        if SYNC_FILE_RANGE is None:
            os.fdatasync(self.fd)
            self.started = self.written
            return
        self._call(self.started, self.written - self.started, START_WRITE)
        if self.started > self.done:
            self._call(self.done, self.started - self.done, WAIT_BEFORE | START_WRITE | WAIT_AFTER)
            os.posix_fadvise(self.fd, self.done, self.started - self.done, os.POSIX_FADV_DONTNEED)
            self.done = self.started
        self.started = self.written

    def finish(self) -> None:
        """Make the whole file durable (fsync), then drop what is left of it from the page cache."""
        if not self.durable:
            return
        os.fsync(self.fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, self.done, 0, os.POSIX_FADV_DONTNEED)

    def _call(self, offset: int, length: int, flags: int) -> None:
        assert SYNC_FILE_RANGE is not None
        if SYNC_FILE_RANGE(self.fd, offset, length, flags) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))


class BufferedFile:
    """A new file written front to back through the page cache, with WriteBehind."""

    def __init__(self, fd: int, durable: bool) -> None:
        self.fd = fd
        self.size = 0
        self._behind = WriteBehind(fd, durable)

    def write(self, data: memoryview) -> None:
        while data:
            n = os.write(self.fd, data)
            data = data[n:]
            self.size += n
            self._behind.wrote(n)

    def flush(self) -> None:
        """Every byte written so far can be read back from the file (it already can)."""

    def finish(self) -> None:
        self._behind.finish()


_staging = threading.local()


def _address(data: memoryview) -> int:
    """Where a buffer's bytes start in memory; -1 where that cannot be known (a read-only buffer)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(data))
    except (TypeError, ValueError):
        return -1


def _staging_buffer() -> memoryview:
    """This thread's aligned staging buffer (anonymous mmap memory is page-aligned), made once and reused."""
    if not hasattr(_staging, "view"):
        _staging.view = memoryview(mmap.mmap(-1, DIRECT_STAGING))
    return _staging.view


class DirectFile:
    """A new file written front to back with O_DIRECT: bytes go through an aligned staging buffer and reach the
    file a whole number of blocks at a time, never through the page cache.

    Why: a buffered write copies every byte into a page-cache page that WriteBehind then drops, so a large
    output costs the kernel a fresh page per 4 KiB. On a virtual machine whose freed memory goes back to the
    host, each of those pages is faulted in again: writing 8 GB took 82 s of system time buffered against 1.4 s
    direct on the machine this was built on (docs/benchmarks.md). It also leaves the inputs' cached pages alone.

    Only the last, partial block is kept between writes (`_tail`, under DIRECT_ALIGN bytes): the staging
    buffer is the writing thread's, shared by all the files that thread writes. `flush()` writes that partial
    block padded with zeros (written again, whole, once more bytes arrive); `finish()` cuts the padding off.
    A file system that takes the flag at open but refuses an aligned write (EINVAL) gets the rest of the file
    through the page cache instead.
    """

    def __init__(self, fd: int, durable: bool) -> None:
        self.fd = fd
        self.durable = durable
        self.size = 0
        self._on_disk = 0  # [0, _on_disk) written as whole blocks; the bytes after it are _tail
        self._tail = b""
        self._buffered: BufferedFile | None = None

    def write(self, data: memoryview) -> None:
        if self._buffered is not None:
            self._buffered.write(data)
            self.size = self._buffered.size
            return
        if not self._tail and _address(data) % DIRECT_ALIGN == 0:
            whole = len(data) - len(data) % DIRECT_ALIGN  # on a block in the file and in memory: no copy
            if whole and not self._write_blocks(data[:whole], data[:whole], data[whole:]):
                return
            data = data[whole:]
        staging = _staging_buffer()
        filled = len(self._tail)
        staging[:filled] = self._tail
        while len(data):
            n = min(len(staging) - filled, len(data))
            staging[filled : filled + n] = data[:n]
            filled += n
            data = data[n:]
            whole = filled - filled % DIRECT_ALIGN
            if whole:
                if not self._write_blocks(staging[:whole], staging[:filled], data):
                    return
                staging[: filled - whole] = staging[whole:filled]
                filled -= whole
        self._tail = bytes(staging[:filled])
        self.size = self._on_disk + filled

    def _write_blocks(self, blocks: memoryview, staged: memoryview, rest: memoryview) -> bool:
        """pwrite whole blocks at the end of what is on disk; False when O_DIRECT was refused and the staged
        bytes and `rest` went through the page cache instead."""
        start = self._on_disk
        try:
            while len(blocks):
                n = os.pwrite(self.fd, blocks, self._on_disk)
                self._on_disk += n
                blocks = blocks[n:]
            return True
        except OSError as e:
            if e.errno != errno.EINVAL or self._on_disk % DIRECT_ALIGN:
                raise
        self._fall_back()
        assert self._buffered is not None
        self._buffered.write(staged[self._on_disk - start :])
        self._buffered.write(rest)
        self.size = self._buffered.size
        return False

    def _fall_back(self) -> None:
        import fcntl

        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~O_DIRECT)
        os.lseek(self.fd, self._on_disk, os.SEEK_SET)
        self._buffered = BufferedFile(self.fd, self.durable)
        self._buffered.size = self._on_disk
        self._tail = b""

    def flush(self) -> None:
        """Every byte written so far can be read back from the file: the partial block goes out padded."""
        if self._buffered is not None or not self._tail:
            return
        staging = _staging_buffer()
        staging[: len(self._tail)] = self._tail
        staging[len(self._tail) : DIRECT_ALIGN] = bytes(DIRECT_ALIGN - len(self._tail))
        if not self._write_blocks(staging[:DIRECT_ALIGN], staging[: len(self._tail)], memoryview(b"")):
            return
        self._on_disk -= DIRECT_ALIGN  # the block is written again, whole, once more bytes arrive

    def finish(self) -> None:
        """Write the partial block, cut the padding off, and make the file durable."""
        self.flush()
        os.ftruncate(self.fd, self.size)
        if self._buffered is not None:
            self._buffered.finish()
        elif self.durable:
            os.fsync(self.fd)


def create_output_file(path: Path, durable: bool = True) -> BufferedFile | DirectFile:
    """A new file (replacing one ckptavg made) to write front to back: direct where it makes the write durable
    and the file system allows it, through the page cache otherwise (--no-fsync leaves the bytes to the kernel)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    if durable and O_DIRECT:
        try:
            return DirectFile(os.open(path, flags | O_DIRECT, 0o644), durable)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    return BufferedFile(os.open(path, flags, 0o644), durable)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


class TensorWriter(Protocol):
    """What the engine writes into: tensor bytes in plan order, and repeats of tied tensors."""

    paths: list[Path]
    bytes_written: int

    def write(self, data: memoryview) -> None: ...

    def repeat(self, name: str) -> None: ...

    def finish(self) -> None: ...

    def abort(self) -> None: ...


def split_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy shards of at most max_shard_bytes; a tensor larger than that gets a shard of its own."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_file_names(count: int, stem: str = "model") -> list[str]:
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def encode_header(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": SAFETENSORS_CODES[dtype_name(spec.dtype)],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    # Spaces (which the format allows after the JSON) up to a DIRECT_ALIGN boundary: the tensors' bytes then
    # start on a block, so a DirectFile writes them straight from the engine's page-aligned chunks.
    raw += b" " * (-(len(raw) + 8) % DIRECT_ALIGN)
    return len(raw).to_bytes(8, "little") + raw


class SafetensorsWriter:
    """Writes `shards` (lists of TensorSpec) to `paths`, tensor by tensor in that order.

    `write(data)` appends bytes of the current tensor; a tensor may arrive in several pieces.
    `repeat(name)` writes again the bytes of a tensor already written (tied weights).
    """

    def __init__(self, paths: list[Path], shards: list[list[TensorSpec]], metadata: dict[str, str], durable: bool = True) -> None:
        assert len(paths) == len(shards)
        self.durable = durable
        self.paths = paths
        self.shards = shards
        self.metadata = metadata
        self._queue = [(i, spec) for i, shard in enumerate(shards) for spec in shard]
        self._position = 0  # index into _queue of the tensor being written
        self._written = 0  # bytes of it written so far
        self._file: BufferedFile | DirectFile | None = None
        self._shard = -1
        self._where: dict[str, tuple[Path, int, int]] = {}
        self.bytes_written = 0

    @property
    def current(self) -> TensorSpec:
        return self._queue[self._position][1]

    def _open_shard(self, index: int) -> None:
        self._close_shard()
        self._shard = index
        self._file = create_output_file(self.paths[index], self.durable)
        header = encode_header(self.shards[index], self.metadata)
        self._write_all(memoryview(header))
        self._data_start = len(header)
        self._data_offset = 0

    def _close_shard(self) -> None:
        if self._file is not None:
            self._file.finish()
            os.close(self._file.fd)
            self._file = None

    def _write_all(self, data: memoryview) -> None:
        assert self._file is not None
        self._file.write(data)
        self.bytes_written += len(data)

    def _advance_if_full(self) -> None:
        while self._position < len(self._queue) and self._written == self.current.nbytes:
            spec = self.current
            self._where[spec.name] = (self.paths[self._shard], self._data_start + self._data_offset, spec.nbytes)
            self._data_offset += spec.nbytes
            self._position += 1
            self._written = 0
            if self._position < len(self._queue):
                self._start_tensor()

    def _start_tensor(self) -> None:
        shard = self._queue[self._position][0]
        if shard != self._shard:
            self._open_shard(shard)

    def write(self, data: memoryview) -> None:
        if self._file is None:
            self._start_tensor()
        self._advance_if_full()
        if not len(data):  # a zero-element tensor: nothing to write, and the tensors after it may be done too
            return
        if self._written + len(data) > self.current.nbytes:
            raise AssertionError(f"{self.current.name}: more bytes than its shape holds")
        self._write_all(data)
        self._written += len(data)
        self._advance_if_full()

    def repeat(self, name: str) -> None:
        """Write the bytes of `name`, already written, as the current tensor."""
        path, offset, nbytes = self._where[name]
        assert nbytes == self.current.nbytes
        if self._file is not None:
            self._file.flush()  # the bytes of a tensor just written may still be in the staging buffer
        fd = os.open(path, os.O_RDONLY)
        try:
            done = 0
            while done < nbytes:
                piece = os.pread(fd, min(COPY_PIECE, nbytes - done), offset + done)
                self.write(memoryview(piece))
                done += len(piece)
        finally:
            os.close(fd)

    def finish(self) -> None:
        """Write zero-byte tensors still pending and empty shards, then fsync and close."""
        if self._file is None and self._queue:
            self._start_tensor()
        self._advance_if_full()
        if self._position != len(self._queue):
            raise AssertionError(f"writer stopped at {self.current.name}")
        self._close_shard()

    def abort(self) -> None:
        if self._file is not None:
            os.close(self._file.fd)
            self._file = None


def tensor_offsets(paths: list[Path], shards: list[list[TensorSpec]], metadata: dict[str, str]) -> dict[str, tuple[Path, int]]:
    """Where each tensor's bytes start in the files a SafetensorsWriter with these arguments writes."""
    where = {}
    for path, shard in zip(paths, shards):
        offset = len(encode_header(shard, metadata))
        for spec in shard:
            where[spec.name] = (path, offset)
            offset += spec.nbytes
    return where


def lay_out_files(paths: list[Path], shards: list[list[TensorSpec]], metadata: dict[str, str]) -> None:
    """Create the files a SafetensorsWriter would write, with their headers and final sizes, for several
    processes to fill in place (RangeWriter); the bytes end up the same as one writer's."""
    for path, shard in zip(paths, shards):
        header = encode_header(shard, metadata)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(header)
            while view:
                view = view[os.write(fd, view) :]
            os.ftruncate(fd, len(header) + sum(spec.nbytes for spec in shard))
        finally:
            os.close(fd)


class RangeWriter:
    """Writes byte ranges of tensors at their places in files laid out in advance (lay_out_files): one
    process's share of an output that several processes write at once.

    `ranges` are (file, offset, length) in the order the engine hands their bytes over. With `checksums`, it
    keeps a CRC-32 of each range (`crcs`, in the same order) for --verify.
    """

    def __init__(
        self, paths: list[Path], ranges: list[tuple[Path, int, int]], durable: bool = True, checksums: bool = False
    ) -> None:
        self.paths = paths
        self.ranges = ranges
        self.durable = durable
        self.checksums = checksums
        self.crcs: list[int] = []
        self.bytes_written = 0
        self._position = 0
        self._written = 0  # bytes of the current range written
        self._crc = 0
        self._fds: dict[Path, int] = {}

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_WRONLY)
        return self._fds[path]

    def _advance_if_full(self) -> None:
        while self._position < len(self.ranges) and self._written == self.ranges[self._position][2]:
            path, offset, length = self.ranges[self._position]
            if self.durable and SYNC_FILE_RANGE is not None and length:
                SYNC_FILE_RANGE(self._fd(path), offset, length, START_WRITE)  # on its way to the disk while the next is folded
            self.crcs.append(self._crc)
            self._position += 1
            self._written, self._crc = 0, 0

    def write(self, data: memoryview) -> None:
        self._advance_if_full()
        while len(data):
            if self._position == len(self.ranges):
                raise AssertionError("more bytes than the ranges hold")
            path, offset, length = self.ranges[self._position]
            piece = data[: length - self._written]
            fd, at = self._fd(path), offset + self._written
            while len(piece):
                n = os.pwrite(fd, piece, at)
                if self.checksums:
                    self._crc = zlib.crc32(piece[:n], self._crc)
                piece, at = piece[n:], at + n
                self._written += n
                self.bytes_written += n
                data = data[n:]
            self._advance_if_full()

    def repeat(self, name: str) -> None:
        raise AssertionError("a share computes tied tensors again; it never repeats one")

    def finish(self) -> None:
        """Check every range was written, make the files durable (fsync) and drop their pages from the cache."""
        self._advance_if_full()
        if self._position != len(self.ranges):
            raise AssertionError(f"writer stopped at range {self._position} of {len(self.ranges)}")
        for fd in self._fds.values():
            if self.durable:
                os.fsync(fd)
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        self.abort()

    def abort(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def write_index(path: Path, shards: list[list[TensorSpec]], names: list[str], metadata: dict[str, object]) -> None:
    weight_map = {spec.name: file for shard, file in zip(shards, names) for spec in shard}
    total = sum(spec.nbytes for shard in shards for spec in shard)
    index = {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}
    write_text(path, json.dumps(index, indent=2) + "\n")


def write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
