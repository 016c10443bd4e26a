"""The layouts of real two-rank distributed checkpoints (tests/dist_runs.py), as ckptavg's readers expect them.

DCP folders are read with torch's own FileSystemReader(dir).read_metadata() and each storage item is loaded from its
byte range alone; DeepSpeed files with torch.load. Each layout is rebuilt by hand (chunks placed at their offsets,
ZeRO partitions concatenated / sliced) and compared with the library's own consolidation: torch's
dcp_to_torch_save and DeepSpeed's zero_to_fp32. The tests fail when a torch or DeepSpeed version writes another
layout.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
import zipfile
from pathlib import Path

import pytest
import torch
from dist_runs import (
    DCP_SAVE_STEPS,
    DEEPSPEED_KINDS,
    DEEPSPEED_SAVE_STEPS,
    WORLD_SIZE,
    dcp_checkpoint_dirs,
    fp32_reference,
    reference_path,
)

# ----------------------------------------------------------------------------------------------------- DCP

NET = [  # dist_runs._Net
    "emb.weight",
    "lin.weight",
    "lin.bias",
    "bn.weight",
    "bn.bias",
    "bn.running_mean",
    "bn.running_var",
    "bn.num_batches_tracked",
    "head.weight",
    "head.bias",
]
NET_PARAMS = [n for n in NET if "running" not in n and "num_batches" not in n]
BLOCK = ("attention_norm", "attention.wq", "attention.wo", "ffn_norm", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
TITAN = ["tok_embeddings.weight", *(f"layers.{i}.{n}.weight" for i in range(2) for n in BLOCK), "norm.weight", "output.weight"]
TP = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
ADAM = ("step", "exp_avg", "exp_avg_sq")
PARAM_GROUP = [
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "amsgrad",
    "maximize",
    "foreach",
    "capturable",
    "differentiable",
    "fused",
    "decoupled_weight_decay",
]

# Every global the .metadata pickles may name (torch 2.13, Python 3.11); a restricted unpickler needs exactly these.
DCP_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata.Metadata",
    "torch.distributed.checkpoint.metadata.TensorStorageMetadata",
    "torch.distributed.checkpoint.metadata.BytesStorageMetadata",
    "torch.distributed.checkpoint.metadata.ChunkStorageMetadata",
    "torch.distributed.checkpoint.metadata.TensorProperties",
    "torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING",
    "torch.distributed.checkpoint.metadata.MetadataIndex",
    "torch.distributed.checkpoint.metadata.StorageMeta",
    "torch.distributed.checkpoint.filesystem._StorageInfo",
    "torch.Size",
    "torch.serialization._get_layout",
    "torch.float32",
    "torch.int64",
    "pathlib.PosixPath",
    "pathlib._local.PosixPath",  # what Python 3.13 writes for StorageMeta.checkpoint_id (3.11 here: pathlib.PosixPath)
}
# and the data.pkl of a tensor item (one torch.save of the local chunk)
DCP_TENSOR_ITEM_GLOBALS = {
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    "torch.FloatStorage",
    "torch.LongStorage",
}


def pickle_globals(data: bytes) -> tuple[set[str], set[str]]:
    """(module.name of every global the pickle resolves, names of the opcodes that named them), without importing
    anything: each global is replaced by an inert stand-in class."""

    class Inert:
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, *args, **kwargs):
            return Inert()

        def __setstate__(self, state):
            pass

        def __setitem__(self, key, value):
            pass

        def append(self, value):
            pass

        def extend(self, values):
            pass

    seen: set[str] = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add(f"{module}.{name}")
            return type(name, (Inert,), {})

        def persistent_load(self, pid):
            return Inert()

    Recorder(io.BytesIO(data)).load()
    opcodes = {op.name for op, _, _ in pickletools.genops(data) if op.name in ("GLOBAL", "STACK_GLOBAL", "INST", "OBJ")}
    return seen, opcodes


def zip_pickle(data: bytes) -> tuple[bytes, list[str]]:
    z = zipfile.ZipFile(io.BytesIO(data))
    names = z.namelist()
    return z.read(next(n for n in names if n.endswith("/data.pkl"))), names


def read_metadata(ckpt: Path):
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(ckpt)).read_metadata()


def chunks(md, key: str) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    return [(tuple(c.offsets), tuple(c.sizes)) for c in md.state_dict_metadata[key].chunks]


def item_bytes(ckpt: Path, info) -> bytes:
    with open(ckpt / info.relative_path, "rb") as f:
        f.seek(info.offset)
        return f.read(info.length)


def storage(md, key: str, offsets):
    from torch.distributed.checkpoint.metadata import MetadataIndex

    return md.storage_data[MetadataIndex(key, None if offsets is None else torch.Size(offsets))]


def rebuild(ckpt: Path, md, key: str) -> torch.Tensor:
    """One tensor from its chunks: each chunk's byte range is one complete torch.save zip of the local chunk."""
    meta = md.state_dict_metadata[key]
    full = torch.full(tuple(meta.size), float("nan")).to(meta.properties.dtype)
    filled = 0
    for chunk in meta.chunks:
        part = torch.load(io.BytesIO(item_bytes(ckpt, storage(md, key, chunk.offsets))), weights_only=True)
        assert tuple(part.shape) == tuple(chunk.sizes) and part.dtype == meta.properties.dtype
        full[tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))] = part
        filled += part.numel()
    assert filled == full.numel()  # the chunks tile the tensor
    return full


