"""The PEFT LoRA runs transformers.Trainer really writes (tests/peft_runs.py), and the reference math against peft.

These tests read the files with safetensors and json, and check the independent reference (adapter_deltas,
reference_merge) against peft's own merge_and_unload(): they fail when a peft / transformers version writes or
applies adapters otherwise.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

peft = pytest.importorskip("peft")

from peft_runs import (  # noqa: E402
    GPT2_VARIANT,
    OTHER_BASE_SEED,
    PATTERNS,
    PREFIX,
    STEPS,
    VARIANTS,
    adapter_config,
    adapter_deltas,
    adapter_replacements,
    adapter_tensors,
    base_state,
    checkpoints,
    logits,
    lora_run,
    merged_state,
    module_scaling,
    reference_merge,
    sample_ids,
    tiny_base,
)

LLAMA_VARIANTS = list(VARIANTS)
ALL_VARIANTS = [*LLAMA_VARIANTS, "lora_gpt2"]
NOT_DORA = [v for v in ALL_VARIANTS if v != "lora_dora"]
CHECKPOINT_FILES = {
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    "optimizer.pt",
    "rng_state.pth",
    "scheduler.pt",
    "trainer_state.json",
    "training_args.bin",
}
HIDDEN, VOCAB = 32, 64
OUT = {"q_proj": 32, "v_proj": 16}  # 4 heads x 8, 2 key/value heads x 8
LLAMA_MODULES = [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
GPT2_MODULES = [f"transformer.h.{i}.attn.c_attn" for i in (0, 1)]
NOISE = ("is_gradient_checkpointing",)


def run_of(request, variant):
    return request.getfixturevalue(variant)


def peft_base_of(request, variant):
    return request.getfixturevalue("peft_gpt2_base" if variant == "lora_gpt2" else "peft_base")


def base_of(folder):
    return adapter_config(folder)["base_model_name_or_path"]


def expected_shapes(variant: str, r: int = 4) -> dict[str, tuple[int, ...]]:
    """Every key of the variant's adapter_model.safetensors and its shape."""
    if variant == "lora_gpt2":  # Conv1D c_attn: weight [in 32, out 96]; lora_A [r, in], lora_B [out, r]
        return {
            **{f"{PREFIX}{m}.lora_A.weight": (r, HIDDEN) for m in GPT2_MODULES},
            **{f"{PREFIX}{m}.lora_B.weight": (3 * HIDDEN, r) for m in GPT2_MODULES},
        }
    shapes = {}
    for m in LLAMA_MODULES:
        rank = PATTERNS["rank_pattern"].get(m.removeprefix("model."), r) if variant == "lora_patterns" else r
        out = OUT[m.rsplit(".", 1)[1]]
        shapes[f"{PREFIX}{m}.lora_A.weight"] = (rank, HIDDEN)
        shapes[f"{PREFIX}{m}.lora_B.weight"] = (out, rank)
        if variant == "lora_bias":
            shapes[f"{PREFIX}{m}.lora_B.bias"] = (out,)
        if variant == "lora_dora":  # no ".weight" after lora_magnitude_vector on disk
            shapes[f"{PREFIX}{m}.lora_magnitude_vector"] = (out,)
    if variant == "lora_modules_to_save":
        shapes[f"{PREFIX}model.embed_tokens.lora_embedding_A"] = (r, VOCAB)  # no ".weight"
        shapes[f"{PREFIX}model.embed_tokens.lora_embedding_B"] = (HIDDEN, r)
        shapes[f"{PREFIX}model.embed_tokens.base_layer.weight"] = (VOCAB, HIDDEN)  # the targeted embedding, saved whole
        shapes[f"{PREFIX}lm_head.weight"] = (VOCAB, HIDDEN)  # modules_to_save: the full tensor, no "modules_to_save."
    return shapes


def expected_config(variant: str) -> dict:
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "revision": None,
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "bias": "none",
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "fan_in_fan_out": False,
        "target_modules": {"q_proj", "v_proj"},
        "inference_mode": True,
    }
    config.update({"lora_gpt2": GPT2_VARIANT, **VARIANTS}[variant])
    config["target_modules"] = set(config["target_modules"])
    return config


