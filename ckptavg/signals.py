"""Once an output is renamed into place the run has succeeded: a late Ctrl-C or SIGTERM must not turn it
into a failure (a CI script would read "no model" while the model is there)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
keep_ignored_after_commit = False  # the CLI sets it: from the rename on, the process finishes and exits 0


@contextmanager
def committing() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM while the block renames the output into place; afterwards restore them,
    unless the block succeeded and `keep_ignored_after_commit` is set (then they stay ignored until exit)."""
    try:
        previous = [(s, signal.signal(s, signal.SIG_IGN)) for s in STOP_SIGNALS]
    except ValueError:  # not the main thread: signals are the main thread's business
        previous = []
    committed = False
    try:
        yield
        committed = True
    finally:
        if not (committed and keep_ignored_after_commit):
            for s, handler in previous:
                signal.signal(s, handler)


@contextmanager
def steps_of_a_longer_run() -> Iterator[None]:
    """Within the block an output renamed into place is a step of a longer run (`tune`'s candidates), not its
    end: the stop signals are restored after each such rename, so that Ctrl-C or SIGTERM still stops the run."""
    global keep_ignored_after_commit
    before, keep_ignored_after_commit = keep_ignored_after_commit, False
    try:
        yield
    finally:
        keep_ignored_after_commit = before