def flat_reference(ref: dict, md) -> dict:
    """torch's nested dcp_to_torch_save dict flattened back to the metadata keys (planner_data holds each key's path)."""
    out = {}
    for key, path in md.planner_data.items():
        value = ref
        for part in path:
            value = value[part]
        out[key] = value
    return out


def tensor_keys(md) -> list[str]:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return [k for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)]


def bytes_keys(md) -> list[str]:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    return [k for k, v in md.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]


def check_files(ckpt: Path, md) -> None:
    """.metadata plus one file per rank (__R_0.distcp), each file the concatenation of its items, nothing else."""
    assert sorted(p.name for p in ckpt.iterdir()) == [".metadata"] + [f"__{r}_0.distcp" for r in range(WORLD_SIZE)]
    for name in (f"__{r}_0.distcp" for r in range(WORLD_SIZE)):
        ranges = sorted((i.offset, i.length) for i in md.storage_data.values() if i.relative_path == name)
        end = 0
        for offset, length in ranges:
            assert offset == end
            end += length
        assert end == (ckpt / name).stat().st_size
    assert all(getattr(i, "transform_descriptors", None) is None for i in md.storage_data.values())
    assert md.version == "1.0.0"


def all_dcp_dirs(root: Path, expected: list[str]) -> list[Path]:
    dirs = dcp_checkpoint_dirs(root)
    assert [str(d.relative_to(root)) for d in dirs] == expected
    return dirs


def test_dcp_fsdp2_layout(dcp_fsdp2_ckpts):
    root = dcp_fsdp2_ckpts
    for ckpt in all_dcp_dirs(root, [f"step-{s}" for s in DCP_SAVE_STEPS]):
        md = read_metadata(ckpt)
        check_files(ckpt, md)
        keys = set(md.state_dict_metadata)
        optim_keys = {f"optimizer.state.{n}.{s}" for n in NET_PARAMS for s in ADAM}
        assert set(tensor_keys(md)) == {f"model.{n}" for n in NET} | optim_keys
        assert set(bytes_keys(md)) == {f"optimizer.param_groups.0.{k}" for k in [*PARAM_GROUP, "params"]}
        assert len(keys) == len(NET) + 3 * len(NET_PARAMS) + len(PARAM_GROUP) + 1
        # FSDP2 Shard(0) rows follow torch.chunk: ceil(rows / 2) on rank 0, the rest (maybe none) on rank 1
        assert chunks(md, "model.emb.weight") == [((0, 0), (6, 6)), ((6, 0), (5, 6))]
        assert chunks(md, "model.lin.weight") == [((0, 0), (4, 6)), ((4, 0), (3, 6))]
        assert chunks(md, "model.lin.bias") == [((0,), (4,)), ((4,), (3,))]
        assert chunks(md, "model.head.weight") == [((0, 0), (1, 7)), ((1, 0), (0, 7))]  # rank 1's chunk is empty
        assert chunks(md, "optimizer.state.head.bias.exp_avg") == [((0,), (1,)), ((1,), (0,))]
        assert storage(md, "model.emb.weight", (0, 0)).relative_path == "__0_0.distcp"
        assert storage(md, "model.emb.weight", (6, 0)).relative_path == "__1_0.distcp"
        assert storage(md, "model.head.weight", (1, 0)).relative_path == "__1_0.distcp"  # the empty chunk is stored too
        # buffers and Adam's step are plain (replicated) tensors: one whole chunk, written once
        assert chunks(md, "model.bn.running_mean") == [((0,), (7,))]
        assert chunks(md, "model.bn.num_batches_tracked") == [((), ())]
        assert chunks(md, "optimizer.state.emb.weight.step") == [((), ())]
        nbt = md.state_dict_metadata["model.bn.num_batches_tracked"]
        assert nbt.properties.dtype == torch.int64 and tuple(nbt.size) == ()
        assert {md.state_dict_metadata[k].properties.dtype for k in tensor_keys(md)} == {torch.float32, torch.int64}
        assert md.planner_data["model.emb.weight"] == ("model", "emb.weight")
        assert md.planner_data["optimizer.state.emb.weight.exp_avg"] == ("optimizer", "state", "emb.weight", "exp_avg")
        assert md.planner_data["optimizer.param_groups.0.lr"] == ("optimizer", "param_groups", 0, "lr")


