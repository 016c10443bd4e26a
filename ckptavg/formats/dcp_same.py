"""out_format="same" for torch.distributed.checkpoint (DCP) saves: the merge written back as a DCP folder.

The output holds the newest input's entries. Each of the model's tensors is merged and written chunked exactly
as the newest input saved it: the same names, chunk offsets and sizes, dtypes, each chunk a torch.save archive
of its own in the `.distcp` file of the rank that saved it, as DCP's FileSystemWriter writes it. Row chunks
(FSDP's Shard(0), uneven and empty ones included) are written as the engine hands the bytes over; another cut
(tensor-parallel columns) is cut from the merged tensor, one tensor at a time. Every other entry (optimizer
state, lr_scheduler, dataloader, train_state: pickled bytes ckptavg never unpickles) is copied byte for byte
with training_state="newest", or left out with "drop", its `.metadata` entries with it. `.metadata` is the
newest's, rewritten from the restricted unpickler's inert view (DCP's classes written back as the same globals,
never imported from the file) with the new places of the items; so torch.distributed.checkpoint.load reads it
into the model and optimizer that saved it.

Refused: inputs of other layouts, a DCP folder inside a Trainer or NeMo folder (name the DCP folder itself),
per-rank `.metadata` files (use_collectives=False), items serialized as safetensors, a dtype change.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ckptavg.errors import HostileInputError, InputError, OutputError, UnsupportedError, UsageError, option
from ckptavg.formats.base import FILES, Checkpoint, TensorSource, tensor_buffer
from ckptavg.formats.dcp import (
    METADATA,
    NOT_MODEL,
    Chunk,
    Entry,
    MetadataUnpickler,
    _entries,
    _ints,
    _safetensors_at,
    _state,
    open_dcp,
    read_metadata,
    tensor_source,
)
from ckptavg.formats.dtypes import dtype_name
from ckptavg.formats.inert_pickler import inert_reduction
from ckptavg.formats.torch_writer import ALIGNMENT, _Pickler, _Storage, _Tensor, check_pt_dtypes
from ckptavg.formats.unpickle import DTypeRef, HostilePickleError, Opaque, SizeTuple
from ckptavg.formats.writer import TensorSpec
from ckptavg.verify import sha256_of

KIND = "same-dcp"
COPY_PIECE = 16 << 20


def is_dcp_save(ckpt: Checkpoint) -> bool:
    return ckpt.format == "dcp"


def dcp_same_layout(newest: Checkpoint) -> tuple[str, bool] | None:
    """The output's (kind, one file?) when the newest input is a DCP save: a folder; else None."""
    return (KIND, False) if is_dcp_save(newest) else None


class _MetadataView(MetadataUnpickler):
    def find_class(self, module: str, name: str) -> Any:
        return SizeTuple if (module, name) == ("torch", "Size") else super().find_class(module, name)


@dataclass
class DcpSave:
    """The newest input's DCP save as the writer sees it: its folder, the inert view of its `.metadata`, every
    entry, the prefix of the model's names in it, and its entries by role."""

    folder: Path
    metadata: Opaque
    entries: dict[str, Entry | None]
    prefix: str
    merged: list[str]  # the entries of the merged tensors (prefix + name)
    model_other: list[str]  # the model's other entries (its pickled extra state, tensors not merged): always copied
    training: list[str]  # everything else (optimizer, lr_scheduler, dataloader, train_state): training_state's

    def kept(self, training_state: str) -> list[str]:
        keep = set(self.merged) | set(self.model_other) | (set(self.training) if training_state == "newest" else set())
        return [name for name in self.entries if name in keep]


def _folder(ckpt: Checkpoint) -> Path:
    """The DCP folder of the newest input, refused when it is not the input itself."""
    metadata = ckpt.files[0] if ckpt.files else None
    if metadata is None or metadata.name != METADATA:
        raise UnsupportedError(
            ckpt.path, f"{option('out_format', 'same')}: a DCP save with one .metadata per rank is not written back yet"
        )
    if metadata.parent != ckpt.path:
        raise UnsupportedError(
            ckpt.path,
            f"{option('out_format', 'same')}: the DCP save lies in {metadata.parent.name}/ of this folder; name that "
            "folder itself as the input to write a DCP save back",
        )
    return metadata.parent


