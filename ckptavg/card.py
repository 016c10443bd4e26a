"""The model card (README.md) of an output folder, made from the same recipe as ckptavg.json.

Its YAML follows the Hub's conventions: `base_model` (the source repo when the inputs come from the Hub; a
list when from several), `base_model_relation: merge`, `tags: [ckptavg, merge]` and `library_name`
(transformers for a config.json with architectures, peft for an adapter). The YAML cannot hold revisions, so the
body lists each input (path, or repo@commit), its step and weight, then the strategy, the dtypes, the command
and the ckptavg version. Built with huggingface_hub's ModelCard and ModelCardData, without a template (no jinja2).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

from ckptavg.formats.detect import read_model_config
from ckptavg.formats.writer import write_text

CARD_FILE = "README.md"
TAGS = ["ckptavg", "merge"]


def write_card(folder: Path, recipe: dict[str, Any], name: str | None = None, verified: bool = False) -> str:
    """Write README.md into the output `folder` (staged: `name` is the output's own); returns its name.
    `verified`: the output is read back before it is renamed into place (--verify), which the card says: if that
    fails, nothing is written."""
    card = model_card({**recipe, "verified": recipe.get("verified") or verified}, folder, name)
    write_text(folder / CARD_FILE, str(card))
    return CARD_FILE


def model_card(recipe: dict[str, Any], folder: Path | None = None, name: str | None = None) -> Any:
    """The huggingface_hub ModelCard of an output, from its recipe and the files in `folder`."""
    from huggingface_hub import ModelCard, ModelCardData

    repos = list(dict.fromkeys(i["hub"]["repo"] for i in recipe.get("inputs", []) if i.get("hub")))
    export = recipe.get("strategy") == "export"  # one checkpoint's weights: not a merge
    data: dict[str, Any] = {"tags": ["ckptavg"] if export else list(TAGS)}
    if repos:
        data["base_model"] = repos[0] if len(repos) == 1 else repos
        if not export:
            data["base_model_relation"] = "merge"
    library = library_name(folder) if folder is not None else None
    if library:
        data["library_name"] = library
    card_data = ModelCardData(**data)
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{card_body(recipe, name or (folder.name if folder else None))}")


def library_name(folder: Path) -> str | None:
    """peft for an adapter; transformers for a config.json that names its architectures."""
    if (folder / "adapter_config.json").is_file():
        return "peft"
    return "transformers" if (read_model_config(folder) or {}).get("architectures") else None


def card_body(recipe: dict[str, Any], name: str | None = None) -> str:
    inputs = recipe.get("inputs", [])
    export = recipe.get("strategy") == "export"
    lines = [f"# {name or 'model'}", ""]
    if export:
        lines.append(
            f"The weights of one training checkpoint, exported for inference with ckptavg {recipe.get('version')}: "
            "no optimizer, scheduler or trainer state."
        )
    else:
        lines.append(
            f"An average of {len(inputs)} checkpoints of a training run, made with ckptavg {recipe.get('version')} "
            f"(strategy: {recipe.get('strategy')})."
        )
    lines += ["", "## Inputs", "", "| # | Checkpoint | Revision asked | Step | Weight |", "|---|---|---|---|---|"]
    for n, item in enumerate(inputs, 1):
        hub = item.get("hub") or {}
        where = (
            f"{hub['repo']}@{hub['commit']}" + (f"/{hub['subfolder']}" if hub.get("subfolder") else "")
            if hub
            else item.get("path")
        )
        asked = (hub.get("revision") or "main") if hub else ""
        step = item.get("step") if item.get("step") is not None else ""
        lines.append(f"| {n} | `{_cell(where)}` | {_cell(asked)} | {step} | {item.get('weight', 0):.6g} |")
    lines += ["", "## How it was made", ""]
    if not export:
        order = "in the order given" if recipe.get("order") == "given" else f"ordered by {recipe.get('order')}"
        lines.append(f"- Strategy: {recipe.get('strategy')} (inputs {order})")
    lines.append(
        f"- Input dtypes: {_counts(recipe.get('input_dtypes'))}; output dtypes: {_counts(recipe.get('output_dtypes'))}"
        + (f"; accumulated in {_counts(recipe.get('accumulate'))}" if recipe.get("accumulate") and not export else "")
    )
    if recipe.get("copied_from_newest") and not export:
        lines.append(f"- Copied from the newest input, not averaged: {', '.join(recipe['copied_from_newest'][:5])}")
    if recipe.get("verified"):
        lines.append(
            "- Verified: every tensor was read back from the disk and matched what was written (sha256 of each file in "
            "ckptavg.json)"
        )
    lines.append(f"- ckptavg {recipe.get('version')}, {recipe.get('created')}")
    if recipe.get("tune"):
        lines += tune_section(recipe["tune"])
    lines += [
        "",
        "Command:",
        "",
        "```bash",
        command_line(recipe),
        "```",
        "",
        "`ckptavg.json` beside this card holds the full recipe.",
        "",
    ]
    return "\n".join(lines)


def tune_section(tune: dict[str, Any]) -> list[str]:
    """The table of `ckptavg tune` that chose these weights: every candidate, its score and delta to the baseline."""
    evaluation = tune.get("evaluation") or {}
    how = (
        f"`{evaluation['command']}`"
        if "command" in evaluation
        else f"perplexity on `{evaluation.get('text')}` ({evaluation.get('tokens')} tokens at most)"
    )
    better = "lower is better" if tune.get("mode") == "min" else "higher is better"
    lines = [
        "",
        "## Chosen by evaluation",
        "",
        f"`ckptavg tune` scored each candidate with {how}: {tune.get('metric')}, {better}. The baseline is "
        f"{tune.get('baseline')}; the winner, marked, is this model.",
        "",
        f"| | Candidate | Recipe | {tune.get('metric')} | vs baseline | Note |",
        "|---|---|---|---|---|---|",
    ]
    for c in tune.get("candidates", []):
        score = "" if c.get("score") is None else f"{c['score']:.6g}"
        delta = "baseline" if c.get("baseline") else "" if c.get("delta") is None else f"{c['delta']:+.4g}"
        note = f"failed: {c['failure']}" if c.get("failure") else "; ".join(c.get("held_back") or [])
        mark = "**winner**" if c.get("winner") else ""
        lines.append(f"| {mark} | {_cell(c.get('name'))} | {_cell(c.get('recipe'))} | {score} | {delta} | {_cell(note)} |")
    soup = tune.get("soup") or {}
    if soup.get("order"):
        kept = set(soup.get("kept", []))
        tried = ", ".join(f"{s}{'' if s in kept else ' (left out)'}" for s in soup["order"])
        lines += ["", f"Greedy soup, inputs tried best first: {tried}."]
    if tune.get("guards"):
        lines += ["", f"Guards: {', '.join(tune['guards'])}."]
    return lines


def command_line(recipe: dict[str, Any]) -> str:
    """The command line when run as `ckptavg` (or `python -m ckptavg`), else the Python call that made it."""
    argv = list(sys.argv)
    program = Path(argv[0]) if argv else Path()
    if program.name == "ckptavg" or (program.name == "__main__.py" and program.parent.name == "ckptavg"):
        return shlex.join(["ckptavg", *argv[1:]])
    paths = [i.get("path") for i in recipe.get("inputs", [])]
    function = "export" if recipe.get("strategy") == "export" else "tune" if recipe.get("tune") else "average"
    first = repr(paths[0]) if function == "export" and paths else repr(paths)
    return f"# from Python (the options are in ckptavg.json)\nckptavg.{function}({first}, ...)"


def _counts(counts: dict[str, int] | None) -> str:
    return ", ".join(f"{k} ({v})" for k, v in (counts or {}).items()) or "none"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|")
