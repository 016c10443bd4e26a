"""PEFT adapters on disk: `adapter_config.json` beside `adapter_model.safetensors` (or `.bin`).

The weights are read like any safetensors or pickle file; this module reads the config and answers what
the tensors mean: which module each LoRA tensor belongs to, its rank and scaling (`lora_alpha / r`, or
`/ sqrt(r)` with rslora, per-module `rank_pattern` / `alpha_pattern`), as PEFT applies them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptavg.errors import InputError

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
KEY_PREFIX = "base_model.model."
# (suffix of an adapter tensor's name, its role); the module is what comes before the suffix
LORA_SUFFIXES = (
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora_B.bias", "B_bias"),
    (".lora_embedding_A", "A"),
    (".lora_embedding_B", "B"),
    (".lora_magnitude_vector", "magnitude"),
)
# Adapter types whose parameters act linearly on the model: their parameter-wise mean is the mean of their effect
LINEAR_TYPES = {"IA3": "IA3 scales the activations by a learned vector, so the mean vector is the mean of the changes"}
NONLINEAR_TYPES = {
    "PREFIX_TUNING": "prefix tuning's virtual tokens act through attention, which is not linear in them",
    "PROMPT_TUNING": "prompt tuning's virtual tokens act through attention, which is not linear in them",
    "P_TUNING": "p-tuning's virtual tokens act through attention, which is not linear in them",
    "LOHA": "LoHa's change is a Hadamard product of two low-rank products, not linear in its factors",
    "LOKR": "LoKr's change is a Kronecker product of its factors, not linear in them",
}


@dataclass
class AdapterConfig:
    """The fields of adapter_config.json that decide what an adapter's tensors do to the model."""

    path: Path
    raw: dict[str, Any] = field(repr=False)

    @property
    def peft_type(self) -> str:
        return str(self.raw.get("peft_type", "LORA")).upper()

    @property
    def kind(self) -> str:
        """LoRA, DoRA, rsLoRA, IA3, ...: what `inspect` and the report call it."""
        if self.peft_type != "LORA":
            return self.peft_type
        return "DoRA" if self.use_dora else ("rsLoRA" if self.use_rslora else "LoRA")

    @property
    def r(self) -> int:
        return int(self.raw.get("r", 8))

    @property
    def alpha(self) -> float:
        return float(self.raw.get("lora_alpha", 8))

    @property
    def use_rslora(self) -> bool:
        return bool(self.raw.get("use_rslora", False))

    @property
    def use_dora(self) -> bool:
        return bool(self.raw.get("use_dora", False))

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.raw.get("fan_in_fan_out", False))

    @property
    def base_model(self) -> str | None:
        return self.raw.get("base_model_name_or_path")

    def _pattern_value(self, pattern: dict | None, module: str) -> Any:
        for key, value in (pattern or {}).items():
            if module == key or re.match(rf"(.*\.)?({key})$", module):
                return value
        return None

    def rank(self, module: str) -> int:
        found = self._pattern_value(self.raw.get("rank_pattern"), module)
        return int(found) if found is not None else self.r

    def scaling(self, module: str) -> float:
        """PEFT's scale of module's B@A: lora_alpha / r, or lora_alpha / sqrt(r) with rslora (patterns first)."""
        r = self.rank(module)
        found = self._pattern_value(self.raw.get("alpha_pattern"), module)
        alpha = float(found) if found is not None else self.alpha
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def describe(self) -> dict[str, Any]:
        """What `inspect` shows of it."""
        keys = (
            "peft_type",
            "r",
            "lora_alpha",
            "use_rslora",
            "use_dora",
            "lora_bias",
            "target_modules",
            "modules_to_save",
            "rank_pattern",
            "alpha_pattern",
            "fan_in_fan_out",
            "base_model_name_or_path",
            "revision",
            "task_type",
        )
        return {"kind": self.kind, **{k: self.raw.get(k) for k in keys if k in self.raw}}


# The fields inputs must agree on to be averaged, and how they are named in an error
AGREE_ON = (
    ("base_model_name_or_path", "base model"),
    ("revision", "base model revision"),
    ("peft_type", "peft type"),
    ("target_modules", "target modules"),
    ("r", "r"),
    ("lora_alpha", "lora_alpha"),
    ("rank_pattern", "rank_pattern"),
    ("alpha_pattern", "alpha_pattern"),
    ("use_rslora", "use_rslora"),
    ("use_dora", "use_dora"),
    ("lora_bias", "lora_bias"),
    ("fan_in_fan_out", "fan_in_fan_out"),
    ("modules_to_save", "modules_to_save"),
    ("target_parameters", "target_parameters"),
)


def comparable(config: AdapterConfig, key: str) -> Any:
    """A config value as inputs are compared on it: lists as sorted sets, and absent, empty or false alike."""
    value = config.raw.get(key)
    if isinstance(value, list):
        return sorted(map(str, value))
    if value is None or value is False or value in ({}, [], ""):
        return None
    return value


def read_adapter_config(folder: Path) -> AdapterConfig | None:
    """The adapter config of a folder, or None when it holds no adapter."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(path, f"corrupt adapter config: {e}") from e
    if not isinstance(raw, dict):
        raise InputError(path, "corrupt adapter config: not a JSON object")
    return AdapterConfig(path=path, raw=raw)


def adapter_weights_file(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file() or (folder / name).is_symlink():
            return folder / name
    raise InputError(folder, f"has {CONFIG_FILE} but no adapter weights ({' or '.join(WEIGHT_FILES)})")


def lora_role(name: str) -> tuple[str, str] | None:
    """(module, role) of a LoRA tensor name: role A, B, B_bias or magnitude; None for other tensors."""
    for suffix, role in LORA_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], role
    return None


def module_name(module_key: str) -> str:
    """The module's name in the base model: the adapter key without PEFT's `base_model.model.`."""
    return module_key.removeprefix(KEY_PREFIX)


def describe_adapter(config: AdapterConfig, numels: dict[str, int]) -> dict[str, Any]:
    """`inspect`'s view of an adapter: its config fields and what its tensors hold (`numels`: name -> elements)."""
    modules = {role[0] for name in numels if (role := lora_role(name)) is not None}
    lora = sum(n for name, n in numels.items() if lora_role(name) is not None)
    return {**config.describe(), "modules": len(modules), "lora_parameters": lora, "full_parameters": sum(numels.values()) - lora}
