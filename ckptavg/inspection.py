"""`inspect`: what a checkpoint holds, a streaming health check of its tensors, and a streaming diff of two."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptavg.checkpoint import EMA_KEYS, LoadOptions, open_checkpoint
from ckptavg.discover import read_trainer_state, trainer_state_metrics
from ckptavg.errors import InputError, UsageError, option
from ckptavg.formats.base import FILES, Checkpoint, TensorSource
from ckptavg.formats.detect import TRAINING_FILES, read_model_config
from ckptavg.formats.dtypes import is_floating
from ckptavg.formats.peft import describe_adapter
from ckptavg.formats.quantized import stored_tensors
from ckptavg.formats.torch_io import as_dict
from ckptavg.formats.unpickle import Opaque, TensorRef
from ckptavg.globbing import expand_one
from ckptavg.output import Leftovers, find_leftovers, leftovers_sentence
from ckptavg.progress import Progress, ProgressFn

if TYPE_CHECKING:
    import torch

CHUNK_BYTES = 32 << 20
TRAINING_STATE = {
    "optimizer": (
        "optimizer",
        "optimizer_state_dict",
        "optimizer_states",
        "optim",
        "opt",
        "optimizer_state",
        "last_optimizer_state",
    ),
    "scheduler": ("scheduler", "lr_scheduler", "lr_schedulers", "scheduler_state_dict", "lr_scheduler_state_dict"),
    "scaler": ("scaler", "grad_scaler", "amp", "scaler_state_dict", "MixedPrecision"),
    "rng": ("rng_state", "rng", "rng_states", "random_state", "cuda_rng_state", "torch_rng_state", "numpy_rng_state"),
    "ema": EMA_KEYS,
}
# Name levels that training wrappers put before a model's own names, whatever the checkpoint.
WRAPPERS = {
    "module": "DDP / DataParallel / DeepSpeed",
    "_orig_mod": "torch.compile",
    "_fsdp_wrapped_module": "FSDP",
    "_checkpoint_wrapped_module": "activation checkpointing",
}
# The attribute a LightningModule commonly holds its model in: a wrapper level only in a Lightning checkpoint.
LIGHTNING_ATTRIBUTES = ("model", "net", "network", "module")
LIGHTNING_KEYS = ("pytorch-lightning_version", "optimizer_states", "lr_schedulers", "loops", "callbacks", "hyper_parameters")


@dataclass(frozen=True)
class ReadProgress(Progress):
    """Progress of a streaming read (`inspect --check`, `--diff`, `select --skip-nonfinite`): bytes read and to
    read, `phase` names the read for the display, `detail` says where it is."""

    phase: str = "checking"
    detail: str = ""


class Reading:
    """Bytes read so far in a streaming read of `tensors_total` tensors, told to `on_progress` after each chunk."""

    def __init__(self, on_progress: ProgressFn | None, phase: str, bytes_total: int, tensors_total: int) -> None:
        self.on_progress, self.phase, self.total, self.tensors_total = on_progress, phase, bytes_total, tensors_total
        self.done = 0
        self.tensors_done = 0
        self.name = ""

    def read(self, name: str, nbytes: int) -> None:
        """`nbytes` more of tensor `name` were read."""
        if name != self.name:
            self.tensors_done += bool(self.name)
            self.name = name
        self.done += nbytes
        if self.on_progress is not None:
            detail = f"tensor {min(self.tensors_done + 1, self.tensors_total)}/{self.tensors_total} {name}"
            self.on_progress(ReadProgress(self.done, self.total, self.tensors_done, self.tensors_total, name, self.phase, detail))


@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: list[int]
    bytes: int


@dataclass
class TensorIssue:
    name: str
    nan: int = 0
    inf: int = 0
    all_zero: bool = False


@dataclass
class InspectReport:
    """What `ckptavg inspect --json` prints; see the README for the schema."""

    path: str
    format: str
    files: list[dict[str, Any]]
    tensors: int
    parameters: int
    tensor_bytes: int
    bytes_by_dtype: dict[str, int]
    step: int | None
    epoch: int | None
    step_source: str | None  # where the step was read: folder name, trainer_state.json, ckptavg.json (exported from step N), ...
    metrics: dict[str, float]
    training_state: dict[str, int]
    prefix: str
    wrapper_prefix: str | None  # the leading part of `prefix` a training wrapper added: what --strip-prefix should remove
    wrapper: str | None  # which wrapper, in words
    model_type: str | None  # from a transformers config.json beside the weights
    architectures: list[str]
    weights_key: str | None
    top_level_keys: list[str]
    opaque_globals: list[str]
    notes: list[str]
    leftovers: list[Leftovers]
    adapter: dict[str, Any] | None = None  # a PEFT adapter: type, r, lora_alpha, targets, base model, parameter counts
    quantization: dict[str, Any] | None = None  # FP8/MXFP4 weights: scheme, where the block size came from, scale tensors
    tensor_list: list[TensorInfo] | None = None
    issues: list[TensorIssue] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def common_prefix(names: Iterable[str]) -> str:
    """The dotted prefix every name shares, e.g. `model.` or `module._orig_mod.`; empty when there is none."""
    names = list(names)
    if not names:
        return ""
    parts = [n.split(".")[:-1] for n in names]
    prefix = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        prefix.append(level[0])
    return "".join(p + "." for p in prefix)


def _tensor_bytes(value: Any, seen: set) -> int:
    """Bytes of every tensor reachable from an unpickled value, each storage counted once."""
    if isinstance(value, TensorRef):
        key = (value.storage.key,)
        if key in seen:
            return 0
        seen.add(key)
        return value.storage.nbytes
    if isinstance(value, dict):
        return sum(_tensor_bytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple, set, frozenset)):
        return sum(_tensor_bytes(v, seen) for v in value)
    if isinstance(value, Opaque):
        return _tensor_bytes(value.as_mapping(), seen) + _tensor_bytes(list(value._opaque_args), seen)
    return 0


def training_state(ckpt: Checkpoint) -> dict[str, int]:
    """Which training state the checkpoint carries besides the weights, and its size in bytes."""
    found: dict[str, int] = {}
    if ckpt.pickle is not None:
        top = as_dict(ckpt.pickle.obj) or {}
        for kind, keys in TRAINING_STATE.items():
            for key in keys:
                if key in top and key != ckpt.weights_key:
                    found[kind] = found.get(kind, 0) + _tensor_bytes(top[key], set())
        callbacks = as_dict(top.get("callbacks")) or {}
        for name, state in callbacks.items():
            if "ema" in str(name).lower():
                found["ema"] = found.get("ema", 0) + _tensor_bytes(state, set())
    optimizer_files = [f for f in ckpt.files if f.name.endswith("optim_states.pt")]  # DeepSpeed: the FP32 masters live there too
    if optimizer_files:
        found["optimizer"] = found.get("optimizer", 0) + sum(f.stat().st_size for f in optimizer_files)
    if ckpt.path.is_dir():
        for kind in ("optimizer", "scheduler", "scaler", "rng"):  # the trainer's own files are not training state to drop
            names = TRAINING_FILES[kind]
            for name in names:
                if (ckpt.path / name).is_file():
                    found[kind] = found.get(kind, 0) + (ckpt.path / name).stat().st_size
        rng = [p for p in ckpt.path.glob("rng_state*.pth") if p.name != "rng_state.pth"]
        if rng:
            found["rng"] = found.get("rng", 0) + sum(p.stat().st_size for p in rng)
    return found


def model_config(ckpt: Checkpoint) -> dict[str, Any] | None:
    """The transformers config.json beside the weights (one with a model_type or architectures), else None."""
    config = read_model_config(ckpt.folder or (ckpt.path if ckpt.path.is_dir() else ckpt.path.parent))
    if config is None:
        return None
    if not (isinstance(config.get("model_type"), str) or isinstance(config.get("architectures"), list)):
        return None
    return config


def is_lightning(ckpt: Checkpoint) -> bool:
    """A Lightning .ckpt: weights under `state_dict` beside Lightning's own entries."""
    keys = set(ckpt.top_level_keys)
    return "pytorch-lightning_version" in keys or (ckpt.weights_key == "state_dict" and bool(keys & set(LIGHTNING_KEYS)))


