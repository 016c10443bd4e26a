"""out_format="same" for DeepSpeed ZeRO saves (formats/deepspeed_same.py): the merge written back as the newest save.

Every 2-rank run of tests/dist_runs.py (ZeRO-2 and ZeRO-3, fp32 and bf16) is merged with both training states, and
each output is loaded back by DeepSpeed itself, engine.load_checkpoint at 2 ranks into the run's model and optimizer,
in one launch of two child processes (this file run as a script: DeepSpeed is never imported into the test session).
The reference is computed here, in float64, from DeepSpeed's own zero_to_fp32 of each input (<root>-fp32/, written
by get_fp32_state_dict_from_zero_checkpoint when the run was made).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from dist_runs import DEEPSPEED_KINDS as KINDS
from dist_runs import fp32_reference

import ckptavg
from ckptavg.checkpoint import open_checkpoint
from ckptavg.errors import UsageError

TESTS = Path(__file__).resolve().parent
STEPS = (2, 4, 6)


def _saves(root: Path) -> list[Path]:
    """The inputs: the two older tag folders, then the run folder (its `latest` names the newest)."""
    return [root / f"global_step{STEPS[0]}", root / f"global_step{STEPS[1]}", root]


def _merge(root: Path, out: Path, training_state: str, **kwargs) -> ckptavg.AverageReport:
    return ckptavg.average(_saves(root), out, out_format="same", training_state=training_state, verify=True, **kwargs)


def _launch(world: int, jobs: list[dict], tmp: Path, timeout: float = 300) -> None:
    """Run this file as `world` DeepSpeed ranks (CPU accelerator, gloo on 127.0.0.1) over `jobs`."""
    jobs_file = tmp / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
        PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]),
    )
    logs = [open(tmp / f"rank{rank}.log", "w+") for rank in range(world)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(jobs_file)],
            env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
            stdout=logs[rank],
            stderr=subprocess.STDOUT,
        )
        for rank in range(world)
    ]
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    tails = []
    for rank, log in enumerate(logs):
        log.seek(0)
        tails.append(f"--- rank {rank} (exit {procs[rank].returncode}):\n{log.read()[-3000:]}")
        log.close()
    if any(p.returncode for p in procs):
        raise RuntimeError("DeepSpeed load failed:\n" + "\n".join(tails))


def _assert_same_moments(got: Path, newest: Path, world: int) -> None:
    """Every rank's Adam moments, loaded from the output, are those loaded from the newest input."""
    for rank in range(world):
        mine, theirs = torch.load(f"{got}.rank{rank}"), torch.load(f"{newest}.rank{rank}")
        assert mine and len(mine) == len(theirs)
        for a, b in zip(mine, theirs):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rank


def _mean64(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: sum(s[name].double() for s in states) / len(states) for name in states[-1]}


def _load_job(stage: int, bf16: bool, load: Path, mode: str, result: Path) -> dict:
    """A child's job: engine.load_checkpoint(load) (training state too with mode "newest"), what it got to `result`."""
    return {"stage": stage, "bf16": bf16, "load": str(load), "mode": mode, "result": str(result)}


@pytest.fixture(scope="module")
def loaded(request, tmp_path_factory):
    """(folder, {(kind, training_state): report}, {kind: run root}): every 2-rank run merged with both training states,
    and what two DeepSpeed ranks loaded from each output (in the folder: {kind}_{state}.pt) and from the newest input
    ({kind}.pt)."""
    tmp = tmp_path_factory.mktemp("same_deepspeed")
    roots = {kind: request.getfixturevalue(f"deepspeed_2rank_{kind}_ckpts") for kind in KINDS}
    jobs, reports = [], {}
    for kind, root in roots.items():
        stage, bf16 = KINDS[kind]
        for state in ("newest", "drop"):
            reports[kind, state] = _merge(root, tmp / f"{kind}_{state}", state)
            jobs.append(_load_job(stage, bf16, tmp / f"{kind}_{state}", state, tmp / f"{kind}_{state}.pt"))
        jobs.append(_load_job(stage, bf16, root, "newest", tmp / f"{kind}.pt"))
    _launch(2, jobs, tmp)
    return tmp, reports, roots


def _reference(root: Path) -> dict[str, torch.Tensor]:
    """The float64 mean of DeepSpeed's zero_to_fp32 of the three inputs."""
    return _mean64([torch.load(fp32_reference(root, step)) for step in STEPS])


TRAINED = {"emb.weight", "lin.weight", "lin.bias", "bn.weight", "bn.bias"}  # dist_runs._DSNet's (head.weight is emb.weight)


