"""Real distributed checkpoints made on CPU by two processes (gloo on 127.0.0.1): torch.distributed.checkpoint (DCP)
from FSDP2, a torchtitan-style trainer, tensor parallelism and accelerate's FSDP2 save functions, and DeepSpeed
ZeRO-2/3 with world size 2.

Each builder starts WORLD_SIZE child processes (`python dist_runs.py JOB ...` with RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT set), so no process group or DeepSpeed state is left in the test session. Everything is seeded, and each
rank draws its own batches from a generator seeded by (step, rank), so two builds hold the same tensors (except
ZeRO-3's padding, below).

DCP (dcp_runs; saves after optimizer steps DCP_SAVE_STEPS = 2, 4, 6):

- fsdp2 (dcp_fsdp2_run): _Net under torch.distributed.fsdp.fully_shard (lin wrapped, then the root) on a 2-rank CPU
  mesh, AdamW; root/step-N/ = dcp.save({"model": get_model_state_dict, "optimizer": get_optimizer_state_dict}):
  keys model.<fqn>, optimizer.state.<fqn>.{step,exp_avg,exp_avg_sq}, optimizer.param_groups.0.* (bytes).
  Row shards are torch.chunk's: emb.weight [11, 6] rows 6/5, lin.weight [7, 6] rows 4/3, head.weight [1, 7] rows 1/0
  (rank 1's chunk is empty). Buffers (bn.running_*, bn.num_batches_tracked int64) are plain tensors: one chunk each.
- torchtitan (dcp_torchtitan_run): _TitanLike (tok_embeddings, layers.{0,1}.attention.{wq,wo},
  layers.*.feed_forward.{w1,w2,w3}, *_norm RMSNorm, norm, output) under fully_shard per layer and root, AdamW and a
  LambdaLR; root/step-N/ = dcp.save of torchtitan's flattened states: model keys at the top level (no prefix),
  optimizer.state.<fqn>.* and optimizer.param_groups.<fqn>.* (flatten_optimizer_state_dict=True),
  lr_scheduler.* (LambdaLR.state_dict), dataloader.dp_rank_{0,1} (pickled bytes) and dataloader.world_size,
  train_state.step / train_state.ntokens_seen (ints). Everything but the tensors is BytesStorageMetadata.
- tp (dcp_tp_run): _TPNet parallelized with parallelize_module: fc1 ColwiseParallel (weight [9, 5] Shard(0),
  bias [9] Shard(0): rows 5/4), fc2 RowwiseParallel (weight [3, 9] Shard(1): column chunks 5/4; bias [3]
  Replicate: one chunk); root/step-N/ with model.* and optimizer.* keys.
- accelerate (dcp_accelerate_run): _Net under fully_shard, saved by accelerate's own save_fsdp_model /
  save_fsdp_optimizer (accelerate.utils.fsdp_utils, fsdp_version 2, SHARDED_STATE_DICT, use_dcp), as the HF
  Trainer calls them: root/checkpoint-N/pytorch_model_fsdp_0/ (DCP, keys model.<fqn>) beside
  root/checkpoint-N/optimizer_0/ (DCP, keys optimizer.state.*, optimizer.param_groups.*).

DCP written as safetensors (dcp_safetensors_runs; one 2-rank launch, saves after steps DCP_SAVE_STEPS): _HFNet
(_TPNet's tensor-parallel fc1/fc2: rows 5/4, columns 5/4, a replicated bias, plus plain buffers: a float scalar
`scale` and an int64 `count`, one rank writes each), saved twice per step:
- hf: HuggingFaceStorageWriter(root/step-N, save_distributed=True, fqn_to_index_mapping: fc1.* -> 1, the rest -> 2),
  as torchtitan's HF saves and NeMo Automodel write: shard-0000R-model-0000i-of-00002.safetensors, no index, each
  header's __metadata__ with DCP_SHARDING_INFO; keys are the model's own names.
- st: dcp.save({"model", "optimizer"}) with FileSystemWriter(serialization_format=SAFETENSORS): .metadata and
  __R_0.distcp whose optimizer param groups (pickled bytes) come first, then one safetensors blob.
torch's own readers do not read these back here, so the reference, <root>-ref/step-N.pt, is the full model state
dict (DTensor.full_tensor()) each step saved, torch.save'd by rank 0.

Beside each DCP run, <root>-ref/<dcp dir relative to root>.pt (step-N.pt, checkpoint-N/pytorch_model_fsdp_0.pt,
checkpoint-N/optimizer_0.pt) is torch's own consolidation, format_utils.dcp_to_torch_save(dir, pt): the nested state
dict ({"model": {...}, "optimizer": {...}}, or torchtitan's top-level dict) with full tensors.

For the accelerate run the model is wrapped by fully_shard directly, not through Accelerator.prepare; the save
functions are accelerate's, given a real FullyShardedDataParallelPlugin and PartialState over the same gloo group.
The rest of an HF Trainer checkpoint-N folder (trainer_state.json, scheduler.pt, rng_state_R.pth) is not written.

DeepSpeed (deepspeed_dist_runs; engine.save_checkpoint(root, tag=f"global_step{N}") after steps 2, 4, 6, torch
AdamW, WarmupLR, DeepSpeed's CPU accelerator, no op compiled): runs zero2, zero3 (fp32) and zero2_bf16, zero3_bf16
(bf16.enabled, with data_types.buffer_dtype bf16 so that BatchNorm runs on CPU; optimizer-state files get the bf16_
prefix). _DSNet has an int64 buffer (bn.num_batches_tracked), a frozen Linear (frozen.weight/bias, requires_grad
False, not given to the optimizer) and a tied head (head.weight is emb.weight). Beside each root,
<root>-fp32/global_stepN.pt is DeepSpeed's own zero_to_fp32 result, get_fp32_state_dict_from_zero_checkpoint(root,
tag), computed in the child process on rank 0.

Two builds hold the same values everywhere except ZeRO-3's padding slots (the tail of each parameter's ceil(n / 2)
slice on rank 1, in fp32_flat_groups and frozen_param_fragments): DeepSpeed leaves them uninitialised.
BatchNorm's running statistics differ between ranks (each rank sees its own batches): DCP keeps the copy of whichever
rank the planner picks to write the replicated tensor, ZeRO-3 keeps one per rank's model states and zero_to_fp32
takes rank 0's.
"""

