"""`tune`: the merge chosen by evaluation, the library function behind `ckptavg tune`.

Check → plan the candidates (a dry run of the sweep: headers only) → write those not yet scored with the one-read
sweep into a staging folder beside OUT → evaluate them one at a time, each removed once scored (unless kept) →
the greedy soup, if asked → the winner (the best score among the candidates no guard holds back) written to OUT
as `average` writes it, its ckptavg.json and card holding the whole table.
"""

from __future__ import annotations

import importlib
import itertools
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ckptavg.distributed import World
from ckptavg.errors import InputError, OutputError, UsageError, option
from ckptavg.recipes import Candidate
from ckptavg.signals import steps_of_a_longer_run
from ckptavg.tuning.evaluation import Evaluation
from ckptavg.tuning.guards import Guard, broken_guards
from ckptavg.tuning.report import CandidateResult, TuneReport
from ckptavg.tuning.soup import Soup, better_or_equal, greedy_soup
from ckptavg.tuning.state import TuneState, evaluation_key, input_identity, state_path

SOUP = "greedy-soup"
CandidateFn = Callable[[list], list[Candidate]]


@dataclass(frozen=True)
class Scoring:
    """How candidates are scored: the evaluator (a folder → Evaluation), what identifies it in the state file,
    the metric optimised and its direction, the guards."""

    evaluate: Callable[[Path], Evaluation]
    identity: dict
    metric: str
    mode: str
    guards: tuple[Guard, ...] = ()
    prepare: Callable[[], None] | None = None  # before the first evaluation, so that it is not counted in its time


