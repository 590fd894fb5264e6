"""The search and the user's clock: small nets first, early pruning, a hard deadline, the ETA and the budgets.

Real components throughout: local onnxruntime, Optuna's SQLite storage, real training on tiny nets.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import time
from contextlib import closing

import numpy as np
import optuna
import pytest
from optuna.trial import FixedTrial, TrialState
from test_search import TINY, Recorder, run_search, tiny_task

from autoseg.config import TrainConfig, load_config
from autoseg.demo_data import generate_demo
from autoseg.devices import open_device, settings_from_config
from autoseg.errors import InputError
from autoseg.refine import second_stage
from autoseg.report import _trial_row
from autoseg.rundir import RunDir
from autoseg.search import (
    STUDY_NAME,
    Candidate,
    Objective,
    SearchClock,
    StepCost,
    choose_best,
    cut_by_deadline,
    distinct_trials,
    fit_step_cost,
    fold_scores,
    make_pruner,
    open_study,
    penalty_objective,
    plan_search,
    run_trials,
    sample_candidate,
    space_corners,
    space_pool,
    start_cost,
    startup_plan,
    startup_trials,
    tile_macs,
)
from autoseg.search.clock import MEASURE_SECONDS, PRIOR_TRIALS, under_budget
from autoseg.search.space import tile_choices
from autoseg.train import cross_validate, training_settings
from autoseg.unet import Arch, count_macs

# ------------------------------------------------------------------ small nets first


def test_the_start_is_spread_over_the_space_by_cost_cheapest_first():
    cfg = load_config(None, {"search.trials": 20})  # the default space at tile 64
    plan = startup_plan(cfg)
    assert len(plan) == startup_trials(cfg) == 6
    nets = [sample_candidate(FixedTrial(p), cfg.search.space, [64]) for p in plan]
    macs = [tile_macs(c) for c in nets]
    assert macs == sorted(macs) and len({c.arch.key() for c in nets}) == 6
    assert [start_cost(c) for c in nets] == macs  # MACs alone (clock_start.md: weighing depthwise ones did worse)
    pool = sorted(tile_macs(c) for c, _ in space_pool(cfg))
    _, dearest = space_corners(cfg, tile_macs)
    assert macs[0] == pool[0]  # the cheapest first
    assert macs[-1] <= np.quantile(pool, 0.8) < tile_macs(dearest) / 2  # never the costly corner
    assert startup_plan(cfg) == plan  # the config alone decides it: a resumed search and every worker follow it
    assert startup_plan(load_config(None, {"search.startup": "random"})) == []
    assert startup_plan(load_config(None, {"search.sampler": "nsga2"})) == []  # NSGA-II's first generation is its own


def test_the_space_corners_are_its_smallest_and_largest_nets():
    cfg = load_config(None, {})
    small, large = space_corners(cfg, tile_macs)
    assert small.arch.key() == "k3-3_c8-8_separable_bilinear"
    assert large.arch.key() == "k5-5-5-5_c64-64-64-64_standard_transpose"
    assert all(tile_macs(small) <= tile_macs(c) <= tile_macs(large) for c, _ in space_pool(cfg))


# ------------------------------------------------------------------ pruning


def test_reading_a_fold_mid_training_changes_nothing_in_it():
    d = tiny_task().data[16]
    s = training_settings(TrainConfig(), 0, None, epochs=3)
    arch = Arch((3, 3), (4, 8))
    plain = cross_validate(arch, d.x, d.y, d.groups, 2, s, 2)
    seen: list[tuple[int, int, float]] = []
    probed = cross_validate(arch, d.x, d.y, d.groups, 2, s, 2,
                            on_epoch=lambda f, e, score: seen.append((f, e, score())))
    assert probed == plain  # bit for bit: the probe's validation draws nothing random and leaves BatchNorm alone
    assert [(f, e) for f, e, _ in seen] == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    assert seen[2][2] == plain[0] and seen[5][2] == plain[1]  # after its last epoch: the fold's own score


@pytest.mark.parametrize("pruner", ["halving", "hyperband", "median"])
def test_each_pruner_judges_trials_after_a_fold(tmp_path, pruner):
    # 2 folds of 2 epochs: the objective so far is reported after each fold (steps 1 and 2), judged after fold 1.
    cfg, _, study = run_search(tmp_path, trials=6, **{"train.epochs": 2, "search.alpha": 0.0, "search.pruner": pruner})
    assert type(make_pruner(cfg)).__name__ == {"halving": "SuccessiveHalvingPruner", "hyperband": "HyperbandPruner",
                                               "median": "MedianPruner"}[pruner]
    plan = startup_plan(cfg)
    assert [t.params for t in study.trials[: len(plan)]] == plan  # the start is the plan, cheapest first
    for t in distinct_trials(study):
        if t.state == TrialState.COMPLETE:
            assert set(t.intermediate_values) == {1, 2} and t.user_attrs["epochs_trained"] == 4
            assert t.intermediate_values[2] == pytest.approx(t.value)  # the objective, reported as it went
            assert t.intermediate_values[1] == pytest.approx(t.user_attrs["fold_scores"][0])  # alpha 0: the CV
        elif t.user_attrs.get("pruned_reason") == pruner:
            assert set(t.intermediate_values) == {1} and t.user_attrs["epochs_trained"] == 2  # fold 2 never began
    if pruner == "halving":  # the first trials must each beat all before them to go on
        pruned = [t for t in distinct_trials(study) if t.user_attrs.get("pruned_reason") == "halving"]
        assert pruned
        assert _trial_row(pruned[0])["pruned_reason"] == \
            f"halving after fold 1 (objective so far {pruned[0].intermediate_values[1]:.3f})"  # the report's note


# ------------------------------------------------------------------ the deadline


class OutOfTime(Objective):
    """The time runs out once the trial has trained `epochs` epochs or finished `folds` folds: the test's clock,
    the trial's real training and storage."""

    def __init__(self, *args, epochs: int = 10**9, folds: int = 10**9, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.after_epochs, self.after_folds = epochs, folds

    def late(self) -> bool:
        return self.epochs_done >= self.after_epochs or self.folds_done >= self.after_folds


def run_out_of_time(tmp_path, **limits):
    """One trial, whose time runs out as `limits` say."""
    cfg = load_config(None, {**TINY, "out": str(tmp_path / "run"), "train.epochs": 4, "train.folds": 3,
                             "search.trials": 1})
    run = RunDir(cfg.out).prepare()
    study = open_study(run, cfg)
    with closing(open_device(cfg.device, run.latency_cache)) as device:
        objective = OutOfTime(cfg, tiny_task(), device, settings_from_config(cfg.device), run, on_trial=lambda s: None,
                              **limits)
        study.optimize(objective, n_trials=1, catch=())
    return cfg, study


def test_a_trial_the_time_limit_stops_after_a_fold_is_kept_with_its_partial_score(tmp_path):
    cfg, study = run_out_of_time(tmp_path, folds=1)
    t = study.trials[0]
    assert t.state == TrialState.COMPLETE and t.user_attrs["stopped_by"] == "deadline"
    assert len(t.user_attrs["fold_scores"]) == 1 and t.user_attrs["epochs_trained"] == 4  # fold 2 never began
    assert t.user_attrs["cv_mean"] == pytest.approx(t.user_attrs["fold_scores"][0])
    assert t.value == pytest.approx(penalty_objective(t.user_attrs["cv_mean"], t.user_attrs["latency_ms"],
                                                      t.user_attrs["macs"], cfg.search))
    assert choose_best(study, cfg.search).number == 0


def test_a_trial_the_time_limit_stops_before_a_fold_finished_is_left_to_a_rerun(tmp_path):
    _, study = run_out_of_time(tmp_path, epochs=2)
    cut = study.trials[0]
    assert cut.state == TrialState.PRUNED and cut_by_deadline(cut)
    assert cut.user_attrs["epochs_trained"] == 2 and "fold_scores" not in cut.user_attrs
    assert distinct_trials(study) == []  # no outcome: it does not count toward --trials
    _, _, study = run_search(tmp_path, trials=1, **{"train.epochs": 4, "train.folds": 3})
    redo = study.trials[1]
    assert redo.user_attrs["redo_of"] == 0 and redo.params == cut.params and redo.state == TrialState.COMPLETE


def test_max_minutes_stops_a_long_trial_at_its_next_epoch(tmp_path):
    start = time.monotonic()
    _, _, study = run_search(tmp_path, trials=3, **{"train.epochs": 100_000, "search.max_minutes": 0.03})
    took = time.monotonic() - start
    assert len(study.trials) == 1  # its whole CV would take many minutes
    t = study.trials[0]
    assert cut_by_deadline(t) and t.user_attrs["epochs_trained"] < 100_000
    assert took < 0.03 * 60 + 15


def test_fold_scores_come_back_from_running_means():
    assert fold_scores([0.5, 0.6, 0.5]) == pytest.approx([0.5, 0.7, 0.3])


# ------------------------------------------------------------------ before the first trial


def tiny_plan(tmp_path, started: float | None = None, wrap=lambda d: d, **overrides):
    cfg = load_config(None, {**TINY, "out": str(tmp_path / "run"), "search.trials": 4, **overrides})
    run = RunDir(cfg.out).prepare()
    study = open_study(run, cfg)
    device = wrap(open_device(cfg.device, run.latency_cache))
    clock = plan_search(cfg, tiny_task(), device, settings_from_config(cfg.device), study, started or time.time())
    return cfg, run, study, device, clock


def test_the_plan_says_what_the_time_goes_on_and_the_bar_keeps_the_eta(tmp_path, caplog):
    started = time.time()
    with caplog.at_level(logging.INFO, logger="autoseg"):
        cfg, run, study, device, clock = tiny_plan(tmp_path, started, **{
            "search.max_minutes": 30.0, "train.final_minutes": 5.0, "search.refine_top": 3,
            "search.refine_tiles": 500})
    text = caplog.text
    assert re.search(r"time: the search stops by \S+ \(--max-minutes 30 from its start, less 60 s to export and test "
                     r"the net\), its trials by \S+ \(a running one included\); then the second stage: 3 nets x up "
                     r"to 500 crops, as many as fit in the \d+ s before the search stops; then the final training: at "
                     r"most 5 min \(--final-minutes\)", text)
    assert re.search(r"no latency budget: .* The space's nets take [\d.e-]+ ms \(k3_c4_standard_transpose\) to "
                     r"[\d.e-]+ ms \(k3-3_c8-8_standard_transpose\) at 16x16 px on local; --latency-budget-ms [\d.e-]+ "
                     r"\(a median net's, \S+\) drops the slower half", text)
    assert "ETA: a trial's whole CV (2 folds x 1 epochs on 6 tiles) takes about" in text
    assert re.search(r"for the 4 trial\(s\) to run \(\S+ s if the search keeps to the cheaper half of the space, "
                     r"\S+ s if to the dearer half\), with halving pruning", text)
    low, high = clock.span(0, 4)
    assert 0 < low <= sum(clock.expected(0, 4)) <= high
    assert clock.end == pytest.approx(started + 1800 - 60)
    assert 0 < clock.second_stage < 600 and clock.deadline == pytest.approx(clock.end - clock.second_stage)
    assert clock.cost is not None and clock.cost.per_tile(1e9) >= clock.cost.per_tile(1e3) > 0
    with closing(device):
        objective = Objective(cfg, tiny_task(), device, settings_from_config(cfg.device), run, on_trial=lambda s: None)
        since = time.time()
        with caplog.at_level(logging.DEBUG, logger="autoseg"):
            run_trials(study, objective, 2, progress=True, deadline=clock.deadline, clock=clock)
    # --verbose: each trial's time against the clock's model, and the ETA after it
    assert re.search(r"trial 0 took \d+ s; the clock's model says \d+ s for what it trained; 1 trial\(s\) left, "
                     r"about \d+ s", caplog.text)
    eta, left, fit = clock.remaining(study, 4, since)
    assert left == 2 == fit and eta > 0 and clock.eta_text((eta, left, fit)).startswith("ETA ")
    clock.deadline = time.time()  # the limit is up: the bar says so, and the log says once that it cuts the search
    with caplog.at_level(logging.INFO, logger="autoseg"):
        assert clock.eta_text(clock.remaining(study, 4, since)).startswith("time limit in 1 s, about 0 more")
        clock.eta_text(clock.remaining(study, 4, since))
    assert caplog.text.count("cuts the search: about 0 of the 2 nets left fit") == 1


def test_the_eta_prices_later_trials_by_what_the_later_trials_cost_so_far():
    cfg = load_config(None, TINY)
    clock = SearchClock(cfg, tiny_task(), time.time())
    clock.cost, clock.start_costs, clock.typical = StepCost(0.01, 0.0), [10.0], 100.0
    prior = MEASURE_SECONDS + clock.share * 100.0
    study = optuna.create_study(direction="maximize")
    assert clock.later_price(study) == pytest.approx(prior) == clock.later_price()
    # The start's trial (place 0) and a repeat say nothing of the later trials; two trials dropped after their
    # latency alone (MEASURE_SECONDS each) count as two trials against the prior's PRIOR_TRIALS.
    for attrs in ({"latency": 1.0}, {"latency": 1.0}, {"latency": 1.0, "same_as_trial": 1}, {"latency": 1.0}):
        study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, user_attrs=attrs))
    assert clock.later_price(study) == pytest.approx((2 * MEASURE_SECONDS + PRIOR_TRIALS * prior) / (2 + PRIOR_TRIALS))
    assert clock.expected(0, 3, study) == pytest.approx(
        [MEASURE_SECONDS + clock.share * 10.0, clock.later_price(study), clock.later_price(study)])


