"""Where the Optuna study lives: the run's SQLite file (the default), or a database server many workers share.

`search.storage` is any SQLAlchemy URL that Optuna's RDBStorage takes; PostgreSQL through psycopg 3
(`postgresql+psycopg://user:password@host:5432/db`) is the documented and tested one. A server-backed study
runs Optuna's heartbeat: a trial whose worker stops beating (kill -9, host lost) is failed by whichever worker
next starts a trial, and `stale_callback` runs it again.

The password never leaves this module in clear: messages, logs and saved configs show `user:***@host`.
"""

from __future__ import annotations

import inspect
import logging
import re
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from autoseg.errors import InputError, StorageUnreachable

log = logging.getLogger(__name__)

KEY = "search.storage"
MASK = "***"
EXAMPLE = "postgresql+psycopg://user:password@host:5432/dbname"
HEARTBEAT_S = 60  # a running trial writes its heartbeat this often
GRACE_S = 180  # silent this long, it is failed and run again (3 beats: a long export holding the GIL is no death)
MAX_RETRY = 3  # a net that kills its worker each time (out of memory) is given up after this many reruns
CONNECT_TIMEOUT_S = 10
RETRY_DELAYS_S: tuple[float, ...] = (1.0, 2.0, 4.0)  # between connection attempts, before exit 3

# libpq's words for a server that cannot be reached now (anything else at connect is the URL's fault: exit 2).
_UNREACHABLE = (
    "connection refused", "timeout expired", "timed out", "no route to host", "network is unreachable",
    "server closed the connection", "the database system is starting up", "the database system is shutting down",
    "the database system is in recovery mode", "too many clients", "could not receive data", "could not send data",
    "connection reset", "broken pipe", "terminating connection", "consuming input failed", "ssl syscall error",
    "can't connect to mysql server", "lost connection to mysql server", "mysql server has gone away",
)
# PostgreSQL's words when two processes create Optuna's tables in a new database at the same moment.
_CONCURRENT_SETUP = ("pg_type_typname_nsp_index", "already exists")
_CREDENTIALS = ("password authentication failed", "no password supplied", "authentication failed", "access denied",
                "does not exist", "pg_hba.conf", "permission denied")


def mask_url(url: str) -> str:
    """`url` with its password as ***. Works on malformed URLs too: greedy up to the last '@', so a password
    holding '@' or ':' is hidden whole."""
    return re.sub(r"^([^:/]*://[^:/@]*):.*@", rf"\1:{MASK}@", url, flags=re.S)


def scrub(text: str, url: str | None) -> str:
    """`text` (an exception's, a log line's) on one line, with the URL's password masked wherever it appears."""
    text = " ".join(str(text).split())
    if url:
        for secret in _secrets(url):
            text = text.replace(secret, MASK)
        text = text.replace(url, mask_url(url))
    return text


def _secrets(url: str) -> list[str]:
    from urllib.parse import quote

    try:
        password = _parse(url).password
    except InputError:
        m = re.match(r"^[^:/]*://[^:/@]*:(.*)@", url, flags=re.S)
        password = m.group(1) if m else None
    if not password or password == MASK:
        return []
    return sorted({password, quote(password, safe=""), quote(password)}, key=len, reverse=True)


def _parse(url: str) -> Any:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url)
    except (ArgumentError, ValueError):
        raise InputError(f"{KEY}: {mask_url(url)!r} is not a database URL; give one like {EXAMPLE}") from None


def check_url(url: str) -> str:
    """Validate a storage URL at the door (config loading): it parses, names a database SQLAlchemy knows and whose
    driver is installed, and is not an in-memory SQLite the workers could not share. Returns it unchanged."""
    from sqlalchemy.exc import NoSuchModuleError

    parsed = _parse(url)
    shown = mask_url(url)
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        raise InputError(f"{KEY}: {shown!r}: unknown database kind {parsed.drivername!r}; give one like "
                         f"{EXAMPLE} (or sqlite:////path/study.db)") from None
    importer = getattr(dialect, "import_dbapi", None) or getattr(dialect, "dbapi", None)
    try:
        if importer is not None:
            importer()
    except ImportError as e:
        hint = f"use {EXAMPLE} (psycopg 3 comes with autoseg)" if parsed.get_backend_name() == "postgresql" \
            else f"install its Python driver ({e.name or e})"
        raise InputError(f"{KEY}: {shown!r}: the driver for {parsed.drivername!r} is not installed; {hint}") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise InputError(f"{KEY}: {shown!r} is an in-memory database that vanishes with the process; give a file "
                         "(sqlite:////path/study.db) or leave search.storage unset for the run's own study.db")
    return url


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite:")


