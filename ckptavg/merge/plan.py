"""The plan: every output tensor, the input tensors it is made of and their weights.

Built and checked from headers alone (names, shapes, dtypes), so a mismatch fails before any data is read.
The plan is plain data, so it could be split across processes by tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ckptavg.errors import MismatchError, UnsupportedError, UsageError, option
from ckptavg.formats.base import Checkpoint, TensorSource, slice_source
from ckptavg.formats.quantized import DequantizedSource, quantized_specs, requantize_problem
from ckptavg.formats.writer import TensorSpec
from ckptavg.merge.weights import Weights


@dataclass
class PlanEntry:
    """One output tensor: sum(weights[i] * sources[i]) / divisor.

    `weights` is None for tensors copied unchanged from the newest input (integers, bools);
    `alias_of` names an earlier entry whose bytes this one repeats (tied weights).
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    sources: list[TensorSource]
    weights: list[float] | None
    divisor: float = 1.0
    accum_dtype: torch.dtype | None = None
    alias_of: str | None = None
    first_element: int = 0  # where this entry starts in the tensor named `name` (a share of it; see slice)

    @property
    def numel(self) -> int:
        return self.sources[0].numel

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def input_dtype(self) -> torch.dtype:
        return self.sources[0].dtype

    def slice(
        self, first: int, count: int, slice_of: Callable[[TensorSource, int, int], TensorSource] = slice_source
    ) -> PlanEntry:
        """Elements [first, first + count) of this output tensor as an entry of its own (flat). Folding is
        elementwise, so its bytes are exactly those of the same range of the whole tensor; a tied tensor's
        share is computed again from its sources rather than repeated. `slice_of` cuts each source (plans that
        share sources pass one that cuts each once, so that one pass still reads it once)."""
        return PlanEntry(
            self.name,
            self.dtype,
            (count,),
            [slice_of(s, first, count) for s in self.sources],
            self.weights,
            self.divisor,
            self.accum_dtype,
            None,
            self.first_element + first,
        )


@dataclass
class Plan:
    inputs: list[Checkpoint]
    weights: Weights
    entries: list[PlanEntry] = field(default_factory=list)
    output_kind: str = "model"  # or "adapter": adapter_model.safetensors + adapter_config.json
    adapter_config: dict | None = None  # the adapter_config.json of an adapter output
    files_from: Path | None = None  # where config and tokenizer files are copied from (default: the newest input)
    requantize: bool = False  # dequantized weights are written in their inputs' scheme again (formats/quantized.py)

    @property
    def output_bytes(self) -> int:
        if self.requantize:  # FP8 codes and their scales, not the float64 values the engine hands the writer
            return sum(e.nbytes if not e.sources[0].quantization else e.numel + e.sources[0].scales.nbytes for e in self.entries)
        return sum(e.nbytes for e in self.entries)

    @property
    def read_bytes(self) -> int:
        total = 0
        for e in self.entries:
            if e.alias_of is not None:
                continue
            if e.weights is None:
                total += e.sources[-1].nbytes
            else:
                total += sum(s.nbytes for s, w in zip(e.sources, e.weights) if w != 0)
        return total

    @property
    def copied(self) -> list[str]:
        return [e.name for e in self.entries if e.weights is None]

    @property
    def tied(self) -> list[tuple[str, str]]:
        return [(e.name, e.alias_of) for e in self.entries if e.alias_of]

    @property
    def dequantized(self) -> torch.dtype | None:
        """The output dtype of the weights read dequantized from FP8/MXFP4 inputs and written so; None when there
        are none or they are quantized again."""
        return None if self.requantize else next((e.dtype for e in self.entries if e.sources[0].quantization), None)

    @property
    def parameters(self) -> int:
        return sum(e.numel for e in self.entries if e.alias_of is None)


ACCUM_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
OUTPUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# torch's names for the same dtypes; the short names above are the ones options are checked against and reports show.
DTYPE_ALIASES = {
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "float32": "fp32",
    "float": "fp32",
    "float64": "fp64",
    "double": "fp64",
}


def short_dtype_name(name: str) -> str:
    """bf16/fp16/fp32/fp64 for torch's names of them too (bfloat16, torch.float16, half, ...); any other name unchanged."""
    key = name.strip().lower().removeprefix("torch.")
    return DTYPE_ALIASES.get(key, key)


DEQUANTIZED_DTYPE = torch.bfloat16  # what a dequantized FP8/MXFP4 weight is written as, unless --dtype says otherwise


def accumulator_for(dtype: torch.dtype, accum: str) -> torch.dtype:
    """`auto` keeps at least twice the input's precision: FP32 for 8/16-bit floats, FP64 for FP32/FP64."""
    if accum == "auto":
        return torch.float64 if dtype.itemsize >= 4 else torch.float32
    return ACCUM_DTYPES[accum]


