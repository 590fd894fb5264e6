"""The device pool (#25) against three real sshds on 127.0.0.1, each standing for one device, and the real agent.

Every device's agent logs to a file of its own (through the device python below, keyed by the sshd's port), and
each timing is checked from those logs: two processes sharing the pool never time two models at once on one
device. Each process has its own agent folder, so the agent's own lock does not serialise them: only the lease
does. Budget: < 40 s.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from onnx_models import conv_relu_onnx
from sshd_server import SSHServer, unavailable_reason

from autoseg.cli import overrides_from
from autoseg.config import DeviceConfig, load_config
from autoseg.devices import MeasureError, MeasureSettings
from autoseg.devices.pool import DevicePool, LeaseBoard
from autoseg.errors import DeviceUnreachable, InputError
from autoseg.search import config_fingerprint

pytestmark = pytest.mark.ssh

SHAPE = (1, 3, 32, 32)
FAST = MeasureSettings(warmup=1, min_runs=3, min_seconds=0.02)
# Each log line of a timing: "edge_agent[pid] INFO measured m-... [1, 3, 32, 32]: ... timed 1.000-2.000"
TIMED = re.compile(r"edge_agent\[(\d+)\] INFO measured .* timed ([\d.]+)-([\d.]+)$")

# The device python: the venv's, logging the agent's stderr to agent-<sshd port>.log; a port listed in
# i686-ports runs under `setarch i686`, a device of another architecture.
DEVICE_PYTHON = """\
#!/bin/sh
port="${{SSH_CONNECTION##* }}"
log="{logs}/agent-$port.log"
if grep -qx "$port" "{logs}/i686-ports" 2>/dev/null; then
    exec setarch i686 {python} "$@" 2>>"$log"
fi
exec {python} "$@" 2>>"$log"
"""


class Devices:
    """sshds sharing one user key, their known_hosts, and the device python that logs per device."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True)
        self.python = root / "device-python"
        self.python.write_text(DEVICE_PYTHON.format(logs=self.logs, python=sys.executable))
        self.python.chmod(0o755)
        self.known_hosts = root / "known_hosts"
        self.known_hosts.write_text("")
        self.servers: list[SSHServer] = []
        self.extra: list[SSHServer] = []

    def add(self, keep: bool = True) -> SSHServer:
        """One more device; keep=False for one a test stops (then it is not among `servers`)."""
        key = self.servers[0].user_key if self.servers else None
        n = len(self.servers) + len(self.extra)
        server = SSHServer(self.root / f"sshd{n}", user_key=key).start()
        (self.servers if keep else self.extra).append(server)
        with self.known_hosts.open("a") as f:
            f.write(server.known_hosts_line())
        return server

    def config(self, **overrides: object) -> DeviceConfig:
        values: dict = {
            "python": str(self.python), "identity_file": self.servers[0].user_key, "known_hosts": self.known_hosts,
            "connect_timeout_s": 5.0, "reconnect_attempts": 1, "warmup": 1, "min_runs": 3, "min_seconds": 0.02,
            "max_busy_cores": None,
        }
        values.update(overrides)
        return DeviceConfig(**values)

    def spans(self) -> dict[int, list[tuple[float, float]]]:
        """Per sshd port: the (start, end) of every timing, read from that device's agent log."""
        out: dict[int, list[tuple[float, float]]] = {}
        for path in self.logs.glob("agent-*.log"):
            port = int(path.stem.split("-")[1])
            for line in path.read_text(errors="replace").splitlines():
                m = TIMED.search(line)
                if m:
                    out.setdefault(port, []).append((float(m.group(2)), float(m.group(3))))
        return out

    def stop(self) -> None:
        for s in self.servers + self.extra:
            s.stop()


@pytest.fixture(scope="module")
def devices(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devices]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    d = Devices(tmp_path_factory.mktemp("pool"))
    for _ in range(3):
        d.add()
    yield d
    d.stop()


@pytest.fixture
def agent_root_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "agent"
    monkeypatch.setenv("AUTOSEG_AGENT_ROOT", str(root))
    return root