def describe(url: str) -> str:
    """How messages name a storage: its URL with the password masked."""
    return mask_url(url)


def open_storage(
    url: str | None, default_sqlite: str, stale_callback: Callable[..., None] | None = None, read_only: bool = False,
) -> Any:
    """The RDBStorage of `url`, or of `default_sqlite` (the run's own study.db URL) when url is None.

    The default is as it always was: no heartbeat (one search per run directory: a trial left RUNNING there was
    killed, and the resume runs it again). A given URL, shared by workers that may be on other hosts, runs the
    heartbeat and hands trials whose worker died to `stale_callback`. Connection failures are retried with
    backoff; then a server that cannot be reached is StorageUnreachable (exit 3), a bad URL or bad credentials
    InputError (exit 2), one line each, the password masked. `read_only` (a report): PostgreSQL refuses the
    session any write, and no tables are created."""
    import optuna

    if url is None:
        return _build(default_sqlite, {})
    target = unmasked(url)
    kwargs: dict[str, Any] = {"heartbeat_interval": HEARTBEAT_S, "grace_period": GRACE_S}
    if read_only:
        kwargs = {"skip_table_creation": True, "read_only": True}
    elif stale_callback is not None:
        params = inspect.signature(optuna.storages.RDBStorage).parameters
        # Optuna 4.9 renamed failed_trial_callback; older ones (>= 3.6) know only that name.
        name = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params \
            else "failed_trial_callback"
        kwargs[name] = stale_callback
    delays, setups = list(RETRY_DELAYS_S), 3
    while True:
        try:
            return _build(target, kwargs)
        except Exception as e:
            kind, reason = classify(e, target)
            if setups and any(w in reason.lower() for w in _CONCURRENT_SETUP):
                # Another process (a worker started at once) created Optuna's tables meanwhile: they are there now.
                setups -= 1
                time.sleep(0.2)
                continue
            if kind == "unreachable" and delays:
                delay = delays.pop(0)
                log.warning("%s: %s; trying again in %g s", describe(target), reason, delay)
                time.sleep(delay)
                continue
            shown = describe(url)
            if kind == "unreachable":
                raise StorageUnreachable(
                    f"{KEY}: {shown}: cannot reach the database server ({reason}) after {1 + len(RETRY_DELAYS_S)} "
                    "attempts; check that it runs and that this host may connect, then rerun") from None
            raise InputError(f"{KEY}: {shown}: {reason}; {_hint(url, reason)}") from None


def unmasked(url: str) -> str:
    """A URL read back from a run's config.yml has its password as ***: connect without one, so that libpq's own
    sources (PGPASSWORD, ~/.pgpass) give it."""
    parsed = _parse(url)
    if parsed.password == MASK:
        return parsed._replace(password=None).render_as_string(hide_password=False)  # set() skips None
    return url


def _hint(url: str | None, reason: str) -> str:
    if url is not None and _parse(url).password == MASK:
        return ("the run's config.yml keeps no password: pass --storage with the full URL again, or give the "
                "password in PGPASSWORD or ~/.pgpass")
    if any(w in reason.lower() for w in _CREDENTIALS):
        return f"check the user, password and database name in --storage ({EXAMPLE})"
    return f"check --storage ({EXAMPLE})"


