"""autoseg.devices on real components: in-process onnxruntime and a real OpenSSH server on 127.0.0.1.

Budget: < 60 s in total, about 30 s on 2 idle cores (tiny model, warmup 1, min_runs 3, min_seconds 0.02;
1 s measurements are interrupted on purpose). SSH tests carry the `ssh` marker and skip when /usr/sbin/sshd is absent.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import onnx
import pytest
from onnx_models import conv_relu_onnx
from sshd_server import keygen

from autoseg.config import DeviceConfig
from autoseg.devices import (
    AGENT_ROOT_ENV,
    CachedDevice,
    DeviceRefused,
    LatencyCache,
    LocalDevice,
    MeasureError,
    Measurement,
    MeasureSettings,
    SSHDevice,
    failure_hint,
    measure_each,
    open_device,
    parse_target,
    settings_from_config,
)
from autoseg.devices.cache import _graph_hash
from autoseg.errors import DeviceUnreachable, InputError
from edge_agent.fingerprint import fingerprint_id

FAST = MeasureSettings(warmup=1, min_runs=3, min_seconds=0.02)
SHAPE = (1, 3, 32, 32)
STATS_KEYS = {"min_ms", "median_ms", "mean_ms", "p90_ms", "p99_ms", "std_ms", "count"}


def make_ssh_device(cfg: DeviceConfig, agent_root: Path) -> SSHDevice:
    dev = SSHDevice(cfg, _agent_root=str(agent_root))
    dev._backoff_base_s = 0.05  # keep reconnect tests fast
    return dev


class CountingDevice:
    """A real device that counts how often it is asked to measure."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0
        self.name, self.source = inner.name, inner.source

    def fingerprint(self) -> dict:
        return self.inner.fingerprint()

    def measure(self, model, shape, settings) -> Measurement:
        self.calls += 1
        return self.inner.measure(model, shape, settings)

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------- pure parts


def test_settings_key_is_stable_and_distinguishes_settings():
    assert MeasureSettings().key() == MeasureSettings().key()
    keys = {MeasureSettings().key(), MeasureSettings(threads=2).key(), MeasureSettings(seed=1).key(),
            MeasureSettings(providers=("CUDAExecutionProvider",)).key(), MeasureSettings(min_runs=3).key()}
    assert len(keys) == 5
    json.loads(MeasureSettings().key())


def test_settings_from_config():
    cfg = DeviceConfig(warmup=2, min_runs=4, min_seconds=0.1, threads=3, providers=["A", "B"], cooldown_s=1.0)
    s = settings_from_config(cfg, seed=7)
    assert s == MeasureSettings(warmup=2, min_runs=4, min_seconds=0.1, threads=3, providers=("A", "B"),
                                cooldown_s=1.0, seed=7)


def test_measurement_dict_round_trip():
    m = Measurement(MeasureError.OK, "", {"median_ms": 1.5, "count": 3}, "device", "pi@h:22", {"cores": 4},
                    "ab" * 8, 40.0, 41.0, False)
    d = m.to_dict()
    assert d["error"] == "OK" and d["median_ms"] == 1.5
    assert Measurement.from_dict(json.loads(json.dumps(d))) == m
    bad = replace(m, error=MeasureError.REFUSED, stats=None)
    assert bad.median_ms is None and Measurement.from_dict(bad.to_dict()).error == MeasureError.REFUSED


def test_parse_target_forms(tmp_path):
    empty = tmp_path / "empty_config"
    empty.write_text("")
    t = parse_target("pi@raspberrypi.local", empty)
    assert (t.user, t.host, t.port, t.name) == ("pi", "raspberrypi.local", 22, "pi@raspberrypi.local:22")
    assert t.hostkey_name == "raspberrypi.local"
    t = parse_target("pi@10.0.0.7:2222", empty)
    assert (t.user, t.host, t.port, t.hostkey_name) == ("pi", "10.0.0.7", 2222, "[10.0.0.7]:2222")
    t = parse_target("jetson", empty)
    assert t.host == "jetson" and t.user  # the local user name, as ssh does
    t = parse_target("pi@[::1]:2200", empty)
    assert (t.host, t.port) == ("::1", 2200)
    t = parse_target("pi@fe80::1", empty)  # a bare IPv6 address, no port
    assert (t.host, t.port) == ("fe80::1", 22)
    bad_targets = ("", "pi@", "pi@host:99999", "pi@host:x", "pi@ho st", "u@h:22:33", "pi@[::1", "pi@[::1]x",
                   "pi@[]:22", "pi@[::1]:", "pi@h]:22", "pi@h[1]", "pi@:22", "@host")
    for bad in bad_targets:
        with pytest.raises(InputError, match=r"device\.target") as err:
            parse_target(bad, empty)
        assert err.value.exit_code == 2 and "\n" not in str(err.value)