def close(a, b, atol=1e-5):
    torch.testing.assert_close(a.to(torch.float64), b.to(torch.float64), atol=atol, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------- layout


def test_base_is_a_save_pretrained_folder_and_deterministic(peft_base, tmp_path):
    assert {p.name for p in peft_base.iterdir()} == {"config.json", "generation_config.json", "model.safetensors"}
    state = base_state(peft_base)
    assert state["model.layers.0.self_attn.q_proj.weight"].shape == (32, 32)
    assert state["model.layers.0.self_attn.v_proj.bias"].shape == (16,)  # attention_bias=True: lora_bias can merge
    assert state["model.embed_tokens.weight"].shape == (VOCAB, HIDDEN)
    assert not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])  # untied
    assert all(t.dtype == torch.float32 for t in state.values())
    again = base_state(tiny_base(tmp_path / "again"))
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)
    other = base_state(tiny_base(tmp_path / "other", seed=OTHER_BASE_SEED))
    assert not torch.equal(other["model.layers.0.self_attn.q_proj.weight"], state["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_trainer_checkpoint_layout(request, variant):
    run = run_of(request, variant)
    folders = checkpoints(run)
    assert [p.name for p in folders] == [f"checkpoint-{s}" for s in STEPS]
    assert {p.name for p in run.iterdir()} == {p.name for p in folders}
    base = peft_base_of(request, variant)
    for folder in folders:
        assert {p.name for p in folder.iterdir()} == CHECKPOINT_FILES
        tensors = adapter_tensors(folder)
        assert {k: tuple(v.shape) for k, v in tensors.items()} == expected_shapes(variant)
        assert all(v.dtype == torch.float32 for v in tensors.values())
        config = adapter_config(folder)
        for field, value in expected_config(variant).items():
            got = set(config[field]) if field == "target_modules" else config[field]
            assert got == value, field
        assert config["base_model_name_or_path"] == str(base)
        assert config["peft_version"] == peft.__version__
        state = json.loads((folder / "trainer_state.json").read_text())
        assert state["global_step"] == int(folder.name.split("-")[1])


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_training_moved_every_adapter_tensor(request, variant):
    """lora_B leaves zero, A moves, and each checkpoint differs from the one before."""
    folders = checkpoints(run_of(request, variant))
    first, last = adapter_tensors(folders[0]), adapter_tensors(folders[-1])
    for key, tensor in first.items():
        if ".lora_B." in key or key.endswith("lora_embedding_A"):  # the factors initialised at zero
            assert tensor.abs().max() > 1e-3, key
        if "base_layer" not in key:
            assert (last[key] - tensor).abs().max() > 1e-2, key
    for before, after in zip(folders, folders[1:]):
        a, b = adapter_tensors(before), adapter_tensors(after)
        assert any(not torch.equal(a[k], b[k]) for k in a)


def test_modules_to_save_and_embedding_base_layer(lora_modules_to_save, peft_base):
    base = base_state(peft_base)
    for folder in checkpoints(lora_modules_to_save):
        replaced = adapter_replacements(folder)
        assert set(replaced) == {"lm_head.weight", "model.embed_tokens.weight"}
        assert torch.equal(replaced["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # frozen, saved
        assert (replaced["lm_head.weight"] - base["lm_head.weight"]).abs().max() > 1e-2  # trained whole


def test_dora_magnitude_moved_from_the_base_row_norms(lora_dora, peft_base):
    base = base_state(peft_base)
    for module in LLAMA_MODULES:
        norms = torch.linalg.norm(base[f"{module}.weight"], dim=1)  # DoRA's initial magnitude
        magnitude = adapter_tensors(checkpoints(lora_dora)[-1])[f"{PREFIX}{module}.lora_magnitude_vector"]
        assert (magnitude - norms).abs().max() > 1e-2


def test_other_rank_and_other_base(lora_other_r, lora_other_base, lora_plain, peft_base):
    assert [p.name for p in checkpoints(lora_other_r)] == ["checkpoint-3", "checkpoint-6"]
    assert [p.name for p in checkpoints(lora_other_base)] == ["checkpoint-3", "checkpoint-6"]
    wide = checkpoints(lora_other_r)[-1]
    assert {k: tuple(v.shape) for k, v in adapter_tensors(wide).items()} == expected_shapes("lora_plain", r=8)
    assert (adapter_config(wide)["r"], adapter_config(wide)["lora_alpha"]) == (8, 8)
    assert base_of(wide) == str(peft_base)
    other, plain = checkpoints(lora_other_base)[-1], checkpoints(lora_plain)[-1]
    assert base_of(other) == str(lora_other_base.parent / "base") != str(peft_base)
    assert {k: v.shape for k, v in adapter_tensors(other).items()} == {k: v.shape for k, v in adapter_tensors(plain).items()}
    drop = ("base_model_name_or_path",)
    assert {k: v for k, v in adapter_config(other).items() if k not in drop} == {
        k: v for k, v in adapter_config(plain).items() if k not in drop
    }
    a, b = base_state(base_of(other)), base_state(peft_base)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert a.keys() == b.keys() and not torch.equal(a[q], b[q])


def test_runs_are_deterministic(lora_plain, peft_base, tmp_path):
    again = lora_run(tmp_path / "run", peft_base, save_steps=STEPS[-1], **VARIANTS["lora_plain"])  # one save, same schedule
    assert [p.name for p in checkpoints(again)] == [f"checkpoint-{STEPS[-1]}"]
    a, b = adapter_tensors(checkpoints(again)[0]), adapter_tensors(checkpoints(lora_plain)[-1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------- reference vs peft


@pytest.mark.parametrize("variant", NOT_DORA)
def test_adapter_deltas_are_what_peft_merges(request, variant):
    """merge_and_unload() state - base state == adapter_deltas (and the stored full tensors), everything else equal."""
    base_folder = peft_base_of(request, variant)
    base = base_state(base_folder)
    for folder in checkpoints(run_of(request, variant))[:: len(STEPS) - 1]:  # the first and the last
        merged = merged_state(base_folder, folder)
        deltas, replaced = adapter_deltas(folder), adapter_replacements(folder)
        assert deltas and all(d.dtype == torch.float64 for d in deltas.values())
        for name in base:
            if name in replaced:
                start = replaced[name]
            else:
                start = base[name]
            if name in deltas:
                close(merged[name].double() - start.double(), deltas[name])
                assert deltas[name].abs().max() > 1e-2
            else:
                assert torch.equal(merged[name], start), name
        assert set(deltas) <= set(base)


def test_delta_keys_and_scalings(lora_plain, lora_rslora, lora_bias, lora_patterns, lora_gpt2, lora_modules_to_save):
    weights = {f"{m}.weight" for m in LLAMA_MODULES}
    assert set(adapter_deltas(checkpoints(lora_plain)[-1])) == weights
    assert set(adapter_deltas(checkpoints(lora_bias)[-1])) == weights | {f"{m}.bias" for m in LLAMA_MODULES}
    assert set(adapter_deltas(checkpoints(lora_modules_to_save)[-1])) == weights | {"model.embed_tokens.weight"}
    gpt2 = adapter_deltas(checkpoints(lora_gpt2)[-1])
    assert {k: tuple(v.shape) for k, v in gpt2.items()} == {f"{m}.weight": (HIDDEN, 3 * HIDDEN) for m in GPT2_MODULES}
    assert module_scaling(adapter_config(checkpoints(lora_plain)[-1]), "model.layers.0.self_attn.q_proj") == (4, 8, 2.0)
    assert module_scaling(adapter_config(checkpoints(lora_rslora)[-1]), "model.layers.0.self_attn.q_proj") == (4, 8, 4.0)
    patterns = adapter_config(checkpoints(lora_patterns)[-1])
    assert module_scaling(patterns, "model.layers.0.self_attn.q_proj") == (2, 6, 3.0)
    assert module_scaling(patterns, "model.layers.1.self_attn.v_proj") == (4, 32, 8.0)
    assert module_scaling(patterns, "model.layers.0.self_attn.v_proj") == (4, 8, 2.0)
    assert module_scaling(patterns, "model.layers.1.self_attn.q_proj") == (4, 8, 2.0)


def naive_deltas(folder):
    """s = lora_alpha / r from the top of the config for every module, no rslora, patterns, bias or transpose."""
    config, tensors = adapter_config(folder), adapter_tensors(folder)
    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key[len(PREFIX) : -len(".lora_A.weight")]
            b = tensors[f"{PREFIX}{module}.lora_B.weight"]
            out[f"{module}.weight"] = config["lora_alpha"] / config["r"] * (b.double() @ a.double())
    return out


def disagreeing(merged, base, deltas) -> list[str]:
    """Base tensors whose change under peft's merge is not `deltas` (missing: zero)."""
    out = []
    for name in base:
        change = merged[name].double() - base[name].double()
        want = deltas.get(name, torch.zeros_like(change))
        if want.shape != change.shape or not torch.allclose(change, want, atol=1e-4):
            out.append(name)
    return out


@pytest.mark.parametrize("variant", ["lora_rslora", "lora_patterns", "lora_bias", "lora_gpt2", "lora_dora"])
def test_the_peft_comparison_catches_a_formula_that_ignores_the_variant(request, variant):
    """The check has teeth: the plain alpha/r formula disagrees with peft's merge on each variant (rslora scaling,
    per-module patterns, the bias, GPT-2's transpose, DoRA's norm), where adapter_deltas agrees."""
    base_folder = peft_base_of(request, variant)
    folder = checkpoints(run_of(request, variant))[-1]
    merged, base = merged_state(base_folder, folder), base_state(base_folder)
    assert disagreeing(merged, base, adapter_deltas(folder)) == []
    assert disagreeing(merged, base, naive_deltas(folder))
    plain = checkpoints(request.getfixturevalue("lora_plain"))[-1]
    if variant != "lora_gpt2":
        assert disagreeing(merged_state(base_folder, plain), base, naive_deltas(plain)) == []


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_reference_merge_is_peft_merge_and_unload(request, variant):
    """base + adapter from the files alone (DoRA's row norms included) == peft's merge_and_unload()."""
    base_folder = peft_base_of(request, variant)
    for folder in checkpoints(run_of(request, variant)):
        ours, peft_merged = reference_merge(base_folder, folder), merged_state(base_folder, folder)
        assert set(ours) <= set(peft_merged)
        assert set(peft_merged) - set(ours) <= {"lm_head.weight"}  # GPT-2's lm_head is tied to wte, not saved
        for name, tensor in ours.items():
            close(peft_merged[name], tensor)


def test_dora_delta_is_not_linear_in_the_factors(lora_dora, peft_base):
    folder = checkpoints(lora_dora)[-1]
    merged, base = merged_state(peft_base, folder), base_state(peft_base)
    for name, delta in adapter_deltas(folder).items():
        close(merged[name].double() - base[name].double(), delta)
    assert any(not torch.allclose(merged[n].double() - base[n].double(), d, atol=1e-3) for n, d in naive_deltas(folder).items())


@pytest.mark.parametrize("variant", ["lora_plain", "lora_dora", "lora_modules_to_save", "lora_bias", "lora_gpt2"])
def test_logits_of_adapter_merged_and_reference_agree(request, variant):
    base_folder = peft_base_of(request, variant)
    folder = checkpoints(run_of(request, variant))[-1]
    ids = sample_ids()
    adapted = logits(folder, ids)
    assert adapted.shape == (2, 16, VOCAB)
    close(logits(merged_state(base_folder, folder), ids, base=base_folder), adapted, atol=1e-4)
    close(logits(reference_merge(base_folder, folder), ids, base=base_folder), adapted, atol=1e-4)
    assert (logits(base_folder, ids) - adapted).abs().max() > 1e-2


# -------------------------------------------------------------------------- what PEFT accepts when loading


def cat_adapter(folders, weights, out, **config_changes):
    """The exact weighted sum of deltas as one adapter: A' = rows of w_i·s_i·A_i, B' = columns of B_i,
    r = lora_alpha = Σr_i (scaling 1), use_rslora off, patterns cleared."""
    configs, tensors = [adapter_config(f) for f in folders], [adapter_tensors(f) for f in folders]
    new = {}
    for key in tensors[0]:
        if key.endswith(".lora_A.weight"):
            module = key[len(PREFIX) : -len(".lora_A.weight")]
            b_key = key.replace(".lora_A.", ".lora_B.")
            new[key] = torch.cat([w * module_scaling(c, module)[2] * t[key] for w, c, t in zip(weights, configs, tensors)])
            new[b_key] = torch.cat([t[b_key] for t in tensors], dim=1)
    rank = sum(c["r"] for c in configs)
    config = {**configs[0], "r": rank, "lora_alpha": rank, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}}
    config.update(config_changes)
    out.mkdir(parents=True)
    (out / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in new.items()}, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def loud(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught if not any(n in str(w.message) for n in NOISE)]


@pytest.mark.parametrize("variant", ["lora_plain", "lora_rslora"])
def test_a_sum_rank_adapter_loads_silently_and_is_the_mean_of_deltas(request, variant, peft_base, tmp_path):
    folders = checkpoints(run_of(request, variant))
    mean = {}
    for folder in folders:
        for name, delta in adapter_deltas(folder).items():
            mean[name] = mean.get(name, 0) + delta / len(folders)
    out = cat_adapter(folders, [1 / len(folders)] * len(folders), tmp_path / "cat")
    merged, messages = loud(lambda: merged_state(peft_base, out))
    assert messages == []  # r=16, lora_alpha=16 over 4-rank training checkpoints: no warning at all
    assert adapter_config(out)["r"] == 4 * len(folders)
    base = base_state(peft_base)
    for name, delta in mean.items():
        close(merged[name].double() - base[name].double(), delta)
    # use_rslora left on scales by alpha/sqrt(r) = sqrt(16): silently 4x the mean
    wrong = merged_state(peft_base, cat_adapter(folders, [0.25] * 4, tmp_path / "rs", use_rslora=True))
    name = "model.layers.0.self_attn.q_proj.weight"
    close(wrong[name].double() - base[name].double(), 4 * mean[name], atol=1e-4)


def test_peft_load_refuses_a_rank_the_config_does_not_say_and_ignores_unknown_keys(lora_plain, peft_base, tmp_path):
    folders = checkpoints(lora_plain)
    with pytest.raises(RuntimeError, match="size mismatch"):
        merged_state(peft_base, cat_adapter(folders[:2], [0.5, 0.5], tmp_path / "small", r=4, lora_alpha=4))
    folder = folders[-1]
    tensors, config = adapter_tensors(folder), adapter_config(folder)

    def write(name, tensors):
        out = tmp_path / name
        out.mkdir()
        (out / "adapter_config.json").write_text(json.dumps(config))
        save_file(tensors, str(out / "adapter_model.safetensors"))
        return out

    missing = f"{PREFIX}model.layers.1.self_attn.v_proj.lora_B.weight"
    merged, messages = loud(lambda: merged_state(peft_base, write("missing", {k: v for k, v in tensors.items() if k != missing})))
    assert any("Found missing adapter keys" in m for m in messages)
    v = "model.layers.1.self_attn.v_proj.weight"
    assert torch.equal(merged[v], base_state(peft_base)[v])  # lora_B stays at its zero init: no change
    extra = {**tensors, f"{PREFIX}model.layers.0.mlp.up_proj.lora_A.weight": torch.ones(4, HIDDEN)}
    merged, messages = loud(lambda: merged_state(peft_base, write("extra", extra)))
    assert messages == []  # an unexpected key is dropped without a word
    assert torch.equal(merged["model.layers.0.mlp.up_proj.weight"], base_state(peft_base)["model.layers.0.mlp.up_proj.weight"])
