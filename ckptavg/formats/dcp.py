"""torch.distributed.checkpoint (DCP) folders, read lazily and without torch.distributed.

A DCP save is a folder with `.metadata` (a plain pickle: every entry's global size, dtype and the chunks
the ranks saved) and `__R_i.distcp` files in which each chunk is a complete `torch.save` archive at a byte
range, or, with `serialization_format=SAFETENSORS`, a tensor of the one safetensors blob that ends the file
(the chunk's offset is where the blob starts). `.metadata` is read with an unpickler that knows only DCP's
metadata classes (as inert records) and refuses any other global as hostile. A tensor whose chunks are
row blocks (FSDP's `Shard(0)`, uneven and empty shards included) is read by byte range from the chunks, like
any stored tensor; one cut otherwise (tensor-parallel columns, 2-D meshes) is put together in memory, one
tensor at a time. Non-tensor entries (optimizer param groups, train state) are never unpickled, and optimizer
tensors never read.
"""

from __future__ import annotations

import errno
import io
import json
import math
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptavg.errors import HostileInputError, InputError, UnsupportedError, option
from ckptavg.formats.base import (
    Checkpoint,
    ComputedSource,
    ExtentSource,
    TensorSource,
    contiguous_strides,
    read_exact,
    tensor_buffer,
)
from ckptavg.formats.dtypes import ALIASES, DTYPES, SAFETENSORS, itemsize, to_torch
from ckptavg.formats.safetensors_io import read_header
from ckptavg.formats.unpickle import DTypeRef, HostilePickleError, Opaque, RestrictedUnpickler, StorageRef, TensorRef, _opaque

if TYPE_CHECKING:
    import torch

