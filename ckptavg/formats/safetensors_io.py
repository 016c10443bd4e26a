"""safetensors: the header is parsed and checked here, the data is read tensor by tensor with pread."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from ckptavg.errors import InputError, UnsupportedError
from ckptavg.formats.base import TensorSource
from ckptavg.formats.dtypes import SAFETENSORS, itemsize

PACKED_DTYPES = {"F4": "4-bit floats, two per byte", "F6_E2M3": "6-bit floats", "F6_E3M2": "6-bit floats"}
MAX_HEADER = 100 * 1024 * 1024


def read_header(path: Path, start: int = 0) -> tuple[dict[str, dict], dict[str, str], int]:
    """Parse and validate a safetensors header: (tensor entries, metadata, offset of the data in the file).

    `start` is where the safetensors bytes begin in `path` (a DCP `.distcp` file ends with them); they run to
    the end of the file either way.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(start)
        head = f.read(8)
        if len(head) < 8:
            raise InputError(path, f"truncated: a safetensors file starts with an 8-byte header length, file has {size} bytes")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER:
            raise InputError(path, f"corrupt safetensors header: header length {length} is implausible")
        if start + 8 + length > size:
            raise InputError(path, f"truncated: header needs {start + 8 + length} bytes, file has {size}")
        raw = f.read(length)
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicates)
    except _DuplicateName as e:
        raise InputError(path, f"corrupt safetensors header: tensor {e.args[0]!r} is listed twice") from e
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise InputError(path, f"corrupt safetensors header: not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise InputError(path, "corrupt safetensors header: not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise InputError(path, "corrupt safetensors header: __metadata__ is not an object")
    data_start = start + 8 + length
    _check_entries(path, header, size - data_start)
    return header, metadata, data_start


class _DuplicateName(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    """json's object hook: a name given twice is an error, not "the last one wins"."""
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateName(key)
        seen[key] = value
    return seen


def _naturals(value: object, length: int | None = None) -> list[int] | None:
    """`value` as a list of non-negative JSON integers (of `length` items), else None."""
    if not isinstance(value, list) or (length is not None and len(value) != length):
        return None
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value):
        return None
    return value


def _check_entries(path: Path, header: dict, data_size: int) -> None:
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise InputError(path, f"corrupt safetensors header: entry for tensor {name!r} is not an object")
        kind = entry.get("dtype")
        if isinstance(kind, str) and kind not in SAFETENSORS:
            if kind in PACKED_DTYPES:
                raise UnsupportedError(
                    path,
                    f"tensor {name!r} is {kind} ({PACKED_DTYPES[kind]}) outside a known quantization scheme; "
                    "ckptavg reads MXFP4 as U8 *_blocks + *_scales pairs, as gpt-oss writes them",
                )
            raise InputError(path, f"tensor {name!r} has dtype {kind}, which ckptavg does not handle")
        shape, offsets = _naturals(entry.get("shape")), _naturals(entry.get("data_offsets"), 2)
        if not isinstance(kind, str) or shape is None or offsets is None:
            raise InputError(path, f"corrupt safetensors header: bad dtype, shape or data_offsets for tensor {name!r}")
        begin, end = offsets
        if end - begin != math.prod(shape) * itemsize(SAFETENSORS[kind]):
            raise InputError(
                path, f"corrupt safetensors header: tensor {name!r} has {end - begin} bytes for shape {shape} {entry['dtype']}"
            )
        spans.append((begin, end, name))
    spans.sort()
    position = 0
    for begin, end, name in spans:
        if begin != position:
            raise InputError(path, f"corrupt safetensors header: tensor {name!r} starts at byte {begin}, expected {position}")
        position = end
    if position > data_size:
        raise InputError(path, f"truncated: header says {position} bytes of tensor data, file has {data_size}")
    if position < data_size:
        raise InputError(path, f"corrupt safetensors file: {data_size - position} bytes after the last tensor")


def read_safetensors(path: Path) -> tuple[dict[str, TensorSource], dict[str, str]]:
    """Tensors of one safetensors file, in the order they are stored, and its metadata."""
    header, metadata, data_start = read_header(path)
    ordered = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
    tensors = {
        name: TensorSource(
            path=path,
            offset=data_start + entry["data_offsets"][0],
            dtype_name=SAFETENSORS[entry["dtype"]],
            shape=tuple(int(d) for d in entry["shape"]),
        )
        for name, entry in ordered
    }
    return tensors, metadata
