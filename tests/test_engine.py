"""The engine's memory bound and the writer's write-behind, measured rather than assumed."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from ckptavg.formats import writer as writer_module
from ckptavg.formats.writer import WriteBehind

MEASURE_RSS = r"""
import json, resource, sys, ckptavg, torch
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
before = rss()
ckptavg.average(sys.argv[3:], sys.argv[1], memory_budget=sys.argv[2])
print(json.dumps({"before": before, "after": rss()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc")
def test_peak_memory_is_the_budget_not_the_model(tmp_path):
    """Four inputs of one 128 MB FP32 tensor each: the process's peak RSS grows by about the budget (16 MB),
    not by the 128 MB tensor, let alone the 512 MB of inputs."""
    paths = []
    for seed in range(4):
        path = tmp_path / f"in{seed}.safetensors"
        save_file({"big": torch.randn(32 << 20, generator=torch.Generator().manual_seed(seed))}, path)
        paths.append(str(path))
    result = subprocess.run(
        [sys.executable, "-c", MEASURE_RSS, str(tmp_path / "out"), "16MiB", *paths], capture_output=True, text=True, check=True
    )
    rss = json.loads(result.stdout)
    grown = rss["after"] - rss["before"]
    assert grown < 48 << 20, f"peak RSS grew by {grown >> 20} MiB for a 16 MiB budget"


def test_write_behind_starts_each_window_then_waits_for_and_drops_the_one_before(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(writer_module, "FLUSH_EVERY", 100)
    monkeypatch.setattr(
        writer_module, "SYNC_FILE_RANGE", lambda fd, offset, length, flags: calls.append(("range", offset, length, flags)) or 0
    )
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: calls.append(("drop", offset, length, advice)))
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(("fsync",)))
    with open(tmp_path / "f", "wb") as f:
        flush = WriteBehind(f.fileno())
        for _ in range(7):
            flush.wrote(50)
        flush.finish()
    start, wait = writer_module.START_WRITE, writer_module.WAIT_BEFORE | writer_module.START_WRITE | writer_module.WAIT_AFTER
    dontneed = os.POSIX_FADV_DONTNEED
    assert calls == [
        ("range", 0, 100, start),
        ("range", 100, 100, start),
        ("range", 0, 100, wait),
        ("drop", 0, 100, dontneed),
        ("range", 200, 100, start),
        ("range", 100, 100, wait),
        ("drop", 100, 100, dontneed),
        ("fsync",),
        ("drop", 200, 0, dontneed),
    ]


def test_write_behind_without_sync_file_range_falls_back_to_fdatasync(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(writer_module, "FLUSH_EVERY", 100)
    monkeypatch.setattr(writer_module, "SYNC_FILE_RANGE", None)
    monkeypatch.setattr(os, "fdatasync", lambda fd: synced.append(fd))
    with open(tmp_path / "f", "wb") as f:
        flush = WriteBehind(f.fileno())
        for _ in range(5):
            flush.wrote(50)
    assert len(synced) == 2


def _pieces(seed: int) -> list[bytes]:
    """Byte strings of awkward lengths: around the block size, the staging buffer's size, and odd ones."""
    g = torch.Generator().manual_seed(seed)
    lengths = [13, 1, 4083, 4096, 4097, 3 * writer_module.DIRECT_STAGING + 7, 0, 65_537, 5]
    return [bytes(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).tolist()) for n in lengths]


def _direct_supported(path) -> bool:
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | writer_module.O_DIRECT, 0o644))
        return True
    except OSError:
        return False
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.skipif(not writer_module.O_DIRECT, reason="no O_DIRECT on this platform")
def test_a_direct_output_file_writes_aligned_blocks_and_exactly_the_bytes_given(tmp_path, monkeypatch):
    if not _direct_supported(tmp_path / "probe"):
        pytest.skip("this file system refuses O_DIRECT")
    import ctypes
    import fcntl

    calls = []
    real_pwrite = os.pwrite

    def recording_pwrite(fd, data, offset):
        view = memoryview(data)
        calls.append((offset, len(view), ctypes.addressof(ctypes.c_char.from_buffer(view))))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", recording_pwrite)
    pieces = _pieces(0)
    out = writer_module.create_output_file(tmp_path / "f", durable=True)
    assert isinstance(out, writer_module.DirectFile) and fcntl.fcntl(out.fd, fcntl.F_GETFL) & writer_module.O_DIRECT
    for piece in pieces:
        out.write(memoryview(piece))
    out.finish()
    os.close(out.fd)
    assert (tmp_path / "f").read_bytes() == b"".join(pieces) and out.size == sum(map(len, pieces))
    align = writer_module.DIRECT_ALIGN
    assert calls and all(
        offset % align == 0 and length % align == 0 and address % align == 0 for offset, length, address in calls
    )


