"""Where an SSH device is: `device.target` and the ssh config read as OpenSSH reads it (`ssh -G`), and whom to
trust there: known_hosts (a new host recorded only with trust_new_host, a changed key always refused)
and the identity file.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko

from autoseg.devices.records import DeviceRefused, one_line
from autoseg.errors import InputError

log = logging.getLogger(__name__)


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
                    one_line(r.stderr) or f"exit {r.returncode}", path)
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


def key_fp(key: paramiko.PKey) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class HostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Refuse unknown hosts, or with trust_new_host record them in known_hosts (trust on first use)."""

    def __init__(self, known_hosts: Path, trust: bool, device: str) -> None:
        self.known_hosts, self.trust, self.device = known_hosts, trust, device

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        if not self.trust:
            raise DeviceRefused(
                f"device {self.device}: host {hostname} is not in {self.known_hosts} "
                f"({key.get_name()} key {key_fp(key)}); check that fingerprint on the device "
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
                    key.get_name(), key_fp(key), hostname, self.known_hosts)


def check_identity_file(path: Path) -> None:
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
        raise InputError(f"device.identity_file: {path} is not a private key ({one_line(str(e))[:120]}); "
                         f"{fix}") from None


def check_known_hosts(path: Path) -> None:
    if path.exists() and not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file"
        raise InputError(f"device.known_hosts: {path} is {kind}; give the known_hosts file itself "
                         "(default ~/.ssh/known_hosts)")