def wrapper_prefix(prefix: str, lightning: bool, config: dict[str, Any] | None) -> tuple[str | None, str | None]:
    """(the leading levels of `prefix` that training wrappers added, which wrappers) or (None, None).

    Only known wrappers count: `module.` (DDP, DeepSpeed), `_orig_mod.` (torch.compile), ... anywhere, and in a
    Lightning checkpoint the LightningModule's attribute (`model.`, `net.`, ...) first. The weights of a
    transformers folder (a config.json beside them) have the model's own names (`model.` of Llama,
    `transformer.` of GPT-2): never a wrapper's. A Lightning .ckpt says what it is itself, config.json or not.
    """
    if not prefix or (config is not None and not lightning):
        return None, None
    levels = prefix[:-1].split(".")
    taken: list[str] = []
    kinds: list[str] = []
    if lightning and levels[0] in LIGHTNING_ATTRIBUTES:
        taken.append(levels[0])
        kinds.append(f"a LightningModule (self.{levels[0]})")
    for level in levels[len(taken) :]:
        if level not in WRAPPERS:
            break
        taken.append(level)
        if WRAPPERS[level] not in kinds:
            kinds.append(WRAPPERS[level])
    if not taken:
        return None, None
    return "".join(level + "." for level in taken), " + ".join(kinds)


