"""Open one input, whatever its layout, as a `Checkpoint`: tensor sources plus step, epoch and notes.

Nothing here reads tensor data; headers, zip directories and pickle structure only.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptavg.discover import (
    RECIPE_FILE,
    StepInfo,
    merge_steps,
    recipe_from_text,
    recipe_in_zip,
    steps_from_entries,
    steps_from_path,
    steps_from_recipe,
)
from ckptavg.errors import InputError, UnsupportedError, UsageError, option
from ckptavg.formats.base import Checkpoint, TensorSource
from ckptavg.formats.dcp import dcp_folder, open_dcp
from ckptavg.formats.dcp_hf import dcp_hf_folder, open_dcp_hf, refuse_lone_shard
from ckptavg.formats.deepspeed import open_deepspeed
from ckptavg.formats.deepspeed import save_folder as deepspeed_save
from ckptavg.formats.detect import CHECKPOINT_FOLDER, refuse_unsupported_folder, sniff, weight_files_in
from ckptavg.formats.peft import WEIGHT_FILES, adapter_weights_file, read_adapter_config
from ckptavg.formats.quantized import dequantized, read_config
from ckptavg.formats.safetensors_io import read_safetensors
from ckptavg.formats.torch_io import PickleFile, as_dict, check_no_quantized, is_tensor_dict
from ckptavg.formats.unpickle import Opaque, TensorRef

WEIGHT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "params", "weights")
EMA_KEYS = (
    "state_dict_ema",
    "model_ema",
    "ema",
    "ema_state_dict",
    "model_ema_state_dict",
    "ema_model",
    "ema_weights",
    "averaged_model",
)


@dataclass(frozen=True)
class LoadOptions:
    """How to find the weights inside an input.

    Attributes:
        key: top-level entry (or `a/b` path) of a pickle that holds the state dict.
        use_ema: take the EMA weights the checkpoint carries instead of the raw ones.
        strip_prefixes: name prefixes to remove, each at most once, in the order given.
        dequantize: read quantized weights as their values (codes x scales), the scales not as tensors of their own.
    """

    key: str | None = None
    use_ema: bool = False
    strip_prefixes: tuple[str, ...] = ()
    dequantize: bool = True  # False: FP8/MXFP4 codes and scales as stored (reading an output back byte for byte)


def missing_input(path: Path) -> InputError:
    """The error "No such file or folder", with the Hub's spelling when the name looks like a mistyped Hub input."""
    hint = "; a Hub input is written hf://ORG/REPO[@REVISION][/FOLDER]" if str(path)[:3].lower() == "hf:" else ""
    return InputError(path, f"no such file or folder{hint}")


def open_checkpoint(path: Path, options: LoadOptions = LoadOptions()) -> Checkpoint:
    """Describe one input (file or folder) without reading tensor data.

    Raises:
        InputError: missing, unreadable, corrupt, or no weights found.
        UnsupportedError: a layout ckptavg recognises but does not merge.
    """
    path = Path(path)
    try:
        return _open(path, options)
    except OSError as e:
        where = e.filename if isinstance(e.filename, str) else path
        raise InputError(where, f"cannot read: {e.strerror or e}") from e


def real_path(path: Path) -> Path:
    """The path with every symlink followed; unlike Path.resolve it does not raise on a symlink loop."""
    return Path(os.path.realpath(path))