def _build(url: str, heartbeat: dict[str, Any]) -> Any:
    import optuna
    import sqlalchemy

    heartbeat = dict(heartbeat)
    read_only = heartbeat.pop("read_only", False)
    backend = _parse(url).get_backend_name()
    engine: dict[str, Any] = {}
    if backend == "sqlite":
        # Parallel workers write to one SQLite file: wait for its lock instead of failing after 5 s.
        engine["connect_args"] = {"timeout": 120}
    else:
        # A server may drop idle connections (a long fold): test each before use instead of failing on it.
        engine["pool_pre_ping"] = True
        if backend in ("postgresql", "mysql"):
            engine["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
        if backend == "postgresql" and read_only:
            engine["connect_args"]["options"] = "-c default_transaction_read_only=on"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat is "experimental"
        warnings.simplefilter("ignore", FutureWarning)  # Optuna >= 4.9 deprecates the older callback's name
        # Optuna formats the URL with str.format: braces (in a password) must be doubled.
        storage = optuna.storages.RDBStorage(url.replace("{", "{{").replace("}", "}}"), engine_kwargs=engine,
                                             **heartbeat)
    if backend == "sqlite":
        _lock_on_begin(storage.engine, sqlalchemy)
    return storage


def _lock_on_begin(engine: Any, sqlalchemy: Any) -> None:
    """Every transaction takes SQLite's write lock when it begins (SQLAlchemy's recipe for pysqlite).

    Optuna reads a trial and then updates it (WAITING -> RUNNING) trusting SELECT ... FOR UPDATE, which
    SQLite ignores: two workers could both take one requeued trial, and the second then failed to tell it.
    """

    @sqlalchemy.event.listens_for(engine, "connect")
    def _no_pysqlite_transactions(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # the BEGIN below is the only one

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin_immediate(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened while the storage set itself up lack the hooks


def classify(e: BaseException, url: str | None) -> tuple[str, str]:
    """("unreachable" | "refused", one-line reason with the password masked) for an error talking to the
    database. Unreachable is worth retrying (exit 3); refused is the URL's or the credentials' fault (exit 2)."""
    import sqlalchemy

    orig = getattr(e, "orig", None)
    reason = _reason(orig if orig is not None else e, url)
    low = reason.lower()
    if isinstance(e, sqlalchemy.exc.DBAPIError) and (
        getattr(e, "connection_invalidated", False) or any(w in low for w in _UNREACHABLE)
    ):
        return "unreachable", reason
    if isinstance(e, ConnectionError | TimeoutError):
        return "unreachable", reason
    return "refused", reason


def _reason(e: BaseException, url: str | None) -> str:
    text = str(e) or type(e).__name__
    text = re.sub(r"\(Background on this error at: [^)]*\)", "", text)
    text = re.sub(r"^\([\w.]+\)\s*", "", text.strip())  # SQLAlchemy's "(psycopg.OperationalError) " prefix
    # The first line says it; libpq's next ones are hints ("Is the server running ...?") or the same for IPv6.
    text = next((line.strip() for line in text.splitlines() if line.strip()), "")
    # libpq: 'connection failed: connection to server at "h" (1.2.3.4), port 5432 failed: FATAL:  why'
    m = re.search(r".*failed: (?:FATAL:\s*)?(.+)$", text)
    if m and "connection" in text[:60].lower():
        text = m.group(1)
    text = re.sub(r"^FATAL:\s*", "", text.strip())
    return scrub(text, url).rstrip(" .;") or type(e).__name__


def is_storage_error(e: BaseException) -> bool:
    """An error from the database layer (SQLAlchemy or its driver), as opposed to one of autoseg's own."""
    mod = type(e).__module__ or ""
    return mod.startswith(("sqlalchemy", "psycopg", "pymysql", "MySQLdb", "sqlite3"))


def storage_failure(e: BaseException, url: str | None) -> Exception:
    """The one-line error for a database failure in the middle of a run: the connection lost (exit 3: rerun the
    same command to resume, the running trial is run again) or something the URL or credentials cause (exit 2)."""
    kind, reason = classify(e, url)
    shown = describe(url) if url else "the run's study.db"
    if kind == "unreachable":
        return StorageUnreachable(f"{KEY}: {shown}: lost the database connection ({reason}); rerun the same "
                                  "command when the server is back: the search resumes and the running trial "
                                  "is run again")
    return InputError(f"{KEY}: {shown}: {reason}")


@contextmanager
def storage_errors(url: str | None) -> Iterator[None]:
    """Around work on a server-backed study: a database failure becomes one line (storage_failure), the password
    masked. The run's own SQLite file (url None) keeps its errors as they were."""
    if url is None:
        yield
        return
    try:
        yield
    except Exception as e:
        if is_storage_error(e):
            raise storage_failure(e, url) from None
        raise