def test_parse_target_reads_ssh_config_alias(tmp_path):
    conf = tmp_path / "ssh_config"
    conf.write_text(
        "Host bastion\n  HostName 192.0.2.1\n  User jump\n  Port 2022\n\n"
        "Host mypi\n  HostName 192.0.2.10\n  User pi\n  Port 2200\n  IdentityFile ~/.ssh/pi_key\n"
        "  ProxyJump bastion\n"
    )
    t = parse_target("mypi", conf)
    assert (t.user, t.host, t.port, t.alias) == ("pi", "192.0.2.10", 2200, "mypi")
    assert t.identity_files == (os.path.expanduser("~/.ssh/pi_key"),)
    assert [(j.user, j.host, j.port) for j in t.proxy_jump] == [("jump", "192.0.2.1", 2022)]
    # Explicit user and port win over the config, as with ssh.
    t = parse_target("root@mypi:22", conf)
    assert (t.user, t.port) == ("root", 22)


def test_missing_ssh_config_is_input_error(tmp_path):
    with pytest.raises(InputError, match=r"device\.ssh_config"):
        parse_target("pi@host", tmp_path / "nope")


def test_missing_identity_file_is_input_error(tmp_path):
    cfg = DeviceConfig(target="pi@192.0.2.1", identity_file=tmp_path / "no_key", ssh_config=tmp_path / "cfg")
    (tmp_path / "cfg").write_text("")
    with pytest.raises(InputError, match=r"device\.identity_file"):
        SSHDevice(cfg)  # refused before any network traffic


def test_graph_hash_ignores_names_but_not_weights():
    a = conv_relu_onnx(graph_name="first")
    b = conv_relu_onnx(graph_name="second")
    assert a != b and _graph_hash(a) == _graph_hash(b)
    proto = onnx.load_from_string(a)
    proto.producer_name, proto.doc_string = "someone else", "docs"
    assert _graph_hash(proto.SerializeToString()) == _graph_hash(a)
    assert _graph_hash(conv_relu_onnx(seed=1)) != _graph_hash(a)
    assert _graph_hash(b"not onnx at all") == _graph_hash(b"not onnx at all")


def test_latency_cache_persists_in_wal_mode(tmp_path):
    path = tmp_path / "sub" / "latency_cache.db"
    cache = LatencyCache(path)
    assert cache.get("g", "f", "s") is None
    cache.put("g", "f", "s", {"median_ms": 2.0})
    cache.put("g", "f", "s", {"median_ms": 3.0})  # replaces
    cache.close()
    again = LatencyCache(path)
    assert again.get("g", "f", "s") == {"median_ms": 3.0}
    assert again.get("g", "other", "s") is None and len(again) == 1
    again.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# ------------------------------------------------------------------------------------------- contract


@pytest.fixture(scope="module")
def local_device() -> Iterator[LocalDevice]:
    with LocalDevice() as dev:
        yield dev


@pytest.fixture(scope="module")
def shared_ssh_device(sshd_server, ssh_device_config, agent_root) -> Iterator[SSHDevice]:
    with make_ssh_device(ssh_device_config(sshd_server), agent_root) as dev:
        yield dev


@pytest.fixture(params=["local", pytest.param("ssh", marks=pytest.mark.ssh)])
def device(request):
    return request.getfixturevalue("local_device" if request.param == "local" else "shared_ssh_device")


