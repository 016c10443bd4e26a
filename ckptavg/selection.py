"""`select`: which checkpoints to average or keep, by step windows, metrics and health checks.

Filters narrow the candidates, in this order: `min_step`, `max_step`, `after_warmup`, `every`, the windows
`window_steps` and `window_tokens` (within so many steps or tokens seen of the newest candidate left),
`skip_spikes`, `min_interval` (walking back from the newest, each kept checkpoint at least so many steps before
the one kept after it), `skip_nonfinite`, `max_step="best"`. Selectors (`last`, `top_k`) then choose among what is
left, and when both are given the choice is their union: the K best by the metric plus the N newest. With no
selector every candidate that passes the filters is chosen. Candidates without a step, and those that cannot be
read or are incomplete (a save in progress: a truncated file, a missing shard, no weights yet), are ignored and
reported, never chosen or inverted; a hostile pickle is an error. The deletion list (`Selection.inverted`) also
keeps back the newest readable checkpoint and, with a metric, every checkpoint without a value for it.

`skip_nonfinite` is the one filter that reads tensors: it runs last and reads only the candidates the
selectors would take, replacing a non-finite one by the next in line, so the choice is the one a read of
every candidate would give (see `select`).
"""

from __future__ import annotations

import difflib
import math
import numbers
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ckptavg.checkpoint import LoadOptions, missing_input
from ckptavg.discover import (
    MetricsTable,
    StepInfo,
    load_metrics_file,
    read_trainer_state,
    steps_from_name,
    steps_from_path,
    tokens_from_trainer_state,
    trainer_state_metrics,
)
from ckptavg.errors import HostileInputError, InputError, UsageError, option
from ckptavg.formats.base import Checkpoint
from ckptavg.formats.detect import CHECKPOINT_FOLDER
from ckptavg.globbing import expand
from ckptavg.sizes import TOKENS, format_tokens, parse_tokens

MODES = ("min", "max")
EPOCH_AS_STEP = "epoch (no candidate has a step)"
SPIKE_MIN_VALUES = 4  # a value, two neighbours, and a third value for the noise floor of the others
SHARD_NAME = re.compile(r"-\d{5}-of-\d{5}\.(safetensors|bin)$")
CHECKPOINT_DIR = CHECKPOINT_FOLDER


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
    kept_back: str | None = None  # not chosen, yet never printed by --invert: why
    trainer_best: bool = False  # trainer_state.json's best_model_checkpoint names it
    copy_of: str | None = None  # holds the same weights as this candidate (a last/best copy): ignored
    modes: dict[str, tuple[str, str]] = field(default_factory=dict)  # metric -> (min or max, where the checkpoint records it)
    tensor_bytes: int = 0  # of its weights, from the headers: what --skip-nonfinite reads
    tokens: int | None = None  # tokens seen in training when it was saved (None: not recorded)
    tokens_source: str | None = None

    def metric(self, name: str | None) -> float | None:
        return self.metrics.get(name) if name else None

    def rank_value(self, name: str | None) -> float | None:
        """The metric as a number to rank by: None when missing or NaN."""
        value = self.metric(name)
        return None if value is None or math.isnan(value) else value


@dataclass
class Policy:
    """What to choose. See the module docstring for how the parts combine."""

    last: int | None = None
    top_k: int | None = None
    metric: str | None = None
    mode: str | None = None  # None: what the checkpoints record for the metric, else its name (choose_mode)
    every: int | None = None
    min_step: int | None = None
    max_step: int | str | None = None  # a step, or "best"
    after_warmup: float | None = None
    skip_nonfinite: bool = False
    skip_spikes: bool = False
    spike_k: float = 3.0
    spike_window: int = 2
    window_steps: int | None = None  # within so many steps of the newest candidate
    window_tokens: int | None = None  # within so many tokens seen of the newest candidate
    min_interval: int | None = None  # kept checkpoints at least so many steps apart, walking back from the newest

    def check(self) -> None:
        if self.mode is not None and self.mode not in MODES:
            raise UsageError(None, f"{option('mode', repr(self.mode))}: expected min or max")
        needs_metric = [
            asked
            for asked, on in (
                (option("top_k"), self.top_k),
                (option("max_step", "best"), self.max_step == "best"),
                (option("skip_spikes", True), self.skip_spikes),
            )
            if on
        ]
        if needs_metric and not self.metric:
            raise UsageError(None, f"{needs_metric[0]} needs {option('metric', 'NAME')}")
        for name, value in (("last", self.last), ("top_k", self.top_k), ("every", self.every)):
            if value is not None and value < 1:
                raise UsageError(None, f"{option(name)} must be at least 1")
        if self.after_warmup is not None and not 0 <= self.after_warmup < 1:
            raise UsageError(None, f"{option('after_warmup')} is a fraction of the run, in [0, 1)")
        if isinstance(self.max_step, int) and self.min_step is not None and self.min_step > self.max_step:
            raise UsageError(
                None, f"{option('min_step', self.min_step)} is above {option('max_step', self.max_step)}: no step can pass both"
            )
        for name, value, low in (("window_steps", self.window_steps, 0), ("window_tokens", self.window_tokens, 0)):
            if value is not None and value < low:
                raise UsageError(None, f"{option(name, value)}: expected a whole number >= {low}")
        if self.min_interval is not None and self.min_interval < 1:
            raise UsageError(None, f"{option('min_interval', self.min_interval)}: expected a number of steps >= 1")


