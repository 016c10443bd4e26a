"""The Hugging Face Hub: `hf://ORG/REPO[@REVISION][/SUBFOLDER]` inputs turned into folders of the standard
Hugging Face cache before anything opens them, a repo's checkpoints listed for `select`, and a finished output
uploaded with `--push-to-hub`.

Only what an input needs is downloaded: its weights (an index and its shards, or one weights file, or an
adapter), and the model files an output copies (config, tokenizer, generation config); never optimizer,
scheduler, RNG or trainer state. Safetensors headers are read by range requests and checked across the inputs
before the weights are downloaded. With HF_HUB_OFFLINE=1 everything comes from the cache. Tokens are
huggingface_hub's own business (HF_TOKEN, `hf auth login`): ckptavg never reads or prints them.

Nothing below `discover` knows about the network: every function here hands back local paths.
huggingface_hub is imported inside the functions, so that it reads HF_ENDPOINT, HF_HUB_CACHE and
HF_HUB_OFFLINE when a hub input is first met, and `ckptavg --help` does not pay for its import.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from ckptavg.discover import steps_from_name
from ckptavg.errors import CkptavgError, InputError, MismatchError, OutputError, UsageError
from ckptavg.formats.detect import TRAINING_STATE_FILES, WEIGHT_SUFFIXES
from ckptavg.formats.peft import CONFIG_FILE as ADAPTER_CONFIG
from ckptavg.formats.peft import WEIGHT_FILES as ADAPTER_WEIGHTS
from ckptavg.output import MODEL_FILE_PATTERNS, MODEL_FILES

PREFIX = "hf://"
# `hf:/` too: a command-line argument typed as a Path has its `//` collapsed before ckptavg sees it.
SPEC = re.compile(r"hf:/{1,2}(?P<repo>[^/@\s]+/[^/@\s]+)(?:@(?P<revision>refs/pr/\d+|[^/]+))?(?:/(?P<subfolder>.*))?")
COMMIT = re.compile(r"[0-9a-f]{40}")
TRAINER_COMMIT = re.compile(r"Training in progress,? (step|epoch) (\d+)")
CHECKPOINT_DIR = re.compile(r"checkpoint-(\d+)")
TRAINER_STATE = "trainer_state.json"


def is_hub(path: str | os.PathLike) -> bool:
    """Whether an input names the Hub (`hf://...`) rather than a local path."""
    return os.fspath(path).startswith("hf:/")


@dataclass(frozen=True)
class HubSpec:
    """One `hf://` input as written: a repo, the revision asked (None: the default branch), a folder in it."""

    repo: str
    revision: str | None = None
    subfolder: str = ""

    @classmethod
    def parse(cls, text: str | os.PathLike) -> HubSpec:
        text = PREFIX + os.fspath(text)[len("hf:/"):].lstrip("/")  # as written, whatever a Path made of its `//`
        match = SPEC.fullmatch(text.rstrip("/"))
        if match is None:
            raise InputError(text, "not a Hub input: write hf://ORG/REPO[@REVISION][/SUBFOLDER], e.g. hf://org/run@main/checkpoint-500")
        repo, revision, subfolder = match.group("repo"), match.group("revision"), match.group("subfolder") or ""
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(repo)
        except HFValidationError as e:
            raise InputError(text, f"{repo!r} is not a Hub repo id: {str(e).splitlines()[0]}") from e
        if any(part in ("", ".", "..") for part in subfolder.split("/")) and subfolder:
            raise InputError(text, f"{subfolder!r} is not a folder of the repo")
        return cls(repo, unquote(revision) if revision else None, subfolder)

    def __str__(self) -> str:
        return self.pinned(self.revision)

    def pinned(self, revision: str | None, subfolder: str | None = None) -> str:
        """`hf://ORG/REPO@REVISION/SUBFOLDER`, the revision quoted when it holds a `/` (refs/pr/1)."""
        sub = self.subfolder if subfolder is None else subfolder
        at = f"@{quote(revision, safe='')}" if revision else ""
        return f"{PREFIX}{self.repo}{at}{'/' + sub if sub else ''}"


@dataclass
class HubSource:
    """Where a resolved input came from: what `ckptavg.json`, the --json report and the model card record."""

    repo: str
    revision: str | None  # as asked; None: the default branch
    commit: str  # what it resolved to
    subfolder: str
    step: int | None = None
    step_source: str | None = None
    files: list[str] = field(default_factory=list)  # the files of the repo it uses
    left: list[str] = field(default_factory=list)  # the other files of its folder, not downloaded (training state...)
    downloaded_bytes: int = 0  # files this run added to the cache (0: all there already; a blob cached under another name is not fetched again)

    @property
    def url(self) -> str:
        return HubSpec(self.repo, subfolder=self.subfolder).pinned(self.commit)

    def to_dict(self) -> dict[str, Any]:
        return {
            "repo": self.repo, "revision": self.revision, "commit": self.commit, "subfolder": self.subfolder, "url": self.url,
            "step": self.step, "step_source": self.step_source, "files": list(self.files), "left_on_hub": list(self.left),
            "downloaded_bytes": self.downloaded_bytes,
        }


# --- the repo, online or from the cache -------------------------------------------------------------------


class _NotCached(Exception):
    pass


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _is_network_error(error: BaseException) -> bool:
    """A failure to reach the Hub at all (refused, unresolvable, timed out), whatever HTTP library raised it."""
    names = {c.__name__ for c in type(error).__mro__}
    return bool(names & {"TransportError", "ConnectionError", "Timeout", "TimeoutException", "OfflineModeIsEnabled"})


class _CachedRepo:
    """A repo as the Hugging Face cache holds it: refs/<name> → commit, snapshots/<commit>/<path> → blob."""

    online = False

    def __init__(self, repo: str) -> None:
        from huggingface_hub import constants

        self.repo = repo
        self.root = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"

    def commit(self, revision: str | None) -> str:
        name = revision or "main"
        if COMMIT.fullmatch(name):
            if (self.root / "snapshots" / name).is_dir():
                return name
            raise _NotCached(f"commit {name[:12]} is not in the cache")
        ref = self.root / "refs" / name
        if ref.is_file():
            commit = ref.read_text().strip()
            if (self.root / "snapshots" / commit).is_dir():
                return commit
        raise _NotCached(f"revision {name} is not in the cache" if self.root.is_dir() else "not in the cache")

    def files(self, commit: str) -> dict[str, int]:
        snapshot = self.root / "snapshots" / commit
        found = {}
        for path in sorted(snapshot.rglob("*")):
            if path.is_file():  # follows the symlink to the blob; a dangling one is not there
                found[path.relative_to(snapshot).as_posix()] = path.stat().st_size
        return found

    def refs(self) -> dict[str, str]:
        refs_dir = self.root / "refs"
        if not refs_dir.is_dir():
            return {}
        return {p.relative_to(refs_dir).as_posix(): p.read_text().strip() for p in sorted(refs_dir.rglob("*")) if p.is_file()}

    def commits(self, revision: str | None) -> list[tuple[str, str]] | None:
        return None  # the cache keeps no history

    def fetch(self, commit: str, path: str) -> Path:
        local = self.root / "snapshots" / commit / path
        if not local.is_file():
            raise _NotCached(f"{path} is not in the cache")
        return local

    def header(self, commit: str, path: str) -> dict[str, tuple[str, tuple[int, ...]]] | None:
        return None

    def title(self, commit: str, path: str) -> str | None:
        return None


class _OnlineRepo(_CachedRepo):
    """The repo through the Hub's API; files land in the cache (`hf_hub_download`), listed files are remembered."""

    online = True

    def __init__(self, repo: str) -> None:
        from huggingface_hub import HfApi

        super().__init__(repo)
        self.api = HfApi()
        self._listing: dict[str, dict[str, int]] = {}

    def commit(self, revision: str | None) -> str:
        if revision in self._listing:  # a commit listed already
            return revision
        info = self.api.model_info(self.repo, revision=revision, files_metadata=True)
        assert info.sha is not None
        self._listing[info.sha] = {s.rfilename: s.size or 0 for s in info.siblings or []}
        return info.sha

    def files(self, commit: str) -> dict[str, int]:
        if commit not in self._listing:
            self.commit(commit)
        return self._listing[commit]

    def refs(self) -> dict[str, str]:
        refs = self.api.list_repo_refs(self.repo)
        return {r.name: r.target_commit for r in [*refs.branches, *refs.tags]}

    def commits(self, revision: str | None) -> list[tuple[str, str]] | None:
        return [(c.commit_id, c.title) for c in self.api.list_repo_commits(self.repo, revision=revision)]

    def fetch(self, commit: str, path: str) -> Path:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(self.repo, path, revision=commit))

    def header(self, commit: str, path: str) -> dict[str, tuple[str, tuple[int, ...]]] | None:
        meta = self.api.parse_safetensors_file_metadata(self.repo, path, revision=commit)
        return {name: (info.dtype, tuple(info.shape)) for name, info in meta.tensors.items()}

    def title(self, commit: str, path: str) -> str | None:
        infos = self.api.get_paths_info(self.repo, [path], expand=True, revision=commit)
        last = getattr(infos[0], "last_commit", None) if infos else None
        return last.title if last is not None else None

    def remember_ref(self, revision: str | None, commit: str) -> None:
        """refs/<revision> → commit in the cache, as huggingface_hub writes it, so the name works offline later."""
        name = revision or "main"
        if COMMIT.fullmatch(name):
            return
        ref = self.root / "refs" / name
        try:
            ref.parent.mkdir(parents=True, exist_ok=True)
            if not ref.is_file() or ref.read_text() != commit:
                tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
                tmp.write_text(commit)
                os.replace(tmp, ref)
        except OSError:
            pass  # a read-only cache still serves this run


