"""The hostile- and broken-input suite.

Every case builds one bad input and runs `ckptavg average GOOD... BAD -o OUT` through the real entry point.
Each must exit non-zero with exactly one line on stderr that names the file and the problem, no traceback,
nothing written (no OUT, no temporary file, no file anywhere under the test's folder: the tree is
compared before and after, with the working directory inside it), and, for pickles, nothing run: every
payload would create a marker file, and the tree comparison proves it did not appear.

`pytest tests/test_hostile.py -q` runs it; `scripts/hostile_table.py` prints the cases by category.
"""

from __future__ import annotations

import builtins
import collections
import errno
import io
import json
import os
import pickle
import shutil
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import make_state, save_layout
from safetensors.torch import save_file

MARKER = "pwned"
CASES: list = []


def case(category: str, *needles: str, code: int = 1) -> Callable:
    """Register a builder `build(folder, good, monkeypatch) -> argv` whose run must fail with `needles`."""

    def register(build: Callable) -> Callable:
        CASES.append(pytest.param(build, needles, code, id=f"{category}:{build.__name__}"))
        return build

    return register


class Calls:
    """Pickles as the call `func(*args)`: what an attacker writes into a checkpoint."""

    def __init__(self, func: Callable, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def touch(folder: Path) -> str:
    return f"touch {folder / MARKER}"


def state() -> dict[str, torch.Tensor]:
    return make_state(1)


def evil_pt(path: Path, payload: object, where: str = "extra", **save: object) -> Path:
    """A real training checkpoint with good weights and `payload` beside them."""
    torch.save({"state_dict": state(), where: {"x": payload}, "step": 3}, path, **save)
    return path


def raw_safetensors(path: Path, header: object, data: bytes = b"\0" * 16, length: int | None = None) -> Path:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


def one_tensor(**entry: object) -> dict:
    return {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16], **entry}}


