"""Quantized weights (FP8 with block/row/tensor scales, MXFP4 as gpt-oss packs it) are averaged as the values
they stand for, exactly; other quantized layouts are refused with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckptavg
from tests.conftest import read_output

E4M3_MAX = 448.0
BLOCK = 128
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]}


def quantize_fp8_blocks(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's layout: F8_E4M3 codes and an F32 scale per block (absmax / 448), edge blocks partial."""
    rows, cols = w.shape
    scales = torch.empty(-(-rows // block), -(-cols // block))
    codes = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            part = w[i * block : (i + 1) * block, j * block : (j + 1) * block]
            scales[i, j] = part.abs().max().clamp(min=1e-12) / E4M3_MAX
            codes[i * block : (i + 1) * block, j * block : (j + 1) * block] = (part / scales[i, j]).to(torch.float8_e4m3fn)
    return codes, scales


def dequantize_fp8_blocks(codes: torch.Tensor, scales: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """The independent float64 reference: every element times its block's scale, block by block."""
    out = codes.double()
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            out[i * block : (i + 1) * block, j * block : (j + 1) * block] *= float(scales[i, j])
    return out


def fp8_state(seed: int) -> dict[str, torch.Tensor]:
    """A small model in the DeepSeek-V3 FP8 layout: two block-scaled weights (partial edge blocks), plain BF16
    norm and embedding, and an int buffer."""
    g = torch.Generator().manual_seed(seed)
    state = {"model.embed_tokens.weight": torch.randn(50, 40, generator=g).bfloat16()}
    for name, shape in (
        ("model.layers.0.mlp.down_proj.weight", (300, 200)),
        ("model.layers.0.self_attn.q_proj.weight", (130, 256)),
    ):
        codes, scales = quantize_fp8_blocks(torch.randn(*shape, generator=g) * (1 + seed))
        state[name], state[f"{name}_scale_inv"] = codes, scales
    state["model.norm.weight"] = torch.randn(40, generator=g).bfloat16()
    state["model.step"] = torch.tensor(seed)
    return state


def save_sharded(state: dict[str, torch.Tensor], folder: Path, config: dict) -> Path:
    """Two shards and an index, the scale of one weight in another shard than the weight (as releases do)."""
    folder.mkdir(parents=True)
    names = list(state)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    for file, part in shards.items():
        save_file({n: state[n] for n in part}, folder / file, metadata={"format": "pt"})
    weight_map = {n: file for file, part in shards.items() for n in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(
        json.dumps({"model_type": "deepseek_v3", "torch_dtype": "bfloat16", "quantization_config": config})
    )
    return folder


@pytest.fixture(scope="module")
def fp8_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    states = [fp8_state(seed) for seed in range(3)]
    return [save_sharded(s, root / f"checkpoint-{10 * (i + 1)}", FP8_CONFIG) for i, s in enumerate(states)], states


def dequantized_states(states: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    out = []
    for state in states:
        plain = {}
        for name, value in state.items():
            if name.endswith("_scale_inv"):
                continue
            plain[name] = (
                dequantize_fp8_blocks(value, state[f"{name}_scale_inv"]) if value.dtype == torch.float8_e4m3fn else value
            )
        out.append(plain)
    return out


def reference_mean(states: list[dict[str, torch.Tensor]], name: str) -> torch.Tensor:
    return sum(s[name].double() for s in states) / len(states)


def test_fp8_block_scaled_weights_are_averaged_as_their_values(fp8_run, tmp_path):
    folders, states = fp8_run
    report = ckptavg.average(folders, tmp_path / "merged")
    out = read_output(tmp_path / "merged")
    plain = dequantized_states(states)
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"):
        assert out[name].dtype == torch.bfloat16
        assert torch.equal(out[name], reference_mean(plain, name).to(torch.bfloat16)), name
        assert f"{name}_scale_inv" not in out
    assert torch.equal(out["model.norm.weight"], reference_mean(plain, "model.norm.weight").to(torch.bfloat16))
    assert torch.equal(out["model.step"], states[-1]["model.step"])
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"
    assert "fp8 e4m3, 128x128 blocks" in report.inputs[0].format
    assert any("read as their values" in note and "block size from config.json" in note for note in report.inputs[0].notes)


def test_the_old_behaviour_was_far_off(fp8_run):
    """What averaging the codes and the scales apart gave (the old behaviour), against the exact mean: the
    figure the closing note of issue 19 quotes."""
    _, states = fp8_run
    name = "model.layers.0.mlp.down_proj.weight"
    exact = reference_mean(dequantized_states(states), name)
    codes = (sum(s[name].double() for s in states) / len(states)).to(torch.float8_e4m3fn)
    scales = (sum(s[f"{name}_scale_inv"].double() for s in states) / len(states)).float()
    old = dequantize_fp8_blocks(codes, scales)
    assert ((old - exact).norm() / exact.norm()).item() > 0.05


def test_fp8_files_given_alone_are_read_the_same(fp8_run, tmp_path):
    """The result does not depend on how the path was typed: one safetensors file without a config.json beside
    it, the block size then inferred from the shapes and said."""
    _, states = fp8_run
    files = []
    for i, state in enumerate(states[:2]):
        files.append(tmp_path / f"c{i}.safetensors")
        save_file(state, files[-1])
    report = ckptavg.average(files, tmp_path / "out.safetensors", order="given", dtype="fp32")
    out = load_file(tmp_path / "out.safetensors")
    plain = dequantized_states(states[:2])
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(out[name], reference_mean(plain, name).float())
    assert any("inferred from the shapes" in note for note in report.inputs[0].notes)


def test_export_dequantizes_one_checkpoint_as_torch_reads_it(fp8_run, tmp_path):
    """export of one FP8 checkpoint is a streaming dequantization; the values are those torch's own
    QuantizedHuggingFaceStorageReader gives."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.quantized_hf_storage import QuantizedHuggingFaceStorageReader

    folders, states = fp8_run
    ckptavg.export(folders[0], tmp_path / "plain", dtype="fp32")
    out = read_output(tmp_path / "plain")
    names = ["model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"]
    theirs = {n: torch.empty(states[0][n].shape) for n in names}
    load(theirs, storage_reader=QuantizedHuggingFaceStorageReader(str(folders[0]), target_dtype=torch.float32, block_size=BLOCK))
    for name in names:
        assert torch.equal(out[name], theirs[name]), name


def test_fp8_row_and_tensor_scales(tmp_path):
    """compressed-tensors / FBGEMM: `weight_scale` per row or per tensor, `input_scale` left out."""
    files, plain = [], []
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        w, v = torch.randn(16, 24, generator=g), torch.randn(8, 32, generator=g)
        row_scale = w.abs().amax(dim=1, keepdim=True) / E4M3_MAX
        tensor_scale = v.abs().max().reshape(1) / E4M3_MAX
        state = {
            "a.weight": (w / row_scale).to(torch.float8_e4m3fn),
            "a.weight_scale": row_scale,
            "a.input_scale": torch.ones(1),
            "b.weight": (v / tensor_scale).to(torch.float8_e4m3fn),
            "b.weight_scale": tensor_scale,
        }
        plain.append(
            {
                "a.weight": state["a.weight"].double() * row_scale.double(),
                "b.weight": state["b.weight"].double() * float(tensor_scale),
            }
        )
        files.append(tmp_path / f"c{seed}.safetensors")
        save_file(state, files[-1])
    report = ckptavg.average(files, tmp_path / "out.safetensors", order="given")
    out = load_file(tmp_path / "out.safetensors")
    assert set(out) == {"a.weight", "b.weight"}
    for name in out:
        assert torch.equal(out[name], reference_mean(plain, name).to(torch.bfloat16))
    assert any("a.input_scale" in note for note in report.inputs[0].notes)


# MXFP4 (OCP Microscaling): an element is E2M1 (sign, 2 exponent bits, 1 mantissa bit) times 2^(E8M0 - 127)


def e2m1_value(code: int) -> float:
    """The OCP MX definition of an E2M1 code, from its bits (independent of any table in ckptavg)."""
    sign = -1.0 if code & 0b1000 else 1.0
    exponent, mantissa = (code >> 1) & 0b11, code & 1
    return sign * (0.5 * mantissa if exponent == 0 else 2.0 ** (exponent - 1) * (1 + 0.5 * mantissa))


def pack_mxfp4(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize [..., n] to gpt-oss's layout: [..., n/32, 16] bytes (low nibble first) and [..., n/32] exponents."""
    grid = torch.tensor([e2m1_value(c) for c in range(16)])
    groups = values.reshape(*values.shape[:-1], -1, 32)
    exponent = torch.floor(torch.log2(groups.abs().amax(-1).clamp(min=2.0**-100))) - 2  # largest |x| maps within 6
    scaled = groups / torch.exp2(exponent).unsqueeze(-1)
    codes = (scaled.unsqueeze(-1) - grid).abs().argmin(-1).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (exponent + 127).to(torch.uint8)


def unpack_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float64 reference, element by element of the definition: [..., G, 16], [..., G] -> [..., G*32]."""
    table = torch.tensor([e2m1_value(c) for c in range(16)], dtype=torch.float64)
    low, high = table[(blocks & 0xF).long()], table[(blocks >> 4).long()]
    values = torch.stack((low, high), dim=-1).reshape(*blocks.shape[:-1], 32)
    values = values * torch.exp2(scales.double() - 127).unsqueeze(-1)
    return values.reshape(*blocks.shape[:-2], -1)


GPT_OSS = {
    "architectures": ["GptOssForCausalLM"],
    "model_type": "gpt_oss",
    "hidden_size": 64,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "vocab_size": 128,
    "max_position_embeddings": 256,
    "sliding_window": 32,
    "layer_types": ["full_attention"],
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}


@pytest.fixture(scope="module")
def gpt_oss_run(tmp_path_factory):
    """gpt-oss checkpoints: a tiny GptOssForCausalLM (transformers) whose experts are packed as MXFP4, as the
    release is: `*_proj_blocks` / `*_proj_scales` of the transposed [E, out, in] weights."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("gpt_oss")
    folders, states = [], []
    for i in range(2):
        torch.manual_seed(i)
        model = transformers.GptOssForCausalLM(
            transformers.GptOssConfig(**{k: v for k, v in GPT_OSS.items() if k not in ("architectures", "model_type")})
        )
        state = {}
        for name, value in model.state_dict().items():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                state[f"{name}_blocks"], state[f"{name}_scales"] = pack_mxfp4(value.detach().transpose(1, 2).contiguous())
            else:
                state[name] = value.detach().bfloat16().contiguous()
        folder = root / f"checkpoint-{i + 1}"
        folder.mkdir()
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(
            json.dumps(GPT_OSS | {"torch_dtype": "bfloat16", "quantization_config": {"quant_method": "mxfp4"}})
        )
        folders.append(folder)
        states.append(state)
    return folders, states


def test_mxfp4_experts_are_averaged_and_load_as_gpt_oss(gpt_oss_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    folders, states = gpt_oss_run
    report = ckptavg.average(folders, tmp_path / "merged", dtype="fp32")
    out = read_output(tmp_path / "merged")
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert f"{name}_blocks" not in out and f"{name}_scales" not in out
    plain = [unpack_mxfp4(s[f"{name}_blocks"], s[f"{name}_scales"]).transpose(1, 2) for s in states]
    assert torch.equal(out[name], ((plain[0] + plain[1]) / 2).float())
    ours = transformers.integrations.mxfp4.convert_moe_packed_tensors(
        states[0][f"{name}_blocks"], states[0][f"{name}_scales"], dtype=torch.float32
    )
    assert torch.equal(plain[0].float(), ours)  # the reference agrees with transformers' own dequantization
    assert "mxfp4" in report.inputs[0].format
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert torch.equal(model.model.layers[0].mlp.experts.gate_up_proj.detach(), out[name])
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())


def test_mxfp4_in_bounded_pieces_matches_the_whole(gpt_oss_run, tmp_path):
    """Read through the engine in blocks smaller than one expert, the transposed layout is still exact."""
    folders, states = gpt_oss_run
    ckptavg.average(folders[:1] * 1, tmp_path / "one", dtype="fp32", memory_budget="1MB")
    name = "model.layers.0.mlp.experts.down_proj"
    out = read_output(tmp_path / "one")
    assert torch.equal(out[name], unpack_mxfp4(states[0][f"{name}_blocks"], states[0][f"{name}_scales"]).transpose(1, 2).float())


@pytest.mark.parametrize(
    "state, words",
    [
        ({"l.qweight": torch.zeros(4, 4, dtype=torch.int32), "l.scales": torch.ones(4)}, "GPTQ/AWQ"),
        ({"l.weight": torch.zeros(4, 4, dtype=torch.int8), "l.SCB": torch.ones(4)}, "bitsandbytes int8"),
        (
            {"l.weight_packed": torch.zeros(4, 2, dtype=torch.int32), "l.weight_scale": torch.ones(4, 1)},
            "compressed-tensors pack-quantized",
        ),
        ({"l.weight": torch.zeros(4, 4), "l.weight_scale_inv": torch.ones(1, 1)}, "an unknown quantization scheme"),
        (
            {
                "l.weight": torch.zeros(4, 4, dtype=torch.float8_e4m3fn),
                "l.weight_scale_inv": torch.ones(2, 2, dtype=torch.float8_e4m3fn),
            },
            "unknown FP8 scheme",
        ),
        ({"l.w_scales": torch.zeros(4, dtype=torch.uint8)}, "looks like MXFP4 exponents"),
        ({"l.e": torch.zeros(4, dtype=torch.float8_e8m0fnu)}, "F8_E8M0"),
    ],
)
def test_other_quantized_layouts_are_refused_naming_the_tensor(cli, tmp_path, state, words):
    path = tmp_path / "q.safetensors"
    save_file(state, path)
    result = cli("export", path, "-o", tmp_path / "out")
    assert result.code == 1 and words in result.err and len(result.err.strip().splitlines()) == 1, result.err
    assert not (tmp_path / "out").exists()


def test_an_fp8_weight_whose_scale_is_in_a_missing_shard_is_refused(fp8_run, cli, tmp_path):
    folders, _ = fp8_run
    shard = folders[0] / "model-00001-of-00002.safetensors"  # holds the weight; its scale is in the other shard
    result = cli("export", shard, "-o", tmp_path / "out")
    assert result.code == 1 and "pass the whole folder" in result.err, result.err


def test_inspect_shows_the_scheme(fp8_run, cli):
    folders, _ = fp8_run
    result = cli("inspect", folders[0], "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert "fp8 e4m3, 128x128 blocks" in data["format"]
    assert data["tensors"] == 7 and data["bytes_by_dtype"]["float8_e4m3fn"] > 0  # as stored: codes and scales
    assert any("read as their values" in n for n in data["notes"]) and data["quantization"]["scales"]


def test_requantize_writes_the_inputs_scheme_within_its_rounding(fp8_run, tmp_path):
    folders, states = fp8_run
    report = ckptavg.average(folders, tmp_path / "merged", requantize=True, verify=True)
    out = read_output(tmp_path / "merged")
    assert set(out) == set(states[0])  # the same names: codes and their scales
    plain = dequantized_states(states)
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"):
        codes, scales = out[name], out[f"{name}_scale_inv"]
        assert (
            codes.dtype == torch.float8_e4m3fn
            and scales.dtype == torch.float32
            and scales.shape == states[0][f"{name}_scale_inv"].shape
        )
        exact = reference_mean(plain, name)
        back = dequantize_fp8_blocks(codes, scales)
        # E4M3 keeps 3 mantissa bits: a code is within 2^-4 of its value, or half its smallest step (2^-10 x scale)
        step = dequantize_fp8_blocks(torch.ones_like(codes.float()).to(torch.float8_e4m3fn), scales) * 2.0**-10
        error = (back - exact).abs() - torch.maximum(exact.abs() * 2.0**-4, step)
        assert (error <= 0).all(), (name, error.max())
        for i in range(scales.shape[0]):  # the rule: each block's absolute maximum is the format's largest value
            for j in range(scales.shape[1]):
                block = exact[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK]
                assert float(scales[i, j]) == (block.abs().max() / E4M3_MAX).float().item()
    assert "quantization_config" in json.loads((tmp_path / "merged" / "config.json").read_text())
    assert report.output_dtypes["float8_e4m3fn"] == 2


def test_requantize_of_one_checkpoint_gives_it_back_bit_for_bit(fp8_run, tmp_path):
    """Quantized by the same rule, one checkpoint passes through dequantize and requantize unchanged."""
    folders, states = fp8_run
    ckptavg.export(folders[1], tmp_path / "again", requantize=True)
    out = read_output(tmp_path / "again")
    for name, value in states[1].items():
        assert torch.equal(
            out[name].view(torch.uint8) if value.dtype.itemsize == 1 else out[name],
            value.view(torch.uint8) if value.dtype.itemsize == 1 else value,
        ), name


def test_requantize_refuses_what_it_cannot_write(gpt_oss_run, cli, tmp_path):
    folders, _ = gpt_oss_run
    result = cli("average", *folders, "--requantize", "-o", tmp_path / "out")
    assert result.code == 1 and "MXFP4" in result.err and not (tmp_path / "out").exists()


def test_any_element_range_reads_the_same_values(gpt_oss_run, tmp_path):
    """The engine reads a dequantized tensor by arbitrary element ranges (chunks, worker slices, torchrun
    shares): every range equals the same slice of the whole, across block rows, batches and experts."""
    from ckptavg.checkpoint import open_checkpoint

    g = torch.Generator().manual_seed(0)
    codes, scales = [], []
    for _ in range(3):  # a 3-D FP8 weight [3, 200, 150]: blocks of 128 restart in every batch element
        c, s = quantize_fp8_blocks(torch.randn(200, 150, generator=g))
        codes.append(c)
        scales.append(s)
    save_file({"w": torch.stack(codes), "w_scale_inv": torch.stack(scales)}, tmp_path / "fp8.safetensors")
    fp8 = open_checkpoint(tmp_path / "fp8.safetensors").tensors["w"]
    whole_fp8 = torch.stack([dequantize_fp8_blocks(c, s) for c, s in zip(codes, scales)]).reshape(-1)
    folders, states = gpt_oss_run
    mx = open_checkpoint(folders[0]).tensors["model.layers.0.mlp.experts.gate_up_proj"]
    name = "model.layers.0.mlp.experts.gate_up_proj"
    whole_mx = unpack_mxfp4(states[0][f"{name}_blocks"], states[0][f"{name}_scales"]).transpose(1, 2).reshape(-1)
    for source, whole in ((fp8, whole_fp8), (mx, whole_mx)):
        assert torch.equal(source.read().reshape(-1), whole)
        for _ in range(40):
            lo = int(torch.randint(0, whole.numel(), (1,), generator=g))
            hi = lo + int(torch.randint(1, 40_000, (1,), generator=g))
            hi = min(hi, whole.numel())
            assert torch.equal(source.values(lo, hi), whole[lo:hi]), (lo, hi)


def test_a_copy_of_an_fp8_checkpoint_is_told_by_its_stored_bytes(fp8_run, cli, tmp_path):
    """The copies check compares what the files hold (codes and scales), never the dequantized float64 values."""
    import shutil

    folders, _ = fp8_run
    copy = shutil.copytree(folders[1], tmp_path / "checkpoint_best")
    result = cli("average", folders[0], folders[1], copy, "-o", tmp_path / "out")
    assert result.code == 2 and "holds the same weights as" in result.err, result.err
