"""out_format="same" for PyTorch pickles: the merge written back in the newest input's own layout.

fairseq's `.pt`, Lightning's `.ckpt`, timm's `.pth.tar`, a plain `{'model_state_dict': ...}`: the output is the
newest input's pickle rewritten from the restricted unpickler's inert view of it (formats/unpickle.py). Every entry
is kept as it was, types included; the foreign classes it names (omegaconf's DictConfig, argparse's Namespace,
numpy's arrays) are written back as the same globals, from the names the placeholders recorded, and are never
imported or called. The weights the reader located are replaced by the merged tensors, in the input's own names
and place (a `model.` prefix, torch.compile's `_orig_mod.`); every other tensor is copied byte for byte from the
input. training_state="drop" leaves out the optimizer, scheduler, scaler and RNG entries (detect.TRAINING_STATE_KEYS);
"newest" keeps the newest input's as they are, so that training resumes from the merge.

The file is written as torch.save writes it (torch_writer.TorchWriter's zip layout), record by record: memory is
one chunk plus the pickle's structure, and torch.load reads it, with mmap too.
"""

from __future__ import annotations

import collections
import io
import json
import os
from pathlib import Path
from typing import Any

from ckptavg.errors import InputError, UnsupportedError, UsageError, option
from ckptavg.formats.base import FILES, Checkpoint
from ckptavg.formats.dcp_same import check_dcp_same, is_dcp_save
from ckptavg.formats.detect import TRAINING_STATE_KEYS
from ckptavg.formats.inert_pickler import InertPickler
from ckptavg.formats.torch_writer import TorchWriter, check_pt_dtypes
from ckptavg.formats.trainer_same import check_trainer_same, is_trainer_folder
from ckptavg.formats.unpickle import Opaque, StorageRef
from ckptavg.formats.writer import TensorSpec

TRAINING_STATES = ("drop", "newest")
DOUBLE_SUFFIXES = (".pth.tar", ".pt.tar")
RECIPE_ENTRY = "ckptavg"  # the top-level entry that holds the recipe (a single file has no ckptavg.json beside it)
COPY_PIECE = 16 << 20


def suffix_of(name: str) -> str:
    """A checkpoint file's suffix, `.pth.tar` counted as one."""
    return next((s for s in DOUBLE_SUFFIXES if name.endswith(s)), Path(name).suffix)


def _layout(ckpt: Checkpoint) -> str:
    """An input's layout in words, for the message that says it is not written back."""
    if ckpt.adapter is not None:
        return "a PEFT adapter"
    if ckpt.format.startswith("dcp-hf"):
        return "a DCP save of safetensors shards (HuggingFaceStorageWriter)"
    if ckpt.format.startswith("dcp"):
        return "a torch.distributed.checkpoint (DCP) save"
    if ckpt.format.startswith("deepspeed"):
        return "a DeepSpeed save"
    if ckpt.path.is_dir():
        return f"a {ckpt.format} folder (a Trainer checkpoint or model folder)"
    return f"a {ckpt.format} file"


def _weights_place(ckpt: Checkpoint) -> str:
    return f"under {ckpt.weights_key!r}" if ckpt.weights_key else "at the top level"


def _protected(weights_key: str | None) -> set[str]:
    """The top-level entries that hold the weights, never left out as training state."""
    if not weights_key:
        return set()
    return {weights_key, weights_key.replace("/", ".").split(".")[0]}


def training_entries(ckpt: Checkpoint) -> list[str]:
    """The newest input's top-level entries that are training state (optimizer, scheduler, scaler, RNG)."""
    known = {key for keys in TRAINING_STATE_KEYS.values() for key in keys}
    top = ckpt.pickle.obj if ckpt.pickle is not None else {}
    return [k for k in top if isinstance(k, str) and k in known and k not in _protected(ckpt.weights_key)]


def check_same_layout(inputs: list[Checkpoint], out: Path, specs: list[TensorSpec], training_state: str) -> list[str]:
    """Refuse, before anything is written, what cannot be written back in the inputs' layout: a layout not written
    back yet, inputs of different layouts, an output not named with the newest input's suffix. Returns the notes
    for the report: where the weights go, and the training state left out or kept."""
    if is_trainer_folder(inputs[-1]):
        return check_trainer_same(inputs, out, specs, training_state)
    newest = inputs[-1]
    if is_dcp_save(newest):
        return check_dcp_same(inputs, out, specs, training_state)
    if newest.format.startswith("deepspeed"):
        from ckptavg.formats.deepspeed_same import check_deepspeed_same  # it builds on this module

        return check_deepspeed_same(inputs, out, specs, training_state)
    for ckpt in [newest, *inputs[:-1]]:
        if ckpt.pickle is None or ckpt.adapter is not None:
            if ckpt is newest:
                raise UnsupportedError(
                    ckpt.path,
                    f"{option('out_format', 'same')}: {_layout(ckpt)} is not written back in its own layout yet (PyTorch pickles "
                    "are: .pt, .ckpt, .pth.tar); leave out the format to write a safetensors model",
                )
            raise UsageError(
                ckpt.path,
                f"{option('out_format', 'same')} needs inputs of one layout: this is {_layout(ckpt)}, the newest input "
                f"{newest.path} a PyTorch pickle",
            )
        if ckpt.weights_key != newest.weights_key:
            raise UsageError(
                ckpt.path,
                f"{option('out_format', 'same')} needs inputs of one layout: its weights are {_weights_place(ckpt)}, those of "
                f"the newest input {newest.path} {_weights_place(newest)}",
            )
    if newest.quantization is not None:
        raise UnsupportedError(
            newest.path,
            f"{option('out_format', 'same')}: {newest.quantization.scheme} weights are not written back quantized yet",
        )
    if not isinstance(newest.pickle.obj, dict):
        raise UnsupportedError(
            newest.path,
            f"{option('out_format', 'same')}: its top level is a pickled {_type_name(newest.pickle.obj)}, not a dict; not "
            "written back yet",
        )
    if problem := check_pt_dtypes(specs):
        raise UsageError(None, f"{option('out_format', 'same')} writes a PyTorch pickle, which cannot hold {problem}")
    suffix = suffix_of(newest.files[0].name)
    if not out.name.endswith(suffix) or out.name == suffix:
        raise UsageError(
            None,
            f"{option('out', out.name)}: {option('out_format', 'same')} writes one file in the layout of the newest input, "
            f"{newest.files[0].name}: name it *{suffix}",
        )
    entries = training_entries(newest)
    notes = [
        f"written in the layout of {newest.files[0].name}: its entries kept, the weights {_weights_place(newest)} replaced by "
        f"the merged ones, the recipe in its {RECIPE_ENTRY!r} entry"
    ]
    if entries and training_state == "drop":
        notes.append(f"training state left out ({option('training_state', 'drop')}): {', '.join(entries)}")
    elif entries:
        notes.append(f"training state of the newest input kept ({option('training_state', 'newest')}): {', '.join(entries)}")
    return notes