def _open_repo(repo: str, repos: dict[str, _CachedRepo]) -> _CachedRepo:
    if repo not in repos:
        repos[repo] = _CachedRepo(repo) if _offline() else _OnlineRepo(repo)
    return repos[repo]


def _hub_error(where: str, error: BaseException, repo: str | None = None, revision: str | None = None) -> InputError:
    """One line for what huggingface_hub raised; never a token, never a traceback."""
    from huggingface_hub import constants

    login = "log in with `hf auth login` or set HF_TOKEN"
    if isinstance(error, _NotCached):
        mode = "HF_HUB_OFFLINE=1 is set" if _offline() else "the Hub cannot be reached"
        return InputError(where, f"{error} ({mode}; cache: {constants.HF_HUB_CACHE}); download it once online, or unset HF_HUB_OFFLINE")
    if isinstance(error, _hf_error("GatedRepoError")):
        return InputError(where, f"{repo} is a gated repo: accept its conditions on its Hub page, then {login}")
    if isinstance(error, _hf_error("RevisionNotFoundError")):
        return InputError(where, f"no revision {revision or 'main'!r} in {repo} (a branch, tag or commit; quote a / as %2F)")
    if isinstance(error, _hf_error("RepositoryNotFoundError")):
        return InputError(where, f"no repo {repo} on the Hub, or it is private: check the name, or {login}")
    if isinstance(error, _hf_error("OfflineModeIsEnabled", "LocalEntryNotFoundError")):  # before EntryNotFoundError, its parent
        return InputError(where, f"not in the cache, and {'HF_HUB_OFFLINE=1 is set' if _offline() else 'the Hub cannot be reached'}")
    if isinstance(error, _hf_error("RemoteEntryNotFoundError", "EntryNotFoundError")):
        return InputError(where, f"a file is missing on the Hub: {_first_line(error)}")
    if isinstance(error, _hf_error("SafetensorsParsingError")):
        return InputError(where, f"not a readable safetensors file on the Hub: {_first_line(error)}")
    if isinstance(error, _hf_error("HfHubHTTPError")):
        status = error.response.status_code if getattr(error, "response", None) is not None else "?"
        advice = f"; {login}" if status in (401, 403) else ""
        return InputError(where, f"the Hub answered HTTP {status}: {_first_line(error)}{advice}")
    if _is_network_error(error):
        return InputError(where, f"cannot reach the Hub at {constants.ENDPOINT} ({type(error).__name__}: {_first_line(error)}); "
                                 "with HF_HUB_OFFLINE=1 ckptavg reads what the cache holds")
    return InputError(where, f"Hub error: {type(error).__name__}: {_first_line(error)}")


