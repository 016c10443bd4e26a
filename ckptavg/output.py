"""The output: staged under a temporary name in the destination's folder, renamed into place when complete.

While a run writes OUT it holds a lock (`.OUT.ckptavg-lock`, flock) in the same folder, so a second run
to the same OUT fails at once instead of racing it, and what a killed run left behind
(`.OUT.ckptavg-partial`, `.OUT.ckptavg-old`) is known to be stale and removed by the next run.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ckptavg.errors import OutputError
from ckptavg.formats.base import dtype_name

MODEL_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt",
    "merges.txt", "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json",
    "image_processor_config.json", "feature_extractor_config.json",
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
            raise OutputError(out, f"another ckptavg run (pid {holder}) is writing it; wait for it to finish or choose another output") from None
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


def check_destination(out: Path, overwrite: bool, needed_bytes: int) -> None:
    """Refuse before any work: an existing OUT without --overwrite, a missing parent, too little space."""
    if out.exists() and not overwrite:
        raise OutputError(out, "already exists; pass --overwrite to replace it")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(out, f"folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(out, f"folder {parent} is not writable")
    free = shutil.disk_usage(parent).free
    if free < needed_bytes + SPACE_MARGIN:
        raise OutputError(out, f"not enough free space: the output needs {needed_bytes / 1e9:.2f} GB, {free / 1e9:.2f} GB free")


@contextmanager
def staged(out: Path, overwrite: bool, is_dir: bool, notes: list[str] | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `out`, holding its lock; on success fsync and rename it into place,
    on any error remove it. Leftovers of a killed run are removed first and reported in `notes`."""
    with output_lock(out):
        if (out.exists() or out.is_symlink()) and not overwrite:
            raise OutputError(out, "already exists (another run just wrote it); pass --overwrite to replace it")
        removed = remove_leftovers(out)
        if removed and notes is not None:
            notes.append(f"removed what an interrupted run left: {', '.join(removed)}")
        tmp = tmp_name(out)
        if is_dir:
            tmp.mkdir()
        try:
            yield tmp
            _fsync_dir(tmp if is_dir else tmp.parent)
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


def copy_model_files(src: Path, dst: Path, out_dtype: torch.dtype | None) -> list[str]:
    """Copy config/tokenizer files; config.json's dtype is updated when the output dtype changed."""
    copied = []
    for path in model_files(src):
        target = dst / path.name
        try:
            if path.name == "config.json" and out_dtype is not None:
                config = json.loads(path.read_text())
                for key in ("torch_dtype", "dtype"):
                    if key in config:
                        config[key] = dtype_name(out_dtype)
                target.write_text(json.dumps(config, indent=2) + "\n")
            else:
                shutil.copyfile(path, target)
            _fsync_file(target)
        except (OSError, ValueError) as e:
            raise OutputError(path, f"cannot copy to the output: {e}") from e
        copied.append(path.name)
    return copied
