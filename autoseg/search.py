"""The Optuna search over U-Net architectures: latency first, then cross-validated training.

One study per run directory, in SQLite, so a rerun of the same command resumes it.
Per trial: sample an architecture, export it, measure it on the device, drop it if it
misses the latency budget (before any training), else train it with k-fold CV on the
representative tiles and report to the pruner as it goes.

The clock: TPE's first trials are nets spread over the space's cost, cheapest first; the pruner judges a
trial after its first fold; search.max_minutes stops a running trial at its next epoch; and before the first
trial a short calibration gives the ETA (plan_search).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from autoseg.config import Config, SearchConfig, SpaceConfig, config_to_dict
from autoseg.devices import Device, MeasureError, MeasureSettings, failure_hint, passing
from autoseg.devices.cache import _graph_hash
from autoseg.errors import DeviceUnreachable, InputError
from autoseg.export import annotate, int8_bytes, model_metadata, onnx_bytes
from autoseg.gate import Gate
from autoseg.latency_history import Guess, Learner, remember_arch
from autoseg.pareto import pareto_front
from autoseg.predictor import LatencyRecord
from autoseg.rundir import RunDir, StudyFileError, check_study_file, write_bytes_atomic
from autoseg.storage import GRACE_S, MAX_RETRY, describe, open_storage
from autoseg.train import (
    TrainSettings,
    auto_batch_size,
    cross_validate,
    cv_epochs,
    train_model,
    training_settings,
)
from autoseg.unet import Arch, build_unet, count_macs, count_params, validate_arch

log = logging.getLogger(__name__)

STUDY_NAME = "autoseg"
# How many places up the sorted channel list each deeper level moves: with the default list, up to x4 (8 -> 32)
# or x2.7 (24 -> 64) per level.
CHANNEL_STEPS = (0, 1, 2, 3)
INT8_CALIB_TILES = 8  # timing needs the int8 graph, not good scales: a few tiles calibrate it
# Trials report their objective after each fold, at step = folds done: a fold's score estimates the whole CV's
# without bias (a reading in the middle of a fold's schedule would not, and judged a slowly learning net too
# early). Successive halving (min resource 1 fold, reduction 3) judges after fold 1 (and after fold 3 of 5+).
HALVING_RATE = 3
PRUNERS = ("median", "halving", "hyperband")  # a trial's pruned_reason when one of them stopped it
OVER_BUDGET = ("latency_budget", "predicted_over_budget")  # measured over it; predicted over it beyond doubt
START_POOL = 256  # random nets of the space that search.startup "cost" picks the first trials from
START_TOP_QUANTILE = 0.75  # the dearest of them sits at this MACs quantile: never the space's costly corner
START_NOMINAL_CLASSES = 8  # MACs that order the start must not depend on the data, only on the config
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


@dataclass(frozen=True)
class Candidate:
    arch: Arch
    tile: int


@dataclass(frozen=True)
class TileData:
    """Representative tiles at one tile size, ready for training."""

    x: np.ndarray  # float32 (R, C, T, T), normalised
    y: np.ndarray  # int64 (R, T, T), IGNORE = -1
    groups: np.ndarray  # int64 (R,), source image of each tile


@dataclass(frozen=True)
class SearchTask:
    data: dict[int, TileData]  # by tile size
    in_channels: int
    num_classes: int
    class_weights: tuple[float, ...] | None
    # classes, mean, std and class_map of the data (export.model_metadata): trial ONNX files carry them
    dataset_metadata: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------ the space


def tile_choices(cfg: Config) -> list[int]:
    return sorted(set(cfg.search.space.tile_sizes) or {cfg.tiles.size})


def check_space(space: SpaceConfig, tiles: Sequence[int]) -> None:
    """Refuse a space in which no architecture is valid, and say why."""
    for tile in tiles:
        for levels in space.levels:
            arch = Arch(tuple([min(space.kernels)] * levels), tuple([min(space.channels)] * levels))
            try:
                validate_arch(arch, tile)
                return
            except ValueError:
                continue
    deepest = 2 ** (min(space.levels) - 1)
    raise InputError(
        f"search.space: no valid architecture: every tile size in {sorted(tiles)} must be divisible by "
        f"2^(levels-1) = {deepest} for the shallowest level count {min(space.levels)}; "
        "allow fewer levels or use a tile size that is a multiple of it"
    )


def sample_candidate(trial: optuna.Trial, space: SpaceConfig, tiles: Sequence[int]) -> Candidate:
    """Sample with fixed distributions per name (Optuna needs that), monotone channels by construction."""
    levels = trial.suggest_categorical("levels", sorted(set(space.levels)))
    tile = trial.suggest_categorical("tile", list(tiles)) if len(tiles) > 1 else tiles[0]
    channels = sorted(set(space.channels))
    kernels = sorted(set(space.kernels))
    idx = channels.index(trial.suggest_categorical("c0", channels))
    ks, cs = [], []
    for i in range(levels):
        if i > 0:
            step = trial.suggest_categorical(f"cstep{i}", list(CHANNEL_STEPS))
            idx = min(idx + step, len(channels) - 1)
        cs.append(channels[idx])
        ks.append(trial.suggest_categorical(f"k{i}", kernels))
    conv = trial.suggest_categorical("conv", list(dict.fromkeys(space.conv)))
    ups = list(dict.fromkeys(space.upsample))
    upsample = trial.suggest_categorical("upsample", ups)
    if levels == 1:  # no decoder: both choices are the same net, which should be trained once
        upsample = ups[0]
    return Candidate(Arch(tuple(ks), tuple(cs), conv, upsample), tile)


def arch_attrs(cand: Candidate) -> dict[str, int | str]:
    """The decoded net as flat user attributes (one scalar each, so optuna-dashboard can plot and sort them):
    depth, per level kernel_l{i} and channels_l{i} (real channel counts, not the sampled steps), and conv and
    upsample, which are one choice for the whole net (the trial's "tile" attribute is the fifth part)."""
    a = cand.arch
    out: dict[str, int | str] = {"depth": a.levels}
    for i, (k, c) in enumerate(zip(a.kernels, a.channels, strict=True)):
        out[f"kernel_l{i}"] = int(k)
        out[f"channels_l{i}"] = int(c)
    out["conv"] = a.conv
    out["upsample"] = a.upsample
    return out


def penalty_objective(score: float, latency_ms: float, macs: float, cfg: SearchConfig) -> float:
    """score - alpha*log10(latency/ref) - beta*log10(macs/ref): the default scalar objective."""
    lat = max(latency_ms, 1e-6) / cfg.latency_ref_ms
    mac = max(macs, 1.0) / cfg.macs_ref
    return score - cfg.alpha * math.log10(lat) - cfg.beta * math.log10(mac)


# ------------------------------------------------------------------ the study


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


class _SeededPerTrial:
    """Mixin for Optuna's seeded samplers: each trial draws from a stream seeded by (seed, its place in the
    search), not from one stream begun when the process started.

    With one stream, a resumed search began it again: its first new trial drew what trial 0 had drawn (and
    repeated trial 0's net), and every later proposal moved off the uninterrupted run's. A trial redone
    after a kill takes its original's place, and the original (failed) takes none, so the nets proposed
    after a resume are those an uninterrupted search proposes.

    The first trials may follow a plan (`start`, the params of each place): the trial at place p is handed
    start[p] as enqueue_trial hands over params, so a resumed search and every worker follow it alike.
    """

    _rng: Any
    _random_sampler: Any

    def __init__(self, *args: Any, seed: int, start: Sequence[dict[str, Any]] = (), **kwargs: Any) -> None:
        super().__init__(*args, seed=seed, **kwargs)
        self._base_seed = seed
        self._start = list(start)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        whole = getattr(study, "_study", study)  # with HyperbandPruner the sampler sees one bracket's study
        original = original_trial(whole, trial)
        place = trial_place(whole, original)
        if place < len(self._start) and "fixed_params" not in trial.system_attrs:
            # Trial reads its fixed params from this frozen trial once the sampler has seen it.
            whole._storage.set_trial_system_attr(trial._trial_id, "fixed_params", self._start[place])
            trial.system_attrs["fixed_params"] = self._start[place]
        seeds = np.random.SeedSequence([self._base_seed, place]).generate_state(2)
        # Reseeded in place: NSGA-II's child generation holds the same random state object.
        self._rng.rng.seed(int(seeds[0]))
        self._random_sampler._rng.rng.seed(int(seeds[1]))
        super().before_trial(study, trial)  # type: ignore[misc]


class TrialSeededTPESampler(_SeededPerTrial, optuna.samplers.TPESampler):
    pass


class TrialSeededNSGAIISampler(_SeededPerTrial, optuna.samplers.NSGAIISampler):
    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        # A redone trial's params are fixed, so NSGA-II never gives it a generation, and it would be left out of
        # the population its original was in: it takes the original's.
        # Optuna < 4 keeps the key as a module constant, "nsga2:generation".
        key = self._get_generation_key() if hasattr(self, "_get_generation_key") else "nsga2:generation"
        original = original_trial(study, trial)
        if original is not trial and key in original.system_attrs and key not in trial.system_attrs:
            study._storage.set_trial_system_attr(trial._trial_id, key, original.system_attrs[key])
        super().before_trial(study, trial)


def original_trial(study: optuna.Study, trial: FrozenTrial) -> FrozenTrial:
    """The trial first proposed with these params, when `trial` redoes one a kill interrupted."""
    while "redo_of" in trial.user_attrs:
        trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, trial.user_attrs["redo_of"])
        trial = study._storage.get_trial(trial_id)
    return trial