def _open(path: Path, options: LoadOptions) -> Checkpoint:
    """open_checkpoint; an error for a path with ckptavg leftovers beside or inside it names them."""
    try:
        return open_checkpoint(path, options)
    except InputError as e:
        leftovers = find_leftovers(path)
        if leftovers:
            e.problem = f"{e.problem}; {leftovers_sentence(leftovers)}"
        raise


def name_filter(pattern: str | None) -> re.Pattern[str] | None:
    """The regular expression tensor names are filtered by; a bad one is a usage error before any file is read."""
    try:
        return re.compile(pattern) if pattern else None
    except re.error as e:
        raise UsageError(None, f"tensor name filter {pattern!r}: not a valid regular expression ({e})") from e


def inspect_checkpoint(
    path: str | Path,
    options: LoadOptions = LoadOptions(),
    tensors: bool = False,
    pattern: str | None = None,
    check: bool = False,
    on_progress: ProgressFn | None = None,
) -> InspectReport:
    """Describe a checkpoint from its headers; with check=True also stream every tensor for NaN/Inf/all-zero,
    telling `on_progress` (a ReadProgress, phase "checking") the bytes read as it goes."""
    from ckptavg.hub import localize

    regex = name_filter(pattern)
    path = expand_one(path)  # a pattern no shell expanded, if it names one checkpoint
    local = localize([path], extra=("trainer_state.json",))  # an hf:// input: its files in the HF cache
    try:
        ckpt = local.open(local.paths[0], options) if local.sources else _open(Path(path), options)
        path = local.paths[0]
        stored = stored_tensors(ckpt.tensors)  # FP8/MXFP4 weights as their codes and scales, as the files hold them
        by_dtype: dict[str, int] = {}
        for src in stored.values():
            by_dtype[src.dtype_name] = by_dtype.get(src.dtype_name, 0) + src.nbytes
        metrics: dict[str, float] = {}
        state = read_trainer_state(ckpt.path) if ckpt.path.is_dir() else None
        if state is not None:
            metrics.update(trainer_state_metrics(state, ckpt.step))
        if ckpt.pickle is not None:
            from ckptavg.metrics import checkpoint_metrics

            for key, value in checkpoint_metrics(ckpt.pickle)[0].items():
                metrics.setdefault(key, value)
        files = [{"path": str(f), "bytes": f.stat().st_size} for f in ckpt.files]
        config = model_config(ckpt)
        prefix = common_prefix(ckpt.tensors)
        wrapper, wrapper_kind = wrapper_prefix(prefix, is_lightning(ckpt), config)
        config = config or {}
        model_type, architectures = config.get("model_type"), config.get("architectures")
        report = InspectReport(
            path=local.label(ckpt.path),
            format=ckpt.format,
            files=files,
            tensors=len(stored),
            parameters=_parameters(ckpt),
            tensor_bytes=sum(src.nbytes for src in stored.values()),
            bytes_by_dtype=by_dtype,
            step=ckpt.step,
            epoch=ckpt.epoch,
            step_source=ckpt.step_source,
            metrics=metrics,
            training_state=training_state(ckpt),
            prefix=prefix,
            wrapper_prefix=wrapper,
            wrapper=wrapper_kind,
            model_type=model_type if isinstance(model_type, str) else None,
            architectures=[str(a) for a in architectures] if isinstance(architectures, list) else [],
            weights_key=ckpt.weights_key,
            top_level_keys=[str(k) for k in ckpt.top_level_keys],
            opaque_globals=list(ckpt.pickle.opaque_globals) if ckpt.pickle is not None else [],
            notes=list(ckpt.notes) + local.notes(ckpt.path),
            leftovers=find_leftovers(Path(path)),
            adapter=describe_adapter(ckpt.adapter, {n: src.numel for n, src in ckpt.tensors.items()}) if ckpt.adapter else None,
            quantization=ckpt.quantization.to_dict() if ckpt.quantization else None,
        )
        if tensors:
            report.tensor_list = [
                TensorInfo(name, src.dtype_name, list(src.shape), src.nbytes)
                for name, src in stored.items()
                if regex is None or regex.search(name)
            ]
        if check:
            report.issues = check_tensors(ckpt, on_read=Reading(on_progress, "checking", ckpt.nbytes, len(ckpt.tensors)).read)
        return report
    finally:
        FILES.close()


