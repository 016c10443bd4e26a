"""A streaming writer of PyTorch `.pt` state dicts, for `export --format pt`.

It writes the zip layout torch.save uses (data.pkl, data/<key> records aligned to 64 bytes, byteorder,
version) record by record, so that torch.load(..., weights_only=True, mmap=True) reads it and memory stays
one chunk. Tied tensors share one storage record, as torch.save would write them.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch

from ckptavg.formats.base import contiguous_strides
from ckptavg.formats.writer import TensorSpec

ALIGNMENT = 64
STORAGE_CLASSES = {dtype: name for dtype, name in torch.storage._dtype_to_storage_type_map().items()}


class _Storage:
    def __init__(self, key: str, spec: TensorSpec) -> None:
        self.key, self.spec = key, spec


class _Tensor:
    """Pickles as torch._utils._rebuild_tensor_v2 over a persistent storage reference, like torch.save."""

    def __init__(self, storage: _Storage) -> None:
        self.storage = storage

    def __reduce_ex__(self, protocol: int) -> tuple:
        spec = self.storage.spec
        args = (self.storage, 0, tuple(spec.shape), contiguous_strides(tuple(spec.shape)), False, collections.OrderedDict())
        return (torch._utils._rebuild_tensor_v2, args)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _Storage):
            numel = obj.spec.nbytes // obj.spec.dtype.itemsize
            return ("storage", getattr(torch, STORAGE_CLASSES[obj.spec.dtype]), obj.key, "cpu", numel)
        return None


def check_pt_dtypes(specs: list[TensorSpec]) -> str | None:
    """The first dtype the .pt writer cannot express (float8, unsigned 16-64 bit), or None."""
    for spec in specs:
        if spec.dtype not in STORAGE_CLASSES:
            return f"{spec.name} is {spec.dtype}"
    return None


class TorchWriter:
    """Same interface as SafetensorsWriter: write() appends bytes of the current tensor, repeat() ties."""

    def __init__(self, path: Path, specs: list[TensorSpec], durable: bool = True, recipe: str | None = None) -> None:
        self.paths = [path]
        self.recipe = recipe  # ckptavg's recipe, kept as a record torch.load ignores: marks the file as ckptavg's
        self.durable = durable
        self.specs = specs
        self.bytes_written = 0
        self._file = open(path, "wb")
        self._zip = zipfile.ZipFile(self._file, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._prefix = path.stem.replace(".", "_") or "archive"
        self._position = 0
        self._written = 0
        self._stream: Any = None
        self._storages: dict[str, _Storage] = {}

    @property
    def current(self) -> TensorSpec:
        return self.specs[self._position]

    def _aligned_info(self, name: str) -> zipfile.ZipInfo:
        info = zipfile.ZipInfo(f"{self._prefix}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_STORED
        offset = self._file.tell()
        fixed = 30 + len(info.filename.encode()) + 20 + 4  # local header, name, zip64 extra, padding field header
        pad = -(offset + fixed) % ALIGNMENT
        info.extra = struct.pack("<HH", 0x4246, pad) + b"\0" * pad
        return info

    def _record(self, name: str, data: bytes) -> None:
        with self._zip.open(self._aligned_info(name), "w", force_zip64=True) as stream:
            stream.write(data)

    def _advance_if_full(self) -> None:
        while self._position < len(self.specs) and self._written == self.current.nbytes:
            if self._stream is not None:
                self._stream.close()
                self._stream = None
            elif self.current.name not in self._storages:
                self._storages[self.current.name] = _Storage(str(len(self._storages)), self.current)
                self._record(f"data/{self._storages[self.current.name].key}", b"")
            self._position += 1
            self._written = 0

    def write(self, data: memoryview) -> None:
        self._advance_if_full()
        if not len(data):  # a zero-element tensor: finish() writes its empty record
            return
        spec = self.current
        if self._stream is None:
            storage = _Storage(str(len(self._storages)), spec)
            self._storages[spec.name] = storage
            self._stream = self._zip.open(self._aligned_info(f"data/{storage.key}"), "w", force_zip64=True)
        if self._written + len(data) > spec.nbytes:
            raise AssertionError(f"{spec.name}: more bytes than its shape holds")
        self._stream.write(data)
        self._written += len(data)
        self.bytes_written += len(data)
        self._advance_if_full()

    def repeat(self, name: str) -> None:
        self._advance_if_full()
        self._storages[self.current.name] = self._storages[name]
        self._position += 1
        self._written = 0
        self._advance_if_full()

    def finish(self) -> None:
        self._advance_if_full()
        if self._position != len(self.specs):
            raise AssertionError(f"writer stopped at {self.current.name}")
        self._record("data.pkl", self._data_pkl())
        self._record(".format_version", b"1")
        self._record(".storage_alignment", str(ALIGNMENT).encode())
        self._record("byteorder", b"little")
        self._record("version", b"3\n")
        if self.recipe is not None:
            self._record("ckptavg.json", self.recipe.encode())
        self._zip.close()
        self._file.flush()
        if self.durable:
            os.fsync(self._file.fileno())
        self._file.close()

    def _data_pkl(self) -> bytes:
        """The pickle of the file: a flat state dict of the tensors written (another layout overrides it)."""
        state = collections.OrderedDict((spec.name, _Tensor(self._storages[spec.name])) for spec in self.specs)
        buffer = io.BytesIO()
        _Pickler(buffer, protocol=2).dump(state)
        return buffer.getvalue()

    def abort(self) -> None:
        if not self._file.closed:
            if self._stream is not None:
                self._stream = None
            self._file.close()
