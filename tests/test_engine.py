"""The engine's memory bound and the writer's write-behind, measured rather than assumed."""

from __future__ import annotations

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
