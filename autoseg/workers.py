"""Search trials in several processes on one machine (`--workers N`), sharing the run's Optuna study.

Small nets on a few hundred tiles use many cores poorly: N processes with 1/N of the cores each look at
more nets per hour than one process with all of them. Worker 0 is the calling process; the others are
spawned, each with its own device connection, and die with it. Trials count across all of them.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import os
import signal
import sys
import time
from contextlib import closing, suppress
from pathlib import Path
from queue import Empty
from typing import Any

import torch

from autoseg import errors
from autoseg.config import Config
from autoseg.devices import open_device, settings_from_config
from autoseg.gate import Gate
from autoseg.rundir import RunDir
from autoseg.search import Objective, SearchClock, SearchTask, distinct_trials, load_study, run_trials
from autoseg.storage import storage_errors

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
READY_TIMEOUT_S = 120.0


def threads_per_worker(workers: int, configured: int | None) -> int:
    """train.threads if set, else an equal share of the cores."""
    if configured is not None:
        return configured
    return max(1, (os.cpu_count() or 1) // workers)


def _die_with_parent() -> None:
    # A kill -9 of the search must not leave workers training on: Linux sends them SIGKILL too.
    if sys.platform.startswith("linux"):
        with suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _worker(index: int, cfg: Config, task: SearchTask, root: str, log_level: int, queue: Any, ready: Any,
            deadline: float | None = None) -> None:
    """Body of a spawned worker: its own device and sampler, the shared study; errors go to `queue`.
    `ready` is released once it is set up (importing torch is heavy: no latency is timed before).
    `deadline` (time.time()) is the search's: a trial running then stops at its next epoch."""
    _die_with_parent()
    from autoseg.logs import setup_logging

    setup_logging(quiet=log_level > logging.INFO, verbose=log_level < logging.INFO)
    torch.set_num_threads(threads_per_worker(cfg.search.workers, cfg.train.threads))
    run = RunDir(Path(root))
    try:
        with storage_errors(cfg.search.storage):  # a database failure: one line, the password masked
            study = load_study(run, cfg, index)
            with closing(open_device(cfg.device, run.latency_cache, cfg.search.storage)) as device:
                objective = Objective(cfg, task, device, settings_from_config(cfg.device, cfg.seed), run,
                                      worker=index, gate=Gate(run.root))
                ready.release()
                run_trials(study, objective, cfg.search.trials, False, deadline=deadline)
    except errors.AutosegError as e:
        queue.put((type(e).__name__, str(e)))
        sys.exit(e.exit_code)
    except BaseException as e:  # a bug: say where, one line, and let the main process stop
        queue.put(("AutosegError", f"search worker {index}: {type(e).__name__}: {' '.join(str(e).split())}"))
        raise


def run_parallel(
    cfg: Config, run: RunDir, task: SearchTask, objective: Objective, study: Any, progress: bool = False,
    clock: SearchClock | None = None, deadline: float | None = None,
) -> None:
    """Run the trials in cfg.search.workers processes; this process is worker 0 (with `objective`).
    All of them stop at the clock's deadline (else `deadline`, else search.max_minutes from now), and this one
    shows the ETA."""
    n = cfg.search.workers
    if clock is not None:
        ends = clock.deadline
    elif deadline is not None:
        ends = deadline
    else:
        ends = None if cfg.search.max_minutes is None else time.time() + 60.0 * cfg.search.max_minutes
    ctx = mp.get_context("spawn")  # fork would copy torch's thread pools and the open SQLite handles
    queue, ready = ctx.Queue(), ctx.Semaphore(0)
    level = logging.getLogger().getEffectiveLevel()
    procs = [ctx.Process(target=_worker, args=(i, cfg, task, str(run.root), level, queue, ready, ends),
                         daemon=True) for i in range(1, n)]
    threads = threads_per_worker(n, cfg.train.threads)
    log.info("searching in %d worker processes, %d torch thread(s) each", n, threads)
    before = torch.get_num_threads()
    for p in procs:
        p.start()
    try:
        got, deadline = 0, time.monotonic() + READY_TIMEOUT_S
        while got < len(procs) and time.monotonic() < deadline:  # one that dies says why in the queue
            if ready.acquire(timeout=0.2):
                got += 1
            elif got >= sum(p.is_alive() for p in procs):
                break
        torch.set_num_threads(threads)
        run_trials(study, objective, cfg.search.trials, progress, deadline=ends, clock=clock)
    except BaseException:
        for p in procs:  # their running trials are requeued when the search is resumed
            p.terminate()
        raise
    finally:
        torch.set_num_threads(before)
        for p in procs:
            p.join()
    failures = []
    while True:
        try:
            failures.append(queue.get(timeout=0.1))
        except Empty:
            break
    bad = [p.exitcode for p in procs if p.exitcode]
    if not failures and not bad:
        return
    name, message = failures[0] if failures else ("AutosegError", f"a search worker ended with exit code {bad[0]}")
    if len(distinct_trials(study)) >= cfg.search.trials:  # the others did the work: go on with it
        log.warning("%s (the search has its %d nets; going on)", message, cfg.search.trials)
        return
    raise getattr(errors, name, errors.AutosegError)(message)