def open_pool(devices: Devices, servers: list[SSHServer], lease_url: str, **cfg: object) -> DevicePool:
    pool = DevicePool.open(devices.config(**cfg), [s.target for s in servers], lease_url)
    assert isinstance(pool, DevicePool)
    for d in pool._members:
        d._backoff_base_s = 0.05  # keep reconnects fast
    return pool


WORKER = textwrap.dedent("""
    import json, sys
    from autoseg.config import DeviceConfig
    from autoseg.devices import MeasureSettings
    from autoseg.devices.pool import DevicePool
    sys.path.insert(0, {tests!r})
    from onnx_models import conv_relu_onnx

    cfg = DeviceConfig(**{cfg!r})
    settings = MeasureSettings(warmup=1, min_runs=3, min_seconds=0.15)
    out = []
    with DevicePool.open(cfg, {targets!r}, {url!r}) as pool:
        for n in range({count}):
            m = pool.measure(conv_relu_onnx(seed=n), (1, 3, 32, 32), settings)
            out.append([m.error.name, m.device, m.source, m.message])
    print(json.dumps(out))
""")


def test_two_processes_share_the_pool_and_never_time_at_once_on_one_device(devices: Devices, tmp_path: Path):
    cfg = devices.config()
    plain = {"python": cfg.python, "identity_file": str(cfg.identity_file), "known_hosts": str(cfg.known_hosts),
             "connect_timeout_s": 5.0, "reconnect_attempts": 1, "max_busy_cores": None}
    targets = [s.target for s in devices.servers]
    url = f"sqlite:///{tmp_path / 'leases.db'}"
    LeaseBoard(url).close()  # the table exists before both start (each would create it otherwise)
    before = devices.spans()
    script = WORKER.format(tests=str(Path(__file__).parent), cfg=plain, targets=targets, url=url, count=4)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, "AUTOSEG_AGENT_ROOT": str(tmp_path / f"agent-{name}")})
             for name in ("a", "b")]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-2000:]
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    assert all(r[0] == "OK" and r[2] == "device" for res in results for r in res), results
    assert len({r[1] for res in results for r in res}) > 1  # the measurements spread over the pool

    spans = {port: sorted(set(s) - set(before.get(port, []))) for port, s in devices.spans().items()}
    assert sum(len(s) for s in spans.values()) == 8  # each model timed once, by the agents' own account
    assert sum(1 for s in spans.values() if s) > 1  # on more than one device
    for port, timed in spans.items():
        for (_, end), (start, _) in itertools.pairwise(timed):
            assert end <= start, f"device on port {port} timed two models at once: {timed}"


def test_a_device_that_dies_mid_study_is_dropped_and_the_rest_go_on(devices: Devices, tmp_path: Path,
                                                                    agent_root_env: Path, caplog):
    caplog.set_level(logging.WARNING, logger="autoseg.devices")
    doomed = devices.add(keep=False)
    try:
        with open_pool(devices, [devices.servers[0], devices.servers[1], doomed],
                       f"sqlite:///{tmp_path / 'leases.db'}") as pool:
            first = [pool.measure(conv_relu_onnx(seed=n), SHAPE, FAST) for n in range(3)]
            assert {m.device for m in first} == {s.target for s in (*devices.servers[:2], doomed)}  # all used
            doomed.stop()  # powered off: its sessions die with it
            later = [pool.measure(conv_relu_onnx(seed=n), SHAPE, FAST) for n in range(3, 7)]
            assert all(m.error == MeasureError.OK and m.source == "device" for m in later), later
            assert doomed.target not in {m.device for m in later}
            assert pool.devices == [s.target for s in devices.servers[:2]]
            # Measurements keep the device that measured them and share the pool's fingerprint class id.
            assert len({m.fingerprint_id for m in first + later}) == 1
    finally:
        doomed.stop()
    dropped = [r.getMessage() for r in caplog.records if "taken out of the pool" in r.getMessage()]
    assert len(dropped) == 1 and doomed.target in dropped[0] and "2 devices left" in dropped[0]


