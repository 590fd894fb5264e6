"""One study across many processes on PostgreSQL (issue #25): what a second worker buys, what the server costs per
trial, what a pool of devices buys, and that killing a worker loses no trial.

    python -m benchmarks.bench_distributed [--quick] [--out PATH]

Every figure is a ratio against a baseline taken in the same run, on a throwaway PostgreSQL cluster on 127.0.0.1
(tests/postgres.py) and real sshds on 127.0.0.1 (tests/sshd_server.py). Hosts are simulated by processes with
working directories and copies of the data of their own, talking only through the database URL (and SSH).

1. Throughput. `autoseg search` on ../shared/datasets/semantic_drone_224 (tile 64, 2 folds, median pruning off)
   over a space of exactly 16 nets (2 levels, kernels 3/5, 16 channels, standard or separable convolutions,
   transposed or bilinear upsampling), all asked for, with one training thread per process (train.threads 1) and
   local latency: (a) one process on the run's own SQLite study, the baseline; (b) one process with
   --storage postgresql; (c) the same search plus one `autoseg worker` in its own directory with its own copy of
   the data. Nets per hour = distinct nets / (first trial start to last trial end, from the study: data and reps
   are not counted). Target: (c) >= 1.7x (b).
2. Per-trial storage overhead, PostgreSQL (heartbeat on, as shared studies run) vs the SQLite file: N trials of an
   objective that does only what autoseg's does with the storage (6 parameters, 20 attributes, 2 intermediate
   values with a pruning check) under Optuna's random sampler; ms per trial.
3. Device pool: 3 client processes each timing models (a conv net on 1x3x32x32, 0.15 s of runs each) through a
   DevicePool whose leases are in PostgreSQL, on a pool of 1 device and of 3 (one-thread agents behind three
   sshds). Measurements per minute, and the ratio.
4. A worker killed with SIGKILL mid-trial: the search and one worker share a small study; the worker is killed
   while it runs a trial. Trials lost = the budget - distinct nets at the end (target 0); the dead trial must be
   failed and its net run again once, or queued once when the budget was filled with new nets before it came up.
   The heartbeat is shortened here (1 s beats, 4 s grace instead of 60 s and 180 s) so that the benchmark does not
   wait three minutes; the code path is the same.

Results go to benchmarks/results/distributed.md (full runs: --out benchmarks/results/full/distributed.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks import DATA_ROOT, cpu_and_ram, write_results

TESTS = Path(__file__).resolve().parents[1] / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
from postgres import PostgresServer  # noqa: E402  (lives in tests/, found via sys.path)
from postgres import unavailable_reason as postgres_unavailable  # noqa: E402
from sshd_server import SSHServer  # noqa: E402
from sshd_server import unavailable_reason as sshd_unavailable  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "distributed.md"
DATASET = "semantic_drone_224"
TARGET_SPEEDUP = 1.7
SPACE = ("search:\n  pruner: none\n  space:\n    levels: [2]\n    kernels: [3, 5]\n    channels: [16]\n"
         "    conv: [standard, separable]\n    upsample: [transpose, bilinear]\n"
         "train:\n  threads: 1\n"
         "device:\n  threads: 1\n  warmup: 1\n  min_runs: 5\n  min_seconds: 0.05\n  max_busy_cores: null\n"
         "eval:\n  num_examples: 0\n")
SPACE_NETS = 16
# Run before the CLI in the killed-worker part: beats every 1 s, a trial silent for 4 s is failed and run again.
SHORT_HEARTBEAT = "import autoseg.storage as s; s.HEARTBEAT_S = 1; s.GRACE_S = 4"


def autoseg_cmd(*args: str, prelude: str = "pass") -> list[str]:
    code = f"import sys; {prelude}; from autoseg.cli import main; sys.exit(main(sys.argv[1:]))"
    return [sys.executable, "-c", code, *args]


def search_args(tmp: Path, data: Path, out: Path, trials: int, reps: int, epochs: int, *extra: str) -> list[str]:
    cfg = tmp / "space.yml"
    cfg.write_text(SPACE)
    return ["search", "--config", str(cfg), "--images", str(data / "images"), "--masks", str(data / "masks"),
            "--tile", "64", "--num-reps", str(reps), "--folds", "2", "--epochs", str(epochs), "--final-epochs", "1",
            "--final-tiles", "64", "--final-data", "reps", "--trials", str(trials), "--out", str(out), "-q", *extra]


def copy_data(src: Path, dst: Path) -> Path:
    """Another host's copy of the data: same bytes, another folder."""
    if not dst.exists():
        shutil.copytree(src / "images", dst / "images")
        shutil.copytree(src / "masks", dst / "masks")
    return dst


