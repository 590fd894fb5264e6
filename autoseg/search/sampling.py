"""Optuna's sampler and pruner for a search: samplers seeded per trial by its place in the search (so a resumed
search and parallel workers propose what an uninterrupted one does), following the cost-ordered start."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial

from autoseg.config import Config
from autoseg.search.space import startup_plan, startup_trials
from autoseg.search.trials import original_trial, trial_place

# Trials report their objective after each fold, at step = folds done: a fold's score estimates the whole CV's
# without bias (a reading in the middle of a fold's schedule would not, and judged a slowly learning net too
# early). Successive halving (min resource 1 fold, reduction 3) judges after fold 1 (and after fold 3 of 5+).
# Reduction 2 (judged after folds 1 and 2, the best half goes on) found no better nets over 5 seeds at 12 trials
# (benchmarks/results/full/clock_seeds.md: 86 % vs 82 % of each seed's best CV, 95 % vs 91 % by the objective).
HALVING_RATE = 3


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
