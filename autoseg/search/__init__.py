"""The Optuna search over U-Net architectures: latency first, then cross-validated training.

One study per run directory, in SQLite, so a rerun of the same command resumes it.
Per trial: sample an architecture, export it, measure it on the device, drop it if it
misses the latency budget (before any training), else train it with k-fold CV on the
representative tiles and report to the pruner as it goes.

The clock: TPE's first trials are nets spread over the space's cost, cheapest first; the pruner judges a
trial after its first fold; search.max_minutes stops a running trial at its next epoch; and before the first
trial a short calibration gives the ETA (plan_search).

space: the nets search.space allows, params -> Candidate (Arch and tile), the cost-ordered start; task: SearchTask,
TileData, what the trials train on; trials: which trials count (repeats, twins, redone trials, no outcome);
sampling: samplers seeded per trial, the pruner; study: open_study, load_study, the config fingerprint, requeueing
interrupted trials; measure: a candidate exported and timed; objective: Objective, one trial's run; clock:
calibration, SearchClock, the ETA, plan_search; loop: run_trials; summary: choose_best, shortlist, trial_counts,
pareto_summary.
Every submodule logs as "autoseg.search". A constant is read in the submodule that defines it: patch it there.
"""

from autoseg.search.clock import (
    CALIBRATION_STEPS,
    EVAL_SHARE,
    FINISH_MAX_S,
    FINISH_MIN_S,
    FINISH_SHARE,
    MEASURE_SECONDS,
    PRUNED_SHARE,
    SearchClock,
    StepCost,
    calibrate,
    fit_step_cost,
    fold_batch,
    minutes,
    net_work,
    plan_search,
)
from autoseg.search.loop import run_trials
from autoseg.search.measure import INT8_CALIB_TILES, measure_candidate, timed_size, trained_like_batchnorm
from autoseg.search.objective import DeadlineReached, Objective, fold_scores, penalty_objective
from autoseg.search.sampling import (
    HALVING_RATE,
    TrialSeededNSGAIISampler,
    TrialSeededTPESampler,
    make_pruner,
    make_sampler,
    pruner_kind,
    shared,
)
from autoseg.search.space import (
    CHANNEL_STEPS,
    START_DEPTHWISE_WEIGHT,
    START_NOMINAL_CLASSES,
    START_POOL,
    START_TOP_QUANTILE,
    Candidate,
    arch_attrs,
    check_space,
    sample_candidate,
    space_corners,
    space_pool,
    start_cost,
    startup_plan,
    startup_trials,
    tile_choices,
    tile_macs,
    trial_candidate,
)
from autoseg.search.study import (
    METRIC_NAMES,
    STUDY_NAME,
    RedoStaleTrial,
    config_fingerprint,
    config_hash,
    load_study,
    open_study,
    redo_stale_trial,
    study_storage,
)
from autoseg.search.summary import choose_best, pareto_summary, shortlist, trial_counts
from autoseg.search.task import SearchTask, TileData
from autoseg.search.trials import (
    OVER_BUDGET,
    PRUNERS,
    budget_prune_streak,
    cut_by_deadline,
    distinct_trials,
    find_twin,
    finished_trials,
    is_repeat,
    original_trial,
    running_twin,
    trial_place,
    unmeasured,
)

__all__ = [
    "CALIBRATION_STEPS",
    "CHANNEL_STEPS",
    "EVAL_SHARE",
    "FINISH_MAX_S",
    "FINISH_MIN_S",
    "FINISH_SHARE",
    "HALVING_RATE",
    "INT8_CALIB_TILES",
    "MEASURE_SECONDS",
    "METRIC_NAMES",
    "OVER_BUDGET",
    "PRUNED_SHARE",
    "PRUNERS",
    "START_DEPTHWISE_WEIGHT",
    "START_NOMINAL_CLASSES",
    "START_POOL",
    "START_TOP_QUANTILE",
    "STUDY_NAME",
    "Candidate",
    "DeadlineReached",
    "Objective",
    "RedoStaleTrial",
    "SearchClock",
    "SearchTask",
    "StepCost",
    "TileData",
    "TrialSeededNSGAIISampler",
    "TrialSeededTPESampler",
    "arch_attrs",
    "budget_prune_streak",
    "calibrate",
    "check_space",
    "choose_best",
    "config_fingerprint",
    "config_hash",
    "cut_by_deadline",
    "distinct_trials",
    "find_twin",
    "finished_trials",
    "fit_step_cost",
    "fold_batch",
    "fold_scores",
    "is_repeat",
    "load_study",
    "make_pruner",
    "make_sampler",
    "measure_candidate",
    "minutes",
    "net_work",
    "open_study",
    "original_trial",
    "pareto_summary",
    "penalty_objective",
    "plan_search",
    "pruner_kind",
    "redo_stale_trial",
    "run_trials",
    "running_twin",
    "sample_candidate",
    "shared",
    "shortlist",
    "space_corners",
    "space_pool",
    "start_cost",
    "startup_plan",
    "startup_trials",
    "study_storage",
    "tile_choices",
    "tile_macs",
    "timed_size",
    "trained_like_batchnorm",
    "trial_candidate",
    "trial_counts",
    "trial_place",
    "unmeasured",
]