class TestDeviceContract:
    """What every Device must do; LocalDevice and SSHDevice both run it."""

    def test_measure_ok(self, device, tiny_onnx):
        m = device.measure(tiny_onnx, SHAPE, FAST)
        assert m.error == MeasureError.OK, m.message
        assert set(m.stats) >= STATS_KEYS and m.stats["count"] >= 3
        assert 0 < m.stats["min_ms"] <= m.median_ms <= m.stats["p99_ms"]
        assert m.source == device.source and m.device == device.name and not m.cached
        assert m.fingerprint_id == fingerprint_id(device.fingerprint()) and len(m.fingerprint_id) == 16
        json.dumps(m.to_dict())

    def test_settings_are_respected(self, device, tiny_onnx):
        m = device.measure(tiny_onnx, (2, 3, 16, 24), replace(FAST, min_runs=11, threads=1))
        assert m.error == MeasureError.OK and m.stats["count"] >= 11

    def test_garbage_model_is_load_failed(self, device):
        m = device.measure(b"this is not an onnx model", SHAPE, FAST)
        assert m.error == MeasureError.LOAD_FAILED and m.stats is None and m.message

    def test_wrong_input_shape_is_run_failed(self, device, tiny_onnx):
        m = device.measure(tiny_onnx, (1, 5, 32, 32), FAST)  # the conv wants 3 channels
        assert m.error == MeasureError.RUN_FAILED and m.median_ms is None
        assert "lower --measure-size" in failure_hint(m, 17)

    def test_an_opset_newer_than_the_runtime_is_load_failed_with_a_fix(self, device, tiny_onnx):
        proto = onnx.load_from_string(tiny_onnx)
        proto.opset_import[0].version = 99  # what an old onnxruntime on a device meets with opset 17
        m = device.measure(proto.SerializeToString(), SHAPE, FAST)
        assert m.error == MeasureError.LOAD_FAILED and "Opset 99" in m.message
        assert "onnxruntime_src" not in m.message and "::" not in m.message  # no C++ source line or signature
        hint = failure_hint(m, 17)
        assert f"onnxruntime {device.fingerprint()['onnxruntime']}" in hint
        assert "exported at ONNX opset 17: lower --opset (export.opset" in hint

    def test_fingerprint_has_stable_keys(self, device):
        fp = device.fingerprint()
        assert {"machine", "arch", "cores", "onnxruntime", "providers"} <= set(fp)
        assert fingerprint_id(fp) == fingerprint_id(device.fingerprint())

    def test_cache_hit_does_not_touch_the_device(self, device, tiny_onnx, tmp_path):
        counting = CountingDevice(device)
        cached = CachedDevice(counting, LatencyCache(tmp_path / "cache.db"), max_busy_cores=None)
        first = cached.measure(tiny_onnx, SHAPE, FAST)
        t0 = time.perf_counter()
        second = cached.measure(conv_relu_onnx(graph_name="renamed"), SHAPE, FAST)  # same graph
        elapsed = time.perf_counter() - t0
        assert counting.calls == 1 and not first.cached and second.cached
        assert second.median_ms == first.median_ms and second.source == first.source
        assert elapsed < 0.5
        cached.measure(tiny_onnx, (1, 3, 16, 16), FAST)  # another shape is another entry
        cached.measure(tiny_onnx, SHAPE, replace(FAST, seed=1))  # other settings too
        assert counting.calls == 3 and (cached.hits, cached.misses) == (1, 3)
        cached.cache.close()


def test_open_device_local_is_cached(tmp_path, tiny_onnx):
    dev = open_device(DeviceConfig(target="local", max_busy_cores=None), tmp_path / "latency_cache.db")
    with dev:
        assert isinstance(dev, CachedDevice) and dev.source == "local" and dev.name == "local"
        assert not dev.measure(tiny_onnx, SHAPE, FAST).cached
        assert dev.measure(tiny_onnx, SHAPE, FAST).cached


# ------------------------------------------------------------------------------------------- ssh only


@pytest.mark.ssh
def test_ssh_measurement_is_labelled_device(shared_ssh_device, sshd_server, tiny_onnx, agent_root):
    m = shared_ssh_device.measure(tiny_onnx, SHAPE, FAST)
    assert m.error == MeasureError.OK and m.source == "device"
    assert m.device == f"{sshd_server.user}@127.0.0.1:{sshd_server.port}"
    # Deployed once per agent version, with its content marker; models deleted after unload.
    deployed = list(agent_root.glob("*/edge_agent/.autoseg-deployed"))
    assert len(deployed) == 1
    assert not list(agent_root.glob("*/work/models/**/*.onnx"))


