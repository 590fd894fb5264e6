"""The whole product against the emulated arm64 device (issue #23 sections 2-4): `make test-e2e`.

Device check, a tiny real search timing every candidate in int8 there, the latency cache keeping the
emulated fingerprint apart from this host's, deployment with on-device inference equal to `autoseg predict`
here, the agent's own tests run by the device's python, and the agent installed there as a package.
Small on purpose: emulated, a net runs a few hundred times slower than natively.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
import optuna
import pytest
from e2e_devices import E2E_DEVICE_YAML, Device
from optuna.trial import TrialState
from PIL import Image

from autoseg.config import DeviceConfig
from autoseg.demo_data import generate_demo
from autoseg.devices import CachedDevice, LatencyCache, LocalDevice, MeasureSettings, SSHDevice
from edge_agent import __version__ as AGENT_VERSION
from edge_agent.fingerprint import fingerprint, fingerprint_id

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
SETTINGS = MeasureSettings(warmup=0, min_runs=3, min_seconds=0.0)
AGENT_TESTS = ("tests/test_edge_agent.py", "tests/test_agent_hardening.py", "tests/e2e/test_agent_predict.py")


def autoseg(*args: object, env: dict[str, str] | None = None, timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autoseg", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def device_versions(arm64: Device) -> dict[str, str]:
    """numpy and onnxruntime as installed in the device venv (read from the root, not asked over SSH)."""
    site = next(arm64.host_path(arm64.python).parents[1].glob("lib/python3*/site-packages"))
    out = {}
    for name in ("numpy", "onnxruntime"):
        (dist,) = site.glob(f"{name}-*.dist-info")
        out[name] = dist.name[len(name) + 1 : -len(".dist-info")]
    return out


def test_device_check_fingerprint_and_sftp_deployment(arm64: Device, tmp_path: Path) -> None:
    assert not arm64.local_root.exists()  # nothing of autoseg's on the device before: python3 + the venv only
    cfg = tmp_path / "c.yml"
    cfg.write_text(E2E_DEVICE_YAML)
    proc = autoseg("device", "check", "--config", cfg, *arm64.flags(), env=arm64.env())
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    fp = report["fingerprint"]
    assert fp["arch"] == "aarch64" and "Linux" in fp["os"] and fp["python"].startswith("3.11")
    versions = device_versions(arm64)
    assert fp["numpy"] == versions["numpy"] and fp["onnxruntime"] == versions["onnxruntime"]
    assert "CPUExecutionProvider" in fp["providers"]
    assert fp["emulated"] is True and fp["kernel_arch"] == os.uname().machine and "qemu" in fp["emulator"]
    assert report["source"] == "device" and report["latency"]["median_ms"] > 0
    assert report["int8_error"] is None and report["int8_latency"]["median_ms"] > 0
    # The host put the agent there over SFTP: this checkout's files, under the agent's version.
    deployed = arm64.local_root / AGENT_VERSION / "edge_agent"
    for src in (REPO / "edge_agent").glob("*.py"):
        assert (deployed / src.name).read_bytes() == src.read_bytes()
    assert (deployed / ".autoseg-deployed").is_file()


@pytest.fixture(scope="module")
def searched(arm64: Device, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A tiny real search measured on the device, every candidate in int8 (--precision int8)."""
    tmp = tmp_path_factory.mktemp("arm64-search")
    images, masks = generate_demo(tmp / "demo", n_images=5, size=64, seed=3)
    cfg = tmp / "c.yml"
    cfg.write_text("search:\n  space:\n    levels: [1, 2]\n    kernels: [3]\n    channels: [4, 8]\n"
                   + E2E_DEVICE_YAML + "train:\n  threads: 1\n")
    out = tmp / "run"
    proc = autoseg("search", "--config", cfg, "--images", images, "--masks", masks, "--out", out, "--trials", 3,
                   "--tile", 32, "--num-reps", 12, "--folds", 2, "--epochs", 1, "--final-tiles", 64,
                   "--precision", "int8", *arm64.flags(), env=arm64.env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    yield out


def test_search_times_every_candidate_there_in_int8_labelled_emulated(searched: Path, arm64: Device) -> None:
    study = optuna.load_study(study_name="autoseg", storage=f"sqlite:///{searched / 'study.db'}")
    trials = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(trials) == 3
    ids = set()
    for t in trials:
        a = t.user_attrs
        assert a["latency_source"] == "device" and a["device"] == arm64.target and a["precision"] == "int8"
        lat = a["latency"]
        assert lat["error"] == "OK" and lat["median_ms"] > 0 and lat["emulated"] is True
        assert lat["fingerprint"]["arch"] == "aarch64" and lat["providers_used"] == ["CPUExecutionProvider"]
        ids.add(a["fingerprint_id"])
    assert len(ids) == 1
    card = json.loads((searched / "best" / "model_card.json").read_text())
    assert card["latency_source"] == "device" and card["device"] == arm64.target
    assert card["int8"]["latency_source"] == "device" and card["int8"]["latency_ms"] > 0  # int8 loads, is timed
    assert (searched / "best" / "model.int8.onnx").is_file()
    assert arm64.target in (searched / "report.md").read_text()
    # The search's cache holds the emulated device's numbers under its own fingerprint, not this host's.
    with closing(sqlite3.connect(searched / "latency_cache.db")) as db:
        rows = db.execute("SELECT DISTINCT fingerprint_id FROM latency").fetchall()
    assert {r[0] for r in rows} == ids and fingerprint_id(fingerprint()) not in ids


def test_latency_cache_keys_the_emulated_device_apart_from_this_host(arm64: Device, tmp_path: Path,
                                                                     tiny_onnx: bytes) -> None:
    cfg = DeviceConfig(target=arm64.target, python=arm64.python, identity_file=arm64.identity,
                       known_hosts=arm64.known_hosts, connect_timeout_s=30.0, reconnect_attempts=1)
    path = tmp_path / "latency_cache.db"
    shape = (1, 3, 32, 32)
    with closing(CachedDevice(LocalDevice(), LatencyCache(path), max_busy_cores=None)) as local:
        here = local.measure(tiny_onnx, shape, SETTINGS)
    with closing(CachedDevice(SSHDevice(cfg, _agent_root=arm64.agent_root), LatencyCache(path),
                              max_busy_cores=None)) as dev:
        there = dev.measure(tiny_onnx, shape, SETTINGS)  # same graph, same settings: not this host's entry
        again = dev.measure(tiny_onnx, shape, SETTINGS)
    assert not there.cached and there.source == "device" and there.emulated and not here.emulated
    assert there.fingerprint_id != here.fingerprint_id
    assert again.cached and again.fingerprint_id == there.fingerprint_id and again.stats == there.stats
    assert len(LatencyCache(path)) == 2


def masks_agree(a: Path, b: Path, names: list[str]) -> float:
    same = total = 0
    for name in names:
        x, y = np.asarray(Image.open(a / name)), np.asarray(Image.open(b / name))
        assert x.shape == y.shape
        same += int((x == y).sum())
        total += x.size
    return same / total


@pytest.mark.parametrize(("int8", "mode"), [(False, "window"), (True, "auto")])
def test_masks_predicted_on_the_device_equal_the_hosts(searched: Path, arm64: Device, tmp_path: Path,
                                                       int8: bool, mode: str) -> None:
    images, _ = generate_demo(tmp_path / "new", n_images=3, size=96, seed=9)
    remote = arm64.scratch(f"deployed-{int8}")
    flag = ["--int8"] if int8 else []
    proc = autoseg("deploy", searched, *arm64.flags(), "--remote-dir", arm64.device_path(remote), "--images",
                   images, "--out", tmp_path / "device", "--eval-mode", mode, *flag, env=arm64.env())
    assert proc.returncode == 0, proc.stderr
    assert "sha256 verified on the device" in proc.stdout and "emulated" in proc.stdout
    name = "model.int8.onnx" if int8 else "model.onnx"
    assert (remote / name).read_bytes() == (searched / "best" / name).read_bytes()
    host = autoseg("predict", searched, "--images", images, "--out", tmp_path / "host", "--eval-mode", mode, *flag)
    assert host.returncode == 0, host.stderr
    names = sorted(p.name for p in (tmp_path / "host").glob("*.png"))
    assert len(names) == 3
    assert masks_agree(tmp_path / "device", tmp_path / "host", names) >= 0.999


def test_the_agents_own_tests_pass_on_the_devices_python(arm64: Device) -> None:
    # The agent's tests need numpy, onnxruntime, onnx and pytest: a venv of the root kept for them
    # (/opt/agent-tests), beside the device venv that holds numpy and onnxruntime only.
    work = arm64.scratch("agent-tests")
    shutil.rmtree(work / "tests", ignore_errors=True)
    shutil.rmtree(work / "edge_agent", ignore_errors=True)
    shutil.copytree(REPO / "edge_agent", work / "edge_agent", ignore=shutil.ignore_patterns("__pycache__"))
    (work / "tests" / "e2e").mkdir(parents=True)
    for rel in AGENT_TESTS:
        shutil.copy(REPO / rel, work / rel)
    owner = work.stat()
    for p in work.rglob("*"):
        os.chown(p, owner.st_uid, owner.st_gid)
    where = arm64.device_path(work)
    proc = arm64.ssh(f"cd {where} && PYTHONPATH={where} {arm64.info['test_python']} -m pytest -q -p no:cacheprovider "
                     f"--noconftest {' '.join(AGENT_TESTS)}", timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


def test_the_agent_installs_as_a_package_of_its_own_there(arm64: Device, tmp_path: Path) -> None:
    # Built from a copy: an in-tree build would leave build/ in edge_agent/, which the host uploads.
    shutil.copytree(REPO / "edge_agent", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path / "dist"), str(tmp_path / "src")], capture_output=True, text=True,
                           timeout=300)
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("autoseg_edge_agent-*.whl")
    work = arm64.scratch("package")
    wheels = work / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    shutil.copytree(arm64.info["wheels"], wheels)
    shutil.copy(wheel, wheels)
    for p in [wheels, *wheels.iterdir()]:
        os.chown(p, work.stat().st_uid, work.stat().st_gid)
    where = arm64.device_path(work)
    proc = arm64.ssh(f"cd {where} && rm -rf venv && python3 -m venv venv && venv/bin/pip install -q --no-index "
                     f"--find-links wheels autoseg-edge-agent && venv/bin/edge-agent --version && "
                     f"venv/bin/edge-agent fingerprint", timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"edge_agent {AGENT_VERSION}" in proc.stdout
    fp = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert fp["arch"] == "aarch64" and fp["emulated"] is True
