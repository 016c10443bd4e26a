"""out_format="same" (`--format same`) for transformers Trainer `checkpoint-N/` folders: the merge written as a folder
`Trainer.train(resume_from_checkpoint=OUT)` resumes from, with the newest input's optimizer, scheduler and RNG state
(training_state="newest") or without them ("drop").

The runs are hf_run's (tests/runs.py: a real Trainer saves checkpoint-2 ... checkpoint-10). Every expected value is
computed here: the float64 mean of the inputs read with safetensors, rounded once; the optimizer state as torch.load
reads the newest input's optimizer.pt.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import assert_equal_nested, make_state, save_layout
from safetensors.torch import load_file

import ckptavg
from ckptavg.errors import UsageError

STEPS = (6, 8, 10)
STATE_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth")
TRAINER_FILES = ("trainer_state.json", "training_args.bin")


def checkpoints(run: Path) -> list[Path]:
    return [run / f"checkpoint-{step}" for step in STEPS]


def mean_of(folders: list[Path], weights_file: str = "model.safetensors") -> dict[str, torch.Tensor]:
    """The float64 mean of the inputs' floating tensors rounded once to their dtype; others from the newest."""
    states = [load_file(folder / weights_file) for folder in folders]
    out = {}
    for name, newest in states[-1].items():
        if newest.is_floating_point():
            out[name] = (sum(s[name].double() for s in states) / len(states)).to(newest.dtype)
        else:
            out[name] = newest
    return out


def resume(folder: Path, tmp_path: Path, model, data: list[dict], max_steps: int, weights_of=None, **args) -> tuple[dict, object]:
    """Trainer.train(resume_from_checkpoint=folder) of `model` up to `max_steps`; what the Trainer holds once it has
    loaded the checkpoint, before its first step (step, weights as `weights_of` gives them, optimizer state), and
    the trainer."""
    import transformers

    seen: dict = {}

    class Look(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            seen["step"] = state.global_step
            weights = weights_of(model) if weights_of else model.state_dict()
            seen["weights"] = {k: v.detach().clone() for k, v in weights.items()}
            seen["optimizer"] = copy.deepcopy(optimizer.state_dict())

    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path / "resumed"),
        max_steps=max_steps,
        save_strategy="no",
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **args,
    )
    trainer = transformers.Trainer(model=model, args=arguments, train_dataset=data, callbacks=[Look()])
    trainer.train(resume_from_checkpoint=str(folder))
    return seen, trainer


def resume_gpt2(folder: Path, tmp_path: Path) -> tuple[dict, object]:
    """hf_run's GPT-2, a fresh one of the folder's config, resumed for one step past the newest input's."""
    import transformers

    torch.manual_seed(1)
    model = transformers.GPT2LMHeadModel(transformers.AutoConfig.from_pretrained(folder))
    data = [{"input_ids": torch.randint(0, 64, (16,))} for _ in range(48)]
    for item in data:
        item["labels"] = item["input_ids"]
    return resume(folder, tmp_path, model, data, STEPS[-1] + 1, learning_rate=5e-3)


def assert_optimizer_is_the_newest(seen: dict, newest: Path) -> None:
    want = torch.load(newest / "optimizer.pt", weights_only=True)
    assert seen["optimizer"]["state"] and len(seen["optimizer"]["state"]) == len(want["state"])
    assert_equal_nested(seen["optimizer"]["state"], want["state"], "state")
    assert [g["lr"] for g in seen["optimizer"]["param_groups"]] == [g["lr"] for g in want["param_groups"]]


