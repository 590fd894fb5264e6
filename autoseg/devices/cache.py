"""The latency cache: one graph is measured once per device and settings.

LatencyCache is the SQLite store; CachedDevice answers from it, and measures again what was timed while the
device was busy, noisy or warming.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

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
    """SQLite store of OK measurements keyed by (graph hash, device fingerprint id, settings key).

    WAL mode so several search workers can share one file; every put is its own transaction.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)
        with self._lock, self._db:
            if self.path != ":memory:":
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS latency (graph_hash TEXT NOT NULL, fingerprint_id TEXT NOT NULL, "
                "settings_key TEXT NOT NULL, measurement TEXT NOT NULL, created REAL NOT NULL, "
                "PRIMARY KEY (graph_hash, fingerprint_id, settings_key))"
            )

    def get(self, graph_hash: str, fingerprint_id: str, settings_key: str) -> dict | None:
        with self._lock:
            row = self._db.execute(
                "SELECT measurement FROM latency WHERE graph_hash=? AND fingerprint_id=? AND settings_key=?",
                (graph_hash, fingerprint_id, settings_key),
            ).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, graph_hash: str, fingerprint_id: str, settings_key: str, measurement: dict) -> None:
        text = json.dumps(measurement, sort_keys=True)
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO latency VALUES (?, ?, ?, ?, ?)",
                (graph_hash, fingerprint_id, settings_key, text, time.time()),
            )

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM latency").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


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
