"""What an `hf://ORG/REPO[@REVISION][/SUBFOLDER]` name says, and where a local copy of one came from."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

from ckptavg.errors import InputError

PREFIX = "hf://"
# `hf:/` too: a command-line argument typed as a Path has its `//` collapsed before ckptavg sees it.
SPEC = re.compile(r"hf:/{1,2}(?P<repo>[^/@\s]+/[^/@\s]+)(?:@(?P<revision>refs/pr/\d+|[^/]+))?(?:/(?P<subfolder>.*))?")
COMMIT = re.compile(r"[0-9a-f]{40}")


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
        text = PREFIX + os.fspath(text)[len("hf:/") :].lstrip("/")  # as written, whatever a Path made of its `//`
        match = SPEC.fullmatch(text.rstrip("/"))
        if match is None:
            raise InputError(
                text, "not a Hub input: write hf://ORG/REPO[@REVISION][/SUBFOLDER], e.g. hf://org/run@main/checkpoint-500"
            )
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
    downloaded_bytes: int = (
        0  # files this run added to the cache (0: all there already; a blob cached under another name is not fetched again)
    )

    @property
    def url(self) -> str:
        return HubSpec(self.repo, subfolder=self.subfolder).pinned(self.commit)

    def to_dict(self) -> dict[str, Any]:
        return {
            "repo": self.repo,
            "revision": self.revision,
            "commit": self.commit,
            "subfolder": self.subfolder,
            "url": self.url,
            "step": self.step,
            "step_source": self.step_source,
            "files": list(self.files),
            "left_on_hub": list(self.left),
            "downloaded_bytes": self.downloaded_bytes,
        }


# --- the repo, online or from the cache -------------------------------------------------------------------
