"""Which of a study's trials count: nets looked at for the first time (what --trials counts), repeats and their
twins, trials redone after a kill and the place they take, and those with no outcome (unmeasured, cut by the
deadline before a fold)."""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

from autoseg.search.space import Candidate

PRUNERS = ("median", "halving", "hyperband")  # a trial's pruned_reason when one of them stopped it
OVER_BUDGET = ("latency_budget", "predicted_over_budget")  # measured over it; predicted over it beyond doubt


def original_trial(study: optuna.Study, trial: FrozenTrial) -> FrozenTrial:
    """The trial first proposed with these params, when `trial` redoes one a kill interrupted."""
    while "redo_of" in trial.user_attrs:
        trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, trial.user_attrs["redo_of"])
        trial = study._storage.get_trial(trial_id)
    return trial


def trial_place(study: optuna.Study, trial: FrozenTrial) -> int:
    """The trial's number in a search never interrupted: the trials that a resume ran again are not counted."""
    return trial.number - sum(n < trial.number for n in study.user_attrs.get("requeued", []))


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
