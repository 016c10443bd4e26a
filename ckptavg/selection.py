"""`select`: which checkpoints to average or keep, by step windows, metrics and health checks.

Filters (`min_step`, `max_step`, `after_warmup`, `every`, `skip_nonfinite`, `skip_spikes`, `max_step="best"`)
narrow the candidates; selectors (`last`, `top_k`) then choose among what is left, and when both are given
the choice is their union: the K best by the metric plus the N newest. With no selector every candidate that
passes the filters is chosen. Candidates without a step are ignored and reported, never chosen or inverted.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ckptavg.discover import (
    MetricsTable,
    load_metrics_file,
    merge_steps,
    read_trainer_state,
    steps_from_entries,
    steps_from_name,
    steps_from_trainer_state,
    trainer_state_metrics,
)
from ckptavg.errors import CkptavgError, InputError, UsageError

MODES = ("min", "max")


@dataclass
class Candidate:
    path: str
    step: int | None = None
    epoch: int | None = None
    step_source: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    metric_sources: dict[str, str] = field(default_factory=dict)
    chosen: bool = False
    why: list[str] = field(default_factory=list)
    ignored: str | None = None
    trainer_best: bool = False  # trainer_state.json's best_model_checkpoint names it

    def metric(self, name: str | None) -> float | None:
        return self.metrics.get(name) if name else None


@dataclass
class Policy:
    """What to choose. See the module docstring for how the parts combine."""

    last: int | None = None
    top_k: int | None = None
    metric: str | None = None
    mode: str = "min"
    every: int | None = None
    min_step: int | None = None
    max_step: int | str | None = None  # a step, or "best"
    after_warmup: float | None = None
    skip_nonfinite: bool = False
    skip_spikes: bool = False
    spike_k: float = 3.0
    spike_window: int = 2

    def check(self) -> None:
        if self.mode not in MODES:
            raise UsageError(None, f"--mode {self.mode!r}: expected min or max")
        needs_metric = [flag for flag, on in (("--top-k", self.top_k), ("--max-step best", self.max_step == "best"), ("--skip-spikes", self.skip_spikes)) if on]
        if needs_metric and not self.metric:
            raise UsageError(None, f"{needs_metric[0]} needs --metric NAME")
        for flag, value in (("--last", self.last), ("--top-k", self.top_k), ("--every", self.every)):
            if value is not None and value < 1:
                raise UsageError(None, f"{flag} must be at least 1")
        if self.after_warmup is not None and not 0 <= self.after_warmup < 1:
            raise UsageError(None, "--after-warmup is a fraction of the run, in [0, 1)")


@dataclass
class Selection:
    candidates: list[Candidate]
    policy: Policy

    @property
    def chosen(self) -> list[Candidate]:
        return [c for c in self.candidates if c.chosen]

    @property
    def not_chosen(self) -> list[Candidate]:
        return [c for c in self.candidates if not c.chosen and c.ignored is None]

    @property
    def ignored(self) -> list[Candidate]:
        return [c for c in self.candidates if c.ignored is not None]

    def to_dict(self) -> dict:
        return {
            "policy": asdict(self.policy),
            "chosen": [c.path for c in self.chosen],
            "not_chosen": [c.path for c in self.not_chosen],
            "ignored": [c.path for c in self.ignored],
            "candidates": [asdict(c) for c in self.candidates],
        }


def describe(path: Path, table: MetricsTable | None = None) -> tuple[Candidate, dict[str, dict[str, float]]]:
    """Step, epoch and metrics of one checkpoint from its name, trainer_state.json and pickle entries.

    Also returns the metrics it records for other checkpoint files, by file name (Lightning best_k_models).
    """
    from ckptavg.formats.detect import sniff
    from ckptavg.formats.torch_io import PickleFile, as_dict
    from ckptavg.metrics import checkpoint_metrics

    candidate = Candidate(path=str(path))
    if not path.exists():
        raise InputError(path, "no such file or folder")
    infos = [steps_from_name(path.name)]
    sources: list[tuple[str, dict[str, float]]] = []
    others: dict[str, dict[str, float]] = {}
    if path.is_dir():
        state = read_trainer_state(path)
        if state is not None:
            infos.append(steps_from_trainer_state(state))
            sources.append(("trainer_state.json", trainer_state_metrics(state, infos[0].step or infos[1].step)))
    else:
        try:
            kind = sniff(path)
            if kind in ("zip", "pickle"):
                pickle_file = PickleFile(path)
                from ckptavg.formats.torch_io import as_dict

                infos.append(steps_from_entries(as_dict(pickle_file.obj) or {}))
                mine, others = checkpoint_metrics(pickle_file)
                sources.append(("checkpoint", mine))
        except CkptavgError as e:
            candidate.ignored = e.problem
    found = merge_steps(*infos)
    candidate.step, candidate.epoch, candidate.step_source = found.step, found.epoch, found.source
    if table is not None:
        sources.append(("metrics file", table.lookup(path, candidate.step)))
    for source, metrics in sources:
        for key, value in metrics.items():
            if key not in candidate.metrics:
                candidate.metrics[key] = value
                candidate.metric_sources[key] = source
    return candidate, others


def gather(paths: Sequence[str | Path], metrics_file: str | Path | None = None) -> list[Candidate]:
    """Describe every path; fill metrics that one checkpoint records for another (Lightning best_k_models)."""
    from ckptavg.formats.base import FILES

    table = load_metrics_file(Path(metrics_file)) if metrics_file else None
    try:
        described = [describe(Path(p), table) for p in paths]
    finally:
        FILES.close()
    candidates = [c for c, _ in described]
    for c in candidates:
        for other, recorded in described:
            for key, value in recorded.get(Path(c.path).name, {}).items():
                if key not in c.metrics:
                    c.metrics[key] = value
                    c.metric_sources[key] = f"best_k_models in {Path(other.path).name}"
    _mark_trainer_best(candidates)
    for c in candidates:
        if c.ignored is None and c.step is None:
            c.ignored = "no step (name, trainer_state.json or checkpoint entries)"
    return candidates


def _mark_trainer_best(candidates: list[Candidate]) -> None:
    """The newest Trainer folder's trainer_state.json names the run's best checkpoint so far."""
    folders = [c for c in candidates if c.step is not None and Path(c.path).is_dir()]
    if not folders:
        return
    state = read_trainer_state(Path(max(folders, key=lambda c: c.step).path)) or {}
    best = state.get("best_model_checkpoint")
    if isinstance(best, str):
        for c in folders:
            c.trainer_best = Path(c.path).name == Path(best).name


def _better(policy: Policy) -> Callable[[float], float]:
    return (lambda v: v) if policy.mode == "min" else (lambda v: -v)


def find_spikes(values: list[float | None], k: float, window: int, mode: str) -> list[tuple[float, float] | None]:
    """For each value, (value, threshold) when it is worse than its neighbours' median + k * scale, else None.

    Neighbours are up to `window` values with a metric on each side. The scale is the neighbours' MAD
    (x 1.4826, so k reads as standard deviations of normal noise), floored by the run's own noise level,
    the MAD of consecutive differences / sqrt(2): a few neighbours that happen to agree do not make every
    small wobble a spike, and a downward trend does not hide a real one.
    """
    sign = 1.0 if mode == "min" else -1.0
    known = [sign * v for v in values if v is not None]
    steps = [b - a for a, b in zip(known, known[1:])]
    noise = _mad(steps) * 1.4826 / math.sqrt(2) if len(steps) >= 2 else 0.0
    out: list[tuple[float, float] | None] = []
    for i, value in enumerate(values):
        if value is None:
            out.append(None)
            continue
        left = [v for v in values[:i] if v is not None][-window:]
        right = [v for v in values[i + 1 :] if v is not None][:window]
        neighbours = [sign * v for v in left + right]
        if len(neighbours) < 2:
            out.append(None)
            continue
        median = statistics.median(neighbours)
        threshold = median + k * max(_mad(neighbours) * 1.4826, noise, 1e-12)
        out.append((value, sign * threshold) if sign * value > threshold else None)
    return out


def _mad(values: list[float]) -> float:
    median = statistics.median(values)
    return statistics.median(abs(v - median) for v in values)


def select(candidates: list[Candidate], policy: Policy, has_nonfinite: Callable[[Candidate], str | None] | None = None) -> Selection:
    """Mark each candidate chosen or not, with why; candidates are returned in step order."""
    policy.check()
    ordered = sorted((c for c in candidates if c.ignored is None), key=lambda c: c.step)  # type: ignore[arg-type, return-value]
    ignored = [c for c in candidates if c.ignored is not None]
    pool = list(ordered)

    def drop(keep: Callable[[Candidate], bool], reason: Callable[[Candidate], str]) -> None:
        nonlocal pool
        for c in pool:
            if not keep(c):
                c.why.append(reason(c))
        pool = [c for c in pool if keep(c)]

    if policy.min_step is not None:
        drop(lambda c: c.step >= policy.min_step, lambda c: f"before --min-step {policy.min_step}")
    if isinstance(policy.max_step, int):
        drop(lambda c: c.step <= policy.max_step, lambda c: f"after --max-step {policy.max_step}")
    if policy.after_warmup is not None and ordered:
        start = policy.after_warmup * max(c.step for c in ordered)
        drop(lambda c: c.step >= start, lambda c: f"in the first {policy.after_warmup:.0%} of the run (step < {start:g})")
    if policy.every is not None:
        drop(lambda c: c.step % policy.every == 0, lambda c: f"step not a multiple of --every {policy.every}")
    metric = policy.metric
    if metric:
        for c in pool:
            if c.metric(metric) is None:
                c.why.append(f"no {metric}")
    if policy.skip_nonfinite and has_nonfinite is not None:
        problems = {id(c): has_nonfinite(c) for c in pool}
        drop(lambda c: problems[id(c)] is None, lambda c: f"non-finite: {problems[id(c)]}")
    if policy.skip_spikes:
        spikes = dict(zip(map(id, pool), find_spikes([c.metric(metric) for c in pool], policy.spike_k, policy.spike_window, policy.mode)))
        drop(lambda c: spikes[id(c)] is None, lambda c: f"{metric} spike: {spikes[id(c)][0]:g} beyond {spikes[id(c)][1]:g} (neighbours' median + {policy.spike_k:g} x MAD)")
    if policy.max_step == "best":
        scored = [c for c in pool if c.metric(metric) is not None]
        if scored:
            best = min(scored, key=lambda c: _better(policy)(c.metric(metric)))
            drop(lambda c: c.step <= best.step, lambda c: f"after the best {metric} (step {best.step})")
    chosen: list[Candidate] = []
    if policy.top_k is not None:
        scored = sorted((c for c in pool if c.metric(metric) is not None), key=lambda c: _better(policy)(c.metric(metric)))
        for rank, c in enumerate(scored[: policy.top_k], 1):
            c.why.append(f"top-{policy.top_k} by {metric} (#{rank})")
            chosen.append(c)
    if policy.last is not None:
        for c in pool[-policy.last :]:
            c.why.append(f"among the last {policy.last}")
            chosen.append(c)
    if policy.top_k is None and policy.last is None:
        for c in pool:
            c.why.append("passes the filters")
            chosen.append(c)
    for c in chosen:
        c.chosen = True
    selectors = [f"the last {policy.last}" if policy.last else "", f"the top-{policy.top_k} by {metric}" if policy.top_k else ""]
    for c in pool:
        if not c.chosen:
            c.why.append("not among " + " or ".join(s for s in selectors if s))
    return Selection(candidates=ordered + ignored, policy=policy)
