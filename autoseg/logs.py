"""Plain logging for the CLI: INFO by default, --quiet for warnings only, --verbose for debug."""

from __future__ import annotations

import logging
import os
import re
import sys

from autoseg.errors import AutosegError


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else "%(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    handler.addFilter(_NoTracebackForOurErrors())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Third-party chatter stays out of the logs, --verbose included (PIL alone logs ~4 lines per PNG read):
    # --verbose is for autoseg's own steps. AUTOSEG_LOG_ALL=1 lets every library's debug lines through.
    everything = verbose and os.environ.get("AUTOSEG_LOG_ALL") == "1"
    for name in ("paramiko", "matplotlib", "PIL", "optuna", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.DEBUG if everything else logging.WARNING)
    # Optuna prints through its own handler; our per-trial line says the same thing more plainly.
    import optuna

    optuna.logging.disable_default_handler()
    optuna.logging.set_verbosity(optuna.logging.DEBUG if everything else optuna.logging.WARNING)
    optuna.logging.enable_propagation()


class _NoTracebackForOurErrors(logging.Filter):
    """Drop Optuna's "Trial N failed ... because of the following error" with its traceback, and the "Trial N
    failed with value None" after it, when the error is one of ours: its one-line message is printed last, as
    the error. A bug's traceback is kept."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: set[str] = set()  # trial numbers whose failure was ours

    def filter(self, record: logging.LogRecord) -> bool:
        m = re.match(r"Trial (\d+) failed with ", record.getMessage()) if record.name.startswith("optuna") else None
        if m is None:
            return True
        if isinstance(record.exc_info[1] if record.exc_info else None, AutosegError):
            self.hidden.add(m.group(1))
            return False
        if record.exc_info is None and m.group(1) in self.hidden:  # the line that follows it
            self.hidden.discard(m.group(1))
            return False
        return True


def progress_enabled() -> bool:
    """tqdm bars only when INFO is shown and stderr is a terminal: logs in files and CI stay plain."""
    return logging.getLogger().isEnabledFor(logging.INFO) and sys.stderr.isatty()
