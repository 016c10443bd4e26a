"""What is averaged, and in which order: steps of other trainers, EMA weights, different runs, zero-element tensors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_state, read_output, reference_average, save_layout
from safetensors.torch import save_file

import ckptavg
from ckptavg.errors import UnsupportedError, UsageError


def assert_exact(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def ema_reference(states: list[dict], steps: list[int], half_life: float) -> dict:
    """The EMA walked input by input in float64, as an in-training EMA with this half-life would be."""
    out = {}
    for name, first in states[0].items():
        if not first.is_floating_point():
            out[name] = states[-1][name]
            continue
        e = first.double()
        for prev, step, state in zip(steps, steps[1:], states[1:]):
            a = 0.5 ** ((step - prev) / half_life)
            e = a * e + (1 - a) * state[name].double()
        out[name] = e.to(first.dtype)
    return out


def test_accelerate_checkpoint_folders_are_ordered_by_number(tmp_path):
    states = [make_state(s) for s in range(12)]
    for i, state in enumerate(states):
        save_layout(state, tmp_path / "checkpoints" / f"checkpoint_{i}", "safetensors-folder")
    paths = sorted((tmp_path / "checkpoints").glob("checkpoint_*"))  # lexical: 0, 1, 10, 11, 2, ...
    report = ckptavg.average(paths, tmp_path / "out", weights="linear")
    assert [Path(i.path).name for i in report.inputs] == [f"checkpoint_{i}" for i in range(12)]
    assert report.order == "step"
    assert_exact(read_output(tmp_path / "out"), reference_average(states, [float(i + 1) for i in range(12)]))


def test_weights_files_are_ordered_by_their_folder(tmp_path):
    states = [make_state(s) for s in range(3)]
    steps = [900, 1000, 80]
    files = [save_layout(s, tmp_path / f"checkpoint-{step}", "safetensors") for s, step in zip(states, steps)]
    report = ckptavg.average(files, tmp_path / "out", weights="linear")
    assert [i.step for i in report.inputs] == [80, 900, 1000]
    by_step = [states[2], states[0], states[1]]
    assert_exact(read_output(tmp_path / "out"), reference_average(by_step, [1.0, 2.0, 3.0]))


def test_deepspeed_global_steps_order_the_inputs(tmp_path):
    states = [make_state(s) for s in range(3)]
    steps = [300, 20, 100]
    paths = []
    for i, (state, step) in enumerate(zip(states, steps)):
        path = tmp_path / f"save{i}.pt"
        torch.save({"module": state, "global_steps": step, "ds_version": "0.19.8", "param_shapes": [], "buffer_names": []}, path)
        paths.append(path)
    report = ckptavg.average(paths, tmp_path / "out", ema=0.5)
    assert [i.step for i in report.inputs] == [20, 100, 300]


def test_deepspeed_folder_name_gives_the_step_of_its_model_states(tmp_path):
    paths = []
    for step in (200, 100):
        folder = tmp_path / f"global_step{step}"
        folder.mkdir()
        torch.save({"module": make_state(step)}, folder / "mp_rank_00_model_states.pt")
        paths.append(folder / "mp_rank_00_model_states.pt")
    report = ckptavg.average(paths, tmp_path / "out", weights="linear")
    assert [i.step for i in report.inputs] == [100, 200]


def test_a_zero3_model_states_file_is_refused_with_what_to_do(tmp_path):
    state = {"layer.weight": torch.empty(0), "norm.running_mean": torch.zeros(4)}
    path = tmp_path / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    torch.save(
        {"module": state, "ds_version": "0.19.8", "global_steps": 5, "param_shapes": [], "buffer_names": ["norm.running_mean"]},
        path,
    )
    with pytest.raises(UnsupportedError, match="ZeRO-3.*pass its folder"):
        ckptavg.average([path, save_layout(make_state(0), tmp_path / "b", "pt")], tmp_path / "out")


@pytest.mark.parametrize("strategy", [{"weights": "linear"}, {"weights": "1,2,3"}, {"ema": 0.5}, {"ema_half_life": 100.0}])
def test_order_dependent_weights_need_a_known_order(tmp_path, strategy):
    paths = [save_layout(make_state(s), tmp_path / f"in{s}", "safetensors") for s in range(3)]
    with pytest.raises(UsageError, match="order='given'|step of every input"):
        ckptavg.average(paths, tmp_path / "out", **strategy)
    assert not (tmp_path / "out").exists()


def test_the_mean_does_not_need_an_order(tmp_path):
    states = [make_state(s) for s in range(3)]
    paths = [save_layout(s, tmp_path / f"in{i}", "safetensors") for i, s in enumerate(states)]
    report = ckptavg.average(paths, tmp_path / "out")
    assert report.order == "given"
    assert_exact(read_output(tmp_path / "out"), reference_average(states))


def test_unknown_order_is_a_usage_error_on_the_command_line(cli, tmp_path):
    paths = [save_layout(make_state(s), tmp_path / f"in{s}", "safetensors") for s in range(2)]
    result = cli("average", *paths, "--weights", "linear", "-o", tmp_path / "out")
    assert result.code == 2 and "pass --order given" in result.err and len(result.err.strip().splitlines()) == 1
    assert cli("average", *paths, "--weights", "linear", "--order", "given", "-o", tmp_path / "out").code == 0


def test_explicit_weights_say_they_follow_training_order(tmp_path):
    paths = [save_layout(make_state(s), tmp_path, "hf-trainer", step=step) for s, step in ((0, 30), (1, 10), (2, 20))]
    report = ckptavg.average(paths, tmp_path / "out", weights="1,1,5")
    assert any("training order" in n and "checkpoint-10, checkpoint-20, checkpoint-30" in n for n in report.notes)


def test_ema_that_keeps_the_oldest_input_warns_and_strict_refuses(cli, tmp_path):
    paths = [save_layout(make_state(s), tmp_path, "hf-trainer", step=10 * (s + 1)) for s in range(3)]
    report = ckptavg.average(paths, tmp_path / "out", ema=0.999)
    assert report.inputs[0].weight > 0.99
    assert any("oldest input" in w and "ema=0.7" in w for w in report.warnings), report.warnings
    result = cli("average", *paths, "--ema", "0.999", "--strict", "-o", tmp_path / "strict")
    assert result.code == 1 and "--strict" in result.err and "oldest input" in result.err
    assert not (tmp_path / "strict").exists()
    quiet = ckptavg.average(paths, tmp_path / "out2", ema=0.5)
    assert not quiet.warnings


def test_ema_half_life_honours_irregular_spacing(tmp_path):
    steps = [100, 150, 400, 1000, 1100]
    states = [make_state(s, torch.float64) for s in range(len(steps))]
    paths = [save_layout(s, tmp_path, "hf-trainer", step=step) for s, step in zip(states, steps)]
    report = ckptavg.average(list(reversed(paths)), tmp_path / "out", ema_half_life=250)
    assert report.strategy == "ema" and [i.step for i in report.inputs] == steps
    got, want = read_output(tmp_path / "out"), ema_reference(states, steps, 250)
    for name in want:
        if want[name].is_floating_point():
            torch.testing.assert_close(got[name], want[name], rtol=1e-13, atol=1e-13)
    weights = [i.weight for i in report.inputs]
    assert abs(sum(weights) - 1) < 1e-12 and weights[-1] == pytest.approx(1 - 0.5 ** (100 / 250))


def test_ema_half_life_longer_than_the_span_warns(tmp_path):
    paths = [save_layout(make_state(s), tmp_path, "hf-trainer", step=step) for s, step in enumerate((100, 200, 300))]
    report = ckptavg.average(paths, tmp_path / "out", ema_half_life=5000)
    assert any("oldest input" in w and "half-life under the 200 steps" in w for w in report.warnings)


def test_two_runs_are_warned_and_one_run_is_not(tmp_path):
    one = [save_layout(make_state(s, run=0), tmp_path / "a", "hf-trainer", step=s + 1) for s in range(3)]
    other = save_layout(make_state(9, run=1), tmp_path / "b", "hf-trainer", step=4)
    assert ckptavg.average(one, tmp_path / "same", dry_run=True).warnings == []
    report = ckptavg.average([*one, other], tmp_path / "mixed", dry_run=True)
    assert len(report.warnings) == 1
    assert (
        "different training runs" in report.warnings[0]
        and str(one[-1]) in report.warnings[0]
        and str(other) in report.warnings[0]
    )


def test_real_checkpoints_of_one_run_are_not_warned(hf_run):
    report = ckptavg.average(sorted(hf_run.glob("checkpoint-*")), None, dry_run=True)
    assert report.warnings == []


def test_different_configs_are_warned(tmp_path):
    paths = [save_layout(make_state(s), tmp_path, "hf-trainer", step=s + 1) for s in range(2)]
    config = json.loads((paths[1] / "config.json").read_text())
    (paths[1] / "config.json").write_text(json.dumps({**config, "num_layers": 7, "torch_dtype": "bfloat16"}))
    report = ckptavg.average(paths, tmp_path / "out", dry_run=True)
    assert any("config.json" in w and "num_layers" in w for w in report.warnings), report.warnings


def test_the_same_run_check_reads_a_small_sample(tmp_path, monkeypatch):
    from ckptavg import same_run

    big = {"w": torch.randn(1024, 1024), "v": torch.randn(2048, 256)}
    paths = []
    for s in range(2):
        folder = tmp_path / f"in{s}"
        folder.mkdir()
        save_file({k: v + 0.01 * s for k, v in big.items()}, folder / "model.safetensors")
        paths.append(folder)
    read = []
    original = same_run._sample
    monkeypatch.setattr(same_run, "_sample", lambda entry, i: read.append(1) or original(entry, i))
    report = ckptavg.average(paths, None, dry_run=True)
    assert report.warnings == [] and len(read) == 4
    assert same_run.SAMPLE * 4 * 2 * 4 < 0.05 * sum(i.bytes for i in report.inputs) * 4


def test_zero_element_tensors_average_in_every_output(tmp_path):
    states = [
        {"w": torch.randn(3, generator=torch.Generator().manual_seed(s)), "empty": torch.empty(0, 4), "none": torch.empty(0)}
        for s in range(2)
    ]
    paths = [save_layout(s, tmp_path / f"in{i}", "pt") for i, s in enumerate(states)]
    for name in ("out", "out.safetensors", "out.pt"):
        ckptavg.average(paths, tmp_path / name, order="given")
    want = reference_average(states)
    assert_exact(read_output(tmp_path / "out"), want)
    assert_exact(read_output(tmp_path / "out.safetensors"), want)
    assert_exact(dict(torch.load(tmp_path / "out.pt", weights_only=True)), want)


def test_only_zero_element_tensors(tmp_path):
    states = [{"empty": torch.empty(0, 4), "none": torch.empty(0)} for _ in range(2)]
    paths = [save_layout(s, tmp_path / f"in{i}", "pt") for i, s in enumerate(states)]
    report = ckptavg.average(paths, tmp_path / "out")
    assert report.bytes_read == 0
    assert_exact(read_output(tmp_path / "out"), states[0])


def test_torch_compile_prefix_is_removed_with_a_note(tmp_path):
    states = [make_state(s) for s in range(2)]
    paths = []
    for i, state in enumerate(states):
        path = tmp_path / f"epoch={i}-step={i}.ckpt"
        torch.save({"state_dict": {f"model._orig_mod.{k}": v for k, v in state.items()}, "global_step": i}, path)
        paths.append(path)
    report = ckptavg.average(paths, tmp_path / "out")
    assert set(read_output(tmp_path / "out")) == {f"model.{k}" for k in states[0]}
    assert all("_orig_mod. removed (torch.compile)" in i.weights_from and "'state_dict'" in i.weights_from for i in report.inputs)


def test_a_strip_prefix_that_matches_nothing_is_noted(tmp_path):
    paths = [save_layout(make_state(s), tmp_path / f"in{s}", "safetensors") for s in range(2)]
    report = ckptavg.average(paths, tmp_path / "out", strip_prefixes=["module."])
    assert any("strip_prefixes='module.' matched no tensor name" in n for i in report.inputs for n in i.notes)


def test_each_input_says_which_weights_were_taken(cli, tmp_path):
    paths = []
    for s in range(2):
        path = tmp_path / f"step_{s + 1}.pt"
        torch.save({"model": make_state(s), "model_ema": make_state(s + 10), "step": s + 1}, path)
        paths.append(path)
    raw = json.loads(cli("average", *paths, "--json", "-o", tmp_path / "raw").out)
    ema = json.loads(cli("average", *paths, "--use-ema", "--json", "-o", tmp_path / "ema").out)
    assert [i["weights_from"] for i in raw["inputs"]] == ["'model'", "'model'"]
    assert [i["weights_from"] for i in ema["inputs"]] == ["EMA weights 'model_ema' (--use-ema)"] * 2


def test_debug_works_after_the_command(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "ckptavg", "average", str(tmp_path / "missing"), "-o", str(tmp_path / "out"), "--debug"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "Traceback" in result.stderr and "no such file" in result.stderr


def test_help_shows_no_type_names_and_completion_is_offered(cli):
    import os

    os.environ["COLUMNS"] = "120"
    try:
        root = cli("--help").out
        helps = [cli(command, "--help").out for command in ("average", "select", "inspect", "export")]
    finally:
        del os.environ["COLUMNS"]
    assert "--install-completion" in root and "--show-completion" in root
    for text in [root, *helps]:
        assert "<bool>" not in text and "<str>" not in text and "<path>" not in text and "list[" not in text, text


def test_a_copied_run_keeps_its_steps(tmp_path, hf_run):
    run = shutil.copytree(hf_run, tmp_path / "run")
    files = sorted(Path(run).glob("checkpoint-*/model.safetensors"), key=lambda p: p.parent.name)
    report = ckptavg.average(files, tmp_path / "out", weights="linear")
    assert [i.step for i in report.inputs] == sorted(i.step for i in report.inputs)


def test_names_that_differ_by_a_prefix_suggest_strip_prefix(cli, tmp_path):
    state = make_state(0)
    a = save_layout(state, tmp_path / "a", "safetensors")
    b = tmp_path / "b.pt"
    torch.save({f"module.{k}": v for k, v in make_state(1).items()}, b)
    result = cli("average", a, b, "-o", tmp_path / "out")
    assert result.code == 1 and "pass --strip-prefix module." in result.err
    assert cli("average", a, b, "--strip-prefix", "module.", "-o", tmp_path / "out").code == 0


def test_a_too_small_memory_budget_is_echoed_as_typed(cli, tmp_path):
    paths = [save_layout(make_state(s), tmp_path / f"in{s}", "safetensors") for s in range(2)]
    result = cli("average", *paths, "--memory-budget", "1KB", "-o", tmp_path / "out")
    assert result.code == 2 and "--memory-budget 1KB is too small" in result.err


def test_python_api_errors_name_keywords_not_flags(tmp_path):
    paths = [save_layout(make_state(s), tmp_path / f"in{s}", "safetensors") for s in range(2)]
    ckptavg.average(paths, tmp_path / "out")
    with pytest.raises(ckptavg.CkptavgError, match=r"pass overwrite=True to replace it") as caught:
        ckptavg.average(paths, tmp_path / "out")
    assert "--" not in str(caught.value)
    with pytest.raises(UsageError, match=r"pass order='given'"):
        ckptavg.average(paths, tmp_path / "out2", weights="linear")
    with pytest.raises(UsageError, match=r"memory_budget='1KB' is too small"):
        ckptavg.average(paths, tmp_path / "out3", memory_budget="1KB")
    assert {"average", "export", "AverageReport", "CkptavgError"} <= set(dir(ckptavg))
