"""DCP's Hugging Face sharded layout: a folder of `shard-R-model-i-of-n.safetensors` files and no index.

`HuggingFaceStorageWriter(path, save_distributed=True)` (torchtitan's HF saves, NeMo Automodel) has every rank
write its own part of each tensor into plain safetensors files; each header's `__metadata__` holds
`DCP_SHARDING_INFO`, where each part lies in the global tensor (`saved_offsets`). A tensor's global shape is
the largest offset + part shape over the files, and its parts must tile it: parts that overlap or leave a gap
(a rank's file lost, a stale file of another save) are refused. Rows are read by byte range from the parts,
other cuts put together in memory one tensor at a time, as for a `.distcp` save (formats/dcp.py).

A rank's file alone holds only a part of each tensor: given as a file, it is refused.
"""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path

from ckptavg.errors import InputError, UsageError, option
from ckptavg.formats.base import Checkpoint
from ckptavg.formats.dcp import SHARDING_INFO, Blob, Chunk, Entry, read_blob, tensor_source
from ckptavg.formats.detect import weight_files_in
from ckptavg.formats.dtypes import SAFETENSORS, itemsize
from ckptavg.formats.safetensors_io import MAX_HEADER

SHARD_FILE = re.compile(r"shard-(\d+)-model-(\d+)-of-(\d+)\.safetensors")
SHARDED_DIR = "sharded"  # where enable_consolidation=True leaves the parts, beside the consolidated files


def dcp_hf_folder(path: Path) -> Path | None:
    """The folder of shard files an input stands for: itself when its weight files are all shard files, or its
    `sharded/` when it holds no weights of its own (the consolidated files, when present, are read instead)."""
    for folder in (path, path / SHARDED_DIR):
        if not folder.is_dir():
            return None
        files = weight_files_in(folder)
        if files:
            return folder if all(SHARD_FILE.fullmatch(f.name) for f in files) else None
    return None


def refuse_lone_shard(path: Path) -> None:
    """A safetensors file whose header places its tensors in larger ones (DCP_SHARDING_INFO) is one rank's part
    of a save: averaging it alone would write tensors with rows or columns missing."""
    with open(path, "rb") as f:
        head = f.read(9)
        if head[8:9] != b"{" or struct.unpack("<Q", head[:8])[0] > MAX_HEADER:
            return  # not safetensors, or corrupt: the reader says so
        raw = f.read(struct.unpack("<Q", head[:8])[0])
    if SHARDING_INFO.encode() not in raw:  # the usual file: no JSON parsed twice
        return
    blob = read_blob(path)
    if blob.saved_offsets is None:
        return
    # HuggingFaceStorageWriter without save_distributed writes whole tensors at offset 0 (with an index)
    moved = any(any(o) for o in blob.saved_offsets.values())
    if SHARD_FILE.fullmatch(path.name) or moved:
        raise InputError(
            path,
            f"one rank's part of a DCP Hugging Face sharded save (its header has {SHARDING_INFO}): "
            f"it holds a part of each tensor; pass its folder {path.parent} instead",
        )


def open_dcp_hf(path: Path, folder: Path, key: str | None = None, use_ema: bool = False) -> Checkpoint:
    """Every tensor of a folder of DCP-HF shard files, its parts checked to tile it."""
    if key or use_ema:
        raise UsageError(
            path,
            f"{option('key')} and {option('use_ema', True)} apply to PyTorch pickles; DCP's shard files hold one set of tensors",
        )
    files = sorted(folder.glob("*.safetensors"))
    names = [m for f in files if (m := SHARD_FILE.fullmatch(f.name))]
    counts = {m.group(3) for m in names}
    if len(counts) > 1:
        shown = ", ".join(f"-of-{n}" for n in sorted(counts))
        raise InputError(folder, f"shard files of different saves ({shown}): keep the files of one save")
    blobs: dict[tuple[Path, int], Blob] = {}
    entries: dict[str, Entry] = {}
    for file in files:
        blob = blobs[(file, 0)] = read_blob(file)
        if blob.saved_offsets is None:
            raise InputError(file, f"named like a DCP shard file, but its header has no {SHARDING_INFO}")
        for name, found in blob.header.items():
            dtype_name, shape = SAFETENSORS[found["dtype"]], tuple(found["shape"])
            entry = entries.setdefault(name, Entry(name, dtype_name, (), []))
            if dtype_name != entry.dtype_name or (entry.chunks and len(shape) != len(entry.chunks[0].sizes)):
                first = entry.chunks[0]
                raise InputError(
                    folder,
                    f"{name}: its parts disagree: {dtype_name} {list(shape)} in {file.name}, "
                    f"{entry.dtype_name} {list(first.sizes)} in {first.file}",
                )
            nbytes = math.prod(shape) * itemsize(dtype_name)
            entry.chunks.append(Chunk(blob.saved_offsets[name], shape, file.name, 0, nbytes))
    for entry in entries.values():  # the global shape: as far as the parts reach in each dimension
        dims = range(len(entry.chunks[0].sizes))
        entry.size = tuple(max(c.offsets[d] + c.sizes[d] for c in entry.chunks) for d in dims)
    tensors = {name: tensor_source(folder, entry, blobs) for name, entry in entries.items()}
    ranks = {m.group(1) for m in names}
    parts = max((len([c for c in e.chunks if math.prod(c.sizes)]) for e in entries.values()), default=1)
    notes = [
        f"torch.distributed.checkpoint Hugging Face sharded save (HuggingFaceStorageWriter, save_distributed): "
        f"{len(files)} shard file(s) of {len(ranks)} rank(s), tensors in up to {parts} part(s)"
    ]
    return Checkpoint(path=path, format=f"dcp-hf ({len(files)} shard files)", tensors=tensors, files=files, notes=notes)
