"""The README is true: every option it names exists on its command, and every example command line runs.

(a) Each `--option` the README names is looked up in `ckptavg <command> --help` (run through the entry point):
    in an example line, for the command that line runs; in the prose and tables of a command's section, for
    that command (in its sub-sections, that command or the root `ckptavg`); elsewhere, for any of them.
(b) Each line of a ```bash block that starts with `ckptavg` runs in a small tree of real checkpoints laid out
    like the README's paths, with `bash -o pipefail -c` (globs, `$(ckptavg select ...)`, pipes), and must exit 0.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from conftest import make_state as random_state
from conftest import save_layout
from hub_server import HubRepo, HubStandin

import ckptavg

README = Path(__file__).parent.parent / "README.md"
VENV_BIN = Path(sys.executable).parent
ENTRY_POINT = VENV_BIN / "ckptavg"
COMMANDS = ("average", "select", "inspect", "export", "sweep", "tune")
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")

# Example lines that cannot run on the fixture tree, with the reason. Keep it short.
SKIP: dict[str, str] = {
    "ckptavg tune run/checkpoint-* -o best --eval-text held_out.txt --greedy-soup --plot tune.svg": (
        "needs a causal LM with its tokenizer; tests/test_tune.py runs it on tests/tune_runs.py's Trainer run"
    ),
}
# Example lines whose documented exit code is not 0.
EXPECTED_EXIT: dict[str, int] = {}
# Root options that every command accepts though its --help does not list them (checked below).
ANYWHERE = {"--debug"}  # cli.main takes it from any position


# --- parsing the README -----------------------------------------------------------------------------------


def sections() -> list[tuple[str, str | None, bool, list[str]]]:
    """(heading, command of the section or None, is the command's own section (not a sub-section), lines)."""
    out: list[tuple[str, str | None, bool, list[str]]] = [("", None, False, [])]
    command, fenced = None, False
    for line in README.read_text().splitlines():
        fenced ^= line.startswith("```")
        if line.startswith("#") and not fenced:
            found = re.match(r"### `ckptavg (\w+)`", line)
            if found:
                command = found.group(1)
            elif line.startswith("## "):
                command = None
            out.append((line, command, bool(found), []))
        else:
            out[-1][3].append(line)
    return out


def code_lines(lines: list[str], language: str = "bash") -> list[str]:
    """The lines of ```language blocks, with `\\` continuations joined."""
    result, inside, pending = [], False, ""
    for line in lines:
        if line.startswith("```"):
            inside = line.strip() == f"```{language}" if not inside else False
            continue
        if inside:
            pending += line.rstrip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            result.append(pending)
            pending = ""
    return result


def invocations(line: str) -> list[tuple[str | None, list[str]]]:
    """(command or None for the root, options) of each `ckptavg ...` a shell line runs."""
    found = []
    code = line.split(" #")[0]
    for part in re.split(r"\$\(|\)|\||;|&&", code):
        words = part.split()
        if words and words[0] == "ckptavg":
            command = next((w for w in words[1:] if not w.startswith("-")), None)
            found.append((command if command in COMMANDS else None, OPTION.findall(part)))
    return found


def example_lines() -> list[str]:
    return [line.strip() for _, _, _, lines in sections() for line in code_lines(lines) if line.strip().startswith("ckptavg")]


def mentions() -> list[tuple[str, set[str | None], str]]:
    """(option, the commands it may belong to (None: the root), where) for every option the README names."""
    found = []
    everything = {None, *COMMANDS}
    for heading, command, own, lines in sections():
        inside = False
        for line in lines:
            if line.startswith("```"):
                inside = not inside
                continue
            text = line.strip()
            if inside:
                if text.startswith("ckptavg"):
                    for cmd, options in invocations(text):
                        found.extend((o, {cmd}, text) for o in options)
                continue  # other tools' command lines (scripts/test.sh -k, bench.py --help)
            for span in re.findall(r"`(ckptavg [^`]*)`", line):  # inline `ckptavg cmd --opt`
                for cmd, options in invocations(span):
                    found.extend((o, {cmd}, span) for o in options)
            prose = re.sub(r"`ckptavg [^`]*`", "", line)
            scope = everything if command is None else ({command} if own else {command, None})
            found.extend((o, scope, f"{heading.strip()}: {text}") for o in OPTION.findall(prose))
    return found


# --- the CLI's own word -----------------------------------------------------------------------------------


def run_help(*args: str) -> str:
    result = subprocess.run(
        [str(ENTRY_POINT), *args, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def help_options(text: str) -> set[str]:
    """The option names in the first column of --help's option panels (not those its descriptions mention)."""
    names = set()
    for line in text.splitlines():
        found = re.match(r"^[│|]\s{1,3}(?:\*\s+)?((?:-{1,2}[\w-]+(?:\s*[/,]\s*|\s+)?)+)", line)
        if found:
            names.update(re.findall(r"--[\w-]+", found.group(1)))
    return names


@lru_cache(maxsize=None)
def cli_options() -> dict[str | None, set[str]]:
    with ThreadPoolExecutor(5) as pool:
        texts = dict(zip((None, *COMMANDS), pool.map(lambda c: run_help(*([c] if c else [])), (None, *COMMANDS))))
    return {command: help_options(text) for command, text in texts.items()}


def test_help_is_parsed():
    options = cli_options()
    assert {"--version", "--debug", "--help"} <= options[None]
    assert {"--output", "--weights", "--ema", "--dry-run", "--json", "--quiet", "--verify"} <= options["average"]
    assert "--report" not in options["average"]  # words in descriptions ("the --json report") are not options
    assert {"--last", "--top-k", "--invert"} <= options["select"] and "--last" not in options["average"]


def test_every_option_the_readme_names_exists_on_its_command():
    options = cli_options()
    wrong = []
    for option, commands, where in mentions():
        if option in ANYWHERE and None in options and option in options[None]:
            continue
        if not any(option in options[c] for c in commands):
            names = " or ".join(f"ckptavg {c}" if c else "ckptavg" for c in sorted(commands, key=str))
            wrong.append(f"{option} is not an option of {names}: {where}")
    assert not wrong, "README names options the CLI does not have:\n" + "\n".join(dict.fromkeys(wrong))


@pytest.mark.parametrize("option", sorted(ANYWHERE))
def test_root_options_taken_anywhere_are(option, tmp_path, cli):
    for command in COMMANDS:
        result = cli(command, tmp_path / "missing", option)
        assert "no such option" not in result.err.lower() and "Traceback" in result.err, (command, result.err)  # --debug's


# --- the examples, run on a tree shaped like their paths --------------------------------------------------


def make_state(seed: int) -> dict[str, torch.Tensor]:
    """The weights of one checkpoint of a training run: one model (seed 0) moved a little (by seed)."""
    noise = random_state(seed)
    return {k: v + 0.01 * noise[k] if v.is_floating_point() else noise[k] for k, v in random_state(0).items()}


def hf_checkpoint(root: Path, step: int, seed: int, eval_loss: dict[int, float] | None = None) -> None:
    folder = save_layout(make_state(seed), root, "hf-trainer", step=step)
    history = [{"step": s, "eval_loss": v} for s, v in sorted((eval_loss or {}).items()) if s <= step]
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": history}))


def lightning_ckpt(path: Path, step: int, seed: int, val_loss: float | None = None, extra: dict | None = None) -> None:
    state = make_state(seed)
    state["attn.q_proj.weight"] = torch.eye(8) + 0.01 * torch.randn(8, 8, generator=torch.Generator().manual_seed(seed))
    callbacks = {}
    if val_loss is not None:
        callbacks["ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}"] = {
            "monitor": "val_loss",
            "current_score": torch.tensor(val_loss),
        }
    top = {
        "state_dict": {f"model.{k}": v for k, v in state.items()},
        "global_step": step,
        "epoch": step // 100,
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1}]}],
        "callbacks": callbacks,
        **(extra or {}),
    }
    torch.save(top, path)


