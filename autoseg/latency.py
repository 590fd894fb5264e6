"""Latency measurement: in-process (LocalDevice) or on the edge device over SSH (SSHDevice).

Both sides run the same `edge_agent.bench` code, so local and device numbers are comparable.
`CachedDevice` + `LatencyCache` (SQLite) make sure one graph is measured once per device and settings.
`open_device` is the entry point used by the search.

SSHDevice keeps ONE agent process (`python -m edge_agent serve`) for the whole search and talks
JSON lines (edge_agent.protocol) over the exec channel's stdin/stdout; what the device's shell prints
before the agent's first line is skipped, and every reply is checked against the protocol's schema.
Models travel over SFTP into the agent's own upload folder and are verified by sha256 on the device.
Host keys are checked against known_hosts (RejectPolicy-like);
a new host is recorded only with trust_new_host, a changed key is always refused.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import hashlib
import ipaddress
import json
import logging
import os
import posixpath
import re
import secrets
import shlex
import socket
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import IntEnum
from pathlib import Path
from typing import Any, Literal, Protocol

import paramiko

import edge_agent
from autoseg.config import DeviceConfig
from autoseg.errors import AutosegError, DeviceUnreachable, InputError
from edge_agent import bench as _bench
from edge_agent import fingerprint as _fp
from edge_agent import protocol as _proto

log = logging.getLogger(__name__)

# Where the agent is deployed on the device (overridable for tests or read-only homes).
AGENT_ROOT_ENV = "AUTOSEG_AGENT_ROOT"
DEFAULT_AGENT_ROOT = "~/.cache/autoseg-agent"
_MARKER = ".autoseg-deployed"


# ------------------------------------------------------------------------------------------- records


class MeasureError(IntEnum):
    OK = 0
    REFUSED = 1
    LOAD_FAILED = 2
    RUN_FAILED = 3
    UNREACHABLE = 4


@dataclass(frozen=True)
class MeasureSettings:
    warmup: int = 5
    min_runs: int = 20
    min_seconds: float = 0.5
    threads: int | None = None
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    cooldown_s: float = 0.0
    seed: int = 0

    def key(self) -> str:
        """Stable text form, part of the latency cache key."""
        d = asdict(self)
        d["providers"] = list(self.providers)
        d["min_seconds"] = float(self.min_seconds)
        d["cooldown_s"] = float(self.cooldown_s)
        return json.dumps(d, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Measurement:
    error: MeasureError
    message: str
    stats: dict | None
    source: Literal["device", "local"]
    device: str
    fingerprint: dict
    fingerprint_id: str
    temp_before_c: float | None
    temp_after_c: float | None
    throttled: bool | None
    cached: bool = False
    # Cores other processes kept busy while this was timed (None where the device cannot tell).
    cpu_others: float | None = None
    # The device ran under user-mode emulation (qemu-user): the figure proves function, not timing.
    emulated: bool = False
    # The execution providers the session really ran on (None where not measured).
    providers_used: tuple[str, ...] | None = None
    # Why the figure is not a clean one (measurement_flags): busy, noisy, throttled, warming, emulated.
    flags: tuple[str, ...] = ()

    @property
    def median_ms(self) -> float | None:
        if self.error != MeasureError.OK or not self.stats:
            return None
        return self.stats.get("median_ms")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["error"] = self.error.name
        d["median_ms"] = self.median_ms
        d["flags"] = list(self.flags)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Measurement:
        err = d["error"]
        error = MeasureError[err] if isinstance(err, str) else MeasureError(int(err))
        m = cls(
            error=error,
            message=d.get("message", ""),
            stats=d.get("stats"),
            source=d["source"],
            device=d["device"],
            fingerprint=d.get("fingerprint") or {},
            fingerprint_id=d["fingerprint_id"],
            temp_before_c=d.get("temp_before_c"),
            temp_after_c=d.get("temp_after_c"),
            throttled=d.get("throttled"),
            cached=bool(d.get("cached", False)),
            cpu_others=d.get("cpu_others"),
            emulated=bool(d.get("emulated", False)),
            providers_used=tuple(d["providers_used"]) if d.get("providers_used") else None,
            flags=tuple(d.get("flags") or ()),
        )
        # A record written before flags were kept: judged from its own numbers, at the default limit.
        return m if "flags" in d else flag(m, DEFAULT_MAX_BUSY_CORES)


# ------------------------------------------------------------------ flags: why a figure is not a clean one

DEFAULT_MAX_BUSY_CORES = 0.5  # DeviceConfig.max_busy_cores' default
# A quiet CPU keeps p90 within ~1.2x the median; beyond this the runs were disturbed (the case: 18x).
NOISY_P90_RATIO = 1.5
# std over mean: a spread as wide as half the mean is not one stall among many runs but a disturbed measurement.
NOISY_CV = 0.5
NOISY_MIN_RUNS = 10  # the percentiles of fewer runs say nothing about noise
TEMP_RISE_C = 5.0  # the SoC warming this much while timing: it is on its way to clocking down
FLAG_THROTTLED = "throttled"
FLAG_EMULATED = "emulated"


def measurement_flags(
    stats: Mapping[str, Any] | None,
    cpu_others: float | None,
    throttled: bool | None,
    temp_before_c: float | None,
    temp_after_c: float | None,
    emulated: bool,
    max_busy_cores: float | None,
) -> tuple[str, ...]:
    """Short reasons why a latency is not a clean one; () for a clean one.

    max_busy_cores None switches off the load checks (busy and noisy: both say the machine was shared),
    as `device.max_busy_cores: null` does; throttling, warming and emulation are always flagged.
    """
    flags: list[str] = []
    if max_busy_cores is not None and cpu_others is not None and cpu_others > max_busy_cores:
        flags.append(f"busy: others used {cpu_others:.1f} cores")
    if max_busy_cores is not None and stats and (stats.get("count") or 0) >= NOISY_MIN_RUNS:
        median, p90 = stats.get("median_ms"), stats.get("p90_ms")
        mean, std = stats.get("mean_ms"), stats.get("std_ms")
        if median and p90 is not None and p90 / median > NOISY_P90_RATIO:
            flags.append(f"noisy: p90/median {p90 / median:.1f}")
        elif mean and std is not None and std / mean > NOISY_CV:
            flags.append(f"noisy: CV {std / mean:.2f}")
    if throttled:
        flags.append(FLAG_THROTTLED)
    if temp_before_c is not None and temp_after_c is not None and temp_after_c - temp_before_c > TEMP_RISE_C:
        flags.append(f"temperature rose {temp_after_c - temp_before_c:.1f} °C")
    if emulated:
        flags.append(FLAG_EMULATED)
    return tuple(flags)


def flag(m: Measurement, max_busy_cores: float | None) -> Measurement:
    """m with its flags judged afresh (a failed measurement has no figure to flag)."""
    if m.error != MeasureError.OK:
        return replace(m, flags=())
    # Where the measurement could not tell, the device's own report at connection (a Pi's vcgencmd) stands in.
    throttled = m.throttled if m.throttled is not None else (m.fingerprint or {}).get("throttled")
    return replace(m, flags=measurement_flags(m.stats, m.cpu_others, throttled, m.temp_before_c,
                                              m.temp_after_c, m.emulated, max_busy_cores))


def passing(flags: Sequence[str]) -> tuple[str, ...]:
    """The flags a wait can clear (all but emulation): such a figure is measured again, and never cached."""
    return tuple(f for f in flags if f != FLAG_EMULATED)


def unreliable_note(flags: Sequence[str]) -> str:
    """' (unreliable: ...)' after a figure with flags, '' after a clean one: for summary lines."""
    unique = list(dict.fromkeys(flags))
    return f" (unreliable: {'; '.join(unique)})" if unique else ""


def failure_hint(m: Measurement, opset: int) -> str:
    """What to change when a device cannot measure the models it is sent (m.error is not OK)."""
    ort = (m.fingerprint or {}).get("onnxruntime") or "?"
    where = "this machine" if m.source == "local" else f"{m.device}"
    if m.error == MeasureError.LOAD_FAILED:
        return (f"onnxruntime {ort} on {where} cannot load the models, exported at ONNX opset {opset}: "
                f"lower --opset (export.opset, e.g. 13) to one it supports, or upgrade onnxruntime there")
    if m.error == MeasureError.RUN_FAILED:
        return (f"onnxruntime {ort} on {where} loads the models but cannot run them (out of memory?): "
                "lower --measure-size or allow smaller nets in search.space")
    if m.error == MeasureError.REFUSED:
        return f"the agent on {where} refuses the models: raise device.max_model_mb or allow smaller nets"
    return f"check that {where} is reachable"


class Device(Protocol):
    name: str
    source: str

    def fingerprint(self) -> dict: ...

    def measure(self, model: bytes, shape: tuple[int, ...], settings: MeasureSettings) -> Measurement: ...

    def close(self) -> None: ...


class DeviceRefused(DeviceUnreachable):
    """The device answers but cannot be used as configured (host key, login, missing packages).

    Exit code 3 like DeviceUnreachable, but never retried and never replaced by the local fallback:
    these need the user's attention (a changed host key may be an attack).
    """


class DeviceBusy(DeviceRefused):
    """Another measurement held the device's measurement lock for longer than we wait (exit code 3)."""