from __future__ import annotations

import functools
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

WORLD_SIZE = 2
DCP_SAVE_STEPS = (2, 4, 6)
DEEPSPEED_SAVE_STEPS = (2, 4, 6)
DCP_KINDS = ("fsdp2", "torchtitan", "tp", "accelerate")
# name: (ZeRO stage, bf16)
DEEPSPEED_KINDS = {"zero2": (2, False), "zero3": (3, False), "zero2_bf16": (2, True), "zero3_bf16": (3, True)}


# ------------------------------------------------------------------------------------------------- models


class _Net(nn.Module):
    """Uneven row shards over 2 ranks: emb [11, 6] 6/5, lin [7, 6] 4/3, bn [7] 4/3, head [1, 7] 1/0 (empty)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.lin = nn.Linear(6, 7)
        self.bn = nn.BatchNorm1d(7)
        self.head = nn.Linear(7, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.lin(self.emb(tokens).mean(1)))))


class _Block(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(dim)
        self.attention = nn.Module()
        self.attention.wq = nn.Linear(dim, dim, bias=False)
        self.attention.wo = nn.Linear(dim, dim, bias=False)
        self.ffn_norm = nn.RMSNorm(dim)
        self.feed_forward = nn.Module()
        self.feed_forward.w1 = nn.Linear(dim, hidden, bias=False)
        self.feed_forward.w2 = nn.Linear(hidden, dim, bias=False)
        self.feed_forward.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attention.wo(torch.tanh(self.attention.wq(self.attention_norm(h))))
        x = self.ffn_norm(h)
        ff = self.feed_forward
        return h + ff.w2(nn.functional.silu(ff.w1(x)) * ff.w3(x))


class _TitanLike(nn.Module):
    """torchtitan's Llama names: tok_embeddings [13, 8] (rows 7/6), layers.{0,1}.*, norm, output [13, 8]."""

    VOCAB = 13

    def __init__(self) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(self.VOCAB, 8)
        self.layers = nn.ModuleDict({str(i): _Block(8, 12) for i in range(2)})
        self.norm = nn.RMSNorm(8)
        self.output = nn.Linear(8, self.VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h)
        return self.output(self.norm(h))