def read_save(ckpt: Checkpoint, names: list[str]) -> DcpSave:
    """The newest input's save, its `.metadata` read again (a fresh view the writer may change), the merged
    tensors `names` located in it."""
    folder = _folder(ckpt)
    path = folder / METADATA
    try:
        with open(path, "rb") as f:
            metadata = _MetadataView(f).load()
        entries = _entries(metadata, {})
    except InputError as e:
        raise InputError(path, e.problem) from e
    except HostilePickleError as e:  # read once already, by the reader: only a file changed since lands here
        raise HostileInputError(path, f"hostile .metadata: it names {e.qualname}; refused, nothing was run") from e
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, struct.error) as e:
        raise InputError(path, f"corrupt DCP metadata ({type(e).__name__}: {str(e)[:200]})") from e
    prefix = _prefix(entries, names)
    if prefix is None:
        raise InputError(path, f"no place for the merged tensors in this DCP save (e.g. {names[0]})")
    merged = [prefix + name for name in names]
    taken = set(merged)

    def model_side(name: str) -> bool:
        return name.startswith(prefix) if prefix else not name.startswith(NOT_MODEL)

    others = [name for name in entries if name not in taken]
    return DcpSave(
        folder,
        metadata,
        entries,
        prefix,
        merged,
        [n for n in others if model_side(n)],
        [n for n in others if not model_side(n)],
    )


def _prefix(entries: dict[str, Entry | None], names: list[str]) -> str | None:
    """The prefix before the merged tensors' names in the save (model., app.model., none), or None."""
    if not names:
        return ""
    first = names[0]
    candidates = sorted({name[: len(name) - len(first)] for name, e in entries.items() if e is not None and name.endswith(first)})
    for prefix in sorted(candidates, key=len):
        if all(entries.get(prefix + name) is not None for name in names):
            return prefix
    return None


def _groups(names: list[str]) -> str:
    """Entries summed up by their first name part: optimizer (120), lr_scheduler (6), ..."""
    counts: dict[str, int] = {}
    for name in names:
        group = name.split(".", 1)[0]
        counts[group] = counts.get(group, 0) + 1
    return ", ".join(f"{group} ({n})" for group, n in counts.items())


def check_dcp_same(inputs: list[Checkpoint], out: Path, specs: list[TensorSpec], training_state: str) -> list[str]:
    """Refuse, before anything is written, what cannot be written back as the newest input's DCP save: inputs of
    other layouts, an output named as a file, a dtype the save does not hold, items serialized as safetensors.
    Returns the report's notes: where the weights go, and the training state kept or left out."""
    newest = inputs[-1]
    for ckpt in inputs[:-1]:
        if not is_dcp_save(ckpt):
            what = "a PyTorch pickle" if ckpt.pickle is not None else f"a {ckpt.format} checkpoint"
            raise UsageError(
                ckpt.path,
                f"{option('out_format', 'same')} needs inputs of one layout: this is {what}, the newest input {newest.path} "
                "a torch.distributed.checkpoint (DCP) save",
            )
    if out.suffix.lower() in (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".tar", ".distcp", ".metadata"):
        raise UsageError(
            None,
            f"{option('out', out.name)}: {option('out_format', 'same')} writes a DCP save, a folder, as the newest input "
            f"{newest.path.name}/ is: name a folder",
        )
    if problem := check_pt_dtypes(specs):
        raise UsageError(None, f"{option('out_format', 'same')} writes torch.save archives, which cannot hold {problem}")
    save = read_save(newest, [spec.name for spec in specs])
    for spec, name in zip(specs, save.merged):
        entry = save.entries[name]
        assert entry is not None
        if dtype_name(spec.dtype) != entry.dtype_name:
            raise UsageError(
                None,
                f"{option('dtype', dtype_name(spec.dtype))}: {option('out_format', 'same')} keeps each tensor's dtype in a DCP "
                f"save ({name} is {entry.dtype_name}); leave the dtype out",
            )
        first = next((c for c in entry.chunks if not c.transforms), None)
        if first is not None and _safetensors_at(save.folder / first.file, first.offset):
            raise UnsupportedError(
                newest.path,
                f"{option('out_format', 'same')}: a DCP save whose items are serialized as safetensors is not written back yet",
            )
    notes = [
        f"written as the DCP save {newest.path.name}/ is: its {len(save.merged)} model tensors merged, chunked as it saved "
        f"them (names {save.prefix + '*' if save.prefix else 'at the top level'}), the recipe in ckptavg.json beside"
    ]
    if save.training and training_state == "drop":
        notes.append(f"training state left out ({option('training_state', 'drop')}): {_groups(save.training)}")
    elif save.training:
        notes.append(
            f"training state of the newest input copied byte for byte ({option('training_state', 'newest')}): "
            f"{_groups(save.training)}"
        )
    return notes