def trial_place(study: optuna.Study, trial: FrozenTrial) -> int:
    """The trial's number in a search never interrupted: the trials that a resume ran again are not counted."""
    return trial.number - sum(n < trial.number for n in study.user_attrs.get("requeued", []))


def shared(cfg: Config) -> bool:
    """Other processes may run trials of this study at once: --workers here, or workers on other hosts
    (`autoseg worker`) when the study is in a database server."""
    return cfg.search.workers > 1 or cfg.search.storage is not None


def make_sampler(cfg: Config, worker: int = 0) -> optuna.samplers.BaseSampler:
    """Worker 0 samples as a single-process search does. Other workers get seeds of their own (or they
    would propose the same nets), and TPE counts the trials still running as if they had scored badly
    (constant liar), so that parallel workers spread out."""
    seed = cfg.seed + 1000 * worker
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if cfg.search.sampler == "nsga2":
            pop = max(4, min(50, cfg.search.trials // 4))
            return TrialSeededNSGAIISampler(seed=seed, population_size=pop)
        return TrialSeededTPESampler(seed=seed, start=startup_plan(cfg), multivariate=True, group=True,
                                     n_startup_trials=startup_trials(cfg), constant_liar=shared(cfg))


def startup_trials(cfg: Config) -> int:
    """TPE's start: trials before it models the results."""
    return max(3, min(10, cfg.search.trials // 3))


def space_pool(cfg: Config, n: int = START_POOL) -> list[tuple[Candidate, dict[str, Any]]]:
    """Distinct valid nets drawn at random from the space (seeded by cfg.seed), each with the params that
    give it; the draws are uniform over each parameter's choices, as a random start's are."""
    space, tiles = cfg.search.space, tile_choices(cfg)
    choices: dict[str, list[Any]] = {"levels": sorted(set(space.levels))}
    if len(tiles) > 1:
        choices["tile"] = list(tiles)
    choices["c0"] = sorted(set(space.channels))
    for i in range(max(space.levels)):
        if i:
            choices[f"cstep{i}"] = list(CHANNEL_STEPS)
        choices[f"k{i}"] = sorted(set(space.kernels))
    choices["conv"] = list(dict.fromkeys(space.conv))
    choices["upsample"] = list(dict.fromkeys(space.upsample))
    rng = np.random.default_rng([cfg.seed, 0xC057])
    seen: set[tuple[str, int]] = set()
    pool = []
    for _ in range(n):
        trial = optuna.trial.FixedTrial({k: v[int(rng.integers(len(v)))] for k, v in choices.items()})
        cand = sample_candidate(trial, space, tiles)
        if (cand.arch.key(), cand.tile) in seen:
            continue
        try:
            validate_arch(cand.arch, cand.tile)
        except ValueError:
            continue
        seen.add((cand.arch.key(), cand.tile))
        pool.append((cand, dict(trial.params)))
    return pool


def tile_macs(cand: Candidate, in_channels: int = 3, num_classes: int = START_NOMINAL_CLASSES) -> int:
    """MACs of one forward pass on one training tile: what a training step costs, per tile."""
    return count_macs(cand.arch, in_channels, num_classes, cand.tile, cand.tile)


def startup_plan(cfg: Config) -> list[dict[str, Any]]:
    """With search.startup "cost" (and TPE): the params of TPE's first trials, nets at evenly spaced MACs
    quantiles of the space from its cheapest up to START_TOP_QUANTILE, cheapest first.

    A random first draw can be the space's dearest corner (1.9 GMACs a 64 px tile, 40 minutes a fold on
    2 cores); this way the first answers come in minutes and TPE still sees the space's range of cost.
    It depends on the config alone, so a resumed search and parallel workers follow the same plan."""
    if cfg.search.startup != "cost" or cfg.search.sampler != "tpe":
        return []
    pool = sorted(space_pool(cfg), key=lambda cp: (tile_macs(cp[0]), cp[0].arch.key(), cp[0].tile))
    k = min(startup_trials(cfg), len(pool))
    picks: list[int] = []
    for i in range(k):
        j = round(START_TOP_QUANTILE * i / max(k - 1, 1) * (len(pool) - 1))
        while j in picks and j + 1 < len(pool):
            j += 1
        if j not in picks:
            picks.append(j)
    return [pool[j][1] for j in picks]


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


def pruner_kind(cfg: Config) -> str:
    """search.pruner, or none for the pareto objective (Optuna prunes only single-objective studies)."""
    return "none" if cfg.search.objective == "pareto" else cfg.search.pruner


def make_pruner(cfg: Config) -> optuna.pruners.BasePruner:
    kind = pruner_kind(cfg)
    if kind == "none":
        return optuna.pruners.NopPruner()
    if kind == "median":
        # The first fold of a few trials must finish before anything is pruned on its score.
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    if kind == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=HALVING_RATE,
                                                      min_early_stopping_rate=0)
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.train.folds, reduction_factor=HALVING_RATE)


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


def finished_trials(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def find_twin(study: optuna.Study, cand: Candidate, number: int, budget_ms: float | None) -> FrozenTrial | None:
    """The earlier trial whose outcome this candidate shares: same architecture and tile, and trained,
    pruned by the pruner or over the latency budget. A failed measurement is no outcome, and neither is one that
    a budget changed since (--resume-anyway) would decide differently: those nets are measured again."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        a = t.user_attrs
        if t.number == number or is_repeat(t) or a.get("arch") != cand.arch.key() or a.get("tile") != cand.tile:
            continue
        reason = a.get("pruned_reason")
        # A net dropped on its prediction was over by more than the prediction's uncertainty: its low end.
        lat = a.get("latency_predicted_lo_ms", 0.0) if reason == "predicted_over_budget" else a.get("latency_ms", 0.0)
        over = budget_ms is not None and lat > budget_ms
        # Pruner-pruned stays pruned whatever the budget; the other two follow the budget.
        if reason in PRUNERS or (t.state == TrialState.COMPLETE and not over) or (reason in OVER_BUDGET and over):
            return t
    return None


def running_twin(study: optuna.Study, cand: Candidate, number: int) -> int | None:
    """An earlier trial that another worker is training on the same net right now, if any (the earlier
    one goes on; two proposing at once cannot both defer)."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        a = t.user_attrs
        if t.number < number and not is_repeat(t) and a.get("arch") == cand.arch.key() and a.get("tile") == cand.tile:
            return t.number
    return None


def is_repeat(t: FrozenTrial) -> bool:
    return "same_as_trial" in t.user_attrs


def unmeasured(t: FrozenTrial) -> bool:
    """The device could not measure the net: no outcome, so not a look at it (a rerun measures it again)."""
    return t.user_attrs.get("pruned_reason") == "measure_failed"


def cut_by_deadline(t: FrozenTrial) -> bool:
    """search.max_minutes stopped the trial before a fold finished: no outcome (a rerun trains it again)."""
    return t.state == TrialState.PRUNED and t.user_attrs.get("pruned_reason") == "deadline"


def distinct_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Finished trials that looked at a net for the first time: what --trials counts."""
    return [t for t in finished_trials(study) if not is_repeat(t) and not unmeasured(t) and not cut_by_deadline(t)]


def budget_prune_streak(study: optuna.Study) -> int:
    streak = 0
    for t in sorted(distinct_trials(study), key=lambda t: t.number, reverse=True):
        if t.user_attrs.get("pruned_reason") not in OVER_BUDGET:
            break
        streak += 1
    return streak


# ------------------------------------------------------------------ one trial


def timed_size(arch: Arch, tile: int, measure_size: int | None) -> int:
    """The input side a net is timed at: measure_size padded up to the net's multiple, as inference pads
    a full image (or the tile, which is always a multiple)."""
    if measure_size is None:
        return tile
    return -(-measure_size // arch.multiple) * arch.multiple


def measure_candidate(
    cand: Candidate,
    task: SearchTask,
    device: Device,
    settings: MeasureSettings,
    measure_size: int | None,
    opset: int = 17,
    int8: bool = False,
) -> tuple[bytes, Any, int, int]:
    """Export with weights seeded by the architecture, so the same net hashes the same for the cache.

    Latency and MACs are both for a (1, C, size, size) input, size = timed_size(...). The opset is the
    one the final model is exported at: the device must load what it will deploy. With `int8` the net
    is timed quantized, calibrated on a few of its representative tiles, as the final int8 export is.
    """
    torch.manual_seed(int(cand.arch.digest(), 16) % (2**31))
    model = build_unet(cand.arch, task.in_channels, task.num_classes).eval()
    size = timed_size(cand.arch, cand.tile, measure_size)
    if int8:
        trained_like_batchnorm(model)
    blob = onnx_bytes(model, task.in_channels, size, opset)
    if int8:
        blob = int8_bytes(blob, task.data[cand.tile].x[:INT8_CALIB_TILES])
    m = device.measure(blob, (1, task.in_channels, size, size), settings)
    params = count_params(model)
    macs = count_macs(cand.arch, task.in_channels, task.num_classes, size, size)  # the work that was timed
    return blob, m, params, macs


def trained_like_batchnorm(model: torch.nn.Module) -> None:
    """Random BatchNorm statistics and shifts (from torch's seeded stream), as training leaves them.

    At their defaults every bias folded from BatchNorm is zero and the exporter shares one zero tensor
    among the convs; quantized, those convs stayed in float (onnxruntime did not fuse them into integer
    kernels), so the int8 graph timed ran up to 3x slower than a trained net's.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)


class DeadlineReached(Exception):
    """Raised inside a trial's training when search.max_minutes is up."""


class Objective:
    """The callable handed to study.optimize. `deadline` (time.time(), set by run_trials) stops a trial
    at its next epoch."""

    def __init__(
        self,
        cfg: Config,
        task: SearchTask,
        device: Device,
        settings: MeasureSettings,
        run: RunDir,
        on_trial: Callable[[str], None] | None = None,
        worker: int = 0,
        gate: Gate | None = None,
    ) -> None:
        self.cfg, self.task, self.device, self.settings, self.run = cfg, task, device, settings, run
        self.worker = worker
        # Parallel workers timing on this machine: a measurement waits for their epochs, and they for it.
        self.gate = gate if device.source == "local" else None
        self.tiles = sorted(task.data)
        self.on_trial = on_trial or log.info
        sp = cfg.search.space  # the longest name the space can give, so the trial lines stay in columns
        widest = Arch((max(sp.kernels),) * max(sp.levels), (max(sp.channels),) * max(sp.levels),
                      max(sp.conv, key=len), max(sp.upsample, key=len))
        self.key_width = len(widest.key())
        self.streak = 0
        self.failures = 0  # measurement failures in a row: one is a net's, several are the device's
        self.stop_message: str | None = None
        self.int8 = cfg.device.precision == "int8"
        self.deadline: float | None = None
        self.epochs_done = 0  # the running trial's, over all its folds
        self.folds_done = 0
        self._learner: Learner | None = None  # search.predict_latency: made at the first trial that can use it

    def late(self) -> bool:
        """The deadline has passed."""
        return self.deadline is not None and time.time() >= self.deadline

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        scfg = self.cfg.search
        self.epochs_done = self.folds_done = 0
        if scfg.storage is not None:  # which host and process ran it, among all that share the study
            trial.set_user_attr("host", f"{socket.gethostname()}:{os.getpid()}")
        cand = sample_candidate(trial, scfg.space, self.tiles)
        trial.set_user_attr("arch", cand.arch.key())
        trial.set_user_attr("arch_dict", cand.arch.to_dict())
        trial.set_user_attr("tile", cand.tile)
        for key, value in arch_attrs(cand).items():
            trial.set_user_attr(key, value)
        try:
            validate_arch(cand.arch, cand.tile)
        except ValueError as e:
            trial.set_user_attr("pruned_reason", "invalid")
            self._say(trial, cand, f"invalid: {e}")
            raise optuna.TrialPruned(str(e)) from None

        twin = self.find_twin(trial, cand)
        if twin is not None:
            return self._repeat(trial, cand, twin)
        busy = running_twin(trial.study, cand, trial.number) if shared(self.cfg) else None
        if busy is not None:  # no outcome yet to share: skip it, uncounted; a later proposal reuses it
            trial.set_user_attr("same_as_trial", busy)
            self._say(trial, cand, f"skipped: another worker is on it (trial {busy})")
            raise optuna.TrialPruned(f"same architecture as running trial {busy}")

        if self.cfg.search.workers > 1:
            trial.set_user_attr("worker", self.worker)
        pareto = scfg.objective == "pareto"
        budget = scfg.latency_budget_ms
        guess = self._guess(cand)
        if guess is not None:
            for key, value in guess.attrs().items():
                trial.set_user_attr(key, value)
        usable = guess is not None and guess.fit["usable"]
        if usable and budget is not None and guess.lo_ms > budget:
            self._predicted_over(trial, cand, guess, budget)
        # Pareto: a net surely within the budget is measured after training, and only if it could reach the front.
        deferred = usable and pareto and (budget is None or guess.hi_ms <= budget)
        if deferred:
            params, macs = self._size_of(trial, cand)
            latency = guess.median_ms  # not used before it is settled: the Pareto objective reports no folds
            lat_txt = f"{latency:.2f} ms predicted"
        else:
            latency, params, macs, lat_txt = self._measured(trial, cand)
        head = f"{_size(params, macs)}  {lat_txt}"
        if self.late():  # measuring took the last of the time
            trial.set_user_attr("pruned_reason", "deadline")
            trial.set_user_attr("epochs_trained", 0)
            self._say(trial, cand, f"{head}  not trained: the time limit is up (a rerun trains it)")
            raise optuna.TrialPruned("the time limit is up")
        return self._train(trial, cand, latency, params, macs, head, guess if deferred else None)

    def _guess(self, cand: Candidate) -> Guess | None:
        """The predicted latency of `cand` (search.predict_latency auto, with a budget or a Pareto objective)."""
        scfg = self.cfg.search
        if scfg.predict_latency == "off" or (scfg.latency_budget_ms is None and scfg.objective != "pareto"):
            return None
        if self._learner is None:
            from edge_agent.fingerprint import fingerprint_id

            self._learner = Learner(self._cache_path(), fingerprint_id(self.device.fingerprint()),
                                    self.settings.key(), self.cfg.device.precision)
        size = timed_size(cand.arch, cand.tile, self.cfg.device.measure_size)
        return self._learner.guess(cand.arch, size, self.task.in_channels, self.task.num_classes)

    def _cache_path(self) -> str | None:
        cache = getattr(self.device, "cache", None)
        path = getattr(cache, "path", None)
        return None if path in (None, ":memory:") else str(path)

    def _learn(self, cand: Candidate, blob: bytes, m: Any, size: int) -> None:
        """Keep a clean measurement for the predictor: the net of its graph, in the cache file, and in memory."""
        if m.error != MeasureError.OK or passing(m.flags):
            return
        path = self._cache_path()
        if path is not None:  # also with predict_latency off: a later run learns from this one
            remember_arch(path, _graph_hash(blob), cand.arch, self.task.in_channels, self.task.num_classes,
                          self.cfg.device.precision)
        if self._learner is not None and m.fingerprint_id == self._learner.fingerprint_id:
            self._learner.add(LatencyRecord(cand.arch, (size, size), float(m.median_ms), self.task.in_channels,
                                            self.task.num_classes))

    def _size_of(self, trial: optuna.Trial, cand: Candidate) -> tuple[int, int]:
        """Params and MACs of a net not exported (at the timed size), with the attributes a measured one gets."""
        size = timed_size(cand.arch, cand.tile, self.cfg.device.measure_size)
        params = count_params(build_unet(cand.arch, self.task.in_channels, self.task.num_classes))
        macs = count_macs(cand.arch, self.task.in_channels, self.task.num_classes, size, size)
        for key, value in (("params", params), ("macs", macs), ("measure_size", size),
                           ("precision", self.cfg.device.precision)):
            trial.set_user_attr(key, value)
        return params, macs

    def _predicted_over(self, trial: optuna.Trial, cand: Candidate, guess: Guess, budget: float) -> None:
        """Drop a net whose predicted latency is over the budget by more than its uncertainty: not exported,
        not measured, not trained."""
        params, macs = self._size_of(trial, cand)
        trial.set_user_attr("pruned_reason", "predicted_over_budget")
        self._say(trial, cand, f"{_size(params, macs)}  {guess.median_ms:.2f} ms predicted ({guess.lo_ms:.2f}-"
                  f"{guess.hi_ms:.2f})  pruned: predicted over budget {budget:.4g} ms, not measured")
        self.streak += 1
        if self.streak >= self.cfg.search.max_budget_prunes:
            self._stop(trial, f"search.latency_budget_ms: {self.streak} candidates in a row were slower than "
                       f"{budget:g} ms (predicted or measured); raise --latency-budget-ms or allow smaller nets")
        raise optuna.TrialPruned("latency predicted over budget")

    def _settle(self, trial: optuna.Trial, cand: Candidate, guess: Guess, cv_mean: float) -> tuple[float, str]:
        """Pareto, after training: a net that a measured net beats on score even at the low end of its predicted
        latency cannot reach the front, and keeps its prediction (labelled predicted); any other is measured."""
        for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            a = t.user_attrs
            if a.get("latency_is_predicted") or "cv_mean" not in a or "latency_ms" not in a:
                continue
            if (a["cv_mean"] >= cv_mean and a["latency_ms"] <= guess.lo_ms
                    and (a["cv_mean"] > cv_mean or a["latency_ms"] < guess.lo_ms)):
                trial.set_user_attr("latency_ms", guess.median_ms)
                trial.set_user_attr("latency_source", "predicted")
                trial.set_user_attr("latency_is_predicted", True)
                return guess.median_ms, f"{guess.median_ms:.2f} ms predicted (dominated by trial {t.number})"
        latency, _, _, lat_txt = self._measured(trial, cand)
        return latency, lat_txt

    def _measured(self, trial: optuna.Trial, cand: Candidate) -> tuple[float, int, int, str]:
        """Export and time `cand`; prune it when the device fails or it is over the budget."""
        scfg = self.cfg.search
        try:
            with self.gate.measuring() if self.gate is not None else nullcontext():
                blob, m, params, macs = measure_candidate(
                    cand, self.task, self.device, self.settings, self.cfg.device.measure_size, self.cfg.export.opset,
                    int8=self.int8,
                )
        except DeviceUnreachable:
            trial.set_user_attr("interrupted", True)
            raise
        trial.set_user_attr("params", params)
        trial.set_user_attr("macs", macs)
        trial.set_user_attr("latency", m.to_dict())
        trial.set_user_attr("latency_source", m.source)
        size = timed_size(cand.arch, cand.tile, self.cfg.device.measure_size)
        trial.set_user_attr("measure_size", size)
        trial.set_user_attr("precision", self.cfg.device.precision)
        trial.set_user_attr("device", m.device)
        trial.set_user_attr("fingerprint_id", m.fingerprint_id)
        meta = self.task.dataset_metadata  # described like the final model (tasks made in tests may lack it)
        write_bytes_atomic(self.run.trial(trial.number) / "model.onnx", annotate(
            blob, model_metadata(tile=cand.tile, arch=cand.arch.key(), input_multiple=cand.arch.multiple, **meta),
            cand.tile, self.task.in_channels, self.task.num_classes) if meta else blob)
        if m.error != MeasureError.OK:
            trial.set_user_attr("pruned_reason", "measure_failed")
            self._say(trial, cand, f"measurement failed: {m.message}")
            self.failures += 1
            if self.failures >= scfg.max_measure_failures:
                self._stop(trial, f"device {m.device}: {self.failures} candidates in a row could not be measured "
                           f"(last: {m.message}); {failure_hint(m, self.cfg.export.opset)}")
            raise optuna.TrialPruned(m.message)
        self.failures = 0
        self._learn(cand, blob, m, size)
        latency = float(m.median_ms)
        trial.set_user_attr("latency_ms", latency)
        lat_txt = f"{latency:.2f} ms{' int8' if self.int8 else ''} ({m.source}{', cached' if m.cached else ''})"

        budget = scfg.latency_budget_ms
        if budget is not None and latency > budget:
            trial.set_user_attr("pruned_reason", "latency_budget")
            self._say(trial, cand, f"{_size(params, macs)}  {lat_txt}  pruned: over budget {budget:.4g} ms")
            self.streak += 1
            if self.streak >= scfg.max_budget_prunes:
                self._stop(trial, f"search.latency_budget_ms: {self.streak} candidates in a row were slower than "
                           f"{budget:g} ms on {m.device}; raise --latency-budget-ms or allow smaller nets")
            raise optuna.TrialPruned("latency over budget")
        self.streak = 0
        return latency, params, macs, lat_txt

    def _train(self, trial: optuna.Trial, cand: Candidate, latency: float, params: int, macs: int, head: str,
               deferred: Guess | None) -> float | tuple[float, float]:
        """Cross-validate `cand`, reporting to the pruner; `deferred`: its latency is settled afterwards."""
        scfg = self.cfg.search
        pareto = scfg.objective == "pareto"
        data = self.task.data[cand.tile]
        s = self.train_settings(cand.tile)
        folds = self.cfg.train.folds
        kind = pruner_kind(self.cfg)
        means: list[float] = []  # running CV mean after each finished fold

        def on_epoch(fold: int, done: int, score: Callable[[], float]) -> None:
            self.epochs_done += 1
            if done < s.epochs and self.late():  # after a fold's last epoch its score is worth the wait
                raise DeadlineReached

        def on_fold(i: int, running: float) -> None:
            means.append(running)
            trial.set_user_attr("cv_score", float(running))  # so far: a pruned trial keeps the folds it did
            self.folds_done = i + 1
            last = i + 1 == folds
            if not pareto:  # the objective so far; after the last fold, pruning would save nothing
                value = penalty_objective(running, latency, macs, scfg)
                trial.report(value, i + 1)
                if not last and trial.should_prune():
                    trial.set_user_attr("pruned_reason", kind)
                    raise optuna.TrialPruned(f"after fold {i + 1}: objective {value:.3f} below the {kind} cut")
            if not last and self.late():
                raise DeadlineReached

        try:
            scores = cross_validate(
                cand.arch, data.x, data.y, data.groups, self.task.num_classes, s, folds, on_fold,
                epoch_guard=self.gate.epoch if self.gate is not None else nullcontext, on_epoch=on_epoch,
            )
        except optuna.TrialPruned:
            trial.set_user_attr("epochs_trained", self.epochs_done)
            self._say(trial, cand, f"{head}  pruned ({kind}) after fold {self.folds_done}")
            raise
        except DeadlineReached:
            trial.set_user_attr("epochs_trained", self.epochs_done)
            if not means:
                trial.set_user_attr("pruned_reason", "deadline")
                self._say(trial, cand, f"{head}  stopped by the time limit after {self.epochs_done} epoch(s), before "
                          "a fold finished (a rerun trains it)")
                raise optuna.TrialPruned("stopped by the time limit") from None
            scores = fold_scores(means)
            trial.set_user_attr("stopped_by", "deadline")
        trial.set_user_attr("epochs_trained", self.epochs_done)
        cv_mean, cv_std = float(np.mean(scores)), float(np.std(scores))
        if deferred is not None:
            latency, lat_txt = self._settle(trial, cand, deferred, cv_mean)
            head = f"{_size(params, macs)}  {lat_txt}"
        trial.set_user_attr("fold_scores", [float(v) for v in scores])
        trial.set_user_attr("cv_mean", cv_mean)
        trial.set_user_attr("cv_score", cv_mean)
        trial.set_user_attr("cv_std", cv_std)
        value = penalty_objective(cv_mean, latency, macs, scfg)
        trial.set_user_attr("penalty_value", value)
        partial = f"  ({len(scores)} of {folds} folds: stopped by the time limit)" if len(scores) < folds else ""
        self._say(trial, cand, f"{head}  cv {cv_mean:.3f}±{cv_std:.3f}  obj {value:.3f}{partial}")
        if pareto:
            return cv_mean, latency
        return value

    def find_twin(self, trial: optuna.Trial, cand: Candidate) -> FrozenTrial | None:
        return find_twin(trial.study, cand, trial.number, self.cfg.search.latency_budget_ms)

    def _repeat(self, trial: optuna.Trial, cand: Candidate, twin: FrozenTrial) -> float | tuple[float, float]:
        """A net already looked at: nothing is exported, timed or trained again. Training is deterministic
        for an architecture, tile and seed, so the twin's folds are this trial's; and one net has one
        latency, even when a busy device would measure it twice. The sampler still sees the value, so it
        learns the same from a repeat as from the first look."""
        for key in ("params", "macs", "latency", "latency_ms", "latency_source", "measure_size", "precision", "device",
                    "fingerprint_id", "fold_scores", "cv_mean", "cv_score", "cv_std", "penalty_value", "pruned_reason",
                    "stopped_by", "latency_predicted_ms", "latency_predicted_lo_ms", "latency_predicted_hi_ms",
                    "latency_is_predicted"):
            if key in twin.user_attrs:
                trial.set_user_attr(key, twin.user_attrs[key])
        trial.set_user_attr("same_as_trial", twin.number)
        a = twin.user_attrs
        lat = f"{a['latency_ms']:.2f} ms" if "latency_ms" in a else f"{a['latency_predicted_ms']:.2f} ms predicted"
        head = f"{_size(a['params'], a['macs'])}  {lat}{' predicted' if a.get('latency_is_predicted') else ''}"
        if twin.state == TrialState.PRUNED:
            self._say(trial, cand, f"{head}  pruned, as its twin trial {twin.number}")
            raise optuna.TrialPruned(f"same architecture as pruned trial {twin.number}")
        cv_mean, value = a["cv_mean"], a["penalty_value"]
        self._say(trial, cand, f"{head}  cv {cv_mean:.3f}  same as trial {twin.number}")
        return (cv_mean, a["latency_ms"]) if self.cfg.search.objective == "pareto" else value

    def train_settings(self, tile: int) -> TrainSettings:
        epochs = cv_epochs(self.cfg.train, len(self.task.data[tile].x))
        return training_settings(self.cfg.train, self.cfg.seed, self.task.class_weights, epochs)

    def _stop(self, trial: optuna.Trial, message: str) -> None:
        """End the search after this trial with `message` for the user; the study stays for a rerun."""
        kept = self.run.study_db if self.cfg.search.storage is None else describe(self.cfg.search.storage)
        self.stop_message = f"{message} (the study is kept in {kept})"
        trial.study.stop()

    def _say(self, trial: optuna.Trial, cand: Candidate, text: str) -> None:
        self.on_trial(f"trial {trial.number:3d}  {cand.arch.key():<{self.key_width}} tile {cand.tile:<4} {text}")


def fold_scores(means: Sequence[float]) -> list[float]:
    """Each fold's score from the running means after each fold."""
    return [(i + 1) * m - (i * means[i - 1] if i else 0.0) for i, m in enumerate(means)]


def _size(params: int, macs: int) -> str:
    return f"{params / 1e3:7.1f}k params {macs / 1e6:8.1f}M MACs"


# ------------------------------------------------------------------ the clock


CALIBRATION_STEPS = 3  # timed training steps of each calibrated net, after an untimed one
MEASURE_SECONDS = 3.0  # export and latency measurement of a candidate, roughly
EVAL_SHARE = 1 / 3  # a validation pass costs about a third of a training pass over as many tiles
# What search.max_minutes leaves after the trials for exporting, testing and reporting the net (its final
# training has a budget of its own): this share of it, within these bounds.
FINISH_SHARE, FINISH_MIN_S, FINISH_MAX_S = 0.05, 5.0, 60.0
# Share of its whole CV that a trial trains, on average, under each pruner: the ETA's prior, which the search
# corrects with the trials it finishes (bench_search --part clock prints the shares it saw).
PRUNED_SHARE = {"none": 1.0, "median": 0.7, "halving": 0.55, "hyperband": 0.75}


@dataclass(frozen=True)
class StepCost:
    """Seconds a training step takes: a fixed cost per step, plus per tile a cost that grows with the net's MACs
    per tile along the line through two calibrated nets."""

    macs: tuple[float, float]
    tile_seconds: tuple[float, float]
    step_seconds: float = 0.0

    def per_tile(self, macs: float) -> float:
        (m0, m1), (s0, s1) = self.macs, self.tile_seconds
        slope = max(0.0, (s1 - s0) / (m1 - m0)) if m1 > m0 else 0.0
        return max(s0 + slope * (macs - m0), 1e-9)

    def step(self, batch: int, macs: float) -> float:
        return self.step_seconds + batch * self.per_tile(macs)


def _step_seconds(cfg: Config, task: SearchTask, cand: Candidate, batch: int) -> float:
    """Median time of a training step of `cand` at `batch`, from a short real training (one step an epoch,
    the first one a warm-up), with the threads and settings its folds use."""
    data = task.data[cand.tile]
    s = replace(training_settings(cfg.train, cfg.seed, task.class_weights, epochs=1 + CALIBRATION_STEPS),
                batch_size=batch)
    rows = np.resize(np.arange(len(data.x)), batch)
    ends: list[float] = []
    train_model(build_unet(cand.arch, task.in_channels, task.num_classes), data.x[rows], data.y[rows],
                task.num_classes, s, on_epoch=lambda _done, _state: ends.append(time.perf_counter()))
    return float(np.median(np.diff(ends)))


def fold_batch(cfg: Config, task: SearchTask, cand: Candidate) -> int:
    """The batch a fold of `cand` trains at (train_model's choice for the fold's tiles)."""
    n_fit = max(1, len(task.data[cand.tile].x) * (cfg.train.folds - 1) // cfg.train.folds)
    bs = cfg.train.batch_size or auto_batch_size(cand.arch, task.in_channels, task.num_classes, cand.tile, n_fit)
    return max(1, min(bs, n_fit))


def calibrate(cfg: Config, task: SearchTask, small: Candidate, large: Candidate) -> StepCost:
    """Time a few training steps of a small net at two batch sizes (the cost of a step apart from its tiles)
    and of a large one at the batch its folds use."""
    b0 = fold_batch(cfg, task, small)
    b1 = max(4 * b0, 16)
    t0, t1 = _step_seconds(cfg, task, small, b0), _step_seconds(cfg, task, small, b1)
    per_tile = (t1 - t0) / (b1 - b0)
    fixed = t0 - b0 * per_tile
    if per_tile <= 0 or fixed < 0:  # too noisy to split: all of it per tile
        per_tile, fixed = t1 / b1, 0.0
    bl = fold_batch(cfg, task, large)
    large_tile = max((_step_seconds(cfg, task, large, bl) - fixed) / bl, per_tile)
    return StepCost((float(tile_macs(small, task.in_channels, task.num_classes)),
                     float(tile_macs(large, task.in_channels, task.num_classes))), (per_tile, large_tile), fixed)


def space_corners(cfg: Config, macs: Callable[[Candidate], int]) -> tuple[Candidate, Candidate]:
    """The space's smallest and largest nets by `macs`: narrowest and widest kernels and channels at each
    level count, tile, conv and upsample."""
    sp = cfg.search.space
    ups = list(dict.fromkeys(sp.upsample))
    nets = []
    for levels in sorted(set(sp.levels)):
        for tile in tile_choices(cfg):
            for conv in dict.fromkeys(sp.conv):
                for up in ups[:1] if levels == 1 else ups:
                    for k, c in ((min(sp.kernels), min(sp.channels)), (max(sp.kernels), max(sp.channels))):
                        cand = Candidate(Arch((k,) * levels, (c,) * levels, conv, up), tile)
                        try:
                            validate_arch(cand.arch, cand.tile)
                        except ValueError:
                            continue
                        nets.append(cand)
    order = sorted(nets, key=lambda c: (macs(c), c.arch.key(), c.tile))
    return order[0], order[-1]


def minutes(seconds: float) -> str:
    if seconds < 60:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class SearchClock:
    """The search's time: its deadline, what a trial is expected to cost, and the ETA."""

    def __init__(self, cfg: Config, task: SearchTask, started: float) -> None:
        self.cfg, self.task, self.started = cfg, task, started
        m = cfg.search.max_minutes
        self.finish = 0.0 if m is None else min(FINISH_MAX_S, max(FINISH_MIN_S, FINISH_SHARE * 60.0 * m))
        self.deadline = None if m is None else started + 60.0 * m - self.finish  # time.time()
        self.cost: StepCost | None = None  # None: not calibrated (nothing was left to run)
        self.start_costs: list[float] = []  # whole-CV seconds of the planned start's nets, by place
        self.typical = 0.0  # whole-CV seconds of the space's median net
        self.share = PRUNED_SHARE[pruner_kind(cfg)]
        self.warned = False  # the log has said that the time limit cuts the search

    def fold_shape(self, tile: int) -> tuple[float, float, int]:
        """Tiles a fold trains on, tiles it validates on, and its epochs."""
        n, folds = len(self.task.data[tile].x), self.cfg.train.folds
        return n * (folds - 1) / folds, n / folds, cv_epochs(self.cfg.train, n)

    def cv_seconds(self, cand: Candidate) -> float:
        """Training and validation of the whole CV of `cand`."""
        assert self.cost is not None
        fit, val, epochs = self.fold_shape(cand.tile)
        macs = tile_macs(cand, self.task.in_channels, self.task.num_classes)
        bs = fold_batch(self.cfg, self.task, cand)
        train = epochs * math.ceil(fit / bs) * self.cost.step(bs, macs)
        return self.cfg.train.folds * (train + EVAL_SHARE * val * self.cost.per_tile(macs))

    def spent(self, t: FrozenTrial) -> float:
        """What the model says a finished trial cost."""
        a = t.user_attrs
        if is_repeat(t) or "latency" not in a:
            return 0.0
        trained = a.get("epochs_trained", 0)
        if not trained or "arch_dict" not in a:
            return MEASURE_SECONDS
        cand = Candidate(Arch.from_dict(a["arch_dict"]), int(a["tile"]))
        _, _, epochs = self.fold_shape(cand.tile)
        return MEASURE_SECONDS + self.cv_seconds(cand) * min(1.0, trained / (epochs * self.cfg.train.folds))

    def expected(self, place: int, count: int) -> list[float]:
        """Expected seconds of the next `count` trials, the first at `place`."""
        return [MEASURE_SECONDS + self.share * (self.start_costs[p] if p < len(self.start_costs) else self.typical)
                for p in range(place, place + count)]

    def remaining(self, study: optuna.Study, n_trials: int, since: float) -> tuple[float, int, int]:
        """Seconds the trials still to run should take (the model corrected by how it did on the trials
        finished since `since`), how many are left, and how many of them fit before the deadline."""
        left = max(0, n_trials - len(distinct_trials(study)))
        place = len(study.trials) - len(study.user_attrs.get("requeued", []))
        mine = [t for t in finished_trials(study) if t.datetime_start and t.datetime_start.timestamp() >= since]
        modelled = sum(self.spent(t) for t in mine)
        k = min(4.0, max(0.25, (time.time() - since) / modelled)) if modelled > 0 else 1.0
        costs = [k * c for c in self.expected(place, left)]
        fit = left
        if self.deadline is not None:
            budget = self.deadline - time.time()
            fit = int(np.searchsorted(np.cumsum(costs), budget, side="right")) if costs else 0
        return float(sum(costs)), left, fit

    def eta_text(self, study: optuna.Study, n_trials: int, since: float) -> str:
        eta, left, fit = self.remaining(study, n_trials, since)
        if self.deadline is not None and fit < left:
            text = f"time limit in {minutes(max(0.0, self.deadline - time.time()))}, about {fit} more"
            if not self.warned:
                self.warned = True
                log.info("at this pace --max-minutes %g cuts the search: about %d of the %d nets left fit in the "
                         "%s left; then the best so far is trained", self.cfg.search.max_minutes, fit, left,
                         minutes(max(0.0, self.deadline - time.time())))
            return text
        return f"ETA {minutes(eta)}"


def plan_search(
    cfg: Config, task: SearchTask, device: Device, settings: MeasureSettings, study: optuna.Study, started: float
) -> SearchClock:
    """Before the first trial: check the latency budget on the space's smallest net (none meets it: one
    line, exit 2), time a few training steps of its smallest and largest nets, refuse a --max-minutes too
    short for one trial, say what the time goes on (the search's limit, the final training's budget), give
    the latency range with the flag that halves the space when there is no budget, and the ETA."""
    clock = SearchClock(cfg, task, started)
    scfg, t = cfg.search, cfg.train
    left = scfg.trials - len(distinct_trials(study))
    if left <= 0:  # nothing to run, nothing to measure
        if scfg.latency_budget_ms is None:
            log.info("no latency budget: every candidate is trained, the slowest too; --latency-budget-ms drops slow "
                     "nets before any training")
        return clock
    int8 = cfg.device.precision == "int8"

    def timed_macs(c: Candidate) -> int:
        size = timed_size(c.arch, c.tile, cfg.device.measure_size)
        return count_macs(c.arch, task.in_channels, task.num_classes, size, size)

    def latency(c: Candidate) -> float | None:
        _, m, _, _ = measure_candidate(c, task, device, settings, cfg.device.measure_size, cfg.export.opset, int8=int8)
        return float(m.median_ms) if m.error == MeasureError.OK and m.median_ms is not None else None

    smallest, largest = space_corners(cfg, timed_macs)
    size = timed_size(smallest.arch, smallest.tile, cfg.device.measure_size)
    where = f"at {size}x{size} px on {device.name}"
    budget = scfg.latency_budget_ms
    if budget is not None:
        lat = latency(smallest)
        if lat is not None and lat > budget:
            raise InputError(
                f"search.latency_budget_ms: no net of the space meets {budget:g} ms: its smallest, "
                f"{smallest.arch.key()} (tile {smallest.tile}), takes {lat:.3g} ms {where}; raise "
                f"--latency-budget-ms above {lat:.3g} or allow smaller nets (search.space)"
            )

    small, large = space_corners(cfg, lambda c: tile_macs(c, task.in_channels, task.num_classes))
    clock.cost = calibrate(cfg, task, small, large)
    pool = space_pool(cfg)
    clock.start_costs = [clock.cv_seconds(sample_candidate(optuna.trial.FixedTrial(p), scfg.space, tile_choices(cfg)))
                         for p in startup_plan(cfg)]
    clock.typical = float(np.median([clock.cv_seconds(c) for c, _ in pool])) if pool else clock.cv_seconds(small)
    fit, _, epochs = clock.fold_shape(small.tile)
    one = MEASURE_SECONDS + clock.cv_seconds(small)
    log.info("time: %s; then the final training: %s", _search_limit_text(cfg, clock),
             _final_budget_text(cfg, task, clock, small, large))

    done = any(tr.state == TrialState.COMPLETE for tr in distinct_trials(study))
    if clock.deadline is not None and not done and time.time() + one > clock.deadline:
        need = math.ceil((time.time() - started + one + clock.finish) / 60)
        raise InputError(
            f"search.max_minutes: {scfg.max_minutes:g} min leaves {max(0.0, clock.deadline - time.time()) / 60:.1f} "
            f"min for trials after preparing the data, and one trial of the space's smallest net ({small.arch.key()}: "
            f"{t.folds} folds x {epochs} epochs on {fit:.0f} tiles) is estimated at {one / 60:.1f} min; raise "
            f"--max-minutes to at least {need}"
        )

    if budget is None:
        by_cost = sorted(pool, key=lambda cp: (timed_macs(cp[0]), cp[0].arch.key()))
        middle = by_cost[len(by_cost) // 2][0] if by_cost else smallest
        lats = [latency(c) for c in (smallest, middle, largest)]
        if all(v is not None for v in lats):
            log.info("no latency budget: every candidate is trained, the slowest too. The space's nets take %.3g ms "
                     "(%s) to %.3g ms (%s) %s; --latency-budget-ms %.3g (a median net's, %s) drops the slower "
                     "half before any training", lats[0], smallest.arch.key(), lats[2], largest.arch.key(), where,
                     lats[1], middle.arch.key())
        else:
            log.info("no latency budget: every candidate is trained, the slowest too; --latency-budget-ms drops slow "
                     "nets before any training")

    place = len(study.trials) - len(study.user_attrs.get("requeued", []))
    costs = clock.expected(place, left)
    log.info("ETA: a trial's whole CV (%d folds x %d epochs on %.0f tiles) takes about %s (%s) to %s (%s); "
             "about %s for the %d trial(s) to run%s", t.folds, epochs, fit, minutes(clock.cv_seconds(small)),
             small.arch.key(), minutes(clock.cv_seconds(large)), large.arch.key(), minutes(sum(costs)), left,
             f", with {pruner_kind(cfg)} pruning" if pruner_kind(cfg) != "none" else "")
    if clock.deadline is not None:
        fits = int(np.searchsorted(np.cumsum(costs), clock.deadline - time.time(), side="right"))
        if fits < left:
            clock.warned = True
            log.info("--max-minutes %g will cut the search: about %d of the %d trials fit in the %s left; then the "
                     "best so far is trained", scfg.max_minutes, fits, left,
                     minutes(max(0.0, clock.deadline - time.time())))
    return clock


def _search_limit_text(cfg: Config, clock: SearchClock) -> str:
    if clock.deadline is None:
        return "no limit on the search (--max-minutes sets one)"
    return (f"the search stops by {time.strftime('%H:%M:%S', time.localtime(clock.deadline))} (--max-minutes "
            f"{cfg.search.max_minutes:g} from its start, a running trial included, less {clock.finish:.0f} s to "
            "export and test the net)")


def _final_budget_text(cfg: Config, task: SearchTask, clock: SearchClock, small: Candidate, large: Candidate) -> str:
    t = cfg.train
    assert clock.cost is not None
    if t.final_minutes is not None:
        return f"at most {t.final_minutes:g} min (--final-minutes)"
    from autoseg.final_train import final_batch_size

    secs = []
    for c in (small, large):
        if t.final_data == "all":
            crop = -(-(t.final_crop or c.tile) // c.arch.multiple) * c.arch.multiple
            bs = final_batch_size(t, c.arch, task.in_channels, task.num_classes, crop)
            steps = math.ceil(t.final_tiles / bs)
            secs.append(steps * clock.cost.step(bs, count_macs(c.arch, task.in_channels, task.num_classes, crop, crop)))
        else:
            n, bs = len(task.data[c.tile].x), fold_batch(cfg, task, c)
            secs.append(t.final_epochs * math.ceil(n / bs) * clock.cost.step(bs, tile_macs(c, task.in_channels,
                                                                                          task.num_classes)))
    what = f"{t.final_tiles:,} crops" if t.final_data == "all" else f"{t.final_epochs} epochs on the representatives"
    teacher = " plus the teacher's" if t.teacher == "reference" else ""
    return (f"{what}, about {minutes(secs[0])} for the smallest net to {minutes(secs[1])} for the largest{teacher}, "
            "no time cap (--final-minutes sets one)")


def run_trials(
    study: optuna.Study,
    objective: Objective,
    n_trials: int,
    progress: bool = False,
    max_minutes: float | None = None,
    deadline: float | None = None,
    clock: SearchClock | None = None,
) -> None:
    """Run until the study has looked at n_trials distinct nets (trained, or pruned), or the time is up:
    `deadline` (time.time()) or max_minutes from now, whichever comes first. No trial starts after it,
    and the one running stops at its next epoch (kept if a fold finished).

    A sampler proposes nets it has seen before (TPE does, once it has settled); a repeat costs nothing
    and does not count. A sampler that proposes only repeats for max(10, n_trials) proposals in a row has
    run out of new nets (a small space, or a settled search), and the search ends there. With `clock`
    the progress bar shows the ETA, and the log says when the time limit will cut the search.
    """
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    if max_minutes is not None:
        until = time.time() + 60.0 * max_minutes
        deadline = until if deadline is None else min(deadline, until)
    objective.deadline = deadline
    objective.streak = budget_prune_streak(study)
    done = len(distinct_trials(study))
    if done >= n_trials:
        log.info("study already holds %d distinct trials; nothing to run", n_trials)
        return
    patience = max(10, n_trials)
    repeats = 0
    since = time.time()
    bar = tqdm(total=n_trials, initial=done, desc="trials", unit="trial", disable=not progress,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")

    def eta() -> None:
        if clock is not None and clock.cost is not None:
            bar.set_postfix_str(clock.eta_text(study, n_trials, since))

    def tick(study: optuna.Study, trial: FrozenTrial) -> None:
        nonlocal done, repeats
        if trial.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            return
        done = len(distinct_trials(study))  # other processes add theirs too: after a repeat as after a new net
        bar.update(done - bar.n)
        if done >= n_trials:
            study.stop()
            return
        if is_repeat(trial):
            repeats += 1
            if repeats >= patience:
                log.warning(
                    "search: the last %d proposals were all nets already tried; stopping at %d distinct nets "
                    "of the %d asked for (the space, or the sampler, has no new ones left)", repeats, done, n_trials,
                )
                study.stop()
            return
        repeats = 0
        if not unmeasured(trial):
            eta()

    timeout = None if deadline is None else max(0.0, deadline - time.time())
    with bar, logging_redirect_tqdm():
        eta()
        # Optuna counts failed trials too; catch=() makes a failure (a bug, or a lost device) end the run.
        study.optimize(objective, n_trials=None, timeout=timeout, callbacks=[tick], catch=())
    if objective.stop_message:
        raise InputError(objective.stop_message)
    if done < n_trials and deadline is not None and time.time() >= deadline:
        limit = max_minutes if max_minutes is not None else objective.cfg.search.max_minutes
        log.warning("search: the time limit%s is up after %d of %d distinct nets; going on with the best so far "
                    "(the limit is per run: rerun to look at more)", f" of {limit:g} min" if limit else "", done,
                    n_trials)


def choose_best(study: optuna.Study, cfg: SearchConfig) -> FrozenTrial:
    """Penalty: the best value. Pareto: the front's member with the best penalty value."""
    done = [t for t in distinct_trials(study) if t.state == TrialState.COMPLETE]
    if not done:
        raise InputError(
            "search: no trial completed (all were pruned or failed); raise search.trials (and "
            "search.max_minutes, if set) or relax search.latency_budget_ms"
        )
    # A repeat holds its twin's values; the first look at a net is the one to name.
    if cfg.objective == "penalty":
        return max(done, key=lambda t: t.value)
    # A net whose latency is only predicted was beaten by a measured one (Objective._settle): never chosen.
    front = [t for t in study.best_trials if not is_repeat(t) and not t.user_attrs.get("latency_is_predicted")]
    return max(front, key=lambda t: t.user_attrs.get("penalty_value", -math.inf))


def trial_counts(study: optuna.Study) -> dict[str, int]:
    """Distinct nets looked at (what --trials counts), how many trained to the end (`partial`: of those, the
    ones the time limit stopped after a fold), the repeats, and the nets the device could not measure or the
    time limit stopped before a fold finished (which do not count)."""
    distinct = distinct_trials(study)
    return {
        "distinct": len(distinct),
        "completed": sum(t.state == TrialState.COMPLETE for t in distinct),
        "partial": sum(t.state == TrialState.COMPLETE and t.user_attrs.get("stopped_by") == "deadline"
                       for t in distinct),
        "over_budget": sum(t.user_attrs.get("pruned_reason") in OVER_BUDGET for t in distinct),
        # Of those, dropped on the predictor's word, and trained nets whose latency is only predicted.
        "predicted_over_budget": sum(t.user_attrs.get("pruned_reason") == "predicted_over_budget" for t in distinct),
        "latency_predicted": sum(bool(t.user_attrs.get("latency_is_predicted")) for t in distinct),
        "repeats": sum(is_repeat(t) for t in finished_trials(study)),
        "unmeasured": sum(unmeasured(t) for t in finished_trials(study)),
        "cut_by_deadline": sum(cut_by_deadline(t) for t in finished_trials(study)),
    }


def pareto_summary(study: optuna.Study) -> list[dict[str, Any]]:
    """The completed trials that no other trial beats on both score and latency, each net once. Nets with a
    predicted latency are left out: a measured net beats each of them (Objective._settle)."""
    done = [t for t in distinct_trials(study) if t.state == TrialState.COMPLETE
            and not t.user_attrs.get("latency_is_predicted")]
    front = pareto_front([(t.user_attrs["cv_mean"], t.user_attrs["latency_ms"]) for t in done])
    return [
        {"trial": t.number, "arch": t.user_attrs["arch"], "cv_mean": t.user_attrs["cv_mean"],
         "latency_ms": t.user_attrs["latency_ms"]}
        for t in (done[i] for i in front)
    ]