def test_the_last_device_lost_follows_device_fallback(devices: Devices, tmp_path: Path, agent_root_env: Path):
    doomed = devices.add(keep=False)
    try:
        strict = open_pool(devices, [doomed], f"sqlite:///{tmp_path / 'a.db'}")
        lenient = open_pool(devices, [doomed], f"sqlite:///{tmp_path / 'b.db'}", fallback="local")
        with strict, lenient:
            doomed.stop()
            with pytest.raises(DeviceUnreachable, match=r"all 1 devices were lost.*--fallback local") as e:
                strict.measure(conv_relu_onnx(), SHAPE, FAST)
            assert e.value.exit_code == 3
            m = lenient.measure(conv_relu_onnx(), SHAPE, FAST)
            assert m.error == MeasureError.OK and m.source == "local" and lenient.source == "local"
    finally:
        doomed.stop()


def autoseg(*args: object, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autoseg", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)


def test_device_check_over_a_pool_and_a_device_of_another_kind_refused_in_one_line(devices: Devices, tmp_path):
    env = {**os.environ, "AUTOSEG_AGENT_ROOT": str(tmp_path / "agent")}
    flags = ["--device", ",".join(s.target for s in devices.servers), "--device-python", devices.python,
             "--known-hosts", devices.known_hosts, "--identity-file", devices.servers[0].user_key]
    fast = tmp_path / "fast.yml"
    fast.write_text("device:\n  warmup: 0\n  min_runs: 3\n  min_seconds: 0.0\n  max_busy_cores: null\n")
    proc = autoseg("device", "check", "--config", fast, *flags, env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["source"] == "device" and report["fingerprint"]["pool"] == [s.target for s in devices.servers]

    odd = devices.servers[2]
    (devices.logs / "i686-ports").write_text(f"{odd.port}\n")
    try:
        proc = autoseg("device", "check", "-q", *flags, env=env)
    finally:
        (devices.logs / "i686-ports").unlink()
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"device {odd.target} is not of the pool's kind" in lines[0] and "arch 'i686'" in lines[0], lines


@pytest.mark.parametrize(("given", "problem"), [
    (["pi1", "pi1"], "device.targets[1]: 'pi1' is listed twice"),
    (["pi1", " "], "device.targets[1]: empty"),
    (["pi1", "local"], "device.targets[1]: 'local' cannot be pooled"),
    (["pi1", 3], "device.targets[1]"),
    ("pi1", "device.targets: must be a list"),
])
def test_device_targets_are_checked_at_the_door(given: object, problem: str):
    with pytest.raises(InputError, match=re.escape(problem)):
        load_config(overrides={"device.targets": given})


def test_device_flag_takes_a_list_and_wins_over_the_config(tmp_path: Path):
    yml = tmp_path / "c.yml"
    yml.write_text("device:\n  targets: [pi1, pi2]\n")
    assert load_config(yml).device.targets == ["pi1", "pi2"]
    pool = load_config(yml, overrides_from(argparse.Namespace(device="a@h:1, b@h:2,c")))
    assert pool.device.targets == ["a@h:1", "b@h:2", "c"] and pool.device.target == "local"
    one = load_config(yml, overrides_from(argparse.Namespace(device="pi9")))
    assert one.device.targets == [] and one.device.target == "pi9"
    listed = load_config(overrides={"device.targets": ["pi8"]})  # one device as a list: that device, no pool
    assert listed.device.targets == [] and listed.device.target == "pi8"
    # No pool: the study's config is what it was before device.targets existed, so older runs resume.
    assert "device.targets" not in config_fingerprint(one)
    assert config_fingerprint(pool)["device.targets"] == ["a@h:1", "b@h:2", "c"]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def lease_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'leases.db'}"
    return request.getfixturevalue("postgres_url")


def test_leases_exclude_each_other_expire_and_are_released(lease_url: str):
    a, b = LeaseBoard(lease_url, ttl_s=0.5), LeaseBoard(lease_url, ttl_s=0.5)
    try:
        a.add(["pi1", "pi2"])
        b.add(["pi1", "pi2"])  # a second process adding the same rows is harmless
        assert a.take("pi1", "host-a:1")
        assert not b.take("pi1", "host-b:2")  # held
        assert b.take("pi2", "host-b:2")  # another device is free
        assert a.renew("pi1", "host-a:1") and not b.renew("pi1", "host-b:2")
        assert b.holders() == {"pi1": "host-a:1", "pi2": "host-b:2"}
        a.release("pi1", "host-a:1")
        assert b.take("pi1", "host-b:3")
        time.sleep(0.7)  # host-b died: its leases expire
        assert a.take("pi1", "host-a:4") and a.take("pi2", "host-a:4")
        assert not b.renew("pi1", "host-b:3")
        b.release("pi2", "host-b:2")  # a late release does not free what another took since
        assert a.holders()["pi2"] == "host-a:4"
    finally:
        a.close()
        b.close()


@pytest.mark.slow
def test_a_search_with_two_workers_measures_on_the_pool(devices: Devices, tmp_path: Path):
    import optuna
    from optuna.trial import TrialState

    from autoseg.demo_data import generate_demo

    images, masks = generate_demo(tmp_path / "demo", n_images=5, size=64, seed=2)
    cfg = tmp_path / "c.yml"
    cfg.write_text(
        "search:\n  space:\n    levels: [1, 2]\n    kernels: [3]\n    channels: [4, 8]\n"
        "device:\n  warmup: 0\n  min_runs: 3\n  min_seconds: 0.05\n  max_busy_cores: null\ntrain:\n  threads: 1\n")
    out = tmp_path / "run"
    env = {**os.environ, "AUTOSEG_AGENT_ROOT": str(tmp_path / "agent")}
    proc = autoseg("search", "--config", cfg, "--images", images, "--masks", masks, "--out", out, "--trials", "4",
                   "--tile", "32", "--num-reps", "12", "--folds", "2", "--epochs", "1", "--final-epochs", "1",
                   "--final-tiles", "64", "--workers", "2",
                   "--device", ",".join(s.target for s in devices.servers), "--device-python", devices.python,
                   "--known-hosts", devices.known_hosts, "--identity-file", devices.servers[0].user_key, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (out / "device_leases.db").exists()
    study = optuna.load_study(study_name="autoseg", storage=f"sqlite:///{out / 'study.db'}")
    trials = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert trials and all(t.user_attrs["latency_source"] == "device" for t in trials)
    assert {t.user_attrs["device"] for t in trials} <= {s.target for s in devices.servers}
    for port, timed in devices.spans().items():
        for (_, end), (start, _) in itertools.pairwise(sorted(timed)):
            assert end <= start, f"device on port {port} timed two models at once: {timed}"


def test_leases_live_with_the_study_server_or_in_the_run_directory(tmp_path: Path):
    from autoseg.devices.measure import lease_url

    server = "postgresql+psycopg://me:secret@db:5432/study"
    assert lease_url(tmp_path / "latency_cache.db", server) == server
    # Read back from a run's config.yml: no password, libpq finds it (PGPASSWORD, ~/.pgpass).
    assert lease_url(tmp_path / "latency_cache.db", "postgresql+psycopg://me:***@db:5432/study") == \
        "postgresql+psycopg://me@db:5432/study"
    assert lease_url(tmp_path / "latency_cache.db", None) == f"sqlite:///{tmp_path / 'device_leases.db'}"
    assert lease_url(tmp_path / "latency_cache.db", "sqlite:////elsewhere/study.db") == \
        f"sqlite:///{tmp_path / 'device_leases.db'}"


def test_the_report_names_the_pool_and_does_not_call_its_devices_mixed():
    import optuna
    from test_report import NETS, _attrs

    from autoseg.report import _latency_provenance, _trial_row

    trials = [optuna.trial.create_trial(value=0.5, user_attrs=_attrs(*net, device=f"pi@pi{i % 2}:22"))
              for i, net in enumerate(NETS)]
    lat = _latency_provenance([_trial_row(t) for t in trials], trials, None, None)
    assert lat["pooled"] and not lat["mixed"] and lat["warnings"] == []
    assert lat["devices"] == ["pi@pi0:22", "pi@pi1:22"]  # which device measured what stays in each row
    assert lat["axis_label"] == "latency at 64x64 px on a pool of 2 alike devices (device), ms"
    # Devices of different fingerprints are still not comparable.
    trials[0].user_attrs["fingerprint_id"] = "ffff0000ffff0000"
    other = _latency_provenance([_trial_row(t) for t in trials], trials, None, None)
    assert other["mixed"] and any("different devices" in w for w in other["warnings"])


def test_figures_compared_with_each_other_come_from_one_device(devices: Devices, tmp_path: Path,
                                                               agent_root_env: Path):
    from autoseg.devices import measure_quiet

    with open_pool(devices, devices.servers, f"sqlite:///{tmp_path / 'leases.db'}") as pool:
        pool.measure(conv_relu_onnx(seed=9), SHAPE, FAST)  # the first device is now the most recently used
        models = {"fp32": conv_relu_onnx(seed=1), "int8": conv_relu_onnx(seed=2), "other": conv_relu_onnx(seed=3)}
        timed, lost = measure_quiet(pool, models, SHAPE, FAST, max_wait_s=0.0)
        assert lost is None and all(m.error == MeasureError.OK for m in timed.values())
        assert len({m.device for m in timed.values()}) == 1  # plain pool.measure would spread them over three
        assert set(pool._board.holders().values()) == {None}  # and the device is free again


def test_a_device_busy_with_a_measurement_from_outside_is_set_aside_and_the_pool_goes_on(devices: Devices,
                                                                                        tmp_path: Path, caplog):
    """Someone's `device check` (no lease: the agent's own lock) holds the first device: its models go to the
    others, and it is used again once it is free. Each device has its agent folder, as three boards would."""
    from autoseg.devices import SSHDevice
    from autoseg.devices.records import DeviceBusy
    from edge_agent.serve import measure_lock

    def root(target: str) -> Path:
        return tmp_path / f"agent-{target.rsplit(':', 1)[1]}"

    caplog.set_level(logging.WARNING, logger="autoseg.devices")
    first = devices.servers[0]
    with DevicePool.open(devices.config(), [s.target for s in devices.servers], f"sqlite:///{tmp_path / 'l.db'}",
                         make_device=lambda c: SSHDevice(c, _agent_root=str(root(c.target)))) as pool:
        assert isinstance(pool, DevicePool)
        assert all(d._lock_timeout_s == 60.0 for d in pool._members)  # not the lone device's 10 minutes
        for d in pool._members:
            d._lock_timeout_s = 0.5
        pool._aside_s = 1.0
        pool.measure(conv_relu_onnx(seed=1), SHAPE, FAST)  # every agent folder exists once connected
        with measure_lock(str(root(first.target) / "measure.lock"), timeout_s=1.0):
            busy = [pool.measure(conv_relu_onnx(seed=n), SHAPE, FAST) for n in range(10, 14)]
        assert all(m.error == MeasureError.OK for m in busy)
        assert first.target not in {m.device for m in busy}
        time.sleep(1.1)
        free = [pool.measure(conv_relu_onnx(seed=n), SHAPE, FAST) for n in range(20, 23)]
        assert first.target in {m.device for m in free}  # back in the pool, not dropped
    aside = [r.getMessage() for r in caplog.records if "from outside this study" in r.getMessage()]
    assert len(aside) == 1 and first.target in aside[0]
    # A pool of one has no other device to turn to: the agent's busy answer stops it, exit 3.
    with DevicePool.open(devices.config(), [first.target], f"sqlite:///{tmp_path / 'one.db'}",
                         make_device=lambda c: SSHDevice(c, _agent_root=str(root(c.target)))) as alone:
        alone._members[0]._lock_timeout_s = 0.5
        with measure_lock(str(root(first.target) / "measure.lock"), timeout_s=1.0), \
                pytest.raises(DeviceBusy) as e:
            alone.measure(conv_relu_onnx(seed=30), SHAPE, FAST)
        assert e.value.exit_code == 3
