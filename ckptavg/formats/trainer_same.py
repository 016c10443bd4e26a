"""out_format="same" for Hugging Face Trainer `checkpoint-N/` folders (and model folders): a folder again.

The merged weights are written exactly as `average` writes a folder (model.safetensors, or shards and their index;
config, tokenizer and generation files copied from the newest input; README.md card; ckptavg.json recipe), and
beside them the newest input's Trainer files, copied byte for byte in pieces:

- trainer_state.json and training_args.bin (the Trainer's bookkeeping: global step, log history, best metric; its
  arguments) are kept with either training_state, as the loops and hyper-parameters of a Lightning checkpoint are:
  `Trainer.train(resume_from_checkpoint=OUT)` needs trainer_state.json to start at all;
- optimizer.pt, scheduler.pt, scaler.pt and rng_state*.pth are the training state: "newest" keeps them, so that
  training resumes from the merge with the newest input's optimizer and scheduler (PMA-init); "drop" leaves them
  out (training then resumes from the merge with a new optimizer).

A PEFT adapter's checkpoint-N/ is written as `average` writes an adapter (adapter_model.safetensors and
adapter_config.json) with the same Trainer files; with "newest", the merged adapter must have the newest input's
shapes (adapter_mode="params"), for its optimizer state to fit. A DeepSpeed save inside a Trainer folder
(global_stepN/) and a DCP save (FSDP) are other layouts.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ckptavg.errors import InputError, UnsupportedError, UsageError, option
from ckptavg.formats.base import Checkpoint
from ckptavg.formats.writer import TensorSpec
from ckptavg.output import NOT_WRITTEN, PT_SUFFIXES

KIND = "same-trainer"  # the output kind writing.OutputFiles knows this layout by
TRAINER_FILES = ("trainer_state.json", "training_args.bin")  # kept with drop and newest
STATE_FILES = ("optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt")  # kept with newest only
RNG_FILE = re.compile(r"rng_state(_\d+)?\.pth")  # rng_state.pth, or one per process: rng_state_3.pth
FILE_SUFFIXES = (".safetensors", *PT_SUFFIXES, *NOT_WRITTEN)  # an output named so is a file, not this folder
COPY_PIECE = 16 << 20


def is_trainer_folder(ckpt: Checkpoint) -> bool:
    """A Trainer `checkpoint-N/` or model folder whose weights are its own files: a model's (safetensors, or
    pytorch_model.bin) or a PEFT adapter's; not a DeepSpeed or DCP save."""
    return ckpt.path.is_dir() and ckpt.folder is not None and not ckpt.format.startswith(("dcp", "deepspeed"))


def output_layout(newest: Checkpoint) -> tuple[str, bool] | None:
    """(kind, one file?) of a `--format same` output whose newest input is `newest`: a folder for a Trainer
    folder, None for another layout."""
    return (KIND, False) if is_trainer_folder(newest) else None


def training_files(folder: Path) -> tuple[list[str], list[str]]:
    """The Trainer files of `folder`: (its training state: optimizer, scheduler, scaler, RNG; its trainer
    files: trainer_state.json, training_args.bin)."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    state = [n for n in names if n in STATE_FILES or RNG_FILE.fullmatch(n)]
    return state, [n for n in names if n in TRAINER_FILES]


def kept_files(folder: Path, training_state: str) -> list[str]:
    """The files of the newest input's folder copied beside the merged weights."""
    state, trainer = training_files(folder)
    return trainer + (state if training_state == "newest" else [])


def _described(ckpt: Checkpoint) -> str:
    if is_trainer_folder(ckpt):
        return "a PEFT adapter folder" if ckpt.adapter is not None else "a model folder"
    if ckpt.path.is_dir():
        return f"a {ckpt.format.split(' ')[0]} save"
    return f"a {ckpt.format} file"