class Tuner:
    """One tune run over checked inputs and options: candidates written, scored, the soup, the winner."""

    def __init__(
        self,
        paths: list,
        out: Path | None,
        options,  # AverageOptions, checked
        scoring: Scoring,
        choose: CandidateFn,
        soup: bool,
        keep: Path | None,
        on_candidate: Callable[[CandidateResult], None] | None,
        on_progress: Callable | None,
    ) -> None:
        self.paths, self.out, self.options, self.scoring = paths, out, options, scoring
        self.choose, self.soup_asked, self.keep = choose, soup, keep
        self.on_candidate, self.on_progress = on_candidate, on_progress
        self.staging: Path | None = None
        self.written = 0
        self.bytes_read = 0
        self.retained: tuple[str, Path] | None = None  # the best eligible candidate's folder, kept for OUT
        self.world: World | None = None  # under torchrun: rank 0 evaluates, every rank writes the candidates

    # -- planning ---------------------------------------------------------------------------------------

    def plan(self) -> tuple[TuneReport, list[Candidate], list[Candidate]]:
        """The table's candidates and the inputs alone (for the soup), from a dry run of the sweep."""
        from ckptavg.sweeping import sweep_candidates

        made: dict[str, list[Candidate]] = {}

        def choose(steps: list) -> list[Candidate]:
            table = self.choose(steps)
            alone = _alone_candidates(steps, {c.name for c in table}) if self.soup_asked else []
            made["table"], made["alone"] = table, alone
            return table + alone

        # With OUT: it is refused here, before any work, when it is an input, inside one, or exists (without
        # overwrite, or not written by ckptavg).
        planned = sweep_candidates(self.paths, self.out, choose, replace(self.options, dry_run=True))
        self.bytes_read += planned.bytes_read
        table, alone = made["table"], made["alone"]
        summaries = {s.name: s for s in planned.candidates}
        rows = [
            CandidateResult(s.name, s.recipe, s.inputs, s.steps, s.weights, baseline=s.name == table[0].name)
            for s in (summaries[c.name] for c in table)
        ]
        report = TuneReport(
            inputs=[{"path": i.path, "step": i.step, "epoch": i.epoch, "format": i.format} for i in planned.inputs],
            order=planned.order,
            metric=self.scoring.metric,
            mode=self.scoring.mode,
            evaluation=self.scoring.identity,
            candidates=rows,
            baseline=table[0].name,
            guards=[g.text for g in self.scoring.guards],
            notes=list(planned.notes),
            warnings=list(planned.warnings),
        )
        self.identities = [input_identity(Path(i["path"])) for i in report.inputs]
        if self.soup_asked:
            report.soup = {"inputs": len(report.inputs), "planned": [c.name for c in alone] + [table[0].name]}
        return report, table, alone

    def key(self, candidate: Candidate) -> str:
        options = self.options
        recipe = {
            "inputs": list(candidate.inputs),
            "weights": candidate.weights.normalized,
            "output": [
                options.dtype,
                options.accum,
                options.key,
                options.use_ema,
                list(options.strip_prefixes),
                options.out_format,
            ],
        }
        return evaluation_key(recipe, self.identities, self.scoring.identity)

    # -- writing and scoring ------------------------------------------------------------------------------

    def write(self, chosen: list[Candidate], on_progress: Callable | None = None) -> dict[str, Path]:
        """Write candidates with the one-read sweep into the staging folder; their folders by name. Progress is
        shown for the first write, of every candidate; the soup's steps and the winner's rewrite are one each."""
        assert self.staging is not None
        self.written += 1
        folder = self.staging / f"write-{self.written}"
        if self.world is not None:  # the other ranks write their share of the same candidates (follow_orders)
            self.world.post(f"order/{self.written}", {"write": [[c.name, list(c.inputs)] for c in chosen], "folder": str(folder)})
        return self._sweep(chosen, folder, on_progress)

    def _sweep(self, chosen: list[Candidate], folder: Path, on_progress: Callable | None = None) -> dict[str, Path]:
        from ckptavg.sweeping import sweep_candidates

        with steps_of_a_longer_run():  # the run succeeds when the winner is in OUT, not when a candidate is written
            report = sweep_candidates(
                self.paths,
                folder,
                lambda steps: list(chosen),
                replace(self.options, dry_run=False, overwrite=False),
                on_progress,
            )
        self.bytes_read += report.bytes_read
        return {c.name: Path(c.output) for c in report.candidates if c.output}

    def score(self, candidate: Candidate, folder: Path | None, state: TuneState) -> tuple[Evaluation, bool]:
        """The candidate's evaluation, from the state when an earlier run measured it (then True)."""
        key = self.key(candidate)
        kept = state.get(key)
        if kept is not None:
            return kept, True
        assert folder is not None
        evaluation = self.scoring.evaluate(folder)
        state.put(key, evaluation, candidate.name)
        return evaluation, False

    def fill(self, row: CandidateResult, evaluation: Evaluation, reused: bool, baseline: CandidateResult | None) -> None:
        row.metrics, row.score, row.seconds, row.failure, row.reused = (
            evaluation.metrics,
            evaluation.score,
            evaluation.seconds,
            evaluation.failure,
            reused,
        )
        if row.failure is None and baseline is not None and baseline.score is not None:
            row.delta = row.score - baseline.score  # type: ignore[operator]
        if row.failure is None and self.scoring.guards:
            base_metrics = baseline.metrics if baseline is not None and baseline.failure is None else None
            row.held_back = broken_guards(list(self.scoring.guards), row.metrics, base_metrics, self.scoring.mode)

    def done_with(self, name: str, folder: Path | None, row: CandidateResult | None, best: CandidateResult | None) -> None:
        """After scoring: move the folder to --keep-candidates, keep it as the best so far, or remove it."""
        if folder is None or not folder.exists():
            return
        if self.keep is not None:
            target = self.keep / name
            os.rename(folder, target)
            if row is not None and best is row:
                self.retained = (name, target)
            return
        if row is not None and best is row:
            if self.retained is not None and self.retained[1] != folder:
                shutil.rmtree(self.retained[1], ignore_errors=True)
            self.retained = (name, folder)
            return
        shutil.rmtree(folder, ignore_errors=True)

    def follow_orders(self, known: list[Candidate]) -> None:
        """A rank other than 0 under torchrun: write its share of each set of candidates rank 0 writes, in the
        same order, until rank 0 says the run is over (or fails, which fails this rank too)."""
        from ckptavg.tuning.candidates import mean_of

        assert self.world is not None
        by_name = {c.name: c for c in known}
        for n in itertools.count(1):
            self.world.wait([f"order/{n}"], watch=[0])
            order = self.world.read(f"order/{n}")
            if "write" not in order:
                return
            chosen = []
            for name, inputs in order["write"]:
                candidate = by_name.get(name) or mean_of(inputs, name)  # the soup's means are made as rank 0 makes them
                if list(candidate.inputs) != inputs:
                    raise UsageError(None, f"rank {self.world.rank} planned {name} over other inputs than rank 0")
                chosen.append(candidate)
            self._sweep(chosen, Path(order["folder"]))


