"""The CUDA pipeline against the CPU's: the same bytes for every dtype, layout, weighting and output shape, and
its failures leave nothing behind.

Every test marked `cuda` needs a CUDA device and is skipped without one (`scripts/gpu_check.sh` runs them on a
GPU machine: `pytest -m cuda tests/test_cuda.py`). The comparison helper is exercised here too, through the
staged pipeline on the CPU (`Engine(staged=True)`: the reader thread and staging buffers of the CUDA path).
Only torch, safetensors and ckptavg are imported: the GPU machine may lack the test extras.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
from conftest import make_state, read_output, reference_average, save_layout
from safetensors.torch import save_file

import ckptavg
from ckptavg import writing
from ckptavg.merge import engine as engine_module
from ckptavg.merge.engine import Engine

ROOT = Path(__file__).resolve().parent.parent
HAS_CUDA = torch.cuda.is_available()
LAYOUTS = [
    "safetensors",
    "safetensors-folder",
    "safetensors-sharded",
    "bin",
    "bin-sharded",
    "pt",
    "pt-legacy",
    "lightning",
    "hf-trainer",
]
STRATEGIES = [{}, {"weights": "linear"}, {"weights": "0.1,0.2,0.3,0.4"}, {"ema": 0.8}]


def on_cuda(test):
    """Mark a test `cuda` and skip it cleanly where no CUDA device is present."""
    return pytest.mark.cuda(pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")(test))


def average_on(
    device: str, paths: list[Path], out: Path, staged: bool = False, **options
) -> tuple[ckptavg.AverageReport, list[Engine]]:
    """ckptavg.average on `device`; staged=True forces the staged pipeline on a CPU. Returns the report and the
    engines it ran."""
    engines: list[Engine] = []

    def spy(plan, dev, memory_budget=None):
        engines.append(Engine(plan, dev, memory_budget, staged=staged))
        return engines[-1]

    with patch.object(writing, "Engine", spy):
        report = ckptavg.average(paths, out, device=device, order="given", **options)
    return report, engines


def same_as_cpu(paths: list[Path], out: Path, device: str = "cuda", staged: bool = False, **options) -> dict[str, torch.Tensor]:
    """Average `paths` with the CPU's own engine and with the staged pipeline on `device` (CUDA's, or the CPU's
    with staged=True); assert every tensor and every weight file is the same bytes. Returns the tensors."""
    out.mkdir(parents=True, exist_ok=True)
    ckptavg.average(paths, out / "cpu", device="cpu", order="given", **options)
    report, engines = average_on(device, paths, out / "device", staged=staged, **options)
    want = "cpu" if staged else "cuda"
    assert engines and all(e.staged and e.device.type == want for e in engines), [(e.device, e.staged) for e in engines]
    assert report.device.startswith(want), report.device
    cpu, dev = read_output(out / "cpu"), read_output(out / "device")
    assert set(dev) == set(cpu)
    for name, want_tensor in cpu.items():
        got = dev[name]
        assert got.dtype == want_tensor.dtype and got.shape == want_tensor.shape, name
        assert torch.equal(got.view(-1).view(torch.uint8), want_tensor.view(-1).view(torch.uint8)), (
            f"{name}: {int((got != want_tensor).sum())} elements differ from the CPU's"
        )
    weight_files = sorted(p.name for p in (out / "cpu").iterdir() if p.suffix == ".safetensors" or p.name.endswith(".index.json"))
    assert weight_files == sorted(
        p.name for p in (out / "device").iterdir() if p.suffix == ".safetensors" or p.name.endswith(".index.json")
    )
    for name in weight_files:
        assert (out / "cpu" / name).read_bytes() == (out / "device" / name).read_bytes(), name
    return cpu


def big_states(n: int, dtype: torch.dtype = torch.bfloat16, elements: int = 700_000) -> list[dict[str, torch.Tensor]]:
    """n checkpoints of one run with a tensor large enough to span many chunks of a 1 MiB budget."""
    start = torch.randn(elements, generator=torch.Generator().manual_seed(100))
    states = []
    for seed in range(n):
        g = torch.Generator().manual_seed(seed)
        states.append(
            {
                "a.big": (start + 0.1 * torch.randn(elements, generator=g)).to(dtype),
                "b.small": torch.randn(300, generator=g).to(dtype),
                "c.steps": torch.tensor(seed),
            }
        )
    return states


# The helper itself, on this machine: the staged pipeline on the CPU gives the CPU engine's bytes, and a one-bit
# difference in the staged fold is caught.


@pytest.mark.parametrize(
    "options", [{}, {"weights": "linear"}, {"ema": 0.8}, {"memory_budget": "1MiB", "max_shard_size": "600KB"}]
)
def test_helper_on_the_staged_cpu_pipeline(tmp_path, options):
    states = big_states(4)
    paths = [save_layout(s, tmp_path / f"in{i}", "safetensors") for i, s in enumerate(states)]
    out = same_as_cpu(paths, tmp_path, device="cpu", staged=True, **options)
    if not options:
        assert all(torch.equal(out[k], v) for k, v in reference_average(states).items())
    if "max_shard_size" in options:
        assert len(list((tmp_path / "device").glob("model-*.safetensors"))) > 1


def test_helper_catches_one_bit(tmp_path):
    states = big_states(3)
    paths = [save_layout(s, tmp_path / f"in{i}", "safetensors") for i, s in enumerate(states)]
    real_fold = engine_module.fold

    def off_by_one_ulp(inputs, weights, divisor, acc, out):
        real_fold(inputs, weights, divisor, acc, out)
        out[:1].view(torch.int16).add_(1)

    with patch.object(engine_module, "fold", off_by_one_ulp), pytest.raises(AssertionError, match="a.big: 1 elements differ"):
        same_as_cpu(paths, tmp_path, device="cpu", staged=True)


# On a CUDA device.


@on_cuda
@pytest.mark.parametrize("accum", ["auto", "fp32", "fp64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_cpu_bit_for_bit(tmp_path, dtype, accum):
    """Uniform, linear, explicit and EMA weights; the accumulator chosen by auto (FP32 for 16-bit, FP64 for FP32)
    or forced, the same on both devices."""
    states = [make_state(seed, dtype) for seed in range(4)]
    paths = [save_layout(s, tmp_path / f"in{i}", "safetensors") for i, s in enumerate(states)]
    for k, strategy in enumerate(STRATEGIES):
        out = same_as_cpu(paths, tmp_path / f"s{k}", accum=accum, **strategy)
        if not strategy and accum != "fp32":
            assert all(torch.equal(out[name], want) for name, want in reference_average(states).items())


@on_cuda
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_on_cuda(tmp_path, layout):
    states = [make_state(seed) for seed in range(3)]
    paths = [save_layout(s, tmp_path / f"in{i}", layout, step=(i + 1) * 10) for i, s in enumerate(states)]
    prefixes = ["model."] if layout == "lightning" else []
    out = same_as_cpu(paths, tmp_path, strip_prefixes=prefixes)
    want = reference_average(states)
    assert set(out) == set(want) and all(torch.equal(out[k], v) for k, v in want.items())


@on_cuda
def test_ema_half_life_on_cuda(tmp_path):
    states = [make_state(seed, torch.bfloat16) for seed in range(4)]
    paths = [
        save_layout(s, tmp_path / f"in{i}", "hf-trainer", step=step)
        for i, (s, step) in enumerate(zip(states, [100, 200, 400, 1000]))
    ]
    same_as_cpu(paths, tmp_path, ema_half_life=150)


@on_cuda
def test_sharded_output_tied_tensors_and_integer_buffers_on_cuda(tmp_path):
    states = [make_state(seed, tied=True) for seed in range(3)]
    paths = [save_layout(s, tmp_path / f"in{i}", "bin") for i, s in enumerate(states)]
    out = same_as_cpu(paths, tmp_path, max_shard_size="8KB", weights="linear")
    assert len(list((tmp_path / "device").glob("model-*-of-*.safetensors"))) > 1
    assert torch.equal(out["head.weight"], out["embed.weight"])
    assert torch.equal(out["norm.num_batches_tracked"], states[-1]["norm.num_batches_tracked"])
    assert torch.equal(out["mask"], states[-1]["mask"]) and out["mask"].dtype == torch.bool


@on_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "auto"])
def test_device_choices_run_on_cuda(tmp_path, device):
    """auto picks CUDA when it is present; cuda and cuda:0 name it."""
    states = [make_state(seed, torch.bfloat16) for seed in range(3)]
    paths = [save_layout(s, tmp_path / f"in{i}", "safetensors") for i, s in enumerate(states)]
    same_as_cpu(paths, tmp_path, device=device)


@on_cuda
def test_cuda_beyond_the_device_count_is_a_usage_error(cli, tmp_path):
    paths = [save_layout(make_state(seed), tmp_path / f"in{seed}", "safetensors") for seed in range(2)]
    result = cli("average", *paths, "-o", tmp_path / "out", "--device", f"cuda:{torch.cuda.device_count()}")
    assert result.code == 2, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "CUDA device" in lines[0], result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in0", "in1"]


@on_cuda
def test_cli_device_cuda_matches_cpu(cli, tmp_path):
    paths = [save_layout(make_state(seed, torch.float16), tmp_path / f"in{seed}", "safetensors-sharded") for seed in range(3)]
    for device in ("cpu", "cuda"):
        result = cli(
            "average", *paths, "-o", tmp_path / device, "--device", device, "--weights", "1,2,3", "--order", "given", "--quiet"
        )
        assert result.code == 0, result.err
    assert (tmp_path / "cpu" / "model.safetensors").read_bytes() == (tmp_path / "cuda" / "model.safetensors").read_bytes()


@on_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_small_memory_budget_on_cuda(tmp_path, dtype):
    """A 1 MiB budget: many chunks through the pinned double buffers, the same bytes, and GPU memory of the order
    of the budget (not of the model)."""
    states = big_states(3, dtype)
    paths = [save_layout(s, tmp_path / f"in{i}", "safetensors") for i, s in enumerate(states)]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ckptavg.average(paths, tmp_path / "probe", device="cuda", memory_budget="1MiB")
    peak = torch.cuda.max_memory_allocated() - before
    assert peak <= 2 << 20, f"{peak} bytes of GPU memory for a 1 MiB budget"
    _, engines = average_on("cuda", paths, tmp_path / "chunks", memory_budget="1MiB")
    assert len(engines[0].chunks()) > 8
    same_as_cpu(paths, tmp_path, memory_budget="1MiB")


@on_cuda
def test_nan_found_mid_run_on_cuda_is_one_line_and_leaves_nothing(cli, tmp_path):
    states = big_states(3)
    states[1]["b.small"][123] = float("nan")
    paths = [save_layout(s, tmp_path / f"in{i}", "safetensors") for i, s in enumerate(states)]
    engines: list[Engine] = []

    def spy(plan, dev, memory_budget=None):
        engines.append(Engine(plan, dev, memory_budget))
        return engines[-1]

    with patch.object(writing, "Engine", spy):
        result = cli(
            "average", *paths, "-o", tmp_path / "out", "--device", "cuda", "--memory-budget", "1MiB", "--max-shard-size", "600KB"
        )
    assert result.code == 1, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.err, result.err
    assert str(paths[1]) in lines[0] and "b.small" in lines[0] and "element 123" in lines[0], lines[0]
    assert engines[0].cuda and engines[0].bytes_read >= 3 * 700_000 * 2  # found after the whole of a.big was folded
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in0", "in1", "in2"]


@on_cuda
def test_sigint_mid_run_on_cuda_is_130_and_leaves_nothing(tmp_path):
    """A run stopped (SIGSTOP) once its first shard holds data, then SIGINT: exit 130, one line, nothing written."""
    base = torch.Generator().manual_seed(100)
    start = {f"w{i}": torch.randn(2_000_000, generator=base) for i in range(6)}
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    paths = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        save_file({k: w + 0.1 * torch.randn(2_000_000, generator=g) for k, w in start.items()}, inputs / f"c{seed}.safetensors")
        paths.append(inputs / f"c{seed}.safetensors")
    work = tmp_path / "work"
    work.mkdir()
    out = work / "merged"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ckptavg",
            "average",
            *map(str, paths),
            "-o",
            str(out),
            "--device",
            "cuda",
            "--max-shard-size",
            "20MB",
            "--memory-budget",
            "8MiB",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    partial = work / f".{out.name}.ckptavg-partial"
    deadline = time.monotonic() + 120
    stopped = False
    while not stopped and time.monotonic() < deadline and process.poll() is None:
        try:
            if any(f.stat().st_size > 4096 for f in partial.glob("*.safetensors")):
                process.send_signal(signal.SIGSTOP)
                stopped = True
        except FileNotFoundError:
            pass
        time.sleep(0.0005)
    assert stopped, f"finished before it could be interrupted: {process.communicate()}"
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGCONT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: interrupted by"), err
    assert sorted(p.name for p in work.iterdir()) == []


@on_cuda
def test_torchrun_ranks_on_cuda_write_the_cpu_output(tmp_path):
    """Two torchrun ranks fold their shares on their GPU (cuda:LOCAL_RANK; both on cuda:0 with one GPU)."""
    paths = [save_layout(make_state(seed, torch.bfloat16), tmp_path / f"c{seed}", "safetensors-sharded") for seed in range(3)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    base = ["average", *map(str, paths), "--max-shard-size", "2KB", "-q"]
    assert (
        subprocess.run(
            [sys.executable, "-m", "ckptavg", *base, "-o", str(tmp_path / "cpu"), "--device", "cpu"], env=env
        ).returncode
        == 0
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "ckptavg"]
    assert subprocess.run([*torchrun, *base, "-o", str(tmp_path / "cuda"), "--device", "cuda"], env=env).returncode == 0
    weight_files = sorted(p.name for p in (tmp_path / "cpu").iterdir() if p.name != "ckptavg.json")
    assert len(weight_files) > 2
    assert all((tmp_path / "cpu" / n).read_bytes() == (tmp_path / "cuda" / n).read_bytes() for n in weight_files)
