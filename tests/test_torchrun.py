"""`ckptavg average` under torchrun: several processes (and two torchrun agents forming a two-node job through a
c10d rendezvous on 127.0.0.1) write one output that is byte for byte the output of one process; failures on
any rank fail the job with one line and leave nothing."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptavg.distributed import assign, share_plan, split_work
from ckptavg.formats.base import FILES
from ckptavg.merge.plan import build_plan
from ckptavg.merge.weights import parse_weights

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def ckptavg(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ckptavg", *map(str, args)], capture_output=True, text=True, env=_env(), cwd=cwd, timeout=300
    )


def torchrun(
    nproc: int, *args: str | Path, cwd: Path | None = None, timeout: float = 300, console_script: bool = False
) -> subprocess.CompletedProcess:
    """`torchrun ... -m ckptavg ARGS`, or with console_script `torchrun ... --no-python ckptavg ARGS`."""
    program = ["--no-python", str(Path(sys.executable).parent / "ckptavg")] if console_script else ["-m", "ckptavg"]
    command = [*TORCHRUN, "--standalone", "--nproc-per-node", str(nproc), *program, *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=_env(), cwd=cwd, timeout=timeout)


def ckptavg_lines(stderr: str) -> list[str]:
    """The lines ckptavg printed on stderr (not torchrun's banner and failure report)."""
    return [line for line in stderr.splitlines() if line.startswith("error:") or line.startswith("warning:")]


def same_output(a: Path, b: Path, world_size: int) -> None:
    """Every file byte for byte the same, except ckptavg.json: the same but for its time and world_size; and the
    model card README.md: the same metadata and inputs table (its title, command line and time differ)."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name == "ckptavg.json":
            left, right = json.loads((a / name).read_text()), json.loads((b / name).read_text())
            left.pop("created"), right.pop("created")
            for recipe in (left, right):  # the model card names its output and command line, which differ
                recipe.get("files", {}).pop("README.md", None)
            assert right.pop("world_size") == world_size
            assert left == right
        elif name == "README.md":
            from huggingface_hub import ModelCard

            left, right = ModelCard.load(a / name), ModelCard.load(b / name)
            assert left.data.to_dict() == right.data.to_dict()
            rows = [[line for line in card.text.splitlines() if line.startswith("| ")] for card in (left, right)]
            assert rows[0] == rows[1] and len(rows[0]) > 1
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def stray_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "ckptavg-" in p.name)


@pytest.fixture(scope="session")
def llama_bf16_run(tmp_path_factory):
    """Three checkpoints of a real transformers Llama trained a few steps, saved by save_pretrained in bf16 as
    sharded safetensors; the embedding and lm_head are large enough to be split between ranks."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("llama_bf16")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    paths = []
    for step in (10, 20, 30):
        for _ in range(2):
            batch = torch.randint(0, 8192, (2, 16))
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        folder = root / f"checkpoint-{step}"
        model.to(torch.bfloat16).save_pretrained(folder, max_shard_size="4MB")
        model.to(torch.float32)
        paths.append(folder)
    assert len(list(paths[0].glob("model-*.safetensors"))) > 3
    return paths


def test_shares_cover_the_plan_once_and_split_large_tensors(llama_bf16_run):
    """Unit level: for any world size the units tile every tensor exactly once, large tensors are split, and the
    shares are balanced and the same on every call."""
    from ckptavg.checkpoint import LoadOptions, open_checkpoint

    try:
        inputs = [open_checkpoint(p, LoadOptions()) for p in llama_bf16_run]
        plan = build_plan(inputs, parse_weights(None, None, len(inputs)))
        for world_size in (1, 2, 3, 7, 64):
            units = split_work(plan, world_size)
            shares = assign(units, world_size)
            assert shares == assign(split_work(plan, world_size), world_size)
            covered: dict[int, list[tuple[int, int]]] = {}
            for share in shares:
                for u in share:
                    covered.setdefault(u.entry, []).append((u.first, u.count))
            for index, entry in enumerate(plan.entries):
                ranges = sorted(covered.get(index, []))
                assert sum(c for _, c in ranges) == entry.numel
                assert all(a + n == b for (a, n), (b, _) in zip(ranges, ranges[1:]))
            embed = next(i for i, e in enumerate(plan.entries) if e.name == "model.embed_tokens.weight")
            assert len(covered[embed]) >= 2
            loads = [sum(u.read_bytes for u in share) for share in shares]
            assert max(loads) - min(loads) <= max(u.read_bytes for u in units)
            if world_size == 3:
                sliced = share_plan(plan, shares[1])
                assert all(e.alias_of is None and len(e.shape) == 1 for e in sliced.entries)
    finally:
        FILES.close()


def test_two_and_three_ranks_write_the_bytes_of_one_process(llama_bf16_run, tmp_path):
    one = tmp_path / "one"
    result = ckptavg("average", *llama_bf16_run, "-o", one, "--max-shard-size", "5MB", "--verify", "-q")
    assert result.returncode == 0, result.stderr
    assert len(list(one.glob("model-*.safetensors"))) >= 4
    result = torchrun(2, "average", *llama_bf16_run, "-o", tmp_path / "two", "--max-shard-size", "5MB", "--verify", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # printed once, by rank 0
    assert report["world_size"] == 2 and report["verified"]
    assert report["bytes_read"] == report["bytes_to_read"]
    same_output(one, tmp_path / "two", 2)
    result = torchrun(
        3,
        "average",
        *llama_bf16_run,
        "-o",
        tmp_path / "three",
        "--max-shard-size",
        "5MB",
        "--weights",
        "1,2,5",
        console_script=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("strategy") == 1 and "3 ranks" in result.stdout
    assert (
        ckptavg(
            "average", *llama_bf16_run, "-o", tmp_path / "weighted", "--max-shard-size", "5MB", "--weights", "1,2,5", "-q"
        ).returncode
        == 0
    )
    same_output(tmp_path / "weighted", tmp_path / "three", 3)
    assert stray_files(tmp_path) == []


def test_trainer_checkpoints_and_pt_files(hf_run, torch_run, tmp_path):
    """transformers Trainer checkpoint folders (fp32, tied embeddings) and plain torch.save files, as a folder,
    one .safetensors file and a .pt file."""
    trainer_inputs = sorted(hf_run.glob("checkpoint-*"))[-3:]
    assert ckptavg("average", *trainer_inputs, "-o", tmp_path / "one", "--max-shard-size", "20KB", "-q").returncode == 0
    result = torchrun(2, "average", *trainer_inputs, "-o", tmp_path / "two", "--max-shard-size", "20KB", "-q")
    assert result.returncode == 0, result.stderr
    same_output(tmp_path / "one", tmp_path / "two", 2)

    pt_inputs = sorted(p for p in torch_run.iterdir() if p.suffix == ".pt")
    for name in ("one.safetensors", "one.pt"):
        assert ckptavg("average", *pt_inputs, "-o", tmp_path / name, "-q").returncode == 0
        result = torchrun(3, "average", *pt_inputs, "-o", tmp_path / name.replace("one", "three"), "-q")
        assert result.returncode == 0, result.stderr
    single, shared = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "three.safetensors")
    assert single.keys() == shared.keys() and all(torch.equal(single[k], shared[k]) for k in single)
    single, shared = torch.load(tmp_path / "one.pt", weights_only=True), torch.load(tmp_path / "three.pt", weights_only=True)
    assert single.keys() == shared.keys() and all(torch.equal(single[k], shared[k]) for k in single)
    assert stray_files(tmp_path) == []


def test_ranges_written_in_any_order_make_the_file_one_writer_makes(tmp_path):
    """RangeWriter into files laid out by lay_out_files gives the bytes of SafetensorsWriter, and the CRC-32s
    of its ranges combine into each tensor's."""
    import zlib

    from ckptavg.formats.writer import RangeWriter, SafetensorsWriter, TensorSpec, lay_out_files, tensor_offsets
    from ckptavg.verify import crc32_combine

    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(1000, generator=g),
        "empty": torch.zeros(0),
        "b": torch.randn(37, 5, generator=g).to(torch.bfloat16),
    }
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    shards, metadata = [specs[:2], specs[2:]], {"format": "pt"}
    one = [tmp_path / "one-1", tmp_path / "one-2"]
    writer = SafetensorsWriter(one, shards, metadata, durable=False)
    for t in tensors.values():
        writer.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
    writer.finish()
    many = [tmp_path / "many-1", tmp_path / "many-2"]
    lay_out_files(many, shards, metadata)
    where = tensor_offsets(many, shards, metadata)
    raw = {n: t.view(-1).view(torch.uint8).numpy().tobytes() for n, t in tensors.items()}
    pieces = [("b", 0, 100), ("a", 2400, 1600), ("b", 100, 270), ("a", 0, 2400)]  # two "ranks'" ranges, out of order
    crcs = {}
    for share in (pieces[:2], pieces[2:]):
        writer = RangeWriter(
            many, [(where[n][0], where[n][1] + lo, length) for n, lo, length in share], durable=False, checksums=True
        )
        for n, lo, length in share:
            writer.write(memoryview(raw[n][lo : lo + length]))
        writer.finish()
        crcs.update({(n, lo): (crc, length) for (n, lo, length), crc in zip(share, writer.crcs)})
    assert [p.read_bytes() for p in one] == [p.read_bytes() for p in many]
    for name in ("a", "b"):
        combined = 0
        for lo in sorted(lo for n, lo in crcs if n == name):
            combined = crc32_combine(combined, *crcs[(name, lo)])
        assert combined == zlib.crc32(raw[name])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_through_a_c10d_rendezvous(llama_bf16_run, tmp_path):
    """Two torchrun agents (two "nodes" of one process each) meet through a c10d rendezvous on 127.0.0.1."""
    assert ckptavg("average", *llama_bf16_run, "-o", tmp_path / "one", "--max-shard-size", "5MB", "-q").returncode == 0
    port = _free_port()
    command = [
        *TORCHRUN,
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        "ckptavg-test",
        "-m",
        "ckptavg",
        "average",
        *map(str, llama_bf16_run),
        "-o",
        str(tmp_path / "two"),
        "--max-shard-size",
        "5MB",
        "--json",
    ]
    nodes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()) for _ in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outputs]
    reports = [json.loads(out) for out, _ in outputs if out.strip()]
    assert len(reports) == 1 and reports[0]["world_size"] == 2
    same_output(tmp_path / "one", tmp_path / "two", 2)