def test_the_first_eta_spans_the_space_s_cheaper_and_dearer_halves():
    cfg = load_config(None, TINY)
    clock = SearchClock(cfg, tiny_task(), time.time())
    clock.start_costs, clock.typical, clock.halves = [10.0], 100.0, (40.0, 300.0)
    start = MEASURE_SECONDS + clock.share * 10.0
    # The start's nets are known; the later trials are priced at each half's mean.
    assert clock.span(0, 3) == pytest.approx((start + 2 * (MEASURE_SECONDS + clock.share * 40.0),
                                              start + 2 * (MEASURE_SECONDS + clock.share * 300.0)))
    assert clock.span(0, 3)[0] < sum(clock.expected(0, 3)) < clock.span(0, 3)[1]
    # Later trials finished narrow it: each prior counts as PRIOR_TRIALS trials against what they cost.
    study = optuna.create_study(direction="maximize")
    for _ in range(4):
        study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, user_attrs={"latency": 1.0}))
    low, high = clock.span(4, 2, study)
    assert low == pytest.approx(2 * (3 * MEASURE_SECONDS + PRIOR_TRIALS * (MEASURE_SECONDS + clock.share * 40.0))
                                / (3 + PRIOR_TRIALS))
    assert high - low < clock.span(4, 2)[1] - clock.span(4, 2)[0]


