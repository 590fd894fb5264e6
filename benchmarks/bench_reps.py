"""Representative tiles against random tiles and against all tiles, scored on held-out full images.

    python -m benchmarks.bench_reps [--quick] [--datasets drone,isbi] [--seeds 3] [--num-reps 200]
                                    [--tile 64] [--steps 2000] [--embedders handcrafted,cnn]

--quick (what `make bench` runs) trains 100 steps instead of 2000: about 5 minutes on 2 idle cores. The
full budget is 2000 steps: at 600 the net is still far from trained (drone test mIoU about 0.11 with
any of the three sets, reps 0.007 below random), so which tiles it saw cannot show yet; at 2000 it
reaches 0.15-0.16 and the sets separate (see benchmarks/results/full/reps.md).

Per dataset (read in place from ../shared/datasets, or $AUTOSEG_DATASETS): scan_dataset with the
DataConfig defaults, split_by_image(test_fraction 0.2, seed 0) into training and held-out test images,
build_index over the training images, then three training sets:

  reps    R tiles from autoseg.reps.build_reps (default RepsConfig: handcrafted embedder, class-aware)
  random  R tiles drawn uniformly without replacement from the same tile index
  all     every tile of the index

Each trains the same net from the same initial weights for the same number of optimiser steps of the
same batch size: the set is repeated, reshuffled each pass, and cut to steps x batch samples, then
given to autoseg.train.train_model as one epoch (so the cosine schedule spans exactly those steps).
"all" therefore sees each tile fewer times than the R-tile sets. The trained net predicts every
held-out image whole (autoseg.infer.evaluate, torch runner); the score is the mIoU of the summed
confusion matrix. The seed changes the clustering, the random draw, the sample stream and the
initial weights; the split stays fixed.

Targets: reps >= random + 0.02 mIoU, and reps >= 90% of the all-tiles mIoU (means over the seeds).
Exit code 0 if every target passes, 1 if one fails, 2 if no dataset could be read.
Results go to benchmarks/results/reps.md.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from autoseg.config import DataConfig, RepsConfig, TrainConfig
from autoseg.data import Dataset, scan_dataset, split_by_image
from autoseg.infer import evaluate, torch_runner
from autoseg.reps import RepSet, build_reps, rep_arrays
from autoseg.tiles import TileIndex, build_index
from autoseg.train import train_model, training_settings
from autoseg.unet import Arch, build_unet, count_params
from benchmarks import DATA_ROOT, write_results

DATASETS = {"drone": "semantic_drone_224", "isbi": "isbi2012_membrane"}
RESULTS = Path(__file__).resolve().parent / "results" / "reps.md"
# The middle of the default search space (levels 2-4, kernels 3/5, channels 8-64): a net the
# search would plausibly pick, big enough to learn 24 drone classes, cheap enough to train
# 3 methods x 3 seeds x 2 datasets on a 2-core CPU.
ARCH = Arch(kernels=(3, 3, 3), channels=(16, 32, 64))
BATCH = 8
OVERLAP = 0.25  # the product default (TilesConfig.overlap)
SPLIT_SEED = 0
TEST_FRACTION = 0.2
MARGIN = 0.02  # reps must beat random by this much mIoU
RATIO = 0.90  # ... and reach this share of the all-tiles mIoU
FULL = {"steps": 2000, "seeds": 3}
QUICK = {"steps": 100, "seeds": 3}


@dataclass
class Outcome:
    """One method on one dataset: a score per seed."""

    method: str
    miou: list[float] = field(default_factory=list)
    pixel_acc: list[float] = field(default_factory=list)
    distinct: list[int] = field(default_factory=list)  # distinct tiles in the sample stream
    classes: list[int] = field(default_factory=list)  # classes present in the training tiles
    seconds: list[float] = field(default_factory=list)  # selection + training + evaluation

    @property
    def mean(self) -> float:
        return statistics.fmean(self.miou)

    @property
    def std(self) -> float:
        return statistics.stdev(self.miou) if len(self.miou) > 1 else 0.0


# ---------------------------------------------------------------- data


def resolve_dataset(name: str) -> Path:
    path = Path(name)
    if path.is_dir():
        return path
    return DATA_ROOT / DATASETS.get(name, name)


def subset(index: TileIndex, rows: np.ndarray, k: int) -> RepSet:
    """A RepSet over arbitrary rows of the index, so every method loads tiles through rep_arrays."""
    rows = np.asarray(rows, dtype=np.int64)
    return RepSet(
        tile=index.tile, rows=rows, image=index.image[rows].copy(), y=index.y[rows].copy(),
        x=index.x[rows].copy(), cluster=np.zeros(len(rows), np.int32),
        class_hist=np.zeros((len(rows), k), np.float32), n_tiles=len(index), n_after_dedup=len(index),
        n_clusters=0,
    )


def sample_stream(n_set: int, samples: int, seed: int) -> np.ndarray:
    """Positions into a set of `n_set` tiles: whole reshuffled passes, cut to `samples`.

    Every tile appears floor or ceil(samples / n_set) times; with samples <= n_set the stream is a
    uniform draw of distinct tiles.
    """
    rng = np.random.default_rng(seed)
    passes = math.ceil(samples / n_set)
    return np.concatenate([rng.permutation(n_set) for _ in range(passes)])[:samples]


# ---------------------------------------------------------------- one run


def train_and_score(
    ds: Dataset, index: TileIndex, rows: np.ndarray, test_ids: np.ndarray, steps: int, seed: int, threads: int
) -> tuple[float, float, int, int]:
    """(test mIoU, pixel accuracy, distinct tiles trained on, classes present in them)."""
    k = ds.class_map.num_classes
    stream = sample_stream(len(rows), steps * BATCH, seed)
    used = np.unique(stream)  # load only the tiles the stream touches
    x_set, y_set, _ = rep_arrays(ds, subset(index, np.asarray(rows)[used], k))
    pos = np.searchsorted(used, stream)
    x, y = x_set[pos], y_set[pos]
    del x_set
    present = int((np.bincount(y_set[y_set >= 0].ravel(), minlength=k) > 0).sum())

    cfg = TrainConfig(batch_size=BATCH, threads=threads)
    settings = training_settings(cfg, seed, None, epochs=1)
    torch.manual_seed(seed)  # same initial weights for every method of this seed
    model = build_unet(ARCH, ds.channels, k)
    train_model(model, x, y, k, settings)
    del x, y
    res = evaluate(torch_runner(model), ds, test_ids, "whole", index.tile, OVERLAP, 8, ARCH.multiple)
    return float(res["mean"]["miou"]), float(res["mean"]["pixel_acc"]), len(used), present


def bench_dataset(
    name: str, seeds: list[int], num_reps: int, tile: int, steps: int, embedders: list[str], threads: int,
    cache: Path,
) -> dict:
    root = resolve_dataset(name)
    t0 = time.perf_counter()
    ds = scan_dataset(root / "images", root / "masks", DataConfig())
    train_ids, test_ids = split_by_image(len(ds.pairs), TEST_FRACTION, SPLIT_SEED)
    index = build_index(ds.sizes, tile, OVERLAP, images=train_ids)
    scan_s = time.perf_counter() - t0
    k = ds.class_map.num_classes
    print(
        f"\n== {root.name}: {len(ds.pairs)} images ({len(train_ids)} train / {len(test_ids)} test), "
        f"{ds.channels} channel(s), {k} classes, {len(index)} training tiles of {tile} px "
        f"(scan+index {scan_s:.1f} s)",
        flush=True,
    )
    r = min(num_reps, len(index))
    methods = [f"reps:{e}" for e in embedders] + ["random", "all"]
    out = {m: Outcome(m) for m in methods}
    for seed in seeds:
        for m in methods:
            t = time.perf_counter()
            if m.startswith("reps:"):
                cfg = RepsConfig(num_reps=r, embedder=m.split(":", 1)[1])
                rows = build_reps(ds, index, cfg, seed, cache).rows
            elif m == "random":
                rows = np.random.default_rng(seed).choice(len(index), r, replace=False)
            else:
                rows = np.arange(len(index))
            miou, acc, distinct, present = train_and_score(ds, index, rows, test_ids, steps, seed, threads)
            o = out[m]
            o.miou.append(miou)
            o.pixel_acc.append(acc)
            o.distinct.append(distinct)
            o.classes.append(present)
            o.seconds.append(time.perf_counter() - t)
            print(
                f"  seed {seed} {m:<17} mIoU {miou:.4f}  pixel acc {acc:.4f}  {distinct:>5} distinct tiles, "
                f"{present} classes  ({o.seconds[-1]:.1f} s)",
                flush=True,
            )
    return {
        "name": root.name, "images": len(ds.pairs), "train": len(train_ids), "test": len(test_ids),
        "channels": ds.channels, "classes": k, "tiles": len(index), "reps": r, "outcomes": out,
        "minutes": (time.perf_counter() - t0) / 60, "params": count_params(build_unet(ARCH, ds.channels, k)),
    }


# ---------------------------------------------------------------- verdicts and report


def verdicts(res: dict, primary: str) -> list[tuple[str, str, str, bool]]:
    """(check, value, target, passed) for the primary reps method of one dataset."""
    o = res["outcomes"]
    reps, rnd, allt = o[primary], o["random"], o["all"]
    diffs = [a - b for a, b in zip(reps.miou, rnd.miou, strict=True)]
    d_std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    ratio = reps.mean / allt.mean if allt.mean > 0 else float("inf")
    return [
        (
            "reps - random mIoU",
            f"{reps.mean - rnd.mean:+.4f} (paired per seed: {statistics.fmean(diffs):+.4f} ± {d_std:.4f})",
            f">= +{MARGIN:.2f}",
            reps.mean >= rnd.mean + MARGIN,
        ),
        ("reps / all-tiles mIoU", f"{ratio:.3f}", f">= {RATIO:.2f}", ratio >= RATIO),
    ]


def machine_info(threads: int) -> str:
    return (
        f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"Python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}, "
        f"{threads} torch thread(s); 1-minute load average at start {os.getloadavg()[0]:.1f}"
    )


def markdown(results: list[dict], primary: str, command: str, params: dict, machine: str, total_s: float) -> str:
    lines = [
        "# Representative tiles vs random tiles vs all tiles",
        "",
        f"`{command}`",
        "",
        f"Net {ARCH.key()}, batch {BATCH}, {params['steps']} optimiser steps "
        f"per training (every method), AdamW lr 3e-3 with cosine decay, flips/rotations, CE + Dice; "
        f"tile {params['tile']} px, overlap {OVERLAP}; held-out {TEST_FRACTION:.0%} of the images "
        f"(split seed {SPLIT_SEED}) predicted whole; seeds {params['seeds']}. mIoU of the summed confusion "
        f"matrix over the test images, mean ± std over the seeds.",
        "",
    ]
    for res in results:
        o = res["outcomes"]
        base = o["random"].mean
        lines += [
            f"## {res['name']}",
            "",
            f"{res['images']} images ({res['train']} train / {res['test']} test), {res['channels']} channel(s), "
            f"{res['classes']} classes; {res['tiles']:,} training tiles; R = {res['reps']}; "
            f"net {res['params']:,} parameters.",
            "",
            "| training set | tiles | passes per tile | classes in trained tiles | test mIoU | per seed | "
            "vs random | vs all | pixel acc |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for m, oc in o.items():
            n_set = res["tiles"] if m == "all" else res["reps"]
            passes = params["steps"] * BATCH / n_set
            label = {"random": "random R", "all": "all tiles"}.get(m) or f"reps R ({m.split(':')[1]})"
            lines.append(
                f"| {label} | {n_set:,} | {passes:.2f} | {statistics.fmean(oc.classes):.1f} | "
                f"{oc.mean:.4f} ± {oc.std:.4f} | {', '.join(f'{v:.4f}' for v in oc.miou)} | "
                f"{oc.mean / base:.3f}x | {oc.mean / o['all'].mean:.3f}x | {statistics.fmean(oc.pixel_acc):.4f} |"
            )
        lines += ["", f"Targets, judged on reps ({primary.split(':')[1]}):", "",
                  "| check | value | target | result |", "| --- | --- | --- | --- |"]
        for check, value, target, ok in verdicts(res, primary):
            lines.append(f"| {check} | {value} | {target} | {'PASS' if ok else 'FAIL'} |")
        lines += ["", f"Wall time {res['minutes']:.1f} min.", ""]
    lines += [f"Machine: {machine}.", "", f"Total wall time {total_s / 60:.1f} min.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI


def parse_seeds(text: str) -> list[int]:
    """"3" -> [0, 1, 2]; "0,5,7" -> those seeds."""
    if "," in text:
        return [int(s) for s in text.split(",") if s.strip()]
    return list(range(int(text)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="drone,isbi", help="comma list: drone, isbi, a folder name or a path")
    p.add_argument("--seeds", default=None, help="a count (3 -> seeds 0,1,2) or a comma list")
    p.add_argument("--num-reps", type=int, default=200, help="R, the size of the reps and random sets")
    p.add_argument("--tile", type=int, default=64)
    p.add_argument("--steps", type=int, default=None, help=f"optimiser steps per training (default {FULL['steps']})")
    p.add_argument("--quick", action="store_true", help=f"small budget for make bench: {QUICK['steps']} steps")
    p.add_argument("--embedders", default="handcrafted", help="reps embedders, comma list of handcrafted, cnn; "
                   "the first one is judged against the targets")
    # One thread by default: with other jobs on a 2-core machine, two OpenMP threads spin-wait and
    # train ~5x slower; on an idle machine two are only ~1.5x faster.
    p.add_argument("--threads", type=int, default=1, choices=(1, 2), help="torch threads")
    p.add_argument("--out", type=Path, default=RESULTS, help="markdown results file")
    a = p.parse_args(argv)

    budget = QUICK if a.quick else FULL
    steps = a.steps if a.steps is not None else budget["steps"]
    seeds = parse_seeds(a.seeds) if a.seeds is not None else list(range(budget["seeds"]))
    embedders = [e.strip() for e in a.embedders.split(",") if e.strip()]
    if not embedders or any(e not in ("handcrafted", "cnn") for e in embedders):
        p.error(f"--embedders: expected a comma list of handcrafted, cnn; got {a.embedders!r}")
    if steps < 1 or a.num_reps < 1 or not seeds:
        p.error("--steps and --num-reps must be >= 1, and --seeds must name at least one seed")
    threads = a.threads
    torch.set_num_threads(threads)
    machine = machine_info(threads)
    print(f"Machine: {machine}")
    print(f"Net {ARCH.key()}, batch {BATCH}, {steps} steps per training, seeds {seeds}, R = {a.num_reps}, "
          f"tile {a.tile}")

    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-reps-") as tmp:
        for name in [d.strip() for d in a.datasets.split(",") if d.strip()]:
            root = resolve_dataset(name)
            if not (root / "images").is_dir() or not (root / "masks").is_dir():
                print(f"\n== {name}: SKIPPED, {root}/images and {root}/masks not found", flush=True)
                continue
            results.append(bench_dataset(name, seeds, a.num_reps, a.tile, steps, embedders, threads, Path(tmp)))
    total = time.perf_counter() - t0
    if not results:
        print("no dataset could be read; set AUTOSEG_DATASETS or pass --datasets PATH", file=sys.stderr)
        return 2

    primary = f"reps:{embedders[0]}"
    all_ok = True
    print()
    for res in results:
        o = res["outcomes"]
        print(f"{res['name']}:")
        for m, oc in o.items():
            print(f"  {m:<17} mIoU {oc.mean:.4f} ± {oc.std:.4f}   ({oc.mean / o['random'].mean:.3f}x random, "
                  f"{oc.mean / o['all'].mean:.3f}x all)")
        for check, value, target, ok in verdicts(res, primary):
            all_ok &= ok
            print(f"  {'PASS' if ok else 'FAIL'}  {check}: {value} (target {target})")
    print(f"\nTotal {total / 60:.1f} min")

    argv_text = " ".join(sys.argv[1:]) if argv is None else " ".join(argv)
    command = f"python -m benchmarks.bench_reps {argv_text}".strip()
    params = {"steps": steps, "tile": a.tile, "seeds": seeds}
    machine += f"; load average at the end {os.getloadavg()[0]:.1f}"
    write_results(a.out, markdown(results, primary, command, params, machine, total))
    print(f"wrote {a.out}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
