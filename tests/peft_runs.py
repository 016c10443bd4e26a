"""Real PEFT LoRA training runs, saved by transformers.Trainer, and independent reference math for them.

Builders (seeded: two builds hold the same tensors):

- tiny_base(root): a tiny LlamaForCausalLM (attention_bias=True, so q_proj/v_proj have a bias that lora_bias can
  move; untied lm_head) saved with save_pretrained: config.json, generation_config.json, model.safetensors.
- tiny_gpt2_base(root): a tiny GPT2LMHeadModel (Conv1D c_attn, tied lm_head/wte).
- lora_run(root, base, **lora_kwargs): get_peft_model(base, LoraConfig(...)) trained by transformers.Trainer,
  max_steps=12, save_steps=3: root/checkpoint-{3,6,9,12}/ each with adapter_model.safetensors,
  adapter_config.json, README.md (the PEFT model card), optimizer.pt, scheduler.pt, rng_state.pth,
  trainer_state.json, training_args.bin. No base weights in the checkpoints (except what modules_to_save and
  targeted embeddings add, see adapter_replacements).

Reference helpers (they import nothing from ckptavg, and adapter_deltas / reference_merge not peft either):

- adapter_deltas(folder): each module's change to its base tensor, in float64, keyed by the base tensor name.
- adapter_replacements(folder): the full tensors an adapter stores (modules_to_save, saved embedding base layers).
- reference_merge(base, folder): base + adapter in float64, computed from the files alone.
- merged_state(base, folder): peft's own PeftModel.from_pretrained(...).merge_and_unload() state dict, float32.
- logits(model_or_folder, input_ids): a model's output logits, for comparing models.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

PREFIX = "base_model.model."
ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
MAX_STEPS = 12
SAVE_STEPS = 3
STEPS = tuple(range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS))  # (3, 6, 9, 12)
SEQ_LEN = 16
VOCAB = 64

# Noise the libraries print on every run here, none of it about the files: transformers' own deprecation inside
# Trainer, peft's note that a targeted embedding makes it save the embedding layer, and peft 0.21.2's save-time
# shape check that wrongly calls the 1-D lora_B.bias of a lora_bias adapter an "invalid shape" (the file is fine:
# it loads and merges exactly, see test_peft_runs.py).
_NOISE = (
    r".*is_gradient_checkpointing.*",
    r"Setting `save_embedding_layers` to `True`.*",
    r"Adapter 'default': \d+ LoRA tensor\(s\) have invalid shape: .*lora_B\.bias.*",
)


@contextmanager
def _quiet():
    with warnings.catch_warnings():
        for message in _NOISE:
            warnings.filterwarnings("ignore", message=message)
        yield


# --------------------------------------------------------------------------------------------- builders


def tiny_base(root: Path, seed: int = 0) -> Path:
    """A tiny causal LM (Llama) saved with save_pretrained (safetensors) in `root`; no tokenizer."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        attention_bias=True,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(root, safe_serialization=True)
    return root


def tiny_gpt2_base(root: Path, seed: int = 0) -> Path:
    """A tiny GPT-2 (Conv1D layers, whose weights are stored [in, out]; lm_head tied to wte)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(root, safe_serialization=True)
    return root


def _data(n: int = 48) -> list[dict]:
    """Sequences s, s+3, s+6, ... (mod VOCAB): something a tiny model can learn in a few steps."""
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(n):
        ids = (torch.arange(SEQ_LEN) * 3 + torch.randint(0, VOCAB, (1,), generator=g)) % VOCAB
        data.append({"input_ids": ids, "labels": ids.clone()})
    return data


def lora_run(
    root: Path,
    base: Path,
    *,
    max_steps: int = MAX_STEPS,
    save_steps: int = SAVE_STEPS,
    learning_rate: float = 5e-2,
    seed: int = 0,
    **lora_kwargs,
) -> Path:
    """Train a LoRA adapter on `base` with transformers.Trainer; returns `root` holding checkpoint-N/ folders.

    lora_kwargs go to peft.LoraConfig on top of r=4, lora_alpha=8, target_modules=[q_proj, v_proj],
    lora_dropout=0, task_type=CAUSAL_LM."""
    import peft
    import transformers

    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0, "task_type": "CAUSAL_LM"}
    config.update(lora_kwargs)
    with _quiet():
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        model = peft.get_peft_model(model, peft.LoraConfig(**config))
        args = transformers.TrainingArguments(
            output_dir=str(root),
            max_steps=max_steps,
            save_steps=save_steps,
            logging_steps=save_steps,
            per_device_train_batch_size=4,
            learning_rate=learning_rate,
            report_to=[],
            use_cpu=True,
            seed=seed,
            dataloader_num_workers=0,
            disable_tqdm=True,
            label_names=["labels"],
        )
        transformers.Trainer(model=model, args=args, train_dataset=_data()).train()
    return root


def checkpoints(run: Path) -> list[Path]:
    """The run's checkpoint-N folders, by step."""
    return sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


