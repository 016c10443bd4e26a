"""out_format="same" for DeepSpeed ZeRO 1/2/3 saves: the merge written back as the newest input's save.

The output is the newest input's folder again: `latest` and `global_stepN/` (a run folder or a Trainer
`checkpoint-N/`), or the `global_stepN/` files alone when that folder was the input. Every `*_model_states.pt` and
`*_optim_states.pt` of the newest input is rewritten from the restricted unpickler's inert view of it, as
pickle_same.py rewrites a pickle: its entries kept, types included, and its storages copied byte for byte, except
where the weights are. The merged FP32 masters go into every rank's flat optimizer partitions, at each parameter's
slice (ZeRO-1/2: the ranks' partitions of a group concatenated; ZeRO-3: ceil(numel / world) elements at one offset
in every rank's partition); the padding between and after them is the input's. The model states get the 16-bit
module copies (ZeRO-1/2: the merged FP32 value rounded to the module's dtype, as DeepSpeed makes them from its
masters), the frozen parameters and the buffers (ZeRO-3: in every rank's file). With training_state="newest" the
Adam moments, loss scaler and scheduler of the newest input are kept, so `engine.load_checkpoint(OUT)` resumes
from the merge at the same world size; "drop" leaves out the moments and the scheduler state: the output then
loads with `engine.load_checkpoint(OUT, load_optimizer_states=False, load_lr_scheduler_states=False)`. "drop" keeps
the optimizer states files with their masters: under ZeRO-3 they are the only place of the weights (DeepSpeed's
weights-only load reads them through zero_to_fp32), and zero_to_fp32 and ckptavg read the output as any save.

Each output file is a zip written record by record. A storage that holds weights is written while the engine hands
the merged tensors over: the bytes before a parameter's slice are copied from the input, then the merged values,
and so on. The engine hands tensors in the order of the flat partitions (param_shapes order), so every file is
written front to back and nothing is buffered: memory is the engine's chunk (plus its 16-bit rounding) and one
copy piece, whatever the model size. A save whose storages would need the tensors in another order is refused
before anything is written.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ckptavg.errors import InputError, OutputError, UnsupportedError, UsageError, option
from ckptavg.formats.base import FILES, Checkpoint, ExtentSource, TensorSource, tensor_buffer
from ckptavg.formats.deepspeed import MODEL_STATES, OPTIM_STATES, natural_key, open_deepspeed, save_folder
from ckptavg.formats.detect import is_training_file, weight_names
from ckptavg.formats.dtypes import dtype_name, itemsize, to_torch
from ckptavg.formats.inert_pickler import InertPickler
from ckptavg.formats.torch_io import PickleFile, as_dict
from ckptavg.formats.torch_writer import TorchWriter
from ckptavg.formats.unpickle import TensorRef
from ckptavg.formats.writer import TensorSpec
from ckptavg.merge.plan import short_dtype_name
from ckptavg.verify import sha256_of

KIND = "same-deepspeed"
COPY_PIECE = 4 << 20
# What training_state="drop" leaves out: the Adam moments of the optimizer states (ZeRO-1/2, ZeRO-3), and the
# model states' scheduler state (set to None: DeepSpeed reads the entry only when asked to load the scheduler)
DROPPED_MOMENTS = {2: "base_optimizer_state", 1: "base_optimizer_state", 3: "optimizer_state_dict"}
DROPPED_SCHEDULER = "lr_scheduler"
SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")  # DeepSpeed's recovery scripts, copied beside the save in any case
OTHER_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".tar", ".gguf", ".zip", ".pkl", ".npz", ".h5")


def is_deepspeed(ckpt: Checkpoint) -> bool:
    return ckpt.format.startswith("deepspeed")


def same_deepspeed_layout(newest: Checkpoint) -> tuple[str, bool] | None:
    """(kind, single file) of an out_format="same" output when the newest input is a DeepSpeed save: a folder."""
    return (KIND, False) if is_deepspeed(newest) else None


@dataclass(frozen=True)
class Placement:
    """Elements [first, first + count) of one output tensor, at byte `offset` of storage `key` of `file` (an input
    file of the newest save; the output file of the same name gets them), in dtype `dtype_name`."""

    file: Path
    key: str
    offset: int
    dtype_name: str
    first: int
    count: int

    @property
    def nbytes(self) -> int:
        return self.count * itemsize(self.dtype_name)


@dataclass
class ZeroLayout:
    """Where the weights of the newest save go: each output tensor's placements, in the order the engine writes."""

    tag: Path  # the global_stepN/ folder
    stage: int
    files: list[Path]  # model states, then optimizer states, by natural order
    placements: dict[str, list[Placement]] = field(default_factory=dict)

    @property
    def world(self) -> int:
        return len(self.optim_files)

    @property
    def optim_files(self) -> list[Path]:
        return [f for f in self.files if f.match(OPTIM_STATES)]


