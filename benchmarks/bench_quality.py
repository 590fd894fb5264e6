"""The shipped net's quality: trained on the representatives (the old final retrain) vs on all training images.

    python -m benchmarks.bench_quality [--part nets|scaling|all] [--datasets drone,isbi] [--seeds N] [--first-seed S]
                                       [--quick] [--variants reps,all,reference,distilled]

nets     On each dataset, the same held-out split and representatives as bench_search (tile 64, 120 reps):
         (a) the chosen net retrained on the representatives (train.final_data: reps, 120 epochs),
         (b) the same net trained by the new final training (train.final_data: all, the defaults),
         the reference U-Net (4 levels, base 32) trained as (b), and (c) the chosen net trained as (b) and
         distilled from that reference (train.teacher: its model.pt when this run trained it, else
         "reference", which trains the teacher first). Test mIoU on the held-out images,
         whole-image, through the exported ONNX model (pipeline.finalize does all of it), wall time.
         The split and the representatives are seed 0's; each of --seeds trains with its own seed.
         Targets: (b) beats (a) by a margin a user would notice on drone-224 (set here: +0.02 mIoU), the
         chosen net >= 0.24 test mIoU there, and the chosen net >= 90 % of the reference's test mIoU.
scaling  Peak RSS and wall time of the final training on synthetic datasets of 100, 1,000 and 10,000
         images (a subprocess each, the same fixed budget): the cache bounds memory, not the dataset, so
         peak RSS must stay flat (target: the largest <= 1.25x the smallest).

--quick is the budget `make bench` uses: drone only, small budgets. Results: benchmarks/results/quality.md
(or --out FILE).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from autoseg.pipeline import finalize
from autoseg.rundir import RunDir
from autoseg.unet import Arch
from benchmarks import DATA_ROOT, peak_rss_mb, write_results
from benchmarks.bench_search import REF_ARCH, TILE, fmt, machine_info, make_config, prepare_task

RESULTS = Path(__file__).resolve().parent / "results" / "quality.md"
DATASETS = {"drone": "semantic_drone_224", "isbi": "isbi2012_membrane"}
# The net the full search chose on the drone data (benchmarks/results/full/search.md).
CHOSEN = Arch((3, 3), (24, 64), "separable", "bilinear")
TARGET_GAIN = 0.02
TARGET_MIOU = 0.24
TARGET_REF_RATIO = 0.90
TARGET_RSS_RATIO = 1.25


@dataclasses.dataclass(frozen=True)
class Budget:
    reps: int
    final_epochs: int  # (a)
    final_tiles: int | None  # (b); None: the product's default
    variants: tuple[str, ...]  # of VARIANTS, in that order
    scaling_sizes: tuple[int, ...]
    scaling_tiles: int


DATA_SEED = 0  # of the held-out split and the representatives, as bench_search's; --seeds vary the training

# (a) reps, (b) all, the reference as (b), (c) distilled: (b) with the reference as teacher
VARIANTS = ("reps", "all", "reference", "distilled")
FULL = Budget(reps=120, final_epochs=120, final_tiles=None, variants=VARIANTS, scaling_sizes=(100, 1000, 10000),
              scaling_tiles=6400)
QUICK = Budget(reps=40, final_epochs=8, final_tiles=3200, variants=("reps", "all"), scaling_sizes=(100, 1000),
               scaling_tiles=640)


def train_variant(data: Path, root: Path, b: Budget, seed: int, arch: Arch, final_data: str,
                  teacher: str | None = None) -> dict[str, Any]:
    extra: dict[str, Any] = {"train.final_data": final_data, "train.teacher": teacher}
    if b.final_tiles is not None:
        extra["train.final_tiles"] = b.final_tiles
    # The held-out split and the representatives are seed 0's for every seed, so the seeds vary only the
    # training (its crops, validation split and initial weights) and their test mIoUs compare.
    cfg = make_config(data, root, SimpleNamespace(reps=b.reps, trials=1, folds=3, epochs=None,
                                                  final_epochs=b.final_epochs), DATA_SEED, None, **extra)
    run = RunDir(root).prepare()
    stage, task = prepare_task(cfg, run)
    trial = SimpleNamespace(number=0, user_attrs={"arch_dict": arch.to_dict(), "tile": TILE})
    start = time.perf_counter()
    card = finalize(dataclasses.replace(cfg, seed=seed), run, stage, task, trial)
    training = card.get("training") or {}
    return {"arch": arch.key(), "data": final_data + ("+distilled" if teacher else ""), "seed": seed,
            "test_miou": card["test_miou"],
            "seconds": time.perf_counter() - start, "tile_passes": training.get("tile_passes"),
            "stopped": training.get("stopped"), "best_val_miou": training.get("best_val_miou"),
            "images": training.get("images"), "test_images": card["test_images"]}


def part_nets(name: str, root: Path, b: Budget, seeds: list[int], out: Path, info: dict) -> list[dict[str, Any]]:
    data = DATA_ROOT / DATASETS[name]
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        ref_dir = root / name / f"{REF_ARCH.key()}-all-s{seed}"
        for v in b.variants:
            arch, final_data = (REF_ARCH, "all") if v == "reference" else (CHOSEN, "reps" if v == "reps" else "all")
            teacher = None
            if v == "distilled":  # the reference this run trained, or one trained first as the teacher
                model = ref_dir / "best" / "model.pt"
                teacher = str(model) if model.is_file() else "reference"
            folder = ref_dir if v == "reference" else root / name / f"{arch.key()}-{v}-s{seed}"
            r = train_variant(data, folder, b, seed, arch, final_data, teacher)
            r["dataset"] = name
            rows.append(r)
            print(f"{name} {r['arch']} on {final_data}, seed {seed}: test mIoU {fmt(r['test_miou'], '.4f')} "
                  f"in {r['seconds']:.0f} s", flush=True)
            write_report(out, info, b, rows, None)  # a long run keeps what it has
    return rows


SCALING_CHILD = """
import sys, json, resource, time, numpy as np, torch
from pathlib import Path
from autoseg.config import load_config
from autoseg.data import scan_dataset
from autoseg.final_train import *
from autoseg.train import training_settings
from autoseg.unet import Arch, build_unet
from benchmarks import peak_rss_mb
root, tiles, cache_mb = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
cfg = load_config(overrides={"train.final_tiles": tiles, "train.patience": 0, "train.val_fraction": 0.0,
                             "train.cache_mb": cache_mb})