def _alone_candidates(steps: list, taken: set[str]) -> list[Candidate]:
    """Each input but the newest alone (the newest alone is the baseline), named by its step when every step is
    known and distinct, else by its place."""
    from ckptavg.tuning.candidates import alone

    by_step = all(s is not None for s in steps) and len(set(steps)) == len(steps)
    names = [f"step-{s}" if by_step else f"input-{k + 1}" for k, s in enumerate(steps)]
    return [alone(k, names[k]) for k in range(len(steps) - 1) if names[k] not in taken]


def best_of(rows: Sequence[CandidateResult], mode: str) -> CandidateResult | None:
    """The eligible row with the best score; the first of equals (the baseline before any other)."""
    best = None
    for row in rows:
        if row.eligible and (best is None or not better_or_equal(best.score, row.score, mode)):  # type: ignore[arg-type]
            best = row
    return best


def run_tune(tuner: Tuner, plot: Path | None) -> TuneReport:
    """The whole run (see the module's docstring). Under torchrun every rank plans and writes the candidates
    (each its share, as `sweep` does), and rank 0 alone evaluates them, keeps the state and writes OUT; the
    other ranks follow its orders."""
    from ckptavg.distributed import job, join

    world = None if tuner.options.dry_run or tuner.out is None else join(tuner.options.rank_timeout)
    if world is not None:
        world.agreed = True  # each step agrees on its own plans; a failure now is posted for all to see
    tuner.world = world
    with job.failures_shared(world):
        report = _run_tune(tuner, plot)
        if world is not None and world.leader:
            world.post(f"order/{tuner.written + 1}", {"end": True})
        return report


def _run_tune(tuner: Tuner, plot: Path | None) -> TuneReport:
    from ckptavg.output import output_lock, remove_leftovers, tmp_name

    started = time.perf_counter()
    report, table, alone = tuner.plan()
    if tuner.options.dry_run or tuner.out is None:
        report.dry_run = True
        report.seconds = time.perf_counter() - started
        return report
    if tuner.world is not None:
        report.world_size = tuner.world.size
        if not tuner.world.leader:
            tuner.follow_orders(table + alone)
            return report
    out = tuner.out
    state = TuneState(state_path(out))
    if tuner.keep is not None:
        _make_keep_folder(tuner.keep, [c.name for c in table + alone])
        report.kept_candidates = str(tuner.keep)
    virtual = out.parent / f"{out.name}.tune"  # its lock and staging folder: .OUT.tune.ckptavg-lock / -partial
    with output_lock(virtual):
        removed = remove_leftovers(virtual)
        if removed:
            report.notes.append(f"removed what an interrupted tune left: {', '.join(removed)}")
        tuner.staging = tmp_name(virtual)
        tuner.staging.mkdir()
        try:
            _evaluate_all(tuner, report, table, alone, state)
            winner = _winner(report)
            if plot is not None:
                from ckptavg.tuning.plotting import plot_scores

                plot_scores(report, plot)
                report.plot = str(plot)
            _publish(tuner, report, winner, [*table, *_soup_candidates(report)], tuner.options.overwrite)
        finally:
            shutil.rmtree(tuner.staging, ignore_errors=True)
    state.remove()
    report.reused = sum(1 for c in report.candidates if c.reused)
    report.bytes_read = tuner.bytes_read
    report.seconds = time.perf_counter() - started
    return report


