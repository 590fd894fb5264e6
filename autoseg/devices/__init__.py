"""Latency measurement: in-process (LocalDevice) or on the edge device over SSH (SSHDevice).

Both sides run the same `edge_agent.bench` code, so local and device numbers are comparable.
`CachedDevice` + `LatencyCache` (SQLite) make sure one graph is measured once per device and settings.
`open_device` is the entry point used by the search.

records: settings, results, flags, the Device protocol; local: LocalDevice; ssh: SSHDevice and its agent
protocol; ssh_config: target, ssh config and host keys; ssh_link: the connection and short commands;
deploy_agent: device python check and agent upload; cache: LatencyCache, CachedDevice; pool: DevicePool, several
devices of one kind leased measurement by measurement; measure: open_device, measure_each, measure_quiet.
"""

from autoseg.devices.cache import CachedDevice, LatencyCache
from autoseg.devices.deploy_agent import AGENT_ROOT_ENV
from autoseg.devices.local import LocalDevice
from autoseg.devices.measure import measure_each, measure_quiet, open_device
from autoseg.devices.pool import DevicePool
from autoseg.devices.records import (
    Device,
    DeviceBusy,
    DeviceRefused,
    MeasureError,
    Measurement,
    MeasureSettings,
    failure_hint,
    flag,
    measurement_flags,
    passing,
    settings_from_config,
    unreliable_note,
)
from autoseg.devices.ssh import SSHDevice
from autoseg.devices.ssh_config import SSHTarget, parse_target

__all__ = [
    "AGENT_ROOT_ENV",
    "CachedDevice",
    "Device",
    "DeviceBusy",
    "DevicePool",
    "DeviceRefused",
    "LatencyCache",
    "LocalDevice",
    "MeasureError",
    "MeasureSettings",
    "Measurement",
    "SSHDevice",
    "SSHTarget",
    "failure_hint",
    "flag",
    "measure_each",
    "measure_quiet",
    "measurement_flags",
    "open_device",
    "parse_target",
    "passing",
    "settings_from_config",
    "unreliable_note",
]
