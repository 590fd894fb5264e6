"""The trial loop: run trials until the study has looked at --trials distinct nets, the sampler has no new ones
left, or the time is up."""

from __future__ import annotations

import logging
import time

import optuna
from optuna.trial import FrozenTrial, TrialState

from autoseg.errors import InputError
from autoseg.search.clock import SearchClock
from autoseg.search.objective import Objective
from autoseg.search.trials import budget_prune_streak, distinct_trials, is_repeat, unmeasured

log = logging.getLogger("autoseg.search")  # one logger for the package: log lines keep the name they had


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

    def eta(remaining: tuple[float, int, int] | None = None) -> None:
        if clock is not None and clock.cost is not None:
            bar.set_postfix_str(clock.eta_text(remaining or clock.remaining(study, n_trials, since)))

    def tick(study: optuna.Study, trial: FrozenTrial) -> None:
        nonlocal done, repeats
        if trial.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            return
        remaining = None  # what the clock says is left after this trial: for the log and the bar alike
        if clock is not None and clock.cost is not None and not is_repeat(trial) and not unmeasured(trial):
            remaining = clock.remaining(study, n_trials, since)
            log.debug("trial %d took %.0f s; the clock's model says %.0f s for what it trained; %d trial(s) left, "
                      "about %.0f s", trial.number, (trial.datetime_complete - trial.datetime_start).total_seconds(),
                      clock.spent(trial), remaining[1], remaining[0])
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
        if remaining is not None:
            eta(remaining)

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