METADATA = ".metadata"
MD = "torch.distributed.checkpoint.metadata"
ALLOWED = {
    (MD, "Metadata"),
    (MD, "TensorStorageMetadata"),
    (MD, "ChunkStorageMetadata"),
    (MD, "BytesStorageMetadata"),
    (MD, "TensorProperties"),
    (MD, "_MEM_FORMAT_ENCODING"),
    (MD, "StorageMeta"),
    (MD, "MetadataIndex"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed._shard.sharded_tensor.metadata", "TensorProperties"),
    ("torch.distributed._shard.sharded_tensor.metadata", "MEM_FORMAT_ENCODING"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("pathlib._local", "PosixPath"),
    ("pathlib._local", "WindowsPath"),
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreMetadata"),
}
# Entries of a training save that are not the model's (torchtitan, the DCP tutorial's app.optim, accelerate)
NOT_MODEL = (
    "optimizer.",
    "optim.",
    "app.optim.",
    "lr_scheduler.",
    "scheduler.",
    "dataloader.",
    "train_state",
    "rng",
    "extra_state",
)
MODEL_PREFIXES = (
    ("app.model.", "the DCP tutorial's app.model."),
    ("model.", "model. (accelerate, older torchtitan)"),
    ("module.", "module. (NeMo 2)"),
)


def _no_storage(*_: Any) -> StorageRef:
    raise pickle.UnpicklingError("a .metadata holds no storages")


class MetadataUnpickler(RestrictedUnpickler):
    """`.metadata`: DCP's own classes become inert records; any other global is refused as hostile."""

    def __init__(self, file: Any) -> None:
        super().__init__(file, storage_ref=_no_storage)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED:
            return _opaque(module, name)
        if (module, name) == ("torch", "Size") or (module == "torch" and (name in DTYPES or name in ALIASES)):
            return super().find_class(module, name)
        if (module, name) in (
            ("collections", "OrderedDict"),
            ("builtins", "tuple"),
            ("builtins", "list"),
            ("builtins", "dict"),
            ("builtins", "set"),
        ):
            return super().find_class(module, name)
        raise HostilePickleError(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("a .metadata holds no persistent ids")


def _state(obj: Any) -> dict:
    """The fields of a dataclass record (a placeholder's pickled state)."""
    if not isinstance(obj, Opaque):
        raise InputError(None, f"corrupt .metadata: {type(obj).__name__} where a DCP record belongs")
    state = obj._opaque_state
    if isinstance(state, tuple) and len(state) == 2:  # (__dict__, __slots__ state)
        state = {**(state[0] or {}), **(state[1] or {})}
    return state if isinstance(state, dict) else {}


def _ints(value: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in value)


@dataclass
class Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    offset: int
    length: int
    transforms: tuple[str, ...] = ()


@dataclass
class Entry:
    name: str
    dtype_name: str
    size: tuple[int, ...]
    chunks: list[Chunk]


SHARDING_INFO = "DCP_SHARDING_INFO"


@dataclass
class Blob:
    """A safetensors blob written by DCP (a `.distcp` file's tail, a DCP-HF shard file): its header's tensor
    entries, the offset of its data in the file, and where each tensor lies in the global one (DCP_SHARDING_INFO;
    None when the header has none)."""

    header: dict[str, dict]
    data_start: int
    saved_offsets: dict[str, tuple[int, ...]] | None


def read_blob(path: Path, start: int = 0) -> Blob:
    header, metadata, data_start = read_header(path, start)
    if SHARDING_INFO not in metadata:
        return Blob(header, data_start, None)
    bad = InputError(
        path, f"corrupt {SHARDING_INFO} in the safetensors header: expected JSON of name -> {{'saved_offsets': [...]}}"
    )
    try:
        info = json.loads(metadata[SHARDING_INFO])
        offsets = {name: tuple(value["saved_offsets"]) for name, value in info.items()}
    except (TypeError, ValueError, KeyError, AttributeError, RecursionError) as e:
        raise bad from e
    if not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for v in offsets.values() for o in v):
        raise bad
    for name, entry in header.items():
        if name not in offsets or len(offsets[name]) != len(entry["shape"]):
            raise InputError(path, f"corrupt {SHARDING_INFO} in the safetensors header: no place for {name} {entry['shape']}")
    return Blob(header, data_start, offsets)


def is_dcp(path: Path) -> bool:
    return (path / METADATA).is_file() or any(path.glob("__*.metadata"))


def dcp_folder(path: Path) -> Path | None:
    """The DCP folder an input stands for: itself, or accelerate's `pytorch_model_fsdp_0/`, NeMo 2's `weights/`."""
    if is_dcp(path):
        return path
    for name in ("pytorch_model_fsdp_0", "model_fsdp_0", "weights"):
        if (path / name).is_dir() and is_dcp(path / name):
            return path / name
    return None


def read_metadata(folder: Path) -> tuple[dict[str, Entry | None], dict[str, int]]:
    """Every entry of a DCP save (a tensor Entry, or None for a non-tensor entry, never unpickled), and how
    long each data file must be to hold every item the metadata puts in it."""
    files = [folder / METADATA] if (folder / METADATA).is_file() else sorted(folder.glob("__*.metadata"))
    entries: dict[str, Entry | None] = {}
    ends: dict[str, int] = {}
    for path in files:
        try:
            with open(path, "rb") as f:
                metadata = MetadataUnpickler(f).load()
        except HostilePickleError as e:
            raise HostileInputError(
                path, f"hostile .metadata: it names {e.qualname}, which DCP metadata never holds; refused, nothing was run"
            ) from e
        except (
            pickle.UnpicklingError,
            EOFError,
            ValueError,
            TypeError,
            AttributeError,
            IndexError,
            KeyError,
            struct.error,
            UnicodeDecodeError,
            RecursionError,
            MemoryError,
        ) as e:
            raise InputError(path, f"corrupt DCP metadata ({type(e).__name__}: {str(e)[:200]})") from e
        try:
            entries.update(_entries(metadata, ends))
        except InputError as e:
            raise InputError(path, e.problem) from e
    return entries, ends


def _entries(metadata: Any, ends: dict[str, int]) -> dict[str, Entry | None]:
    fields = _state(metadata)
    storage: dict[tuple[str, tuple[int, ...] | None], Any] = {}
    for index, info in (fields.get("storage_data") or {}).items():
        key = _state(index)
        offset = key.get("offset")
        info = _state(info)
        storage[(key.get("fqn"), _ints(offset) if offset is not None else None)] = info
        file = str(info.get("relative_path"))
        ends[file] = max(ends.get(file, 0), int(info.get("offset", 0)) + int(info.get("length", 0)))
    entries: dict[str, Entry | None] = {}
    for name, md in (fields.get("state_dict_metadata") or {}).items():
        if not isinstance(md, Opaque) or not md._global.endswith("TensorStorageMetadata"):
            entries[name] = None  # bytes: optimizer param groups, train state, ...; never unpickled
            continue
        tensor = _state(md)
        properties = tensor.get("properties")
        dtype = (
            _state(properties).get("dtype")
            if isinstance(properties, Opaque) and isinstance(properties._opaque_state, dict)
            else None
        )
        if dtype is None and isinstance(properties, Opaque) and isinstance(properties._opaque_state, tuple):
            dtype = properties._opaque_state[0]  # TensorProperties.__getstate__: (dtype, layout, ...)
        if not isinstance(dtype, DTypeRef):
            raise InputError(None, f"corrupt .metadata: no dtype for {name}")
        chunks = []
        for chunk in tensor.get("chunks") or []:
            c = _state(chunk)
            offsets, sizes = _ints(c["offsets"]), _ints(c["sizes"])
            info = storage.get((name, offsets))
            if info is None:
                raise InputError(None, f"corrupt .metadata: the chunk of {name} at {list(offsets)} has no storage entry")
            transforms = tuple(str(t) for t in (info.get("transform_descriptors") or ()))
            chunks.append(Chunk(offsets, sizes, str(info["relative_path"]), int(info["offset"]), int(info["length"]), transforms))
        entries[name] = Entry(name, dtype.name, _ints(tensor["size"]), chunks)
    return entries


def model_entries(entries: dict[str, Entry | None], key: str | None) -> tuple[dict[str, Entry], str, str]:
    """(the model's tensors by their own names, the prefix removed, which producer's layout that is)."""
    tensors = {n: e for n, e in entries.items() if e is not None}
    if key:
        prefix = key.rstrip(".") + "."
        chosen = {n[len(prefix) :]: e for n, e in tensors.items() if n.startswith(prefix)}
        return chosen, prefix, option("key")
    model = {n: e for n, e in tensors.items() if not n.startswith(NOT_MODEL)}
    for prefix, producer in MODEL_PREFIXES:
        if model and all(n.startswith(prefix) for n in model):
            return {n[len(prefix) :]: e for n, e in model.items()}, prefix, producer
    return model, "", "top-level names (torchtitan, FSDP2's get_model_state_dict)"


class _Slice(io.RawIOBase):
    """A read-only file view of bytes [start, start + length) of a file: one chunk's torch.save archive."""

    def __init__(self, path: Path, start: int, length: int) -> None:
        self.path, self.start, self.length, self.pos = path, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        pos = {0: 0, 1: self.pos, 2: self.length}[whence] + offset
        if pos < 0:  # as a file does: zipfile then knows the range is too short for an archive
            raise OSError(errno.EINVAL, "seek before the start of the item")
        self.pos = pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), self.length - self.pos))
        view = memoryview(buffer).cast("B")[:n]
        if n:
            read_exact(self.path, self.start + self.pos, view)
        self.pos += n
        return n


