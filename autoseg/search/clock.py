"""The search's clock: a short calibration of training steps, what a trial is expected to cost, the deadline that
search.max_minutes sets, the ETA, and the plan said before the first trial (plan_search)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from autoseg.config import Config
from autoseg.devices import Device, MeasureError, MeasureSettings
from autoseg.errors import InputError
from autoseg.search.measure import measure_candidate, timed_size
from autoseg.search.sampling import pruner_kind
from autoseg.search.space import (
    Candidate,
    sample_candidate,
    space_corners,
    space_pool,
    startup_plan,
    tile_choices,
    tile_macs,
    trial_candidate,
)
from autoseg.search.task import SearchTask
from autoseg.search.trials import distinct_trials, finished_trials, is_repeat, original_trial, trial_place
from autoseg.train import auto_batch_size, cv_epochs, train_model, training_settings
from autoseg.unet import Arch, build_unet, count_macs, depthwise_macs

log = logging.getLogger("autoseg.search")  # one logger for the package: log lines keep the name they had

CALIBRATION_STEPS = 3  # timed training steps of each calibrated net, after an untimed one
MEASURE_SECONDS = 3.0  # export and latency measurement of a candidate, roughly
EVAL_SHARE = 1 / 3  # a validation pass costs about a third of a training pass over as many tiles
# What search.max_minutes leaves after the trials for exporting, testing and reporting the net (its final
# training has a budget of its own): this share of it, within these bounds.
FINISH_SHARE, FINISH_MIN_S, FINISH_MAX_S = 0.05, 5.0, 60.0
# With search.max_minutes and a second stage: at most this share of the limit is kept for the second stage (its
# estimate for the space's median net otherwise); fewer crops a net than MIN_SECOND_STAGE_SHARE of
# search.refine_tiles would rank the nets on too little training, and the search's best ships without one.
SECOND_STAGE_SHARE = 1 / 3
MIN_SECOND_STAGE_SHARE = 0.1
# The second stage's crops are planned for this share of the time left: validation passes and data loading come
# on top of the training steps the calibration times.
SECOND_STAGE_SAFETY = 0.8
# Share of its whole CV that a trial trains, on average, under each pruner: the ETA's prior, which the search
# corrects with the trials it finishes (bench_search --part clock prints the shares it saw).
PRUNED_SHARE = {"none": 1.0, "median": 0.7, "halving": 0.55, "hyperband": 0.75}
# The price of a trial after the start: the prior counts as this many trials against the later trials finished.
PRIOR_TRIALS = 2


@dataclass(frozen=True)
class StepCost:
    """Seconds a training step takes: a fixed cost per step, plus per tile a base cost, a cost per dense MAC and
    one per depthwise MAC, never below the smallest timed net's. A depthwise conv trains some 30x slower per MAC
    than a dense one on a CPU, so a separable net's time does not follow its MACs (the fit and 36 nets timed:
    benchmarks/results/full/clock_cost.md)."""

    base: float
    per_mac: float
    per_depthwise_mac: float = 0.0
    step_seconds: float = 0.0
    floor: float = 1e-9  # seconds a tile: no net trains faster than the smallest one timed

    def per_tile(self, macs: float, depthwise: float = 0.0) -> float:
        """Seconds a tile of a net whose forward pass does `macs` on it, `depthwise` of them in depthwise convs."""
        return max(self.base + self.per_mac * (macs - depthwise) + self.per_depthwise_mac * depthwise, self.floor)

    def step(self, batch: int, macs: float, depthwise: float = 0.0) -> float:
        return self.step_seconds + batch * self.per_tile(macs, depthwise)


def fit_step_cost(points: list[tuple[float, float, float]], step_seconds: float = 0.0) -> StepCost:
    """The step cost through calibrated nets, each (MACs, depthwise MACs, seconds a tile), the smallest first and
    the largest second: base, dense and depthwise costs when a depthwise-heavy net was timed beside them;
    otherwise (or when noise gives a negative cost) all MACs alike, along the line through the first two, never
    falling as they grow. No net is priced below the smallest's tile."""
    m, d, y = (np.array(col, dtype=float) for col in zip(*points, strict=True))
    floor = max(float(y[0]), 1e-9)
    if len(points) >= 3 and d.max() > 0:
        scale = max(float(m.max()), 1.0)  # MACs in units of the largest net's, for a well-conditioned solve
        x = np.column_stack([np.ones_like(m), (m - d) / scale, d / scale])
        w = np.linalg.lstsq(x / y[:, None], np.ones_like(y), rcond=None)[0]  # relative errors
        if (w[1:] >= 0).all():
            return StepCost(float(w[0]), float(w[1]) / scale, float(w[2]) / scale, step_seconds, floor)
    (m0, m1), (y0, y1) = m[:2], y[:2]
    slope = max(0.0, (y1 - y0) / (m1 - m0)) if m1 > m0 else 0.0  # a third, off-line net would tilt a fit
    return StepCost(float(y0 - slope * m0), slope, slope, step_seconds, floor)


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