def test_dcp_torchtitan_layout(dcp_torchtitan_ckpts):
    root = dcp_torchtitan_ckpts
    assert root.name == "checkpoint"
    for step, ckpt in zip(DCP_SAVE_STEPS, all_dcp_dirs(root, [f"step-{s}" for s in DCP_SAVE_STEPS])):
        md = read_metadata(ckpt)
        check_files(ckpt, md)
        tensors = set(tensor_keys(md))
        assert {k for k in tensors if not k.startswith("optimizer.")} == set(TITAN)  # model keys: no prefix
        assert tensors - set(TITAN) == {f"optimizer.state.{n}.{s}" for n in TITAN for s in ADAM}
        byte_keys = set(bytes_keys(md))
        assert {f"optimizer.param_groups.{n}.{k}" for n in TITAN for k in [*PARAM_GROUP, "initial_lr"]} <= byte_keys
        assert {
            "lr_scheduler.last_epoch",
            "lr_scheduler.base_lrs",
            "dataloader.dp_rank_0",
            "dataloader.dp_rank_1",
            "dataloader.world_size",
            "train_state.step",
            "train_state.ntokens_seen",
        } <= byte_keys
        assert {k.split(".")[0] for k in byte_keys} == {"optimizer", "lr_scheduler", "dataloader", "train_state"}
        assert chunks(md, "tok_embeddings.weight") == [((0, 0), (7, 8)), ((7, 0), (6, 8))]
        assert chunks(md, "layers.0.feed_forward.w1.weight") == [((0, 0), (6, 8)), ((6, 0), (6, 8))]
        assert chunks(md, "output.weight") == [((0, 0), (7, 8)), ((7, 0), (6, 8))]
        # each rank writes its own dataloader entry
        assert storage(md, "dataloader.dp_rank_0", None).relative_path == "__0_0.distcp"
        assert storage(md, "dataloader.dp_rank_1", None).relative_path == "__1_0.distcp"
        assert md.planner_data["tok_embeddings.weight"] == ("tok_embeddings.weight",)
        ref = torch.load(reference_path(root, ckpt), weights_only=False)
        assert ref["train_state"] == {"step": step, "ntokens_seen": step * 4 * 6 * WORLD_SIZE}
        assert ref["dataloader"]["world_size"] == WORLD_SIZE and ref["lr_scheduler"]["last_epoch"] == step


def test_dcp_tp_layout(dcp_tp_ckpts):
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    root = dcp_tp_ckpts
    for ckpt in all_dcp_dirs(root, [f"step-{s}" for s in DCP_SAVE_STEPS]):
        md = read_metadata(ckpt)
        check_files(ckpt, md)
        assert set(tensor_keys(md)) == {f"model.{n}" for n in TP} | {f"optimizer.state.{n}.{s}" for n in TP for s in ADAM}
        assert chunks(md, "model.fc1.weight") == [((0, 0), (5, 5)), ((5, 0), (4, 5))]  # ColwiseParallel: Shard(0)
        assert chunks(md, "model.fc1.bias") == [((0,), (5,)), ((5,), (4,))]
        assert chunks(md, "model.fc2.weight") == [((0, 0), (3, 5)), ((0, 5), (3, 4))]  # RowwiseParallel: Shard(1)
        assert chunks(md, "optimizer.state.fc2.weight.exp_avg_sq") == [((0, 0), (3, 5)), ((0, 5), (3, 4))]
        assert chunks(md, "model.fc2.bias") == [((0,), (3,))]  # Replicate: deduplicated, one chunk
        assert storage(md, "model.fc2.weight", (0, 5)).relative_path == "__1_0.distcp"
        # the replicated DTensor is written by whichever rank the planner picks, not necessarily rank 0
        assert storage(md, "model.fc2.bias", (0,)).relative_path in {f"__{r}_0.distcp" for r in range(WORLD_SIZE)}
        assert isinstance(md.state_dict_metadata["optimizer.param_groups.0.params"], BytesStorageMetadata)