def build_tree(root: Path) -> None:
    """runs/checkpoint-N (and runs/exp/checkpoint-N), run/checkpoint-N with eval_loss, ckpt_*.pt, ckpt_*.ckpt,
    Lightning epoch=*.ckpt and ckpts/*.ckpt with val_loss and eval_loss, last.ckpt with EMA weights,
    step_5000.pt; and beside it, merged: the average of runs/checkpoint-*."""
    root.mkdir(parents=True)
    for i, step in enumerate(range(200, 1001, 200)):
        hf_checkpoint(root / "runs", step, i)
    for i, step in enumerate((100, 200)):
        hf_checkpoint(root / "runs" / "exp", step, 10 + i)
    losses = {s: 1 + (s - 500) ** 2 / 1e5 for s in range(100, 801, 100)}  # best at 500
    for i, step in enumerate(losses):
        hf_checkpoint(root / "run", step, 20 + i, losses)
    for i in range(1, 4):
        state = make_state(30 + i)
        torch.save({"model_state_dict": state, "optimizer_state_dict": {"state": {}}, "step": i * 100}, root / f"ckpt_{i}.pt")
        lightning_ckpt(root / f"ckpt_{i}.ckpt", i * 100, 40 + i)
    for i, step in enumerate((100, 200, 300)):
        lightning_ckpt(root / f"epoch={i}-step={step}.ckpt", step, 50 + i)
    (root / "ckpts").mkdir()
    for i, step in enumerate(range(100, 701, 100)):
        loss = 1 + abs(step - 400) / 1000
        lightning_ckpt(
            root / "ckpts" / f"epoch={i}-step={step}.ckpt", step, 60 + i, val_loss=loss, extra={"metrics": {"eval_loss": loss}}
        )
    ema = {f"model.{k}": v for k, v in make_state(70).items()}
    ema["model.attn.q_proj.weight"] = torch.eye(8)
    lightning_ckpt(root / "last.ckpt", 900, 71, extra={"state_dict_ema": ema})
    torch.save({"step": 5000, "model_state_dict": make_state(80), "optimizer_state_dict": {"state": {}}}, root / "step_5000.pt")
    lora_tree(root)
    ckptavg.average(sorted((root / "runs").glob("checkpoint-*")), root.parent / "merged")


