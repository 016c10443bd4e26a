"""The layouts the trainer libraries really write (tests/trainer_runs.py), as ckptavg's readers expect them.

These tests read the files with torch and safetensors only: they document each layout and fail when a library
version writes another.
"""

from __future__ import annotations

import math
import os
import pickle
import types

import pytest
import torch
from safetensors import safe_open
from trainer_runs import ACCELERATE_SAVES, DEEPSPEED_SAVE_STEPS, TIMM_BEST_EPOCH, TIMM_EVAL_METRIC

TINY = [  # runs._Tiny: Linear, BatchNorm1d, ReLU, Linear
    "body.0.weight",
    "body.0.bias",
    "body.1.weight",
    "body.1.bias",
    "body.1.running_mean",
    "body.1.running_var",
    "body.1.num_batches_tracked",
    "body.3.weight",
    "body.3.bias",
]
TINY_PARAMS = [n for n in TINY if "running" not in n and "num_batches" not in n]
TINY_BUFFERS = [n for n in TINY if n not in TINY_PARAMS]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def differ(a: dict, b: dict, names) -> bool:
    return any(not torch.equal(a[n], b[n]) for n in names)


# ----------------------------------------------------------------------------------------------------- timm


def test_timm_checkpoint_saver_layout(timm_ckpts):
    epochs = range(len(TIMM_EVAL_METRIC))
    names = {f"checkpoint-{e}.pth.tar" for e in epochs} | {"last.pth.tar", "model_best.pth.tar"}
    assert {p.name for p in timm_ckpts.iterdir()} == names
    for e in epochs:
        ckpt = load(timm_ckpts / f"checkpoint-{e}.pth.tar")
        assert set(ckpt) == {"epoch", "arch", "optimizer", "version", "args", "state_dict", "state_dict_ema", "metric", "saver"}
        assert ckpt["epoch"] == e and ckpt["metric"] == TIMM_EVAL_METRIC[e] and ckpt["version"] == 2 and ckpt["arch"] == "tiny"
        assert list(ckpt["state_dict"]) == TINY and list(ckpt["state_dict_ema"]) == TINY
        assert differ(ckpt["state_dict"], ckpt["state_dict_ema"], TINY_PARAMS)
        assert set(ckpt["optimizer"]) == {"state", "param_groups"}
        # the saver's bookkeeping is captured before this checkpoint joins the history
        assert set(ckpt["saver"]) == {"checkpoint_files", "best_epoch", "best_metric", "pending"}
        assert ckpt["saver"]["pending"] == (e, TIMM_EVAL_METRIC[e])
        assert len(ckpt["saver"]["checkpoint_files"]) == e
    # recent timm hard-links: checkpoint-E from last at epoch E, model_best from last at the best epoch
    last_epoch = max(epochs)
    assert os.path.samefile(timm_ckpts / "last.pth.tar", timm_ckpts / f"checkpoint-{last_epoch}.pth.tar")
    assert os.path.samefile(timm_ckpts / "model_best.pth.tar", timm_ckpts / f"checkpoint-{TIMM_BEST_EPOCH}.pth.tar")
    assert not os.path.samefile(timm_ckpts / "model_best.pth.tar", timm_ckpts / "last.pth.tar")
    assert load(timm_ckpts / "model_best.pth.tar")["epoch"] == TIMM_BEST_EPOCH
    # args is an argparse.Namespace, as timm's train.py saves it: outside torch's weights-only allowlist
    with pytest.raises(pickle.UnpicklingError, match="argparse.Namespace"):
        torch.load(timm_ckpts / "last.pth.tar", weights_only=True)


# ----------------------------------------------------------------------------------------------- accelerate


