"""inspect: layout and training state of real runs, --json schema, --tensors, --check, --diff."""

from __future__ import annotations

import json
import math

import torch
from conftest import make_state, save_layout
from safetensors.torch import save_file

SCHEMA = {
    "path": str, "format": str, "files": list, "tensors": int, "parameters": int, "tensor_bytes": int,
    "bytes_by_dtype": dict, "step": (int, type(None)), "epoch": (int, type(None)), "metrics": dict,
    "training_state": dict, "prefix": str, "weights_key": (str, type(None)), "top_level_keys": list,
    "opaque_globals": list, "notes": list, "tensor_list": (list, type(None)), "issues": (list, type(None)),
}


def inspect_json(cli, *args) -> dict:
    result = cli("inspect", *args, "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert set(data) == set(SCHEMA)
    for key, kind in SCHEMA.items():
        assert isinstance(data[key], kind), key
    return data


def test_hf_trainer_checkpoint(cli, hf_run):
    folder = hf_run / "checkpoint-10"
    data = inspect_json(cli, folder)
    assert data["format"] == "safetensors" and data["step"] == 10
    assert set(data["training_state"]) == {"optimizer", "scheduler", "rng"}
    assert data["training_state"]["optimizer"] == (folder / "optimizer.pt").stat().st_size
    state = json.loads((folder / "trainer_state.json").read_text())
    eval_entry = next(e for e in state["log_history"] if e.get("step") == 10 and "eval_loss" in e)
    assert data["metrics"]["eval_loss"] == eval_entry["eval_loss"]
    assert data["prefix"] == "transformer."


def test_lightning_checkpoint(cli, lightning_ckpts):
    path = sorted(lightning_ckpts.glob("*.ckpt"))[-1]
    data = inspect_json(cli, path)
    saved = torch.load(path, weights_only=False)
    assert data["weights_key"] == "state_dict" and data["prefix"].startswith("model.")
    assert data["step"] == saved["global_step"] and data["epoch"] == saved["epoch"]
    assert data["tensors"] == len(saved["state_dict"])
    assert data["parameters"] == sum(t.numel() for t in saved["state_dict"].values())
    assert {"optimizer", "scheduler"} <= set(data["training_state"])
    optimizer_bytes = sum(
        t.numel() * t.element_size()
        for state in saved["optimizer_states"] for per_param in state["state"].values() for t in per_param.values() if torch.is_tensor(t)
    )
    assert data["training_state"]["optimizer"] == optimizer_bytes
    assert set(data["top_level_keys"]) == set(saved)
    monitor = next(v for k, v in saved["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert math.isclose(data["metrics"]["val_loss"], float(monitor["current_score"]), rel_tol=1e-6)


def test_plain_torch_checkpoint(cli, torch_run):
    data = inspect_json(cli, torch_run / "step_12.pt")
    assert data["weights_key"] == "model_state_dict" and data["step"] == 12
    assert set(data["training_state"]) == {"optimizer", "rng"}
    assert data["training_state"]["rng"] == torch.get_rng_state().numel()


def test_ema_and_opaque_globals_are_reported(cli, tmp_path):
    import argparse

    path = tmp_path / "c.pt"
    torch.save({"model": make_state(0), "model_ema": make_state(1), "args": argparse.Namespace(lr=1)}, path)
    data = inspect_json(cli, path)
    assert data["training_state"]["ema"] == sum(t.numel() * t.element_size() for t in make_state(1).values())
    assert data["opaque_globals"] == ["argparse.Namespace"]


def test_tensor_list_and_filter(cli, tmp_path):
    path = save_layout(make_state(0, torch.bfloat16), tmp_path, "safetensors")
    data = inspect_json(cli, path, "--tensors", "--filter", r"^layer\.")
    assert [t["name"] for t in data["tensor_list"]] == ["layer.0.bias", "layer.0.weight"]
    assert data["tensor_list"][1] == {"name": "layer.0.weight", "dtype": "bfloat16", "shape": [48, 48], "bytes": 48 * 48 * 2}
    assert data["bytes_by_dtype"]["bfloat16"] == sum(t.numel() * 2 for t in make_state(0, torch.bfloat16).values() if t.is_floating_point())
    human = cli("inspect", path, "--tensors")
    assert human.code == 0 and "layer.0.weight" in human.out and "bfloat16" in human.out


def test_check_finds_nan_inf_and_zeros(cli, tmp_path):
    good = save_layout(make_state(0), tmp_path / "good", "safetensors")
    result = cli("inspect", good, "--check")
    assert result.code == 0 and "every tensor is finite" in result.out
    state = make_state(0)
    state["layer.0.weight"][1, 2] = float("nan")
    state["layer.0.weight"][3, 4] = float("inf")
    state["layer.0.bias"].zero_()
    bad = save_layout(state, tmp_path / "bad", "safetensors")
    result = cli("inspect", bad, "--check", "--json")
    assert result.code == 1 and result.err.startswith("error: ") and len(result.err.strip().splitlines()) == 1
    issues = {i["name"]: i for i in json.loads(result.out)["issues"]}
    assert issues["layer.0.weight"]["nan"] == 1 and issues["layer.0.weight"]["inf"] == 1
    assert issues["layer.0.bias"]["all_zero"] and set(issues) == {"layer.0.weight", "layer.0.bias"}


def test_diff_against_torch(cli, tmp_path):
    a, b = make_state(0), make_state(1)
    b["extra"] = torch.ones(3)
    b["embed.weight"] = torch.zeros(64, 47)
    pa = save_layout(a, tmp_path / "a", "safetensors")
    pb = save_layout(b, tmp_path / "b", "pt")
    result = cli("inspect", pa, "--diff", pb, "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert data["only_in_b"] == ["extra"] and data["only_in_a"] == []
    assert data["shape_mismatch"] == [{"name": "embed.weight", "a": [64, 48], "b": [64, 47]}]
    rows = {t["name"]: t for t in data["tensors"]}
    for name in ("layer.0.weight", "layer.0.bias", "norm.running_mean"):
        x, y = a[name].double(), b[name].double()
        assert math.isclose(rows[name]["l2"], float((x - y).norm()), rel_tol=1e-12)
        assert math.isclose(rows[name]["relative"], float((x - y).norm() / x.norm()), rel_tol=1e-12)
        assert math.isclose(rows[name]["cosine"], float(torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0)), rel_tol=1e-12)
        assert math.isclose(rows[name]["max_abs"], float((x - y).abs().max()), rel_tol=1e-12)
    assert not data["identical"]
    same = json.loads(cli("inspect", pa, "--diff", pa, "--json").out)
    assert same["identical"] and same["l2"] == 0.0
    human = cli("inspect", pa, "--diff", pb)
    assert "summary" in human.out and "only in B" in human.out


def test_inspect_bad_input(cli, tmp_path):
    bad = tmp_path / "x.safetensors"
    save_file({"w": torch.zeros(4)}, bad)
    bad.write_bytes(bad.read_bytes()[:-3])
    result = cli("inspect", bad)
    assert result.code == 1 and result.err.startswith("error: ") and "truncated" in result.err
