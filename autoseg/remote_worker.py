"""`autoseg worker`: one more process, on any host, running trials of a search whose study is in a database server.

It joins with the URL and the study's name alone: the config comes from the study (this host gives only what is
its own: the data folders, the device, its run folder, its processes and threads), the data are checked against
the study's fingerprint and the representative tiles are the study's (autoseg.study_data). It runs trials until the
study holds its budget of distinct nets, counted across every process, as `--workers N` counts them. It never
trains the final net: the first process (`autoseg search --storage URL`) does, once the budget is spent.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import socket
from contextlib import closing
from typing import Any

import optuna
import yaml

from autoseg import __version__
from autoseg.config import Config, config_from_dict, config_to_dict
from autoseg.data import scan_dataset
from autoseg.data_stage import search_task
from autoseg.devices import open_device, settings_from_config
from autoseg.errors import InputError
from autoseg.gate import Gate
from autoseg.pipeline import run_lock
from autoseg.rundir import RunDir, write_text_atomic
from autoseg.search import (
    Objective,
    distinct_trials,
    make_pruner,
    make_sampler,
    redo_stale_trial,
    run_trials,
)
from autoseg.storage import describe, open_storage, storage_errors
from autoseg.study_data import recorded_reps, wait_for_study_data, what_differs
from autoseg.workers import run_parallel

log = logging.getLogger(__name__)

WORKER_INDEX = 1  # the sampler's seed offset: any but the first process's 0 (seeds are per trial place anyway)


def worker_config(recorded: dict[str, Any], url: str, name: str, overrides: dict[str, Any]) -> Config:
    """The study's config with this host's own settings (`overrides`: data folders, device, out, workers,
    threads) on top; the first host's processes and threads are not this one's."""
    raw = copy.deepcopy(recorded)
    raw.setdefault("search", {})["workers"] = 1
    raw.setdefault("train", {})["threads"] = None
    out = overrides.get("out") or f"runs/worker-{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}"
    return config_from_dict(raw, {**overrides, "search.storage": url, "search.study_name": name, "out": out})


def run_worker(url: str, name: str, overrides: dict[str, Any], progress: bool = False) -> dict[str, Any]:
    """Join study `name` in `url` and run its trials until its budget is spent; returns what was done."""
    storage = open_storage(url, "", stale_callback=redo_stale_trial())
    with storage_errors(url):
        fingerprint, recorded = wait_for_study_data(storage, url, name)
    try:
        config_from_dict(recorded)
    except InputError as e:  # a key this autoseg does not know, most likely
        raise InputError(f"study {name!r}'s config: {e} (the search ran autoseg {fingerprint.get('autoseg', '?')}, "
                         f"this is {__version__}: use the same on every host)") from None
    cfg = worker_config(recorded, url, name, overrides)
    run = RunDir(cfg.out).prepare()
    with run_lock(run), storage_errors(url):
        write_text_atomic(run.config, yaml.safe_dump({**config_to_dict(cfg), "out": os.fsdecode(run.root.resolve())},
                                                     sort_keys=False))
        d = cfg.data
        if d.images is None or d.masks is None:
            raise InputError("data.images / data.masks: the study names no data folders; pass --images DIR --masks "
                             "DIR with this host's copy of the search's data")
        ds = scan_dataset(d.images, d.masks, d, progress=progress)
        differs = what_differs(fingerprint, cfg, ds)
        if differs:
            raise InputError(f"{d.images} and {d.masks}: not the data of study {name!r} in {describe(url)} "
                             f"({differs}); pass --images/--masks with a copy of the data the search was started with")
        reps_by_tile = recorded_reps(fingerprint, ds)
        task = search_task(cfg, ds, reps_by_tile)
        log.info("joined study %r in %s: %d representative tiles%s, budget %d distinct nets", name, describe(url),
                 sum(len(r.rows) for r in reps_by_tile.values()),
                 "" if len(reps_by_tile) == 1 else f" at tiles {', '.join(map(str, sorted(reps_by_tile)))}",
                 cfg.search.trials)
        study = optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(cfg, WORKER_INDEX),
                                  pruner=make_pruner(cfg))
        settings = settings_from_config(cfg.device, cfg.seed)
        deadline = fingerprint.get("deadline")
        with closing(open_device(cfg.device, run.latency_cache, url)) as device:
            log.info("measuring %slatency on %s (%s)", "int8 " if cfg.device.precision == "int8" else "",
                     device.name, device.source)
            if cfg.search.workers > 1:
                objective = Objective(cfg, task, device, settings, run, gate=Gate(run.root))
                run_parallel(cfg, run, task, objective, study, progress, deadline=deadline)
            else:
                objective = Objective(cfg, task, device, settings, run)
                run_trials(study, objective, cfg.search.trials, progress, deadline=deadline)
        me = f"{socket.gethostname()}:{os.getpid()}"
        distinct = distinct_trials(study)
        return {"study": name, "distinct": len(distinct), "budget": cfg.search.trials,
                "here": sum(t.user_attrs.get("host") == me for t in distinct), "host": me}


def summary_lines(result: dict[str, Any]) -> list[str]:
    return [f"worker {result['host']}: study {result['study']!r} holds {result['distinct']} of its "
            f"{result['budget']} distinct nets, {result['here']} of them run by this process; the search's first "
            "process trains the best one"]
