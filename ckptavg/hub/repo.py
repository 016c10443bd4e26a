"""A repo's files, refs and commits: from the Hugging Face cache (offline, or what is already there) or the Hub."""

from __future__ import annotations

import os
from pathlib import Path

from ckptavg.errors import InputError
from ckptavg.hub.spec import COMMIT


class NotCached(Exception):
    pass


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def is_network_error(error: BaseException) -> bool:
    """A failure to reach the Hub at all (refused, unresolvable, timed out), whatever HTTP library raised it."""
    names = {c.__name__ for c in type(error).__mro__}
    return bool(names & {"TransportError", "ConnectionError", "Timeout", "TimeoutException", "OfflineModeIsEnabled"})


class CachedRepo:
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
            raise NotCached(f"commit {name[:12]} is not in the cache")
        ref = self.root / "refs" / name
        if ref.is_file():
            commit = ref.read_text().strip()
            if (self.root / "snapshots" / commit).is_dir():
                return commit
        raise NotCached(f"revision {name} is not in the cache" if self.root.is_dir() else "not in the cache")

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
            raise NotCached(f"{path} is not in the cache")
        return local

    def header(self, commit: str, path: str) -> dict[str, tuple[str, tuple[int, ...]]] | None:
        return None

    def title(self, commit: str, path: str) -> str | None:
        return None


class OnlineRepo(CachedRepo):
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


def open_repo(repo: str, repos: dict[str, CachedRepo]) -> CachedRepo:
    if repo not in repos:
        repos[repo] = CachedRepo(repo) if offline() else OnlineRepo(repo)
    return repos[repo]


def hub_error(where: str, error: BaseException, repo: str | None = None, revision: str | None = None) -> InputError:
    """One line for what huggingface_hub raised; never a token, never a traceback."""
    from huggingface_hub import constants

    login = "log in with `hf auth login` or set HF_TOKEN"
    if isinstance(error, NotCached):
        mode = "HF_HUB_OFFLINE=1 is set" if offline() else "the Hub cannot be reached"
        return InputError(
            where, f"{error} ({mode}; cache: {constants.HF_HUB_CACHE}); download it once online, or unset HF_HUB_OFFLINE"
        )
    if isinstance(error, hf_error("GatedRepoError")):
        return InputError(where, f"{repo} is a gated repo: accept its conditions on its Hub page, then {login}")
    if isinstance(error, hf_error("RevisionNotFoundError")):
        return InputError(where, f"no revision {revision or 'main'!r} in {repo} (a branch, tag or commit; quote a / as %2F)")
    if isinstance(error, hf_error("RepositoryNotFoundError")):
        return InputError(where, f"no repo {repo} on the Hub, or it is private: check the name, or {login}")
    if isinstance(error, hf_error("OfflineModeIsEnabled", "LocalEntryNotFoundError")):  # before EntryNotFoundError, its parent
        return InputError(
            where, f"not in the cache, and {'HF_HUB_OFFLINE=1 is set' if offline() else 'the Hub cannot be reached'}"
        )
    if isinstance(error, hf_error("RemoteEntryNotFoundError", "EntryNotFoundError")):
        return InputError(where, f"a file is missing on the Hub: {first_line(error)}")
    if isinstance(error, hf_error("SafetensorsParsingError")):
        return InputError(where, f"not a readable safetensors file on the Hub: {first_line(error)}")
    if isinstance(error, hf_error("HfHubHTTPError")):
        status = error.response.status_code if getattr(error, "response", None) is not None else "?"
        advice = f"; {login}" if status in (401, 403) else ""
        return InputError(where, f"the Hub answered HTTP {status}: {first_line(error)}{advice}")
    if is_network_error(error):
        return InputError(
            where,
            f"cannot reach the Hub at {constants.ENDPOINT} ({type(error).__name__}: {first_line(error)}); "
            "with HF_HUB_OFFLINE=1 ckptavg reads what the cache holds",
        )
    return InputError(where, f"Hub error: {type(error).__name__}: {first_line(error)}")


def hf_error(*names: str) -> tuple[type[BaseException], ...]:
    """huggingface_hub's exception classes by name, those this version has (RemoteEntryNotFoundError is 1.x's
    name; older ones raise EntryNotFoundError, which 1.x keeps as the parent of the remote and local kinds)."""
    import huggingface_hub.errors as hf_errors
    import huggingface_hub.utils as hf_utils

    found = [getattr(module, name, None) for name in names for module in (hf_errors, hf_utils)]
    return tuple(dict.fromkeys(c for c in found if isinstance(c, type)))


def first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if lines and lines[0].endswith("Error.") else (lines[0] if lines else "")
    return text[:300]


# --- which files of a folder an input needs ---------------------------------------------------------------