def _chunk_location(path: Path, archive: Any, base: int, name: str, dtype_name: str) -> tuple[int, tuple[int, ...]]:
    """(byte offset in `path` of the chunk's first element, its shape), from the archive's data.pkl and zip headers."""
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as e:
        raise InputError(path, f"corrupt DCP chunk of {name}: neither a torch.save archive nor safetensors ({e})") from e
    with zf:
        pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
        if len(pkl) != 1:
            raise InputError(path, f"corrupt DCP chunk of {name}: not a torch.save archive")
        refs: dict[str, StorageRef] = {}

        def storage(key: str, dt: str, numel: int) -> StorageRef:
            refs[key] = StorageRef(key, dt, numel * itemsize(dt))
            return refs[key]

        ref = RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), storage).load()
        if not isinstance(ref, TensorRef):
            raise InputError(path, f"corrupt DCP chunk of {name}: it holds a {type(ref).__name__}, not a tensor")
        record = f"{pkl[0].rsplit('/', 1)[0]}/data/{ref.storage.key}"
        info = zf.getinfo(record)
        if info.compress_type != zipfile.ZIP_STORED:
            raise InputError(path, f"corrupt DCP chunk of {name}: compressed storage")
        archive.seek(info.header_offset)
        header = archive.read(30)
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        data = info.header_offset + 30 + name_len + extra_len
    contiguous = all(st == want for st, want, size in zip(ref.stride, contiguous_strides(ref.shape), ref.shape) if size != 1)
    size = itemsize(dtype_name)
    if not contiguous or itemsize(ref.storage.dtype_name) != size:
        raise InputError(path, f"corrupt DCP chunk of {name}: not a contiguous torch.{dtype_name} tensor")
    if (ref.offset + math.prod(ref.shape)) * size > info.file_size:
        raise InputError(path, f"corrupt DCP chunk of {name}: its storage is shorter than the chunk")
    return base + data + ref.offset * size, ref.shape