def test_accelerate_save_state_layout(accelerate_ckpts):
    folder = accelerate_ckpts / "checkpoints"
    assert [p.name for p in accelerate_ckpts.iterdir()] == ["checkpoints"]
    names = [p.name for p in folder.iterdir()]
    assert sorted(names, key=lambda n: int(n.split("_")[1])) == [f"checkpoint_{i}" for i in range(ACCELERATE_SAVES)]
    assert sorted(names)[:3] == ["checkpoint_0", "checkpoint_1", "checkpoint_10"]  # lexical order is not step order
    previous = None
    for i in range(ACCELERATE_SAVES):
        ckpt = folder / f"checkpoint_{i}"
        assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"}
        with safe_open(ckpt / "model.safetensors", "pt") as f:
            assert sorted(f.keys()) == sorted(TINY)
            assert f.metadata() == {"format": "pt"}
            state = {n: f.get_tensor(n) for n in TINY}
        if previous is not None:
            assert differ(state, previous, TINY_PARAMS)
        previous = state
        optimizer = torch.load(ckpt / "optimizer.bin", weights_only=True)
        assert set(optimizer) == {"state", "param_groups"}
        # the only training-step count in the folder: the scheduler stepped once per optimizer step
        assert torch.load(ckpt / "scheduler.bin", weights_only=True)["last_epoch"] == i + 1
        rng = torch.load(ckpt / "random_states_0.pkl", weights_only=False)
        assert set(rng) == {"step", "random_state", "numpy_random_seed", "torch_manual_seed"}
        assert rng["step"] == 0  # Accelerator.step counts gradient-accumulation steps only; 0 here


# ------------------------------------------------------------------------------------------------ lightning


def test_lightning_ema_layout(lightning_ema_ckpts):
    steps = {0: 4, 1: 8, 2: 12}
    assert {p.name for p in lightning_ema_ckpts.iterdir()} == {f"epoch={e}-step={s}.ckpt" for e, s in steps.items()}
    model_names = [f"model.{n}" for n in TINY]
    for epoch, step in steps.items():
        ckpt = torch.load(lightning_ema_ckpts / f"epoch={epoch}-step={step}.ckpt", weights_only=True)
        assert {"state_dict", "current_model_state", "averaging_state", "epoch", "global_step", "callbacks"} <= set(ckpt)
        assert ckpt["epoch"] == epoch and ckpt["global_step"] == step
        # state_dict: the EMA (AveragedModel's `module.` entries, prefix cut); current_model_state: the live weights
        assert list(ckpt["state_dict"]) == model_names and list(ckpt["current_model_state"]) == model_names
        assert differ(ckpt["state_dict"], ckpt["current_model_state"], [f"model.{n}" for n in TINY_PARAMS])
        assert list(ckpt["averaging_state"]) == ["n_averaged"] and ckpt["averaging_state"]["n_averaged"].item() == step
        assert ckpt["callbacks"]["EMAWeightAveraging"] == {"latest_update_step": step}
        # the EMA runs over integer buffers too, truncated to int64 each update: not the live count
        assert 1 <= ckpt["state_dict"]["model.body.1.num_batches_tracked"].item() < step
        assert ckpt["current_model_state"]["model.body.1.num_batches_tracked"].item() == step


def test_lightning_compiled_layout(lightning_compiled_ckpts):
    assert {p.name for p in lightning_compiled_ckpts.iterdir()} == {"epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt"}
    ckpt = torch.load(lightning_compiled_ckpts / "epoch=1-step=8.ckpt", weights_only=True)
    assert list(ckpt["state_dict"]) == [f"model._orig_mod.{n}" for n in TINY]
    assert "current_model_state" not in ckpt and ckpt["global_step"] == 8


# ------------------------------------------------------------------------------------------------ deepspeed


class _Opaque:
    """Stands for a class a DeepSpeed pickle names (ZeroStageEnum, LossScaler, fragment_address): keeps DeepSpeed
    out of the test session."""

    def __init__(self, *args):
        self.args = args

    def __setstate__(self, state):
        self.state = state


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module.split(".")[0] == "deepspeed":
            return type(name, (_Opaque,), {"__module__": module})
        return super().find_class(module, name)


_opaque_pickle = types.SimpleNamespace(Unpickler=_Unpickler, load=pickle.load, __name__="pickle")

