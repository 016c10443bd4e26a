"""average() against an independent float64 reference, over every input layout and dtype."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_state, read_output, reference_average, save_layout

import ckptavg
from ckptavg.errors import OutputError
from ckptavg.merge.engine import fold

LAYOUTS = [
    "safetensors",
    "safetensors-folder",
    "safetensors-sharded",
    "bin",
    "bin-sharded",
    "pt",
    "pt-legacy",
    "lightning",
    "fairseq",
    "hf-trainer",
]


def assert_exact(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert set(out) == set(ref)
    for name, want in ref.items():
        got = out[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got, want), f"{name}: {int((got != want).sum())} elements differ from the float64 reference"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_matches_float64_reference(tmp_path, layout):
    states = [make_state(seed) for seed in range(3)]
    paths = [save_layout(s, tmp_path / f"in{i}", layout, step=(i + 1) * 10) for i, s in enumerate(states)]
    prefixes = ["model."] if layout == "lightning" else []
    report = ckptavg.average(paths, tmp_path / "out", strip_prefixes=prefixes)
    assert_exact(read_output(tmp_path / "out"), reference_average(states))
    assert report.copied_from_newest == ["norm.num_batches_tracked", "mask"]
    assert report.bytes_read > 0 and report.bytes_written > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [2, 3, 5])
def test_mean_is_correctly_rounded(tmp_path, dtype, n):
    states = [make_state(seed, dtype) for seed in range(n)]
    paths = [save_layout(s, tmp_path / f"in{i}", "safetensors") for i, s in enumerate(states)]
    ckptavg.average(paths, tmp_path / "out")
    assert_exact(read_output(tmp_path / "out"), reference_average(states))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_identical_inputs_come_back_bit_for_bit(tmp_path, dtype):
    state = make_state(7, dtype)
    # identical floats; the step counter (copied from the newest, not averaged) differs, or they would be copies of one checkpoint
    states = [state | {"norm.num_batches_tracked": torch.tensor(100 * i)} for i in range(3)]
    paths = [save_layout(s, tmp_path / f"in{i}", "safetensors") for i, s in enumerate(states)]
    for weights, ema in [(None, None), ("linear", None), ("0.2,0.3,0.5", None), (None, 0.9)]:
        out = tmp_path / f"out-{weights}-{ema}"
        ckptavg.average(paths, out, weights=weights, ema=ema, order="given")
        assert_exact(read_output(out), states[-1])


def test_linear_and_explicit_weights(tmp_path):
    states = [make_state(seed, torch.bfloat16) for seed in range(4)]
    paths = [save_layout(s, tmp_path / f"in{i}", "safetensors") for i, s in enumerate(states)]
    ckptavg.average(paths, tmp_path / "lin", weights="linear", order="given")
    assert_exact(read_output(tmp_path / "lin"), reference_average(states, [1, 2, 3, 4]))
    report = ckptavg.average(paths, tmp_path / "w", weights="3,0,1,4", order="given")
    assert_exact(read_output(tmp_path / "w"), reference_average(states, [3, 0, 1, 4]))
    assert [i.weight for i in report.inputs] == [3 / 8, 0, 1 / 8, 4 / 8]


def test_ema_matches_the_recurrence(tmp_path):
    states = [make_state(seed) for seed in range(4)]
    paths = [save_layout(s, tmp_path / f"in{i}", "safetensors") for i, s in enumerate(states)]
    ckptavg.average(paths, tmp_path / "out", ema=0.7, order="given")
    out = read_output(tmp_path / "out")
    for name in ("embed.weight", "layer.0.bias"):
        e = states[0][name].double()
        for s in states[1:]:
            e = 0.7 * e + 0.3 * s[name].double()
        # FP64 accumulation of FP32 inputs: at most one rounding step away from the exact value.
        diff = (out[name].double() - e.float().double()).abs()
        ulp = torch.finfo(torch.float32).eps * e.abs().clamp_min(1e-30)
        assert bool((diff <= ulp).all()), name


def test_fp32_accumulator_for_bf16_within_one_ulp(tmp_path):
    states = [make_state(seed, torch.bfloat16) for seed in range(5)]
    paths = [save_layout(s, tmp_path / f"in{i}", "safetensors") for i, s in enumerate(states)]
    ckptavg.average(paths, tmp_path / "out", ema=0.9, order="given")
    out = read_output(tmp_path / "out")
    w = [0.9**4] + [0.1 * 0.9 ** (5 - i) for i in range(2, 6)]
    ref = reference_average(states, w)
    for name in ("embed.weight", "layer.0.weight"):
        diff = (out[name].float() - ref[name].float()).abs()
        ulp = ref[name].float().abs() * 2**-7 + 1e-30
        assert bool((diff <= ulp).all())
        assert (out[name] == ref[name]).float().mean() > 0.99


@pytest.mark.parametrize("target", ["bf16", "fp16", "fp32"])
def test_output_dtype(tmp_path, target):
    states = [make_state(seed) for seed in range(3)]
    paths = [save_layout(s, tmp_path / f"in{i}", "hf-trainer", step=i + 1) for i, s in enumerate(states)]
    ckptavg.average(paths, tmp_path / "out", dtype=target)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[target]
    out = read_output(tmp_path / "out")
    ref = reference_average(states)
    assert out["embed.weight"].dtype == dtype
    assert torch.equal(out["embed.weight"], ref["embed.weight"].to(dtype))
    assert out["norm.num_batches_tracked"].dtype == torch.int64
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == str(dtype).removeprefix("torch.")


def test_accum_fp64_with_ema_is_exact_to_reference(tmp_path):
    states = [make_state(seed, torch.bfloat16) for seed in range(4)]
    paths = [save_layout(s, tmp_path / f"in{i}", "safetensors") for i, s in enumerate(states)]
    ckptavg.average(paths, tmp_path / "out", ema=0.5, accum="fp64", order="given")
    w = [0.5**3] + [0.5 * 0.5 ** (4 - i) for i in range(2, 5)]
    assert_exact(read_output(tmp_path / "out"), reference_average(states, w))


def test_sharded_output_and_index(tmp_path):
    states = [make_state(seed) for seed in range(2)]
    paths = [save_layout(s, tmp_path / f"in{i}", "safetensors-sharded") for i, s in enumerate(states)]
    report = ckptavg.average(paths, tmp_path / "out", max_shard_size="10KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in reference_average(states).values())
    assert_exact(read_output(tmp_path / "out"), reference_average(states))
    assert "model.safetensors.index.json" in report.output_files


def test_single_file_output_carries_recipe(tmp_path):
    from safetensors import safe_open

    states = [make_state(seed) for seed in range(2)]
    paths = [save_layout(s, tmp_path / f"in{i}", "safetensors") for i, s in enumerate(states)]
    ckptavg.average(paths, tmp_path / "merged.safetensors")
    with safe_open(tmp_path / "merged.safetensors", "pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt"
    assert json.loads(metadata["ckptavg"])["strategy"] == "mean"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in0", "in1", "merged.safetensors"]


def test_tied_weights_are_kept_under_both_names(tmp_path):
    states = [make_state(seed, tied=True) for seed in range(3)]
    paths = [save_layout(s, tmp_path / f"in{i}", "bin") for i, s in enumerate(states)]
    report = ckptavg.average(paths, tmp_path / "out", max_shard_size="12KB")
    out = read_output(tmp_path / "out")
    assert report.tied == [["head.weight", "embed.weight"]]
    assert torch.equal(out["head.weight"], out["embed.weight"])
    assert_exact(out, reference_average(states))


def test_order_by_step_and_given(tmp_path):
    states = [make_state(seed) for seed in range(3)]
    steps = [300, 100, 2000]
    paths = [save_layout(s, tmp_path, "hf-trainer", step=step) for s, step in zip(states, steps)]
    report = ckptavg.average(paths, tmp_path / "out", weights="linear")
    assert [i.step for i in report.inputs] == [100, 300, 2000] and report.order == "step"
    ordered = [states[1], states[0], states[2]]
    assert_exact(read_output(tmp_path / "out"), reference_average(ordered, [1, 2, 3]))
    # integers come from the newest checkpoint by step, not the last one named
    assert int(read_output(tmp_path / "out")["norm.num_batches_tracked"]) == 300
    given = ckptavg.average(paths, tmp_path / "out2", weights="linear", order="given")
    assert [i.step for i in given.inputs] == steps and given.order == "given"


@pytest.mark.parametrize("layout,expected", [("lightning", 50), ("fairseq", 50), ("pt", 50)])
def test_step_read_from_checkpoint_or_name(tmp_path, layout, expected):
    path = save_layout(make_state(0), tmp_path, layout, step=50)
    report = ckptavg.average([path], None, dry_run=True, strip_prefixes=["model."])
    assert report.inputs[0].step == expected


def test_config_and_tokenizer_copied_never_training_state(tmp_path):
    paths = [save_layout(make_state(s), tmp_path, "hf-trainer", step=s + 1) for s in range(2)]
    ckptavg.average(paths, tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [
        "README.md",
        "ckptavg.json",
        "config.json",
        "model.safetensors",
        "tokenizer_config.json",
    ]  # README.md: the model card
    recipe = json.loads((tmp_path / "out" / "ckptavg.json").read_text())
    assert [i["step"] for i in recipe["inputs"]] == [1, 2] and recipe["version"] == ckptavg.__version__


def test_use_ema_and_key(tmp_path):
    raw = [make_state(s) for s in range(2)]
    ema = [make_state(s + 10) for s in range(2)]
    paths = []
    for i in range(2):
        path = tmp_path / f"c{i}.pt"
        averaged = {f"module.{k}": v for k, v in ema[i].items()} | {"n_averaged": torch.tensor(5)}
        torch.save({"model": raw[i], "ema": averaged, "custom": ema[i]}, path)
        paths.append(path)
    ckptavg.average(paths, tmp_path / "raw")
    assert_exact(read_output(tmp_path / "raw"), reference_average(raw))
    ckptavg.average(paths, tmp_path / "ema", use_ema=True)
    assert_exact(read_output(tmp_path / "ema"), reference_average(ema))
    ckptavg.average(paths, tmp_path / "key", key="custom")
    assert_exact(read_output(tmp_path / "key"), reference_average(ema))


def test_strip_prefix(tmp_path):
    states = [make_state(s) for s in range(2)]
    paths = []
    for i, s in enumerate(states):
        path = tmp_path / f"c{i}.pt"
        torch.save({f"module._orig_mod.{k}": v for k, v in s.items()}, path)
        paths.append(path)
    ckptavg.average(paths, tmp_path / "out", strip_prefixes=["module.", "_orig_mod."])
    assert_exact(read_output(tmp_path / "out"), reference_average(states))


def test_strided_and_float8_pickled_tensors(tmp_path):
    paths, states = [], []
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        base = torch.randn(6, 10, generator=g)
        state = {"t": base.t(), "f8": torch.randn(16, generator=g).to(torch.float8_e4m3fn)}
        states.append(state)
        paths.append(tmp_path / f"c{seed}.pt")
        torch.save(state, paths[-1])
    ckptavg.average(paths, tmp_path / "out")
    out = read_output(tmp_path / "out")
    assert torch.equal(out["t"], ((states[0]["t"].double() + states[1]["t"].double()) / 2).float())
    assert out["f8"].dtype == torch.float8_e4m3fn


def test_dry_run_writes_nothing(tmp_path):
    paths = [save_layout(make_state(s), tmp_path / f"in{i}", "safetensors") for i, s in enumerate(range(2))]
    report = ckptavg.average(paths, tmp_path / "out", dry_run=True)
    assert report.dry_run and report.tensors == 6 and not (tmp_path / "out").exists()


def test_overwrite_replaces_a_previous_output_and_refuses_it_as_an_input(tmp_path):
    states = [make_state(s) for s in range(3)]
    paths = [save_layout(s, tmp_path / f"in{i}", "safetensors-folder") for i, s in enumerate(states)]
    ckptavg.average(paths[:2], tmp_path / "out")
    with pytest.raises(OutputError, match="is one of the inputs"):
        ckptavg.average([*paths, tmp_path / "out"], tmp_path / "out", overwrite=True)
    report = ckptavg.average(paths, tmp_path / "out", overwrite=True)
    assert len(report.inputs) == 3
    assert_exact(read_output(tmp_path / "out"), reference_average(states))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_fold_blocks_agree_with_one_pass():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(10_000, generator=g).bfloat16() for _ in range(4)]
    out_blocked = torch.empty(10_000, dtype=torch.bfloat16)
    out_whole = torch.empty(10_000, dtype=torch.bfloat16)
    fold(xs, [0.1, 0.2, 0.3, 0.4], 1.0, torch.empty(1000), out_blocked)
    fold(xs, [0.1, 0.2, 0.3, 0.4], 1.0, torch.empty(10_000), out_whole)
    assert torch.equal(out_blocked, out_whole)


@pytest.mark.parametrize("staged", [False, True])
def test_small_budget_splits_tensors_into_chunks_and_blocks(tmp_path, staged):
    """A 1 MiB budget: chunks of 64 KiB and 4096-element blocks, bit-exact all the same. staged=True runs the
    CUDA pipeline's reader thread and staging buffers on the CPU."""
    from ckptavg.checkpoint import open_checkpoint
    from ckptavg.formats.writer import SafetensorsWriter, TensorSpec
    from ckptavg.merge.engine import Engine
    from ckptavg.merge.plan import build_plan
    from ckptavg.merge.weights import uniform

    states = [{"big": torch.randn(700_000, generator=torch.Generator().manual_seed(s)).bfloat16()} for s in range(3)]
    paths = [save_layout(s, tmp_path / f"in{i}", "safetensors") for i, s in enumerate(states)]
    plan = build_plan([open_checkpoint(p) for p in paths], uniform(3))
    engine = Engine(plan, torch.device("cpu"), memory_budget=1 << 20, staged=staged)
    assert len(engine.chunks()) > 1
    assert staged or engine.sizes.block_elements < engine.sizes.chunk_bytes // 2
    writer = SafetensorsWriter([tmp_path / "o.safetensors"], [[TensorSpec("big", torch.bfloat16, (700_000,))]], {"format": "pt"})
    engine.run(writer)
    writer.finish()
    assert_exact(read_output(tmp_path / "o.safetensors"), reference_average(states))


@pytest.mark.parametrize("layout", ["safetensors-sharded", "bin", "pt-legacy"])
def test_memory_budget_does_not_change_the_bytes(cli, tmp_path, layout):
    states = [make_state(seed, tied=layout == "bin") for seed in range(3)]
    paths = [save_layout(s, tmp_path / f"in{i}", layout) for i, s in enumerate(states)]
    assert cli("average", *paths, "-o", tmp_path / "default", "--quiet").code == 0
    result = cli("average", *paths, "-o", tmp_path / "small", "--memory-budget", "1MiB", "--quiet")
    assert result.code == 0, result.err
    assert_exact(read_output(tmp_path / "small"), read_output(tmp_path / "default"))
    assert_exact(read_output(tmp_path / "small"), reference_average(states))


def test_memory_budget_too_small_is_a_usage_error(cli, tmp_path):
    paths = [save_layout(make_state(seed), tmp_path / f"in{seed}", "safetensors") for seed in range(40)]
    result = cli("average", *paths, "-o", tmp_path / "out", "--memory-budget", "1MiB")
    assert result.code == 2
    assert "--memory-budget 1MiB is too small for 40 inputs" in result.err
    assert not (tmp_path / "out").exists()
