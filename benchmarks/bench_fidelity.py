"""How many epochs per fold does the search need to rank nets the way their final training does?

    python -m benchmarks.bench_fidelity [--quick] [--epochs 3 6 12 ...] [--final-data all|reps] [--final-tiles N]
                                        [--refine-tiles N ...] [--keep DIR] [--seed S] [--nets KEY ...]
                                        [--second-stage-from KEEP] [--latency-rounds N] [--measure test|tile|SIDE]

Data: ../shared/datasets/semantic_drone_224, set up exactly as bench_search sets it up (same held-out split,
tile 64, the same representative tiles, seed 0). Nets: small U-Nets within 10% of bench_search's reference
latency at 224x224, standard and separable, 2 to 4 levels. For each net:

  final   the test mIoU after autoseg.pipeline.finalize (the final training, export, evaluation on the
          held-out images): what the search should predict. --final-data all (default, the product's):
          crops of all training images (--final-tiles, default the product's 200,000; --quick 3200);
          reps: the old retrain on the representatives for the final epochs;
  CV      autoseg.train.cross_validate's mean fold mIoU (the search's score) at each --epochs budget;
  second  with --refine-tiles N: the validation mIoU after autoseg.refine's short all-data training of N crops
          (the second stage, search.refine_top), and the net a second stage over the top K by CV would ship.

--seed S trains the finals and the second stage with seed S (the split, the representatives and the CV stay
seed 0's), to tell a difference between nets from a seed's noise; --nets runs only the named nets of the 8.
--second-stage-from KEEP reads the second stage from the finals an earlier run with a smaller --final-tiles kept.
--latency-rounds N also times every net against bench_search's reference U-Net (interleaved, median of N rounds,
at --measure's side, default the test images'), for P6's latency half: <= 10% of the reference's.

Reported: for each budget, the tiles a fold trains on and the Spearman rank correlation of the CV score with
the final test mIoU, against the baseline of the 3-epoch budget in the same run. autoseg's default budget
(train.epochs unset) is one of the budgets. Targets: it ranks better than 3 epochs per fold (set here) and,
with --final-data all, its Spearman is >= 0.7 (issue #20: does the search still pick the right net once the
nets are trained on all data?).
Results: benchmarks/results/fidelity.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from autoseg.pipeline import finalize
from autoseg.refine import train_briefly
from autoseg.rundir import RunDir, write_text_atomic
from autoseg.train import FOLD_TILE_PASSES, cross_validate, cv_epochs, training_settings
from autoseg.unet import Arch
from benchmarks import write_results
from benchmarks.bench_search import (
    BUSY_CORES,
    DATASET,
    FULL,
    QUICK,
    REF_ARCH,
    TILE,
    machine_info,
    make_config,
    measured_side,
    paired_latency,
    prepare_task,
)

RESULTS = Path(__file__).resolve().parent / "results" / "fidelity.md"
SEP, STD = "separable", "standard"
# Eight nets spanning the range the hand-picked table of results/full/search.md found under the budget.
NETS = [
    Arch((3, 3, 3, 3), (16, 32, 64, 128), SEP, "transpose"),
    Arch((3, 3, 3), (16, 32, 64), SEP, "bilinear"),
    Arch((3, 5), (16, 64), SEP, "bilinear"),
    Arch((3, 3, 5), (8, 16, 32), STD, "transpose"),
    Arch((5, 3), (16, 32), SEP, "transpose"),
    Arch((3, 3), (8, 16), STD, "transpose"),
    Arch((3, 3, 3, 3), (8, 16, 32, 64), STD, "transpose"),
    Arch((5, 3), (8, 16), SEP, "bilinear"),
]
QUICK_NETS = [NETS[i] for i in (1, 2, 3, 5, 7)]
TARGET_BASELINE_EPOCHS = 3
TARGET_SPEARMAN_ALL = 0.7  # issue #20, with the final training on all data
QUICK_FINAL_TILES = 3200
QUICK_REFINE_TILES = 800
SECOND_STAGE_TOP = (2, 3, 4)  # search.refine_top values whose choice is reported


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation, ties given their mean rank."""
    def ranks(v: list[float]) -> np.ndarray:
        v = np.asarray(v, dtype=float)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for x in np.unique(v):
            r[v == x] = r[v == x].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def staged_order(cv: list[float], val: list[float], k: int) -> list[int]:
    """The nets in the order a second stage over the top k by CV leaves them: those k by validation mIoU (ties: CV
    order), then the rest by CV. The bench's nets have near-equal latency, so the latency penalty is left out."""
    by_cv = sorted(range(len(cv)), key=lambda i: -cv[i])
    return sorted(by_cv[:k], key=lambda i: -val[i]) + by_cv[k:]


