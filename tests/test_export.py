"""export: real training checkpoints made deployable; sizes; EMA weights; .pt output; bad inputs."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch
from conftest import make_state, read_output
from runs import _Tiny
from torch import nn


def test_hf_checkpoint_exports_and_loads(cli, hf_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = hf_run / "checkpoint-10"
    result = cli("export", folder, "-o", tmp_path / "model")
    assert result.code == 0, result.err
    names = sorted(p.name for p in (tmp_path / "model").iterdir())
    assert names == ["README.md", "ckptavg.json", "config.json", "generation_config.json", "model.safetensors"]
    before = sum(p.stat().st_size for p in folder.iterdir())
    after = sum(p.stat().st_size for p in (tmp_path / "model").iterdir())
    assert f"{(1 - after / before) * 100:.0f}% smaller" in result.out
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    original = transformers.AutoModelForCausalLM.from_pretrained(folder)
    for name, value in original.state_dict().items():
        assert torch.equal(exported.state_dict()[name], value), name


def test_lightning_checkpoint_exports_its_module(cli, lightning_ckpts, tmp_path):
    path = sorted(lightning_ckpts.glob("*.ckpt"))[-1]
    result = cli("export", path, "--strip-prefix", "model.", "-o", tmp_path / "tiny.safetensors", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["strategy"] == "export" and report["output_disk_bytes"] < report["input_disk_bytes"]
    model = _Tiny()
    model.load_state_dict(read_output(tmp_path / "tiny.safetensors"))
    saved = torch.load(path, weights_only=False)["state_dict"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[f"model.{name}"]), name


def test_plain_checkpoint_to_pt_loads_with_weights_only_and_mmap(cli, torch_run, tmp_path):
    path = torch_run / "step_12.pt"
    result = cli("export", path, "--format", "pt", "-o", tmp_path / "model.pt")
    assert result.code == 0, result.err
    saved = torch.load(path, weights_only=False)["model_state_dict"]
    for mmap in (False, True):
        loaded = torch.load(tmp_path / "model.pt", weights_only=True, mmap=mmap)
        assert list(loaded) == list(saved)
        assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    with zipfile.ZipFile(tmp_path / "model.pt") as archive:
        raw = (tmp_path / "model.pt").open("rb")
        for info in archive.infolist():
            if "/data/" in info.filename:
                raw.seek(info.header_offset + 26)
                name_len, extra_len = int.from_bytes(raw.read(2), "little"), int.from_bytes(raw.read(2), "little")
                assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0


def test_pt_keeps_tied_storage_and_folder_layout(cli, tmp_path):
    state = make_state(0, tied=True)
    (tmp_path / "ckpt").mkdir()
    torch.save({"model": state}, tmp_path / "ckpt" / "last.pt")
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    result = cli("export", tmp_path / "ckpt" / "last.pt", "--format", "pt", "-o", tmp_path / "out")
    assert result.code == 0, result.err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "README.md",
        "ckptavg.json",
        "config.json",
        "pytorch_model.bin",
    ]
    loaded = torch.load(tmp_path / "out" / "pytorch_model.bin", weights_only=True)
    assert loaded["head.weight"].data_ptr() == loaded["embed.weight"].data_ptr()
    assert torch.equal(loaded["embed.weight"], state["embed.weight"])


@pytest.mark.parametrize("style", ["timm", "averaged_model"])
def test_use_ema(cli, tmp_path, style):
    model = _Tiny()
    if style == "timm":
        ema = {k: v + 1 for k, v in model.state_dict().items()}
        checkpoint = {"state_dict": model.state_dict(), "state_dict_ema": ema, "optimizer": {}}
    else:
        averaged = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        averaged.update_parameters(model)
        ema = {k.removeprefix("module."): v for k, v in averaged.state_dict().items() if k != "n_averaged"}
        checkpoint = {"model": model.state_dict(), "ema": averaged.state_dict()}
    torch.save(checkpoint, tmp_path / "c.pt")
    result = cli("export", tmp_path / "c.pt", "--use-ema", "-o", tmp_path / "m.safetensors")
    assert result.code == 0, result.err
    out = read_output(tmp_path / "m.safetensors")
    assert set(out) == set(ema) and all(torch.equal(out[k], ema[k]) for k in ema)


def test_dtype_and_dry_run(cli, torch_run, tmp_path):
    result = cli("export", torch_run / "step_3.pt", "--dtype", "bf16", "-o", tmp_path / "m.safetensors")
    assert result.code == 0, result.err
    saved = torch.load(torch_run / "step_3.pt", weights_only=False)["model_state_dict"]
    out = read_output(tmp_path / "m.safetensors")
    assert out["body.0.weight"].dtype == torch.bfloat16
    assert torch.equal(out["body.0.weight"], saved["body.0.weight"].bfloat16())
    assert out["body.1.num_batches_tracked"].dtype == torch.int64
    dry = cli("export", torch_run / "step_3.pt", "-o", tmp_path / "dry", "--dry-run")
    assert dry.code == 0 and not (tmp_path / "dry").exists()


def test_bad_inputs(cli, tmp_path):
    torch.save({"model": nn.Linear(2, 2).state_dict()}, tmp_path / "c.pt")
    missing_ema = cli("export", tmp_path / "c.pt", "--use-ema", "-o", tmp_path / "out")
    assert missing_ema.code == 1 and "carries no EMA weights" in missing_ema.err
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])
    truncated = cli("export", tmp_path / "t.pt", "-o", tmp_path / "out")
    assert truncated.code == 1 and truncated.err.startswith("error: ") and len(truncated.err.strip().splitlines()) == 1
    torch.save({"model": {"f8": torch.zeros(2, dtype=torch.float8_e4m3fn)}}, tmp_path / "f8.pt")
    assert cli("export", tmp_path / "f8.pt", "--format", "pt", "-o", tmp_path / "out.pt").code == 2
    assert cli("export", tmp_path / "c.pt", "--format", "pt", "-o", tmp_path / "out.safetensors").code == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("out", "."))]


def test_use_ema_from_a_lightning_ema_callback_state(cli, tmp_path):
    model = _Tiny()
    ema = {k: v * 2 for k, v in model.state_dict().items()}
    torch.save(
        {"state_dict": model.state_dict(), "callbacks": {"EMA": {"decay": 0.999, "ema_state_dict": ema}}}, tmp_path / "last.ckpt"
    )
    result = cli("export", tmp_path / "last.ckpt", "--use-ema", "-o", tmp_path / "m.safetensors")
    assert result.code == 0, result.err
    out = read_output(tmp_path / "m.safetensors")
    assert all(torch.equal(out[k], ema[k]) for k in ema)
