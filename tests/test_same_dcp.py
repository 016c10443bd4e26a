"""out_format="same" for torch.distributed.checkpoint (DCP) saves: the merge written back as a DCP folder, loaded by
torch.distributed.checkpoint.load into the model and optimizer that saved it (rebuilt in this one process).

Expected weights are the float64 mean of the inputs as torch itself reads them (_load_state_dict_from_keys), rounded
once; the optimizer, scheduler and train state are the newest input's as torch reads them; pickled items are compared
byte for byte. .metadata is read here with torch's own (unrestricted) unpickler: these are the test's own files.
"""

from __future__ import annotations

import functools
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckptavg
from ckptavg.errors import UnsupportedError, UsageError

pytest.importorskip("torch.distributed.checkpoint")
from dist_runs import DCP_SAVE_STEPS, _Net, _TitanLike, _warmup, reference_path  # noqa: E402
from torch.distributed.checkpoint.api import CheckpointException  # noqa: E402
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata  # noqa: E402
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys  # noqa: E402
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load  # noqa: E402
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is")  # one process: DCP says it loads locally


def steps(root: Path) -> list[Path]:
    return [root / f"step-{s}" for s in DCP_SAVE_STEPS]


def metadata(folder: Path):
    with open(folder / ".metadata", "rb") as f:
        return pickle.load(f)


def torch_reads(folder: Path, keys: set[str]) -> dict:
    """The entries `keys` of a DCP save as torch reads them, the nested dicts flattened as DCP names them."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    return flatten_state_dict(_load_state_dict_from_keys(keys, checkpoint_id=str(folder)))[0]


def float64_mean(inputs: list[Path], names: list[str]) -> dict[str, torch.Tensor]:
    """Floating tensors: the float64 mean rounded once to their dtype; others: the newest's."""
    read = [torch_reads(folder, set(names)) for folder in inputs]
    return {
        n: (sum(r[n].double() for r in read) / len(read)).to(read[-1][n].dtype)
        if read[-1][n].is_floating_point()
        else read[-1][n]
        for n in names
    }


def item_bytes(folder: Path, md, name: str) -> bytes:
    info = md.storage_data[next(i for i in md.storage_data if i.fqn == name)]
    with open(folder / info.relative_path, "rb") as f:
        f.seek(info.offset)
        return f.read(info.length)


def assert_chunked_as(out_md, newest_md, names: list[str]) -> None:
    """Each model entry has the newest's size, dtype and chunks (offsets and sizes), in the newest's rank files."""
    for name in names:
        got, want = out_md.state_dict_metadata[name], newest_md.state_dict_metadata[name]
        assert isinstance(got, TensorStorageMetadata) and type(got.size) is torch.Size, name
        assert (got.size, got.properties.dtype, got.chunks) == (want.size, want.properties.dtype, want.chunks), name
        for chunk in want.chunks:
            index = next(i for i in want_indices(newest_md, name) if tuple(i.offset) == tuple(chunk.offsets))
            out_index = next(i for i in want_indices(out_md, name) if tuple(i.offset) == tuple(chunk.offsets))
            assert out_md.storage_data[out_index].relative_path == newest_md.storage_data[index].relative_path


def want_indices(md, name: str) -> list:
    return [i for i in md.storage_data if i.fqn == name]


# ---------------------------------------------------------------------------------------------------- torchtitan


def titan_state(model, opt, scheduler) -> dict:
    """torchtitan's checkpoint state (as dist_runs saves it) of a model and optimizer built in this process."""
    states = dict(get_model_state_dict(model))
    states["optimizer"] = get_optimizer_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
    states["lr_scheduler"] = scheduler.state_dict()
    states["train_state"] = {"step": 0, "ntokens_seen": 0}
    return states


def titan_loaded(folder: Path) -> dict:
    torch.manual_seed(7)  # weights and state unlike any save's: each value must come from the folder
    model = _TitanLike()
    opt = torch.optim.AdamW(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(_warmup, warmup=3))
    states = titan_state(model, opt, scheduler)
    dcp_load(states, checkpoint_id=str(folder))
    return states


TITAN_GROUPS = ("optimizer", "lr_scheduler", "dataloader", "train_state")


