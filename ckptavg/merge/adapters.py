"""Averaging PEFT adapters: the mean of what they do to the model, not of their factors.

A LoRA adapter changes a module's weight by s·B·A. The mean of the changes, Σ wᵢ·sᵢ·Bᵢ·Aᵢ, is not
s·(Σ wᵢBᵢ)(Σ wᵢAᵢ) (the parameter-wise mean has cross terms), but it is exactly the change of one adapter
of rank Σ rᵢ: A' stacks the wᵢ·sᵢ·Aᵢ, B' places the Bᵢ side by side, and PEFT's own scale is set to 1.

Three modes:
- `exact`: that adapter (DoRA refused: its magnitude normalisation is not linear);
- `params`: the parameter-wise mean at the original rank, with its error against `exact` per module;
- `merged`: a full model, base + the mean of each adapter's change (DoRA: the mean of each merged weight).
Full tensors an adapter trains (`modules_to_save`, biases, IA3 vectors) are averaged directly.
"""

from __future__ import annotations

import copy
import statistics
import threading
from dataclasses import dataclass, field

import torch

from ckptavg.errors import MismatchError, UnsupportedError, UsageError, option
from ckptavg.formats.base import Checkpoint, ComputedSource, RowSource, TensorSource
from ckptavg.formats.dtypes import dtype_name
from ckptavg.formats.peft import (
    AGREE_ON,
    KEY_PREFIX,
    LINEAR_TYPES,
    NONLINEAR_TYPES,
    AdapterConfig,
    comparable,
    lora_role,
    module_name,
)
from ckptavg.merge.plan import Plan, PlanEntry, accumulator_for, build_plan
from ckptavg.merge.weights import Weights

MODES = ("exact", "params", "merged")


@dataclass
class AdapterSummary:
    """What was done with adapters, for the report: mode, ranks, and for `params` its error per module."""

    mode: str
    kind: str
    rank_in: int | None
    rank_out: int | None
    modules: int
    base: str | None = None
    error_max: float | None = None  # params: relative Frobenius error of the change, against exact
    error_median: float | None = None
    error_worst: str | None = None
    errors: dict[str, float] = field(default_factory=dict)


def check_adapters(inputs: list[Checkpoint]) -> AdapterConfig | None:
    """The adapters' shared config (None when the inputs are full models); a one-line error when they are
    mixed with full models, disagree on a field that changes what they mean, or are of a type whose
    parameter mean is not the mean of its effect."""
    adapters = [c for c in inputs if c.adapter is not None]
    if not adapters:
        return None
    if len(adapters) < len(inputs):
        full = next(c for c in inputs if c.adapter is None)
        raise MismatchError(
            full.path,
            (
                f"is a full model and {adapters[0].path} a PEFT adapter: average adapters with adapters (or merge them into "
                f"their base with {option('adapter_mode', 'merged')} {option('base', 'MODEL')})"
            ),
        )
    first = adapters[0].adapter
    for ckpt in adapters[1:]:
        for key, label in AGREE_ON:
            a, b = comparable(first, key), comparable(ckpt.adapter, key)
            if a != b:
                raise MismatchError(
                    ckpt.adapter.path,
                    (
                        f"{label} is {_show(b)} but {_show(a)} in {first.path}: these adapters change the model differently and "
                        "cannot be averaged"
                    ),
                )
    if first.peft_type in NONLINEAR_TYPES:
        raise UnsupportedError(
            first.path,
            (
                f"{first.peft_type} adapters cannot be averaged: {NONLINEAR_TYPES[first.peft_type]}, so no average of their "
                "parameters is the average of their effect"
            ),
        )
    if first.peft_type != "LORA" and first.peft_type not in LINEAR_TYPES:
        raise UnsupportedError(
            first.path,
            f"{first.peft_type} adapters are not known to ckptavg; it averages LoRA (and DoRA, rsLoRA) and IA3 adapters",
        )
    return first


def _show(value: object) -> str:
    return "unset" if value is None else repr(value)


