"""hf:// inputs made local: each resolved to a commit, its weights (and the model files an output copies)
downloaded into the Hugging Face cache after their headers were checked, and opened from there."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptavg.discover import steps_from_name
from ckptavg.errors import CkptavgError, InputError, MismatchError
from ckptavg.formats.detect import CHECKPOINT_FOLDER as CHECKPOINT_DIR
from ckptavg.formats.detect import weight_names
from ckptavg.formats.peft import CONFIG_FILE as ADAPTER_CONFIG
from ckptavg.hub.names import folder_files, model_file_names
from ckptavg.hub.repo import CachedRepo, NotCached, OnlineRepo, hub_error, is_network_error, open_repo
from ckptavg.hub.spec import COMMIT, HubSource, HubSpec, is_hub

TRAINER_COMMIT = re.compile(r"Training in progress,? (step|epoch) (\d+)")
TRAINER_STATE = "trainer_state.json"


@dataclass
class Input:
    spec: HubSpec
    repo: CachedRepo
    commit: str
    here: dict[str, int]  # name → size of the files in the folder
    weights: list[str]
    shards: list[str] = field(default_factory=list)  # named by the index files
    wanted: list[str] = field(default_factory=list)

    def path(self, name: str) -> str:
        return f"{self.spec.subfolder}/{name}" if self.spec.subfolder else name


def where(spec: HubSpec, commit: str | None = None) -> str:
    folder = f"/{spec.subfolder}" if spec.subfolder else " (the repo's root)"
    at = spec.revision or "main"
    return f"{spec.repo}@{at}{' = ' + commit[:12] if commit and commit != at else ''}{folder}"


def plan_input(spec: HubSpec, repo: CachedRepo, extra: Sequence[str]) -> Input:
    """Resolve the revision and choose the files: refuses a folder without weights before any download."""
    commit = repo.commit(spec.revision)
    files = repo.files(commit)
    if spec.subfolder and not any(p.startswith(spec.subfolder + "/") for p in files):
        raise InputError(str(spec), f"no folder {spec.subfolder} at {where(spec, commit)}")
    here = folder_files(files, spec.subfolder)
    weights = weight_names(here)
    if not weights:
        prefix = f"{spec.subfolder}/" if spec.subfolder else ""
        runs = sorted(
            {
                p[len(prefix) :].split("/")[0]
                for p in files
                if p.startswith(prefix) and CHECKPOINT_DIR.fullmatch(p[len(prefix) :].split("/")[0])
            }
        )
        hint = (
            f"; it holds checkpoint folders ({', '.join(runs[:3])}{', ...' if len(runs) > 3 else ''}): name one, e.g. "
            f"{spec.pinned(spec.revision, join(spec.subfolder, runs[0]))}"
            if runs
            else ""
        )
        seen = ", ".join(sorted(here)[:5]) or "no files"
        raise InputError(str(spec), f"no weights at {where(spec, commit)} (it holds {seen}){hint}")
    item = Input(spec, repo, commit, here, weights)
    for name in weights:
        if name.endswith(".index.json"):
            index = repo.fetch(commit, item.path(name))
            try:
                weight_map = json.loads(Path(index).read_text()).get("weight_map") or {}
            except (OSError, ValueError, AttributeError) as e:
                raise InputError(f"{spec}/{name}", f"not a readable index: {e}") from e
            shards = sorted({str(v) for v in weight_map.values()})
            missing = [s for s in shards if s not in here]
            if missing:
                raise InputError(
                    str(spec), f"{name} names {missing[0]}, which is not at {where(spec, commit)} (an upload in progress?)"
                )
            item.shards.extend(s for s in shards if s not in item.shards)
    names = [*weights, *item.shards, *model_file_names(here), *(n for n in extra if n in here)]
    item.wanted = list(dict.fromkeys(names))
    return item


def join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def check_headers(items: list[Input]) -> None:
    """Before any weights are downloaded: the safetensors headers of what is to be downloaded, by range request
    (the cached ones from the disk), must parse, and the full-model inputs must agree on the shapes of the tensors
    they share. Nothing to download, nothing to check here: the plan checks the opened inputs in seconds."""
    from ckptavg.formats.safetensors_io import read_header

    def weight_files(item: Input) -> list[str]:
        return [n for n in [*item.weights, *item.shards] if n.endswith(".safetensors")]

    if not any(item.repo.online and not is_cached(item, n) for item in items for n in weight_files(item)):
        return
    shapes: list[tuple[Input, dict[str, tuple[int, ...]]]] = []
    for item in items:
        tensors: dict[str, tuple[int, ...]] = {}
        try:
            for name in weight_files(item):
                if is_cached(item, name):
                    entries = read_header(item.repo.root / "snapshots" / item.commit / item.path(name))[0]
                    tensors.update({t: tuple(e.get("shape", ())) for t, e in entries.items()})
                elif (header := item.repo.header(item.commit, item.path(name))) is not None:
                    tensors.update({t: shape for t, (_, shape) in header.items()})
        except CkptavgError as e:
            raise renamed(
                e, item.repo.root / "snapshots" / item.commit, HubSpec(item.spec.repo, subfolder="").pinned(item.commit)
            ) from e
        except Exception as e:
            raise hub_error(str(item.spec), e, item.spec.repo, item.spec.revision) from e
        if tensors and ADAPTER_CONFIG not in item.weights:  # adapters of other ranks are averaged exactly: shapes may differ
            shapes.append((item, tensors))
    first, reference = shapes[0] if shapes else (None, {})
    for item, tensors in shapes[1:]:
        for name, shape in tensors.items():
            if name in reference and reference[name] != shape:
                raise MismatchError(
                    str(item.spec),
                    f"{name} has shape {list(shape)}, expected {list(reference[name])} (from {first.spec}); "
                    "found in the safetensors headers, before any weights were downloaded",
                )


def is_cached(item: Input, name: str) -> bool:
    return (item.repo.root / "snapshots" / item.commit / item.path(name)).is_file()


def download(item: Input) -> HubSource:
    source = HubSource(item.spec.repo, item.spec.revision, item.commit, item.spec.subfolder)
    for name in item.wanted:
        cached = is_cached(item, name)
        item.repo.fetch(item.commit, item.path(name))
        source.files.append(item.path(name))
        if not cached:
            source.downloaded_bytes += item.here.get(name, 0)
    source.left = sorted(set(item.here) - set(item.wanted))
    if isinstance(item.repo, OnlineRepo):
        item.repo.remember_ref(item.spec.revision, item.commit)
    return source


def find_step(item: Input, source: HubSource, refs: dict[str, str] | None = None) -> None:
    """The step of an input: its folder's name (checkpoint-500), the revision's (Pythia step143000, OLMo
    stage1-step…-tokens…B) or of a branch or tag at the same commit, else the Trainer's commit title
    ("Training in progress, step 500")."""
    spec = item.spec
    candidates = []
    if spec.subfolder:
        candidates.append((spec.subfolder.rsplit("/", 1)[-1], "folder name"))
    if spec.revision and not COMMIT.fullmatch(spec.revision):
        candidates.append((spec.revision, f"revision name ({spec.revision})"))
    for name, source_name in candidates:
        info = steps_from_name(name)
        if info.step is not None:
            source.step, source.step_source = info.step, source_name
            return
    try:
        refs = refs if refs is not None else item.repo.refs()
        for name, commit in sorted(refs.items()):
            info = steps_from_name(name)
            if commit == item.commit and info.step is not None:
                source.step, source.step_source = info.step, f"branch or tag at this commit ({name})"
                return
        title = item.repo.title(item.commit, item.path(item.weights[0]))
    except Exception:  # the step is a nicety (refs and commit titles may be unreachable): never an error of its own
        return
    found = TRAINER_COMMIT.search(title or "")
    if found and found.group(1) == "step":
        source.step, source.step_source = int(found.group(2)), f"commit title ({title})"


# --- what the commands call -------------------------------------------------------------------------------


@dataclass
class Localized:
    """The inputs as local paths; `open` opens one (with its Hub step), `annotate` records the Hub sources."""

    paths: list[Path]
    base: Path | None = None
    sources: dict[str, HubSource] = field(default_factory=dict)  # by local path

    def open(self, path: Path, options: Any = None):
        from ckptavg.checkpoint import LoadOptions, open_checkpoint

        source = self.sources.get(str(path))
        if source is None:
            return open_checkpoint(path, options or LoadOptions())
        try:
            ckpt = open_checkpoint(path, options or LoadOptions())
        except CkptavgError as e:
            raise renamed(e, path, source.url) from e
        if ckpt.step is None and source.step is not None:
            ckpt.step, ckpt.step_source = source.step, source.step_source
        return ckpt

    def annotate(self, inputs: Sequence[Any]) -> None:
        """Report inputs (InputSummary) from the Hub: their path becomes the pinned hf:// URL, `hub` the source."""
        for summary in inputs:
            source = self.sources.get(summary.path)
            if source is not None:
                summary.hub = source.to_dict()
                summary.path = source.url

    def notes(self, path: str | Path) -> list[str]:
        """What a Hub input's folder holds that was not downloaded (its training state), for `inspect`."""
        source = self.sources.get(str(path))
        if source is None or not source.left:
            return []
        shown = ", ".join(source.left[:6]) + (", ..." if len(source.left) > 6 else "")
        return [f"on the Hub beside it, not downloaded: {shown}"]

    def label(self, path: str | Path) -> str:
        source = self.sources.get(str(path))
        return source.url if source else str(path)


