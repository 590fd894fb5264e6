"""The search on real data: does it find a small net that segments as well as a standard U-Net,
and how much does latency-first pruning save?

    python -m benchmarks.bench_search [--part real|efficiency|clock|all] [--trials N] [--epochs N] [--quick]

Data: ../shared/datasets/semantic_drone_224 (400 aerial RGB images 224x224, 24 classes), read in
place; 20% of the images are held out by autoseg's own split and never seen by the search.

real        Reference: a 4-level U-Net with 32 base channels, Arch((3,3,3,3), (32,64,128,256)). Its
            latency is measured first; autoseg.pipeline.run_search then runs with a latency budget of
            10% of it (tile 64, local device, search.alpha 0, config defaults otherwise), as a user
            with that deadline would run it. Latency is timed at the held-out images' size (224), the
            size they are evaluated at whole (--measure-size test|tile|N). Reported: Pareto front, the
            chosen net's test mIoU (from the model card). The reference is retrained exactly like the
            chosen net (same final epochs on the same representative tiles, same seed, same export and
            evaluation on the same held-out images). One retrain's test mIoU varies with its training
            seed by about as much as the gap to the target, so both nets are retrained with --seeds
            training seeds (split, representatives and chosen net unchanged) and compared by their
            means. Both latencies are measured again, interleaved, on one LocalDevice. Target: chosen
            net >= 95% of the reference's mean test mIoU at <= 10% of its latency.
efficiency  The same search under a latency budget (the median latency of random candidates from the
            space), run twice on the same representative tiles: latency-first (autoseg's Objective:
            over-budget nets are dropped before any training) and train-first (a subclass that
            cross-validates every net and drops over-budget ones afterwards). Wall time of the trial
            loop and best within-budget score of each. Target (set here): speed-up >= 1.5x with a best
            within-budget CV mIoU >= 95% of the train-first one.

clock       Does the search respect the user's clock (issue #21)? autoseg's defaults against the search's
            defaults before it (TPE's random start, the median pruner), same seed, no latency budget: the
            wall time to reach 95% of the best CV score, the best CV score and the chosen-so-far net's test
            mIoU after 15, 30 and 60 minutes, the chosen net at the end (test mIoU over --seeds training
            seeds); the pruning fidelity (the readings the pruners judge on vs the whole CV, 8 nets); and a
            whole search with --max-minutes 15 --final-minutes 15. Targets: 95% reached >= 3x sooner; the
            chosen net's mean test mIoU within one standard deviation of the old one's (or better); the
            whole search within 15 + 15 minutes. Results: benchmarks/results/clock.md.

--quick is the budget `make bench` uses (<= 10 minutes on a 2-core machine; --part clock <= 5): fewer
trials, representative tiles and epochs; the output says which. Results: benchmarks/results/search.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

import autoseg
from autoseg.config import Config, TrainConfig, load_config
from autoseg.data_stage import DataStage, class_weights, prepare_data, select_reps
from autoseg.devices import LocalDevice, MeasureError, open_device, settings_from_config
from autoseg.errors import AutosegError
from autoseg.pipeline import finalize, run_search
from autoseg.reps import rep_arrays
from autoseg.rundir import RunDir
from autoseg.search import (
    PRUNED_SHARE,
    PRUNERS,
    Candidate,
    Objective,
    SearchTask,
    TileData,
    choose_best,
    distinct_trials,
    find_twin,
    measure_candidate,
    open_study,
    pareto_summary,
    plan_search,
    run_trials,
    sample_candidate,
    tile_choices,
    trial_counts,
)
from autoseg.train import FOLD_TILE_PASSES, cross_validate, cv_epochs, training_settings
from autoseg.unet import Arch, build_unet, count_macs, count_params, validate_arch
from benchmarks import DATA_ROOT, write_results

DATASET = DATA_ROOT / "semantic_drone_224"
RESULTS = Path(__file__).resolve().parent / "results" / "search.md"
RESULTS_CLOCK = Path(__file__).resolve().parent / "results" / "clock.md"
RESULTS_DEADLINE = Path(__file__).resolve().parent / "results" / "clock_deadline.md"
REF_ARCH = Arch((3, 3, 3, 3), (32, 64, 128, 256))
TILE = 64
TARGET_MIOU_RATIO = 0.95
TARGET_LATENCY_RATIO = 0.10
TARGET_SPEEDUP = 1.5
TARGET_SCORE_RATIO = 0.95
QUICK_LIMIT_S = 600.0
BUSY_CORES = 0.5  # other processes' CPU use above which the latency re-measurement is flagged


@dataclasses.dataclass(frozen=True)
class Budget:
    trials: int  # real search
    eff_trials: int  # each efficiency variant
    folds: int
    epochs: int | None  # None: autoseg's default (about FOLD_TILE_PASSES tiles per fold)
    final_epochs: int
    reps: int
    budget_samples: int  # random candidates whose median latency becomes the budget
    latency_rounds: int  # interleaved re-measurements of chosen vs reference
    seeds: int  # training seeds of the final retrains of the chosen net and the reference


# Over-budget trials cost an export and a timing, no training, so the real search can afford many.
# 15 final epochs left every net far from converged: the reference's test mIoU was 0.118, 0.152, 0.183
# after 15, 60, 120; comparing half-trained nets ranks how fast they learn, not how well they segment.
# The same holds for the folds, so the full run uses the product's default epochs per fold.
# One retrain's test mIoU moved by up to 0.018 (the chosen net) and 0.010 (the reference) with its training
# seed alone on the drone data, 5-10 % of their mIoU: one seed cannot tell 88 % from 95 %, hence several.
FULL = Budget(trials=40, eff_trials=16, folds=3, epochs=None, final_epochs=120, reps=120, budget_samples=24,
              latency_rounds=5, seeds=3)
QUICK = Budget(trials=16, eff_trials=6, folds=3, epochs=2, final_epochs=8, reps=40, budget_samples=12,
               latency_rounds=3, seeds=3)


# ---------------------------------------------------------------- setup


def make_config(data: Path, out: Path, b: Budget, seed: int, threads: int | None, **extra: Any) -> Config:
    overrides = {
        "out": str(out),
        "seed": seed,
        "data.images": str(data / "images"),
        "data.masks": str(data / "masks"),
        "tiles.size": TILE,
        "reps.num_reps": b.reps,
        "search.trials": b.trials,
        "train.folds": b.folds,
        "train.epochs": b.epochs,
        "train.final_epochs": b.final_epochs,
        # This benchmark's method: both nets retrained on the representatives (train.final_data: reps), as the
        # search scores them. The shipped net's final training on all images is bench_quality's subject.
        "train.final_data": "reps",
        "train.threads": threads,
        "device.target": "local",
        **extra,
    }
    return load_config(None, overrides)


def prepare_task(cfg: Config, run: RunDir) -> tuple[DataStage, SearchTask]:
    """The data stage of run_search (same split, same representatives: they come from the same cache)."""
    stage = prepare_data(cfg)
    reps = {t: select_reps(cfg, stage, t, run) for t in tile_choices(cfg)}
    task = SearchTask(
        data={t: TileData(*rep_arrays(stage.ds, r)) for t, r in reps.items()},
        in_channels=stage.ds.channels,
        num_classes=stage.ds.class_map.num_classes,
        class_weights=class_weights(cfg, stage.ds),
    )
    return stage, task


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "optuna": optuna.__version__,
        "autoseg": autoseg.__version__,
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
    }


def fmt(v: Any, spec: str = ".3f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


# ---------------------------------------------------------------- part 1: real search vs reference


def paired_latency(archs: list[Arch], task: SearchTask, cfg: Config, rounds: int) -> tuple[list[float], float]:
    """Median over `rounds` of each net's median latency, measured in turn (A, B, A, B, ...) so a
    change in machine load hits both alike. Same export and bench code as the search.

    Also returns the most cores other processes kept busy during any measurement: load hits a big
    net's latency harder than a small one's, so a busy machine skews the ratio, not just both numbers.
    """
    device = LocalDevice()  # uncached: fresh numbers
    settings = settings_from_config(cfg.device, cfg.seed)
    per: list[list[float]] = [[] for _ in archs]
    busy = 0.0
    for _ in range(rounds):
        for i, arch in enumerate(archs):
            _, m, _, _ = measure_candidate(Candidate(arch, TILE), task, device, settings, cfg.device.measure_size)
            if m.error != MeasureError.OK or m.median_ms is None:
                raise RuntimeError(f"latency of {arch.key()} failed: {m.message}")
            per[i].append(float(m.median_ms))
            busy = max(busy, m.cpu_others or 0.0)
    device.close()
    return [statistics.median(v) for v in per], busy


def measured_side(choice: str, stage: DataStage) -> int:
    """The input side latency is timed at: `test` = the largest held-out image's longer side (the test
    images are evaluated whole, so that is the size the net runs at), `tile` = the tile, or a number."""
    if choice == "tile":
        return TILE
    if choice == "test":
        return max(max(stage.test_ds.sizes[i]) for i in stage.test_ids)
    return int(choice)


def seed_retrains(cfg: Config, root: Path, stage: DataStage, task: SearchTask, trial: Any, first: dict[str, Any],
                  seeds: list[int]) -> list[float]:
    """Test mIoU of `trial`'s net retrained by finalize with each training seed (`first` is the card of
    seeds[0]). The held-out split and the representatives stay the run's: they come from cfg.seed's stage."""
    scores = [first["test_miou"]]
    for s in seeds[1:]:
        card = finalize(dataclasses.replace(cfg, seed=s), RunDir(root / f"seed{s}").prepare(), stage, task, trial)
        scores.append(card["test_miou"])
        print(f"  {card['arch']} retrained with training seed {s}: test mIoU {fmt(card['test_miou'], '.4f')}",
              flush=True)
    return scores


def part_real(data: Path, root: Path, b: Budget, seed: int, threads: int | None, measure: str) -> dict[str, Any]:
    # The target is a deadline (10% of the reference's latency), so the search gets it as its budget.
    cfg = make_config(data, root / "real", b, seed, threads)
    # The same data stage run_search builds (same split and representatives, from the run's cache): the
    # reference is timed on it now and retrained on it after the search.
    stage, task = prepare_task(cfg, RunDir(cfg.out).prepare())
    # Timed at the size the net will run at, as the README tells users to (--measure-size).
    side = measured_side(measure, stage)
    cfg = make_config(data, root / "real", b, seed, threads, **{"device.measure_size": side})
    (ref_lat,), _ = paired_latency([REF_ARCH], task, cfg, b.latency_rounds)
    budget = TARGET_LATENCY_RATIO * ref_lat
    print(f"reference {REF_ARCH.key()}: {ref_lat:.3f} ms at {side}x{side}; search latency budget "
          f"{budget:.3f} ms", flush=True)
    # alpha 0: with the deadline a hard budget, a latency penalty on top would trade score for speed twice.
    cfg = make_config(data, root / "real", b, seed, threads, **{
        "device.measure_size": side, "search.latency_budget_ms": budget, "search.alpha": 0.0})
    t0 = time.perf_counter()
    card = run_search(cfg)
    t_search = time.perf_counter() - t0
    run = RunDir(cfg.out)
    study = optuna.load_study(study_name="autoseg", storage=run.storage_url)
    front = pareto_summary(study)
    print(f"\nsearch + retrain + export + evaluate: {t_search:.0f} s", flush=True)
    print("Pareto front (CV mIoU vs latency):")
    for r in front:
        print(f"  trial {r['trial']:3d}  {r['arch']:<40} cv {r['cv_mean']:.3f}  {r['latency_ms']:.3f} ms")
    print(f"chosen: trial {card['trial']} {card['arch']}: test mIoU {fmt(card['test_miou'], '.4f')} "
          f"on {card['test_images']} held-out images, {card['latency_ms']:.3f} ms in the search", flush=True)

    # The reference goes through the very same retrain/export/evaluate code, in its own run directory.
    ref_run = RunDir(root / "reference").prepare()
    fake_trial = SimpleNamespace(number=-1, user_attrs={"arch_dict": REF_ARCH.to_dict(), "tile": TILE})
    t0 = time.perf_counter()
    ref_card = finalize(cfg, ref_run, stage, task, fake_trial)
    t_ref = time.perf_counter() - t0
    print(f"reference {REF_ARCH.key()}: test mIoU {fmt(ref_card['test_miou'], '.4f')} "
          f"(retrain + export + evaluate {t_ref:.0f} s)", flush=True)
    seeds = list(range(seed, seed + b.seeds))
    chosen_scores = seed_retrains(cfg, root / "real_seeds", stage, task, study.trials[card["trial"]], card, seeds)
    ref_scores = seed_retrains(cfg, root / "reference_seeds", stage, task, fake_trial, ref_card, seeds)

    chosen = Arch.from_dict(card["arch_dict"])
    (lat_best, lat_ref), busy = paired_latency([chosen, REF_ARCH], task, cfg, b.latency_rounds)
    if busy > BUSY_CORES:
        print(f"WARNING: other processes kept {busy:.1f} cores busy while the latencies were re-measured; "
              "the latency ratio is not trustworthy, rerun on a quiet machine", flush=True)
    ref_params = count_params(build_unet(REF_ARCH, task.in_channels, task.num_classes))
    ref_macs = count_macs(REF_ARCH, task.in_channels, task.num_classes, side, side)
    miou_ratio = statistics.fmean(chosen_scores) / statistics.fmean(ref_scores)
    lat_ratio = lat_best / lat_ref
    print(f"latency at {side}x{side} (median of {b.latency_rounds} interleaved measurements): chosen "
          f"{lat_best:.3f} ms, reference {lat_ref:.3f} ms", flush=True)
    print(f"ratios: mean test mIoU over {len(seeds)} training seed(s) {miou_ratio:.3f} "
          f"(target >= {TARGET_MIOU_RATIO}), latency {lat_ratio:.3f} "
          f"(target <= {TARGET_LATENCY_RATIO})", flush=True)
    # Diagnostic, not a target: is a better fast net on the front than the one the penalty objective chose?
    fast = [r for r in front if r["latency_ms"] <= TARGET_LATENCY_RATIO * lat_ref]
    alt = max(fast, key=lambda r: r["cv_mean"], default=None)
    if alt is None:
        fast_note = f"No front member is within {TARGET_LATENCY_RATIO:.0%} of the reference's latency."
    elif alt["trial"] == card["trial"]:
        fast_note = f"It is also the front's best-CV net within {TARGET_LATENCY_RATIO:.0%} of the reference's latency."
    else:
        alt_card = finalize(cfg, RunDir(root / "front_alt").prepare(), stage, task, study.trials[alt["trial"]])
        alt_ratio = (alt_card["test_miou"] or 0.0) / ref_card["test_miou"]
        fast_note = (
            f"Diagnostic: the front's best-CV net within {TARGET_LATENCY_RATIO:.0%} of the reference's latency is "
            f"trial {alt['trial']} `{alt['arch']}` (CV {alt['cv_mean']:.3f}, {alt['latency_ms']:.3f} ms in the "
            f"search); retrained and evaluated the same way (seed {seed}) it reaches test mIoU "
            f"{fmt(alt_card['test_miou'], '.4f')} = {alt_ratio:.1%} of the reference's with that seed."
        )
        print(fast_note, flush=True)
    counts = trial_counts(study)
    return {
        "card": card,
        "ref_card": ref_card,
        "ref_params": ref_params,
        "ref_macs": ref_macs,
        "front": front,
        "lat_best": lat_best,
        "lat_ref": lat_ref,
        "busy": busy,
        "miou_ratio": miou_ratio,
        "seeds": seeds,
        "chosen_scores": chosen_scores,
        "ref_scores": ref_scores,
        "lat_ratio": lat_ratio,
        "t_search": t_search,
        "t_ref": t_ref,
        "budget": budget,
        "counts": counts,
        "alpha": cfg.search.alpha,
        "latency_ref_ms": cfg.search.latency_ref_ms,
        "fast_note": fast_note,
        "reps": len(task.data[TILE].x),
        "side": side,
        "train_images": len(stage.train_ids),
        "test_images": len(stage.test_ids),
        "ok": miou_ratio >= TARGET_MIOU_RATIO and lat_ratio <= TARGET_LATENCY_RATIO,
    }


# ---------------------------------------------------------------- part 2: latency-first vs train-first


class TrainFirstObjective(Objective):
    """autoseg's Objective with the budget check moved after cross-validation: every net is trained,
    then the over-budget ones are discarded (the study still sees them as pruned)."""

    def __init__(self, cfg: Config, *args: Any, **kwargs: Any) -> None:
        self.budget = cfg.search.latency_budget_ms
        unbudgeted = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, latency_budget_ms=None))
        super().__init__(unbudgeted, *args, **kwargs)

    def find_twin(self, trial: optuna.Trial, cand: Candidate) -> FrozenTrial | None:
        # A net discarded for its latency is not trained again when proposed again, as in latency-first.
        return find_twin(trial.study, cand, trial.number, self.budget)

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        value = super().__call__(trial)
        latency = trial.user_attrs.get("latency_ms")
        if self.budget is not None and latency is not None and latency > self.budget:
            trial.set_user_attr("pruned_reason", "latency_budget")
            self.on_trial(f"trial {trial.number:3d}  trained, then discarded: {latency:.3f} ms over budget")
            raise optuna.TrialPruned("latency over budget (checked after training)")
        return value


def efficiency_device(cfg: Config, cache: Path) -> Any:
    """The configured device and cache, without the busy-device retry: every measurement is cached, so a net
    gets one latency in both variants, and load from other jobs does not add its retry waits (>= 5 s per
    measurement) to both wall times alike, which would hide the training time being compared."""
    device = open_device(cfg.device, cache)
    if hasattr(device, "max_busy_cores"):
        device.max_busy_cores = None
    return device


def sample_budget(cfg: Config, task: SearchTask, n: int, cache: Path) -> tuple[float, list[float]]:
    """Median latency of n random valid candidates of the search space (seeded)."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=cfg.seed + 1))
    device = efficiency_device(cfg, cache)
    settings = settings_from_config(cfg.device, cfg.seed)
    tiles = tile_choices(cfg)
    lats: list[float] = []
    tries = 0
    while len(lats) < n and tries < 10 * n:
        tries += 1
        cand = sample_candidate(study.ask(), cfg.search.space, tiles)
        try:
            validate_arch(cand.arch, cand.tile)
        except ValueError:
            continue
        _, m, _, _ = measure_candidate(cand, task, device, settings, cfg.device.measure_size)
        if m.error == MeasureError.OK and m.median_ms is not None:
            lats.append(float(m.median_ms))
    device.close()
    return float(np.median(lats)), lats


