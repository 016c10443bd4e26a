"""A rank's place in a job of several processes (torchrun, or a process group the caller initialised), and the
key-value store the ranks coordinate through: posts, waits, beats, the failure of one rank told to all."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import TYPE_CHECKING

from ckptavg.errors import EXIT_SIGTERM, CkptavgError, Interrupted
from ckptavg.signals import STOP_SIGNALS

if TYPE_CHECKING:  # the command line asks under_torchrun() before torch is imported
    from ckptavg.progress import ProgressFn

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
BEAT_SECONDS = 1.0
POLL_SECONDS = 0.05
DEFAULT_TIMEOUT = 120.0


class RankError(CkptavgError):
    """A failure of the job as a whole: `rank` found it (or stopped responding). Every rank raises it; only
    rank 0 reports it (`reported` is False on a rank that found it alone, e.g. when rank 0 is gone)."""

    def __init__(self, rank: int, problem: str, exit_code: int, reported: bool = True) -> None:
        super().__init__(None, f"rank {rank}: {problem}")
        self.rank = rank
        self.exit_code = exit_code
        self.reported = reported


def under_torchrun() -> bool:
    """True when torchrun (or a launcher that sets its variables) started this process as one of several."""
    return all(v in os.environ for v in TORCHRUN_VARIABLES) and int(os.environ["WORLD_SIZE"]) > 1


def follower() -> bool:
    """True in a torchrun job's ranks other than 0: they print nothing, and commands that read (select,
    inspect) leave the work to rank 0."""
    return under_torchrun() and int(os.environ["RANK"]) != 0


class World:
    """This process's place in a job of several ranks, and the store they coordinate through."""

    def __init__(
        self,
        rank: int,
        size: int,
        local_rank: int,
        store: object,
        timeout: float,
        owns_group: bool,
        fold_workers: int | None = None,
    ) -> None:
        self.rank = rank
        self.size = size
        self.local_rank = local_rank
        self.timeout = timeout
        self.fold_workers = fold_workers  # CPU fold workers of this rank: its share of the node's cores
        # How often a waiting rank asks the store: rank 0 often (it drives the job), the others less as they
        # grow in number, so that the store (one process) serves a few thousand requests a second at most.
        self.poll = POLL_SECONDS if rank == 0 else max(POLL_SECONDS, min(1.0, size / 100))
        self._store = store
        self._owns_group = owns_group
        self._stop = threading.Event()
        self._progress = (0, 0)  # this rank's bytes read and units done
        self.others_progress = (0, 0)  # rank 0: the other ranks' sums, refreshed every beat
        self.interrupted = False  # told to stop (torchrun's SIGTERM): leave at once, wait for no one
        self.peak_rss = 0  # rank 0, once every rank has reported: the largest rank's peak memory
        self.failure = False  # a rank has posted a failure (seen by the beat thread)
        self.agreed = False  # every rank has posted the same plan (job.agree): a failure since is posted, not gathered
        self._beats = threading.Thread(target=self._beat, daemon=True, name="ckptavg-beat")
        self._beats.start()

    @property
    def leader(self) -> bool:
        return self.rank == 0

    # Keys and values

    def post(self, key: str, value: dict) -> None:
        self._store.set(key, json.dumps(value))  # type: ignore[attr-defined]

    def read(self, key: str) -> dict:
        return json.loads(self._store.get(key))  # type: ignore[attr-defined]

    def _posted(self, key: str) -> bool:
        return bool(self._store.check([key]))  # type: ignore[attr-defined]

    def fail(self, error: BaseException, about: int | None = None) -> RankError:
        """Post a failure found by this rank (about itself, or about rank `about`); the first one posted wins.
        Returns the job's failure as the error every rank raises."""
        if isinstance(error, RankError):
            return error
        code = getattr(error, "exit_code", 1) if isinstance(error, CkptavgError) else 1
        problem = str(error) if isinstance(error, CkptavgError) else f"internal error: {type(error).__name__}: {error}"
        self.interrupted = self.interrupted or isinstance(error, Interrupted)
        if isinstance(error, Interrupted) and error.exit_code == EXIT_SIGTERM:
            problem = (
                "stopped by SIGTERM (torchrun stops every rank once one has failed: its report names that rank); nothing was "
                "written"
            )
        value = {"rank": self.rank if about is None else about, "by": self.rank, "problem": problem, "code": code}
        try:
            self._store.compare_set("failed", "", json.dumps(value))  # type: ignore[attr-defined]
            return self._job_failure()
        except RuntimeError as e:  # the store is gone: report what this rank knows
            return RankError(value["rank"], f"{problem} (and the job's store is unreachable: {e})", code, reported=False)

    def _job_failure(self) -> RankError:
        value = self.read("failed")
        # Rank 0 reports the job's failure; when rank 0 is the rank that stopped, the rank that found it does.
        reported = not (value["rank"] == 0 and value["by"] == self.rank != 0)
        return RankError(value["rank"], value["problem"], value["code"], reported)

    # Waiting on the others

    def gather(self, key: str, value: dict) -> list[dict]:
        """Post `value`, and get every rank's: rank 0 waits for them all and posts the list, which the others
        wait for (watching rank 0 alone). A failure posted meanwhile is raised."""
        self.post(f"{key}/{self.rank}", value)
        if not self.leader:
            self.wait([f"{key}/all"], watch=[0])
            return json.loads(self._store.get(f"{key}/all"))  # type: ignore[attr-defined]
        keys = [f"{key}/{r}" for r in range(self.size)]
        self.wait(keys, watch=range(self.size))
        values = [self.read(k) for k in keys]
        for rank, theirs in enumerate(values):
            if "error" in theirs:  # posted by gather_error
                found = CkptavgError(None, theirs["error"])
                found.exit_code = theirs["code"]
                raise self.fail(found, about=rank)
        self._store.set(f"{key}/all", json.dumps(values))  # type: ignore[attr-defined]
        return values

    def gather_error(self, key: str, error: BaseException) -> None:
        """A rank other than 0 met `error` before its part of gather(key): it hands it to rank 0 there instead
        of failing the job at once, so that when rank 0 meets the same (a missing input, mismatched inputs:
        every rank builds the same plan) the job's error is rank 0's. Returns once rank 0 has decided."""
        if self.leader:
            return
        code = getattr(error, "exit_code", 1) if isinstance(error, CkptavgError) else 1
        try:
            self.post(f"{key}/{self.rank}", {"error": str(error), "code": code})
            self.wait([f"{key}/all"], watch=[0])
        except (CkptavgError, RuntimeError):  # the job's failure, now posted (or the store is gone)
            pass

    def wait(
        self, keys: list[str], watch: Iterable[int], on_tick: Callable[[], None] | None = None, stop_on_failure: bool = True
    ) -> None:
        """Wait until every key is posted. Raises the job's failure as soon as one is posted, or a RankError
        naming a watched rank whose beat has not moved for `timeout` seconds."""
        watch = [r for r in watch if r != self.rank]
        last_beat = {r: (-1, time.monotonic()) for r in watch}
        next_look = 0.0
        while True:
            try:
                if stop_on_failure and self._posted("failed"):
                    raise self._job_failure()
                if self._store.check(keys):  # type: ignore[attr-defined]
                    return
                now = time.monotonic()
                if now >= next_look:  # the beats move once a second: look at them as often
                    next_look = now + BEAT_SECONDS
                    for r, beat in zip(watch, self._beat_counts(watch)):
                        if beat != last_beat[r][0]:
                            last_beat[r] = (beat, now)
                        elif now - last_beat[r][1] > self.timeout:
                            stopped = CkptavgError(
                                None, f"stopped responding (no sign of life for {self.timeout:g} s): killed, or its node is down"
                            )
                            raise self.fail(stopped, about=r)
            except RuntimeError as e:  # torch's store errors: its host (torchrun's agent, or rank 0) is gone
                raise RankError(
                    self.rank, f"lost contact with the other ranks ({e}); torchrun stops the job", 1, reported=False
                ) from e
            if on_tick:
                on_tick()
            time.sleep(self.poll)

    def _beat_counts(self, ranks: list[int]) -> list[int]:
        """The beat counters of `ranks`: in one request once they all exist (a rank makes its own at once)."""
        keys = [f"beat/{r}" for r in ranks]
        if keys and self._store.check(keys):  # type: ignore[attr-defined]
            return [int(v) for v in self._store.multi_get(keys)]  # type: ignore[attr-defined]
        return [int(self._store.add(k, 0)) for k in keys]  # type: ignore[attr-defined]

    # Progress and the beat

    def progress(self, done_bytes: int, done_units: int) -> None:
        self._progress = (done_bytes, done_units)

    def _beat(self) -> None:
        """Every BEAT_SECONDS: move this rank's beat, post its progress, note a posted failure, and on rank 0
        add up the others' progress."""
        while not self._stop.is_set():
            try:
                self._store.add(f"beat/{self.rank}", 1)  # type: ignore[attr-defined]
                self._store.set(f"progress/{self.rank}", f"{self._progress[0]},{self._progress[1]}")  # type: ignore[attr-defined]
                if not self.failure and self._posted("failed"):
                    self.failure = True
                if self.leader and self.size > 1:
                    keys = [f"progress/{r}" for r in range(1, self.size)]
                    if self._store.check(keys):  # type: ignore[attr-defined]
                        done = [tuple(map(int, v.decode().split(","))) for v in self._store.multi_get(keys)]  # type: ignore[attr-defined]
                        self.others_progress = (sum(d[0] for d in done), sum(d[1] for d in done))
            except Exception:  # the store is gone: the next wait() reports it
                pass
            self._stop.wait(BEAT_SECONDS)

    def check_failure(self) -> None:
        """Raise the job's failure if any rank has posted one (called between chunks)."""
        if self.failure:
            raise self._job_failure()

    def close(self) -> None:
        """Finish the job: rank 0 posts that it is done (its outcome is settled and about to be reported); the
        others wait for that, so that torchrun, which stops every rank once one exits with an error, never
        stops rank 0 before it has said why."""
        try:
            if self.interrupted:
                pass
            elif self.leader:
                if ignore_signals_when_done:
                    for s in STOP_SIGNALS:
                        signal.signal(s, signal.SIG_IGN)
                self.post("finished", {})
                if not self._owns_group:  # the store may live in this process (the caller's group): stay until all have seen it
                    self.wait([f"left/{r}" for r in range(1, self.size)], watch=range(self.size), stop_on_failure=False)
            else:
                self.wait(["finished"], watch=[0], stop_on_failure=False)
                self.post(f"left/{self.rank}", {})
        except (CkptavgError, ValueError):  # a rank is gone (torchrun reports it), or not the main thread
            pass
        self._stop.set()
        self._beats.join(timeout=2 * BEAT_SECONDS)
        if self._owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


