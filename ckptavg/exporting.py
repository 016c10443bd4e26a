"""`export`: a training checkpoint made deployable, with the same engine and writer as `average`."""

from __future__ import annotations

import os
from typing import Any

from ckptavg.averaging import AverageReport, average
from ckptavg.merge.weights import Weights


def export(path: str | os.PathLike, out: str | os.PathLike | None, merge: bool = False, **options: Any) -> AverageReport:
    """Write the weights of one checkpoint as an inference-only model: no optimizer, scheduler, scaler, RNG
    or trainer state; config and tokenizer files copied beside it.

    Takes the options of `average` that apply to one input: dtype, key, use_ema, strip_prefixes,
    max_shard_size, overwrite, out_format, device, memory_budget, fsync, verify, dry_run, on_progress, on_plan.
    The weights pass through the accumulator unchanged (scale 1), so without --dtype the output is bit for bit
    the checkpoint's.

    A PEFT adapter is written as an adapter (adapter_model.safetensors + adapter_config.json), bit for bit;
    with merge=True and base=MODEL, merged into its base model as a full model.

    Returns:
        The report; `input_disk_bytes` and `output_disk_bytes` give the size before and after.
    """
    if merge and options.get("base") is None:
        from ckptavg.errors import UsageError, option

        raise UsageError(None, f"{option('merge', True)} needs the adapter's base model: pass {option('base', 'MODEL')}")
    from ckptavg.globbing import expand_one

    path = expand_one(path)  # one checkpoint, also from a pattern no shell expanded
    mode = "merged" if merge else "params"  # an adapter alone is written as it is, bit for bit
    return average([path], out, order="given", adapter_mode=mode, make_weights=lambda n: Weights("export", [1.0] * n), **options)
