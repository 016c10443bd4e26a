"""Checkpoints saved by the real trainers (tests/trainer_runs.py): what ckptavg averages, in which order.

Expected values are computed here, independently, in float64 from what torch.load reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import read_output, reference_average


def assert_exact(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def run_json(cli, *args) -> dict:
    result = cli(*args, "--json")
    assert result.code == 0, result.err
    return json.loads(result.out)


# timm: CheckpointSaver with ModelEmaV3; last.pth.tar and model_best.pth.tar are hard links


def test_timm_hard_links_are_the_same_checkpoint_given_twice(cli, tmp_path, timm_ckpts):
    assert os.path.samefile(timm_ckpts / "last.pth.tar", timm_ckpts / "checkpoint-3.pth.tar")
    result = cli("average", *sorted(timm_ckpts.glob("*.pth.tar")), "-o", tmp_path / "out")
    assert result.code == 2 and "given twice" in result.err and "hard link" in result.err
    assert not (tmp_path / "out").exists()


def test_timm_ema_weights_by_epoch(cli, tmp_path, timm_ckpts):
    files = [timm_ckpts / f"checkpoint-{e}.pth.tar" for e in (3, 0, 2, 1)]
    report = run_json(cli, "average", *files, "--use-ema", "--weights", "linear", "-o", tmp_path / "out.safetensors")
    assert report["order"] == "epoch" and [i["epoch"] for i in report["inputs"]] == [0, 1, 2, 3]
    assert all(i["weights_from"] == "EMA weights 'state_dict_ema' (--use-ema)" for i in report["inputs"])
    states = [torch.load(timm_ckpts / f"checkpoint-{e}.pth.tar", weights_only=False)["state_dict_ema"] for e in range(4)]
    assert_exact(read_output(tmp_path / "out.safetensors"), reference_average(states, [1, 2, 3, 4]))


def test_timm_metric_selects_the_best_epochs(cli, timm_ckpts):
    result = cli("select", *sorted(timm_ckpts.glob("checkpoint-*.pth.tar")), "--metric", "metric", "--top-k", "2")
    assert result.code == 0, result.err
    assert [Path(line).name for line in result.out.split()] == ["checkpoint-1.pth.tar", "checkpoint-3.pth.tar"]


# accelerate: save_state with automatic_checkpoint_naming: checkpoints/checkpoint_0 ... checkpoint_11


def test_accelerate_checkpoints_are_ordered_by_their_number(cli, tmp_path, accelerate_ckpts):
    folders = sorted((accelerate_ckpts / "checkpoints").glob("checkpoint_*"))
    assert folders[2].name == "checkpoint_10"  # a shell glob's order is not the training order
    report = run_json(cli, "average", *folders, "--ema", "0.5", "-o", tmp_path / "out")
    assert [Path(i["path"]).name for i in report["inputs"]] == [f"checkpoint_{n}" for n in range(12)]
    from safetensors.torch import load_file

    states = [load_file(accelerate_ckpts / "checkpoints" / f"checkpoint_{n}" / "model.safetensors") for n in range(12)]
    weights = [0.5**11] + [0.5 * 0.5 ** (11 - i) for i in range(1, 12)]
    got, want = read_output(tmp_path / "out"), reference_average(states, weights)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=2e-7, atol=1e-7)
    assert "optimizer.bin" not in report["copied_files"]


# Lightning: EMAWeightAveraging keeps the average in state_dict and the live weights in current_model_state


def test_lightning_ema_weights_are_taken_and_said(cli, tmp_path, lightning_ema_ckpts):
    files = sorted(lightning_ema_ckpts.glob("*.ckpt"))
    default = run_json(cli, "average", *files, "--strip-prefix", "model.", "-o", tmp_path / "default")
    use_ema = run_json(cli, "average", *files, "--strip-prefix", "model.", "--use-ema", "-o", tmp_path / "ema")
    live = run_json(cli, "average", *files, "--strip-prefix", "model.", "--key", "current_model_state", "-o", tmp_path / "live")
    for report in (default, use_ema):
        assert all(
            "EMA weights 'state_dict'" in i["weights_from"] and "EMAWeightAveraging" in i["weights_from"]
            for i in report["inputs"]
        )
    assert all(i["weights_from"].startswith("'current_model_state' (--key)") for i in live["inputs"])
    loaded = [torch.load(f, weights_only=True) for f in files]
    strip = lambda d: {k.removeprefix("model."): v for k, v in d.items()}  # noqa: E731
    ema = reference_average([strip(c["state_dict"]) for c in loaded], [1, 1, 1])
    assert_exact(read_output(tmp_path / "default"), ema)
    assert_exact(read_output(tmp_path / "ema"), ema)
    assert_exact(read_output(tmp_path / "live"), reference_average([strip(c["current_model_state"]) for c in loaded], [1, 1, 1]))


def test_lightning_torch_compile_prefix_is_removed(cli, tmp_path, lightning_compiled_ckpts):
    files = sorted(lightning_compiled_ckpts.glob("*.ckpt"))
    report = run_json(cli, "average", *files, "--strip-prefix", "model.", "-o", tmp_path / "out")
    names = set(read_output(tmp_path / "out"))
    assert names and all(n.startswith("body.") for n in names)
    assert all("_orig_mod. removed (torch.compile)" in i["weights_from"] for i in report["inputs"])


# DeepSpeed on its CPU accelerator: the FP32 masters are read from the optimizer partitions


def fp32_reference(run: Path, step: int) -> dict:
    """DeepSpeed's own consolidation of one save (tests/trainer_runs.py gathers it in the training process)."""
    return torch.load(run.parent / f"{run.name}-fp32" / f"global_step{step}.pt", weights_only=False)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_saves_average_their_fp32_masters(cli, tmp_path, request, stage):
    run = request.getfixturevalue(f"deepspeed_zero{stage}_ckpts")
    folders = [run / f"global_step{n}" for n in (6, 2, 4)]
    report = run_json(cli, "average", *folders, "--weights", "linear", "-o", tmp_path / "out")
    assert [i["step"] for i in report["inputs"]] == [2, 4, 6]
    assert all(i["format"] == f"deepspeed zero-{stage}" and "FP32 masters" in i["weights_from"] for i in report["inputs"])
    refs = [fp32_reference(run, n) for n in (2, 4, 6)]
    want = reference_average(refs, [1, 2, 3])
    want["body.1.num_batches_tracked"] = refs[-1]["body.1.num_batches_tracked"].long()  # integer buffers stay integers
    assert_exact(read_output(tmp_path / "out"), want)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_export_is_the_consolidated_fp32_model(cli, tmp_path, request, stage):
    run = request.getfixturevalue(f"deepspeed_zero{stage}_ckpts")
    assert cli("export", run, "-o", tmp_path / "out").code == 0  # the run folder: its `latest` save
    want = fp32_reference(run, 6)
    got = read_output(tmp_path / "out")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k].to(got[k].dtype)) for k in want)


