"""What the end-to-end tests need to reach a device: the arm64 root's sshd or the x86 sshd (see conftest.py)."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "arm64_device.sh"
# Emulated, a net runs a few hundred times slower: what the device measures, it measures briefly.
E2E_DEVICE_YAML = "device:\n  warmup: 0\n  min_runs: 3\n  min_seconds: 0.0\n  max_busy_cores: null\n"


@dataclass
class Device:
    """What `autoseg` needs to reach a device, and where its files are seen from this host."""

    name: str  # "arm64" or "x86"
    target: str
    python: str  # the device python that has numpy and onnxruntime
    known_hosts: Path
    identity: Path
    agent_root: str  # AUTOSEG_AGENT_ROOT, as the device sees it
    local_root: Path  # the same folder seen from this host
    fs_root: Path  # "/" of the device seen from this host (the arm64 root, or / for the x86 sshd)
    system_python: str  # a python3 without numpy and onnxruntime
    emulated: bool
    info: dict[str, str] | None = None  # arm64_device.sh info

    def ssh(self, command: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """Run a shell command on the device as its user, through the OpenSSH client."""
        user_host, _, port = self.target.rpartition(":")
        return subprocess.run(["ssh", "-p", port, "-i", str(self.identity), "-o", "BatchMode=yes",
                               "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
                               user_host, command], capture_output=True, text=True, timeout=timeout)

    def flags(self, python: str | None = None) -> list[str]:
        return ["--device", self.target, "--device-python", python or self.python,
                "--known-hosts", str(self.known_hosts), "--identity-file", str(self.identity)]

    def env(self) -> dict[str, str]:
        return {**os.environ, "AUTOSEG_AGENT_ROOT": self.agent_root}

    def host_path(self, device_path: str) -> Path:
        return self.fs_root / device_path.lstrip("/")

    def device_path(self, host_path: Path) -> str:
        return "/" + host_path.relative_to(self.fs_root).as_posix()

    def scratch(self, name: str) -> Path:
        """A fresh folder beside the agent root that the device user owns (seen from this host)."""
        base = self.local_root.parent
        path = base / name
        path.mkdir(parents=True, exist_ok=True)
        owner = base.parent.stat()  # the user's home (arm64) or the test's tmp dir (x86)
        for p in (base, path):
            os.chown(p, owner.st_uid, owner.st_gid)
        return path

    def write(self, path: Path, text: str, mode: int = 0o644) -> str:
        """Write a file for the device; returns its path as the device sees it."""
        path.write_text(text)
        path.chmod(mode)
        owner = path.parent.stat()
        os.chown(path, owner.st_uid, owner.st_gid)
        return self.device_path(path)