def check_readable(path: Path, folder_ok: bool = True) -> None:
    """A regular file (or folder, if `folder_ok`) that exists, else an error that says what it is instead."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputError(path, "symlink loop: the link points back to itself") from e
        if path.is_symlink():
            raise InputError(path, f"broken symlink to {os.readlink(path)}") from e
        if e.errno == errno.ENOENT:
            raise missing_input(path) from e
        raise InputError(path, f"cannot read: {e.strerror or e}") from e
    if stat.S_ISDIR(mode) and not folder_ok:
        raise InputError(path, "not a regular file: it is a folder")
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise InputError(path, "not a regular file or folder (a FIFO, socket or device)")


def _open(path: Path, options: LoadOptions) -> Checkpoint:
    check_readable(path)
    folder = None
    # an adapter: a folder with adapter_config.json, or its adapter_model.* file given alone
    adapter = read_adapter_config(path if path.is_dir() else path.parent) if path.is_dir() or path.name in WEIGHT_FILES else None
    if path.is_dir() and adapter is None and (dcp := dcp_folder(path)) is not None:
        return _finish(path, open_dcp(path, dcp, options.key), path if dcp != path else None, options)
    if path.is_dir() and adapter is None and (shards := dcp_hf_folder(path)) is not None:
        return _finish(path, open_dcp_hf(path, shards, options.key, options.use_ema), path, options)
    if path.is_file():
        refuse_lone_shard(path)
    if path.is_dir() and adapter is None and (save := deepspeed_save(path)) is not None:
        ckpt = open_deepspeed(path, save, options.key)
        return _finish(path, ckpt, None if save == path else path, options)
    if path.is_dir():
        folder = path
        weights_file = adapter_weights_file(path) if adapter else _weights_file_of_folder(path)
    else:
        weights_file = path
        if (path.parent / "config.json").is_file():
            folder = path.parent
    if weights_file.name.endswith(".index.json"):
        ckpt = _open_index(path, weights_file, options)
    else:
        ckpt = _open_file(path, weights_file, options)
    if adapter is not None:
        ckpt.adapter = adapter
        ckpt.format = f"peft-{adapter.kind.lower()} adapter ({ckpt.format})"
    return _finish(path, ckpt, folder, options)


def _finish(path: Path, ckpt: Checkpoint, folder: Path | None, options: LoadOptions) -> Checkpoint:
    """What every layout gets once its tensors are known: its model folder, names checked and stripped, its step."""
    ckpt.folder = folder
    if not ckpt.tensors:
        raise InputError(path, "no tensors found")
    if options.dequantize:
        ckpt.tensors, ckpt.quantization = dequantized(
            path, ckpt.tensors, read_config(folder or (path if path.is_dir() else path.parent))
        )
    if ckpt.quantization is not None:
        ckpt.format = f"{ckpt.format}, {ckpt.quantization.scheme}"
        ckpt.notes.append(ckpt.quantization.describe())
    ckpt.tensors, removed = _strip_prefixes(path, ckpt.tensors, options.strip_prefixes)
    ckpt.tensors, compiled = _strip_compiled(path, ckpt.tensors)
    unmatched = [p for p in options.strip_prefixes if not removed.get(p)]
    if unmatched:
        ckpt.notes.append(f"{option('strip_prefixes', ', '.join(unmatched))} matched no tensor name")
    done = [f"{p} removed" for p in options.strip_prefixes if removed.get(p)] + (
        [f"_orig_mod. removed (torch.compile) from {compiled} names"] if compiled else []
    )
    ckpt.weights_from = "; ".join(part for part in [ckpt.weights_from, *done] if part)
    _read_step(ckpt)
    return ckpt


def _weights_file_of_folder(folder: Path) -> Path:
    refuse_unsupported_folder(folder)
    candidates = weight_files_in(folder)
    if not candidates:
        runs = sorted(p.name for p in folder.iterdir() if p.is_dir() and CHECKPOINT_FOLDER.fullmatch(p.name))
        if runs:
            raise InputError(
                folder,
                (
                    f"holds checkpoint folders ({', '.join(runs[:3])}, ...), not weights; pass them instead, e.g. "
                    f"{folder}/{runs[0].split('-')[0]}-*"
                ),
            )
        raise InputError(
            folder,
            "no weights found (looked for *.safetensors, model.safetensors.index.json, pytorch_model.bin, *.pt, *.pth, *.ckpt)",
        )
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates[:4])
        raise InputError(folder, f"several weight files ({names}); name the one to use")
    check_readable(candidates[0])
    return candidates[0]


def _open_file(path: Path, weights_file: Path, options: LoadOptions) -> Checkpoint:
    kind = sniff(weights_file)
    notes = []
    if kind == "safetensors":
        if options.key or options.use_ema:
            raise UsageError(
                path,
                f"{option('key')} and {option('use_ema', True)} apply to PyTorch pickles; a safetensors file holds one flat "
                "set of tensors",
            )
        tensors, metadata = read_safetensors(weights_file)
        ckpt = Checkpoint(path=path, format="safetensors", tensors=tensors, files=[weights_file])
        # a .safetensors file ckptavg wrote: its recipe in the metadata
        found = steps_from_recipe(recipe_from_text(metadata.get("ckptavg")), "ckptavg metadata")
        ckpt.step, ckpt.epoch, ckpt.step_source = found.step, found.epoch, found.source
        return ckpt
    if weights_file.suffix == ".safetensors":
        notes.append(f"{weights_file.name} is a PyTorch pickle despite its name (recognised by its bytes)")
    pickle_file = PickleFile(weights_file)
    if pickle_file.legacy:
        notes.append("legacy (pre-zip) PyTorch format: read with seeks instead of the zip index")
    refs, where, meta = _locate_weights(pickle_file, options)
    skipped = sorted(name for name, value in refs.items() if not isinstance(value, TensorRef))
    tensors = {name: pickle_file.source(ref, name) for name, ref in refs.items() if isinstance(ref, TensorRef)}
    _check_deepspeed(path, meta, tensors, notes)
    if skipped:
        notes.append(f"skipped {len(skipped)} non-tensor entries ({', '.join(skipped[:3])})")
    ckpt = Checkpoint(
        weights_from=_weights_reason(where, options, as_dict(pickle_file.obj) or {}),
        path=path,
        format="torch-legacy" if pickle_file.legacy else "torch",
        tensors=tensors,
        files=[weights_file],
        notes=notes,
        top_level_keys=list(meta),
        skipped=skipped,
        weights_key=where,
        pickle=pickle_file,
        weight_refs=[(ref, tensors[name]) for name, ref in refs.items() if isinstance(ref, TensorRef)],
    )
    recipe = None if pickle_file.legacy else recipe_in_zip(weights_file)  # a .pt file ckptavg wrote
    found = merge_steps(steps_from_entries(meta), steps_from_recipe(recipe, f"{RECIPE_FILE} record"))
    ckpt.step, ckpt.epoch, ckpt.step_source = found.step, found.epoch, found.source
    return ckpt


def _check_deepspeed(path: Path, top: dict, tensors: dict[str, TensorSource], notes: list[str]) -> None:
    """A DeepSpeed `*model_states.pt`, known by its entries: ZeRO-3 keeps no weights in it (every parameter
    has zero elements; they live in the optimizer partitions), ZeRO-1/2 keep the 16-bit module weights."""
    deepspeed = "ds_version" in top or ("param_shapes" in top and "buffer_names" in top)
    if not deepspeed:
        return
    if any(src.numel == 0 for src in tensors.values()):  # ZeRO-3 leaves every parameter empty here (buffers stay whole)
        raise UnsupportedError(
            path,
            (
                "DeepSpeed ZeRO-3 model states: its parameters have zero elements here, the weights are partitioned across the "
                "*_optim_states.pt files; pass its folder (global_stepN/, or the run folder) instead: ckptavg reads the FP32 "
                "masters from the optimizer partitions"
            ),
        )
    notes.append(
        "DeepSpeed model states: the 16-bit module weights (the FP32 masters are in the optimizer states; zero_to_fp32.py "
        "extracts them)"
    )


def _lightning_averaging(top: dict) -> str | None:
    """The callback name when Lightning's WeightAveraging (EMAWeightAveraging) saved the checkpoint: its
    `state_dict` then holds the averaged weights, and `current_model_state` the live ones."""
    if "current_model_state" not in top or "state_dict" not in top:
        return None
    callbacks = as_dict(top.get("callbacks")) or {}
    names = [str(k) for k in callbacks if "Averaging" in str(k)]
    return names[0] if names else ("WeightAveraging" if "averaging_state" in top else None)


def _weights_reason(where: str | None, options: LoadOptions, top: dict) -> str:
    if where is None:
        return "the top-level tensors"
    if options.key:
        return f"{where!r} ({option('key')})"
    averaging = _lightning_averaging(top)
    if averaging and where == "state_dict":
        ema = f" ({option('use_ema', True)})" if options.use_ema else ""
        return (
            f"EMA weights 'state_dict'{ema}: Lightning's {averaging} saves its average there; the live weights are "
            f"'current_model_state' ({option('key', 'current_model_state')})"
        )
    if options.use_ema:
        return f"EMA weights {where!r} ({option('use_ema', True)})"
    return f"{where!r}"


def _locate_weights(pickle_file: PickleFile, options: LoadOptions) -> tuple[dict, str | None, dict]:
    """(name -> TensorRef or other value, where they were found, the top-level dict)."""
    path, obj = pickle_file.path, pickle_file.obj
    top = as_dict(obj)
    if top is None:
        raise InputError(path, f"holds a {type(obj).__name__}, not a dict of tensors")
    if options.key:
        found = _at_key(top, options.key)
        if found is None:
            raise InputError(path, f"has no entry {options.key!r}; top-level keys: {_key_list(top)}")
        if not is_tensor_dict(found):
            raise InputError(path, f"entry {options.key!r} holds no tensors")
        check_no_quantized(path, found)
        return found, options.key, top
    if options.use_ema:
        if _lightning_averaging(top):
            return as_dict(top["state_dict"]), "state_dict", top
        for key, value in _ema_candidates(top):
            check_no_quantized(path, value)
            return _unwrap_averaged_model(value), key, top
        raise InputError(
            path,
            f"carries no EMA weights (looked for {', '.join(EMA_KEYS)}); drop {option('use_ema', True)} or name the entry with "
            f"{option('key')}",
        )
    for key in WEIGHT_KEYS:
        value = as_dict(top.get(key))
        if value is not None and is_tensor_dict(value):
            check_no_quantized(path, value)
            return value, key, top
    if is_tensor_dict(top):
        check_no_quantized(path, top)
        return top, None, {}
    for key in WEIGHT_KEYS:
        if isinstance(top.get(key), Opaque):
            raise InputError(
                path, f"entry {key!r} is a pickled {top[key]._global} object, not a state dict; save model.state_dict() instead"
            )
    raise InputError(
        path, f"no weights found: no state dict among the top-level keys {_key_list(top)}; choose one with {option('key')}"
    )


def _at_key(top: dict, key: str) -> Any:
    if key in top:
        return as_dict(top[key])
    node: Any = top
    for part in key.replace("/", ".").split("."):
        node = as_dict(node)
        if node is None or part not in node:
            return None
        node = node[part]
    return as_dict(node)


def _ema_candidates(top: dict):
    for key in EMA_KEYS:
        value = as_dict(top.get(key))
        if value is not None and is_tensor_dict(value):
            yield key, value
    callbacks = as_dict(top.get("callbacks")) or {}
    for name, state in callbacks.items():
        state = as_dict(state) or {}
        for key in EMA_KEYS:
            value = as_dict(state.get(key))
            if value is not None and is_tensor_dict(value):
                yield f"callbacks/{name}/{key}", value


def _unwrap_averaged_model(weights: dict) -> dict:
    """torch.optim.swa_utils.AveragedModel saves `module.`-prefixed weights plus an `n_averaged` counter."""
    names = [n for n in weights if n != "n_averaged"]
    if "n_averaged" in weights and names and all(n.startswith("module.") for n in names):
        return {n.removeprefix("module."): weights[n] for n in names}
    return weights


def _key_list(top: dict) -> str:
    keys = [str(k) for k in top][:8]
    return "[" + ", ".join(keys) + (", ...]" if len(top) > 8 else "]")


def _open_index(path: Path, index_file: Path, options: LoadOptions) -> Checkpoint:
    try:
        index = json.loads(index_file.read_text())
        weight_map = index["weight_map"]
        assert isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        raise InputError(index_file, "corrupt index: expected JSON with a weight_map of tensor name -> shard file") from e
    folder = real_path(index_file.parent)
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    tensors: dict[str, TensorSource] = {}
    files, notes, formats = [], [], set()
    for shard, names in by_shard.items():
        shard_path = real_path(folder / shard)
        if shard_path.parent != folder and not _hf_cache_blob(folder, shard, shard_path):
            link = (folder / shard).is_symlink() and real_path((folder / shard).parent) == folder
            raise InputError(
                index_file, f"shard {shard!r} is {'a symlink that leads ' if link else ''}outside the checkpoint folder"
            )
        if not (folder / shard).exists() and not (folder / shard).is_symlink():
            raise InputError(index_file, f"shard {shard} is missing")
        check_readable(folder / shard, folder_ok=False)
        part = _open_file(shard_path, shard_path, options)
        formats.add(part.format)
        notes.extend(n for n in part.notes if n not in notes)
        files.append(shard_path)
        for name in names:
            if name not in part.tensors:
                raise InputError(shard_path, f"index lists tensor {name!r} but the shard does not hold it")
            tensors[name] = part.tensors[name]
    kind = "safetensors" if formats == {"safetensors"} else "torch"
    return Checkpoint(path=path, format=f"{kind}-sharded", tensors=tensors, files=files, notes=notes)


def _hf_cache_blob(folder: Path, shard: str, target: Path) -> bool:
    """A shard of a Hugging Face cache snapshot (`models--ORG--NAME/snapshots/<commit>/`): a symlink to the same
    repo's `blobs/`, where huggingface_hub keeps every file's bytes. The shard's name must still be a plain name."""
    repo = target.parent.parent
    return (
        Path(shard).name == shard
        and target.parent.name == "blobs"
        and repo.name.startswith("models--")
        and (repo / "snapshots") in folder.parents
    )


