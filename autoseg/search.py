"""The Optuna search over U-Net architectures: latency first, then cross-validated training.

One study per run directory, in SQLite, so a rerun of the same command resumes it.
Per trial: sample an architecture, export it, measure it on the device, drop it if it
misses the latency budget (before any training), else train it with k-fold CV on the
representative tiles and report each fold to the pruner.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
import sqlalchemy
import torch
from optuna.trial import FrozenTrial, TrialState

from autoseg.config import Config, SearchConfig, SpaceConfig, config_to_dict
from autoseg.errors import DeviceUnreachable, InputError
from autoseg.export import int8_bytes, onnx_bytes
from autoseg.gate import Gate
from autoseg.latency import Device, MeasureError, MeasureSettings, failure_hint
from autoseg.pareto import pareto_front
from autoseg.rundir import RunDir, StudyFileError, check_study_file, write_bytes_atomic
from autoseg.train import TrainSettings, cross_validate, cv_epochs, training_settings
from autoseg.unet import Arch, build_unet, count_macs, count_params, validate_arch

log = logging.getLogger(__name__)

STUDY_NAME = "autoseg"
# How many places up the sorted channel list each deeper level moves: with the default list, up to x4 (8 -> 32)
# or x2.7 (24 -> 64) per level.
CHANNEL_STEPS = (0, 1, 2, 3)
INT8_CALIB_TILES = 8  # timing needs the int8 graph, not good scales: a few tiles calibrate it

# Config keys that do not change what a trial means: a rerun may change them and still resume.
_RESUMABLE_KEYS = {
    "out",
    "search.trials",
    "search.max_budget_prunes",
    "search.max_measure_failures",
    "search.max_minutes",
    "search.workers",
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
    """

    _rng: Any
    _random_sampler: Any

    def __init__(self, *args: Any, seed: int, **kwargs: Any) -> None:
        super().__init__(*args, seed=seed, **kwargs)
        self._base_seed = seed

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        original = original_trial(study, trial)
        seeds = np.random.SeedSequence([self._base_seed, trial_place(study, original)]).generate_state(2)
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
        startup = max(3, min(10, cfg.search.trials // 3))
        return TrialSeededTPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=startup,
                                     constant_liar=cfg.search.workers > 1)


def study_storage(run: RunDir) -> optuna.storages.RDBStorage:
    # Parallel workers write to one SQLite file: wait for its lock instead of failing after 5 s.
    storage = optuna.storages.RDBStorage(run.storage_url, engine_kwargs={"connect_args": {"timeout": 120}})
    _lock_on_begin(storage.engine)
    return storage


def _lock_on_begin(engine: Any) -> None:
    """Every transaction takes SQLite's write lock when it begins (SQLAlchemy's recipe for pysqlite).

    Optuna reads a trial and then updates it (WAITING -> RUNNING) trusting SELECT ... FOR UPDATE, which
    SQLite ignores: two workers could both take one requeued trial, and the second then failed to tell it.
    """

    @sqlalchemy.event.listens_for(engine, "connect")
    def _no_pysqlite_transactions(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # the BEGIN below is the only one

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin_immediate(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened while the storage set itself up lack the hooks


def load_study(run: RunDir, cfg: Config, worker: int) -> optuna.Study:
    """The study open_study made, as a parallel worker sees it (no checks, no requeueing: the first
    process did both before the workers started)."""
    return optuna.load_study(study_name=STUDY_NAME, storage=study_storage(run), sampler=make_sampler(cfg, worker),
                             pruner=make_pruner(cfg))


def make_pruner(cfg: Config) -> optuna.pruners.BasePruner:
    if cfg.search.pruner == "none" or cfg.search.objective == "pareto":
        return optuna.pruners.NopPruner()
    # The first fold of a few trials must finish before anything is pruned on its score.
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)


def open_study(run: RunDir, cfg: Config, resume_anyway: bool = False) -> optuna.Study:
    """Create the study, or resume it after checking it was made with the same config."""
    directions = ["maximize"] if cfg.search.objective == "penalty" else ["maximize", "minimize"]
    try:
        check_study_file(run.study_db, empty_ok=True)
    except StudyFileError as e:
        raise InputError(f"{e}; move it away (the search then starts a new study) or use a new --out") from None
    existed = run.study_db.exists()
    study = optuna.create_study(
        storage=study_storage(run),
        study_name=STUDY_NAME,
        directions=directions,
        sampler=make_sampler(cfg),
        pruner=make_pruner(cfg),
        load_if_exists=True,
    )
    mine = config_fingerprint(cfg)
    theirs = study.user_attrs.get("config")
    if existed and theirs is not None and theirs != mine:
        changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        space = [k for k in changed if k.startswith("search.space.")]
        if space:
            # Optuna cannot add trials to a study whose parameters had other choices.
            raise InputError(
                f"{run.study_db}: made with a different search space (changed: {', '.join(space[:5])}); "
                "a study cannot change its space, so use a new --out directory"
            )
        if not resume_anyway:
            raise InputError(
                f"{run.study_db}: made with a different config (changed: {', '.join(changed[:5])}); "
                "use a new --out directory, or --resume-anyway to continue this study"
            )
        log.warning("resuming %s despite config changes: %s", run.study_db, ", ".join(changed))
    if [d.name.lower() for d in study.directions] != directions:
        raise InputError(
            f"{run.study_db}: was made for objective "
            f"{'pareto' if len(study.directions) == 2 else 'penalty'}; use a new --out for --objective "
            f"{cfg.search.objective}"
        )
    if theirs is None or resume_anyway:
        study.set_user_attr("config", mine)
        study.set_user_attr("config_hash", config_hash(cfg))
        study.set_user_attr("objective", cfg.search.objective)
    _requeue_interrupted(study)
    return study


def _requeue_interrupted(study: optuna.Study) -> None:
    """A trial left RUNNING by a kill, or failed by a lost device, is run again with the same params."""
    done = set(study.user_attrs.get("requeued", []))
    requeued = []
    for t in study.get_trials(deepcopy=False):
        stale = t.state == TrialState.RUNNING
        lost = t.state == TrialState.FAIL and t.user_attrs.get("interrupted")
        if not (stale or lost) or t.number in done:
            continue
        if stale:
            # Only one search runs per run directory (see pipeline's lock), so RUNNING here means killed.
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"redo_of": t.number}, skip_if_exists=False)
        requeued.append(t.number)
    if requeued:
        log.info("resuming: trial(s) %s were interrupted and will run again", ", ".join(map(str, requeued)))
        study.set_user_attr("requeued", sorted(done | set(requeued)))


