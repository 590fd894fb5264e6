"""What a study in a database server records so that workers on other hosts train exactly as the first process does.

The first process (`autoseg search --storage URL`) chooses the representative tiles once and records, as study user
attributes, its config (`run_config`) and a data fingerprint (`data_fingerprint`): the dataset digest, the image
file names, the tile settings and each representative's image, y and x. A worker (`autoseg worker`) checks its own
copy of the data against it and rebuilds those very tiles from it: it never chooses its own.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from autoseg import __version__
from autoseg.config import Config, config_to_dict
from autoseg.data import Dataset, dataset_digest
from autoseg.errors import InputError, StudyNotReady
from autoseg.reps import RepSet
from autoseg.storage import describe

log = logging.getLogger(__name__)

FINGERPRINT = "data_fingerprint"
RUN_CONFIG = "run_config"
WAIT_S = 600.0  # a worker started before the search waits this long for it to record the study's data
POLL_S = 2.0
OTHERS_MIN_S = 120.0  # the search waits for the other workers' running trials at least this long,
OTHERS_FACTOR = 2.0  # or twice its longest finished trial
LOG_EVERY_S = 30.0


def data_fingerprint(cfg: Config, ds: Dataset, reps_by_tile: dict[int, RepSet],
                     deadline: float | None = None, digest: str | None = None) -> dict[str, Any]:
    """The data the study's trials train on, by content; `deadline` (time.time()) ends every worker's trials.
    `digest`: ds's dataset_digest when the caller has it already (it reads every byte of the data)."""
    names = [p.image.name for p in ds.pairs]
    return {
        "digest": digest or dataset_digest(ds),
        "images": names,
        "tiles": {"size": cfg.tiles.size, "overlap": cfg.tiles.overlap},
        "reps": {str(t): [[names[int(i)], int(y), int(x)] for i, y, x in zip(r.image, r.y, r.x, strict=True)]
                 for t, r in reps_by_tile.items()},
        "deadline": deadline,
        "autoseg": __version__,  # the code that trains and times the nets: the same on every host
    }


def record_study_data(study: optuna.Study, cfg: Config, ds: Dataset, reps_by_tile: dict[int, RepSet],
                      deadline: float | None = None, digest: str | None = None) -> None:
    """The first process's record, for the workers. A study started on other data is refused (one line)."""
    mine = data_fingerprint(cfg, ds, reps_by_tile, deadline, digest)
    theirs = study.user_attrs.get(FINGERPRINT)
    if isinstance(theirs, dict):
        differs = what_differs(theirs, cfg, ds, mine["digest"])
        if differs:
            raise InputError(f"{cfg.data.images}: study {study.study_name!r} in {describe(cfg.search.storage or '')} "
                             f"was started on other data ({differs}); give the data it was started with, or "
                             "another --study")
    study.set_user_attr(RUN_CONFIG, config_to_dict(cfg))  # the password masked: a worker gives its own URL
    study.set_user_attr(FINGERPRINT, mine)


def what_differs(theirs: dict[str, Any], cfg: Config, ds: Dataset, digest: str | None = None) -> str | None:
    """What sets `ds` (and cfg's tiles) apart from the recorded fingerprint, in a few words; None: the same data."""
    digest = digest or dataset_digest(ds)
    if digest != theirs.get("digest"):
        here, there = [p.image.name for p in ds.pairs], list(theirs.get("images", []))
        here_set, there_set = set(here), set(there)
        missing, extra = [n for n in there if n not in here_set], [n for n in here if n not in there_set]
        if missing:
            detail = f"{len(missing)} of the study's images are not here, such as {missing[0]}"
        elif extra:
            detail = f"{len(extra)} images here are not in the study's, such as {extra[0]}"
        else:
            detail = f"the same {len(here)} file names, other contents"
        return (f"the dataset digest differs: {digest[:12]} here, {str(theirs.get('digest'))[:12]} in the study; "
                f"{detail}")
    if theirs.get("autoseg", __version__) != __version__:
        return (f"the autoseg version differs: {__version__} here, {theirs['autoseg']} in the study; install "
                f"autoseg {theirs['autoseg']} on this host")
    tiles = theirs.get("tiles", {})
    if (tiles.get("size"), tiles.get("overlap")) != (cfg.tiles.size, cfg.tiles.overlap):
        return (f"the tile settings differ: size {cfg.tiles.size}, overlap {cfg.tiles.overlap} here, size "
                f"{tiles.get('size')}, overlap {tiles.get('overlap')} in the study")
    return None


