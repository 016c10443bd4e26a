"""Run the user's evaluation command on one candidate and read its score.

The command runs in a shell of its own session (its own process group), with `{model}` replaced by the
candidate's folder, quoted for the shell. It prints a number on the last non-empty line of its stdout, or a JSON
object of metrics there (`metric` names the one to optimise; the others are recorded). A non-zero exit, no
number, or the time limit marks the candidate failed, with the tail of its stderr; the run goes on. At the time
limit, or when ckptavg itself is stopped, the whole process group is ended: the shell and everything it started
(an evaluation that starts its own session escapes that, as it would escape any shell).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ckptavg.errors import UsageError, option

PLACEHOLDER = "{model}"
MODEL_VARIABLE = "CKPTAVG_MODEL"  # the candidate's folder, also in the command's environment
STDERR_LINES = 5
_GRACE_SECONDS = 2.0  # between SIGTERM and SIGKILL when the time limit ends an evaluation


@dataclass
class Evaluation:
    """One candidate's evaluation: every metric it reported, the score (the metric optimised; None when it
    failed), how long it took, and why it failed (None when it did not)."""

    metrics: dict[str, float] = field(default_factory=dict)
    score: float | None = None
    seconds: float = 0.0
    failure: str | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None

    def to_dict(self) -> dict:
        return {"metrics": dict(self.metrics), "score": self.score, "seconds": self.seconds, "failure": self.failure}

    @classmethod
    def from_dict(cls, data: dict) -> Evaluation:
        return cls(dict(data.get("metrics") or {}), data.get("score"), float(data.get("seconds") or 0.0), data.get("failure"))


def check_command(command: object) -> str:
    """The evaluation command as given, refused when it cannot see the candidate."""
    if not isinstance(command, str) or not command.strip():
        raise UsageError(None, f"{option('eval_command', repr(command))}: expected a shell command that evaluates {PLACEHOLDER}")
    if PLACEHOLDER not in command and MODEL_VARIABLE not in command:
        raise UsageError(
            None,
            f"{option('eval_command', repr(command))}: the command never sees the candidate: write {PLACEHOLDER} where "
            f"its folder goes (or read ${MODEL_VARIABLE})",
        )
    return command


def command_for(command: str, model: Path) -> str:
    """`command` with each `{model}` replaced by the folder, quoted for the shell (other braces are left alone)."""
    return command.replace(PLACEHOLDER, shlex.quote(str(model)))


def run_evaluation(command: str, model: Path, metric: str | None = None, timeout: float | None = None) -> Evaluation:
    """Run `command` on the candidate folder `model` and read its score (see the module's docstring)."""
    started = time.perf_counter()
    env = dict(os.environ, **{MODEL_VARIABLE: str(model)})
    process = subprocess.Popen(
        command_for(command, model),
        shell=True,
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    timed_out = False
    try:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            end_group(process)
            out, err = process.communicate()
    finally:
        # Whatever ends this (the time limit, Ctrl-C, SIGTERM, an error), nothing the evaluation started outlives it.
        end_group(process)
    seconds = time.perf_counter() - started
    stdout = out.decode("utf-8", "replace")
    stderr = err.decode("utf-8", "replace")
    if timed_out:
        return Evaluation(seconds=seconds, failure=_with_tail(f"no result after {timeout:g} s (stopped)", stderr))
    if process.returncode != 0:
        code = process.returncode
        why = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        return Evaluation(seconds=seconds, failure=_with_tail(why, stderr))
    try:
        metrics, score = read_score(stdout, metric)
    except ValueError as e:
        return Evaluation(seconds=seconds, failure=_with_tail(str(e), stderr))
    return Evaluation(metrics, score, seconds)


def end_group(process: subprocess.Popen) -> None:
    """End the evaluation's process group: SIGTERM, then SIGKILL to what is left after a short grace."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    try:
        process.wait(_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + _GRACE_SECONDS
    while time.monotonic() < deadline and _group_alive(process.pid):
        time.sleep(0.05)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def read_score(stdout: str, metric: str | None) -> tuple[dict[str, float], float]:
    """The metrics on the last non-empty line of `stdout` and the score among them; ValueError says what is wrong."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise ValueError("printed nothing on stdout (expected a number or a JSON object of metrics on its last line)")
    last = lines[-1]
    number = _number(last)
    if number is not None:
        if not math.isfinite(number):
            raise ValueError(f"the score {last} is not a finite number")
        return {metric or "score": number}, number
    try:
        data = json.loads(last)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise ValueError(f"the last line of stdout is not a number or a JSON object of metrics: {_short(last)!r}")
    metrics = {
        str(k): float(v) for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }
    if metric is None:
        if len(metrics) != 1:
            names = ", ".join(metrics) or "none"
            raise ValueError(f"{len(metrics)} numeric metrics ({names}): name the one to optimise with {option('metric')}")
        (score,) = metrics.values()
        return metrics, score
    if metric not in data:
        raise ValueError(f"no metric {metric!r} in its JSON (it has {', '.join(data) or 'nothing'})")
    if metric not in metrics:
        raise ValueError(f"metric {metric!r} is {_short(json.dumps(data[metric]))}, not a finite number")
    return metrics, metrics[metric]


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _with_tail(why: str, stderr: str) -> str:
    tail = [_short(line.rstrip()) for line in stderr.splitlines() if line.strip()][-STDERR_LINES:]
    return why + ("; stderr: " + " | ".join(tail) if tail else "")


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
