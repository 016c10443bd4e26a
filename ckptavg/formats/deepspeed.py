"""DeepSpeed ZeRO 1/2/3 checkpoints, read lazily and without DeepSpeed.

A save is a `global_stepN/` folder (named by the run folder's `latest`): `*model_states.pt` (the 16-bit
module, buffers, `param_shapes`, `shared_params`, frozen parameters) and one `*optim_states.pt` per data
parallel rank, holding that rank's partition of the FP32 master weights beside the Adam moments. The FP32
masters are the weights: each parameter is located in the partitions (ZeRO-1/2: the ranks' partitions of a
group concatenated, parameters consecutive in `param_shapes` order; ZeRO-3: ceil(numel / world) elements at
the same offset in every rank's flat partition) and read by byte range; the moments are never read. The
pickles go through the restricted unpickler: DeepSpeed's classes (`LossScaler`, `ZeroStageEnum`,
`fragment_address`) become inert placeholders, and nothing is imported from DeepSpeed.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from ckptavg.errors import InputError, UnsupportedError, option
from ckptavg.formats.base import Checkpoint, ExtentSource, TensorSource
from ckptavg.formats.torch_io import PickleFile, as_dict
from ckptavg.formats.unpickle import Opaque, TensorRef

MODEL_STATES = "*model_states.pt"
OPTIM_STATES = "*optim_states.pt"


def natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def save_folder(path: Path) -> Path | None:
    """The `global_stepN/` folder an input stands for: itself, the tag its `latest` names (a run folder or a
    Trainer `checkpoint-N/`), or its only tag folder; None when it holds no DeepSpeed save."""
    if any(path.glob(MODEL_STATES)):
        return path
    latest = path / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if (path / tag).is_dir() and any((path / tag).glob(MODEL_STATES)):
            return path / tag
        raise InputError(latest, f"names the tag {tag!r}, but {path / tag} holds no *model_states.pt")
    tags = sorted((p for p in path.iterdir() if p.is_dir() and any(p.glob(MODEL_STATES))), key=natural_key)
    if len(tags) > 1:
        raise InputError(
            path,
            (
                f"holds several DeepSpeed saves ({', '.join(t.name for t in tags[:3])}, ...) and no `latest`: pass the ones to "
                f"use, e.g. {path}/global_step*"
            ),
        )
    return tags[0] if tags else None


def _stage(value: Any, path: Path) -> int:
    """ZeroStageEnum is pickled as the enum class called with its value; it arrives as a placeholder."""
    if isinstance(value, Opaque) and value._opaque_args:
        value = value._opaque_args[0]
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise InputError(
        path,
        f"not a ZeRO optimizer state: no zero_stage (a BF16_Optimizer save? pass {option('key', 'module')} for the 16-bit "
        "weights)",
    )


def _extents(parts: list[TensorSource], start: int, count: int) -> list[tuple[Path, int, int]]:
    """Byte ranges of elements [start, start + count) of the concatenation of flat `parts`."""
    extents, at = [], 0
    for src in parts:
        n = src.numel
        lo, hi = max(start, at), min(start + count, at + n)
        if lo < hi:
            size = src.itemsize
            extents.append((src.path, src.offset + (lo - at) * size, (hi - lo) * size))
        at += n
    return extents


def _flat(pickle_file: PickleFile, value: Any, what: str) -> TensorSource:
    if not isinstance(value, TensorRef):
        raise InputError(pickle_file.path, f"{what} is not a tensor")
    src = pickle_file.source(value, what)
    if not src.contiguous or len(src.shape) != 1:
        raise InputError(pickle_file.path, f"{what} is not a flat tensor")
    return src


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in (value._opaque_args[0] if isinstance(value, Opaque) else value))


def open_deepspeed(path: Path, folder: Path, key: str | None = None) -> Checkpoint:
    """One ZeRO save as a checkpoint: FP32 masters by default; `key="module"` takes the model states' 16-bit module."""
    model_files = sorted(folder.glob(MODEL_STATES), key=natural_key)
    optim_files = sorted(folder.glob(OPTIM_STATES), key=natural_key)
    states = PickleFile(model_files[0])
    top = as_dict(states.obj) or {}
    if "param_shapes" not in top or "module" not in top:
        raise InputError(model_files[0], "not DeepSpeed model states: no param_shapes and module entries")
    notes = [f"DeepSpeed save {folder.name}"]
    module = as_dict(top["module"]) or {}
    if key == "module":
        tensors = {n: states.source(ref, n) for n, ref in module.items() if isinstance(ref, TensorRef)}
        if any(src.numel == 0 for src in tensors.values()):
            raise UnsupportedError(
                model_files[0],
                (
                    "ZeRO-3 keeps no weights in its model states (its parameters are empty there); drop "
                    f"{option('key', 'module')} to read the FP32 masters"
                ),
            )
        notes.append(f"the 16-bit module weights of the model states ({option('key', 'module')})")
        ckpt = Checkpoint(
            path=path,
            format="deepspeed (module)",
            tensors=tensors,
            files=[model_files[0]],
            notes=notes,
            weights_from=f"'module' of the model states ({option('key', 'module')})",
        )
        return _with_step(ckpt, top, folder)
    if key is not None:
        raise InputError(path, f"{option('key', key)}: a DeepSpeed save holds the FP32 masters (default) or 'module'")
    if not optim_files:
        raise InputError(
            folder,
            (
                "has no *optim_states.pt, which hold the FP32 master weights; pass "
                f"{option('key', 'module')} for the 16-bit weights of the model states"
            ),
        )
    pickles = [PickleFile(f) for f in optim_files]
    optims = [as_dict(as_dict(p.obj).get("optimizer_state_dict") if as_dict(p.obj) else None) or {} for p in pickles]
    stage = _stage(optims[0].get("zero_stage"), optim_files[0])
    counts = optims[0].get("partition_count")
    world = max(counts) if isinstance(counts, list) else counts
    if not isinstance(world, int) or world < 1:
        raise InputError(optim_files[0], "no partition_count in the optimizer state")
    if len(optim_files) != world:
        raise InputError(
            folder,
            (
                f"has {len(optim_files)} optimizer state file(s), but partition_count says {world}: a partial save, or files of "
                "two saves mixed"
            ),
        )
    groups = [as_dict(g) or {} for g in top["param_shapes"]]
    tensors: dict[str, TensorSource] = {}
    if stage in (1, 2):
        for g, shapes in enumerate(groups):
            parts = [_flat(p, o["single_partition_of_fp32_groups"][g], f"fp32 partition {g}") for p, o in zip(pickles, optims)]
            offset = 0
            for name, shape in shapes.items():
                shape = _shape(shape)
                numel = math.prod(shape)
                tensors[name] = _source(_extents(parts, offset, numel), shape, f"{name} lies beyond the FP32 partitions", folder)
                offset += numel
    elif stage == 3:
        flats = [[_flat(p, t, "fp32 flat group") for t in o["fp32_flat_groups"]] for p, o in zip(pickles, optims)]
        offset = 0
        for shapes in groups:
            for name, shape in shapes.items():
                shape = _shape(shape)
                numel = math.prod(shape)
                share = math.ceil(numel / world)
                extents = [e for rank in flats for e in _extents(rank, offset, share)]
                tensors[name] = _source(_truncate(extents, numel * 4), shape, f"{name} lies beyond the FP32 partitions", folder)
                offset += share
    else:
        raise UnsupportedError(optim_files[0], f"ZeRO stage {stage}: ckptavg reads stages 1, 2 and 3")
    _add_frozen(tensors, states, stage, model_files)
    for name in top.get("buffer_names") or []:
        if isinstance(module.get(name), TensorRef):
            tensors[name] = states.source(module[name], name)  # buffers keep their own dtype (zero_to_fp32 makes them float)
    for alias, original in (as_dict(top.get("shared_params")) or {}).items():
        if original in tensors:
            tensors[alias] = tensors[original]
    notes.append(f"ZeRO-{stage}, {world} rank(s): the FP32 master weights, read from the optimizer partitions")
    ckpt = Checkpoint(
        path=path,
        format=f"deepspeed zero-{stage}",
        tensors=tensors,
        files=model_files + optim_files,
        notes=notes,
        weights_from="FP32 masters of the ZeRO optimizer partitions",
    )
    return _with_step(ckpt, top, folder)


