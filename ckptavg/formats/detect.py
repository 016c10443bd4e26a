"""Recognise a file by its bytes and a folder by what it holds; refuse known layouts we do not merge."""

from __future__ import annotations

from pathlib import Path

from ckptavg.errors import InputError, UnsupportedError

TRAINING_STATE_FILES = {
    "optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt", "training_args.bin", "rng_state.pth",
    "trainer_state.json", "custom_checkpoint_0.pkl",
}
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
    raise InputError(path, f"not a checkpoint ckptavg can read: starts with {head[:8]!r}, neither safetensors nor a PyTorch pickle")


def refuse_unsupported_folder(folder: Path) -> None:
    """An incomplete torch.distributed.checkpoint save, with what is wrong. (Quantized models are told by their
    tensors, wherever they come from: formats/quantized.py.)"""
    children = {child.name for child in folder.iterdir()}
    if any(name.endswith(".distcp") for name in children):
        raise InputError(folder, "holds .distcp files but no .metadata: an incomplete torch.distributed.checkpoint save (the metadata is written last)")


def weight_files_in(folder: Path) -> list[Path]:
    """Candidate weight files of a folder, best layout first; index files stand for their shards."""
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json", "model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file() or (folder / name).is_symlink():
            return [folder / name]
    indexes = sorted(folder.glob("*.safetensors.index.json")) or sorted(folder.glob("*.bin.index.json"))
    if indexes:
        return indexes
    safetensors = sorted(folder.glob("*.safetensors"))
    if safetensors:
        return safetensors
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.suffix in WEIGHT_SUFFIXES and p.name not in TRAINING_STATE_FILES and not p.name.startswith("rng_state")
    )