def zip_entries(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def write_zip(path: Path, entries: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return path


def index_folder(folder: Path, weight_map: dict | object, kind: str = "safetensors") -> Path:
    """A sharded checkpoint folder whose index is replaced by `weight_map`."""
    save_layout(state(), folder, f"{kind}-sharded")
    name = "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
    (folder / name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def shard_map(folder: Path) -> dict[str, str]:
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]


# ---- pickles: payloads in every container, dangerous callables by name, corrupt structure -------------


@case("pickle", "evil.pt", "hostile pickle", "system")
def pt_with_os_system(d, good, mp):
    return [evil_pt(d / "evil.pt", Calls(os.system, touch(d)))]


@case("pickle", "pytorch_model.bin", "hostile pickle", "system")
def bin_in_model_folder(d, good, mp):
    (d / "model").mkdir()
    evil_pt(d / "model" / "pytorch_model.bin", Calls(os.system, touch(d)))
    return [d / "model"]


@case("pickle", "epoch=0-step=9.ckpt", "hostile pickle", "system")
def lightning_ckpt_hyper_parameters(d, good, mp):
    path = d / "epoch=0-step=9.ckpt"
    torch.save({"state_dict": state(), "hyper_parameters": Calls(os.system, touch(d)), "global_step": 9}, path)
    return [path]


@case("pickle", "evil.pth", "hostile pickle", "builtins.exec")
def pth_with_exec(d, good, mp):
    return [evil_pt(d / "evil.pth", Calls(exec, f"open('{d / MARKER}', 'w')"))]


@case("pickle", "evil.pt", "hostile pickle", "subprocess.Popen")
def subprocess_popen(d, good, mp):
    import subprocess

    return [evil_pt(d / "evil.pt", Calls(subprocess.Popen, ["touch", str(d / MARKER)]))]


@case("pickle", "pytorch_model-00002-of-00002.bin", "hostile pickle", "system")
def shard_of_a_bin_index(d, good, mp):
    folder = save_layout(state(), d / "sharded", "bin-sharded")
    shard = folder / "pytorch_model-00002-of-00002.bin"
    weights = torch.load(shard, weights_only=True)
    torch.save({**weights, "payload": Calls(os.system, touch(d))}, shard)
    return [folder]


@case("pickle", "evil.bin", "hostile pickle", "system")
def zip_whose_data_pkl_is_hostile(d, good, mp):
    return [write_zip(d / "evil.bin", {"archive/data.pkl": pickle.dumps({"w": Calls(os.system, touch(d))}, protocol=2)})]


@case("pickle", "legacy.pt", "hostile pickle", "system")
def legacy_format_payload(d, good, mp):
    return [evil_pt(d / "legacy.pt", Calls(os.system, touch(d)), _use_new_zipfile_serialization=False)]


@case("pickle", "legacy.pt", "hostile pickle", "system")
def legacy_payload_in_sys_info(d, good, mp):
    """The payload sits in the legacy header, before any weights are read."""
    parts = [0x1950A86A20F9469CFC6C, 1001, Calls(os.system, touch(d)), {"w": 1}, []]
    (d / "legacy.pt").write_bytes(b"".join(pickle.dumps(p, protocol=2) for p in parts))
    return [d / "legacy.pt"]


@case("pickle", "evil.pt", "hostile pickle", "builtins.eval")
def bare_pickle_protocol_2_eval(d, good, mp):
    (d / "evil.pt").write_bytes(pickle.dumps(Calls(eval, f"__import__('os').system('{touch(d)}')"), protocol=2))
    return [d / "evil.pt"]


@case("pickle", "evil.pt", "hostile pickle", "builtins.__import__")
def bare_pickle_protocol_4_import(d, good, mp):
    (d / "evil.pt").write_bytes(pickle.dumps(Calls(__import__, "os"), protocol=4))
    return [d / "evil.pt"]


@case("pickle", "evil.pt", "not a checkpoint")
def protocol_0_text_pickle(d, good, mp):
    (d / "evil.pt").write_bytes(f"cos\nsystem\n(S'{touch(d)}'\ntR.".encode())
    return [d / "evil.pt"]


@case("pickle", "evil.pt", "hostile pickle", "runpy.run_path")
def runpy_run_path(d, good, mp):
    import runpy

    return [evil_pt(d / "evil.pt", Calls(runpy.run_path, str(d / MARKER)))]


@case("pickle", "evil.pt", "hostile pickle", "builtins.getattr")
def getattr_indirection(d, good, mp):
    return [evil_pt(d / "evil.pt", Calls(getattr, Calls(__import__, "os"), "system"))]


@case("pickle", "evil.pt", "hostile pickle", "posix.system")
def in_optimizer_state(d, good, mp):
    payload = {"state": {0: {"exp_avg": torch.zeros(3), "hook": Calls(os.system, touch(d))}}, "param_groups": []}
    return [evil_pt(d / "evil.pt", payload, where="optimizer_state_dict")]


@case("pickle", "evil.pt", "hostile pickle", "torch.hub.load")
def torch_hub_load(d, good, mp):
    return [evil_pt(d / "evil.pt", Calls(torch.hub.load, "attacker/repo", "model"))]


@case("pickle", "evil.pt", "hostile pickle", "shutil.rmtree")
def shutil_rmtree(d, good, mp):
    return [evil_pt(d / "evil.pt", Calls(shutil.rmtree, str(d / "nothing")))]


@case("pickle", "evil.pt", "hostile pickle", "importlib.import_module")
def importlib_import_module(d, good, mp):
    import importlib

    return [evil_pt(d / "evil.pt", Calls(importlib.import_module, "os"))]


@case("pickle", "evil.pt", "hostile pickle", "ctypes")
def ctypes_cdll(d, good, mp):
    import ctypes

    return [evil_pt(d / "evil.pt", Calls(ctypes.CDLL, "libc.so.6"))]


@case("pickle", "evil.pt", "hostile pickle", "io.open")
def io_open(d, good, mp):
    return [evil_pt(d / "evil.pt", Calls(io.open, str(d / MARKER), "w"))]


@case("pickle", "big.pt", "corrupt PyTorch pickle", "bytes()")
def bytes_of_a_terabyte(d, good, mp):
    return [evil_pt(d / "big.pt", Calls(bytes, 10**12))]


@case("pickle", "big.pt", "corrupt PyTorch pickle", "bytearray()")
def bytearray_of_a_terabyte(d, good, mp):
    return [evil_pt(d / "big.pt", Calls(bytearray, 10**12))]


@case("pickle", "big.pt", "corrupt PyTorch pickle")
def claims_a_huge_bytes_object(d, good, mp):
    """BINBYTES8 with a length of 2**62: the unpickler must not allocate it."""
    data = b"\x80\x04\x8e" + struct.pack("<Q", 2**62) + b"xx"
    return [write_zip(d / "big.pt", {"archive/data.pkl": data})]


@case("pickle", "zipped.pt", "data.pkl is compressed")
def compressed_data_pkl(d, good, mp):
    torch.save(state(), d / "plain.pt")
    entries = zip_entries(d / "plain.pt")
    (d / "plain.pt").unlink()
    return [write_zip(d / "zipped.pt", entries, zipfile.ZIP_DEFLATED)]


@case("pickle", "nodata.pt", "without data.pkl")
def zip_without_data_pkl(d, good, mp):
    return [write_zip(d / "nodata.pt", {"archive/version": b"3\n"})]


@case("pickle", "nostorage.pt", "storage 0", "missing from the file")
def storage_record_missing(d, good, mp):
    torch.save(state(), d / "full.pt")
    entries = {k: v for k, v in zip_entries(d / "full.pt").items() if not k.endswith("data/0")}
    (d / "full.pt").unlink()
    return [write_zip(d / "nostorage.pt", entries)]


class _Tensor:
    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, ("S", 0, (100,), (1,), False, collections.OrderedDict()))


class _StoragePickler(pickle.Pickler):
    def persistent_id(self, obj):
        return ("storage", torch.FloatStorage, "0", "cpu", 4) if obj == "S" else None


@case("pickle", "short.pt", "needs 400 bytes of storage 0")
def tensor_larger_than_its_storage(d, good, mp):
    buffer = io.BytesIO()
    _StoragePickler(buffer, protocol=2).dump({"w": _Tensor()})
    return [write_zip(d / "short.pt", {"archive/data.pkl": buffer.getvalue(), "archive/data/0": b"\0" * 16})]


@case("pickle", "big-endian.pt", "big-endian")
def big_endian(d, good, mp):
    torch.save(state(), d / "le.pt")
    entries = {k: (b"big" if k.endswith("byteorder") else v) for k, v in zip_entries(d / "le.pt").items()}
    (d / "le.pt").unlink()
    return [write_zip(d / "big-endian.pt", entries)]


@case("pickle", "cut.pt", "corrupt or truncated zip")
def truncated_zip(d, good, mp):
    torch.save(state(), d / "cut.pt")
    data = (d / "cut.pt").read_bytes()
    (d / "cut.pt").write_bytes(data[: len(data) // 2])
    return [d / "cut.pt"]


@case("pickle", "cut.pt", "truncated")
def truncated_legacy(d, good, mp):
    torch.save(state(), d / "cut.pt", _use_new_zipfile_serialization=False)
    data = (d / "cut.pt").read_bytes()
    (d / "cut.pt").write_bytes(data[: len(data) - 200])
    return [d / "cut.pt"]


@case("pickle", "list.pt", "holds a list, not a dict of tensors")
def not_a_dict(d, good, mp):
    torch.save([torch.zeros(2)], d / "list.pt")
    return [d / "list.pt"]


@case("pickle", "module.pt", "torch.nn.modules.linear.Linear object, not a state dict")
def whole_module_pickled(d, good, mp):
    torch.save({"model": torch.nn.Linear(2, 2)}, d / "module.pt")
    return [d / "module.pt"]


@case("pickle", "magic.pt", "without torch's magic number")
def legacy_without_magic(d, good, mp):
    (d / "magic.pt").write_bytes(pickle.dumps(12345, protocol=2) + pickle.dumps({}, protocol=2))
    return [d / "magic.pt"]


@case("pickle", "persistent.pt", "unknown persistent id")
def unknown_persistent_id(d, good, mp):
    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("module", "os") if obj == "P" else None

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump({"w": "P"})
    return [write_zip(d / "persistent.pt", {"archive/data.pkl": buffer.getvalue()})]


# ---- safetensors: every field of the header, and the data behind it ----------------------------------


@case("safetensors", "x.safetensors", "truncated: header needs")
def header_length_beyond_the_file(d, good, mp):
    return [raw_safetensors(d / "x.safetensors", one_tensor(), length=10**6)]


@case("safetensors", "x.safetensors", "header length 9223372036854775807 is implausible")
def header_length_absurd(d, good, mp):
    return [raw_safetensors(d / "x.safetensors", one_tensor(), length=2**63 - 1)]


@case("safetensors", "x.safetensors", "not valid JSON")
def header_length_zero(d, good, mp):
    return [raw_safetensors(d / "x.safetensors", b"", b"{}" + b"\0" * 14)]


@case("safetensors", "x.safetensors", "not valid JSON")
def header_invalid_json(d, good, mp):
    return [raw_safetensors(d / "x.safetensors", b'{"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]')]


@case("safetensors", "x.safetensors", "not valid JSON")
def header_not_utf8(d, good, mp):
    return [raw_safetensors(d / "x.safetensors", b'{"\xff\xfe": 1}')]


@case("safetensors", "x.safetensors", "not valid JSON")
def header_nested_too_deep(d, good, mp):
    return [raw_safetensors(d / "x.safetensors", b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}")]


@case("safetensors", "x.safetensors", "neither safetensors nor a PyTorch pickle")
def header_is_a_list(d, good, mp):
    return [raw_safetensors(d / "x.safetensors", b"[1, 2, 3]       ")]


@case("safetensors", "x.safetensors", "tensor 'w' is listed twice")
def duplicate_names(d, good, mp):
    entry = '{"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}'
    return [raw_safetensors(d / "x.safetensors", f'{{"w": {entry}, "w": {entry}}}'.encode())]


@case("safetensors", "x.safetensors", "starts at byte 8, expected 16")
def overlapping_offsets(d, good, mp):
    header = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    }
    return [raw_safetensors(d / "x.safetensors", header, b"\0" * 24)]


@case("safetensors", "x.safetensors", "starts at byte 32, expected 16")
def gap_between_tensors(d, good, mp):
    header = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [32, 48]},
    }
    return [raw_safetensors(d / "x.safetensors", header, b"\0" * 48)]


# One field of a valid one-tensor header changed: (case, what the error must say, the changed fields).
HEADER_FIELD_CASES = [
    ("offsets_outside_the_data", "truncated: header says 4016 bytes", dict(shape=[1004], data_offsets=[0, 4016])),
    ("end_before_begin", "has -16 bytes for shape [2, 2]", dict(data_offsets=[16, 0])),
    ("shape_does_not_match_the_span", "has 16 bytes for shape [3, 3] F32", dict(shape=[3, 3])),
    ("dtype_does_not_match_the_span", "has 16 bytes for shape [2, 2] F64", dict(dtype="F64")),
    ("huge_shape_small_span", "has 16 bytes for shape [1099511627776, 1099511627776]", dict(shape=[2**40, 2**40])),
    ("unknown_dtype", "dtype F12, which ckptavg does not handle", dict(dtype="F12")),
    ("packed_fp4_outside_a_scheme", "is F4 (4-bit floats, two per byte) outside a known quantization scheme", dict(dtype="F4")),
    ("dtype_not_a_string", "bad dtype, shape or data_offsets for tensor 'w'", dict(dtype=32)),
    ("negative_dimension", "bad dtype, shape or data_offsets", dict(shape=[-2, -2])),
    ("fractional_dimension", "bad dtype, shape or data_offsets", dict(shape=[2.0, 2.5])),
    ("shape_is_a_string", "bad dtype, shape or data_offsets", dict(shape="2x2")),
    ("three_offsets", "bad dtype, shape or data_offsets", dict(data_offsets=[0, 8, 16])),
]


def header_field_case(name: str, needle: str, fields: dict) -> None:
    def build(d, good, mp):
        return [raw_safetensors(d / "x.safetensors", one_tensor(**fields))]

    build.__name__ = name
    case("safetensors", "x.safetensors", needle)(build)


for name, needle, fields in HEADER_FIELD_CASES:
    header_field_case(name, needle, fields)


@case("safetensors", "x.safetensors", "bad dtype, shape or data_offsets")
def offsets_missing(d, good, mp):
    return [raw_safetensors(d / "x.safetensors", {"w": {"dtype": "F32", "shape": [2, 2]}})]


@case("safetensors", "x.safetensors", "entry for tensor 'w' is not an object")
def entry_not_an_object(d, good, mp):
    return [raw_safetensors(d / "x.safetensors", {"w": [0, 16]})]


@case("safetensors", "x.safetensors", "__metadata__ is not an object")
def metadata_not_an_object(d, good, mp):
    return [raw_safetensors(d / "x.safetensors", {**one_tensor(), "__metadata__": ["format", "pt"]})]


@case("safetensors", "x.safetensors", "truncated: header says 16 bytes of tensor data, file has 10")
def truncated_data(d, good, mp):
    return [raw_safetensors(d / "x.safetensors", one_tensor(), b"\0" * 10)]


@case("safetensors", "x.safetensors", "truncated")
def truncated_real_file(d, good, mp):
    save_file(state(), d / "x.safetensors")
    data = (d / "x.safetensors").read_bytes()
    (d / "x.safetensors").write_bytes(data[:-100])
    return [d / "x.safetensors"]


@case("safetensors", "x.safetensors", "empty file (0 bytes)")
def zero_length_file(d, good, mp):
    (d / "x.safetensors").write_bytes(b"")
    return [d / "x.safetensors"]


@case("safetensors", "x.safetensors", "neither safetensors nor a PyTorch pickle")
def seven_byte_file(d, good, mp):
    (d / "x.safetensors").write_bytes(b"\x10\0\0\0\0\0\0")
    return [d / "x.safetensors"]


@case("safetensors", "x.safetensors", "4 bytes after the last tensor")
def trailing_bytes(d, good, mp):
    return [raw_safetensors(d / "x.safetensors", one_tensor(), b"\0" * 20)]


@case("safetensors", "x.safetensors", "not a checkpoint ckptavg can read")
def random_bytes(d, good, mp):
    (d / "x.safetensors").write_bytes(bytes(range(256)) * 4)
    return [d / "x.safetensors"]


@case("safetensors", "x.gguf", "GGUF")
def gguf_file(d, good, mp):
    (d / "x.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    return [d / "x.gguf"]


@case("safetensors", "x.npy", "NumPy .npy")
def npy_file(d, good, mp):
    (d / "x.npy").write_bytes(b"\x93NUMPY\x01\x00" + b"\0" * 60)
    return [d / "x.npy"]


@case("safetensors", "nan.safetensors", "layer.0.weight", "element 148")
def nan_values(d, good, mp):
    weights = state()
    weights["layer.0.weight"][3, 4] = float("nan")
    save_file(weights, d / "nan.safetensors")
    return [d / "nan.safetensors"]


@case("safetensors", "inf.safetensors", "layer.0.bias")
def inf_values(d, good, mp):
    weights = state()
    weights["layer.0.bias"][7] = float("-inf")
    save_file(weights, d / "inf.safetensors")
    return [d / "inf.safetensors"]


@case("safetensors", "shape.safetensors", "layer.0.weight has shape [48, 47], expected [48, 48]")
def shape_differs_between_inputs(d, good, mp):
    weights = state()
    weights["layer.0.weight"] = torch.zeros(48, 47)
    save_file(weights, d / "shape.safetensors")
    return [d / "shape.safetensors"]


@case("safetensors", "dtype.safetensors", "layer.0.bias is float16, expected float32")
def dtype_differs_between_inputs(d, good, mp):
    weights = state()
    weights["layer.0.bias"] = weights["layer.0.bias"].half()
    save_file(weights, d / "dtype.safetensors")
    return [d / "dtype.safetensors"]


@case("safetensors", "missing.safetensors", "missing 1 tensor(s)", "layer.0.bias")
def tensor_missing_from_one_input(d, good, mp):
    weights = state()
    del weights["layer.0.bias"]
    save_file(weights, d / "missing.safetensors")
    return [d / "missing.safetensors"]


@case("safetensors", "new\\nline.safetensors", "empty file")
def file_name_with_a_line_break(d, good, mp):
    """A name from the file system is printed escaped, so the error stays one line."""
    (d / "new\nline.safetensors").write_bytes(b"")
    return [d / "new\nline.safetensors"]


# ---- index files: shards outside the folder, missing, or not what the index says ----------------------


@case("index", "model.safetensors.index.json", "'../../etc/passwd' is outside the checkpoint folder")
def shard_escapes_with_dotdot(d, good, mp):
    return [index_folder(d / "ckpt", {"embed.weight": "../../etc/passwd"})]


@case("index", "model.safetensors.index.json", "'/etc/passwd' is outside the checkpoint folder")
def shard_is_an_absolute_path(d, good, mp):
    return [index_folder(d / "ckpt", {"embed.weight": "/etc/passwd"})]


@case("index", "model.safetensors.index.json", "symlink that leads outside the checkpoint folder")
def shard_is_a_symlink_out_of_the_folder(d, good, mp):
    folder = index_folder(d / "ckpt", {})
    save_file(state(), d / "elsewhere.safetensors")
    (folder / "model-00001-of-00002.safetensors").unlink()
    (folder / "model-00001-of-00002.safetensors").symlink_to(d / "elsewhere.safetensors")
    weight_map = {name: "model-00001-of-00002.safetensors" for name in state()}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return [folder]


@case("index", "model.safetensors.index.json", "shard model-00003-of-00003.safetensors is missing")
def shard_missing(d, good, mp):
    return [index_folder(d / "ckpt", {name: "model-00003-of-00003.safetensors" for name in state()})]


@case("index", "model-00001-of-00002.safetensors", "index lists tensor 'extra.weight' but the shard does not hold it")
def tensor_listed_but_absent(d, good, mp):
    folder = save_layout(state(), d / "ckpt", "safetensors-sharded")
    weight_map = {**shard_map(folder), "extra.weight": "model-00001-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return [folder]


@case("index", "model.safetensors.index.json", "corrupt index")
def index_not_json(d, good, mp):
    folder = save_layout(state(), d / "ckpt", "safetensors-sharded")
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {')
    return [folder]


@case("index", "model.safetensors.index.json", "corrupt index")
def index_without_weight_map(d, good, mp):
    folder = save_layout(state(), d / "ckpt", "safetensors-sharded")
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
    return [folder]


@case("index", "model.safetensors.index.json", "corrupt index")
def weight_map_values_not_strings(d, good, mp):
    return [index_folder(d / "ckpt", {"embed.weight": ["model-00001-of-00002.safetensors"]})]


@case("index", "model.safetensors.index.json", "corrupt index")
def weight_map_is_a_list(d, good, mp):
    return [index_folder(d / "ckpt", ["model-00001-of-00002.safetensors"])]


@case("index", "shard.safetensors", "not a regular file")
def shard_is_a_folder(d, good, mp):
    folder = index_folder(d / "ckpt", {name: "shard.safetensors" for name in state()})
    (folder / "shard.safetensors").mkdir()
    return [folder]


@case("index", "model.safetensors.index.json", "not a checkpoint ckptavg can read")
def shard_is_the_index_itself(d, good, mp):
    return [index_folder(d / "ckpt", {name: "model.safetensors.index.json" for name in state()})]


@case("index", "ckpt", "no tensors found")
def weight_map_empty(d, good, mp):
    return [index_folder(d / "ckpt", {})]


@case("index", "loop.safetensors", "symlink loop")
def shard_is_a_symlink_loop(d, good, mp):
    folder = index_folder(d / "ckpt", {name: "loop.safetensors" for name in state()})
    (folder / "loop.safetensors").symlink_to(folder / "loop.safetensors")
    return [folder]


@case("index", "model-00002-of-00002.safetensors", "truncated")
def shard_truncated(d, good, mp):
    folder = save_layout(state(), d / "ckpt", "safetensors-sharded")
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])
    return [folder]


@case("index", "model.safetensors.index.json", "outside the checkpoint folder")
def shard_in_a_sibling_folder(d, good, mp):
    save_layout(state(), d / "other", "safetensors-folder")
    return [index_folder(d / "ckpt", {name: "../other/model.safetensors" for name in state()})]


# ---- folders and paths: links, permissions, repeats, outputs that are inputs --------------------------


@case("folder", "loop", "symlink loop")
def input_is_a_symlink_loop(d, good, mp):
    (d / "loop").symlink_to(d / "loop")
    return [d / "loop"]


@case("folder", "dangling", "broken symlink to")
def input_is_a_broken_symlink(d, good, mp):
    (d / "dangling").symlink_to(d / "gone.safetensors")
    return [d / "dangling"]


@case("folder", "model.safetensors", "symlink loop")
def weights_in_folder_are_a_symlink_loop(d, good, mp):
    (d / "ckpt").mkdir()
    (d / "ckpt" / "model.safetensors").symlink_to(d / "ckpt" / "model.safetensors")
    return [d / "ckpt"]


@case("folder", "ckpt", "no weights found")
def folder_links_to_itself(d, good, mp):
    (d / "ckpt").mkdir()
    (d / "ckpt" / "again").symlink_to(d / "ckpt")
    return [d / "ckpt"]


DENIED: set[str] = set()


def deny(mp: pytest.MonkeyPatch, path: Path) -> None:
    """Make `path` unreadable: chmod 000, and for root (who reads it anyway) EACCES from every open
    while the case runs."""
    path.chmod(0)
    if os.geteuid() != 0:
        return
    DENIED.add(str(path))

    def guard(call: Callable) -> Callable:
        def wrapped(file, *args, **kwargs):
            if str(file) in DENIED:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
            return call(file, *args, **kwargs)

        return wrapped

    mp.setattr(builtins, "open", guard(builtins.open))
    mp.setattr(os, "open", guard(os.open))
    mp.setattr(os, "listdir", guard(os.listdir))
    mp.setattr(os, "scandir", guard(os.scandir))


@case("folder", "locked.safetensors", "cannot read: Permission denied")
def unreadable_file(d, good, mp):
    save_file(state(), d / "locked.safetensors")
    deny(mp, d / "locked.safetensors")
    return [d / "locked.safetensors"]


@case("folder", "locked", "cannot read: Permission denied")
def unreadable_folder(d, good, mp):
    save_layout(state(), d / "locked", "safetensors-folder")
    deny(mp, d / "locked")
    return [d / "locked"]


@case("folder", "pytorch_model-00001-of-00002.bin", "cannot read: Permission denied")
def unreadable_shard(d, good, mp):
    folder = save_layout(state(), d / "ckpt", "bin-sharded")
    deny(mp, folder / "pytorch_model-00001-of-00002.bin")
    return [folder]


@case("folder", "given twice", code=2)
def folder_given_twice(d, good, mp):
    folder = save_layout(state(), d / "ckpt", "safetensors-folder")
    return [folder, folder]


@case("folder", "given twice", code=2)
def same_folder_spelled_two_ways(d, good, mp):
    folder = save_layout(state(), d / "ckpt", "safetensors-folder")
    return [folder, d / "." / "ckpt" / ".." / "ckpt"]


@case("folder", "link.safetensors", "given twice", code=2)
def file_and_a_symlink_to_it(d, good, mp):
    (d / "link.safetensors").symlink_to(good[0])
    return [d / "link.safetensors"]


@case("folder", "given twice", code=2)
def folder_and_its_weights_file(d, good, mp):
    folder = save_layout(state(), d / "ckpt", "safetensors-folder")
    return [folder, folder / "model.safetensors"]


@case("folder", "is one of the inputs", code=3)
def output_is_an_input_file(d, good, mp):
    return ["-o", good[0]]


@case("folder", "is one of the inputs", code=3)
def output_is_an_input_folder(d, good, mp):
    folder = save_layout(state(), d / "ckpt", "safetensors-folder")
    return [folder, "-o", folder]


@case("folder", "holds the input", code=3)
def output_would_replace_an_input(d, good, mp):
    folder = save_layout(state(), d / "run" / "checkpoint-1", "safetensors-folder")
    return [folder, "-o", d / "run", "--overwrite"]


@case("folder", "fifo", "not a regular file or folder")
def input_is_a_fifo(d, good, mp):
    os.mkfifo(d / "fifo")
    return [d / "fifo"]


@case("folder", "/dev/zero", "not a regular file or folder")
def input_is_a_device(d, good, mp):
    return ["/dev/zero"]


@case("folder", "empty", "no weights found")
def empty_folder(d, good, mp):
    (d / "empty").mkdir()
    return [d / "empty"]


@case("folder", "state", "no weights found")
def training_state_only(d, good, mp):
    (d / "state").mkdir()
    torch.save({"state": {}}, d / "state" / "optimizer.pt")
    (d / "state" / "trainer_state.json").write_text("{}")
    return [d / "state"]


@case("folder", "several weight files")
def ambiguous_folder(d, good, mp):
    (d / "two").mkdir()
    torch.save(state(), d / "two" / "a.pt")
    torch.save(state(), d / "two" / "b.pt")
    return [d / "two"]


@case("folder", "holds checkpoint folders")
def run_folder_instead_of_checkpoints(d, good, mp):
    save_layout(state(), d / "run", "hf-trainer", step=1)
    return [d / "run"]


@case("folder", "nope", "no such file or folder")
def missing_path(d, good, mp):
    return [d / "nope"]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    return [save_layout(make_state(s), root / f"good{s}", "safetensors") for s in range(2)]


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under `root` (links not followed) with, for files, its size and mtime.

    A folder's own mtime is left out: creating and removing the staged output touches it, by design."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            info = path.lstat()
            found[str(path.relative_to(root))] = (0, 0) if name in dirs else (info.st_size, info.st_mtime_ns)
    return found


@pytest.mark.parametrize("build, needles, code", CASES)
def test_bad_input_fails_cleanly(cli, tmp_path, good, monkeypatch, build, needles, code):
    folder = tmp_path / "case"
    folder.mkdir()
    monkeypatch.chdir(folder)
    args = [str(a) for a in build(folder, good, monkeypatch)]
    if "-o" not in args:
        args += ["-o", str(folder / "out")]
    denied = set(DENIED)
    DENIED.clear()
    before, good_before = tree(tmp_path), tree(good[0].parents[1])
    DENIED.update(denied)
    try:
        result = cli("average", *map(str, good), *args)
    finally:
        DENIED.clear()
        monkeypatch.undo()
    assert result.code == code, (result.code, result.err)
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    assert "Traceback" not in result.err and "internal error" not in result.err, result.err
    if os.environ.get("CKPTAVG_SHOW_ERRORS"):
        print(f"\n{build.__name__}: exit {result.code}: {lines[0]}")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not (folder / MARKER).exists(), "a payload ran"
    assert tree(tmp_path) == before, "something was written"
    assert tree(good[0].parents[1]) == good_before


def test_there_are_enough_cases():
    by_category = collections.Counter(param.id.split(":")[0] for param in CASES)
    assert sum(by_category.values()) >= 60 and set(by_category) == {"pickle", "safetensors", "index", "folder"}
