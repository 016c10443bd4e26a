"""Real training runs saved by the trainer libraries themselves: timm, accelerate, Lightning, DeepSpeed.

Each builder trains a tiny model for a few steps on CPU, lets the library write its checkpoints exactly as it
does in a real run, and returns the folder. Everything is seeded, so two builds hold the same tensors.

The layouts (what test_trainer_runs.py checks):

- timm_run: CheckpointSaver + ModelEmaV3, 4 epochs (0..3): checkpoint-{0..3}.pth.tar, last.pth.tar,
  model_best.pth.tar. Each holds epoch, arch, optimizer, version, args (argparse.Namespace, as timm's train.py
  passes it), state_dict, state_dict_ema, metric, saver. checkpoint-E is a hard link of last.pth.tar at epoch E;
  model_best a hard link of last at the best epoch, so last shares its inode with checkpoint-3 and model_best
  with checkpoint-1 (the scripted eval metric, lower is better, is best at epoch 1).
- accelerate_run: Accelerator.save_state() 12 times with automatic_checkpoint_naming:
  checkpoints/checkpoint_{0..11}/ with model.safetensors, optimizer.bin, scheduler.bin, random_states_0.pkl.
- lightning_ema_run: EMAWeightAveraging + ModelCheckpoint(save_top_k=-1): epoch=E-step=S.ckpt whose state_dict
  holds the EMA weights, current_model_state the live ones, averaging_state {n_averaged}.
- lightning_compiled_run: the LightningModule's inner model is torch.compile'd: state_dict names model._orig_mod.*.
- deepspeed_runs / deepspeed_zero3_run / deepspeed_zero2_run: DeepSpeed on its CPU accelerator, one gloo process:
  global_stepN/ folders (N 2, 4, 6), latest, zero_to_fp32.py; beside the run folder, <run>-fp32/global_stepN.pt
  holds the full weights gathered from the engine at each save, for checking a reader's reconstruction.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import torch
from runs import _regression, _Tiny, lightning_fit
from torch import nn

# ----------------------------------------------------------------------------------------------------- timm

# The eval metric handed to CheckpointSaver per epoch (lower is better): scripted so the best is epoch 1, not the last.
TIMM_EVAL_METRIC = (0.9, 0.4, 0.6, 0.5)
TIMM_BEST_EPOCH = 1


def _timm_utils():
    """timm's own CheckpointSaver and ModelEmaV3, also where torchvision is missing.

    timm (1.0.31) imports torchvision at import time: timm/__init__.py -> timm/layers/__init__.py:23 -> classifier.py:15 ->
    create_norm.py:29 `from torchvision.ops.misc import FrozenBatchNorm2d` (and timm/utils/model.py:8, the module
    CheckpointSaver's get_state_dict comes from, and timm/data/* for transforms and datasets). torchvision from PyPI
    does not load beside the CPU torch here, so when `from timm.utils import ...` fails, timm's real
    timm.utils.checkpoint_saver / model_ema / model and timm.layers files are loaded without running
    timm/__init__.py and timm/utils/__init__.py, with a stand-in FrozenBatchNorm2d class (only used by isinstance
    checks in freeze/unfreeze helpers, never on the save path). sys.modules is put back afterwards.
    """
    names = ("timm", "torchvision")
    before = {k: v for k, v in sys.modules.items() if k.split(".")[0] in names}

    def restore() -> None:
        for k in [k for k in sys.modules if k.split(".")[0] in names]:
            del sys.modules[k]
        sys.modules.update(before)

    try:
        from timm.utils import CheckpointSaver, ModelEmaV3

        return CheckpointSaver, ModelEmaV3
    except Exception:  # ModuleNotFoundError without torchvision; a torchvision built for another torch fails otherwise
        restore()
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("timm is not installed")
    timm_dir = list(spec.submodule_search_locations)[0]

    class FrozenBatchNorm2d(nn.Module):  # stands for torchvision.ops.misc.FrozenBatchNorm2d
        pass

    stubs = {n: types.ModuleType(n) for n in ("torchvision", "torchvision.ops", "torchvision.ops.misc")}
    stubs["torchvision"].__path__ = []
    stubs["torchvision.ops"].__path__ = []
    stubs["torchvision.ops.misc"].FrozenBatchNorm2d = FrozenBatchNorm2d
    timm_pkg = types.ModuleType("timm")
    timm_pkg.__path__ = [timm_dir]
    utils_pkg = types.ModuleType("timm.utils")
    utils_pkg.__path__ = [os.path.join(timm_dir, "utils")]
    try:
        sys.modules.update(stubs)
        sys.modules["timm"], sys.modules["timm.utils"] = timm_pkg, utils_pkg
        saver = importlib.import_module("timm.utils.checkpoint_saver")
        ema = importlib.import_module("timm.utils.model_ema")
        return saver.CheckpointSaver, ema.ModelEmaV3
    finally:
        restore()


def timm_run(root: Path) -> Path:
    """timm.utils.CheckpointSaver with a ModelEmaV3 over 4 epochs, as timm's train.py drives it."""
    CheckpointSaver, ModelEmaV3 = _timm_utils()
    torch.manual_seed(0)
    root.mkdir(parents=True, exist_ok=True)
    model = _Tiny()
    model_ema = ModelEmaV3(model, decay=0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    args = argparse.Namespace(model="tiny", epochs=4, lr=0.05, model_ema=True, model_ema_decay=0.9, checkpoint_hist=10)
    saver = CheckpointSaver(
        model=model,
        optimizer=optimizer,
        args=args,
        model_ema=model_ema,
        checkpoint_dir=str(root),
        recovery_dir=str(root),
        decreasing=True,
        max_history=args.checkpoint_hist,
    )
    x, y = _regression()
    updates = 0
    for epoch in range(args.epochs):
        model.train()
        for i in range(0, len(x), 16):
            loss = nn.functional.mse_loss(model(x[i : i + 16]), y[i : i + 16])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            updates += 1
            model_ema.update(model, step=updates)
        saver.save_checkpoint(epoch, metric=TIMM_EVAL_METRIC[epoch])
    return root


# ----------------------------------------------------------------------------------------------- accelerate

ACCELERATE_SAVES = 12


def accelerate_run(root: Path) -> Path:
    """accelerate: save_state() after each of 12 optimizer steps, automatic naming: checkpoints/checkpoint_0..11."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration, set_seed
    from torch.utils.data import DataLoader, TensorDataset

    set_seed(0)
    config = ProjectConfiguration(project_dir=str(root), automatic_checkpoint_naming=True, total_limit=None)
    accelerator = Accelerator(cpu=True, project_config=config)
    try:
        model = _Tiny()
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 4)
        x, y = _regression()
        loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
        saves = 0
        while saves < ACCELERATE_SAVES:
            for xb, yb in loader:
                accelerator.backward(nn.functional.mse_loss(model(xb), yb))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                accelerator.save_state()
                saves += 1
                if saves == ACCELERATE_SAVES:
                    break
    finally:
        # The state is a process-wide singleton: leave none behind for the tests that build their own Accelerator.
        AcceleratorState._reset_state(reset_partial_state=True)
    return root


# ------------------------------------------------------------------------------------------------ lightning


def lightning_ema_run(root: Path) -> Path:
    """Lightning's EMAWeightAveraging(decay=0.9) callback, 3 epochs of 4 steps: epoch=E-step=S.ckpt, E 0..2, S 4,8,12.

    The callback's on_save_checkpoint moves the live weights to `current_model_state` and puts the EMA weights (the
    AveragedModel's `module.` entries, prefix cut, so the same `model.` names) in `state_dict`; the AveragedModel's
    other entries (`n_averaged`) go to `averaging_state`.
    """
    from lightning.pytorch.callbacks import EMAWeightAveraging

    return lightning_fit(root, callbacks=[EMAWeightAveraging(decay=0.9)], max_epochs=3, scheduler=False)


def lightning_compiled_run(root: Path) -> Path:
    """A LightningModule whose inner model is torch.compile'd: names model._orig_mod.body.*; 2 epochs, 2 .ckpt files.

    backend="eager" is the real torch.compile (dynamo traces the model, OptimizedModule wraps it, so the state_dict
    names are the same as with inductor) without inductor's C++ build, which takes ~50 s cold on 2 cores here.
    """
    return lightning_fit(root, max_epochs=2, compiled=True, scheduler=False)


# ------------------------------------------------------------------------------------------------ deepspeed

DEEPSPEED_SAVE_STEPS = (2, 4, 6)


def deepspeed_runs(runs: dict[int, Path]) -> dict[int, Path]:
    """DeepSpeed ZeRO on its CPU accelerator, {stage: root}: root/global_stepN/ from
    engine.save_checkpoint(root, tag=f"global_step{N}") after steps N = 2, 4, 6, plus root/latest and
    root/zero_to_fp32.py; beside it, <root>-fp32/global_stepN.pt holds the full weights gathered from the engine at
    each save (a reference for a reader's reconstruction).

    All stages train in one child process (one import of DeepSpeed): DS_ACCELERATOR=cpu, one rank, gloo on 127.0.0.1.
    DeepSpeed sets up a process group and other process-wide state that must not leak into the test session.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
        PYTHONWARNINGS="ignore",
    )
    args = [f"{stage}={path}" for stage, path in runs.items()]
    proc = subprocess.run([sys.executable, __file__, "deepspeed", *args], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"deepspeed run failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return runs


def deepspeed_zero3_run(root: Path) -> Path:
    """ZeRO stage 3: global_stepN/zero_pp_rank_0_mp_rank_00_{model,optim}_states.pt; the model states' parameters
    have zero elements, the fp32 weights are in the optimizer states' fp32_flat_groups."""
    return deepspeed_runs({3: root})[3]


def deepspeed_zero2_run(root: Path) -> Path:
    """ZeRO stage 2: global_stepN/mp_rank_00_model_states.pt (full weights in `module`) and
    zero_pp_rank_0_mp_rank_00_optim_states.pt."""
    return deepspeed_runs({2: root})[2]


def start_deepspeed_without_ops() -> None:
    """deepspeed.init_distributed over gloo, with no op JIT-built.

    DeepSpeed JIT-builds its shared-memory allreduce op (C++, ~2 minutes on 2 cores) when the comm backend starts,
    if its probe calls it compatible. gloo does the collectives and torch's AdamW the updates, so every op is marked
    not compatible and nothing is compiled."""
    import deepspeed
    import deepspeed.ops

    try:
        from deepspeed.ops.op_builder.all_ops import ALL_OPS
    except ImportError:
        ALL_OPS = {}
    deepspeed.ops.__compatible_ops__ = dict.fromkeys([*ALL_OPS, "deepspeed_shm_comm"], False)
    deepspeed.init_distributed(dist_backend="gloo")


def _deepspeed_train(runs: dict[int, Path]) -> None:
    import deepspeed

    start_deepspeed_without_ops()
    for stage, root in runs.items():
        torch.manual_seed(0)
        config = {
            "train_micro_batch_size_per_gpu": 16,
            "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "torch_adam": True}},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.01, "warmup_num_steps": 2}},
            "zero_optimization": {"stage": stage},
            "steps_per_print": 1000,
        }
        model = _Tiny()
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        x, y = _regression()
        reference = root.parent / f"{root.name}-fp32"
        reference.mkdir(parents=True, exist_ok=True)
        for step in range(1, max(DEEPSPEED_SAVE_STEPS) + 1):
            i = 16 * ((step - 1) % 4)
            engine.backward(nn.functional.mse_loss(engine(x[i : i + 16]), y[i : i + 16]))
            engine.step()
            if step in DEEPSPEED_SAVE_STEPS:
                tag = f"global_step{step}"
                engine.save_checkpoint(str(root), tag=tag)
                params = list(engine.module.parameters())
                with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=stage == 3):
                    full = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
                torch.save(full, reference / f"{tag}.pt")
        engine.destroy()
    deepspeed.comm.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "deepspeed":
        _deepspeed_train({int(stage): Path(path) for stage, path in (a.split("=", 1) for a in sys.argv[2:])})
    else:
        sys.exit(f"usage: {sys.argv[0]} deepspeed STAGE=ROOT...")