def _hf_error(*names: str) -> tuple[type[BaseException], ...]:
    """huggingface_hub's exception classes by name, those this version has (RemoteEntryNotFoundError is 1.x's
    name; older ones raise EntryNotFoundError, which 1.x keeps as the parent of the remote and local kinds)."""
    import huggingface_hub.errors as hf_errors
    import huggingface_hub.utils as hf_utils

    found = [getattr(module, name, None) for name in names for module in (hf_errors, hf_utils)]
    return tuple(dict.fromkeys(c for c in found if isinstance(c, type)))


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if lines and lines[0].endswith("Error.") else (lines[0] if lines else "")
    return text[:300]


# --- which files of a folder an input needs ---------------------------------------------------------------


def folder_files(files: dict[str, int], subfolder: str) -> dict[str, int]:
    """The files directly inside `subfolder` (not in its sub-folders), by name."""
    prefix = f"{subfolder}/" if subfolder else ""
    return {p[len(prefix):]: s for p, s in files.items() if p.startswith(prefix) and "/" not in p[len(prefix):]}


def weight_names(names: set[str] | dict[str, int]) -> list[str]:
    """The weight files of a folder by their names, in the order ckptavg's reader picks them
    (formats/detect.py `weight_files_in`), so that the cached folder opens as the remote one would; an adapter's
    weights with its config."""
    names = set(names)
    if ADAPTER_CONFIG in names:
        found = [n for n in ADAPTER_WEIGHTS if n in names][:1]
        return [*found, ADAPTER_CONFIG] if found else []
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json", "model.safetensors", "pytorch_model.bin"):
        if name in names:
            return [name]
    indexes = sorted(n for n in names if n.endswith(".safetensors.index.json")) or sorted(n for n in names if n.endswith(".bin.index.json"))
    if indexes:
        return indexes
    safetensors = sorted(n for n in names if n.endswith(".safetensors"))
    if safetensors:
        return safetensors
    return sorted(n for n in names if n.endswith(WEIGHT_SUFFIXES) and n not in TRAINING_STATE_FILES and not n.startswith("rng_state"))