def _safetensors_at(path: Path, offset: int) -> bool:
    """Whether safetensors bytes start at `offset`: JSON after the 8-byte header length (a zip has its
    compression method there)."""
    head = bytearray(9)
    read_exact(path, offset, memoryview(head))
    return head[8:9] == b"{"


def _item_location(path: Path, chunk: Chunk, entry: Entry, blobs: dict[tuple[Path, int], Blob]) -> tuple[int, tuple[int, ...]]:
    """(byte offset in `path` of the chunk's first element, its shape), whichever way the item was serialized:
    a torch.save archive (it starts with a zip header), or a tensor of the safetensors blob that starts there
    (`blobs` keeps each blob's header, parsed once)."""
    if not _safetensors_at(path, chunk.offset):
        return _chunk_location(path, _Slice(path, chunk.offset, chunk.length), chunk.offset, entry.name, entry.dtype_name)
    if (path, chunk.offset) not in blobs:
        blobs[(path, chunk.offset)] = read_blob(path, chunk.offset)
    blob = blobs[(path, chunk.offset)]
    found = blob.header.get(entry.name)
    if found is None:
        raise InputError(path, f"corrupt DCP item: the safetensors data at byte {chunk.offset} holds no {entry.name}")
    shape, dtype_name = tuple(found["shape"]), SAFETENSORS[found["dtype"]]
    placed = blob.saved_offsets.get(entry.name) if blob.saved_offsets is not None else None
    if dtype_name != entry.dtype_name or shape != chunk.sizes or (placed is not None and placed != chunk.offsets):
        raise InputError(
            path,
            f"corrupt DCP item: {entry.name} is {dtype_name} {list(shape)} at {list(placed or ())} "
            f"in the safetensors data, the metadata says {entry.dtype_name} {list(chunk.sizes)} at {list(chunk.offsets)}",
        )
    return blob.data_start + found["data_offsets"][0], shape


def _check_tiling(folder: Path, entry: Entry) -> None:
    """The chunks must tile the tensor: inside it, no two overlapping, their volumes adding up to its size."""
    total = 0
    for c in entry.chunks:
        if (
            len(c.offsets) != len(entry.size)
            or len(c.sizes) != len(entry.size)
            or any(o < 0 or o + s > d for o, s, d in zip(c.offsets, c.sizes, entry.size))
        ):
            raise InputError(
                folder,
                (
                    f"{entry.name}: a chunk at {list(c.offsets)} of size {list(c.sizes)} lies outside the tensor's "
                    f"{list(entry.size)}"
                ),
            )
        total += math.prod(c.sizes)
    boxes = [c for c in entry.chunks if math.prod(c.sizes)]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            if all(ao < bo + bs and bo < ao + as_ for ao, as_, bo, bs in zip(a.offsets, a.sizes, b.offsets, b.sizes)):
                raise InputError(folder, f"{entry.name}: chunks at {list(a.offsets)} and {list(b.offsets)} overlap")
    if total != math.prod(entry.size):
        raise InputError(folder, f"{entry.name}: its chunks cover {total} of its {math.prod(entry.size)} elements (a gap)")


def tensor_source(folder: Path, entry: Entry, blobs: dict[tuple[Path, int], Blob]) -> TensorSource:
    """Row blocks: the chunks' bytes in row order, read by range. Other cuts: put together in memory.
    `blobs` holds the safetensors headers parsed so far, shared by the tensors of one checkpoint."""
    _check_tiling(folder, entry)
    for c in entry.chunks:
        if c.transforms and c.transforms != ("stream.zstd/1",):
            raise UnsupportedError(
                folder / c.file,
                f"{entry.name} is stored with the transform {', '.join(c.transforms)}, which ckptavg does not read",
            )
    chunks = [c for c in entry.chunks if math.prod(c.sizes)]
    rows = all(c.sizes[1:] == entry.size[1:] for c in chunks)
    if rows and not any(c.transforms for c in chunks):
        extents = []
        for c in sorted(chunks, key=lambda c: c.offsets[0] if c.offsets else 0):
            path = folder / c.file
            start, shape = _item_location(path, c, entry, blobs)
            if tuple(shape) != c.sizes:
                raise InputError(
                    path, f"corrupt DCP chunk of {entry.name}: shape {list(shape)}, the metadata says {list(c.sizes)}"
                )
            extents.append((path, start, math.prod(c.sizes) * itemsize(entry.dtype_name)))
        return ExtentSource.of(extents, entry.dtype_name, entry.size)
    return ComputedSource(
        path=folder / chunks[0].file,
        offset=0,
        dtype_name=entry.dtype_name,
        shape=entry.size,
        compute=lambda: _assemble(folder, entry, blobs),
    )