def run_variant(cfg: Config, task: SearchTask, root: Path, latency_first: bool, cache: Path) -> dict[str, Any]:
    name = "latency-first" if latency_first else "train-first"
    run = RunDir(root).prepare()
    settings = settings_from_config(cfg.device, cfg.seed)
    with closing(efficiency_device(cfg, cache)) as device:
        study = open_study(run, cfg)
        cls = Objective if latency_first else TrainFirstObjective

        def say(text: str) -> None:
            print(f"  [{name}] {text}", flush=True)

        objective = cls(cfg, task, device, settings, run, on_trial=say)
        t0 = time.perf_counter()
        run_trials(study, objective, cfg.search.trials)
        wall = time.perf_counter() - t0
    trials = distinct_trials(study)
    budget = cfg.search.latency_budget_ms
    within = [t for t in trials if t.state == TrialState.COMPLETE]
    over = [t for t in trials if (t.user_attrs.get("latency_ms") or 0.0) > budget]
    folds = sum(len(t.intermediate_values) for t in trials)
    wasted = sum(t.duration.total_seconds() for t in over if t.intermediate_values and t.duration)
    best = max(within, key=lambda t: t.user_attrs["cv_mean"], default=None)
    best_obj = max(within, key=lambda t: t.value, default=None)
    out = {
        "name": name,
        "wall_s": wall,
        "trials": len(trials),
        "over_budget": len(over),
        "completed": len(within),
        "median_pruned": sum(t.user_attrs.get("pruned_reason") in PRUNERS for t in trials),
        "folds_trained": folds,
        "wasted_s": wasted,
        "best_cv": best.user_attrs["cv_mean"] if best else None,
        "best_cv_arch": best.user_attrs["arch"] if best else None,
        "best_cv_latency": best.user_attrs["latency_ms"] if best else None,
        "best_obj": best_obj.value if best_obj else None,
        "sequence": [t.user_attrs.get("arch") for t in sorted(trials, key=lambda t: t.number)],
    }
    print(f"{name}: {wall:.0f} s, {out['trials']} trials ({out['over_budget']} over budget, "
          f"{out['completed']} completed), {folds} folds trained, best within-budget CV mIoU "
          f"{fmt(out['best_cv'])}", flush=True)
    return out


