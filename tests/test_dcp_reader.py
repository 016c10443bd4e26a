"""torch.distributed.checkpoint folders read directly: one-process saves here, hostile and broken ones too.

Multi-rank saves (FSDP2, tensor parallel, torchtitan- and accelerate-style) are in tests/test_distributed.py.
"""

from __future__ import annotations

import collections
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from conftest import read_output

import ckptavg
from ckptavg.errors import HostileInputError, InputError

pytest.importorskip("torch.distributed.checkpoint")
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save  # noqa: E402  (`dcp.save` can be shadowed by a submodule)


def save(folder: Path, seed: int, step: int = 1) -> Path:
    g = torch.Generator().manual_seed(seed)
    model = {
        "embed.weight": torch.randn(7, 5, generator=g),
        "layer.bias": torch.randn(5, generator=g),
        "norm.count": torch.tensor(3 * seed),
    }
    state = {
        "model": model,
        "optimizer": {"state": {"embed.weight": {"exp_avg": torch.randn(7, 5, generator=g)}}, "param_groups": [{"lr": 0.1}]},
        "step": step,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "torch.distributed is disabled ... single process"
        dcp_save(state, checkpoint_id=str(folder))
    return folder


def torch_consolidated(folder: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / f"{folder.name}.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp_to_torch_save(str(folder), str(out))
    return torch.load(out, weights_only=False)["model"]


def test_export_equals_dcp_to_torch_save(tmp_path):
    folder = save(tmp_path / "step-10", 0, 10)
    report = ckptavg.export(folder, tmp_path / "out")
    assert report.inputs[0].step == 10 and report.inputs[0].format == "dcp"
    want = torch_consolidated(folder, tmp_path)
    got = read_output(tmp_path / "out")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_average_is_the_float64_mean_and_optimizer_entries_are_left(tmp_path):
    folders = [save(tmp_path / f"step-{s}", s, s) for s in (3, 1, 2)]
    report = ckptavg.average(folders, tmp_path / "out", weights="linear")
    assert [i.step for i in report.inputs] == [1, 2, 3]
    states = [torch_consolidated(tmp_path / f"step-{s}", tmp_path) for s in (1, 2, 3)]
    got = read_output(tmp_path / "out")
    for name, first in states[0].items():
        if first.is_floating_point():
            want = (sum(w * s[name].double() for w, s in zip((1, 2, 3), states)) / 6).to(first.dtype)
        else:
            want = states[-1][name]
        assert torch.equal(got[name], want), name
    assert not any("exp_avg" in n for n in got)
    assert "model entries" in report.inputs[0].weights_from


def _metadata(folder: Path):
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(folder)).read_metadata()


def _write_metadata(folder: Path, metadata) -> None:
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(metadata, f)


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/ckptavg-dcp-hostile-marker")


def test_a_hostile_metadata_is_refused_and_nothing_runs(cli, tmp_path):
    MARKER.unlink(missing_ok=True)
    folder = save(tmp_path / "step-1", 0)
    metadata = _metadata(folder)
    metadata.planner_data = {"x": Payload()}
    _write_metadata(folder, metadata)
    result = cli("average", folder, save(tmp_path / "step-2", 1, 2), "-o", tmp_path / "out")
    assert result.code == 1 and "hostile .metadata" in result.err and "posix.system" in result.err
    assert not MARKER.exists() and not (tmp_path / "out").exists()


def test_a_metadata_naming_any_other_class_is_refused(tmp_path):
    folder = save(tmp_path / "step-1", 0)
    metadata = _metadata(folder)
    metadata.planner_data = {"x": collections.Counter()}  # harmless, but nothing DCP writes
    _write_metadata(folder, metadata)
    with pytest.raises(HostileInputError, match="hostile .metadata"):
        ckptavg.export(folder, tmp_path / "out")


@pytest.mark.parametrize("fault,message", [("overlap", "overlap"), ("gap", "a gap"), ("outside", "outside the tensor")])
def test_chunks_that_do_not_tile_the_tensor(tmp_path, fault, message):
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    folder = save(tmp_path / "step-1", 0)
    metadata = _metadata(folder)
    entry = metadata.state_dict_metadata["model.embed.weight"]
    info = metadata.storage_data[MetadataIndex("model.embed.weight", torch.Size([0, 0]))]
    if fault == "overlap":
        second = torch.Size([3, 0])
        entry.chunks = [
            ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([4, 5])),
            ChunkStorageMetadata(second, torch.Size([4, 5])),
        ]
    elif fault == "gap":
        second = torch.Size([5, 0])
        entry.chunks = [
            ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([4, 5])),
            ChunkStorageMetadata(second, torch.Size([2, 5])),
        ]
    else:
        second = torch.Size([4, 0])
        entry.chunks = [
            ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([4, 5])),
            ChunkStorageMetadata(second, torch.Size([4, 5])),
        ]
    metadata.storage_data[MetadataIndex("model.embed.weight", second)] = info
    _write_metadata(folder, metadata)
    with pytest.raises(InputError, match=message):
        ckptavg.export(folder, tmp_path / "out")


def test_a_truncated_distcp_and_a_missing_one(cli, tmp_path):
    folder = save(tmp_path / "step-1", 0)
    data = folder / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:-200])
    result = cli("export", folder, "-o", tmp_path / "out")
    assert result.code == 1 and "__0_0.distcp" in result.err and len(result.err.strip().splitlines()) == 1
    data.unlink()
    result = cli("export", folder, "-o", tmp_path / "out")
    assert result.code == 1 and "__0_0.distcp" in result.err and "missing" in result.err


def test_inspect_shows_the_layout(cli, tmp_path):
    folder = save(tmp_path / "step-4", 0, 4)
    text = cli("inspect", folder).out
    assert "dcp" in text and "torch.distributed.checkpoint" in text and "not read" in text


def test_zstd_compressed_items_are_read_when_zstandard_is_installed(tmp_path, monkeypatch):
    pytest.importorskip("zstandard")
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint._extension import ZStandard

    g = torch.Generator().manual_seed(0)
    model = {"embed.weight": torch.randn(64, 5, generator=g), "count": torch.tensor(7)}
    folder = tmp_path / "step-1"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp_save({"model": model}, storage_writer=FileSystemWriter(str(folder), _extensions=[ZStandard()]))
    ckptavg.export(folder, tmp_path / "out")
    got = read_output(tmp_path / "out")
    assert all(torch.equal(got[k], v) for k, v in model.items())
    import builtins

    real_import = builtins.__import__
    monkeypatch.setattr(
        builtins,
        "__import__",
        lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name)) if name == "zstandard" else real_import(name, *a, **k),
    )
    from ckptavg.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match="install the zstandard package"):
        ckptavg.export(folder, tmp_path / "out2")
