"""A real OpenSSH sshd on 127.0.0.1 for the SSH tests: throwaway host and user keys, everything in a tmp dir.

Runs as the current user (root in CI: PermitRootLogin prohibit-password). Public-key login only, SFTP via
internal-sftp, TCP forwarding on (for ProxyJump). The device python is not looked up through PATH: tests
pass cfg.python = sys.executable, which mirrors --device-python on a real device.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

SSHD = "/usr/sbin/sshd"
HOST = "127.0.0.1"


def unavailable_reason() -> str | None:
    """Why the SSH tests cannot run here, or None."""
    if not os.path.exists(SSHD):
        return f"{SSHD} not found; install openssh-server (`make test` does it)"
    if shutil.which("ssh-keygen") is None:
        return "ssh-keygen not found; install openssh-client"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def keygen(path: Path, comment: str) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL, timeout=30)
    return path


class SSHServer:
    """One sshd. `start`, `stop`, `restart` keep host key and port; `with_new_host_key` makes an impostor."""

    def __init__(self, root: Path, port: int | None = None, user_key: Path | None = None,
                 shell_rc: str | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.user = getpass.getuser()
        self.port = port or free_port()
        self._fixed_port = port is not None
        self.host_key = keygen(self.root / "host_ed25519", "autoseg-test-host")
        self.user_key = user_key or keygen(self.root / "user_ed25519", "autoseg-test-user")
        self.authorized_keys = self.root / "authorized_keys"
        self.authorized_keys.write_text(Path(f"{self.user_key}.pub").read_text())
        self.authorized_keys.chmod(0o600)
        self.config = self.root / "sshd_config"
        self.log = self.root / "sshd.log"
        self.proc: subprocess.Popen | None = None
        # A session HOME of its own whose ~/.bashrc is shell_rc: bash sources it for every exec channel
        # (Debian builds bash with SSH_SOURCE_BASHRC), as a device's rc files are. The real HOME stays untouched.
        self.home: Path | None = None
        if shell_rc is not None:
            self.home = self.root / "home"
            self.home.mkdir(exist_ok=True)
            (self.home / ".bashrc").write_text(shell_rc)

    # -- facts for the client side --------------------------------------------------------------------

    @property
    def target(self) -> str:
        return f"{self.user}@{HOST}:{self.port}"

    def known_hosts_line(self) -> str:
        kind, b64 = Path(f"{self.host_key}.pub").read_text().split()[:2]
        return f"[{HOST}]:{self.port} {kind} {b64}\n"

    def write_known_hosts(self, path: Path) -> Path:
        path.write_text(self.known_hosts_line())
        return path

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> SSHServer:
        if self.proc is not None and self.proc.poll() is None:
            return self
        if os.geteuid() == 0:
            # sshd running as root insists on its privilege separation directory.
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        for _ in range(5):
            self.config.write_text(self._config_text())
            log = open(self.log, "wb")  # noqa: SIM115 - sshd writes to it until stop()
            self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log, start_new_session=True)
            log.close()
            if self._wait_ready(timeout):
                return self
            text = self.log.read_text(errors="replace")
            self._kill_proc()
            if "Address already in use" in text and not self._fixed_port:
                self.port = free_port()  # lost the race for the port; pick another
                continue
            raise RuntimeError(f"sshd did not start on port {self.port}:\n{text[-2000:]}")
        raise RuntimeError("sshd: no free port after 5 attempts")

    def stop(self) -> None:
        """Stop sshd and every session it spawned (a powered-off device drops its connections too)."""
        if self.proc is None:
            return
        # Deepest first, so each killed process is reaped by its (still running) parent.
        procs = self.descendants()
        while procs:
            pids = {p.pid for p in procs}
            leaves = []
            for p in procs:
                try:
                    if not any(c.pid in pids for c in p.children()):
                        leaves.append(p)
                except psutil.Error:
                    leaves.append(p)
            for p in leaves:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            _wait_gone(leaves, timeout=5.0)
            procs = [p for p in procs if p not in leaves]
        self._kill_proc()

    def restart(self) -> SSHServer:
        self.stop()
        self._fixed_port = True  # same host key, same port
        return self.start()

    def with_new_host_key(self, root: Path) -> SSHServer:
        """A second server (not started) on the same port and user key but with a DIFFERENT host key."""
        return SSHServer(root, port=self.port, user_key=self.user_key)

    # -- processes -------------------------------------------------------------------------------------

    def descendants(self) -> list[psutil.Process]:
        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []

    def agent_processes(self) -> list[psutil.Process]:
        """`python -m edge_agent serve` processes started through this server."""
        out = []
        for p in self.descendants():
            try:
                cmd = p.cmdline()
            except psutil.Error:
                continue
            if "edge_agent" in cmd and "serve" in cmd:
                out.append(p)
        return out

    def _kill_proc(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def _wait_ready(self, timeout: float) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        marker = f"Server listening on {HOST} port {self.port}"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if marker in self.log.read_text(errors="replace"):
                return True
            time.sleep(0.02)
        return False

    def _config_text(self) -> str:
        return "\n".join([
            f"Port {self.port}",
            f"ListenAddress {HOST}",
            f"HostKey {self.host_key}",
            f"PidFile {self.root / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            "StrictModes no",
            "UsePAM no",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "AllowTcpForwarding yes",
            "AllowAgentForwarding no",
            "X11Forwarding no",
            "PrintMotd no",
            "UseDNS no",
            "LoginGraceTime 20",
            "MaxStartups 50",
            "MaxSessions 20",
            "LogLevel INFO",
            "Subsystem sftp internal-sftp",
            *([f"SetEnv HOME={self.home}"] if self.home is not None else []),
            "",
        ])


def _wait_gone(procs: list[psutil.Process], timeout: float) -> None:
    """Wait until killed processes are gone or zombies (reaping is up to their new parent)."""
    deadline = time.monotonic() + timeout
    for p in procs:
        while time.monotonic() < deadline:
            try:
                if p.status() == psutil.STATUS_ZOMBIE:
                    time.sleep(0.02)  # give the parent a moment to reap it
                    if p.status() == psutil.STATUS_ZOMBIE:
                        break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.01)