ds = scan_dataset(root / "images", root / "masks", cfg.data)
ids = np.arange(len(ds.pairs))
t0 = time.perf_counter()
pixels = image_class_pixels(ds, ids, None)
arch = Arch((3, 3), (24, 64), "separable", "bilinear")
workers = loader_workers(cfg.train, ds, ids)
fs = final_settings(cfg.train, training_settings(cfg.train, 0, None, 0), 64, FINAL_MAX_BATCH, workers)
torch.manual_seed(0)
train_final(build_unet(arch, ds.channels, ds.class_map.num_classes), ds, ids, ids[:0], pixels, fs)
# ru_maxrss of the children: the largest loader worker's peak, each worker holding its own cache
print(json.dumps({"seconds": time.perf_counter() - t0, "workers": workers, "maxrss_mb": peak_rss_mb(),
                  "worker_maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def synthetic(root: Path, n: int, side: int = 256, classes: int = 6) -> Path:
    """n images of side x side with blobs of `classes` classes; written once, reused by later runs."""
    from PIL import Image

    folder = root / f"synthetic{n}"
    if (folder / "done").exists():
        return folder
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:side, :side]
    for i in range(n):
        mask = np.zeros((side, side), np.uint8)
        for c in range(1, classes):
            cy, cx, r = [*rng.integers(0, side, 2).tolist(), int(rng.integers(8, side // 4))]
            mask[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = c
        img = (rng.normal(0, 12, (side, side, 3)) + (mask[..., None] * 37 % 255)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / "images" / f"{i:05d}.png")
        Image.fromarray(mask).save(folder / "masks" / f"{i:05d}.png")
    (folder / "done").write_text("")
    return folder


# Smaller than the smallest dataset's decoded images (100 x 256² x 5 bytes = 33 MB), so every size runs the same
# way (a full cache, loader workers reading the rest from disk) and only what grows with the dataset can show.
SCALING_CACHE_MB = 16


def part_scaling(root: Path, b: Budget) -> list[dict[str, Any]]:
    rows = []
    for n in b.scaling_sizes:
        folder = synthetic(root, n)
        out = subprocess.run([sys.executable, "-c", SCALING_CHILD, str(folder), str(b.scaling_tiles),
                              str(SCALING_CACHE_MB)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["images"] = n
        rows.append(r)
        print(f"scaling: {n} images, {r['seconds']:.0f} s, peak RSS {r['maxrss_mb']:.0f} MB", flush=True)
    return rows


def write_report(path: Path, info: dict, b: Budget, rows: list[dict[str, Any]], scaling: list[dict] | None) -> int:
    lines = ["# Final training quality: representatives vs all training images", "",
             f"Command: `python -m benchmarks.bench_quality {' '.join(sys.argv[1:])}`", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), "",
             f"Budget: {b}", ""]
    missed = 0
    if rows:
        lines += ["| dataset | net | final data | seed | crops seen | stopped | best val mIoU | test mIoU | time |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['dataset']} | {r['arch']} | {r['data']} | {r['seed']} | {r['tile_passes'] or '-'} | "
                         f"{r['stopped'] or '-'} | {fmt(r['best_val_miou'], '.4f')} | {fmt(r['test_miou'], '.4f')} | "
                         f"{r['seconds']:.0f} s |")
        lines.append("")
        for ds in sorted({r["dataset"] for r in rows}):
            def mean(arch: str, data: str, ds: str = ds) -> float | None:
                v = [r["test_miou"] for r in rows if r["dataset"] == ds and r["arch"] == arch and r["data"] == data]
                return float(np.mean(v)) if v else None

            a, bb, ref = mean(CHOSEN.key(), "reps"), mean(CHOSEN.key(), "all"), mean(REF_ARCH.key(), "all")
            c = mean(CHOSEN.key(), "all+distilled")
            lines.append(f"**{ds}** (means over seeds): (a) reps {fmt(a, '.4f')}, (b) all data {fmt(bb, '.4f')}, "
                         f"(c) distilled {fmt(c, '.4f')}, reference on all data {fmt(ref, '.4f')}.")
            if a is not None and bb is not None:
                gain = bb - a
                ok = gain >= TARGET_GAIN
                lines.append(f"- (b) - (a) = {gain:+.4f} (target >= +{TARGET_GAIN}): {'met' if ok else 'missed'}")
                missed += ds == "drone" and not ok
            if ds == "drone" and bb is not None:
                ok = bb >= TARGET_MIOU
                lines.append(f"- chosen net on all data {bb:.4f} (target >= {TARGET_MIOU}): "
                             f"{'met' if ok else 'missed'}")
                missed += not ok
            if ref is not None and bb is not None:
                ratio = bb / ref
                ok = ratio >= TARGET_REF_RATIO
                lines.append(f"- chosen / reference = {ratio:.3f} (target >= {TARGET_REF_RATIO}): "
                             f"{'met' if ok else 'missed'}")
                missed += not ok
            if c is not None and bb is not None:  # no target: distillation is kept only if it helps
                lines.append(f"- (c) - (b) = {c - bb:+.4f}: distillation {'helped' if c > bb else 'did not help'}")
            lines.append("")
    if scaling:
        lines += ["## Scaling with dataset size (synthetic 256x256 images, fixed budget)", "",
                  f"train.cache_mb {SCALING_CACHE_MB:g}: under every dataset's decoded size, so the cache is full "
                  "in every run and what grows with the dataset shows.", "",
                  "| images | loader workers | wall time | peak RSS | largest worker's peak RSS |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['images']} | {r['workers']} | {r['seconds']:.0f} s | {r['maxrss_mb']:.0f} MB | "
                  f"{r['worker_maxrss_mb']:.0f} MB |" for r in scaling]
        # main + largest worker: an upper bound on what the training held at once (shared pages counted twice)
        total = [r["maxrss_mb"] + r["worker_maxrss_mb"] for r in scaling]
        ratio = total[-1] / total[0]
        ok = ratio <= TARGET_RSS_RATIO
        lines += ["", f"Peak RSS (main + largest worker), largest / smallest dataset: {ratio:.2f}x "
                  f"(target <= {TARGET_RSS_RATIO}x): {'met' if ok else 'missed'}", ""]
        missed += not ok
    write_results(path, "\n".join(lines) + "\n")
    return int(missed > 0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["nets", "scaling", "all"], default="all")
    p.add_argument("--datasets", default=None, help="comma-separated: drone,isbi (default: drone; --quick: drone)")
    p.add_argument("--seeds", type=int, default=1, help="training seeds per variant")
    p.add_argument("--first-seed", type=int, default=0,
                   help="the seeds run are first-seed .. first-seed+seeds-1 (to add seeds to an earlier run)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--work", type=Path, default=None, help="where runs are kept (default: a temp dir)")
    p.add_argument("--final-tiles", type=int, default=None,
                   help="crops of (b) and the reference (default: the product's own default; --quick: 3200)")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated, of {','.join(VARIANTS)} (default: all four; --quick: reps,all)")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the reference U-Net and distillation (the longest trainings)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    b = QUICK if args.quick else FULL
    if args.final_tiles is not None:
        b = dataclasses.replace(b, final_tiles=args.final_tiles)
    if args.variants:
        chosen = args.variants.split(",")
        if bad := [v for v in chosen if v not in VARIANTS]:
            p.error(f"--variants: unknown {','.join(bad)}; choose from {','.join(VARIANTS)}")
        b = dataclasses.replace(b, variants=tuple(v for v in VARIANTS if v in chosen))
    if args.no_reference:
        b = dataclasses.replace(b, variants=tuple(v for v in b.variants if v not in ("reference", "distilled")))
    info = machine_info()
    names = (args.datasets or "drone").split(",")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_quality_"))
    rows: list[dict[str, Any]] = []
    if args.part in ("nets", "all"):
        for name in names:
            rows += part_nets(name, work, b, list(range(args.first_seed, args.first_seed + args.seeds)), args.out, info)
    scaling = part_scaling(work, b) if args.part in ("scaling", "all") else None
    code = write_report(args.out, info, b, rows, scaling)
    print(args.out.read_text())
    print(f"peak RSS of this process {peak_rss_mb():.0f} MB; "
          f"runs in {work}; pid {os.getpid()}")
    return code


if __name__ == "__main__":
    sys.exit(main())
