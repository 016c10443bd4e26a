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


def test_no_message_outside_the_command_line_phrases_a_flag():
    """The library names options by keyword (errors.option); only the CLI writes `--flag`."""
    import ast

    structure = _structure()
    found = [
        f"{path.name}:{line}: {text!r}"
        for path in sorted((ROOT / "ckptavg").rglob("*.py"))
        if path.name not in structure.COMMAND_LINE
        for line, text in structure.flag_texts(ast.parse(path.read_text()))
    ]
    assert found == []


def test_the_flag_finder_sees_a_flag_in_a_message_not_in_a_docstring():
    import ast

    code = 'def f():\n    """Use --weights."""\n    raise ValueError(f"pass --ema {x}")\n'
    assert [line for line, _ in _structure().flag_texts(ast.parse(code))] == [3]


def test_every_option_the_library_names_is_a_parameter_of_the_command_line():
    """Each name given to errors.option (directly or through the checks) is spelled as a flag the CLI declares."""
    import re

    from ckptavg import cli

    named = set()
    for path in (ROOT / "ckptavg").rglob("*.py"):
        text = path.read_text()
        named |= set(re.findall(r"\boption\(\s*[\"']([a-z_]+)[\"']", text))
        named |= set(re.findall(r"\bcheck_(?:number|int|choice|size|text|prefixes)\(\s*[\"']([a-z_]+)[\"']", text))
        named |= set(re.findall(r"\(\"([a-z_]+)\", (?:self|policy)\.\w+\)", text))  # (name, value) pairs checked in a loop
    assert {"memory_budget", "out", "overwrite", "last"} <= named
    missing = sorted(n for n in named if cli._PARAMETER_OF.get(n, n) not in cli._flags())
    assert missing == []
    assert cli.flag_spelling("out", "OUT") == "-o OUT"
    assert cli.flag_spelling("overwrite", "True") == "--overwrite"
    assert cli.flag_spelling("strip_prefixes", "model.") == "--strip-prefix model."