def build_adapter_plan(
    inputs: list[Checkpoint],
    weights: Weights,
    mode: str,
    out_dtype: torch.dtype | None,
    accum: str,
    base: Checkpoint | None = None,
    rank: int | None = None,
) -> tuple[Plan, AdapterSummary]:
    """The plan of averaging adapters (oldest first) in `mode`; `base` is the base model for `merged`; `rank`
    truncates the exact average to that rank by SVD (reporting each module's error)."""
    config = inputs[0].adapter
    if mode not in MODES:
        raise UsageError(None, f"{option('adapter_mode', repr(mode))}: expected one of {', '.join(MODES)}")
    if mode == "merged" and base is None:
        raise UsageError(
            None,
            f"{option('adapter_mode', 'merged')} needs the base model: pass {option('base', 'MODEL')} (a local folder or file)",
        )
    if mode != "merged" and base is not None:
        raise UsageError(
            None,
            f"{option('base')} is the base model of {option('adapter_mode', 'merged')} (or export's {option('merge', True)})",
        )
    plan = build_plan(inputs, weights, out_dtype, accum)
    modules = _modules(plan)
    summary = AdapterSummary(mode=mode, kind=config.kind, rank_in=config.r, rank_out=config.r, modules=len(modules))
    if rank is not None and (mode != "exact" or config.peft_type != "LORA"):
        raise UsageError(
            None,
            f"{option('adapter_rank')} truncates the exact average of LoRA adapters: use it with "
            f"{option('adapter_mode', 'exact')}",
        )
    if rank is not None and rank < 1:
        raise UsageError(None, f"{option('adapter_rank')} must be at least 1, not {rank}")
    if config.peft_type != "LORA":  # IA3: its effect is linear in its vectors, so their mean is exact in every mode
        summary.mode, summary.rank_in, summary.rank_out = "params", None, None
        plan.output_kind, plan.adapter_config = "adapter", dict(config.raw)
        return plan, summary
    if mode == "params":
        if len(inputs) > 1:
            _measure_params_error(plan, modules, weights, summary)
        plan.output_kind, plan.adapter_config = "adapter", dict(config.raw)
        return plan, summary
    if mode == "exact":
        if config.use_dora:
            raise UnsupportedError(
                config.path,
                (
                    "DoRA adapters have no exact average as an adapter (the magnitude normalisation is not linear): use "
                    f"{option('adapter_mode', 'merged')} {option('base', 'MODEL')} for the exact average as a full model, or "
                    f"{option('adapter_mode', 'params')}"
                ),
            )
        kept = [i for i, w in enumerate(weights.normalized) if w != 0]
        for module, parts in modules.items():
            error = _stack(plan, module, parts, kept, weights, rank)
            if error is not None:
                summary.errors[module_name(module)] = error
        summary.rank_out = config.r * len(kept) if rank is None else rank
        plan.output_kind, plan.adapter_config = "adapter", exact_config(config, len(kept), rank)
        _summarise_errors(summary)
        return plan, summary
    assert base is not None
    summary.base = str(base.path)
    return _merged_plan(plan, modules, weights, base, out_dtype, accum), summary


def _modules(plan: Plan) -> dict[str, dict[str, PlanEntry]]:
    """LoRA module key -> {role: plan entry} (A, B, B_bias, magnitude)."""
    modules: dict[str, dict[str, PlanEntry]] = {}
    for entry in plan.entries:
        if (found := lora_role(entry.name)) is not None:
            modules.setdefault(found[0], {})[found[1]] = entry
    for module, parts in modules.items():
        if "A" not in parts or "B" not in parts:
            raise MismatchError(
                plan.inputs[0].path, f"LoRA module {module} has {' and '.join(sorted(parts))} but not both lora_A and lora_B"
            )
    return modules


def _read64(src: TensorSource) -> torch.Tensor:
    return src.read().double()


def _computed(entry: PlanEntry, shape: tuple[int, ...], compute) -> None:
    """Make `entry` one computed tensor, written as it is (scale 1)."""
    path = entry.sources[-1].path
    entry.shape = shape
    entry.sources = [ComputedSource(path=path, offset=0, dtype_name=dtype_name(entry.dtype), shape=shape, compute=compute)]
    entry.weights, entry.divisor = [1.0], 1.0
    entry.accum_dtype = accumulator_for(entry.dtype, "fp64")