def test_dcp_accelerate_layout(dcp_accelerate_ckpts):
    root = dcp_accelerate_ckpts
    expected = [f"checkpoint-{s}/{d}" for s in DCP_SAVE_STEPS for d in ("optimizer_0", "pytorch_model_fsdp_0")]
    dirs = all_dcp_dirs(root, expected)
    for step in DCP_SAVE_STEPS:
        assert sorted(p.name for p in (root / f"checkpoint-{step}").iterdir()) == ["optimizer_0", "pytorch_model_fsdp_0"]
    for ckpt in dirs:
        md = read_metadata(ckpt)
        check_files(ckpt, md)
        if ckpt.name == "pytorch_model_fsdp_0":
            assert set(md.state_dict_metadata) == {f"model.{n}" for n in NET}  # saved as {"model": state_dict}
            assert chunks(md, "model.emb.weight") == [((0, 0), (6, 6)), ((6, 0), (5, 6))]
            assert chunks(md, "model.head.bias") == [((0,), (1,)), ((1,), (0,))]
        else:
            assert set(tensor_keys(md)) == {f"optimizer.state.{n}.{s}" for n in NET_PARAMS for s in ADAM}
            assert set(bytes_keys(md)) == {f"optimizer.param_groups.0.{k}" for k in [*PARAM_GROUP, "params"]}


@pytest.mark.parametrize("run", ["dcp_fsdp2_ckpts", "dcp_torchtitan_ckpts", "dcp_tp_ckpts", "dcp_accelerate_ckpts"])
def test_dcp_chunks_rebuild_torch_reference(run, request):
    """Every tensor rebuilt from its byte ranges equals torch's own consolidation (dcp_to_torch_save)."""
    root = request.getfixturevalue(run)
    for ckpt in dcp_checkpoint_dirs(root):
        md = read_metadata(ckpt)
        ref = flat_reference(torch.load(reference_path(root, ckpt), weights_only=False), md)
        assert set(ref) == set(md.state_dict_metadata)
        for key in tensor_keys(md):
            rebuilt = rebuild(ckpt, md, key)
            assert rebuilt.dtype == ref[key].dtype and torch.equal(rebuilt, ref[key]), key
        for key in bytes_keys(md):
            # a bytes item is a torch.save of the value too, but an arbitrary pickle: never to unpickle when averaging
            data, names = zip_pickle(item_bytes(ckpt, storage(md, key, None)))
            assert not any("/data/" in n for n in names)
            assert torch.load(io.BytesIO(item_bytes(ckpt, storage(md, key, None))), weights_only=False) == ref[key]


@pytest.mark.parametrize("run", ["dcp_fsdp2_ckpts", "dcp_torchtitan_ckpts", "dcp_tp_ckpts", "dcp_accelerate_ckpts"])
def test_dcp_pickle_globals(run, request):
    root = request.getfixturevalue(run)
    for ckpt in dcp_checkpoint_dirs(root):
        raw = (ckpt / ".metadata").read_bytes()
        assert raw[:2] == b"\x80\x04"  # a plain pickle.dump (protocol 4), not a torch.save zip
        names, opcodes = pickle_globals(raw)
        assert names <= DCP_METADATA_GLOBALS, names - DCP_METADATA_GLOBALS
        assert opcodes == {"STACK_GLOBAL"}
        assert {
            "torch.distributed.checkpoint.metadata.Metadata",
            "torch.distributed.checkpoint.filesystem._StorageInfo",
            "torch.serialization._get_layout",
        } <= names
        assert names & {"pathlib.PosixPath", "pathlib._local.PosixPath"}
        md = read_metadata(ckpt)
        for key in tensor_keys(md):
            for chunk in md.state_dict_metadata[key].chunks:
                data, names_in_zip = zip_pickle(item_bytes(ckpt, storage(md, key, chunk.offsets)))
                assert names_in_zip[0] == "archive/data.pkl" and "archive/data/0" in names_in_zip
                assert pickle_globals(data)[0] <= DCP_TENSOR_ITEM_GLOBALS