def limited_clock(minutes: float, refine_top: int, tile_seconds: float) -> SearchClock:
    cfg = load_config(None, {**TINY, "search.max_minutes": minutes, "search.refine_top": refine_top,
                             "search.refine_tiles": 50_000})
    clock = SearchClock(cfg, tiny_task(), time.time())
    clock.cost = StepCost(tile_seconds, 0.0)  # every crop costs tile_seconds
    return clock


def test_a_time_limit_keeps_time_for_the_second_stage_and_fits_its_crops_to_what_is_left():
    nets = [Candidate(Arch((3,), (4,)), 16), Candidate(Arch((3, 3), (8, 8)), 16)]
    slow = limited_clock(30.0, 2, 0.01)  # 2 nets x 50,000 crops x 10 ms = 1,000 s: more than a third of 30 min
    assert slow.all_data_seconds(nets[0], 50_000) == pytest.approx(500, rel=0.01)
    slow.keep_for_second_stage(nets[0])
    assert slow.second_stage == pytest.approx(600) and slow.deadline == pytest.approx(slow.end - 600)
    # ~1,740 s left before the end, planned at 80%: 1,392 s / (2 x 10 ms a crop) = ~69,600 crops: all 50,000
    assert slow.second_stage_crops(nets) == 50_000
    slow.end = time.time() + 600  # the trials used their time: 80% of 600 s over 2 nets at 10 ms = 24,000 crops
    assert slow.second_stage_crops(nets) == pytest.approx(24_000, rel=0.01)
    slow.end = time.time() - 1
    assert slow.second_stage_crops(nets) == 0

    fast = limited_clock(30.0, 2, 1e-4)  # 2 x 5 s: the estimate, less than a third of the limit
    fast.keep_for_second_stage(nets[0])
    assert fast.second_stage == pytest.approx(2 * 5 / 0.8, rel=0.01)
    single = limited_clock(30.0, 1, 0.01)  # no second stage: nothing kept
    single.keep_for_second_stage(nets[0])
    assert single.second_stage == 0 and single.deadline == single.end
    unlimited = SearchClock(load_config(None, {**TINY, "search.refine_top": 3, "search.refine_tiles": 500}),
                            tiny_task(), time.time())
    unlimited.cost = StepCost(0.01, 0.0)
    unlimited.keep_for_second_stage(nets[0])  # no time limit: the trials end when they are done, all crops train
    assert unlimited.second_stage == 0 and unlimited.deadline is None
    assert unlimited.second_stage_crops(nets) == 500


