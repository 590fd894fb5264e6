"""The SSH connection to a device, through its jump hosts, and short commands run over it."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import paramiko

from autoseg.config import DeviceConfig
from autoseg.devices.records import DeviceRefused
from autoseg.devices.ssh_config import HostKeyPolicy, SSHTarget, key_fp
from autoseg.errors import DeviceUnreachable, InputError


class Dropped(Exception):
    """The SSH connection or the agent went away; the measurement can be retried after reconnecting.

    agent_exit: the agent process ended while the SSH connection stayed up (killed, crashed, OOM).
    during_model: it happened while a model was being loaded or measured.
    """

    def __init__(self, message: str, agent_exit: bool = False) -> None:
        super().__init__(message)
        self.agent_exit = agent_exit
        self.during_model = False


def open_clients(target: SSHTarget, cfg: DeviceConfig, known_hosts: Path, timeout: float,
                 clients: list[paramiko.SSHClient]) -> None:
    """Connect to target through its jump hosts, appending each client to clients as it is made
    (so that the caller closes them all, however far this got)."""
    hops = [*target.proxy_jump, target]
    sock = None
    for i, hop in enumerate(hops):
        client = paramiko.SSHClient()
        if known_hosts.is_file():
            try:
                client.load_system_host_keys(str(known_hosts))
            except (OSError, paramiko.SSHException, ValueError) as e:
                raise InputError(
                    f"device.known_hosts: {known_hosts} cannot be read ({e}); fix or remove it"
                ) from None
        client.set_missing_host_key_policy(
            HostKeyPolicy(known_hosts, cfg.trust_new_host, target.name))
        clients.append(client)
        # A jump host without its own IdentityFile tries the device's, the usual setup.
        files = hop.identity_files or target.identity_files
        keys = ([str(Path(cfg.identity_file).expanduser())] if cfg.identity_file
                else [p for p in files if os.path.isfile(p)])
        try:
            client.connect(
                hop.host, port=hop.port, username=hop.user, key_filename=keys or None,
                look_for_keys=not keys, allow_agent=True, sock=sock, timeout=timeout,
                banner_timeout=timeout, auth_timeout=timeout, channel_timeout=timeout,
            )
        except paramiko.BadHostKeyException as e:
            raise DeviceRefused(
                f"device {target.name}: host key of {hop.hostkey_name} has CHANGED "
                f"(known_hosts has {key_fp(e.expected_key)}, the server sent {key_fp(e.key)}); "
                "this may be an attack. If the device was reinstalled, remove the old key with "
                f"`ssh-keygen -R '{hop.hostkey_name}' -f {known_hosts}` "
                "and connect with --trust-new-host"
            ) from None
        except paramiko.AuthenticationException as e:
            raise _login_refused(target, hop, keys, str(e)) from None
        except socket.gaierror as e:  # no such name: waiting will not make one, so no retries
            unmatched = (f"; no Host entry matched '{hop.alias}' in the ssh config read by {hop.config_source}"
                         if hop.host == hop.alias else f" (Host '{hop.alias}' in {hop.config_source})")
            raise DeviceRefused(f"device {hop.alias}: cannot resolve host name '{hop.host}' ({e.strerror})"
                                f"{unmatched}; check the name or add a Host entry") from None
        except (OSError, EOFError, paramiko.SSHException) as e:
            if "No authentication methods available" in str(e):  # no key file, no agent
                raise _login_refused(target, hop, keys, "no key or ssh-agent available") from None
            where = f"{hop.user}@{hop.host}:{hop.port}"
            raise DeviceUnreachable(f"{where}: {e or type(e).__name__}") from None
        transport = client.get_transport()
        assert transport is not None
        transport.set_keepalive(15)
        if i + 1 < len(hops):
            nxt = hops[i + 1]
            try:
                sock = transport.open_channel("direct-tcpip", (nxt.host, nxt.port), ("127.0.0.1", 0),
                                              timeout=timeout)
            except (OSError, EOFError, paramiko.SSHException) as e:
                raise DeviceUnreachable(
                    f"jump host {hop.host} cannot reach {nxt.host}:{nxt.port} ({e or type(e).__name__})"
                ) from None

def _login_refused(target: SSHTarget, hop: SSHTarget, keys: list[str], why: str) -> DeviceRefused:
    tried = f"key {keys[0]}" if keys else "ssh-agent and ~/.ssh/id_* keys"
    return DeviceRefused(
        f"device {target.name}: login as {hop.user}@{hop.host}:{hop.port} refused ({why}; tried "
        f"{tried}); add your public key to ~/.ssh/authorized_keys on the device or pass --identity-file"
    )

def exec_start(client: paramiko.SSHClient, cmd: str, timeout: float) -> paramiko.Channel:
    """Start a short command; its stdout and stderr are combined."""
    transport = client.get_transport()
    assert transport is not None
    try:
        chan = transport.open_session(timeout=timeout)
        chan.set_combine_stderr(True)
        chan.exec_command(cmd)
    except (OSError, EOFError, paramiko.SSHException) as e:
        raise Dropped(f"running a command failed: {e or type(e).__name__}") from None
    return chan

def exec_finish(chan: paramiko.Channel, timeout: float) -> tuple[int, str]:
    """(exit status, output) of a command started by exec_start."""
    out = b""
    deadline = time.monotonic() + timeout
    try:
        chan.settimeout(timeout)
        while data := chan.recv(65536):
            out += data
            if time.monotonic() > deadline:
                raise TimeoutError()
        status = chan.recv_exit_status()
    except TimeoutError:
        raise Dropped(f"a command did not finish within {timeout:.0f} s") from None
    except (OSError, EOFError, paramiko.SSHException) as e:
        raise Dropped(f"running a command failed: {e or type(e).__name__}") from None
    finally:
        chan.close()
    return status, out.decode("utf-8", "replace")