@pytest.mark.parametrize("run", ["dcp_fsdp2_ckpts", "dcp_torchtitan_ckpts", "dcp_tp_ckpts", "dcp_accelerate_ckpts"])
def test_dcp_checkpoints_differ_by_step(run, request):
    root = request.getfixturevalue(run)
    dirs = [d for d in dcp_checkpoint_dirs(root) if d.name != "optimizer_0"]
    assert len(dirs) == len(DCP_SAVE_STEPS)
    refs = [flat_reference(torch.load(reference_path(root, d), weights_only=False), read_metadata(d)) for d in dirs]
    weights = [k for k in tensor_keys(read_metadata(dirs[0])) if k.endswith("weight") and not k.startswith("optimizer")]
    for a, b in zip(refs, refs[1:]):
        assert all(not torch.equal(a[k], b[k]) for k in weights)
    if "model.bn.num_batches_tracked" in refs[0]:
        assert [int(r["model.bn.num_batches_tracked"]) for r in refs] == list(DCP_SAVE_STEPS)


# ----------------------------------------------------------------------------------------------- DeepSpeed

DS_PARAMS = {"emb.weight": (11, 5), "lin.weight": (7, 5), "lin.bias": (7,), "bn.weight": (7,), "bn.bias": (7,)}
DS_FROZEN = {"frozen.weight": (5, 7), "frozen.bias": (5,)}
DS_BUFFERS = ["bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]
DS_MODULE = [*DS_PARAMS, *DS_BUFFERS, *DS_FROZEN, "head.weight"]
DS_OPTIM_GLOBALS = {
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    "torch.FloatStorage",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
}
DS_RUNS = {kind: f"deepspeed_2rank_{kind}_ckpts" for kind in DEEPSPEED_KINDS}


def ds_load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False)


def ds_files(kind: str) -> tuple[list[str], list[str]]:
    stage, bf16 = DEEPSPEED_KINDS[kind]
    prefix = "bf16_" if bf16 else ""
    optim = [f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(WORLD_SIZE)]
    if stage == 3:
        model = [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(WORLD_SIZE)]
    else:
        model = ["mp_rank_00_model_states.pt"]
    return model, optim


@pytest.mark.parametrize("kind", list(DEEPSPEED_KINDS))
def test_deepspeed_2rank_files(kind, request):
    root = request.getfixturevalue(DS_RUNS[kind])
    assert (root / "latest").read_text() == f"global_step{max(DEEPSPEED_SAVE_STEPS)}"
    assert {"zero_to_fp32.py", "latest"} <= {p.name for p in root.iterdir()}
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(f"global_step{s}" for s in DEEPSPEED_SAVE_STEPS)
    model, optim = ds_files(kind)
    for step in DEEPSPEED_SAVE_STEPS:
        assert sorted(p.name for p in (root / f"global_step{step}").iterdir()) == sorted(model + optim)
        assert fp32_reference(root, step).is_file()