def test_a_second_stage_the_time_limit_leaves_no_room_for_is_skipped_and_the_search_best_ships(caplog):
    clock = limited_clock(1.0, 2, 0.01)
    clock.end = time.time() + 5  # 4 s of training at 20 ms a crop pair: 200 crops, under a tenth of 50,000
    top = [optuna.trial.create_trial(value=v, user_attrs={"arch_dict": Arch((3,), (c,)).to_dict(), "tile": 16})
           for v, c in ((0.5, 4), (0.4, 8))]
    with caplog.at_level(logging.INFO, logger="autoseg"):
        best, second = second_stage(clock.cfg, None, None, None, top, clock=clock)  # nothing is trained
    assert best is top[0] and second is None
    assert re.search(r"second stage skipped: --max-minutes 1 leaves \d+ s, room for [\d,]+ crops a net of the "
                     r"50,000 planned; the search's best ships", caplog.text)


def test_a_latency_budget_no_net_meets_is_refused_after_timing_only_the_smallest(tmp_path):
    recorders: list[Recorder] = []
    with pytest.raises(InputError) as e:
        tiny_plan(tmp_path, wrap=lambda d: recorders.append(Recorder(d)) or recorders[-1],
                  **{"search.latency_budget_ms": 1e-6})
    assert re.fullmatch(r"search\.latency_budget_ms: no net of the space meets 1e-06 ms: its smallest, "
                        r"k3_c4_standard_transpose \(tile 16\), takes ([\d.e-]+) ms at 16x16 px on local; raise "
                        r"--latency-budget-ms above \1 or allow smaller nets \(search\.space\)", str(e.value))
    assert len(recorders[0].models) == 1  # that net only, and nothing trained
    recorders[0].close()


