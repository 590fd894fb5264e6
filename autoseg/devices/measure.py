"""Opening the configured device (open_device, the search's entry point) and timing a run's last figures:
measure_each (a device lost midway costs the numbers, not the run) and measure_quiet (waits for a quiet device).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path

from autoseg.config import DeviceConfig
from autoseg.devices.cache import CachedDevice, LatencyCache
from autoseg.devices.local import LocalDevice
from autoseg.devices.pool import DevicePool
from autoseg.devices.records import (
    DEFAULT_MAX_BUSY_CORES,
    Device,
    DeviceRefused,
    Measurement,
    MeasureSettings,
    flag,
    passing,
    unquiet,
)
from autoseg.devices.ssh import SSHDevice
from autoseg.errors import DeviceUnreachable

log = logging.getLogger(__name__)


def open_device(cfg: DeviceConfig, cache_path: Path | None = None, storage: str | None = None) -> Device:
    """The configured device, wrapped in a latency cache: on the study's database server when it has one
    (`storage`, the search.storage URL: every worker on every host shares what any of them measured), else the
    SQLite file `cache_path`, else (no run: `device check`) in memory.

    Several device.targets make a DevicePool, whose leases live on that server too, or else in a SQLite file
    beside the cache. An unreachable SSH device is replaced by LocalDevice when cfg.fallback == "local"; refusals
    (host key, login, missing packages on the device) always raise.
    """
    dev: Device
    if cfg.targets:  # several: one device given as a list is device.target (config's door)
        dev = DevicePool.open(cfg, cfg.targets, lease_url(cache_path, storage))
    elif cfg.target == "local":
        dev = LocalDevice(cfg.max_busy_cores)
    else:
        try:
            dev = SSHDevice(cfg)
        except DeviceRefused:
            raise
        except DeviceUnreachable as e:
            if cfg.fallback != "local":
                raise
            log.warning("%s; falling back to local measurement, results are labelled source=local", e)
            dev = LocalDevice(cfg.max_busy_cores)
    server = server_url(storage)
    cache = LatencyCache(server or (cache_path if cache_path is not None else ":memory:"))
    return CachedDevice(dev, cache, max_busy_cores=cfg.max_busy_cores, busy_wait_s=cfg.busy_wait_s)


LEASES_FILE = "device_leases.db"


def server_url(storage: str | None) -> str | None:
    """The study's database server, when search.storage names one (a SQLite URL is one host's file)."""
    from autoseg.storage import is_sqlite, unmasked

    if storage is not None and not is_sqlite(storage):
        return unmasked(storage)  # a URL read back from config.yml: the password from PGPASSWORD
    return None


def lease_url(cache_path: Path | None, storage: str | None) -> str:
    """Where a pool's leases live: the study's server when it has one (every worker reaches it), else a SQLite
    file in the run directory, else (no run: `device check`) this process's memory."""
    server = server_url(storage)
    if server is not None:
        return server
    if cache_path is not None and str(cache_path) != ":memory:":
        return f"sqlite:///{Path(cache_path).parent / LEASES_FILE}"
    return "sqlite://"


def measure_each(
    device: Device, models: Mapping[str, bytes], shape: tuple[int, ...], settings: MeasureSettings
) -> tuple[dict[str, Measurement], str | None]:
    """Each model timed in turn on one device, and why the rest were not: a device lost midway.

    For timings taken after the models are saved, where losing the device should cost the numbers,
    not the run.
    """
    timed: dict[str, Measurement] = {}
    for key, blob in models.items():
        try:
            timed[key] = device.measure(blob, shape, settings)
        except DeviceUnreachable as e:
            log.warning("%s; %s and later models left untimed", e, key)
            return timed, str(e)
    return timed, None


QUIET_WAIT_S = 30.0  # the longest wait for a quiet device at the end of a run (not configurable: a bound, not a knob)
QUIET_FIRST_PAUSE_S = 2.0  # then 4, 8, 16 s: a burst of other work is waited out, a long job is not


def measure_quiet(
    device: Device, models: Mapping[str, bytes], shape: tuple[int, ...], settings: MeasureSettings,
    max_wait_s: float = QUIET_WAIT_S,
) -> tuple[dict[str, Measurement], str | None]:
    """measure_each, repeated with back-off while any figure carries a flag a wait can clear, for at most
    max_wait_s of waiting. For the figures a run ends with: the chosen net's, and int8 against float.

    Every model is timed again each round, so a comparison's two figures are taken alike; each keeps its
    quietest one. Flags stay on what never got quiet. The cache is bypassed: its own retry would wait
    beyond max_wait_s, and these models are timed once anyway.
    """
    inner: Device = device.inner if isinstance(device, CachedDevice) else device
    if isinstance(inner, DevicePool):  # the figures are compared: all from one device of the pool
        with inner.one_device() as one:
            return _measure_quiet(device, one, models, shape, settings, max_wait_s)
    return _measure_quiet(device, inner, models, shape, settings, max_wait_s)


def _measure_quiet(
    device: Device, inner: Device, models: Mapping[str, bytes], shape: tuple[int, ...], settings: MeasureSettings,
    max_wait_s: float,
) -> tuple[dict[str, Measurement], str | None]:
    limit = device.max_busy_cores if isinstance(device, CachedDevice) else DEFAULT_MAX_BUSY_CORES
    timed, lost = measure_each(inner, models, shape, settings)
    timed = {k: flag(m, limit) for k, m in timed.items()}
    waited, pause = 0.0, QUIET_FIRST_PAUSE_S
    while lost is None and waited < max_wait_s and any(passing(m.flags) for m in timed.values()):
        pause = min(pause, max_wait_s - waited)
        log.info("device %s: %s; waiting %.0f s for it to get quiet", device.name,
                 "; ".join(dict.fromkeys(f for m in timed.values() for f in passing(m.flags))), pause)
        time.sleep(pause)
        waited, pause = waited + pause, pause * 2
        again, lost = measure_each(inner, models, shape, settings)
        for k, m in again.items():
            m = flag(m, limit)
            if unquiet(m) <= unquiet(timed[k]):
                timed[k] = m
    for k, m in timed.items():
        if passing(m.flags):
            log.warning("device %s: %s timed while %s (waited %.0f s): kept, marked unreliable", device.name, k,
                        "; ".join(passing(m.flags)), waited)
    return timed, lost