def _stack(
    plan: Plan, module: str, parts: dict[str, PlanEntry], kept: list[int], weights: Weights, rank: int | None
) -> float | None:
    """A' = the wᵢ·sᵢ·Aᵢ stacked (rows), B' = the Bᵢ side by side (columns): B'A' = Σ wᵢ·sᵢ·Bᵢ·Aᵢ. With `rank`,
    B'A' truncated by SVD to that rank instead; returns the relative error that costs (else None)."""
    name = module_name(module)
    scales = [weights.normalized[i] * plan.inputs[i].adapter.scaling(name) for i in kept]
    a_sources = [parts["A"].sources[i] for i in kept]
    b_sources = [parts["B"].sources[i] for i in kept]
    a, b = parts["A"], parts["B"]

    def stacked() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([s * _read64(src) for s, src in zip(scales, a_sources)], 0), torch.cat(
            [_read64(src) for src in b_sources], 1
        )

    if "B_bias" in parts:  # PEFT adds s·b after B: with scale 1 the bias is Σ wᵢ·sᵢ·bᵢ
        parts["B_bias"].weights = [
            weights.scales[i] * plan.inputs[i].adapter.scaling(name) if i in kept else 0.0 for i in range(len(plan.inputs))
        ]
    a_dtype, b_dtype = a.dtype, b.dtype
    if rank is None:
        stacked_rank = sum(src.shape[0] for src in a_sources)
        _computed(a, (stacked_rank, *a.shape[1:]), lambda: stacked()[0].to(a_dtype))
        _computed(b, (b.shape[0], stacked_rank, *b.shape[2:]), lambda: stacked()[1].to(b_dtype))
        return None
    a_shape, b_shape = (rank, *a.shape[1:]), (b.shape[0], rank, *b.shape[2:])
    pair = _Truncated(stacked, rank)
    _computed(a, a_shape, lambda: pair.take(0).reshape(a_shape).to(a_dtype))
    _computed(b, b_shape, lambda: pair.take(1).reshape(b_shape).to(b_dtype))
    return truncate(*stacked(), rank)[2]


class _Truncated:
    """One module's truncated factors, computed once for its lora_A and lora_B entries and dropped once both
    are written."""

    def __init__(self, stacked, rank: int) -> None:
        self.stacked, self.rank = stacked, rank
        self.factors: tuple[torch.Tensor, torch.Tensor] | None = None
        self.left = 2

    def take(self, which: int) -> torch.Tensor:
        if self.factors is None:
            self.factors = truncate(*self.stacked(), self.rank)[:2]
        value = self.factors[which]
        self.left -= 1
        if self.left == 0:
            self.factors = None
        return value


