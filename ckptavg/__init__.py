"""ckptavg: merge the checkpoints of a training run into one better model.

    import ckptavg
    chosen = ckptavg.select(paths, last=4).chosen
    report = ckptavg.average([c.path for c in chosen], "merged", weights="linear")
    print(ckptavg.inspect("merged").parameters, ckptavg.diff("merged", chosen[-1].path).relative)

Each function returns the report its command prints (`to_dict()` is its --json document) and raises a
CkptavgError for a bad input, option or output, worded with the keyword arguments.
"""

from __future__ import annotations

from typing import TYPE_CHECKING as _TYPE_CHECKING

from ckptavg.version import __version__

__all__ = [
    "AverageReport",
    "CkptavgError",
    "DiffReport",
    "InspectReport",
    "Selection",
    "SweepReport",
    "TuneReport",
    "__version__",
    "average",
    "diff",
    "export",
    "inspect",
    "select",
    "sweep",
    "tune",
]

if _TYPE_CHECKING:
    import os
    from collections.abc import Callable, Sequence
    from typing import Any

    from ckptavg.averaging import AverageReport, average
    from ckptavg.errors import CkptavgError
    from ckptavg.exporting import export
    from ckptavg.inspection import DiffReport, InspectReport
    from ckptavg.selection import Selection
    from ckptavg.sweeping import SweepReport, sweep
    from ckptavg.tuning.report import TuneReport
    from ckptavg.tuning.run import tune

# Imported on first use, so that `import ckptavg` (and `ckptavg --help`) loads no torch.
_LAZY = {
    "average": "ckptavg.averaging",
    "export": "ckptavg.exporting",
    "sweep": "ckptavg.sweeping",
    "tune": "ckptavg.tuning.run",
    "TuneReport": "ckptavg.tuning.report",
    "SweepReport": "ckptavg.sweeping",
    "AverageReport": "ckptavg.averaging",
    "Selection": "ckptavg.selection",
    "InspectReport": "ckptavg.inspection",
    "DiffReport": "ckptavg.inspection",
    "CkptavgError": "ckptavg.errors",
}