@pytest.mark.parametrize("kind", KINDS)
def test_resumes_from_the_merge(loaded, kind):
    tmp, reports, roots = loaded
    got, newest = torch.load(tmp / f"{kind}_newest.pt"), torch.load(tmp / f"{kind}.pt")
    mean = _reference(roots[kind])
    bf16 = KINDS[kind][1]
    assert reports[kind, "newest"].verified
    assert any(f"global_step{STEPS[-1]}/ and `latest`" in note for note in reports[kind, "newest"].notes)
    assert set(got["fp32"]) == TRAINED
    for name, value in got["fp32"].items():
        assert torch.equal(value, mean[name].float()), name  # the FP32 masters: the float64 mean rounded once
        # the module's copy: the merged FP32 master (rounded to bf16, as DeepSpeed makes its 16-bit weights)
        assert torch.equal(got["module"][name], mean[name].float().to(got["module"][name].dtype)), name
    for name in ("frozen.weight", "frozen.bias"):  # parameters no optimizer holds: their mean rounded once
        assert torch.equal(got["module"][name], mean[name].to(torch.bfloat16 if bf16 else torch.float32)), name
    for name, value in got["buffers"].items():
        want = mean[name].to(value.dtype) if value.is_floating_point() else newest["buffers"][name]
        assert torch.equal(value, want), name
    _assert_same_moments(tmp / f"{kind}_newest.pt", tmp / f"{kind}.pt", 2)
    assert got["lr_scheduler"] == newest["lr_scheduler"] and got["global_steps"] == STEPS[-1]
    assert got["moments_in_files"] and got["lr_scheduler_in_file"] == newest["lr_scheduler"]


@pytest.mark.parametrize("kind", KINDS)
def test_drop_loads_the_weights_without_training_state(loaded, kind):
    tmp, reports, roots = loaded
    got = torch.load(tmp / f"{kind}_drop.pt")
    mean = _reference(roots[kind])
    for name in TRAINED:
        assert torch.equal(got["module"][name], mean[name].float().to(got["module"][name].dtype)), name
        # DeepSpeed makes the masters again from the module's weights when the optimizer states are not loaded
        assert torch.equal(got["fp32"][name], got["module"][name].float()), name
    assert not got["moments_in_files"] and got["lr_scheduler_in_file"] is None
    assert any("training state left out" in note for note in reports[kind, "drop"].notes)


def test_trainer_checkpoint_and_tag_folder_shapes(deepspeed_2rank_zero2_bf16_ckpts, tmp_path):
    """A Trainer checkpoint-N/ gives checkpoint-N/'s shape back, less the newest input's 16-bit weights (and, with
    drop, its training state); a global_stepN/ folder given itself gives its files."""
    run = deepspeed_2rank_zero2_bf16_ckpts
    checkpoints = []
    for step in STEPS:
        folder = tmp_path / f"checkpoint-{step}"
        shutil.copytree(run / f"global_step{step}", folder / f"global_step{step}")
        (folder / "latest").write_text(f"global_step{step}")
        for name in ("config.json", "trainer_state.json", "rng_state_0.pth", "model.safetensors"):
            (folder / name).write_text("{}")
        checkpoints.append(folder)
    report = ckptavg.average(checkpoints, tmp_path / "out", out_format="same", training_state="drop")
    names = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    tag = "global_step6"
    states = [f"{tag}/bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)] + [f"{tag}/mp_rank_00_model_states.pt"]
    assert names == sorted(["ckptavg.json", "config.json", "latest", *states])
    assert (tmp_path / "out" / "latest").read_text() == tag
    assert any("not copied: model.safetensors" in note for note in report.notes)
    kept = ckptavg.average(checkpoints, tmp_path / "kept", out_format="same", training_state="newest")
    assert {"trainer_state.json", "rng_state_0.pth"} <= set(kept.copied_files)
    ckptavg.average([run / f"global_step{s}" for s in STEPS], tmp_path / "tag", out_format="same")
    assert sorted(p.name for p in (tmp_path / "tag").iterdir()) == sorted(["ckptavg.json", *(Path(n).name for n in states)])
    for name in states:  # the same bytes, whichever shape the inputs had
        assert (tmp_path / "tag" / Path(name).name).read_bytes() == (tmp_path / "out" / name).read_bytes()


# ---------------------------------------------------------------------------------------------- refusals


def test_refusals(deepspeed_zero2_ckpts, deepspeed_zero3_ckpts, tmp_path):
    with pytest.raises(UsageError, match="one ZeRO stage"):
        ckptavg.average([deepspeed_zero3_ckpts / "global_step2", deepspeed_zero2_ckpts], tmp_path / "a", out_format="same")
    exported = tmp_path / "old.safetensors"
    ckptavg.average([deepspeed_zero2_ckpts / "global_step2"], exported)
    with pytest.raises(UsageError, match="not a DeepSpeed save"):
        ckptavg.average([exported, deepspeed_zero2_ckpts], tmp_path / "b", out_format="same")
    with pytest.raises(UsageError, match="name a folder"):
        _merge(deepspeed_zero2_ckpts, tmp_path / "merged.pt", "drop")
    with pytest.raises(UsageError, match="own dtypes"):
        _merge(deepspeed_zero2_ckpts, tmp_path / "c", "drop", dtype="bf16")
    with pytest.raises(UsageError, match="leave out"):
        _merge(deepspeed_zero2_ckpts, tmp_path / "d", "drop", key="module")
    assert not any(tmp_path.glob("[abcd]*")) and not (tmp_path / "merged.pt").exists()


@pytest.mark.parametrize("state", ["drop", "newest"])
def test_the_room_checked_before_writing_is_at_least_what_is_written(
    deepspeed_2rank_zero2_bf16_ckpts, tmp_path, monkeypatch, state
):
    """The free space asked for covers the save written (the tag folder: model and optimizer states) with either
    training state: the FP32 masters in the optimizer partitions with "drop" too, where the merged 16-bit weights
    alone were counted before. (The scripts, card and recipe beside it are a few fixed KB, within the margin.)"""
    import ckptavg.averaging

    asked = []
    real_check = ckptavg.averaging.check_space
    monkeypatch.setattr(ckptavg.averaging, "check_space", lambda out, needed: asked.append(needed) or real_check(out, needed))
    out = tmp_path / state
    _merge(deepspeed_2rank_zero2_bf16_ckpts, out, state)
    written = sum(p.stat().st_size for p in out.glob("global_step*/*") if p.is_file())
    assert written > 0
    assert asked and asked[0] >= written, (asked, written)


def test_world_size_mismatch_refused(deepspeed_zero2_ckpts, tmp_path):
    from ckptavg.formats.deepspeed_same import check_deepspeed_same

    older, newest = (open_checkpoint(p) for p in (deepspeed_zero2_ckpts / "global_step4", deepspeed_zero2_ckpts))
    two_ranks = replace(older, files=[*older.files, older.files[-1].with_name("zero_pp_rank_1_mp_rank_00_optim_states.pt")])
    with pytest.raises(UsageError, match="one world size: this has 2 rank"):
        check_deepspeed_same([two_ranks, newest], tmp_path / "out", [], "drop")


# ------------------------------------------------------------------------------- the child: DeepSpeed loads


def _config(stage: int, bf16: bool) -> dict:
    """The runs' config (dist_runs._deepspeed_child)."""
    return {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "torch_adam": True}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.01, "warmup_num_steps": 2}},
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": bf16},
        **({"data_types": {"buffer_dtype": "bf16"}} if bf16 else {}),
        "steps_per_print": 1000,
    }