def check_compatible(inputs: list[Checkpoint], limit: int = 3) -> None:
    """Every input has the tensors of the first, with the same shapes and dtypes; else one line naming up to `limit`."""
    reference = inputs[0]
    for ckpt in inputs[1:]:
        missing = [n for n in reference.tensors if n not in ckpt.tensors]
        if missing:
            hint = prefix_hint(reference, ckpt) or prefix_hint(ckpt, reference)
            raise MismatchError(
                ckpt.path, f"missing {len(missing)} tensor(s) that {reference.path} has: {_names(missing, limit)}{hint}"
            )
        extra = [n for n in ckpt.tensors if n not in reference.tensors]
        if extra:
            raise MismatchError(ckpt.path, f"has {len(extra)} tensor(s) that {reference.path} lacks: {_names(extra, limit)}")
        problems = []
        for name, ref in reference.tensors.items():
            src = ckpt.tensors[name]
            if src.shape != ref.shape:
                problems.append((src.path, f"{name} has shape {list(src.shape)}, expected {list(ref.shape)}"))
            elif src.quantization != ref.quantization:
                kinds = [f"{s.quantization} quantized" if s.quantization else s.dtype_name for s in (src, ref)]
                problems.append((src.path, f"{name} is {kinds[0]}, {reference.path} has it {kinds[1]}"))
            elif src.dtype_name != ref.dtype_name:
                problems.append((src.path, f"{name} is {src.dtype_name}, expected {ref.dtype_name}"))
        if problems:
            more = f" (and {len(problems) - limit} more)" if len(problems) > limit else ""
            text = "; ".join(p for _, p in problems[:limit])
            raise MismatchError(problems[0][0], f"{text}{more} (compared with {reference.path})")


def prefix_hint(a: Checkpoint, b: Checkpoint) -> str:
    """When every name of `a` is a name of `b` behind one prefix, the advice to strip it."""
    first = next(iter(b.tensors), None)
    candidates = [n[: -len(first)] for n in a.tensors if first and n.endswith(first) and n != first]
    for prefix in candidates:
        if len(a.tensors) == len(b.tensors) and all(n.startswith(prefix) and n[len(prefix) :] in b.tensors for n in a.tensors):
            return f"; the names of {a.path} are those of {b.path} behind {prefix!r}: pass {option('strip_prefixes', prefix)}"
    return ""


def _names(names: list[str], limit: int) -> str:
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def build_plan(
    inputs: list[Checkpoint],
    weights: Weights,
    out_dtype: torch.dtype | None = None,
    accum: str = "auto",
    requantize: bool = False,
) -> Plan:
    """The output of averaging `inputs` (ordered oldest first) with `weights`. With `requantize`, quantized
    weights are folded in float64 for the writer that quantizes them again (formats/quantized.py)."""
    check_compatible(inputs)
    plan = Plan(inputs=inputs, weights=weights, requantize=requantize)
    if requantize:
        quantized = [(name, src) for name, src in inputs[-1].tensors.items() if src.quantization]
        if not quantized:
            raise UsageError(None, "requantize: the inputs hold no FP8 or MXFP4 weights")
        if problems := [(name, p) for name, src in quantized if (p := requantize_problem(src))]:
            raise UnsupportedError(
                inputs[-1].path,
                f"cannot quantize {problems[0][0]} again ({problems[0][1]}): only block- and row-scaled FP8 is "
                "written in its scheme again; leave out requantize to write the exact mean dequantized",
            )
    primary_of: dict[tuple, str] = {}
    aliases: dict[str, list[PlanEntry]] = {}
    for name, ref in inputs[0].tensors.items():
        if ref.dtype.is_complex:
            raise UnsupportedError(
                inputs[0].path, f"tensor {name} is complex ({ref.dtype_name}); ckptavg averages real tensors only"
            )
        sources = [ckpt.tensors[name] for ckpt in inputs]
        floating = ref.dtype.is_floating_point
        entry = PlanEntry(
            name=name,
            dtype=(out_dtype or (DEQUANTIZED_DTYPE if ref.quantization else ref.dtype)) if floating else ref.dtype,
            shape=ref.shape,
            sources=sources,
            weights=list(weights.scales) if floating else None,
            divisor=weights.divisor,
            accum_dtype=accumulator_for(ref.dtype, accum) if floating else None,
        )
        if requantize and ref.quantization:
            entry.dtype = entry.accum_dtype = torch.float64
        keys = tuple(src.alias_key for src in sources)
        if all(k is not None for k in keys) and keys in primary_of:
            entry.alias_of = primary_of[keys]
            aliases[entry.alias_of].append(entry)
            continue
        if all(k is not None for k in keys):
            primary_of[keys] = name
        aliases[name] = []
        plan.entries.append(entry)
    ordered = []
    for entry in plan.entries:
        ordered.append(entry)
        ordered.extend(aliases[entry.name])
    plan.entries = ordered
    return plan


def output_specs(plan: Plan) -> list[TensorSpec]:
    """The tensors of the output files, in the order they are written (a requantized weight: codes, then scales)."""
    if not plan.requantize:
        return [TensorSpec(e.name, e.dtype, e.shape) for e in plan.entries]
    specs = []
    for e in plan.entries:
        source = e.sources[0]
        if isinstance(source, DequantizedSource):
            specs.extend(TensorSpec(*spec) for spec in quantized_specs(e.name, source))
        else:
            specs.append(TensorSpec(e.name, e.dtype, e.shape))
    return specs
