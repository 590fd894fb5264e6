"""The run directory: where each artefact lives, and atomic writes into it."""

from __future__ import annotations

import errno
import json
import os
import secrets
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

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


_REASONS = {
    errno.ENOSPC: ("disk full", "free space or choose another place"),
    errno.EDQUOT: ("disk quota exceeded", "free space or choose another place"),
    errno.EACCES: ("permission denied", "choose a place you can write to"),
    errno.EPERM: ("permission denied", "choose a place you can write to"),
    errno.EROFS: ("read-only file system", "choose a place you can write to"),
    errno.EISDIR: ("is a directory", "give a file path, not a directory"),
    errno.ENOTDIR: ("a part of the path is not a directory", "choose another place"),
    errno.EEXIST: ("exists and is not a directory", "choose another place"),
    errno.ENAMETOOLONG: ("file name too long", "choose a shorter path"),
}


def os_reason(e: OSError) -> str:
    return _REASONS[e.errno][0] if e.errno in _REASONS else e.strerror or str(e)


def os_hint(e: OSError) -> str:
    """What to do about a failed write, by its cause (not "free space" for a directory in the way)."""
    return _REASONS[e.errno][1] if e.errno in _REASONS else "choose another place"


def for_target(e: OSError, path: Path) -> OSError:
    """`e` as it applies to `path`, the file being written: not to the temp file beside it that failed (the
    user never named that one). OSError(errno, ...) is the matching subclass (IsADirectoryError, ...)."""
    return OSError(e.errno, e.strerror, str(path)) if e.errno is not None else e


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
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise for_target(e, path) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fs_escape(text: str) -> str:
    """`text` with the bytes of non-UTF-8 file names as \\xNN escapes, so that it can be written as UTF-8.

    Python reads such a name with each undecodable byte as a lone surrogate (U+DC80-U+DCFF); no UTF-8 file
    can hold those, so a report or manifest naming the file failed after all the work was done.
    """
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no file name gave
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def write_text_atomic(path: Path, text: str) -> None:
    # A lone surrogate left in JSON text becomes its \uXXXX escape: valid JSON, read back as the same string.
    write_bytes_atomic(path, text.encode("utf-8", "backslashreplace"))


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


class StudyFileError(Exception):
    """A study.db that no Optuna study can be in (the message names the file and what it is)."""


def sqlite_ro_uri(path: Path) -> str:
    """A read-only SQLite URI for `path`: percent-quoted bytes, so spaces, '?', '#' and names that are not
    UTF-8 survive; mode=ro refuses writes."""
    return f"file:{quote(os.fsencode(path))}?mode=ro"


def check_study_file(path: Path, empty_ok: bool = False) -> None:
    """Raise StudyFileError when `path` exists but is no Optuna study: a directory, not SQLite, or a
    database without Optuna's tables (an empty file is one, unless `empty_ok`: a search killed as it
    created the study left it, and fills it in). A study being created, locked or unreadable passes: the
    caller says what it can of those."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_file():
        raise StudyFileError(f"{path}: not an Optuna study (it is a directory, not a file)"
                             if path.is_dir() else f"{path}: not an Optuna study (not a regular file)")
    try:
        con = sqlite3.connect(sqlite_ro_uri(path), uri=True, timeout=10)
        try:
            tables = {name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
    except sqlite3.OperationalError:  # locked, or no permission: not this function's to judge
        return
    except sqlite3.DatabaseError as e:
        raise StudyFileError(f"{path}: not an Optuna study (not an SQLite database: {e})") from None
    if "studies" not in tables and not (empty_ok and not tables):
        what = "an empty file" if path.stat().st_size == 0 else "an SQLite database without Optuna's tables"
        raise StudyFileError(f"{path}: not an Optuna study ({what})")