def _assemble(folder: Path, entry: Entry, blobs: dict[tuple[Path, int], Blob]) -> torch.Tensor:
    import torch

    dtype, size = to_torch(entry.dtype_name), itemsize(entry.dtype_name)
    full = torch.empty(entry.size, dtype=dtype)
    for c in entry.chunks:
        if not math.prod(c.sizes):
            continue
        path = folder / c.file
        if c.transforms:
            archive: Any = io.BytesIO(_zstd(path, c))
            start, shape = _chunk_location(path, archive, 0, entry.name, entry.dtype_name)
            raw = torch.frombuffer(bytearray(archive.getbuffer()[start : start + math.prod(shape) * size]), dtype=torch.uint8)
        else:
            start, shape = _item_location(path, c, entry, blobs)
            raw = torch.empty(math.prod(shape) * size, dtype=torch.uint8)
            if raw.numel():
                read_exact(path, start, tensor_buffer(raw))
        block = raw.view(dtype).reshape(shape)
        full[tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes))] = block
    return full


def _zstd(path: Path, chunk: Chunk) -> bytes:
    try:
        import zstandard
    except ImportError as e:
        raise UnsupportedError(
            path, "zstd-compressed DCP items (stream.zstd/1): install the zstandard package (pip install 'ckptavg[zstd]')"
        ) from e
    raw = bytearray(chunk.length)
    read_exact(path, chunk.offset, memoryview(raw))
    try:
        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(bytes(raw))).read()
    except zstandard.ZstdError as e:
        raise InputError(path, f"corrupt zstd item: {e}") from e


def open_dcp(path: Path, folder: Path, key: str | None = None) -> Checkpoint:
    """One DCP save as a checkpoint of the model's tensors (chosen by producer, or `key`)."""
    entries, ends = read_metadata(folder)
    model, prefix, producer = model_entries(entries, key)
    if not model:
        raise InputError(
            folder,
            f"no model tensors in this DCP save{f' under {key!r}' if key else ''}; entries: {', '.join(list(entries)[:5])}",
        )
    for name, end in sorted(ends.items()):
        file = folder / name
        if file.parent != folder or name in ("", ".", ".."):
            raise InputError(folder / METADATA, f"names the data file {name!r}, outside the checkpoint folder")
        if not file.is_file():
            raise InputError(file, "missing: the DCP metadata names it (a rank's file lost, or an incomplete copy)")
        if file.stat().st_size < end:
            raise InputError(file, f"truncated: the metadata puts items up to byte {end}, the file has {file.stat().st_size}")
    files = sorted({folder / c.file for e in model.values() for c in e.chunks})
    blobs: dict[tuple[Path, int], Blob] = {}
    tensors = {name: tensor_source(folder, entry, blobs) for name, entry in model.items()}
    sharded = max((len([c for c in e.chunks if math.prod(c.sizes)]) for e in model.values()), default=1)
    first = next((c for e in model.values() for c in e.chunks if math.prod(c.sizes) and not c.transforms), None)
    as_safetensors = first is not None and _safetensors_at(folder / first.file, first.offset)
    serialized = " (items serialized as safetensors)" if as_safetensors else ""
    taken = {prefix + name for name in model}
    others = [n for n in entries if n not in taken]
    notes = [
        f"torch.distributed.checkpoint: {len(list(folder.glob('*.distcp')))} .distcp file(s){serialized}, "
        f"tensors in up to {sharded} chunk(s); model entries: {producer}"
        + (f"; {len(others)} other entries (optimizer, train state) not read" if others else "")
    ]
    return Checkpoint(
        path=path,
        format="dcp",
        tensors=tensors,
        files=[folder / METADATA, *files] if (folder / METADATA).is_file() else files,
        notes=notes,
        weights_from=f"model entries {prefix + '*' if prefix else '(top level)'}: {producer}",
    )