DS_MODEL_KEYS = {
    "module",
    "buffer_names",
    "optimizer",
    "param_shapes",
    "frozen_param_shapes",
    "shared_params",
    "frozen_param_fragments",
    "lr_scheduler",
    "data_sampler",
    "random_ltd",
    "skipped_steps",
    "global_steps",
    "global_samples",
    "dp_world_size",
    "mp_world_size",
    "checkpoint_parallel_dimensions",
    "ds_config",
    "ds_version",
}


def _ds_common(root, model_file: str, stage: int):
    tags = [f"global_step{s}" for s in DEEPSPEED_SAVE_STEPS]
    assert {p.name for p in root.iterdir()} == {*tags, "latest", "zero_to_fp32.py", "zero_to_torch.py"}
    assert (root / "latest").read_text() == tags[-1]
    for step, tag in zip(DEEPSPEED_SAVE_STEPS, tags):
        assert {p.name for p in (root / tag).iterdir()} == {model_file, "zero_pp_rank_0_mp_rank_00_optim_states.pt"}
        model = torch.load(root / tag / model_file, weights_only=True)  # plain containers, torch.Size, OrderedDict
        assert set(model) == DS_MODEL_KEYS
        assert model["global_steps"] == step and model["global_samples"] == 16 * step and model["optimizer"] is None
        assert model["ds_config"]["zero_optimization"] == {"stage": stage}
        assert list(model["module"]) == TINY and model["buffer_names"] == TINY_BUFFERS
        assert len(model["param_shapes"]) == 1 and list(model["param_shapes"][0]) == TINY_PARAMS
        assert model["param_shapes"][0]["body.0.weight"] == torch.Size([16, 8])
        assert model["lr_scheduler"] == {"last_batch_iteration": step - 1}
        optim = torch.load(
            root / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False, pickle_module=_opaque_pickle
        )
        assert set(optim) == {"optimizer_state_dict", "ds_config", "ds_version"}
        reference = torch.load(root.parent / f"{root.name}-fp32" / f"{tag}.pt", weights_only=True)
        assert list(reference) == TINY
        yield model, optim["optimizer_state_dict"], reference


def test_deepspeed_zero3_layout(deepspeed_zero3_ckpts):
    for model, optim, reference in _ds_common(deepspeed_zero3_ckpts, "zero_pp_rank_0_mp_rank_00_model_states.pt", 3):
        for name in TINY_PARAMS:  # partitioned: the parameters are empty here ...
            assert model["module"][name].numel() == 0
        for name in TINY_BUFFERS:  # ... the buffers are whole
            assert torch.equal(model["module"][name], reference[name])
        assert set(optim) == {
            "zero_stage",
            "loss_scaler",
            "dynamic_loss_scale",
            "overflow",
            "partition_count",
            "optimizer_state_dict",
            "fp32_flat_groups",
        }
        assert optim["partition_count"] == 1
        # ... and the fp32 weights are one flat tensor per group, in param_shapes order, no padding with one rank
        (flat,) = optim["fp32_flat_groups"]
        offset = 0
        for name, shape in model["param_shapes"][0].items():
            n = math.prod(shape)
            assert torch.equal(flat[offset : offset + n].view(shape), reference[name])
            offset += n
        assert offset == flat.numel()


def test_deepspeed_zero2_layout(deepspeed_zero2_ckpts):
    for model, optim, reference in _ds_common(deepspeed_zero2_ckpts, "mp_rank_00_model_states.pt", 2):
        for name in TINY:  # the model states hold every tensor whole
            assert torch.equal(model["module"][name], reference[name])
        assert {
            "base_optimizer_state",
            "single_partition_of_fp32_groups",
            "param_slice_mappings",
            "group_paddings",
            "zero_stage",
            "partition_count",
        } <= set(optim)
        (flat,) = optim["single_partition_of_fp32_groups"]
        assert flat.numel() == sum(math.prod(s) for s in model["param_shapes"][0].values())
        assert list(optim["param_slice_mappings"][0]) == TINY_PARAMS
