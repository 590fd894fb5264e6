"""SSHDevice: latency measured on the edge device over SSH.

It keeps ONE agent process (`python -m edge_agent serve`) for the whole search and talks
JSON lines (edge_agent.protocol) over the exec channel's stdin/stdout; what the device's shell prints
before the agent's first line is skipped, and every reply is checked against the protocol's schema.
Models travel over SFTP into the agent's own upload folder and are verified by sha256 on the device.
A lost connection is retried with back-off, then replaced by LocalDevice with fallback: local.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import re
import secrets
import shlex
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import paramiko

import edge_agent
from autoseg.config import DeviceConfig
from autoseg.devices.deploy_agent import (
    AGENT_ROOT_ENV,
    CHECK_SCRIPT,
    DEFAULT_AGENT_ROOT,
    check_python,
    deploy,
    expand_home,
    sftp_makedirs,
)
from autoseg.devices.local import LocalDevice
from autoseg.devices.records import (
    DeviceBusy,
    DeviceRefused,
    MeasureError,
    Measurement,
    MeasureSettings,
    flag,
    one_line,
)
from autoseg.devices.ssh_config import check_identity_file, check_known_hosts, parse_target
from autoseg.devices.ssh_link import Dropped, exec_finish, exec_start, open_clients
from autoseg.errors import AutosegError, DeviceUnreachable, InputError
from edge_agent import fingerprint as _fp
from edge_agent import protocol as _proto

log = logging.getLogger(__name__)


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
            check_identity_file(Path(cfg.identity_file).expanduser())
        self._known_hosts = Path(cfg.known_hosts or "~/.ssh/known_hosts").expanduser()
        check_known_hosts(self._known_hosts)
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
                except Dropped as e:
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
                with contextlib.suppress(Dropped, AutosegError):
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
                return exec_finish(exec_start(self._clients[-1], cmd, self._timeout), timeout)
            except Dropped as e:
                raise DeviceUnreachable(f"device {self.target.name}: {e}") from None

    # -- one measurement ------------------------------------------------------------------------------

    def _measure_once(self, model: bytes, sha: str, shape: Sequence[int], s: MeasureSettings) -> Measurement:
        path = self._upload(model, sha)
        try:
            r = self._request("load", path=path, sha256=sha, timeout=max(120.0, self._timeout))
        except Dropped as e:
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
        except Dropped as e:
            e.during_model = True
            raise
        finally:
            if self._chan is not None:  # the channel is gone after a drop: nothing to unload
                with contextlib.suppress(Dropped):
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
            error=error, message=one_line(message), stats=stats, source="device", device=self.target.name,
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
            raise Dropped(f"upload failed: {e or type(e).__name__}") from None
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
            raise Dropped("not connected")
        try:
            self._chan.sendall(data)
        except (OSError, EOFError, paramiko.SSHException) as e:
            self._teardown()
            raise Dropped(f"sending to the agent failed: {e or type(e).__name__}") from None

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
        except Dropped as e:
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
            raise Dropped("not connected")
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
                raise Dropped(f"connection lost: {e or type(e).__name__}") from None
            if data == b"":
                self._drain_stderr(chan)
                status = chan.recv_exit_status() if chan.exit_status_ready() else None
                tail = self._stderr_tail.decode("utf-8", "replace").strip().splitlines()[-3:]
                # A working connection after EOF means the agent itself died, not the link.
                try:
                    self._probe()
                except Dropped as e:
                    raise Dropped(f"connection lost: {e}") from None
                what = "agent exited" if status is not None else "agent killed"
                raise Dropped(f"{what} (status {status})" + (f": {' | '.join(tail)}" if tail else ""),
                               agent_exit=True)
            if data:
                self._buf += data
                continue
            now = time.monotonic()
            if now > deadline:
                raise Dropped(f"no reply from the agent within {timeout:.0f} s")
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
            raise Dropped("connection lost")
        try:
            transport.open_session(timeout=self._timeout).close()
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise Dropped(f"device stopped answering ({e or type(e).__name__})") from None

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
            except (DeviceUnreachable, Dropped) as e:
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
        open_clients(self.target, self._cfg, self._known_hosts, self._timeout, self._clients)
        client = self._clients[-1]
        try:
            self._sftp = client.open_sftp()
            self._sftp.get_channel().settimeout(max(self._timeout, 30.0))
            home = self._sftp.normalize(".")
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise Dropped(f"SFTP failed: {e or type(e).__name__}") from None
        root = expand_home(self._agent_root, home)
        version_dir = posixpath.join(root, edge_agent.__version__)
        # The measurement lock is shared by every agent version of this user, in the agent's own 0700 folder.
        self._dirs = {"version": version_dir, "work": posixpath.join(version_dir, "work"),
                      "models": posixpath.join(version_dir, "work", "models"),
                      "lock": posixpath.join(root, "measure.lock")}
        self._python = expand_home(self._cfg.python, home)
        # The package check runs while the agent is deployed and started (both import onnxruntime,
        # seconds on a Pi); its verdict is read before the agent is used.
        check = None
        if not self._python_ok:
            check = exec_start(client, f"{shlex.quote(self._python)} -c {shlex.quote(CHECK_SCRIPT)}", self._timeout)
        try:
            deploy(self._sftp, version_dir, self.target.name)
            sftp_makedirs(self._sftp, self._dirs["models"])
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise Dropped(f"deploying the agent failed: {e or type(e).__name__}") from None
        self._spawn_agent(client)
        if check is not None:
            check_python(*exec_finish(check, timeout=max(60.0, 3 * self._timeout)), self._python, self.target.name)
            self._python_ok = True
        self._say_hello()

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
            raise Dropped(f"starting the agent failed: {e or type(e).__name__}") from None
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



_READY = re.compile(rb'\{"v":(\d+),"ready":"edge_agent"')


def _other_protocol(buf: bytes) -> int | None:
    """The protocol of an agent whose ready line is not ours (an older agent started), or None."""
    for m in _READY.finditer(buf):
        if int(m.group(1)) != _proto.PROTOCOL_VERSION:
            return int(m.group(1))
    return None
