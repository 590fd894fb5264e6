"""`make bench`: every benchmark with a small budget, one after another, so none measures under another's load.

Each writes benchmarks/results/<name>.md; this script adds results/summary.md: which met their targets, and wall times.
Full-budget runs, on which the targets are judged, are kept in results/full/ (written there with --out).
Run one on its own, with flags for a bigger budget: `python -m benchmarks.bench_search --help`.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
VERDICT = {0: "all met", 1: "some missed (see file)"}  # the benchmarks' exit codes

# (module, flags for the small budget, results file, what it measures)
SUITE = [
    ("benchmarks.bench_tiles", [], "tiles.md", "tile indexing: throughput, peak RSS, ratio to a ResNet-18 embedding"),
    ("benchmarks.bench_infer", [], "inference.md", "inference: seed-style loop vs whole image and batched windows"),
    ("benchmarks.bench_latency", ["--quick"], "latency.md", "latency: SSH overhead vs local, repeatability"),
    ("benchmarks.bench_reps", ["--quick"], "reps.md", "representative vs random vs all tiles, test mIoU over 3 seeds"),
    ("benchmarks.bench_search", ["--quick"], "search.md", "a small real search; latency-first pruning vs train-first"),
    ("benchmarks.bench_search", ["--part", "clock", "--quick"], "clock.md",
     "the user's clock: small nets first, pruning after a fold, --max-minutes"),
    ("benchmarks.bench_step_cost", [], "clock_cost.md",
     "the clock's training-step cost model: predicted from the 3 calibrated nets vs measured, vs MACs alone"),
    ("benchmarks.bench_fidelity", ["--quick"], "fidelity.md", "CV epochs per fold vs the final ranking of nets"),
    ("benchmarks.bench_workers", ["--quick"], "workers.md", "search workers: nets per minute, 2 processes vs 1"),
    ("benchmarks.bench_memory", [], "memory.md",
     "predict: peak RSS by image size (2000², 6000x4000, 10000²), vs the whole-image accumulator"),
    ("benchmarks.bench_quality", ["--quick"], "quality.md",
     "the shipped net: trained on the representatives vs on all training images; peak RSS vs dataset size"),
    ("benchmarks.bench_predictor", ["--quick"], "predictor.md",
     "latency predictor: held-out accuracy vs MACs-only, learning curve, measurements saved in a budgeted search"),
    ("benchmarks.bench_distributed", ["--quick"], "distributed.md",
     "one study on PostgreSQL: 2 processes vs 1, storage ms per trial, a pool of 3 devices vs 1, a killed worker"),
]


def main(argv: list[str] | None = None) -> int:
    only = set(argv if argv is not None else sys.argv[1:])
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = []
    for module, flags, result, what in SUITE:
        name = module.split(".")[-1]
        if only and name not in only:
            continue
        print(f"\n=== {name}: {what}", flush=True)
        start = time.perf_counter()
        code = subprocess.call([sys.executable, "-m", module, *flags])
        rows.append((name, result, what, code, time.perf_counter() - start))
    lines = [
        "# Benchmark summary",
        "",
        f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}",
        "",
        "| benchmark | what | targets | wall time |",
        "|---|---|---|---|",
    ]
    lines += [f"| [{n}]({r}) | {w} | {VERDICT.get(c, f'crashed (exit {c})')} | {t:.0f} s |" for n, r, w, c, t in rows]
    total = sum(t for *_, t in rows)
    lines += ["", f"Total wall time {total / 60:.1f} min."]
    (RESULTS / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    # A missed target is a result, written above; only a benchmark that could not run fails `make bench`.
    return max((c for *_, c, _ in rows if c not in VERDICT), default=0)


if __name__ == "__main__":
    sys.exit(main())