def finished_trials(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def find_twin(study: optuna.Study, cand: Candidate, number: int, budget_ms: float | None) -> FrozenTrial | None:
    """The earlier trial whose outcome this candidate shares: same architecture and tile, and trained,
    median-pruned or over the latency budget. A failed measurement is no outcome, and neither is one that
    a budget changed since (--resume-anyway) would decide differently: those nets are measured again."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        a = t.user_attrs
        if t.number == number or is_repeat(t) or a.get("arch") != cand.arch.key() or a.get("tile") != cand.tile:
            continue
        over = budget_ms is not None and a.get("latency_ms", 0.0) > budget_ms
        reason = a.get("pruned_reason")
        # Median-pruned stays pruned whatever the budget; the other two follow the budget.
        if reason == "median" or (t.state == TrialState.COMPLETE and not over) or (reason == "latency_budget" and over):
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


def distinct_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Finished trials that looked at a net for the first time: what --trials counts."""
    return [t for t in finished_trials(study) if not is_repeat(t) and not unmeasured(t)]


def budget_prune_streak(study: optuna.Study) -> int:
    streak = 0
    for t in sorted(distinct_trials(study), key=lambda t: t.number, reverse=True):
        if t.user_attrs.get("pruned_reason") != "latency_budget":
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


class Objective:
    """The callable handed to study.optimize."""

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

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        scfg = self.cfg.search
        cand = sample_candidate(trial, scfg.space, self.tiles)
        trial.set_user_attr("arch", cand.arch.key())
        trial.set_user_attr("arch_dict", cand.arch.to_dict())
        trial.set_user_attr("tile", cand.tile)
        try:
            validate_arch(cand.arch, cand.tile)
        except ValueError as e:
            trial.set_user_attr("pruned_reason", "invalid")
            self._say(trial, cand, f"invalid: {e}")
            raise optuna.TrialPruned(str(e)) from None

        twin = self.find_twin(trial, cand)
        if twin is not None:
            return self._repeat(trial, cand, twin)
        busy = running_twin(trial.study, cand, trial.number) if scfg.workers > 1 else None
        if busy is not None:  # no outcome yet to share: skip it, uncounted; a later proposal reuses it
            trial.set_user_attr("same_as_trial", busy)
            self._say(trial, cand, f"skipped: another worker is on it (trial {busy})")
            raise optuna.TrialPruned(f"same architecture as running trial {busy}")

        if self.cfg.search.workers > 1:
            trial.set_user_attr("worker", self.worker)
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
        trial.set_user_attr("measure_size", timed_size(cand.arch, cand.tile, self.cfg.device.measure_size))
        trial.set_user_attr("precision", self.cfg.device.precision)
        trial.set_user_attr("device", m.device)
        trial.set_user_attr("fingerprint_id", m.fingerprint_id)
        write_bytes_atomic(self.run.trial(trial.number) / "model.onnx", blob)
        if m.error != MeasureError.OK:
            trial.set_user_attr("pruned_reason", "measure_failed")
            self._say(trial, cand, f"measurement failed: {m.message}")
            self.failures += 1
            if self.failures >= scfg.max_measure_failures:
                self._stop(trial, f"device {m.device}: {self.failures} candidates in a row could not be measured "
                           f"(last: {m.message}); {failure_hint(m, self.cfg.export.opset)}")
            raise optuna.TrialPruned(m.message)
        self.failures = 0
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
        pareto = scfg.objective == "pareto"

        data = self.task.data[cand.tile]
        s = self.train_settings(cand.tile)

        def on_fold(i: int, running: float) -> None:
            if pareto:
                return
            trial.report(running, i)
            if trial.should_prune():
                trial.set_user_attr("pruned_reason", "median")
                raise optuna.TrialPruned(f"fold {i}: running mean {running:.3f} below the median")

        try:
            scores = cross_validate(
                cand.arch, data.x, data.y, data.groups, self.task.num_classes, s, self.cfg.train.folds, on_fold,
                epoch_guard=self.gate.epoch if self.gate is not None else nullcontext,
            )
        except optuna.TrialPruned:
            self._say(trial, cand, f"{_size(params, macs)}  {lat_txt}  pruned by the median rule")
            raise
        cv_mean, cv_std = float(np.mean(scores)), float(np.std(scores))
        trial.set_user_attr("fold_scores", [float(v) for v in scores])
        trial.set_user_attr("cv_mean", cv_mean)
        trial.set_user_attr("cv_std", cv_std)
        value = penalty_objective(cv_mean, latency, macs, scfg)
        trial.set_user_attr("penalty_value", value)
        self._say(trial, cand, f"{_size(params, macs)}  {lat_txt}  cv {cv_mean:.3f}±{cv_std:.3f}  obj {value:.3f}")
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
                    "fingerprint_id", "fold_scores", "cv_mean", "cv_std", "penalty_value", "pruned_reason"):
            if key in twin.user_attrs:
                trial.set_user_attr(key, twin.user_attrs[key])
        trial.set_user_attr("same_as_trial", twin.number)
        a = twin.user_attrs
        head = f"{_size(a['params'], a['macs'])}  {a['latency_ms']:.2f} ms"
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
        self.stop_message = f"{message} (the study is kept in {self.run.study_db})"
        trial.study.stop()

    def _say(self, trial: optuna.Trial, cand: Candidate, text: str) -> None:
        self.on_trial(f"trial {trial.number:3d}  {cand.arch.key():<{self.key_width}} tile {cand.tile:<4} {text}")