def test_a_latency_budget_drops_the_start_s_nets_over_it_from_the_eta(caplog):
    cfg = load_config(None, {})
    starts = [sample_candidate(FixedTrial(p), cfg.search.space, tile_choices(cfg)) for p in startup_plan(cfg)]

    def mmacs(c) -> float:
        return count_macs(c.arch, 3, 2, c.tile, c.tile) / 1e6

    asked = []
    latency = lambda c: asked.append(c) or (None if c == starts[0] else mmacs(c))  # noqa: E731  ms = MMACs
    with caplog.at_level(logging.INFO, logger="autoseg"):
        trained = under_budget(50.0, starts, {}, latency)
    assert asked == starts  # each measured once
    assert all(trained(c) == (c == starts[0] or mmacs(c) <= 50.0) for c in starts)  # a failed reading: trained
    over = sum(mmacs(c) > 50.0 for c in starts[1:])
    assert 0 < over < len(starts)
    assert f"latency budget 50 ms: {over} of the start's {len(starts)} nets are over it" in caplog.text
    assert under_budget(None, starts, {}, latency)(starts[-1])  # no budget: every net trains
    assert len(asked) == len(starts)


def test_the_plan_under_a_latency_budget_measures_the_start_s_nets_once(tmp_path, caplog):
    recorders: list[Recorder] = []
    with caplog.at_level(logging.INFO, logger="autoseg"):
        cfg, *_, clock = tiny_plan(tmp_path, wrap=lambda d: recorders.append(Recorder(d)) or recorders[-1],
                                   **{"search.latency_budget_ms": 1e6})
    starts, models = startup_plan(cfg), recorders[0].models
    # the smallest, then the start's nets (the smallest is one of them here), each once
    assert len(starts) <= len(models) == len(set(models)) <= 1 + len(starts)
    assert f"latency budget 1e+06 ms: 0 of the start's {len(starts)} nets are over it" in caplog.text
    assert len(clock.start_costs) == len(starts) and all(c > 0 for c in clock.start_costs)  # all of them train
    recorders[0].close()


