"""Property-based tests of the readers: random valid files are read exactly as the reference libraries read
them; random mutations of them either read exactly as the reference reads them or fail with CkptavgError,
never another exception, a hang (each example has a deadline) or a huge allocation (the process would die).
Where the reference refuses a mutated file that ckptavg reads (torch checks records ckptavg never needs, such
as `.data/serialization_id`), what ckptavg reads must have the names, dtypes and shapes that were saved; the
bytes may differ, as neither reader checks the zip's CRC-32 of tensor data (a flipped bit in it reads as
the flipped value in torch.load too).

References: the safetensors library (`safe_open`) and `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from ckptavg.checkpoint import open_checkpoint
from ckptavg.errors import CkptavgError
from ckptavg.formats.base import FILES
from ckptavg.formats.quantized import QUANTIZED_NAME_MARKERS
from ckptavg.formats.safetensors_io import read_safetensors

# CKPTAVG_EXAMPLES=5000 for a longer (and random) hunt than the test suite's; the suite's own examples are the same every
# run, so that CI never fails on a draw it has not made before
SETTINGS = settings(
    max_examples=int(os.environ.get("CKPTAVG_EXAMPLES", 150)),
    derandomize="CKPTAVG_EXAMPLES" not in os.environ,
    deadline=5000,
    suppress_health_check=[HealthCheck.too_slow],
)
DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
]
# names that mark quantized weights (`.qweight`, ...) are refused on purpose, and a tensor named __metadata__
# makes a file that safetensors itself cannot read: neither is drawn
names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12).filter(
    lambda n: not n.endswith(QUANTIZED_NAME_MARKERS) and n != "__metadata__"
)
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3)


@st.composite
def tensors(draw) -> torch.Tensor:
    dtype, shape = draw(st.sampled_from(DTYPES)), draw(shapes)
    numel = 1
    for size in shape:
        numel *= size
    raw = draw(st.binary(min_size=numel * dtype.itemsize, max_size=numel * dtype.itemsize))
    if dtype == torch.bool:
        raw = bytes(b & 1 for b in raw)
    return (
        torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape) if raw else torch.empty(shape, dtype=dtype)
    )


state_dicts = st.dictionaries(names, tensors(), min_size=1, max_size=5)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN payloads included)."""
    return a.dtype == b.dtype and a.shape == b.shape and raw_bytes(a) == raw_bytes(b)


def raw_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).tolist())


def ours_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        tensors, _ = read_safetensors(path)
        return {name: src.read() for name, src in tensors.items()}
    finally:
        FILES.close()


def reference_safetensors(path: Path) -> dict[str, torch.Tensor] | None:
    try:
        with safe_open(str(path), "pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception:
        return None


def check_against_reference(path: Path, read, reference, saved: dict[str, torch.Tensor]) -> None:
    """Ours reads exactly what the reference reads (or, where it refuses the file, the names, dtypes and
    shapes that were saved), or fails with CkptavgError."""
    try:
        got = read(path)
    except CkptavgError:
        return
    want = reference(path)
    if want is None:
        assert {k: (v.dtype, v.shape) for k, v in got.items()} == {k: (v.dtype, v.shape) for k, v in saved.items()}
        return
    assert got.keys() == want.keys()
    for name in want:
        assert same(got[name], want[name]), name


@SETTINGS
@given(state=state_dicts)
def test_valid_safetensors_read_exactly_as_the_library_reads_them(state):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.safetensors"
        save_file(state, path)
        got = ours_safetensors(path)
        want = reference_safetensors(path)
        assert want is not None and got.keys() == want.keys()
        assert all(same(got[k], want[k]) for k in want)


@st.composite
def mutated_safetensors(draw) -> tuple[bytes, dict]:
    state = draw(state_dicts)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.safetensors"
        save_file(state, path)
        data = bytearray(path.read_bytes())
    (header_length,) = struct.unpack("<Q", data[:8])
    how = draw(st.sampled_from(["flip", "truncate", "length", "header"]))
    if how == "flip":
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, min(len(data), 8 + header_length + 16) - 1))
            data[at] = draw(st.integers(0, 255))
    elif how == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "length":
        data[:8] = struct.pack("<Q", draw(st.one_of(st.integers(0, 2 * header_length), st.integers(0, 2**64 - 1))))
    else:
        header = json.loads(data[8 : 8 + header_length])
        name = draw(st.sampled_from(sorted(header)))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "entry", "duplicate"]))
        values = st.recursive(
            st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.floats() | st.text(max_size=5),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
            max_leaves=6,
        )
        text = json.dumps(header)
        if field == "entry":
            header[name] = draw(values)
            text = json.dumps(header)
        elif field == "duplicate":
            text = text[:-1] + f", {json.dumps(name)}: {json.dumps(header[name])}}}"
        elif isinstance(header[name], dict):
            header[name][field] = draw(st.one_of(values, st.sampled_from(["F32", "I64", "F8_E4M3", "F4", "BOOL"])))
            text = json.dumps(header)
        raw = text.encode()
        data = bytearray(struct.pack("<Q", len(raw)) + raw + data[8 + header_length :])
    return bytes(data), state