def second_stage_choice(cv: list[float], val: list[float], k: int) -> int:
    """The net a second stage over the top k by CV ships."""
    return staged_order(cv, val, k)[0]


def search_order(cv: list[float], val: list[float], k: int) -> list[float]:
    """Each net's rank score in the search's order with the second stage (staged_order). Higher is better, for
    spearman()."""
    score = [0.0] * len(cv)
    for place, i in enumerate(staged_order(cv, val, k)):
        score[i] = float(len(cv) - place)
    return score


def second_stage_lines(second: dict[int, list[float]], cv: list[float], finals: list[float], nets: list[Arch],
                       default: int) -> list[str]:
    """The second stage's fidelity (its validation mIoU against the final test mIoU) and what it would ship."""
    if not second:
        return []
    best = max(range(len(finals)), key=lambda i: finals[i])
    cv_pick = max(range(len(cv)), key=lambda i: cv[i])
    lines = [
        "## Second stage: a short all-data training (autoseg.refine)",
        "",
        f"Each net trained by `autoseg.refine.train_briefly` (the final training cut to N crops) and ranked by its "
        f"best validation mIoU. Shipped: the net a second stage over the top K by the default CV ({default} epochs) "
        f"would ship, by its final test mIoU. Without it the search ships `{nets[cv_pick].key()}` "
        f"({finals[cv_pick]:.4f}); the best of the {len(nets)} nets is `{nets[best].key()}` ({finals[best]:.4f}).",
        "",
        "Spearman, search order: the top K by CV re-ranked by the second stage, the rest in CV order, against the "
        f"final test mIoU (the CV alone: {spearman(cv, finals):.2f}).",
        "",
        "| crops per net | Spearman with the final test mIoU | "
        + " | ".join(f"top {k}: ships (final test mIoU)" for k in SECOND_STAGE_TOP) + " | "
        + " | ".join(f"top {k}: Spearman, search order" for k in SECOND_STAGE_TOP) + " |",
        "|---|---|" + "---|" * 2 * len(SECOND_STAGE_TOP),
    ]
    for r, val in sorted(second.items()):
        picks = [second_stage_choice(cv, val, k) for k in SECOND_STAGE_TOP]
        lines.append(f"| {r:,} | {spearman(val, finals):.2f} | "
                     + " | ".join(f"`{nets[i].key()}` ({finals[i]:.4f})" for i in picks) + " | "
                     + " | ".join(f"{spearman(search_order(cv, val, k), finals):.2f}" for k in SECOND_STAGE_TOP)
                     + " |")
    lines += ["", "| net | final test mIoU | " + " | ".join(f"validation mIoU, {r:,} crops" for r in sorted(second))
              + " |", "|---|---|" + "---|" * len(second)]
    lines += [f"| `{a.key()}` | {finals[i]:.4f} | " + " | ".join(f"{second[r][i]:.4f}" for r in sorted(second)) + " |"
              for i, a in sorted(enumerate(nets), key=lambda t: -finals[t[0]])]
    return [*lines, ""]