@pytest.mark.ssh
def test_unknown_host_is_refused(sshd_server, ssh_device_config, agent_root, tmp_path):
    kh = tmp_path / "known_hosts"
    cfg = ssh_device_config(sshd_server, known_hosts=kh)
    with pytest.raises(DeviceRefused, match="--trust-new-host") as err:
        make_ssh_device(cfg, agent_root)
    assert err.value.exit_code == 3 and isinstance(err.value, DeviceUnreachable)
    assert not kh.exists()
    # Refusals never fall back to local measurement.
    with pytest.raises(DeviceRefused):
        open_device(replace(cfg, fallback="local"))


@pytest.mark.ssh
def test_unknown_host_trusted_and_recorded(sshd_server, ssh_device_config, agent_root, tmp_path, tiny_onnx):
    kh = tmp_path / "ssh" / "known_hosts"
    cfg = ssh_device_config(sshd_server, known_hosts=kh, trust_new_host=True)
    with make_ssh_device(cfg, agent_root) as dev:
        assert dev.measure(tiny_onnx, SHAPE, FAST).error == MeasureError.OK
    assert kh.read_text() == sshd_server.known_hosts_line()
    # Now known: a plain connection (no trust flag) works.
    with make_ssh_device(replace(cfg, trust_new_host=False), agent_root) as dev:
        assert dev.fingerprint()


@pytest.mark.ssh
def test_changed_host_key_is_refused(fresh_sshd_server, ssh_device_config, agent_root, tmp_path):
    cfg = ssh_device_config(fresh_sshd_server, reconnect_attempts=0)
    fresh_sshd_server.stop()
    impostor = fresh_sshd_server.with_new_host_key(tmp_path / "impostor").start()
    try:
        for trust in (False, True):  # even --trust-new-host does not accept a changed key
            with pytest.raises(DeviceRefused, match="CHANGED") as err:
                make_ssh_device(replace(cfg, trust_new_host=trust), agent_root)
            assert err.value.exit_code == 3 and "ssh-keygen -R" in str(err.value)
    finally:
        impostor.stop()


@pytest.mark.ssh
def test_wrong_user_key_is_refused(sshd_server, ssh_device_config, agent_root, tmp_path):
    other = keygen(tmp_path / "other_key", "not-authorized")
    with pytest.raises(DeviceRefused, match="authorized_keys") as err:
        make_ssh_device(ssh_device_config(sshd_server, identity_file=other), agent_root)
    assert err.value.exit_code == 3


@pytest.mark.ssh
def test_missing_packages_and_python_are_explained(sshd_server, ssh_device_config, agent_root, tmp_path):
    # A python without site-packages stands in for a device python that lacks numpy and onnxruntime.
    bare = tmp_path / "bare-python"
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    bare.chmod(0o755)
    with pytest.raises(DeviceRefused, match=r"numpy and onnxruntime missing .*pip install onnxruntime numpy"):
        make_ssh_device(ssh_device_config(sshd_server, python=str(bare)), agent_root)
    with pytest.raises(DeviceRefused, match=r"not found.*--device-python"):
        make_ssh_device(ssh_device_config(sshd_server, python=str(tmp_path / "no-python")), agent_root)


class AgentKiller(threading.Thread):
    """Kills this device's agent `times` times, each time shortly after a fresh model upload.

    model_file: a glob for the uploaded model (each agent has its own upload folder).
    """

    def __init__(self, server, before: set[int], model_file: Path, times: int) -> None:
        super().__init__(daemon=True)
        self.server, self.before, self.model_file, self.times = server, before, model_file, times
        self.killed: list[int] = []

    def run(self) -> None:
        seen: set[tuple] = set()
        deadline = time.monotonic() + 30
        while len(self.killed) < self.times and time.monotonic() < deadline:
            try:
                # A new upload is a new file (temp file + rename), in a new folder after a restart; inode
                # numbers alone are reused once the next agent removes the killed one's folder.
                path = glob.glob(str(self.model_file))[0]
                st = os.stat(path)
                inode = (path, st.st_ino, st.st_ctime_ns)
            except (FileNotFoundError, IndexError):
                inode = None
            if inode is None or inode in seen:
                time.sleep(0.01)
                continue
            seen.add(inode)
            time.sleep(0.4)  # into the measurement (load is quick, the measurement lasts 1 s)
            for p in self.server.agent_processes():
                if p.pid not in self.before:
                    p.kill()  # by pid, only the agent of the device under test
                    self.killed.append(p.pid)