def check_trainer_same(inputs: list[Checkpoint], out: Path, specs: list[TensorSpec], training_state: str) -> list[str]:
    """Refuse, before anything is written, inputs of other layouts beside a Trainer folder, an output named as a
    file, and (for adapters) an output that is not an adapter of the newest input's tensors when its optimizer
    state is kept. Returns the report's notes: what the folder holds, the training state kept or left out."""
    newest = inputs[-1]
    for ckpt in inputs[:-1]:
        if _described(ckpt) != _described(newest):
            raise UsageError(
                ckpt.path,
                f"{option('out_format', 'same')} needs inputs of one layout: this is {_described(ckpt)}, the newest input "
                f"{newest.path} {_described(newest)} (a Trainer checkpoint)",
            )
    if out.name.lower().endswith(FILE_SUFFIXES):
        raise UsageError(
            None,
            f"{option('out', out.name)}: {option('out_format', 'same')} writes a folder in the layout of the newest input, "
            f"{newest.path.name}/: name a folder",
        )
    if newest.adapter is not None:
        _check_adapter(newest, specs, training_state)
    if _in_hub_cache(newest.folder or newest.path):
        raise UnsupportedError(
            newest.path,
            f"{option('out_format', 'same')}: a Hub checkpoint is fetched without its Trainer files (trainer_state.json, "
            "optimizer.pt, ...), so it is not written back in its own layout; download its folder and pass that",
        )
    folder = newest.folder or newest.path
    state, trainer = training_files(folder)
    merged = "adapter as `average` writes it" if newest.adapter is not None else "weights as `average` writes them"
    notes = [
        f"written as a folder in the layout of {newest.path.name}/: the merged {merged}"
        + (f", with the newest input's {' and '.join(trainer)}" if trainer else "")
    ]
    if state and training_state == "drop":
        notes.append(f"training state left out ({option('training_state', 'drop')}): {', '.join(state)}")
    elif state:
        notes.append(f"training state of the newest input kept ({option('training_state', 'newest')}): {', '.join(state)}")
    elif training_state == "newest":
        notes.append(
            f"no training state to keep ({option('training_state', 'newest')}): {newest.path.name} holds no optimizer, "
            "scheduler or RNG state (a model folder)"
        )
    if training_state == "newest" and "trainer_state.json" not in trainer:
        notes.append(f"not resumable by the Trainer: {newest.path.name} has no trainer_state.json, which it needs")
    return notes


def _in_hub_cache(folder: Path) -> bool:
    """A folder of the Hugging Face cache (`models--ORG--NAME/snapshots/<commit>/...`): what an hf:// input
    became, holding only the files ckptavg fetched for it."""
    return any(p.name == "snapshots" and p.parent.name.startswith("models--") for p in folder.parents)


def _check_adapter(newest: Checkpoint, specs: list[TensorSpec], training_state: str) -> None:
    """An adapter is written back as an adapter (not merged into its base); with its optimizer state kept, of the
    newest input's shapes (the optimizer's moments are the shapes of the tensors it trains)."""
    shapes = {name: tuple(src.shape) for name, src in newest.tensors.items()}
    if any(spec.name not in shapes for spec in specs):
        raise UsageError(
            None,
            f"{option('out_format', 'same')} writes the inputs' adapter folder; {option('adapter_mode', 'merged')} makes a "
            f"full model: leave out {option('out_format', 'same')}",
        )
    changed = next((spec for spec in specs if tuple(spec.shape) != shapes[spec.name]), None)
    if training_state == "newest" and changed is not None:
        raise UsageError(
            None,
            f"{option('training_state', 'newest')} keeps the newest input's optimizer state, made for its own shapes: the "
            f"merged {changed.name} is {list(changed.shape)}, the newest input's {list(shapes[changed.name])}; average the "
            f"adapters at their rank with {option('adapter_mode', 'params')}",
        )


def copy_training_files(newest: Checkpoint, staged: Path, training_state: str, durable: bool = True) -> list[str]:
    """Copy the newest input's Trainer files (and, with "newest", its training state) into the staged output,
    byte for byte, piece by piece; returns their names."""
    folder = newest.folder or newest.path
    names = kept_files(folder, training_state)
    for name in names:
        _copy(folder / name, staged / name, durable)
    return names


def _copy(source: Path, target: Path, durable: bool) -> None:
    try:
        src = os.open(source, os.O_RDONLY)
    except OSError as e:
        raise InputError(source, f"cannot read: {e.strerror or e}") from e
    try:
        dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            while piece := os.read(src, COPY_PIECE):
                view = memoryview(piece)
                while view:
                    view = view[os.write(dst, view) :]
            if durable:
                os.fsync(dst)
        finally:
            os.close(dst)
    finally:
        os.close(src)