def model_file_names(names: set[str] | dict[str, int]) -> list[str]:
    """The config, tokenizer and custom-code files an output copies (output.py `model_files`), by name."""
    names = set(names)
    found = [n for n in MODEL_FILES if n in names]
    for pattern in MODEL_FILE_PATTERNS:
        found.extend(n for n in sorted(names) if fnmatch.fnmatchcase(n, pattern) and n not in found)
    return found


@dataclass
class _Input:
    spec: HubSpec
    repo: _CachedRepo
    commit: str
    here: dict[str, int]  # name → size of the files in the folder
    weights: list[str]
    shards: list[str] = field(default_factory=list)  # named by the index files
    wanted: list[str] = field(default_factory=list)

    def path(self, name: str) -> str:
        return f"{self.spec.subfolder}/{name}" if self.spec.subfolder else name


def _where(spec: HubSpec, commit: str | None = None) -> str:
    folder = f"/{spec.subfolder}" if spec.subfolder else " (the repo's root)"
    at = spec.revision or "main"
    return f"{spec.repo}@{at}{' = ' + commit[:12] if commit and commit != at else ''}{folder}"


def _plan_input(spec: HubSpec, repo: _CachedRepo, extra: Sequence[str]) -> _Input:
    """Resolve the revision and choose the files: refuses a folder without weights before any download."""
    commit = repo.commit(spec.revision)
    files = repo.files(commit)
    if spec.subfolder and not any(p.startswith(spec.subfolder + "/") for p in files):
        raise InputError(str(spec), f"no folder {spec.subfolder} at {_where(spec, commit)}")
    here = folder_files(files, spec.subfolder)
    weights = weight_names(here)
    if not weights:
        prefix = f"{spec.subfolder}/" if spec.subfolder else ""
        runs = sorted({p[len(prefix):].split("/")[0] for p in files if p.startswith(prefix) and CHECKPOINT_DIR.fullmatch(p[len(prefix):].split("/")[0])})
        hint = f"; it holds checkpoint folders ({', '.join(runs[:3])}{', ...' if len(runs) > 3 else ''}): name one, e.g. {spec.pinned(spec.revision, _join(spec.subfolder, runs[0]))}" if runs else ""
        seen = ", ".join(sorted(here)[:5]) or "no files"
        raise InputError(str(spec), f"no weights at {_where(spec, commit)} (it holds {seen}){hint}")
    item = _Input(spec, repo, commit, here, weights)
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
                raise InputError(str(spec), f"{name} names {missing[0]}, which is not at {_where(spec, commit)} (an upload in progress?)")
            item.shards.extend(s for s in shards if s not in item.shards)
    names = [*weights, *item.shards, *model_file_names(here), *(n for n in extra if n in here)]
    item.wanted = list(dict.fromkeys(names))
    return item


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def _check_headers(items: list[_Input]) -> None:
    """Before any weights are downloaded: the safetensors headers of what is to be downloaded, by range request
    (the cached ones from the disk), must parse, and the full-model inputs must agree on the shapes of the tensors
    they share. Nothing to download, nothing to check here: the plan checks the opened inputs in seconds."""
    from ckptavg.formats.safetensors_io import read_header

    def weight_files(item: _Input) -> list[str]:
        return [n for n in [*item.weights, *item.shards] if n.endswith(".safetensors")]

    if not any(item.repo.online and not _is_cached(item, n) for item in items for n in weight_files(item)):
        return
    shapes: list[tuple[_Input, dict[str, tuple[int, ...]]]] = []
    for item in items:
        tensors: dict[str, tuple[int, ...]] = {}
        try:
            for name in weight_files(item):
                if _is_cached(item, name):
                    entries = read_header(item.repo.root / "snapshots" / item.commit / item.path(name))[0]
                    tensors.update({t: tuple(e.get("shape", ())) for t, e in entries.items()})
                elif (header := item.repo.header(item.commit, item.path(name))) is not None:
                    tensors.update({t: shape for t, (_, shape) in header.items()})
        except CkptavgError as e:
            raise renamed(e, item.repo.root / "snapshots" / item.commit, HubSpec(item.spec.repo, subfolder="").pinned(item.commit)) from e
        except Exception as e:
            raise _hub_error(str(item.spec), e, item.spec.repo, item.spec.revision) from e
        if tensors and ADAPTER_CONFIG not in item.weights:  # adapters of other ranks are averaged exactly: shapes may differ
            shapes.append((item, tensors))
    first, reference = shapes[0] if shapes else (None, {})
    for item, tensors in shapes[1:]:
        for name, shape in tensors.items():
            if name in reference and reference[name] != shape:
                raise MismatchError(str(item.spec), f"{name} has shape {list(shape)}, expected {list(reference[name])} (from {first.spec}); "
                                                    "found in the safetensors headers, before any weights were downloaded")


