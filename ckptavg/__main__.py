"""`python -m ckptavg` and the `ckptavg` console script."""

import os
import sys


def run() -> None:
    """The entry point: a Ctrl-C while the command line is still being imported is one line and exit 130 too."""
    try:
        from ckptavg.cli import main
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted by SIGINT; nothing was written\n")
        sys.stderr.flush()
        os._exit(130)  # not sys.exit: see ckptavg.cli.exit_now
    main()


if __name__ == "__main__":
    run()
