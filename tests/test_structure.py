"""The package's modules import one another without a cycle (issue 20), found by scripts/structure.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _structure():
    spec = importlib.util.spec_from_file_location("structure", ROOT / "scripts" / "structure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_cycle_among_the_modules():
    structure = _structure()
    assert structure.cycles(structure.import_graph(ROOT / "ckptavg")) == []


def test_the_cycle_finder_finds_a_cycle():
    structure = _structure()
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert structure.cycles(graph) == [["a", "b", "c"]]