def _is_cached(item: _Input, name: str) -> bool:
    return (item.repo.root / "snapshots" / item.commit / item.path(name)).is_file()


def _download(item: _Input) -> HubSource:
    source = HubSource(item.spec.repo, item.spec.revision, item.commit, item.spec.subfolder)
    for name in item.wanted:
        cached = _is_cached(item, name)
        item.repo.fetch(item.commit, item.path(name))
        source.files.append(item.path(name))
        if not cached:
            source.downloaded_bytes += item.here.get(name, 0)
    source.left = sorted(set(item.here) - set(item.wanted))
    if isinstance(item.repo, _OnlineRepo):
        item.repo.remember_ref(item.spec.revision, item.commit)
    return source


def _find_step(item: _Input, source: HubSource, refs: dict[str, str] | None = None) -> None:
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
        error.path = url + error.path[len(old):]
    error.problem = error.problem.replace(old, url)
    error.args = (error.message,)
    return error


def localize(
    paths: Sequence[str | os.PathLike], base: str | os.PathLike | None = None, *, extra: Sequence[str] = (),
    out: Path | None = None, overwrite: bool = False,
) -> Localized:
    """Turn the `hf://` inputs among `paths` (and `base`) into folders of the Hugging Face cache, downloading
    what they need; other paths pass through. `extra`: more file names to fetch when present (inspect takes
    trainer_state.json). `out`: checked for --overwrite before any download.

    Raises:
        InputError: unknown repo or revision, gated or private without a token, no network and not cached,
            no weights there; MismatchError: Hub inputs whose safetensors headers disagree on shapes.
    """
    everything = [*paths, *([base] if base is not None else [])]
    local = Localized([Path(p) for p in paths], Path(base) if base is not None else None)
    hub = [i for i, p in enumerate(everything) if is_hub(p)]
    if not hub:
        return local
    if out is not None:
        from ckptavg.output import check_destination

        check_destination(out, overwrite, needed_bytes=0)  # before the downloads, not after them
    _quiet_progress_bars()
    repos: dict[str, _CachedRepo] = {}
    items: dict[int, _Input] = {}
    for i in hub:
        items[i] = _resolve(HubSpec.parse(everything[i]), repos, extra)
    _check_headers(list(items.values()))
    for i, item in items.items():
        try:
            source = _download(item)
        except CkptavgError:
            raise
        except Exception as e:
            raise _hub_error(str(item.spec), e, item.spec.repo, item.spec.revision) from e
        folder = item.repo.root / "snapshots" / item.commit / item.spec.subfolder if item.spec.subfolder else item.repo.root / "snapshots" / item.commit
        _find_step(item, source)
        if i < len(paths):
            local.paths[i] = folder
        else:
            local.base = folder
        local.sources[str(folder)] = source
    return local


