"""Recognise a file by its bytes and a folder by what it holds; refuse known layouts we do not merge."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ckptavg.errors import InputError, UnsupportedError
from ckptavg.formats.peft import CONFIG_FILE as ADAPTER_CONFIG_FILE
from ckptavg.formats.peft import WEIGHT_FILES as ADAPTER_WEIGHT_FILES

# The files of a training checkpoint that are not the model, by kind (Trainer, accelerate, DeepSpeed)
TRAINING_FILES = {
    "optimizer": ("optimizer.pt", "optimizer.bin"),
    "scheduler": ("scheduler.pt",),
    "scaler": ("scaler.pt",),
    "rng": ("rng_state.pth",),
    "trainer": ("trainer_state.json", "training_args.bin", "custom_checkpoint_0.pkl"),
    "deepspeed": ("latest", "zero_to_fp32.py"),
}
TRAINING_STATE_FILES = frozenset(name for names in TRAINING_FILES.values() for name in names)
TRAINING_PREFIXES = ("optimizer", "global_step", "rng_state")  # optimizer_0.bin, global_step500/, rng_state_3.pth
# The top-level entries of a PyTorch pickle that are training state, not the model, by kind (fairseq, Lightning,
# timm, plain training loops): what training_state="drop" leaves out of an output written in its inputs' layout.
# Not here, because their loaders need them: fairseq's optimizer_history and extra_state, Lightning's loops and
# callbacks.
TRAINING_STATE_KEYS = {
    "optimizer": ("optimizer", "optimizers", "optimizer_state_dict", "optim", "optimizer_states", "last_optimizer_state"),
    "scheduler": ("scheduler", "schedulers", "lr_scheduler", "lr_schedulers", "scheduler_state_dict", "lr_scheduler_state_dict"),
    "scaler": (
        "scaler",
        "grad_scaler",
        "scaler_state_dict",
        "amp_scaler",
        "amp",
        "MixedPrecision",
        "MixedPrecisionPlugin",
        "native_amp_scaling_state",
        "amp_scaling_state",
    ),
    "rng": (
        "rng_state",
        "rng_states",
        "torch_rng_state",
        "cuda_rng_state",
        "numpy_rng_state",
        "python_rng_state",
        "random_state",
    ),
}
# A run's checkpoint folders: the Trainer's checkpoint-N, torchtitan's and NeMo's step-N
CHECKPOINT_FOLDER = re.compile(r"(checkpoint|step)-(\d+)")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def sniff(path: Path) -> str:
    """'safetensors', 'zip' or 'pickle' from the first bytes; a clear error for anything else."""
    size = path.stat().st_size
    if size == 0:
        raise InputError(path, "empty file (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    if head[8:9] == b"{":
        return "safetensors"
    if head[:4] == b"GGUF":
        raise UnsupportedError(path, "GGUF file (llama.cpp); ckptavg reads safetensors and PyTorch checkpoints")
    if head[:6] == b"\x93NUMPY":
        raise UnsupportedError(path, "NumPy .npy file; ckptavg reads safetensors and PyTorch checkpoints")
    raise InputError(
        path, f"not a checkpoint ckptavg can read: starts with {head[:8]!r}, neither safetensors nor a PyTorch pickle"
    )


def refuse_unsupported_folder(folder: Path) -> None:
    """An incomplete torch.distributed.checkpoint save, with what is wrong. (Quantized models are told by their
    tensors, wherever they come from: formats/quantized.py.)"""
    children = {child.name for child in folder.iterdir()}
    if any(name.endswith(".distcp") for name in children):
        raise InputError(
            folder,
            (
                "holds .distcp files but no .metadata: an incomplete torch.distributed.checkpoint save (the metadata is written "
                "last)"
            ),
        )


def is_training_file(name: str) -> bool:
    """A file of a training checkpoint that is not the model (optimizer, scheduler, RNG, trainer state, ...)."""
    return name in TRAINING_STATE_FILES or name.startswith(TRAINING_PREFIXES)


def weight_names(names: Iterable[str]) -> list[str]:
    """The weight files among a folder's file names, in the order the reader picks them: an adapter's weights with
    its config; else the first of the usual names or indexes; else every safetensors file; else every other weight
    file that is not training state. One rule for a local folder and a Hub repo's folder."""
    names = set(names)
    if ADAPTER_CONFIG_FILE in names:
        found = [n for n in ADAPTER_WEIGHT_FILES if n in names][:1]
        return [*found, ADAPTER_CONFIG_FILE] if found else []
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json", "model.safetensors", "pytorch_model.bin"):
        if name in names:
            return [name]
    indexes = sorted(n for n in names if n.endswith(".safetensors.index.json")) or sorted(
        n for n in names if n.endswith(".bin.index.json")
    )
    if indexes:
        return indexes
    safetensors = sorted(n for n in names if n.endswith(".safetensors"))
    if safetensors:
        return safetensors
    return sorted(n for n in names if Path(n).suffix in WEIGHT_SUFFIXES and not is_training_file(n))


def weight_files_in(folder: Path) -> list[Path]:
    """Candidate weight files of a folder, best layout first; index files stand for their shards (not an adapter's:
    formats/peft.py reads those)."""
    names = [p.name for p in folder.iterdir() if p.is_file() or p.is_symlink()]
    return [folder / n for n in weight_names(set(names) - {ADAPTER_CONFIG_FILE})]


def read_model_config(folder: Path | None) -> dict[str, Any] | None:
    """The folder's config.json as a dict; None when there is none or it is not a JSON object."""
    if folder is None:
        return None
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None
