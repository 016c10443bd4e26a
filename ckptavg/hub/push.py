"""--push-to-hub: a finished output folder uploaded to a repo, checked before any work is done."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ckptavg.errors import OutputError, UsageError, option
from ckptavg.hub.inputs import quiet_progress_bars
from ckptavg.hub.repo import hub_error, offline


def check_push(repo_id: str, out: Path | None, out_format: str = "auto", dry_run: bool = False) -> None:
    """Refuse --push-to-hub before any work: a bad repo id, a single-file output, a dry run, offline mode."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from ckptavg.output import output_layout

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UsageError(
            None, f"{option('push_to_hub', repo_id)}: not a Hub repo id ({str(e).splitlines()[0]}); write ORG/NAME"
        ) from e
    if "/" not in repo_id:
        raise UsageError(None, f"{option('push_to_hub', repo_id)}: name the repo as ORG/NAME (your user name or an organisation)")
    if dry_run:
        raise UsageError(None, f"{option('push_to_hub')} with {option('dry_run', True)}: a dry run writes nothing to push")
    if out is None:
        raise UsageError(None, f"{option('push_to_hub')} needs an output folder: pass {option('out', 'OUT')}")
    if output_layout(out, out_format)[1]:
        raise UsageError(
            None,
            f"{option('push_to_hub')} uploads an output folder (weights, config, model card); {option('out', out.name)} is one "
            "file: name a folder",
        )
    if offline():
        raise UsageError(None, f"{option('push_to_hub')} with HF_HUB_OFFLINE=1: unset it to upload")


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


def push(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
) -> dict[str, Any]:
    """Upload a finished output folder: the repo is created if missing (`private` applies then), the branch
    `revision` too; one `upload_folder` call. Returns repo, revision, commit and commit URL.

    Raises:
        OutputError: the upload failed; the local folder is complete and untouched.
    """
    from huggingface_hub import HfApi

    quiet_progress_bars()
    folder = Path(folder)
    api = HfApi()
    message = commit_message or f"ckptavg: {_describe_output(folder)}"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, commit_message=message)
    except Exception as e:
        error = hub_error(repo_id, e, repo_id, revision)
        branch = f" --revision {revision}" if revision else ""
        raise OutputError(
            repo_id,
            f"push failed: {error.problem}; the local output {folder} is complete: "
            f"upload it with `hf upload {repo_id} {folder}{branch}`",
        ) from e
    return {"repo": repo_id, "revision": revision or "main", "commit": info.oid, "commit_url": info.commit_url}


def _describe_output(folder: Path) -> str:
    try:
        recipe = json.loads((folder / "ckptavg.json").read_text())
        n = len(recipe.get("inputs") or [])
        return f"{recipe.get('strategy', 'average')} of {n} checkpoint{'s' if n != 1 else ''}"
    except (OSError, ValueError, AttributeError):
        return "averaged checkpoints"
