"""hf:// inputs, select over a repo's checkpoints, the model card and --push-to-hub (ckptavg/hub.py, ckptavg/card.py).

The Hub is never reached: (a) offline, from a Hugging Face cache built by hand (HF_HUB_OFFLINE=1, HF_HUB_CACHE);
(b) online, against tests/hub_server.py's stand-in of the Hub's HTTP API on 127.0.0.1 (HF_ENDPOINT), through the
real huggingface_hub client. Every call runs `ckptavg` in a process of its own with its environment set, since
huggingface_hub reads those variables when it is imported.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
from conftest import make_state, read_output, reference_average
from hub_server import CkptavgRunner, HubRepo, HubStandin, hub_url, write_cache
from safetensors.torch import load, save

pytest.importorskip("huggingface_hub")

TOKEN = "hf_standin_secret_0123456789"
STEPS = (100, 200, 300)
TRAINING_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin")
CONFIG = json.dumps({"architectures": ["TinyForCausalLM"], "model_type": "tiny", "torch_dtype": "float32"}).encode()
TOKENIZER = json.dumps({"version": "1.0", "model": {"type": "BPE"}}).encode()


def eval_loss(step: int) -> float:
    return 1 + abs(step - 200) / 1000  # best at 200


def weights(step: int) -> bytes:
    return save(make_state(step // 100), metadata={"format": "pt"})


def sharded(step: int) -> dict[str, bytes]:
    state = make_state(step // 100)
    names = sorted(state)
    halves = [names[:3], names[3:]]
    files, weight_map = {}, {}
    for i, part in enumerate(halves, 1):
        shard = f"model-{i:05d}-of-00002.safetensors"
        files[shard] = save({n: state[n] for n in part}, metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
    files["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    return files


def trainer_checkpoint(step: int) -> dict[str, bytes]:
    """A Trainer checkpoint-N folder as hub_strategy="all_checkpoints" uploads it, training state included."""
    state = {
        "global_step": step,
        "best_model_checkpoint": "out/checkpoint-200",
        "log_history": [{"step": s, "eval_loss": eval_loss(s)} for s in STEPS if s <= step],
    }
    return {
        "model.safetensors": weights(step),
        "config.json": CONFIG,
        "tokenizer.json": TOKENIZER,
        "optimizer.pt": b"\x00" * 300_000,
        "scheduler.pt": b"s" * 1_000,
        "rng_state.pth": b"r" * 1_000,
        "training_args.bin": b"t" * 500,
        "trainer_state.json": json.dumps(state).encode(),
    }


def make_repos() -> dict[str, HubRepo]:
    """org/run: checkpoint-N folders on main (hub_strategy all_checkpoints); org/pythia: a branch per step
    (step200 sharded), tag `docs` on a commit without weights; org/trainer: "Training in progress, step N"
    commits at the root (every_save); org/other: other shapes; org/gated: gated."""
    run = HubRepo()
    run.commit({".gitattributes": b"*.safetensors filter=lfs\n"}, "initial commit")
    for step in STEPS:
        folder = {f"checkpoint-{step}/{name}": data for name, data in trainer_checkpoint(step).items()}
        run.commit(
            {"model.safetensors": weights(step), "config.json": CONFIG, "training_args.bin": b"t" * 500, **folder},
            f"Training in progress, step {step}",
        )
    pythia = HubRepo()
    first = pythia.commit({".gitattributes": b"*.safetensors filter=lfs\n", "README.md": b"# pythia\n"}, "initial commit")
    pythia.tags["docs"] = first
    for step in STEPS:
        files = sharded(step) if step == 200 else {"model.safetensors": weights(step)}
        pythia.commit({**files, "config.json": CONFIG}, f"step {step}", branch=f"step{step}")
    pythia.commit({"model.safetensors": weights(300), "config.json": CONFIG}, "final model")
    trainer = HubRepo()
    trainer.commit({".gitattributes": b"*.safetensors filter=lfs\n"}, "initial commit")
    for step in STEPS:
        trainer.commit(
            {"model.safetensors": weights(step), "config.json": CONFIG, "training_args.bin": b"t" * 500},
            f"Training in progress, step {step}",
        )
    trainer.commit({"README.md": b"# trained\n"}, "End of training")
    other = HubRepo()
    state = {k: torch.cat([v, v[:1]]) if v.dim() == 2 else v for k, v in make_state(9).items()}
    state["extra.weight"] = torch.zeros(100_000)  # 400 KB: more than the header's range read, so a download would show
    other.commit({"model.safetensors": save(state, metadata={"format": "pt"}), "config.json": CONFIG}, "other shapes")
    base, lora = HubRepo(), HubRepo()
    g = torch.Generator().manual_seed(5)
    base.commit(
        {
            "model.safetensors": save({"layer.weight": torch.randn(8, 8, generator=g), "layer.bias": torch.zeros(8)}),
            "config.json": json.dumps({"architectures": ["Tiny"], "model_type": "tiny"}).encode(),
        },
        "base model",
    )
    for i, step in enumerate(STEPS):
        moved = {
            "base_model.model.layer.lora_A.weight": torch.randn(2, 8, generator=g) * (i + 1),
            "base_model.model.layer.lora_B.weight": torch.randn(8, 2, generator=g),
        }
        config = {
            "peft_type": "LORA",
            "r": 2,
            "lora_alpha": 4,
            "target_modules": ["layer"],
            "base_model_name_or_path": "org/base",
        }
        lora.commit(
            {
                f"checkpoint-{step}/adapter_model.safetensors": save(moved),
                f"checkpoint-{step}/adapter_config.json": json.dumps(config).encode(),
                f"checkpoint-{step}/optimizer.pt": b"\x00" * 1000,
            },
            f"Training in progress, step {step}",
        )
    gated = HubRepo(gated=True)
    gated.commit({"model.safetensors": weights(100), "config.json": CONFIG}, "gated model")
    return {
        "org/run": run,
        "org/pythia": pythia,
        "org/trainer": trainer,
        "org/other": other,
        "org/gated": gated,
        "org/base": base,
        "org/lora": lora,
    }


@pytest.fixture(scope="module")
def repos():
    return make_repos()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    runner = CkptavgRunner(tmp_path_factory.mktemp("runner"))
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def offline_cache(tmp_path_factory, repos):
    """Every repo but org/gated written into a cache by hand."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    for repo_id, repo in repos.items():
        if repo_id != "org/gated":
            write_cache(cache, repo_id, repo)
    return cache


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, repos):
    """org/run's checkpoint-N folders as plain local folders: what the hf:// results are compared with."""
    root = tmp_path_factory.mktemp("local") / "run"
    main = repos["org/run"].commits[repos["org/run"].branches["main"]]
    for path, data in main.files.items():
        if path.startswith("checkpoint-"):
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_bytes(data)
    return root


