"""Faults give the same one-line errors on the arm64 device as on the x86 sshd (issue #23 section 2).

Each test runs against both: `x86` (the sshd of the SSH tests, part of `make test`) and `arm64` (the emulated
Debian arm64 root, marked e2e: `make test-e2e`). No python, no onnxruntime (the error names the install
command for that device), an agent older than the host's protocol, a provider the device lacks.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e2e_devices import E2E_DEVICE_YAML, Device

from edge_agent import protocol

DEVICES = [pytest.param("x86", marks=pytest.mark.ssh), pytest.param("arm64", marks=pytest.mark.e2e)]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(params=DEVICES)
def dev(request: pytest.FixtureRequest) -> Device:
    return request.getfixturevalue(request.param)


def device_check(dev: Device, tmp_path: Path, *flags: str, python: str | None = None,
                 yaml: str = E2E_DEVICE_YAML) -> subprocess.CompletedProcess:
    cfg = tmp_path / "device.yml"
    cfg.write_text(yaml)
    return subprocess.run([sys.executable, "-m", "autoseg", "-q", "device", "check", "--config", str(cfg),
                           *dev.flags(python), "--opset", "13", *flags],
                          capture_output=True, text=True, timeout=600, env=dev.env())


def one_line(proc: subprocess.CompletedProcess, code: int) -> str:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autoseg: error: "), proc.stderr
    return lines[0]


def test_no_python_there(dev: Device, tmp_path: Path) -> None:
    line = one_line(device_check(dev, tmp_path, python="/usr/bin/python3.99"), 3)
    assert "/usr/bin/python3.99 not found; install Python >= 3.8 on the device or pass --device-python" in line


def test_no_onnxruntime_names_the_install_command_of_that_device(dev: Device, tmp_path: Path) -> None:
    line = one_line(device_check(dev, tmp_path, python=dev.system_python), 3)
    assert f"numpy and onnxruntime missing for {dev.system_python}" in line
    assert "pip install onnxruntime numpy" in line
    if dev.name == "arm64":
        # Debian 12 / Raspberry Pi OS: pip refuses the system python (PEP 668); a venv is the way.
        assert "python3 -m venv ~/autoseg-venv && ~/autoseg-venv/bin/pip install onnxruntime numpy" in line
        assert "--device-python ~/autoseg-venv/bin/python" in line


def older_agent_python(dev: Device) -> str:
    """A device python that imports an older edge_agent (protocol - 1) before the one autoseg deploys:
    one installed in site-packages, with PYTHONSAFEPATH keeping the working folder off sys.path."""
    folder = dev.scratch("older-agent")
    pkg = folder / "edge_agent"
    shutil.rmtree(pkg, ignore_errors=True)
    shutil.copytree(REPO / "edge_agent", pkg, ignore=shutil.ignore_patterns("__pycache__", "*.toml"))
    old = protocol.PROTOCOL_VERSION - 1
    proto = pkg / "protocol.py"
    proto.write_text(proto.read_text().replace(f"PROTOCOL_VERSION = {protocol.PROTOCOL_VERSION}",
                                               f"PROTOCOL_VERSION = {old}"))
    for p in [folder, *folder.rglob("*")]:
        shutil.chown(p, folder.stat().st_uid, folder.stat().st_gid)
    return dev.write(folder / "python", f'#!/bin/sh\nPYTHONSAFEPATH=1 PYTHONPATH={dev.device_path(folder)} '
                                       f'exec {dev.python} "$@"\n', 0o755)


def test_an_agent_older_than_the_host_protocol_is_named_at_once(dev: Device, tmp_path: Path) -> None:
    t0 = time.monotonic()
    line = one_line(device_check(dev, tmp_path, python=older_agent_python(dev)), 3)
    assert (f"speaks protocol {protocol.PROTOCOL_VERSION - 1}, this host needs {protocol.PROTOCOL_VERSION}"
            in line)
    assert "pip uninstall autoseg-edge-agent" in line
    assert time.monotonic() - t0 < (120 if dev.emulated else 30)  # refused, not waited for and retried


def test_a_provider_the_device_lacks_is_refused_unless_cpu_is_allowed(dev: Device, tmp_path: Path) -> None:
    yaml = E2E_DEVICE_YAML + "  providers: [CUDAExecutionProvider]\n"
    line = one_line(device_check(dev, tmp_path, yaml=yaml), 2)
    assert "device.providers" in line and dev.target in line
    assert "CUDAExecutionProvider not available on this device" in line
    assert "list CPUExecutionProvider after it" in line
