"""A merged Hugging Face model loads with from_pretrained and computes what the float64-averaged weights compute."""

from __future__ import annotations

import pytest
import torch

import ckptavg

transformers = pytest.importorskip("transformers")


def _tiny_models(kind: str, n: int):
    models = []
    for seed in range(n):
        torch.manual_seed(seed)
        if kind == "llama":
            config = transformers.LlamaConfig(
                vocab_size=128,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=64,
                tie_word_embeddings=False,
            )
            model = transformers.LlamaForCausalLM(config)
        else:
            config = transformers.GPT2Config(
                vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, tie_word_embeddings=True
            )
            model = transformers.GPT2LMHeadModel(config)
        models.append(model.eval())
    return models


def _averaged_model(models, dtype=torch.float32):
    """The reference: every floating parameter and buffer averaged in float64 and rounded once."""
    reference = type(models[0])(models[0].config).eval()
    states = [m.state_dict() for m in models]
    merged = {}
    for name, value in states[0].items():
        if value.is_floating_point():
            merged[name] = (sum(s[name].double() for s in states) / len(states)).to(dtype)
        else:
            merged[name] = states[-1][name]
    reference.load_state_dict(merged)
    return reference


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_llama_safetensors_checkpoints(tmp_path):
    models = _tiny_models("llama", 3)
    paths = []
    for step, model in zip((100, 200, 300), models):
        folder = tmp_path / f"checkpoint-{step}"
        model.save_pretrained(folder)
        paths.append(folder)
    report = ckptavg.average(paths, tmp_path / "merged", max_shard_size="40KB")
    assert len([f for f in report.output_files if f.startswith("model-")]) > 1
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    expected = _logits(_averaged_model(models), ids)
    assert torch.equal(_logits(merged, ids), expected)


def test_gpt2_bin_with_tied_embeddings(tmp_path):
    models = _tiny_models("gpt2", 2)
    paths = []
    for step, model in zip((10, 20), models):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        model.config.save_pretrained(folder)
        state = model.state_dict()
        assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()
        torch.save(state, folder / "pytorch_model.bin")
        paths.append(folder)
    report = ckptavg.average(paths, tmp_path / "merged")
    assert ["lm_head.weight", "transformer.wte.weight"] in report.tied
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert merged.lm_head.weight.data_ptr() == merged.transformer.wte.weight.data_ptr()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    assert torch.equal(_logits(merged, ids), _logits(_averaged_model(models), ids))


def test_bf16_output_loads_in_bf16(tmp_path):
    models = _tiny_models("llama", 2)
    paths = []
    for step, model in zip((1, 2), models):
        model.save_pretrained(tmp_path / f"checkpoint-{step}")
        paths.append(tmp_path / f"checkpoint-{step}")
    ckptavg.average(paths, tmp_path / "merged", dtype="bf16")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype="auto")
    assert merged.dtype == torch.bfloat16
    reference = _averaged_model(models, torch.bfloat16)
    for name, value in reference.state_dict().items():
        assert torch.equal(merged.state_dict()[name], value.to(torch.bfloat16)), name
