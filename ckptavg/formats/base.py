"""What every reader produces: tensors known by name, dtype and shape, whose bytes are read on demand."""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ckptavg.errors import InputError
from ckptavg.formats.dtypes import itemsize, to_torch

if TYPE_CHECKING:
    import torch


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def tensor_buffer(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (no numpy needed)."""
    assert t.is_contiguous() and t.device.type == "cpu"
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_char * nbytes).from_address(t.data_ptr())).cast("B")


def _raise_open_file_limit() -> None:
    """Hundreds of sharded inputs hold thousands of files open; lift the soft limit to the hard one."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, 65536), hard))
    except (ImportError, ValueError, OSError):
        pass


class OpenFiles:
    """One read-only descriptor per file, shared by every tensor that lives in it.

    Reads use os.pread, so threads can read different tensors of one file at once.
    """

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        _raise_open_file_limit()

    def fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


FILES = OpenFiles()
PAGE = mmap.ALLOCATIONGRANULARITY


def map_bytes(path: Path, offset: int, length: int) -> tuple[torch.Tensor, mmap.mmap | None]:
    """A zero-copy uint8 view of `length` bytes of `path` from `offset`, and the mapping to close after use.

    The mapping is populated at once (MAP_POPULATE), so the page-ins happen in the calling thread.
    """
    import torch

    if length == 0:
        return torch.empty(0, dtype=torch.uint8), None
    base = offset - offset % PAGE
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    try:
        fd = FILES.fd(path)
        if offset + length > os.fstat(fd).st_size:
            raise InputError(path, f"truncated: expected {length} bytes at offset {offset}, file ends early")
        mapping = mmap.mmap(fd, length + offset - base, flags=flags, prot=mmap.PROT_READ, offset=base)
    except OSError as e:
        raise InputError(path, f"cannot read: {e.strerror or e}") from e
    with warnings.catch_warnings():
        # read-only on purpose: torch warns that it could write through such a buffer, and it never does
        warnings.simplefilter("ignore", UserWarning)
        view = torch.frombuffer(mapping, dtype=torch.uint8, count=length, offset=offset - base)
    return view, mapping


def read_exact(path: Path, offset: int, out: memoryview, fd: int = -1) -> None:
    """Fill `out` with the bytes of `path` (open as `fd`, if given) from `offset`, or fail naming the file."""
    done = 0
    while done < len(out):
        try:
            n = os.preadv(fd if fd >= 0 else FILES.fd(path), [out[done:] if done else out], offset + done)
        except OSError as e:
            raise InputError(path, f"cannot read: {e.strerror or e}") from e
        if n == 0:
            raise InputError(path, f"truncated: expected {len(out)} bytes at offset {offset + done}, file ends early")
        done += n


@dataclass
class TensorSource:
    """Where one tensor's bytes are on disk.

    `offset` is the byte offset of element 0 in `path`. A tensor whose `stride` is not the contiguous one
    (a view saved by torch.save) is read whole and made contiguous on first use. The dtype is kept by
    torch's name for it (`dtype_name`), so that describing a checkpoint imports no torch; `dtype` is the
    torch.dtype, for the code that reads the bytes into tensors.
    """

    path: Path
    offset: int
    dtype_name: str
    shape: tuple[int, ...]
    stride: tuple[int, ...] | None = None
    storage: str | None = None  # identity of the storage it lives in, to find tied tensors
    _strided_cache: torch.Tensor | None = field(default=None, repr=False)

    @property
    def dtype(self) -> torch.dtype:
        return to_torch(self.dtype_name)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return itemsize(self.dtype_name)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def contiguous(self) -> bool:
        if self.stride is None or self.numel <= 1:
            return True
        return all(st == want for st, want, size in zip(self.stride, contiguous_strides(self.shape), self.shape) if size != 1)

    # A source whose read_into serves any byte range without making the whole tensor (see readable_by_range)
    reads_by_range: ClassVar[bool] = False

    @property
    def quantization(self) -> str | None:
        """The scheme whose codes and scales this source dequantizes (formats/quantized.py); None for stored values."""
        return None

    @property
    def alias_key(self) -> tuple | None:
        """Two sources with the same key hold the same values (tied weights)."""
        if self.storage is None:
            return None
        return (self.storage, self.offset, self.shape, self.stride, self.dtype_name)

    def read_into(self, start: int, out: torch.Tensor) -> None:
        """Copy bytes [start, start + out.numel()) of the contiguous tensor into the uint8 tensor `out`."""
        if self.contiguous:
            read_exact(self.path, self.offset + start, tensor_buffer(out))
            return
        import torch

        self.prepare()
        assert self._strided_cache is not None
        out.copy_(self._strided_cache.view(torch.uint8)[start : start + out.numel()])

    def read_bytes(self, start: int, out: memoryview) -> None:
        """Copy bytes [start, start + len(out)) of the contiguous tensor into `out`: stored bytes are read with
        no torch; a source that makes a tensor first (strided, computed) imports it."""
        if self.contiguous:
            read_exact(self.path, self.offset + start, out)
        elif len(out):
            import torch

            self.read_into(start, torch.frombuffer(out, dtype=torch.uint8))

    def prepare(self) -> None:
        """Make a strided source readable by range: read it whole once and make it contiguous (a no-op for
        the usual contiguous source). Call it from one thread before several threads read the source."""
        if not self.contiguous and self._strided_cache is None:
            self._strided_cache = self._read_strided()

    def view_range(self, start: int, length: int) -> tuple[torch.Tensor, mmap.mmap | None]:
        """Bytes [start, start + length) of the contiguous tensor without copying: a file mapping, or a
        slice of the materialised tensor for a strided source. Close the mapping once the view is dropped."""
        if self.contiguous:
            return map_bytes(self.path, self.offset + start, length)
        import torch

        self.prepare()
        assert self._strided_cache is not None
        return self._strided_cache.view(torch.uint8)[start : start + length], None

    def release(self) -> None:
        self._strided_cache = None

    def read(self) -> torch.Tensor:
        """The whole tensor, contiguous, in memory (one tensor, never a checkpoint)."""
        import torch

        raw = torch.empty(self.nbytes, dtype=torch.uint8)
        self.read_into(0, raw)
        self.release()
        return raw.view(self.dtype).reshape(self.shape)

    def _read_strided(self) -> torch.Tensor:
        import torch

        assert self.stride is not None
        span = 1 + sum((size - 1) * st for size, st in zip(self.shape, self.stride))
        raw = torch.empty(span * self.itemsize, dtype=torch.uint8)
        read_exact(self.path, self.offset, tensor_buffer(raw))
        view = raw.view(self.dtype).as_strided(self.shape, self.stride)
        return view.contiguous().reshape(-1)


@dataclass
class ExtentSource(TensorSource):
    """A tensor whose bytes are the concatenation of byte ranges of files: a parameter spread over the
    partitions of several ranks (DeepSpeed ZeRO), read by range like any stored tensor."""

    reads_by_range: ClassVar[bool] = True

    extents: tuple[tuple[Path, int, int], ...] = ()  # (file, byte offset, byte length), in order

    @classmethod
    def of(cls, extents: list[tuple[Path, int, int]], dtype_name: str, shape: tuple[int, ...]) -> ExtentSource:
        first = extents[0] if extents else (Path(), 0, 0)
        return cls(path=first[0], offset=first[1], dtype_name=dtype_name, shape=shape, extents=tuple(extents))

    @property
    def contiguous(self) -> bool:
        return len(self.extents) <= 1

    @property
    def alias_key(self) -> tuple | None:
        return ("extents", self.extents, self.shape, self.dtype_name)

    def prepare(self) -> None:
        pass

    def read_into(self, start: int, out: torch.Tensor) -> None:
        self.read_bytes(start, tensor_buffer(out))

    def read_bytes(self, start: int, out: memoryview) -> None:
        if self.contiguous:
            return super().read_bytes(start, out)
        view, at, done = out, 0, 0
        for path, offset, length in self.extents:
            lo, hi = max(start, at), min(start + len(view), at + length)
            if lo < hi:
                read_exact(path, offset + lo - at, view[lo - start : hi - start])
                done += hi - lo
            at += length
        if done != len(view):
            raise InputError(self.path, f"truncated: expected {len(view)} bytes of a tensor, found {done}")


@dataclass
class ComputedSource(TensorSource):
    """A tensor whose bytes are computed, not stored (an adapter's concatenated factors, a merged weight):
    `compute` makes it, once, when the engine first reads it, and it is dropped after its last chunk."""

    compute: Any = field(default=None, repr=False)  # () -> torch.Tensor of `dtype` and `shape`

    @property
    def contiguous(self) -> bool:
        return False  # read through prepare(), like a strided source

    def _read_strided(self) -> torch.Tensor:
        value = self.compute()
        assert value.dtype == self.dtype and tuple(value.shape) == self.shape, (value.dtype, value.shape, self.dtype, self.shape)
        return value.contiguous().reshape(-1)


@dataclass
class RowSource(TensorSource):
    """A tensor computed a block of rows at a time (a merged weight: base rows + the adapters' change to
    them), so memory holds the rows the engine is folding, never the whole tensor. `compute_rows(lo, hi)`
    returns rows [lo, hi) of `dtype`; it is called from several threads at once and must not share state
    it changes. `on_release` drops what it caches once the engine is done with the tensor."""

    reads_by_range: ClassVar[bool] = True

    compute_rows: Any = field(default=None, repr=False)  # (lo, hi) -> torch.Tensor [hi - lo, *shape[1:]]
    on_release: Any = field(default=None, repr=False)

    @property
    def contiguous(self) -> bool:
        return False

    def prepare(self) -> None:
        pass

    def release(self) -> None:
        if self.on_release is not None:
            self.on_release()

    def read_into(self, start: int, out: torch.Tensor) -> None:
        import torch

        row_bytes = self.nbytes // self.shape[0]
        first, end = start // row_bytes, -(-(start + out.numel()) // row_bytes)
        rows = self.compute_rows(first, end)
        assert rows.dtype == self.dtype and tuple(rows.shape) == (end - first, *self.shape[1:]), (rows.dtype, rows.shape)
        flat = rows.contiguous().reshape(-1).view(torch.uint8)
        offset = start - first * row_bytes
        out.copy_(flat[offset : offset + out.numel()])

    def read(self) -> torch.Tensor:
        return self.compute_rows(0, self.shape[0]).contiguous()


@dataclass
class Checkpoint:
    """One input as the user named it: its tensors, where they are, and what else it says about itself."""

    path: Path
    format: str
    tensors: dict[str, TensorSource]
    files: list[Path]
    folder: Path | None = None
    step: int | None = None
    epoch: int | None = None
    step_source: str | None = None
    notes: list[str] = field(default_factory=list)
    top_level_keys: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    weights_key: str | None = None  # where in a pickle the weights were found
    weights_from: str = ""  # which weights were taken and why, for the report (raw or EMA, key, prefixes removed)
    adapter: Any = None  # the AdapterConfig of a PEFT adapter (formats/peft.py)
    pickle: Any = None  # the PickleFile of a single-file PyTorch checkpoint: its structure, never run
    weight_refs: list = field(default_factory=list)  # a pickle's weights: (TensorRef in `pickle.obj`, its TensorSource)
    quantization: Any = None  # the Quantization of FP8 / MXFP4 weights, read dequantized (formats/quantized.py)

    @property
    def nbytes(self) -> int:
        return sum(src.nbytes for src in self.tensors.values())


@dataclass
class SliceSource(TensorSource):
    """Elements [first, first + numel) of another source, read by range through it (a share of a tensor
    that several processes write)."""

    whole: Any = field(default=None, repr=False)  # the TensorSource sliced
    first_byte: int = 0

    @property
    def contiguous(self) -> bool:
        return False

    @property
    def alias_key(self) -> tuple | None:
        return None

    def prepare(self) -> None:
        self.whole.prepare()

    def release(self) -> None:
        self.whole.release()

    def read_into(self, start: int, out: torch.Tensor) -> None:
        self.whole.read_into(self.first_byte + start, out)


def readable_by_range(src: TensorSource) -> bool:
    """True when any range of `src` can be read without making the whole tensor (stored contiguous bytes,
    extents, rows computed on demand, values dequantized by element range), so a share of it costs only its
    own bytes."""
    return src.reads_by_range or (type(src) is TensorSource and src.contiguous)


def slice_source(src: TensorSource, first: int, count: int) -> TensorSource:
    """Elements [first, first + count) of `src` as a 1-D source of their own."""
    if type(src) is TensorSource and src.contiguous:  # plain stored bytes: the engine's fast path reads them
        return TensorSource(src.path, src.offset + first * src.itemsize, src.dtype_name, (count,))
    return SliceSource(src.path, src.offset, src.dtype_name, (count,), whole=src, first_byte=first * src.itemsize)