def _nan_run(root: Path) -> list[Path]:
    """Three safetensors checkpoints; the last holds a NaN in the last element of its largest tensor, which is
    split between the ranks."""
    paths = []
    g = torch.Generator().manual_seed(0)
    start = {f"w{i}": torch.randn(1024, 1024, generator=g) for i in range(8)} | {"big": torch.randn(8192, 1024, generator=g)}
    for step in (1, 2, 3):
        state = {name: (w + 0.01 * step * torch.randn(w.shape, generator=g)).to(torch.bfloat16) for name, w in start.items()}
        if step == 3:
            state["big"][-1, -1] = float("nan")
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        paths.append(folder)
    return paths


def test_a_bad_input_found_by_another_rank_fails_the_job_with_one_line(tmp_path):
    inputs = _nan_run(tmp_path / "run")
    result = torchrun(2, "average", *inputs, "-o", tmp_path / "out", "--max-shard-size", "4MB", "-q")
    assert result.returncode != 0
    lines = ckptavg_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: rank ") and "checkpoint-3/model.safetensors" in lines[0] and "nan" in lines[0]
    assert "element 8388607" in lines[0]  # the index in the whole tensor, not in the rank's share of it
    assert f"traceback : {lines[0].removeprefix('error: ')}" in result.stderr  # torchrun's report shows the same line
    assert not (tmp_path / "out").exists() and stray_files(tmp_path) == []


