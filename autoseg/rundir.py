"""The run directory: where each artefact lives, and atomic writes into it."""

from __future__ import annotations

import errno
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoseg.errors import InputError


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yml"

    @property
    def data(self) -> Path:
        return self.root / "data.json"

    @property
    def index(self) -> Path:
        return self.root / "index"

    @property
    def reps(self) -> Path:
        return self.root / "reps"

    @property
    def study_db(self) -> Path:
        return self.root / "study.db"

    @property
    def storage_url(self) -> str:
        return f"sqlite:///{self.study_db.resolve()}"

    @property
    def latency_cache(self) -> Path:
        return self.root / "latency_cache.db"

    def trial(self, number: int) -> Path:
        return self.root / "trials" / str(number)

    @property
    def best(self) -> Path:
        return self.root / "best"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def prepare(self) -> RunDir:
        """Create the directory and prove it is writable, so a bad --out fails before any work."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-probe"
            probe.write_bytes(b"ok")
            probe.unlink(missing_ok=True)  # another process checking this directory may have removed it
        except OSError as e:
            raise InputError(
                f"{self.root}: cannot write the run directory ({os_reason(e)}); choose another --out"
            ) from None
        return self


def os_reason(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "disk full"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if e.errno == errno.EROFS:
        return "read-only file system"
    return e.strerror or str(e)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a temp file beside `path`, then rename: readers never see half a file.

    The temp name is unique and opened with "xb" rather than made by mkstemp, which would force
    mode 0600: files keep the permissions the user's umask gives, like any other output.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
