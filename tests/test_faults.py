"""Faults while writing: signals, SIGKILL, a full or read-only disk, I/O errors, two runs to one output.

Whatever happens, OUT is either absent or a whole, correct result, the error is one line, and nothing
else is left in the folder once a run has finished (a SIGKILLed run leaves its partial output, which is
never mistaken for a result and is removed by the next run).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import read_output, reference_average
from safetensors.torch import load_file, save_file

CKPTAVG = [sys.executable, "-m", "ckptavg"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """3 inputs of 48 MB: large enough that a run can be caught mid-write."""
    root = tmp_path_factory.mktemp("big")
    paths = []
    base = torch.Generator().manual_seed(100)
    start = {f"w{i}": torch.randn(2_000_000, generator=base) for i in range(6)}  # one run: a shared start
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        state = {name: w + 0.1 * torch.randn(2_000_000, generator=g) for name, w in start.items()}
        save_file(state, root / f"c{seed}.safetensors")
        paths.append(root / f"c{seed}.safetensors")
    return paths


@pytest.fixture(scope="module")
def expected(inputs):
    return reference_average([load_file(p) for p in inputs])


def start(inputs: list[Path], out: Path, *options: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*CKPTAVG, "average", *map(str, inputs), "-o", str(out), "--max-shard-size", "20MB", *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a shell's background jobs start with SIGINT ignored; a user's Ctrl-C reaches a foreground one
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def frozen_mid_write(inputs: list[Path], out: Path, *options: str) -> subprocess.Popen:
    """A run stopped (SIGSTOP) as soon as its first shard has data, so what follows lands mid-write."""
    process = start(inputs, out, *options)
    partial = out.parent / f".{out.name}.ckptavg-partial"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if any(f.stat().st_size > 4096 for f in partial.glob("*.safetensors")):
                process.send_signal(signal.SIGSTOP)
                return process
        except FileNotFoundError:
            pass
        time.sleep(0.0005)
    raise AssertionError(f"finished before it could be interrupted: {process.communicate()}")


def one_error_line(err: str) -> str:
    """The one error line of a run's stderr; the progress lines a slow run prints off a terminal before it
    (`ckptavg: plan: ...`, `ckptavg: averaging 50% ...`, after its first second) are not errors."""
    lines = [line for line in err.strip().splitlines() if not line.startswith("ckptavg: ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def assert_whole_and_correct(out: Path, expected: dict) -> None:
    got = read_output(out)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_write_leaves_nothing(tmp_path, inputs, sig, code):
    process = frozen_mid_write(inputs, tmp_path / "merged")
    process.send_signal(sig)
    process.send_signal(signal.SIGCONT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    assert one_error_line(err).startswith("error: interrupted by")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_sigkill_leftovers_are_never_a_result_and_the_next_run_removes_them(tmp_path, inputs, expected):
    out = tmp_path / "merged"
    process = frozen_mid_write(inputs, out)
    process.kill()
    process.communicate(timeout=60)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".merged.ckptavg-lock", ".merged.ckptavg-partial"]
    assert not out.exists()
    inspect = subprocess.run([*CKPTAVG, "inspect", str(out)], capture_output=True, text=True)
    assert inspect.returncode == 1 and "no such file or folder" in one_error_line(inspect.stderr)
    again = subprocess.run([*CKPTAVG, "average", *map(str, inputs), "-o", str(out)], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "removed what an interrupted run left: .merged.ckptavg-partial" in " ".join(again.stdout.split())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    assert_whole_and_correct(out, expected)


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_second_run_to_the_same_output_fails_while_the_first_writes(tmp_path, inputs, expected, overwrite):
    out = tmp_path / "merged"
    first = frozen_mid_write(inputs, out)
    try:
        second = subprocess.run(
            [*CKPTAVG, "average", *map(str, inputs[:2]), "-o", str(out), *(["--overwrite"] if overwrite else [])],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 3
    assert f"another ckptavg run (pid {first.pid}) is writing it" in one_error_line(second.stderr)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    assert_whole_and_correct(out, expected)


def test_runs_started_together_one_wins_the_other_fails_clearly(tmp_path, inputs, expected):
    for attempt in range(3):
        out = tmp_path / f"merged{attempt}"
        runs = [start(inputs, out) for _ in range(2)]
        results = [(run.wait(timeout=120), run.communicate()[1]) for run in runs]
        codes = sorted(code for code, _ in results)
        assert codes == [0, 3], results
        loser = next(err for code, err in results if code == 3)
        assert "another ckptavg run" in loser or "already exists" in loser, loser
        one_error_line(loser)
        assert_whole_and_correct(out, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged0", "merged1", "merged2"]


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EIO])
def test_a_write_error_mid_run_leaves_nothing(cli, tmp_path, inputs, monkeypatch, error):
    """The output is written with os.write (through the page cache) or os.pwrite (O_DIRECT): both fail."""
    written = [0]

    def failing(real):
        def write(fd, data, *offset):
            written[0] += len(data)
            if written[0] > 30_000_000:
                raise OSError(error, os.strerror(error))
            return real(fd, data, *offset)

        return write

    monkeypatch.setattr(os, "write", failing(os.write))
    monkeypatch.setattr(os, "pwrite", failing(os.pwrite))
    result = cli("average", *inputs, "-o", tmp_path / "merged")
    monkeypatch.undo()
    assert result.code == 3
    assert os.strerror(error) in one_error_line(result.err) and "merged" in result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@contextmanager
def tmpfs(where: Path, size: str, read_only: bool = False):
    """A real small file system mounted at `where` (needs root or CAP_SYS_ADMIN; else the test is skipped)."""
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_too_little_space_on_a_real_disk_is_refused_before_writing(tmp_path, inputs):
    with tmpfs(tmp_path / "small", "4m") as disk:
        run = subprocess.run([*CKPTAVG, "average", *map(str, inputs), "-o", str(disk / "merged")], capture_output=True, text=True)
        assert run.returncode == 3 and "not enough free space" in one_error_line(run.stderr)
        assert list(disk.iterdir()) == []


def test_the_disk_filling_up_mid_write_fails_cleanly(tmp_path, inputs):
    """Another process fills the disk while ckptavg writes: ENOSPC, one line, the partial output removed."""
    with tmpfs(tmp_path / "disk", "130m") as disk:
        process = frozen_mid_write(inputs, disk / "merged")
        with open(disk / "filler", "wb", buffering=0) as filler:  # unbuffered: closing it has nothing left to write
            try:
                while True:
                    filler.write(b"\0" * (1 << 20))
            except OSError as e:
                assert e.errno == errno.ENOSPC
        process.send_signal(signal.SIGCONT)
        _, err = process.communicate(timeout=120)
        assert process.returncode == 3 and "No space left on device" in one_error_line(err)
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]


def test_a_read_only_destination_is_refused(tmp_path, inputs):
    with tmpfs(tmp_path / "ro", "64m", read_only=True) as disk:
        run = subprocess.run([*CKPTAVG, "average", *map(str, inputs), "-o", str(disk / "merged")], capture_output=True, text=True)
        assert run.returncode == 3 and "is not writable" in one_error_line(run.stderr)
        assert list(disk.iterdir()) == []


def test_a_destination_that_turns_read_only_fails_cleanly(cli, tmp_path, inputs, monkeypatch):
    """The check passed, then creating the lock or the staged output fails with EROFS."""
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    result = cli("average", *inputs, "-o", tmp_path / "merged")
    monkeypatch.undo()
    assert result.code == 3 and "Read-only file system" in one_error_line(result.err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_signal_late_in_a_run_never_fails_a_run_whose_output_is_in_place(tmp_path, inputs):
    """SIGINT at many points of a run, the last moments included: either exit 130 and nothing written, or
    exit 0 and the whole result; never a failure (or death by the signal) with the output in place."""
    expected = reference_average([load_file(p) for p in inputs[:2]])
    began = time.monotonic()
    assert start(inputs[:2], tmp_path / "timing").wait(timeout=120) == 0
    duration = time.monotonic() - began
    outcomes = []
    for i, fraction in enumerate((0.7, 0.85, 0.92, 0.97, 1.0)):
        out = tmp_path / f"merged{i}"
        process = start(inputs[:2], out)
        time.sleep(duration * fraction)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
        outcomes.append(process.returncode)
        if process.returncode == 0:
            assert_whole_and_correct(out, expected)
        else:
            assert process.returncode == 130, (fraction, process.returncode, err)
            assert one_error_line(err).startswith("error: interrupted by") and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    print("exit codes by signal time:", outcomes)


def _wait_for_mapping(pid: int, library: str, timeout: float = 60) -> None:
    """Until the process has mapped `library` (it is importing the module that loads it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if library in Path(f"/proc/{pid}/maps").read_text():
                return
        except OSError:
            return
        time.sleep(0.001)


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.1])
def test_a_signal_while_torch_is_imported_is_one_line_and_130(tmp_path, inputs, delay):
    """Ctrl-C while the command imports torch (from the moment libtorch is mapped): one line, exit 130, no traceback,
    and the process does not end by the signal (Python does that when an interrupt lands in code run by PyRun_*)."""
    process = start(inputs[:2], tmp_path / "merged")
    _wait_for_mapping(process.pid, "libtorch")
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    if process.returncode == 0:  # a fast machine finished first: then the result is whole
        assert_whole_and_correct(tmp_path / "merged", reference_average([load_file(p) for p in inputs[:2]]))
        return
    assert process.returncode == 130, (process.returncode, err)
    assert one_error_line(err).startswith("error: interrupted by SIGINT")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
