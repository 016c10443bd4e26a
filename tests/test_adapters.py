"""PEFT adapters from real LoRA Trainer runs (tests/peft_runs.py): ckptavg averages what they do to the model.

Every expected value comes from tests/peft_runs.py, which reads the files in float64 without ckptavg, and is
checked there against peft's own merge_and_unload().
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from peft_runs import (
    adapter_config,
    adapter_deltas,
    adapter_replacements,
    adapter_tensors,
    base_state,
    checkpoints,
    logits,
    merged_state,
    reference_merge,
    sample_ids,
)
from safetensors.torch import load_file

import ckptavg
from ckptavg.errors import MismatchError, UnsupportedError

pytest.importorskip("peft")

LINEAR_VARIANTS = ["lora_plain", "lora_rslora", "lora_bias", "lora_modules_to_save", "lora_patterns", "lora_gpt2"]


def mean_of(dicts: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    total = sum(weights)
    return {k: sum(w * d[k].double() for w, d in zip(weights, dicts)) / total for k in dicts[0]}


def assert_close(got: dict, want: dict, tol: float = 2e-6) -> None:
    assert got.keys() == want.keys(), set(got) ^ set(want)
    for name in want:
        scale = max(1.0, float(want[name].abs().max()))
        err = float((got[name].double() - want[name].double()).abs().max())
        assert err <= tol * scale, (name, err)


def base_of(run: Path) -> Path:
    return Path(adapter_config(checkpoints(run)[0])["base_model_name_or_path"])


@pytest.mark.parametrize("variant", LINEAR_VARIANTS)
def test_exact_change_is_the_mean_of_the_changes(request, tmp_path, variant):
    run = request.getfixturevalue(variant)
    inputs = checkpoints(run)
    report = ckptavg.average(inputs, tmp_path / "out")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "ckptavg.json",
    ]
    config = adapter_config(out)
    assert config["r"] == config["lora_alpha"] == 4 * len(inputs) and config["use_rslora"] is False
    assert report.adapter["mode"] == "exact" and report.adapter["rank_out"] == 4 * len(inputs)
    assert_close(adapter_deltas(out), mean_of([adapter_deltas(c) for c in inputs], [1.0] * len(inputs)))
    assert_close(adapter_replacements(out), mean_of([adapter_replacements(c) for c in inputs], [1.0] * len(inputs)))


@pytest.mark.parametrize(
    "strategy,weights",
    [
        ({"weights": "linear"}, [1.0, 2.0, 3.0, 4.0]),
        ({"weights": "0,1,0,3"}, [0.0, 1.0, 0.0, 3.0]),
        ({"ema": 0.5}, [0.125, 0.125, 0.25, 0.5]),
        ({"ema_half_life": 3.0}, [0.125, 0.125, 0.25, 0.5]),
    ],
)
def test_exact_follows_every_weighting(tmp_path, lora_rslora, strategy, weights):
    inputs = checkpoints(lora_rslora)
    report = ckptavg.average(list(reversed(inputs)), tmp_path / "out", **strategy)
    assert [i.step for i in report.inputs] == [3, 6, 9, 12]
    assert_close(adapter_deltas(tmp_path / "out"), mean_of([adapter_deltas(c) for c in inputs], weights))
    kept = sum(1 for w in weights if w)
    assert adapter_config(tmp_path / "out")["r"] == 4 * kept  # inputs with weight 0 add no rank


def test_exact_output_loads_in_peft_without_a_warning_and_gives_the_mean_model(tmp_path, lora_plain):
    inputs = checkpoints(lora_plain)
    ckptavg.average(inputs, tmp_path / "out")
    base = base_of(lora_plain)
    want = {k: v.clone() for k, v in base_state(base).items()}
    for name, delta in mean_of([adapter_deltas(c) for c in inputs], [1.0] * len(inputs)).items():
        want[name] = want[name].double() + delta
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # peft warns on missing or unexpected keys and config fields
        import peft
        import transformers

        model = peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(str(base)), str(tmp_path / "out")
        ).eval()
    ids = sample_ids()
    torch.testing.assert_close(
        logits(model, ids), logits({k: v.float() for k, v in want.items()}, ids, base=base), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("variant", ["lora_plain", "lora_dora", "lora_modules_to_save", "lora_gpt2", "lora_bias"])
def test_merged_is_the_mean_of_peft_merged_models(request, tmp_path, variant):
    run = request.getfixturevalue(variant)
    inputs, base = checkpoints(run), base_of(run)
    report = ckptavg.average(inputs, tmp_path / "out", adapter_mode="merged", base=base)
    assert report.adapter["mode"] == "merged"
    got = load_file(tmp_path / "out" / "model.safetensors")
    want = mean_of([merged_state(base, c) for c in inputs], [1.0] * len(inputs))
    want = {k: v for k, v in want.items() if k in got or k != "lm_head.weight"}  # GPT-2's tied lm_head is not in its files
    assert_close(got, want, tol=1e-5)
    assert (tmp_path / "out" / "config.json").is_file()


@pytest.mark.parametrize("variant", ["lora_plain", "lora_rslora", "lora_bias", "lora_dora", "lora_patterns", "lora_gpt2"])
def test_one_adapter_with_weight_one_reproduces_itself_in_every_mode(request, tmp_path, variant):
    run = request.getfixturevalue(variant)
    one, base = checkpoints(run)[-1], base_of(run)
    ckptavg.average([one], tmp_path / "params", adapter_mode="params")
    assert all(
        torch.equal(load_file(tmp_path / "params" / "adapter_model.safetensors")[k], v) for k, v in adapter_tensors(one).items()
    )
    assert adapter_config(tmp_path / "params") == adapter_config(one)
    if variant != "lora_dora":
        ckptavg.average([one], tmp_path / "exact")
        assert_close(adapter_deltas(tmp_path / "exact"), adapter_deltas(one))
    else:
        with pytest.raises(UnsupportedError, match="DoRA.*adapter_mode='merged' base=MODEL"):
            ckptavg.average([one], tmp_path / "exact")
    ckptavg.average([one], tmp_path / "merged", adapter_mode="merged", base=base)
    got = load_file(tmp_path / "merged" / "model.safetensors")
    assert_close(got, {k: v for k, v in reference_merge(base, one).items() if k in got}, tol=1e-6)


def test_params_reports_its_error_against_exact(tmp_path, lora_plain):
    inputs = checkpoints(lora_plain)
    report = ckptavg.average(inputs, tmp_path / "out", adapter_mode="params")
    tensors = [adapter_tensors(c) for c in inputs]
    s = 8 / 4
    errors = {}
    for key in tensors[0]:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        b_key = key.replace("lora_A", "lora_B")
        exact = sum(s * t[b_key].double() @ t[key].double() for t in tensors) / len(tensors)
        params = (
            s * (sum(t[b_key].double() for t in tensors) / len(tensors)) @ (sum(t[key].double() for t in tensors) / len(tensors))
        )
        errors[module] = float((params - exact).norm() / exact.norm())
    assert report.adapter["errors"].keys() == errors.keys()
    for module, error in errors.items():
        assert report.adapter["errors"][module] == pytest.approx(error, rel=1e-9, abs=1e-12)
    assert report.adapter["error_max"] == pytest.approx(max(errors.values()))
    assert any("off the exact mean" in n for n in report.notes)
    assert_close(load_file(tmp_path / "out" / "adapter_model.safetensors"), mean_of(tensors, [1.0] * len(inputs)))


@pytest.mark.parametrize("other,field", [("lora_other_r", "r is 4 but 8"), ("lora_other_base", "base model is")])
def test_mismatched_adapters_are_refused_naming_the_field(cli, capsys, request, tmp_path, lora_plain, other, field):
    a = checkpoints(lora_plain)[-1]
    b = checkpoints(request.getfixturevalue(other))[-1]
    capsys.readouterr()  # what building the fixture printed
    result = cli("average", a, b, "-o", tmp_path / "out")
    lines = result.err.strip().splitlines()
    assert result.code == 1 and len(lines) == 1 and field in lines[0], result.err
    assert not (tmp_path / "out").exists()


def test_an_adapter_and_a_full_model_are_refused(cli, tmp_path, lora_plain):
    result = cli("average", checkpoints(lora_plain)[-1], base_of(lora_plain), "--order", "given", "-o", tmp_path / "out")
    assert result.code == 1 and "is a full model" in result.err and "PEFT adapter" in result.err


def test_an_adapter_is_a_folder(cli, tmp_path, lora_plain):
    result = cli("average", *checkpoints(lora_plain), "-o", tmp_path / "out.safetensors")
    assert result.code == 2 and "an adapter is written as a folder" in result.err


def test_export_writes_the_adapter_alone_and_merge_writes_the_model(cli, tmp_path, lora_dora):
    one, base = checkpoints(lora_dora)[-1], base_of(lora_dora)
    assert cli("export", one, "-o", tmp_path / "adapter").code == 0
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "ckptavg.json",
    ]
    assert all(
        torch.equal(load_file(tmp_path / "adapter" / "adapter_model.safetensors")[k], v) for k, v in adapter_tensors(one).items()
    )
    assert cli("export", one, "--merge", "--base", base, "-o", tmp_path / "model").code == 0
    got = load_file(tmp_path / "model" / "model.safetensors")
    assert_close(got, merged_state(base, one), tol=1e-5)
    assert cli("export", one, "--merge", "-o", tmp_path / "nobase").code == 2


def test_inspect_shows_the_adapter(cli, lora_patterns):
    data = json.loads(cli("inspect", checkpoints(lora_patterns)[-1], "--json").out)
    adapter = data["adapter"]
    assert adapter["kind"] == "LoRA" and adapter["r"] == 4 and adapter["lora_alpha"] == 8
    assert adapter["rank_pattern"] and adapter["modules"] == 4 and adapter["lora_parameters"] > 0
    text = cli("inspect", checkpoints(lora_patterns)[-1]).out
    assert "adapter      LoRA r=4 lora_alpha=8 rank_pattern, alpha_pattern" in text


def test_dora_exact_is_refused_on_the_command_line(cli, tmp_path, lora_dora):
    result = cli("average", *checkpoints(lora_dora), "-o", tmp_path / "out")
    assert result.code == 1 and "DoRA" in result.err and "--adapter-mode merged --base MODEL" in result.err


def test_mismatch_with_the_base_is_refused(tmp_path, lora_plain, lora_gpt2):
    with pytest.raises(MismatchError, match="is it the adapter's base model"):
        ckptavg.average(checkpoints(lora_plain), tmp_path / "out", adapter_mode="merged", base=base_of(lora_gpt2))


def _saved_adapters(root: Path, base: Path, config, count: int = 3) -> list[Path]:
    """Adapters of `config` on `base` with their trainable parameters set to seeded random values, saved by peft."""
    import peft
    import transformers

    folders = []
    for step in range(1, count + 1):
        model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(str(base)), config)
        g = torch.Generator().manual_seed(step)
        with torch.no_grad():
            for _, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        folder = root / f"checkpoint-{step}"
        model.save_pretrained(folder)
        folders.append(folder)
    return folders


def test_ia3_adapters_are_averaged_parameter_wise(tmp_path, peft_base):
    import peft

    config = peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    inputs = _saved_adapters(tmp_path, peft_base, config)
    report = ckptavg.average(inputs, tmp_path / "out")
    assert report.adapter["kind"] == "IA3" and report.adapter["mode"] == "params"
    assert any("exact mean of their effects" in n for n in report.notes)
    want = mean_of([adapter_tensors(c) for c in inputs], [1.0] * 3)
    assert_close(load_file(tmp_path / "out" / "adapter_model.safetensors"), want, tol=1e-7)
    assert adapter_config(tmp_path / "out") == adapter_config(inputs[0])
    ids = sample_ids()
    torch.testing.assert_close(
        logits(tmp_path / "out", ids, base=peft_base), logits(load_ia3(peft_base, want), ids), rtol=1e-5, atol=1e-5
    )


def load_ia3(base: Path, tensors: dict[str, torch.Tensor]):
    """An IA3 model on `base` with the given adapter tensors set by hand (the expected average)."""
    import peft
    import transformers

    model = peft.get_peft_model(
        transformers.AutoModelForCausalLM.from_pretrained(str(base)),
        peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    )
    peft.set_peft_model_state_dict(model, {k: v.float() for k, v in tensors.items()})
    return model.eval()


def test_prompt_tuning_is_refused_with_the_reason(cli, tmp_path, peft_base):
    import peft

    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    inputs = _saved_adapters(tmp_path, peft_base, config, count=2)
    result = cli("average", *inputs, "-o", tmp_path / "out")
    assert result.code == 1 and "PROMPT_TUNING adapters cannot be averaged" in result.err and "not linear" in result.err


@pytest.mark.parametrize("rank", [2, 4, 16])
def test_adapter_rank_is_the_best_low_rank_approximation_of_the_exact_mean(tmp_path, lora_rslora, rank):
    inputs = checkpoints(lora_rslora)
    report = ckptavg.average(inputs, tmp_path / "out", adapter_rank=rank)
    config = adapter_config(tmp_path / "out")
    assert config["r"] == config["lora_alpha"] == rank and config["use_rslora"] is False and report.adapter["rank_out"] == rank
    exact = mean_of([adapter_deltas(c) for c in inputs], [1.0] * len(inputs))
    got = adapter_deltas(tmp_path / "out")
    for name, want in exact.items():
        u, s, vh = torch.linalg.svd(want)  # the dense truncated SVD, the definition of the best rank-r approximation
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        torch.testing.assert_close(got[name], best, rtol=0, atol=2e-6 * float(want.abs().max()))
        error = float((best - want).norm() / want.norm())
        module = name.removesuffix(".weight")
        assert report.adapter["errors"][module] == pytest.approx(error, rel=1e-6, abs=1e-9)
    if rank == 16:  # the exact mean's rank: nothing lost
        assert report.adapter["error_max"] < 1e-7


def test_adapter_rank_output_loads_in_peft(tmp_path, lora_plain):
    ckptavg.average(checkpoints(lora_plain), tmp_path / "out", adapter_rank=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ids = sample_ids()
        assert torch.isfinite(logits(tmp_path / "out", ids)).all()


def test_adapter_rank_needs_the_exact_mode(cli, tmp_path, lora_plain):
    result = cli("average", *checkpoints(lora_plain), "--adapter-mode", "params", "--adapter-rank", "2", "-o", tmp_path / "out")
    assert result.code == 2 and "--adapter-rank" in result.err
