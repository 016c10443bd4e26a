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


# torch is imported where tensors are read, folded or written (issue 20): the commands that read only headers
# answer without it. One subprocess runs them all in turn (each through ckptavg.cli.main, as the console script
# does) and says after each whether torch has been imported; the last one reads tensors, so it must.
DRIVER = """
import json, sys
from ckptavg.cli import main
seen = []
for argv in json.loads(sys.argv[1]):
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code or 0
    seen.append([argv, code, "torch" in sys.modules])
with open(sys.argv[2], "w") as f:
    json.dump(seen, f)
"""


def _layouts(tmp_path: Path) -> dict[str, Path]:
    """One checkpoint of each common layout, written by torch and safetensors as the trainers write them."""
    from conftest import make_state, save_layout

    from tests.test_dcp_reader import save as save_dcp
    from tests.test_quantized import FP8_CONFIG, fp8_state, save_sharded

    made = {f"checkpoint-{step}": save_layout(make_state(step), tmp_path / "run", "hf-trainer", step=step) for step in (1, 2, 3)}
    for layout in ("pt", "pt-legacy", "lightning", "fairseq", "bin", "safetensors", "safetensors-sharded", "bin-sharded"):
        made[layout] = save_layout(make_state(7), tmp_path / layout, layout, step=4)
    made["fp8"] = save_sharded(fp8_state(0), tmp_path / "fp8", FP8_CONFIG)
    made["dcp"] = save_dcp(tmp_path / "dcp", seed=0)
    return made


def test_header_commands_import_no_torch(tmp_path):
    import json
    import os
    import shutil
    import subprocess
    import sys

    made = _layouts(tmp_path)
    shutil.copy(made["pt"], made["pt"].with_name("last.pt"))
    run = [str(made[f"checkpoint-{step}"]) for step in (1, 2, 3)]
    commands = [
        ["--help"],
        ["inspect", "--help"],
        ["select", "--help"],
        *(["inspect", str(path)] for path in made.values()),
        ["inspect", run[-1], "--json", "--tensors"],
        ["inspect", str(made["fp8"]), "--json", "--tensors"],
        ["select", *run, "--last", "2"],
        ["select", str(tmp_path / "run" / "checkpoint-*"), "--last", "2", "--json"],
        ["select", *run, str(made["pt"]), str(made["lightning"]), "--last", "2"],
        ["select", *run, str(made["pt"]), str(made["pt"].with_name("last.pt")), "--last", "2"],  # a copy, compared in full
    ]
    control = ["inspect", run[-1], "--check"]  # reads every tensor: torch is imported there
    result = tmp_path / "seen.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps([*commands, control]), str(result)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(result.read_text())
    assert [code for _, code, _ in seen] == [0] * len(seen), seen
    first_with_torch = next((argv for argv, _, imported in seen if imported), None)
    assert first_with_torch == control, f"torch was imported by: ckptavg {' '.join(first_with_torch or [])}"


def test_the_dtype_tables_are_torchs():
    """formats/dtypes.py names every dtype the installed torch has, with torch's item sizes and aliases, and the
    storages and safetensors codes as torch and safetensors map them."""
    import json

    import safetensors.torch
    import torch

    from ckptavg.formats.dtypes import ALIASES, DTYPES, SAFETENSORS, STORAGE_TYPES, is_floating, itemsize, to_torch

    in_torch = {name: getattr(torch, name) for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}
    canonical = {name for name, dtype in in_torch.items() if str(dtype) == f"torch.{name}"}
    assert canonical <= set(DTYPES)  # the table may name dtypes of a newer torch than this one
    aliases = {alias: str(in_torch[alias]).removeprefix("torch.") for alias in set(in_torch) - canonical}
    assert aliases == {alias: name for alias, name in ALIASES.items() if name in canonical}
    for name in canonical:
        assert (itemsize(name), is_floating(name)) == (in_torch[name].itemsize, in_torch[name].is_floating_point), name
        assert to_torch(name) is in_torch[name]
    storages = torch.storage._dtype_to_storage_type_map()
    assert STORAGE_TYPES == {storage: str(dtype).removeprefix("torch.") for dtype, storage in storages.items()}
    for code, name in SAFETENSORS.items():  # the code safetensors itself writes for a tensor of that dtype
        try:
            raw = safetensors.torch.save({"t": torch.zeros(1, dtype=in_torch[name])})
        except (KeyError, ValueError, TypeError):  # a dtype this safetensors does not write yet (F8_E8M0 before 0.6)
            continue
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        assert header["t"]["dtype"] == code, (code, name)


def test_no_message_outside_the_command_line_phrases_a_flag():
    """The library names options by keyword (errors.option); only the CLI writes `--flag`."""
    import ast

    structure = _structure()
    found = [
        f"{path.name}:{line}: {text!r}"
        for path in sorted((ROOT / "ckptavg").rglob("*.py"))
        if not structure.on_the_command_line(path, ROOT / "ckptavg")
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
