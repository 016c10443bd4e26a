"""PyTorch pickles (.pt .pth .bin .ckpt): zip archives and the legacy format, read without running them.

The structure (data.pkl) is unpickled by the restricted unpickler; tensor bytes stay on disk and are
read later from the zip's stored records or the legacy file's storage area.
"""

from __future__ import annotations

import pickle
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

from ckptavg.errors import HostileInputError, InputError, UnsupportedError
from ckptavg.formats.base import TensorSource
from ckptavg.formats.dtypes import itemsize
from ckptavg.formats.unpickle import HostilePickleError, Opaque, QuantizedTensorRef, RestrictedUnpickler, StorageRef, TensorRef

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class PickleFile:
    """A PyTorch pickle opened for reading: its top-level object and where each storage's bytes are."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.storage_offsets: dict[str, int] = {}
        self.storage_sizes: dict[str, int] = {}
        self._itemsize: dict[str, int] = {}
        with open(path, "rb") as f:
            self.legacy = f.read(4) != b"PK\x03\x04"
        try:
            self.obj = self._load_legacy() if self.legacy else self._load_zip()
        except InputError:
            raise
        except HostilePickleError as e:
            raise HostileInputError(
                path, f"hostile pickle: it calls {e.qualname}, which a checkpoint never needs; refused, nothing was run"
            ) from e
        except RecursionError as e:
            raise InputError(path, "corrupt PyTorch pickle: nested too deeply") from e
        except MemoryError as e:
            raise InputError(path, "corrupt PyTorch pickle: it claims an object larger than memory") from e
        except (zipfile.BadZipFile, NotImplementedError, RuntimeError, zlib.error) as e:
            # NotImplementedError: an unknown zip version or compression; RuntimeError: "encrypted"
            raise InputError(path, f"corrupt or truncated zip archive ({str(e)[:200]})") from e
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
            OverflowError,
        ) as e:
            raise InputError(path, f"corrupt PyTorch pickle ({type(e).__name__}: {str(e)[:200]})") from e
        self.opaque_globals = sorted(self._unpickler_globals)

    def _storage_ref(self, key: str, dtype_name: str, numel: int) -> StorageRef:
        self._itemsize[key] = itemsize(dtype_name)
        return StorageRef(key, dtype_name, numel * itemsize(dtype_name))

    def _load_zip(self) -> Any:
        with zipfile.ZipFile(self.path) as archive:
            names = archive.namelist()
            pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
            if not pkl:
                raise InputError(self.path, "zip archive without data.pkl: not a PyTorch checkpoint")
            prefix = pkl[0][: -len("data.pkl")]
            if archive.getinfo(pkl[0]).compress_type != zipfile.ZIP_STORED:
                raise InputError(self.path, "data.pkl is compressed; torch.save never does this")
            byteorder = prefix + "byteorder"
            if byteorder in names and archive.read(byteorder).strip() != b"little":
                raise UnsupportedError(self.path, "saved on a big-endian machine; ckptavg reads little-endian checkpoints only")
            with open(self.path, "rb") as raw:
                for info in archive.infolist():
                    if info.filename.startswith(prefix + "data/") and not info.is_dir():
                        key = info.filename[len(prefix + "data/") :]
                        if info.compress_type != zipfile.ZIP_STORED:
                            raise InputError(self.path, f"storage {key} is compressed; torch.save never does this")
                        self.storage_offsets[key] = _zip_data_offset(raw, info)
                        self.storage_sizes[key] = info.file_size
            with archive.open(pkl[0]) as f:
                unpickler = RestrictedUnpickler(f, self._storage_ref)
                obj = unpickler.load()
        self._unpickler_globals = unpickler.opaque_globals
        file_size = self.path.stat().st_size
        for key, offset in self.storage_offsets.items():
            if offset + self.storage_sizes[key] > file_size:
                raise InputError(self.path, f"truncated: storage {key} ends past the end of the file")
        return obj

    def _load_legacy(self) -> Any:
        with open(self.path, "rb") as f:
            unpickler = RestrictedUnpickler(f, self._storage_ref)
            magic = unpickler.load()
            if magic != LEGACY_MAGIC:
                raise InputError(self.path, "not a PyTorch checkpoint: a pickle without torch's magic number")
            RestrictedUnpickler(f, self._storage_ref).load()  # protocol version
            RestrictedUnpickler(f, self._storage_ref).load()  # sys info
            unpickler = RestrictedUnpickler(f, self._storage_ref)
            obj = unpickler.load()
            keys = RestrictedUnpickler(f, self._storage_ref).load()
            position = f.tell()
            file_size = self.path.stat().st_size
            for key in keys:
                f.seek(position)
                head = f.read(8)
                if len(head) < 8:
                    raise InputError(self.path, f"truncated: storage {key} is missing")
                (count,) = struct.unpack("<q", head)
                element = self._itemsize.get(str(key), 1)
                self.storage_offsets[str(key)] = position + 8
                self.storage_sizes[str(key)] = count * element
                position += 8 + count * element
                if position > file_size:
                    raise InputError(self.path, f"truncated: storage {key} ends past the end of the file")
        self._unpickler_globals = unpickler.opaque_globals
        return obj

    def source(self, ref: TensorRef, name: str) -> TensorSource:
        """Where the bytes of one unpickled tensor are, checked against the storage that holds them."""
        key = ref.storage.key
        if key not in self.storage_offsets:
            raise InputError(self.path, f"tensor {name!r} refers to storage {key}, which is missing from the file")
        need = (ref.offset + 1 + sum((s - 1) * st for s, st in zip(ref.shape, ref.stride))) * itemsize(ref.dtype_name)
        if 0 in ref.shape:
            need = 0
        if need > self.storage_sizes[key] or need > ref.storage.nbytes:
            raise InputError(
                self.path, f"corrupt: tensor {name!r} needs {need} bytes of storage {key}, which has {self.storage_sizes[key]}"
            )
        return TensorSource(
            path=self.path,
            offset=self.storage_offsets[key] + ref.offset * itemsize(ref.dtype_name),
            dtype_name=ref.dtype_name,
            shape=ref.shape,
            stride=ref.stride,
            storage=f"{self.path}:{key}",
        )


def _zip_data_offset(raw: Any, info: zipfile.ZipInfo) -> int:
    raw.seek(info.header_offset)
    local = raw.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise InputError(Path(raw.name), f"corrupt zip archive: bad local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


def is_tensor_dict(value: Any) -> bool:
    return isinstance(value, dict) and any(isinstance(v, TensorRef) for v in value.values())


def as_dict(value: Any) -> dict | None:
    if isinstance(value, dict):
        return value
    if isinstance(value, Opaque):
        mapping = value.as_mapping()
        return mapping or None
    return None


def check_no_quantized(path: Path, weights: dict) -> None:
    quantized = [name for name, value in weights.items() if isinstance(value, QuantizedTensorRef)]
    if quantized:
        raise UnsupportedError(
            path, f"holds torch.quantization tensors ({quantized[0]}, ...); ckptavg averages float weights only, dequantize first"
        )
