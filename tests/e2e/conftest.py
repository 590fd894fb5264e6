"""The arm64 device (tests/e2e/arm64_device.sh): a Debian arm64 root run by qemu-user, with its own sshd.

`make arm64-device` builds the root once; the `arm64` fixture starts its sshd on a free port of 127.0.0.1 for
the test session (with a throwaway user key and a known_hosts entry for the root's own host key) and stops it
afterwards. Everything the host deploys goes under a fresh agent root in the device user's home.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_devices import SCRIPT, Device
from sshd_server import free_port, keygen


def _info() -> dict[str, str]:
    res = subprocess.run([str(SCRIPT), "info"], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        pytest.skip(f"arm64 device not built ({res.stderr.strip()}); run `make arm64-device`")
    return dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)


@pytest.fixture(scope="session")
def arm64(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Device]:
    if os.geteuid() != 0:
        pytest.skip("the arm64 device needs root (chroot, mounts)")
    info = _info()
    tmp = tmp_path_factory.mktemp("arm64")
    key = keygen(tmp / "user_ed25519", "autoseg-e2e")
    port = free_port()
    res = subprocess.run([str(SCRIPT), "start", str(port), f"{key}.pub"], capture_output=True, text=True,
                         timeout=180)
    assert res.returncode == 0, res.stderr
    kind, b64 = Path(info["host_key"]).read_text().split()[:2]
    known = tmp / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {kind} {b64}\n")
    root = Path(info["root"])
    sub = f"e2e-{secrets.token_hex(4)}"
    home = f"/home/{info['user']}"
    try:
        yield Device(name="arm64", target=f"{info['user']}@127.0.0.1:{port}", python=info["python"],
                     known_hosts=known, identity=key, agent_root=f"~/{sub}/autoseg-agent",
                     local_root=root / home.lstrip("/") / sub / "autoseg-agent", fs_root=root,
                     system_python="/usr/bin/python3", emulated=True, info=info)
    finally:
        subprocess.run([str(SCRIPT), "stop", str(port)], capture_output=True, timeout=120)
        shutil.rmtree(root / home.lstrip("/") / sub, ignore_errors=True)


@pytest.fixture(scope="session")
def x86(sshd_server, tmp_path_factory: pytest.TempPathFactory) -> Device:
    """The x86 sshd of the other SSH tests, described like the arm64 device (device python: this venv's)."""
    tmp = tmp_path_factory.mktemp("x86-device")
    known = sshd_server.write_known_hosts(tmp / "known_hosts")
    bare = tmp / "python-without-packages"  # like a fresh device python: no numpy, no onnxruntime
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    bare.chmod(0o755)
    root = tmp / "agent-root"
    return Device(name="x86", target=sshd_server.target, python=sys.executable, known_hosts=known,
                  identity=sshd_server.user_key, agent_root=str(root), local_root=root, fs_root=Path("/"),
                  system_python=str(bare), emulated=False)