def environment(cache: Path, endpoint: str | None = None, offline: bool = False, token: str | None = TOKEN) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_")) and "proxy" not in k.lower()
    }
    env.update(
        HF_HUB_CACHE=str(cache),
        HF_HOME=str(cache.parent / "home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        NO_PROXY="127.0.0.1,localhost",
        HF_HUB_ETAG_TIMEOUT="5",
        HF_HUB_DOWNLOAD_TIMEOUT="5",
    )
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    if token:
        env["HF_TOKEN"] = token
    return env


def commit_of(repos: dict[str, HubRepo], repo_id: str, revision: str = "main") -> str:
    sha = repos[repo_id].resolve(revision)
    assert sha is not None
    return sha


def one_line_error(result, code: int, *words: str) -> None:
    assert result.code == code, (result.code, result.out, result.err)
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.err, result.err
    for word in words:
        assert word in lines[0], lines[0]
    assert TOKEN not in result.out + result.err


# --- (a) offline, from a cache built by hand ------------------------------------------------------------


def test_offline_average_equals_the_local_average(run, offline_cache, local_run, repos, tmp_path):
    env = environment(offline_cache, offline=True)
    inputs = [hub_url("org/run", None, f"checkpoint-{s}") for s in STEPS]
    hub = run("average", *inputs, "-o", tmp_path / "from-hub", "--json", env=env)
    assert hub.code == 0, hub.err
    local = run("average", *(local_run / f"checkpoint-{s}" for s in STEPS), "-o", tmp_path / "from-disk", env=env)
    assert local.code == 0, local.err
    assert (tmp_path / "from-hub" / "model.safetensors").read_bytes() == (
        tmp_path / "from-disk" / "model.safetensors"
    ).read_bytes()
    expected = reference_average([make_state(s // 100) for s in STEPS])
    out = read_output(tmp_path / "from-hub")
    for name, tensor in expected.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(out[name].double(), tensor.double(), rtol=0, atol=1e-6)
    report = json.loads(hub.out)
    main = commit_of(repos, "org/run")
    assert [i["step"] for i in report["inputs"]] == list(STEPS)
    assert [i["path"] for i in report["inputs"]] == [f"hf://org/run@{main}/checkpoint-{s}" for s in STEPS]
    assert all(
        i["hub"]["repo"] == "org/run" and i["hub"]["revision"] is None and i["hub"]["commit"] == main for i in report["inputs"]
    )
    recipe = json.loads((tmp_path / "from-hub" / "ckptavg.json").read_text())
    assert [i["hub"]["commit"] for i in recipe["inputs"]] == [main] * 3 and recipe["inputs"][0]["hub"][
        "subfolder"
    ] == "checkpoint-100"
    assert "README.md" in recipe["written"] and sorted(os.listdir(tmp_path / "from-hub")) == sorted(
        recipe["written"] + ["ckptavg.json"]
    )
    assert (tmp_path / "from-hub" / "tokenizer.json").read_bytes() == TOKENIZER  # model files copied from the cache


def test_offline_hub_inputs_under_torchrun(run, offline_cache, tmp_path):
    """Two torchrun ranks resolve the same hf:// inputs from the cache and write the single process's bytes."""
    import subprocess
    import sys

    env = environment(offline_cache, offline=True)
    inputs = [hub_url("org/run", None, f"checkpoint-{s}") for s in STEPS]
    assert run("average", *inputs, "-o", tmp_path / "one", "-q", env=env).code == 0
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "ckptavg",
        "average",
        *inputs,
        "-o",
        str(tmp_path / "two"),
        "--json",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["world_size"] == 2
    assert (tmp_path / "one" / "model.safetensors").read_bytes() == (tmp_path / "two" / "model.safetensors").read_bytes()


def test_offline_select_expands_folders_and_step_branches_and_pins_commits(run, offline_cache, repos, tmp_path):
    env = environment(offline_cache, offline=True)
    main = commit_of(repos, "org/run")
    chosen = run("select", "hf://org/run", "--metric", "eval_loss", "--top-k", "2", env=env)
    assert chosen.code == 0, chosen.err
    assert chosen.out.split() == [f"hf://org/run@{main}/checkpoint-{s}" for s in (100, 200)]  # the two best, in step order
    listed = run("select", "hf://org/run", "--json", env=env)
    candidates = json.loads(listed.out)["candidates"]
    assert [c["metrics"]["eval_loss"] for c in candidates] == [eval_loss(s) for s in STEPS]
    assert [c["trainer_best"] for c in candidates] == [False, True, False]
    branches = run("select", "hf://org/pythia", "--last", "2", env=env)
    assert branches.code == 0, branches.err
    pinned = branches.out.split()
    assert pinned == [f"hf://org/pythia@{commit_of(repos, 'org/pythia', f'step{s}')}" for s in (200, 300)]
    # select | xargs average: the pinned commits alone give the steps back (from the cached refs) and the weights
    merged = run("average", *pinned, "-o", tmp_path / "merged", "--json", env=env)
    assert merged.code == 0, merged.err
    assert [i["step"] for i in json.loads(merged.out)["inputs"]] == [200, 300]
    expected = reference_average([make_state(2), make_state(3)])
    torch.testing.assert_close(
        read_output(tmp_path / "merged")["layer.0.weight"].double(), expected["layer.0.weight"].double(), rtol=0, atol=1e-6
    )


def test_offline_inspect_and_export(run, offline_cache, repos, tmp_path):
    env = environment(offline_cache, offline=True)
    shown = run("inspect", "hf://org/pythia@step200", "--json", env=env)
    assert shown.code == 0, shown.err
    report = json.loads(shown.out)
    assert report["step"] == 200 and report["path"] == f"hf://org/pythia@{commit_of(repos, 'org/pythia', 'step200')}"
    assert report["tensors"] == len(make_state(2)) and len(report["files"]) == 2  # the two shards
    exported = run("export", "hf://org/run/checkpoint-300", "-o", tmp_path / "exported", "--json", env=env)
    assert exported.code == 0, exported.err
    out = read_output(tmp_path / "exported")
    for name, tensor in make_state(3).items():
        assert torch.equal(out[name], tensor), name
    assert not any(n in os.listdir(tmp_path / "exported") for n in TRAINING_FILES)
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "exported" / "README.md")
    assert card.data.base_model == "org/run" and card.data.library_name == "transformers"
    assert "ckptavg export" in card.text and f"org/run@{commit_of(repos, 'org/run')}/checkpoint-300" in card.text


def test_offline_adapters_and_their_base_from_the_hub(run, offline_cache, repos, tmp_path):
    from huggingface_hub import ModelCard
    from safetensors.torch import load_file

    env = environment(offline_cache, offline=True)
    inputs = [hub_url("org/lora", None, f"checkpoint-{s}") for s in STEPS]
    adapter = run("average", *inputs, "-o", tmp_path / "adapter", env=env)
    assert adapter.code == 0, adapter.err
    assert sorted(os.listdir(tmp_path / "adapter")) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "ckptavg.json",
    ]
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    assert card.data.library_name == "peft" and card.data.base_model == "org/lora"
    merged = run("average", *inputs, "--adapter-mode", "merged", "--base", "hf://org/base", "-o", tmp_path / "merged", env=env)
    assert merged.code == 0, merged.err
    main = repos["org/lora"].commits[commit_of(repos, "org/lora")].files
    base = load_file(
        write_cache(tmp_path / "c", "org/base", repos["org/base"])
        / "snapshots"
        / commit_of(repos, "org/base")
        / "model.safetensors"
    )
    deltas = []
    for s in STEPS:
        t = load(main[f"checkpoint-{s}/adapter_model.safetensors"])
        deltas.append(
            2.0 * t["base_model.model.layer.lora_B.weight"].double() @ t["base_model.model.layer.lora_A.weight"].double()
        )  # alpha/r = 2
    expected = base["layer.weight"].double() + sum(deltas) / len(deltas)
    torch.testing.assert_close(read_output(tmp_path / "merged")["layer.weight"].double(), expected, rtol=0, atol=1e-5)


def test_offline_errors_are_one_line_and_write_nothing(run, offline_cache, tmp_path):
    empty = tmp_path / "empty" / "hub"
    empty.mkdir(parents=True)
    cases = [
        (
            environment(empty, offline=True),
            ["hf://org/run@main/checkpoint-100"],
            ("hf://org/run@main/checkpoint-100", "not in the cache", "HF_HUB_OFFLINE"),
        ),
        (environment(offline_cache, offline=True), ["hf://org/run@nope/checkpoint-100"], ("revision nope is not in the cache",)),
        (environment(offline_cache, offline=True), ["hf://org/pythia@docs"], ("no weights at org/pythia@docs",)),
        (
            environment(offline_cache, offline=True),
            ["hf://org/run/checkpoint-100/optimizer.pt"],
            ("no folder checkpoint-100/optimizer.pt",),
        ),
    ]
    for env, inputs, words in cases:
        result = run("average", *inputs, "-o", tmp_path / "out", env=env)
        one_line_error(result, 1, *words)
        assert not (tmp_path / "out").exists()
    assert os.listdir(empty) == []


# --- (b) online, against the stand-in -------------------------------------------------------------------


def test_online_average_downloads_only_what_it_needs(run, repos, tmp_path):
    cache = tmp_path / "hf" / "hub"
    with HubStandin(repos) as hub:
        env = environment(cache, hub.url)
        inputs = [hub_url("org/run", "main", f"checkpoint-{s}") for s in (100, 200)]
        result = run("average", *inputs, "-o", tmp_path / "merged", "--json", env=env)
        assert result.code == 0, result.err
        served = hub.served_files("org/run")
        wanted = {f"checkpoint-{s}/{name}" for s in (100, 200) for name in ("model.safetensors", "config.json", "tokenizer.json")}
        assert (
            {f"checkpoint-{s}/model.safetensors" for s in (100, 200)} <= served <= wanted
        )  # checkpoint-200's config: the same blob
        assert not hub.unknown, hub.unknown
        files = repos["org/run"].commits[commit_of(repos, "org/run")].files
        blobs = {files[p] for p in wanted}  # each distinct content once: huggingface_hub keeps blobs by hash
        header_reads = sum(min(100_001, len(weights(s))) for s in (100, 200))  # the range requests before the download
        assert sum(hub.served.values()) == sum(map(len, blobs)) + header_reads
        shown = run("inspect", inputs[0], "--json", env=env)
        assert shown.code == 0, shown.err
        assert (
            "on the Hub beside it, not downloaded: optimizer.pt, rng_state.pth, scheduler.pt, training_args.bin"
            in json.loads(shown.out)["notes"]
        )
        assert json.loads(shown.out)["metrics"] == {
            "eval_loss": eval_loss(100)
        }  # its trainer_state.json: inspect fetches that one
        assert hub.served_files("org/run") <= wanted | {"checkpoint-100/trainer_state.json"}
        assert sum(hub.served.values()) < repos["org/run"].size(commit_of(repos, "org/run")) / 5
    report = json.loads(result.out)
    assert [i["hub"]["revision"] for i in report["inputs"]] == ["main", "main"]
    assert report["inputs"][0]["hub"]["downloaded_bytes"] == len(weights(100)) + len(CONFIG) + len(TOKENIZER)
    # the cache now serves the same inputs offline, by name, and when the Hub cannot be reached
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    for name, env in (("offline", environment(cache, offline=True)), ("unreachable", environment(cache, closed))):
        again = run("average", *inputs, "-o", tmp_path / name, env=env)
        assert again.code == 0, again.err
        assert (tmp_path / name / "model.safetensors").read_bytes() == (tmp_path / "merged" / "model.safetensors").read_bytes()


def test_online_select_lists_branches_and_trainer_commits_without_downloading_weights(run, repos, tmp_path):
    cache = tmp_path / "hf" / "hub"
    with HubStandin(repos) as hub:
        env = environment(cache, hub.url)
        branches = run("select", "hf://org/pythia", env=env)
        commits = run("select", "hf://org/trainer", "--last", "2", env=env)
        folders = run("select", "hf://org/run", "--metric", "eval_loss", "--top-k", "1", env=env)
        assert (branches.code, commits.code, folders.code) == (0, 0, 0), branches.err + commits.err + folders.err
        assert not any(f.endswith((".safetensors", ".pt", ".pth", ".bin")) for key in hub.served for f in [key]), hub.served
        assert hub.served_files("org/run") == {f"checkpoint-{s}/trainer_state.json" for s in STEPS}
        assert branches.out.split() == [f"hf://org/pythia@{commit_of(repos, 'org/pythia', f'step{s}')}" for s in STEPS]
        history = repos["org/trainer"].history(commit_of(repos, "org/trainer"))
        by_title = {c.title: c.sha for c in history}
        assert commits.out.split() == [f"hf://org/trainer@{by_title[f'Training in progress, step {s}']}" for s in (200, 300)]
        assert folders.out.split() == [f"hf://org/run@{commit_of(repos, 'org/run')}/checkpoint-200"]
        merged = run("average", *commits.out.split(), "-o", tmp_path / "merged", "--json", env=env)
        assert merged.code == 0, merged.err
        checked = run("select", "hf://org/pythia", "--skip-nonfinite", "--json", env=env)  # reads every tensor: downloads them
        assert checked.code == 0 and len(json.loads(checked.out)["chosen"]) == 3, checked.err
        assert {"model.safetensors", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"} <= hub.served_files(
            "org/pythia"
        )
        assert not hub.unknown, hub.unknown
    inputs = json.loads(merged.out)["inputs"]
    assert [(i["step"], i["hub"]["step_source"]) for i in inputs] == [
        (s, f"commit title (Training in progress, step {s})") for s in (200, 300)
    ]


def test_push_uploads_the_folder_with_its_card(run, repos, tmp_path):
    from huggingface_hub import ModelCard

    cache = tmp_path / "hf" / "hub"
    with HubStandin(repos) as hub:
        env = environment(cache, hub.url)
        inputs = [hub_url("org/pythia", f"step{s}") for s in STEPS]
        result = run(
            "average",
            *inputs,
            "-o",
            tmp_path / "merged",
            "--push-to-hub",
            "me/pythia-avg",
            "--private",
            "--revision",
            "averaged",
            "--commit-message",
            "average of three steps",
            "--verify",
            "--json",
            env=env,
        )
        assert result.code == 0, result.err
        pushed = hub.repos["me/pythia-avg"]
        assert pushed.private
        head = pushed.commits[pushed.branches["averaged"]]
        assert head.title == "average of three steps"
        local = {p.name: p.read_bytes() for p in (tmp_path / "merged").iterdir()}
        assert head.files == local and "README.md" in local and "ckptavg.json" in local
        assert hub.validated and hub.validated[0]["base_model"] == "org/pythia"  # the card's YAML passed the Hub's check
        assert {a for a in hub.auth_seen} == {f"Bearer {TOKEN}"}  # the token went to the Hub, never to the output
        assert not hub.unknown, hub.unknown
    assert TOKEN not in result.out + result.err
    report = json.loads(result.out)
    assert report["pushed"]["commit_url"] == f"{hub.url}/me/pythia-avg/commit/{pushed.branches['averaged']}"
    card = ModelCard.load(tmp_path / "merged" / "README.md")
    assert card.text.startswith("# merged\n") and "- Verified: every tensor was read back" in card.text
    assert card.data.base_model == "org/pythia" and card.data.base_model_relation == "merge"
    assert card.data.tags == ["ckptavg", "merge"] and card.data.library_name == "transformers"
    for s in STEPS:
        assert f"org/pythia@{commit_of(repos, 'org/pythia', f'step{s}')}" in card.text and f"| step{s} | {s} |" in card.text
    assert "ckptavg average hf://org/pythia@step100" in card.text and "--push-to-hub me/pythia-avg" in card.text
    with HubStandin(hub.repos) as hub:  # a second push to the repo, now existing: its default branch this time
        again = run(
            "export",
            inputs[0],
            "-o",
            tmp_path / "again",
            "--push-to-hub",
            "me/pythia-avg",
            "--json",
            env=environment(cache, hub.url),
        )
        assert again.code == 0, again.err
        pushed = hub.repos["me/pythia-avg"]
        assert set(pushed.branches) == {"main", "averaged"} and pushed.commits[pushed.branches["main"]].files["model.safetensors"]
        assert not hub.unknown, hub.unknown


def test_a_failed_push_keeps_the_local_output_and_exits_3(run, repos, tmp_path):
    cache = tmp_path / "hf" / "hub"
    with HubStandin(repos) as hub:
        hub.fail_commits = True
        result = run(
            "export",
            hub_url("org/pythia", "step100"),
            "-o",
            tmp_path / "model",
            "--push-to-hub",
            "me/model",
            env=environment(cache, hub.url),
        )
    one_line_error(result, 3, "me/model", "push failed", "HTTP 403", "storage quota", f"hf upload me/model {tmp_path / 'model'}")
    assert "not pushed" in result.out  # the summary of the written output, then the one error line
    with HubStandin(repos) as hub:  # --json: the report of the written output is printed all the same
        hub.fail_commits = True
        result = run(
            "export",
            hub_url("org/pythia", "step100"),
            "-o",
            tmp_path / "model2",
            "--push-to-hub",
            "me/model",
            "--json",
            env=environment(cache, hub.url),
        )
    assert result.code == 3 and "push failed" in result.err
    report = json.loads(result.out)
    assert report["output"] == str(tmp_path / "model2") and "storage quota" in report["pushed"]["error"]
    assert (tmp_path / "model" / "model.safetensors").is_file() and (tmp_path / "model" / "README.md").is_file()
    out = read_output(tmp_path / "model")
    assert all(torch.equal(out[n], t) for n, t in make_state(1).items())


def test_push_refused_before_any_work(run, repos, tmp_path):
    cache = tmp_path / "hf" / "hub"
    with HubStandin(repos) as hub:
        env = environment(cache, hub.url)
        single = run(
            "average",
            hub_url("org/pythia", "step100"),
            hub_url("org/pythia", "step300"),
            "-o",
            tmp_path / "m.safetensors",
            "--push-to-hub",
            "me/m",
            env=env,
        )
        dry = run("export", hub_url("org/pythia", "step100"), "-o", tmp_path / "m", "--dry-run", "--push-to-hub", "me/m", env=env)
        alone = run("export", hub_url("org/pythia", "step100"), "-o", tmp_path / "m", "--private", env=env)
        assert hub.log == []
    one_line_error(single, 2, "--push-to-hub", "one file")
    one_line_error(dry, 2, "--dry-run")
    one_line_error(alone, 2, "--private", "--push-to-hub")
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "m").exists()


def test_online_errors_are_one_line_exit_1_and_write_nothing(run, repos, tmp_path):
    cache = tmp_path / "hf" / "hub"
    initial = repos["org/run"].history(commit_of(repos, "org/run"))[-1].sha
    with HubStandin(repos, token="another-token") as hub:
        env = environment(cache, hub.url)
        cases = [
            (["hf://org/missing@main"], ("hf://org/missing@main", "no repo org/missing", "HF_TOKEN")),
            (["hf://org/run@nope/checkpoint-100"], ("no revision 'nope' in org/run",)),
            ([f"hf://org/run@{initial}"], ("no weights at", ".gitattributes")),
            (["hf://org/run@main/checkpoint-999"], ("no folder checkpoint-999",)),
            (["hf://org/gated"], ("gated repo", "hf auth login")),
            (
                [hub_url("org/pythia", "step100"), "hf://org/other"],
                ("hf://org/other", "shape [65, 48], expected [64, 48]", "before any weights were downloaded"),
            ),
        ]
        for inputs, words in cases:
            result = run("average", *inputs, "-o", tmp_path / "out", env=env)
            one_line_error(result, 1, *words)
            assert not (tmp_path / "out").exists()
        assert hub.served["org/other:model.safetensors"] == 100_001  # its header read by one range request, never downloaded
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    result = run(
        "average", "hf://org/run@main/checkpoint-100", "-o", tmp_path / "out", env=environment(tmp_path / "hf2" / "hub", closed)
    )
    one_line_error(result, 1, "hf://org/run@main/checkpoint-100", "cannot reach the Hub")


# --- (c) the card ------------------------------------------------------------------------------------------


def test_card_for_local_inputs_and_adapters(tmp_path):
    from huggingface_hub import ModelCard

    from ckptavg.card import model_card

    recipe = {
        "version": "0.1.0",
        "created": "2026-01-01T00:00:00Z",
        "strategy": "linear",
        "order": "step",
        "inputs": [
            {"path": "runs/checkpoint-1|2", "step": 1, "epoch": None, "weight": 0.25, "format": "safetensors"},
            {"path": "runs/checkpoint-2", "step": 2, "epoch": None, "weight": 0.75, "format": "safetensors"},
        ],
        "input_dtypes": {"float32": 3},
        "output_dtypes": {"bfloat16": 3},
        "accumulate": {"float32": 3},
    }
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "README.md").write_text(str(model_card(recipe, tmp_path)))
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "peft" and card.data.tags == ["ckptavg", "merge"] and card.data.base_model is None
    assert "`runs/checkpoint-1\\|2`" in card.text and "| 2 | 0.75 |" in card.text and "bfloat16 (3)" in card.text
    assert (
        "ckptavg.average(['runs/checkpoint-1|2', 'runs/checkpoint-2'], ...)" in card.text
    )  # not run as `ckptavg`: the Python call

    exported = {
        **recipe,
        "strategy": "export",
        "order": "given",
        "inputs": [{**recipe["inputs"][1], "weight": 1.0, "hub": {"repo": "org/run", "commit": "c" * 40}}],
        "copied_from_newest": ["step"],
    }
    (tmp_path / "README.md").write_text(str(model_card(exported, tmp_path)))
    card = ModelCard.load(tmp_path / "README.md")
    assert (
        card.data.tags == ["ckptavg"] and card.data.base_model == "org/run" and "base_model_relation" not in card.data.to_dict()
    )  # not a merge
    assert "Strategy" not in card.text and "accumulated" not in card.text and "Copied from the newest" not in card.text


