"""The scores a `tune` run has measured, kept beside its output so that a run interrupted (Ctrl-C, a kill, a
crash) and started again with the same arguments evaluates only what it had not.

The file is `.OUT.ckptavg-tune.json` in OUT's folder. Each score is kept under a key made of what decides it: the
candidate's recipe (its inputs' indices and weights), the identity of every input (path, size and modification
time of its files) and the evaluation (command or text file, metric, token budget, device). A changed input,
weight or command makes a new key, so a stale score is never reused. Failures are not kept: a rerun tries them
again. The file is rewritten (atomically) after each evaluation, and removed when the run completes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from ckptavg.tuning.evaluation import Evaluation

STATE_VERSION = 1


def state_path(out: Path) -> Path:
    return out.parent / f".{out.name}.ckptavg-tune.json"


def input_identity(path: Path) -> list:
    """What says these are the same weights as before: the path and, for each of its files (a folder's own
    files, not deeper), the name, size and modification time."""
    path = Path(path)
    try:
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        return [str(path.resolve()), [[p.name, (st := p.stat()).st_size, st.st_mtime_ns] for p in files]]
    except OSError:
        return [str(path), None]


def evaluation_key(recipe: dict, inputs: list[list], evaluation: dict) -> str:
    """The key of one candidate's score: a hash of its recipe, its inputs' identity and the evaluation."""
    text = json.dumps({"recipe": recipe, "inputs": inputs, "evaluation": evaluation}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class TuneState:
    """The scores kept for one output: `get` a key's evaluation (None when not measured), `put` one and save."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.scores: dict[str, dict] = {}
        self.reused: int = 0
        self.found = False
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        if isinstance(data, dict) and data.get("version") == STATE_VERSION and isinstance(data.get("scores"), dict):
            self.scores = {k: v for k, v in data["scores"].items() if isinstance(v, dict)}
            self.found = True

    def get(self, key: str) -> Evaluation | None:
        data = self.scores.get(key)
        if data is None:
            return None
        self.reused += 1
        return Evaluation.from_dict(data)

    def put(self, key: str, evaluation: Evaluation, name: str) -> None:
        if not evaluation.ok:
            return
        self.scores[key] = {"name": name, **evaluation.to_dict()}
        self.save()

    def save(self) -> None:
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(json.dumps({"version": STATE_VERSION, "scores": self.scores}, indent=1))
        os.replace(temporary, self.path)

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
