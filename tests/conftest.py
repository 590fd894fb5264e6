"""Shared fixtures: a real OpenSSH server and a real PostgreSQL server on 127.0.0.1, and tiny ONNX models."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from onnx_models import conv_relu_onnx
from postgres import PostgresServer
from postgres import unavailable_reason as postgres_unavailable
from sshd_server import SSHServer, unavailable_reason

from autoseg.config import DeviceConfig

# The tests train tiny nets: one thread is faster than two, and it avoids OpenMP stalls when the
# 2-core CI machine also runs sshd, the agent and onnxruntime.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_onnx() -> bytes:
    return conv_relu_onnx()


def _require_sshd() -> None:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def sshd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHServer]:
    """One sshd for the whole session; tests that stop or replace a server use fresh_sshd_server."""
    _require_sshd()
    server = SSHServer(tmp_path_factory.mktemp("sshd")).start()
    yield server
    server.stop()


@pytest.fixture
def fresh_sshd_server(tmp_path: Path) -> Iterator[SSHServer]:
    _require_sshd()
    server = SSHServer(tmp_path / "sshd").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def agent_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where SSHDevice deploys the agent in tests (instead of ~/.cache/autoseg-agent)."""
    return tmp_path_factory.mktemp("agent-root")


@pytest.fixture(scope="session")
def ssh_device_config(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., DeviceConfig]:
    """Factory: DeviceConfig for a test server (host key already trusted unless known_hosts is given)."""

    def make(server: SSHServer, **overrides: object) -> DeviceConfig:
        if "known_hosts" not in overrides:
            overrides["known_hosts"] = server.write_known_hosts(tmp_path_factory.mktemp("kh") / "known_hosts")
        values: dict = {
            "target": server.target,
            "python": sys.executable,  # the venv python, like --device-python on a real device
            "identity_file": server.user_key,
            "connect_timeout_s": 5.0,
            "reconnect_attempts": 1,
            "warmup": 1,
            "min_runs": 3,
            "min_seconds": 0.02,
            "max_busy_cores": None,  # the cache tests must not depend on how busy the test machine is
        }
        values.update(overrides)
        return DeviceConfig(**values)

    return make


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL cluster for the whole session (initdb + pg_ctl in a temp dir, loopback port)."""
    reason = postgres_unavailable()
    if reason:
        pytest.skip(reason)
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a fresh database (with the test user's password) on the session's server, dropped afterwards."""
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url)
