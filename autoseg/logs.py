"""Plain logging for the CLI: INFO by default, --quiet for warnings only, --verbose for debug."""

from __future__ import annotations

import logging
import sys


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else "%(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Third-party chatter stays out of plain logs unless asked for.
    for name in ("paramiko", "matplotlib", "PIL", "optuna"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    # Optuna prints through its own handler; our per-trial line says the same thing more plainly.
    import optuna

    optuna.logging.disable_default_handler()
    optuna.logging.set_verbosity(optuna.logging.DEBUG if verbose else optuna.logging.WARNING)
    optuna.logging.enable_propagation()


def progress_enabled() -> bool:
    """tqdm bars only when INFO is shown and stderr is a terminal: logs in files and CI stay plain."""
    return logging.getLogger().isEnabledFor(logging.INFO) and sys.stderr.isatty()