def _resolve(spec: HubSpec, repos: dict[str, _CachedRepo], extra: Sequence[str]) -> _Input:
    """The plan of one input; online trouble reaching the Hub falls back to what the cache holds."""
    repo = _open_repo(spec.repo, repos)
    try:
        return _plan_input(spec, repo, extra)
    except CkptavgError:
        raise
    except Exception as e:
        if isinstance(repo, _OnlineRepo) and _is_network_error(e):
            try:
                item = _plan_input(spec, _CachedRepo(spec.repo), extra)
                repos[spec.repo] = item.repo
                return item
            except _NotCached:
                pass
            except CkptavgError:
                raise
        raise _hub_error(str(spec), e, spec.repo, spec.revision) from e


def _quiet_progress_bars() -> None:
    """huggingface_hub's tqdm bars and its retry warnings would tear ckptavg's own progress line and one-line errors
    on stderr (HF_DEBUG=1 or --debug tracebacks still say what happened)."""
    from huggingface_hub.utils import disable_progress_bars, logging

    disable_progress_bars()
    if os.environ.get("HF_DEBUG") != "1":
        logging.set_verbosity_error()


def local_path(path: str | os.PathLike, extra: Sequence[str] = ()) -> Path:
    """One input as a local path (downloading a Hub input's files); a local path is returned as it is."""
    return localize([path], extra=extra).paths[0]


# --- select over a repo -----------------------------------------------------------------------------------


def describe_hub(text: str | os.PathLike, table: Any = None, options: Any = None) -> list[tuple[Any, dict]]:
    """`select`'s candidates for one hf:// input, each with the pinned `hf://ORG/REPO@COMMIT[/SUBFOLDER]` as its
    path. A repo without a revision expands to its checkpoints: `checkpoint-N/` folders at the default branch,
    else the branches and tags that name a step, else the Trainer's "Training in progress, step N" commits. A
    revision without a folder expands to its `checkpoint-N/` folders when it has some. Only small JSON files
    are downloaded (trainer_state.json for metrics, an index to check its shards), never weights.
    """
    spec = HubSpec.parse(text)
    repos: dict[str, _CachedRepo] = {}
    _quiet_progress_bars()
    repo = _open_repo(spec.repo, repos)
    try:
        found = _expand(spec, repo)
        refs_cache: dict[str, str] | None = None
        out = []
        for candidate_spec, commit, step, step_source in found:
            if step is None and refs_cache is None:
                refs_cache = repo.refs()
            out.append(_candidate(candidate_spec, repo, commit, step, step_source, table, options, refs_cache))
        _mark_best(out)
        return [(c, {}) for c in out]
    except CkptavgError:
        raise
    except Exception as e:
        raise _hub_error(str(spec), e, spec.repo, spec.revision) from e