def select(
    paths: Sequence[str | os.PathLike] | str | os.PathLike,
    *,
    last: int | None = None,
    top_k: int | None = None,
    metric: str | None = None,
    mode: str | None = None,
    every: int | None = None,
    min_step: int | None = None,
    max_step: int | str | None = None,
    after_warmup: float | None = None,
    skip_nonfinite: bool = False,
    skip_spikes: bool = False,
    spike_k: float = 3.0,
    window_steps: int | None = None,
    window_tokens: int | str | None = None,
    min_interval: int | None = None,
    metrics_file: str | os.PathLike | None = None,
    key: str | None = None,
    on_progress: Callable[[Any], None] | None = None,
) -> Selection:
    """Choose the checkpoints to average or keep, as `ckptavg select` does.

    Args:
        paths: checkpoint folders or files (a folder of a run's checkpoint-N/ folders is refused: list them), or hf://ORG/REPO.
        last: the N newest (of those that pass the filters). top_k: the K best by `metric`; with `last`, the union.
        metric: a metric name (trainer_state.json, checkpoint entries, `metrics_file`). mode: "min" or "max"; None:
            what the checkpoints record, else the metric's name.
        every, min_step, max_step, after_warmup: filters by step; max_step may be "best" (up to the best by `metric`).
        skip_nonfinite: drop checkpoints holding NaN or Inf (reads their tensors). skip_spikes, spike_k: drop
            checkpoints whose metric jumps beyond median + k*MAD of its neighbours.
        window_steps: only checkpoints within this many steps of the newest candidate (boundary included).
        window_tokens: the same in tokens seen (an int, or "500M", "20B": K, M, B, T are 10^3 .. 10^12); refused,
            naming them, when candidates do not record their tokens (trainer_state.json's num_input_tokens_seen,
            or a checkpoint's tokens, consumed_tokens, consumed_train_samples x seq_length).
        min_interval: walking back from the newest, keep a checkpoint only when it is at least this many steps
            before the one kept after it. The windows and min_interval are filters, applied before last/top_k.
        metrics_file: CSV, JSON or JSONL of metrics by step or path. key: where the weights are (for skip_nonfinite).
        on_progress: called with a ReadProgress while skip_nonfinite reads tensors.

    Returns:
        The Selection: `chosen` (in step order), `not_chosen`, `inverted` (what --invert prints, e.g. to delete),
        `kept_back`, `ignored` (unreadable, incomplete, no step), `notes`, `to_dict()`. Nothing chosen is not an
        error here: `chosen` is empty, and `metric_hint` says why when it can.
    """
    import os
    from pathlib import Path

    from ckptavg.checkpoint import LoadOptions
    from ckptavg.checks import check_int, check_number, check_path, check_text
    from ckptavg.errors import UsageError, option
    from ckptavg.inspection import first_nonfinite
    from ckptavg.selection import Policy, gather, token_count
    from ckptavg.selection import select as choose

    items = [check_path("paths", p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    for name, value in (
        ("last", last),
        ("top_k", top_k),
        ("every", every),
        ("min_step", min_step),
        ("window_steps", window_steps),
        ("min_interval", min_interval),
    ):
        if value is not None:
            check_int(name, value)
    if isinstance(max_step, str):
        if max_step != "best":
            raise UsageError(None, f"{option('max_step', repr(max_step))}: expected a step or 'best'")
    elif max_step is not None:
        check_int("max_step", max_step)
    if after_warmup is not None:
        check_number("after_warmup", after_warmup)
    check_number("spike_k", spike_k, 0, True)
    check_text("metric", metric)
    check_text("mode", mode)
    check_text("key", key)
    if metrics_file is not None:
        check_path("metrics_file", metrics_file)
    policy = Policy(
        last=last,
        top_k=top_k,
        metric=metric,
        mode=mode,
        every=every,
        min_step=min_step,
        max_step=max_step,
        after_warmup=after_warmup,
        skip_nonfinite=skip_nonfinite,
        skip_spikes=skip_spikes,
        spike_k=spike_k,
        window_steps=window_steps,
        window_tokens=token_count(window_tokens),
        min_interval=min_interval,
    )
    policy.check()
    options = LoadOptions(key=key)
    candidates = gather(items, metrics_file, options)
    return choose(
        candidates,
        policy,
        on_progress=on_progress,
        has_nonfinite=lambda c, on_bytes=None: first_nonfinite(Path(c.path), options, on_bytes),
    )


def inspect(
    path: str | os.PathLike,
    *,
    tensors: bool = False,
    pattern: str | None = None,
    check: bool = False,
    key: str | None = None,
    use_ema: bool = False,
    strip_prefixes: Sequence[str] = (),
    on_progress: Callable[[Any], None] | None = None,
) -> InspectReport:
    """What a checkpoint holds, as `ckptavg inspect` shows it: layout, tensors, dtypes, step, metrics, training state.

    Reads headers and pickle structure only (nothing in a pickle runs); `check` streams every tensor.

    Args:
        path: a checkpoint file or folder, or hf://ORG/REPO@REVISION/FOLDER.
        tensors: list every tensor (`tensor_list`), those whose name matches the regular expression `pattern` if given.
        check: read every tensor and list those with NaN, Inf or only zeros in `issues` (not an error here).
        key, use_ema, strip_prefixes: where the weights are; as for `average`.
        on_progress: called with a ReadProgress while `check` reads.

    Returns:
        The InspectReport (`to_dict()` is `inspect --json`).
    """
    from ckptavg.checkpoint import LoadOptions
    from ckptavg.checks import check_path, check_prefixes, check_text
    from ckptavg.inspection import inspect_checkpoint

    check_path("path", path)
    _check_pattern(pattern)
    check_text("key", key)
    options = LoadOptions(key=key, use_ema=use_ema, strip_prefixes=check_prefixes("strip_prefixes", strip_prefixes))
    return inspect_checkpoint(path, options, tensors=tensors, pattern=pattern, check=check, on_progress=on_progress)


def diff(
    a: str | os.PathLike,
    b: str | os.PathLike,
    *,
    pattern: str | None = None,
    key: str | None = None,
    use_ema: bool = False,
    strip_prefixes: Sequence[str] = (),
    on_progress: Callable[[Any], None] | None = None,
) -> DiffReport:
    """Compare two checkpoints tensor by tensor, as `ckptavg inspect A --diff B`: L2, relative L2, cosine, max |a-b|
    per tensor and overall, computed in float64 while streaming.

    Args:
        a, b: checkpoint files or folders (or hf://...).
        pattern: only tensors whose name matches this regular expression.
        key, use_ema, strip_prefixes: where the weights are, for both; as for `average`.
        on_progress: called with a ReadProgress as tensors are read.

    Returns:
        The DiffReport: `tensors` (per tensor), `relative`, `min_cosine`, `max_abs`, `identical`, `only_in_a`,
        `only_in_b`, `shape_mismatch`; `compared` is 0 when nothing could be compared, and `hint` then says why.
    """
    from ckptavg.checkpoint import LoadOptions
    from ckptavg.checks import check_path, check_prefixes, check_text
    from ckptavg.inspection import diff_checkpoints

    check_path("a", a)
    check_path("b", b)
    _check_pattern(pattern)
    check_text("key", key)
    options = LoadOptions(key=key, use_ema=use_ema, strip_prefixes=check_prefixes("strip_prefixes", strip_prefixes))
    return diff_checkpoints(a, b, options, pattern, on_progress=on_progress)


def _check_pattern(pattern: object) -> None:
    import re

    from ckptavg.checks import check_text
    from ckptavg.errors import UsageError, option

    if check_text("pattern", pattern) is not None:
        try:
            re.compile(pattern)  # type: ignore[arg-type]
        except re.error as e:
            raise UsageError(None, f"{option('pattern', repr(pattern))}: not a regular expression ({e})") from None


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ckptavg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
