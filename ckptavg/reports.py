"""What `average` reports (and each input in it): the --json document, the summary's source, and what the
writers record in ckptavg.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ckptavg.version import __version__


@dataclass
class InputSummary:
    path: str
    format: str
    step: int | None
    epoch: int | None
    weight: float
    tensors: int
    bytes: int
    notes: list[str]
    weights_from: str | None = (
        None  # which weights were taken from the input and why (raw or EMA, key, prefixes); None: its tensors as stored
    )
    hub: dict | None = (
        None  # an hf:// input: repo, revision asked, commit resolved, subfolder (path is then the pinned hf:// URL)
    )


@dataclass
class AverageReport:
    """What `average` did (or, with dry_run, would do); `to_dict()` is the --json document."""

    inputs: list[InputSummary]
    order: str
    strategy: str
    output: str | None
    output_files: list[str]
    copied_files: list[str]
    tensors: int
    parameters: int
    input_dtypes: dict[str, int]
    output_dtypes: dict[str, int]
    accumulate: dict[str, int]
    copied_from_newest: list[str]
    tied: list[list[str]]
    device: str
    input_disk_bytes: int = 0
    output_disk_bytes: int = 0
    bytes_to_read: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    dry_run: bool = False
    verified: bool = False
    verify_seconds: float = 0.0
    sha256: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # things that look wrong; --strict makes them errors
    adapter: dict | None = None  # PEFT adapters: mode, kind, ranks, and params mode's error per module
    world_size: int = 1  # processes that wrote the output (torchrun)
    version: str = __version__
    pushed: dict | None = None  # --push-to-hub: repo, revision, commit, commit_url

    @property
    def gb_per_s(self) -> float:
        return self.bytes_read / self.seconds / 1e9 if self.seconds else 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["gb_per_s"] = round(self.gb_per_s, 3)
        return data
