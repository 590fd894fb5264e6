"""The latency predictor learned from the device's own measurements (issue #26): how accurate, how much it saves.

    python -m benchmarks.bench_predictor [--quick] [--nets N] [--trials N] [--out FILE]

accuracy  N random nets of the default space (search.space defaults, 2 classes), each exported and timed on the
          local device at one of two input sizes (64 and 128, alternating), through the latency cache as the
          search times them. Shuffled; 75 % train, 25 % test. Reported on the test nets: the share within ±10 %
          and the MAPE of the predictor and of a MACs-only linear fit (the naive baseline), and the device's own
          repeatability (the test nets timed again, bypassing the cache): no predictor can beat it.
          Target (issue #26): >= 90 % within ±10 % (nn-Meter: 99 % on mobile CPUs).
curve     The predictor fitted on the first 15, 30, 60, 120 training nets, scored on the same test nets.
savings   A budgeted search (budget: the median latency of the measured nets at the tile size), run twice with the
          same seed and the cache the accuracy part filled (an earlier run on this device): predict_latency auto
          and off. Measurements made (cache misses: device time), wall time of the trial loop, the chosen net, and
          each net dropped on its prediction timed afterwards to count wrong drops. Target: >= 50 % fewer
          measurements, the same chosen net.

Measurements are taken with the busy check off (device.max_busy_cores huge): on a loaded machine every figure is
flagged busy, and the search neither caches nor learns from flagged figures. The load average is written beside
the results, which therefore say how far this machine's noise holds the predictor back, not what it reaches on a
quiet device.

--quick (what `make bench` runs): 40 nets, curve at 15 and 30, 12-trial searches on random tiles with 1 epoch.
Timings use one onnxruntime thread by default (--threads): see its help.
Results: benchmarks/results/predictor.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch

from autoseg.config import load_config
from autoseg.devices import CachedDevice, open_device, settings_from_config
from autoseg.devices.cache import _graph_hash
from autoseg.export import onnx_bytes
from autoseg.latency_history import remember_arch
from autoseg.predictor import MIN_MEASUREMENTS, LatencyPredictor, LatencyRecord, accuracy, feature_names
from autoseg.rundir import RunDir
from autoseg.search import (
    Candidate,
    Objective,
    SearchTask,
    TileData,
    choose_best,
    measure_candidate,
    open_study,
    run_trials,
    space_pool,
    trial_counts,
)
from autoseg.unet import Arch, build_unet
from benchmarks import cpu_and_ram, write_results

RESULTS = Path(__file__).resolve().parent / "results" / "predictor.md"
SIZES = (64, 128)
TILE = 64
CLASSES = 2
TARGET_WITHIN = 0.90
TARGET_SAVED = 0.50
BENCH = {"device.max_busy_cores": 1e6, "seed": 0}


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min) on {os.cpu_count()} CPUs"


# ---------------------------------------------------------------- accuracy


def measure_nets(n: int, cache: Path) -> tuple[list[LatencyRecord], dict[tuple[str, int], bytes], float]:
    """n random nets of the default space timed through the cache at alternating sizes; their graphs kept."""
    cfg = load_config(None, BENCH)
    settings = settings_from_config(cfg.device, cfg.seed)
    pool = space_pool(cfg, 8 * n)[:n]
    records, blobs = [], {}
    start = time.perf_counter()
    with closing(open_device(cfg.device, cache)) as device:
        for j, (cand, _) in enumerate(pool):
            size = SIZES[j % 2]
            torch.manual_seed(int(cand.arch.digest(), 16) % (2**31))  # as search.measure_candidate exports
            blob = onnx_bytes(build_unet(cand.arch, 3, CLASSES).eval(), 3, size, cfg.export.opset)
            m = device.measure(blob, (1, 3, size, size), settings)
            if m.median_ms is None:
                print(f"  {cand.arch.key()} at {size}: not measured ({m.message})", flush=True)
                continue
            remember_arch(device.cache, _graph_hash(blob), cand.arch, 3, CLASSES, "fp32")
            records.append(LatencyRecord(cand.arch, (size, size), float(m.median_ms), 3, CLASSES))
            blobs[(cand.arch.key(), size)] = blob
    return records, blobs, time.perf_counter() - start


def retest(test: list[LatencyRecord], blobs: dict[tuple[str, int], bytes], cache: Path) -> list[float]:
    """The test nets timed again on the device itself (not the cache): the device's repeatability."""
    cfg = load_config(None, BENCH)
    settings = settings_from_config(cfg.device, cfg.seed)
    with closing(open_device(cfg.device, cache)) as device:
        inner = device.inner if isinstance(device, CachedDevice) else device
        return [float(inner.measure(blobs[(r.arch.key(), r.size[0])], (1, 3, *r.size), settings).median_ms)
                for r in test]


