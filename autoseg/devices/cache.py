"""The latency cache: one graph is measured once per device and settings.

LatencyCache is the store (a SQLite file, or the study's database server); CachedDevice answers from it, and
measures again what was timed while the device was busy, noisy or warming.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from autoseg.devices.records import (
    DEFAULT_MAX_BUSY_CORES,
    Device,
    MeasureError,
    Measurement,
    MeasureSettings,
    flag,
    one_line,
    passing,
    unquiet,
)
from autoseg.devices.shared_db import create_tables, open_engine
from edge_agent import fingerprint as _fp

log = logging.getLogger(__name__)


def _graph_hash(model: bytes) -> str:
    """sha256 of the ONNX graph with names/doc strings/producer cleared: same net, same hash.

    Internal tensor names are renamed in order of first use: the exporter numbers them from a
    process-wide counter, so the same net exported twice in one process can name them differently.
    """
    try:
        import onnx  # heavy import, only needed here

        proto = onnx.load_from_string(bytes(model))
    except Exception:  # not ONNX: it cannot be measured anyway, hash the bytes
        return hashlib.sha256(model).hexdigest()
    proto.producer_name = proto.producer_version = proto.doc_string = proto.domain = ""
    del proto.metadata_props[:]
    g = proto.graph
    g.name = g.doc_string = ""
    keep = {v.name for v in g.input} | {v.name for v in g.output}
    names: dict[str, str] = {}

    def canon(name: str) -> str:
        if not name or name in keep:
            return name
        return names.setdefault(name, f"t{len(names)}")

    for node in g.node:
        node.name = node.doc_string = ""
        node.input[:] = [canon(n) for n in node.input]
        node.output[:] = [canon(n) for n in node.output]
    inits = sorted(g.initializer, key=lambda t: canon(t.name))
    for t in inits:
        t.name = canon(t.name)
    del g.initializer[:]
    g.initializer.extend(inits)
    del g.value_info[:]
    return hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()


class LatencyCache:
    """Store of OK measurements keyed by (graph hash, device fingerprint id, settings key), and of the net each
    graph is (for the latency predictor, autoseg.latency_history).

    `where` is a SQLite file (a single host's run: WAL mode, so its parallel workers share it), ":memory:", or
    a SQLAlchemy URL of a database server: the study's own, so that every worker on every host reads what any
    of them measured. Every put is its own transaction; a row another process wrote first is replaced (put) or
    kept (remember_arch), never an error.
    """

    def __init__(self, where: Path | str) -> None:
        import sqlalchemy as sa

        text = str(where)
        self.url = text if "://" in text else None
        self.path = text if self.url is None else None  # None: the cache is on a server
        if self.url is None and text != ":memory:":
            Path(text).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._engine = open_engine(self.url or ("sqlite://" if text == ":memory:" else f"sqlite:///{text}"))
        self.dialect = self._engine.dialect.name
        # A SQLite file keeps the names it always had; on a shared server, ours say whose they are.
        prefix = "" if self.dialect == "sqlite" else "autoseg_"
        meta = sa.MetaData()
        self.table = sa.Table(
            f"{prefix}latency", meta,
            sa.Column("graph_hash", sa.String(64), primary_key=True),
            sa.Column("fingerprint_id", sa.String(64), primary_key=True),
            sa.Column("settings_key", sa.String(255), primary_key=True),
            sa.Column("measurement", sa.Text, nullable=False),
            sa.Column("created", sa.Float, nullable=False),
        )
        self.arch_table = sa.Table(
            f"{prefix}latency_arch", meta,
            sa.Column("graph_hash", sa.String(64), primary_key=True),
            sa.Column("arch", sa.Text, nullable=False),
            sa.Column("in_channels", sa.Integer, nullable=False),
            sa.Column("num_classes", sa.Integer, nullable=False),
            sa.Column("precision", sa.String(16), nullable=False),
            sa.Column("created", sa.Float, nullable=False),
        )
        create_tables(meta, self._engine)

    @property
    def where(self) -> str:
        """How messages name the cache: its file, or its server with the password masked."""
        if self.url is None:
            return str(self.path)
        from autoseg.storage import mask_url

        return mask_url(self.url)

    def get(self, graph_hash: str, fingerprint_id: str, settings_key: str) -> dict | None:
        import sqlalchemy as sa

        t = self.table
        with self._lock, self._engine.connect() as conn:
            row = conn.execute(sa.select(t.c.measurement).where(
                t.c.graph_hash == graph_hash, t.c.fingerprint_id == fingerprint_id,
                t.c.settings_key == settings_key)).first()
        return json.loads(row[0]) if row else None

    def put(self, graph_hash: str, fingerprint_id: str, settings_key: str, measurement: dict) -> None:
        row = {"graph_hash": graph_hash, "fingerprint_id": fingerprint_id, "settings_key": settings_key,
               "measurement": json.dumps(measurement, sort_keys=True), "created": time.time()}
        self._upsert(self.table, row, overwrite=True)

    def remember_arch(self, graph_hash: str, arch: dict, in_channels: int, num_classes: int, precision: str) -> None:
        """Record which net a graph is; the first record of a graph stays."""
        row = {"graph_hash": graph_hash, "arch": json.dumps(arch, sort_keys=True), "in_channels": int(in_channels),
               "num_classes": int(num_classes), "precision": precision, "created": time.time()}
        self._upsert(self.arch_table, row, overwrite=False)

    def history_rows(self, fingerprint_id: str) -> list[tuple]:
        """(graph_hash, settings_key, measurement, arch, in_channels, num_classes, precision) of every entry
        measured on `fingerprint_id`, oldest first; the last four are None where the net is not recorded."""
        import sqlalchemy as sa

        t, a = self.table, self.arch_table
        query = (sa.select(t.c.graph_hash, t.c.settings_key, t.c.measurement, a.c.arch, a.c.in_channels,
                           a.c.num_classes, a.c.precision)
                 .select_from(t.outerjoin(a, a.c.graph_hash == t.c.graph_hash))
                 .where(t.c.fingerprint_id == fingerprint_id).order_by(t.c.created))
        with self._lock, self._engine.connect() as conn:
            return [tuple(r) for r in conn.execute(query)]

    def _upsert(self, table: Any, row: dict, overwrite: bool) -> None:
        import sqlalchemy as sa

        keys = [c.name for c in table.primary_key.columns]
        if self.dialect in ("sqlite", "postgresql"):
            from sqlalchemy.dialects import postgresql, sqlite

            ins = (sqlite if self.dialect == "sqlite" else postgresql).insert(table).values(**row)
            stmt = (ins.on_conflict_do_update(index_elements=keys, set_={k: ins.excluded[k] for k in row
                                                                         if k not in keys})
                    if overwrite else ins.on_conflict_do_nothing(index_elements=keys))
            with self._lock, self._engine.begin() as conn:
                conn.execute(stmt)
            return
        # Another server: delete then insert in one transaction; a racing writer's row wins, which is as good.
        with self._lock, contextlib.suppress(sa.exc.IntegrityError), self._engine.begin() as conn:
            where = [table.c[k] == row[k] for k in keys]
            if overwrite:
                conn.execute(table.delete().where(*where))
            elif conn.execute(sa.select(table.c[keys[0]]).where(*where)).first() is not None:
                return
            conn.execute(table.insert().values(**row))

    def __len__(self) -> int:
        import sqlalchemy as sa

        with self._lock, self._engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(self.table)).scalar_one())

    def close(self) -> None:
        with self._lock:
            self._engine.dispose()


BUSY_STREAK_GIVE_UP = 3  # flagged measurements in a row after which we stop waiting and retrying


@dataclass
class CachedDevice:
    """A Device that answers from the LatencyCache when it can and measures (and stores) otherwise."""

    inner: Device
    cache: LatencyCache
    # A measurement flagged busy, noisy, throttled or warming (measurement_flags, with this many cores
    # others may use; None switches the load checks off) is retried once, then kept with its flags but
    # not cached.
    max_busy_cores: float | None = DEFAULT_MAX_BUSY_CORES
    busy_retries: int = 1
    busy_wait_s: float = 5.0
    hits: int = field(default=0, init=False)
    misses: int = field(default=0, init=False)
    busy_streak: int = field(default=0, init=False)

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def source(self) -> str:
        return self.inner.source

    def fingerprint(self) -> dict:
        return self.inner.fingerprint()

    def measure(self, model: bytes, shape: tuple[int, ...], settings: MeasureSettings) -> Measurement:
        fid = _fp.fingerprint_id(self.inner.fingerprint())
        ghash = _graph_hash(model)
        # The input shape changes latency as much as the graph does, so it is part of the key.
        key = f"{settings.key()}|shape={'x'.join(str(int(d)) for d in shape)}"
        hit = self.cache.get(ghash, fid, key)
        if hit is not None:
            m = flag(replace(Measurement.from_dict(hit), cached=True), self.max_busy_cores)
            if not passing(m.flags):  # else an entry stored before flags were kept: measured again below
                self.hits += 1
                return m
        self.misses += 1
        m = flag(self.inner.measure(model, shape, settings), self.max_busy_cores)
        # A device that stays busy is not waited for on every candidate: after a few, only flag it.
        retries = self.busy_retries if self.busy_streak < BUSY_STREAK_GIVE_UP else 0
        for attempt in range(1, retries + 1):
            if not passing(m.flags):
                break
            # Other work on the device inflates latency while its spread may still look tight: wait, try again.
            log.info("device %s: %s; measuring again", self.name, "; ".join(passing(m.flags)))
            time.sleep(self.busy_wait_s * attempt)
            again = flag(self.inner.measure(model, shape, settings), self.max_busy_cores)
            m = min((m, again), key=unquiet)
        self.busy_streak = self.busy_streak + 1 if passing(m.flags) else 0
        if passing(m.flags):
            log.warning("device %s: %s: latency may be inflated and is not cached", self.name,
                        "; ".join(passing(m.flags)))
            return replace(m, message=one_line(f"{m.message}; not cached: {'; '.join(passing(m.flags))}"))
        if m.error == MeasureError.OK and m.fingerprint_id:
            # Store under the measuring device's id: after a fallback that is the local machine.
            self.cache.put(ghash, m.fingerprint_id, key, m.to_dict())
        return m

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            self.cache.close()

    def __enter__(self) -> CachedDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