def part_efficiency(data: Path, root: Path, b: Budget, seed: int, threads: int | None) -> dict[str, Any]:
    base = make_config(data, root / "eff_data", b, seed, threads)
    _, task = prepare_task(base, RunDir(base.out).prepare())
    t0 = time.perf_counter()
    # One latency cache for the budget sample and both variants (see efficiency_device): a net measured twice
    # gets one latency, so both variants make the same budget decision for it (single measurements on a
    # loaded 2-core box swing up to 4x).
    cache = root / "eff_latency_cache.db"
    budget, lats = sample_budget(base, task, b.budget_samples, cache)
    t_budget = time.perf_counter() - t0
    print(f"\nlatency budget {budget:.3f} ms = median of {len(lats)} random candidates "
          f"({min(lats):.3f} .. {max(lats):.3f} ms; {t_budget:.0f} s)", flush=True)
    extra = {
        "search.trials": b.eff_trials,
        "search.latency_budget_ms": budget,
        # The comparison is about cost per trial: never stop early on a streak of budget prunes.
        "search.max_budget_prunes": b.eff_trials + 1,
    }
    variants = []
    for latency_first in (True, False):
        name = "latency_first" if latency_first else "train_first"
        cfg = make_config(data, root / name, b, seed, threads, **extra)
        variants.append(run_variant(cfg, task, root / name, latency_first, cache))
    fast, slow = variants
    pairs = zip(fast["sequence"], slow["sequence"], strict=False)
    diverge = next((i for i, (a, c) in enumerate(pairs) if a != c), None)
    speedup = slow["wall_s"] / fast["wall_s"]
    score_ratio = (fast["best_cv"] or 0.0) / slow["best_cv"] if slow["best_cv"] else float("nan")
    print(f"speed-up {speedup:.2f}x (target >= {TARGET_SPEEDUP}); best within-budget CV mIoU ratio "
          f"{score_ratio:.3f} (target >= {TARGET_SCORE_RATIO})", flush=True)
    return {
        "budget": budget,
        "lats": lats,
        "t_budget": t_budget,
        "variants": variants,
        "speedup": speedup,
        "score_ratio": score_ratio,
        "diverge": diverge,
        "ok": speedup >= TARGET_SPEEDUP and score_ratio >= TARGET_SCORE_RATIO,
    }