def _truncate(extents: list[tuple[Path, int, int]], nbytes: int) -> list[tuple[Path, int, int]]:
    """The first `nbytes` of the concatenated extents (ZeRO-3 pads each parameter to a multiple of the world)."""
    kept, left = [], nbytes
    for path, offset, length in extents:
        if left <= 0:
            break
        kept.append((path, offset, min(length, left)))
        left -= min(length, left)
    return kept


def _source(extents: list[tuple[Path, int, int]], shape: tuple[int, ...], problem: str, folder: Path) -> TensorSource:
    if sum(length for _, _, length in extents) != math.prod(shape) * 4:
        raise InputError(folder, f"corrupt ZeRO save: {problem}")
    return ExtentSource.of(extents, "float32", shape)


def _add_frozen(tensors: dict[str, TensorSource], states: PickleFile, stage: int, model_files: list[Path]) -> None:
    """Parameters the optimizer did not train: whole in the model states (ZeRO-2), or a fragment per rank (ZeRO-3).
    `states` is the first rank's model states, already open."""
    shapes = as_dict((as_dict(states.obj) or {}).get("frozen_param_shapes")) or {}
    if not shapes:
        return
    per_rank = [states, *(PickleFile(f) for f in model_files[1:])] if stage == 3 else [states]
    fragments = [as_dict(as_dict(p.obj).get("frozen_param_fragments")) or {} for p in per_rank]
    for name, shape in shapes.items():
        shape = _shape(shape)
        parts = [p.source(f[name], name) for p, f in zip(per_rank, fragments) if isinstance(f.get(name), TensorRef)]
        if not parts:
            raise InputError(model_files[0], f"frozen parameter {name} has no fragment in the model states")
        extents = _truncate(_extents(parts, 0, sum(src.numel for src in parts)), math.prod(shape) * parts[0].itemsize)
        tensors[name] = ExtentSource.of(extents, parts[0].dtype_name, shape)


def _with_step(ckpt: Checkpoint, top: dict, folder: Path) -> Checkpoint:
    steps = top.get("global_steps")
    if isinstance(steps, int) and not isinstance(steps, bool):
        ckpt.step, ckpt.step_source = steps, "global_steps"
    elif match := re.search(r"(\d+)$", folder.name):
        ckpt.step, ckpt.step_source = int(match.group(1)), "tag"
    return ckpt