def _type_name(obj: Any) -> str:
    return obj._global if isinstance(obj, Opaque) else type(obj).__name__


def recipe_entry(recipe: dict, training_state: str) -> dict:
    """The small recipe kept in the output's `ckptavg` entry: what was merged, with which weights."""
    keep = ("tool", "version", "created", "strategy")
    inputs = [{k: i.get(k) for k in ("path", "step", "epoch", "weight")} for i in recipe.get("inputs", [])]
    return {k: recipe[k] for k in keep if k in recipe} | {"training_state": training_state, "inputs": inputs}


class SameLayoutWriter(TorchWriter):
    """A TorchWriter whose pickle is the newest input's structure with the merged tensors in place of its weights.

    The engine writes the merged tensors as usual (one record each, tied ones shared); `finish` copies the other
    tensors' storages from the input and writes the rewritten pickle."""

    def __init__(
        self,
        path: Path,
        specs: list[TensorSpec],
        newest: Checkpoint,
        training_state: str,
        recipe: dict,
        durable: bool = True,
    ) -> None:
        super().__init__(path, specs, durable=durable, recipe=json.dumps(recipe))
        self.newest = newest
        self.training_state = training_state
        self.entry = recipe_entry(recipe, training_state)
        final_name = {id(src): name for name, src in newest.tensors.items()}
        self._names: dict[int, list[str]] = {}  # each weight TensorRef of the pickle: its names (two for one tensor saved twice)
        for ref, src in newest.weight_refs:
            self._names.setdefault(id(ref), []).append(final_name[id(src)])
        missing = {spec.name for spec in specs} - {name for names in self._names.values() for name in names}
        if missing:
            raise AssertionError(f"no place in {newest.path} for {sorted(missing)[:3]}")

    def _data_pkl(self) -> bytes:
        pickle_file = self.newest.pickle
        dropped = set(training_entries(self.newest)) if self.training_state == "drop" else set()
        source = pickle_file.obj
        top = type(source)() if type(source) in (dict, collections.OrderedDict) else {}
        for key, value in source.items():
            if key not in dropped:
                top[key] = value
        top[RECIPE_ENTRY] = self.entry
        weights = {}
        for ref_id, names in self._names.items():
            if len({id(self._storages[name]) for name in names}) > 1:
                raise UnsupportedError(
                    self.newest.path,
                    f"saves {names[0]} and {names[1]} as one tensor, which the older inputs do not: their means differ; not "
                    "written back in this layout",
                )
            weights[ref_id] = self._storages[names[0]]
        buffer = io.BytesIO()
        pickler = InertPickler(buffer, self.newest.path, weights, len(self._storages))
        pickler.dump(top)
        for key, ref in pickler.copied:
            self._copy_storage(key, ref)
        return buffer.getvalue()

    def _copy_storage(self, key: str, ref: StorageRef) -> None:
        """The bytes of a storage of the input that is not a weight, as a record of the output, piece by piece."""
        pickle_file, path = self.newest.pickle, self.newest.files[0]
        if ref.key not in pickle_file.storage_offsets:
            raise InputError(path, f"storage {ref.key} is missing from the file")
        offset, size = pickle_file.storage_offsets[ref.key], pickle_file.storage_sizes[ref.key]
        if size < ref.nbytes:
            raise InputError(path, f"truncated: storage {ref.key} holds {size} bytes, its tensors need {ref.nbytes}")
        fd = FILES.fd(path)
        with self._zip.open(self._aligned_info(f"data/{key}"), "w", force_zip64=True) as stream:
            done = 0
            while done < size:
                piece = os.pread(fd, min(COPY_PIECE, size - done), offset + done)
                if not piece:
                    raise InputError(path, f"truncated: storage {ref.key} ends past the end of the file")
                stream.write(piece)
                done += len(piece)
        self.bytes_written += size