@pytest.mark.parametrize("kind", list(DEEPSPEED_KINDS))
def test_deepspeed_2rank_states(kind, request):
    root = request.getfixturevalue(DS_RUNS[kind])
    stage, bf16 = DEEPSPEED_KINDS[kind]
    low = torch.bfloat16 if bf16 else torch.float32
    model, optim = ds_files(kind)
    for step in DEEPSPEED_SAVE_STEPS:
        folder = root / f"global_step{step}"
        for rank, name in enumerate(model):
            ms = ds_load(folder / name)
            assert list(ms["module"]) == DS_MODULE
            assert ms["buffer_names"] == DS_BUFFERS and ms["optimizer"] is None
            assert ms["global_steps"] == step and ms["dp_world_size"] == WORLD_SIZE and ms["ds_version"]
            assert ms["param_shapes"] == [{k: torch.Size(v) for k, v in DS_PARAMS.items()}]
            assert list(ms["param_shapes"][0]) == list(DS_PARAMS)  # flat order
            assert ms["frozen_param_shapes"] == {k: torch.Size(v) for k, v in DS_FROZEN.items()}
            # ZeRO-3: only rank 0's model states name the tied parameter
            assert ms["shared_params"] == ({"head.weight": "emb.weight"} if rank == 0 else {})
            assert ms["module"]["bn.num_batches_tracked"].dtype == torch.int64
            assert int(ms["module"]["bn.num_batches_tracked"]) == step
            assert ms["module"]["bn.running_mean"].dtype == low  # bf16 runs set data_types.buffer_dtype bf16
            fragments = ms["frozen_param_fragments"]
            if stage == 2:  # full 16-bit (or fp32) weights in module, full frozen tensors
                assert all(ms["module"][k].shape == torch.Size(v) and ms["module"][k].dtype == low for k, v in DS_PARAMS.items())
                assert {k: tuple(v.shape) for k, v in fragments.items()} == DS_FROZEN
            else:  # ZeRO-3: parameters are empty placeholders, frozen ones per-rank flat fragments of ceil(n / 2)
                assert all(ms["module"][k].numel() == 0 for k in [*DS_PARAMS, *DS_FROZEN, "head.weight"])
                assert {k: tuple(v.shape) for k, v in fragments.items()} == {"frozen.weight": (18,), "frozen.bias": (3,)}
            assert all(v.dtype == low for v in fragments.values())
        for rank, name in enumerate(optim):
            osd = ds_load(folder / name)
            assert set(osd) == {"optimizer_state_dict", "ds_config", "ds_version"}
            sd = osd["optimizer_state_dict"]
            assert int(sd["zero_stage"]) == stage and type(sd["zero_stage"]).__name__ == "ZeroStageEnum"
            assert type(sd["loss_scaler"]).__name__ == "LossScaler"
            if stage == 2:
                assert set(sd) == {
                    "loss_scaler",
                    "dynamic_loss_scale",
                    "overflow",
                    "clip_grad",
                    "base_optimizer_state",
                    "single_partition_of_fp32_groups",
                    "zero_stage",
                    "group_paddings",
                    "param_alignment_paddings",
                    "partition_count",
                    "ds_version",
                    "param_slice_mappings",
                }
                assert sd["partition_count"] == [WORLD_SIZE]
                # 111 trainable elements, padded to 112 and split 56 / 56; the padding is not saved
                assert [tuple(t.shape) for t in sd["single_partition_of_fp32_groups"]] == [((56,), (55,))[rank]]
                assert sd["group_paddings"] == [[0, 1][rank]]
                assert all(t.dtype == torch.float32 for t in sd["single_partition_of_fp32_groups"])
                mapping = {k: (v.start, v.numel) for k, v in sd["param_slice_mappings"][0].items()}
                assert (
                    mapping
                    == [
                        {"emb.weight": (0, 55), "lin.weight": (55, 1)},
                        {"lin.weight": (0, 34), "lin.bias": (34, 7), "bn.weight": (41, 7), "bn.bias": (48, 7)},
                    ][rank]
                )
                state = sd["base_optimizer_state"]["state"][0]
                assert tuple(state["exp_avg"].shape) == (56,)  # the moments keep the padded length
            else:
                assert set(sd) == {
                    "zero_stage",
                    "loss_scaler",
                    "dynamic_loss_scale",
                    "overflow",
                    "partition_count",
                    "optimizer_state_dict",
                    "fp32_flat_groups",
                }
                assert sd["partition_count"] == WORLD_SIZE
                # each parameter takes ceil(numel / 2) slots on every rank: 28 + 18 + 4 + 4 + 4
                assert [tuple(t.shape) for t in sd["fp32_flat_groups"]] == [(58,)]
                assert sd["fp32_flat_groups"][0].dtype == torch.float32
                # a tensor with a Python attribute (ds_id, a process-wide counter range such as "0_4"): pickled
                # through torch._tensor._rebuild_from_type_v2 with the state {"ds_id": ...}
                assert list(sd["fp32_flat_groups"][0].__dict__) == ["ds_id"]
                assert tuple(sd["optimizer_state_dict"]["state"][0]["exp_avg"].shape) == (58,)


