"""`autoseg search` and `autoseg device check` against a real sshd on 127.0.0.1: latency from the device."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from autoseg.demo_data import generate_demo

pytestmark = pytest.mark.ssh


def autoseg(*args: object, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "autoseg", *map(str, args)], capture_output=True, text=True, timeout=300, env=env
    )


@pytest.fixture
def device_flags(sshd_server, tmp_path) -> list[str]:
    known = sshd_server.write_known_hosts(tmp_path / "known_hosts")
    return ["--device", sshd_server.target, "--device-python", sys.executable, "--known-hosts", known,
            "--identity-file", sshd_server.user_key]


@pytest.fixture
def env(agent_root) -> dict[str, str]:
    return {**os.environ, "AUTOSEG_AGENT_ROOT": str(agent_root)}


@pytest.mark.parametrize("workers", [1, 2])
def test_search_measures_every_trial_on_the_device(sshd_server, device_flags, env, tmp_path, workers):
    images, masks = generate_demo(tmp_path / "demo", n_images=5, size=64, seed=2)
    cfg = tmp_path / "c.yml"
    cfg.write_text(
        "search:\n  space:\n    levels: [1, 2]\n    kernels: [3]\n    channels: [4, 8]\n"
        "device:\n  warmup: 0\n  min_runs: 3\n  min_seconds: 0.0\n  max_busy_cores: null\ntrain:\n  threads: 1\n"
    )
    out = tmp_path / "run"
    proc = autoseg("search", "--config", cfg, "--images", images, "--masks", masks, "--out", out, "--trials", "2",
                   "--tile", "32", "--num-reps", "12", "--folds", "2", "--epochs", "1", "--final-epochs", "1",
                   "--final-tiles", "64",
                   "--workers", workers, *device_flags, env=env)
    assert proc.returncode == 0, proc.stderr
    study = optuna.load_study(study_name="autoseg", storage=f"sqlite:///{out / 'study.db'}")
    trials = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    # Two workers: each with its own connection and agent, the agents timing one model at a time.
    assert len(trials) == 2 if workers == 1 else 2 <= len(trials) <= 3
    if workers == 2:
        assert {t.user_attrs["worker"] for t in trials} == {0, 1}
    for t in trials:
        assert t.user_attrs["latency_source"] == "device"
        assert t.user_attrs["device"] == sshd_server.target
    card = json.loads((out / "best" / "model_card.json").read_text())
    assert card["latency_source"] == "device"
    assert sshd_server.target in (out / "report.md").read_text()


def test_device_check_prints_fingerprint_and_reference_latency(sshd_server, device_flags, env):
    proc = autoseg("device", "check", *device_flags, "--opset", "13", env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["reference_model"].endswith("opset 13")  # the opset the search will send
    assert report["source"] == "device"
    assert report["fingerprint"]["cores"] >= 1
    assert report["latency"]["median_ms"] > 0
    assert report["error"] is None
    # ... and the same net in int8, as `--precision int8` would time it
    assert report["int8_error"] is None and report["int8_latency"]["median_ms"] > 0
    assert report["int8_speedup"] == pytest.approx(
        report["latency"]["median_ms"] / report["int8_latency"]["median_ms"], rel=1e-2)


def test_device_check_on_unknown_host_says_how_to_trust_it(sshd_server, env, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    proc = autoseg("device", "check", "--device", sshd_server.target, "--device-python", sys.executable,
                   "--known-hosts", empty, "--identity-file", sshd_server.user_key, env=env)
    assert proc.returncode == 3
    assert "Traceback" not in proc.stderr
    assert "--trust-new-host" in proc.stderr.strip().splitlines()[-1]


def test_device_check_on_stopped_server_exits_3(fresh_sshd_server, env, tmp_path):
    known = fresh_sshd_server.write_known_hosts(tmp_path / "known_hosts")
    fresh_sshd_server.stop()
    proc = autoseg("device", "check", "--device", fresh_sshd_server.target, "--device-python", sys.executable,
                   "--known-hosts", known, "--identity-file", fresh_sshd_server.user_key, env=env)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr


def test_diagnosis_of_unreliable_latency():
    # The device check's diagnosis is a pure function: throttling and governors read from a fingerprint.
    from autoseg.device_check import diagnose

    notes = diagnose({"throttled": True, "throttled_raw": "0x50005", "governor": "powersave"}, 60.0, 80.0)
    assert any("throttling" in n for n in notes)
    assert any("performance" in n for n in notes)
    assert any("80" in n for n in notes)
    assert diagnose({"throttled": False, "governor": "performance"}, 40.0, 45.0) == []


def test_an_identity_file_that_is_not_a_key_is_one_line_exit_2(sshd_server, device_flags, env):
    # Checked before any connection: it used to say "check the device is on" (exit 3).
    flags = [*device_flags[:-1], f"{sshd_server.user_key}.pub"]  # the public half, a common mix-up
    proc = autoseg("device", "check", *flags, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{sshd_server.user_key}.pub is not a private key" in lines[0] and "device.identity_file" in lines[0]