@dataclass
class Selection:
    candidates: list[Candidate]
    policy: Policy
    notes: list[str] = field(default_factory=list)  # for stderr: what the filters dropped, what could not be judged
    metric_hint: str | None = None  # set when no checkpoint has the metric: the metrics found, the closest name
    mode_source: str | None = (
        None  # why the metric's direction is policy.mode: --mode, where a checkpoint records it, or its name
    )

    @property
    def chosen(self) -> list[Candidate]:
        return [c for c in self.candidates if c.chosen]

    @property
    def not_chosen(self) -> list[Candidate]:
        return [c for c in self.candidates if not c.chosen and c.ignored is None]

    @property
    def inverted(self) -> list[Candidate]:
        """What --invert prints (e.g. to delete): not chosen, readable, and not kept back."""
        return [c for c in self.not_chosen if c.kept_back is None]

    @property
    def kept_back(self) -> list[Candidate]:
        return [c for c in self.candidates if c.kept_back is not None]

    @property
    def ignored(self) -> list[Candidate]:
        return [c for c in self.candidates if c.ignored is not None]

    def to_dict(self) -> dict:
        return {
            "policy": asdict(self.policy),
            "mode": self.policy.mode,
            "mode_source": self.mode_source,
            "chosen": [c.path for c in self.chosen],
            "not_chosen": [c.path for c in self.not_chosen],
            "inverted": [c.path for c in self.inverted],
            "kept_back": {c.path: c.kept_back for c in self.kept_back},
            "ignored": [c.path for c in self.ignored],
            "copies": {c.path: c.copy_of for c in self.candidates if c.copy_of is not None},
            "notes": list(self.notes),
            "candidates": [asdict(c) for c in self.candidates],
        }


def describe(
    path: Path, table: MetricsTable | None = None, options: LoadOptions | None = None
) -> tuple[Candidate, dict[str, dict[str, float]]]:
    """Step, epoch and metrics of one checkpoint from its name, trainer_state.json and pickle entries.

    The checkpoint is opened (headers and pickle structure only): one that is unreadable or incomplete is
    marked ignored with the reason, a hostile pickle raises. Also returns the metrics it records for other
    checkpoint files, by file name (Lightning best_k_models).
    """
    candidate, others, _ = _describe(path, table, options)
    return candidate, others


def _describe(
    path: Path, table: MetricsTable | None, options: LoadOptions | None
) -> tuple[Candidate, dict[str, dict[str, float]], Checkpoint | None]:
    """describe(), and the opened checkpoint (None when unreadable) for the check for copies."""
    from ckptavg.metrics import checkpoint_metrics, checkpoint_tokens, recorded_modes, trainer_modes

    candidate = Candidate(path=str(path))
    ckpt = None
    if not path.exists():
        raise missing_input(path)
    refuse_run_folder(path)
    sources: list[tuple[str, dict[str, float]]] = []
    others: dict[str, dict[str, float]] = {}
    try:
        ckpt = open_complete(path, options or LoadOptions())
        found = StepInfo(ckpt.step, ckpt.epoch, ckpt.step_source)  # the same steps `average` orders by
        candidate.tensor_bytes = ckpt.nbytes
        if ckpt.pickle is not None and path.is_file():
            mine, others = checkpoint_metrics(ckpt.pickle)
            sources.append(("checkpoint", mine))
            candidate.modes.update(recorded_modes(ckpt.pickle))
            candidate.tokens, candidate.tokens_source = checkpoint_tokens(ckpt.pickle)
    except HostileInputError:
        raise
    except InputError as e:
        candidate.ignored = unreadable(path, e)
        found = steps_from_path(path)
        ckpt = None
    folder = path if path.is_dir() else path.parent
    state = read_trainer_state(folder) if path.is_dir() or folder.name.startswith("checkpoint") else None
    if state is not None:
        sources.insert(0, ("trainer_state.json", trainer_state_metrics(state, found.step)))
        candidate.modes.update(trainer_modes(folder))
        if (recorded := tokens_from_trainer_state(state))[0] is not None:
            candidate.tokens, candidate.tokens_source = recorded
    candidate.step, candidate.epoch, candidate.step_source = found.step, found.epoch, found.source
    if table is not None:
        sources.append(("metrics file", table.lookup(path, candidate.step)))
    for source, metrics in sources:
        for key, value in metrics.items():
            if key not in candidate.metrics:
                candidate.metrics[key] = value
                candidate.metric_sources[key] = source
    return candidate, others, ckpt


