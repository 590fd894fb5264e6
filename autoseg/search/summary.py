"""What a finished search found: the net to train, the counts of trials, and the Pareto front."""

from __future__ import annotations

import math
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autoseg.config import SearchConfig
from autoseg.errors import InputError
from autoseg.pareto import pareto_front
from autoseg.search.trials import OVER_BUDGET, cut_by_deadline, distinct_trials, finished_trials, is_repeat, unmeasured


def choose_best(study: optuna.Study, cfg: SearchConfig) -> FrozenTrial:
    """Penalty: the best value. Pareto: the front's member with the best penalty value."""
    return shortlist(study, cfg, 1)[0]


def shortlist(study: optuna.Study, cfg: SearchConfig, k: int) -> list[FrozenTrial]:
    """The k nets the search rates best, best first (choose_best's pick first); ties keep trial order."""
    done = [t for t in distinct_trials(study) if t.state == TrialState.COMPLETE]
    if not done:
        raise InputError(
            "search: no trial completed (all were pruned or failed); raise search.trials (and "
            "search.max_minutes, if set) or relax search.latency_budget_ms"
        )
    # A repeat holds its twin's values; the first look at a net is the one to name.
    if cfg.objective == "penalty":
        return sorted(done, key=lambda t: -t.value)[:k]
    # A net whose latency is only predicted was beaten by a measured one (Objective._settle): never chosen.
    front = [t for t in study.best_trials if not is_repeat(t) and not t.user_attrs.get("latency_is_predicted")]
    return sorted(front, key=lambda t: -t.user_attrs.get("penalty_value", -math.inf))[:k]


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