def _expand(spec: HubSpec, repo: _CachedRepo) -> list[tuple[HubSpec, str, int | None, str | None]]:
    """(spec, commit, step, where the step came from) of each checkpoint the input names."""
    commit = repo.commit(spec.revision)
    if spec.subfolder:
        return [(spec, commit, None, None)]
    files = repo.files(commit)
    folders = sorted({p.split("/")[0] for p in files if "/" in p and CHECKPOINT_DIR.fullmatch(p.split("/")[0])}, key=lambda n: int(n.split("-")[1]))
    if folders:
        return [(HubSpec(spec.repo, commit, name), commit, int(name.split("-")[1]), "folder name") for name in folders]
    if spec.revision is not None:
        return [(HubSpec(spec.repo, commit), commit, None, None)]
    named = []
    for name, target in repo.refs().items():
        info = steps_from_name(name)
        if info.step is not None and name != "main":
            named.append((HubSpec(spec.repo, target), target, info.step, f"revision name ({name})"))
    if named:
        return sorted(named, key=lambda n: n[2])
    history = repo.commits(spec.revision)
    trainer = []
    for commit_id, title in history or []:
        found = TRAINER_COMMIT.search(title or "")
        if found and found.group(1) == "step":
            trainer.append((HubSpec(spec.repo, commit_id), commit_id, int(found.group(2)), f"commit title ({title})"))
    if trainer:
        return sorted(trainer, key=lambda n: n[2])
    why = "no checkpoint-N folders at main, no branch or tag naming a step"
    why += ", no 'Training in progress, step N' commits" if history is not None else " (offline: the commit history is not cached)"
    if weight_names(folder_files(files, "")):
        return [(HubSpec(spec.repo, commit), commit, None, None)]
    raise InputError(str(spec), f"no checkpoints found: {why}")


def _candidate(spec: HubSpec, repo: _CachedRepo, commit: str, step: int | None, step_source: str | None, table: Any, options: Any, refs: dict[str, str] | None):
    from ckptavg.discover import trainer_state_metrics
    from ckptavg.selection import Candidate, describe

    pinned = HubSpec(spec.repo, subfolder=spec.subfolder).pinned(commit)
    files = repo.files(commit)
    here = folder_files(files, spec.subfolder)
    weights = weight_names(here)
    item = _Input(HubSpec(spec.repo, commit, spec.subfolder), repo, commit, here, weights)
    problem = None if weights else f"no weights at {_where(item.spec, commit)}"
    if weights:
        try:
            item = _plan_input(item.spec, repo, ())  # an index is fetched (small JSON) and its shards checked
        except InputError as e:
            problem = e.problem
    folder = repo.root / "snapshots" / commit / spec.subfolder if spec.subfolder else repo.root / "snapshots" / commit
    if problem is None and all(_is_cached(item, n) for n in [*item.weights, *item.shards]):
        if TRAINER_STATE in here:
            _trainer_state(item)  # into the cache, where describe reads it
        # all in the cache: the full local checks (headers, shards, entries) of any local candidate
        candidate, _ = describe(folder, table, options)
        candidate.path = pinned
        if candidate.ignored:
            candidate.ignored = candidate.ignored.replace(str(folder), pinned)
    else:
        candidate = Candidate(path=pinned)
        if problem is not None:
            candidate.ignored = f"unreadable or incomplete: {problem}"
        state = _trainer_state(item) if TRAINER_STATE in here else None
        if state is not None:
            candidate.metrics.update(trainer_state_metrics(state, step if step is not None else state.get("global_step")))
            candidate.metric_sources.update({k: TRAINER_STATE for k in candidate.metrics})
        if table is not None:
            for key, value in table.lookup(Path(pinned), step).items():
                if key not in candidate.metrics:
                    candidate.metrics[key] = value
                    candidate.metric_sources[key] = "metrics file"
    if candidate.step is None:
        if step is None and weights:
            source = HubSource(spec.repo, spec.revision, commit, spec.subfolder)
            _find_step(item, source, refs)
            step, step_source = source.step, source.step_source
        candidate.step, candidate.step_source = step, step_source
    return candidate


def _trainer_state(item: _Input) -> dict | None:
    try:
        data = json.loads(Path(item.repo.fetch(item.commit, item.path(TRAINER_STATE))).read_text())
    except (OSError, ValueError, _NotCached):
        return None
    return data if isinstance(data, dict) else None