def lora_tree(root: Path) -> None:
    """base-model (a safetensors model folder) and lora-run/checkpoint-N: LoRA adapters of one run on it."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(90)
    (root / "base-model").mkdir()
    save_file(
        {"layer.weight": torch.randn(8, 8, generator=g), "layer.bias": torch.zeros(8)}, root / "base-model" / "model.safetensors"
    )
    (root / "base-model" / "config.json").write_text(json.dumps({"model_type": "tiny"}))
    a, b = torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g)
    for i, step in enumerate(range(100, 501, 100)):
        folder = root / "lora-run" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        moved = {"base_model.model.layer.lora_A.weight": a + 0.01 * i, "base_model.model.layer.lora_B.weight": b + 0.01 * i}
        save_file(moved, folder / "adapter_model.safetensors")
        config = {
            "peft_type": "LORA",
            "r": 2,
            "lora_alpha": 4,
            "target_modules": ["layer"],
            "base_model_name_or_path": "base-model",
        }
        (folder / "adapter_config.json").write_text(json.dumps(config))
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# Each example runs `ckptavg` through its real entry point function, `ckptavg.cli.main`, in a process of its own
# with the example's argv, working folder, environment and stdin/stdout/stderr. To keep the test quick (an
# `import torch` costs about 2 s a process, and the examples start 20 of them), a server imports ckptavg and
# torch once and forks a child for each call; the `ckptavg` first on PATH is a small client that hands the
# server its argv, folder, environment and file descriptors and exits with the child's exit code. It falls back
# to the installed entry point when the server is not there. CKPTAVG_README_SLOW=1 runs the installed one.
SERVER = r"""
import json, os, signal, socket, sys
import torch, ckptavg.cli, ckptavg.averaging, ckptavg.exporting, ckptavg.selection, ckptavg.inspection
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(sys.argv[1])
server.listen(64)
print("ready", flush=True)
while True:
    conn, _ = server.accept()
    data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    size = int(data[:10])
    while len(data) < 10 + size:
        data += conn.recv(1 << 20)
    if os.fork() == 0:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        server.close()
        request = json.loads(data[10:])
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["ckptavg", *request["argv"]]
        try:
            ckptavg.cli.main(request["argv"])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        sys.stdout.flush()
        sys.stderr.flush()
        conn.sendall(code.to_bytes(4, "big", signed=True))
        os._exit(code)
    for fd in fds:
        os.close(fd)
    conn.close()
"""

CLIENT = """#!{python} -S
import json, os, socket, sys
try:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect({address!r})
except OSError:
    os.execv({entry!r}, [{entry!r}, *sys.argv[1:]])
data = json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}}).encode()
socket.send_fds(client, [b"%010d" % len(data) + data], [0, 1, 2])
code = b""
while len(code) < 4:
    piece = client.recv(4 - len(code))
    if not piece:
        sys.exit(1)
    code += piece