class _MetadataPickler(pickle._Pickler):  # type: ignore[name-defined]
    """Pickles the inert view of a `.metadata` back: each DCP record as the construction (NEWOBJ) or call (REDUCE)
    it was read from, its class written as a GLOBAL from the recorded module and name, so nothing is imported (pickle's
    own save_global imports the module to check the name); offsets and sizes as torch.Size, dtypes as torch names."""

    def reducer_override(self, obj: Any) -> Any:
        reduced = inert_reduction(obj)
        return NotImplemented if reduced is None else reduced

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if isinstance(obj, type) and issubclass(obj, Opaque):
            self.write(pickle.GLOBAL + f"{obj._module}\n{obj._name}\n".encode())
            self.memoize(obj)
            return
        if isinstance(obj, DTypeRef):
            self.write(pickle.GLOBAL + f"torch\n{obj.name}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


class _FileAt(io.RawIOBase):
    """A writable view of an open file from byte `base` on: a chunk's archive sees positions from its own start
    (zipfile records absolute positions, and torch.load reads the item's byte range as a file of its own)."""

    def __init__(self, fd: int, base: int) -> None:
        self.fd, self.base, self.pos, self.end = fd, base, 0, 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: 0, 1: self.pos, 2: self.end}[whence] + offset
        return self.pos

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        size, at = len(view), self.base + self.pos
        while len(view):
            n = os.pwrite(self.fd, view, at)
            view, at = view[n:], at + n
        self.pos += size
        self.end = max(self.end, self.pos)
        return size


class _ChunkArchive:
    """One chunk as torch.save writes a tensor, which is what DCP's FileSystemWriter puts in a `.distcp` file for a
    tensor item: a zip of data.pkl, the storage record data/0 (written piece by piece, 64-byte aligned), byteorder
    and version."""

    def __init__(self, file: _FileAt, spec: TensorSpec) -> None:
        self.file = file
        self.remaining = spec.nbytes
        self.zip = zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        pkl = io.BytesIO()
        _Pickler(pkl, protocol=2).dump(_Tensor(_Storage("0", spec)))
        self._record("data.pkl", pkl.getvalue())
        self.stream = self.zip.open(self._aligned("data/0"), "w", force_zip64=True)

    def _aligned(self, name: str) -> zipfile.ZipInfo:
        info = zipfile.ZipInfo(f"archive/{name}", date_time=(1980, 1, 1, 0, 0, 0))
        fixed = 30 + len(info.filename.encode()) + 20 + 4  # local header, name, zip64 extra, padding field header
        pad = -(self.file.tell() + fixed) % ALIGNMENT
        info.extra = struct.pack("<HH", 0x4246, pad) + b"\0" * pad
        return info

    def _record(self, name: str, data: bytes) -> None:
        with self.zip.open(self._aligned(name), "w", force_zip64=True) as stream:
            stream.write(data)

    def write(self, data: memoryview) -> None:
        self.stream.write(data)
        self.remaining -= len(data)

    def close(self) -> int:
        """Finish the archive; returns its length."""
        if self.remaining:
            raise AssertionError(f"a chunk archive closed {self.remaining} bytes short")
        self.stream.close()
        for name, data in ((".format_version", b"1"), (".storage_alignment", b"%d" % ALIGNMENT), ("byteorder", b"little")):
            self._record(name, data)
        self._record("version", b"3\n")
        self.zip.close()
        return self.file.end


