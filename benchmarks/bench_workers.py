"""Parallel search workers: nets per minute with `--workers W` against one process with all the cores.

    python -m benchmarks.bench_workers [--quick] [--workers 2] [--epochs 3] [--reps 60]

Both runs are `autoseg search` on ../shared/datasets/semantic_drone_224 with local latency and the same
budget, over a space of exactly 8 nets (2 levels, kernels 3/5, 16 channels, standard or separable), all
asked for and none pruned by the median rule, so both train the same nets (a sampler that keeps proposing
nets it has tried may end one short: the rate counts what each run did). The time is that of the trials
(first trial start to last trial end, from the study), so data and reps are not counted. Baseline: 1 worker
with every core (torch's default). Result: the ratio of nets per minute. There is no target in the issues;
the point is to know what --workers buys on this kind of machine.
Results go to benchmarks/results/workers.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from autoseg.workers import threads_per_worker
from benchmarks import DATA_ROOT, write_results
from benchmarks.bench_search import machine_info

RESULTS = Path(__file__).resolve().parent / "results" / "workers.md"
DATASET = "semantic_drone_224"
SPACE_NETS = 8


def trial_span(db: Path) -> tuple[float, int]:
    """Seconds from the first trial's start to the last one's end, and the number of finished trials."""
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT datetime_start, datetime_complete FROM trials WHERE state IN ('COMPLETE', "
                           "'PRUNED')").fetchall()
    starts = [datetime.fromisoformat(a) for a, _ in rows]
    ends = [datetime.fromisoformat(b) for _, b in rows]
    return (max(ends) - min(starts)).total_seconds(), len(rows)


def run(workers: int, args: argparse.Namespace, tmp: Path) -> dict:
    out = tmp / f"w{workers}"
    cfg = tmp / "space.yml"
    cfg.write_text(
        "search:\n  pruner: none\n  space:\n    levels: [2]\n    kernels: [3, 5]\n    channels: [16]\n"
        "    conv: [standard, separable]\n    upsample: [transpose]\n"
        "eval:\n  num_examples: 0\n"
    )
    data = DATA_ROOT / DATASET
    cmd = [sys.executable, "-m", "autoseg", "search", "--config", str(cfg), "--images", str(data / "images"),
           "--masks", str(data / "masks"), "--tile", "64", "--num-reps", str(args.reps), "--folds", "2",
           "--epochs", str(args.epochs), "--final-epochs", "1", "--final-data", "reps", "--trials", str(SPACE_NETS),
           "--workers", str(workers), "--out", str(out), "-q"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"autoseg search --workers {workers} failed:\n{proc.stderr[-2000:]}")
    span, finished = trial_span(out / "study.db")
    card = json.loads((out / "best" / "model_card.json").read_text())
    return {"workers": workers, "trials_s": span, "finished": finished, "distinct": card["trials"]["distinct"],
            "wall_s": wall, "nets_per_min": card["trials"]["distinct"] / span * 60, "best": card["arch"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the small budget of `make bench`")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=4, help="epochs per fold")
    p.add_argument("--reps", type=int, default=120)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.reps = 2, 60
    if not (DATA_ROOT / DATASET).is_dir():
        print(f"{DATA_ROOT / DATASET}: not found; set AUTOSEG_DATASETS", file=sys.stderr)
        return 2
    info = machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(1, args, Path(tmp)), run(args.workers, args, Path(tmp))]
    base, par = rows
    ratio = par["nets_per_min"] / base["nets_per_min"]
    cmd = "python -m benchmarks.bench_workers" + (" --quick" if args.quick else "")
    lines = [
        "# Parallel search workers",
        "",
        f"`{cmd}`",
        "",
        f"`autoseg search` on {DATASET}, tile 64, {args.reps} representatives, 2 folds x {args.epochs} epochs, "
        f"local latency, median pruning off; a space of exactly {SPACE_NETS} nets, all asked for, so both runs "
        "train the same nets (one may end a net short when its sampler keeps proposing nets it has tried). "
        "Time = first trial start to last trial end (data and reps not counted).",
        "",
        "| run | torch threads per worker | distinct nets | trials time | nets / min | vs 1 worker | chosen |",
        "|---|---|---|---|---|---|---|",
    ]
    cores = os.cpu_count() or 1
    for r in rows:
        threads = threads_per_worker(r["workers"], None)
        lines.append(f"| {r['workers']} worker(s) | {threads} | {r['distinct']} | {r['trials_s']:.1f} s | "
                     f"{r['nets_per_min']:.1f} | {r['nets_per_min'] / base['nets_per_min']:.2f}x | `{r['best']}` |")
    lines += [
        "",
        f"Result: {args.workers} workers look at {ratio:.2f}x the nets per minute of 1 worker with all {cores} cores.",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        f"- platform: {platform.platform()}",
        "",
    ]
    write_results(args.out, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