class _TPNet(nn.Module):
    """fc1 [9, 5] (ColwiseParallel: rows 5/4), fc2 [3, 9] (RowwiseParallel: columns 5/4, bias replicated)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 9)
        self.fc2 = nn.Linear(9, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class _DSNet(nn.Module):
    """emb [11, 5] (55 elements, odd), lin, bn (int64 num_batches_tracked), frozen Linear (requires_grad False), and a
    head tied to emb (head.weight is emb.weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 5)
        self.lin = nn.Linear(5, 7)
        self.bn = nn.BatchNorm1d(7)
        self.frozen = nn.Linear(7, 5)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(5, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.frozen(torch.relu(self.bn(self.lin(self.emb(tokens).mean(1))))))


def _batch_gen(step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 * step + rank)


# ------------------------------------------------------------------------------------------------ launcher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(job: str, args: list[str], extra_env: dict[str, str] | None = None, timeout: float = 300) -> None:
    """Run `python dist_runs.py job *args` as WORLD_SIZE ranks (gloo over 127.0.0.1) and wait for all of them.

    Output goes to temporary files (a full pipe would block a rank). When a rank fails, the others are killed (they
    would wait in a collective until gloo's timeout) and the error carries every rank's output tail.
    """
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE=str(WORLD_SIZE),
        LOCAL_WORLD_SIZE=str(WORLD_SIZE),
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
        **(extra_env or {}),
    )
    with tempfile.TemporaryDirectory(prefix=f"dist_runs_{job}_") as logs:
        procs, outs = [], []
        for rank in range(WORLD_SIZE):
            out = open(Path(logs) / f"rank{rank}.log", "w+")
            outs.append(out)
            procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, job, *args],
                    env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        deadline = time.monotonic() + timeout
        failed = False
        try:
            while any(p.poll() is None for p in procs):
                if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                    failed = True
                    break
                time.sleep(0.05)
            failed = failed or any(p.returncode != 0 for p in procs)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            tails = []
            for rank, out in enumerate(outs):
                out.seek(0)
                tails.append(f"--- rank {rank} (exit {procs[rank].returncode}):\n{out.read()[-4000:]}")
                out.close()
        if failed:
            raise RuntimeError(f"{job} run failed:\n" + "\n".join(tails))


# ----------------------------------------------------------------------------------------------------- DCP


def reference_path(root: Path, ckpt_dir: Path) -> Path:
    """Where torch's dcp_to_torch_save of the DCP folder `ckpt_dir` (inside run `root`) lies."""
    return root.parent / f"{root.name}-ref" / f"{Path(ckpt_dir).relative_to(root)}.pt"


def dcp_checkpoint_dirs(root: Path) -> list[Path]:
    """Every DCP folder (one holding .metadata) under a run root, sorted."""
    return sorted(p.parent for p in Path(root).rglob(".metadata"))


def dcp_runs(runs: dict[str, Path]) -> dict[str, Path]:
    """{kind: root} for kinds in DCP_KINDS, all made by one 2-rank launch (one torch import per rank)."""
    unknown = set(runs) - set(DCP_KINDS)
    if unknown:
        raise ValueError(f"unknown DCP run kinds {sorted(unknown)}")
    _launch("dcp", [f"{kind}={path}" for kind, path in runs.items()])
    return runs