def settings_from_config(cfg: DeviceConfig, seed: int = 0) -> MeasureSettings:
    return MeasureSettings(
        warmup=cfg.warmup,
        min_runs=cfg.min_runs,
        min_seconds=float(cfg.min_seconds),
        threads=cfg.threads,
        providers=tuple(cfg.providers),
        cooldown_s=float(cfg.cooldown_s),
        seed=seed,
    )


# ------------------------------------------------------------------------------------------- local


class LocalDevice:
    """Measures in this process with onnxruntime, using the agent's bench code."""

    source = "local"

    def __init__(self, max_busy_cores: float | None = DEFAULT_MAX_BUSY_CORES) -> None:
        self.name = "local"
        self.max_busy_cores = max_busy_cores
        self._fp: dict | None = None

    def fingerprint(self) -> dict:
        if self._fp is None:
            self._fp = _fp.fingerprint()
        return self._fp

    def measure(self, model: bytes, shape: tuple[int, ...], settings: MeasureSettings) -> Measurement:
        fp = self.fingerprint()

        def result(error: MeasureError, message: str, stats: dict | None = None, **extra: Any) -> Measurement:
            return flag(Measurement(
                error=error, message=message, stats=stats, source="local", device=self.name,
                fingerprint=fp, fingerprint_id=_fp.fingerprint_id(fp),
                temp_before_c=extra.get("tb"), temp_after_c=extra.get("ta"), throttled=extra.get("thr"),
                cpu_others=extra.get("busy"), emulated=bool(fp.get("emulated")),
                providers_used=tuple(extra["used"]) if extra.get("used") else None,
            ), self.max_busy_cores)

        try:
            sess = _bench.make_session(bytes(model), settings.threads, list(settings.providers))
        except _bench.ProviderUnavailable as e:
            raise InputError(f"device.providers: {e}") from None
        except Exception as e:  # onnxruntime raises many types for a bad graph
            return result(MeasureError.LOAD_FAILED, _one_line(f"load failed: {e}"))
        try:
            r = _bench.measure_report(sess, list(shape), settings.warmup, settings.min_runs,
                                      settings.min_seconds, seed=settings.seed, cooldown_s=settings.cooldown_s)
        except Exception as e:
            return result(MeasureError.RUN_FAILED, _one_line(f"run failed: {e}"))
        finally:
            del sess
        used = r.get("providers_used") or []
        return result(MeasureError.OK, f"providers: {', '.join(used)}" if used else "", r["stats"],
                      tb=r.get("temp_before_c"), ta=r.get("temp_after_c"), thr=r.get("throttled"),
                      busy=r.get("cpu_others"), used=used)

    def close(self) -> None:
        pass

    def __enter__(self) -> LocalDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------- ssh target