def test_an_error_every_rank_meets_is_one_line_with_the_exit_code_of_one_process(hf_run, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    result = torchrun(2, "average", *sorted(hf_run.glob("checkpoint-*"))[-2:], "-o", tmp_path / "out", "--overwrite")
    assert result.returncode != 0
    lines = ckptavg_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: rank 0: ") and "not a ckptavg output" in lines[0], result.stderr
    assert "exitcode  : 3" in result.stderr  # torchrun's report: rank 0 exited with 3, as one process would
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the worker process with RANK=rank among the descendants of `parent`."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            if (
                f"RANK={rank}".encode() in environ
                and f"CKPTAVG_TEST_AGENT={parent}".encode() in environ
                and b"LOCAL_RANK=" + str(rank).encode() in environ
            ):
                return int(proc.name)
        except OSError:
            continue
    return None


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _start_and_catch_writing(args: list[str], rank: int) -> tuple[subprocess.Popen, int]:
    """Start a 2-rank job and stop `rank` (SIGSTOP) while it has an output file open for writing."""
    env = _env()
    env["CKPTAVG_TEST_AGENT"] = str(os.getpid())
    command = [*TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "ckptavg", *args]
    agent = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    pid = None
    while time.monotonic() < deadline and agent.poll() is None:
        pid = pid or _rank_pid(os.getpid(), rank)
        if pid is not None:
            try:
                targets = [os.readlink(f) for f in Path(f"/proc/{pid}/fd").iterdir()]
            except OSError:
                targets = []
            if any(".ckptavg-partial" in t for t in targets):
                os.kill(pid, signal.SIGSTOP)
                return agent, pid
        time.sleep(0.001)
    agent.kill()
    pytest.fail(f"rank {rank} was never seen writing: {agent.communicate()[1][-2000:]}")


