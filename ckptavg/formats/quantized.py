"""Quantized weights read as the values they stand for: FP8 with block, channel or tensor scales, and MXFP4.

A quantized weight is a tensor of codes and a companion tensor of scales. Averaging the codes and the scales
apart is not the mean of the values (code × scale), so this reader pairs every quantized weight with its scales
and yields one source of its dequantized values in float64: an FP8 code times an FP32 (or BF16) scale, and an
E2M1 value times a power of two, are exact there. The values are computed by element range as the engine reads
them, so the engine stays blind to the scheme and memory holds only the range being folded. The scales are not
tensors of the output; activation scales (`input_scale`, `k_scale`, `v_scale`) mean nothing to a dequantized
model and are left out, said in a note.

Layouts (see shared research): DeepSeek-V3 / Qwen3-FP8 `W` F8_E4M3 + `W_scale_inv` F32 over blocks
(`quantization_config.weight_block_size`, else inferred from the shapes); compressed-tensors and FBGEMM
`W` + `W_scale` (one scale, one per row, or per group of columns); gpt-oss MXFP4 `X_blocks` U8 [..., G, 16]
(two E2M1 values per byte, low nibble first) + `X_scales` U8 or E8M0 [..., G] (2^(s - 127) per 32 values).
Anything else that looks quantized is refused, naming the tensor and the scheme.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ckptavg.errors import InputError, UnsupportedError, option
from ckptavg.formats.base import TensorSource, tensor_buffer
from ckptavg.formats.detect import read_model_config
from ckptavg.formats.dtypes import is_floating

if TYPE_CHECKING:
    import torch

# torch's names of the FP8 dtypes -> the scheme's name in reports
FP8 = {
    "float8_e4m3fn": "e4m3",
    "float8_e5m2": "e5m2",
    "float8_e4m3fnuz": "e4m3fnuz",
    "float8_e5m2fnuz": "e5m2fnuz",
}
E8M0 = "float8_e8m0fnu"
# E2M1 magnitudes by code (bit 3 is the sign), OCP Microscaling Formats spec v1.0, section 5.3.3
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MX_BLOCK = 32
MXFP4_SCHEME = "mxfp4 (E2M1 values, an E8M0 scale per 32)"
ACTIVATION_SCALES = ("input_scale", "k_scale", "v_scale")
KNOWN_METHODS = ("fp8", "fbgemm_fp8", "compressed-tensors", "mxfp4")
# names other schemes give their companions: (suffix, scheme)
OTHER_SCHEMES = (
    (".qweight", "GPTQ/AWQ (int4 packed)"),
    (".qzeros", "GPTQ/AWQ (int4 packed)"),
    (".g_idx", "GPTQ"),
    (".SCB", "bitsandbytes int8"),
    (".absmax", "bitsandbytes 4-bit"),
    (".quant_map", "bitsandbytes 4-bit"),
    (".quant_state", "bitsandbytes 4-bit"),
    (".weight_format", "bitsandbytes int8"),
    (".weight_packed", "compressed-tensors pack-quantized (int4/int8)"),
    (".weight_zero_point", "compressed-tensors with zero points"),
    (".weight_g_idx", "compressed-tensors with activation ordering"),
    (".weight_global_scale", "compressed-tensors NVFP4"),
)
# the names a reader leaves to this module: a tensor whose name ends so is a companion, never a plain weight
QUANTIZED_NAME_MARKERS = tuple(suffix for suffix, _ in OTHER_SCHEMES) + (
    "_scale_inv",
    ".weight_scale",
    "_scales",
    "_blocks",
    *ACTIVATION_SCALES,
)


@dataclass
class Quantization:
    """What one checkpoint's quantization is: for the report, `inspect` and a writer that quantizes again."""

    scheme: str  # "fp8 e4m3, 128x128 blocks" / "mxfp4"
    method: str | None  # config.json's quant_method, if any
    weights: list[str] = field(default_factory=list)  # names of the dequantized tensors
    scales: list[str] = field(default_factory=list)  # names of the scale tensors they consumed
    dropped: list[str] = field(default_factory=list)  # activation scales left out
    block_from: str = ""  # where the block size came from

    def describe(self) -> str:
        block = f" (block size {self.block_from})" if self.block_from else ""
        dropped = f"; {len(self.dropped)} activation scale(s) left out ({self.dropped[0]}, ...)" if self.dropped else ""
        return (
            f"quantized: {self.scheme}{block}; {len(self.weights)} weight(s) read as their values "
            f"(code x scale, exact in float64), their {len(self.scales)} scale tensor(s) written only with "
            f"{option('requantize', True)}{dropped}"
        )

    def to_dict(self) -> dict:
        return {
            "scheme": self.scheme,
            "method": self.method,
            "block_from": self.block_from,
            "weights": len(self.weights),
            "scales": self.scales,
            "dropped": self.dropped,
        }


