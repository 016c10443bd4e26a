"""The report of a `tune` run: its table (one CandidateResult per candidate) and what was chosen."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ckptavg.version import __version__


@dataclass
class CandidateResult:
    """One row of the table: a candidate, its weights over the inputs, and how it scored."""

    name: str
    recipe: str
    inputs: list[str]
    steps: list[int | None]
    weights: list[float]
    metrics: dict[str, float] = field(default_factory=dict)
    score: float | None = None
    delta: float | None = None  # score - the baseline's score
    seconds: float = 0.0
    failure: str | None = None
    held_back: list[str] = field(default_factory=list)  # the guards it breaks: it cannot win
    reused: bool = False  # the score was measured by an earlier, interrupted run
    baseline: bool = False
    winner: bool = False

    @property
    def eligible(self) -> bool:
        return self.failure is None and self.score is not None and not self.held_back


@dataclass
class TuneReport:
    """What `tune` did (or, with dry_run, would do); `to_dict()` is the --json document and the `tune` section
    of the winner's ckptavg.json."""

    inputs: list[dict]
    order: str
    metric: str
    mode: str
    evaluation: dict
    candidates: list[CandidateResult]
    baseline: str
    winner: str | None = None
    guards: list[str] = field(default_factory=list)
    soup: dict | None = None
    output: str | None = None
    output_files: list[str] = field(default_factory=list)
    kept_candidates: str | None = None
    plot: str | None = None
    evaluated: int = 0
    reused: int = 0
    bytes_read: int = 0
    world_size: int = 1  # processes that wrote the candidates (torchrun); rank 0 evaluated them
    seconds: float = 0.0
    dry_run: bool = False
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    version: str = __version__

    def row(self, name: str) -> CandidateResult:
        return next(c for c in self.candidates if c.name == name)

    @property
    def gain(self) -> float | None:
        """The winner's score minus the baseline's."""
        return self.row(self.winner).delta if self.winner else None

    def to_dict(self) -> dict:
        return asdict(self) | {"gain": self.gain}

    def record(self) -> dict:
        """The table as the winner's ckptavg.json keeps it."""
        keep = ("metric", "mode", "evaluation", "baseline", "winner", "gain", "guards", "soup", "inputs", "order")
        data = {k: v for k, v in self.to_dict().items() if k in keep}
        data["candidates"] = [asdict(c) for c in self.candidates]
        return data
