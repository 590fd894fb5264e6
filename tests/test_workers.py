"""Parallel search workers: the measuring gate, and `autoseg search --workers 2` as a user runs it."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import psutil
import pytest

from autoseg.config import load_config
from autoseg.demo_data import generate_demo
from autoseg.gate import Gate
from autoseg.search import STUDY_NAME, startup_plan
from autoseg.workers import threads_per_worker


def test_a_measurement_waits_for_epochs_in_flight_and_holds_new_ones_back(tmp_path):
    # Threads stand in for processes: flock locks belong to open files, and each use opens its own.
    gate = Gate(tmp_path)
    events: list[tuple[str, float]] = []
    in_epoch = threading.Event()

    def worker() -> None:
        with gate.epoch():
            in_epoch.set()
            time.sleep(0.3)
            events.append(("epoch 1 ends", time.monotonic()))
        time.sleep(0.05)  # the measurement has queued by now
        with gate.epoch():
            events.append(("epoch 2 starts", time.monotonic()))

    t = threading.Thread(target=worker)
    t.start()
    in_epoch.wait()
    with gate.measuring():
        events.append(("measure starts", time.monotonic()))
        time.sleep(0.2)
        events.append(("measure ends", time.monotonic()))
    t.join()
    order = [name for name, _ in sorted(events, key=lambda e: e[1])]
    assert order == ["epoch 1 ends", "measure starts", "measure ends", "epoch 2 starts"]


def test_each_worker_gets_an_equal_share_of_the_cores_unless_told():
    cores = os.cpu_count() or 1
    assert threads_per_worker(2, None) == max(1, cores // 2)
    assert threads_per_worker(4, 3) == 3
    assert threads_per_worker(10 * cores, None) == 1


def autoseg(*args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autoseg", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, Path]:
    return generate_demo(tmp_path_factory.mktemp("demo"), n_images=6, size=64, seed=1)


def search_args(tmp_path: Path, demo, out: Path, trials: int, final_epochs: int = 1) -> list[object]:
    cfg = tmp_path / "small.yml"
    cfg.write_text(
        "search:\n  space:\n    levels: [1, 2]\n    kernels: [3]\n    channels: [4, 8]\n"
        "device:\n  warmup: 0\n  min_runs: 3\n  min_seconds: 0.0\n  max_busy_cores: null\n"
        "eval:\n  num_examples: 1\n"
    )
    images, masks = demo
    return ["search", "--config", cfg, "--images", images, "--masks", masks, "--trials", trials, "--out", out,
            "--tile", "32", "--num-reps", "16", "--folds", "2", "--epochs", "1", "--final-epochs", final_epochs,
            "--final-tiles", 64,
            "--workers", "2"]


def worker_of_each_trial(db: Path) -> dict[int, int]:
    with sqlite3.connect(db) as con:
        rows = con.execute(
            "SELECT t.number, a.value_json FROM trials t JOIN trial_user_attributes a ON a.trial_id = t.trial_id "
            "WHERE a.key = 'worker' AND t.state IN ('COMPLETE', 'PRUNED')").fetchall()
    return {n: json.loads(v) for n, v in rows}


def test_two_workers_share_the_study_and_the_count(demo, tmp_path):
    out = tmp_path / "run"
    proc = autoseg(*search_args(tmp_path, demo, out, trials=4), "-q")
    assert proc.returncode == 0, proc.stderr
    card = json.loads((out / "best" / "model_card.json").read_text())
    # Each worker stops once 4 distinct nets are done; one may be finishing one more as that happens.
    assert 4 <= card["trials"]["distinct"] <= 5
    workers = worker_of_each_trial(out / "study.db")
    assert set(workers.values()) == {0, 1}  # both did trials
    assert card["test_miou"] is not None
    # Each trial of the cost-ordered start, whichever worker ran it, is the plan's net for its place.
    cfg = load_config(out / "config.yml")
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{out / 'study.db'}")
    plan = startup_plan(cfg)
    assert plan and [t.params for t in study.trials[: len(plan)]] == plan


def test_kill_9_takes_the_workers_down_and_a_rerun_resumes(demo, tmp_path):
    out = tmp_path / "run"
    args = search_args(tmp_path, demo, out, trials=8)
    proc = subprocess.Popen([sys.executable, "-m", "autoseg", *map(str, args), "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(worker_of_each_trial_safe(out / "study.db")) < 2:
        time.sleep(0.1)
    if proc.poll() is not None:
        pytest.fail("the search ended before it could be killed")
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children, "no worker process was started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, f"workers outlived the search: {alive}"
    before = worker_of_each_trial_safe(out / "study.db")

    again = autoseg(*args, "-q")
    assert again.returncode == 0, again.stderr
    after = worker_of_each_trial(out / "study.db")
    assert set(before) <= set(after)  # finished trials kept
    card = json.loads((out / "best" / "model_card.json").read_text())
    assert 8 <= card["trials"]["distinct"] <= 9


def worker_of_each_trial_safe(db: Path) -> dict[int, int]:
    if not db.exists():
        return {}
    try:
        return worker_of_each_trial(db)
    except sqlite3.Error:
        return {}