def _make_keep_folder(keep: Path, names: list[str]) -> None:
    keep.mkdir(parents=True, exist_ok=True)
    clash = [n for n in names if (keep / n).exists()]
    if clash:
        raise OutputError(keep / clash[0], f"already exists; {option('keep_candidates', keep)} needs a folder without it")


def _evaluate_all(tuner: Tuner, report: TuneReport, table: list[Candidate], alone: list[Candidate], state: TuneState) -> None:
    rows = {r.name: r for r in report.candidates}
    wanted = table + alone
    if state.found:
        report.notes.append(f"found the scores of an interrupted run ({state.path.name}): each one measured is reused")
    missing = [c for c in wanted if tuner.keep is not None or state.scores.get(tuner.key(c)) is None]
    folders = tuner.write(missing, tuner.on_progress) if missing else {}
    if missing and tuner.scoring.prepare is not None:
        tuner.scoring.prepare()
    baseline = rows[report.baseline]
    alone_scores: dict[int, Evaluation] = {}
    best: CandidateResult | None = None
    for candidate in wanted:
        folder = folders.get(candidate.name)
        evaluation, reused = tuner.score(candidate, folder, state)
        report.evaluated += 0 if reused else 1
        row = rows.get(candidate.name)
        if row is not None:
            tuner.fill(row, evaluation, reused, baseline)
            best = best_of(report.candidates, report.mode)
            if tuner.on_candidate:
                tuner.on_candidate(row)
        if len(candidate.inputs) == 1 and (row is None or row.baseline):
            alone_scores[candidate.inputs[0]] = evaluation
        tuner.done_with(candidate.name, folder, row, best)
    if tuner.soup_asked:
        _soup(tuner, report, alone_scores, state)


def _soup(tuner: Tuner, report: TuneReport, alone_scores: dict[int, Evaluation], state: TuneState) -> None:
    from ckptavg.tuning.candidates import mean_of

    names = [str(k) for k in sorted(alone_scores)]
    means: dict[tuple[int, ...], tuple[Candidate, Evaluation]] = {}

    def score_mean(chosen: list[str]) -> float | None:
        indices = [int(n) for n in chosen]
        candidate = mean_of(indices, f"soup-{len(means) + 1}")
        folder = None
        if tuner.keep is not None or state.scores.get(tuner.key(candidate)) is None:
            folder = tuner.write([candidate])[candidate.name]
        evaluation, reused = tuner.score(candidate, folder, state)
        report.evaluated += 0 if reused else 1
        means[candidate.inputs] = (candidate, evaluation)
        tuner.done_with(candidate.name, folder, None, None)
        return evaluation.score if evaluation.ok else None

    def score_alone(name: str) -> float | None:
        evaluation = alone_scores[int(name)]
        return evaluation.score if evaluation.ok else None

    soup: Soup = greedy_soup(names, score_alone, score_mean, report.mode)
    inputs = report.inputs
    label = {str(k): _input_label(inputs, k) for k in range(len(inputs))}
    report.soup = {
        "order": [label[n] for n in soup.order],
        "kept": [label[n] for n in soup.kept],
        "score": soup.score,
        "steps": [{**asdict(s), "name": label[s.name]} for s in soup.steps],
    }
    if not soup.kept:
        report.notes.append("greedy soup: no input could be evaluated alone; no soup")
        return
    kept = sorted(int(n) for n in soup.kept)
    candidate = mean_of(kept, SOUP)
    row = CandidateResult(
        SOUP,
        f"greedy soup: mean of {len(kept)} of {len(inputs)} inputs",
        [inputs[k]["path"] for k in kept],
        [inputs[k]["step"] for k in kept],
        [1 / len(kept)] * len(kept),
    )
    evaluation = means[tuple(kept)][1] if len(kept) > 1 else alone_scores[kept[0]]
    baseline = report.row(report.baseline)
    tuner.fill(row, evaluation, True, baseline)
    row.reused = False
    report.candidates.append(row)
    report.soup["candidate"] = candidate.recipe
    if tuner.on_candidate:
        tuner.on_candidate(row)