# ---------------------------------------------------------------- part 3: the user's clock


@dataclasses.dataclass(frozen=True)
class ClockBudget:
    trials: int  # each variant's search
    reps: int
    folds: int
    epochs: int | None  # per fold; None: autoseg's default
    final_tiles: int  # the final training of every net tested
    seeds: int  # training seeds of the two chosen nets' final trainings
    marks: tuple[float, ...]  # minutes at which the best so far is reported
    deadline: float  # --max-minutes of the whole-search run
    final_minutes: float  # its --final-minutes: the final-training budget it prints
    fidelity_epochs: int | None  # epochs per fold of the pruning-fidelity CVs (None: autoseg's default)
    val_fraction: float | None = None  # train.val_fraction of the final trainings (None: autoseg's default)


# The full run is the issue's: autoseg's defaults (20 trials, 200 representatives, the default epochs, 200,000
# crops for every shipped net), the best so far at 15, 30 and 60 minutes, and --max-minutes 15.
FULL_CLOCK = ClockBudget(trials=20, reps=200, folds=3, epochs=None, final_tiles=200_000, seeds=3,
                         marks=(15.0, 30.0, 60.0), deadline=15.0, final_minutes=15.0, fidelity_epochs=None)
# --quick: its final trainings (256 crops) are too short to validate, which took most of their time.
QUICK_CLOCK = ClockBudget(trials=4, reps=40, folds=3, epochs=3, final_tiles=256, seeds=2,
                          marks=(0.5, 1.0, 2.0), deadline=1.25, final_minutes=0.25, fidelity_epochs=3, val_fraction=0.0)
CLOCK_QUICK_LIMIT_S = 300.0
TARGET_REACH = 0.95  # of the final best CV score
TARGET_CLOCK_SPEEDUP = 3.0


def clock_config(data: Path, out: Path, cb: ClockBudget, seed: int, threads: int | None, before: bool,
                 **extra: Any) -> Config:
    """autoseg's defaults at the budget's size; `before`: the search's defaults before issue #21 (TPE's random
    start and the median pruner; the old deadline never ran here, as neither variant has one)."""
    overrides = {
        "out": str(out), "seed": seed, "data.images": str(data / "images"), "data.masks": str(data / "masks"),
        "tiles.size": TILE, "reps.num_reps": cb.reps, "search.trials": cb.trials, "train.folds": cb.folds,
        "train.epochs": cb.epochs, "train.final_tiles": cb.final_tiles, "train.threads": threads,
        "train.val_fraction": cb.val_fraction, "device.target": "local",
    }
    if before:
        overrides.update({"search.startup": "random", "search.pruner": "median"})
    return load_config(None, {**overrides, **extra})


def clock_search(cfg: Config, task: SearchTask, root: Path, name: str, cache: Path, plan: bool) -> dict[str, Any]:
    """One search with no time limit; when each trial finished, from the start of the search (the new one's
    calibration and latency range, plan_search, included)."""
    run = RunDir(root).prepare()
    settings = settings_from_config(cfg.device, cfg.seed)
    with closing(efficiency_device(cfg, cache)) as device:
        study = open_study(run, cfg)
        t0 = time.time()
        clock = plan_search(cfg, task, device, settings, study, t0) if plan else None
        objective = Objective(cfg, task, device, settings, run, on_trial=lambda text: print(f"  [{name}] {text}",
                                                                                             flush=True))
        run_trials(study, objective, cfg.search.trials, clock=clock)
        wall = time.time() - t0
    trials = distinct_trials(study)
    done = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.datetime_complete)
    trained = [t for t in trials if t.user_attrs.get("epochs_trained")]
    full = cv_epochs(cfg.train, len(task.data[TILE].x)) * cfg.train.folds
    first = min(trials, key=lambda t: t.number)
    out = {
        "name": name, "cfg": cfg, "wall": wall, "counts": trial_counts(study),
        "events": [(t.datetime_complete.timestamp() - t0, t) for t in done],
        "share": statistics.fmean(t.user_attrs["epochs_trained"] / full for t in trained) if trained else math.nan,
        "first": (first.user_attrs.get("arch"), first.datetime_complete.timestamp() - t0),
        "pruned": sum(t.user_attrs.get("pruned_reason") in PRUNERS for t in trials),
        "best": choose_best(study, cfg.search),
    }
    print(f"{name}: {wall:.0f} s, {len(trials)} nets ({len(done)} completed, {out['pruned']} pruned), "
          f"{out['share']:.0%} of the whole CV trained on average; chosen {out['best'].user_attrs['arch']}",
          flush=True)
    return out


def best_cv_at(events: list[tuple[float, Any]], seconds: float) -> float | None:
    return max((t.user_attrs["cv_mean"] for at, t in events if at <= seconds), default=None)


def chosen_at(events: list[tuple[float, Any]], seconds: float) -> Any:
    """The net the search would ship if it ended at `seconds`: choose_best over the trials done by then."""
    return max((t for at, t in events if at <= seconds), key=lambda t: t.value, default=None)


def reach_time(events: list[tuple[float, Any]], target: float) -> float | None:
    best = -math.inf
    for at, t in events:
        best = max(best, t.user_attrs["cv_mean"])
        if best >= target:
            return at
    return None


def clock_fidelity(cfg: Config, task: SearchTask, epochs: int | None) -> dict[str, Any]:
    """For 8 nets: the readings a pruner could judge a trial on (a third into fold 1, fold 1, two folds) against
    the whole CV, by Spearman rank correlation; each net's CV is trained once and read as it goes."""
    from benchmarks.bench_fidelity import NETS, spearman

    data = task.data[TILE]
    e = epochs or cv_epochs(cfg.train, len(data.x))
    probe = max(1, round(e / 3))
    s = training_settings(cfg.train, cfg.seed, task.class_weights, e)
    rows = []
    for arch in NETS:
        seen: list[float] = []

        def read(fold: int, done: int, score: Any, seen: list[float] = seen) -> None:
            if fold == 0 and done == probe:
                seen.append(score())

        t0 = time.perf_counter()
        scores = cross_validate(arch, data.x, data.y, data.groups, task.num_classes, s, cfg.train.folds, on_epoch=read)
        rows.append({"arch": arch.key(), "probe": seen[0], "fold1": scores[0], "fold2": statistics.fmean(scores[:2]),
                     "full": statistics.fmean(scores), "seconds": time.perf_counter() - t0})
        print(f"  fidelity {arch.key():45s} probe {seen[0]:.4f}  fold 1 {scores[0]:.4f}  2 folds "
              f"{rows[-1]['fold2']:.4f}  CV {rows[-1]['full']:.4f}  ({rows[-1]['seconds']:.0f} s)", flush=True)
    full = [r["full"] for r in rows]
    rho = {k: spearman([r[k] for r in rows], full) for k in ("probe", "fold1", "fold2")}
    return {"rows": rows, "rho": rho, "epochs": e, "probe": probe, "folds": cfg.train.folds}