def recorded_reps(fingerprint: dict[str, Any], ds: Dataset) -> dict[int, RepSet]:
    """The study's representative tiles, cut from this host's copy of the data (checked by what_differs first)."""
    index = {p.image.name: i for i, p in enumerate(ds.pairs)}
    out = {}
    for tile, rows in fingerprint["reps"].items():
        n, k = len(rows), ds.class_map.num_classes
        image = np.array([index[name] for name, _, _ in rows], dtype=np.int32)
        out[int(tile)] = RepSet(
            tile=int(tile), rows=np.arange(n, dtype=np.int64), image=image,
            y=np.array([y for _, y, _ in rows], dtype=np.int32), x=np.array([x for _, _, x in rows], dtype=np.int32),
            cluster=np.zeros(n, dtype=np.int32), class_hist=np.zeros((n, k), dtype=np.float32),
            n_tiles=n, n_after_dedup=n, n_clusters=0,
        )
    return out


def wait_for_study_data(storage: Any, url: str, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(fingerprint, config) of study `name`, waiting up to WAIT_S for the first process to record them.
    No such study then: exit 2 (a wrong name, most likely); a study without them: exit 3."""
    ends, said = time.monotonic() + WAIT_S, False
    while True:
        studies = {s.study_name: s for s in storage.get_all_studies()}
        found = studies.get(name)
        attrs = found.user_attrs if found is not None else {}
        if isinstance(attrs.get(FINGERPRINT), dict) and isinstance(attrs.get(RUN_CONFIG), dict):
            return attrs[FINGERPRINT], attrs[RUN_CONFIG]
        if time.monotonic() >= ends:
            break
        if not said:
            log.info("waiting up to %g s for `autoseg search --storage %s --study %s` to record the study's data",
                     WAIT_S, describe(url), name)
            said = True
        time.sleep(POLL_S)
    if found is None:
        there = ", ".join(sorted(studies)[:5]) or "none"
        raise InputError(f"--study {name}: no such study in {describe(url)} after waiting {WAIT_S:g} s (studies "
                         f"there: {there}); start `autoseg search --storage URL --study {name}` first, or give the "
                         "name it was started with")
    raise StudyNotReady(f"--study {name}: its search has not recorded the study's data in {describe(url)} after "
                        f"{WAIT_S:g} s; is `autoseg search` still preparing the data, or did it stop? Rerun "
                        "`autoseg worker` once the search logs its ETA")


def wait_for_others(study: optuna.Study) -> int:
    """After this process's last trial: wait (bounded) for the trials other workers are still running, so that the
    best net is chosen from all of them. A worker that died stops beating, and its trial is failed meanwhile and put
    back in the queue (RedoStaleTrial). Returns how many trials wait in the queue: this process runs them."""
    def running() -> list[Any]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        return study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))

    left = running()
    if not left:
        return _queued(study)
    took = [t.duration.total_seconds() for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.duration is not None]
    limit = max(OTHERS_MIN_S, OTHERS_FACTOR * max(took, default=0.0))
    start = last_said = time.monotonic()
    log.info("waiting up to %.0f s for trial(s) %s, still running in other workers, so the best is chosen from all",
             limit, _names(left))
    while left and time.monotonic() - start < limit:
        time.sleep(min(POLL_S, max(0.0, limit - (time.monotonic() - start))))
        left = running()
        if left and time.monotonic() - last_said >= LOG_EVERY_S:
            log.info("still waiting for trial(s) %s (%.0f of %.0f s)", _names(left), time.monotonic() - start, limit)
            last_said = time.monotonic()
    if left:
        log.warning("going on without trial(s) %s, still running after %.0f s: the best is chosen from the finished "
                    "ones", _names(left), limit)
    return _queued(study)


def _queued(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def _names(trials: list[Any]) -> str:
    return ", ".join(f"{t.number}" + (f" ({t.user_attrs['host']})" if "host" in t.user_attrs else "") for t in trials)