def test_a_direct_output_file_can_be_read_back_mid_write(tmp_path):
    """flush() puts the partial last block on disk (padded), so the bytes so far read back; writing goes on after it."""
    pieces = _pieces(1)
    out = writer_module.create_output_file(tmp_path / "f", durable=True)
    for i, piece in enumerate(pieces):
        out.write(memoryview(piece))
        out.flush()
        with open(tmp_path / "f", "rb") as f:
            assert f.read(out.size) == b"".join(pieces[: i + 1])
    out.finish()
    os.close(out.fd)
    assert (tmp_path / "f").read_bytes() == b"".join(pieces)


@pytest.mark.parametrize("refused_at", ["open", "write"])
def test_a_file_system_refusing_direct_writes_gets_the_bytes_through_the_page_cache(tmp_path, monkeypatch, refused_at):
    real_open, real_pwrite = os.open, os.pwrite

    def open_refusing_direct(path, flags, *args):
        if flags & writer_module.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_open(path, flags, *args)

    def pwrite_refusing_direct(fd, data, offset):
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    monkeypatch.setattr(
        os,
        refused_at if refused_at == "open" else "pwrite",
        open_refusing_direct if refused_at == "open" else pwrite_refusing_direct,
    )
    pieces = _pieces(2)
    out = writer_module.create_output_file(tmp_path / "f", durable=True)
    for piece in pieces:
        out.write(memoryview(piece))
    out.flush()
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    out.finish()
    os.close(out.fd)
    assert (tmp_path / "f").read_bytes() == b"".join(pieces)


def test_no_fsync_writes_through_the_page_cache(tmp_path):
    out = writer_module.create_output_file(tmp_path / "f", durable=False)
    assert isinstance(out, writer_module.BufferedFile)
    os.close(out.fd)


def test_a_tied_tensor_repeated_from_a_direct_file_reads_back_its_bytes(tmp_path):
    """repeat() reads the tensor already written back from the file: bytes still in the staging buffer must be on
    disk by then."""
    from safetensors.torch import load_file

    from ckptavg.formats.base import tensor_buffer
    from ckptavg.formats.writer import SafetensorsWriter, TensorSpec

    a, c = torch.randn(1000), torch.randn(3)
    specs = [
        TensorSpec("a", torch.float32, (1000,)),
        TensorSpec("b", torch.float32, (1000,)),
        TensorSpec("c", torch.float32, (3,)),
    ]
    writer = SafetensorsWriter([tmp_path / "m.safetensors"], [specs], {"format": "pt"})
    writer.write(tensor_buffer(a))
    writer.repeat("a")
    writer.write(tensor_buffer(c))
    writer.finish()
    got = load_file(tmp_path / "m.safetensors")
    assert torch.equal(got["a"], a) and torch.equal(got["b"], a) and torch.equal(got["c"], c)


def test_tensor_bytes_start_on_a_block_and_aligned_chunks_are_written_without_a_copy(tmp_path, monkeypatch):
    """The header is padded (with the spaces the format allows) so the tensors start on a 4 KiB block; a chunk
    that starts a block in the file and a page in memory goes to pwrite as it is, not through the staging buffer."""
    import ctypes
    import mmap

    from ckptavg.formats.writer import TensorSpec, encode_header

    header = encode_header([TensorSpec("w", torch.bfloat16, (3, 5))], {"format": "pt"})
    assert len(header) % writer_module.DIRECT_ALIGN == 0 and header.rstrip(b" ").endswith(b"}")
    if not _direct_supported(tmp_path / "probe"):
        pytest.skip("this file system refuses O_DIRECT")
    chunk = memoryview(mmap.mmap(-1, 3 * writer_module.DIRECT_ALIGN))  # page-aligned, as the engine's chunks are
    chunk[:] = bytes(range(256)) * (len(chunk) // 256)
    sources = []
    real_pwrite = os.pwrite

    def recording_pwrite(fd, data, offset):
        sources.append(ctypes.addressof(ctypes.c_char.from_buffer(memoryview(data))))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", recording_pwrite)
    out = writer_module.create_output_file(tmp_path / "f", durable=True)
    out.write(memoryview(header))
    out.write(chunk[: 2 * writer_module.DIRECT_ALIGN + 100])
    out.finish()
    os.close(out.fd)
    assert ctypes.addressof(ctypes.c_char.from_buffer(chunk)) in sources
    assert (tmp_path / "f").read_bytes() == header + bytes(chunk[: 2 * writer_module.DIRECT_ALIGN + 100])
