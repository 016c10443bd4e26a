"""Each bad input: a one-line error naming the file, a non-zero exit code, no traceback, nothing written."""

from __future__ import annotations

import json
import os
import pickle
import struct

import pytest
import torch
from conftest import make_state, save_layout
from safetensors.torch import save_file


def assert_clean_failure(result, tmp_path, code: int, *needles: str) -> None:
    assert result.code == code, (result.code, result.err)
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1, result.err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".ckptavg-partial" in p.name]


@pytest.fixture
def good(tmp_path):
    return [save_layout(make_state(s), tmp_path / f"good{s}", "safetensors") for s in range(2)]


def test_truncated_safetensors(cli, tmp_path, good):
    data = good[1].read_bytes()
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(data[: len(data) - 100])
    result = cli("average", good[0], bad, "-o", tmp_path / "out")
    assert_clean_failure(result, tmp_path, 1, "trunc.safetensors", "truncated")


def test_corrupt_header(cli, tmp_path, good):
    data = bytearray(good[1].read_bytes())
    data[12:20] = b"@#$%^&*!"
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(bytes(data))
    result = cli("average", good[0], bad, "-o", tmp_path / "out")
    assert_clean_failure(result, tmp_path, 1, "corrupt.safetensors", "corrupt safetensors header")


def test_header_length_beyond_file(cli, tmp_path, good):
    bad = tmp_path / "huge.safetensors"
    bad.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    result = cli("average", good[0], bad, "-o", tmp_path / "out")
    assert_clean_failure(result, tmp_path, 1, "huge.safetensors", "truncated")


def test_shape_mismatch(cli, tmp_path, good):
    state = make_state(5)
    state["layer.0.weight"] = torch.zeros(48, 47)
    bad = save_layout(state, tmp_path / "bad", "safetensors")
    result = cli("average", good[0], bad, "-o", tmp_path / "out")
    assert_clean_failure(result, tmp_path, 1, str(bad), "layer.0.weight has shape [48, 47], expected [48, 48]")


def test_dtype_mismatch(cli, tmp_path, good):
    state = make_state(5)
    state["layer.0.bias"] = state["layer.0.bias"].half()
    bad = save_layout(state, tmp_path / "bad", "safetensors")
    result = cli("average", good[0], bad, "-o", tmp_path / "out")
    assert_clean_failure(result, tmp_path, 1, "layer.0.bias is float16, expected float32")


def test_missing_tensor(cli, tmp_path, good):
    state = make_state(5)
    del state["layer.0.bias"]
    bad = save_layout(state, tmp_path / "bad", "safetensors")
    result = cli("average", good[0], bad, "-o", tmp_path / "out")
    assert_clean_failure(result, tmp_path, 1, str(bad), "missing 1 tensor(s)", "layer.0.bias")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf(cli, tmp_path, good, value):
    state = make_state(5)
    state["layer.0.weight"][3, 4] = value
    bad = save_layout(state, tmp_path / "bad", "safetensors")
    result = cli("average", good[0], bad, "-o", tmp_path / "out")
    assert_clean_failure(result, tmp_path, 1, str(bad), "layer.0.weight", "element 148")


class Hostile:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_hostile_pickle_inside_a_checkpoint_is_refused_naming_the_callable(cli, tmp_path):
    """os.system next to good weights: the file is refused as hostile (not merely ignored), and nothing ran."""
    marker = tmp_path / "pwned"
    paths = []
    for s in range(2):
        path = tmp_path / f"c{s}.pt"
        torch.save({"state_dict": make_state(s), "payload": Hostile(str(marker))}, path)
        paths.append(path)
    result = cli("average", *paths, "-o", tmp_path / "merged")
    assert_clean_failure(result, tmp_path, 1, "c0.pt", f"hostile pickle: it calls {os.system.__module__}.system")
    assert not marker.exists()


class Unknown:
    """A class the reader cannot import: it stays an inert placeholder, the weights are read."""


def test_unknown_classes_stay_inert_placeholders(cli, tmp_path):
    paths = []
    for s in range(2):
        path = tmp_path / f"c{s}.pt"
        torch.save({"state_dict": make_state(s), "config": Unknown()}, path)
        paths.append(path)
    result = cli("average", *paths, "-o", tmp_path / "merged")
    assert result.code == 0, result.err


def test_plain_hostile_pickle_is_refused(cli, tmp_path, good):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pt"
    bad.write_bytes(pickle.dumps(Hostile(str(marker)), protocol=2))
    result = cli("average", good[0], bad, "-o", tmp_path / "out")
    assert_clean_failure(result, tmp_path, 1, "evil.pt", "hostile pickle", "system")
    assert not marker.exists()


def test_hostile_data_pkl_in_zip_runs_nothing(cli, tmp_path, good):
    import zipfile

    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.bin"
    with zipfile.ZipFile(bad, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"w": Hostile(str(marker))}, protocol=2))
    result = cli("average", good[0], bad, "-o", tmp_path / "out")
    assert_clean_failure(result, tmp_path, 1, "evil.bin", "hostile pickle", "system")
    assert not marker.exists()


def test_empty_file(cli, tmp_path, good):
    bad = tmp_path / "empty.safetensors"
    bad.write_bytes(b"")
    result = cli("average", good[0], bad, "-o", tmp_path / "out")
    assert_clean_failure(result, tmp_path, 1, "empty.safetensors", "empty file")