def _soup_candidates(report: TuneReport) -> list[Candidate]:
    from ckptavg.tuning.candidates import mean_of

    if not any(c.name == SOUP for c in report.candidates):
        return []
    paths = [i["path"] for i in report.inputs]
    return [mean_of([paths.index(p) for p in report.row(SOUP).inputs], SOUP)]


def _input_label(inputs: list[dict], k: int) -> str:
    step = inputs[k].get("step")
    return f"step-{step}" if step is not None else Path(inputs[k]["path"]).name


def _winner(report: TuneReport) -> CandidateResult:
    failed = [c for c in report.candidates if c.failure is not None]
    if len(failed) == len(report.candidates):
        raise InputError(None, f"every candidate's evaluation failed; {failed[0].name}: {failed[0].failure}")
    best = best_of(report.candidates, report.mode)
    if best is None:
        raise InputError(None, f"no candidate passes the guards ({', '.join(report.guards)}); nothing written")
    best.winner = True
    report.winner = best.name
    return best


def _publish(tuner: Tuner, report: TuneReport, winner: CandidateResult, candidates: list[Candidate], overwrite: bool) -> None:
    """The winner's folder (kept from its evaluation, else written again) renamed into OUT, with the table in
    its ckptavg.json and card."""
    import json

    from ckptavg.card import CARD_FILE, write_card
    from ckptavg.formats.writer import write_text
    from ckptavg.output import RECIPE_FILE, staged
    from ckptavg.verify import sha256_of
    from ckptavg.version import __version__

    assert tuner.out is not None
    if tuner.retained is not None and tuner.retained[0] == winner.name:
        folder = tuner.retained[1]
    else:
        candidate = next(c for c in candidates if c.name == winner.name)
        folder = tuner.write([candidate])[candidate.name]
    with staged(tuner.out, overwrite, is_dir=True, notes=report.notes) as tmp:
        if tuner.keep is not None and folder.parent == tuner.keep:  # a kept candidate stays where it was kept
            shutil.copytree(folder, tmp, dirs_exist_ok=True)
        else:
            for entry in folder.iterdir():
                os.rename(entry, tmp / entry.name)
        # A pickle written in its own layout holds its recipe inside: ckptavg.json beside it then holds the table.
        has_recipe, has_card = (tmp / RECIPE_FILE).exists(), (tmp / CARD_FILE).exists()
        recipe = json.loads((tmp / RECIPE_FILE).read_text()) if has_recipe else {"tool": "ckptavg", "version": __version__}
        recipe.pop("sweep", None)
        recipe["tune"] = report.record()
        if has_card:
            write_card(tmp, recipe, tuner.out.name, verified=bool(recipe.get("verified")))
        if CARD_FILE in recipe.get("files", {}):
            recipe["files"][CARD_FILE] = {"bytes": (tmp / CARD_FILE).stat().st_size, "sha256": sha256_of(tmp / CARD_FILE)}
        write_text(tmp / RECIPE_FILE, json.dumps(recipe, indent=2) + "\n")
        report.output_files = sorted(p.name for p in tmp.iterdir())
    report.output = str(tuner.out)


def check_mode(metric: str | None, mode: str | None, from_text: bool) -> tuple[str, str]:
    """The metric optimised and its direction: given, or said by the metric's name, or refused."""
    from ckptavg.checks import check_text
    from ckptavg.metrics import mode_from_name

    check_text("metric", metric)
    if mode is not None and mode not in ("min", "max"):
        raise UsageError(None, f"{option('mode', repr(mode))}: expected min or max")
    if from_text:
        metric = metric or "perplexity"
        if metric not in ("perplexity", "nll"):
            raise UsageError(None, f"{option('metric', metric)}: the perplexity evaluator reports perplexity and nll")
        if mode == "max":
            raise UsageError(None, f"{option('mode', 'max')}: {metric} is better lower")
        return metric, "min"
    if mode is not None:
        return metric or "score", mode
    said = mode_from_name(metric) if metric else None
    if said is None:
        what = f"{metric} is" if metric else "the score is"
        raise UsageError(None, f"say whether {what} better lower or higher: {option('mode', 'min')} or {option('mode', 'max')}")
    return metric, said[0]  # type: ignore[return-value]


