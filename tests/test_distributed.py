"""Two-rank DCP and DeepSpeed saves (tests/dist_runs.py) read directly: equal to torch's `dcp_to_torch_save`
and DeepSpeed's `zero_to_fp32`, one checkpoint exported or several averaged (their float64 mean)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import read_output, reference_average
from dist_runs import dcp_checkpoint_dirs, fp32_reference, reference_path


def flatten(nested: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, torch.Tensor):
            out[f"{prefix}{key}"] = value
    return out


def model_reference(root: Path, folder: Path, kind: str) -> dict[str, torch.Tensor]:
    """The model's tensors of torch's own consolidation, by their own names."""
    full = torch.load(reference_path(root, folder), weights_only=False)
    if kind == "torchtitan":
        return {
            k: v
            for k, v in flatten(full).items()
            if not k.startswith(("optimizer.", "lr_scheduler.", "dataloader.", "train_state"))
        }
    return flatten(full["model"])


def assert_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys(), set(got) ^ set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name


def dcp_inputs(root: Path, kind: str) -> list[Path]:
    folders = dcp_checkpoint_dirs(root)
    if kind == "accelerate":  # the Trainer checkpoint folder: ckptavg finds pytorch_model_fsdp_0 in it
        return sorted({f.parent for f in folders if f.name == "pytorch_model_fsdp_0"})
    return folders


@pytest.mark.parametrize("kind", ["fsdp2", "torchtitan", "tp", "accelerate"])
def test_dcp_export_equals_dcp_to_torch_save(cli, tmp_path, request, kind):
    root = request.getfixturevalue(f"dcp_{kind}_ckpts")
    inputs = dcp_inputs(root, kind)
    folder = inputs[-1] / "pytorch_model_fsdp_0" if kind == "accelerate" else inputs[-1]
    result = cli("export", inputs[-1], "-o", tmp_path / "out", "--json")
    assert result.code == 0, result.err
    assert_equal(read_output(tmp_path / "out"), model_reference(root, folder, kind))
    report = json.loads(result.out)
    assert report["inputs"][0]["format"] == "dcp" and report["inputs"][0]["step"] == 6


@pytest.mark.parametrize("kind", ["fsdp2", "torchtitan", "tp", "accelerate"])
def test_dcp_average_is_the_float64_mean(cli, tmp_path, request, kind):
    root = request.getfixturevalue(f"dcp_{kind}_ckpts")
    inputs = dcp_inputs(root, kind)
    result = cli("average", *reversed(inputs), "--weights", "linear", "-o", tmp_path / "out", "--json")
    assert result.code == 0, result.err
    assert [i["step"] for i in json.loads(result.out)["inputs"]] == [2, 4, 6]
    folders = [f / "pytorch_model_fsdp_0" if kind == "accelerate" else f for f in inputs]
    assert_equal(read_output(tmp_path / "out"), reference_average([model_reference(root, f, kind) for f in folders], [1, 2, 3]))


def test_dcp_inspect_says_what_it_read(cli, dcp_torchtitan_ckpts):
    text = cli("inspect", dcp_checkpoint_dirs(dcp_torchtitan_ckpts)[0]).out
    assert (
        "torch.distributed.checkpoint: 2 .distcp file(s)" in text and "top-level names (torchtitan" in text and "not read" in text
    )


def test_dcp_select_orders_the_saves(cli, dcp_fsdp2_ckpts):
    result = cli("select", *dcp_checkpoint_dirs(dcp_fsdp2_ckpts), "--last", "2")
    assert result.code == 0 and [Path(p).name for p in result.out.split()] == ["step-4", "step-6"]


@pytest.mark.parametrize("kind", ["zero2", "zero3", "zero2_bf16", "zero3_bf16"])
def test_deepspeed_two_ranks_equal_zero_to_fp32(cli, tmp_path, request, kind):
    root = request.getfixturevalue(f"deepspeed_2rank_{kind}_ckpts")
    saves = [root / f"global_step{n}" for n in (2, 4, 6)]
    refs = []
    for n in (2, 4, 6):
        ref = torch.load(fp32_reference(root, n), weights_only=False)
        refs.append(ref)
    assert cli("export", root, "-o", tmp_path / "one").code == 0  # the run folder: its latest save
    got = read_output(tmp_path / "one")
    assert got.keys() == refs[-1].keys()
    for name, want in refs[-1].items():
        # zero_to_fp32 casts float buffers to fp32; ckptavg keeps each buffer's own dtype (exactly convertible)
        assert torch.equal(got[name], want.to(got[name].dtype)), name
    result = cli("average", *saves, "--ema", "0.5", "-o", tmp_path / "avg")
    assert result.code == 0, result.err
    avg = read_output(tmp_path / "avg")
    weights = [0.25, 0.25, 0.5]
    for name, first in refs[0].items():
        if first.is_floating_point():
            want = sum(w * r[name].double() for w, r in zip(weights, refs))
            torch.testing.assert_close(
                avg[name].double(), want, rtol=1e-2 if avg[name].dtype == torch.bfloat16 else 1e-6, atol=1e-6
            )
        else:
            assert torch.equal(avg[name], refs[-1][name])


def test_deepspeed_partition_count_must_match_the_files(cli, tmp_path, deepspeed_2rank_zero2_ckpts):
    import shutil

    save = Path(shutil.copytree(deepspeed_2rank_zero2_ckpts / "global_step2", tmp_path / "global_step2"))
    next(save.glob("*zero_pp_rank_1_*optim_states.pt")).unlink()
    result = cli("export", save, "-o", tmp_path / "out")
    assert result.code == 1 and "partition_count says 2" in result.err and not (tmp_path / "out").exists()