def test_torchtitan_newest_loads_into_the_model_and_optimizer_that_saved_it(dcp_torchtitan_ckpts, tmp_path):
    inputs, out = steps(dcp_torchtitan_ckpts), tmp_path / "merged"
    report = ckptavg.average(inputs, out, out_format="same", training_state="newest", verify=True)
    assert report.verified and report.output_files == [".metadata", "__0_0.distcp", "__1_0.distcp", "ckptavg.json"]
    newest_md, out_md = metadata(inputs[-1]), metadata(out)
    assert list(out_md.state_dict_metadata) == list(newest_md.state_dict_metadata)  # every entry, in its order
    assert out_md.planner_data == newest_md.planner_data and out_md.version == newest_md.version
    assert out_md.storage_meta.checkpoint_id == out and out_md.storage_meta.save_id == newest_md.storage_meta.save_id
    names = [n for n in newest_md.state_dict_metadata if not n.startswith(TITAN_GROUPS)]
    assert len(names) == 17
    assert_chunked_as(out_md, newest_md, names)

    got, newest = titan_loaded(out), titan_loaded(inputs[-1])
    want = float64_mean(inputs, names)
    for name in names:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    assert not torch.equal(got["output.weight"], newest["output.weight"])
    assert got["optimizer"].keys() == newest["optimizer"].keys() and len(got["optimizer"]) > 100
    for key, value in newest["optimizer"].items():
        assert torch.equal(got["optimizer"][key], value) if isinstance(value, torch.Tensor) else got["optimizer"][key] == value
    assert got["lr_scheduler"] == newest["lr_scheduler"] and got["lr_scheduler"]["last_epoch"] == 6
    assert got["train_state"] == newest["train_state"] == {"step": 6, "ntokens_seen": newest["train_state"]["ntokens_seen"]}
    for name, md in newest_md.state_dict_metadata.items():  # pickled items (dataloader, param groups, ...) byte for byte
        if isinstance(md, BytesStorageMetadata):
            assert item_bytes(out, out_md, name) == item_bytes(inputs[-1], newest_md, name), name
    assert any(n.startswith("dataloader.") for n, md in out_md.state_dict_metadata.items())


def test_torchtitan_drop_keeps_the_model_entries_alone(dcp_torchtitan_ckpts, tmp_path):
    inputs, out = steps(dcp_torchtitan_ckpts), tmp_path / "merged"
    report = ckptavg.average(inputs, out, out_format="same", verify=True)
    assert any("training state left out" in n and "optimizer (" in n and "train_state (2)" in n for n in report.notes)
    newest_md, out_md = metadata(inputs[-1]), metadata(out)
    names = [n for n in newest_md.state_dict_metadata if not n.startswith(TITAN_GROUPS)]
    assert list(out_md.state_dict_metadata) == names
    assert {i.fqn for i in out_md.storage_data} == set(names)
    assert set(out_md.planner_data) == set(names)
    assert_chunked_as(out_md, newest_md, names)
    torch.manual_seed(7)
    model = _TitanLike()
    state = get_model_state_dict(model)
    dcp_load(state, checkpoint_id=str(out))  # a model-only load (torchtitan's initial load, step 0)
    want = float64_mean(inputs, names)
    assert all(torch.equal(state[n], want[n]) for n in names)
    model.load_state_dict(state)
    with pytest.raises(CheckpointException):  # "Missing key": the optimizer and scheduler are not there to resume from
        titan_loaded(out)
    # the output is an input again, read as the inputs were
    again = ckptavg.export(out, tmp_path / "again.safetensors")
    assert again.tensors == len(names)


# --------------------------------------------------------------------------------------------------------- FSDP2


def net_loaded(folder: Path) -> tuple[dict, dict]:
    """(model, optimizer) state dicts of _Net and its AdamW, rebuilt here, as dcp.load fills them from `folder`."""
    torch.manual_seed(11)
    model = _Net()
    opt = torch.optim.AdamW(model.parameters(), lr=0.5)
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)}
    dcp_load(state, checkpoint_id=str(folder))
    return state["model"], state["optimizer"]