@pytest.mark.ssh
def test_agent_killed_mid_measurement_is_measured_again(sshd_server, ssh_device_config, agent_root, tiny_onnx):
    before = {p.pid for p in sshd_server.agent_processes()}
    cfg = ssh_device_config(sshd_server, reconnect_attempts=2)
    long = replace(FAST, min_seconds=1.0)
    with make_ssh_device(cfg, agent_root) as dev:
        model_file = Path(dev._dirs["models"]) / "*" / f"{hashlib.sha256(tiny_onnx).hexdigest()}.onnx"
        killer = AgentKiller(sshd_server, before, model_file, times=1)
        killer.start()
        t0 = time.perf_counter()
        m = dev.measure(tiny_onnx, SHAPE, long)
        elapsed = time.perf_counter() - t0
        killer.join()
        assert len(killer.killed) == 1
        assert m.error == MeasureError.OK and m.source == "device", m.message
        assert m.stats["count"] >= 3 and dev._reconnects == 1
        assert elapsed > 0.4 + 1.0  # the interrupted model was measured again in full
        now = {p.pid for p in sshd_server.agent_processes()} - before
        assert len(now) == 1 and killer.killed[0] not in now

        # A model that takes the agent down twice is a RUN_FAILED measurement, not a lost device.
        killer = AgentKiller(sshd_server, before, model_file, times=2)
        killer.start()
        m = dev.measure(tiny_onnx, SHAPE, long)
        killer.join()
        assert len(killer.killed) == 2
        assert m.error == MeasureError.RUN_FAILED and "died twice" in m.message
        assert dev.measure(tiny_onnx, SHAPE, FAST).error == MeasureError.OK  # reconnects lazily


@pytest.mark.ssh
def test_measure_each_keeps_the_run_when_the_device_is_lost(
    fresh_sshd_server, ssh_device_config, agent_root, tiny_onnx
):
    dev = make_ssh_device(ssh_device_config(fresh_sshd_server), agent_root)
    models = {"fp32": tiny_onnx, "int8": tiny_onnx}
    timed, lost = measure_each(dev, models, SHAPE, FAST)
    assert lost is None and list(timed) == ["fp32", "int8"]
    assert all(m.error == MeasureError.OK and m.source == "device" for m in timed.values())

    fresh_sshd_server.stop()
    timed, lost = measure_each(dev, models, SHAPE, FAST)  # no exception: the numbers are lost, not the run
    assert timed == {} and "unreachable" in lost
    dev.close()


@pytest.mark.ssh
def test_stopped_sshd_is_unreachable_or_falls_back(fresh_sshd_server, ssh_device_config, agent_root, tiny_onnx):
    server = fresh_sshd_server
    strict = make_ssh_device(ssh_device_config(server), agent_root)
    lenient = make_ssh_device(ssh_device_config(server, fallback="local"), agent_root)
    assert lenient.measure(tiny_onnx, SHAPE, FAST).source == "device"
    server.stop()

    with pytest.raises(DeviceUnreachable, match="unreachable after 1 reconnect") as err:
        strict.measure(tiny_onnx, SHAPE, FAST)
    assert err.value.exit_code == 3 and not isinstance(err.value, DeviceRefused)

    m = lenient.measure(tiny_onnx, SHAPE, FAST)
    assert m.error == MeasureError.OK and m.source == "local" and m.device == "local"
    assert lenient.source == "local" and lenient.measure(tiny_onnx, SHAPE, FAST).source == "local"
    strict.close()
    lenient.close()

    cfg = ssh_device_config(server)
    with pytest.raises(DeviceUnreachable, match="cannot connect") as err:
        make_ssh_device(cfg, agent_root)
    assert err.value.exit_code == 3
    dev = open_device(replace(cfg, fallback="local"))
    assert dev.source == "local" and dev.measure(tiny_onnx, SHAPE, FAST).source == "local"
    dev.close()

    server.restart()  # same port, same host key: the known_hosts entry still matches
    with make_ssh_device(cfg, agent_root) as dev:
        assert dev.measure(tiny_onnx, SHAPE, FAST).source == "device"


