"""A restricted unpickler: reads the structure of a PyTorch pickle and runs nothing from it.

torch's own rebuild functions are replaced by ones that record where each tensor's bytes are
(`TensorRef`), a global that can run code or touch the system (os.system, subprocess, eval, ...) makes
the file refused as hostile, and every other global the file names becomes an inert `Opaque` placeholder
that records its arguments and is never called. So a Lightning or fairseq checkpoint (omegaconf configs,
argparse Namespaces, numpy RNG state) still gives up its tensors, and a hostile pickle does nothing.
"""

from __future__ import annotations

import _compat_pickle
import builtins
import collections
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from ckptavg.formats.dtypes import ALIASES, DTYPES, STORAGE_TYPES

SAFE_BUILTINS = {"set", "frozenset", "tuple", "list", "dict", "complex", "slice", "int", "float", "str", "bool"}


@dataclass(frozen=True)
class DTypeRef:
    """A torch dtype the pickle names (`torch.bfloat16`), kept by torch's name for it: no torch is imported."""

    name: str


@dataclass(frozen=True)
class StorageType:
    dtype_name: str


@dataclass(frozen=True)
class StorageRef:
    """A storage record of the file: `key` names its bytes, `nbytes` is what the pickle says it holds."""

    key: str
    dtype_name: str
    nbytes: int


@dataclass(frozen=True)
class TensorRef:
    storage: StorageRef
    offset: int  # in elements of dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype_name: str


class QuantizedTensorRef:
    """A torch.quantization tensor: recognised so it can be refused with a clear message."""


class Opaque:
    """Stands in for any class or function the pickle names that is not a plain container or a tensor.

    It records the arguments and state it is given, and how it was made, so that the pickle can be written back
    as it was (formats/pickle_same.py); it never runs code from the file.
    """

    _global = "?"
    _module = "?"  # the global's module and name, as the pickle names them (after Python 2 names are mapped)
    _name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Opaque:
        obj = object.__new__(cls)
        object.__setattr__(obj, "_opaque_args", args)
        object.__setattr__(obj, "_opaque_state", None)
        object.__setattr__(obj, "_opaque_items", {})
        object.__setattr__(obj, "_opaque_called", False)  # True once __init__ ran: made by REDUCE (a call), not NEWOBJ
        object.__setattr__(obj, "_opaque_appended", False)  # its items came by append (list-like), not by setitem
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        object.__setattr__(self, "_opaque_called", True)

    def __setstate__(self, state: Any) -> None:
        object.__setattr__(self, "_opaque_state", state)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._opaque_items[key] = value

    def append(self, value: Any) -> None:
        object.__setattr__(self, "_opaque_appended", True)
        self._opaque_items[len(self._opaque_items)] = value

    def extend(self, values: Any) -> None:
        for value in values:
            self.append(value)

    def __repr__(self) -> str:
        return f"<{self._global}>"

    def as_mapping(self) -> dict:
        """What the object would have held as a dict: its items, else its attribute state."""
        if self._opaque_items:
            return dict(self._opaque_items)
        state = self._opaque_state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]
        return state if isinstance(state, dict) else {}


_OPAQUE_TYPES: dict[str, type[Opaque]] = {}


def _opaque(module: str, name: str) -> type[Opaque]:
    qualname = f"{module}.{name}"
    if qualname not in _OPAQUE_TYPES:
        attributes = {"_global": qualname, "_module": module, "_name": name}
        _OPAQUE_TYPES[qualname] = type(name.replace(".", "_") or "Opaque", (Opaque,), attributes)
    return _OPAQUE_TYPES[qualname]


def _rebuild_tensor(storage: StorageRef, offset: int, size: tuple, stride: tuple, *_: Any) -> TensorRef:
    return TensorRef(storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride), storage.dtype_name)


def _rebuild_tensor_v3(
    storage: StorageRef, offset: int, size: tuple, stride: tuple, requires_grad: Any, hooks: Any, dtype: DTypeRef, *_: Any
) -> TensorRef:
    if not isinstance(dtype, DTypeRef):
        raise pickle.UnpicklingError(f"a tensor whose dtype is a {type(dtype).__name__}")
    return TensorRef(storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride), dtype.name)


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data


def _rebuild_from_type(func: Callable, new_type: Any, args: tuple, state: Any) -> Any:
    # func was itself resolved by find_class, so it is one of ours or an Opaque type.
    return func(*args)


