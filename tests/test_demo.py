"""scripts/demo.sh replaces its examples folder: it must only ever remove a folder it made itself."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

DEMO = Path(__file__).parent.parent / "scripts" / "demo.sh"


def demo(folder: Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    # PYTHON=false and a VENV that does not exist: a demo that gets past its check fails at once in the setup
    # ("setup: creating ..."), before it installs, trains or removes anything.
    env = {**os.environ, "VENV": str(folder.parent / "no-venv"), "PYTHON": "false"}
    return subprocess.run(["bash", str(DEMO), str(folder)], capture_output=True, text=True, timeout=30, env=env, cwd=cwd)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"" for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("kind", ["folder with files", "file", "symlink to a folder"])
def test_demo_refuses_what_it_did_not_make(tmp_path, kind):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    target = {"folder with files": mine, "file": mine / "thesis.tex", "symlink to a folder": tmp_path / "link"}[kind]
    if kind == "symlink to a folder":
        target.symlink_to(mine)
    before = tree(tmp_path)
    result = demo(target)
    assert result.returncode != 0
    assert "was not made by the demo" in result.stderr or "is not a folder" in result.stderr or "is a symlink" in result.stderr
    assert "setup:" not in result.stderr  # refused before the setup
    assert tree(tmp_path) == before


def test_a_relative_folder_is_the_callers(tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("keep")
    result = demo(Path("work"), cwd=tmp_path)
    assert result.returncode != 0 and f"{tmp_path}/work exists and was not made by the demo" in result.stderr


@pytest.mark.parametrize("kind", ["made by the demo", "empty", "absent"])
def test_demo_goes_on_with_its_own_an_empty_or_a_new_folder(tmp_path, kind):
    folder = tmp_path / "examples"
    if kind != "absent":
        folder.mkdir()
    if kind == "made by the demo":
        (folder / ".ckptavg-demo").write_text("made by scripts/demo.sh")
        (folder / "run").mkdir()
    result = demo(folder)
    assert "setup: creating" in result.stderr, result.stderr  # past the check (and stopped by PYTHON=false)
