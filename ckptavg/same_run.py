"""Do the inputs look like checkpoints of one training run? A cheap check before the long work.

Averaging checkpoints of two different runs (two random initialisations) gives a broken model with no error.
Two signs, both cheap: the `config.json` of model folders differ, or the weights point in unrelated
directions. For the second, a few of the largest matrices are sampled (their first SAMPLE elements, so a few
MB in all whatever the model size) and each input is compared with the one before it: checkpoints of one run,
or fine-tunes of one base, have a cosine similarity close to 1; independent initialisations close to 0.
"""

from __future__ import annotations

import json

import torch

from ckptavg.formats.base import Checkpoint
from ckptavg.formats.detect import read_model_config
from ckptavg.merge.plan import Plan

SAMPLE = 1 << 16  # elements read from each sampled tensor of each input
TENSORS = 4  # how many of the largest matrices are sampled
MIN_COSINE = 0.2  # below this, for most sampled tensors, two inputs do not share their weights' history
CONFIG_KEYS_IGNORED = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache", "_commit_hash"}


def different_runs(plan: Plan) -> list[str]:
    """Warnings (at most one of each kind) naming two inputs that look like different runs."""
    found = []
    if config := _config_difference(plan.inputs):
        found.append(config)
    if weights := _weights_difference(plan):
        found.append(weights)
    return found


def _config(ckpt: Checkpoint) -> dict | None:
    data = read_model_config(ckpt.folder)
    return {k: v for k, v in data.items() if k not in CONFIG_KEYS_IGNORED} if data is not None else None


def _config_difference(inputs: list[Checkpoint]) -> str | None:
    configs = [(c, _config(c)) for c in inputs]
    configs = [(c, cfg) for c, cfg in configs if cfg is not None]
    for (a, ca), (b, cb) in zip(configs, configs[1:]):
        keys = sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k))
        if keys:
            key = keys[0]
            return (
                f"{a.path} and {b.path} have different config.json ({key}: {_short(ca.get(key))} vs {_short(cb.get(key))}"
                f"{f', and {len(keys) - 1} more' if len(keys) > 1 else ''}): they may be different models or runs"
            )
    return None


def _short(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _sampled_entries(plan: Plan) -> list:
    n = len(plan.inputs)
    matrices = [
        e
        for e in plan.entries
        if e.weights is not None
        and len(e.sources) == n
        and e.alias_of is None
        and len(e.shape) >= 2
        and e.numel > 0
        and e.input_dtype.is_floating_point
    ]
    return sorted(matrices, key=lambda e: -e.numel)[:TENSORS]


def _sample(entry, i: int) -> torch.Tensor:
    src = entry.sources[i]
    count = min(entry.numel, SAMPLE)
    raw = torch.empty(count * src.dtype.itemsize, dtype=torch.uint8)
    src.read_into(0, raw)
    return raw.view(src.dtype).double()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    norms = float(a.norm() * b.norm())
    return float(a @ b) / norms if norms > 0 else None


def _weights_difference(plan: Plan) -> str | None:
    entries = _sampled_entries(plan)
    if not entries:
        return None
    samples = [[_sample(e, i) for e in entries] for i in range(len(plan.inputs))]
    for i in range(1, len(plan.inputs)):
        cosines = [c for c in (cosine(a, b) for a, b in zip(samples[i - 1], samples[i])) if c is not None]
        low = [c for c in cosines if c < MIN_COSINE]
        if cosines and len(low) * 2 > len(cosines):
            a, b = plan.inputs[i - 1].path, plan.inputs[i].path
            median = sorted(cosines)[len(cosines) // 2]
            return (
                f"{a} and {b} look like different training runs: their weights are unrelated "
                f"(cosine similarity {median:.2f} on {len(cosines)} sampled matrices; checkpoints of one run are close to 1); "
                "averaging them gives a broken model"
            )
    return None