def test_deepspeed_zero3_model_states_alone_point_at_the_folder(cli, tmp_path, deepspeed_zero3_ckpts):
    files = sorted(deepspeed_zero3_ckpts.glob("global_step*/zero_pp_rank_0_mp_rank_00_model_states.pt"))
    result = cli("average", *files, "-o", tmp_path / "out")
    assert result.code == 1 and "ZeRO-3" in result.err and "pass its folder" in result.err
    assert len(result.err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_deepspeed_zero2_module_weights_by_global_step(cli, tmp_path, deepspeed_zero2_ckpts):
    files = [deepspeed_zero2_ckpts / f"global_step{n}" / "mp_rank_00_model_states.pt" for n in (6, 2, 4)]
    report = run_json(cli, "average", *files, "--weights", "linear", "-o", tmp_path / "out")
    assert [i["step"] for i in report["inputs"]] == [2, 4, 6]
    assert all(any("DeepSpeed model states" in n for n in i["notes"]) for i in report["inputs"])
    states = [
        torch.load(deepspeed_zero2_ckpts / f"global_step{n}" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        for n in (2, 4, 6)
    ]
    assert_exact(read_output(tmp_path / "out"), reference_average(states, [1, 2, 3]))
    folders = [deepspeed_zero2_ckpts / f"global_step{n}" for n in (2, 4, 6)]
    module = run_json(cli, "average", *folders, "--key", "module", "--weights", "linear", "-o", tmp_path / "module")
    assert all("'module'" in i["weights_from"] for i in module["inputs"])
    assert_exact(read_output(tmp_path / "module"), reference_average(states, [1, 2, 3]))