def dcp_fsdp2_run(root: Path) -> Path:
    """root/step-{2,4,6}/: .metadata, __0_0.distcp, __1_0.distcp; keys model.<fqn>, optimizer.*."""
    return dcp_runs({"fsdp2": root})["fsdp2"]


def dcp_torchtitan_run(root: Path) -> Path:
    """root/step-{2,4,6}/ (root plays torchtitan's <dump>/checkpoint): top-level model keys + optimizer.*,
    lr_scheduler.*, dataloader.*, train_state.*."""
    return dcp_runs({"torchtitan": root})["torchtitan"]


def dcp_tp_run(root: Path) -> Path:
    """root/step-{2,4,6}/: DTensor Shard(0) rows (fc1), Shard(1) columns (fc2.weight), Replicate (fc2.bias)."""
    return dcp_runs({"tp": root})["tp"]


def dcp_accelerate_run(root: Path) -> Path:
    """root/checkpoint-{2,4,6}/{pytorch_model_fsdp_0,optimizer_0}/, written by accelerate's save_fsdp_model /
    save_fsdp_optimizer."""
    return dcp_runs({"accelerate": root})["accelerate"]


def _train_fsdp2(model: nn.Module, opt, steps, save) -> None:
    rank = torch.distributed.get_rank()
    for step in range(1, max(steps) + 1):
        g = _batch_gen(step, rank)
        tokens, target = torch.randint(0, 11, (8, 3), generator=g), torch.randn(8, 1, generator=g)
        nn.functional.mse_loss(model(tokens), target).backward()
        opt.step()
        opt.zero_grad()
        if step in steps:
            save(step)


def _child_fsdp2(root: Path, mesh) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = _Net()
    fully_shard(model.lin, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)

    def save(step: int) -> None:
        state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)}
        dcp.save(state, checkpoint_id=root / f"step-{step}")

    _train_fsdp2(model, opt, DCP_SAVE_STEPS, save)


def _child_accelerate(root: Path, mesh) -> None:
    from accelerate import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import save_fsdp_model, save_fsdp_optimizer
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(1)
    model = _Net()
    fully_shard(model.lin, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")
    # save_fsdp_* read only process_index / num_processes of the Accelerator (for FULL/LOCAL state dicts), and
    # accelerate's logger needs the state: PartialState takes over the gloo process group already set up.
    accelerator = PartialState(cpu=True)
    assert accelerator.num_processes == WORLD_SIZE

    def save(step: int) -> None:
        out = root / f"checkpoint-{step}"
        save_fsdp_model(plugin, accelerator, model, str(out))
        save_fsdp_optimizer(plugin, accelerator, opt, model, str(out))

    _train_fsdp2(model, opt, DCP_SAVE_STEPS, save)


def _warmup(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup)


def _child_torchtitan(root: Path, mesh) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard

    rank = torch.distributed.get_rank()
    torch.manual_seed(2)
    model = _TitanLike()
    for layer in model.layers.values():
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    # torchtitan's schedulers are LambdaLR over a functools.partial (its state_dict keeps the partial's __dict__)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(_warmup, warmup=3))
    ntokens = 0
    for step in range(1, max(DCP_SAVE_STEPS) + 1):
        g = _batch_gen(step, rank)
        tokens = torch.randint(0, _TitanLike.VOCAB, (4, 6), generator=g)
        logits = model(tokens[:, :-1])
        nn.functional.cross_entropy(logits.reshape(-1, _TitanLike.VOCAB), tokens[:, 1:].reshape(-1)).backward()
        opt.step()
        scheduler.step()
        opt.zero_grad()
        ntokens += tokens.numel() * WORLD_SIZE
        if step in DCP_SAVE_STEPS:
            # torchtitan's CheckpointManager: ModelWrapper's state dict flattened to the top level (PR #1347), the
            # OptimizersContainer with flatten_optimizer_state_dict, the scheduler container's first scheduler,
            # ParallelAwareDataloader {dp_rank_R: pickled state, world_size}, the Trainer's {step, ntokens_seen}.
            states = dict(get_model_state_dict(model))
            states["optimizer"] = get_optimizer_state_dict(
                model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True)
            )
            states["lr_scheduler"] = scheduler.state_dict()
            states["dataloader"] = {
                f"dp_rank_{rank}": pickle.dumps({"_num_yielded": step, "_sampler_iter_yielded": step * 4}),
                "world_size": WORLD_SIZE,
            }
            states["train_state"] = {"step": step, "ntokens_seen": ntokens}
            dcp.save(states, checkpoint_id=root / f"step-{step}")


