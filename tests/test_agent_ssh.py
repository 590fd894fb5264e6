"""The host side of issue #22 sections 3-5 against a real sshd on 127.0.0.1 and the real agent.

A device whose shell rc prints, agents that answer outside the protocol, a busy device, a host that goes
away while its agent waits, two hosts sharing one device, and SSH inputs that are not what they claim.
Budget: < 20 s.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pwd
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
from sshd_server import SSHServer, unavailable_reason
from test_agent_hardening import HeldLock
from test_latency import FAST, SHAPE, make_ssh_device

from autoseg.devices import DeviceBusy, DeviceRefused, MeasureError, SSHDevice
from autoseg.errors import InputError
from edge_agent import protocol

pytestmark = pytest.mark.ssh

JUNK_RC = 'echo "Welcome to the device!"\necho "[motd] all systems nominal"\nprintf "no newline here"\n'


def login_shell_is_bash() -> bool:
    return pwd.getpwuid(os.getuid()).pw_shell.endswith("/bash")


@pytest.fixture
def chatty_sshd(tmp_path: Path):
    """An sshd whose user's ~/.bashrc prints on every exec channel, as many device images do."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    if not login_shell_is_bash():
        pytest.skip("the login shell is not bash, so ~/.bashrc is not read for exec channels")
    server = SSHServer(tmp_path / "sshd", shell_rc=JUNK_RC).start()
    yield server
    server.stop()


def test_a_shell_rc_that_prints_is_skipped_and_logged(chatty_sshd, ssh_device_config, agent_root, tiny_onnx,
                                                      caplog):
    caplog.set_level(logging.WARNING, logger="autoseg.devices")
    with make_ssh_device(ssh_device_config(chatty_sshd), agent_root) as dev:
        m = dev.measure(tiny_onnx, SHAPE, FAST)
        assert m.error == MeasureError.OK and m.source == "device", m.message
    skipped = [r.getMessage() for r in caplog.records if "before the agent started" in r.getMessage()]
    assert skipped and "skipped 3 lines" in skipped[0] and "Welcome to the device!" in skipped[0]


HOSTILE = r"""
import os, sys
sys.path.insert(0, os.getcwd())  # the deployed agent
from edge_agent import serve

mode, argv = sys.argv[1], sys.argv[4:]  # hostile.py MODE -m edge_agent serve ...
real_send = serve._send

def send(out, reply):
    if "fingerprint" in reply and mode == "no_fingerprint":
        reply = {k: v for k, v in reply.items() if k != "fingerprint"}
    if "fingerprint" in reply and mode == "deep":
        out.write(b"[" * 200000 + b"\n")
        out.flush()
        return
    real_send(out, reply)

serve._send = send
from edge_agent.__main__ import main
sys.exit(main(argv))
"""