@SETTINGS
@given(mutated=mutated_safetensors())
def test_mutated_safetensors_read_as_the_library_or_fail_with_our_error(mutated):
    data, saved = mutated
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.safetensors"
        path.write_bytes(data)
        check_against_reference(path, ours_safetensors, reference_safetensors, saved)


@st.composite
def checkpoints(draw) -> dict:
    """A state dict with views (slices, transposes) and tensors sharing storage, as training code saves."""
    state = draw(state_dicts)
    for name, tensor in list(state.items()):
        kind = draw(st.sampled_from(["plain", "slice", "transpose", "shared"]))
        if kind == "slice" and tensor.dim() >= 1 and tensor.shape[0] > 1:
            state[name] = tensor[1:]
        elif kind == "transpose" and tensor.dim() >= 2:
            state[name] = tensor.transpose(0, 1)
        elif kind == "shared":
            state[name + ".tied"] = tensor
    return state


def ours_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        ckpt = open_checkpoint(path)
        return {name: src.read() for name, src in ckpt.tensors.items()}
    finally:
        FILES.close()


def reference_torch(path: Path) -> dict[str, torch.Tensor] | None:
    try:
        loaded = torch.load(path, weights_only=True)
    except Exception:
        return None
    weights = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    return {k: v for k, v in weights.items() if isinstance(v, torch.Tensor)} if isinstance(weights, dict) else None


@SETTINGS
@given(state=checkpoints(), legacy=st.booleans(), nested=st.booleans())
def test_valid_torch_checkpoints_read_exactly_as_torch_load_reads_them(state, legacy, nested):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.pt"
        obj = {"state_dict": state, "step": 3, "optimizer": {"lr": 0.1}} if nested else state
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
        got, want = ours_torch(path), reference_torch(path)
        assert want is not None and got.keys() == want.keys()
        assert all(same(got[k], want[k]) for k in want)


@SETTINGS
@given(state=checkpoints(), legacy=st.booleans(), data=st.data())
def test_mutated_torch_checkpoints_read_as_torch_or_fail_with_our_error(state, legacy, data):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.pt"
        torch.save(state, path, _use_new_zipfile_serialization=not legacy)
        saved = reference_torch(path)
        raw = bytearray(path.read_bytes())
        # positions are drawn independently of the file's length, which varies from save to save
        if data.draw(st.booleans()):
            raw = raw[: data.draw(st.integers(0, 2**20)) % len(raw)]
        for _ in range(data.draw(st.integers(1, 4))):
            if raw:
                raw[data.draw(st.integers(0, 2**20)) % len(raw)] = data.draw(st.integers(0, 255))
        path.write_bytes(bytes(raw))
        check_against_reference(path, ours_torch, reference_torch, saved)


@pytest.mark.parametrize("length", [2**63 - 1, 2**40, 10**8])
def test_an_absurd_header_length_is_refused_without_allocating_it(tmp_path, length):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", length) + b"{}")
    with pytest.raises(CkptavgError):
        read_safetensors(path)