def _child_tp(root: Path, mesh) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(3)
    model = parallelize_module(
        _TPNet(),
        mesh,
        {
            # uneven hidden width (9 = 5 + 4): fc1's output stays a DTensor so that fc2 sees its true global shape
            "fc1": ColwiseParallel(use_local_output=False),
            "fc2": RowwiseParallel(),
        },
    )
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    for step in range(1, max(DCP_SAVE_STEPS) + 1):
        g = _batch_gen(step, 0)  # tensor parallelism: every rank sees the same batch
        x = torch.randn(8, 5, generator=g)
        nn.functional.mse_loss(model(x), x[:, :3]).backward()
        opt.step()
        opt.zero_grad()
        if step in DCP_SAVE_STEPS:
            state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)}
            dcp.save(state, checkpoint_id=root / f"step-{step}")


class _HFNet(_TPNet):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("count", torch.tensor(0))


DCP_SAFETENSORS_KINDS = ("hf", "st")


def dcp_safetensors_runs(runs: dict[str, Path]) -> dict[str, Path]:
    """{kind: root} for kinds in DCP_SAFETENSORS_KINDS, made by one 2-rank launch: root/step-{2,4,6}/ and
    <root>-ref/step-N.pt."""
    unknown = set(runs) - set(DCP_SAFETENSORS_KINDS)
    if unknown:
        raise ValueError(f"unknown DCP safetensors run kinds {sorted(unknown)}")
    _launch("dcp_safetensors", [f"{kind}={path}" for kind, path in runs.items()])
    return runs


def _dcp_safetensors_child(runs: dict[str, Path]) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter, HuggingFaceStorageWriter
    from torch.distributed.checkpoint.filesystem import SerializationFormat
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    dist.init_process_group("gloo")
    try:
        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        torch.manual_seed(4)
        model = parallelize_module(_HFNet(), mesh, {"fc1": ColwiseParallel(use_local_output=False), "fc2": RowwiseParallel()})
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        for step in range(1, max(DCP_SAVE_STEPS) + 1):
            x = torch.randn(8, 5, generator=_batch_gen(step, 0))
            nn.functional.mse_loss(model(x) * model.scale, x[:, :3]).backward()
            opt.step()
            opt.zero_grad()
            model.scale.mul_(0.9)
            model.count.add_(1)
            if step not in DCP_SAVE_STEPS:
                continue
            state = get_model_state_dict(model)
            for kind, root in runs.items():
                out = root / f"step-{step}"
                if kind == "hf":
                    mapping = {name: 1 if name.startswith("fc1.") else 2 for name in state}
                    writer = HuggingFaceStorageWriter(str(out), save_distributed=True, fqn_to_index_mapping=mapping)
                    dcp.save(state, storage_writer=writer)
                else:
                    writer = FileSystemWriter(str(out), serialization_format=SerializationFormat.SAFETENSORS)
                    dcp.save({"model": state, "optimizer": get_optimizer_state_dict(model, opt)}, storage_writer=writer)
                full = {name: t.full_tensor() if isinstance(t, DTensor) else t for name, t in state.items()}
                if dist.get_rank() == 0:
                    ref = root.parent / f"{root.name}-ref" / f"step-{step}.pt"
                    ref.parent.mkdir(parents=True, exist_ok=True)
                    torch.save({name: t.detach().clone() for name, t in full.items()}, ref)
                dist.barrier()
    finally:
        dist.destroy_process_group()