def _sized_bytes(kind: type) -> Callable:
    """bytes/bytearray from text (how protocol 2 pickles them), never `bytes(n)`: n could be a terabyte."""

    def build(*args: Any) -> Any:
        if args and not isinstance(args[0], (str, bytes, bytearray)):
            raise pickle.UnpicklingError(f"{kind.__name__}() of a {type(args[0]).__name__}, not text")
        return kind(*args)

    return build


class SizeTuple(tuple):
    """A torch.Size, read as the tuple it is (no torch object is made) but kept apart from plain tuples, so that
    a pickle rewritten from this view (formats/inert_pickler.py) writes it back as a torch.Size."""


def _rebuild_qtensor(*_: Any) -> QuantizedTensorRef:
    return QuantizedTensorRef()


_TORCH_FUNCTIONS: dict[tuple[str, str], Callable] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._utils", "_rebuild_qtensor"): _rebuild_qtensor,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): SizeTuple,
    ("builtins", "bytes"): _sized_bytes(bytes),
    ("builtins", "bytearray"): _sized_bytes(bytearray),
}


# Callables a checkpoint has no reason to name: a pickle that does is an attack, refused outright even
# where the object would be outside the weights. Any other unknown global stays an inert placeholder.
DANGEROUS_MODULES = {
    "os",
    "posix",
    "nt",
    "subprocess",
    "sys",
    "shutil",
    "runpy",
    "importlib",
    "socket",
    "pty",
    "code",
    "codeop",
    "ctypes",
    "multiprocessing",
    "webbrowser",
    "marshal",
    "commands",
    "pickle",
    "_pickle",
    "dill",
    "pdb",
    "timeit",
    "torch.hub",
    "urllib",
    "http",
    "ftplib",
    "tempfile",
    "glob",
    "pathlib",
    "zipimport",
}
DANGEROUS_NAMES = {
    "builtins": {
        "eval",
        "exec",
        "compile",
        "open",
        "__import__",
        "getattr",
        "setattr",
        "delattr",
        "globals",
        "locals",
        "vars",
        "input",
        "breakpoint",
        "execfile",
        "file",
        "apply",
        "exit",
        "quit",
        "help",
    },
    "types": {"FunctionType", "CodeType", "LambdaType", "MethodType"},
    "io": {"open", "open_code", "FileIO"},
    "_io": {"open", "open_code", "FileIO"},
}


class HostilePickleError(pickle.UnpicklingError):
    """The pickle names a callable that can run code or touch the system (`qualname`)."""

    def __init__(self, qualname: str) -> None:
        super().__init__(qualname)
        self.qualname = qualname


def dangerous(module: str, name: str) -> bool:
    parts = module.split(".")
    packages = {".".join(parts[: i + 1]) for i in range(len(parts))}
    return bool(packages & DANGEROUS_MODULES) or name in DANGEROUS_NAMES.get(module, ())


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a torch checkpoint's structure; `storage_ref(key, dtype name, numel)` describes each storage."""

    def __init__(self, file: BinaryIO, storage_ref: Callable[[str, str, int], StorageRef]) -> None:
        super().__init__(file, encoding="utf-8")
        self._storage_ref = storage_ref
        self.opaque_globals: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 0-2 pickles name Python 2 modules (__builtin__, commands, copy_reg): read them as Python 3's.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module), name))
        if (module, name) in _TORCH_FUNCTIONS:
            return _TORCH_FUNCTIONS[(module, name)]
        if module in ("torch", "torch.storage") and name in STORAGE_TYPES:
            return StorageType(STORAGE_TYPES[name])
        if module in ("torch", "torch.storage") and name in ("UntypedStorage", "_UntypedStorage"):
            return StorageType("uint8")
        if module == "torch" and (name in DTYPES or name in ALIASES):
            return DTypeRef(ALIASES.get(name, name))
        if module == "builtins" and name in SAFE_BUILTINS:
            return getattr(builtins, name)
        if dangerous(module, name):
            raise HostilePickleError(f"{module}.{name}")
        self.opaque_globals.add(f"{module}.{name}")
        return _opaque(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and pid and pid[0] in ("storage", b"storage")):
            raise pickle.UnpicklingError(f"unknown persistent id {str(pid)[:60]}")
        storage_type, key, _location, numel = pid[1:5]
        if len(pid) > 5 and pid[5] is not None:
            raise pickle.UnpicklingError("storage views of the pre-2018 format are not supported")
        if not isinstance(storage_type, StorageType):
            raise pickle.UnpicklingError(f"unknown storage type {storage_type!r}")
        key = key.decode() if isinstance(key, bytes) else str(key)
        return self._storage_ref(key, storage_type.dtype_name, int(numel))