def open_complete(path: Path, options: LoadOptions):
    """Open a checkpoint (headers only) and refuse what a save in progress leaves: shards without their index.

    Every file is checked against the length its header gives by the readers themselves (safetensors header
    offsets, zip records and legacy storages against the file size), an index against its shards.
    """
    from ckptavg.checkpoint import open_checkpoint
    from ckptavg.formats.dcp_hf import dcp_hf_folder
    from ckptavg.formats.detect import weight_files_in

    if path.is_dir():
        files = weight_files_in(path)
        # DCP's Hugging Face shard files (shard-R-model-i-of-n) never have an index: their parts are checked instead
        if files and all(SHARD_NAME.search(f.name) for f in files) and dcp_hf_folder(path) is None:
            raise InputError(path, f"incomplete: shard {files[0].name} without its index (a save in progress?)")
    return open_checkpoint(path, options)


def unreadable(path: Path, error: InputError) -> str:
    """Why a candidate is ignored: the problem, with the file inside the candidate when it is not the candidate."""
    where = ""
    if error.path and Path(error.path) != path:
        inside = Path(error.path)
        where = f"{inside.relative_to(path) if inside.is_relative_to(path) else inside}: "
    return f"unreadable or incomplete: {where}{error.problem}"


def refuse_run_folder(path: Path) -> None:
    """A run's output folder (it holds checkpoint-N folders, no weights) is not a checkpoint: say what to pass."""
    from ckptavg.formats.detect import weight_files_in

    if not path.is_dir() or steps_from_name(path.name).step is not None or weight_files_in(path):
        return
    runs = sorted(
        (p.name for p in path.iterdir() if p.is_dir() and CHECKPOINT_DIR.fullmatch(p.name)), key=lambda n: int(n.split("-")[1])
    )
    if runs:
        shown = ", ".join(runs[:3]) + (", ..." if len(runs) > 3 else "")
        raise InputError(path, f"holds checkpoint folders ({shown}), not weights; pass {path}/{runs[-1].split('-')[0]}-* instead")


def gather(
    paths: Sequence[str | Path], metrics_file: str | Path | None = None, options: LoadOptions | None = None
) -> list[Candidate]:
    """Describe every path; fill metrics that one checkpoint records for another (Lightning best_k_models)."""
    from ckptavg.formats.base import FILES
    from ckptavg.hub import is_hub

    paths = expand(paths)  # a pattern no shell expanded: run/checkpoint-*
    table = load_metrics_file(Path(metrics_file)) if metrics_file else None
    described: list[tuple[Candidate, dict[str, dict[str, float]]]] = []
    opened: dict[int, Checkpoint] = {}
    try:  # an hf:// input may stand for several checkpoints (a repo's checkpoint-N folders, step branches, Trainer commits)
        for p in paths:
            if is_hub(p):
                described.extend(_hub_candidates(p, table, options))
                continue
            candidate, others, ckpt = _describe(Path(p), table, options)
            described.append((candidate, others))
            if ckpt is not None:
                opened[id(candidate)] = ckpt
        _mark_copies([c for c, _ in described], opened)
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
    _order_by_epoch_without_steps(candidates)
    for c in candidates:
        if c.ignored is None and c.step is None:
            c.ignored = "no step (name, trainer_state.json or checkpoint entries)"
    return candidates


