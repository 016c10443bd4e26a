"""Pickling the restricted unpickler's inert view of a PyTorch pickle back, as torch.save writes it: what
formats/pickle_same.py (a pickle written back) and formats/deepspeed_same.py (a DeepSpeed save written back) share."""

from __future__ import annotations

import collections
import copyreg
import io
import pickle
from pathlib import Path
from typing import Any

import torch

from ckptavg.errors import UnsupportedError
from ckptavg.formats.base import contiguous_strides
from ckptavg.formats.dtypes import dtype_name, itemsize, to_torch
from ckptavg.formats.torch_writer import STORAGE_CLASSES, _Storage
from ckptavg.formats.unpickle import DTypeRef, Opaque, QuantizedTensorRef, SizeTuple, StorageRef, TensorRef


def inert_reduction(obj: Any) -> Any:
    """How a value of the restricted unpickler's inert view is pickled again (None for any other value): a
    placeholder as the construction (NEWOBJ) or call (REDUCE) it was read from, its class a GLOBAL of the recorded
    module and name; a dtype as the global torch.NAME (the pickler's save_global writes it); a torch.Size as one."""
    if isinstance(obj, Opaque):
        items = obj._opaque_items
        listitems = iter(list(items.values())) if obj._opaque_appended else None
        dictitems = iter(list(items.items())) if items and not obj._opaque_appended else None
        if obj._opaque_called:
            return (type(obj), obj._opaque_args, obj._opaque_state, listitems, dictitems)
        return (copyreg.__newobj__, (type(obj), *obj._opaque_args), obj._opaque_state, listitems, dictitems)
    if isinstance(obj, DTypeRef):
        return obj.name
    if isinstance(obj, SizeTuple):
        return (torch.Size, (tuple(obj),))
    return None


class InertPickler(pickle._Pickler):  # type: ignore[name-defined]
    """Pickles the inert view of a checkpoint back (protocol 2, as torch.save).

    An Opaque placeholder is written as the call (REDUCE) or construction (NEWOBJ) it recorded, with its items and
    state; its class or function as a GLOBAL opcode written from the recorded module and name, so nothing is
    imported (pickle's own save_global imports the module to check the name) and nothing from the file runs. A
    TensorRef is written as torch.save writes a tensor: a weight over the merged tensor's record, any other over
    its own storage, copied (`copied`: the new record key and the input's storage)."""

    def __init__(self, file: io.BytesIO, path: Path, weights: dict[int, _Storage], first_key: int) -> None:
        super().__init__(file, protocol=2)
        self.path = path
        self.weights = weights  # id of a weight's TensorRef -> the record of its merged tensor
        self.copied: list[tuple[str, StorageRef]] = []
        self._keys: dict[str, str] = {}
        self._next_key = first_key

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _Storage):
            spec = obj.spec
            return ("storage", getattr(torch, STORAGE_CLASSES[spec.dtype]), obj.key, "cpu", spec.nbytes // spec.dtype.itemsize)
        if isinstance(obj, StorageRef):
            if obj.key not in self._keys:
                self._keys[obj.key] = str(self._next_key)
                self._next_key += 1
                self.copied.append((self._keys[obj.key], obj))
            numel = obj.nbytes // itemsize(obj.dtype_name)
            storage_class = STORAGE_CLASSES[to_torch(obj.dtype_name)]
            return ("storage", getattr(torch, storage_class), self._keys[obj.key], "cpu", numel)
        return None

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, TensorRef):
            storage = self.weights.get(id(obj))
            if storage is not None:  # a tied weight shares its twin's record (the same shape and dtype)
                shape = tuple(storage.spec.shape)
                return (
                    torch._utils._rebuild_tensor_v2,
                    (storage, 0, shape, contiguous_strides(shape), False, collections.OrderedDict()),
                )
            args = (obj.storage, obj.offset, obj.shape, obj.stride, False, collections.OrderedDict())
            if obj.dtype_name != obj.storage.dtype_name:
                return (torch._utils._rebuild_tensor_v3, (*args, to_torch(obj.dtype_name)))
            return (torch._utils._rebuild_tensor_v2, args)
        if (reduced := inert_reduction(obj)) is not None:
            return reduced
        if isinstance(obj, QuantizedTensorRef):
            raise UnsupportedError(self.path, "holds torch.quantization tensors beside its weights; not written back")
        return NotImplemented

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if isinstance(obj, type) and issubclass(obj, Opaque):
            self.write(pickle.GLOBAL + f"{obj._module}\n{obj._name}\n".encode())
            self.memoize(obj)
            return
        if isinstance(obj, (torch.dtype, DTypeRef)):  # as torch names it, not found by a search of the loaded modules
            self.write(pickle.GLOBAL + f"torch\n{obj.name if isinstance(obj, DTypeRef) else dtype_name(obj)}\n".encode())
            self.memoize(obj)
            return
        if str(getattr(obj, "__module__", "")).startswith("ckptavg"):
            # a stand-in of the restricted unpickler (its storage types, its tensor rebuilders) held as a value
            raise UnsupportedError(self.path, f"holds {getattr(obj, '__name__', obj)!r} as a value; not written back")
        super().save_global(obj, name)