@pytest.mark.ssh
def test_agent_refuses_wrong_hash(shared_ssh_device, tiny_onnx, agent_root):
    dev = shared_ssh_device
    if dev._chan is None:
        dev._connect()
    sha = hashlib.sha256(tiny_onnx).hexdigest()
    path = dev._upload(tiny_onnx, sha)
    model_file = Path(dev._dirs["models"]) / path
    assert model_file.read_bytes() == tiny_onnx
    r = dev._request("load", path=path, sha256="0" * 64, timeout=30)
    assert r["ok"] is False and r["error"]["code"] == "hash_mismatch"
    assert not model_file.exists()  # the agent deletes what it refuses
    # Through the measuring path a refusal is a Measurement, not an exception.
    m = dev._measure_once(tiny_onnx, "1" * 64, SHAPE, FAST)
    assert m.error == MeasureError.REFUSED and "hash_mismatch" in m.message
    assert dev.measure(tiny_onnx, SHAPE, FAST).error == MeasureError.OK  # still usable


@pytest.mark.ssh
def test_oversized_model_is_refused(sshd_server, ssh_device_config, agent_root, tiny_onnx):
    cfg = ssh_device_config(sshd_server, max_model_mb=0.0005)  # 524 bytes; the model is about 1 KB
    with make_ssh_device(cfg, agent_root) as dev:
        m = dev.measure(tiny_onnx, SHAPE, FAST)  # refused on the host, before uploading
        assert m.error == MeasureError.REFUSED and "too_large" in m.message
        sha = hashlib.sha256(tiny_onnx).hexdigest()
        path = dev._upload(tiny_onnx, sha)  # and the agent enforces its own limit
        r = dev._request("load", path=path, sha256=sha, timeout=30)
        assert r["ok"] is False and r["error"]["code"] == "too_large"
        assert not (Path(dev._dirs["models"]) / path).exists()


@pytest.mark.ssh
def test_malformed_requests_are_answered_with_errors(shared_ssh_device, tiny_onnx):
    dev = shared_ssh_device
    if dev._chan is None:
        dev._connect()
    dev._send_raw(b"this is not json\n")
    reply = dev._read_message(timeout=30)
    assert reply["ok"] is False and reply["id"] is None and reply["error"]["code"] == "bad_request"
    reply = dev._request("explode", timeout=30)
    assert reply["ok"] is False and reply["error"]["code"] == "unknown_op"
    reply = dev._request("measure", model_id="m999-nothing", shape=[1, 3, 8, 8], timeout=30)
    assert reply["ok"] is False and reply["error"]["code"] == "not_found"
    assert dev.measure(tiny_onnx, SHAPE, FAST).error == MeasureError.OK  # the agent carries on


@pytest.mark.ssh
def test_ssh_config_alias_with_proxy_jump(sshd_server, ssh_device_config, agent_root, tmp_path, tiny_onnx):
    # The jump host is the same sshd: the device connection runs through a direct-tcpip channel.
    conf = tmp_path / "ssh_config"
    conf.write_text(
        f"Host testpi\n  HostName 127.0.0.1\n  Port {sshd_server.port}\n  User {sshd_server.user}\n"
        f"  IdentityFile {sshd_server.user_key}\n  ProxyJump {sshd_server.user}@127.0.0.1:{sshd_server.port}\n"
    )
    cfg = ssh_device_config(sshd_server, target="testpi", ssh_config=conf, identity_file=None)
    with make_ssh_device(cfg, agent_root) as dev:
        assert len(dev._clients) == 2 and dev.name == sshd_server.target
        assert dev.measure(tiny_onnx, SHAPE, FAST).source == "device"


@pytest.mark.ssh
def test_open_device_ssh_uses_the_cache(sshd_server, ssh_device_config, agent_root, tmp_path, tiny_onnx,
                                        monkeypatch):
    monkeypatch.setenv(AGENT_ROOT_ENV, str(agent_root))
    cache_path = tmp_path / "latency_cache.db"
    with open_device(ssh_device_config(sshd_server), cache_path) as dev:
        assert isinstance(dev.inner, SSHDevice) and dev.source == "device"
        first = dev.measure(tiny_onnx, SHAPE, FAST)
        assert not first.cached and first.source == "device"
    # A later run (new process, new connection) reuses the stored measurement.
    with open_device(ssh_device_config(sshd_server), cache_path) as dev:
        again = dev.measure(tiny_onnx, SHAPE, FAST)
        assert again.cached and again.median_ms == first.median_ms and dev.misses == 0