def _row_chunks(entry: Entry) -> list[Chunk] | None:
    """The chunks that hold elements, in row order, when each is a block of whole rows (FSDP's Shard(0)): each is
    then a byte range of the tensor. None for another cut (tensor-parallel columns, 2-D meshes)."""
    chunks = [c for c in entry.chunks if math.prod(c.sizes)]
    if all(c.sizes[1:] == entry.size[1:] for c in chunks):
        return sorted(chunks, key=lambda c: c.offsets[0] if c.offsets else 0)
    return None


class DcpSameWriter:
    """Writes the merged tensors, as the engine hands them over, as the chunks of the newest input's DCP save into
    the output folder; `finish` copies the items kept (training_state="newest") and writes `.metadata`.

    Each chunk goes to the `.distcp` file of the same name as the one it came from (each rank's file stays its
    own), appended as a torch.save archive. Memory: the piece handed over, or one tensor cut other than in rows."""

    def __init__(
        self, folder: Path, specs: list[TensorSpec], newest: Checkpoint, training_state: str, out: Path, durable: bool = True
    ) -> None:
        self.folder, self.specs, self.training_state, self.out, self.durable = folder, specs, training_state, out, durable
        self.save = read_save(newest, [spec.name for spec in specs])
        self.paths: list[Path] = []
        self.bytes_written = 0
        self._fds: dict[str, int] = {}
        self._ends: dict[str, int] = {}
        self._placed: dict[tuple[str, tuple[int, ...]], tuple[str, int, int]] = {}  # (entry, chunk offsets) -> file range
        self._position = 0
        self._written = 0
        self._rows: list[Chunk] = []
        self._next = 0  # the row chunk being written
        self._archive: _ChunkArchive | None = None
        self._buffer: bytearray | None = None  # a tensor cut other than in rows, until it is whole
        if specs:
            self._begin()

    @property
    def current(self) -> TensorSpec:
        return self.specs[self._position]

    def _entry(self) -> Entry:
        entry = self.save.entries[self.save.merged[self._position]]
        assert entry is not None
        return entry

    def _fd(self, file: str) -> int:
        if file not in self._fds:
            path = self.folder / file
            self._fds[file] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._ends[file] = 0
            self.paths.append(path)
        return self._fds[file]

    def _open(self, chunk: Chunk) -> _ChunkArchive:
        spec = self.current
        self._archive = _ChunkArchive(
            _FileAt(self._fd(chunk.file), self._ends[chunk.file]), TensorSpec(spec.name, spec.dtype, chunk.sizes)
        )
        self._chunk = chunk
        return self._archive

    def _close(self) -> None:
        assert self._archive is not None
        file, start = self._chunk.file, self._ends[self._chunk.file]
        length = self._archive.close()
        self._placed[(self._entry().name, self._chunk.offsets)] = (file, start, length)
        self._ends[file] = start + length
        self._archive = None

    def _write_chunk(self, chunk: Chunk, data: memoryview) -> None:
        self._open(chunk).write(data)
        self._close()

    def _begin(self) -> None:
        entry = self._entry()
        for chunk in entry.chunks:
            if not math.prod(chunk.sizes):
                self._write_chunk(chunk, memoryview(b""))
        rows = _row_chunks(entry)
        self._rows, self._next = rows or [], 0
        self._buffer = bytearray(self.current.nbytes) if rows is None else None

    def _end(self) -> None:
        if self._buffer is None:
            if self._next != len(self._rows):
                raise AssertionError(f"{self.current.name}: {len(self._rows) - self._next} chunk(s) not written")
            return
        spec, entry = self.current, self._entry()
        whole = torch.frombuffer(self._buffer, dtype=spec.dtype).reshape(spec.shape)
        for chunk in entry.chunks:
            if math.prod(chunk.sizes):
                block = whole[tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))].contiguous()
                self._write_chunk(chunk, tensor_buffer(block))
        self._buffer = None

    def _advance_if_full(self) -> None:
        while self._position < len(self.specs) and self._written == self.current.nbytes:
            self._end()
            self._position += 1
            self._written = 0
            if self._position < len(self.specs):
                self._begin()

    def write(self, data: memoryview) -> None:
        self._advance_if_full()
        if not len(data):
            return
        view = data.cast("B") if data.format != "B" else data
        size = len(view)
        if self._written + size > self.current.nbytes:
            raise AssertionError(f"{self.current.name}: more bytes than its shape holds")
        if self._buffer is not None:
            self._buffer[self._written : self._written + size] = view
        while self._buffer is None and len(view):
            archive = self._archive or self._open(self._rows[self._next])
            piece = view[: archive.remaining]
            archive.write(piece)
            view = view[len(piece) :]
            if not archive.remaining:
                self._close()
                self._next += 1
        self._written += size
        self.bytes_written += size
        self._advance_if_full()

    def repeat(self, name: str) -> None:
        """A tied tensor: the bytes of `name`, read back from its chunks written here."""
        self._advance_if_full()
        entry = self.save.entries[self.save.prefix + name]
        assert entry is not None
        placed = [Chunk(c.offsets, c.sizes, *self._placed[(entry.name, c.offsets)]) for c in entry.chunks]
        tensor = tensor_source(self.folder, Entry(entry.name, entry.dtype_name, entry.size, placed), {}).read().contiguous()
        self.write(tensor_buffer(tensor))

    def finish(self) -> None:
        """The items kept copied byte for byte, `.metadata` with every item's new place written; the files made durable."""
        self._advance_if_full()
        if self._position != len(self.specs):
            raise AssertionError(f"writer stopped at {self.current.name}")
        fields = dict(_state(self.save.metadata))
        keep, merged = set(self.save.kept(self.training_state)), set(self.save.merged)
        storage = {index: info for index, info in (fields.get("storage_data") or {}).items() if _state(index).get("fqn") in keep}
        for index, info in storage.items():
            key = _state(index)
            if key["fqn"] in merged:  # no transform: the chunk is written as a plain torch.save archive
                file, offset, length = self._placed[(key["fqn"], _ints(key["offset"]))]
                info.__setstate__({"relative_path": file, "offset": offset, "length": length})
        copies = sorted(
            (info for index, info in storage.items() if _state(index)["fqn"] not in merged),
            key=lambda info: (str(_state(info)["relative_path"]), int(_state(info)["offset"])),
        )  # in the newest input's order: each of its files read once, from start to end
        for info in copies:
            state = dict(_state(info))
            state["offset"] = self._copy(str(state["relative_path"]), int(state["offset"]), int(state["length"]))
            info.__setstate__(state)
        fields["storage_data"] = storage
        fields["state_dict_metadata"] = {n: md for n, md in fields["state_dict_metadata"].items() if n in keep}
        if isinstance(fields.get("planner_data"), dict):
            fields["planner_data"] = {n: p for n, p in fields["planner_data"].items() if n in keep}
        self._point_at_output(fields.get("storage_meta"))
        self.save.metadata.__setstate__(fields)
        pkl = io.BytesIO()
        _MetadataPickler(pkl, protocol=4).dump(self.save.metadata)
        with open(self.folder / METADATA, "wb") as f:
            f.write(pkl.getvalue())
            f.flush()
            if self.durable:
                os.fsync(f.fileno())
        for fd in self._fds.values():
            if self.durable:
                os.fsync(fd)
        self.abort()
        self.bytes_written = sum(self._ends.values()) + len(pkl.getvalue())

    def _point_at_output(self, meta: Any) -> None:
        """StorageMeta.checkpoint_id, the folder DCP wrote (a pathlib path, or text): the output's own."""
        if isinstance(meta, Opaque) and isinstance(meta._opaque_state, dict):
            where = meta._opaque_state.get("checkpoint_id")
            if isinstance(where, Opaque) and where._opaque_called:
                object.__setattr__(where, "_opaque_args", (str(self.out),))
            elif isinstance(where, str):
                meta._opaque_state["checkpoint_id"] = str(self.out)

    def _copy(self, file: str, offset: int, length: int) -> int:
        """An item of the newest input copied byte for byte to the end of the output file of the same name; its new offset."""
        source = self.save.folder / file
        fd, start = self._fd(file), self._ends[file]
        done = 0
        while done < length:
            piece = os.pread(FILES.fd(source), min(COPY_PIECE, length - done), offset + done)
            if not piece:
                raise InputError(source, f"truncated: an item ends at byte {offset + length}, past the end of the file")
            view, at = memoryview(piece), start + done
            while len(view):
                n = os.pwrite(fd, view, at)
                view, at = view[n:], at + n
            done += len(piece)
        self._ends[file] = start + length
        return start

    def abort(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def verify_dcp_same(folder: Path, out: Path, specs: list[TensorSpec], crcs: dict[str, int], key: str | None) -> dict[str, str]:
    """--verify for a DCP output: its `.metadata` and chunks read back from the disk with ckptavg's own DCP reader,
    each merged tensor checked against the CRC-32 of the bytes written. Returns the sha256 of every file."""
    try:
        entries, _ = read_metadata(folder)
        open_dcp(folder, folder, key)  # it opens as an input again, its model's entries found as in the inputs
    except InputError as e:
        raise OutputError(out, f"verification failed: the output does not read back ({e.problem})") from e
    files = sorted(p for p in folder.iterdir() if p.is_file())
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # written and fsynced: read back from the disk
        finally:
            os.close(fd)
    names = {spec.name: name for spec, name in zip(specs, _placed_names(entries, specs))}
    blobs: dict = {}
    for spec in specs:
        entry = entries.get(names[spec.name]) if names[spec.name] is not None else None
        if entry is None:
            raise OutputError(out, f"verification failed: tensor {spec.name} is missing from the output's .metadata")
        if entry.dtype_name != dtype_name(spec.dtype) or entry.size != tuple(spec.shape):
            raise OutputError(
                out,
                f"verification failed: {spec.name} reads back as {entry.dtype_name} {list(entry.size)}, written as "
                f"{dtype_name(spec.dtype)} {list(spec.shape)}",
            )
        try:
            crc = _crc_of(tensor_source(folder, entry, blobs))
        except InputError as e:
            raise OutputError(out, f"verification failed: {spec.name} does not read back ({e.problem})") from e
        if crc != crcs[spec.name]:
            raise OutputError(
                out,
                f"verification failed: {spec.name} reads back different bytes than were written (CRC-32 {crc:08x}, "
                f"expected {crcs[spec.name]:08x})",
            )
    return {path.name: sha256_of(path) for path in files}


def _placed_names(entries: dict[str, Entry | None], specs: list[TensorSpec]) -> list[str | None]:
    prefix = _prefix(entries, [spec.name for spec in specs])
    return [None if prefix is None else prefix + spec.name for spec in specs]


def _crc_of(source: TensorSource) -> int:
    """The CRC-32 of a tensor's bytes in row order, read piece by piece where the source reads by range."""
    if not source.reads_by_range:
        whole = source.read().contiguous()  # held here: the memoryview does not keep the tensor alive
        return zlib.crc32(tensor_buffer(whole))
    crc, done = 0, 0
    while done < source.nbytes:
        piece = bytearray(min(COPY_PIECE, source.nbytes - done))
        source.read_bytes(done, memoryview(piece))
        crc = zlib.crc32(piece, crc)
        done += len(piece)
    return crc