def _files(tag: Path) -> list[Path]:
    model = sorted(tag.glob(MODEL_STATES), key=natural_key)
    return model + sorted(tag.glob(OPTIM_STATES), key=natural_key)


def _storage_at(pickle_file: PickleFile, offset: int, nbytes: int) -> tuple[str, int]:
    """The storage record holding bytes [offset, offset + nbytes) of the file, and where they start in it."""
    for key, start in pickle_file.storage_offsets.items():
        if start <= offset and offset + nbytes <= start + pickle_file.storage_sizes[key]:
            return key, offset - start
    raise InputError(pickle_file.path, f"no storage holds bytes {offset}..{offset + nbytes}")


def _source_placements(src: TensorSource, pickles: dict[Path, PickleFile]) -> list[Placement]:
    """Where the reader found a tensor: its byte ranges, as (storage, offset) of their files."""
    if isinstance(src, ExtentSource):
        extents = list(src.extents)
    elif src.contiguous:
        extents = [(src.path, src.offset, src.nbytes)]
    else:
        raise UnsupportedError(src.path, "holds a weight saved as a strided view; not written back in this layout")
    placements, first = [], 0
    for path, offset, length in extents:
        key, at = _storage_at(pickles[path], offset, length)
        placements.append(Placement(path, key, at, src.dtype_name, first, length // src.itemsize))
        first += length // src.itemsize
    return placements


def _module_placements(ds_name: str, numel: int, pickles: dict[Path, PickleFile], model_files: list[Path]) -> list[Placement]:
    """The module's copies of a tensor in every model states file (ZeRO-3 parameters are empty there: none)."""
    placements = []
    for path in model_files:
        module = as_dict((as_dict(pickles[path].obj) or {}).get("module")) or {}
        ref = module.get(ds_name)
        if not isinstance(ref, TensorRef) or numel == 0 or math.prod(ref.shape) != numel:
            continue
        src = pickles[path].source(ref, ds_name)
        if not src.contiguous:
            raise UnsupportedError(path, f"holds {ds_name} as a strided view; not written back in this layout")
        placements.append(Placement(path, ref.storage.key, ref.offset * src.itemsize, ref.dtype_name, 0, numel))
    return placements


def zero_layout(newest: Checkpoint, specs: list[TensorSpec]) -> ZeroLayout:
    """Every output tensor's places in the newest save, checked to be writable front to back in the engine's order.

    The newest input is opened again with DeepSpeed's own names (the checkpoint's may have had prefixes stripped);
    a name of the output stands for every DeepSpeed name read from the same bytes (a tied weight and its twin)."""
    tag = save_folder(newest.path)
    assert tag is not None
    raw = open_deepspeed(newest.path, tag)
    files = _files(tag)
    pickles = {path: PickleFile(path) for path in files}
    model_files = [f for f in files if f.match(MODEL_STATES)]
    names: dict[Any, list[str]] = {}
    for ds_name, src in raw.tensors.items():
        names.setdefault(src.alias_key, []).append(ds_name)
    layout = ZeroLayout(tag, int(raw.format.rsplit("-", 1)[1]), files)
    if len(model_files) != (layout.world if layout.stage == 3 else 1):
        raise UnsupportedError(
            tag,
            f"holds {len(model_files)} model states files for ZeRO-{layout.stage} on {layout.world} rank(s) (tensor or "
            f"pipeline parallel): not written back in its layout; leave out {option('out_format', 'same')}",
        )
    claimed: dict[tuple[Path, str], list[tuple[int, int, Placement]]] = {}
    for spec in specs:
        src = newest.tensors[spec.name]
        found: list[Placement] = []
        for ds_name in names.get(src.alias_key, []):
            found += _source_placements(raw.tensors[ds_name], pickles) + _module_placements(
                ds_name, src.numel, pickles, model_files
            )
        if not found:
            raise AssertionError(f"no place in {tag} for {spec.name}")
        mine = []
        for p in dict.fromkeys(found):  # a storage the module and the frozen fragments share: one placement
            spans = claimed.setdefault((p.file, p.key), [])
            overlap = [q for lo, hi, q in spans if lo < p.offset + p.nbytes and p.offset < hi]
            if overlap and overlap != [p]:
                raise UnsupportedError(p.file, f"{spec.name} shares bytes with {overlap[0]}; not written back in this layout")
            if not overlap:
                spans.append((p.offset, p.offset + p.nbytes, p))
                mine.append(p)
        layout.placements[spec.name] = sorted(mine, key=lambda p: p.first)
    _check_order(layout, specs)
    return layout


def _check_order(layout: ZeroLayout, specs: list[TensorSpec]) -> None:
    """Each output file can be written front to back as the engine hands tensors over: in every file, each
    tensor's placements follow the previous ones in the same storage, or start a storage not yet written."""
    where: dict[Path, tuple[str, int]] = {}
    done: dict[Path, set[str]] = {}
    for spec in specs:
        for p in layout.placements[spec.name]:
            key, position = where.get(p.file, (None, 0))
            if key == p.key and p.offset >= position:
                where[p.file] = (key, p.offset + p.nbytes)
            elif key != p.key and p.key not in done.setdefault(p.file, set()):
                if key is not None:
                    done[p.file].add(key)
                where[p.file] = (p.key, p.offset + p.nbytes)
            else:
                raise UnsupportedError(
                    p.file,
                    f"holds {spec.name} before tensors the engine writes earlier; not written back in this layout",
                )


def check_deepspeed_same(inputs: list[Checkpoint], out: Path, specs: list[TensorSpec], training_state: str) -> list[str]:
    """Refuse, before anything is written, what cannot be written back as the newest DeepSpeed save: other layouts
    among the inputs, saves of other world sizes or stages, the 16-bit module read alone, other dtypes, an output
    named as a file. Returns the notes for the report."""
    newest = inputs[-1]
    same = option("out_format", "same")
    if newest.format == "deepspeed (module)":
        raise UsageError(
            newest.path,
            f"{same} writes the merged FP32 masters back into the optimizer states: leave out {option('key', 'module')}",
        )
    shape = _save_shape(newest)
    for ckpt in inputs[:-1]:
        if not is_deepspeed(ckpt):
            raise UsageError(
                ckpt.path, f"{same} needs inputs of one layout: this is not a DeepSpeed save, the newest input {newest.path} is"
            )
        theirs = _save_shape(ckpt)
        if ckpt.format != newest.format:
            raise UsageError(
                ckpt.path, f"{same} needs saves of one ZeRO stage: this is {ckpt.format}, the newest input {newest.format}"
            )
        if len(theirs[1]) != len(shape[1]):
            raise UsageError(
                ckpt.path,
                f"{same} needs saves of one world size: this has {len(theirs[1])} rank(s), the newest input {len(shape[1])}",
            )
        if theirs != shape:
            raise UsageError(
                ckpt.path,
                f"{same} needs saves of one layout: its files are {', '.join(theirs[0] + theirs[1])}, the newest input's "
                f"{', '.join(shape[0] + shape[1])}",
            )
    if Path(out.name.lower()).suffix in OTHER_SUFFIXES:
        raise UsageError(
            None,
            f"{option('out', out.name)}: {same} writes a folder in the layout of the DeepSpeed save {newest.path}: name a folder",
        )
    for spec in specs:
        if spec.dtype != newest.tensors[spec.name].dtype:
            raise UsageError(
                None,
                f"{option('dtype', short_dtype_name(dtype_name(spec.dtype)))}: {same} writes a DeepSpeed save in its own "
                "dtypes (FP32 masters, the module's 16-bit copies): leave it out",
            )
    layout = zero_layout(newest, specs)
    where = f"{layout.tag.name}/ and `latest`" if _has_latest(newest) else f"{layout.tag.name}/"
    notes = [
        f"written as the DeepSpeed save {where} (ZeRO-{layout.stage}, {layout.world} rank(s)): the merged FP32 masters in "
        "every rank's optimizer partitions, the module's copies, frozen parameters and buffers in the model states; "
        "every other entry kept"
    ]
    if training_state == "drop":
        notes.append(
            f"training state left out ({option('training_state', 'drop')}): the Adam moments and the scheduler state; load it "
            "with engine.load_checkpoint(OUT, load_optimizer_states=False, load_lr_scheduler_states=False)"
        )
    else:
        notes.append(
            f"training state of the newest input kept ({option('training_state', 'newest')}): the Adam moments, loss scaler "
            f"and scheduler; engine.load_checkpoint(OUT) resumes from the merge at {layout.world} rank(s)"
        )
    return notes


def _save_shape(ckpt: Checkpoint) -> tuple[list[str], list[str]]:
    """The names of a save's model states and optimizer states files."""
    names = [f.name for f in ckpt.files]
    return [n for n in names if Path(n).match(MODEL_STATES)], [n for n in names if Path(n).match(OPTIM_STATES)]


def _has_latest(ckpt: Checkpoint) -> bool:
    return save_folder(ckpt.path) != ckpt.path and (ckpt.path / "latest").is_file()


def _relative_tag(newest: Checkpoint) -> str:
    """Where the save's files go in the output: its tag folder, or the output itself when the input was that folder."""
    tag = save_folder(newest.path)
    assert tag is not None
    return "" if tag == newest.path else tag.name


def output_files(newest: Checkpoint) -> list[str]:
    """The files the writer writes, relative to the output folder."""
    sub = _relative_tag(newest)
    tag = save_folder(newest.path)
    assert tag is not None
    return [f"{sub}/{f.name}" if sub else f.name for f in _files(tag)]


class _RewrittenFile(TorchWriter):
    """One model or optimizer states file of the output: the input's structure, its weight storages written as the
    merged values arrive (`put`, front to back; the bytes between them copied from the input), the other storages
    copied at `finish`."""

    def __init__(self, path: Path, source: PickleFile, changes: dict[tuple[str, ...], Any], durable: bool) -> None:
        super().__init__(path, [], durable=durable)
        self.source = source
        self.changes = changes  # the entries changed, by their path: see _edited
        self.written: dict[str, str] = {}  # input storage key -> output record key
        self._key: str | None = None
        self._at = 0

    def put(self, key: str, offset: int, data: memoryview) -> None:
        if key != self._key:
            self.close_record()
            self.written[key] = str(len(self.written))
            self._key, self._at = key, 0
            self._stream = self._zip.open(self._aligned_info(f"data/{self.written[key]}"), "w", force_zip64=True)
        assert offset >= self._at, (self.paths[0], key, offset, self._at)
        self._copy(offset)
        self._stream.write(data)
        self._at += len(data)
        self.bytes_written += len(data)

    def _copy(self, until: int) -> None:
        """The input's bytes of the open storage from where the output is to `until`."""
        assert self._key is not None
        start = self.source.storage_offsets[self._key]
        fd = FILES.fd(self.source.path)
        while self._at < until:
            piece = os.pread(fd, min(COPY_PIECE, until - self._at), start + self._at)
            if not piece:
                raise InputError(self.source.path, f"truncated: storage {self._key} ends past the end of the file")
            self._stream.write(piece)
            self._at += len(piece)
            self.bytes_written += len(piece)

    def close_record(self) -> None:
        if self._key is not None:
            self._copy(self.source.storage_sizes[self._key])
            self._stream.close()
            self._stream, self._key = None, None

    def _data_pkl(self) -> bytes:
        self.close_record()
        top = _edited(self.source.obj, self.changes)
        buffer = io.BytesIO()
        pickler = _RewritingPickler(buffer, self.source.path, self.written)
        pickler.dump(top)
        for key, ref in pickler.copied:
            self._copy_storage(key, ref.key)
        return buffer.getvalue()

    def _copy_storage(self, out_key: str, key: str) -> None:
        if key not in self.source.storage_offsets:
            raise InputError(self.source.path, f"storage {key} is missing from the file")
        self._stream = self._zip.open(self._aligned_info(f"data/{out_key}"), "w", force_zip64=True)
        self._key, self._at = key, 0
        self.close_record()


def _edited(obj: Any, changes: dict[tuple[str, ...], Any]) -> Any:
    """A copy of the dicts along each changed entry's path, with the entry set to its value, to what a function makes
    of it, or left out (_DROP)."""
    if not changes:
        return obj
    top = type(obj)(obj)
    for path, value in changes.items():
        node = top
        for key in path[:-1]:
            if not isinstance(node.get(key), dict):
                break
            node[key] = type(node[key])(node[key])
            node = node[key]
        else:
            if value is _DROP:
                node.pop(path[-1], None)
            elif path[-1] in node:
                node[path[-1]] = value(node[path[-1]]) if callable(value) else value
    return top


_DROP = object()


def _sizes(shapes: Any) -> Any:
    """{name: shape} with each shape a torch.Size again: the restricted unpickler reads torch.Size as a tuple, and
    DeepSpeed's loaders call .numel() on the shapes of param_shapes and frozen_param_shapes."""
    if not isinstance(shapes, dict):
        return shapes
    return type(shapes)((name, torch.Size(shape) if isinstance(shape, tuple) else shape) for name, shape in shapes.items())


SHAPES = {("param_shapes",): lambda groups: [_sizes(g) for g in groups] if isinstance(groups, list) else groups}
SHAPES[("frozen_param_shapes",)] = _sizes


class _RewritingPickler(InertPickler):
    """InertPickler whose storages written already (the weights') keep their output records."""

    def __init__(self, file: io.BytesIO, path: Path, written: dict[str, str]) -> None:
        super().__init__(file, path, {}, len(written))
        self._keys.update(written)


class DeepSpeedSameWriter:
    """The TensorWriter of a DeepSpeed save written back: the engine writes the merged tensors in order, each goes
    to its placements in the output's files (rounded to the module's dtype where that is 16-bit)."""

    def __init__(self, folder: Path, specs: list[TensorSpec], newest: Checkpoint, training_state: str, durable: bool = True):
        self.layout = zero_layout(newest, specs)
        self.specs = specs
        self.bytes_written = 0
        sub = _relative_tag(newest)
        target = folder / sub if sub else folder
        target.mkdir(parents=True, exist_ok=True)
        self.files: dict[Path, _RewrittenFile] = {}
        for path in self.layout.files:
            changes: dict[tuple[str, ...], Any] = {} if path.match(OPTIM_STATES) else dict(SHAPES)
            if training_state == "drop" and path.match(OPTIM_STATES):
                changes[("optimizer_state_dict", DROPPED_MOMENTS[self.layout.stage])] = _DROP
            elif training_state == "drop":
                changes[(DROPPED_SCHEDULER,)] = None
            self.files[path] = _RewrittenFile(target / path.name, PickleFile(path), changes, durable)
        self.paths = [f.paths[0] for f in self.files.values()]
        self._position = 0
        self._written = 0

    @property
    def current(self) -> TensorSpec:
        return self.specs[self._position]

    def _advance_if_full(self) -> None:
        while self._position < len(self.specs) and self._written == self.current.nbytes:
            self._position += 1
            self._written = 0

    def write(self, data: memoryview) -> None:
        self._advance_if_full()
        if not len(data):
            return
        spec = self.current
        size = spec.dtype.itemsize
        if len(data) % size or self._written % size or self._written + len(data) > spec.nbytes:
            raise AssertionError(f"{spec.name}: {len(data)} bytes at {self._written} do not fit its elements")
        lo, hi = self._written // size, (self._written + len(data)) // size
        values = None
        for p in self.layout.placements[spec.name]:
            start, stop = max(lo, p.first), min(hi, p.first + p.count)
            if start >= stop:
                continue
            piece = data[(start - lo) * size : (stop - lo) * size]
            if p.dtype_name != dtype_name(spec.dtype):  # the module's 16-bit copy of an FP32 master
                if values is None:
                    values = torch.frombuffer(data, dtype=spec.dtype)
                rounded = values[start - lo : stop - lo].to(to_torch(p.dtype_name))
                piece = tensor_buffer(rounded)
            self.files[p.file].put(p.key, p.offset + (start - p.first) * itemsize(p.dtype_name), piece)
        self._written += len(data)
        self._advance_if_full()

    def repeat(self, name: str) -> None:
        """A tied tensor: its places are its twin's (checked by zero_layout), written already."""
        self._advance_if_full()
        assert not self.layout.placements[self.current.name], self.current.name
        self._position += 1
        self._written = 0
        self._advance_if_full()

    def finish(self) -> None:
        self._advance_if_full()
        if self._position != len(self.specs):
            raise AssertionError(f"writer stopped at {self.current.name}")
        for file in self.files.values():
            file.finish()
        self.bytes_written = sum(path.stat().st_size for path in self.paths)

    def abort(self) -> None:
        for file in self.files.values():
            file.abort()


def copy_beside(newest: Checkpoint, folder: Path, training_state: str, notes: list[str]) -> list[str]:
    """What goes beside the save's files: the other files of its tag folder and, from a run folder or Trainer
    checkpoint, `latest` and its other files but the model weights (the newest input's 16-bit weights, not the
    merge) and, with training_state="drop", its training state (scheduler, RNG, trainer state). Returns their paths
    in `folder`; what was not copied is told in `notes`."""
    tag = save_folder(newest.path)
    assert tag is not None
    sub = _relative_tag(newest)
    states = {f.name for f in _files(tag)}
    copied = [
        _copy(p, folder, f"{sub}/{p.name}" if sub else p.name)
        for p in sorted(tag.iterdir())
        if p.is_file() and p.name not in states
    ]
    if not sub:
        return copied
    top = [p for p in sorted(newest.path.iterdir()) if p.is_file()]
    weights = set(weight_names(p.name for p in top))
    left = []
    for p in top:
        if (
            p.name in weights
            or p.name.endswith((".safetensors", ".safetensors.index.json"))
            or p.name.startswith("pytorch_model")
        ):
            left.append(p.name)
        elif training_state == "drop" and is_training_file(p.name) and p.name not in ("latest", *SCRIPTS):
            continue
        else:
            copied.append(_copy(p, folder, p.name))
    if left:
        notes.append(f"not copied: {', '.join(left)} (the newest input's weights, not the merge: that is in {sub}/)")
    return copied


def _copy(src: Path, folder: Path, name: str) -> str:
    dst = folder / name
    try:
        shutil.copyfile(src, dst)
        with open(dst, "rb") as f:
            os.fsync(f.fileno())
    except OSError as e:
        raise OutputError(src, f"cannot copy to the output: {e.strerror or e}") from e
    return name


def verify_deepspeed_same(
    staged: Path, out: Path, specs: list[TensorSpec], crcs: dict[str, int], read_back: Any
) -> dict[str, str]:
    """--verify for a DeepSpeed save written back: the staged save read again by ckptavg's reader (the FP32 masters
    from the partitions, range by range through every rank's file), each tensor's CRC-32 checked against what was
    written; returns the sha256 of every file, by its path in the output."""
    from ckptavg.checkpoint import open_checkpoint

    files = sorted(p for p in staged.rglob("*") if p.is_file())
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # read back from the disk, not the page cache
        finally:
            os.close(fd)
    try:
        written = open_checkpoint(staged, replace(read_back, dequantize=False))
    except InputError as e:
        raise OutputError(out, f"verification failed: the output does not read back ({e.problem})") from e
    expected = {spec.name: spec for spec in specs}
    if set(written.tensors) != set(expected):
        missing = sorted(set(expected) ^ set(written.tensors))
        raise OutputError(out, f"verification failed: tensor {missing[0]} is missing or unexpected in the output")
    piece = bytearray(COPY_PIECE)
    for name, src in written.tensors.items():
        spec = expected[name]
        if src.dtype != spec.dtype or tuple(src.shape) != tuple(spec.shape):
            raise OutputError(out, f"verification failed: {name} reads back as {src.dtype} {list(src.shape)}")
        crc, done = 0, 0
        while done < src.nbytes:
            view = memoryview(piece)[: min(COPY_PIECE, src.nbytes - done)]
            src.read_bytes(done, view)
            crc = zlib.crc32(view, crc)
            done += len(view)
        if crc != crcs[name]:
            raise OutputError(out, f"verification failed: {name} reads back different bytes than were written")
    return {str(p.relative_to(staged)): sha256_of(p) for p in files}


def timed_verify(staged: Path, out: Path, specs: list[TensorSpec], crcs: dict[str, int], report: Any, read_back: Any) -> None:
    """verify_deepspeed_same into the report (sha256 of each file, verified, its time)."""
    started = time.perf_counter()
    report.sha256 = verify_deepspeed_same(staged, out, specs, crcs, read_back)
    report.verified = True
    report.verify_seconds = time.perf_counter() - started