# --- (d) the cache's symlinks are trusted only as far as the cache's layout goes -------------------------


def test_a_snapshot_shard_may_link_into_its_blobs_but_nowhere_else(tmp_path, repos):
    from ckptavg.checkpoint import open_checkpoint
    from ckptavg.errors import InputError

    root = write_cache(tmp_path / "hub", "org/pythia", repos["org/pythia"])
    snapshot = root / "snapshots" / commit_of(repos, "org/pythia", "step200")
    assert len(open_checkpoint(snapshot).tensors) == len(make_state(2))  # symlinks into ../../blobs: read
    shard = snapshot / "model-00001-of-00002.safetensors"
    elsewhere = tmp_path / "elsewhere.safetensors"
    elsewhere.write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(elsewhere)
    with pytest.raises(InputError, match="symlink that leads outside the checkpoint folder"):
        open_checkpoint(snapshot)
    index = json.loads((snapshot / "model.safetensors.index.json").read_text())
    blob = next((root / "blobs").iterdir()).name
    index["weight_map"] = {name: f"../../blobs/{blob}" for name in index["weight_map"]}
    (snapshot / "model.safetensors.index.json").unlink()
    (snapshot / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="outside the checkpoint folder"):
        open_checkpoint(snapshot)


def test_a_mistyped_hub_input_gets_the_hub_spelling(cli, tmp_path):
    for typed in ("hf:org/run@main/checkpoint-100", "HF://org/run"):
        result = cli("average", typed, typed + "-2", "-o", tmp_path / "out")
        assert result.code == 1 and "no such file or folder; a Hub input is written hf://ORG/REPO" in result.err, result.err
    result = cli("select", "hf:org/run", "--last", "1")
    assert result.code == 1 and "a Hub input is written hf://" in result.err
    assert "Hub input" not in cli("average", tmp_path / "nope", tmp_path / "nope2", "-o", tmp_path / "out").err


def test_offline_sweep_of_hub_inputs_equals_the_local_averages(run, offline_cache, local_run, repos, tmp_path):
    env = environment(offline_cache, offline=True)
    inputs = [hub_url("org/run", None, f"checkpoint-{s}") for s in STEPS]
    hub = run("sweep", *inputs, "-o", tmp_path / "s", "--recipe", "mean", "--recipe", "last:2", "--json", env=env)
    assert hub.code == 0, hub.err
    local = run("average", *(local_run / f"checkpoint-{s}" for s in STEPS[-2:]), "-o", tmp_path / "last-2", env=env)
    assert local.code == 0, local.err
    assert (tmp_path / "s" / "last-2" / "model.safetensors").read_bytes() == (
        tmp_path / "last-2" / "model.safetensors"
    ).read_bytes()
    main = commit_of(repos, "org/run")
    report = json.loads(hub.out)
    assert report["candidates"][1]["inputs"] == [f"hf://org/run@{main}/checkpoint-{s}" for s in STEPS[-2:]]
    assert (tmp_path / "s" / "mean" / "tokenizer.json").read_bytes() == TOKENIZER