def study_trials(storage: str, name: str = "autoseg") -> list[Any]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def span_and_distinct(trials: list[Any]) -> tuple[float, int, dict[str, int], float]:
    """Seconds from the first trial's start to the last one's end; distinct nets; trials per host; seconds from the
    first trial's start to the first start of the process that joined last."""
    from optuna.trial import TrialState

    from autoseg.search.trials import is_repeat

    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    distinct = [t for t in done if not is_repeat(t)]
    hosts: dict[str, int] = {}
    first: dict[str, Any] = {}
    for t in distinct:
        host = t.user_attrs.get("host", "?")
        hosts[host] = hosts.get(host, 0) + 1
        first[host] = min(first.get(host, t.datetime_start), t.datetime_start)
    joined = (max(first.values()) - min(first.values())).total_seconds() if first else 0.0
    return span, len(distinct), hosts, joined


# ------------------------------------------------------------------ 1. throughput


def throughput(kind: str, tmp: Path, pg: PostgresServer | None, args: argparse.Namespace) -> dict[str, Any]:
    data = DATA_ROOT / DATASET
    out = tmp / kind
    extra: list[str] = []
    url = None
    if kind != "sqlite":
        url = pg.create_database()  # type: ignore[union-attr]
        extra = ["--storage", url]
    start = time.perf_counter()
    search = subprocess.Popen(autoseg_cmd(*search_args(tmp, data, out, args.trials, args.reps, args.epochs, *extra)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    worker = None
    if kind == "pg2":
        other = copy_data(data, tmp / "host2-data")
        worker = subprocess.Popen(autoseg_cmd("worker", "--storage", str(url), "--images", str(other / "images"),
                                              "--masks", str(other / "masks"), "--out", str(tmp / "host2-run"),
                                              "--threads", "1", "-q"),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp)
    _, err = search.communicate()
    wall = time.perf_counter() - start
    if search.returncode != 0:
        raise SystemExit(f"autoseg search ({kind}) failed:\n{err[-2000:]}")
    if worker is not None:
        _, werr = worker.communicate(timeout=600)
        if worker.returncode != 0:
            raise SystemExit(f"autoseg worker failed:\n{werr[-2000:]}")
    storage = url if url is not None else f"sqlite:///{out / 'study.db'}"
    span, distinct, hosts, joined = span_and_distinct(study_trials(storage))
    card = json.loads((out / "best" / "model_card.json").read_text())
    return {"kind": kind, "span_s": span, "distinct": distinct, "hosts": hosts, "joined_s": joined, "wall_s": wall,
            "nets_per_hour": distinct / span * 3600, "best": card["arch"]}


# ------------------------------------------------------------------ 2. storage overhead


def per_trial_ms(url: str | None, sqlite_file: Path, n: int) -> float:
    import optuna

    from autoseg.search import redo_stale_trial
    from autoseg.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if url is None:
        storage = open_storage(None, f"sqlite:///{sqlite_file}")
    else:
        storage = open_storage(url, "", stale_callback=redo_stale_trial())
    study = optuna.create_study(storage=storage, sampler=optuna.samplers.RandomSampler(seed=0),
                                pruner=optuna.pruners.NopPruner(), direction="maximize")

    def objective(trial: optuna.Trial) -> float:
        v = [trial.suggest_int(f"p{i}", 0, 7) for i in range(6)]
        for i in range(20):
            trial.set_user_attr(f"attr{i}", float(i) * sum(v))
        for step in range(2):
            trial.report(0.1 * step, step)
            trial.should_prune()
        return float(sum(v))

    study.optimize(objective, n_trials=3)  # connections opened, tables warm
    start = time.perf_counter()
    study.optimize(objective, n_trials=n)
    took = (time.perf_counter() - start) / n * 1000
    storage.engine.dispose()
    return took


# ------------------------------------------------------------------ 3. device pool


POOL_CLIENT = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, {tests!r})
    from onnx_models import conv_relu_onnx
    from autoseg.config import DeviceConfig
    from autoseg.devices import MeasureSettings
    from autoseg.devices.pool import DevicePool

    cfg = DeviceConfig(**{cfg!r})
    settings = MeasureSettings(warmup=1, min_runs=3, min_seconds=0.15, threads=1)
    models = [conv_relu_onnx(seed={offset} + n) for n in range({count})]
    with DevicePool.open(cfg, {targets!r}, {url!r}) as pool:
        pool.measure(models[0], (1, 3, 32, 32), settings)  # connected and warm on each process's first device
        start = time.time()
        ok = sum(pool.measure(m, (1, 3, 32, 32), settings).error.name == "OK" for m in models)
        end = time.time()
    print(json.dumps({{"start": start, "end": end, "ok": ok}}))
""")


def pool_rate(servers: list[SSHServer], known_hosts: Path, url: str, n_devices: int, clients: int, count: int,
              tmp: Path) -> dict[str, Any]:
    cfg = {"python": sys.executable, "identity_file": str(servers[0].user_key), "known_hosts": str(known_hosts),
           "connect_timeout_s": 5.0, "max_busy_cores": None}
    targets = [s.target for s in servers[:n_devices]]
    procs = []
    for c in range(clients):
        code = POOL_CLIENT.format(tests=str(TESTS), cfg=cfg, targets=targets, url=url, count=count,
                                  offset=1000 * (c + 1) + 100 * n_devices)
        # Each client its own agent folder on the "device": as on three real boards, only the lease serialises.
        env = {**os.environ, "AUTOSEG_AGENT_ROOT": str(tmp / f"agents-{n_devices}-{c}")}
        procs.append(subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env))
    rows = []
    for p in procs:
        outp, err = p.communicate(timeout=900)
        if p.returncode != 0:
            raise SystemExit(f"pool client failed:\n{err[-2000:]}")
        rows.append(json.loads(outp.strip().splitlines()[-1]))
    span = max(r["end"] for r in rows) - min(r["start"] for r in rows)
    ok = sum(r["ok"] for r in rows)
    return {"devices": n_devices, "measurements": ok, "span_s": span, "per_min": ok / span * 60}


# ------------------------------------------------------------------ 4. a killed worker


def killed_worker(tmp: Path, pg: PostgresServer, args: argparse.Namespace) -> dict[str, Any]:
    from optuna.trial import TrialState

    data = DATA_ROOT / DATASET
    url = pg.create_database()
    out = tmp / "kill-search"
    # Trials long enough that the worker gets one before the search has run them all.
    search = subprocess.Popen(autoseg_cmd(*search_args(tmp, data, out, args.kill_trials, args.reps,
                                                       max(args.epochs, 4), "--storage", url),
                                          prelude=SHORT_HEARTBEAT),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    other = copy_data(data, tmp / "host2-data")
    worker = subprocess.Popen(autoseg_cmd("worker", "--storage", url, "--images", str(other / "images"), "--masks",
                                          str(other / "masks"), "--out", str(tmp / "kill-worker"), "--threads", "1",
                                          "-q", prelude=SHORT_HEARTBEAT),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp)
    # Wait until the worker runs a trial of its own, and is past its start (a fold under way), then kill it.
    victim = None
    deadline = time.monotonic() + 900
    while victim is None and time.monotonic() < deadline and search.poll() is None:
        time.sleep(1.0)
        try:
            trials = study_trials(url)
        except Exception:  # the study is not created yet
            continue
        mine = [t for t in trials if t.state == TrialState.RUNNING
                and str(t.user_attrs.get("host", "")).endswith(f":{worker.pid}")]
        if mine and (datetime.now() - mine[0].datetime_start).total_seconds() > 3:
            victim = mine[0].number
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    _, err = search.communicate(timeout=1800)
    if search.returncode != 0:
        raise SystemExit(f"autoseg search (killed worker) failed:\n{err[-2000:]}")
    trials = study_trials(url)
    _, distinct, hosts, _ = span_and_distinct(trials)
    redo = [t.number for t in trials if victim is not None and t.user_attrs.get("redo_of") == victim
            and t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    queued = [t.number for t in trials if victim is not None and t.user_attrs.get("redo_of") == victim
              and t.state == TrialState.WAITING]
    return {"budget": args.kill_trials, "distinct": distinct, "lost": args.kill_trials - distinct, "victim": victim,
            "victim_state": trials[victim].state.name if victim is not None else "-", "redo": redo, "queued": queued,
            "hosts": hosts}


# ------------------------------------------------------------------ the run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the small budget of `make bench`")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    a.trials, a.reps, a.epochs, a.kill_trials = (SPACE_NETS, 120, 10, 6) if not a.quick else (8, 60, 3, 4)
    overhead_n, pool_count = (200, 40) if not a.quick else (50, 10)
    for reason in (postgres_unavailable(), sshd_unavailable()):
        if reason:
            print(f"bench_distributed: {reason}; `make test` installs what it needs", file=sys.stderr)
            return 2
    if not (DATA_ROOT / DATASET).is_dir():
        print(f"{DATA_ROOT / DATASET}: not found; set AUTOSEG_DATASETS", file=sys.stderr)
        return 2
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    pg = PostgresServer().start()
    servers: list[SSHServer] = []
    try:
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            print("1. throughput: one process on SQLite, one on PostgreSQL, then a search and a worker", flush=True)
            runs = [throughput(kind, tmp, pg, a) for kind in ("sqlite", "pg1", "pg2")]
            print("2. per-trial storage overhead", flush=True)
            sqlite_ms = per_trial_ms(None, tmp / "overhead.db", overhead_n)
            pg_ms = per_trial_ms(pg.create_database(), tmp / "unused.db", overhead_n)
            print("3. device pool: 1 device vs 3", flush=True)
            for i in range(3):
                key = servers[0].user_key if servers else None
                servers.append(SSHServer(tmp / f"sshd{i}", user_key=key).start())
            known_hosts = tmp / "known_hosts"
            known_hosts.write_text("".join(s.known_hosts_line() for s in servers))
            lease_db = pg.create_database()
            pools = [pool_rate(servers, known_hosts, lease_db, n, 3, pool_count, tmp) for n in (1, 3)]
            print("4. a worker killed mid-trial", flush=True)
            kill = killed_worker(tmp, pg, a)
    finally:
        for s in servers:
            s.stop()
        pg.stop()
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()
    base, one, two = runs
    speedup = two["nets_per_hour"] / one["nets_per_hour"]
    pool_gain = pools[1]["per_min"] / pools[0]["per_min"]
    cmd = "python -m benchmarks.bench_distributed" + (" --quick" if a.quick else "") + (
        f" --out {a.out}" if a.out != RESULTS else "")
    cpu, ram = cpu_and_ram()
    cores = os.cpu_count() or 1
    met_speedup = speedup >= TARGET_SPEEDUP
    # The dead trial is failed and put back in the queue; it runs if the budget still needs a net when a process
    # next asks for one (other processes may have filled the budget with new nets meanwhile: then it waits).
    met_kill = (kill["victim"] is not None and kill["lost"] == 0 and kill["victim_state"] == "FAIL"
                and len(kill["redo"]) + len(kill["queued"]) == 1)
    lines = [
        "# One study on PostgreSQL across processes (issue #25)" + (" — quick run" if a.quick else ""),
        "",
        f"`{cmd}`: {wall / 60:.1f} min. Machine: {cpu}, {cores} CPUs, {ram}. Load average "
        f"{load_before[0]:.2f} / {load_before[1]:.2f} before, {load_after[0]:.2f} / {load_after[1]:.2f} after "
        "(1 / 5 min).",
        "PostgreSQL: a throwaway cluster on 127.0.0.1 (tests/postgres.py, fsync off). Each simulated host has its "
        "own working directory and copy of the data.",
        "",
        f"## 1. Nets per hour (target: 2 workers >= {TARGET_SPEEDUP}x one, on PostgreSQL)",
        "",
        f"`autoseg search` on {DATASET}, tile 64, {a.reps} representatives, 2 folds x {a.epochs} epochs, a space of "
        f"{SPACE_NETS} nets, budget {a.trials} distinct nets, one training thread per process, local latency.",
        "",
        "| run | processes | distinct nets (per process) | trials time | nets / hour | vs one on PostgreSQL |",
        "|---|---|---|---|---|---|",
    ]
    names = {"sqlite": "SQLite file (baseline)", "pg1": "PostgreSQL", "pg2": "PostgreSQL, search + worker"}
    for r in runs:
        lines.append(f"| {names[r['kind']]} | {len(r['hosts'])} | {r['distinct']} "
                     f"({', '.join(str(v) for v in r['hosts'].values())}) | {r['span_s']:.0f} s | "
                     f"{r['nets_per_hour']:.0f} | {r['nets_per_hour'] / one['nets_per_hour']:.2f}x |")
    lines += [
        "",
        f"Two processes on PostgreSQL: **{speedup:.2f}x** the nets per hour of one "
        f"({'met' if met_speedup else 'missed'}); one process on PostgreSQL runs at "
        f"{one['nets_per_hour'] / base['nets_per_hour']:.2f}x the SQLite baseline. The worker's first trial started "
        f"{two['joined_s']:.0f} s after the search's first (it waits for the search to record the study's data, then "
        f"checks and cuts its own copy), out of {two['span_s']:.0f} s of trials. This machine has {cores} cores, so "
        "two one-thread trainers are all it can run at once; the rest of the gap is that start and the tail (the "
        "last net runs alone).",
        "",
        "## 2. Storage cost per trial",
        "",
        "| storage | ms per trial |",
        "|---|---|",
        f"| SQLite file in the run directory | {sqlite_ms:.1f} |",
        f"| PostgreSQL on loopback, heartbeat on | {pg_ms:.1f} |",
        "",
        f"PostgreSQL costs {pg_ms - sqlite_ms:+.1f} ms per trial against SQLite; a trial here took "
        f"{one['span_s'] / max(one['distinct'], 1):.0f} s, so the server's share is "
        f"{100 * pg_ms / 1000 / (one['span_s'] / max(one['distinct'], 1)):.3f} % of a trial. Over a real network "
        "every round trip adds its latency: the objective makes a few dozen storage calls per trial.",
        "",
        "## 3. A pool of devices",
        "",
        f"3 client processes, each timing {pool_count} models through one DevicePool (leases in PostgreSQL), "
        "one-thread agents behind sshds on this machine.",
        "",
        "| devices in the pool | measurements | time | measurements / min | vs 1 device |",
        "|---|---|---|---|---|",
        *[f"| {r['devices']} | {r['measurements']} | {r['span_s']:.1f} s | {r['per_min']:.0f} | "
          f"{r['per_min'] / pools[0]['per_min']:.2f}x |" for r in pools],
        "",
        f"Three devices give {pool_gain:.2f}x the measurements per minute of one. A measurement is not all CPU "
        "(upload, checksum, round trips), so three one-thread agents gain more than this machine's "
        f"{cores} cores alone would suggest; on three real boards each agent has its board to itself.",
        "",
        "## 4. A worker killed mid-trial",
        "",
        (f"Budget {kill['budget']} distinct nets; the worker was killed (SIGKILL) while running trial "
         f"{kill['victim']}." if kill["victim"] is not None else
         f"Budget {kill['budget']} distinct nets; the search ran them all before the worker got one: nothing was "
         "killed mid-trial (not judged).")
        + f" At the end: {kill['distinct']} distinct nets, trials lost: **{kill['lost']}** "
        f"(target 0, {'met' if met_kill else 'missed'}); the killed trial is {kill['victim_state']}, and its net "
        + (f"was run again as trial {kill['redo'][0]}" if kill["redo"] else
           f"waits in the queue as trial {kill['queued'][0]}: the search had filled the budget with new nets before "
           "the heartbeat's grace ran out, so it was not needed (a resumed search with a larger budget runs it first)"
           if kill["queued"] else "was not run again")
        + ". Heartbeat shortened to 1 s beats and a 4 s grace for the benchmark (60 s and 180 s in use).",
        "",
    ]
    write_results(a.out, "\n".join(lines))
    print("\n".join(lines))
    return 0 if met_speedup and met_kill else 1


if __name__ == "__main__":
    sys.exit(main())
