"""The search on real data: does it find a small net that segments as well as a standard U-Net,
and how much does latency-first pruning save?

    python -m benchmarks.bench_search [--part real|efficiency|all] [--trials N] [--epochs N] [--quick]

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

--quick is the budget `make bench` uses (<= 10 minutes on a 2-core machine): fewer trials,
representative tiles and epochs; the output says which. Results: benchmarks/results/search.md.
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
from autoseg.errors import AutosegError
from autoseg.latency import LocalDevice, MeasureError, open_device, settings_from_config
from autoseg.pipeline import DataStage, class_weights, finalize, prepare_data, run_search, select_reps
from autoseg.reps import rep_arrays
from autoseg.rundir import RunDir, write_text_atomic
from autoseg.search import (
    Candidate,
    Objective,
    SearchTask,
    TileData,
    distinct_trials,
    find_twin,
    measure_candidate,
    open_study,
    pareto_summary,
    run_trials,
    sample_candidate,
    tile_choices,
    trial_counts,
)
from autoseg.train import FOLD_TILE_PASSES, cv_epochs
from autoseg.unet import Arch, build_unet, count_macs, count_params, validate_arch
from benchmarks import DATA_ROOT

DATASET = DATA_ROOT / "semantic_drone_224"
RESULTS = Path(__file__).resolve().parent / "results" / "search.md"
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
        "median_pruned": sum(t.user_attrs.get("pruned_reason") == "median" for t in trials),
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
        "local device, config defaults otherwise (penalty objective, TPE, median pruner, whole-image evaluation).",
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
            "| variant | wall time | trials | over budget | completed | median-pruned | folds trained | "
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


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("real", "efficiency", "all"), default="all")
    ap.add_argument("--trials", type=int, help="trials of each search (default 40 real / 16 per variant; "
                    "--quick 16 / 6)")
    ap.add_argument("--epochs", type=int, help="epochs per fold (default: autoseg's, about "
                    f"{FOLD_TILE_PASSES} tiles per fold; --quick 2)")
    ap.add_argument("--reps", type=int, help="representative tiles (default 120, --quick 40)")
    ap.add_argument("--final-epochs", type=int, help="epochs of the final retrain (default 120, --quick 8)")
    ap.add_argument("--seeds", type=int, help="training seeds of the final retrains of the chosen net and the "
                    "reference, compared by their means (default 3)")
    ap.add_argument("--quick", action="store_true", help="the small budget of `make bench` (<= 10 min)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="train.threads (default 1: on this 2-core box torch's default of 2 threads trains "
                    "1.4-5x slower as soon as another job runs; 0 = torch's default)")
    ap.add_argument("--measure-size", default="test",
                    help="input side the real search times nets at: test (default: the held-out images' size, "
                    "the size they are evaluated at), tile, or a number")
    ap.add_argument("--data", type=Path, default=DATASET)
    ap.add_argument("--keep", type=Path, default=None, help="keep the run directories here (default: temp dir)")
    ap.add_argument("--out", type=Path, default=RESULTS)
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
    info = machine_info()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(f"budget: {b}" + ("  (--quick: reduced trials, tiles and epochs)" if args.quick else ""), flush=True)

    start = time.perf_counter()
    real = eff = None
    with tempfile.TemporaryDirectory(prefix="bench_search_") as tmp:
        root = args.keep or Path(tmp)
        try:
            if args.part in ("real", "all"):
                real = part_real(args.data, root, b, args.seed, args.threads, args.measure_size)
            if args.part in ("efficiency", "all"):
                eff = part_efficiency(args.data, root, b, args.seed, args.threads)
        except AutosegError as e:
            print(f"FAIL: the search stopped: {e}")
            return 1
    total = time.perf_counter() - start

    lines, checks = report(args, b, info, real, eff, total)
    print()
    for ok, text in checks:
        print(check_line(ok, text))
    print(f"total wall time {total:.0f} s")
    write_text_atomic(args.out, "\n".join(lines))
    print(f"wrote {args.out}")
    return 0 if all(ok for ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
