"""Checkpoints on disk: written atomically, read without running any code they hold.

Run folders are shared between people and machines, so a `.pt` file is untrusted input. torch's
`weights_only=True` unpickler admits tensors, plain containers, strings and numbers only: a pickle that
would call `os.system` on load is refused instead of run.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from autoseg.errors import InputError
from autoseg.rundir import write_bytes_atomic

log = logging.getLogger(__name__)


def save_checkpoint(obj: dict[str, Any], path: Path) -> None:
    """torch.save `obj` to `path` atomically: a reader sees the old file or the new one, never half of one."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes_atomic(path, buf.getvalue())


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint dict safely; InputError (one line) when it is missing, damaged or not data only."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing: one line is ours
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: not found; run `autoseg search` to completion first") from None
    except Exception as e:  # pickle.UnpicklingError for code, RuntimeError/EOFError for damage, ...
        why = " ".join(str(e).split())[:160] or type(e).__name__
        raise InputError(
            f"{path}: cannot be read as a plain checkpoint ({type(e).__name__}: {why}); "
            "it is damaged or holds code, so it was not loaded; rerun `autoseg search` to write it again"
        ) from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: holds a {type(obj).__name__}, not a checkpoint; rerun `autoseg search`")
    return obj


def checkpoint_with_keys(path: Path, *keys: str) -> dict[str, Any]:
    """read_checkpoint, and check that it holds `keys` (one line naming the first missing one)."""
    obj = read_checkpoint(path)
    missing = [k for k in keys if k not in obj]
    if missing:
        raise InputError(f"{path}: not an autoseg checkpoint (no '{missing[0]}'); rerun `autoseg search`")
    return obj


def load_if_key(path: Path, key: str) -> dict[str, Any] | None:
    """The checkpoint at `path` if it was written for `key`; None (with a warning) if it is unusable.

    For resume states and finished retrains: a file that is damaged, unsafe or of another key is not worth
    failing the run over, the work is simply done again.
    """
    if not path.exists():
        return None
    try:
        obj = read_checkpoint(path)
    except InputError as e:
        log.warning("%s; ignored, the work it held is done again", e)
        return None
    return obj if obj.get("retrain_key") == key else None