@pytest.mark.parametrize("killed", [1, 0])
def test_a_rank_killed_mid_write_fails_the_job_and_leaves_nothing(tmp_path, killed):
    inputs = _nan_run(tmp_path / "run")
    (inputs[2] / "model.safetensors").unlink()
    save_file(
        {k: v.nan_to_num() * 1.5 for k, v in load_file(inputs[1] / "model.safetensors").items()}, inputs[2] / "model.safetensors"
    )  # not a copy
    out = tmp_path / "out"
    args = ["average", *map(str, inputs), "-o", str(out), "--max-shard-size", "4MB", "--memory-budget", "2MB", "--no-fsync"]
    agent, pid = _start_and_catch_writing(args, rank=killed)
    os.kill(pid, signal.SIGKILL)
    started = time.monotonic()
    _, stderr = agent.communicate(timeout=120)
    assert agent.returncode != 0 and time.monotonic() - started < 60
    assert "rank" in stderr and "Signal 9 (SIGKILL)" in stderr  # torchrun's report names the killed rank
    assert not out.exists()
    # Rank 0, stopped by torchrun, removes its staging folder; killed, it leaves it to the next run to remove.
    assert stray_files(tmp_path) == ([] if killed else [".out.ckptavg-lock", ".out.ckptavg-partial"])
    result = ckptavg("average", *inputs, "-o", out, "--max-shard-size", "4MB", "--json")
    assert result.returncode == 0 and stray_files(tmp_path) == []
    notes = json.loads(result.stdout)["notes"]
    assert any("removed what an interrupted run left: .out.ckptavg-partial" in n for n in notes) == (killed == 0)


