"""inspect: layout and training state of real runs, --json schema, --tensors, --check, --diff."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import make_state, save_layout
from safetensors.torch import save_file

from ckptavg.inspection import common_prefix, wrapper_prefix

SCHEMA = {
    "path": str,
    "format": str,
    "files": list,
    "tensors": int,
    "parameters": int,
    "tensor_bytes": int,
    "bytes_by_dtype": dict,
    "step": (int, type(None)),
    "epoch": (int, type(None)),
    "step_source": (str, type(None)),
    "metrics": dict,
    "training_state": dict,
    "prefix": str,
    "wrapper_prefix": (str, type(None)),
    "wrapper": (str, type(None)),
    "model_type": (str, type(None)),
    "architectures": list,
    "weights_key": (str, type(None)),
    "top_level_keys": list,
    "opaque_globals": list,
    "notes": list,
    "leftovers": list,
    "adapter": (dict, type(None)),
    "quantization": (dict, type(None)),
    "tensor_list": (list, type(None)),
    "issues": (list, type(None)),
}
DIFF_KEYS = {
    "a",
    "b",
    "tensors",
    "only_in_a",
    "only_in_b",
    "shape_mismatch",
    "integer_tensors",
    "integer_differs",
    "l2",
    "relative",
    "min_cosine",
    "max_abs",
    "identical",
    "compared",
    "hint",
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
    assert data["prefix"] == "transformer." and data["wrapper_prefix"] is None
    assert data["model_type"] == "gpt2" and data["architectures"] == ["GPT2LMHeadModel"] and data["leftovers"] == []


def test_lightning_checkpoint(cli, lightning_ckpts):
    path = sorted(lightning_ckpts.glob("*.ckpt"))[-1]
    data = inspect_json(cli, path)
    saved = torch.load(path, weights_only=False)
    assert data["weights_key"] == "state_dict" and data["prefix"].startswith("model.")
    assert data["wrapper_prefix"] == "model." and data["wrapper"] == "a LightningModule (self.model)"
    assert data["step"] == saved["global_step"] and data["epoch"] == saved["epoch"]
    assert data["tensors"] == len(saved["state_dict"])
    assert data["parameters"] == sum(t.numel() for t in saved["state_dict"].values())
    assert {"optimizer", "scheduler"} <= set(data["training_state"])
    optimizer_bytes = sum(
        t.numel() * t.element_size()
        for state in saved["optimizer_states"]
        for per_param in state["state"].values()
        for t in per_param.values()
        if torch.is_tensor(t)
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
    assert data["bytes_by_dtype"]["bfloat16"] == sum(
        t.numel() * 2 for t in make_state(0, torch.bfloat16).values() if t.is_floating_point()
    )
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
    assert set(data) == DIFF_KEYS
    assert data["only_in_b"] == ["extra"] and data["only_in_a"] == []
    assert data["shape_mismatch"] == [{"name": "embed.weight", "a": [64, 48], "b": [64, 47]}]
    rows = {t["name"]: t for t in data["tensors"]}
    for name in ("layer.0.weight", "layer.0.bias", "norm.running_mean"):
        x, y = a[name].double(), b[name].double()
        assert math.isclose(rows[name]["l2"], float((x - y).norm()), rel_tol=1e-12)
        assert math.isclose(rows[name]["relative"], float((x - y).norm() / x.norm()), rel_tol=1e-12)
        assert math.isclose(
            rows[name]["cosine"], float(torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0)), rel_tol=1e-12
        )
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


def test_diff_distances_count_floating_tensors_only(cli, tmp_path):
    a = make_state(0)
    b = {k: v.clone() for k, v in a.items()}
    g = torch.Generator().manual_seed(7)
    for name in ("embed.weight", "layer.0.weight", "layer.0.bias", "norm.running_mean"):
        b[name] += 1e-6 * torch.randn(b[name].shape, generator=g)
    b["norm.num_batches_tracked"] = torch.tensor(10**12)
    b["mask"] = ~a["mask"]
    pa = save_layout(a, tmp_path / "a", "safetensors")
    pb = save_layout(b, tmp_path / "b", "safetensors")
    data = json.loads(cli("inspect", pa, "--diff", pb, "--json").out)
    floats = [n for n, t in a.items() if t.is_floating_point()]
    dd = sum(float((a[n].double() - b[n].double()).pow(2).sum()) for n in floats)
    aa = sum(float(a[n].double().pow(2).sum()) for n in floats)
    assert math.isclose(data["relative"], math.sqrt(dd / aa), rel_tol=1e-9) and data["relative"] < 1e-5
    assert math.isclose(data["l2"], math.sqrt(dd), rel_tol=1e-9)
    assert data["max_abs"] < 1e-4 and data["min_cosine"] > 1 - 1e-9
    assert sorted(t["name"] for t in data["tensors"]) == sorted(floats)
    assert data["integer_tensors"] == 2 and sorted(data["integer_differs"]) == ["mask", "norm.num_batches_tracked"]
    human = cli("inspect", pa, "--diff", pb)
    line = next(line for line in human.out.splitlines() if line.startswith("integers"))
    assert "2 of 2 integer/bool tensors differ: " in line and "mask" in line and "norm.num_batches_tracked" in line

    # integers alone differing: the weights are identical, the checkpoints are not
    c = {k: v.clone() for k, v in a.items()}
    c["norm.num_batches_tracked"] += 1
    pc = save_layout(c, tmp_path / "c", "pt")
    data = json.loads(cli("inspect", pa, "--diff", pc, "--json").out)
    assert data["relative"] == 0.0 and data["l2"] == 0.0 and data["max_abs"] == 0.0
    assert data["integer_differs"] == ["norm.num_batches_tracked"] and not data["identical"]
    same = json.loads(cli("inspect", pa, "--diff", save_layout(a, tmp_path / "d", "pt"), "--json").out)
    assert same["identical"] and same["integer_tensors"] == 2 and same["integer_differs"] == []


def _tiny_transformers(kind: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=32,
            tie_word_embeddings=True,
        )
        return transformers.LlamaForCausalLM(config)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32))


@pytest.mark.parametrize("kind,own", [("llama", "model."), ("gpt2", "transformer.")])
def test_a_transformers_models_own_prefix_is_not_a_wrapper(cli, tmp_path, kind, own):
    model = _tiny_transformers(kind)
    model.save_pretrained(tmp_path / "hf")
    data = inspect_json(cli, tmp_path / "hf")
    assert data["prefix"].startswith(own) and data["wrapper_prefix"] is None and data["wrapper"] is None
    assert data["model_type"] == kind and data["architectures"] == [type(model).__name__]
    human = cli("inspect", tmp_path / "hf")
    assert "--strip-prefix" not in human.out and "the model's own names" in human.out
    # the weights file on its own, next to the config, is the same model
    assert inspect_json(cli, tmp_path / "hf" / "model.safetensors")["wrapper_prefix"] is None

    # the same names without a config.json: not known to be a wrapper's either
    names = dict(model.state_dict())  # lm_head.weight too: no common prefix but `model.` for Llama
    torch.save(names, tmp_path / "plain.pt")
    assert inspect_json(cli, tmp_path / "plain.pt")["wrapper_prefix"] is None

    # wrapped by DDP: only its level is to strip
    torch.save({f"module.{k}": v for k, v in names.items()}, tmp_path / "ddp.pt")
    data = inspect_json(cli, tmp_path / "ddp.pt")
    assert data["wrapper_prefix"] == "module." and data["wrapper"] == "DDP / DataParallel / DeepSpeed"
    stripped = inspect_json(cli, tmp_path / "ddp.pt", "--strip-prefix", data["wrapper_prefix"], "--tensors")
    assert [t["name"] for t in stripped["tensor_list"]] == list(names) and stripped["wrapper_prefix"] is None

    # a LightningModule holding the model as self.model: its `model.` only, never the model's own
    lightning = {"state_dict": {f"model.{k}": v for k, v in names.items()}, "pytorch-lightning_version": "2.4.0", "epoch": 0}
    torch.save(lightning, tmp_path / "l.ckpt")
    data = inspect_json(cli, tmp_path / "l.ckpt")
    assert data["prefix"] == "model." + common_prefix(names) and data["wrapper_prefix"] == "model."
    assert "--strip-prefix model. removes it" in cli("inspect", tmp_path / "l.ckpt").out
    (tmp_path / "l.ckpt").rename(tmp_path / "hf" / "l.ckpt")  # beside the model's config.json, still Lightning's names
    assert inspect_json(cli, tmp_path / "hf" / "l.ckpt")["wrapper_prefix"] == "model."


def test_wrapper_levels():
    ddp = "DDP / DataParallel / DeepSpeed"
    assert wrapper_prefix("module._orig_mod.model.layers.", False, None) == ("module._orig_mod.", f"{ddp} + torch.compile")
    assert wrapper_prefix("_fsdp_wrapped_module.module.x.", False, None) == ("_fsdp_wrapped_module.module.", f"FSDP + {ddp}")
    assert wrapper_prefix("model.model.layers.", True, None) == ("model.", "a LightningModule (self.model)")
    assert wrapper_prefix("net._orig_mod.body.", True, None) == ("net._orig_mod.", "a LightningModule (self.net) + torch.compile")
    assert wrapper_prefix("model.layers.", False, None) == (None, None)
    assert wrapper_prefix("net.", False, None) == (None, None)
    assert wrapper_prefix("module.", False, {"model_type": "llama"}) == (None, None)
    assert wrapper_prefix("model.", True, {"model_type": "llama"}) == ("model.", "a LightningModule (self.model)")
    assert wrapper_prefix("", True, None) == (None, None)


def test_lightning_layout_without_version_key_and_a_plain_dict_under_state_dict(cli, tmp_path):
    path = save_layout(make_state(0), tmp_path / "l", "lightning", step=5)
    assert inspect_json(cli, path)["wrapper_prefix"] == "model."
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in make_state(0).items()}}, plain)
    data = inspect_json(cli, plain)
    assert data["prefix"] == "model." and data["wrapper_prefix"] is None


LOCKED_WRITER = """
import sys, time
from pathlib import Path
from ckptavg.output import output_lock, tmp_name
out = Path(sys.argv[1])
with output_lock(out):
    tmp_name(out).mkdir()
    (tmp_name(out) / "model-00001-of-00002.safetensors").write_bytes(bytes(3_000_000))
    print("writing", flush=True)
    time.sleep(120)
