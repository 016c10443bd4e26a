"""--verify: the output is read back from the disk and checked tensor by tensor; sha256 of every file recorded."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch
from conftest import make_state, read_output, reference_average, save_layout

import ckptavg
import ckptavg.averaging
import ckptavg.writing


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "layout, out_name, options",
    [
        ("hf-trainer", "merged", {"max_shard_size": "10KB"}),
        ("safetensors", "merged.safetensors", {}),
        ("bin", "merged.pt", {}),
        ("bin", "merged", {"out_format": "pt"}),
    ],
)
def test_verified_output_records_the_sha256_of_every_file(tmp_path, layout, out_name, options):
    states = [make_state(s, tied=layout == "bin") for s in range(3)]
    paths = [save_layout(st, tmp_path / f"in{s}", layout, step=s + 1) for s, st in enumerate(states)]
    out = tmp_path / out_name
    report = ckptavg.average(paths, out, verify=True, **options)
    assert report.verified
    files = sorted(p for p in out.iterdir() if p.name != "ckptavg.json") if out.is_dir() else [out]
    assert report.sha256 == {p.name: sha256(p) for p in files}
    if out.is_dir():
        recipe = json.loads((out / "ckptavg.json").read_text())
        assert recipe["verified"] is True
        assert recipe["files"] == {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in files}
    if out_name.endswith(".pt") or options.get("out_format") == "pt":
        got = torch.load(out if out.is_file() else out / "pytorch_model.bin", weights_only=True)
    else:
        got = read_output(out)
    want = reference_average(states)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_without_verify_nothing_is_recorded(tmp_path):
    paths = [save_layout(make_state(s), tmp_path, "hf-trainer", step=s + 1) for s in range(2)]
    report = ckptavg.average(paths, tmp_path / "merged")
    recipe = json.loads((tmp_path / "merged" / "ckptavg.json").read_text())
    assert not report.verified and report.sha256 == {} and "files" not in recipe


def assert_nothing_written(result, tmp_path) -> None:
    assert result.code == 3, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and "verification failed" in lines[0] and "reads back different bytes" in lines[0], result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in0", "in1"]


def test_bytes_corrupted_on_their_way_to_the_disk_are_caught(cli, tmp_path, monkeypatch):
    paths = [save_layout(make_state(s), tmp_path / f"in{s}", "safetensors") for s in range(2)]
    reference = ckptavg.average(paths, tmp_path / "reference")
    corrupt_at = (tmp_path / "reference" / "model.safetensors").stat().st_size - 5  # a byte of the last tensor
    shutil.rmtree(tmp_path / "reference")
    assert reference.bytes_written

    def corrupting(real, positioned):
        """os.write (through the page cache) or os.pwrite (O_DIRECT), flipping a bit of the byte at corrupt_at."""

        def write(fd, data, *offset):
            at = offset[0] if positioned else os.lseek(fd, 0, os.SEEK_CUR)
            if at <= corrupt_at < at + len(data):
                data = bytearray(data)
                data[corrupt_at - at] ^= 0x10
            return real(fd, data, *offset)

        return write

    monkeypatch.setattr(os, "write", corrupting(os.write, False))
    monkeypatch.setattr(os, "pwrite", corrupting(os.pwrite, True))
    result = cli("average", *paths, "-o", tmp_path / "merged", "--verify")
    monkeypatch.undo()
    assert_nothing_written(result, tmp_path)


def test_bytes_that_rot_on_the_disk_before_the_rename_are_caught(cli, tmp_path, monkeypatch):
    paths = [save_layout(make_state(s), tmp_path / f"in{s}", "safetensors") for s in range(2)]
    real_verify = ckptavg.writing.verify_output

    def rot_then_verify(staged, out, specs, crcs, *progress, **options):
        shard = staged / "model.safetensors"
        data = bytearray(shard.read_bytes())
        data[-5] ^= 0x01
        shard.write_bytes(bytes(data))
        return real_verify(staged, out, specs, crcs, *progress, **options)

    monkeypatch.setattr(ckptavg.writing, "verify_output", rot_then_verify)
    result = cli("average", *paths, "-o", tmp_path / "merged", "--verify")
    assert_nothing_written(result, tmp_path)