def renamed(error: CkptavgError, local: Path, url: str) -> CkptavgError:
    """The error with the cache's path of an input replaced by its hf:// URL."""
    old = str(local)
    if error.path and error.path.startswith(old):
        error.path = url + error.path[len(old) :]
    error.problem = error.problem.replace(old, url)
    error.args = (error.message,)
    return error


def localize(
    paths: Sequence[str | os.PathLike],
    base: str | os.PathLike | None = None,
    *,
    extra: Sequence[str] = (),
) -> Localized:
    """Turn the `hf://` inputs among `paths` (and `base`) into folders of the Hugging Face cache, downloading
    what they need; other paths pass through. `extra`: more file names to fetch when present (inspect takes
    trainer_state.json).

    Raises:
        InputError: unknown repo or revision, gated or private without a token, no network and not cached,
            no weights there; MismatchError: Hub inputs whose safetensors headers disagree on shapes.
    """
    everything = [*paths, *([base] if base is not None else [])]
    local = Localized([Path(p) for p in paths], Path(base) if base is not None else None)
    hub = [i for i, p in enumerate(everything) if is_hub(p)]
    if not hub:
        return local
    quiet_progress_bars()
    repos: dict[str, CachedRepo] = {}
    items: dict[int, Input] = {}
    for i in hub:
        items[i] = resolve(HubSpec.parse(everything[i]), repos, extra)
    check_headers(list(items.values()))
    for i, item in items.items():
        try:
            source = download(item)
        except CkptavgError:
            raise
        except Exception as e:
            raise hub_error(str(item.spec), e, item.spec.repo, item.spec.revision) from e
        folder = (
            item.repo.root / "snapshots" / item.commit / item.spec.subfolder
            if item.spec.subfolder
            else item.repo.root / "snapshots" / item.commit
        )
        find_step(item, source)
        if i < len(paths):
            local.paths[i] = folder
        else:
            local.base = folder
        local.sources[str(folder)] = source
    return local


