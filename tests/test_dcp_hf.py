"""torch.distributed.checkpoint saves written as safetensors, by DCP's own writers on two ranks (tests/dist_runs.py):
HuggingFaceStorageWriter(save_distributed=True)'s shard files (torchtitan's HF saves, NeMo Automodel) and
FileSystemWriter(serialization_format=SAFETENSORS)'s .distcp items. torch 2.13's readers do not read these back,
so averages are compared with the full tensors each step saved (DTensor.full_tensor(), torch.save'd by rank 0).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import read_output
from dist_runs import DCP_SAVE_STEPS

import ckptavg
from ckptavg.checkpoint import open_checkpoint
from ckptavg.formats.base import ComputedSource, ExtentSource

SHARD = "shard-{rank:05d}-model-{i:05d}-of-00002.safetensors"


def reference(root: Path, step: int) -> dict[str, torch.Tensor]:
    return torch.load(root.parent / f"{root.name}-ref" / f"step-{step}.pt", weights_only=True)


@pytest.mark.parametrize("kind", ["hf", "st"])
def test_average_of_step_folders_is_the_float64_mean_in_step_order(dcp_safetensors_ckpts, kind, tmp_path):
    root = dcp_safetensors_ckpts[kind]
    given = [root / f"step-{s}" for s in (6, 2, 4)]
    report = ckptavg.average(given, tmp_path / "out", weights="linear")
    assert [i.step for i in report.inputs] == list(DCP_SAVE_STEPS)
    states = [reference(root, s) for s in DCP_SAVE_STEPS]
    got = read_output(tmp_path / "out")
    assert sorted(got) == sorted(states[0]) == ["count", "fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight", "scale"]
    for name, first in states[0].items():
        if first.is_floating_point():
            want = (sum(w * s[name].double() for w, s in zip((1, 2, 3), states)) / 6).to(first.dtype)
        else:
            want = states[-1][name]  # integers are copied from the newest input
        assert torch.equal(got[name], want), name


@pytest.mark.parametrize("kind", ["hf", "st"])
def test_row_shards_are_read_by_range_and_columns_assembled(dcp_safetensors_ckpts, kind):
    ckpt = open_checkpoint(dcp_safetensors_ckpts[kind] / "step-2")
    rows, columns = ckpt.tensors["fc1.weight"], ckpt.tensors["fc2.weight"]
    assert type(rows) is ExtentSource and len(rows.extents) == 2 and rows.shape == (9, 5)
    assert type(columns) is ComputedSource and columns.shape == (3, 9)
    assert ckpt.tensors["scale"].shape == () and ckpt.tensors["count"].dtype == torch.int64
    want = reference(dcp_safetensors_ckpts[kind], 2)
    assert torch.equal(rows.read(), want["fc1.weight"]) and torch.equal(columns.read(), want["fc2.weight"])


def test_inspect_shows_the_layout(dcp_safetensors_ckpts, cli):
    hf = cli("inspect", dcp_safetensors_ckpts["hf"] / "step-4")
    assert hf.code == 0 and "dcp-hf (4 shard files)" in hf.out and "2 rank(s)" in hf.out
    st = cli("inspect", dcp_safetensors_ckpts["st"] / "step-4")
    assert st.code == 0 and "items serialized as safetensors" in st.out


def test_select_takes_shard_folders_and_names_step_folders(dcp_safetensors_ckpts, cli):
    root = dcp_safetensors_ckpts["hf"]
    picked = cli("select", *(root / f"step-{s}" for s in DCP_SAVE_STEPS), "--last", "2")
    assert picked.code == 0 and picked.out.split() == [str(root / "step-4"), str(root / "step-6")]
    run = cli("select", root, "--last", "2")
    assert run.code == 1 and f"pass {root}/step-* instead" in run.err


def one_line_error(result) -> str:
    assert result.code == 1 and result.out == "" and result.err.count("\n") == 1, (result.code, result.err)
    return result.err


def test_a_lone_shard_file_is_refused_naming_its_folder(dcp_safetensors_ckpts, cli, tmp_path):
    folder = dcp_safetensors_ckpts["hf"] / "step-2"
    for rank in (1, 2):
        err = one_line_error(cli("average", folder / SHARD.format(rank=rank, i=1), "-o", tmp_path / "out"))
        assert "a part of each tensor" in err and f"pass its folder {folder} instead" in err
    assert not (tmp_path / "out").exists()


def copy_step(dcp_safetensors_ckpts, tmp_path: Path) -> Path:
    return Path(shutil.copytree(dcp_safetensors_ckpts["hf"] / "step-2", tmp_path / "step-2"))


def test_a_missing_shard_file_is_refused(dcp_safetensors_ckpts, cli, tmp_path):
    broken = copy_step(dcp_safetensors_ckpts, tmp_path)
    (broken / SHARD.format(rank=1, i=1)).unlink()  # rank 0's rows of fc1.*: the tensors start at row 5
    err = one_line_error(cli("average", broken, dcp_safetensors_ckpts["hf"] / "step-4", "-o", tmp_path / "out"))
    assert f"error: {broken}: fc1." in err and "a gap" in err


def test_overlapping_shards_are_refused(dcp_safetensors_ckpts, cli, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    broken = copy_step(dcp_safetensors_ckpts, tmp_path)
    file = broken / SHARD.format(rank=2, i=1)
    with safe_open(file, "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    info = json.loads(metadata["DCP_SHARDING_INFO"])
    info["fc1.weight"]["saved_offsets"] = [3, 0]  # rank 1's rows 5..8 said to be rows 3..6
    save_file(tensors, file, metadata={**metadata, "DCP_SHARDING_INFO": json.dumps(info)})
    err = one_line_error(cli("inspect", broken))
    assert f"error: {broken}: fc1.weight: chunks at [0, 0] and [3, 0] overlap" in err


def test_a_shard_file_of_another_save_is_refused(dcp_safetensors_ckpts, cli, tmp_path):
    broken = copy_step(dcp_safetensors_ckpts, tmp_path)
    shutil.copy(broken / SHARD.format(rank=1, i=1), broken / "shard-00003-model-00001-of-00003.safetensors")
    err = one_line_error(cli("inspect", broken))
    assert "shard files of different saves (-of-00002, -of-00003)" in err


def test_a_distcp_item_that_is_neither_torch_save_nor_safetensors_is_one_line(dcp_safetensors_ckpts, cli, tmp_path):
    broken = Path(shutil.copytree(dcp_safetensors_ckpts["st"] / "step-2", tmp_path / "step-2"))
    data = bytearray((broken / "__0_0.distcp").read_bytes())
    data[:16] = bytes(16)  # rank 0's file starts with its safetensors blob
    (broken / "__0_0.distcp").write_bytes(bytes(data))
    err = one_line_error(cli("inspect", broken))
    assert "__0_0.distcp: corrupt DCP chunk of model." in err and "neither a torch.save archive nor safetensors" in err


def test_corrupt_sharding_info_is_one_line(dcp_safetensors_ckpts, cli, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    broken = copy_step(dcp_safetensors_ckpts, tmp_path)
    file = broken / SHARD.format(rank=1, i=2)
    with safe_open(file, "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(tensors, file, metadata={**metadata, "DCP_SHARDING_INFO": json.dumps({"fc2.weight": {"saved_offsets": [0, -5]}})})
    err = one_line_error(cli("inspect", broken))
    assert f"error: {file}: corrupt DCP_SHARDING_INFO" in err


def test_the_whole_state_saved_by_one_rank_is_an_ordinary_sharded_folder(tmp_path, cli):
    """HuggingFaceStorageWriter without save_distributed: model-00001-of-00001.safetensors and an index, with
    DCP_SHARDING_INFO at offset 0 in the header; the folder and its file alone are read as they are."""
    import warnings

    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    state = {"w": torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), "b": torch.arange(3.0)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "torch.distributed is disabled ... single process"
        dcp_save(state, storage_writer=HuggingFaceStorageWriter(str(tmp_path / "step-1")))
    file = tmp_path / "step-1" / "model-00001-of-00001.safetensors"
    assert b"DCP_SHARDING_INFO" in file.read_bytes()[:4096]
    for given in (tmp_path / "step-1", file):
        assert cli("average", given, "-o", tmp_path / f"out-{given.name}").code == 0
        got = read_output(tmp_path / f"out-{given.name}")
        assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)


def test_a_folder_whose_parts_are_in_sharded_is_read_from_there(dcp_safetensors_ckpts, cli, tmp_path):
    """enable_consolidation=True writes the parts to <path>/sharded/ and then the consolidated files to <path>; with
    the consolidation missing, the parts are read."""
    shutil.copytree(dcp_safetensors_ckpts["hf"] / "step-2", tmp_path / "step-2" / "sharded")
    result = cli("inspect", tmp_path / "step-2")
    assert result.code == 0 and "dcp-hf (4 shard files)" in result.out and "step         2" in result.out
