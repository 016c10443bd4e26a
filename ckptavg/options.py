"""`AverageOptions`: the options of one `average` run, built once from its keywords, checked in one place and
passed down whole."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from ckptavg.checkpoint import LoadOptions
from ckptavg.checks import check_choice, check_int, check_number, check_prefixes, check_size, check_text
from ckptavg.errors import UsageError, option
from ckptavg.formats.pickle_same import TRAINING_STATES
from ckptavg.merge.adapters import MODES as ADAPTER_MODES
from ckptavg.merge.plan import OUTPUT_DTYPES, short_dtype_name
from ckptavg.merge.weights import check_weights
from ckptavg.output import DEFAULT_SHARD_SIZE, WriteOptions


@dataclass(frozen=True)
class AverageOptions:
    """Every option of `average` but its inputs, output and callbacks; see `average` for what each means.

    Built as given; `check()` returns the checked, normalised copy the rest of the run reads."""

    weights: str | Sequence[float] | None = None
    ema: float | None = None
    ema_half_life: float | None = None
    ema_sigma_rel: float | None = None
    order: str = "auto"
    dtype: str | None = None
    accum: str = "auto"
    device: str = "auto"
    max_shard_size: str | int | None = None
    key: str | None = None
    use_ema: bool = False
    strip_prefixes: Sequence[str] = ()
    overwrite: bool = False
    dry_run: bool = False
    out_format: str = "auto"
    memory_budget: str | int | None = None
    fsync: bool = True
    verify: bool = False
    strict: bool = False
    check_same_run: bool = True
    adapter_mode: str = "exact"
    base: str | os.PathLike | None = None
    adapter_rank: int | None = None
    rank_timeout: float | None = None
    requantize: bool = False
    training_state: str = "drop"

    @classmethod
    def pick(cls, keywords: Mapping[str, Any]) -> AverageOptions:
        """The options among a function's keyword arguments (`locals()` of `average`, `sweep`, `tune`), the
        others left out: each public entry point lists its options once, in its signature, and passes them on
        without naming each again."""
        names = {f.name for f in fields(cls)}
        return cls(**{name: value for name, value in keywords.items() if name in names})

    def check(self) -> AverageOptions:
        """Each option's type and value (a UsageError naming its flag), before any input is opened or the output
        looked at; returns a copy with torch's dtype names shortened (bfloat16 → bf16), the weights as checked
        (floats, or uniform/linear) and the prefixes as a tuple."""
        dtype = short_dtype_name(self.dtype) if isinstance(self.dtype, str) else self.dtype
        accum = short_dtype_name(self.accum) if isinstance(self.accum, str) else self.accum
        device = str(self.device) if isinstance(self.device, torch.device) else self.device
        weights = check_weights(self.weights, self.ema, self.ema_half_life, self.ema_sigma_rel)
        if dtype is not None:
            check_choice("dtype", dtype, OUTPUT_DTYPES)
        check_choice("accum", accum, ("auto", "fp32", "fp64"))
        check_choice("order", self.order, ("auto", "given"))
        # Whether CUDA is there is for choose_device, once the run starts.
        if not (isinstance(device, str) and (device == "auto" or _device_type(device) in ("cpu", "cuda"))):
            raise UsageError(None, f"{option('device', repr(device))}: expected auto, cpu, cuda or cuda:N")
        _sizes = (self.shard_bytes, self.budget_bytes)  # each size's value, checked here in the order of the flags
        check_text("key", self.key)
        prefixes = check_prefixes("strip_prefixes", self.strip_prefixes)
        check_choice("out_format", self.out_format, ("auto", "safetensors", "pt", "same"))
        check_choice("training_state", self.training_state, TRAINING_STATES)
        if self.training_state != "drop" and self.out_format != "same":
            raise UsageError(
                None,
                f"{option('training_state', self.training_state)} applies to {option('out_format', 'same')}: other formats write "
                "the weights alone",
            )
        check_choice("adapter_mode", self.adapter_mode, ADAPTER_MODES)
        if self.adapter_rank is not None:
            check_int("adapter_rank", self.adapter_rank, low=1)
        if self.rank_timeout is not None:
            check_number("rank_timeout", self.rank_timeout, 0, True, what="a number of seconds")
        return replace(self, dtype=dtype, accum=accum, device=device, weights=weights, strip_prefixes=prefixes)

    @property
    def shard_bytes(self) -> int:
        """--max-shard-size in bytes (5GB when not given)."""
        return check_size("max_shard_size", self.max_shard_size if self.max_shard_size is not None else DEFAULT_SHARD_SIZE)

    @property
    def budget_bytes(self) -> int | None:
        """--memory-budget in bytes; None: the engine's default for the device."""
        return check_size("memory_budget", self.memory_budget) if self.memory_budget is not None else None

    @property
    def out_dtype(self) -> torch.dtype | None:
        """The output dtype of floating tensors (of a checked copy); None keeps the input's."""
        return OUTPUT_DTYPES[self.dtype] if self.dtype else None

    @property
    def load_options(self) -> LoadOptions:
        """Where the weights are inside each input."""
        return LoadOptions(key=self.key, use_ema=self.use_ema, strip_prefixes=tuple(self.strip_prefixes))

    def write_options(self, device: torch.device) -> WriteOptions:
        """The options that reach the writer and the engine, on the device chosen for this rank."""
        return WriteOptions(
            self.overwrite,
            self.shard_bytes,
            device,
            self.dtype,
            self.out_format,
            self.budget_bytes,
            self.fsync,
            self.verify,
            self.training_state,
            self.load_options if self.out_format == "same" else LoadOptions(),
        )


def _device_type(name: str) -> str | None:
    try:
        return torch.device(name).type
    except RuntimeError:
        return None
