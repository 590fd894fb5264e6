"""DevicePool: one Device over several edge devices of one fingerprint class, shared by every process of a study.

Each measurement leases one free device through a row of `autoseg_device_leases` (target, holder, expires_at)
in a database all processes reach (the study's server, or a SQLite file in the run directory), taken by one
atomic UPDATE, renewed while the model is timed and released after: one device never times two models at once,
even for searches on other hosts. Expiry is judged by the database's clock, so hosts' clocks need not agree, and a
holder that died frees its devices within LEASE_TTL_S.

A device that stops answering is taken out of the pool and the model goes to another; when the last one is
lost, `device.fallback` applies (local, or exit 3). A device busy with a measurement that holds no lease here (a
`device check`, a study on another database) is set aside for a while and the model goes to another; only when
every device stays busy that way for WAIT_FOR_FREE_S does the pool give up (DeviceBusy, exit 3). Devices of
another class (SoC, arch, cores, onnxruntime, providers) are refused at start: their latencies would not be
comparable.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from autoseg.config import DeviceConfig
from autoseg.devices.local import LocalDevice
from autoseg.devices.records import Device, DeviceBusy, DeviceRefused, Measurement, MeasureSettings
from autoseg.devices.shared_db import create_tables, open_engine
from autoseg.errors import DeviceUnreachable, InputError
from edge_agent import fingerprint as _fp

log = logging.getLogger(__name__)

# What makes two devices' latencies comparable: the same SoC and runtime. Not the hostname, RAM size or OS build.
CLASS_KEYS = ("arch", "cpu_model", "cores", "onnxruntime", "providers", "emulated")
LEASE_TABLE = "autoseg_device_leases"
LEASE_TTL_S = 60.0  # a lease not renewed for this long is free again (its holder died)
WAIT_FOR_FREE_S = 600.0  # all devices leased by others this long: DeviceBusy (the agent's own lock waits as long)
# A member whose agent lock is held from outside the pool's leases (a `device check`, another study) is waited for
# this long, then set aside this long while the rest of the pool goes on.
MEMBER_LOCK_WAIT_S = 60.0
ASIDE_S = 120.0


def fingerprint_class(fp: dict) -> dict:
    """The keys of a device fingerprint that must agree within a pool."""
    out = {k: fp.get(k) for k in CLASS_KEYS}
    if isinstance(out["providers"], list | tuple):
        out["providers"] = sorted(str(p) for p in out["providers"])
    return out


def class_differences(ref: dict, fp: dict) -> list[str]:
    """'key value (pool: value)' for each class key where fp differs from ref."""
    a, b = fingerprint_class(ref), fingerprint_class(fp)
    return [f"{k} {b[k]!r} (pool: {a[k]!r})" for k in CLASS_KEYS if a[k] != b[k]]


def lease_key(dev: Device) -> str:
    """The row that stands for a device: host and port, not the user, so that two accounts on one board
    still exclude each other (every host must name the device by the same address)."""
    t = getattr(dev, "target", None)
    return f"{t.host}:{t.port}" if t is not None else dev.name


# ------------------------------------------------------------------ the lease rows


class LeaseBoard:
    """Lease rows in a SQLAlchemy database. take/renew/release are single atomic statements."""

    def __init__(self, url: str, ttl_s: float = LEASE_TTL_S) -> None:
        import sqlalchemy as sa

        self.ttl_s = float(ttl_s)
        self._engine = open_engine(url)
        dialect = self._engine.dialect.name
        # The database's clock, so that hosts whose clocks disagree judge expiry alike.
        self._now = {
            "sqlite": "((julianday('now') - 2440587.5) * 86400.0)",
            "postgresql": "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)",
            "mysql": "UNIX_TIMESTAMP(NOW(6))",
        }.get(dialect, ":now")
        meta = sa.MetaData()
        self._table = sa.Table(
            LEASE_TABLE, meta,
            sa.Column("target", sa.String(255), primary_key=True),
            sa.Column("holder", sa.String(255), nullable=True),
            sa.Column("expires_at", sa.Float, nullable=False, default=0.0),
        )
        create_tables(meta, self._engine)

    def add(self, targets: Sequence[str]) -> None:
        """A row for each target that has none yet (free)."""
        import sqlalchemy as sa

        for t in targets:
            with contextlib.suppress(sa.exc.IntegrityError), self._engine.begin() as conn:
                if conn.execute(sa.select(self._table.c.target).where(self._table.c.target == t)).first() is None:
                    conn.execute(self._table.insert().values(target=t, holder=None, expires_at=0.0))

    def _update(self, sql: str, **params: Any) -> bool:
        import sqlalchemy as sa

        text = sql.replace("{now}", self._now)
        params["now"] = time.time()  # used only where the database has no clock function we know
        with self._engine.begin() as conn:
            return conn.execute(sa.text(text), {k: v for k, v in params.items() if f":{k}" in text}).rowcount == 1

    def take(self, target: str, holder: str) -> bool:
        """Lease target to holder if it is free, expired, or already holder's."""
        return self._update(
            f"UPDATE {LEASE_TABLE} SET holder = :holder, expires_at = {{now}} + :ttl WHERE target = :target "
            "AND (holder IS NULL OR expires_at < {now} OR holder = :holder)",
            holder=holder, target=target, ttl=self.ttl_s)

    def renew(self, target: str, holder: str) -> bool:
        """False when the lease was lost (it expired and someone else took it)."""
        return self._update(
            f"UPDATE {LEASE_TABLE} SET expires_at = {{now}} + :ttl WHERE target = :target AND holder = :holder",
            holder=holder, target=target, ttl=self.ttl_s)

    def release(self, target: str, holder: str) -> None:
        self._update(f"UPDATE {LEASE_TABLE} SET holder = NULL, expires_at = 0 WHERE target = :target "
                     "AND holder = :holder", holder=holder, target=target)

    def holders(self) -> dict[str, str | None]:
        """target -> holder of a lease that has not expired (None when free): for messages."""
        import sqlalchemy as sa

        with self._engine.connect() as conn:
            now = conn.execute(sa.text(f"SELECT {self._now}"),
                               {"now": time.time()} if ":now" in self._now else {}).scalar_one()
            rows = conn.execute(sa.select(self._table)).all()
        return {r.target: (r.holder if r.holder and r.expires_at >= now else None) for r in rows}

    def close(self) -> None:
        self._engine.dispose()