def tune(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike | None,
    *,
    eval_command: str | None = None,
    eval_text: str | os.PathLike | None = None,
    eval_tokens: int | None = None,
    eval_timeout: float | None = None,
    recipes: Sequence[str] | str | None = None,
    greedy_soup: bool = False,
    metric: str | None = None,
    mode: str | None = None,
    guards: Sequence[str] | str = (),
    keep_candidates: str | os.PathLike | None = None,
    plot: str | os.PathLike | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    order: str = "auto",
    dtype: str | None = None,
    accum: str = "auto",
    device: str = "auto",
    max_shard_size: str | int | None = None,
    key: str | None = None,
    use_ema: bool = False,
    strip_prefixes: Sequence[str] = (),
    memory_budget: str | int | None = None,
    verify: bool = False,
    strict: bool = False,
    rank_timeout: float = 120.0,
    out_format: str = "auto",
    training_state: str = "drop",
    on_candidate: Callable[[CandidateResult], None] | None = None,
    on_progress: Callable | None = None,
) -> TuneReport:
    """Choose the merge by evaluation: average the checkpoints several ways, score each candidate, write the best.

    Args:
        paths: checkpoint files or folders of one run, in any layout `average` reads.
        out: the winner's folder (as `average` writes it; its ckptavg.json and card hold the whole table). None
            only with dry_run.
        eval_command: a shell command run once per candidate, `{model}` replaced by its folder; it prints a number,
            or a JSON object of metrics, on its last line of stdout. eval_timeout: seconds before the command and
            everything it started are stopped (that candidate fails).
        eval_text: instead of eval_command, the built-in evaluator: perplexity of a causal LM on a .txt or .jsonl
            (`text`) file, at most eval_tokens tokens, on `device` (needs transformers: ckptavg[eval]).
        recipes: the candidates, in the grammar of `sweep` (["last:2,4", "ema:0.9"]); None: a default set spanning
            the run. The newest checkpoint alone (last-1) is always the baseline.
        greedy_soup: also score each input alone and build the greedy soup (Wortsman et al. 2022), one more
            candidate.
        metric, mode: the metric optimised (a key of the command's JSON) and whether lower ("min") or higher
            ("max") is better; said by the metric's name when it can be.
        guards: "METRIC:TOL[:min|max]": a candidate losing more than TOL on METRIC against the baseline cannot win.
        keep_candidates: a folder to keep every candidate in (else each is removed once scored).
        out_format, training_state: as for `sweep`: with "same", each candidate (and OUT) in the newest input's own
            layout (a PyTorch pickle as the file of its name in the folder), for an evaluation that reads it.
        plot: an .svg, .png or .pdf file: score per candidate (needs matplotlib: ckptavg[plot]).
        rank_timeout: under torchrun, every rank writes its share of the candidates and rank 0 alone evaluates
            them; a rank silent this long while writing fails the job (the others wait for rank 0's evaluations
            as long as it is alive).
        on_candidate: called with each row of the table once scored.
        The other options are those of `average`, applied to every candidate.

    Returns:
        The TuneReport: `candidates` (the table), `baseline`, `winner`, `gain`, `soup`, `to_dict()`.

    Raises:
        CkptavgError: bad inputs or options (UsageError), every candidate failing or none passing the guards
        (InputError), an unwritable output (OutputError).
    """
    from ckptavg.averaging import check_inputs_and_output, check_paths
    from ckptavg.checks import check_int, check_number, check_path
    from ckptavg.options import AverageOptions
    from ckptavg.tuning.candidates import asked_candidates, default_candidates
    from ckptavg.tuning.guards import parse_guards

    if eval_command is not None and eval_text is not None:
        raise UsageError(None, f"{option('eval_command', 'CMD')} and {option('eval_text', 'FILE')}: give one of them")
    if eval_command is None and eval_text is None and not dry_run:
        raise UsageError(None, f"give one evaluation: {option('eval_command', 'CMD')} or {option('eval_text', 'FILE')}")
    if eval_command is not None:
        from ckptavg.tuning.evaluation import check_command

        check_command(eval_command)
    metric, mode = check_mode(metric, mode, eval_text is not None)
    checked_guards = tuple(parse_guards(guards))
    if eval_timeout is not None:
        check_number("eval_timeout", eval_timeout, 0, True, what="a number of seconds")
    if eval_tokens is not None:
        check_int("eval_tokens", eval_tokens, 2)
    if recipes is not None:
        from ckptavg.recipes import parse_recipes

        texts = [recipes] if isinstance(recipes, str) else list(recipes)
        if texts:
            parse_recipes(texts)  # a bad recipe is refused before any input is opened
    plot_path = _check_plot(plot)
    keep = Path(check_path("keep_candidates", keep_candidates)) if keep_candidates is not None else None
    scoring = _scoring(eval_command, eval_text, eval_tokens, eval_timeout, device, metric, mode, checked_guards)
    paths = check_paths(paths, out, None)
    options = AverageOptions.pick(locals()).check()
    paths, out_path, _ = check_inputs_and_output(paths, out, options)
    if out_path is not None and out_path.suffix in (".safetensors", ".pt", ".pth", ".bin"):
        raise UsageError(None, f"{option('out', out_path.name)}: tune writes the winner as a folder; name a folder")
    choose = (lambda steps: asked_candidates(texts, steps)) if recipes is not None else default_candidates
    tuner = Tuner(paths, out_path, options, scoring, choose, greedy_soup, keep, on_candidate, on_progress)
    return run_tune(tuner, plot_path)