def test_busy_machine_is_measured_again_and_not_cached(tiny_onnx, tmp_path):
    """A real CPU burner beside the measurement: the agent sees it, the cache refuses the inflated number."""
    import subprocess

    # Two burners and a one-thread session: on a 2-core machine one burner could get only half a core
    # against onnxruntime's spinning threads, and read as 0.49 cores busy.
    cfg = DeviceConfig(warmup=1, min_runs=5, min_seconds=0.3, max_busy_cores=0.5, busy_wait_s=0.05, threads=1)
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        time.sleep(0.2)
        with open_device(cfg, tmp_path / "cache.db") as dev:
            first = dev.measure(tiny_onnx, (1, 3, 16, 16), settings_from_config(cfg))
            assert first.cpu_others is not None and first.cpu_others > 0.5
            assert "not cached" in first.message and first.flags[0].startswith("busy: others used")
            second = dev.measure(tiny_onnx, (1, 3, 16, 16), settings_from_config(cfg))
            assert not second.cached and dev.hits == 0  # nothing inflated was stored
    finally:
        for b in burners:
            b.kill()
            b.wait()


def test_graph_hash_ignores_exporter_tensor_names():
    import torch

    from autoseg.export import onnx_bytes
    from autoseg.unet import Arch, build_unet

    def export(arch: Arch, seed: int) -> bytes:
        torch.manual_seed(seed)
        return onnx_bytes(build_unet(arch, 3, 2).eval(), 3, 32)

    a, other = Arch((3, 3), (8, 16)), Arch((3, 5, 3), (4, 8, 8))
    first = export(a, 1)
    export(other, 5)  # moves the exporter's internal name counters
    assert _graph_hash(export(a, 1)) == _graph_hash(first)
    assert _graph_hash(export(a, 2)) != _graph_hash(first)  # other weights, other graph


def test_graph_hash_is_independent_of_internal_names(tiny_onnx):
    proto = onnx.load_from_string(tiny_onnx)
    for node in proto.graph.node:
        node.output[:] = [n if n == "logits" else f"renamed_{n}" for n in node.output]
        node.input[:] = [n if n in ("input", "w", "b") else f"renamed_{n}" for n in node.input]
    assert _graph_hash(proto.SerializeToString()) == _graph_hash(tiny_onnx)


@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs an OpenSSH client for ssh -G")
def test_a_host_alias_from_an_included_file_is_found_as_openssh_finds_it(tmp_path):
    # paramiko's SSHConfig ignores Include; ssh -G follows it (and Match, wildcards) exactly as ssh does.
    (tmp_path / "config.d").mkdir()
    (tmp_path / "config.d" / "pis").write_text("Host incpi\n  HostName 192.0.2.44\n  Port 2201\n  User pi\n"
                                               "  IdentityFile ~/.ssh/incpi_key\n")
    conf = tmp_path / "config"
    conf.write_text(f"Include {tmp_path}/config.d/*\n")
    t = parse_target("incpi", conf)
    assert (t.user, t.host, t.port, t.alias) == ("pi", "192.0.2.44", 2201, "incpi")
    assert t.identity_files == (os.path.expanduser("~/.ssh/incpi_key"),)
    assert t.config_source.startswith("ssh -G") and str(conf) in t.config_source
    bare = parse_target("other", conf)  # no entry: ssh's defaults, and no default key names forced on it
    assert bare.host == "other" and bare.port == 22 and bare.identity_files == ()


@pytest.mark.ssh
def test_a_name_that_does_not_resolve_is_one_try_naming_the_config_read(ssh_device_config, sshd_server, agent_root,
                                                                        tmp_path):
    conf = tmp_path / "config"
    conf.write_text("Host somepi\n  HostName somepi.invalid\n")
    for target, said in (("nopi.invalid", "no Host entry matched 'nopi.invalid'"),
                         ("somepi", "Host 'somepi' in ")):
        cfg = ssh_device_config(sshd_server, target=target, ssh_config=conf, reconnect_attempts=3)
        start = time.monotonic()
        with pytest.raises(DeviceRefused) as e:
            make_ssh_device(cfg, agent_root)._connect_with_retry()
        assert time.monotonic() - start < 5  # not retried: waiting does not make a name resolve
        assert "cannot resolve host name" in str(e.value) and said in str(e.value), str(e.value)
        assert e.value.exit_code == 3