def test_folder_without_weights(cli, tmp_path, good):
    folder = tmp_path / "nothing"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    result = cli("average", good[0], folder, "-o", tmp_path / "out")
    assert_clean_failure(result, tmp_path, 1, "nothing", "no weights found")


def test_missing_path(cli, tmp_path, good):
    result = cli("average", good[0], tmp_path / "nope", "-o", tmp_path / "out")
    assert_clean_failure(result, tmp_path, 1, "nope", "no such file or folder")


def test_existing_output_refused(cli, tmp_path, good):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = cli("average", *good, "-o", out)
    assert result.code == 3 and result.err.startswith("error: ") and "--overwrite" in result.err
    assert (out / "keep.txt").read_text() == "mine"


def test_output_that_is_an_input_is_refused(cli, tmp_path, good):
    result = cli("average", *good, "-o", good[0])
    assert result.code == 3 and "is one of the inputs" in result.err


def test_renamed_pickle_is_recognised_by_its_bytes(cli, tmp_path):
    paths = []
    for s in range(2):
        path = tmp_path / f"c{s}.safetensors"
        torch.save(make_state(s), path)
        paths.append(path)
    result = cli("average", *paths, "-o", tmp_path / "merged")
    assert result.code == 0, result.err
    assert "is a PyTorch pickle despite its name" in result.out


def test_quantized_model_refused(cli, tmp_path, good):
    folder = save_layout(make_state(0), tmp_path / "q", "safetensors-folder")
    (folder / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq", "bits": 4}}))
    result = cli("average", good[0], folder, "-o", tmp_path / "out")
    assert_clean_failure(result, tmp_path, 1, "gptq quantized model", "quantize the result")


def test_packed_quantized_weights_refused(cli, tmp_path, good):
    bad = tmp_path / "awq.safetensors"
    save_file({"layer.qweight": torch.zeros(4, 4, dtype=torch.int32), "layer.scales": torch.ones(4)}, bad)
    result = cli("average", good[0], bad, "-o", tmp_path / "out")
    assert_clean_failure(result, tmp_path, 1, "awq.safetensors", "quantized weights")


@pytest.mark.parametrize("layout", ["deepspeed", "dcp"])
def test_distributed_layouts_refused(cli, tmp_path, good, layout):
    folder = tmp_path / "dist"
    folder.mkdir()
    if layout == "deepspeed":
        (folder / "global_step100").mkdir()
        (folder / "latest").write_text("global_step100")
        needle = "holds no *model_states.pt"
    else:
        (folder / "__0_0.distcp").write_bytes(b"x")
        (folder / ".metadata").write_bytes(b"x")
        needle = "corrupt DCP metadata"
    result = cli("average", good[0], folder, "-o", tmp_path / "out")
    assert_clean_failure(result, tmp_path, 1, needle)


def test_use_ema_without_ema_weights(cli, tmp_path):
    paths = [save_layout(make_state(s), tmp_path / f"c{s}", "pt") for s in range(2)]
    result = cli("average", *paths, "--use-ema", "-o", tmp_path / "out")
    assert_clean_failure(result, tmp_path, 1, "carries no EMA weights")


def test_usage_errors_exit_2(cli, tmp_path, good):
    assert cli("average", *good, "-o", tmp_path / "out", "--weights", "1,2,3").code == 2
    assert cli("average", *good, "-o", tmp_path / "out", "--dtype", "int8").code == 2
    assert cli("average", *good, "-o", tmp_path / "out", "--ema", "1.5").code == 2
    assert cli("average", *good, "-o", tmp_path / "out", "--device", "cuda:7").code == 2
    assert cli("average", *good).code == 2
    assert cli("average", *good, "-o", tmp_path / "out", "--bogus").code == 2
    assert not (tmp_path / "out").exists()


def test_not_enough_space_is_refused_before_writing(cli, tmp_path, good, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    result = cli("average", *good, "-o", tmp_path / "out")
    assert_clean_failure(result, tmp_path, 3, "not enough free space")


def test_a_failing_model_file_copy_fails_the_run(cli, tmp_path, monkeypatch):
    import shutil

    paths = [save_layout(make_state(s), tmp_path, "hf-trainer", step=s + 1) for s in range(2)]

    def broken_copy(src, dst, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", broken_copy)
    result = cli("average", *paths, "-o", tmp_path / "out")
    assert_clean_failure(result, tmp_path, 3, "No space left on device")


class Calls:
    """Pickles as a call of `func(*args)`: what an attacker writes into a checkpoint."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


@pytest.mark.parametrize(
    "func, args",
    [
        (eval, ("__import__('os').system('touch {marker}')",)),
        (exec, ("open('{marker}', 'w')",)),
        (__import__("subprocess").call, (["touch", "{marker}"],)),
        (__import__("runpy").run_path, ("{marker}",)),
        (getattr, (Calls(__import__, "os"), "system")),
    ],
)
def test_dangerous_callables_are_refused_by_name(cli, tmp_path, good, func, args):
    marker = tmp_path / "pwned"
    args = tuple(a.format(marker=marker) if isinstance(a, str) else a for a in args)
    bad = tmp_path / "evil.pt"
    torch.save({"state_dict": make_state(0), "extra": {"x": Calls(func, *args)}}, bad)
    result = cli("average", good[0], bad, "-o", tmp_path / "out")
    assert_clean_failure(result, tmp_path, 1, "evil.pt", f"hostile pickle: it calls {func.__module__}.{func.__name__}")
    assert not marker.exists()
