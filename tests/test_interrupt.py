"""SIGINT or SIGTERM mid-write: the right exit code, one line on stderr, no output and no temporary files."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    paths = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        state = {f"w{i}": torch.randn(2_000_000, generator=g) for i in range(6)}
        save_file(state, root / f"c{seed}.safetensors")
        paths.append(root / f"c{seed}.safetensors")
    return paths


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_write_leaves_nothing(tmp_path, inputs, sig, code):
    out = tmp_path / "merged"
    process = subprocess.Popen(
        [sys.executable, "-m", "ckptavg", "average", *map(str, inputs), "-o", str(out), "--max-shard-size", "20MB"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a shell's background jobs start with SIGINT ignored; a user's Ctrl-C reaches a foreground one
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    # Freeze the process as soon as its first shard has data, so the signal lands mid-write every time.
    while time.monotonic() < deadline and process.poll() is None:
        tmp = [p for p in tmp_path.iterdir() if ".ckptavg-tmp" in p.name]
        if tmp and any(f.stat().st_size > 4096 for f in tmp[0].glob("*.safetensors")):
            process.send_signal(signal.SIGSTOP)
            break
        time.sleep(0.0005)
    assert process.poll() is None, "finished before it could be interrupted"
    process.send_signal(sig)
    process.send_signal(signal.SIGCONT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    assert err.strip().startswith("error: interrupted by") and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