def latency_table(nets: list[Arch], finals: list[float], ms: list[float], ref_ms: float, side: int, rounds: int,
                  busy: float) -> list[str]:
    """Each net's latency against the reference U-Net's, for P6's latency half (<= 10 %)."""
    warn = (f" **Not trustworthy: other processes kept {busy:.1f} cores busy while it was measured.**"
            if busy > BUSY_CORES else "")
    return [
        "## Latency against the reference U-Net",
        "",
        f"Local onnxruntime at {side}x{side}, the median of {rounds} interleaved rounds, beside the reference "
        f"`{REF_ARCH.key()}` ({ref_ms:.3f} ms).{warn}",
        "",
        "| net | final test mIoU | latency (ms) | latency / reference's |",
        "|---|---|---|---|",
        *[f"| `{a.key()}` | {finals[i]:.4f} | {ms[i]:.3f} | {ms[i] / ref_ms:.1%} |"
          for i, a in sorted(enumerate(nets), key=lambda t: -finals[t[0]])],
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the small budget of `make bench`: 5 nets, 40 reps, "
                    "30 final epochs")
    ap.add_argument("--epochs", type=int, nargs="+", help="CV budgets, epochs per fold, beside autoseg's "
                    "default, which is always run (default 3 and 6; --quick 3)")
    ap.add_argument("--threads", type=int, default=1, help="train.threads (default 1, as bench_search)")
    ap.add_argument("--final-data", choices=["all", "reps"], default="all",
                    help="the final training: all training images (the product's default) or the representatives")
    ap.add_argument("--final-tiles", type=int, help="crops of the final training on all data (default: the "
                    f"product's; --quick {QUICK_FINAL_TILES})")
    ap.add_argument("--refine-tiles", type=int, nargs="*", help="second-stage budgets to measure, crops per net "
                    f"(default none; --quick {QUICK_REFINE_TILES})")
    ap.add_argument("--keep", type=Path, help="keep the run directories here; a rerun of the same command reuses "
                    "finished trainings and CV scores")
    ap.add_argument("--seed", type=int, default=0, help="training seed of the finals and the second stage (the "
                    "split, representatives and CV stay seed 0's)")
    ap.add_argument("--nets", nargs="+", metavar="KEY", help="only these of the 8 nets, by key")
    ap.add_argument("--second-stage-from", type=Path, metavar="KEEP",
                    help="also read a second stage from the finals kept by a run with a smaller --final-tiles: the "
                         "second stage at N crops is the final training cut to N (the same call, the same key)")
    ap.add_argument("--latency-rounds", type=int, default=0, metavar="N",
                    help="time each net against the reference U-Net, median of N interleaved rounds (default 0: off)")
    ap.add_argument("--measure", default="test", help="side the latency is timed at: test (the held-out images'), "
                    "tile, or a number (default test)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if not (DATASET / "images").is_dir():
        print(f"SKIP: {DATASET}/images not found")
        return 0

    # --quick: the final retrain needs enough epochs to rank the nets at all, even on 40 reps
    b = dataclasses.replace(QUICK, final_epochs=30) if args.quick else FULL
    nets = QUICK_NETS if args.quick else NETS
    if args.nets:
        by_key = {a.key(): a for a in NETS}
        if bad := [k for k in args.nets if k not in by_key]:
            ap.error(f"--nets: unknown {', '.join(bad)}; choose from {', '.join(by_key)}")
        nets = [by_key[k] for k in args.nets]
    seeded = "" if args.seed == 0 else f"-s{args.seed}"  # a seed's trainings are kept apart from seed 0's
    info = machine_info()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_fidelity_") as tmp:
        root = args.keep or Path(tmp)
        final_tiles = args.final_tiles or (QUICK_FINAL_TILES if args.quick else None)
        extra = {"train.final_data": args.final_data, **({"train.final_tiles": final_tiles} if final_tiles else {})}
        cfg = make_config(DATASET, root / "data", dataclasses.replace(b, epochs=None), 0, args.threads, **extra)
        final_what = (f"{b.final_epochs} epochs on the representatives" if args.final_data == "reps" else
                      f"{cfg.train.final_tiles:,} crops of all training images (validation split, early stopping)")
        stage, task = prepare_task(cfg, RunDir(cfg.out).prepare())
        cfg_train = dataclasses.replace(cfg, seed=args.seed)
        data = task.data[TILE]
        n = len(data.x)
        default = cv_epochs(cfg.train, n)
        # the targets judge the default budget, so it is always one of them
        budgets = sorted(set(args.epochs or ([3] if args.quick else [3, 6])) | {default})
        print(f"{len(nets)} nets, {n} representatives, {cfg.train.folds} folds, CV budgets {budgets} epochs "
              f"(default {default}), final training: {final_what}", flush=True)

        finals, cv = [], {e: [] for e in budgets}
        for arch in nets:
            t0 = time.perf_counter()
            fake_trial = SimpleNamespace(number=-1, user_attrs={"arch_dict": arch.to_dict(), "tile": TILE})
            card = finalize(cfg_train, RunDir(root / f"final{seeded}" / arch.key()).prepare(), stage, task,
                            fake_trial)
            finals.append(card["test_miou"])
            for e in budgets:
                kept = root / "cv" / f"{arch.key()}@{e}.json"  # a rerun with --keep reuses it
                if kept.exists():
                    cv[e].append(float(json.loads(kept.read_text())))
                    continue
                s = training_settings(cfg.train, cfg.seed, task.class_weights, e)
                cv[e].append(float(np.mean(cross_validate(arch, data.x, data.y, data.groups, task.num_classes, s,
                                                          cfg.train.folds))))
                kept.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(kept, json.dumps(cv[e][-1]))
            print(f"  {arch.key():45s} final {finals[-1]:.4f}  " + "  ".join(f"cv@{e} {cv[e][-1]:.4f}"
                                                                            for e in budgets)
                  + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)

        refine_budgets = args.refine_tiles if args.refine_tiles is not None else (
            [QUICK_REFINE_TILES] if args.quick else [])
        second: dict[int, list[float]] = {}
        for r in refine_budgets:
            cfg_r = dataclasses.replace(cfg_train, search=dataclasses.replace(cfg.search, refine_tiles=r))
            second[r] = []
            for arch in nets:
                t0 = time.perf_counter()
                where = root / f"refine{seeded}" / str(r) / arch.key()
                fake_trial = SimpleNamespace(number=-1, user_attrs={"arch_dict": arch.to_dict(), "tile": TILE})
                done = train_briefly(cfg_r, RunDir(where).prepare(), stage, task, fake_trial, where)
                second[r].append(done["val_miou"])
                print(f"  {arch.key():45s} second stage @{r} crops: validation {second[r][-1]:.4f}  "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)

        if args.second_stage_from:
            kept = [json.loads((args.second_stage_from / f"final{seeded}" / a.key() / "best" / "training.json")
                               .read_text()) for a in nets]
            second[kept[0]["budget_tiles"]] = [k["best_val_miou"] for k in kept]

        latency_lines: list[str] = []
        if args.latency_rounds > 0:
            side = measured_side(args.measure, stage)
            cfg_lat = dataclasses.replace(cfg, device=dataclasses.replace(cfg.device, measure_size=side))
            ms, busy = paired_latency([*nets, REF_ARCH], task, cfg_lat, args.latency_rounds)
            latency_lines = latency_table(nets, finals, ms[:-1], ms[-1], side, args.latency_rounds, busy)
            print("\n".join(latency_lines), flush=True)

    per_fold = n * (cfg.train.folds - 1) // cfg.train.folds
    rho = {e: spearman(cv[e], finals) for e in budgets}
    base = rho.get(TARGET_BASELINE_EPOCHS, float("nan"))
    ok = rho[default] > base
    # What the search ships by, with the product's default second stage when this run measured it.
    k, r = cfg.search.refine_top, cfg.search.refine_tiles
    staged = args.final_data == "all" and k > 1 and r in second
    rho_search = spearman(search_order(cv[default], second[r], k), finals) if staged else rho[default]
    search_what = (f"the search's CV (default budget) with its default second stage (top {k} at {r:,} crops)"
                   if staged else "the search's CV (default budget)")
    ok_all = args.final_data != "all" or rho_search >= TARGET_SPEARMAN_ALL
    lines = [
        "# Search fidelity: CV epochs per fold vs the final ranking",
        "",
        f"`{' '.join(['python -m benchmarks.bench_fidelity', *(argv if argv is not None else sys.argv[1:])])}`",
        "",
        f"Data: `{DATASET}`, held-out split by image, tile {TILE}, {n} representative tiles, {cfg.train.folds} folds, "
        f"seed 0 (split, representatives, CV), training seed {args.seed} (finals, second stage), train threads "
        f"{args.threads}. {len(nets)} nets, each trained by `autoseg.pipeline.finalize` "
        f"({final_what}) and tested on {len(stage.test_ids)} held-out images (the final test mIoU), and "
        f"cross-validated by `autoseg.train.cross_validate` (the search's score) at each budget.",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        f"- total wall time: {time.perf_counter() - start:.0f} s",
        "",
        "## Rank correlation with the final test mIoU",
        "",
        "| epochs per fold | tiles a fold trains on | Spearman | vs 3 epochs (baseline) |",
        "|---|---|---|---|",
        *[f"| {e}{' (autoseg default)' if e == default else ''} | {e * per_fold} | {rho[e]:.2f} | "
          f"{rho[e] - base:+.2f} |" for e in budgets],
        "",
        "## Nets",
        "",
        "| net | final test mIoU | " + " | ".join(f"CV mIoU, {e} epochs" for e in budgets) + " |",
        "|---|---|" + "---|" * len(budgets),
        *[f"| `{a.key()}` | {f:.4f} | " + " | ".join(f"{cv[e][i]:.4f}" for e in budgets) + " |"
          for i, (a, f) in sorted(enumerate(zip(nets, finals, strict=True)), key=lambda t: -t[1][1])],
        "",
        *latency_lines,
        *second_stage_lines(second, cv[default], finals, nets, default),
        "## Targets",
        "",
        f"- {'PASS' if ok else 'FAIL'}: the default budget ({default} epochs, about {FOLD_TILE_PASSES} tiles a "
        f"fold) ranks better than {TARGET_BASELINE_EPOCHS} epochs: Spearman {rho[default]:.2f} vs {base:.2f}",
        *([f"- {'PASS' if ok_all else 'FAIL'}: {search_what} ranks the nets as their final training on all data "
           f"does: Spearman {rho_search:.2f} (target >= {TARGET_SPEARMAN_ALL}; the CV alone {rho[default]:.2f})"]
          if args.final_data == "all" else []),
        "",
    ]
    write_results(args.out, "\n".join(lines))
    print("\n".join(lines))
    return 0 if ok and ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
