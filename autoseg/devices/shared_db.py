"""The SQLAlchemy engine behind the tables several processes share: the latency cache and the pool's leases.

One URL names where they live: a SQLite file (one host: WAL mode, and a wait for the file's lock instead of an
error), "sqlite://" (this process's memory: one connection, so one database), or the study's database server
(every host; a connection the server dropped is replaced before use).
"""

from __future__ import annotations

from typing import Any

MEMORY_URLS = ("sqlite://", "sqlite:///:memory:")


def open_engine(url: str) -> Any:
    import sqlalchemy as sa

    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 30.0, "check_same_thread": False}
        if url in MEMORY_URLS:
            kwargs["poolclass"] = sa.pool.StaticPool
    engine = sa.create_engine(url, **kwargs)
    if engine.dialect.name == "sqlite" and url not in MEMORY_URLS:
        with engine.begin() as conn:
            conn.exec_driver_sql("PRAGMA journal_mode=WAL")
    return engine


def create_tables(meta: Any, engine: Any) -> None:
    """meta's tables, unless there; another process creating them at the same moment is no error."""
    import sqlalchemy as sa

    try:
        meta.create_all(engine, checkfirst=True)
    except sa.exc.DBAPIError:  # it won the race: they are there now
        meta.create_all(engine, checkfirst=True)