def net_work(arch: Arch, in_channels: int, num_classes: int, size: int) -> tuple[float, float]:
    """MACs of a forward pass on a size x size input, and those of its depthwise convs: what StepCost prices."""
    return (float(count_macs(arch, in_channels, num_classes, size, size)),
            float(depthwise_macs(arch, in_channels, size, size)))


def tile_work(cand: Candidate, task: SearchTask) -> tuple[float, float]:
    """net_work on one of the candidate's tiles."""
    return net_work(cand.arch, task.in_channels, task.num_classes, cand.tile)


def calibrate(cfg: Config, task: SearchTask, nets: list[Candidate]) -> StepCost:
    """Time a few training steps of the first (small) net at two batch sizes (the cost of a step apart from
    its tiles) and of the others at the batch their folds use, and fit the step cost through them."""
    small = nets[0]
    b0 = fold_batch(cfg, task, small)
    b1 = max(4 * b0, 16)
    t0, t1 = _step_seconds(cfg, task, small, b0), _step_seconds(cfg, task, small, b1)
    per_tile = (t1 - t0) / (b1 - b0)
    fixed = t0 - b0 * per_tile
    if per_tile <= 0 or fixed < 0:  # too noisy to split: all of it per tile
        per_tile, fixed = t1 / b1, 0.0
    points = [(*tile_work(small, task), per_tile)]
    for net in nets[1:]:
        b = fold_batch(cfg, task, net)
        points.append((*tile_work(net, task), max((_step_seconds(cfg, task, net, b) - fixed) / b, 1e-9)))
    return fit_step_cost(points, fixed)


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
        # time.time() by which the search (trials and second stage) ends, and by which its trials end
        self.end = None if m is None else started + 60.0 * m - self.finish
        self.deadline = self.end
        self.second_stage = 0.0  # seconds kept for the second stage after the trials
        self.cost: StepCost | None = None  # None: not calibrated (nothing was left to run)
        self.start_costs: list[float] = []  # whole-CV seconds of the planned start's nets, by place
        self.typical = 0.0  # whole-CV seconds of the space's median net
        # mean whole-CV seconds of the space's cheaper and dearer halves (by cost): the first ETA's range, since
        # before any result nothing says which way the sampler will go
        self.halves = (0.0, 0.0)
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
        work = tile_work(cand, self.task)
        bs = fold_batch(self.cfg, self.task, cand)
        train = epochs * math.ceil(fit / bs) * self.cost.step(bs, *work)
        return self.cfg.train.folds * (train + EVAL_SHARE * val * self.cost.per_tile(*work))

    def all_data_seconds(self, cand: Candidate, tiles: int) -> float:
        """Training steps of `tiles` crops of all training images (the final training's, or the second stage's)."""
        assert self.cost is not None
        from autoseg.final_train import final_batch_size, final_crop

        t = self.cfg.train
        crop = final_crop(t, cand.tile, cand.arch.multiple)
        bs = final_batch_size(t, cand.arch, self.task.in_channels, self.task.num_classes, crop)
        work = net_work(cand.arch, self.task.in_channels, self.task.num_classes, crop)
        return math.ceil(tiles / bs) * self.cost.step(bs, *work)

    def keep_for_second_stage(self, typical: Candidate) -> None:
        """With a time limit and a second stage: end the trials early enough for the second stage to train its
        nets (as long as `typical` would take, at most SECOND_STAGE_SHARE of the limit)."""
        k, m = self.cfg.search.refine_top, self.cfg.search.max_minutes
        if self.end is None or m is None or k <= 1 or self.cost is None:
            return
        want = k * self.all_data_seconds(typical, self.cfg.search.refine_tiles) / SECOND_STAGE_SAFETY
        self.second_stage = min(want, SECOND_STAGE_SHARE * 60.0 * m)
        self.deadline = self.end - self.second_stage

    def second_stage_crops(self, nets: list[Candidate]) -> int:
        """Crops each net of the second stage trains on: search.refine_tiles, or as many as the time left before
        the search's end fits for all of `nets` (0: none)."""
        tiles = self.cfg.search.refine_tiles
        if self.end is None or self.cost is None:
            return tiles
        per_crop = sum(self.all_data_seconds(c, tiles) for c in nets) / tiles
        fit = SECOND_STAGE_SAFETY * max(0.0, self.end - time.time()) / per_crop
        return int(min(tiles, fit))

    def spent(self, t: FrozenTrial) -> float:
        """What the model says a finished trial cost."""
        a = t.user_attrs
        if is_repeat(t) or "latency" not in a:
            return 0.0
        trained = a.get("epochs_trained", 0)
        if not trained or "arch_dict" not in a:
            return MEASURE_SECONDS
        cand = trial_candidate(a)
        _, _, epochs = self.fold_shape(cand.tile)
        return MEASURE_SECONDS + self.cv_seconds(cand) * min(1.0, trained / (epochs * self.cfg.train.folds))

    def later_price(self, study: optuna.Study | None = None, whole_cv: float | None = None) -> float:
        """Expected seconds of a trial after the start: the space's median net (or a net whose whole CV takes
        `whole_cv` seconds) at the pruner's mean share, moved towards what the later trials of `study` finished
        so far cost (the nets the sampler favours, and how much of them the pruner let train)."""
        prior = MEASURE_SECONDS + self.share * (self.typical if whole_cv is None else whole_cv)
        if study is None:
            return prior
        start = len(self.start_costs)
        seen = [self.spent(t) for t in finished_trials(study) if not is_repeat(t) and "latency" in t.user_attrs
                and trial_place(study, original_trial(study, t)) >= start]
        return (sum(seen) + PRIOR_TRIALS * prior) / (len(seen) + PRIOR_TRIALS)

    def expected(self, place: int, count: int, study: optuna.Study | None = None,
                 whole_cv: float | None = None) -> list[float]:
        """Expected seconds of the next `count` trials, the first at `place` (the later ones as `study` says,
        from the prior later_price takes `whole_cv` for)."""
        later = self.later_price(study, whole_cv)
        return [MEASURE_SECONDS + self.share * self.start_costs[p] if p < len(self.start_costs) else later
                for p in range(place, place + count)]

    def span(self, place: int, count: int, study: optuna.Study | None = None) -> tuple[float, float]:
        """The range of the ETA of the next `count` trials: their expected seconds with the later trials priced
        at the mean cost of the nets of the space's cheaper half, and at that of its dearer half."""
        low, high = (sum(self.expected(place, count, study, cv)) for cv in self.halves)
        return low, high

    def remaining(self, study: optuna.Study, n_trials: int, since: float) -> tuple[float, int, int]:
        """Seconds the trials still to run should take (the model corrected by how it did on the trials
        finished since `since`), how many are left, and how many of them fit before the deadline."""
        left = max(0, n_trials - len(distinct_trials(study)))
        place = len(study.trials) - len(study.user_attrs.get("requeued", []))
        mine = [t for t in finished_trials(study) if t.datetime_start and t.datetime_start.timestamp() >= since]
        modelled = sum(self.spent(t) for t in mine)
        k = min(4.0, max(0.25, (time.time() - since) / modelled)) if modelled > 0 else 1.0
        costs = [k * c for c in self.expected(place, left, study)]
        fit = left
        if self.deadline is not None:
            budget = self.deadline - time.time()
            fit = int(np.searchsorted(np.cumsum(costs), budget, side="right")) if costs else 0
        return float(sum(costs)), left, fit

    def eta_text(self, remaining: tuple[float, int, int]) -> str:
        """The progress bar's ETA, from what `remaining` returned."""
        eta, left, fit = remaining
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
    line, exit 2) and measure the start's nets against it (the ETA prices the nets it drops as measured only),
    time a few training steps of its smallest and largest nets (and of its separable net with
    the most depthwise MACs), refuse a --max-minutes too short for one trial, say what the time goes on (the
    search's limit, the final training's budget), give the latency range with the flag that halves the space
    when there is no budget, and the ETA."""
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
    measured: dict[Candidate, float | None] = {}  # latencies (ms) taken before the first trial
    if budget is not None:
        lat = measured[smallest] = latency(smallest)
        if lat is not None and lat > budget:
            raise InputError(
                f"search.latency_budget_ms: no net of the space meets {budget:g} ms: its smallest, "
                f"{smallest.arch.key()} (tile {smallest.tile}), takes {lat:.3g} ms {where}; raise "
                f"--latency-budget-ms above {lat:.3g} or allow smaller nets (search.space)"
            )

    small, large = space_corners(cfg, lambda c: tile_macs(c, task.in_channels, task.num_classes))
    _, heavy = space_corners(cfg, lambda c: int(tile_work(c, task)[1]))
    with_depthwise = tile_work(heavy, task)[1] > 0 and heavy not in (small, large)
    timed = [small, large, *([heavy] if with_depthwise else [])]
    clock.cost = calibrate(cfg, task, timed)
    pool = space_pool(cfg)
    starts = [sample_candidate(optuna.trial.FixedTrial(p), scfg.space, tile_choices(cfg)) for p in startup_plan(cfg)]
    trained = under_budget(budget, starts, measured, latency)
    clock.start_costs = [clock.cv_seconds(c) if trained(c) else 0.0 for c in starts]  # dropped: measured only
    # Priced over the whole space under a latency budget too: there TPE went to the dearest nets the budget let
    # train, and busy readings let dearer ones in (results/full/clock_budget.md).
    net_costs = sorted(((clock.cv_seconds(c), c) for c, _ in pool), key=lambda sc: sc[0])
    if not net_costs:
        net_costs = [(clock.cv_seconds(small), small)]
    # The median, not the mean: after the start TPE keeps near the best nets so far, which under the latency
    # penalty are seldom the space's dear tail (bench_clock_seeds' ETA table).
    secs = [sec for sec, _ in net_costs]
    clock.typical = float(np.median(secs))
    half = len(secs) // 2  # secs ascend
    clock.halves = (float(np.mean(secs[:max(half, 1)])), float(np.mean(secs[half:])))
    clock.keep_for_second_stage(net_costs[len(net_costs) // 2][1])  # the median net by cost
    fit, _, epochs = clock.fold_shape(small.tile)
    one = MEASURE_SECONDS + clock.cv_seconds(small)
    log.info("time: %s; then %s", _search_limit_text(cfg, clock),
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
        by_macs = sorted((c for c, _ in pool), key=lambda c: (timed_macs(c), c.arch.key()))
        middle = by_macs[len(by_macs) // 2] if by_macs else smallest
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
    costs = clock.expected(place, left, study)  # a resumed search's later trials say what they cost
    low, high = clock.span(place, left, study)
    c = clock.cost
    log.debug("clock: timed %s; a training step takes %.3g s + per tile %.3g s + %.3g s a dense GMAC + %.3g s "
              "a depthwise GMAC; the start's whole CVs %s s; later trials priced at %.0f s (measuring, and %.0f%% "
              "of the space's median whole CV, %.0f s; its mean is %.0f s, its halves' means %.0f and %.0f s); "
              "%.0f s for the %d trial(s)",
              ", ".join(n.arch.key() for n in timed), c.step_seconds, c.base, 1e9 * c.per_mac,
              1e9 * c.per_depthwise_mac, " ".join(f"{x:.0f}" for x in clock.start_costs), clock.later_price(study),
              100 * clock.share, clock.typical, np.mean(secs), *clock.halves, sum(costs), left)
    log.info("ETA: a trial's whole CV (%d folds x %d epochs on %.0f tiles) takes about %s (%s) to %s (%s); "
             "about %s for the %d trial(s) to run (%s if the search keeps to the cheaper half of the space, %s if "
             "to the dearer half)%s", t.folds, epochs, fit, minutes(clock.cv_seconds(small)), small.arch.key(),
             minutes(clock.cv_seconds(large)), large.arch.key(), minutes(sum(costs)), left, minutes(low),
             minutes(high), f", with {pruner_kind(cfg)} pruning" if pruner_kind(cfg) != "none" else "")
    if clock.deadline is not None:
        fits = int(np.searchsorted(np.cumsum(costs), clock.deadline - time.time(), side="right"))
        if fits < left:
            clock.warned = True
            log.info("--max-minutes %g will cut the search: about %d of the %d trials fit in the %s left; then the "
                     "best so far is trained", scfg.max_minutes, fits, left,
                     minutes(max(0.0, clock.deadline - time.time())))
    return clock


def under_budget(
    budget: float | None,
    starts: list[Candidate],
    measured: dict[Candidate, float | None],
    latency: Callable[[Candidate], float | None],
) -> Callable[[Candidate], bool]:
    """Whether the latency budget lets a net of the start train: each measured (its trial then reads the latency
    from the cache), and the log says how many are over it."""
    if budget is None:
        return lambda c: True
    for c in starts:
        if c not in measured:
            measured[c] = latency(c)

    def trained(c: Candidate) -> bool:
        ms = measured.get(c)
        return ms is None or ms <= budget

    if starts:
        log.info("latency budget %g ms: %d of the start's %d nets are over it; they are measured, not trained, and "
                 "the ETA counts them so", budget, sum(not trained(c) for c in starts), len(starts))
    return trained


def _search_limit_text(cfg: Config, clock: SearchClock) -> str:
    if clock.end is None or clock.deadline is None:
        return "no limit on the search (--max-minutes sets one)"

    def hms(t: float) -> str:
        return time.strftime("%H:%M:%S", time.localtime(t))

    if not clock.second_stage:
        return (f"the search stops by {hms(clock.deadline)} (--max-minutes {cfg.search.max_minutes:g} from its start, "
                f"a running trial included, less {clock.finish:.0f} s to export and test the net)")
    return (f"the search stops by {hms(clock.end)} (--max-minutes {cfg.search.max_minutes:g} from its start, less "
            f"{clock.finish:.0f} s to export and test the net), its trials by {hms(clock.deadline)} (a running one "
            "included)")


def _final_budget_text(cfg: Config, task: SearchTask, clock: SearchClock, small: Candidate, large: Candidate) -> str:
    t = cfg.train
    assert clock.cost is not None
    on_all_data = clock.all_data_seconds
    k = cfg.search.refine_top
    head = "the final training: "
    if k > 1 and clock.second_stage:
        head = (f"the second stage: {k} nets x up to {cfg.search.refine_tiles:,} crops, as many as fit in the "
                f"{minutes(clock.second_stage)} before the search stops; then {head}")
    elif k > 1:
        head = (f"the second stage: {k} nets x {cfg.search.refine_tiles:,} crops, about "
                f"{minutes(k * on_all_data(small, cfg.search.refine_tiles))} to "
                f"{minutes(k * on_all_data(large, cfg.search.refine_tiles))}; then {head}")
    if t.final_minutes is not None:
        return f"{head}at most {t.final_minutes:g} min (--final-minutes)"
    secs = []
    for c in (small, large):
        if t.final_data == "all":
            secs.append(on_all_data(c, t.final_tiles))
        else:
            n, bs = len(task.data[c.tile].x), fold_batch(cfg, task, c)
            secs.append(t.final_epochs * math.ceil(n / bs) * clock.cost.step(bs, *tile_work(c, task)))
    what = f"{t.final_tiles:,} crops" if t.final_data == "all" else f"{t.final_epochs} epochs on the representatives"
    teacher = " plus the teacher's" if t.teacher == "reference" else ""
    return (f"{head}{what}, about {minutes(secs[0])} for the smallest net to {minutes(secs[1])} for the largest"
            f"{teacher}, no time cap (--final-minutes sets one)")