def _child(jobs_file: Path) -> None:
    """One rank: each job's save loaded into a fresh engine, what it holds saved (by rank 0; each rank its moments)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    from dist_runs import _DSNet
    from trainer_runs import start_deepspeed_without_ops

    start_deepspeed_without_ops()
    rank = deepspeed.comm.get_rank()
    for job in json.loads(jobs_file.read_text()):
        torch.manual_seed(0)
        model = _DSNet()
        trainable = [p for p in model.parameters() if p.requires_grad]
        config = _config(job["stage"], job["bf16"])
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)
        newest = job["mode"] == "newest"
        path, _ = engine.load_checkpoint(job["load"], load_optimizer_states=newest, load_lr_scheduler_states=newest)
        assert path is not None, job
        got: dict = {"module": {}, "fp32": {}}
        for name, p in engine.module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], enabled=job["stage"] == 3):
                got["module"][name] = p.detach().clone()
            if p.requires_grad:
                got["fp32"][name] = safe_get_full_fp32_param(p).detach().clone()
        # this rank's Adam moments: the base optimizer's state of its flat FP32 partitions (ZeRO-3 empties its
        # param_groups between steps: the state is read in its own order)
        base_state = engine.optimizer.optimizer.state.values()
        moments = [{k: state[k].clone() for k in ("exp_avg", "exp_avg_sq")} for state in base_state]
        torch.save(moments, f"{job['result']}.rank{rank}")
        got["buffers"] = {name: b.detach().clone() for name, b in engine.module.named_buffers()}
        got["lr_scheduler"] = engine.lr_scheduler.state_dict()
        got["global_steps"] = engine.global_steps
        tag = (Path(job["load"]) / "latest").read_text().strip()
        files = sorted((Path(job["load"]) / tag).glob("*.pt"))
        optim = [torch.load(f, weights_only=False)["optimizer_state_dict"] for f in files if f.name.endswith("optim_states.pt")]
        got["moments_in_files"] = any("base_optimizer_state" in o or "optimizer_state_dict" in o for o in optim)
        states = next(f for f in files if f.name.endswith("model_states.pt"))
        got["lr_scheduler_in_file"] = torch.load(states, weights_only=False).get("lr_scheduler")
        if rank == 0:
            torch.save(got, job["result"])
        engine.destroy()
    deepspeed.comm.destroy_process_group()


if __name__ == "__main__":
    _child(Path(sys.argv[1]))
