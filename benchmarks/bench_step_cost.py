"""The clock's training-step cost model (issue #21's ETA): how well the nets plan_search times predict the others.

    python -m benchmarks.bench_step_cost [--nets N] [--threads T] [--out FILE]

plan_search times a few training steps of the space's corner nets and prices every other net from them. This times
the same corners (the smallest and the largest by MACs, and the separable net with the most depthwise MACs) and N
nets of the default space (search.space defaults, tile 64, 24 classes, the batch a fold of 133 tiles trains at,
as at autoseg's default 200 representatives), each for a few steps on random tiles, and compares each net's
measured seconds a tile with two models fitted on the corners alone:
- MACs: the line through the smallest and the largest net (the clock before depthwise convs were priced apart);
- MACs + depthwise: fit_step_cost through all three corners (dense and depthwise MACs priced apart).

Reported: predicted / measured per net, its median and range, by conv type, and for the sum over the nets (what an
ETA adds up). `make bench` runs it with 8 nets; results/full/clock_cost.md has 36. Each net is timed here as its
whole step over its batch; calibrate also splits off a fixed cost per step from two batches of the smallest net.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from autoseg.config import Config, config_from_dict
from autoseg.search import Candidate, fit_step_cost, net_work, space_corners, space_pool
from autoseg.train import auto_batch_size, train_model, training_settings
from autoseg.unet import build_unet
from benchmarks import write_results

RESULTS = Path(__file__).resolve().parent / "results" / "clock_cost.md"
CLASSES, TILE_FIT, STEPS = 24, 133, 3


def work(c: Candidate) -> tuple[float, float]:
    return net_work(c.arch, 3, CLASSES, c.tile)


def tile_seconds(c: Candidate, cfg: Config) -> tuple[float, int]:
    """Median seconds of a training step over its tiles (after an untimed step), and the batch."""
    bs = min(auto_batch_size(c.arch, 3, CLASSES, c.tile, TILE_FIT), TILE_FIT)
    rng = np.random.default_rng(0)
    x = rng.random((bs, 3, c.tile, c.tile), dtype=np.float32)
    y = rng.integers(0, CLASSES, (bs, c.tile, c.tile))
    s = replace(training_settings(cfg.train, 0, None, epochs=1 + STEPS), batch_size=bs)
    ends: list[float] = []
    train_model(build_unet(c.arch, 3, CLASSES), x, y, CLASSES, s,
                on_epoch=lambda _d, _s: ends.append(time.perf_counter()))
    return float(np.median(np.diff(ends))) / bs, bs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the clock bench's searches use 1)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = config_from_dict({"tiles": {"size": 64}})
    small, large = space_corners(cfg, lambda c: int(work(c)[0]))
    _, heavy = space_corners(cfg, lambda c: int(work(c)[1]))
    corners = {"smallest": small, "largest": large}
    if work(heavy)[1] > 0 and heavy not in (small, large):  # as plan_search picks them
        corners["depthwise-heaviest"] = heavy
    pool = sorted(space_pool(cfg), key=lambda cp: work(cp[0])[0])
    picks = np.linspace(0, len(pool) - 1, a.nets).round().astype(int)  # evenly over the space's MACs
    nets = [pool[i][0] for i in dict.fromkeys(picks.tolist())]
    timed = {}
    for c in [*corners.values(), *nets]:
        timed[c] = tile_seconds(c, cfg)
        print(f"{c.arch.key():45s} {work(c)[0] / 1e6:8.1f} MMACs {1000 * timed[c][0]:7.1f} ms a tile", flush=True)
    point = {name: (*work(c), timed[c][0]) for name, c in corners.items()}
    models = {
        "MACs (line through smallest and largest)": fit_step_cost([(m, 0.0, y) for m, _, y in
                                                                   (point["smallest"], point["largest"])]),
        "MACs + depthwise (fit_step_cost on the corners)": fit_step_cost(list(point.values())),
    }
    lines = [
        "# The clock's step cost: predicted from the corners against measured",
        "",
        f"`python -m benchmarks.bench_step_cost {' '.join(sys.argv[1:] if argv is None else argv)}`",
        "",
        f"Default search space, tile 64, {CLASSES} classes, torch threads {a.threads}, {STEPS} timed steps a net "
        f"after one untimed, at the batch a fold of {TILE_FIT} tiles trains at; {len(nets)} nets evenly spread over "
        "the space's MACs. The corners plan_search times:",
        "",
        "| corner | net | MMACs | of them depthwise | ms a tile |",
        "|---|---|---|---|---|",
        *[f"| {n} | `{c.arch.key()}` | {point[n][0] / 1e6:.1f} | {point[n][1] / 1e6:.1f} | {1000 * point[n][2]:.1f} |"
          for n, c in corners.items()],
        "",
        (lambda c: f"The fit through them: {1e9 * c.per_mac:.3g} s a dense GMAC and {1e9 * c.per_depthwise_mac:.3g} s "
                   f"a depthwise GMAC ({c.per_depthwise_mac / c.per_mac:.0f}x) a tile, at least {1000 * c.floor:.1f} "
                   "ms a tile (the smallest net's)." if c.per_mac > 0 else "")(
            models["MACs + depthwise (fit_step_cost on the corners)"]),
        "",
        "Predicted / measured seconds a tile over the nets (1.00 is exact; the ETA adds trials up, so the sum's "
        "ratio is what it is off by):",
        "",
        "| model | median | range | standard convs (median) | separable (median) | sum of the nets |",
        "|---|---|---|---|---|---|",
    ]
    for name, cost in models.items():
        r = {c: cost.per_tile(*work(c)) / timed[c][0] for c in nets}
        std = [v for c, v in r.items() if c.arch.conv == "standard"] or [float("nan")]
        sep = [v for c, v in r.items() if c.arch.conv == "separable"] or [float("nan")]
        total = sum(cost.per_tile(*work(c)) for c in nets) / sum(timed[c][0] for c in nets)
        lines.append(f"| {name} | {statistics.median(r.values()):.2f} | {min(r.values()):.2f} to "
                     f"{max(r.values()):.2f} | {statistics.median(std):.2f} | {statistics.median(sep):.2f} | "
                     f"{total:.2f} |")
    lines += ["", "| net | MMACs | of them depthwise | ms a tile | " + " | ".join(
        ["MACs", "MACs + depthwise"]) + " |", "|---|---|---|---|---|---|"]
    for c in nets:
        m, d = work(c)
        lines.append(f"| `{c.arch.key()}` | {m / 1e6:.1f} | {d / 1e6:.1f} | {1000 * timed[c][0]:.1f} | " + " | ".join(
            f"{cost.per_tile(m, d) / timed[c][0]:.2f}" for cost in models.values()) + " |")
    lines.append("")
    write_results(a.out, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
