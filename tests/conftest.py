"""Fixtures that build small real checkpoints in every layout ckptavg reads."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ckptavg.cli import main


class AttributeDict(dict):
    """Stands for Lightning's AttributeDict: a class outside torch's weights-only allowlist."""


def make_state(seed: int, dtype: torch.dtype = torch.float32, tied: bool = False, run: int = 0) -> dict[str, torch.Tensor]:
    """A checkpoint of training run `run` (its initialisation) after `seed` moved its weights a little:
    checkpoints of one run differ, but much less than two runs do (ckptavg warns about those)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.Generator().manual_seed(10_000 + run)

    def weights(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=start) + 0.3 * torch.randn(*shape, generator=g)).to(dtype)

    state = {
        "embed.weight": weights(64, 48),
        "layer.0.weight": weights(48, 48),
        "layer.0.bias": weights(48),
        "norm.running_mean": weights(48),
        "norm.num_batches_tracked": torch.tensor(100 * (seed + 1)),
        "mask": torch.rand(7, generator=g) > 0.5,
    }
    if tied:
        state["head.weight"] = state["embed.weight"]
    return state


def reference_average(states: list[dict[str, torch.Tensor]], weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    """The independent float64 reference: sum_i w_i x_i in float64, rounded once to the input dtype."""
    weights = weights or [1.0] * len(states)
    total = sum(weights)
    out = {}
    for name, first in states[0].items():
        if first.is_floating_point():
            acc = sum(w * s[name].double() for w, s in zip(weights, states)) / total
            out[name] = acc.to(first.dtype)
        else:
            out[name] = states[-1][name]
    return out


def save_layout(state: dict[str, torch.Tensor], root: Path, layout: str, step: int | None = None) -> Path:
    """Write `state` as `layout`; returns the path a user would pass to ckptavg."""
    root.mkdir(parents=True, exist_ok=True)
    untied = {k: v.clone() for k, v in state.items()}
    if layout == "safetensors":
        save_file(untied, root / "model.safetensors", metadata={"format": "pt"})
        return root / "model.safetensors"
    if layout == "safetensors-folder":
        save_file(untied, root / "model.safetensors", metadata={"format": "pt"})
        return root
    if layout in ("safetensors-sharded", "bin-sharded"):
        names = list(untied)
        halves = [names[: len(names) // 2], names[len(names) // 2 :]]
        suffix = "safetensors" if layout == "safetensors-sharded" else "bin"
        stem = "model" if suffix == "safetensors" else "pytorch_model"
        weight_map = {}
        for i, part in enumerate(halves, 1):
            shard = f"{stem}-{i:05d}-of-00002.{suffix}"
            piece = {n: untied[n] for n in part}
            if suffix == "safetensors":
                save_file(piece, root / shard, metadata={"format": "pt"})
            else:
                torch.save(piece, root / shard)
            weight_map.update({n: shard for n in part})
        (root / f"{stem}.{suffix}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        return root
    if layout == "bin":
        torch.save(state, root / "pytorch_model.bin")
        return root
    if layout == "pt":
        path = root / "model.pt"
        torch.save(
            {"model_state_dict": state, "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 0.1}]}, "step": step}, path
        )
        return path
    if layout == "pt-legacy":
        path = root / "model.pt"
        torch.save({"model": state, "epoch": step}, path, _use_new_zipfile_serialization=False)
        return path
    if layout == "lightning":
        path = root / f"epoch=0-step={step or 0}.ckpt"
        torch.save(
            {
                "state_dict": {f"model.{k}": v for k, v in state.items()},
                "hyper_parameters": AttributeDict(lr=0.1, layers=2),
                "global_step": step or 0,
                "epoch": 0,
                "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}}],
                "callbacks": {"ModelCheckpoint{'monitor': 'val_loss'}": {"best_model_score": torch.tensor(0.5)}},
            },
            path,
        )
        return path
    if layout == "fairseq":
        import numpy as np

        path = root / f"checkpoint_1_{step or 0}.pt"
        torch.save(
            {
                "model": state,
                "args": argparse.Namespace(arch="tiny", lr=[0.1]),
                "extra_state": {"rng": np.random.RandomState(0).get_state()},
            },
            path,
            pickle_protocol=2,
        )
        return path
    if layout == "hf-trainer":
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True, exist_ok=True)
        save_file(untied, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({"model_type": "tiny", "torch_dtype": "float32"}))
        (folder / "tokenizer_config.json").write_text("{}")
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
        torch.save({"state": {}}, folder / "optimizer.pt")
        torch.save({"last_epoch": 1}, folder / "scheduler.pt")
        torch.save({"python": 1}, folder / "rng_state.pth")
        torch.save({"lr": 1}, folder / "training_args.bin")
        return folder
    raise ValueError(layout)


def assert_equal_nested(got: object, want: object, where: str = "") -> None:
    """The same structure and types, tensors equal value for value."""
    assert type(got) is type(want), (where, type(got), type(want))
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and torch.equal(got, want), where
    elif isinstance(want, dict):
        assert list(got) == list(want), where
        for key in want:
            assert_equal_nested(got[key], want[key], f"{where}/{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            assert_equal_nested(a, b, f"{where}[{i}]")
    elif type(want).__module__ == "numpy":
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), where
    else:
        assert got == want, where


def read_output(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an output folder or file, loaded with the safetensors library itself."""
    from safetensors.torch import load_file

    if path.is_file():
        return load_file(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        out = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            out.update(load_file(path / shard))
        return out
    return load_file(path / "model.safetensors")


class CliResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def cli(capsys):
    """Run `ckptavg ARGS...` in-process through the real entry point; returns exit code, stdout, stderr."""

    def run(*args: object) -> CliResult:
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def hf_run(tmp_path_factory):
    pytest.importorskip("accelerate")
    from runs import hf_trainer_run

    return hf_trainer_run(tmp_path_factory.mktemp("hf") / "run")


@pytest.fixture(scope="session")
def hf_run_tokens(tmp_path_factory):
    """hf_run's Trainer with include_num_input_tokens_seen: trainer_state.json records the tokens seen."""
    pytest.importorskip("accelerate")
    from runs import hf_trainer_run

    return hf_trainer_run(tmp_path_factory.mktemp("hf-tokens") / "run", count_tokens=True)


@pytest.fixture(scope="session")
def lightning_ckpts(tmp_path_factory):
    pytest.importorskip("lightning")
    from runs import lightning_run

    return lightning_run(tmp_path_factory.mktemp("lightning") / "ckpts")


@pytest.fixture(scope="session")
def torch_run(tmp_path_factory):
    from runs import plain_torch_run

    return plain_torch_run(tmp_path_factory.mktemp("torch") / "run")


# Real trainer runs (tests/trainer_runs.py): each library saves its checkpoints itself. A library that is not
# installed skips the tests that use its run.


def _require(module: str) -> None:
    """Skip unless `module` is installed, without importing it here (timm fails to import without torchvision, and
    DeepSpeed runs in a child process: neither is imported into the test session)."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")


@pytest.fixture(scope="session")
def timm_ckpts(tmp_path_factory):
    _require("timm")
    from trainer_runs import timm_run

    return timm_run(tmp_path_factory.mktemp("timm") / "output")


@pytest.fixture(scope="session")
def accelerate_ckpts(tmp_path_factory):
    pytest.importorskip("accelerate")
    from trainer_runs import accelerate_run

    return accelerate_run(tmp_path_factory.mktemp("accelerate") / "project")


@pytest.fixture(scope="session")
def lightning_ema_ckpts(tmp_path_factory):
    lightning = pytest.importorskip("lightning")
    if not hasattr(lightning.pytorch.callbacks, "EMAWeightAveraging"):
        pytest.skip("lightning < 2.6 has no EMAWeightAveraging")
    from trainer_runs import lightning_ema_run

    return lightning_ema_run(tmp_path_factory.mktemp("lightning_ema") / "ckpts")


@pytest.fixture(scope="session")
def lightning_compiled_ckpts(tmp_path_factory):
    pytest.importorskip("lightning")
    from trainer_runs import lightning_compiled_run

    return lightning_compiled_run(tmp_path_factory.mktemp("lightning_compiled") / "ckpts")


@pytest.fixture(scope="session")
def _deepspeed_runs(tmp_path_factory):
    _require("deepspeed")
    from trainer_runs import deepspeed_runs

    base = tmp_path_factory.mktemp("deepspeed")
    return deepspeed_runs({3: base / "zero3", 2: base / "zero2"})


@pytest.fixture(scope="session")
def deepspeed_zero3_ckpts(_deepspeed_runs):
    """root/global_step{2,4,6}/zero_pp_rank_0_mp_rank_00_{model,optim}_states.pt, latest, zero_to_fp32.py."""
    return _deepspeed_runs[3]


@pytest.fixture(scope="session")
def deepspeed_zero2_ckpts(_deepspeed_runs):
    """root/global_step{2,4,6}/mp_rank_00_model_states.pt + zero_pp_rank_0_mp_rank_00_optim_states.pt, latest, ..."""
    return _deepspeed_runs[2]


# Real PEFT LoRA runs (tests/peft_runs.py): transformers.Trainer saves checkpoint-{3,6,9,12}/ adapter folders of a
# PeftModel on a tiny local base. Skipped where peft is not installed.


@pytest.fixture(scope="session")
def peft_base(tmp_path_factory):
    """The tiny Llama base folder (save_pretrained) every Llama LoRA run below adapts."""
    pytest.importorskip("peft")
    pytest.importorskip("accelerate")
    from peft_runs import tiny_base

    return tiny_base(tmp_path_factory.mktemp("peft_base") / "base")


@pytest.fixture(scope="session")
def peft_gpt2_base(tmp_path_factory):
    pytest.importorskip("peft")
    pytest.importorskip("accelerate")
    from peft_runs import tiny_gpt2_base

    return tiny_gpt2_base(tmp_path_factory.mktemp("peft_gpt2_base") / "base")


def _lora(tmp_path_factory, name: str, base, **kwargs):
    from peft_runs import lora_run

    return lora_run(tmp_path_factory.mktemp(name) / "run", base, **kwargs)


@pytest.fixture(scope="session")
def lora_plain(tmp_path_factory, peft_base):
    """r=4, lora_alpha=8, target_modules q_proj, v_proj."""
    from peft_runs import VARIANTS

    return _lora(tmp_path_factory, "lora_plain", peft_base, **VARIANTS["lora_plain"])


@pytest.fixture(scope="session")
def lora_rslora(tmp_path_factory, peft_base):
    from peft_runs import VARIANTS

    return _lora(tmp_path_factory, "lora_rslora", peft_base, **VARIANTS["lora_rslora"])


@pytest.fixture(scope="session")
def lora_bias(tmp_path_factory, peft_base):
    from peft_runs import VARIANTS

    return _lora(tmp_path_factory, "lora_bias", peft_base, **VARIANTS["lora_bias"])


@pytest.fixture(scope="session")
def lora_dora(tmp_path_factory, peft_base):
    from peft_runs import VARIANTS

    return _lora(tmp_path_factory, "lora_dora", peft_base, **VARIANTS["lora_dora"])


@pytest.fixture(scope="session")
def lora_modules_to_save(tmp_path_factory, peft_base):
    """modules_to_save=[lm_head] and embed_tokens targeted (lora_embedding_A/B, embed_tokens.base_layer.weight saved)."""
    from peft_runs import VARIANTS

    return _lora(tmp_path_factory, "lora_modules_to_save", peft_base, **VARIANTS["lora_modules_to_save"])


@pytest.fixture(scope="session")
def lora_patterns(tmp_path_factory, peft_base):
    """rank_pattern {layers.0.self_attn.q_proj: 2},
    alpha_pattern {layers.0.self_attn.q_proj: 6, layers.1.self_attn.v_proj: 32}."""
    from peft_runs import VARIANTS

    return _lora(tmp_path_factory, "lora_patterns", peft_base, **VARIANTS["lora_patterns"])


@pytest.fixture(scope="session")
def lora_gpt2(tmp_path_factory, peft_gpt2_base):
    """GPT-2 Conv1D c_attn, fan_in_fan_out=True."""
    from peft_runs import GPT2_VARIANT

    return _lora(tmp_path_factory, "lora_gpt2", peft_gpt2_base, **GPT2_VARIANT)


@pytest.fixture(scope="session")
def lora_other_r(tmp_path_factory, peft_base):
    """The plain run's base and targets with r=8 (lora_alpha 8): checkpoint-3, checkpoint-6."""
    from peft_runs import OTHER_R, SHORT

    return _lora(tmp_path_factory, "lora_other_r", peft_base, **OTHER_R, **SHORT)


@pytest.fixture(scope="session")
def lora_other_base(tmp_path_factory):
    """The plain variant on a second base (same architecture, seed 1; its folder is <tmp>/base, the run <tmp>/run):
    same keys and shapes as lora_plain, another base_model_name_or_path and other base weights."""
    pytest.importorskip("peft")
    pytest.importorskip("accelerate")
    from peft_runs import OTHER_BASE_SEED, SHORT, lora_run, tiny_base

    root = tmp_path_factory.mktemp("lora_other_base")
    return lora_run(root / "run", tiny_base(root / "base", seed=OTHER_BASE_SEED), **SHORT)


# Real distributed checkpoints (tests/dist_runs.py): two gloo ranks on 127.0.0.1 in child processes (no process group
# is left in the test session). Beside each DCP run root, <root>-ref/ holds torch's dcp_to_torch_save of every DCP
# folder; beside each DeepSpeed root, <root>-fp32/global_stepN.pt holds DeepSpeed's zero_to_fp32 result.


@pytest.fixture(scope="session")
def _dcp_runs(tmp_path_factory):
    import importlib.util

    import torch.distributed

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    from dist_runs import dcp_runs

    base = tmp_path_factory.mktemp("dcp")
    runs = {"fsdp2": base / "fsdp2", "torchtitan": base / "torchtitan" / "checkpoint", "tp": base / "tp"}
    if importlib.util.find_spec("accelerate") is not None:
        runs["accelerate"] = base / "accelerate"
    return dcp_runs(runs)


@pytest.fixture(scope="session")
def dcp_fsdp2_ckpts(_dcp_runs):
    """FSDP2 (fully_shard) on 2 ranks: root/step-{2,4,6}/ {.metadata, __0_0.distcp, __1_0.distcp}; keys model.<fqn>
    and optimizer.*; uneven row chunks (emb.weight 6/5 rows, head.weight 1/0: an empty chunk on rank 1)."""
    return _dcp_runs["fsdp2"]


@pytest.fixture(scope="session")
def dcp_torchtitan_ckpts(_dcp_runs):
    """torchtitan-style <dump>/checkpoint/step-{2,4,6}/: model keys at the top level, siblings optimizer.*,
    lr_scheduler.*, dataloader.*, train_state.*."""
    return _dcp_runs["torchtitan"]


@pytest.fixture(scope="session")
def dcp_tp_ckpts(_dcp_runs):
    """Tensor parallel DTensors: root/step-{2,4,6}/ with fc1 Shard(0) rows, fc2.weight Shard(1) columns, fc2.bias
    Replicate."""
    return _dcp_runs["tp"]


@pytest.fixture(scope="session")
def dcp_accelerate_ckpts(_dcp_runs):
    """accelerate's save_fsdp_model/save_fsdp_optimizer (FSDP2, SHARDED_STATE_DICT):
    root/checkpoint-{2,4,6}/{pytorch_model_fsdp_0,optimizer_0}/."""
    _require("accelerate")
    return _dcp_runs["accelerate"]


@pytest.fixture(scope="session")
def dcp_safetensors_ckpts(tmp_path_factory):
    """Tensor-parallel _HFNet on 2 ranks saved as safetensors by DCP's own writers, steps 2, 4, 6:
    {"hf": root, "st": root} with root/step-N/ from HuggingFaceStorageWriter(save_distributed=True)
    (shard-0000R-model-0000i-of-00002.safetensors) and FileSystemWriter(serialization_format=SAFETENSORS)
    (.metadata, __R_0.distcp); <root>-ref/step-N.pt holds each step's full model state dict."""
    import torch.distributed

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    from dist_runs import dcp_safetensors_runs

    base = tmp_path_factory.mktemp("dcp_safetensors")
    return dcp_safetensors_runs({"hf": base / "hf", "st": base / "st"})


@pytest.fixture(scope="session")
def _deepspeed_2rank_runs(tmp_path_factory):
    _require("deepspeed")
    from dist_runs import DEEPSPEED_KINDS, deepspeed_dist_runs

    base = tmp_path_factory.mktemp("deepspeed_2rank")
    return deepspeed_dist_runs({kind: base / kind for kind in DEEPSPEED_KINDS})


@pytest.fixture(scope="session")
def deepspeed_2rank_zero2_ckpts(_deepspeed_2rank_runs):
    """ZeRO-2, 2 ranks, fp32: global_step{2,4,6}/mp_rank_00_model_states.pt + zero_pp_rank_{0,1}_mp_rank_00_optim_states.pt."""
    return _deepspeed_2rank_runs["zero2"]


@pytest.fixture(scope="session")
def deepspeed_2rank_zero3_ckpts(_deepspeed_2rank_runs):
    """ZeRO-3, 2 ranks, fp32: global_step{2,4,6}/zero_pp_rank_{0,1}_mp_rank_00_{model,optim}_states.pt."""
    return _deepspeed_2rank_runs["zero3"]


@pytest.fixture(scope="session")
def deepspeed_2rank_zero2_bf16_ckpts(_deepspeed_2rank_runs):
    """ZeRO-2, 2 ranks, bf16: mp_rank_00_model_states.pt (bf16 module) + bf16_zero_pp_rank_{0,1}_mp_rank_00_optim_states.pt."""
    return _deepspeed_2rank_runs["zero2_bf16"]


@pytest.fixture(scope="session")
def deepspeed_2rank_zero3_bf16_ckpts(_deepspeed_2rank_runs):
    """ZeRO-3, 2 ranks, bf16: zero_pp_rank_{0,1}_mp_rank_00_model_states.pt +
    bf16_zero_pp_rank_{0,1}_mp_rank_00_optim_states.pt."""
    return _deepspeed_2rank_runs["zero3_bf16"]


# A real Trainer run of a tiny causal LM with its tokenizer, and held-out text (tests/tune_runs.py), for `tune`.


@pytest.fixture(scope="session")
def lm_run(tmp_path_factory):
    """(run folder with checkpoint-12 ... checkpoint-144, held-out .txt file)."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from tune_runs import tiny_lm_run

    return tiny_lm_run(tmp_path_factory.mktemp("lm") / "run")