@dataclass
class DequantizedSource(TensorSource):
    """The float64 values of a quantized weight, computed from its codes and scales by element range.

    `kind` is "fp8" (codes: the FP8 tensor; scales: [*batch, SR, SC] over blocks of `block` = (rows, cols) of
    the last two axes) or "mxfp4" (codes: [*P, G, 16] bytes; scales: [*P, G] exponents). A 3-D MXFP4 tensor
    (gpt-oss experts [E, rows, G, 16]) is laid out [E, G*32, rows], transposed as transformers loads it."""

    codes: TensorSource | None = field(default=None, repr=False)
    scales: TensorSource | None = field(default=None, repr=False)
    kind: str = "fp8"
    block: tuple[int, int] = (1, 1)  # (0, 0): one scale for the whole tensor
    transposed: bool = False
    scale_suffix: str = ""  # the scales' name is the weight's + this: "_scale_inv", "_scale", "_scales"
    reads_by_range: ClassVar[bool] = True  # values() computes any element range from its codes and scales

    @property
    def contiguous(self) -> bool:
        return False

    @property
    def alias_key(self) -> tuple | None:
        return None

    @property
    def quantization(self) -> str:
        return self.kind

    def prepare(self) -> None:
        pass

    def release(self) -> None:
        pass

    def read_into(self, start: int, out: torch.Tensor) -> None:
        import torch

        assert start % 8 == 0 and out.numel() % 8 == 0, (start, out.numel())
        first = start // 8
        values = self.values(first, first + out.numel() // 8)
        out.copy_(values.contiguous().view(torch.uint8))

    def read(self) -> torch.Tensor:
        return self.values(0, self.numel).reshape(self.shape)

    def values(self, lo: int, hi: int) -> torch.Tensor:
        """Elements [lo, hi) of the dequantized tensor, flat, float64."""
        import torch

        if hi <= lo:
            return torch.empty(0, dtype=torch.float64)
        return _fp8_values(self, lo, hi) if self.kind == "fp8" else _mxfp4_values(self, lo, hi)


def _read_bytes(src: TensorSource, start: int, count: int) -> torch.Tensor:
    import torch

    raw = torch.empty(count, dtype=torch.uint8)
    if count:
        src.read_into(start, raw)
    return raw


def _fp8_values(s: DequantizedSource, lo: int, hi: int) -> torch.Tensor:
    import torch

    assert s.codes is not None and s.scales is not None
    codes = _values_of_codes(s.codes.dtype).index_select(0, _read_bytes(s.codes, lo, hi - lo).int())
    if s.block == (0, 0):  # one scale for the whole tensor
        return codes.mul_(_read_bytes(s.scales, 0, s.scales.nbytes).view(s.scales.dtype).to(torch.float64))
    cols = s.shape[-1] if s.shape else 1
    rows = s.shape[-2] if len(s.shape) >= 2 else 1
    block_rows, block_cols = s.block
    scale_rows, scale_cols = -(-rows // block_rows), -(-cols // block_cols)
    first_row, end_row = lo // cols, (hi - 1) // cols + 1
    row = torch.arange(first_row, end_row)
    scale_row = (row // rows) * scale_rows + (row % rows) // block_rows  # the batch's block row
    low, high = int(scale_row[0]), int(scale_row[-1]) + 1
    size = s.scales.itemsize
    table = _read_bytes(s.scales, low * scale_cols * size, (high - low) * scale_cols * size)
    table = table.view(s.scales.dtype).to(torch.float64).reshape(high - low, scale_cols)
    per_row = table.index_select(0, scale_row - low)  # [rows of the range, scale_cols]
    at = lo
    while at < hi:  # a partial first row, whole rows (scales broadcast over their blocks), a partial last row
        r, c = divmod(at, cols)
        i = r - first_row
        if c == 0 and hi - at >= cols:
            k = (hi - at) // cols
            part = codes[at - lo : at - lo + k * cols].view(k, cols)
            if cols % block_cols == 0:
                part.view(k, scale_cols, block_cols).mul_(per_row[i : i + k].unsqueeze(-1))
            else:
                part.mul_(per_row[i : i + k].repeat_interleave(block_cols, dim=1)[:, :cols])
            at += k * cols
        else:
            end = min(hi, (r + 1) * cols)
            codes[at - lo : end - lo].mul_(per_row[i].repeat_interleave(block_cols)[c : c + end - at])
            at = end
    return codes


@functools.cache
def _values_of_codes(dtype: torch.dtype) -> torch.Tensor:
    """The float64 value of each of the 256 codes of a one-byte dtype: a table lookup (index_select) converts
    codes about twice as fast as a dtype cast on a CPU."""
    import torch

    if dtype == torch.uint8:  # two E2M1 codes per byte: the pair's values, low nibble first
        e2m1 = torch.tensor(E2M1, dtype=torch.float64)
        return torch.stack((e2m1.repeat(16), e2m1.repeat_interleave(16)), dim=-1)
    return torch.arange(256, dtype=torch.uint8).view(dtype).to(torch.float64)


def _decode_mx(codes: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """[..., k, 16] bytes and [..., k] exponents -> [..., k * 32] float64 values."""
    import torch

    pairs = _values_of_codes(torch.uint8).index_select(0, codes.reshape(-1).int())  # [n, 2]: low nibble first
    values = pairs.reshape(*codes.shape[:-1], 2 * codes.shape[-1])
    values = torch.ldexp(values, (exponents.to(torch.int64) - 127).to(torch.float64).unsqueeze(-1))
    return values.reshape(*codes.shape[:-2], -1)


def _mxfp4_values(s: DequantizedSource, lo: int, hi: int) -> torch.Tensor:
    import torch

    assert s.codes is not None and s.scales is not None
    groups = s.codes.shape[-2]
    if not s.transposed:  # the natural layout: element i is nibble i % 2 of byte i // 2, scaled by exponent i // 32
        g0, g1 = lo // MX_BLOCK, (hi - 1) // MX_BLOCK + 1
        codes = _read_bytes(s.codes, g0 * 16, (g1 - g0) * 16).reshape(g1 - g0, 16)
        exps = _read_bytes(s.scales, g0, g1 - g0)
        return _decode_mx(codes, exps)[lo - g0 * MX_BLOCK : hi - g0 * MX_BLOCK]
    experts, cols, rows = s.shape  # [E, G*32, rows], stored [E, rows, G, 16]
    per_expert = cols * rows
    parts = []
    for e in range(lo // per_expert, (hi - 1) // per_expert + 1):
        a, b = max(lo, e * per_expert) - e * per_expert, min(hi, (e + 1) * per_expert) - e * per_expert
        c0, c1 = a // rows, (b - 1) // rows + 1  # output rows = input columns
        g0, g1 = c0 // MX_BLOCK, (c1 - 1) // MX_BLOCK + 1
        first = (e * rows * groups + g0) * 16  # [e, 0, g0, 0]
        span = ((rows - 1) * groups + (g1 - g0)) * 16
        codes = _read_bytes(s.codes, first, span).as_strided((rows, g1 - g0, 16), (groups * 16, 16, 1))
        exps = _read_bytes(s.scales, e * rows * groups + g0, (rows - 1) * groups + (g1 - g0)).as_strided(
            (rows, g1 - g0), (groups, 1)
        )
        block = _decode_mx(codes, exps)[:, c0 - g0 * MX_BLOCK : c1 - g0 * MX_BLOCK].t().reshape(-1)
        parts.append(block[a - c0 * rows : b - c0 * rows])
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def stored_tensors(tensors: dict[str, TensorSource]) -> dict[str, TensorSource]:
    """The tensors as the files hold them: every dequantized weight as its codes and its scales again."""
    out: dict[str, TensorSource] = {}
    for name, src in tensors.items():
        if isinstance(src, DequantizedSource) and src.codes is not None and src.scales is not None:
            out[f"{name}_blocks" if src.kind == "mxfp4" else name] = src.codes
            out[name + src.scale_suffix] = src.scales
        else:
            out[name] = src
    return out


def read_config(folder: Path | None) -> dict | None:
    """config.json's quantization_config, if the folder has one."""
    quant = (read_model_config(folder) or {}).get("quantization_config")
    return quant if isinstance(quant, dict) else None


def refuse_other_schemes(path: Path, names: list[str], config: dict | None) -> None:
    """GPTQ, AWQ, bitsandbytes, int-packed compressed-tensors, ...: one line naming the tensor and the scheme."""
    for name in names:
        for suffix, scheme in OTHER_SCHEMES:
            if name.endswith(suffix):
                raise UnsupportedError(
                    path,
                    (
                        f"tensor {name}: {scheme} quantized weights; ckptavg reads FP8 and MXFP4 weights: average the "
                        "unquantized checkpoints, then quantize the result"
                    ),
                )
    method = (config or {}).get("quant_method")
    if method and method not in KNOWN_METHODS:
        raise UnsupportedError(
            path,
            (
                f"{method} quantized model (config.json's quantization_config); ckptavg reads FP8 and MXFP4 weights: average "
                "the unquantized checkpoints, then quantize the result"
            ),
        )


def _block_size(
    path: Path, name: str, rows: int, cols: int, scale_rows: int, scale_cols: int, config: dict | None
) -> tuple[tuple[int, int], str]:
    """The block (rows, cols) each scale covers, and where that came from: config.json's weight_block_size
    when it fits, else the shapes (a power of two is preferred where several sizes give the same count)."""
    configured = (config or {}).get("weight_block_size")
    if isinstance(configured, list) and len(configured) == 2 and all(isinstance(x, int) and x > 0 for x in configured):
        br, bc = configured
        if -(-rows // br) == scale_rows and -(-cols // bc) == scale_cols:
            return (br, bc), "from config.json's weight_block_size"
        raise InputError(
            path,
            f"{name} has [{scale_rows}, {scale_cols}] scales, which blocks of {br}x{bc} (config.json's weight_block_size) "
            f"do not give for a [{rows}, {cols}] weight",
        )
    sizes = []
    for size, count in ((rows, scale_rows), (cols, scale_cols)):
        fits = [size] if count == 1 else [b for b in (128, 64, 256, 32, 16, 512, 8, 1024) if -(-size // b) == count]
        if not fits and size % count == 0:
            fits = [size // count]
        if not fits:
            raise InputError(
                path,
                (
                    f"{name}: {count} scales for {size} elements along an axis fit no block size; give it in config.json's "
                    "quantization_config.weight_block_size"
                ),
            )
        sizes.append(fits[0])
    return (sizes[0], sizes[1]), "inferred from the shapes: config.json gives no weight_block_size"


def _fp8_source(
    path: Path, name: str, codes: TensorSource, scale_name: str, scales: TensorSource, config: dict | None
) -> tuple[DequantizedSource, str, str]:
    """The dequantized source of an FP8 weight and its scales, its scheme and where its block size came from."""
    shape = codes.shape
    cols = shape[-1] if shape else 1
    rows = shape[-2] if len(shape) >= 2 else 1
    if not is_floating(scales.dtype_name) or scales.dtype_name in FP8 or scales.itemsize < 2:
        raise UnsupportedError(
            path, f"scale {scale_name} is {scales.dtype_name}: an unknown FP8 scheme (FP32 or BF16 scales expected)"
        )
    block_from = ""
    if scales.numel == 1:
        block, how = None, "one scale per tensor"
    elif scales.shape in (shape[:-1], (*shape[:-1], 1)):
        block, how = (1, cols), "one scale per row"
    elif len(scales.shape) == len(shape) >= 2 and scales.shape[:-2] == shape[:-2]:
        block, block_from = _block_size(path, scale_name, rows, cols, scales.shape[-2], scales.shape[-1], config)
        how = f"{block[0]}x{block[1]} blocks"
    else:
        raise UnsupportedError(
            path, f"scale {scale_name} has shape {list(scales.shape)} for a weight of shape {list(shape)}: an unknown FP8 scaling"
        )
    source = DequantizedSource(
        path=codes.path,
        offset=codes.offset,
        dtype_name="float64",
        shape=shape,
        codes=codes,
        scales=scales,
        kind="fp8",
        block=block or (0, 0),
        scale_suffix=scale_name.removeprefix(name),
    )
    return source, f"fp8 {FP8[codes.dtype_name]}, {how}", block_from


def _mxfp4_source(path: Path, name: str, codes: TensorSource, scales: TensorSource) -> DequantizedSource:
    if codes.dtype_name != "uint8" or len(codes.shape) < 2 or codes.shape[-1] != 16 or scales.shape != codes.shape[:-1]:
        raise UnsupportedError(
            path,
            f"{name}_blocks {codes.dtype_name} {list(codes.shape)} with {name}_scales {list(scales.shape)}: "
            "not MXFP4 as gpt-oss writes it (U8 [..., G, 16] blocks and [..., G] scales)",
        )
    if scales.dtype_name not in ("uint8", E8M0):
        raise UnsupportedError(path, f"{name}_scales is {scales.dtype_name}: MXFP4 scales are U8 or F8_E8M0 exponents")
    prefix, logical = codes.shape[:-2], codes.shape[-2] * MX_BLOCK
    transposed = len(prefix) == 2
    shape = (prefix[0], logical, prefix[1]) if transposed else (*prefix, logical)
    raw_scales = scales if scales.dtype_name == "uint8" else _as_bytes(scales)
    return DequantizedSource(
        path=codes.path,
        offset=codes.offset,
        dtype_name="float64",
        shape=shape,
        codes=codes,
        scales=raw_scales,
        kind="mxfp4",
        block=(1, MX_BLOCK),
        transposed=transposed,
        scale_suffix="_scales",
    )


def _as_bytes(src: TensorSource) -> TensorSource:
    """An E8M0 scale tensor read as the raw exponent bytes it is."""
    return TensorSource(
        path=src.path, offset=src.offset, dtype_name="uint8", shape=src.shape, stride=src.stride, storage=src.storage
    )


def dequantized(
    path: Path, tensors: dict[str, TensorSource], config: dict | None
) -> tuple[dict[str, TensorSource], Quantization | None]:
    """The tensors with every quantized weight replaced by the source of its dequantized values (its scales
    removed), and what the quantization was; the tensors unchanged and None when nothing is quantized.

    Raises:
        UnsupportedError: a quantized layout other than FP8 (with scales) or MXFP4.
        InputError: a scale without its weight, a weight without its scale, shapes that do not fit.
    """
    names = list(tensors)
    refuse_other_schemes(path, names, config)
    method = (config or {}).get("quant_method")
    out: dict[str, TensorSource] = {}
    schemes: dict[str, int] = {}
    quant = Quantization(scheme="", method=method)
    consumed: set[str] = set()
    for name, src in tensors.items():
        if src.dtype_name in FP8:
            scale_name = next((n for n in (f"{name}_scale_inv", f"{name}_scale") if n in tensors), None)
            if scale_name is None:
                if method in KNOWN_METHODS:
                    raise InputError(
                        path,
                        f"FP8 weight {name} has no scale ({name}_scale_inv or {name}_scale) though config.json says "
                        f"{method}: is it in another shard file? pass the whole folder",
                    )
                continue  # an FP8 tensor without a scale holds its values as they are
            source, scheme, block_from = _fp8_source(path, name, src, scale_name, tensors[scale_name], config)
            out[name] = source
            consumed.add(scale_name)
            quant.scales.append(scale_name)
            quant.weights.append(name)
            schemes[scheme] = schemes.get(scheme, 0) + 1
            quant.block_from = quant.block_from or block_from
        elif name.endswith("_blocks") and f"{name.removesuffix('_blocks')}_scales" in tensors:
            base = name.removesuffix("_blocks")
            out[base] = _mxfp4_source(path, base, src, tensors[f"{base}_scales"])
            consumed.add(f"{base}_scales")
            quant.scales.append(f"{base}_scales")
            quant.weights.append(base)
            schemes[MXFP4_SCHEME] = schemes.get(MXFP4_SCHEME, 0) + 1
        else:
            out[name] = src
    if not quant.weights:
        _refuse_orphans(path, tensors, consumed)
        return tensors, None
    for name in list(out):
        if name in consumed:
            del out[name]
        elif name.rsplit(".", 1)[-1] in ACTIVATION_SCALES:
            quant.dropped.append(name)
            del out[name]
    _refuse_orphans(path, {n: s for n, s in out.items() if not isinstance(s, DequantizedSource)}, consumed)
    quant.scheme = "; ".join(schemes)
    return out, quant


def _refuse_orphans(path: Path, tensors: dict[str, TensorSource], consumed: set[str]) -> None:
    """Companions left over once the known schemes took theirs: a scheme ckptavg does not know, or a part of one."""
    for name, src in tensors.items():
        if name in consumed:
            continue
        if name.endswith(("_scale_inv", ".weight_scale")):
            weight = name.removesuffix("_scale_inv").removesuffix("_scale")
            what = (
                f"its weight {weight} is {tensors[weight].dtype_name}, not FP8"
                if weight in tensors
                else f"its weight {weight} is not in this file (in another shard? pass the whole folder)"
            )
            raise UnsupportedError(path, f"scale tensor {name}: {what}; an unknown quantization scheme")
        if (
            name.endswith("_scales")
            and f"{name.removesuffix('_scales')}_blocks" not in tensors
            and src.dtype_name in ("uint8", E8M0)
        ):
            raise UnsupportedError(
                path,
                (
                    f"tensor {name} looks like MXFP4 exponents but {name.removesuffix('_scales')}_blocks is not in this file "
                    "(in another shard? pass the whole folder)"
                ),
            )
        if name.endswith("_blocks") and src.dtype_name == "uint8" and f"{name.removesuffix('_blocks')}_scales" not in tensors:
            raise UnsupportedError(
                path,
                (
                    f"tensor {name} looks like MXFP4 blocks but {name.removesuffix('_blocks')}_scales is not in this file (in "
                    "another shard? pass the whole folder)"
                ),
            )
        if src.dtype_name == E8M0:
            raise UnsupportedError(
                path,
                (
                    f"tensor {name} is F8_E8M0 (exponent scales) outside a known quantization scheme; ckptavg reads MXFP4 as "
                    "*_blocks + *_scales"
                ),
            )


# Writing the inputs' own scheme again (--requantize)


def requantize_problem(src: DequantizedSource) -> str | None:
    """Why `src`'s scheme cannot be written again in one pass, or None. A block's scale comes from the block's
    absolute maximum, so the writer needs whole block rows: fine for block and row scales; one scale per tensor
    would need the whole merged tensor first, and MXFP4's groups of 32 run across the rows it writes."""
    if src.kind == "mxfp4":
        return "MXFP4"
    if src.block == (0, 0):
        return "FP8 with one scale per tensor"
    return None


def quantized_specs(name: str, src: DequantizedSource) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of the tensors that hold `src` quantized: the codes, then the scales."""
    assert src.codes is not None and src.scales is not None
    return [(name, src.codes.dtype, src.shape), (name + src.scale_suffix, src.scales.dtype, src.scales.shape)]


class Fp8Requantizer:
    """A TensorWriter in front of another: the merged float64 values of FP8 weights become FP8 codes and scales
    in the inputs' scheme (the same dtype, block size, scale name and dtype); other tensors pass through.

    Rule for a new scale: the block's absolute maximum / the format's largest value (448 for E4M3), rounded
    to the scale's dtype, as DeepSeek-V3 and compressed-tensors quantize; an all-zero block gets scale 1.
    Codes are value / scale rounded to nearest (and clamped to the format's range). Memory: one block row
    (block rows x columns, float64) of the tensor being written, and its scales."""

    def __init__(self, writer: Any, entries: list[tuple[int, DequantizedSource | None]]) -> None:
        self.writer = writer
        self.entries = entries  # (bytes the engine writes, the source to quantize like or None), in write order
        self._position = 0
        self._written = 0
        self._pending = bytearray()
        self._row = 0
        self._scales: list[torch.Tensor] = []

    @property
    def paths(self) -> list[Path]:
        return self.writer.paths

    @property
    def bytes_written(self) -> int:
        return self.writer.bytes_written

    def _skip_empty(self) -> None:
        while self._position < len(self.entries) and self.entries[self._position][0] == 0:
            self._position += 1

    def write(self, data: memoryview) -> None:
        while len(data):
            self._skip_empty()
            size, source = self.entries[self._position]
            take = min(len(data), size - self._written)
            piece, data = data[:take], data[take:]
            self._written += take
            done = self._written == size
            if source is None:
                self.writer.write(piece)
            else:
                self._pending += piece
                self._quantize_rows(source)
                if done:
                    self._write_scales(source)
            if done:
                self._position, self._written = self._position + 1, 0

    def _quantize_rows(self, src: DequantizedSource) -> None:
        """Quantize every whole block row pending: `block[0]` rows, fewer at the end of a matrix."""
        assert src.codes is not None
        cols = src.shape[-1]
        rows = src.shape[-2] if len(src.shape) >= 2 else 1
        while True:
            band = min(src.block[0], rows - self._row % rows)
            if len(self._pending) < band * cols * 8:
                return
            import torch

            values = torch.frombuffer(bytearray(self._pending[: band * cols * 8]), dtype=torch.float64).reshape(band, cols)
            del self._pending[: band * cols * 8]
            codes, scales = _quantize_band(values, src.block[1], src.codes.dtype, self._scale_dtype(src))
            self.writer.write(tensor_buffer(codes.view(torch.uint8)))
            self._scales.append(scales)
            self._row += band

    @staticmethod
    def _scale_dtype(src: DequantizedSource) -> torch.dtype:
        assert src.scales is not None
        return src.scales.dtype

    def _write_scales(self, src: DequantizedSource) -> None:
        import torch

        scales = torch.cat(self._scales).contiguous() if self._scales else torch.empty(0, dtype=self._scale_dtype(src))
        self._scales, self._row = [], 0
        self.writer.write(tensor_buffer(scales.view(torch.uint8).reshape(-1)))

    def repeat(self, name: str) -> None:
        self._skip_empty()
        self.writer.repeat(name)
        self._position += 1

    def finish(self) -> None:
        self.writer.finish()

    def abort(self) -> None:
        self.writer.abort()


def _quantize_band(
    values: torch.Tensor, block_cols: int, code_dtype: torch.dtype, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [r, cols] of float64 values (one block row) -> FP8 codes [r, cols] and one scale row [1, ceil(cols / block_cols)]."""
    import torch

    rows, cols = values.shape
    groups = -(-cols // block_cols)
    limit = float(torch.finfo(code_dtype).max)  # the format's largest value: 448 for E4M3
    padded = torch.nn.functional.pad(values.abs(), (0, groups * block_cols - cols))
    absmax = padded.reshape(rows, groups, block_cols).amax(dim=(0, 2))
    scales = torch.where(absmax > 0, absmax / limit, torch.ones_like(absmax)).to(scale_dtype)
    per_col = scales.double().repeat_interleave(block_cols)[:cols]
    codes = (values / per_col).clamp(-limit, limit).to(code_dtype)
    return codes.contiguous(), scales.reshape(1, groups)