def test_a_max_minutes_too_short_for_one_trial_is_refused_before_any_trial(tmp_path):
    with pytest.raises(InputError) as e:
        tiny_plan(tmp_path, time.time() - 59.5, **{"search.max_minutes": 1.0})
    assert re.fullmatch(r"search\.max_minutes: 1 min leaves 0\.0 min for trials after preparing the data, and one "
                        r"trial of the space's smallest net \(k3_c4_standard_transpose: 2 folds x 1 epochs on 6 "
                        r"tiles\) is estimated at [\d.]+ min; raise --max-minutes to at least 2", str(e.value))
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    assert study.trials == []


def test_the_step_cost_prices_depthwise_macs_apart_from_dense_ones():
    # base 10 ms a tile, 0.1 ms a dense MMAC, 3 ms a depthwise MMAC (30x, as CPU training measures)
    def truth(macs: float, dw: float) -> float:
        return 0.01 + 1e-10 * (macs - dw) + 3e-9 * dw

    nets = [(4e6, 2e6), (2e9, 0.0), (1.2e8, 3e7)]  # small separable, large standard, the depthwise-heaviest
    cost = fit_step_cost([(m, d, truth(m, d)) for m, d in nets], step_seconds=0.05)
    assert cost.per_tile(5e8, 1e7) == pytest.approx(truth(5e8, 1e7))
    assert cost.step(4, 4e6, 2e6) == pytest.approx(0.05 + 4 * truth(4e6, 2e6))  # a step's own cost, then its tiles'
    # A separable net of few MACs can cost as much as a standard one of many: MACs alone would miss it 4x here.
    assert cost.per_tile(1.2e8, 3e7) > cost.per_tile(8e8)
    line = fit_step_cost([(1e6, 0.0, 0.01), (1e9, 0.0, 1.0)])  # no depthwise net timed: a line through the two
    assert line.per_tile(5.005e8) == pytest.approx(0.505) and line.per_tile(1e6, 1e6) == pytest.approx(0.01)
    noisy = fit_step_cost([(1e6, 0.0, 0.02), (1e9, 0.0, 0.01)])
    assert noisy.per_tile(1e9) == pytest.approx(0.02)  # noise never makes big nets cheaper
    # No net is priced below the smallest one timed (a standard net of fewer MACs than that separable one).
    assert cost.per_tile(1e6) == pytest.approx(truth(4e6, 2e6))
    # A depthwise net timed absurdly fast (noise) gives a negative cost: the line through the smallest and the
    # largest net, which the third does not tilt.
    odd = fit_step_cost([(1e6, 5e5, 0.01), (1e9, 0.0, 1.0), (1e8, 5e7, 0.001)])
    assert odd.per_tile(1e9) == pytest.approx(1.0) and odd.per_tile(1e6, 5e5) == pytest.approx(0.01)


