"""The output: staged under a temporary name in the destination's folder, renamed into place when complete.

While a run writes OUT it holds a lock (`.OUT.ckptavg-lock`, flock) in the same folder, so a second run
to the same OUT fails at once instead of racing it, and what a killed run left behind
(`.OUT.ckptavg-partial`, `.OUT.ckptavg-old`) is known to be stale and removed by the next run.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ckptavg.checkpoint import real_path
from ckptavg.errors import CkptavgError, OutputError, UsageError, option
from ckptavg.formats.base import dtype_name
from ckptavg.formats.detect import is_training_file
from ckptavg.formats.writer import TensorSpec
from ckptavg.signals import committing
from ckptavg.sizes import human_bytes

MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "image_processor_config.json",
    "feature_extractor_config.json",
)
MODEL_FILE_PATTERNS = ("configuration_*.py", "modeling_*.py", "tokenization_*.py", "processing_*.py", "*.tiktoken")
SPACE_MARGIN = 64 << 20


def tmp_name(out: Path) -> Path:
    return out.parent / f".{out.name}.ckptavg-partial"


def old_name(out: Path) -> Path:
    return out.parent / f".{out.name}.ckptavg-old"


def lock_name(out: Path) -> Path:
    return out.parent / f".{out.name}.ckptavg-lock"


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold the lock of `out` for the block; another run holding it is an error naming its pid.

    The lock file is removed on release. A run that finds the file but gets the lock owns it only if the
    file is still the one it locked (the holder before it may have just removed it), else it tries again.
    """
    path = lock_name(out)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(out, f"cannot write in {path.parent}: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputError(
                out, f"another ckptavg run (pid {holder}) is writing it; wait for it to finish or choose another output"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.unlink(path)
        os.close(fd)


def remove_leftovers(out: Path) -> list[str]:
    """Remove what a killed run to `out` left (call it holding the lock: then no live run owns them)."""
    removed = []
    for path in (tmp_name(out), old_name(out)):
        if path.exists() or path.is_symlink():
            _remove(path)
            removed.append(path.name)
    return removed


def model_files(folder: Path) -> list[Path]:
    """Files a user needs beside the weights to load the model: config, tokenizer, chat template, custom code."""
    found = [folder / name for name in MODEL_FILES if (folder / name).is_file()]
    for pattern in MODEL_FILE_PATTERNS:
        found.extend(p for p in sorted(folder.glob(pattern)) if p.is_file() and p not in found)
    return found


RECIPE_FILE = "ckptavg.json"
SWEEP_FILE = "sweep.json"  # what `sweep` wrote in its folder: one folder per candidate, and this record


def check_output_name(out: Path) -> None:
    """`-o .`, `-o ..`, `-o /`, `-o ~`: a folder the user lives in, never a new output."""
    if (
        out.name in ("", ".", "..")
        or real_path(out) in (Path.cwd(), Path.home(), Path("/"))
        or real_path(out) in Path.cwd().parents
    ):
        raise UsageError(
            None,
            (
                f"{option('out', out)}: that is a folder you work in, not a new output; name a new folder or file, e.g. "
                f"{option('out', Path(out) / 'merged')}"
            ),
        )


def written_by_ckptavg(out: Path) -> bool:
    """Whether `out` is what a previous ckptavg run wrote (its recipe says so), and nothing else was added since."""
    if out.is_symlink():
        return False
    if out.is_dir():
        return not foreign_files(out)
    if not out.is_file():
        return False
    try:
        if out.suffix == ".safetensors":
            from ckptavg.formats.safetensors_io import read_header

            _, metadata, _ = read_header(out)
            return "ckptavg" in metadata
        with zipfile.ZipFile(out) as archive:
            return any(name.endswith("/" + RECIPE_FILE) for name in archive.namelist())
    except (CkptavgError, OSError, zipfile.BadZipFile, ValueError):
        return False


def foreign_files(folder: Path) -> list[str]:
    """The entries of a folder that its ckptavg record (ckptavg.json, or a sweep's sweep.json) does not list: all of
    them when it has none."""
    names = sorted(p.name for p in folder.iterdir())
    record = RECIPE_FILE if RECIPE_FILE in names or SWEEP_FILE not in names else SWEEP_FILE
    try:
        recipe = json.loads((folder / record).read_text())
    except (OSError, ValueError):
        return names
    if not isinstance(recipe, dict) or recipe.get("tool") != "ckptavg":
        return names
    listed = recipe.get("written")
    if isinstance(listed, list):
        mine = {str(n) for n in listed} | {record}
    else:  # written by a version that did not list its files: weights, index and model files only
        mine = {n for n in names if n.endswith((".safetensors", ".safetensors.index.json")) or n == "pytorch_model.bin"}
        mine |= {p.name for p in model_files(folder)} | {RECIPE_FILE}
    return [n for n in names if n not in mine]


def describe_foreign(out: Path) -> str:
    """Why --overwrite will not replace `out`, and what to do."""
    advice = f"{option('overwrite', True)} replaces only an output ckptavg wrote; move it away yourself or choose another output"
    if out.is_symlink():
        return f"is a symlink to {os.readlink(out)}, not a ckptavg output; {advice}"
    if out.is_dir():
        names = foreign_files(out)
        training = [n for n in names if is_training_file(n)]
        kind = "a training checkpoint" if training else "not a ckptavg output"
        if (out / RECIPE_FILE).is_file() and len(names) < len(list(out.iterdir())):
            kind = "a ckptavg output with files added since"
        shown = (training + [n for n in names if n not in training])[:4]
        return f"is {kind} (it holds {', '.join(shown)}{', ...' if len(names) > 4 else ''}); {advice}"
    return f"is a file ckptavg did not write (no ckptavg recipe in it); {advice}"


def check_destination(out: Path, overwrite: bool) -> None:
    """Refuse before any work: an existing OUT without overwrite or that ckptavg did not write, a folder
    that cannot be written."""
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise OutputError(out, f"already exists; pass {option('overwrite', True)} to replace it")
        if not (out.is_dir() and not out.is_symlink() and not any(out.iterdir())) and not written_by_ckptavg(out):
            raise OutputError(out, describe_foreign(out))
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(out, f"folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(out, f"folder {parent} is not writable")
    try:
        probe, name = tempfile.mkstemp(prefix=f".{out.name}.ckptavg-probe", dir=parent)
        os.close(probe)
        os.unlink(name)
    except OSError as e:
        raise OutputError(out, f"cannot be written in {parent}: {e.strerror or e}") from e


def check_space(out: Path, needed_bytes: int) -> None:
    """Refuse before writing when the output's folder has too little room for `needed_bytes`."""
    parent = out.parent if str(out.parent) else Path(".")
    usage = shutil.disk_usage(parent)
    if usage.total == 0:
        raise OutputError(out, f"cannot be written in {parent}: not a filesystem that holds files")
    if usage.free < needed_bytes + SPACE_MARGIN:
        raise OutputError(
            out, f"not enough free space: the output needs {needed_bytes / 1e9:.2f} GB, {usage.free / 1e9:.2f} GB free"
        )


@contextmanager
def staged(out: Path, overwrite: bool, is_dir: bool, notes: list[str] | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `out`, holding its lock; on success fsync and rename it into place,
    on any error remove it. Leftovers of a killed run are removed first and reported in `notes`."""
    with output_lock(out):
        if (out.exists() or out.is_symlink()) and not overwrite:
            raise OutputError(out, f"already exists (another run just wrote it); pass {option('overwrite', True)} to replace it")
        removed = remove_leftovers(out)
        if removed and notes is not None:
            notes.append(f"removed what an interrupted run left: {', '.join(removed)}")
        tmp = tmp_name(out)
        if is_dir:
            tmp.mkdir()
        try:
            yield tmp
            _fsync_dir(tmp if is_dir else tmp.parent)
            with committing():
                _replace(tmp, out, overwrite)
        except BaseException:
            _remove(tmp)
            raise


def _replace(tmp: Path, out: Path, overwrite: bool) -> None:
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise OutputError(out, "appeared while ckptavg was writing; not replaced")
        if out.is_dir() and not out.is_symlink():
            old = old_name(out)
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    else:
        os.rename(tmp, out)
    _fsync_dir(out.parent)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder if str(folder) else ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_model_files(src: Path, dst: Path, out_dtype: torch.dtype | None, dequantized: bool = False) -> list[str]:
    """Copy config/tokenizer files; config.json's dtype is updated when the output dtype changed, and its
    quantization_config removed when the weights were written dequantized (so the model loads as a plain one)."""
    copied = []
    for path in model_files(src):
        target = dst / path.name
        try:
            if path.name == "config.json" and (out_dtype is not None or dequantized):
                config = json.loads(path.read_text())
                for key in ("torch_dtype", "dtype"):
                    if key in config and out_dtype is not None:
                        config[key] = dtype_name(out_dtype)
                if dequantized:
                    config.pop("quantization_config", None)
                target.write_text(json.dumps(config, indent=2) + "\n")
            else:
                shutil.copyfile(path, target)
            _fsync_file(target)
        except (OSError, ValueError) as e:
            raise OutputError(path, f"cannot copy to the output: {e}") from e
        copied.append(path.name)
    return copied


# What an output is named: a folder, or one file of a format ckptavg writes

DEFAULT_SHARD_SIZE = "5GB"
PT_SUFFIXES = (".pt", ".pth", ".bin", ".pth.tar", ".pt.tar")
# File formats of checkpoints, models and archives that ckptavg does not write: an output named so would
# otherwise become a folder of that name. Any other suffix (`run.v2`, `merged-0.5`) is a folder's name.
NOT_WRITTEN = (
    ".ckpt",
    ".gguf",
    ".ggml",
    ".onnx",
    ".h5",
    ".hdf5",
    ".keras",
    ".msgpack",
    ".npz",
    ".npy",
    ".pkl",
    ".pickle",
    ".joblib",
    ".pb",
    ".tflite",
    ".nemo",
    ".tar",
    ".zip",
    ".gz",
    ".tgz",
    ".xz",
    ".zst",
    ".7z",
    ".json",
    ".yaml",
    ".yml",
)


def _written() -> str:
    """What ckptavg writes, said when it refuses an output name."""
    return (
        f"a folder (safetensors, sharded above {option('max_shard_size')}), one .safetensors file, "
        "or one .pt/.pth/.bin/.pth.tar file (a state dict)"
    )


def refuse_file_suffix(out: Path) -> None:
    """An output named like a file format ckptavg does not write (or like one it writes, in capitals) is refused,
    so that `-o merged.ckpt` or `-o x.gguf` never becomes a folder of that name."""
    name = out.name.lower()
    if name.endswith(".safetensors") or name.endswith(PT_SUFFIXES):
        if not (out.suffix == ".safetensors" or out.name.endswith(PT_SUFFIXES)):
            kept = len(name) - len(next(s for s in (".safetensors", *PT_SUFFIXES) if name.endswith(s)))
            raise UsageError(out, f"write the suffix in lower case ({out.name[:kept]}{name[kept:]}); ckptavg writes {_written()}")
        return
    suffix = out.suffix.lower()
    if suffix == ".ckpt":
        raise UsageError(out, f"a Lightning .ckpt output is not written yet; ckptavg writes {_written()}")
    if suffix in NOT_WRITTEN:
        raise UsageError(out, f"ckptavg does not write {suffix} files; it writes {_written()}")


def output_layout(out: Path, out_format: str) -> tuple[str, bool]:
    """(format, single file?) of an output path: a .safetensors or .pt/.pth/.bin file, else a folder. A name
    with the suffix of a file format ckptavg does not write (.ckpt, .gguf, ...) is refused."""
    if out_format not in ("auto", "safetensors", "pt"):
        raise UsageError(None, f"{option('out_format', repr(out_format))}: expected safetensors or pt")
    refuse_file_suffix(out)
    if out.suffix == ".safetensors":
        if out_format == "pt":
            raise UsageError(None, f"{option('out_format', 'pt')} with an output named {out.name}; name it .pt")
        return "safetensors", True
    if out.name.endswith(PT_SUFFIXES):
        if out_format == "safetensors":
            raise UsageError(None, f"{option('out_format', 'safetensors')} with an output named {out.name}; name it .safetensors")
        return "pt", True
    return ("safetensors" if out_format == "auto" else out_format), False


# How an output is written, and its files


@dataclass(frozen=True)
class WriteOptions:
    """How the output is written: the options of `average` that reach the writer and the engine."""

    overwrite: bool
    shard_bytes: int
    device: torch.device
    dtype: str | None
    out_format: str = "auto"
    memory_budget: int | None = None
    fsync: bool = True
    verify: bool = False


@dataclass
class TensorFiles:
    """The safetensors files of an output: their names, paths in the staging area, tensors and metadata."""

    names: list[str]
    paths: list[Path]
    shards: list[list[TensorSpec]]
    metadata: dict[str, str]


# What a killed run left beside an output, for `inspect` and the errors that name a path

LEFTOVER_KINDS = (("partial", tmp_name), ("old", old_name), ("lock", lock_name))
LEFTOVER_NAME = re.compile(r"\.(?P<out>.+)\.ckptavg-(?P<kind>partial|old|lock)")


@dataclass
class Leftovers:
    """What a ckptavg run to `output` leaves beside it while it writes, or after it was killed (SIGKILL)."""

    output: str
    files: list[dict[str, Any]]  # path, kind (partial, old, lock), bytes
    bytes: int
    live: bool  # a running ckptavg holds the lock of `output`: these are its work in progress
    pid: int | None  # that run's pid, from the lock file
    output_exists: bool
    advice: str


def _tree_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (links not followed)."""
    try:
        if not path.is_dir() or path.is_symlink():
            return path.lstat().st_size
    except OSError:
        return 0
    total = 0
    for root, _dirs, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _lock_holder(lock: Path) -> tuple[bool, int | None]:
    """(whether a live ckptavg run holds this output lock, its pid). Tries a shared flock without waiting:
    a run holds it exclusively while it writes, and a killed run's lock is free. (A run starting in the same
    microseconds would find it taken for that instant and fail as if a run were writing.)"""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False, None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return True, int(text) if text.isdigit() else None
        except OSError:
            return False, None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False, None
    finally:
        os.close(fd)


def leftovers_of(out: Path) -> Leftovers | None:
    """What a ckptavg run to `out` left beside it (`.OUT.ckptavg-partial`, `-old`, `-lock`); None when nothing."""
    files = []
    for kind, name_of in LEFTOVER_KINDS:
        path = name_of(out)
        if path.exists() or path.is_symlink():
            files.append({"path": str(path), "kind": kind, "bytes": _tree_bytes(path)})
    if not files:
        return None
    live, pid = _lock_holder(lock_name(out)) if any(f["kind"] == "lock" for f in files) else (False, None)
    exists = out.exists() or out.is_symlink()
    if live:
        advice = f"a ckptavg run{f' (pid {pid})' if pid else ''} is writing {out.name} now: its work in progress, leave it"
    else:
        advice = (
            f"left by an interrupted ckptavg run (none holds the lock now): the next run to {out.name} removes them, "
            "or delete them by hand"
        )
        if not exists and any(f["kind"] == "old" for f in files):
            advice += f"; {old_name(out).name} is the previous {out.name}, killed while being replaced: rename it back to keep it"
    return Leftovers(str(out), files, sum(f["bytes"] for f in files), live, pid, exists, advice)


def find_leftovers(path: Path) -> list[Leftovers]:
    """Leftovers of a run to `path` itself, and, when `path` is a folder, of runs to anything inside it."""
    found = []
    outputs = [path]
    if path.is_dir():
        try:
            names = sorted(os.listdir(path))
        except OSError:
            names = []
        for name in names:
            match = LEFTOVER_NAME.fullmatch(name)
            if match and path / match["out"] not in outputs:
                outputs.append(path / match["out"])
    for out in outputs:
        item = leftovers_of(out)
        if item is not None:
            found.append(item)
    return found


def leftovers_sentence(leftovers: list[Leftovers]) -> str:
    """The leftovers in one sentence, for an error message."""

    parts = []
    for item in leftovers:
        files = ", ".join(f"{Path(f['path']).name} ({human_bytes(f['bytes'])})" for f in item.files)
        parts.append(f"{files} in {Path(item.output).parent}: {item.advice}")
    return "; ".join(parts)