def test_fsdp2_uneven_and_empty_chunks_load_into_model_and_optimizer(dcp_fsdp2_ckpts, tmp_path):
    inputs, out = steps(dcp_fsdp2_ckpts), tmp_path / "merged"
    ckptavg.average(inputs, out, out_format="same", training_state="newest", verify=True)
    newest_md, out_md = metadata(inputs[-1]), metadata(out)
    assert list(out_md.state_dict_metadata) == list(newest_md.state_dict_metadata)
    names = [n for n in newest_md.state_dict_metadata if n.startswith("model.")]
    assert_chunked_as(out_md, newest_md, names)
    assert [tuple(c.sizes) for c in out_md.state_dict_metadata["model.head.weight"].chunks] == [(1, 7), (0, 7)]
    model, optimizer = net_loaded(out)
    want = float64_mean(inputs, names)
    for name in names:
        assert torch.equal(model[name.removeprefix("model.")], want[name]), name
    assert model["bn.num_batches_tracked"] == want["model.bn.num_batches_tracked"] == 6  # an integer: the newest's
    _, newest_optimizer = net_loaded(inputs[-1])
    assert optimizer["param_groups"] == newest_optimizer["param_groups"]
    assert optimizer["state"].keys() == newest_optimizer["state"].keys()
    for param, state in newest_optimizer["state"].items():
        assert all(torch.equal(optimizer["state"][param][k], v) for k, v in state.items()), param


def _fsdp2_resume(merged: Path, newest: Path, result: Path) -> None:
    """One of two gloo ranks: _Net under FSDP2 as dist_runs trains it, loaded from `merged` and from `newest` with
    dcp.load, then one more optimizer step; rank 0 saves the full model and optimizer state dicts and the losses."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    try:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        loaded = {}
        for name, folder in (("merged", merged), ("newest", newest)):
            torch.manual_seed(5)
            model = _Net()
            fully_shard(model.lin, mesh=mesh)
            fully_shard(model, mesh=mesh)
            opt = torch.optim.AdamW(model.parameters(), lr=0.01)
            state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)}
            dcp_load(state, checkpoint_id=str(folder))
            set_model_state_dict(model, state["model"])
            set_optimizer_state_dict(model, opt, state["optimizer"])
            full = StateDictOptions(full_state_dict=True, cpu_offload=True)
            loaded[name] = {
                # copies: the plain buffers (BatchNorm's running stats) come as the module's own tensors, which the step changes
                "model": {k: v.clone() for k, v in get_model_state_dict(model, options=full).items()},
                "optimizer": get_optimizer_state_dict(model, opt, options=full),
            }
            tokens = torch.randint(0, 11, (8, 3), generator=torch.Generator().manual_seed(dist.get_rank()))
            loss = model(tokens).pow(2).mean()
            loss.backward()
            opt.step()
            loaded[name]["loss"] = float(loss)
        if dist.get_rank() == 0:
            torch.save(loaded, result)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_two_ranks(tmp_path: Path, *args: str, timeout: float = 120) -> None:
    """This file run as `python test_same_dcp.py ARGS...` by two gloo ranks on 127.0.0.1; the ranks' output on failure."""
    from dist_runs import _free_port

    root = Path(__file__).resolve().parent
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE="2",
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
        PYTHONPATH=os.pathsep.join([str(root.parent), str(root), os.environ.get("PYTHONPATH", "")]),
    )
    logs = [open(tmp_path / f"rank{rank}.log", "w+") for rank in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, *args],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=logs[r],
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    tails = []
    for log in logs:
        log.seek(0)
        tails.append(log.read()[-3000:])
        log.close()
    assert codes == [0, 0], "\n".join(tails)


def test_fsdp2_two_ranks_resume_from_the_merge(dcp_fsdp2_ckpts, tmp_path):
    """The output loaded by FSDP2 itself on two gloo ranks, each reading its own shards, and training goes on."""
    inputs, out = steps(dcp_fsdp2_ckpts), tmp_path / "merged"
    ckptavg.average(inputs, out, out_format="same", training_state="newest")
    run_two_ranks(tmp_path, "fsdp2-resume", str(out), str(inputs[-1]), str(tmp_path / "loaded.pt"))
    loaded = torch.load(tmp_path / "loaded.pt", weights_only=True)
    want = float64_mean(inputs, [n for n in metadata(out).state_dict_metadata if n.startswith("model.")])
    merged, newest = loaded["merged"], loaded["newest"]
    assert merged["model"].keys() == {n.removeprefix("model.") for n in want}
    assert all(torch.equal(merged["model"][n.removeprefix("model.")], w) for n, w in want.items())
    assert merged["optimizer"]["param_groups"] == newest["optimizer"]["param_groups"]
    for param, state in newest["optimizer"]["state"].items():
        assert all(torch.equal(merged["optimizer"]["state"][param][k], v) for k, v in state.items()), param
    assert torch.isfinite(torch.tensor(merged["loss"])) and merged["loss"] != newest["loss"]