def rebuild_zero(folder: Path, kind: str) -> dict[str, torch.Tensor]:
    """The fp32 weights rebuilt from the partitions as zero_to_fp32 does, from the documented layout."""
    stage, _ = DEEPSPEED_KINDS[kind]
    model, optim = ds_files(kind)
    states = [ds_load(folder / name) for name in model]
    opt = [ds_load(folder / name)["optimizer_state_dict"] for name in optim]
    ms = states[0]
    out = {k: v.float() if v.is_floating_point() else v for k, v in ms["module"].items() if k in ms["buffer_names"]}
    if stage == 2:
        flat = torch.cat([o["single_partition_of_fp32_groups"][0] for o in opt])
        offset = 0
        for name, shape in ms["param_shapes"][0].items():
            out[name] = flat[offset : offset + math.prod(shape)].view(shape)
            offset += math.prod(shape)
        assert flat.numel() - offset == 0  # the tail padding is not saved
        out.update(ms["frozen_param_fragments"])
    else:
        offset = 0
        for name, shape in ms["param_shapes"][0].items():
            numel = math.prod(shape)
            part = math.ceil(numel / WORLD_SIZE)
            out[name] = torch.cat([o["fp32_flat_groups"][0][offset : offset + part] for o in opt])[:numel].view(shape)
            offset += part
        assert offset == opt[0]["fp32_flat_groups"][0].numel()
        for name, shape in ms["frozen_param_shapes"].items():
            out[name] = torch.cat([s["frozen_param_fragments"][name] for s in states])[: math.prod(shape)].view(shape)
    for alias, source in ms["shared_params"].items():
        out[alias] = out[source]
    return out


@pytest.mark.parametrize("kind", list(DEEPSPEED_KINDS))
def test_deepspeed_2rank_rebuild_matches_zero_to_fp32(kind, request):
    root = request.getfixturevalue(DS_RUNS[kind])
    stage, bf16 = DEEPSPEED_KINDS[kind]
    previous = None
    for step in DEEPSPEED_SAVE_STEPS:
        ref = ds_load(fp32_reference(root, step))
        assert set(ref) == set(DS_MODULE)
        rebuilt = rebuild_zero(root / f"global_step{step}", kind)
        assert set(rebuilt) == set(ref)
        for name, value in ref.items():
            assert value.dtype == rebuilt[name].dtype and torch.equal(value, rebuilt[name]), name
        # zero_to_fp32: trainable weights fp32 from the master partitions, float buffers cast to fp32, integer ones
        # kept, frozen weights in the saved (16-bit) dtype, the tied head shared with the embedding
        assert ref["emb.weight"].dtype == torch.float32 and ref["bn.running_var"].dtype == torch.float32
        assert ref["bn.num_batches_tracked"].dtype == torch.int64
        assert ref["frozen.weight"].dtype == (torch.bfloat16 if bf16 else torch.float32)
        assert ref["head.weight"] is ref["emb.weight"] or torch.equal(ref["head.weight"], ref["emb.weight"])
        if stage == 2 and not bf16:  # fp32 ZeRO-2: the module's weights are the master weights
            module = ds_load(root / f"global_step{step}" / "mp_rank_00_model_states.pt")["module"]
            assert all(torch.equal(module[n], ref[n]) for n in DS_PARAMS)
        if previous is not None:
            assert not torch.equal(previous["lin.weight"], ref["lin.weight"])
            assert torch.equal(previous["frozen.weight"], ref["frozen.weight"])  # frozen: never updated
        previous = ref


@pytest.mark.parametrize("kind", list(DEEPSPEED_KINDS))
def test_deepspeed_2rank_pickle_globals(kind, request):
    root = request.getfixturevalue(DS_RUNS[kind])
    stage, bf16 = DEEPSPEED_KINDS[kind]
    model, optim = ds_files(kind)
    folder = root / f"global_step{DEEPSPEED_SAVE_STEPS[0]}"
    for name in optim:
        data, names = zip_pickle((folder / name).read_bytes())
        assert names[0] == f"{name[:-3]}/data.pkl"  # the archive's folder is the file's stem
        seen, opcodes = pickle_globals(data)
        expected = DS_OPTIM_GLOBALS | (
            {"deepspeed.utils.tensor_fragment.fragment_address"}
            if stage == 2
            else {"torch._tensor._rebuild_from_type_v2", "torch.Tensor"}
        )
        assert seen == expected and opcodes == {"GLOBAL"}
    for name in model:
        seen, opcodes = pickle_globals(zip_pickle((folder / name).read_bytes())[0])
        storage_type = "torch.BFloat16Storage" if bf16 else "torch.FloatStorage"
        assert seen == {
            "collections.OrderedDict",
            "torch._utils._rebuild_tensor_v2",
            "torch.Size",
            "torch.LongStorage",
            storage_type,
        }
