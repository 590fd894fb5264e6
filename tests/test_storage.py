"""search.storage on a real PostgreSQL server (tests/postgres.py): URLs checked at the door, the password never
shown, bad credentials exit 2, an unreachable server exit 3 after bounded retries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import optuna
import pytest
from postgres import free_port

from autoseg import storage
from autoseg.errors import InputError, StorageUnreachable

pytestmark = pytest.mark.postgres


@pytest.mark.parametrize("url, password, shown", [
    ("postgresql+psycopg://me:s3cret@db.example:5432/autoseg", "s3cret",
     "postgresql+psycopg://me:***@db.example:5432/autoseg"),
    ("postgresql+psycopg://me:p@ss:w/rd@db/x", "p@ss:w/rd", "postgresql+psycopg://me:***@db/x"),  # '@', ':', '/'
    ("postgresql+psycopg://me:p%40ss@db/x", "p@ss", "postgresql+psycopg://me:***@db/x"),  # quoted in the URL
    ("postgresql+psycopg://me@db/x", None, "postgresql+psycopg://me@db/x"),
    ("sqlite:////tmp/study.db", None, "sqlite:////tmp/study.db"),
])
def test_the_password_is_masked(url, password, shown):
    assert storage.mask_url(url) == shown
    if password:
        said = storage.scrub(f"failed for {url}: {password} (or {url.split(':')[2].split('@')[0]})", url)
        assert password not in said and "failed for " + shown in said


@pytest.mark.parametrize("url, words", [
    ("not a url", "is not a database URL"),
    ("nosuchdb://me:s3cret@host/x", "unknown database kind 'nosuchdb'"),
    ("mysql+mysqldb://me:s3cret@host/x", "the driver for 'mysql+mysqldb' is not installed"),
    ("sqlite://", "in-memory"),
])
def test_a_bad_url_is_refused_at_the_door_in_one_line(url, words):
    from autoseg.config import load_config

    if "mysqldb" in url:
        try:
            import MySQLdb  # noqa: F401
            pytest.skip("MySQLdb is installed here")
        except ImportError:
            pass
    with pytest.raises(InputError) as e:
        load_config(None, {"search.storage": url})
    msg = str(e.value)
    assert msg.startswith("search.storage: ") and words in msg and "\n" not in msg
    assert "s3cret" not in msg


def test_the_server_takes_a_study_with_heartbeat(postgres_url):
    s = storage.open_storage(postgres_url, "unused")
    assert s.get_heartbeat_interval() == storage.HEARTBEAT_S
    study = optuna.create_study(storage=s, study_name="x")
    study.optimize(lambda t: t.suggest_float("a", 0, 1), n_trials=2)
    assert len(optuna.load_study(study_name="x", storage=postgres_url).trials) == 2


@pytest.mark.parametrize("what", ["password", "database", "user"])
def test_bad_credentials_are_exit_2_and_never_show_the_password(postgres_server, postgres_url, what):
    url = {
        "password": postgres_server.url(postgres_url.rsplit("/", 1)[1], password="wrong-pw-Zq81"),
        "database": postgres_server.url("no_such_db"),
        "user": postgres_url.replace("//autoseg:", "//nobody_here:"),
    }[what]
    with pytest.raises(InputError) as e:
        storage.open_storage(url, "unused")
    msg = str(e.value)
    assert e.value.exit_code == 2 and "\n" not in msg and msg.startswith("search.storage: ")
    assert "wrong-pw-Zq81" not in msg and postgres_server.password not in msg and ":***@" in msg
    assert {"password": "password authentication failed", "database": "does not exist",
            "user": "password authentication failed"}[what] in msg


def test_an_unreachable_server_is_exit_3_after_bounded_retries(monkeypatch, caplog):
    monkeypatch.setattr(storage, "RETRY_DELAYS_S", (0.05, 0.1))
    url = f"postgresql+psycopg://autoseg:s3cret-pw@127.0.0.1:{free_port()}/autoseg"  # nothing listens there
    with pytest.raises(StorageUnreachable) as e:
        storage.open_storage(url, "unused")
    msg = str(e.value)
    assert e.value.exit_code == 3 and "\n" not in msg and "cannot reach the database server" in msg
    assert "after 3 attempts" in msg and "s3cret-pw" not in msg and "s3cret-pw" not in caplog.text
    assert caplog.text.count("trying again") == 2


def test_a_connection_lost_mid_run_is_one_line_exit_3_and_bad_sql_is_not_a_lost_server(postgres_server):
    import sqlalchemy

    gone = postgres_server.url("x", port=free_port())  # a server that went away: nothing listens there now
    with pytest.raises(StorageUnreachable) as e, storage.storage_errors(gone):
        sqlalchemy.create_engine(gone).connect()
    assert e.value.exit_code == 3 and "lost the database connection (Connection refused)" in str(e.value)
    assert postgres_server.password not in str(e.value) and "rerun the same command" in str(e.value)
    with storage.storage_errors(None), pytest.raises(sqlalchemy.exc.OperationalError):
        sqlalchemy.create_engine(gone).connect()  # the run's own SQLite study keeps its errors as they were
    with pytest.raises(ValueError), storage.storage_errors(gone):
        raise ValueError("not the database's")  # autoseg's own errors (and bugs) pass through


def test_a_password_masked_in_a_saved_config_is_taken_from_pgpassword(postgres_server, postgres_url, monkeypatch):
    masked = storage.mask_url(postgres_url)
    with pytest.raises(InputError, match="keeps no password: pass --storage"):
        storage.open_storage(masked, "unused")
    monkeypatch.setenv("PGPASSWORD", postgres_server.password)
    storage.open_storage(masked, "unused")  # libpq's own source of the password


# ------------------------------------------------------------------ the search on the server


def test_a_trial_whose_worker_died_is_run_again_in_its_place_and_counted_once(tmp_path, postgres_url):
    from sqlalchemy import create_engine, text
    from test_search import run_search

    from autoseg.search import distinct_trials, original_trial, sample_candidate, trial_place

    cfg, _, study = run_search(tmp_path, 1, **{"search.storage": postgres_url})
    assert len(distinct_trials(study)) == 1
    # A worker on another host took a net and died mid-trial (kill -9): its trial stays RUNNING and its heartbeat
    # stops. A second worker is alive, its heartbeat fresh.
    warnings.simplefilter("ignore", UserWarning)  # Optuna: heartbeats are for optimize(), and ask() is a worker's
    dead = study.ask()
    sample_candidate(dead, cfg.search.space, [16])
    dead.set_user_attr("latency_ms", 1.0)  # half-done work the rerun must not inherit
    alive = study.ask()
    study._storage.record_heartbeat(dead._trial_id)
    study._storage.record_heartbeat(alive._trial_id)
    engine = create_engine(postgres_url)
    with engine.begin() as con:  # its last beat, storage.GRACE_S and more ago
        con.execute(text("UPDATE trial_heartbeats SET heartbeat = heartbeat - interval '1 hour' "
                         "WHERE trial_id = :t"), {"t": dead._trial_id})
    engine.dispose()

    _, _, study = run_search(tmp_path, 2, **{"search.storage": postgres_url})  # the budget goes to 2
    trials = study.get_trials(deepcopy=False)
    assert trials[dead.number].state == optuna.trial.TrialState.FAIL
    assert trials[alive.number].state == optuna.trial.TrialState.RUNNING  # another host's: left alone
    redo = [t for t in trials if t.user_attrs.get("redo_of") == dead.number]
    assert len(redo) == 1, [(t.number, t.state, t.user_attrs) for t in trials]
    redo = redo[0]
    assert redo.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    assert redo.params == dead.params and redo.system_attrs["failed_trial"] == dead.number
    assert redo.user_attrs["latency_ms"] != 1.0  # its own, measured again
    # The sampler seeds it (and takes any start plan) as the dead trial's place, not a new one.
    assert trial_place(study, original_trial(study, redo)) == trial_place(study, trials[dead.number]) == 1
    # Counted once: trial 0 and the redo; nothing more was run for the budget of 2.
    assert len(distinct_trials(study)) == 2 and len(trials) == 4
    assert study.user_attrs["requeued"] == [dead.number]


def test_a_worker_that_dies_after_this_process_ran_its_last_trial_has_its_trial_put_back_for_it(tmp_path,
                                                                                               postgres_url):
    from sqlalchemy import create_engine, text
    from test_search import run_search

    from autoseg.search import sample_candidate
    from autoseg.study_data import wait_for_others

    cfg, _, study = run_search(tmp_path, 1, **{"search.storage": postgres_url})
    warnings.simplefilter("ignore", UserWarning)
    dead = study.ask()  # another host's last trial; that host died while this process waited for it
    sample_candidate(dead, cfg.search.space, [16])
    study._storage.record_heartbeat(dead._trial_id)
    engine = create_engine(postgres_url)
    with engine.begin() as con:
        con.execute(text("UPDATE trial_heartbeats SET heartbeat = heartbeat - interval '1 hour' "
                         "WHERE trial_id = :t"), {"t": dead._trial_id})
    engine.dispose()
    assert wait_for_others(study) == 1  # its trial is failed and waits in the queue: the search runs it (pipeline)
    trials = study.get_trials(deepcopy=False)
    assert trials[dead.number].state == optuna.trial.TrialState.FAIL
    queued = [t for t in trials if t.state == optuna.trial.TrialState.WAITING]
    assert [t.user_attrs["redo_of"] for t in queued] == [dead.number] and queued[0].params == dead.params
    _, _, study = run_search(tmp_path, 2, **{"search.storage": postgres_url})
    assert not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    assert wait_for_others(study) == 0


def _search_args(tmp_path, demo, out, *extra):
    images, masks = demo
    cfg = tmp_path / "small.yml"
    cfg.write_text("search:\n  space:\n    levels: [1]\n    kernels: [3]\n    channels: [4, 8]\n"
                   "device:\n  warmup: 0\n  min_runs: 2\n  min_seconds: 0.0\n  max_busy_cores: null\n"
                   "eval:\n  num_examples: 1\n")
    return ["search", "--config", cfg, "--images", images, "--masks", masks, "--out", out, "--tile", "32",
            "--num-reps", "16", "--folds", "2", "--epochs", "1", "--final-epochs", "1", "--final-tiles", "32",
            "--final-data", "reps", *extra]


def _autoseg(*args, env=None, prelude="pass", timeout=300):
    # prelude: Python run before the CLI in its process (the tests shorten the connection retries with it).
    code = f"import sys; {prelude}; from autoseg.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from autoseg.demo_data import generate_demo

    return generate_demo(tmp_path_factory.mktemp("demo"), n_images=6, size=64, seed=1)


def test_search_keeps_its_study_on_the_server_and_optuna_reads_it(tmp_path, demo, postgres_server, postgres_url):
    from test_dashboard import _check_decoded

    from autoseg.search import METRIC_NAMES, STUDY_NAME

    out = tmp_path / "run"
    proc = _autoseg(*_search_args(tmp_path, demo, out, "--trials", "2", "--storage", postgres_url))
    assert proc.returncode == 0, proc.stderr
    assert not (out / "study.db").exists()
    study = optuna.load_study(study_name=STUDY_NAME, storage=postgres_url)  # what optuna-dashboard does
    assert study.metric_names == list(METRIC_NAMES["penalty"])
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert done
    for t in done:
        _check_decoded(t)
    password = postgres_server.password
    for f in ("config.yml", "report.json", "report.md", "best/model_card.json"):
        assert password not in (out / f).read_text(), f
    assert password not in proc.stderr + proc.stdout
    assert storage.mask_url(postgres_url) in (out / "config.yml").read_text()
    # The report reads the study from the URL alone: the saved one (password masked, libpq's PGPASSWORD gives it).
    (out / "report.json").unlink()
    proc = _autoseg("report", out, env={"PGPASSWORD": password})
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["study"]["n_trials"] == len(study.trials)


def test_search_with_a_bad_password_is_one_line_exit_2_before_any_work(tmp_path, demo, postgres_server, postgres_url):
    bad = postgres_url.replace(postgres_server.password, "not-the-pw-K7")
    proc = _autoseg(*_search_args(tmp_path, demo, tmp_path / "run", "--trials", "1", "--storage", bad))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autoseg: error: search.storage: ") and ":***@" in lines[0]
    assert "password authentication failed" in lines[0] and "not-the-pw-K7" not in proc.stderr
    assert not (tmp_path / "run" / "reps").exists()  # failed before the data work


def test_search_against_a_server_that_is_not_there_is_one_line_exit_3(tmp_path, demo):
    url = f"postgresql+psycopg://autoseg:s3cret-pw@127.0.0.1:{free_port()}/autoseg"  # nothing listens there
    proc = _autoseg(*_search_args(tmp_path, demo, tmp_path / "run", "--trials", "1", "--storage", url, "-q"),
                    prelude="import autoseg.storage as s; s.RETRY_DELAYS_S = (0.05, 0.1)")
    assert proc.returncode == 3, proc.stderr
    *retries, error = proc.stderr.strip().splitlines()  # each retry is a warning; the error is one line
    assert len(retries) == 2 and all("Connection refused; trying again in" in line for line in retries)
    assert error.startswith("autoseg: error: search.storage: postgresql+psycopg://autoseg:***@127.0.0.1:")
    assert error.endswith("cannot reach the database server (Connection refused) after 3 attempts; check that it "
                          "runs and that this host may connect, then rerun")
    assert "s3cret-pw" not in proc.stderr