def _size(params: int, macs: int) -> str:
    return f"{params / 1e3:7.1f}k params {macs / 1e6:8.1f}M MACs"


def run_trials(
    study: optuna.Study, objective: Objective, n_trials: int, progress: bool = False, max_minutes: float | None = None
) -> None:
    """Run until the study has looked at n_trials distinct nets (trained, or pruned), or max_minutes have
    passed (no new trial starts after that).

    A sampler proposes nets it has seen before (TPE does, once it has settled); a repeat costs nothing
    and does not count. A sampler that proposes only repeats for max(10, n_trials) proposals in a row has
    run out of new nets (a small space, or a settled search), and the search ends there.
    """
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    objective.streak = budget_prune_streak(study)
    done = len(distinct_trials(study))
    if done >= n_trials:
        log.info("study already holds %d distinct trials; nothing to run", n_trials)
        return
    patience = max(10, n_trials)
    repeats = 0
    bar = tqdm(total=n_trials, initial=done, desc="trials", unit="trial", disable=not progress)

    def tick(study: optuna.Study, trial: FrozenTrial) -> None:
        nonlocal done, repeats
        if trial.state not in (TrialState.COMPLETE, TrialState.PRUNED):
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
        if unmeasured(trial):
            return
        done = len(distinct_trials(study))  # parallel workers add theirs too
        bar.update(done - bar.n)
        if done >= n_trials:
            study.stop()

    timeout = None if max_minutes is None else max_minutes * 60.0
    start = time.monotonic()
    with bar, logging_redirect_tqdm():
        # Optuna counts failed trials too; catch=() makes a failure (a bug, or a lost device) end the run.
        study.optimize(objective, n_trials=None, timeout=timeout, callbacks=[tick], catch=())
    if objective.stop_message:
        raise InputError(objective.stop_message)
    if done < n_trials and timeout is not None and time.monotonic() - start >= timeout:
        log.warning("search: the time limit of %g min is up after %d of %d distinct nets; going on with the best "
                    "so far (the limit is per run: rerun to look at more)", max_minutes, done, n_trials)


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
    front = [t for t in study.best_trials if not is_repeat(t)]
    return max(front, key=lambda t: t.user_attrs.get("penalty_value", -math.inf))


def trial_counts(study: optuna.Study) -> dict[str, int]:
    """Distinct nets looked at (what --trials counts), how many trained to the end, the repeats, and the
    nets the device could not measure (which do not count)."""
    distinct = distinct_trials(study)
    return {
        "distinct": len(distinct),
        "completed": sum(t.state == TrialState.COMPLETE for t in distinct),
        "over_budget": sum(t.user_attrs.get("pruned_reason") == "latency_budget" for t in distinct),
        "repeats": sum(is_repeat(t) for t in finished_trials(study)),
        "unmeasured": sum(unmeasured(t) for t in finished_trials(study)),
    }


def pareto_summary(study: optuna.Study) -> list[dict[str, Any]]:
    """The completed trials that no other trial beats on both score and latency, each net once."""
    done = [t for t in distinct_trials(study) if t.state == TrialState.COMPLETE]
    front = pareto_front([(t.user_attrs["cv_mean"], t.user_attrs["latency_ms"]) for t in done])
    return [
        {"trial": t.number, "arch": t.user_attrs["arch"], "cv_mean": t.user_attrs["cv_mean"],
         "latency_ms": t.user_attrs["latency_ms"]}
        for t in (done[i] for i in front)
    ]
