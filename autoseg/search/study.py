"""The study: creating or resuming it (a resume checks the config's fingerprint), its metric names and
storage, and running again the trials a kill, a lost device, a deadline or a dead worker interrupted."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autoseg.config import Config, config_to_dict
from autoseg.errors import InputError
from autoseg.rundir import RunDir, StudyFileError, check_study_file
from autoseg.search.sampling import make_pruner, make_sampler
from autoseg.search.space import CHANNEL_STEPS
from autoseg.search.trials import cut_by_deadline
from autoseg.storage import GRACE_S, MAX_RETRY, describe, open_storage

log = logging.getLogger("autoseg.search")  # one logger for the package: log lines keep the name they had

STUDY_NAME = "autoseg"
# What each objective is, by search.objective: optuna-dashboard and load_study show these, not "Objective 0".
METRIC_NAMES = {
    "penalty": ("cv_miou_penalised",),  # cv mIoU - alpha*log10(latency/ref) - beta*log10(MACs/ref)
    "pareto": ("cv_miou", "latency_ms"),
}


# Config keys that do not change what a trial means: a rerun may change them and still resume.
_RESUMABLE_KEYS = {
    "out",
    "search.trials",
    "search.max_budget_prunes",
    "search.max_measure_failures",
    "search.max_minutes",
    "search.workers",
    "search.predict_latency",  # which nets are measured, not what a measured one means
    "search.storage",  # where the study is, not what it holds (and a URL may carry a password)
    "search.study_name",
    # Later trials are chosen or stopped otherwise; what a finished trial scored stays what it means.
    "search.pruner",
    "search.startup",
    "search.refine_top",  # what happens after the trials
    "search.refine_tiles",
    "train.final_epochs",
    "train.final_data",
    "train.final_tiles",
    "train.final_minutes",
    "train.final_crop",
    "train.val_fraction",
    "train.eval_every",
    "train.patience",
    "train.rare_share",
    "train.scale_jitter",
    "train.colour_jitter",
    "train.cache_mb",
    "train.loader_workers",
    "train.teacher",
    "train.distill_weight",
    "train.threads",
    "train.batch_size",
    "reps.contact_sheet",
    "reps.write_pngs",
    "data.test_images",
    "data.test_masks",
    "device.python",
    "device.trust_new_host",
    "device.fallback",
    "device.known_hosts",
    "device.ssh_config",
    "device.identity_file",
    "device.connect_timeout_s",
    "device.reconnect_attempts",
    "eval",
    "export",
}


def config_fingerprint(cfg: Config) -> dict[str, Any]:
    """The flattened config keys that define what the study's trials mean."""
    flat = _flatten(config_to_dict(cfg))
    # Part of the space though not a config key: a study sampled with other steps cannot take more trials.
    flat["search.space.channel_steps"] = list(CHANNEL_STEPS)
    if not flat.get("device.targets"):  # no pool: a study made before device.targets existed resumes
        flat.pop("device.targets", None)
    return _meaningful(flat)


# Input paths, resolved by load_config since runs became portable; studies made before saved them as given.
_PATH_KEYS = ("data.images", "data.masks", "data.test_images", "data.test_masks", "reps.embedder_weights")


def _resolved(flat: dict[str, Any]) -> dict[str, Any]:
    """A study's saved config with relative input paths resolved as load_config resolves them now (against the
    working directory), so that a run made before resumes from where it was started."""
    return {k: os.fsdecode(Path(v).expanduser().resolve()) if k in _PATH_KEYS and isinstance(v, str) else v
            for k, v in flat.items()}


def _meaningful(flat: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in flat.items() if k not in _RESUMABLE_KEYS and k.split(".")[0] not in _RESUMABLE_KEYS}