def assert_merged_weights(weights: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """The model's weights are the mean (its lm_head tied to wte, which the files hold once)."""
    assert set(weights) - set(want) <= {"lm_head.weight"}
    for name, tensor in want.items():
        assert weights[name].dtype == tensor.dtype and torch.equal(weights[name], tensor), name
    assert torch.equal(weights["lm_head.weight"], want["transformer.wte.weight"])


def test_newest_resumes_from_the_merge_with_the_newest_optimizer(hf_run, tmp_path):
    inputs = checkpoints(hf_run)
    newest = inputs[-1]
    out = tmp_path / "pma"
    report = ckptavg.average(inputs, out, out_format="same", training_state="newest", verify=True)
    plain = tmp_path / "plain"
    ckptavg.average(inputs, plain)
    assert (out / "model.safetensors").read_bytes() == (plain / "model.safetensors").read_bytes()
    for name in (*STATE_FILES, *TRAINER_FILES, "config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (newest / name).read_bytes(), name
    assert report.verified and set(report.sha256) >= {"model.safetensors", *STATE_FILES, *TRAINER_FILES}
    assert any("newest input kept" in n and n.endswith("optimizer.pt, rng_state.pth, scheduler.pt") for n in report.notes)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["model.safetensors", "README.md", "ckptavg.json", "config.json", "generation_config.json", *STATE_FILES, *TRAINER_FILES]
    )

    want = mean_of(inputs)
    assert not torch.equal(
        want["transformer.h.0.attn.c_attn.weight"], load_file(newest / "model.safetensors")["transformer.h.0.attn.c_attn.weight"]
    )  # the merge, not the newest input
    seen, trainer = resume_gpt2(out, tmp_path)
    assert seen["step"] == STEPS[-1]
    assert_merged_weights(seen["weights"], want)
    assert_optimizer_is_the_newest(seen, newest)
    assert trainer.state.global_step == STEPS[-1] + 1  # one step more, from the newest input's step


def test_drop_leaves_out_the_training_state(hf_run, tmp_path):
    inputs = checkpoints(hf_run)
    out = tmp_path / "merged"
    report = ckptavg.average(inputs, out, out_format="same")
    for name in STATE_FILES:
        assert not (out / name).exists(), name
    for name in TRAINER_FILES:
        assert (out / name).read_bytes() == (inputs[-1] / name).read_bytes(), name
    assert any("left out" in n and n.endswith("optimizer.pt, rng_state.pth, scheduler.pt") for n in report.notes)
    want = mean_of(inputs)
    got = load_file(out / "model.safetensors")
    assert list(got) == list(want) and all(torch.equal(got[n], want[n]) for n in want)
    # trainer_state.json kept: training resumes from the merge at the newest input's step, with a new optimizer
    seen, trainer = resume_gpt2(out, tmp_path)
    assert seen["step"] == STEPS[-1] and not seen["optimizer"]["state"]
    assert_merged_weights(seen["weights"], want)
    assert trainer.state.global_step == STEPS[-1] + 1


def test_model_folders_without_training_state(tmp_path):
    """Model folders are written back as folders too (pytorch_model.bin beside model.safetensors inputs); with
    newest the report says there was no training state to keep."""
    states = [make_state(seed) for seed in (1, 2)]
    folders = [save_layout(states[0], tmp_path / "a", "bin"), save_layout(states[1], tmp_path / "b", "safetensors-folder")]
    report = ckptavg.average(folders, tmp_path / "out", out_format="same", training_state="newest", order="given", verify=True)
    assert any("no training state to keep" in n for n in report.notes)
    got = load_file(tmp_path / "out" / "model.safetensors")
    for name, newest in states[-1].items():
        want = (states[0][name].double() + newest.double()) / 2 if newest.is_floating_point() else newest
        assert torch.equal(got[name], want.to(newest.dtype)), name
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "ckptavg.json", "model.safetensors"]
    sharded = ckptavg.average(folders, tmp_path / "sharded", out_format="same", order="given", max_shard_size=2000)
    assert "model.safetensors.index.json" in sharded.output_files  # a folder is sharded as average shards one
    pickles = [save_layout(state, tmp_path / f"p{k}", "pt", step=k + 1) for k, state in enumerate(states)]
    with pytest.raises(UsageError, match="applies to a folder of safetensors shards"):
        ckptavg.average(pickles, tmp_path / "one.pt", out_format="same", max_shard_size=2000)
    assert not (tmp_path / "one.pt").exists()


def test_mixed_layouts_and_file_names_refused(hf_run, tmp_path, cli):
    inputs = checkpoints(hf_run)
    loose = tmp_path / "model.pt"
    torch.save(load_file(inputs[0] / "model.safetensors"), loose)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = cli("average", loose, *inputs[1:], "-o", tmp_path / "out", "--format", "same", "--order", "given")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert "--format same needs inputs of one layout: this is a torch file" in result.err
    for name in ("merged.safetensors", "merged.pt", "merged.ckpt"):
        result = cli("average", *inputs, "-o", tmp_path / name, "--format", "same", "--training-state", "newest")
        assert result.code == 2 and len(result.err.strip().splitlines()) == 1
        assert f"-o {name}: --format same writes a folder in the layout of the newest input, checkpoint-10/" in result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # transformers' own, on resuming peft
def test_adapter_checkpoints_resume_from_the_merged_adapter(lora_plain, peft_base, tmp_path):
    """PEFT checkpoint-N/ folders: the adapter averaged at its rank (adapter_mode="params"), written as `average`
    writes it, with the newest input's Trainer files; the PeftModel resumes from it with the newest optimizer."""
    import peft
    import transformers
    from peft_runs import CONFIG_FILE, _data
    from peft_runs import STEPS as LORA_STEPS

    inputs = [lora_plain / f"checkpoint-{step}" for step in LORA_STEPS[1:]]
    out = tmp_path / "adapter"
    report = ckptavg.average(inputs, out, out_format="same", training_state="newest", adapter_mode="params", verify=True)
    assert report.verified
    plain = tmp_path / "plain"
    ckptavg.average(inputs, plain, adapter_mode="params")
    for name in ("adapter_model.safetensors", CONFIG_FILE):
        assert (out / name).read_bytes() == (plain / name).read_bytes(), name
    for name in (*STATE_FILES, *TRAINER_FILES):
        assert (out / name).read_bytes() == (inputs[-1] / name).read_bytes(), name

    torch.manual_seed(1)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(peft_base), dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, config)
    seen, trainer = resume(
        out,
        tmp_path,
        model,
        _data(),
        LORA_STEPS[-1] + 1,
        peft.get_peft_model_state_dict,
        learning_rate=5e-2,
        label_names=["labels"],
    )
    assert seen["step"] == LORA_STEPS[-1]
    want = mean_of(inputs, "adapter_model.safetensors")
    assert list(seen["weights"]) == list(want)
    for name, tensor in want.items():
        assert torch.equal(seen["weights"][name], tensor), name
    assert_optimizer_is_the_newest(seen, inputs[-1])
    assert trainer.state.global_step == LORA_STEPS[-1] + 1


def test_hub_checkpoint_refused(tmp_path, cli):
    """An hf:// input is fetched into the cache without its Trainer files: its folder there is not written back."""
    snapshot = tmp_path / "hub" / "models--org--run" / "snapshots" / "0123abcd"
    folders = [save_layout(make_state(seed), snapshot, "hf-trainer", step=seed) for seed in (1, 2)]
    result = cli("average", *folders, "-o", tmp_path / "out", "--format", "same")
    assert result.code == 1 and len(result.err.strip().splitlines()) == 1
    assert "a Hub checkpoint is fetched without its Trainer files" in result.err
    assert not (tmp_path / "out").exists()
