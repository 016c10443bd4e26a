"""A repo's checkpoints, for `select`: each as a plain row (its pinned name, its folder in the cache when its
weights are all there, its step, what is wrong with it, its trainer_state.json), never a download of weights.
`select` turns the rows into its candidates."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ckptavg.discover import steps_from_name
from ckptavg.errors import CkptavgError, InputError
from ckptavg.formats.detect import weight_names
from ckptavg.hub.inputs import (
    CHECKPOINT_DIR,
    TRAINER_COMMIT,
    TRAINER_STATE,
    Input,
    find_step,
    is_cached,
    join,
    plan_input,
    quiet_progress_bars,
    where,
)
from ckptavg.hub.names import folder_files
from ckptavg.hub.repo import CachedRepo, NotCached, hub_error, open_repo
from ckptavg.hub.spec import HubSource, HubSpec


@dataclass
class HubCheckpoint:
    """One checkpoint of a repo: `path` is `hf://ORG/REPO@COMMIT[/SUBFOLDER]`; `folder` its folder in the cache
    when every weights file is there (then it is read like any local checkpoint), else None; `problem` why it
    cannot be read (no weights, a shard missing); `trainer_state` its trainer_state.json, when it has one."""

    path: str
    folder: Path | None
    step: int | None
    step_source: str | None
    problem: str | None = None
    trainer_state: dict | None = None
    _item: Input | None = field(default=None, repr=False)
    _source: HubSource | None = field(default=None, repr=False)
    _refs: dict[str, str] | None = field(default=None, repr=False)

    def find_step(self) -> tuple[int | None, str | None]:
        """(step, where it came from): the one its listing gave, else from its commit's place among the refs and
        the Trainer's commits (asked of the Hub only now, when the checkpoint itself did not say)."""
        if self.step is not None or self._item is None or self._source is None:
            return self.step, self.step_source
        try:
            find_step(self._item, self._source, self._refs)
        except CkptavgError:
            raise
        except Exception as e:
            raise hub_error(self.path, e, self._source.repo, self._source.revision) from e
        return self._source.step, self._source.step_source


def list_checkpoints(text: str | os.PathLike) -> list[HubCheckpoint]:
    """The checkpoints one hf:// input names, each pinned to its commit. A repo without a revision expands to its
    checkpoints: `checkpoint-N/` folders at the default branch, else the branches and tags that name a step, else
    the Trainer's "Training in progress, step N" commits. A revision without a folder expands to its
    `checkpoint-N/` folders when it has some. Only small JSON files are downloaded (trainer_state.json for
    metrics, an index to check its shards), never weights.
    """
    spec = HubSpec.parse(text)
    repos: dict[str, CachedRepo] = {}
    quiet_progress_bars()
    repo = open_repo(spec.repo, repos)
    try:
        refs: dict[str, str] | None = None
        rows = []
        for checkpoint, commit, step, step_source in expand(spec, repo):
            if step is None and refs is None:
                refs = repo.refs()
            rows.append(_row(checkpoint, repo, commit, step, step_source, refs))
        return rows
    except CkptavgError:
        raise
    except Exception as e:
        raise hub_error(str(spec), e, spec.repo, spec.revision) from e


def expand(spec: HubSpec, repo: CachedRepo) -> list[tuple[HubSpec, str, int | None, str | None]]:
    """(spec, commit, step, where the step came from) of each checkpoint the input names."""
    commit = repo.commit(spec.revision)
    if spec.subfolder:
        return [(spec, commit, None, None)]
    files = repo.files(commit)
    folders = sorted(
        {p.split("/")[0] for p in files if "/" in p and CHECKPOINT_DIR.fullmatch(p.split("/")[0])},
        key=lambda n: int(n.split("-")[1]),
    )
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
    why += (
        ", no 'Training in progress, step N' commits" if history is not None else " (offline: the commit history is not cached)"
    )
    if weight_names(folder_files(files, "")):
        return [(HubSpec(spec.repo, commit), commit, None, None)]
    raise InputError(str(spec), f"no checkpoints found: {why}")


def _row(
    spec: HubSpec, repo: CachedRepo, commit: str, step: int | None, step_source: str | None, refs: dict[str, str] | None
) -> HubCheckpoint:
    here = folder_files(repo.files(commit), spec.subfolder)
    weights = weight_names(here)
    item = Input(HubSpec(spec.repo, commit, spec.subfolder), repo, commit, here, weights)
    problem = None if weights else f"no weights at {where(item.spec, commit)}"
    if weights:
        try:
            item = plan_input(item.spec, repo, ())  # an index is fetched (small JSON) and its shards checked
        except InputError as e:
            problem = e.problem
    folder = repo.root / "snapshots" / commit / spec.subfolder if spec.subfolder else repo.root / "snapshots" / commit
    cached = problem is None and all(is_cached(item, n) for n in [*item.weights, *item.shards])
    state = trainer_state(item) if TRAINER_STATE in here else None  # fetched into the cache, where a local read finds it
    return HubCheckpoint(
        path=HubSpec(spec.repo, subfolder=spec.subfolder).pinned(commit),
        folder=folder if cached else None,
        step=step,
        step_source=step_source,
        problem=problem,
        trainer_state=state,
        _item=item if weights else None,
        _source=HubSource(spec.repo, spec.revision, commit, spec.subfolder) if weights else None,
        _refs=refs,
    )


def trainer_state(item: Input) -> dict | None:
    try:
        data = json.loads(Path(item.repo.fetch(item.commit, item.path(TRAINER_STATE))).read_text())
    except (OSError, ValueError, NotCached):
        return None
    return data if isinstance(data, dict) else None


class Ranked(Protocol):
    """What `mark_best` needs of a checkpoint: `select`'s Candidate is one."""

    path: str
    step: int | None
    trainer_best: bool


def mark_best(candidates: Sequence[Ranked]) -> None:
    """The newest checkpoint folder's trainer_state.json names the run's best checkpoint so far: mark it."""
    folders = [c for c in candidates if c.step is not None and CHECKPOINT_DIR.fullmatch(c.path.rsplit("/", 1)[-1])]
    if not folders:
        return
    newest = max(folders, key=lambda c: c.step)
    spec = HubSpec.parse(newest.path)
    repo = CachedRepo(spec.repo)
    commit = spec.revision or ""
    try:
        state = json.loads(repo.fetch(commit, join(spec.subfolder, TRAINER_STATE)).read_text())
    except (OSError, ValueError, NotCached):
        return
    best = state.get("best_model_checkpoint") if isinstance(state, dict) else None
    if isinstance(best, str):
        for c in folders:
            c.trainer_best = c.path.rsplit("/", 1)[-1] == best.rstrip("/").rsplit("/", 1)[-1]