def macs_only(train: list[LatencyRecord], test: list[LatencyRecord]) -> list[float]:
    from sklearn.linear_model import LinearRegression

    i = feature_names().index("macs")
    lm = LinearRegression().fit(np.array([[r.x()[i]] for r in train]), [r.latency_ms for r in train])
    return [max(float(v), 1e-3) for v in lm.predict(np.array([[r.x()[i]] for r in test]))]


# ---------------------------------------------------------------- savings


def random_task(tiles: int) -> SearchTask:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(tiles, 3, TILE, TILE)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)  # learnable: the class follows channel 0's sign
    return SearchTask(data={TILE: TileData(x, y, np.arange(tiles) // 4)}, in_channels=3, num_classes=CLASSES,
                      class_weights=None)


def one_search(root: Path, cache: Path, mode: str, trials: int, budget: float, quick: bool) -> dict[str, Any]:
    cfg = load_config(None, {**BENCH, "out": str(root), "search.trials": trials, "search.latency_budget_ms": budget,
                             "search.predict_latency": mode, "search.max_budget_prunes": 10 * trials,
                             "train.folds": 2, "train.epochs": 1 if quick else 3})
    run = RunDir(cfg.out).prepare()
    shutil.copy(cache, run.latency_cache)  # an earlier run on this device filled it
    study = open_study(run, cfg)
    task = random_task(16 if quick else 48)
    start = time.perf_counter()
    with closing(open_device(cfg.device, run.latency_cache)) as device:
        objective = Objective(cfg, task, device, settings_from_config(cfg.device, cfg.seed), run,
                              on_trial=lambda s: None)
        run_trials(study, objective, trials)
        wall = time.perf_counter() - start
        misses, hits = device.misses, device.hits
        best = choose_best(study, cfg.search)
        # Each net dropped on its prediction, timed now: was it really over the budget?
        dropped = [t for t in study.trials if t.user_attrs.get("pruned_reason") == "predicted_over_budget"]
        wrong = []
        for t in dropped:
            cand = Candidate(Arch.from_dict(t.user_attrs["arch_dict"]), TILE)
            _, m, _, _ = measure_candidate(cand, task, device, settings_from_config(cfg.device, cfg.seed), None)
            if m.median_ms is not None and m.median_ms <= budget:
                wrong.append((t.user_attrs["arch"], t.user_attrs["latency_predicted_ms"], m.median_ms))
    fit = next((t.user_attrs["latency_predictor"] for t in reversed(study.trials)
                if "latency_predictor" in t.user_attrs), None)
    predictor = None
    if fit:
        predictor = (f"fitted on {fit['n']} nets ({fit['model']}), CV {pct(fit['cv_within_10'])} within ±10 %, "
                     f"MAPE {fit['cv_mape']:.1f} %, {'used' if fit['usable'] else 'not used'} for dropping")
    return {"mode": mode, "measured": misses, "cached": hits, "wall_s": wall, "best": best.user_attrs["arch"],
            "best_cv": best.user_attrs["cv_mean"], "best_std": best.user_attrs["cv_std"], "counts": trial_counts(study),
            "dropped": len(dropped), "wrong": wrong, "predictor": predictor}


# ---------------------------------------------------------------- report


def pct(v: float) -> str:
    return f"{100 * v:.0f} %"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the budget make bench runs")
    p.add_argument("--nets", type=int, default=None, help="random nets timed (default 200; quick 40)")
    p.add_argument("--trials", type=int, default=None, help="trials of each budgeted search (default 60; quick 12)")
    p.add_argument("--threads", type=int, default=1,
                   help="onnxruntime threads of every timing (device.threads, default 1): on a VM whose other vCPU "
                        "the host takes away now and then, two-thread timings of sub-ms nets swing 2-3x")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    BENCH["device.threads"] = a.threads  # every load_config of this run reads it
    nets = a.nets or (40 if a.quick else 200)
    trials = a.trials or (12 if a.quick else 60)
    curve = [n for n in (15, 30, 60, 120) if n <= int(0.75 * nets)]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)
    load_before = load()
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench_predictor_"))
    try:
        cache = tmp / "latency_cache.db"
        print(f"accuracy: timing {nets} random nets of the default space (load {load_before})", flush=True)
        records, blobs, t_measure = measure_nets(nets, cache)
        rng = np.random.default_rng(0)
        order = rng.permutation(len(records))
        records = [records[i] for i in order]
        cut = int(0.75 * len(records))
        train, test = records[:cut], records[cut:]
        truth = [r.latency_ms for r in test]
        pred = LatencyPredictor().fit(train)
        ours = accuracy([pred.predict(r.arch, r.size)[0] for r in test], truth)
        base = accuracy(macs_only(train, test), truth)
        print("  timing the test nets again (repeatability)", flush=True)
        again = accuracy(retest(test, blobs, cache), truth)
        rows = []
        for n in curve:
            pn = LatencyPredictor().fit(train[:n])
            acc = accuracy([pn.predict(r.arch, r.size)[0] for r in test], truth)
            rows.append((n, pn, acc))
        sizes64 = [r.latency_ms for r in records if r.size[0] == TILE]
        budget = statistics.median(sizes64)
        print(f"savings: two {trials}-trial searches, budget {budget:.3g} ms", flush=True)
        on = one_search(tmp / "on", cache, "auto", trials, budget, a.quick)
        off = one_search(tmp / "off", cache, "off", trials, budget, a.quick)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = load()
    saved = 1 - on["measured"] / off["measured"] if off["measured"] else 0.0
    same = on["best"] == off["best"]
    close = abs(on["best_cv"] - off["best_cv"]) <= max(off["best_std"], 1e-9)
    met_acc = ours.within_10 >= TARGET_WITHIN
    met_save = saved >= TARGET_SAVED and (same or close)
    cpu, ram = cpu_and_ram()
    lines = [
        f"# Latency predictor (issue #26){' — quick run' if a.quick else ''}",
        "",
        f"Machine: {platform.platform()}, {cpu}, {os.cpu_count()} CPUs, {ram}; Python {platform.python_version()}.",
        (f"**The machine was shared and loaded**: load average {load_before} before, {load_after} after. Every "
         "latency here was taken with the busy check off (otherwise every figure is flagged and none is learned "
         "from), so these numbers are this machine's noise as much as the predictor's error."
         if float(load_before.split(" / ")[0]) > 0.5 else
         f"Nothing else ran: load average {load_before} before; {load_after} after is this benchmark's own. "
         "The busy check is off (the benchmark's own training between timings would trip it)."),
        f"Every timing with device.threads {a.threads} (onnxruntime intra-op threads).",
        f"`python -m benchmarks.bench_predictor{' --quick' if a.quick else ''}"
        f"{f' --threads {a.threads}' if a.threads != 1 else ''}`: {len(records)} nets timed "
        f"({t_measure:.0f} s), {len(train)} to train on, {len(test)} to test on; total wall time "
        f"{time.perf_counter() - started:.0f} s.",
        "",
        "## Accuracy on held-out nets",
        "",
        "| | within ±10 % | MAPE |",
        "|---|---|---|",
        f"| predictor ({pred.kind}, fitted on {len(train)}) | {pct(ours.within_10)} | {ours.mape:.1f} % |",
        f"| MACs-only linear fit (baseline) | {pct(base.within_10)} | {base.mape:.1f} % |",
        f"| the device timing the same nets again (repeatability) | {pct(again.within_10)} | {again.mape:.1f} % |",
        "",
        f"Predictor's own 5-fold CV on the training nets: {pred.cv.text() if pred.cv else 'n/a'}; "
        f"{'usable for dropping' if pred.usable else 'NOT used for dropping: ' + pred.why_not()}. "
        f"Target: {pct(TARGET_WITHIN)} within ±10 % — {'met' if met_acc else 'missed'}.",
        "",
        "## Learning curve (same test nets)",
        "",
        "| training nets | model | within ±10 % | MAPE | CV within ±10 % | used for dropping |",
        "|---|---|---|---|---|---|",
        *[f"| {n} | {pn.kind} | {pct(acc.within_10)} | {acc.mape:.1f} % | "
          f"{pct(pn.cv.within_10) if pn.cv else 'n/a'} | {'yes' if pn.usable else 'no'} |" for n, pn, acc in rows],
        "",
        f"## Savings: budgeted search ({trials} trials, budget {budget:.3g} ms, same seed, same starting cache)",
        "",
        "| predict_latency | measurements made | answered by the cache | dropped on prediction (wrongly) | "
        "wall time of the trials | chosen net | its CV mIoU |",
        "|---|---|---|---|---|---|---|",
        *[f"| {r['mode']} | {r['measured']} | {r['cached']} | {r['dropped']} ({len(r['wrong'])}) | "
          f"{r['wall_s']:.0f} s | `{r['best']}` | {r['best_cv']:.3f} ± {r['best_std']:.3f} |" for r in (on, off)],
        "",
        f"Measurements saved: {pct(saved)} (target {pct(TARGET_SAVED)}); same chosen net: {'yes' if same else 'no'}"
        f"{'' if same else (' (within its fold std)' if close else ' (not within its fold std)')}. "
        f"Predictor at the end of the auto run: {on['predictor'] or f'never fitted (under {MIN_MEASUREMENTS} nets)'}.",
        *([f"Wrong drops (arch, predicted ms, measured ms): {on['wrong']}"] if on["wrong"] else []),
        "",
        "Wall times on this shared machine are not comparable between the two runs; the measurement counts are.",
    ]
    if not pred.usable and again.within_10 < TARGET_WITHIN:
        lines += ["", "**What holds it back here:** the predictor is not used for dropping when its cross-validated "
                  "share within ±10 % is under 80 %, and on this machine even the device timing the same net twice "
                  f"agrees within ±10 % only {pct(again.within_10)} of the time (MAPE {again.mape:.1f} %): no "
                  "predictor can be judged against figures that noisy. Run it where timings repeat (--threads 1)."]
    elif not met_acc:
        lines += ["", "**What holds it back here.** The device repeats its own timings "
                  f"({pct(again.within_10)} within ±10 %, MAPE {again.mape:.1f} %); the best fit, {pred.kind}, gets "
                  f"{pct(ours.within_10)} of the {len(test)} held-out nets within ±10 % (MAPE {ours.mape:.1f} %; "
                  f"MACs alone {pct(base.within_10)}, {base.mape:.1f} %), so each net is "
                  f"{100 / max(len(test), 1):.0f} points of that share. The learning curve above shows what more "
                  "measured nets add. "
                  + ("Its cross-validation on the training nets passed the 80 % bar, so it drops nets, each only "
                     "when its whole 95 % band is over the budget." if pred.usable else
                     "Until its cross-validated share reaches 80 % the predictor drops nothing, and the search "
                     "measures every net as before.")]
    if pred.kind and pred.kind.startswith("kernels/"):
        block = pred.kind.split("/b")[1]
        lines += ["", f"**How:** the model chosen by cross-validation is `{pred.kind}`: a net's latency as the sum of "
                  "its ops' times (autoseg.predictor.kernels: each conv, depthwise and 1x1 conv, pool, resize, "
                  "transposed conv and concat), an op's time as a speed per conv group times its MACs plus one "
                  f"cost per byte and one per op, with channels rounded up to blocks of {block}. onnxruntime's "
                  "x86 CPU convs run in a blocked channel layout (NCHWc), so on a 16-wide machine a 24-channel "
                  "conv costs what a 32-channel one does, while a conv reading fewer channels than a block (the "
                  "raw input, 8 channels) reads them plain, in kernels of their own speed "
                  "(predictor.reads_unblocked). MACs counted without that explain far less (the MACs-only row; "
                  "whole-net features got 46 % within ±10 % in the run before this model). Which block a device "
                  "works in is learned, not assumed: the fit tries 1, 4, 8 and 16 and keeps the best by "
                  "cross-validation."]
    text = "\n".join(lines) + "\n"
    a.out.parent.mkdir(parents=True, exist_ok=True)
    write_results(a.out, text)
    print(text)
    return 0 if met_acc and met_save else 1


if __name__ == "__main__":
    sys.exit(main())
