"""A real PostgreSQL server on 127.0.0.1 for the storage tests: a throwaway cluster in a temp dir.

`initdb` and `pg_ctl` from the distribution's packages (Debian: /usr/lib/postgresql/<version>/bin). PostgreSQL
refuses to run as root, so as root (CI) the cluster belongs to an unprivileged user (`postgres` when the package
made it, else `nobody`) and lives in a temp dir of its own: pytest's base temp dir is 0700 root, out of its reach.
Local (socket) connections are trusted, for the fixture's own admin; TCP ones need a password (scram-sha-256),
as a real server's do. fsync is off: the cluster is thrown away.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

HOST = "127.0.0.1"
SUPERUSER = "postgres"


def server_bin() -> Path | None:
    """The newest installed server's bin directory, or one on PATH."""
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2].split(".")[0]))
    for d in reversed(dirs):
        if os.path.exists(f"{d}/initdb") and os.path.exists(f"{d}/pg_ctl"):
            return Path(d)
    found = shutil.which("pg_ctl")
    if found and os.path.exists(os.path.join(os.path.dirname(found), "initdb")):
        return Path(found).parent
    return None


def unavailable_reason() -> str | None:
    """Why the PostgreSQL tests cannot run here, or None."""
    if server_bin() is None:
        return "PostgreSQL server binaries (initdb, pg_ctl) not found; install postgresql (`make test` does it)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: cannot start PostgreSQL as an unprivileged user"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _run_as() -> str | None:
    """The user the cluster runs as when we are root (None: ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise RuntimeError("no unprivileged user (postgres, nobody) to run PostgreSQL as")


class PostgresServer:
    """One cluster: `start`, `stop`; `create_database` gives a fresh database owned by the test user, and its URL."""

    def __init__(self, user: str = "autoseg", password: str = "pg-test-pw-5dQ9x") -> None:
        bindir = server_bin()
        assert bindir is not None, unavailable_reason()
        self.bin = bindir
        self.os_user = _run_as()
        self.root = Path(tempfile.mkdtemp(prefix="autoseg-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.sockets.mkdir()
        self.log = self.root / "server.log"
        if self.os_user is not None:
            entry = pwd.getpwnam(self.os_user)
            for p in (self.root, self.sockets):
                os.chown(p, entry.pw_uid, entry.pw_gid)
        self.user = user
        self.password = password
        self.port = 0
        self._databases = 0

    def _cmd(self, *args: str) -> list[str]:
        cmd = [str(self.bin / args[0]), *args[1:]]
        return cmd if self.os_user is None else ["runuser", "-u", self.os_user, "--", *cmd]

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        # LC_ALL=C: the cluster must not depend on which locales this machine has.
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        return subprocess.run(self._cmd(*args), cwd=self.root, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)

    def start(self) -> PostgresServer:
        done = self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth-local=trust",
                         "--auth-host=scram-sha-256", "--no-locale", "-E", "UTF8", "--no-instructions")
        if done.returncode:
            raise RuntimeError(f"initdb failed: {done.stderr.strip() or done.stdout.strip()}")
        for _ in range(3):  # the free port may be taken between asking and binding
            self.port = free_port()
            opts = (f"-c listen_addresses={HOST} -p {self.port} -k {self.sockets} -c fsync=off "
                    "-c synchronous_commit=off -c full_page_writes=off -c max_connections=50")
            done = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60",
                             "start")
            if done.returncode == 0:
                break
        else:
            raise RuntimeError(f"pg_ctl start failed: {done.stderr.strip()}; log: {self._log_tail()}")
        self.admin(f"CREATE ROLE {self.user} LOGIN PASSWORD '{self.password}'")
        return self

    def _log_tail(self) -> str:
        try:
            return " | ".join(self.log.read_text().splitlines()[-5:])
        except OSError:
            return "(no log)"

    def admin(self, sql: str, database: str = "postgres") -> None:
        """Run `sql` as the superuser over the local socket (trusted: no password)."""
        import psycopg

        with psycopg.connect(host=str(self.sockets), port=self.port, user=SUPERUSER, dbname=database,
                             autocommit=True, connect_timeout=10) as con:
            con.execute(sql)

    def url(self, database: str, password: str | None = None, port: int | None = None) -> str:
        pw = quote(self.password if password is None else password, safe="")
        return f"postgresql+psycopg://{self.user}:{pw}@{HOST}:{port or self.port}/{database}"

    def create_database(self) -> str:
        """A fresh database owned by the test user: its URL."""
        self._databases += 1
        name = f"autoseg_test_{self._databases}"
        self.admin(f"CREATE DATABASE {name} OWNER {self.user}")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        with contextlib.suppress(Exception):  # best effort: the cluster goes at the session's end anyway
            self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop(self) -> None:
        if self.port:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop", timeout=60)
        deadline = time.monotonic() + 10
        while (self.data / "postmaster.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        shutil.rmtree(self.root, ignore_errors=True)