def _strip_prefixes(
    path: Path, tensors: dict[str, TensorSource], prefixes: tuple[str, ...]
) -> tuple[dict[str, TensorSource], dict[str, int]]:
    """The tensors renamed without `prefixes` (each removed at most once, in order), and how many names lost each."""
    removed = {p: 0 for p in prefixes}
    if not prefixes:
        return tensors, removed
    renamed: dict[str, TensorSource] = {}
    for name, src in tensors.items():
        new = name
        for prefix in prefixes:
            if new.startswith(prefix):
                new = new.removeprefix(prefix)
                removed[prefix] += 1
        if new in renamed:
            raise InputError(path, f"stripping {', '.join(prefixes)} makes two tensors named {new!r}")
        renamed[new] = src
    return renamed, removed


COMPILED = re.compile(r"(^|\.)_orig_mod\.")


def _strip_compiled(path: Path, tensors: dict[str, TensorSource]) -> tuple[dict[str, TensorSource], int]:
    """torch.compile's wrapper adds `_orig_mod.` to the names of the module it wraps; it is never part of a
    model's own names, so it is removed wherever it appears."""
    count = sum(1 for name in tensors if COMPILED.search(name))
    if not count:
        return tensors, 0
    renamed: dict[str, TensorSource] = {}
    for name, src in tensors.items():
        new = COMPILED.sub(r"\1", name)
        if new in renamed:
            raise InputError(path, f"removing torch.compile's _orig_mod. makes two tensors named {new!r}")
        renamed[new] = src
    return renamed, count


def _read_step(ckpt: Checkpoint) -> None:
    """Step and epoch: a folder's recipe (ckptavg.json, when ckptavg wrote it), name and trainer_state.json, then
    the checkpoint's entries (or a ckptavg file's recipe), then a file's name and its folder's."""
    entries = StepInfo(ckpt.step, ckpt.epoch, ckpt.step_source)
    found = [steps_from_path(ckpt.path), entries] if ckpt.path.is_dir() else [entries, steps_from_path(ckpt.path)]
    merged = merge_steps(*found)
    ckpt.step, ckpt.epoch, ckpt.step_source = merged.step, merged.epoch, merged.source