# The variants the session fixtures build (tests/conftest.py), as LoraConfig keywords on top of lora_run's defaults.
PATTERNS = {
    "rank_pattern": {"layers.0.self_attn.q_proj": 2},
    "alpha_pattern": {"layers.0.self_attn.q_proj": 6, "layers.1.self_attn.v_proj": 32},
}
VARIANTS = {
    "lora_plain": {},
    "lora_rslora": {"use_rslora": True},
    "lora_bias": {"lora_bias": True},
    "lora_dora": {"use_dora": True},
    "lora_modules_to_save": {"target_modules": ["q_proj", "v_proj", "embed_tokens"], "modules_to_save": ["lm_head"]},
    "lora_patterns": PATTERNS,
}
GPT2_VARIANT = {"target_modules": ["c_attn"], "fan_in_fan_out": True}  # lora_gpt2
OTHER_R = {"r": 8}  # lora_other_r: plain but r=8 (lora_alpha stays 8)
SHORT = {"max_steps": 6}  # lora_other_r and lora_other_base: checkpoint-3 and checkpoint-6 only
OTHER_BASE_SEED = 1  # lora_other_base: plain, on tiny_base(seed=1): same architecture, other weights


# ------------------------------------------------------------------------------------- reading the files


def adapter_config(folder: Path) -> dict:
    return json.loads((Path(folder) / CONFIG_FILE).read_text())


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(Path(folder) / ADAPTER_FILE), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def base_state(base: Path) -> dict[str, torch.Tensor]:
    """The tensors of a save_pretrained folder (one model.safetensors or shards listed in its index)."""
    base = Path(base)
    index = base / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    state = {}
    for name in files:
        with safe_open(str(base / name), "pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys()})
    return state


def _pattern_value(patterns: dict, module: str, default):
    """rank_pattern / alpha_pattern: the first key (in the config's order) that matches the end of the module's
    name at a dot boundary, as a regular expression; else the default."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?({key})", module):
            return value
    return default


def module_scaling(config: dict, module: str) -> tuple[int, float, float]:
    """(r, lora_alpha, scaling) for one module: patterns first, then alpha/r or alpha/sqrt(r) (use_rslora)."""
    r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return r, alpha, scaling


_LORA_PARTS = (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector")


def adapter_deltas(folder: Path, base: Path | None = None) -> dict[str, torch.Tensor]:
    """Each module's change to its base tensor, float64, keyed by the base model's tensor name
    (`model.layers.0.self_attn.q_proj.weight`), exactly as PEFT applies the adapter:

    - Linear / Conv1D: s·B@A, transposed when fan_in_fan_out (GPT-2 Conv1D stores [in, out]);
    - Embedding (lora_embedding_A [r, num_embeddings], lora_embedding_B [dim, r]): s·(B@A).T;
    - lora_bias: deltas["<fqn>.bias"] = s·lora_B.bias;
    - DoRA (lora_magnitude_vector m): W' - W0 with W' = m / ‖W0 + s·BA‖_row · (W0 + s·BA), which needs the base
      weights: from `base`, else the config's base_model_name_or_path (a local folder).

    s = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora, per module after rank_pattern / alpha_pattern.
    Full tensors the adapter stores (modules_to_save, embedding base layers) are not deltas: see
    adapter_replacements."""
    config = adapter_config(folder)
    tensors = {k: v.to(torch.float64) for k, v in adapter_tensors(folder).items()}
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    base_weights = None
    deltas: dict[str, torch.Tensor] = {}
    for key in sorted(tensors):
        if not key.startswith(PREFIX):
            raise ValueError(f"unexpected adapter key {key!r}")
        name = key[len(PREFIX) :]
        if name.endswith(".lora_A.weight"):
            module = name[: -len(".lora_A.weight")]
            A, B = tensors[key], tensors[f"{PREFIX}{module}.lora_B.weight"]
            r, _, s = module_scaling(config, module)
            if A.shape[0] != r or B.shape[1] != r:
                raise ValueError(f"{module}: A {tuple(A.shape)} / B {tuple(B.shape)} do not have rank {r}")
            delta = s * (B @ A)  # [out, in]
            magnitude = tensors.get(f"{PREFIX}{module}.lora_magnitude_vector")
            if magnitude is not None:
                if base_weights is None:
                    base_weights = base_state(Path(base or config["base_model_name_or_path"]))
                w0 = base_weights[f"{module}.weight"].to(torch.float64)
                w0 = w0.T if fan_in_fan_out else w0
                combined = w0 + delta
                norm = torch.linalg.norm(combined, dim=1)
                delta = (magnitude / norm)[:, None] * combined - w0
            deltas[f"{module}.weight"] = delta.T if fan_in_fan_out else delta
            bias = tensors.get(f"{PREFIX}{module}.lora_B.bias")
            if bias is not None:
                deltas[f"{module}.bias"] = s * bias
        elif name.endswith(".lora_embedding_A"):
            module = name[: -len(".lora_embedding_A")]
            A, B = tensors[key], tensors[f"{PREFIX}{module}.lora_embedding_B"]
            if f"{PREFIX}{module}.lora_magnitude_vector" in tensors:
                raise NotImplementedError("DoRA on embeddings")
            r, _, s = module_scaling(config, module)
            if A.shape[0] != r or B.shape[1] != r:
                raise ValueError(f"{module}: A {tuple(A.shape)} / B {tuple(B.shape)} do not have rank {r}")
            deltas[f"{module}.weight"] = s * (B @ A).T  # [num_embeddings, dim]
    return deltas


def adapter_replacements(folder: Path) -> dict[str, torch.Tensor]:
    """Full tensors stored in the adapter, keyed by the base tensor they replace on load: modules_to_save
    (`base_model.model.lm_head.weight` -> `lm_head.weight`) and embedding layers saved because they were targeted
    (`base_model.model.model.embed_tokens.base_layer.weight` -> `model.embed_tokens.weight`)."""
    out = {}
    for key, tensor in adapter_tensors(folder).items():
        name = key[len(PREFIX) :]
        if any(part in name for part in _LORA_PARTS):
            continue
        out[name.replace(".base_layer.", ".")] = tensor
    return out


def reference_merge(base: Path, folder: Path) -> dict[str, torch.Tensor]:
    """base + adapter in float64 from the files alone (no peft): replacements, then deltas."""
    state = {k: v.to(torch.float64) for k, v in base_state(base).items()}
    for name, tensor in adapter_replacements(folder).items():
        if name not in state:
            raise KeyError(f"{name} is not in the base")
        state[name] = tensor.to(torch.float64)
    for name, delta in adapter_deltas(folder, base).items():
        state[name] = state[name] + delta
    return state


# ------------------------------------------------------------------------------------------ peft itself


def load_adapted(folder: Path, base: Path | None = None):
    """PeftModel.from_pretrained on a fresh base (`base`, else the config's base_model_name_or_path), eval mode."""
    import peft
    import transformers

    base = base or adapter_config(folder)["base_model_name_or_path"]
    with _quiet():
        model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        return peft.PeftModel.from_pretrained(model, str(folder)).eval()


def merged_state(base: Path, folder: Path) -> dict[str, torch.Tensor]:
    """peft's own merge_and_unload() state dict (float32) of base + adapter (DoRA included)."""
    with _quiet():
        merged = load_adapted(folder, base).merge_and_unload()
    return {k: v.detach().to(torch.float32).clone() for k, v in merged.state_dict().items()}


def logits(model_or_folder, input_ids: torch.Tensor, base: Path | None = None) -> torch.Tensor:
    """Logits (float32, eval, no grad) of: a torch module; a folder holding an adapter (loaded onto `base`, else
    its base_model_name_or_path); a save_pretrained model folder; or a state dict / .safetensors file of full
    weights, loaded strictly into the architecture of `base`."""
    import transformers
    from safetensors.torch import load_file

    model = model_or_folder
    if isinstance(model, (dict, str, Path)):
        if isinstance(model, dict) or str(model).endswith(".safetensors"):
            state = model if isinstance(model, dict) else load_file(str(model))
            if base is None:
                raise ValueError("full weights need `base` for the architecture")
            net = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
            missing, unexpected = net.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=False)
            tied = {k for k in missing if k == "lm_head.weight" and getattr(net.config, "tie_word_embeddings", False)}
            if set(missing) - tied or unexpected:
                raise ValueError(f"missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
            model = net
        elif (Path(model) / CONFIG_FILE).exists():
            model = load_adapted(Path(model), base)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits.to(torch.float32)


def sample_ids(batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, SEQ_LEN), generator=g)