def clock_deadline(data: Path, root: Path, cb: ClockBudget, seed: int, threads: int | None) -> dict[str, Any]:
    """A whole `autoseg search` (run_search) with --max-minutes and --final-minutes, from a fresh run directory.
    Measurements are not taken again when the machine is busy (as in the efficiency part): the retries' waits
    would time the machine's other jobs."""
    cfg = clock_config(data, root / "deadline", cb, seed, threads, before=False,
                       **{"search.max_minutes": cb.deadline, "train.final_minutes": cb.final_minutes,
                          "device.max_busy_cores": None})
    said: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = record.getMessage()
            if text.startswith(("time:", "ETA:", "--max-minutes", "search: the time limit", "second stage")):
                said.append(text)

    handler = Keep()
    logging.getLogger("autoseg").addHandler(handler)
    t0 = time.time()
    try:
        card = run_search(cfg)
    finally:
        logging.getLogger("autoseg").removeHandler(handler)
    wall = time.time() - t0
    study = optuna.load_study(study_name="autoseg", storage=RunDir(cfg.out).storage_url)
    trials_end = max(t.datetime_complete.timestamp() for t in study.trials if t.datetime_complete) - t0
    final = card["training"]["seconds"] if card.get("training") else math.nan
    limit = 60.0 * (cb.deadline + cb.final_minutes)
    print(f"--max-minutes {cb.deadline:g} --final-minutes {cb.final_minutes:g}: whole search {wall:.0f} s "
          f"(limit {limit:.0f} s; trials ended at {trials_end:.0f} s, final training {final:.0f} s), chose "
          f"{card['arch']}, test mIoU {fmt(card['test_miou'], '.4f')}", flush=True)
    return {"wall": wall, "limit": limit, "said": said, "card": card, "ok": wall <= limit, "trials_end": trials_end,
            "final": final}


def part_clock(data: Path, root: Path, cb: ClockBudget, seed: int, threads: int | None) -> dict[str, Any]:
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    base = clock_config(data, root / "clock_data", cb, seed, threads, before=False)
    stage, task = prepare_task(base, RunDir(base.out).prepare())
    phases["data"] = time.perf_counter() - t0
    cache = root / "clock_latency_cache.db"  # one latency per net for both variants (see efficiency_device)
    # The new defaults first: the nets both look at are then timed already for the old ones (conservative).
    after = clock_search(base, task, root / "clock_after", "new defaults", cache, plan=True)
    before_cfg = clock_config(data, root / "clock_before", cb, seed, threads, before=True)
    before = clock_search(before_cfg, task, root / "clock_before", "before #21", cache, plan=False)
    variants = [before, after]
    phases["searches"] = time.perf_counter() - t0 - sum(phases.values())
    best = max(t.user_attrs["cv_mean"] for v in variants for _, t in v["events"])
    tested: dict[str, dict[str, Any]] = {}

    def test(trial: Any) -> dict[str, Any]:
        key = trial.user_attrs["arch"]
        if key not in tested:
            tested[key] = finalize(base, RunDir(root / "clock_final" / key).prepare(), stage, task, trial)
            print(f"  {key}: test mIoU {fmt(tested[key]['test_miou'], '.4f')}", flush=True)
        return tested[key]

    for v in variants:
        v["reach"] = reach_time(v["events"], TARGET_REACH * best)
        v["marks"] = []
        for m in cb.marks:
            chosen = chosen_at(v["events"], 60.0 * m)
            v["marks"].append({"minutes": m, "best_cv": best_cv_at(v["events"], 60.0 * m),
                               "chosen": chosen.user_attrs["arch"] if chosen else None,
                               "test_miou": test(chosen)["test_miou"] if chosen else None})
        first = test(v["best"])
        seeds = list(range(seed, seed + cb.seeds))
        key = v["best"].user_attrs["arch"]
        if f"{key}#seeds" not in tested:
            scores = seed_retrains(base, root / "clock_seeds" / key, stage, task, v["best"], first, seeds)
            tested[f"{key}#seeds"] = {"scores": scores}
        v["end_scores"] = tested[f"{key}#seeds"]["scores"]
    phases["final trainings and tests"] = time.perf_counter() - t0 - sum(phases.values())
    fidelity = clock_fidelity(base, task, cb.fidelity_epochs)
    phases["fidelity"] = time.perf_counter() - t0 - sum(phases.values())
    deadline = clock_deadline(data, root, cb, seed, threads)
    phases["--max-minutes run"] = time.perf_counter() - t0 - sum(phases.values())
    rb, ra = before["reach"], after["reach"]
    # The new defaults never reaching it: 0; the old ones never reaching it: inf.
    speedup = 0.0 if ra is None else (math.inf if rb is None else rb / max(ra, 1e-9))
    old_mean, old_std = statistics.fmean(before["end_scores"]), statistics.stdev(before["end_scores"])
    new_mean = statistics.fmean(after["end_scores"])
    return {"before": before, "after": after, "best": best, "speedup": speedup, "old": (old_mean, old_std),
            "new_mean": new_mean, "fidelity": fidelity, "deadline": deadline, "reps": len(task.data[TILE].x),
            "phases": phases,
            "epochs": cv_epochs(base.train, len(task.data[TILE].x))}


def deadline_check(cb: ClockBudget, dl: dict[str, Any]) -> tuple[bool, str]:
    return (dl["ok"], f"--max-minutes {cb.deadline:g} ends the whole search within {cb.deadline:g} + "
            f"{cb.final_minutes:g} min (--final-minutes, printed up front): {dl['wall'] / 60:.2f} min")


def deadline_lines(cb: ClockBudget, dl: dict[str, Any]) -> list[str]:
    second = dl["card"].get("second_stage")
    stage = ("no second stage" if not second else
             f"the second stage trained {len(second['nets'])} nets on {second['tiles']:,} crops each in "
             f"{sum(n['seconds'] for n in second['nets']):.0f} s")
    return [
        f"### --max-minutes {cb.deadline:g}",
        "",
        f"A whole `autoseg search` (pipeline.run_search, data stage included) with `--max-minutes {cb.deadline:g} "
        f"--final-minutes {cb.final_minutes:g}`: {dl['wall']:.0f} s against {dl['limit']:.0f} s (the last trial "
        f"ended at {dl['trials_end']:.0f} s, {stage}, the final training took {dl['final']:.0f} s, the rest is the "
        "data stage, export, test and report); it chose "
        f"`{dl['card']['arch']}` (test mIoU {fmt(dl['card']['test_miou'], '.4f')}, "
        f"{dl['card']['trials']['distinct']} nets looked at). It said up front:",
        "",
        *[f"    {line}" for line in dl["said"]],
        "",
    ]