def test_a_hung_rank_fails_the_job_within_the_timeout_naming_it(tmp_path):
    inputs = _nan_run(tmp_path / "run")
    (inputs[2] / "model.safetensors").unlink()
    save_file(
        {k: v.nan_to_num() * 1.5 for k, v in load_file(inputs[1] / "model.safetensors").items()}, inputs[2] / "model.safetensors"
    )  # not a copy
    out = tmp_path / "out"
    args = ["average", *map(str, inputs), "-o", str(out), "--memory-budget", "2MB", "--no-fsync", "--rank-timeout", "3"]
    agent, pid = _start_and_catch_writing(args, rank=1)
    leader = _rank_pid(os.getpid(), 0)
    assert leader is not None
    started = time.monotonic()
    try:
        while _alive(leader) and time.monotonic() - started < 60:
            time.sleep(0.05)
        waited = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)  # let torchrun's SIGTERM reach it
    _, stderr = agent.communicate(timeout=120)
    assert agent.returncode != 0 and 3 <= waited < 30
    lines = ckptavg_lines(stderr)
    assert lines == ["error: rank 1: stopped responding (no sign of life for 3 s): killed, or its node is down"], stderr
    assert not out.exists() and stray_files(tmp_path) == []


def test_select_inspect_and_export_under_torchrun(llama_bf16_run, tmp_path):
    result = torchrun(2, "select", *llama_bf16_run, "--last", "2")
    assert result.returncode == 0 and result.stdout.split() == [str(p) for p in llama_bf16_run[1:]]
    result = torchrun(2, "inspect", llama_bf16_run[0], "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["tensors"]
    assert ckptavg("export", llama_bf16_run[0], "-o", tmp_path / "one", "--max-shard-size", "5MB", "-q").returncode == 0
    result = torchrun(2, "export", llama_bf16_run[0], "-o", tmp_path / "two", "--max-shard-size", "5MB", "-q")
    assert result.returncode == 0, result.stderr
    same_output(tmp_path / "one", tmp_path / "two", 2)


def test_sweep_under_torchrun_writes_every_candidate_as_one_process(llama_bf16_run, tmp_path):
    """Each rank writes its share of every candidate from one read of its units: each candidate's files are
    byte for byte those of a sweep in one process, verified, and the inputs are read once between the ranks."""
    recipes = ["--recipe", "mean", "--recipe", "last:2", "--recipe", "ema:0.5"]
    args = [*llama_bf16_run, *recipes, "--max-shard-size", "5MB", "--no-fsync", "--json"]
    one = ckptavg("sweep", *args, "-o", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = torchrun(2, "sweep", *args, "-o", tmp_path / "two", "--verify")
    assert two.returncode == 0, two.stderr
    report = json.loads(two.stdout)
    assert report["world_size"] == 2 and report["verified"] and report["passes"] == 1
    assert report["bytes_read"] == json.loads(one.stdout)["bytes_read"] == report["bytes_to_read"]
    for name in ("mean", "last-2", "ema-0.5"):
        assert len(list((tmp_path / "two" / name).glob("model-*.safetensors"))) > 1
        left = json.loads((tmp_path / "one" / name / "ckptavg.json").read_text())
        right = json.loads((tmp_path / "two" / name / "ckptavg.json").read_text())
        assert not left.get("verified") and right["verified"]
        for recipe in (left, right):
            for key in ("verified", "files"):
                recipe.pop(key, None)
        (tmp_path / "two" / name / "ckptavg.json").write_text(json.dumps(right))
        (tmp_path / "one" / name / "ckptavg.json").write_text(json.dumps(left))
        same_output(tmp_path / "one" / name, tmp_path / "two" / name, 2)
    assert stray_files(tmp_path) == []


def test_tune_under_torchrun_rank_0_evaluates_and_every_rank_writes(lm_run, tmp_path):
    """tune under torchrun: the candidates (and the greedy soup's steps, each an order rank 0 gives) are written
    by both ranks, rank 0 alone runs the evaluation, and the table and the winner are those of one process. The
    evaluation is a stand-in that starts at once: a number made from the candidate's weights (its sha256)."""
    run, _ = lm_run
    paths = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-3:]
    log = tmp_path / "evaluated.log"
    script = tmp_path / "score.py"
    script.write_text(
        "import hashlib, os, sys\n"
        f"open({str(log)!r}, 'a').write(os.environ.get('RANK', '-') + '\\n')\n"
        "digest = hashlib.sha256(open(os.path.join(sys.argv[1], 'model.safetensors'), 'rb').read()).hexdigest()\n"
        "print(int(digest[:8], 16) / 2**32)\n"
    )
    args = [
        *paths,
        "--eval",
        f"{sys.executable} {script} {{model}}",
        "--mode",
        "min",
        "--recipe",
        "mean",
        "--greedy-soup",
        "--json",
    ]
    one = ckptavg("tune", *args, "-o", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    evaluated = len(log.read_text().splitlines())
    two = torchrun(2, "tune", *args, "-o", tmp_path / "two")
    assert two.returncode == 0, two.stderr
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert b["world_size"] == 2 and b["evaluated"] == a["evaluated"] == evaluated > 3
    assert log.read_text().splitlines()[evaluated:] == ["0"] * evaluated  # every evaluation on rank 0
    assert [(c["name"], c["score"]) for c in a["candidates"]] == [(c["name"], c["score"]) for c in b["candidates"]]
    assert a["winner"] == b["winner"] and a["soup"]["kept"] == b["soup"]["kept"]
    assert len(a["soup"]["steps"]) > 1  # the soup wrote means of its own, each an order to the other rank
    assert (tmp_path / "one" / "model.safetensors").read_bytes() == (tmp_path / "two" / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evaluated.log", "one", "score.py", "two"]  # no staging left


def _api_worker(rank: int, port: int, inputs: list[str], out: str) -> None:
    import torch.distributed as dist

    import ckptavg

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    report = ckptavg.average(inputs, out, max_shard_size="5MB")
    assert report.world_size == 2
    assert dist.is_initialized()  # the caller's group is left as it was
    dist.destroy_process_group()


def test_python_api_inside_an_initialised_process_group(llama_bf16_run, tmp_path):
    import torch.multiprocessing as mp

    assert ckptavg("average", *llama_bf16_run, "-o", tmp_path / "one", "--max-shard-size", "5MB", "-q").returncode == 0
    mp.spawn(_api_worker, args=(_free_port(), [str(p) for p in llama_bf16_run], str(tmp_path / "two")), nprocs=2)
    same_output(tmp_path / "one", tmp_path / "two", 2)


def test_a_share_of_the_read_back_checks_only_its_files_and_catches_a_bad_crc(tmp_path):
    """verify_output(only=...): the part of --verify one rank does. Its files' tensors are checked (a wrong CRC
    fails), the other files are left to the other ranks (sha256 None)."""
    import zlib

    from ckptavg.formats.writer import TensorSpec
    from ckptavg.verify import verify_output

    g = torch.Generator().manual_seed(0)
    tensors = {f"w{i}": torch.randn(64, 64, generator=g) for i in range(4)}
    halves = [
        {n: t * 0 for n, t in tensors.items()},
        {n: t * 2 for n, t in tensors.items()},
    ]  # two inputs (not copies) whose mean is `tensors`, exactly
    assert (
        ckptavg(
            "average",
            *[save_layout_file(h, tmp_path / f"in{i}.safetensors") for i, h in enumerate(halves)],
            "-o",
            tmp_path / "out",
            "--max-shard-size",
            "20KB",
            "-q",
        ).returncode
        == 0
    )
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    specs = [TensorSpec(n, torch.float32, (64, 64)) for n in tensors]
    crcs = {n: zlib.crc32(t.numpy().tobytes()) for n, t in tensors.items()}
    first = index["w0"]
    hashes = verify_output(out, out, specs, crcs, only={first})
    assert hashes[first] is not None and sum(v is not None for v in hashes.values()) == 1 and set(hashes) >= set(index.values())
    wrong = dict(crcs, w0=crcs["w0"] ^ 1)
    with pytest.raises(Exception, match="w0 .* reads back different bytes"):
        verify_output(out, out, specs, wrong, only={first})
    verify_output(out, out, specs, wrong, only={index["w3"]} - {first})  # w0's file is another rank's


def save_layout_file(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def test_dcp_and_deepspeed_saves_under_torchrun(dcp_tp_ckpts, deepspeed_2rank_zero3_ckpts, tmp_path):
    """Sources made of byte ranges of several files (DCP row chunks, ZeRO-3 partitions) and tensors assembled
    from column shards: the ranks' output is the single process's."""
    for name, inputs in (
        ("dcp", sorted(dcp_tp_ckpts.glob("step-*"))),
        ("zero3", sorted(deepspeed_2rank_zero3_ckpts.glob("global_step*"))),
    ):
        assert len(inputs) == 3
        assert ckptavg("average", *inputs, "-o", tmp_path / f"{name}-one", "--max-shard-size", "1KB", "-q").returncode == 0
        result = torchrun(2, "average", *inputs, "-o", tmp_path / f"{name}-two", "--max-shard-size", "1KB", "-q")
        assert result.returncode == 0, result.stderr[-3000:]
        same_output(tmp_path / f"{name}-one", tmp_path / f"{name}-two", 2)


def test_lora_adapters_under_torchrun(lora_plain, peft_base, tmp_path):
    """PEFT adapters, exact (computed stacked factors, read whole) and merged into the base (rows computed on
    demand): the ranks' output is the single process's."""
    inputs = sorted(lora_plain.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-2:]
    for mode in ("exact", "merged"):
        extra = ["--adapter-mode", mode] + (["--base", str(peft_base)] if mode == "merged" else [])
        assert ckptavg("average", *inputs, *extra, "-o", tmp_path / f"{mode}-one", "-q").returncode == 0
        result = torchrun(2, "average", *inputs, *extra, "-o", tmp_path / f"{mode}-two", "-q")
        assert result.returncode == 0, result.stderr[-3000:]
        same_output(tmp_path / f"{mode}-one", tmp_path / f"{mode}-two", 2)


@pytest.mark.parametrize("world_size", [2, 3])
def test_any_source_cut_into_units_writes_the_bytes_of_one_writer(
    dcp_fsdp2_ckpts, deepspeed_2rank_zero3_ckpts, lora_plain, peft_base, tmp_path, monkeypatch, world_size
):
    """In one process, with units made tiny so that every kind of source is cut (DCP row chunks and ZeRO-3
    partitions as extents, a merged adapter's computed rows, FP8 weights dequantized by element range): each
    "rank"'s share run by the engine into a RangeWriter gives the files one SafetensorsWriter gives for the whole plan."""
    from ckptavg import distributed
    from ckptavg.checkpoint import LoadOptions, open_checkpoint
    from ckptavg.formats.writer import RangeWriter, SafetensorsWriter, TensorSpec, lay_out_files, split_shards, tensor_offsets
    from ckptavg.merge.adapters import build_adapter_plan
    from ckptavg.merge.engine import Engine

    monkeypatch.setattr(distributed.split, "MIN_UNIT_BYTES", 256)
    monkeypatch.setattr(distributed.split, "ALIGN", 8)
    lora = sorted(lora_plain.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-2:]
    from tests.test_quantized import fp8_state

    fp8 = []
    for seed in range(2):  # FP8 with block scales (partial edge blocks): values computed by element range
        fp8.append(tmp_path / f"fp8-{seed}.safetensors")
        save_file(fp8_state(seed), fp8[-1])
    cases = {
        "fp8": lambda: build_plan(*_opened(fp8)),
        "dcp": lambda: build_plan(*_opened(sorted(dcp_fsdp2_ckpts.glob("step-*")))),
        "zero3": lambda: build_plan(*_opened(sorted(deepspeed_2rank_zero3_ckpts.glob("global_step*")))),
        "merged": lambda: build_adapter_plan(*_opened(lora), "merged", None, "auto", open_checkpoint(peft_base, LoadOptions()))[
            0
        ],
    }
    try:
        for name, make in cases.items():
            plan = make()
            specs = [TensorSpec(e.name, e.dtype, e.shape) for e in plan.entries]
            shards = split_shards(specs, 4096)
            one = [tmp_path / f"{name}-one-{i}" for i in range(len(shards))]
            writer = SafetensorsWriter(one, shards, {"format": "pt"}, durable=False)
            Engine(plan, torch.device("cpu")).run(writer)
            writer.finish()
            many = [tmp_path / f"{name}-many-{i}" for i in range(len(shards))]
            lay_out_files(many, shards, {"format": "pt"})
            where = tensor_offsets(many, shards, {"format": "pt"})
            units = distributed.split_work(plan, world_size)
            assert len(units) > len(plan.entries)  # tensors were cut
            for share in distributed.assign(units, world_size):
                ranges = [
                    (
                        where[plan.entries[u.entry].name][0],
                        where[plan.entries[u.entry].name][1] + u.first * plan.entries[u.entry].dtype.itemsize,
                        u.count * plan.entries[u.entry].dtype.itemsize,
                    )
                    for u in share
                ]
                writer = RangeWriter(many, ranges, durable=False)
                Engine(distributed.share_plan(plan, share), torch.device("cpu")).run(writer)
                writer.finish()
            assert [p.read_bytes() for p in one] == [p.read_bytes() for p in many], name
    finally:
        FILES.close()


def _opened(paths: list[Path]) -> tuple[list, object]:
    from ckptavg.checkpoint import LoadOptions, open_checkpoint

    inputs = [open_checkpoint(p, LoadOptions()) for p in paths]
    return inputs, parse_weights(None, None, len(inputs))


# The coordination protocol in one process: two World objects (rank 0 and rank 1) in threads over one HashStore.


def _two_ranks(timeout: float = 60.0):
    import torch.distributed as dist

    from ckptavg.distributed import World

    store = dist.HashStore()
    return World(0, 2, 0, store, timeout, owns_group=False), World(1, 2, 1, store, timeout, owns_group=False)


def _in_thread(function):
    import threading

    outcome: dict = {}

    def target():
        try:
            outcome["value"] = function()
        except BaseException as e:  # handed to the test
            outcome["error"] = e

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


def test_an_error_only_another_rank_meets_while_planning_is_the_job_error_naming_that_rank():
    from ckptavg.distributed import RankError
    from ckptavg.errors import InputError

    leader, follower = _two_ranks()
    try:
        thread, outcome = _in_thread(lambda: leader.gather("plan", {"fingerprint": "abc"}))
        missing = InputError("ckpt/nope", "no such file or folder")
        follower.gather_error("plan", missing)
        thread.join(10)
        error = outcome["error"]
        assert (
            isinstance(error, RankError) and error.message == "rank 1: ckpt/nope: no such file or folder" and error.exit_code == 1
        )
        job = follower.fail(missing)
        assert job.message == error.message and job.reported  # rank 0 prints it; rank 1 stays silent
    finally:
        leader._stop.set(), follower._stop.set()


def test_rank_0s_own_error_wins_over_the_same_error_met_by_another_rank():
    from ckptavg.errors import InputError

    leader, follower = _two_ranks()
    try:
        thread, outcome = _in_thread(lambda: follower.gather_error("plan", InputError("b", "no such file or folder")))
        job = leader.fail(InputError("b", "no such file or folder"))
        thread.join(10)
        assert not thread.is_alive() and job.message == "rank 0: b: no such file or folder"
        assert follower.fail(InputError("b", "no such file or folder")).message == job.message
    finally:
        leader._stop.set(), follower._stop.set()


def test_a_rank_whose_beat_stops_is_named_within_the_timeout():
    import time as clock

    from ckptavg.distributed import RankError

    leader, follower = _two_ranks(timeout=1.5)
    try:
        follower._stop.set()  # its beat stops: as if it were killed
        follower._beats.join()
        started = clock.monotonic()
        with pytest.raises(RankError, match="rank 1: stopped responding"):
            leader.wait(["done/1"], watch=[0, 1])
        assert 1.5 <= clock.monotonic() - started < 5
    finally:
        leader._stop.set()
