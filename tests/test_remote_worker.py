"""`autoseg worker` on a real PostgreSQL server: hosts simulated by processes with their own working directory and
their own copy of the data, talking only through the database URL."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from autoseg.search import METRIC_NAMES, distinct_trials

pytestmark = pytest.mark.postgres

STUDY = "drone-7"
# The first process waits 1.5 s before each trial, so that the worker (importing torch meanwhile) gets some of a
# 4-trial budget; pacing only, the trials are real. Both poll the study every 0.2 s instead of every 5 s.
FAST_POLL = "import autoseg.study_data as d; d.POLL_S = 0.2"
PACED = (FAST_POLL + "; import time, autoseg.search as s; call = s.Objective.__call__; "
         "s.Objective.__call__ = lambda self, trial: (time.sleep(1.5), call(self, trial))[1]")


def _autoseg(cwd: Path, *args: object, prelude: str = "pass") -> subprocess.Popen:
    code = f"import sys; {prelude}; from autoseg.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _done(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def _host(root: Path, data: Path) -> Path:
    """A host: its own working directory with its own copy of the data."""
    root.mkdir(parents=True)
    shutil.copytree(data, root / "data")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from autoseg.demo_data import generate_demo

    images, masks = generate_demo(tmp_path_factory.mktemp("demo") / "data", n_images=6, size=64, seed=1)
    assert images.parent == masks.parent
    return images.parent


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory, postgres_server, data):
    """A search on host A and a worker on host B, the worker started first: one study, one budget of 4."""
    url = postgres_server.create_database()
    base = tmp_path_factory.mktemp("hosts")
    a, b = _host(base / "a", data), _host(base / "b", data)
    (a / "small.yml").write_text(
        "search:\n  space:\n    levels: [1]\n    kernels: [3]\n    channels: [4, 8, 16]\n"
        "device:\n  warmup: 0\n  min_runs: 2\n  min_seconds: 0.0\n  max_busy_cores: null\n"
        "eval:\n  num_examples: 1\n")
    worker = _autoseg(b, "worker", "--storage", url, "--study", STUDY, "--images", "data/images", "--masks",
                      "data/masks", "--out", "wrun", prelude=FAST_POLL)
    search = _autoseg(a, "search", "--config", "small.yml", "--images", "data/images", "--masks", "data/masks",
                      "--out", "run", "--tile", "32", "--num-reps", "16", "--folds", "2", "--epochs", "1",
                      "--final-epochs", "1", "--final-data", "reps", "--trials", "4", "--storage", url,
                      "--study", STUDY, prelude=PACED)
    done = {"search": _done(search), "worker": _done(worker)}
    yield {"url": url, "a": a, "b": b, "pids": (search.pid, worker.pid), **done}
    postgres_server.drop_database(url)


def test_a_search_and_a_worker_on_another_host_share_one_budget(shared_run):
    (code, err), (wcode, werr) = shared_run["search"], shared_run["worker"]
    assert code == 0, err
    assert wcode == 0, werr
    study = optuna.load_study(study_name=STUDY, storage=shared_run["url"])
    assert not [t for t in study.trials if t.state in (optuna.trial.TrialState.RUNNING,
                                                       optuna.trial.TrialState.FAIL)]
    distinct = distinct_trials(study)
    # Each process stops once 4 distinct nets are done; the other may be finishing one more as that happens.
    assert 4 <= len(distinct) <= 5
    hosts = {t.user_attrs["host"].rsplit(":", 1)[1] for t in study.trials}
    assert hosts == set(map(str, shared_run["pids"]))  # both ran trials
    card = json.loads((shared_run["a"] / "run" / "best" / "model_card.json").read_text())
    assert card["trials"]["distinct"] == len(distinct)  # counted once, whoever ran it
    assert card["test_miou"] is not None
    report = json.loads((shared_run["a"] / "run" / "report.json").read_text())  # the named study's
    assert report["study"]["name"] == STUDY and report["study"]["n_trials"] == len(study.trials)
    assert "data_fingerprint" not in report["study"]["user_attrs"]
    # The worker trained on the study's representatives, cut from its own copy of the data; it trained no final net.
    wrun = shared_run["b"] / "wrun"
    assert not (wrun / "best").exists() and not (wrun / "reps").exists()
    assert "joined study 'drone-7'" in werr and "distinct nets" in werr


def test_the_study_records_the_data_the_workers_train_on(shared_run):
    study = optuna.load_study(study_name=STUDY, storage=shared_run["url"])
    fp = study.user_attrs["data_fingerprint"]
    data = json.loads((shared_run["a"] / "run" / "data.json").read_text())
    assert fp["digest"] == data["digest"] and fp["tiles"]["size"] == 32
    manifest = (shared_run["a"] / "run" / "reps" / "manifest.csv").read_text().splitlines()[1:]
    assert sorted(fp["reps"]["32"]) == sorted([r.split(",")[0], int(r.split(",")[2]), int(r.split(",")[1])]
                                              for r in manifest)
    assert study.user_attrs["run_config"]["search"]["storage"].count(":***@") == 1  # no password in the study


def test_optuna_reads_the_named_study_with_its_metric_names(shared_run):
    study = optuna.load_study(study_name=STUDY, storage=shared_run["url"])  # what optuna-dashboard does
    assert study.metric_names == list(METRIC_NAMES["penalty"])
    assert STUDY in optuna.get_all_study_names(storage=shared_run["url"])


def test_a_worker_with_other_data_is_refused_in_one_line(shared_run, tmp_path, data):
    c = _host(tmp_path / "c", data)
    images = sorted((c / "data" / "images").iterdir())
    images[0].write_bytes(images[1].read_bytes())  # same file names, one image's contents changed
    code, err = _done(_autoseg(c, "worker", "--storage", shared_run["url"], "--study", STUDY, "--images",
                               "data/images", "--masks", "data/masks", "-q"))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("autoseg: error: ") and "the dataset digest differs: " in lines[0]
    assert "the same 6 file names, other contents" in lines[0]


def test_a_worker_for_a_study_that_is_not_there_waits_then_says_so(shared_run, tmp_path, postgres_server):
    prelude = "import autoseg.study_data as d; d.POLL_S = 0.1; d.WAIT_S = 0.5"
    code, err = _done(_autoseg(tmp_path, "worker", "--storage", shared_run["url"], "--study", "nope", "-q",
                               prelude=prelude))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "--study nope: no such study" in lines[0] and f"studies there: {STUDY}" in lines[0]
    assert ":***@" in lines[0] and postgres_server.password not in err


@pytest.mark.slow  # a third search and worker (about 12 s on an idle 2-core machine)
def test_a_worker_killed_mid_trial_has_its_trial_run_again_by_the_search(tmp_path, postgres_url, data):
    import signal
    import time

    # Heartbeat every 1 s, stale after 2 s (instead of 60 and 180), in both processes.
    beat = "import autoseg.storage as st; st.HEARTBEAT_S = 1; st.GRACE_S = 2"
    a, k = _host(tmp_path / "a", data), _host(tmp_path / "k", data)
    (a / "small.yml").write_text(
        "search:\n  space:\n    levels: [1]\n    kernels: [3]\n    channels: [4, 8, 16]\n"
        "device:\n  warmup: 0\n  min_runs: 2\n  min_seconds: 0.0\n  max_busy_cores: null\n"
        "eval:\n  num_examples: 1\n")
    doomed = _autoseg(k, "worker", "--storage", postgres_url, "--study", STUDY, "--images", "data/images",
                      "--masks", "data/masks", prelude=f"{FAST_POLL}; {beat}")
    search = _autoseg(a, "search", "--config", "small.yml", "--images", "data/images", "--masks", "data/masks",
                      "--out", "run", "--tile", "32", "--num-reps", "16", "--folds", "2", "--epochs", "1",
                      "--final-epochs", "1", "--final-data", "reps", "--trials", "4", "--storage", postgres_url,
                      "--study", STUDY, "-q", prelude=f"{PACED}; {beat}")
    try:
        killed, ends = None, time.time() + 120
        while killed is None and time.time() < ends and doomed.poll() is None:
            try:
                running = optuna.load_study(study_name=STUDY, storage=postgres_url).get_trials(
                    deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            except KeyError:  # no study yet
                running = []
            mine = [t for t in running if t.user_attrs.get("host", "").endswith(f":{doomed.pid}")]
            if mine:
                os.kill(doomed.pid, signal.SIGKILL)  # mid-trial
                killed = mine[0].number
            time.sleep(0.05)
        assert killed is not None, "the worker never ran a trial"
        code, err = _done(search)
    finally:
        for p in (doomed, search):
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert code == 0, err
    trials = optuna.load_study(study_name=STUDY, storage=postgres_url).get_trials(deepcopy=False)
    assert trials[killed].state == optuna.trial.TrialState.FAIL
    redo = [t for t in trials if t.user_attrs.get("redo_of") == killed]
    assert len(redo) == 1 and redo[0].state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    assert redo[0].params == trials[killed].params and redo[0].user_attrs["host"].endswith(f":{search.pid}")
    card = json.loads((a / "run" / "best" / "model_card.json").read_text())
    assert card["trials"]["distinct"] == len(distinct_trials(optuna.load_study(study_name=STUDY,
                                                                               storage=postgres_url)))
    assert 4 <= card["trials"]["distinct"] <= 5  # the killed trial is counted once: its redo


def test_the_search_waits_a_bounded_time_for_trials_running_elsewhere(postgres_url, monkeypatch, caplog):
    import threading
    import warnings

    from autoseg import storage, study_data

    monkeypatch.setattr(study_data, "POLL_S", 0.05)
    monkeypatch.setattr(study_data, "OTHERS_MIN_S", 0.5)
    warnings.simplefilter("ignore", UserWarning)  # Optuna: heartbeats are for optimize(), and ask() is a worker's
    db = storage.open_storage(postgres_url, "unused")
    study = optuna.create_study(storage=db, study_name=STUDY)
    elsewhere = study.ask()
    study._storage.record_heartbeat(elsewhere._trial_id)  # alive, on another host
    with caplog.at_level("INFO"):
        study_data.wait_for_others(study)
    assert f"going on without trial(s) {elsewhere.number}, still running after 0 s" in caplog.text
    caplog.clear()
    monkeypatch.setattr(study_data, "OTHERS_MIN_S", 30.0)
    threading.Timer(0.3, lambda: study.tell(elsewhere, 0.5)).start()  # it finishes while the search waits
    with caplog.at_level("INFO"):
        study_data.wait_for_others(study)
    assert "waiting up to 30 s for trial(s) 0" in caplog.text and "going on without" not in caplog.text
    assert study.trials[0].state == optuna.trial.TrialState.COMPLETE
    db.remove_session()
    db.engine.dispose()  # or dropping the test's database waits for its connections


def test_what_sets_a_hosts_data_apart_is_named(data, tmp_path):
    from autoseg.config import load_config
    from autoseg.data import scan_dataset
    from autoseg.study_data import data_fingerprint, what_differs

    def scanned(folder: Path, **more: object):
        cfg = load_config(None, {"data.images": str(folder / "images"), "data.masks": str(folder / "masks"),
                                 "tiles.size": 32, **more})
        return cfg, scan_dataset(cfg.data.images, cfg.data.masks, cfg.data)

    cfg, ds = scanned(data)
    recorded = data_fingerprint(cfg, ds, {})
    assert what_differs(recorded, cfg, ds) is None
    c = _host(tmp_path / "c", data) / "data"
    gone = sorted((c / "images").iterdir())[-1]
    gone.unlink()
    (c / "masks" / gone.name).unlink()
    assert what_differs(recorded, *scanned(c)).endswith(f"1 of the study's images are not here, such as {gone.name}")
    assert what_differs({**recorded, "autoseg": "0.0.1"}, cfg, ds).startswith("the autoseg version differs: ")
    assert what_differs(recorded, *scanned(data, **{"tiles.overlap": 0.5})).startswith("the tile settings differ: ")