def _scoring(
    command: str | None,
    text: str | os.PathLike | None,
    tokens: int | None,
    timeout: float | None,
    device: str,
    metric: str,
    mode: str,
    guards: tuple[Guard, ...],
) -> Scoring:
    if text is not None:
        from ckptavg.checks import check_path
        from ckptavg.tuning.perplexity import DEFAULT_MAX_TOKENS, PerplexityEvaluator, require_transformers

        require_transformers()
        evaluator = PerplexityEvaluator(Path(check_path("eval_text", text)), tokens or DEFAULT_MAX_TOKENS, device)

        def evaluate(folder: Path) -> Evaluation:
            return _with_metric(evaluator(folder), metric)

        identity = {"text": str(text), "text_file": input_identity(Path(text)), "tokens": evaluator.max_tokens}
        return Scoring(
            evaluate, identity | {"device": device}, metric, mode, guards, lambda: importlib.import_module("transformers")
        )
    if command is None:  # a dry run without an evaluation: nothing is scored
        return Scoring(lambda folder: Evaluation(failure="no evaluation"), {}, metric, mode, guards)
    from ckptavg.tuning.evaluation import check_command, run_evaluation

    command = check_command(command)
    chosen = None if metric == "score" else metric
    return Scoring(
        lambda folder: run_evaluation(command, folder, chosen, timeout),
        {"command": command, "timeout": timeout, "metric": metric},
        metric,
        mode,
        guards,
    )


def _with_metric(evaluation: Evaluation, metric: str) -> Evaluation:
    if evaluation.ok:
        evaluation.score = evaluation.metrics[metric]
    return evaluation


def _check_plot(plot: object) -> Path | None:
    if plot is None:
        return None
    from ckptavg.checks import check_path

    path = Path(check_path("plot", plot))
    if path.suffix.lower() not in (".svg", ".png", ".pdf"):
        raise UsageError(None, f"{option('plot', path.name)}: expected an .svg, .png or .pdf file")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(None, f"{option('plot', path.name)}: drawing needs matplotlib: pip install 'ckptavg[plot]'") from None
    return path