"""


def test_leftovers_of_a_killed_run_are_reported(cli, tmp_path):
    out = tmp_path / "merged"
    writer = subprocess.Popen([sys.executable, "-c", LOCKED_WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "writing\n"
        live = cli("inspect", out)
        assert live.code == 1 and "no such file or folder" in live.err and len(live.err.strip().splitlines()) == 1
        assert f"a ckptavg run (pid {writer.pid}) is writing merged now" in live.err
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".merged.ckptavg-lock", ".merged.ckptavg-partial"]

    result = cli("inspect", out)
    assert result.code == 1 and result.err.startswith("error: ") and len(result.err.strip().splitlines()) == 1
    err = result.err
    assert "no such file or folder" in err and ".merged.ckptavg-partial (3.00 MB)" in err and ".merged.ckptavg-lock" in err
    assert "none holds the lock now" in err and "the next run to merged removes them, or delete them by hand" in err

    folder = cli("inspect", tmp_path)  # the folder holds no weights, only what the run left
    assert folder.code == 1 and "no weights found" in folder.err and ".merged.ckptavg-partial (3.00 MB)" in folder.err

    # a real checkpoint folder holding leftovers: reported beside its description, and in --json
    save_layout(make_state(0), tmp_path, "safetensors")
    data = inspect_json(cli, tmp_path)
    [item] = data["leftovers"]
    assert item["output"] == str(out) and not item["live"] and item["pid"] is None and not item["output_exists"]
    assert {f["kind"]: f["bytes"] for f in item["files"]} == {"partial": 3_000_000, "lock": len(f"{writer.pid}\n")}
    assert item["bytes"] == 3_000_000 + len(f"{writer.pid}\n")
    human = cli("inspect", tmp_path)
    assert human.code == 0 and "leftover" in human.out and str(out.parent / ".merged.ckptavg-partial") in human.out
    assert "removes them" in human.out


def test_leftovers_while_a_run_holds_the_lock_and_after_a_kill_mid_replace(cli, tmp_path):
    from ckptavg.output import old_name, output_lock, tmp_name

    path = save_layout(make_state(0), tmp_path / "runs", "safetensors")
    out = path.parent / "merged.safetensors"
    with output_lock(out):
        tmp_name(out).write_bytes(bytes(1000))
        item = inspect_json(cli, path.parent)["leftovers"][0]
        assert item["live"] and item["pid"] == os.getpid() and "is writing merged.safetensors now" in item["advice"]
    assert not inspect_json(cli, path.parent)["leftovers"][0]["live"]  # the lock file is gone with the run

    # killed between moving the old OUT aside and renaming the new one in: the old one can be put back
    tmp_name(out).unlink()
    old_name(out).write_bytes(bytes(10))
    err = cli("inspect", out).err
    assert ".merged.safetensors.ckptavg-old (10 B)" in err and "rename it back to keep it" in err
    # OUT itself: the leftovers beside it are reported with it
    save_layout(make_state(1), tmp_path / "x", "safetensors").rename(out)
    data = inspect_json(cli, out)
    assert data["leftovers"][0]["output_exists"] and "rename it back" not in data["leftovers"][0]["advice"]