def truncate(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-`rank` factors (A'' rank x in, B'' out x rank) of B·A, and the relative Frobenius error of
    B''A'' against B·A. From QR of both factors and the SVD of a small square matrix: no dense out x in matrix."""
    a, b = _flat(a), _flat(b)
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    keep = min(rank, s.numel())
    new_b = torch.zeros(b.shape[0], rank, dtype=b.dtype)
    new_a = torch.zeros(rank, a.shape[1], dtype=a.dtype)
    new_b[:, :keep] = qb @ (u[:, :keep] * s[:keep])
    new_a[:keep] = (qa @ vh[:keep].T).T
    total = float((s**2).sum())
    return new_a, new_b, (float((s[keep:] ** 2).sum()) / total) ** 0.5 if total > 0 else 0.0


def exact_config(config: AdapterConfig, copies: int, rank: int | None = None) -> dict:
    """The config of the stacked adapter: rank and alpha multiplied by the number of adapters stacked (or
    `rank` everywhere once truncated), so PEFT's scale is 1 (the scalings are in A'), and no rsLoRA."""
    raw = copy.deepcopy(config.raw)
    raw["r"] = config.r * copies if rank is None else rank
    raw["lora_alpha"] = raw["r"]
    raw["use_rslora"] = False
    ranks = {k: int(v) * copies for k, v in (config.raw.get("rank_pattern") or {}).items()} if rank is None else {}
    raw["rank_pattern"] = ranks
    raw["alpha_pattern"] = dict(ranks)
    return raw


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _frobenius2(u: torch.Tensor, v: torch.Tensor) -> float:
    """‖U·V‖² from the small Gram matrices: trace((UᵀU)(VVᵀ))."""
    return float(torch.trace((u.T @ u) @ (v @ v.T)))


def _measure_params_error(
    plan: Plan, modules: dict[str, dict[str, PlanEntry]], weights: Weights, summary: AdapterSummary
) -> None:
    """Relative error of the parameter-wise mean's change, s·(ΣwB)(ΣwA), against the exact mean Σ wᵢ·s·Bᵢ·Aᵢ,
    per module (Frobenius norms, computed from r-sized Gram matrices: no dense out x in matrix)."""
    w = weights.normalized
    for module, parts in modules.items():
        s = plan.inputs[0].adapter.scaling(module_name(module))
        a = [_flat(_read64(src)) for src in parts["A"].sources]
        b = [_flat(_read64(src)) for src in parts["B"].sources]
        a_mean = sum(wi * ai for wi, ai in zip(w, a))
        b_mean = sum(wi * bi for wi, bi in zip(w, b))
        exact_u, exact_v = torch.cat(b, 1), torch.cat([wi * s * ai for wi, ai in zip(w, a)], 0)
        diff_u, diff_v = torch.cat([b_mean, exact_u], 1), torch.cat([s * a_mean, -exact_v], 0)
        norm = _frobenius2(exact_u, exact_v)
        summary.errors[module_name(module)] = (max(_frobenius2(diff_u, diff_v), 0.0) / norm) ** 0.5 if norm > 0 else 0.0
    _summarise_errors(summary)


def _summarise_errors(summary: AdapterSummary) -> None:
    if summary.errors:
        summary.error_worst = max(summary.errors, key=summary.errors.__getitem__)
        summary.error_max = summary.errors[summary.error_worst]
        summary.error_median = statistics.median(summary.errors.values())


def _base_name(adapter_name: str) -> str:
    """The base model's tensor that an adapter's full tensor replaces (modules_to_save, biases, resized embeddings)."""
    return adapter_name.removeprefix(KEY_PREFIX).replace(".base_layer.", ".")


def _weighted_sum(sources: list[TensorSource], weights: list[float]) -> torch.Tensor:
    return sum(w * _read64(src) for w, src in zip(weights, sources) if w != 0)


def _read_rows(src: TensorSource, lo: int, hi: int) -> torch.Tensor:
    """Rows [lo, hi) of a stored tensor, in float64."""
    row_bytes = src.nbytes // src.shape[0]
    raw = torch.empty((hi - lo) * row_bytes, dtype=torch.uint8)
    src.read_into(lo * row_bytes, raw)
    return raw.view(src.dtype).reshape(hi - lo, *src.shape[1:]).double()


class _MergedModule:
    """Rows of one adapted weight, merged: W0 + Σ wᵢ·ΔWᵢ, or for DoRA Σ wᵢ·mᵢ ⊙ (W0 + ΔWᵢ)/‖W0 + ΔWᵢ‖ (each
    output row by its norm), in float64, a block of rows at a time. W0 is the base weight, or the average of
    the full copies the adapters saved of it (a targeted embedding). The adapters' factors (r x in, out x r)
    are read once and kept until the engine is done with the weight."""

    def __init__(
        self,
        module: str,
        parts: dict[str, PlanEntry],
        plan: Plan,
        weights: Weights,
        w0: list[TensorSource],
        w0_weights: list[float],
        shape: tuple[int, ...],
    ) -> None:
        self.name = module_name(module)
        self.parts, self.w0, self.w0_weights, self.shape = parts, w0, w0_weights, shape
        self.inputs = [(i, w, plan.inputs[i].adapter.scaling(self.name)) for i, w in enumerate(weights.normalized) if w != 0]
        # an embedding's change is (B·A)ᵀ, and a fan_in_fan_out layer (GPT-2's Conv1D) stores its weight transposed
        self.transposed = "lora_embedding" in parts["A"].name or plan.inputs[0].adapter.fan_in_fan_out
        if "magnitude" in parts and (self.transposed or len(shape) not in (2, 4)):
            raise UnsupportedError(
                plan.inputs[0].path, f"DoRA on {self.name}: ckptavg merges DoRA on linear and convolution layers only"
            )
        self._factors: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        self._lock = threading.Lock()

    def factors(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        with self._lock:
            if i not in self._factors:
                magnitude = _read64(self.parts["magnitude"].sources[i]).reshape(-1) if "magnitude" in self.parts else None
                self._factors[i] = (
                    _flat(_read64(self.parts["A"].sources[i])),
                    _flat(_read64(self.parts["B"].sources[i])),
                    magnitude,
                )
            return self._factors[i]

    def release(self) -> None:
        with self._lock:
            self._factors.clear()

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        w0 = sum(w * _read_rows(src, lo, hi) for src, w in zip(self.w0, self.w0_weights) if w != 0)
        total = torch.zeros_like(w0)
        for i, wi, s in self.inputs:
            a, b, magnitude = self.factors(i)
            delta = (s * (b @ a[:, lo:hi]).T if self.transposed else s * (b[lo:hi] @ a)).reshape(w0.shape)
            if magnitude is None:
                total += wi * delta
                continue
            merged = w0 + delta
            norm = merged.reshape(hi - lo, -1).norm(dim=1)
            total += wi * merged * (magnitude[lo:hi] / norm).reshape(-1, *([1] * (merged.dim() - 1)))
        return total if "magnitude" in self.parts else w0 + total


def _merged_plan(
    plan: Plan,
    modules: dict[str, dict[str, PlanEntry]],
    weights: Weights,
    base: Checkpoint,
    out_dtype: torch.dtype | None,
    accum: str,
) -> Plan:
    """The base model with every full tensor the adapters train (modules_to_save, biases, targeted embeddings)
    replaced by their average, then every adapted module by its merged average; the rest copied from the base."""
    base_plan = build_plan([base], Weights("export", [1.0]), out_dtype, accum)
    by_name = {e.name: e for e in base_plan.entries}
    lora_entries = {id(e) for parts in modules.values() for e in parts.values()}
    replaced: dict[str, list[TensorSource]] = {}
    for entry in plan.entries:
        if id(entry) in lora_entries:
            continue
        name = _base_name(entry.name)
        if name not in by_name:
            raise MismatchError(
                entry.sources[0].path, f"the adapter's {entry.name} has no counterpart {name} in the base model {base.path}"
            )
        target = by_name[name]
        if target.shape != entry.shape:
            raise MismatchError(
                entry.sources[0].path, f"{entry.name} has shape {list(entry.shape)}, the base model's {name} {list(target.shape)}"
            )
        entry.name, entry.dtype = name, target.dtype if out_dtype is None or not target.dtype.is_floating_point else out_dtype
        by_name[name], replaced[name] = entry, entry.sources
    normalized = weights.normalized
    for module, parts in modules.items():
        name = module_name(module)
        target = name + ".weight"
        if target not in by_name:
            raise MismatchError(
                base.path, f"has no {target}, which the adapter {plan.inputs[0].path} changes: is it the adapter's base model?"
            )
        entry = by_name[target]
        if entry.alias_of is not None:
            raise UnsupportedError(
                base.path,
                f"{target} is tied to {entry.alias_of}: merging an adapter into one of two tied weights is not supported",
            )
        w0, w0_weights = (replaced[target], normalized) if target in replaced else ([entry.sources[0]], [1.0])
        merged = _MergedModule(module, parts, plan, weights, w0, w0_weights, entry.shape)
        entry.sources = [
            RowSource(
                path=entry.sources[0].path,
                offset=0,
                dtype_name=dtype_name(entry.dtype),
                shape=entry.shape,
                compute_rows=lambda lo, hi, merged=merged, dtype=entry.dtype: merged.rows(lo, hi).to(dtype),
                on_release=merged.release,
            )
        ]
        entry.weights, entry.divisor, entry.accum_dtype = [1.0], 1.0, accumulator_for(entry.dtype, "fp64")
        if "B_bias" in parts:
            bias_name = name + ".bias"
            if bias_name not in by_name:
                raise UnsupportedError(base.path, f"{bias_name} is absent, but the adapter trains a bias for it (lora_bias)")
            bias_entry = by_name[bias_name]
            scales = [w * plan.inputs[i].adapter.scaling(name) for i, w in enumerate(normalized)]
            b0, bias_sources, bias_dtype = bias_entry.sources[0], parts["B_bias"].sources, bias_entry.dtype
            _computed(
                bias_entry,
                bias_entry.shape,
                lambda b0=b0, srcs=bias_sources, scales=scales, dt=bias_dtype: (_read64(b0) + _weighted_sum(srcs, scales)).to(dt),
            )
    base_plan.entries = [by_name[e.name] for e in base_plan.entries]
    base_plan.inputs, base_plan.weights = plan.inputs, plan.weights
    base_plan.output_kind, base_plan.files_from = "model", base.folder
    return base_plan