# ------------------------------------------------------------------ the pool


class DevicePool:
    """A Device over several devices of one fingerprint class, each model timed on one leased device.

    Thread-safe: threads of one process lease distinct devices, as processes do.
    """

    def __init__(self, members: Sequence[Device], board: LeaseBoard, cfg: DeviceConfig) -> None:
        if not members:
            raise ValueError("a pool needs at least one device")
        self._cfg = cfg
        self._members = list(members)
        self._alive = list(members)
        self._board = board
        self._keys = {id(d): lease_key(d) for d in members}
        board.add(list(self._keys.values()))
        self._ref = members[0].fingerprint()
        for d in members[1:]:
            diff = class_differences(self._ref, d.fingerprint())
            if diff:
                self.close()
                raise InputError(
                    f"device.targets: device {d.name} is not of the pool's kind ({members[0].name}): "
                    f"{', '.join(diff)}; pool only devices with the same SoC, cores, onnxruntime and providers, "
                    f"and time {d.name} in a run of its own (--device {d.name})")
        self._class_fp = {**fingerprint_class(self._ref), "pool": [d.name for d in members]}
        self._class_id = _fp.fingerprint_id(self._class_fp)
        self._me = f"{socket.gethostname()}:{os.getpid()}"
        self._lock = threading.Lock()
        self._held: dict[str, str] = {}  # lease key -> holder, for the renewing thread
        self._last_used: dict[int, float] = {}
        self._fallback: LocalDevice | None = None
        # Bounds that are not worth a config field; private so tests can shorten them.
        self._poll_s = 0.2
        self._wait_s = WAIT_FOR_FREE_S
        self._aside_s = ASIDE_S
        self._aside: dict[int, float] = {}  # id(device) -> time.monotonic() until which it is set aside
        self._busy_since: float | None = None  # first outside-busy answer since the last measurement
        if len(members) > 1:  # with others to turn to, one device busy from outside is not waited out
            for d in members:
                if hasattr(d, "_lock_timeout_s"):
                    d._lock_timeout_s = min(d._lock_timeout_s, MEMBER_LOCK_WAIT_S)
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew_loop, name="autoseg-lease-renew", daemon=True)
        self._renewer.start()

    @classmethod
    def open(cls, cfg: DeviceConfig, targets: Sequence[str], lease_url: str,
             make_device: Callable[[DeviceConfig], Device] | None = None) -> Device:
        """Connect to every target at once and pool those that answer (of one class, or InputError).

        A target that cannot be reached is left out with a warning; refusals (host key, login, packages) raise.
        None reachable: LocalDevice with fallback local, else DeviceUnreachable.
        """
        if make_device is None:
            from autoseg.devices.ssh import SSHDevice

            make_device = SSHDevice
        # Members never fall back on their own: losing one is the pool's business.
        configs = [replace(cfg, target=t, targets=[], fallback="none") for t in targets]
        with ThreadPoolExecutor(max_workers=len(configs)) as ex:
            futures = [ex.submit(make_device, c) for c in configs]
        members: list[Device] = []
        lost: list[str] = []
        refusal: BaseException | None = None
        for t, f in zip(targets, futures, strict=True):
            e = f.exception()
            if e is None:
                members.append(f.result())
            elif isinstance(e, DeviceRefused | InputError) or not isinstance(e, DeviceUnreachable):
                refusal = refusal or e
            else:
                log.warning("device pool: %s left out: %s", t, e)
                lost.append(str(e))
        if refusal is not None:
            for d in members:
                with contextlib.suppress(Exception):
                    d.close()
            raise refusal
        if not members:
            msg = f"device pool: none of its {len(targets)} devices answers ({lost[0] if lost else '?'})"
            if cfg.fallback == "local":
                log.warning("%s; falling back to local measurement, results are labelled source=local", msg)
                return LocalDevice(cfg.max_busy_cores)
            raise DeviceUnreachable(f"{msg}; check the devices are on and reachable, or pass --fallback local")
        return cls(members, LeaseBoard(lease_url), cfg)

    # -- Device ---------------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        if self._fallback is not None:
            return self._fallback.name
        return f"pool[{', '.join(d.name for d in self._members)}]"

    @property
    def source(self) -> str:
        return "local" if self._fallback is not None else "device"

    @property
    def devices(self) -> list[str]:
        """The names of the devices still in the pool."""
        with self._lock:
            return [d.name for d in self._alive]

    def fingerprint(self) -> dict:
        """The pool's class (what its devices share); each Measurement keeps its own device's fingerprint."""
        return self._fallback.fingerprint() if self._fallback is not None else dict(self._class_fp)

    def measure(self, model: bytes, shape: tuple[int, ...], settings: MeasureSettings) -> Measurement:
        while True:
            if self._fallback is not None:
                return self._fallback.measure(model, shape, settings)
            leased = self._lease()
            if leased is None:
                self._all_lost()
                continue
            dev, key, holder = leased
            try:
                m = dev.measure(model, shape, settings)
            except DeviceBusy as e:
                if not self._set_aside(dev, e):
                    raise
                continue
            except DeviceRefused:
                raise
            except DeviceUnreachable as e:
                self._drop(dev, e)
                continue
            finally:
                self._release(key, holder)
            self._busy_since = None
            return self._as_class(m)

    @contextlib.contextmanager
    def one_device(self) -> Iterator[Device]:
        """A Device that times every model on one leased device of the pool, held for the whole block: for figures
        compared with each other (float against int8). Should that device be lost, the pool takes over."""
        leased = self._lease() if self._fallback is None else None
        if leased is None:
            yield self
            return
        dev, key, holder = leased
        try:
            yield _Pinned(self, dev)
        finally:
            self._release(key, holder)

    def close(self) -> None:
        if hasattr(self, "_stop"):
            self._stop.set()
            with self._lock:
                held = list(self._held.items())
                self._held.clear()
            for key, holder in held:
                with contextlib.suppress(Exception):
                    self._board.release(key, holder)
        for d in self._members:
            with contextlib.suppress(Exception):
                d.close()
        if getattr(self, "_fallback", None) is not None:
            self._fallback.close()
        self._board.close()

    def __enter__(self) -> DevicePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _as_class(self, m: Measurement) -> Measurement:
        # Keyed by the class, so the cache and the latency predictor share what any member measured; which
        # device it was stays in m.device and m.fingerprint.
        return replace(m, fingerprint_id=self._class_id) if m.source == "device" and m.fingerprint_id else m

    # -- leases ---------------------------------------------------------------------------------------

    def _lease(self) -> tuple[Device, str, str] | None:
        """A free device of the pool, leased; waits while all are leased. None when none is left."""
        deadline = time.monotonic() + self._wait_s
        said = False
        while True:
            with self._lock:
                if not self._alive:
                    return None
                # The least recently used first, so that one process spreads its models over the pool.
                now = time.monotonic()
                order = sorted((d for d in self._alive if self._aside.get(id(d), 0.0) <= now),
                               key=lambda d: self._last_used.get(id(d), 0.0))
                mine = set(self._held)
            for dev in order:
                key = self._keys[id(dev)]
                if key in mine:  # another thread of this process times a model there
                    continue
                holder = f"{self._me}:{secrets.token_hex(4)}"
                if self._board.take(key, holder):
                    with self._lock:
                        if dev not in self._alive:  # dropped by another thread meanwhile
                            self._board.release(key, holder)
                            break
                        self._held[key] = holder
                        self._last_used[id(dev)] = time.monotonic()
                    return dev, key, holder
            else:
                now = time.monotonic()
                if now >= deadline:
                    raise DeviceBusy(f"device pool: all {len(self._alive)} devices were leased by others for "
                                     f"{self._wait_s:g} s ({self._describe_holders()}); let those measurements "
                                     "finish (or stop them) and run again")
                if not said:
                    log.info("device pool: all %d devices busy (%s); waiting for one", len(self._alive),
                             self._describe_holders())
                    said = True
                time.sleep(self._poll_s * (0.5 + secrets.randbelow(1000) / 1000))  # jitter: processes interleave

    def _release(self, key: str, holder: str) -> None:
        with self._lock:
            if self._held.get(key) == holder:
                del self._held[key]
        try:
            self._board.release(key, holder)
        except Exception as e:  # the lease then expires by itself
            log.warning("device pool: could not release the lease on %s (%s); it expires in %g s", key,
                        " ".join(str(e).split())[:200], self._board.ttl_s)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self._board.ttl_s / 3):
            with self._lock:
                held = list(self._held.items())
            for key, holder in held:
                try:
                    ok = self._board.renew(key, holder)
                except Exception as e:  # a database hiccup: the next round tries again, well within the ttl
                    log.warning("device pool: renewing the lease on %s failed (%s)", key,
                                " ".join(str(e).split())[:200])
                    continue
                if not ok:
                    log.warning("device pool: the lease on %s expired while a model was timed there; another "
                                "process may time on it at once", key)

    def _describe_holders(self) -> str:
        try:
            held = {k: h for k, h in self._board.holders().items() if h and k in self._keys.values()}
        except Exception:
            return "holders unknown"
        return ", ".join(f"{k} by {h.rsplit(':', 1)[0]}" for k, h in sorted(held.items())) or "none held now"

    # -- losing devices ---------------------------------------------------------------------------------

    def _set_aside(self, dev: Device, e: BaseException) -> bool:
        """A device busy with a measurement from outside the pool's leases: go on without it for a while.
        False (give up: DeviceBusy) when it is the pool's only device, or every device has been busy that way
        for WAIT_FOR_FREE_S."""
        now = time.monotonic()
        with self._lock:
            if len(self._alive) < 2:
                return False
            self._busy_since = self._busy_since or now
            if now - self._busy_since >= self._wait_s:
                return False
            self._aside[id(dev)] = now + self._aside_s
        log.warning("device pool: %s is busy with a measurement from outside this study (%s); the pool goes on "
                    "without it for %g s", dev.name, " ".join(str(e).split())[:200], self._aside_s)
        return True

    def _drop(self, dev: Device, e: BaseException) -> None:
        with self._lock:
            if dev not in self._alive:
                return
            self._alive.remove(dev)
            left = len(self._alive)
        log.warning("device pool: %s stopped answering (%s); taken out of the pool, %d device%s left", dev.name,
                    e, left, "s" * (left != 1))
        with contextlib.suppress(Exception):
            dev.close()

    def _all_lost(self) -> None:
        msg = f"device pool: all {len(self._members)} devices were lost"
        with self._lock:
            if self._fallback is not None:
                return
            if self._cfg.fallback != "local":
                raise DeviceUnreachable(f"{msg}; check the devices are on and reachable, or pass --fallback local")
            log.warning("%s; falling back to local measurement, results are labelled source=local", msg)
            self._fallback = LocalDevice(self._cfg.max_busy_cores)


class _Pinned:
    """One device of a pool, leased by DevicePool.one_device."""

    def __init__(self, pool: DevicePool, dev: Device) -> None:
        self._pool, self._dev = pool, dev
        self.name, self.source = dev.name, dev.source

    def fingerprint(self) -> dict:
        return self._pool.fingerprint()

    def measure(self, model: bytes, shape: tuple[int, ...], settings: MeasureSettings) -> Measurement:
        if self._dev in self._pool._alive:
            try:
                return self._pool._as_class(self._dev.measure(model, shape, settings))
            except DeviceRefused:
                raise
            except DeviceUnreachable as e:
                self._pool._drop(self._dev, e)
        return self._pool.measure(model, shape, settings)

    def close(self) -> None:
        pass