def resolve(spec: HubSpec, repos: dict[str, CachedRepo], extra: Sequence[str]) -> Input:
    """The plan of one input; online trouble reaching the Hub falls back to what the cache holds."""
    repo = open_repo(spec.repo, repos)
    try:
        return plan_input(spec, repo, extra)
    except CkptavgError:
        raise
    except Exception as e:
        if isinstance(repo, OnlineRepo) and is_network_error(e):
            try:
                item = plan_input(spec, CachedRepo(spec.repo), extra)
                repos[spec.repo] = item.repo
                return item
            except NotCached:
                pass
            except CkptavgError:
                raise
        raise hub_error(str(spec), e, spec.repo, spec.revision) from e


def quiet_progress_bars() -> None:
    """huggingface_hub's tqdm bars and its retry warnings would tear ckptavg's own progress line and one-line errors
    on stderr (HF_DEBUG=1 or --debug tracebacks still say what happened)."""
    from huggingface_hub.utils import disable_progress_bars, logging

    disable_progress_bars()
    if os.environ.get("HF_DEBUG") != "1":
        logging.set_verbosity_error()


def local_path(path: str | os.PathLike, extra: Sequence[str] = ()) -> Path:
    """One input as a local path (downloading a Hub input's files); a local path is returned as it is."""
    return localize([path], extra=extra).paths[0]
