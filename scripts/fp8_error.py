"""The error of an FP8 average against the exact mean of the dequantized inputs (relative L2 per weight).

Usage: python scripts/fp8_error.py OUTPUT.safetensors INPUT.safetensors [INPUT ...]

OUTPUT may hold the weights dequantized (any float dtype) or as FP8 codes with `<name>_scale_inv` block scales
(what an average of the codes and the scales apart gives, or --requantize); the inputs are DeepSeek-V3-style
FP8 files (`F8_E4M3` weight + F32 `weight_scale_inv` over 128x128 blocks). Used for the figures in the
closing note of issue 19: the old behaviour (codes and scales averaged apart) against the new one.
"""

from __future__ import annotations

import sys

import torch
from safetensors.torch import load_file

BLOCK = 128


def dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    expand = scales.double().repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
    return codes.double() * expand[: codes.shape[0], : codes.shape[1]]


def main() -> None:
    out, inputs = load_file(sys.argv[1]), [load_file(p) for p in sys.argv[2:]]
    for name, value in inputs[0].items():
        if value.dtype != torch.float8_e4m3fn:
            continue
        exact = sum(dequantize(s[name], s[f"{name}_scale_inv"]) for s in inputs) / len(inputs)
        got = dequantize(out[name], out[f"{name}_scale_inv"]) if out[name].dtype == torch.float8_e4m3fn else out[name].double()
        print(
            f"{name}: relative L2 {((got - exact).norm() / exact.norm()).item():.3e}, max |error| "
            f"{(got - exact).abs().max().item():.3e}"
        )


if __name__ == "__main__":
    main()
