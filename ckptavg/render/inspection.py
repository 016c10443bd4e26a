"""`inspect`'s report and `--diff`'s."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ckptavg.render.common import Rows, stdout_console
from ckptavg.sizes import human_bytes

if TYPE_CHECKING:  # the CLI starts (and --help answers) without importing torch
    pass


def adapter_line(a: dict) -> str:
    """One line (wrapped by the terminal) saying what a PEFT adapter is and holds."""
    targets = a.get("target_modules")
    targets = ", ".join(targets) if isinstance(targets, list) else (targets or "-")
    base = a.get("base_model_name_or_path") or "-"
    if a.get("revision"):
        base += f"@{a['revision']}"
    extras = [k for k in ("rank_pattern", "alpha_pattern") if a.get(k)] + (["lora_bias"] if a.get("lora_bias") else [])
    return (
        f"adapter      {a['kind']} r={a.get('r', '-')} "
        f"lora_alpha={a.get('lora_alpha', '-')}{' ' + ', '.join(extras) if extras else ''}; "
        f"targets {targets}; modules_to_save {', '.join(a.get('modules_to_save') or []) or '-'}; base {base}; "
        f"{a['lora_parameters']:,} LoRA parameters in {a['modules']} modules, {a['full_parameters']:,} in full tensors"
    )


def print_inspect(report) -> None:
    out = stdout_console()
    out.print(
        f"[bold]{escape(report.path)}[/]  {report.format}, {len(report.files)} file(s), "
        f"{human_bytes(sum(f['bytes'] for f in report.files))}"
    )
    out.print(f"tensors      {report.tensors} ({report.parameters:,} parameters, {human_bytes(report.tensor_bytes)})")
    out.print("dtypes       " + ", ".join(f"{k} {human_bytes(v)}" for k, v in report.bytes_by_dtype.items()))
    out.print(
        f"step         {report.step if report.step is not None else '-'}   epoch "
        f"{report.epoch if report.epoch is not None else '-'}"
    )
    if report.adapter:
        out.print(adapter_line(report.adapter), markup=False, soft_wrap=True)
    if report.metrics:
        out.print("metrics      " + ", ".join(f"{k}={v:.5g}" for k, v in report.metrics.items()), markup=False)
    state = ", ".join(f"{k} {human_bytes(v)}" for k, v in report.training_state.items()) or "none (weights only)"
    out.print(f"training     {state}")
    if report.model_type or report.architectures:
        out.print(f"model        {report.model_type or '-'} {' '.join(report.architectures)}  (config.json)", markup=False)
    if report.prefix:
        if report.wrapper_prefix:
            hint = f"  ({report.wrapper_prefix} added by {report.wrapper}: --strip-prefix {report.wrapper_prefix} removes it)"
        elif report.model_type or report.architectures:
            hint = "  (the model's own names, as config.json says: keep it)"
        else:
            hint = ""
        out.print(f"prefix       {report.prefix}{hint}", markup=False)
    if report.weights_key:
        out.print(f"weights      under {report.weights_key!r}", markup=False)
    if report.top_level_keys:
        out.print("keys         " + ", ".join(report.top_level_keys), markup=False)
    if report.opaque_globals:
        out.print(
            "not run      " + ", ".join(report.opaque_globals[:6]) + (" ..." if len(report.opaque_globals) > 6 else ""),
            markup=False,
        )
    for note in report.notes:
        out.print(f"note         {note}", markup=False)
    for item in report.leftovers:
        files = ", ".join(f"{f['path']} ({human_bytes(f['bytes'])})" for f in item.files)
        out.print(f"{'in progress' if item.live else 'leftover':<12} {files}", markup=False)
        out.print(f"             {item.advice}", markup=False)
    if report.tensor_list is not None:
        table = Table(show_edge=False)
        for column in ("name", "dtype", "shape", "bytes"):
            table.add_column(column, justify="right" if column == "bytes" else "left", overflow="fold")
        for t in report.tensor_list:
            table.add_row(t.name, t.dtype, "x".join(map(str, t.shape)) or "scalar", human_bytes(t.bytes))
        out.print(table)
    if report.issues is not None:
        if not report.issues:
            out.print("check        every tensor is finite and none is all zeros")
        for issue in report.issues:
            problems = [
                f"{issue.nan} NaN" if issue.nan else "",
                f"{issue.inf} Inf" if issue.inf else "",
                "all zeros" if issue.all_zero else "",
            ]
            out.print(f"check        {issue.name}: {', '.join(p for p in problems if p)}", markup=False)


def print_diff(report, limit: int = 20, console: Console | None = None) -> None:
    """The tensors that differ most, then label / value lines; a number is never cut at the edge of the line."""
    out = console or stdout_console()
    row = Rows(out)
    table = Table(show_edge=False, title=escape(f"{report.a}  vs  {report.b}"), title_justify="left")
    table.add_column("tensor", overflow="fold")
    for column in ("L2", "relative", "cosine", "max |a-b|"):
        table.add_column(column, justify="right", no_wrap=True)
    for t in sorted(report.tensors, key=lambda t: -t.relative)[:limit]:
        table.add_row(Text(t.name), f"{t.l2:.4g}", f"{t.relative:.4g}", f"{t.cosine:.6f}", f"{t.max_abs:.4g}")
    if report.tensors:
        out.print(table)
    else:
        out.print(Text(f"{report.a}  vs  {report.b}"))
    if len(report.tensors) > limit:
        out.print(f"[dim]{len(report.tensors) - limit} more tensors (--json lists all)[/]")
    for label, names in (("only in A", report.only_in_a), ("only in B", report.only_in_b)):
        if names:
            row(label, f"{len(names)}: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}")
    for item in report.shape_mismatch:
        row("shape", f"{item['name']}: {item['a']} vs {item['b']}")
    if report.integer_tensors:
        names = report.integer_differs
        which = f": {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}" if names else ""
        row("integers", f"{len(names)} of {report.integer_tensors} integer/bool tensors differ{which} (not in the distances)")
    if not report.compared:
        row("summary", f"nothing compared: {report.hint or 'no tensor of the same name and shape in both'}")
        return
    verdict = (
        "identical"
        if report.identical
        else f"relative L2 {report.relative:.4g}, min cosine {report.min_cosine:.6f}, max |a-b| {report.max_abs:.4g}"
    )
    unmatched = [
        f"{len(names)} {label}"
        for names, label in (
            (report.only_in_a, "only in A"),
            (report.only_in_b, "only in B"),
            (report.shape_mismatch, "of another shape"),
        )
        if names
    ]
    also = f"; not compared: {', '.join(unmatched)}" if unmatched else ""
    row("summary", f"{len(report.tensors)} floating tensors compared: {verdict}{also}")
