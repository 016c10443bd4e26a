"""Dtypes by name, without torch: the one home of the tables that map header dtypes to torch's.

Headers, plans and reports carry a tensor's dtype as torch's name for it (`bfloat16`), so commands that only
read headers (`inspect`, `select`) never import torch; `to_torch` makes the torch.dtype where a tensor is
read, folded or written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch's name of each dtype -> (bytes per element, floating point); tests/test_structure.py checks it against torch
DTYPES: dict[str, tuple[int, bool]] = {
    "float64": (8, True),
    "float32": (4, True),
    "float16": (2, True),
    "bfloat16": (2, True),
    "float8_e4m3fn": (1, True),
    "float8_e4m3fnuz": (1, True),
    "float8_e5m2": (1, True),
    "float8_e5m2fnuz": (1, True),
    "float8_e8m0fnu": (1, True),
    "float4_e2m1fn_x2": (1, True),
    "complex128": (16, False),
    "complex64": (8, False),
    "complex32": (4, False),
    "int64": (8, False),
    "int32": (4, False),
    "int16": (2, False),
    "int8": (1, False),
    "uint64": (8, False),
    "uint32": (4, False),
    "uint16": (2, False),
    "uint8": (1, False),
    "bool": (1, False),
    "qint32": (4, False),
    "qint8": (1, False),
    "quint8": (1, False),
    "quint4x2": (1, False),
    "quint2x4": (1, False),
    "bits16": (2, False),
    "bits8": (1, False),
    "bits1x8": (1, False),
    "bits2x4": (1, False),
    "bits4x2": (1, False),
    **{f"int{n}": (1, False) for n in range(1, 8)},
    **{f"uint{n}": (1, False) for n in range(1, 8)},
}
# torch's other names of the same dtypes (torch.float is torch.float32)
ALIASES = {
    "float": "float32",
    "double": "float64",
    "half": "float16",
    "int": "int32",
    "long": "int64",
    "short": "int16",
    "cfloat": "complex64",
    "cdouble": "complex128",
    "chalf": "complex32",
    "bit": "uint1",
}
# a safetensors header's dtype -> torch's name
SAFETENSORS = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "C64": "complex64",
}
SAFETENSORS_CODES = {name: code for code, name in SAFETENSORS.items()}
# the typed storages a torch pickle names (torch.FloatStorage) -> the dtype of their elements
STORAGE_TYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
    "QInt8Storage": "qint8",
    "QInt32Storage": "qint32",
    "QUInt8Storage": "quint8",
    "QUInt4x2Storage": "quint4x2",
    "QUInt2x4Storage": "quint2x4",
}


def itemsize(name: str) -> int:
    """Bytes per element of the dtype torch calls `name`."""
    return DTYPES[name][0]


def is_floating(name: str) -> bool:
    """Whether the dtype torch calls `name` is a floating-point one (complex is not)."""
    return DTYPES[name][1]


def dtype_name(dtype: torch.dtype) -> str:
    """torch's name of a torch.dtype: `bfloat16` for torch.bfloat16."""
    return str(dtype).removeprefix("torch.")


def to_torch(name: str) -> torch.dtype:
    """The torch.dtype torch calls `name`: made where a tensor is read, folded or written."""
    import torch

    return getattr(torch, name)