ignore_signals_when_done = False  # the CLI sets it: rank 0 finishes reporting even if torchrun stops the job
_runs = 0  # average() calls made in this process: the same count on every rank keys each call's store entries


def join(timeout: float | None = None) -> World | None:
    """The job this process is a rank of: an initialised torch.distributed process group (the Python API
    inside a training script), or torchrun's variables (a gloo group is initialised here and destroyed by
    close()). None for a single process."""
    global _runs
    import torch.distributed as dist

    timeout = DEFAULT_TIMEOUT if timeout is None else timeout
    owns = False
    if not (dist.is_available() and dist.is_initialized()):
        if not under_torchrun():
            return None
        wait = max(timeout, 30)
        try:
            dist.init_process_group("gloo", timeout=timedelta(seconds=wait))
        except Exception as e:  # c10d's own text names store keys; say what it means
            raise CkptavgError(
                None,
                f"rank {os.environ['RANK']}: not every rank joined the job within {wait:g} s (a rank stopped or "
                f"failed before joining, or cannot reach {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']})",
            ) from e
        owns = True
    if dist.get_world_size() == 1:
        if owns:
            dist.destroy_process_group()
        return None
    _runs += 1
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"ckptavg/{restart}/{_runs}/", dist.distributed_c10d._get_default_store())
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return World(dist.get_rank(), dist.get_world_size(), local_rank, store, timeout, owns, _fold_workers())


def _fold_workers() -> int | None:
    """A rank's share of its node's cores for the CPU fold. torchrun sets OMP_NUM_THREADS=1 for its ranks, which
    would leave one fold worker per rank; None (torch's thread count) when the ranks per node are unknown."""
    per_node = os.environ.get("LOCAL_WORLD_SIZE")
    if not per_node:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, int(per_node)))


def rank_progress(world: World, plan_read_bytes: int, total_units: int, on_progress: ProgressFn | None) -> ProgressFn:
    """The engine's progress callback on a rank: it stops the work when another rank has failed, posts this
    rank's progress, and on rank 0 reports the whole job's (its own plus the others' last beat)."""
    from ckptavg.progress import Progress

    def update(p: Progress) -> None:
        world.check_failure()
        world.progress(p.bytes_done, p.tensors_done)
        if on_progress is not None and world.leader:
            others_bytes, others_units = world.others_progress
            on_progress(
                Progress(p.bytes_done + others_bytes, plan_read_bytes, p.tensors_done + others_units, total_units, p.tensor)
            )

    return update