def _hub_candidates(
    text: str | Path, table: MetricsTable | None, options: LoadOptions | None
) -> list[tuple[Candidate, dict[str, dict[str, float]]]]:
    """The candidates of one hf:// input: a checkpoint whose weights are all in the cache is described like a local
    one, under its pinned hf:// name; the others from what the Hub listing says (step, trainer_state.json)."""
    from ckptavg.hub import list_checkpoints, mark_best

    out = []
    for row in list_checkpoints(text):
        if row.folder is not None:
            candidate, _ = describe(row.folder, table, options)
            candidate.path = row.path
            if candidate.ignored:
                candidate.ignored = candidate.ignored.replace(str(row.folder), row.path)
        else:
            candidate = Candidate(path=row.path)
            if row.problem is not None:
                candidate.ignored = f"unreadable or incomplete: {row.problem}"
            if row.trainer_state is not None:
                state = row.trainer_state
                candidate.metrics.update(
                    trainer_state_metrics(state, row.step if row.step is not None else state.get("global_step"))
                )
                candidate.metric_sources.update({k: "trainer_state.json" for k in candidate.metrics})
                candidate.tokens, candidate.tokens_source = tokens_from_trainer_state(state)
            if table is not None:
                for key, value in table.lookup(Path(row.path), row.step).items():
                    if key not in candidate.metrics:
                        candidate.metrics[key] = value
                        candidate.metric_sources[key] = "metrics file"
        if candidate.step is None:
            candidate.step, candidate.step_source = row.find_step()
        out.append(candidate)
    mark_best(out)
    return [(c, {}) for c in out]


def _mark_copies(candidates: list[Candidate], opened: dict[int, Checkpoint]) -> None:
    """Copies of one checkpoint (fairseq checkpoint_last.pt, Lightning last.ckpt, timm model_best.pth.tar, a
    hard link) are one candidate: the one named for its step stays, the others are ignored as its copies."""
    from ckptavg.same_weights import copy_reason, original_of, same_weight_groups

    readable = [c for c in candidates if c.ignored is None and id(c) in opened]
    for group in same_weight_groups([opened[id(c)] for c in readable]):
        members = [readable[i] for i in group]
        keep = members[original_of([Path(c.path) for c in members])]
        for c in members:
            if c is not keep:
                c.copy_of = keep.path
                how = copy_reason(opened[id(c)], opened[id(keep)])
                c.ignored = f"holds the same weights as {keep.path} ({how}); only that one is a candidate"


