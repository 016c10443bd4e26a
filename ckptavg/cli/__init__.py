"""The command line: parses the arguments, runs the library and renders its reports; one module per command
(average, sweep, tune, select, inspect, export) on the app of running.py, the options they share in params.py.
main() turns every error into one line and an exit code."""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import sys
import time
import traceback
from typing import Any

import typer
from typer._click import exceptions as click_errors  # typer's own copy of click: the classes its parser raises

from ckptavg import distributed, signals
from ckptavg.distributed import follower, under_torchrun
from ckptavg.errors import EXIT_SIGINT, EXIT_SIGTERM, EXIT_USAGE, CkptavgError, Interrupted, options_spelled
from ckptavg.render import print_error

# isort: off
# Each command registers itself on the app, in the order --help lists them.
from ckptavg.cli import average, sweep, tune, select, inspect, export  # noqa: F401

# isort: on
from ckptavg.cli.running import app


def _on_sigterm(signum: int, frame: object) -> None:
    raise Interrupted("SIGTERM", EXIT_SIGTERM)


def _take_debug(args: list[str]) -> tuple[list[str], bool]:
    """--debug wherever it is given (before or after the command, before a `--`): (the other args, given?)."""
    end = args.index("--") if "--" in args else len(args)
    head = [a for a in args[:end] if a != "--debug"]
    return head + args[end:], len(head) < end


def _flag_type_column(self: Any, ctx: Any) -> str | None:
    # Typer shows a `<bool>` type beside every flag in --help; a flag takes no value, so show none.
    return None if getattr(self, "is_flag", False) else _option_type_column(self, ctx)


_option_type_column = typer.core.TyperOption.display_type_rich
typer.core.TyperOption.display_type_rich = _flag_type_column  # type: ignore[method-assign]
typer.core.TyperArgument.display_type_rich = lambda self, ctx: None  # type: ignore[method-assign]  # its metavar says it


def parser_message(e: typer.TyperException) -> str:
    """A parsing error of click's in the words of ckptavg's other errors: one line, lower case, its suggestion kept
    ("no such option --wieghts (did you mean --weights?)") instead of click's usage block and capitalised Error."""
    if isinstance(e, click_errors.NoSuchOption):  # its possibilities come best first (difflib)
        return f"no such option {e.option_name}" + (f" (did you mean {e.possibilities[0]}?)" if e.possibilities else "")
    text = e.format_message() if isinstance(e, click_errors.ClickException) else str(e)
    # "No such command 'averag'. Did you mean 'average'?", "Invalid value for '--ema': Input should be ...",
    # "Missing argument 'CHECKPOINT'." become "no such command 'averag' (did you mean 'average'?)", "invalid value
    # for --ema: input should be ...", "missing argument CHECKPOINT"
    text = re.sub(r"\.? Did you mean (.+)\?$", r" (did you mean \1?)", text.strip())
    text = re.sub(r"'(--?[\w-]+|[A-Z_]+)'", r"\1", text).removesuffix(".")
    return re.sub(r"(^|: )([A-Z])(?=[a-z])", lambda m: m.group(1) + m.group(2).lower(), text)


def exit_now(code: int) -> None:
    """Exit with `code` at once. After a Ctrl-C, Python may still end a process that handled it by the signal
    itself (it does when the interrupt landed in code run through PyRun_*, e.g. while torch imports), which a
    parent sees as -2, not 130; the staged output and the lock are already cleaned up by then."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _tell_torchrun(message: str) -> None:
    """Under torchrun, leave the error in the file its agent reads, so that its failure report shows this line
    (instead of "To enable traceback see ...")."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path and under_torchrun():
        try:
            with open(path, "w") as f:
                json.dump(
                    {"message": {"message": message, "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))}}},
                    f,
                )
        except OSError:
            pass


# The library names an option by its Python keyword; these commands call the parameter otherwise.
_PARAMETER_OF = {"out": "output", "accum": "accum_dtype", "strip_prefixes": "strip_prefix"}


@functools.cache
def _flags() -> dict[str, str]:
    """Each parameter's flag, as its command declares it first (`-o`, `--memory-budget`)."""
    flags: dict[str, str] = {}
    for command in typer.main.get_command(app).commands.values():  # type: ignore[attr-defined]
        for param in command.params:
            if isinstance(param, typer.core.TyperOption) and param.name:
                flags.setdefault(param.name, param.opts[0])
    return flags


def flag_spelling(name: str, value: str | None) -> str:
    """An option a message names, as it is typed on this command line: `--memory-budget 1GB`; a switch
    (value True) is its flag alone."""
    flag = _flags().get(_PARAMETER_OF.get(name, name)) or "--" + name.replace("_", "-")
    return flag if value in (None, "True") else f"{flag} {value}"


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the app and turns every error into one line on stderr and an exit code."""
    with options_spelled(flag_spelling):
        _main(argv)


def _main(argv: list[str] | None) -> None:
    args = sys.argv[1:] if argv is None else argv
    args, debug = _take_debug(args)
    debug = debug or os.environ.get("CKPTAVG_DEBUG") == "1"
    signal.signal(signal.SIGTERM, _on_sigterm)
    signals.keep_ignored_after_commit = True
    distributed.world.ignore_signals_when_done = under_torchrun()  # read by World when the job ends
    silent = follower()  # a torchrun rank other than 0: rank 0 reports the job's errors
    try:
        code = app(args=args, prog_name="ckptavg", standalone_mode=False)
        if code == EXIT_SIGINT:  # typer turns KeyboardInterrupt into this return value
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            sys.exit(code)
    except CkptavgError as e:
        if debug:
            traceback.print_exc()
        if not silent or getattr(e, "reported", True) is False:
            print_error(e.message)
            _tell_torchrun(e.message)
        sys.exit(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.TyperException as e:  # usage errors from the argument parser
        if isinstance(e, click_errors.NoArgsIsHelpError):  # `ckptavg` alone: the help
            e.show()
        else:
            print_error(parser_message(e))
        sys.exit(getattr(e, "exit_code", EXIT_USAGE) or EXIT_USAGE)
    except (typer.Abort, KeyboardInterrupt):
        if not silent:
            print_error("interrupted by SIGINT; nothing was written")
        exit_now(EXIT_SIGINT)
    except OSError as e:
        if debug:
            traceback.print_exc()
        where = f"{e.filename}: " if e.filename else ""
        print_error(f"{where}{e.strerror or e}")
        sys.exit(1)
    except Exception as e:
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (run with --debug for the traceback)"
        print_error(f"internal error: {type(e).__name__}: {e}{hint}")
        sys.exit(1)


# Each command registers itself on `app`, in the order --help lists them.