sys.exit(int.from_bytes(code, "big", signed=True))
"""


@pytest.fixture(scope="module")
def bin_folder(tmp_path_factory):
    """The folder to put first on PATH: a client of a forking server, or the venv's bin (CKPTAVG_README_SLOW=1)."""
    if os.environ.get("CKPTAVG_README_SLOW") == "1":
        yield VENV_BIN
        return
    folder = tmp_path_factory.mktemp("bin")
    address = str(folder / "server.sock")
    server = subprocess.Popen([sys.executable, "-c", SERVER, address], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        client = folder / "ckptavg"
        client.write_text(CLIENT.format(python=sys.executable, address=address, entry=str(ENTRY_POINT)))
        client.chmod(0o755)
        yield folder
    finally:
        server.kill()
        server.wait()


# The README's hf:// examples run against tests/hub_server.py's stand-in of the Hub (HF_ENDPOINT), which holds
# org/run (the tree's run/checkpoint-N folders, as hub_strategy="all_checkpoints" uploads them) and
# EleutherAI/pythia-70m (branches step142000 and step143000), with a cache of their own for each example.
HUB_TOKEN = "hf_readme_standin_token"


def hub_repos(tree: Path) -> dict[str, HubRepo]:
    run = HubRepo()
    run.commit({".gitattributes": b"*.safetensors filter=lfs\n"}, "initial commit")
    for folder in sorted((tree / "run").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
        files = {f"{folder.name}/{f.name}": f.read_bytes() for f in folder.iterdir() if f.is_file()}
        files[f"{folder.name}/optimizer.pt"] = b"\x00" * 4096  # what all_checkpoints uploads too, never downloaded
        run.commit(files, f"Training in progress, step {folder.name.split('-')[1]}")
    pythia = HubRepo()
    pythia.commit({".gitattributes": b"*.safetensors filter=lfs\n"}, "initial commit")
    for i, step in enumerate((142000, 143000)):
        weights = (tree / "runs" / f"checkpoint-{200 * (i + 1)}" / "model.safetensors").read_bytes()
        pythia.commit(
            {"model.safetensors": weights, "config.json": json.dumps({"architectures": ["GPTNeoXForCausalLM"]}).encode()},
            f"step {step}",
            branch=f"step{step}",
        )
    return {"org/run": run, "EleutherAI/pythia-70m": pythia}


def run_example(
    line: str, tree: Path, where: Path, bin_folder: Path, hub_url: str = ""
) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run `line` in a copy of `tree`: its result, and the files there before it ran."""
    shutil.copytree(tree, where, symlinks=True)
    if not re.search(r"-o merged(\s|$)", line):  # `merged`, the average of runs/checkpoint-*, for those that read it
        shutil.copytree(tree.parent / "merged", where / "merged")
    env = {
        **os.environ,
        "PATH": f"{bin_folder}{os.pathsep}{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(where),  # e.g. --install-completion writes to the shell's rc file: a copy's, never the user's
        "COLUMNS": "200",
    }
    if "hf://" in line:
        env = {k: v for k, v in env.items() if not k.startswith("HF_") and "proxy" not in k.lower()}
        cache = where.parent / f"{where.name}-hf"
        env.update(
            HF_ENDPOINT=hub_url,
            HF_HUB_CACHE=str(cache / "hub"),
            HF_HOME=str(cache),
            HF_TOKEN=HUB_TOKEN,
            NO_PROXY="127.0.0.1,localhost",
        )
    before = files(where)
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c", line], cwd=where, capture_output=True, text=True, timeout=120, env=env
    ), before


@pytest.fixture(scope="module")
def example_results(tmp_path_factory, bin_folder):
    root = tmp_path_factory.mktemp("readme")
    build_tree(root / "tree")
    lines = [line for line in dict.fromkeys(example_lines()) if line not in SKIP]
    with (
        HubStandin(hub_repos(root / "tree"), token=HUB_TOKEN) as hub,
        ThreadPoolExecutor(max(2, min(6, os.cpu_count() or 2))) as pool,
    ):
        results = pool.map(
            lambda item: run_example(item[1], root / "tree", root / f"example{item[0]}", bin_folder, hub.url), enumerate(lines)
        )
        done = dict(zip(lines, ((result, before, root / f"example{i}") for i, (result, before) in enumerate(results))))
        assert not hub.unknown, hub.unknown
        assert not any(key.endswith("optimizer.pt") for key in hub.served), "an example downloaded training state"
        return done


def test_the_readme_has_examples_for_every_command():
    commands = {cmd for line in example_lines() for cmd, _ in invocations(line)}
    assert set(COMMANDS) <= commands, commands
    assert not set(SKIP) - set(example_lines()), "SKIP lists lines the README no longer has"


@pytest.mark.parametrize("line", list(dict.fromkeys(example_lines())))
def test_readme_example_runs(line, example_results):
    if line in SKIP:
        pytest.skip(SKIP[line])
    result, before, folder = example_results[line]
    expected = EXPECTED_EXIT.get(line, 0)
    assert result.returncode == expected, f"$ {line}\nexit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    if " --json" in line and "|" not in line and "$(" not in line:
        json.loads(result.stdout)
    if "--dry-run" in line:
        assert files(folder) == before, "a dry run wrote something"
    if "--invert" in line and "| xargs" in line:
        kept = sorted(p.name for p in (folder / "ckpts").iterdir())
        assert kept and len(kept) < 7, kept  # something was removed, the chosen ones were kept