@dataclass(frozen=True)
class SSHTarget:
    user: str
    host: str  # resolved HostName
    port: int
    alias: str  # what the user typed (Host alias or host)
    identity_files: tuple[str, ...] = ()
    proxy_jump: tuple[SSHTarget, ...] = ()
    config_source: str = ""  # how the ssh config was read, for messages: "ssh -G (~/.ssh/config)", ...

    @property
    def name(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    @property
    def hostkey_name(self) -> str:
        # The known_hosts spelling OpenSSH and paramiko use.
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"


def parse_target(target: str, ssh_config: Path | None = None, _hop: bool = False) -> SSHTarget:
    """`user@host`, `user@host:port`, `host` or a Host alias of the ssh config -> SSHTarget."""
    where = "device.target"
    text = target.strip()
    if not text or any(c.isspace() for c in text):
        raise InputError(f"{where}: {target!r} is not a target; use user@host, user@host:port or an ssh Host")
    user, _, rest = text.rpartition("@")
    port: int | None = None
    malformed = InputError(f"{where}: {target!r} is not a target; use user@host, user@host:port, "
                           "user@[ipv6]:port or an ssh Host")
    if rest.startswith("["):  # [ipv6]:port
        host, closed, tail = rest[1:].partition("]")
        if not closed or "[" in host or (tail and not tail.startswith(":")):
            raise malformed
        if tail:
            port = _parse_port(tail[1:], target)
    elif "[" in rest or "]" in rest:
        raise malformed
    elif rest.count(":") == 1:
        host, _, p = rest.partition(":")
        port = _parse_port(p, target)
    elif ":" in rest:  # several colons: a bare IPv6 address, or a mistake like host:22:33
        host = rest
        try:
            ipaddress.IPv6Address(host.partition("%")[0])
        except ValueError:
            raise malformed from None
    else:
        host = rest
    if not host or (user == "" and "@" in text):
        raise InputError(f"{where}: {target!r} has an empty user or host; use user@host[:port]")
    conf = _ssh_config_lookup(host, ssh_config)
    hostname = conf.get("hostname", host)
    user = user or conf.get("user") or getpass.getuser()
    if port is None:
        port = _parse_port(conf.get("port", "22"), f"{target} (Port in ssh config)")
    identity = tuple(os.path.expanduser(p) for p in conf.get("identityfile", []))
    jumps: tuple[SSHTarget, ...] = ()
    pj = conf.get("proxyjump")
    if pj and pj.lower() != "none" and not _hop:
        jumps = tuple(parse_target(h, ssh_config, _hop=True) for h in pj.split(","))
    return SSHTarget(user=user, host=hostname, port=port, alias=host, identity_files=identity,
                     proxy_jump=jumps, config_source=conf.get("_source", "no ssh config"))


def _parse_port(p: str, target: str) -> int:
    if not p.isdigit() or not 0 < int(p) < 65536:
        raise InputError(f"device.target: port in {target!r} must be 1..65535; use user@host:port")
    return int(p)


SSH_G_TIMEOUT_S = 10.0
_DEFAULT_KEY_NAMES = {"id_rsa", "id_ecdsa", "id_ecdsa_sk", "id_ed25519", "id_ed25519_sk", "id_xmss", "id_dsa"}


def _ssh_config_lookup(host: str, path: Path | None) -> dict:
    """What OpenSSH would use for `host`: `ssh -G` where an OpenSSH client is installed (Include, Match,
    wildcards and ProxyJump exactly as ssh reads them), else paramiko's parser of the file (no Include)."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise InputError(f"device.ssh_config: {path} does not exist; fix the path or leave it unset")
    else:
        path = Path("~/.ssh/config").expanduser()
    got = _ssh_g(host, path)
    if got is not None:
        return got
    if not path.is_file():
        return {}
    try:
        conf = dict(paramiko.SSHConfig.from_path(str(path)).lookup(host))
    except Exception as e:  # paramiko raises ConfigParseError and others
        raise InputError(f"device.ssh_config: {path} cannot be parsed ({e}); fix the file") from None
    return {**conf, "_source": f"{path} (paramiko's parser: Include is not followed)"}


def _ssh_g(host: str, path: Path) -> dict | None:
    """`ssh -G [-F path] host` as a dict (identityfile: the files that exist), or None without an ssh client."""
    import shutil
    import subprocess

    ssh = shutil.which("ssh")
    if ssh is None:
        return None
    cmd = [ssh, "-G", *(["-F", str(path)] if path.is_file() else []), "--", host]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=SSH_G_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:  # e.g. a ProxyJump ssh itself calls a loop: paramiko's reading, as before ssh -G
        log.warning("`ssh -G %s` refused the ssh config (%s); reading %s with paramiko instead", host,
                    _one_line(r.stderr) or f"exit {r.returncode}", path)
        return None
    conf: dict[str, Any] = {"identityfile": []}
    for line in r.stdout.splitlines():
        key, _, value = line.partition(" ")
        if key == "identityfile":
            conf["identityfile"].append(value)
        elif key in ("hostname", "user", "port", "proxyjump"):
            conf[key] = value
    # Without an IdentityFile, ssh -G lists its default key names: then paramiko's own key search stands in.
    if {os.path.basename(p) for p in conf["identityfile"]} <= _DEFAULT_KEY_NAMES:
        conf["identityfile"] = []
    if conf.get("proxyjump", "none").lower() == "none":
        conf.pop("proxyjump", None)
    conf["_source"] = f"ssh -G ({path if path.is_file() else 'no config file'}, Include and Match followed)"
    return conf


# ------------------------------------------------------------------------------------------- host keys


def _key_fp(key: paramiko.PKey) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class _HostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Refuse unknown hosts, or with trust_new_host record them in known_hosts (trust on first use)."""

    def __init__(self, known_hosts: Path, trust: bool, device: str) -> None:
        self.known_hosts, self.trust, self.device = known_hosts, trust, device

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        if not self.trust:
            raise DeviceRefused(
                f"device {self.device}: host {hostname} is not in {self.known_hosts} "
                f"({key.get_name()} key {_key_fp(key)}); check that fingerprint on the device "
                f"(ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub) and pass --trust-new-host to record it"
            )
        line = f"{hostname} {key.get_name()} {key.get_base64()}\n"
        try:
            self.known_hosts.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with open(self.known_hosts, "a", encoding="utf-8") as f:
                f.write(line)
        except OSError as e:
            raise InputError(f"device.known_hosts: cannot record the host key in {self.known_hosts} "
                             f"({e.strerror}); give a writable known_hosts file") from None
        client.get_host_keys().add(hostname, key.get_name(), key)
        log.warning("trusting new host key %s %s for %s; recorded in %s",
                    key.get_name(), _key_fp(key), hostname, self.known_hosts)


# ------------------------------------------------------------------------------------------- ssh device


class _Dropped(Exception):
    """The SSH connection or the agent went away; the measurement can be retried after reconnecting.

    agent_exit: the agent process ended while the SSH connection stayed up (killed, crashed, OOM).
    during_model: it happened while a model was being loaded or measured.
    """

    def __init__(self, message: str, agent_exit: bool = False) -> None:
        super().__init__(message)
        self.agent_exit = agent_exit
        self.during_model = False


_REFUSAL_CODES = {"hash_mismatch", "too_large", "outside_cache"}
_LOAD_CODES = {"load_failed", "not_found"}


class SSHDevice:
    """The edge device behind SSH, running one `edge_agent serve` process for the whole search.

    Calls from several threads are serialised by a lock: one agent measures one model at a time.
    """

    def __init__(self, cfg: DeviceConfig, *, _agent_root: str | None = None) -> None:
        self._cfg = cfg
        self.target = parse_target(cfg.target, cfg.ssh_config)
        if cfg.identity_file is not None:
            _check_identity_file(Path(cfg.identity_file).expanduser())
        self._known_hosts = Path(cfg.known_hosts or "~/.ssh/known_hosts").expanduser()
        _check_known_hosts(self._known_hosts)
        self._agent_root = _agent_root or os.environ.get(AGENT_ROOT_ENV) or DEFAULT_AGENT_ROOT
        self._timeout = float(cfg.connect_timeout_s)
        # Bounds that are not worth a config field; private so tests can shorten them.
        self._backoff_base_s = 0.5
        self._backoff_max_s = 8.0
        self._reply_timeout_s = 900.0  # one measure request, whatever the model
        self._lock_timeout_s = 600.0  # waiting for another search's measurement on the device, on top
        self._probe_every_s = 10.0  # liveness check of the connection while waiting for a reply
        self._lock = threading.RLock()
        self._clients: list[paramiko.SSHClient] = []
        self._sftp: paramiko.SFTPClient | None = None
        self._chan: paramiko.Channel | None = None
        self._buf = b""
        self._stderr_tail = b""
        self._nonce = ""
        self._next_id = 0
        self._hello: dict | None = None
        self._fingerprint: dict | None = None
        self._python_ok = False
        self._python = cfg.python
        self._dirs: dict[str, str] = {}
        self._fallback: LocalDevice | None = None
        self._reconnects = 0
        self._connect_with_retry()

    # -- public ---------------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._fallback.name if self._fallback else self.target.name

    @property
    def source(self) -> str:
        return "local" if self._fallback else "device"

    def fingerprint(self) -> dict:
        if self._fallback is not None:
            return self._fallback.fingerprint()
        assert self._fingerprint is not None
        return self._fingerprint

    def measure(self, model: bytes, shape: tuple[int, ...], settings: MeasureSettings) -> Measurement:
        with self._lock:
            if self._fallback is not None:
                return self._fallback.measure(model, shape, settings)
            sha = hashlib.sha256(model).hexdigest()
            limit = int(self._hello["max_model_bytes"]) if self._hello else None
            if limit is not None and len(model) > limit:
                return self._result(MeasureError.REFUSED, f"too_large: model is {len(model)} bytes, "
                                    f"the device accepts at most {limit} (device.max_model_mb)")
            attempt = crashes = 0
            while True:
                try:
                    if self._chan is None:
                        self._connect()
                    return self._measure_once(model, sha, shape, settings)
                except _Dropped as e:
                    reason = str(e)
                    crashes += e.agent_exit and e.during_model
                    if crashes >= 2:
                        # The same model took the agent down twice while the device stayed reachable:
                        # a property of the model (e.g. out of memory), not of the connection.
                        self._teardown()
                        return self._result(MeasureError.RUN_FAILED,
                                            f"the agent died twice while running this model ({reason})")
                except DeviceRefused:
                    raise
                except DeviceUnreachable as e:
                    reason = str(e)
                self._teardown()
                attempt += 1
                if attempt > self._cfg.reconnect_attempts:
                    break
                delay = self._backoff(attempt)
                log.warning("device %s: %s; reconnecting in %.1f s (attempt %d of %d)",
                            self.target.name, reason, delay, attempt, self._cfg.reconnect_attempts)
                time.sleep(delay)
                self._reconnects += 1
            msg = (f"device {self.target.name}: unreachable after {self._cfg.reconnect_attempts} "
                   f"reconnect attempts ({reason})")
            if self._cfg.fallback == "local":
                log.warning("%s; falling back to local measurement, results are labelled source=local", msg)
                self._fallback = LocalDevice(self._cfg.max_busy_cores)
                return self._fallback.measure(model, shape, settings)
            raise DeviceUnreachable(f"{msg}; check the device is on and reachable, or pass --fallback local")

    def close(self) -> None:
        with self._lock:
            if self._chan is not None:
                with contextlib.suppress(_Dropped, AutosegError):
                    self._request("bye", timeout=min(self._timeout, 5.0))
            self._teardown()
            if self._fallback is not None:
                self._fallback.close()

    def __enter__(self) -> SSHDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- for autoseg deploy: this connection, the agent's folder and the device python -----------------------

    @property
    def agent_dir(self) -> str:
        """The device folder holding this host's agent version (run `python -m edge_agent` from there)."""
        return self._dirs["version"]

    @property
    def python(self) -> str:
        return self._python

    def sftp(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            raise DeviceUnreachable(f"device {self.target.name}: not connected")
        return self._sftp

    def run_command(self, cmd: str, timeout: float) -> tuple[int, str]:
        """(exit status, stdout and stderr combined) of a shell command on the device."""
        with self._lock:
            if not self._clients:
                raise DeviceUnreachable(f"device {self.target.name}: not connected")
            try:
                return self._exec_finish(self._exec_start(self._clients[-1], cmd), timeout)
            except _Dropped as e:
                raise DeviceUnreachable(f"device {self.target.name}: {e}") from None

    # -- one measurement ------------------------------------------------------------------------------

    def _measure_once(self, model: bytes, sha: str, shape: Sequence[int], s: MeasureSettings) -> Measurement:
        path = self._upload(model, sha)
        try:
            r = self._request("load", path=path, sha256=sha, timeout=max(120.0, self._timeout))
        except _Dropped as e:
            e.during_model = True
            raise
        if not r.get("ok"):
            return self._from_error(r, "load")
        model_id = r["model_id"]
        try:
            r = self._request(
                "measure", model_id=model_id, shape=[int(d) for d in shape], threads=s.threads,
                providers=list(s.providers), warmup=s.warmup, min_runs=s.min_runs,
                min_seconds=float(s.min_seconds), cooldown_s=float(s.cooldown_s), seed=s.seed,
                lock_timeout_s=self._lock_timeout_s,
                timeout=self._reply_timeout_s + self._lock_timeout_s + s.cooldown_s,
            )
        except _Dropped as e:
            e.during_model = True
            raise
        finally:
            if self._chan is not None:  # the channel is gone after a drop: nothing to unload
                with contextlib.suppress(_Dropped):
                    self._request("unload", model_id=model_id, timeout=max(30.0, self._timeout))
        if not r.get("ok"):
            return self._from_error(r, "measure")
        if (r.get("lock_wait_s") or 0.0) > 1.0:  # the agent times one model at a time, device-wide
            log.info("device %s: waited %.1f s while another search timed a model there", self.name, r["lock_wait_s"])
        used = list(r.get("providers_used") or [])
        if used and used[0] != s.providers[0]:
            log.warning("device %s: asked for %s but the session runs on %s", self.name, s.providers[0], used)
        return self._result(
            MeasureError.OK, f"providers: {', '.join(used)}" if used else "", r["stats"],
            tb=r.get("temp_before_c"), ta=r.get("temp_after_c"), thr=r.get("throttled"),
            busy=r.get("cpu_others"), used=used,
        )

    def _result(self, error: MeasureError, message: str, stats: dict | None = None, **x: Any) -> Measurement:
        fp = self._fingerprint or {}
        return flag(Measurement(
            error=error, message=_one_line(message), stats=stats, source="device", device=self.target.name,
            fingerprint=fp, fingerprint_id=_fp.fingerprint_id(fp) if fp else "",
            temp_before_c=x.get("tb"), temp_after_c=x.get("ta"), throttled=x.get("thr"),
            cpu_others=x.get("busy"), emulated=bool(fp.get("emulated")),
            providers_used=tuple(x["used"]) if x.get("used") else None,
        ), self._cfg.max_busy_cores)

    def _from_error(self, reply: dict, op: str) -> Measurement:
        err = reply.get("error") or {}
        code, text = err.get("code", "?"), err.get("message", "")
        if code in _REFUSAL_CODES:
            return self._result(MeasureError.REFUSED, f"{code}: {text}")
        if code in _LOAD_CODES:
            return self._result(MeasureError.LOAD_FAILED, f"{code}: {text}")
        if code == "run_failed":
            return self._result(MeasureError.RUN_FAILED, f"{code}: {text}")
        if code == "busy":
            raise DeviceBusy(f"device {self.target.name}: {text}; let that measurement finish (or stop it) "
                             "and run again")
        if code == "lock_failed":
            raise DeviceRefused(f"device {self.target.name}: {text}")
        if code == "provider_unavailable":  # the config asks for what this device lacks
            raise InputError(f"device.providers: device {self.target.name}: {text}")
        # bad_request / version / unknown_op: host and agent disagree about the protocol, a bug.
        raise AutosegError(f"device {self.target.name}: agent rejected {op} ({code}: {text})")

    def _upload(self, model: bytes, sha: str) -> str:
        """Put a model into this agent's own upload folder; returns the path to load it by."""
        assert self._sftp is not None
        final = posixpath.join(self._dirs["upload"], f"{sha}.onnx")
        tmp = f"{final}.tmp-{secrets.token_hex(4)}"
        try:
            with self._sftp.open(tmp, "wb") as f:
                f.set_pipelined(True)
                f.write(model)
            self._sftp.posix_rename(tmp, final)  # atomic: the agent never sees a half-written model
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise _Dropped(f"upload failed: {e or type(e).__name__}") from None
        return posixpath.relpath(final, self._dirs["models"])

    # -- JSON lines over the exec channel -------------------------------------------------------------

    def _request(self, op: str, timeout: float | None = None, **fields: Any) -> dict:
        self._next_id += 1
        rid = self._next_id
        self._send_raw(_proto.encode(_proto.request(op, rid, **fields)))
        # One deadline for the reply, however many progress lines come before it.
        deadline = time.monotonic() + (self._reply_timeout_s if timeout is None else timeout)
        while True:
            msg = self._read_message(max(0.0, deadline - time.monotonic()))
            if "progress" in msg:
                if msg["id"] == rid:  # e.g. the device is busy with another search's measurement
                    log.warning("device %s: %s", self.target.name, msg["progress"])
                continue
            if msg.get("id") == rid or (msg.get("id") is None and msg.get("ok") is False):
                try:
                    return _proto.check_reply(msg, op)
                except _proto.ProtocolError as e:
                    self._teardown()
                    raise self._unexpected(e) from None
            log.debug("device %s: ignoring stray reply %s", self.target.name, msg)

    def _send_raw(self, data: bytes) -> None:
        if self._chan is None:
            raise _Dropped("not connected")
        try:
            self._chan.sendall(data)
        except (OSError, EOFError, paramiko.SSHException) as e:
            self._teardown()
            raise _Dropped(f"sending to the agent failed: {e or type(e).__name__}") from None

    def _read_message(self, timeout: float | None = None) -> dict:
        """Next message from the agent, checked against the protocol. Any failure tears the channel down."""
        try:
            line = self._read_line(self._reply_timeout_s if timeout is None else timeout)
            return _proto.decode_reply(line)
        except _proto.ProtocolError as e:
            self._teardown()
            raise self._unexpected(e) from None
        except BaseException:
            self._teardown()
            raise

    def _unexpected(self, e: _proto.ProtocolError) -> DeviceRefused:
        # Not retried: the agent is deployed from this host's own copy, so another attempt would say the same.
        where = self._dirs.get("version", "the agent's folder")
        return DeviceRefused(f"device {self.target.name}: device agent speaks an unexpected protocol: {e}; "
                             f"delete {where} on the device so that autoseg deploys its agent afresh")

    def _read_line(self, timeout: float) -> bytes:
        limit = _proto.MAX_LINE_BYTES + 1
        self._receive_until(lambda buf: b"\n" in buf or len(buf) > limit, timeout)
        line, newline, rest = self._buf.partition(b"\n")
        if not newline or len(line) >= limit:
            raise _proto.ProtocolError("bad_reply", f"line longer than {_proto.MAX_LINE_BYTES} bytes")
        self._buf = rest
        return line

    def _await_ready(self, timeout: float) -> None:
        """Skip what the device printed before the agent's first line (shell start-up files), and say so."""
        marker = _proto.ready_line(self._nonce)
        limit = _proto.MAX_LINE_BYTES
        try:
            self._receive_until(lambda buf: marker in buf or len(buf) > limit + len(marker)
                                or _other_protocol(buf) is not None, timeout)
        except _Dropped as e:
            if e.agent_exit and b"unrecognized arguments: --" in self._stderr_tail:  # a pre-ready-line agent
                raise self._older_agent("1 (or older)") from None
            raise
        junk, found, rest = self._buf.partition(marker)
        if not found and _other_protocol(self._buf) is not None:
            raise self._older_agent(str(_other_protocol(self._buf)))
        if not found:
            self._teardown()
            raise DeviceRefused(f"device {self.target.name}: more than {limit} bytes were printed before the agent "
                                "started; remove the output from the shell start-up files (~/.bashrc) there")
        self._buf = rest
        if junk.strip():
            lines = junk.decode("utf-8", "replace").splitlines()
            shown = " | ".join(ln.strip() for ln in lines if ln.strip())
            log.warning("device %s: skipped %d line%s printed before the agent started (by the shell start-up "
                        "files there?): %s", self.target.name, len(lines), "s" * (len(lines) != 1),
                        shown[:200] + ("..." if len(shown) > 200 else ""))

    def _receive_until(self, done: Callable[[bytes], bool], timeout: float) -> None:
        """Read from the agent's stdout into self._buf until done(self._buf)."""
        chan = self._chan
        if chan is None:
            raise _Dropped("not connected")
        deadline = time.monotonic() + timeout
        next_probe = time.monotonic() + self._probe_every_s
        chan.settimeout(0.25)
        while not done(self._buf):
            self._drain_stderr(chan)
            try:
                data = chan.recv(65536)
            except TimeoutError:
                data = None
            except (OSError, EOFError, paramiko.SSHException) as e:
                raise _Dropped(f"connection lost: {e or type(e).__name__}") from None
            if data == b"":
                self._drain_stderr(chan)
                status = chan.recv_exit_status() if chan.exit_status_ready() else None
                tail = self._stderr_tail.decode("utf-8", "replace").strip().splitlines()[-3:]
                # A working connection after EOF means the agent itself died, not the link.
                try:
                    self._probe()
                except _Dropped as e:
                    raise _Dropped(f"connection lost: {e}") from None
                what = "agent exited" if status is not None else "agent killed"
                raise _Dropped(f"{what} (status {status})" + (f": {' | '.join(tail)}" if tail else ""),
                               agent_exit=True)
            if data:
                self._buf += data
                continue
            now = time.monotonic()
            if now > deadline:
                raise _Dropped(f"no reply from the agent within {timeout:.0f} s")
            if now > next_probe:
                self._probe()
                next_probe = time.monotonic() + self._probe_every_s

    def _drain_stderr(self, chan: paramiko.Channel) -> None:
        # The agent logs to stderr; read it so the window never fills and keep a tail for messages.
        while chan.recv_stderr_ready():
            data = chan.recv_stderr(65536)
            if not data:
                break
            for ln in data.decode("utf-8", "replace").splitlines():
                log.debug("agent %s: %s", self.target.name, ln)
            self._stderr_tail = (self._stderr_tail + data)[-4096:]

    def _probe(self) -> None:
        """Round trip to the SSH server (open + close a session) to notice a dead link while waiting."""
        transport = self._clients[-1].get_transport() if self._clients else None
        if transport is None or not transport.is_active():
            raise _Dropped("connection lost")
        try:
            transport.open_session(timeout=self._timeout).close()
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise _Dropped(f"device stopped answering ({e or type(e).__name__})") from None

    # -- connection ------------------------------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        return min(self._backoff_base_s * 2 ** (attempt - 1), self._backoff_max_s)

    def _connect_with_retry(self) -> None:
        attempt = 0
        while True:
            try:
                self._connect()
                return
            except (DeviceRefused, InputError):
                self._teardown()
                raise
            except (DeviceUnreachable, _Dropped) as e:
                self._teardown()
                attempt += 1
                if attempt > self._cfg.reconnect_attempts:
                    raise DeviceUnreachable(
                        f"device {self.target.name}: cannot connect ({e}); check the device is on, "
                        f"the address and port, or pass --fallback local"
                    ) from None
                delay = self._backoff(attempt)
                log.warning("device %s: %s; retrying in %.1f s", self.target.name, e, delay)
                time.sleep(delay)

    def _connect(self) -> None:
        """SSH (through jump hosts), check python, deploy the agent, start `serve`, hello."""
        self._teardown()
        self._open_clients()
        client = self._clients[-1]
        try:
            self._sftp = client.open_sftp()
            self._sftp.get_channel().settimeout(max(self._timeout, 30.0))
            home = self._sftp.normalize(".")
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise _Dropped(f"SFTP failed: {e or type(e).__name__}") from None
        root = _expand_home(self._agent_root, home)
        version_dir = posixpath.join(root, edge_agent.__version__)
        # The measurement lock is shared by every agent version of this user, in the agent's own 0700 folder.
        self._dirs = {"version": version_dir, "work": posixpath.join(version_dir, "work"),
                      "models": posixpath.join(version_dir, "work", "models"),
                      "lock": posixpath.join(root, "measure.lock")}
        self._python = _expand_home(self._cfg.python, home)
        # The package check runs while the agent is deployed and started (both import onnxruntime,
        # seconds on a Pi); its verdict is read before the agent is used.
        check = None
        if not self._python_ok:
            check = self._exec_start(client, f"{shlex.quote(self._python)} -c {shlex.quote(_CHECK_SCRIPT)}")
        try:
            self._deploy(self._sftp, version_dir)
            _sftp_makedirs(self._sftp, self._dirs["models"])
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise _Dropped(f"deploying the agent failed: {e or type(e).__name__}") from None
        self._spawn_agent(client)
        if check is not None:
            self._check_python(*self._exec_finish(check, timeout=max(60.0, 3 * self._timeout)))
            self._python_ok = True
        self._say_hello()

    def _open_clients(self) -> None:
        hops = [*self.target.proxy_jump, self.target]
        sock = None
        for i, hop in enumerate(hops):
            client = paramiko.SSHClient()
            if self._known_hosts.is_file():
                try:
                    client.load_system_host_keys(str(self._known_hosts))
                except (OSError, paramiko.SSHException, ValueError) as e:
                    raise InputError(
                        f"device.known_hosts: {self._known_hosts} cannot be read ({e}); fix or remove it"
                    ) from None
            client.set_missing_host_key_policy(
                _HostKeyPolicy(self._known_hosts, self._cfg.trust_new_host, self.target.name))
            self._clients.append(client)
            # A jump host without its own IdentityFile tries the device's, the usual setup.
            files = hop.identity_files or self.target.identity_files
            keys = ([str(Path(self._cfg.identity_file).expanduser())] if self._cfg.identity_file
                    else [p for p in files if os.path.isfile(p)])
            try:
                client.connect(
                    hop.host, port=hop.port, username=hop.user, key_filename=keys or None,
                    look_for_keys=not keys, allow_agent=True, sock=sock, timeout=self._timeout,
                    banner_timeout=self._timeout, auth_timeout=self._timeout, channel_timeout=self._timeout,
                )
            except paramiko.BadHostKeyException as e:
                raise DeviceRefused(
                    f"device {self.target.name}: host key of {hop.hostkey_name} has CHANGED "
                    f"(known_hosts has {_key_fp(e.expected_key)}, the server sent {_key_fp(e.key)}); "
                    "this may be an attack. If the device was reinstalled, remove the old key with "
                    f"`ssh-keygen -R '{hop.hostkey_name}' -f {self._known_hosts}` "
                    "and connect with --trust-new-host"
                ) from None
            except paramiko.AuthenticationException as e:
                raise self._login_refused(hop, keys, str(e)) from None
            except socket.gaierror as e:  # no such name: waiting will not make one, so no retries
                unmatched = (f"; no Host entry matched '{hop.alias}' in the ssh config read by {hop.config_source}"
                             if hop.host == hop.alias else f" (Host '{hop.alias}' in {hop.config_source})")
                raise DeviceRefused(f"device {hop.alias}: cannot resolve host name '{hop.host}' ({e.strerror})"
                                    f"{unmatched}; check the name or add a Host entry") from None
            except (OSError, EOFError, paramiko.SSHException) as e:
                if "No authentication methods available" in str(e):  # no key file, no agent
                    raise self._login_refused(hop, keys, "no key or ssh-agent available") from None
                where = f"{hop.user}@{hop.host}:{hop.port}"
                raise DeviceUnreachable(f"{where}: {e or type(e).__name__}") from None
            transport = client.get_transport()
            assert transport is not None
            transport.set_keepalive(15)
            if i + 1 < len(hops):
                nxt = hops[i + 1]
                try:
                    sock = transport.open_channel("direct-tcpip", (nxt.host, nxt.port), ("127.0.0.1", 0),
                                                  timeout=self._timeout)
                except (OSError, EOFError, paramiko.SSHException) as e:
                    raise DeviceUnreachable(
                        f"jump host {hop.host} cannot reach {nxt.host}:{nxt.port} ({e or type(e).__name__})"
                    ) from None

    def _login_refused(self, hop: SSHTarget, keys: list[str], why: str) -> DeviceRefused:
        tried = f"key {keys[0]}" if keys else "ssh-agent and ~/.ssh/id_* keys"
        return DeviceRefused(
            f"device {self.target.name}: login as {hop.user}@{hop.host}:{hop.port} refused ({why}; tried "
            f"{tried}); add your public key to ~/.ssh/authorized_keys on the device or pass --identity-file"
        )

    def _exec_start(self, client: paramiko.SSHClient, cmd: str) -> paramiko.Channel:
        """Start a short command; its stdout and stderr are combined."""
        transport = client.get_transport()
        assert transport is not None
        try:
            chan = transport.open_session(timeout=self._timeout)
            chan.set_combine_stderr(True)
            chan.exec_command(cmd)
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise _Dropped(f"running a command failed: {e or type(e).__name__}") from None
        return chan

    def _exec_finish(self, chan: paramiko.Channel, timeout: float) -> tuple[int, str]:
        """(exit status, output) of a command started by _exec_start."""
        out = b""
        deadline = time.monotonic() + timeout
        try:
            chan.settimeout(timeout)
            while data := chan.recv(65536):
                out += data
                if time.monotonic() > deadline:
                    raise TimeoutError()
            status = chan.recv_exit_status()
        except TimeoutError:
            raise _Dropped(f"a command did not finish within {timeout:.0f} s") from None
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise _Dropped(f"running a command failed: {e or type(e).__name__}") from None
        finally:
            chan.close()
        return status, out.decode("utf-8", "replace")

    def _check_python(self, status: int, out: str) -> None:
        """Turn the output of _CHECK_SCRIPT into a clear refusal when the device python is unusable."""
        py = self._python
        where = f"device {self.target.name}"
        fix = "pass --device-python /path/to/venv/bin/python"
        # On a line of its own: a shell start-up file may have printed before it (without a newline, even).
        line = next((ln for ln in out.splitlines() if ln.startswith("AUTOSEG-CHECK ")), None)
        if line is None:
            if status == 127:
                raise DeviceRefused(f"{where}: {py} not found; install Python >= 3.8 on the device or {fix}")
            raise DeviceRefused(f"{where}: `{py}` failed (exit {status}: {_one_line(out)[-200:]}); {fix}")
        info = json.loads(line.split(" ", 1)[1])
        if tuple(info["python"][:2]) < (3, 8):
            raise DeviceRefused(f"{where}: {py} is Python {'.'.join(map(str, info['python']))}, "
                                f"the agent needs >= 3.8; {fix}")
        if info["missing"]:
            names = " and ".join(info["missing"])
            raise DeviceRefused(f"{where}: {names} missing for {py}; {_install_hint(py, info)}, or {fix}")

    def _deploy(self, sftp: paramiko.SFTPClient, version_dir: str) -> None:
        """Upload edge_agent once per version and content (a marker holds the content hash)."""
        files = _agent_files()
        digest = _files_digest(files)
        final = posixpath.join(version_dir, "edge_agent")
        marker = posixpath.join(final, _MARKER)
        if _sftp_read(sftp, marker) == digest.encode():
            return
        log.info("device %s: deploying edge_agent %s to %s", self.target.name, edge_agent.__version__, final)
        nonce = secrets.token_hex(4)
        tmp = posixpath.join(version_dir, f".edge_agent.{nonce}")
        for rel, data in files.items():
            path = posixpath.join(tmp, rel)
            _sftp_makedirs(sftp, posixpath.dirname(path))
            with sftp.open(path, "wb") as f:
                f.write(data)
        with sftp.open(posixpath.join(tmp, _MARKER), "wb") as f:
            f.write(digest.encode())
        if _sftp_exists(sftp, final):
            old = posixpath.join(version_dir, f".edge_agent.old.{nonce}")
            sftp.rename(final, old)
            _sftp_rmtree(sftp, old)
        try:
            sftp.rename(tmp, final)
        except OSError:
            # Another host process deployed at the same moment: fine if it left the same content.
            _sftp_rmtree(sftp, tmp)
            if _sftp_read(sftp, marker) != digest.encode():
                raise

    def _spawn_agent(self, client: paramiko.SSHClient) -> None:
        transport = client.get_transport()
        assert transport is not None
        self._nonce = secrets.token_hex(8)
        cmd = (f"cd {shlex.quote(self._dirs['version'])} && exec {shlex.quote(self._python)} "
               f"-m edge_agent serve --cache-dir {shlex.quote(self._dirs['work'])} "
               f"--max-model-mb {self._cfg.max_model_mb:g} --lock {shlex.quote(self._dirs['lock'])} "
               f"--nonce {self._nonce}")
        try:
            chan = transport.open_session(timeout=self._timeout)
            chan.exec_command(cmd)
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise _Dropped(f"starting the agent failed: {e or type(e).__name__}") from None
        self._chan, self._buf, self._stderr_tail = chan, b"", b""

    def _say_hello(self) -> None:
        timeout = max(60.0, 3 * self._timeout)
        self._await_ready(timeout)
        hello = self._request("hello", timeout=timeout)
        if not hello.get("ok"):
            err = hello.get("error") or {}
            raise DeviceRefused(f"device {self.target.name}: agent refused hello ({err.get('code')}: "
                                f"{err.get('message')})")
        want = (_proto.PROTOCOL_VERSION, edge_agent.__version__)
        got = (hello.get("protocol"), hello.get("agent_version"))
        if got != want:
            raise DeviceRefused(
                f"device {self.target.name}: agent speaks protocol/version {got[0]}/{got[1]}, "
                f"this host needs {want[0]}/{want[1]}; "
                f"delete {self._dirs['version']} on the device and retry"
            )
        fp = hello["fingerprint"]
        if self._fingerprint is not None and _fp.fingerprint_id(fp) != _fp.fingerprint_id(self._fingerprint):
            log.warning("device %s: fingerprint changed after reconnecting (different machine or software?)",
                        self.target.name)
        self._hello, self._fingerprint = hello, fp
        self._dirs["upload"] = posixpath.join(self._dirs["models"], hello["upload_dir"])
        log.info("device %s: agent %s ready (%s, %s cores, onnxruntime %s)", self.target.name,
                 hello.get("agent_version"), fp.get("cpu_model"), fp.get("cores"), fp.get("onnxruntime"))

    def _older_agent(self, version: str) -> DeviceRefused:
        self._teardown()
        return DeviceRefused(
            f"device {self.target.name}: the agent that started there speaks protocol {version}, this host needs "
            f"{_proto.PROTOCOL_VERSION} (edge_agent {edge_agent.__version__}): {self._python} imports an older "
            f"edge_agent than the one autoseg deployed to {self._dirs.get('version')}; upgrade or remove it there "
            f"(`{self._python} -m pip uninstall autoseg-edge-agent`) and retry")

    def _teardown(self) -> None:
        """Close channel, SFTP and clients (innermost first); safe to call at any time."""
        for obj in (self._chan, self._sftp, *reversed(self._clients)):
            if obj is not None:
                with contextlib.suppress(Exception):  # closing a dead connection may raise anything
                    obj.close()
        self._chan, self._sftp, self._clients, self._buf = None, None, [], b""


_CHECK_SCRIPT = """\
import json, os, sys, sysconfig
from importlib.util import find_spec
missing = []
for name in ("numpy", "onnxruntime"):
    try:
        __import__(name)
    except Exception:
        missing.append(name)
venv = sys.prefix != getattr(sys, "base_prefix", sys.prefix)
managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
print("\\nAUTOSEG-CHECK " + json.dumps({"python": list(sys.version_info[:3]), "missing": missing,
      "venv": venv, "managed": managed and not venv, "pip": find_spec("pip") is not None,
      "ensurepip": find_spec("ensurepip") is not None, "jetson": os.path.exists("/etc/nv_tegra_release")}))
"""


def _install_hint(py: str, info: dict) -> str:
    """The command that installs numpy and onnxruntime for `py` on this device, from what the check saw."""
    pkgs = "onnxruntime numpy"
    if info.get("jetson") and "onnxruntime" in info.get("missing", ()):
        # PyPI's aarch64 onnxruntime has no CUDA: Jetsons use NVIDIA's onnxruntime-gpu wheel for their JetPack.
        pkgs = "numpy and NVIDIA's onnxruntime-gpu wheel for your JetPack (https://elinux.org/Jetson_Zoo)"
        return f"install {pkgs} with `{py} -m pip install ...`"
    if info.get("managed"):  # Debian 12 / Raspberry Pi OS bookworm refuse pip in the system python (PEP 668)
        venv = "python3 -m venv ~/autoseg-venv" if info.get("ensurepip", True) else \
            "sudo apt install python3-venv && python3 -m venv ~/autoseg-venv"
        return (f"this python is managed by the system, so create a venv there: `{venv} && "
                f"~/autoseg-venv/bin/pip install {pkgs}`, then pass --device-python ~/autoseg-venv/bin/python")
    if not info.get("pip", True):
        return (f"pip is missing: `{py} -m ensurepip --upgrade` (or `sudo apt install python3-pip`), then "
                f"`{py} -m pip install {pkgs}`")
    return f"run `{py} -m pip install {pkgs}` on the device"


_READY = re.compile(rb'\{"v":(\d+),"ready":"edge_agent"')


def _other_protocol(buf: bytes) -> int | None:
    """The protocol of an agent whose ready line is not ours (an older agent started), or None."""
    for m in _READY.finditer(buf):
        if int(m.group(1)) != _proto.PROTOCOL_VERSION:
            return int(m.group(1))
    return None


def _check_identity_file(path: Path) -> None:
    """A key file that is missing, not a file or not a private key: one line naming it (exit 2)."""
    fix = "give the path of your private key (e.g. ~/.ssh/id_ed25519, not the .pub file) or leave it unset"
    if not path.exists():
        raise InputError(f"device.identity_file: {path} does not exist; {fix}")
    if not path.is_file():
        raise InputError(f"device.identity_file: {path} is not a file; {fix}")
    try:
        paramiko.PKey.from_path(str(path))
    except OSError as e:
        raise InputError(f"device.identity_file: {path} cannot be read ({e.strerror}); {fix}") from None
    except (TypeError, paramiko.PasswordRequiredException):
        pass  # an encrypted key: usable through ssh-agent
    except Exception as e:  # paramiko and cryptography raise ValueError, SSHException, UnknownKeyType, ...
        raise InputError(f"device.identity_file: {path} is not a private key ({_one_line(str(e))[:120]}); "
                         f"{fix}") from None


def _check_known_hosts(path: Path) -> None:
    if path.exists() and not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file"
        raise InputError(f"device.known_hosts: {path} is {kind}; give the known_hosts file itself "
                         "(default ~/.ssh/known_hosts)")


def _expand_home(path: str, home: str) -> str:
    if path == "~":
        return home
    if path.startswith("~/"):
        return posixpath.join(home, path[2:])
    return path


def _agent_files() -> dict[str, bytes]:
    pkg = Path(edge_agent.__file__).parent
    return {p.relative_to(pkg).as_posix(): p.read_bytes()
            for p in sorted(pkg.rglob("*.py")) if "__pycache__" not in p.parts}


def _files_digest(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for rel, data in sorted(files.items()):
        h.update(rel.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return h.hexdigest()


def _sftp_exists(sftp: paramiko.SFTPClient, path: str) -> bool:
    try:
        sftp.stat(path)
        return True
    except FileNotFoundError:
        return False


def _sftp_read(sftp: paramiko.SFTPClient, path: str) -> bytes | None:
    try:
        with sftp.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _sftp_makedirs(sftp: paramiko.SFTPClient, path: str) -> None:
    parts = path.split("/")
    for i in range(1, len(parts) + 1):
        sub = "/".join(parts[:i])
        if not sub or sub in (".", "~") or _sftp_exists(sftp, sub):
            continue
        try:
            sftp.mkdir(sub, 0o700)
        except OSError:
            if not _sftp_exists(sftp, sub):  # lost a race with another process: fine
                raise


def _sftp_rmtree(sftp: paramiko.SFTPClient, path: str) -> None:
    for entry in sftp.listdir_attr(path):
        sub = posixpath.join(path, entry.filename)
        if stat.S_ISDIR(entry.st_mode or 0):
            _sftp_rmtree(sftp, sub)
        else:
            sftp.remove(sub)
    sftp.rmdir(path)


# onnxruntime prefixes its errors with the C++ source line and function signature: noise to a user.
_ORT_SOURCE = re.compile(r"\S*onnxruntime\S*/\S+:\d+ (?:[^()]*\((?:[^()]|\([^()]*\))*\) )?")


def _one_line(text: str) -> str:
    return _ORT_SOURCE.sub("", " ".join(str(text).split()))


# ------------------------------------------------------------------------------------------- cache


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
            m = min((m, again), key=_unquiet)
        self.busy_streak = self.busy_streak + 1 if passing(m.flags) else 0
        if passing(m.flags):
            log.warning("device %s: %s: latency may be inflated and is not cached", self.name,
                        "; ".join(passing(m.flags)))
            return replace(m, message=_one_line(f"{m.message}; not cached: {'; '.join(passing(m.flags))}"))
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


def open_device(cfg: DeviceConfig, cache_path: Path | None = None) -> Device:
    """The configured device, wrapped in a latency cache (in memory when cache_path is None).

    An unreachable SSH device is replaced by LocalDevice when cfg.fallback == "local"; refusals
    (host key, login, missing packages on the device) always raise.
    """
    dev: Device
    if cfg.target == "local":
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
    cache = LatencyCache(cache_path if cache_path is not None else ":memory:")
    return CachedDevice(dev, cache, max_busy_cores=cfg.max_busy_cores, busy_wait_s=cfg.busy_wait_s)


def _unquiet(m: Measurement) -> tuple[bool, int, float]:
    """Sort key: a figure before a failure, then fewer flags a wait can clear, then the less busy device."""
    return m.error != MeasureError.OK, len(passing(m.flags)), m.cpu_others if m.cpu_others is not None else 0.0


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


QUIET_WAIT_S = 30.0  # DeviceConfig.quiet_wait_s' default: the longest wait for a quiet device at the end of a run
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
    limit = device.max_busy_cores if isinstance(device, CachedDevice) else DEFAULT_MAX_BUSY_CORES
    inner: Device = device.inner if isinstance(device, CachedDevice) else device
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
            if _unquiet(m) <= _unquiet(timed[k]):
                timed[k] = m
    for k, m in timed.items():
        if passing(m.flags):
            log.warning("device %s: %s timed while %s (waited %.0f s): kept, marked unreliable", device.name, k,
                        "; ".join(passing(m.flags)), waited)
    return timed, lost