def config_hash(cfg: Config) -> str:
    blob = json.dumps(config_fingerprint(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "palette":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def study_storage(run: RunDir, url: str | None = None) -> optuna.storages.RDBStorage:
    """The study's storage: the run's study.db, or search.storage's database (see autoseg.storage)."""
    return open_storage(url, run.storage_url, stale_callback=redo_stale_trial())


def redo_stale_trial() -> RedoStaleTrial:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the retry callback is "experimental"
        return RedoStaleTrial(max_retry=MAX_RETRY)


_Retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback


class RedoStaleTrial(_Retry):  # type: ignore[misc, valid-type]
    """Optuna's retry of a trial whose worker stopped its heartbeat (killed, host lost), done as a resume redoes a
    killed trial: the rerun (redo_of) takes the dead trial's place in the search, so its seed and any start plan are
    the ones the dead trial had, and it counts once (the dead one is FAIL: never counted).

    The rerun starts clean: it carries redo_of, not the half-done trial's attributes (its latency, a pruned reason)."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        tried = len(trial.system_attrs.get("retry_history", [])) + 1
        if self._max_retry is not None and tried > self._max_retry:
            log.warning("trial %d: its worker stopped again (no heartbeat for %d s; %d times in all): its net is "
                        "not run again", trial.number, GRACE_S, tried)
            return
        clean = copy.deepcopy(trial)
        clean.user_attrs = {"redo_of": trial.number}
        super().__call__(study, clean)
        # Re-read just before writing: another worker may have added its own since.
        done = set(study._storage.get_study_user_attrs(study._study_id).get("requeued", []))
        study.set_user_attr("requeued", sorted(done | {trial.number}))
        log.info("trial %d: its worker stopped (no heartbeat for %d s); it runs again", trial.number, GRACE_S)


def load_study(run: RunDir, cfg: Config, worker: int) -> optuna.Study:
    """The study open_study made, as a parallel worker sees it (no checks, no requeueing: the first
    process did both before the workers started)."""
    return optuna.load_study(study_name=cfg.search.study_name, storage=study_storage(run, cfg.search.storage),
                             sampler=make_sampler(cfg, worker), pruner=make_pruner(cfg))


def open_study(run: RunDir, cfg: Config, resume_anyway: bool = False) -> optuna.Study:
    """Create the study, or resume it after checking it was made with the same config."""
    directions = ["maximize"] if cfg.search.objective == "penalty" else ["maximize", "minimize"]
    url, name = cfg.search.storage, cfg.search.study_name
    # How messages name the study, and where a study made otherwise is not in the way.
    where = str(run.study_db) if url is None else f"{describe(url)} (study {name!r})"
    fresh = "a new --out directory" if url is None else "another --study name or database in --storage"
    if url is None:
        try:
            check_study_file(run.study_db, empty_ok=True)
        except StudyFileError as e:
            raise InputError(f"{e}; move it away (the search then starts a new study) or use a new --out") from None
        existed = run.study_db.exists()
    storage = study_storage(run, url)
    if url is not None:
        existed = name in {s.study_name for s in storage.get_all_studies()}
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        directions=directions,
        sampler=make_sampler(cfg),
        pruner=make_pruner(cfg),
        load_if_exists=True,
    )
    mine = config_fingerprint(cfg)
    theirs = study.user_attrs.get("config")
    if theirs is not None:  # keys that became resumable since the study was made
        theirs = _resolved(_meaningful(theirs))
    if existed and theirs is not None and theirs != mine:
        changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        space = [k for k in changed if k.startswith("search.space.")]
        if space:
            # Optuna cannot add trials to a study whose parameters had other choices.
            raise InputError(
                f"{where}: made with a different search space (changed: {', '.join(space[:5])}); "
                f"a study cannot change its space, so use {fresh}"
            )
        if not resume_anyway:
            raise InputError(
                f"{where}: made with a different config (changed: {', '.join(changed[:5])}); "
                f"use {fresh}, or --resume-anyway to continue this study"
            )
        log.warning("resuming %s despite config changes: %s", where, ", ".join(changed))
    if [d.name.lower() for d in study.directions] != directions:
        raise InputError(
            f"{where}: was made for objective "
            f"{'pareto' if len(study.directions) == 2 else 'penalty'}; use {fresh} for --objective "
            f"{cfg.search.objective}"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # experimental in Optuna 3
        study.set_metric_names(list(METRIC_NAMES[cfg.search.objective]))
    if theirs is None or resume_anyway:
        study.set_user_attr("config", mine)
        study.set_user_attr("config_hash", config_hash(cfg))
        study.set_user_attr("objective", cfg.search.objective)
    _requeue_interrupted(study)
    return study


def _requeue_interrupted(study: optuna.Study) -> None:
    """A trial left RUNNING by a kill, failed by a lost device, or stopped by the deadline before a fold
    finished, is run again with the same params.

    In a study on a database server (heartbeat on) a RUNNING trial may be running on another host: only those
    whose heartbeat stopped are failed, and RedoStaleTrial runs them again."""
    heartbeat = getattr(study._storage, "get_heartbeat_interval", lambda: None)() is not None
    if heartbeat:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    done = set(study.user_attrs.get("requeued", []))
    requeued, alive = [], []
    for t in study.get_trials(deepcopy=False):
        stale = t.state == TrialState.RUNNING
        lost = t.state == TrialState.FAIL and t.user_attrs.get("interrupted")
        if not (stale or lost or cut_by_deadline(t)) or t.number in done:
            continue
        if stale and heartbeat:
            alive.append(t.number)
            continue
        if stale:
            # Only one search runs per run directory (see pipeline's lock), so RUNNING here means killed.
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"redo_of": t.number}, skip_if_exists=False)
        requeued.append(t.number)
    if alive:
        log.info("trial(s) %s are running in other workers (a worker that died is noticed within %d s, and its "
                 "trial runs again)", ", ".join(map(str, alive)), GRACE_S)
    if requeued:
        log.info("resuming: trial(s) %s were interrupted and will run again", ", ".join(map(str, requeued)))
        study.set_user_attr("requeued", sorted(done | set(requeued)))
