"""The agent never hangs and never dies on hostile input: real `python -m edge_agent serve` subprocesses.

Issue #22 sections 3 and 4, agent side: the measurement lock (private, no FIFOs or symlinks, a bounded wait
with progress lines, exit when the host goes away), stale model files, two agents on one cache dir, and
JSON nested too deep. Budget: < 15 s.
"""

from __future__ import annotations

import fcntl
import os
import signal
import stat
import time
from pathlib import Path

import pytest
from test_edge_agent import FAST, Agent, assert_error, conv_relu_model, sha

from edge_agent import protocol

SHAPE = [1, 3, 16, 16]


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    return conv_relu_model()


def upload(agent: Agent, data: bytes, name: str = "m.onnx") -> str:
    """Put a model where the host would (the agent's own folder); returns the path to load."""
    path = agent.upload_dir / name
    path.write_bytes(data)
    return f"{agent.upload_dir.name}/{name}"


def load(agent: Agent, data: bytes) -> str:
    reply = agent.call("load", path=upload(agent, data), sha256=sha(data))
    assert reply["ok"], reply
    return reply["model_id"]


def measure(agent: Agent, model_id: str, **fields) -> dict:
    return agent.call("measure", model_id=model_id, shape=SHAPE, **{**FAST, **fields})


class HeldLock:
    """The measurement lock held by this process, as another measurement (or any local process) would."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        os.close(self.fd)


# -- section 4: hostile lines -----------------------------------------------------------------------------


def test_deeply_nested_lines_are_refused_before_parsing(tmp_path: Path) -> None:
    agent = Agent(tmp_path)
    try:
        deep_value = protocol.encode(protocol.request("hello", 5))[:-2] + b',"x":' + b"[" * 5000 + b"]" * 5000 + b"}\n"
        for line in (b"[" * 200000 + b"\n", b'{"a":' * 100000 + b"\n", deep_value):
            reply = agent.send_raw(line)
            assert_error(reply, "bad_request")
            assert "nested deeper than" in reply["error"]["message"]
        assert agent.proc.poll() is None
        assert "RecursionError" not in agent.stderr()
        assert agent.call("hello")["ok"]
        assert agent.call("bye")["ok"]
        assert agent.wait() == 0
    finally:
        agent.close()


def test_decode_bounds_depth_but_not_brackets_inside_strings() -> None:
    with pytest.raises(protocol.ProtocolError, match="nested deeper than") as info:
        protocol.decode(b"[" * 200000)
    assert info.value.code == "bad_request"
    with pytest.raises(protocol.ProtocolError, match="nested deeper than"):
        protocol.decode("[" * (protocol.MAX_DEPTH + 1) + "]" * (protocol.MAX_DEPTH + 1))
    with pytest.raises(protocol.ProtocolError, match="longer than"):
        protocol.decode(b" " * (protocol.MAX_LINE_BYTES + 1))
    # Brackets inside strings, escaped quotes included, are text, not nesting.
    text = '[[[{"a": "\\"' + "[" * 5000 + '"}]]]'
    msg = protocol.encode(protocol.request("hello", 1, note=text))
    assert protocol.decode(msg)["note"] == text
    at_limit = "[" * (protocol.MAX_DEPTH - 1) + "]" * (protocol.MAX_DEPTH - 1)  # inside the object: MAX_DEPTH
    assert protocol.decode(f'{{"v": {protocol.PROTOCOL_VERSION}, "x": {at_limit}}}')


def test_replies_are_checked_against_one_schema(tmp_path: Path, model_bytes: bytes) -> None:
    agent = Agent(tmp_path)
    try:
        hello = agent.call("hello")
        model_id = load(agent, model_bytes)
        good = measure(agent, model_id)
        assert good["ok"], good
    finally:
        agent.close()
    v = protocol.PROTOCOL_VERSION

    def refused(msg: dict, op: str | None, match: str) -> None:
        with pytest.raises(protocol.ProtocolError, match=match):
            reply = protocol.decode_reply(protocol.encode(msg))
            if op is not None:
                protocol.check_reply(reply, op)

    assert protocol.check_reply(protocol.decode_reply(protocol.encode(hello)), "hello") == hello
    assert protocol.check_reply(protocol.decode_reply(protocol.encode(good)), "measure") == good
    refused({k: x for k, x in hello.items() if k != "fingerprint"}, "hello", "'fingerprint' is missing")
    refused({**hello, "fingerprint": ["x"]}, "hello", "'fingerprint' must be an object")
    refused({**hello, "upload_dir": "../../etc"}, "hello", "'upload_dir'")
    refused({**good, "stats": {**good["stats"], "median_ms": "fast"}}, "measure", "'stats.median_ms'")
    refused({**good, "stats": {k: x for k, x in good["stats"].items() if k != "count"}}, "measure", "'stats.count'")
    refused({"v": v, "id": 1}, None, "neither")
    refused({"v": v, "id": "1", "ok": True}, None, "'id'")
    refused({"v": v, "id": 1, "ok": False, "error": {"code": "teapot", "message": "x"}}, None, "teapot")
    refused({"v": v, "id": 1, "ok": False}, None, "'error'")
    refused({"v": v + 1, "id": 1, "ok": True}, None, "protocol version")
    with pytest.raises(protocol.ProtocolError, match="nested deeper than"):
        protocol.decode_reply(b"[" * 200000 + b"\n")
    progress = protocol.decode_reply(protocol.encode(protocol.progress(4, "device busy: x")))
    assert progress == {"v": v, "id": 4, "progress": "device busy: x"}
    assert protocol.check_reply(protocol.decode_reply(protocol.encode(protocol.ok(2))), "unload") == protocol.ok(2)


# -- section 3: the measurement lock -----------------------------------------------------------------------


def test_default_lock_is_in_a_private_directory_of_the_user(tmp_path: Path, model_bytes: bytes) -> None:
    home = tmp_path / "home"
    home.mkdir()
    agent = Agent(tmp_path, lock=None, env={**os.environ, "HOME": str(home)})
    try:
        assert measure(agent, load(agent, model_bytes))["ok"]
    finally:
        agent.close()
    lock = home / ".cache" / "autoseg-agent" / "measure.lock"
    assert stat.S_ISREG(lock.lstat().st_mode)
    assert stat.S_IMODE(lock.parent.stat().st_mode) == 0o700


@pytest.mark.parametrize("kind", ["fifo", "symlink", "shared_dir"])
def test_a_lock_that_others_could_hold_is_refused_not_waited_for(tmp_path: Path, model_bytes: bytes,
                                                                  kind: str) -> None:
    agent = Agent(tmp_path)
    lock = agent.lock
    lock.parent.mkdir(mode=0o700)
    if kind == "fifo":
        os.mkfifo(lock)  # opening a FIFO blocks until a writer comes: the agent used to hang here for good
        want = "not a regular file"
    elif kind == "symlink":
        (tmp_path / "elsewhere").write_text("")
        lock.symlink_to(tmp_path / "elsewhere")
        want = "symlink"
    else:
        lock.parent.chmod(0o777)
        want = "others can write"
    try:
        model_id = load(agent, model_bytes)
        t0 = time.monotonic()
        reply = measure(agent, model_id)
        assert time.monotonic() - t0 < 5
        assert_error(reply, "lock_failed")
        assert want in reply["error"]["message"] and str(lock) in reply["error"]["message"]
        assert agent.call("bye")["ok"]
        assert agent.wait() == 0
    finally:
        agent.close()


def test_a_held_lock_is_waited_for_with_progress_lines_then_refused(tmp_path: Path, model_bytes: bytes) -> None:
    lock = tmp_path / "lock" / "measure.lock"
    holder = Agent(tmp_path / "holder", lock=lock)
    waiter = Agent(tmp_path / "waiter", "--busy-report-s", "0.1", lock=lock)
    try:
        held_id, wait_id = load(holder, model_bytes), load(waiter, model_bytes)
        holder.proc.stdin.write(protocol.encode(protocol.request(
            "measure", 99, model_id=held_id, shape=SHAPE, **{**FAST, "min_seconds": 1.5})))
        holder.proc.stdin.flush()
        deadline = time.monotonic() + 10
        while str(holder.hello["pid"]) not in (lock.read_text() if lock.exists() else ""):
            assert time.monotonic() < deadline, "the holder never took the lock"
            time.sleep(0.02)
        t0 = time.monotonic()
        reply = measure(waiter, wait_id, lock_timeout_s=0.6)
        waited = time.monotonic() - t0
        assert_error(reply, "busy")
        assert 0.5 < waited < 1.4
        text = reply["error"]["message"]
        assert text.startswith("device busy: another autoseg measurement")
        assert f"pid {holder.hello['pid']}" in text and "holds the lock since" in text and "0.6 s" in text
        assert waiter.progress, "no progress line while waiting"
        first = waiter.progress[0]
        assert first["id"] == waiter._id and first["progress"].startswith("device busy: another autoseg measurement")
        assert holder.read()["ok"]  # the holder's own measurement was not disturbed
        assert measure(waiter, wait_id)["ok"]  # and once it is done the lock is free
    finally:
        holder.close()
        waiter.close()


@pytest.mark.parametrize("how", ["stdin_eof", "stdout_closed"])
def test_agent_exits_when_the_host_goes_away_while_waiting(tmp_path: Path, model_bytes: bytes, how: str) -> None:
    agent = Agent(tmp_path, "--busy-report-s", "0.1")
    held = HeldLock(agent.lock)
    try:
        model_id = load(agent, model_bytes)
        agent.proc.stdin.write(protocol.encode(protocol.request("measure", 50, model_id=model_id, shape=SHAPE, **FAST)))
        agent.proc.stdin.flush()
        msg = protocol.decode_reply(agent.read_line())
        assert msg["progress"].startswith("device busy: another autoseg measurement")  # it waits, and says so
        upload_dir = agent.upload_dir
        if how == "stdin_eof":
            agent.proc.stdin.close()
        else:
            agent.proc.stdout.close()
        rc = agent.proc.wait(10)  # long before the lock's timeout (600 s)
        assert rc in (0, 1)
        assert not upload_dir.exists()  # and it cleaned up after itself
        assert "Traceback" not in agent.stderr()
    finally:
        held.release()
        agent.close()


# -- section 3: model files ----------------------------------------------------------------------------------


def test_files_left_by_a_killed_agent_are_removed_at_the_next_start(tmp_path: Path, model_bytes: bytes) -> None:
    cache = tmp_path / "cache"
    killed = Agent(tmp_path / "killed", cache=cache)
    alive = Agent(tmp_path / "alive", cache=cache)
    try:
        load(killed, model_bytes)
        upload(killed, model_bytes, "never-loaded.onnx")  # uploaded, then the agent died before loading it
        load(alive, model_bytes)
        left, kept = killed.upload_dir, alive.upload_dir
        killed.proc.send_signal(signal.SIGKILL)
        killed.proc.wait(10)
        assert sorted(p.name for p in left.iterdir() if p.suffix == ".onnx") == ["m.onnx", "never-loaded.onnx"]
        fresh = Agent(tmp_path / "fresh", cache=cache)
        try:
            assert fresh.call("hello")["ok"]
            assert not left.exists()  # the dead agent's files are gone
            assert (kept / "m.onnx").exists()  # a live agent's are not
            assert fresh.upload_dir not in (left, kept)
        finally:
            fresh.close()
        again = alive.call("load", path=f"{kept.name}/m.onnx", sha256=sha(model_bytes))
        assert again["ok"] and measure(alive, again["model_id"])["ok"]
    finally:
        killed.close()
        alive.close()


def test_two_agents_on_one_cache_dir_keep_their_own_files(tmp_path: Path, model_bytes: bytes) -> None:
    # Two searches on one device, same model: one agent's unload used to delete the other's file.
    cache = tmp_path / "cache"
    a, b = Agent(tmp_path / "a", cache=cache), Agent(tmp_path / "b", cache=cache)
    try:
        assert a.upload_dir != b.upload_dir
        for _ in range(25):
            path_a, path_b = upload(a, model_bytes), upload(b, model_bytes)
            ra = a.call("load", path=path_a, sha256=sha(model_bytes))
            assert ra["ok"], ra
            assert a.call("unload", model_id=ra["model_id"])["ok"]  # deletes a's file only
            rb = b.call("load", path=path_b, sha256=sha(model_bytes))
            assert rb["ok"], rb
            assert b.call("unload", model_id=rb["model_id"])["ok"]
        assert a.call("bye")["ok"] and b.call("bye")["ok"]
        assert a.wait() == 0 and b.wait() == 0
        assert list((cache / "models").iterdir()) == []  # both cleaned up after themselves
    finally:
        a.close()
        b.close()