def clock_report(cb: ClockBudget, c: dict[str, Any]) -> tuple[list[str], list[tuple[bool, str]]]:
    before, after, fid, dl = c["before"], c["after"], c["fidelity"], c["deadline"]
    old_mean, old_std = c["old"]
    checks = [
        (c["speedup"] >= TARGET_CLOCK_SPEEDUP, f"new defaults reach {TARGET_REACH:.0%} of the best CV score >= "
         f"{TARGET_CLOCK_SPEEDUP:g}x sooner: " + ("they never did" if c["speedup"] == 0 else
                                                 f"{c['speedup']:.2f}x")),
        (c["new_mean"] >= old_mean - old_std, f"the new chosen net's mean test mIoU is within one standard deviation "
         f"of today's (or better): {c['new_mean']:.4f} vs {old_mean:.4f} ± {old_std:.4f}"),
        deadline_check(cb, dl),
    ]

    def secs(v: float | None) -> str:
        return "never" if v is None else f"{v:.0f} s"

    marks = " | ".join(f"{m:g} min" for m in cb.marks)
    lines = [
        "## The user's clock: small nets first, pruning after a fold, a hard deadline",
        "",
        f"Both searches: autoseg's defaults at this budget ({cb.trials} trials, {c['reps']} representatives, "
        f"{cb.folds} folds x {c['epochs']} epochs, no latency budget, tile {TILE}, local latency), same seed and "
        "representatives, no time limit. **Before #21**: TPE's random start and the median pruner. **New**: the "
        "cost-ordered start (nets at MACs quantiles of the space, cheapest first), successive halving (a trial is "
        "judged after fold 1, the best third goes on), and plan_search's calibration and latency range before the "
        "first trial, counted in its time. Times are from the start of each search. The best CV score is the best "
        f"CV mIoU of a finished trial so far; {TARGET_REACH:.0%} of the best is of the better final best of the two "
        f"({c['best']:.4f}). The chosen net so far is what the search would ship if it ended then, trained like a "
        f"shipped net ({cb.final_tiles:,} crops) and tested on the held-out images.",
        "",
        "| | before #21 | new defaults |",
        "|---|---|---|",
        f"| first trial (finished after) | `{before['first'][0]}` ({before['first'][1]:.0f} s) | "
        f"`{after['first'][0]}` ({after['first'][1]:.0f} s) |",
        f"| search wall time | {before['wall']:.0f} s | {after['wall']:.0f} s |",
        f"| nets: completed / pruned by the pruner | {len(before['events'])} / {before['pruned']} | "
        f"{len(after['events'])} / {after['pruned']} |",
        f"| share of the whole CV a trained trial trained, mean (ETA prior: median {PRUNED_SHARE['median']:.0%}, "
        f"halving {PRUNED_SHARE['halving']:.0%}) | {before['share']:.0%} | {after['share']:.0%} |",
        f"| time to {TARGET_REACH:.0%} of the best CV score | {secs(before['reach'])} | {secs(after['reach'])} |",
        *[f"| best CV score / chosen net / its test mIoU at {mk['minutes']:g} min | {fmt(mk['best_cv'], '.4f')} / "
          f"`{mk['chosen']}` / {fmt(mk['test_miou'], '.4f')} | {fmt(ma['best_cv'], '.4f')} / `{ma['chosen']}` / "
          f"{fmt(ma['test_miou'], '.4f')} |" for mk, ma in zip(before["marks"], after["marks"], strict=True)],
        f"| chosen at the end | `{before['best'].user_attrs['arch']}` | `{after['best'].user_attrs['arch']}` |",
        f"| its test mIoU over {cb.seeds} training seeds | {mean_std(before['end_scores'])} | "
        f"{mean_std(after['end_scores'])} |",
        "",
        f"Speed-up to {TARGET_REACH:.0%} of the best (before / new): **"
        + ("never reached by the new defaults" if c["speedup"] == 0 else f"{c['speedup']:.2f}x")
        + f"**. Marks: {marks}.",
        "",
        f"### Pruning fidelity ({len(fid['rows'])} nets, {fid['folds']} folds x {fid['epochs']} epochs)",
        "",
        "Each net's CV was trained once and read as it went; the Spearman rank correlation of each reading with "
        "the whole CV's score says how well a trial judged there is judged. The pruners judge after fold 1 (and "
        "the median pruner after fold 2 too); a reading inside fold 1 is not used: it comes from the middle of the "
        "fold's learning-rate schedule, lower than the fold's score by an amount that differs by net.",
        "",
        "| reading | share of the CV's training | Spearman with the whole CV |",
        "|---|---|---|",
        f"| fold 1 after {fid['probe']} of its {fid['epochs']} epochs (not used) | "
        f"{fid['probe'] / (fid['epochs'] * fid['folds']):.0%} | {fid['rho']['probe']:.2f} |",
        f"| fold 1 (where every pruner judges) | {1 / fid['folds']:.0%} | {fid['rho']['fold1']:.2f} |",
        f"| folds 1-2 | {2 / fid['folds']:.0%} | {fid['rho']['fold2']:.2f} |",
        "",
        "| net | probe | fold 1 | folds 1-2 | whole CV |",
        "|---|---|---|---|---|",
        *[f"| `{r['arch']}` | {r['probe']:.4f} | {r['fold1']:.4f} | {r['fold2']:.4f} | {r['full']:.4f} |"
          for r in sorted(fid["rows"], key=lambda r: -r["full"])],
        "",
        "The ranking that matters in the end is the shipped nets' test mIoU; `bench_fidelity` relates the whole CV "
        "to it (8 nets retrained in full and tested).",
        "",
        *deadline_lines(cb, dl),
        "Wall time by phase: " + ", ".join(f"{k} {v:.0f} s" for k, v in c["phases"].items()) + ".",
        "",
    ]
    return lines, checks


# ---------------------------------------------------------------- report


def epochs_text(b: Budget) -> str:
    epochs = cv_epochs(TrainConfig(folds=b.folds, epochs=b.epochs), b.reps)
    return f"{epochs} epochs" + ("" if b.epochs else f" (train.epochs unset: about {FOLD_TILE_PASSES} tiles per fold)")


def mean_std(values: list[float]) -> str:
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def check_line(ok: bool, text: str) -> str:
    return f"{'PASS' if ok else 'FAIL'}: {text}"