def _parameters(ckpt: Checkpoint) -> int:
    seen, total = set(), 0
    for src in ckpt.tensors.values():
        key = src.alias_key
        if key is not None and key in seen:
            continue
        seen.add(key)
        total += src.numel
    return total


def for_each_chunk(src: TensorSource, fn: Callable[[int, torch.Tensor], None], chunk_bytes: int = CHUNK_BYTES) -> None:
    """Call fn(first element, flat chunk) over the tensor, mapped from the file a chunk at a time."""
    itemsize = src.itemsize
    step = max(itemsize, chunk_bytes - chunk_bytes % itemsize)
    for start in range(0, src.nbytes, step):
        view, mapping = src.view_range(start, min(step, src.nbytes - start))
        try:
            fn(start // itemsize, view.view(src.dtype))
        finally:
            del view
            if mapping is not None:
                mapping.close()
    src.release()


def check_tensors(
    ckpt: Checkpoint, stop_at_first: bool = False, on_read: Callable[[str, int], None] | None = None
) -> list[TensorIssue]:
    """NaN, Inf and all-zero tensors, streamed chunk by chunk; `on_read(name, bytes)` after each chunk."""
    import torch

    issues = []
    for name, src in ckpt.tensors.items():
        issue = TensorIssue(name)
        nonzero = False

        def visit(first: int, chunk: torch.Tensor) -> None:
            nonlocal nonzero
            floating = chunk.dtype.is_floating_point
            values = chunk.float() if chunk.dtype.itemsize == 1 and floating else chunk
            if floating:
                issue.nan += int(torch.isnan(values).sum())
                issue.inf += int(torch.isinf(values).sum())
            nonzero = nonzero or bool((values != 0).any())
            if on_read is not None:
                on_read(name, chunk.numel() * chunk.element_size())

        for_each_chunk(src, visit)
        issue.all_zero = src.numel > 0 and not nonzero
        if issue.nan or issue.inf or issue.all_zero:
            issues.append(issue)
            if stop_at_first and (issue.nan or issue.inf):
                break
    return issues


def first_nonfinite(
    path: Path, options: LoadOptions = LoadOptions(), on_bytes: Callable[[int], None] | None = None
) -> str | None:
    """The first tensor of a checkpoint holding NaN or Inf, described in a few words; None when all finite.
    `on_bytes(n)` is told each chunk read (the read stops at the first tensor with NaN or Inf)."""
    from ckptavg.hub import local_path

    try:
        ckpt = open_checkpoint(local_path(path), options)
        for issue in check_tensors(ckpt, stop_at_first=True, on_read=(lambda _name, n: on_bytes(n)) if on_bytes else None):
            if issue.nan or issue.inf:
                return f"{issue.name} has {issue.nan} NaN and {issue.inf} Inf"
        return None
    finally:
        FILES.close()


@dataclass
class TensorDiff:
    name: str
    l2: float
    relative: float
    cosine: float
    max_abs: float


@dataclass
class DiffReport:
    """Distances cover floating tensors only: integer and bool buffers (step counters, masks) are compared for
    equality and listed in `integer_differs`, never summed with the weights. `compared` counts the tensors of
    the same name and shape in both (floating and integer); when it is 0 nothing was compared, and `hint` says
    why when it can (names behind a wrapper's prefix on one side: the --strip-prefix to pass)."""

    a: str
    b: str
    tensors: list[TensorDiff]
    only_in_a: list[str]
    only_in_b: list[str]
    shape_mismatch: list[dict[str, Any]]
    integer_tensors: int = 0
    integer_differs: list[str] = field(default_factory=list)
    l2: float = 0.0
    relative: float = 0.0
    min_cosine: float = 1.0
    max_abs: float = 0.0
    identical: bool = False
    compared: int = 0
    hint: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def diff_checkpoints(
    a: str | Path,
    b: str | Path,
    options: LoadOptions = LoadOptions(),
    pattern: str | None = None,
    on_progress: ProgressFn | None = None,
) -> DiffReport:
    """Per-tensor distance between two checkpoints, streamed; figures are computed in float64. `on_progress` is
    told the bytes read (a ReadProgress, phase "comparing") as it goes."""
    from ckptavg.hub import localize

    regex = name_filter(pattern)
    a, b = expand_one(a), expand_one(b)
    local = localize([a, b])
    try:
        left, right = (local.open(p, options) if str(p) in local.sources else _open(p, options) for p in local.paths)
        names = [n for n in left.tensors if regex is None or regex.search(n)]
        report = DiffReport(
            a=local.label(left.path) if str(left.path) in local.sources else str(a),
            b=local.label(right.path) if str(right.path) in local.sources else str(b),
            tensors=[],
            only_in_a=[n for n in names if n not in right.tensors],
            only_in_b=[n for n in right.tensors if n not in left.tensors and (regex is None or regex.search(n))],
            shape_mismatch=[],
        )
        pairs = [(n, left.tensors[n], right.tensors[n]) for n in names if n in right.tensors]
        same_shape = [(n, sa, sb) for n, sa, sb in pairs if sa.shape == sb.shape]
        reading = Reading(on_progress, "comparing", sum(sa.nbytes + sb.nbytes for _, sa, sb in same_shape), len(same_shape))
        total_aa = total_dd = 0.0
        for name, sa, sb in pairs:
            if sa.shape != sb.shape:
                report.shape_mismatch.append({"name": name, "a": list(sa.shape), "b": list(sb.shape)})
                continue
            report.compared += 1
            on_bytes = functools.partial(reading.read, name)
            if not (is_floating(sa.dtype_name) and is_floating(sb.dtype_name)):
                report.integer_tensors += 1
                if _differs(sa, sb, on_bytes):
                    report.integer_differs.append(name)
                continue
            sums = _diff_sums(sa, sb, on_bytes)
            aa, bb, ab, dd, max_abs = sums
            total_aa += aa
            total_dd += dd
            cosine = ab / math.sqrt(aa * bb) if aa > 0 and bb > 0 else (1.0 if aa == bb == 0 else 0.0)
            report.tensors.append(
                TensorDiff(name, math.sqrt(dd), math.sqrt(dd / aa) if aa > 0 else (0.0 if dd == 0 else math.inf), cosine, max_abs)
            )
        report.l2 = math.sqrt(total_dd)
        report.relative = math.sqrt(total_dd / total_aa) if total_aa > 0 else 0.0
        report.min_cosine = min((t.cosine for t in report.tensors), default=1.0)
        report.max_abs = max((t.max_abs for t in report.tensors), default=0.0)
        differences = report.only_in_a or report.only_in_b or report.shape_mismatch or report.integer_differs
        report.identical = total_dd == 0 and not differences and report.compared > 0
        if not report.compared:
            report.hint = _nothing_compared(left, right, names, pattern)
        return report
    finally:
        FILES.close()


def _nothing_compared(left: Checkpoint, right: Checkpoint, names: list[str], pattern: str | None) -> str:
    """Why no tensor was compared, with the advice `average` gives for names behind a prefix."""
    from ckptavg.merge.plan import prefix_hint

    if pattern and not names:
        return f"no tensor name of A matches {option('pattern', repr(pattern))}"
    if not any(n in right.tensors for n in names):
        advice = prefix_hint(left, right) or prefix_hint(right, left)
        if advice:
            return "no tensor name in common" + advice
        first_a, first_b = next(iter(left.tensors), "-"), next(iter(right.tensors), "-")
        return (
            f"no tensor name in common (A has {first_a}, ..., B has {first_b}, ...); "
            f"{option('strip_prefixes', 'PREFIX')} removes a prefix from both"
        )
    return "every tensor in common has a different shape"


def diff_problems(
    report: DiffReport, fail_if_different: bool = False, max_rel_l2: float | None = None, min_cosine: float | None = None
) -> list[str]:
    """Why a diff fails the checks asked for (empty: it passes), one phrase each, for CI.

    Nothing compared always fails. With any check, the two must hold the same tensors with the same shapes
    (what --filter keeps). `fail_if_different`: also any value that differs, floating or integer.
    `max_rel_l2`: the relative L2 over all floating tensors (the summary's figure) must not exceed it.
    `min_cosine`: every floating tensor's cosine must reach it. NaN in a figure fails every check.
    """
    if not report.compared:
        return [f"nothing compared: {report.hint or 'no tensor of the same name and shape in both'}"]
    if not (fail_if_different or max_rel_l2 is not None or min_cosine is not None):
        return []
    problems = []
    for label, names in (("only in A", report.only_in_a), ("only in B", report.only_in_b)):
        if names:
            problems.append(f"{len(names)} tensor(s) {label} ({_first(names)})")
    if report.shape_mismatch:
        item = report.shape_mismatch[0]
        problems.append(f"{len(report.shape_mismatch)} shape mismatch(es) ({item['name']}: {item['a']} vs {item['b']})")
    if fail_if_different:
        differ = [t.name for t in report.tensors if not t.l2 == 0]
        if differ:
            problems.append(f"{len(differ)} floating tensor(s) differ ({_first(differ)}; relative L2 {report.relative:.4g})")
        if report.integer_differs:
            problems.append(f"{len(report.integer_differs)} integer/bool tensor(s) differ ({_first(report.integer_differs)})")
    if max_rel_l2 is not None and not report.relative <= max_rel_l2:
        problems.append(f"relative L2 {report.relative:.4g} above {option('max_rel_l2', f'{max_rel_l2:g}')}")
    if min_cosine is not None:
        below = sorted(
            (t for t in report.tensors if not t.cosine >= min_cosine), key=lambda t: (not math.isnan(t.cosine), t.cosine)
        )
        if below:
            problems.append(
                f"{len(below)} tensor(s) below {option('min_cosine', f'{min_cosine:g}')} ({below[0].name}: {below[0].cosine:.6f})"
            )
    return problems


def _first(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def _diff_sums(
    sa: TensorSource, sb: TensorSource, on_bytes: Callable[[int], None] | None = None
) -> tuple[float, float, float, float, float]:
    """(sum a^2, sum b^2, sum ab, sum (a-b)^2, max |a-b|) in float64, reading both tensors chunk by chunk;
    `on_bytes(n)` after each chunk of both."""
    import torch

    itemsize = max(sa.itemsize, sb.itemsize)
    per_chunk = max(1, (8 << 20) // itemsize)
    totals = [0.0, 0.0, 0.0, 0.0, 0.0]
    for first in range(0, sa.numel, per_chunk):
        count = min(per_chunk, sa.numel - first)
        parts = []
        mappings = []
        for src in (sa, sb):
            view, mapping = src.view_range(first * src.dtype.itemsize, count * src.dtype.itemsize)
            parts.append(view.view(src.dtype).double())
            del view
            if mapping is not None:
                mappings.append(mapping)
        x, y = parts
        d = x - y
        totals[0] += float(torch.dot(x, x))
        totals[1] += float(torch.dot(y, y))
        totals[2] += float(torch.dot(x, y))
        totals[3] += float(torch.dot(d, d))
        totals[4] = max(totals[4], float(d.abs().max()) if count else 0.0)
        del parts, x, y, d
        for mapping in mappings:
            mapping.close()
        if on_bytes is not None:
            on_bytes(count * (sa.dtype.itemsize + sb.dtype.itemsize))
    sa.release()
    sb.release()
    return tuple(totals)  # type: ignore[return-value]


def _differs(sa: TensorSource, sb: TensorSource, on_bytes: Callable[[int], None] | None = None) -> bool:
    """Whether two tensors of the same shape hold different values, read chunk by chunk; stops at the first
    difference (`on_bytes` is then told the rest, as if read, so that a progress bar ends full)."""
    import torch

    itemsize = max(sa.itemsize, sb.itemsize)
    per_chunk = max(1, (8 << 20) // itemsize)
    exact = sa.dtype == sb.dtype
    differs = False
    for first in range(0, sa.numel, per_chunk):
        count = min(per_chunk, sa.numel - first)
        parts, mappings = [], []
        for src in (sa, sb):
            view, mapping = src.view_range(first * src.dtype.itemsize, count * src.dtype.itemsize)
            values = view.view(src.dtype)
            parts.append(values.clone() if exact else values.double())
            del view, values
            if mapping is not None:
                mappings.append(mapping)
        x, y = parts
        differs = not torch.equal(x, y)
        del parts, x, y
        for mapping in mappings:
            mapping.close()
        if on_bytes is not None:
            on_bytes((sa.numel - first if differs else count) * (sa.dtype.itemsize + sb.dtype.itemsize))
        if differs:
            break
    sa.release()
    sb.release()
    return differs