def _dcp_child(runs: dict[str, Path]) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    try:
        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        builders = {"fsdp2": _child_fsdp2, "torchtitan": _child_torchtitan, "tp": _child_tp, "accelerate": _child_accelerate}
        for kind, root in runs.items():
            builders[kind](root, mesh)
        dist.barrier()
        if dist.get_rank() == 0:
            from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

            for root in runs.values():
                for ckpt in dcp_checkpoint_dirs(root):
                    ref = reference_path(root, ckpt)
                    ref.parent.mkdir(parents=True, exist_ok=True)
                    dcp_to_torch_save(ckpt, ref)
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------- DeepSpeed


def deepspeed_dist_runs(runs: dict[str, Path]) -> dict[str, Path]:
    """{kind: root} for kinds in DEEPSPEED_KINDS, all trained by one 2-rank launch (DS_ACCELERATOR=cpu, gloo, no
    DeepSpeed op compiled): root/global_step{2,4,6}/, root/latest, root/zero_to_fp32.py, and <root>-fp32/global_stepN.pt
    from DeepSpeed's zero_to_fp32."""
    unknown = set(runs) - set(DEEPSPEED_KINDS)
    if unknown:
        raise ValueError(f"unknown DeepSpeed run kinds {sorted(unknown)}")
    _launch("deepspeed", [f"{kind}={path}" for kind, path in runs.items()], {"DS_ACCELERATOR": "cpu"})
    return runs


def fp32_reference(root: Path, step: int) -> Path:
    return root.parent / f"{root.name}-fp32" / f"global_step{step}.pt"


def _deepspeed_child(runs: dict[str, Path]) -> None:
    import deepspeed
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from trainer_runs import start_deepspeed_without_ops

    start_deepspeed_without_ops()
    rank = deepspeed.comm.get_rank()
    for kind, root in runs.items():
        stage, bf16 = DEEPSPEED_KINDS[kind]
        torch.manual_seed(0)
        config = {
            "train_micro_batch_size_per_gpu": 8,
            "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "torch_adam": True}},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.01, "warmup_num_steps": 2}},
            "zero_optimization": {"stage": stage},
            "bf16": {"enabled": bf16},
            # DeepSpeed casts only the parameters to bf16 unless buffer_dtype is set; BatchNorm on CPU wants its
            # running stats in the input's dtype (num_batches_tracked stays int64)
            **({"data_types": {"buffer_dtype": "bf16"}} if bf16 else {}),
            "steps_per_print": 1000,
        }
        model = _DSNet()
        trainable = [p for p in model.parameters() if p.requires_grad]
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)
        for step in range(1, max(DEEPSPEED_SAVE_STEPS) + 1):
            g = _batch_gen(step, rank)
            tokens, target = torch.randint(0, 11, (8, 3), generator=g), torch.randint(0, 11, (8,), generator=g)
            engine.backward(nn.functional.cross_entropy(engine(tokens).float(), target))
            engine.step()
            if step in DEEPSPEED_SAVE_STEPS:
                tag = f"global_step{step}"
                engine.save_checkpoint(str(root), tag=tag)
                deepspeed.comm.barrier()
                if rank == 0:
                    reference = fp32_reference(root, step)
                    reference.parent.mkdir(parents=True, exist_ok=True)
                    torch.save(get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag), reference)
                deepspeed.comm.barrier()
        engine.destroy()
    deepspeed.comm.destroy_process_group()


if __name__ == "__main__":
    children = {"dcp": _dcp_child, "dcp_safetensors": _dcp_safetensors_child, "deepspeed": _deepspeed_child}
    if len(sys.argv) >= 3 and sys.argv[1] in children:
        job_runs = {kind: Path(path) for kind, path in (a.split("=", 1) for a in sys.argv[2:])}
        children[sys.argv[1]](job_runs)
    else:
        sys.exit(f"usage: {sys.argv[0]} {'|'.join(children)} KIND=ROOT...")