def _order_by_epoch_without_steps(candidates: list[Candidate]) -> None:
    """timm and epoch-based loops store only an epoch: when no candidate has a step, the epoch stands for it."""
    if any(c.step is not None for c in candidates):
        return
    for c in candidates:
        if c.epoch is not None:
            c.step, c.step_source = c.epoch, EPOCH_AS_STEP


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

    Neighbours are up to `window` values with a metric on each side (at the ends, those that exist). The scale
    is the neighbours' MAD (x 1.4826, so k reads as standard deviations of normal noise), floored by the run's
    own noise level: the MAD of consecutive differences / sqrt(2) of the other values, so a spike does not
    raise its own bar, a few neighbours that happen to agree do not make every small wobble a spike, and a
    downward trend does not hide a real one. Infinite values are judged, never neighbours; with fewer than
    SPIKE_MIN_VALUES finite values nothing can be judged.
    """
    sign = 1.0 if mode == "min" else -1.0
    finite = [(i, sign * v) for i, v in enumerate(values) if v is not None and math.isfinite(v)]
    out: list[tuple[float, float] | None] = [None] * len(values)
    if len(finite) < SPIKE_MIN_VALUES:
        return out
    for i, v in enumerate(values):
        if v is None or math.isnan(v):
            continue
        others = [x for j, x in finite if j != i]
        neighbours = [x for j, x in finite if j < i][-window:] + [x for j, x in finite if j > i][:window]
        median = statistics.median(neighbours)
        threshold = median + k * max(_mad(neighbours) * 1.4826, _noise(others), 1e-12)
        if sign * v > threshold:
            out[i] = (v, sign * threshold)
    return out


def _like(values: list[float]) -> Callable[[float], str]:
    """A format for numbers beside a metric's values: the decimal places the metric is recorded with (as `:g`
    shows each value: 0.4123 has 4), so a computed threshold does not print six decimals beside four."""
    places = 0
    for v in values:
        text = f"{v:g}"
        if "e" in text:
            return lambda x: f"{x:g}"
        places = max(places, len(text.partition(".")[2]))
    return lambda x: f"{x:.{places}f}"


def _noise(values: list[float]) -> float:
    """The noise level of a sequence: the MAD of its consecutive differences / sqrt(2)."""
    steps = [b - a for a, b in zip(values, values[1:])]
    return _mad(steps) * 1.4826 / math.sqrt(2) if len(steps) >= 2 else 0.0


def _mad(values: list[float]) -> float:
    median = statistics.median(values)
    return statistics.median(abs(v - median) for v in values)


def metric_hint(candidates: list[Candidate], metric: str) -> str:
    """No checkpoint has `metric`: the metrics they have, and the closest name (a typo?)."""
    names = sorted({key for c in candidates for key in c.metrics})
    close = difflib.get_close_matches(metric, names, n=1)
    hint = f"no checkpoint has {metric}" + (f" (did you mean {close[0]}?)" if close else "")
    if not names:
        return hint + f"; no metrics found (trainer_state.json, checkpoint entries or {option('metrics_file', 'FILE')})"
    return hint + f"; metrics found: {', '.join(names[:12])}{', ...' if len(names) > 12 else ''}"


def choose_mode(candidates: list[Candidate], policy: Policy) -> tuple[str | None, str | None, str | None]:
    """(mode, why, a note for stderr) of the policy's metric where the choice depends on it (--top-k, --skip-spikes,
    --max-step best): --mode when given, else the direction the checkpoints record (Lightning's ModelCheckpoint mode,
    timm's CheckpointSaver, the Trainer's greater_is_better), else the metric's name (a loss: min, an accuracy: max).

    Raises:
        UsageError: it is needed, and the checkpoints disagree, or neither they nor the name say it.
    """
    from ckptavg.metrics import mode_from_name

    metric = policy.metric
    needed = policy.top_k is not None or policy.skip_spikes or policy.max_step == "best"
    if not metric or not needed or not any(c.rank_value(metric) is not None for c in candidates):
        return policy.mode, option("mode") if policy.mode else None, None  # nothing is ranked by it
    recorded: dict[str, str] = {}
    for c in candidates:
        if metric in c.modes:
            recorded.setdefault(*c.modes[metric])
    named = mode_from_name(metric)
    if len(recorded) > 1 and policy.mode is None:
        raise UsageError(
            None,
            f"{option('metric', metric)}: the checkpoints disagree on which way it is better ({recorded['max']}; but "
            f"{recorded['min']}); pass {option('mode', 'max')} or {option('mode', 'min')}",
        )
    if recorded:
        mode, why = next(iter(recorded.items()))
    elif named:
        mode, why = named[0], f"from the name ({named[1]}: {'lower' if named[0] == 'min' else 'higher'} is better)"
    elif policy.mode is None:
        raise UsageError(
            None,
            f"{option('metric', metric)}: no checkpoint records whether higher or lower is better, and the name does not say; "
            f"pass {option('mode', 'max')} (higher is better, e.g. an accuracy) or {option('mode', 'min')} (lower is better, "
            "e.g. a loss)",
        )
    else:
        return policy.mode, option("mode"), None
    if policy.mode is None:
        return mode, why, f"mode {mode} for {metric!r}: {why}; {option('mode', 'max' if mode == 'min' else 'min')} to override"
    if policy.mode != mode:
        return policy.mode, option("mode"), f"mode {policy.mode} for {metric!r} ({option('mode')}), although {why} (mode {mode})"
    return policy.mode, option("mode"), None


def select(
    candidates: list[Candidate],
    policy: Policy,
    has_nonfinite: Callable[..., str | None] | None = None,
    on_progress: Callable[[Any], None] | None = None,
) -> Selection:
    """Mark each candidate chosen or not, with why, and what --invert keeps back; returned in step order.

    `has_nonfinite(candidate)` (for --skip-nonfinite) reads a candidate's tensors and says which holds NaN or
    Inf, None when all are finite. It is the costly part, so it runs last, and only on the candidates that could
    be chosen: the step filters and --skip-spikes first, then the candidates the selectors would take, best
    first (--max-step best's best, the --top-k in rank order, the --last N newest first). A non-finite one is
    replaced by the next in line (--last 3: the three newest finite ones), exactly as if every candidate had
    been read first. With `on_progress`, it is called `has_nonfinite(candidate, on_bytes=fn)` and must call
    fn(n) for each n bytes read; `on_progress` gets a ReadProgress (phase "scanning") after each.
    """
    policy.check()
    mode, mode_source, mode_note = choose_mode([c for c in candidates if c.ignored is None], policy)
    policy = replace(policy, mode=mode)
    ordered = sorted((c for c in candidates if c.ignored is None), key=lambda c: c.step)  # type: ignore[arg-type, return-value]
    ignored = [c for c in candidates if c.ignored is not None]
    pool = _Pool(list(ordered), [mode_note] if mode_note else [])
    if any(c.step_source == EPOCH_AS_STEP for c in ordered):
        pool.notes.append(
            f"ordered by epoch: no candidate has a step ({option('min_step')}, {option('max_step')}, {option('every')}, "
            f"{option('window_steps')} and {option('min_interval')} count epochs)"
        )
    _filter_steps(pool, policy, ordered)
    _filter_windows(pool, policy)
    metric = policy.metric
    if metric:
        for c in pool.candidates:
            if c.rank_value(metric) is None:
                c.why.append(f"no {metric}" + (" (NaN)" if c.metric(metric) is not None else ""))
    if policy.skip_spikes:
        _drop_spikes(pool, policy, ordered)
    if policy.min_interval is not None:
        after = _kept_at_intervals(pool.candidates, policy.min_interval)
        pool.drop(
            lambda c: after[id(c)] is None,
            lambda c: f"within {option('min_interval', policy.min_interval)} of step {after[id(c)]}, which is kept",
        )
    if policy.skip_nonfinite and has_nonfinite is not None:
        _drop_nonfinite(pool, policy, has_nonfinite, on_progress)
    _choose(pool, policy)
    _keep_back([c for c in ordered if c.ignored is None], metric)
    hint = (
        metric_hint(candidates, metric)
        if metric and not any(c.rank_value(metric) is not None for c in ordered if c.ignored is None)
        else None
    )
    if hint:
        pool.notes.append(hint)
    return Selection(candidates=ordered + ignored, policy=policy, notes=pool.notes, metric_hint=hint, mode_source=mode_source)


@dataclass
class _Pool:
    """The candidates still in the running (in step order), and the notes for stderr said on the way."""

    candidates: list[Candidate]
    notes: list[str]

    def drop(self, keep: Callable[[Candidate], bool], reason: Callable[[Candidate], str], said_by: str | None = None) -> None:
        """Drop the candidates `keep` refuses, each with its reason (and a note naming `said_by`, when given)."""
        for c in self.candidates:
            if not keep(c):
                c.why.append(reason(c))
                if said_by:
                    self.notes.append(f"{said_by} dropped {c.path}: {reason(c)}")
        self.candidates = [c for c in self.candidates if keep(c)]


def _filter_steps(pool: _Pool, policy: Policy, ordered: list[Candidate]) -> None:
    """min_step, max_step, after_warmup (a fraction of the newest step) and every."""
    if policy.min_step is not None:
        pool.drop(lambda c: c.step >= policy.min_step, lambda c: f"before {option('min_step', policy.min_step)}")
    if isinstance(policy.max_step, int):
        pool.drop(lambda c: c.step <= policy.max_step, lambda c: f"after {option('max_step', policy.max_step)}")
    if policy.after_warmup is not None and ordered:
        start = policy.after_warmup * max(c.step for c in ordered)  # type: ignore[type-var]
        pool.drop(lambda c: c.step >= start, lambda c: f"in the first {policy.after_warmup:.0%} of the run (step < {start:g})")
    if policy.every is not None:
        pool.drop(lambda c: c.step % policy.every == 0, lambda c: f"step not a multiple of {option('every', policy.every)}")


def _filter_windows(pool: _Pool, policy: Policy) -> None:
    """window_steps and window_tokens: within that distance of the newest candidate left (the boundary included)."""
    if policy.window_steps is not None and pool.candidates:
        newest_step = pool.candidates[-1].step
        pool.drop(
            lambda c: newest_step - c.step <= policy.window_steps,
            lambda c: f"outside {option('window_steps', policy.window_steps)} of step {newest_step}",
        )
    if policy.window_tokens is not None and pool.candidates:
        newest, newest_tokens = pool.candidates[-1], _tokens_of(pool.candidates, policy.window_tokens)[-1]
        pool.drop(
            lambda c: newest_tokens - c.tokens <= policy.window_tokens,
            lambda c: (
                f"outside {option('window_tokens', format_tokens(policy.window_tokens))} of {format_tokens(newest_tokens)} "
                f"tokens (step {newest.step}): at {format_tokens(c.tokens)}"
            ),
        )


def _drop_spikes(pool: _Pool, policy: Policy, ordered: list[Candidate]) -> None:
    """The candidates whose metric jumps beyond its neighbours' median + k x MAD (judged over every readable one)."""
    metric = policy.metric
    readable = [c for c in ordered if c.ignored is None]
    judged = [c for c in readable if c.rank_value(metric) is not None and math.isfinite(c.rank_value(metric))]
    if len(judged) < SPIKE_MIN_VALUES:
        pool.notes.append(
            f"{option('skip_spikes', True)}: {len(judged)} checkpoint(s) with a finite {metric}, {SPIKE_MIN_VALUES} are "
            "needed to judge spikes; none dropped"
        )
    found = find_spikes([c.rank_value(metric) for c in readable], policy.spike_k, policy.spike_window, policy.mode)
    spikes = dict(zip(map(id, readable), found))
    shown = _like([c.rank_value(metric) for c in judged])
    pool.drop(
        lambda c: spikes[id(c)] is None,
        lambda c: (
            f"{metric} spike: {spikes[id(c)][0]:g} beyond {shown(spikes[id(c)][1])} (neighbours' median + "
            f"{policy.spike_k:g} x MAD)"
        ),
        option("skip_spikes", True),
    )


def _drop_nonfinite(
    pool: _Pool, policy: Policy, has_nonfinite: Callable[..., str | None], on_progress: Callable[[Any], None] | None
) -> None:
    """The candidates holding NaN or Inf, read lazily: only those that could be chosen (see `select`)."""
    scan = _Scan(has_nonfinite, on_progress)
    scan.settle(pool.candidates, policy)
    pool.candidates = [c for c in pool.candidates if c.ignored is None]
    pool.drop(
        lambda c: scan.problems.get(id(c)) is None,
        lambda c: f"non-finite: {scan.problems[id(c)]}",
        option("skip_nonfinite", True),
    )
    unread = [c for c in pool.candidates if id(c) not in scan.problems]
    if unread:
        read = len(scan.problems)
        pool.notes.append(
            f"{option('skip_nonfinite', True)} read {read} of {read + len(unread)} checkpoints, those that could be chosen; "
            "the others were not read for NaN/Inf"
        )


def _choose(pool: _Pool, policy: Policy) -> None:
    """Mark what the selectors take from the pool (the top-k, the last N, or all of it), each with why."""
    metric = policy.metric
    best, _, top, last = _pick(pool.candidates, policy)
    if best is not None:
        pool.drop(lambda c: c.step <= best.step, lambda c: f"after the best {metric} (step {best.step})")
    chosen: list[Candidate] = []
    for rank, c in enumerate(top, 1):
        c.why.append(f"top-{policy.top_k} by {metric} (#{rank})")
        chosen.append(c)
    for c in reversed(last):
        c.why.append(f"among the last {policy.last}")
        chosen.append(c)
    if policy.top_k is None and policy.last is None:
        for c in pool.candidates:
            c.why.append("passes the filters")
            chosen.append(c)
    for c in chosen:
        c.chosen = True
    selectors = [f"the last {policy.last}" if policy.last else "", f"the top-{policy.top_k} by {metric}" if policy.top_k else ""]
    for c in pool.candidates:
        if not c.chosen:
            c.why.append("not among " + " or ".join(s for s in selectors if s))


def token_count(value: object) -> int | None:
    """A token count as given (500M, 20B, a whole number >= 0), for window_tokens; None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return parse_tokens(value)
        except UsageError as e:
            raise UsageError(None, f"{option('window_tokens', repr(value))}: {TOKENS}") from e
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise UsageError(None, f"{option('window_tokens', repr(value))}: {TOKENS}")
    return int(value)


def _tokens_of(pool: list[Candidate], window: int) -> list[int]:
    """The tokens seen by each candidate of `pool`; refused, naming them, when some do not record it."""
    missing = [c.path for c in pool if c.tokens is None]
    if missing:
        names = ", ".join(missing[:3]) + (f", ... ({len(missing)} in all)" if len(missing) > 3 else "")
        raise UsageError(
            None,
            f"{option('window_tokens', format_tokens(window))} needs the tokens seen by every checkpoint; none recorded for "
            f"{names} (read from trainer_state.json's num_input_tokens_seen, where 0 means not counted: set "
            "include_num_input_tokens_seen; or a checkpoint's tokens, consumed_tokens, or consumed_train_samples with "
            "seq_length)",
        )
    return [c.tokens for c in pool if c.tokens is not None]


def _kept_at_intervals(pool: list[Candidate], interval: int) -> dict[int, int | None]:
    """Walking back from the newest of `pool` (in step order): None for each checkpoint kept, at least `interval`
    steps before the one kept after it; for the others, the step of that kept one."""
    after: dict[int, int | None] = {}
    kept: int | None = None
    for c in reversed(pool):
        if kept is None or kept - c.step >= interval:  # type: ignore[operator]
            after[id(c)], kept = None, c.step
        else:
            after[id(c)] = kept
    return after


def _pick(pool: list[Candidate], policy: Policy) -> tuple[Candidate | None, list[Candidate], list[Candidate], list[Candidate]]:
    """What the selectors take from `pool` (in step order): (--max-step best's best by the metric or None, the
    pool up to it, the --top-k best first, the --last N newest first)."""
    metric = policy.metric
    better = _better(policy)
    scored = [c for c in pool if c.rank_value(metric) is not None] if metric else []
    ranked = sorted(scored, key=lambda c: better(c.rank_value(metric)))  # type: ignore[arg-type]
    best = ranked[0] if policy.max_step == "best" and ranked else None
    if best is not None:
        pool = [c for c in pool if c.step <= best.step]  # type: ignore[operator]
        ranked = [c for c in ranked if c.step <= best.step]  # type: ignore[operator]
    top = ranked[: policy.top_k] if policy.top_k is not None else []
    last = pool[::-1][: policy.last] if policy.last is not None else []
    return best, pool, top, last


class _Scan:
    """--skip-nonfinite, read lazily: only the candidates whose finiteness decides the choice, best first.

    `problems` maps each candidate read (by id) to its first NaN/Inf, or None (finite, or unreadable now: then
    it is marked ignored, as one that changed since it was described).
    """

    def __init__(self, has_nonfinite: Callable[..., str | None], on_progress: Callable[[Any], None] | None) -> None:
        self.has_nonfinite, self.on_progress = has_nonfinite, on_progress
        self.problems: dict[int, str | None] = {}
        self.bytes_done = 0

    def settle(self, pool: list[Candidate], policy: Policy) -> None:
        """Read candidates until every one the selectors would take (counting those not read as finite) was read:
        then the choice is what it would be with every candidate read."""
        while True:
            finite = [c for c in pool if c.ignored is None and self.problems.get(id(c)) is None]
            todo = [c for c in _unique(_needed(finite, policy)) if id(c) not in self.problems]
            if not todo:
                return
            for i, c in enumerate(todo):
                self._read(c, todo[i:])
                if c.ignored is not None or self.problems[id(c)] is not None:
                    break  # what replaces it may change the rest: plan again

    def _read(self, c: Candidate, remaining: list[Candidate]) -> None:
        from ckptavg.inspection import ReadProgress

        # the bytes to read: those read so far and the plan's rest (a read that stops at a NaN shortens it)
        total = self.bytes_done + sum(x.tensor_bytes for x in remaining)
        done, count = len(self.problems), len(self.problems) + len(remaining)

        def tell(n: int) -> None:
            self.bytes_done += n
            detail = f"checkpoint {done + 1} of {count}: {c.path}"
            progress = ReadProgress(self.bytes_done, max(total, self.bytes_done), done, count, c.path, "scanning", detail)
            self.on_progress(progress)  # type: ignore[misc]

        try:
            self.problems[id(c)] = self.has_nonfinite(c, on_bytes=tell) if self.on_progress else self.has_nonfinite(c)
        except HostileInputError:
            raise
        except InputError as e:
            c.ignored = unreadable(Path(c.path), e)
            self.problems[id(c)] = None


def _needed(pool: list[Candidate], policy: Policy) -> list[Candidate]:
    """The candidates whose finiteness decides the choice, in the order to read them."""
    best, window, top, last = _pick(pool, policy)
    if policy.top_k is None and policy.last is None:
        return ([best] if best else []) + window
    return ([best] if best else []) + top + last


def _unique(candidates: list[Candidate]) -> list[Candidate]:
    """The candidates in order, each once (a candidate may be both among the top-k and the last N)."""
    seen: set[int] = set()
    out = []
    for c in candidates:
        if id(c) not in seen:
            seen.add(id(c))
            out.append(c)
    return out


def _keep_back(readable: list[Candidate], metric: str | None) -> None:
    """Mark what --invert must never print: the newest readable checkpoint, and with a metric the unranked ones."""
    newest = max((c.step for c in readable), default=None)
    for c in readable:
        if c.chosen:
            continue
        if c.step == newest:
            c.kept_back = "the newest checkpoint"
        elif metric and c.rank_value(metric) is None:
            c.kept_back = f"no {metric} to rank it by"