def report(args: argparse.Namespace, b: Budget, info: dict[str, Any], real: dict | None, eff: dict | None,
           total_s: float) -> tuple[list[str], list[tuple[bool, str]]]:
    checks: list[tuple[bool, str]] = []
    cmd = "python -m benchmarks.bench_search " + " ".join(args.argv)
    lines = [
        "# Search benchmark",
        "",
        f"`{cmd.strip()}`" + (" (`make bench` budget)" if args.quick else ""),
        "",
        f"Data: `{args.data}` (read in place), held-out split by image (data.test_fraction 0.2), tile {TILE}, "
        "local device, config defaults otherwise (penalty objective, TPE with a cost-ordered start, successive-halving "
        "pruner, whole-image evaluation).",
        "",
        f"Budget{' (--quick: smaller than the full run)' if args.quick else ''}: {b.trials} trials (real search), "
        f"{b.eff_trials} trials per efficiency variant, {b.folds} folds, {epochs_text(b)} per fold, "
        f"{b.final_epochs} final epochs, {b.reps} representative tiles, seed {args.seed}, "
        f"train threads {args.threads if args.threads else 'torch default'}.",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        f"- load_avg_1m_at_end: {os.getloadavg()[0]:.2f}",
        f"- total wall time: {total_s:.0f} s",
        "",
    ]
    if real is not None:
        card, ref, n = real["card"], real["ref_card"], real["counts"]
        n_seeds = len(real["seeds"])
        mean_text = f"mean test mIoU over {n_seeds} training seeds" if n_seeds > 1 else "test mIoU"
        checks.append((real["miou_ratio"] >= TARGET_MIOU_RATIO,
                       f"chosen {mean_text} >= {TARGET_MIOU_RATIO:.0%} of the reference's: {real['miou_ratio']:.1%}"))
        busy_note = (f" (UNRELIABLE: other processes kept {real['busy']:.1f} cores busy while it was measured)"
                     if real["busy"] > BUSY_CORES else "")
        checks.append((real["lat_ratio"] <= TARGET_LATENCY_RATIO,
                       f"chosen latency <= {TARGET_LATENCY_RATIO:.0%} of the reference's: {real['lat_ratio']:.1%}"
                       + busy_note))
        lines += [
            "## 1. Real search vs a reference U-Net",
            "",
            f"{real['train_images']} training images ({real['reps']} representative tiles), "
            f"{real['test_images']} held-out test images. Search: {n['distinct']} distinct nets "
            f"({n['completed']} completed, {n['over_budget']} over the budget, "
            f"{n['distinct'] - n['completed'] - n['over_budget']} pruned otherwise) and {n['repeats']} repeated "
            "proposals (reused, not counted); search + retrain + "
            f"export + evaluate {real['t_search']:.0f} s, reference retrain + export + evaluate {real['t_ref']:.0f} s.",
            "",
            f"The search ran with `search.latency_budget_ms` {real['budget']:.3f} = {TARGET_LATENCY_RATIO:.0%} of "
            "the reference's latency, measured just before it: a user with that deadline sets it the same way. "
            "Nets over the budget were dropped before any training, and `search.alpha` was 0, so the chosen "
            "net is the best CV score within the deadline.",
            "",
            f"Latency is timed at {real['side']}x{real['side']}"
            + (", the size of the held-out images, which are evaluated whole: the size the net runs at "
               "(`--measure-size`, as the README advises)." if args.measure_size == "test" else ".")
            + (f" At the {TILE}x{TILE} tile a fixed per-call cost of onnxruntime would weigh on small "
               "nets' latency alone, not on the reference's." if real["side"] != TILE else ""),
            "",
            "Pareto front (CV mIoU on the representative tiles vs latency, from the search):",
            "",
            "| trial | architecture | CV mIoU | latency (ms) | latency / reference's |",
            "|---|---|---|---|---|",
            *[
                f"| {r['trial']} | `{r['arch']}` | {r['cv_mean']:.3f} | {r['latency_ms']:.3f} | "
                f"{r['latency_ms'] / real['lat_ref']:.3f} |"
                for r in real["front"]
            ],
            "",
            f"| | chosen (trial {card['trial']}) | reference | ratio |",
            "|---|---|---|---|",
            f"| architecture | `{card['arch']}` | `{REF_ARCH.key()}` | |",
            f"| params | {card['params']:,} | {real['ref_params']:,} | {card['params'] / real['ref_params']:.3f} |",
            f"| MACs at {real['side']}x{real['side']} | {card['macs'] / 1e6:.1f} M | {real['ref_macs'] / 1e6:.1f} M | "
            f"{card['macs'] / real['ref_macs']:.3f} |",
            f"| CV mIoU (search) | {fmt(card['cv_score'])} | not searched | |",
            f"| test mIoU (seed {args.seed}) | {fmt(card['test_miou'], '.4f')} | {fmt(ref['test_miou'], '.4f')} | "
            f"{card['test_miou'] / ref['test_miou']:.3f} |",
            *([f"| test mIoU by training seed ({', '.join(map(str, real['seeds']))}) | "
               f"{' / '.join(f'{v:.4f}' for v in real['chosen_scores'])} | "
               f"{' / '.join(f'{v:.4f}' for v in real['ref_scores'])} | |",
               f"| test mIoU, mean ± std of {n_seeds} seeds | {mean_std(real['chosen_scores'])} | "
               f"{mean_std(real['ref_scores'])} | {real['miou_ratio']:.3f} |"] if n_seeds > 1 else []),
            f"| test macro Dice | {fmt(card['test_dice'], '.4f')} | {fmt(ref['test_dice'], '.4f')} | |",
            f"| test pixel accuracy | {fmt(card['test_pixel_acc'], '.4f')} | {fmt(ref['test_pixel_acc'], '.4f')} | |",
            f"| latency at {real['side']}x{real['side']}, re-measured interleaved (median of {b.latency_rounds}) | "
            f"{real['lat_best']:.3f} ms | "
            f"{real['lat_ref']:.3f} ms | {real['lat_ratio']:.3f} |",
            f"| cores other processes kept busy during the re-measurement (max) | {real['busy']:.2f} | | |",
            f"| latency during the search | {fmt(card['latency_ms'])} ms | | |",
            f"| ONNX size | {card['onnx']['size_bytes'] / 1e3:.1f} kB | {ref['onnx']['size_bytes'] / 1e3:.1f} kB | |",
            "",
            "The chosen net is `choose_best`'s pick: the highest penalty objective "
            + (f"CV mIoU - {real['alpha']:g} * log10(latency / {real['latency_ref_ms']:g} ms). " if real["alpha"]
               else "(with alpha 0, the CV mIoU) among the nets within the budget. ")
            + real["fast_note"],
            "",
            "Both nets were retrained by `autoseg.pipeline.finalize` with the same config: "
            f"{b.final_epochs} epochs on the same {real['reps']} representative tiles, seed {args.seed}, then "
            "exported to ONNX and evaluated with `autoseg.infer.evaluate` on the same held-out images"
            + (f"; then again with training seeds {', '.join(map(str, real['seeds'][1:]))} (same split, "
               "representatives and nets), and the target compares the means." if n_seeds > 1 else "."),
            "",
        ]
    if eff is not None:
        checks.append((eff["speedup"] >= TARGET_SPEEDUP,
                       f"latency-first search >= {TARGET_SPEEDUP}x faster than train-first: {eff['speedup']:.2f}x"))
        checks.append((eff["score_ratio"] >= TARGET_SCORE_RATIO,
                       f"latency-first best within-budget CV mIoU >= {TARGET_SCORE_RATIO:.0%} of train-first's: "
                       f"{eff['score_ratio']:.1%}"))
        lats = eff["lats"]
        lines += [
            "## 2. Search efficiency: latency-first pruning vs train-first",
            "",
            f"Latency budget {eff['budget']:.3f} ms = median latency of {len(lats)} random candidates of the space "
            f"(range {min(lats):.3f} .. {max(lats):.3f} ms). Both variants: same config, seed, sampler and "
            "representative tiles, each with its own fresh study. They share one latency cache (with the "
            "budget sample), with autoseg's busy-device retry turned off so every measurement is cached: "
            "a net gets one latency, so both make the same budget decision for it; the "
            "train-first variant, run second, thus skips re-measuring nets the first one measured, which "
            "makes the speed-up conservative. Wall time is the trial loop only (data preparation is shared "
            "and not counted).",
            "",
            "| variant | wall time | trials | over budget | completed | pruned by the pruner | folds trained | "
            "time on trained-then-discarded nets | best within-budget CV mIoU | its architecture | "
            "best penalty objective |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            *[
                f"| {v['name']} | {v['wall_s']:.0f} s | {v['trials']} | {v['over_budget']} | {v['completed']} | "
                f"{v['median_pruned']} | {v['folds_trained']} | {v['wasted_s']:.0f} s | {fmt(v['best_cv'])} | "
                f"`{v['best_cv_arch']}` ({fmt(v['best_cv_latency'])} ms) | {fmt(v['best_obj'])} |"
                for v in eff["variants"]
            ],
            "",
            f"Speed-up (train-first wall time / latency-first wall time): **{eff['speedup']:.2f}x**. "
            f"Best within-budget CV mIoU ratio (latency-first / train-first): {eff['score_ratio']:.3f}.",
            "",
            (
                "Both studies sampled the same candidate sequence (TPE's history differs only in the intermediate "
                "values of the over-budget trials), so the comparison isolates when the budget is checked."
                if eff["diverge"] is None
                else f"The candidate sequences diverge at trial {eff['diverge']} (TPE sees different histories), so "
                "the best scores come from partly different candidates."
            )
            + " The speed-up target is set by this benchmark.",
            "",
        ]
    if args.quick:
        checks.append((total_s <= QUICK_LIMIT_S, f"--quick finishes in <= {QUICK_LIMIT_S:.0f} s: {total_s:.0f} s"))
    lines += ["## Targets", "", *[f"- {check_line(ok, text)}" for ok, text in checks], ""]
    return lines, checks