def hostile_python(tmp_path: Path, mode: str) -> Path:
    """A device python that runs the real agent with one reply bent out of the protocol."""
    script = tmp_path / "hostile.py"
    script.write_text(HOSTILE)
    wrapper = tmp_path / f"python-{mode}"
    wrapper.write_text(f'#!/bin/sh\nif [ "$1" = "-m" ]; then exec {sys.executable} {script} {mode} "$@"; fi\n'
                       f'exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


@pytest.mark.parametrize(("mode", "detail"), [("no_fingerprint", "'fingerprint' is missing"),
                                               ("deep", "nested deeper than")])
def test_an_agent_outside_the_protocol_is_named_not_a_crash(sshd_server, ssh_device_config, agent_root, tmp_path,
                                                             mode, detail):
    cfg = ssh_device_config(sshd_server, python=str(hostile_python(tmp_path, mode)))
    t0 = time.monotonic()
    with pytest.raises(DeviceRefused, match="device agent speaks an unexpected protocol") as err:
        make_ssh_device(cfg, agent_root)
    assert detail in str(err.value) and err.value.exit_code == 3
    assert time.monotonic() - t0 < 15  # refused at once, not retried as if the device were off


def test_a_busy_device_says_so_and_gives_up_after_the_timeout(sshd_server, ssh_device_config, agent_root, tiny_onnx,
                                                              caplog):
    caplog.set_level(logging.WARNING, logger="autoseg.devices")
    held = HeldLock(agent_root / "measure.lock")  # another search's measurement holds the device
    try:
        with make_ssh_device(ssh_device_config(sshd_server), agent_root) as dev:
            dev._lock_timeout_s = 1.0
            t0 = time.monotonic()
            with pytest.raises(DeviceBusy, match="device busy: another autoseg measurement") as err:
                dev.measure(tiny_onnx, SHAPE, FAST)
            assert time.monotonic() - t0 < 10 and err.value.exit_code == 3
            assert any("device busy" in r.getMessage() for r in caplog.records)  # the agent's progress line
            held.release()
            held = None
            assert dev.measure(tiny_onnx, SHAPE, FAST).error == MeasureError.OK  # the same agent carries on
    finally:
        if held is not None:
            held.release()


def test_the_agent_exits_when_its_channel_closes_while_waiting(sshd_server, ssh_device_config, agent_root,
                                                               tiny_onnx):
    held = HeldLock(agent_root / "measure.lock")
    try:
        dev = make_ssh_device(ssh_device_config(sshd_server), agent_root)
        sha = hashlib.sha256(tiny_onnx).hexdigest()
        path = dev._upload(tiny_onnx, sha)
        model_id = dev._request("load", path=path, sha256=sha, timeout=30)["model_id"]
        pid, upload_dir = dev._hello["pid"], Path(dev._dirs["upload"])
        dev._send_raw(protocol.encode(protocol.request("measure", 999, model_id=model_id, shape=list(SHAPE),
                                                       lock_timeout_s=600.0)))
        time.sleep(0.5)  # the agent now waits for the lock
        assert psutil.Process(pid).is_running()
        dev._teardown()  # the host goes away: gave up on the reply, was killed, or lost the link
        deadline = time.monotonic() + 5
        while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the agent outlived its SSH channel"
            time.sleep(0.05)
        assert not upload_dir.exists()
        dev.close()
    finally:
        held.release()


def test_two_hosts_on_one_device_keep_their_model_files(sshd_server, ssh_device_config, agent_root, tiny_onnx):
    cfg = ssh_device_config(sshd_server)
    a, b = make_ssh_device(cfg, agent_root), make_ssh_device(cfg, agent_root)
    try:
        sha = hashlib.sha256(tiny_onnx).hexdigest()
        # The interleaving that lost a model: b uploads the same model, a unloads (deleting its file), b loads.
        path_a, path_b = a._upload(tiny_onnx, sha), b._upload(tiny_onnx, sha)
        assert path_a != path_b
        ra = a._request("load", path=path_a, sha256=sha, timeout=30)
        assert a._request("unload", model_id=ra["model_id"], timeout=30)["ok"]
        rb = b._request("load", path=path_b, sha256=sha, timeout=30)
        assert rb["ok"], rb
        assert b._request("unload", model_id=rb["model_id"], timeout=30)["ok"]

        results: list[MeasureError] = []

        def work(dev: SSHDevice) -> None:
            for _ in range(8):
                results.append(dev.measure(tiny_onnx, SHAPE, replace(FAST, min_runs=1, min_seconds=0.0)).error)

        threads = [threading.Thread(target=work, args=(d,)) for d in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == [MeasureError.OK] * 16
    finally:
        a.close()
        b.close()


# -- section 5: SSH inputs -----------------------------------------------------------------------------------


def test_an_identity_file_that_is_not_a_private_key_is_input_error(sshd_server, ssh_device_config, agent_root,
                                                                   tmp_path):
    noise = tmp_path / "noise"
    noise.write_bytes(os.urandom(300))
    for path in (Path(f"{sshd_server.user_key}.pub"), noise, tmp_path):
        with pytest.raises(InputError, match=r"device\.identity_file") as err:
            make_ssh_device(ssh_device_config(sshd_server, identity_file=path), agent_root)
        text = str(err.value)
        assert str(path) in text and "check the device is on" not in text and "\n" not in text
        assert err.value.exit_code == 2


def test_known_hosts_that_is_a_directory_is_input_error(sshd_server, ssh_device_config, agent_root, tmp_path):
    for trust in (False, True):
        with pytest.raises(InputError, match=r"device\.known_hosts") as err:
            make_ssh_device(ssh_device_config(sshd_server, known_hosts=tmp_path, trust_new_host=trust), agent_root)
        assert str(tmp_path) in str(err.value) and "directory" in str(err.value)
        assert err.value.exit_code == 2