def _mark_best(candidates: list[Any]) -> None:
    """The newest checkpoint folder's trainer_state.json names the run's best checkpoint so far."""
    folders = [c for c in candidates if c.step is not None and CHECKPOINT_DIR.fullmatch(c.path.rsplit("/", 1)[-1])]
    if not folders:
        return
    newest = max(folders, key=lambda c: c.step)
    spec = HubSpec.parse(newest.path)
    repo = _CachedRepo(spec.repo)
    commit = spec.revision or ""
    try:
        state = json.loads(repo.fetch(commit, _join(spec.subfolder, TRAINER_STATE)).read_text())
    except (OSError, ValueError, _NotCached):
        return
    best = state.get("best_model_checkpoint") if isinstance(state, dict) else None
    if isinstance(best, str):
        for c in folders:
            c.trainer_best = c.path.rsplit("/", 1)[-1] == best.rstrip("/").rsplit("/", 1)[-1]


# --- pushing an output ------------------------------------------------------------------------------------


def check_push(repo_id: str, out: Path | None, out_format: str = "auto", dry_run: bool = False) -> None:
    """Refuse --push-to-hub before any work: a bad repo id, a single-file output, a dry run, offline mode."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from ckptavg.averaging import output_layout

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UsageError(None, f"--push-to-hub {repo_id}: not a Hub repo id ({str(e).splitlines()[0]}); write ORG/NAME") from e
    if "/" not in repo_id:
        raise UsageError(None, f"--push-to-hub {repo_id}: name the repo as ORG/NAME (your user name or an organisation)")
    if dry_run:
        raise UsageError(None, "--push-to-hub with --dry-run: a dry run writes nothing to push")
    if out is None:
        raise UsageError(None, "--push-to-hub needs an output folder: pass -o OUT")
    if output_layout(out, out_format)[1]:
        raise UsageError(None, f"--push-to-hub uploads an output folder (weights, config, model card); -o {out.name} is one file: name a folder")
    if _offline():
        raise UsageError(None, "--push-to-hub with HF_HUB_OFFLINE=1: unset it to upload")


class PushFailed(OutputError):
    """The upload failed after the output was written: `report` is the finished job's report, still printed."""

    def __init__(self, error: OutputError, report: Any) -> None:
        super().__init__(error.path, error.problem)
        self.report = report


def push_report(report: Any, repo_id: str | None, **options: Any) -> Any:
    """Push the output of a finished `average`/`export` report (nothing when `repo_id` is None); records
    where it went in `report.pushed`.

    Raises:
        PushFailed: carrying the report (its `pushed` holds the error), which the command line still prints.
    """
    if repo_id:
        try:
            report.pushed = push(report.output, repo_id, **options)
        except OutputError as e:
            report.pushed = {"repo": repo_id, "revision": options.get("revision") or "main", "error": e.problem}
            raise PushFailed(e, report) from e
    return report


def push(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None, revision: str | None = None, commit_message: str | None = None) -> dict[str, Any]:
    """Upload a finished output folder: the repo is created if missing (`private` applies then), the branch
    `revision` too; one `upload_folder` call. Returns repo, revision, commit and commit URL.

    Raises:
        OutputError: the upload failed; the local folder is complete and untouched.
    """
    from huggingface_hub import HfApi

    _quiet_progress_bars()
    folder = Path(folder)
    api = HfApi()
    message = commit_message or f"ckptavg: {_describe_output(folder)}"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, commit_message=message)
    except Exception as e:
        error = _hub_error(repo_id, e, repo_id, revision)
        branch = f" --revision {revision}" if revision else ""
        raise OutputError(repo_id, f"push failed: {error.problem}; the local output {folder} is complete: "
                                   f"upload it with `hf upload {repo_id} {folder}{branch}`") from e
    return {"repo": repo_id, "revision": revision or "main", "commit": info.oid, "commit_url": info.commit_url}


def _describe_output(folder: Path) -> str:
    try:
        recipe = json.loads((folder / "ckptavg.json").read_text())
        n = len(recipe.get("inputs") or [])
        return f"{recipe.get('strategy', 'average')} of {n} checkpoint{'s' if n != 1 else ''}"
    except (OSError, ValueError, AttributeError):
        return "averaged checkpoints"