def clock_document(args: argparse.Namespace, cb: ClockBudget, info: dict[str, Any], section: list[str],
                   checks: list[tuple[bool, str]], total_s: float, title: str = "") -> list[str]:
    cmd = "python -m benchmarks.bench_search " + " ".join(args.argv)
    lines = [
        "# Search benchmark: the user's clock" + title,
        "",
        f"`{cmd.strip()}`" + (" (`make bench` budget)" if args.quick else ""),
        "",
        f"Data: `{args.data}` (read in place), held-out split by image (data.test_fraction 0.2), seed {args.seed}, "
        f"train threads {args.threads if args.threads else 'torch default'}. Budget"
        f"{' (--quick: smaller than the full run)' if args.quick else ''}: {cb}.",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        f"- load_avg_1m_at_end: {os.getloadavg()[0]:.2f}",
        f"- total wall time: {total_s:.0f} s",
        "",
        *section,
        "## Targets",
        "",
        *[f"- {check_line(ok, text)}" for ok, text in checks],
        "",
    ]
    return lines


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("real", "efficiency", "clock", "deadline", "all"), default="all",
                    help="all: real and efficiency (results/search.md); clock writes results/clock.md; deadline: "
                    "only clock's --max-minutes run (results/clock_deadline.md)")
    ap.add_argument("--trials", type=int, help="trials of each search (default 40 real / 16 per variant; "
                    "--quick 16 / 6)")
    ap.add_argument("--epochs", type=int, help="epochs per fold (default: autoseg's, about "
                    f"{FOLD_TILE_PASSES} tiles per fold; --quick 2)")
    ap.add_argument("--reps", type=int, help="representative tiles (default 120, --quick 40)")
    ap.add_argument("--final-epochs", type=int, help="epochs of the final retrain (default 120, --quick 8)")
    ap.add_argument("--seeds", type=int, help="training seeds of the final retrains of the chosen net and the "
                    "reference, compared by their means (default 3)")
    ap.add_argument("--final-tiles", type=int, help="--part clock: crops of each tested net's final training "
                    "(default 200,000, --quick 1,000)")
    ap.add_argument("--marks", help="--part clock: minutes at which the best so far is reported, comma-separated "
                    "(default 15,30,60)")
    ap.add_argument("--max-minutes", type=float, help="--part clock: --max-minutes of the whole-search run "
                    "(default 15)")
    ap.add_argument("--final-minutes", type=float, help="--part clock: its --final-minutes (default 15)")
    ap.add_argument("--quick", action="store_true", help="the small budget of `make bench` (<= 10 min; "
                    "--part clock <= 5 min)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="train.threads (default 1: on this 2-core box torch's default of 2 threads trains "
                    "1.4-5x slower as soon as another job runs; 0 = torch's default)")
    ap.add_argument("--measure-size", default="test",
                    help="input side the real search times nets at: test (default: the held-out images' size, "
                    "the size they are evaluated at), tile, or a number")
    ap.add_argument("--data", type=Path, default=DATASET)
    ap.add_argument("--keep", type=Path, default=None, help="keep the run directories here (default: temp dir)")
    ap.add_argument("--out", type=Path, help="results file (default results/search.md; --part clock: "
                    "results/clock.md)")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.measure_size not in ("test", "tile") and not (args.measure_size.isdigit() and int(args.measure_size) >= 8):
        ap.error(f"--measure-size: test, tile or a number >= 8, got {args.measure_size!r}")

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("autoseg.search", "autoseg.pipeline"):
        logging.getLogger(name).setLevel(logging.INFO)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    if not (args.data / "images").is_dir() or not (args.data / "masks").is_dir():
        print(f"SKIP: {args.data}/images and /masks not found; pass --data DIR")
        return 0
    if args.keep is not None and args.keep.exists() and any(args.keep.iterdir()):
        print(f"{args.keep}: not empty; the searches would resume old studies. Pass a new --keep directory")
        return 2
    b = QUICK if args.quick else FULL
    b = dataclasses.replace(
        b,
        trials=args.trials or b.trials,
        eff_trials=args.trials or b.eff_trials,
        epochs=args.epochs or b.epochs,
        reps=args.reps or b.reps,
        final_epochs=args.final_epochs or b.final_epochs,
        seeds=args.seeds or b.seeds,
    )
    args.threads = args.threads or None
    args.out = args.out or {"clock": RESULTS_CLOCK, "deadline": RESULTS_DEADLINE}.get(args.part, RESULTS)
    cb = QUICK_CLOCK if args.quick else FULL_CLOCK
    cb = dataclasses.replace(cb, trials=args.trials or cb.trials, reps=args.reps or cb.reps,
                             epochs=args.epochs or cb.epochs, seeds=args.seeds or cb.seeds,
                             final_tiles=args.final_tiles or cb.final_tiles,
                             deadline=args.max_minutes or cb.deadline,
                             final_minutes=args.final_minutes or cb.final_minutes,
                             fidelity_epochs=args.epochs or cb.fidelity_epochs)
    if args.marks:
        try:
            cb = dataclasses.replace(cb, marks=tuple(float(m) for m in args.marks.split(",")))
        except ValueError:
            ap.error(f"--marks: minutes separated by commas, e.g. 5,10,20; got {args.marks!r}")
    info = machine_info()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    shown = cb if args.part in ("clock", "deadline") else b
    print(f"budget: {shown}" + ("  (--quick: reduced trials, tiles and epochs)" if args.quick else ""), flush=True)

    start = time.perf_counter()
    real = eff = clock = deadline = None
    with tempfile.TemporaryDirectory(prefix="bench_search_") as tmp:
        root = args.keep or Path(tmp)
        try:
            if args.part == "clock":
                clock = part_clock(args.data, root, cb, args.seed, args.threads)
            if args.part == "deadline":
                deadline = clock_deadline(args.data, root, cb, args.seed, args.threads)
            if args.part in ("real", "all"):
                real = part_real(args.data, root, b, args.seed, args.threads, args.measure_size)
            if args.part in ("efficiency", "all"):
                eff = part_efficiency(args.data, root, b, args.seed, args.threads)
        except AutosegError as e:
            print(f"FAIL: the search stopped: {e}")
            return 1
    total = time.perf_counter() - start

    if clock is not None:
        section, checks = clock_report(cb, clock)
        if args.quick:
            checks.append((total <= CLOCK_QUICK_LIMIT_S,
                           f"--quick finishes in <= {CLOCK_QUICK_LIMIT_S:.0f} s: {total:.0f} s"))
        lines = clock_document(args, cb, info, section, checks, total)
    elif deadline is not None:
        checks = [deadline_check(cb, deadline)]
        lines = clock_document(args, cb, info, deadline_lines(cb, deadline), checks, total,
                               " (the --max-minutes run alone)")
    else:
        lines, checks = report(args, b, info, real, eff, total)
    print()
    for ok, text in checks:
        print(check_line(ok, text))
    print(f"total wall time {total:.0f} s")
    write_results(args.out, "\n".join(lines))
    print(f"wrote {args.out}")
    return 0 if all(ok for ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