def test_the_plan_times_the_depthwise_heaviest_net_when_the_space_has_separable_convs(tmp_path, caplog):
    with caplog.at_level(logging.DEBUG, logger="autoseg"):
        *_, clock = tiny_plan(tmp_path, time.time(), **{"search.space.conv": ["standard", "separable"]})
    assert clock.cost is not None and clock.cost.per_depthwise_mac >= 0
    # the smallest net, the largest, and the separable one with the most depthwise MACs
    assert re.search(r"clock: timed k3_c4_\w+, k3-3_c8-8_standard_\w+, k3-3_c8-8_separable_\w+; a training step "
                     r"takes [\d.e-]+ s \+ per tile [\d.e-]+ s \+ [\d.e-]+ s a dense GMAC \+ [\d.e-]+ s a "
                     r"depthwise GMAC", caplog.text)


def test_a_study_from_before_the_clock_resumes_with_the_new_defaults(tmp_path):
    _, run, _ = run_search(tmp_path, trials=1)
    study = optuna.load_study(study_name=STUDY_NAME, storage=run.storage_url)
    old = {k: v for k, v in study.user_attrs["config"].items() if k != "search.startup"}
    study.set_user_attr("config", {**old, "search.pruner": "median"})
    open_study(run, load_config(None, {**TINY, "out": str(run.root)}))  # neither key changes what a trial meant


def test_the_cli_refuses_a_hopeless_time_limit_or_budget_in_one_line(tmp_path):
    images, masks = generate_demo(tmp_path / "demo", n_images=6, size=64, seed=1)
    config = tmp_path / "small.yml"  # however busy the test machine: few runs a measurement, and no warning
    config.write_text("search:\n  space:\n    levels: [1, 2]\n    kernels: [3]\n    channels: [4, 8]\n"
                      "device:\n  warmup: 0\n  min_runs: 3\n  min_seconds: 0.0\n  max_busy_cores: null\n")
    base = [sys.executable, "-m", "autoseg", "search", "--config", config, "--images", images, "--masks", masks,
            "--tile", "32", "--num-reps", "16", "--folds", "2", "--epochs", "1", "-q"]
    for flags, expected in (
        (["--max-minutes", "0.01", "--out", tmp_path / "a"], r"search\.max_minutes: 0\.01 min leaves 0\.0 min for "
         r"trials after preparing the data, and one trial of the space's smallest net \(\S+: 2 folds x 1 epochs on "
         r"\d+ tiles\) is estimated at [\d.]+ min; raise --max-minutes to at least \d+"),
        (["--latency-budget-ms", "0.000001", "--out", tmp_path / "b"], r"search\.latency_budget_ms: no net of the "
         r"space meets 1e-06 ms: its smallest, k3_c4_separable_transpose \(tile 32\), takes [\d.e-]+ ms at 32x32 "
         r"px on local; .*"),
    ):
        proc = subprocess.run([*map(str, base), *map(str, flags)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert re.fullmatch(f"autoseg: error: {expected}\n", proc.stderr), proc.stderr