def test_fsdp2_drop_lists_only_the_model(dcp_fsdp2_ckpts, tmp_path):
    inputs, out = steps(dcp_fsdp2_ckpts), tmp_path / "merged"
    ckptavg.average(inputs, out, out_format="same")
    out_md = metadata(out)
    assert all(n.startswith("model.") for n in out_md.state_dict_metadata) and len(out_md.state_dict_metadata) == 10
    torch.manual_seed(11)
    state = {"model": get_model_state_dict(_Net())}
    dcp_load(state, checkpoint_id=str(out))
    want = float64_mean(inputs, list(out_md.state_dict_metadata))
    assert all(torch.equal(state["model"][n.removeprefix("model.")], want[n]) for n in want)


def test_row_chunks_are_written_from_pieces_that_straddle_them(dcp_fsdp2_ckpts, tmp_path):
    """The writer as the engine drives it, in 7-byte pieces (emb.weight's chunks meet at byte 144): the newest input's
    own values written back read as they were, every entry."""
    from ckptavg.checkpoint import open_checkpoint
    from ckptavg.formats.dcp_same import DcpSameWriter
    from ckptavg.formats.writer import TensorSpec

    newest = steps(dcp_fsdp2_ckpts)[-1]
    ckpt = open_checkpoint(newest)
    values = torch_reads(newest, {f"model.{n}" for n in ckpt.tensors})
    specs = [TensorSpec(n, src.dtype, tuple(src.shape)) for n, src in ckpt.tensors.items()]
    out = tmp_path / "out"
    out.mkdir()
    writer = DcpSameWriter(out, specs, ckpt, "newest", out, durable=False)
    for spec in specs:
        raw = values[f"model.{spec.name}"].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        for start in range(0, len(raw), 7):
            writer.write(memoryview(raw[start : start + 7]))
    writer.finish()
    keys = set(metadata(newest).state_dict_metadata)
    got, want = torch_reads(out, keys), torch_reads(newest, keys)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], v) if isinstance(v, torch.Tensor) else got[k] == v for k, v in want.items())


def test_tensor_parallel_column_chunks_are_cut_from_the_merged_tensor(dcp_tp_ckpts, tmp_path):
    inputs, out = steps(dcp_tp_ckpts), tmp_path / "merged"
    ckptavg.average(inputs, out, out_format="same", training_state="newest", verify=True)
    newest_md, out_md = metadata(inputs[-1]), metadata(out)
    names = [n for n in newest_md.state_dict_metadata if n.startswith("model.")]
    assert_chunked_as(out_md, newest_md, names)
    assert [tuple(c.offsets) for c in out_md.state_dict_metadata["model.fc2.weight"].chunks] == [(0, 0), (0, 5)]
    got, want = torch_reads(out, set(names)), float64_mean(inputs, names)
    assert all(torch.equal(got[n], want[n]) for n in names)
    others = [n for n in newest_md.state_dict_metadata if n not in names]
    got, newest = torch_reads(out, set(others)), torch_reads(inputs[-1], set(others))
    assert all(torch.equal(got[n], newest[n]) if isinstance(newest[n], torch.Tensor) else got[n] == newest[n] for n in others)


# ------------------------------------------------------------------------------------------------- zstd, refusals


def test_zstd_compressed_items_are_copied_compressed(tmp_path):
    pytest.importorskip("zstandard")
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint._extension import ZStandard

    inputs = []
    for step in (1, 2):
        g = torch.Generator().manual_seed(step)
        state = {
            "model": {"embed.weight": torch.randn(16, 5, generator=g)},
            "optimizer": {"state": {"embed.weight": {"exp_avg": torch.randn(16, 5, generator=g)}}, "param_groups": [{"lr": 0.1}]},
        }
        inputs.append(tmp_path / f"step-{step}")
        dcp_save(state, storage_writer=FileSystemWriter(str(inputs[-1]), _extensions=[ZStandard()]))
    out = tmp_path / "merged"
    ckptavg.average(inputs, out, out_format="same", training_state="newest", verify=True)
    out_md, newest_md = metadata(out), metadata(inputs[-1])
    transforms = {i.fqn: out_md.storage_data[i].transform_descriptors for i in out_md.storage_data}
    assert transforms["model.embed.weight"] is None  # written as a plain torch.save archive
    assert transforms["optimizer.state.embed.weight.exp_avg"] == ["stream.zstd/1"]
    got = torch_reads(out, {"model.embed.weight", "optimizer.state.embed.weight.exp_avg"})
    want = float64_mean(inputs, ["model.embed.weight"])
    assert torch.equal(got["model.embed.weight"], want["model.embed.weight"])
    assert item_bytes(out, out_md, "optimizer.state.embed.weight.exp_avg") == item_bytes(
        inputs[-1], newest_md, "optimizer.state.embed.weight.exp_avg"
    )


