"""`autoseg` command line: parse flags, load the config once, run, map errors to exit codes.

Exit codes: 0 ok, 1 internal error, 2 bad input or config, 3 device or study database unreachable (or, for a
worker, a study whose search has not recorded its data in time).
"""

from __future__ import annotations

import sys

from autoseg.cli.commands import COMMANDS, cmd_device_check
from autoseg.cli.flags import build_parser, overrides_from
from autoseg.errors import AutosegError
from autoseg.logs import setup_logging
from autoseg.rundir import os_hint, os_reason

__all__ = ["main", "overrides_from"]
TOP_FLAGS = ("-q", "--quiet", "-v", "--verbose")  # the flags that may come before the command


def main(argv: list[str] | None = None) -> int:
    if sys.stdout.errors == "strict":  # a name that is not UTF-8, printed after the work is done, must not fail
        sys.stdout.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    top = next((i for i, a in enumerate(argv) if a not in TOP_FLAGS), len(argv))
    if argv[top:top + 2] == ["config", "show"]:  # argparse's REMAINDER does not take flags right after a subcommand
        args = parser.parse_args(argv[:top + 2])
        args.flags = argv[top + 2:]
    else:
        args = parser.parse_args(argv)
    quiet = getattr(args, "quiet", False) or args.top_quiet
    verbose = getattr(args, "verbose", False) or args.top_verbose
    if quiet and verbose:
        parser.error("-q/--quiet and -v/--verbose cannot go together; give one of them")
    setup_logging(quiet=quiet, verbose=verbose)
    handler = cmd_device_check if args.command == "device" else COMMANDS[args.command]
    try:
        return handler(args)
    except AutosegError as e:
        print(f"autoseg: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        # Disk full or permissions while writing: say where, without a traceback.
        if e.errno is not None and e.filename is not None:
            print(f"autoseg: error: {e.filename}: {os_reason(e)}; {os_hint(e)}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("autoseg: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