class _Touch:
    """Pickles as a call of Path.touch: whoever unpickles it creates the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_pickled_items_are_copied_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    inputs = []
    for step in (1, 2):
        g = torch.Generator().manual_seed(step)
        inputs.append(tmp_path / f"step-{step}")
        dcp_save(
            {"model": {"w": torch.randn(4, 3, generator=g)}, "extra": {"hook": _Touch(marker)}}, checkpoint_id=str(inputs[-1])
        )
    assert not marker.exists()
    out = tmp_path / "merged"
    report = ckptavg.average(inputs, out, out_format="same", training_state="newest", verify=True)
    assert any("extra (1)" in note for note in report.notes)
    assert not marker.exists()
    assert item_bytes(out, metadata(out), "extra.hook") == item_bytes(inputs[-1], metadata(inputs[-1]), "extra.hook")


def test_items_serialized_as_safetensors_are_refused(tmp_path):
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    inputs = []
    for step in (1, 2):
        inputs.append(tmp_path / f"step-{step}")
        writer = FileSystemWriter(str(inputs[-1]), serialization_format=SerializationFormat.SAFETENSORS)
        dcp_save({"model": {"w": torch.full((4, 3), float(step))}}, storage_writer=writer)
    with pytest.raises(UnsupportedError, match="serialized as safetensors is not written back yet"):
        ckptavg.average(inputs, tmp_path / "merged", out_format="same")
    assert not (tmp_path / "merged").exists()


def test_mixed_layouts_a_file_name_and_a_dtype_change_are_refused(dcp_fsdp2_ckpts, tmp_path):
    inputs = steps(dcp_fsdp2_ckpts)
    pickle_input = reference_path(dcp_fsdp2_ckpts, inputs[0])  # torch's own dcp_to_torch_save of step-2
    with pytest.raises(UsageError, match="needs inputs of one layout: this is a PyTorch pickle"):
        ckptavg.average([pickle_input, *inputs[1:]], tmp_path / "a", out_format="same")
    newest_pickle = reference_path(dcp_fsdp2_ckpts, inputs[-1])
    with pytest.raises(UsageError, match="needs inputs of one layout: this is a torch.distributed.checkpoint"):
        ckptavg.average([*inputs[:2], newest_pickle], tmp_path / "b.pt", out_format="same", order="given")
    with pytest.raises(UsageError, match="writes a DCP save, a folder"):
        ckptavg.average(inputs, tmp_path / "c.pt", out_format="same")
    with pytest.raises(UsageError, match="keeps each tensor's dtype"):
        ckptavg.average(inputs, tmp_path / "d", out_format="same", dtype="bf16")
    assert not any(tmp_path.iterdir())


def test_a_dcp_save_inside_a_trainer_folder_is_refused(dcp_accelerate_ckpts, tmp_path):
    inputs = sorted(dcp_accelerate_ckpts.glob("checkpoint-*"))
    with pytest.raises(UnsupportedError, match="name that folder itself"):
        ckptavg.average(inputs, tmp_path / "out", out_format="same")
    out = tmp_path / "model"
    ckptavg.average([i / "pytorch_model_fsdp_0" for i in inputs], out, out_format="same", verify=True)
    assert all(n.startswith("model.") for n in metadata(out).state_dict_metadata)


if __name__ == "__main__":
    if sys.argv[1:2] == ["fsdp2-resume"]:
        _fsdp2_resume(*(Path(a) for a in sys.argv[2:5]))
    else:
        sys.exit(f"usage: {sys.argv[0]} fsdp2-resume MERGED NEWEST RESULT")
