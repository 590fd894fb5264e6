"""The clock benchmark's searches at more seeds and pruners: how soon each reaches 95% of the best at its seed.

    python -m benchmarks.bench_clock_seeds --seeds 0 1 2 3 4 --keep DIR [--variants new old median ...]

`bench_search --part clock` compares autoseg's search defaults with those before issue #21 at one seed, where one
lucky random draw decides a lot. This runs the searches alone (no second stage, a token final training), through
the CLI as a user would, for each seed and variant, then reads each study: when a completed trial first reached 95%
of the best final score of the variants at that seed, by CV mIoU and by the search's objective (CV mIoU with the
latency penalty), timed from the first trial's start; and how the clock's ETA and cost model held (the searches
run --verbose, and their logs are read). Variants: new (the defaults: the cost-ordered start,
successive halving at reduction factor 3), old (before #21: TPE's random start, the median pruner), and the
cost-ordered start with the median pruner (median), Hyperband (hyperband) or successive halving at reduction
factor 2 (halving2), and the cost-ordered start ordered by training time (time: depthwise MACs weighed 30x, as
they train on a CPU; results/full/clock_start.md). Each seed gives its own split and representatives, shared by its
variants. Results: results/clock_seeds.md.

The issue's full-size run is this at autoseg's default budget, an hour a search, two side by side, with the best
so far at 15, 30 and 60 minutes and the nets chosen then trained and tested (results/full/clock_full.md):

    python -m benchmarks.bench_clock_seeds --seeds 0 --variants new old --trials 20 --reps 200 --epochs 0 \
        --max-minutes 60 --marks 15 30 60 --jobs 2 --test-tiles 20000 --keep DIR

With --latency-budget-ms both searches drop the nets over it before training, so their chosen nets compare at equal
latency (results/full/clock_budget.md).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import optuna
from optuna.trial import TrialState

from autoseg.config import load_config
from autoseg.search import startup_trials
from benchmarks import DATA_ROOT, write_results

DATASET = DATA_ROOT / "semantic_drone_224"
RESULTS = Path(__file__).resolve().parent / "results" / "clock_seeds.md"
# name: (flags, a constant of autoseg's set in the CLI's process as "module.NAME = value", or None)
VARIANTS: dict[str, tuple[list[str], str | None]] = {
    "new": ([], None),
    "old": (["--startup", "random", "--pruner", "median"], None),
    "median": (["--pruner", "median"], None),
    "hyperband": (["--pruner", "hyperband"], None),
    "halving2": (["--pruner", "halving"], "sampling.HALVING_RATE = 2"),
    # the cost-ordered start ordered by training time: depthwise MACs weighed as they train on a CPU
    "time": ([], "space.START_DEPTHWISE_WEIGHT = 30.0"),
}
# Constants are not settings: the variant sets one in the CLI's process, before the CLI runs.
WITH_CONSTANT = ("import sys; import autoseg.search.{module} as m; m.{assign}; from autoseg.cli import main; "
                 "sys.exit(main(sys.argv[1:]))")
REACH = 0.95


def search(data: Path, out: Path, seed: int, variant: str, a: argparse.Namespace) -> float:
    """One search through the CLI; its wall time. Its log goes to OUT.log, each line with the time it came."""
    config = out.parent / "bench.yml"
    # Searches side by side: a latency is taken under the others' load (and labelled so), not retried until they
    # are quiet, which would add waits that time the other searches.
    busy = "device:\n  max_busy_cores: null\n" if a.jobs > 1 else ""
    config.write_text(f"train:\n  threads: {a.threads}\n  val_fraction: 0.0\n{busy}")
    flags, constant = VARIANTS[variant]
    launch = ["-m", "autoseg"]
    if constant is not None:
        module, assign = constant.split(".", 1)
        launch = ["-c", WITH_CONSTANT.format(module=module, assign=assign)]
    budget = [*(["--epochs", str(a.epochs)] if a.epochs else []),
              *(["--max-minutes", f"{a.max_minutes:g}"] if a.max_minutes else []),
              *(["--latency-budget-ms", f"{a.latency_budget_ms:g}"] if a.latency_budget_ms else [])]
    cmd = [sys.executable, *launch, "search", "--verbose", "--config", str(config), "--images", str(data / "images"),
           "--masks", str(data / "masks"), "--out", str(out), "--trials", str(a.trials), "--num-reps", str(a.reps),
           *budget, "--tile", "64", "--device", "local", "--refine-top", "0", "--final-tiles", "256",
           "--seed", str(seed), *flags]
    t0 = time.perf_counter()
    with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc, \
            open(log_path(out), "w") as log:
        for line in proc.stderr:
            log.write(f"{time.time():.1f} {line}")
            log.flush()
    if proc.returncode:
        raise SystemExit(f"{out}: the search exited {proc.returncode}; see {log_path(out)}")
    return time.perf_counter() - t0


def log_path(out: Path) -> Path:
    return out.parent / f"{out.name}.log"


def log_lines(out: Path) -> list[tuple[float, str]]:
    """The search's log lines: when each came, and its message (--verbose's time, level and logger cut off)."""
    if not log_path(out).exists():
        return []
    rows = []
    for line in log_path(out).read_text().split("\n"):
        at, _, text = line.partition(" ")
        if re.fullmatch(r"\d+\.\d", at):  # a line the bench stamped (not a carriage return's tail)
            rows.append((float(at), re.sub(r"^\d\d:\d\d:\d\d [A-Z]+ [\w.]+: ", "", text)))
    return rows


def search_start(lines: list[tuple[float, str]], first_trial: float) -> float:
    """When the search proper began, after the data stage: the log's "measuring ... latency" line, so the plan
    (calibration, latency range, ETA) counts; without a log, the first trial's start."""
    return next((at for at, text in lines if text.startswith("measuring ") and " latency on " in text), first_trial)


def model_said(lines: list[tuple[float, str]]) -> tuple[float, float]:
    """The clock's model of the trials this search ran (--verbose's "trial N took X s; the clock's model says Y s"
    lines): what it said they cost, and what they took, in seconds."""
    pairs = [re.search(r"took (\d+) s; the clock's model says (\d+) s", text) for _, text in lines]
    return sum(float(m[2]) for m in pairs if m), sum(float(m[1]) for m in pairs if m)


def eta_halfway(lines: list[tuple[float, str]], trials: int) -> tuple[float, float] | None:
    """The ETA the search gave once half its trials were done (--verbose's "N trial(s) left, about X s"), and
    when."""
    for at, text in lines:
        m = re.search(r"(\d+) trial\(s\) left, about (\d+) s", text)
        if m and int(m[1]) <= trials // 2:
            return float(m[2]), at
    return None


UNIT = r"([\d.]+) (s|min|h)"


def seconds(number: str, unit: str) -> float:
    return float(number) * {"s": 1, "min": 60, "h": 3600}[unit]


def eta_said(lines: list[tuple[float, str]]) -> tuple[float, float, tuple[float, float] | None] | None:
    """The ETA said before the first trial, in seconds, when it was said (the log's "ETA:" line), and its range
    (None from a search that gave none)."""
    for at, text in lines:
        m = re.search(rf"about {UNIT} for the \d+ trial", text) if text.startswith("ETA:") else None
        if m:
            r = re.search(rf"\({UNIT} if the search keeps to the cheaper half of the space, {UNIT} if to the dearer "
                          r"half\)", text)
            return seconds(m[1], m[2]), at, (seconds(r[1], r[2]), seconds(r[3], r[4])) if r else None
    return None


def test_net(run: Path, number: int, tiles: int, train_seed: int, threads: int, dest: Path) -> None:
    """Trial `number` of the search in `run`, trained as a shipped net on `tiles` crops with training seed
    `train_seed` (split and representatives stay the run's), tested on the run's held-out images; its card into
    dest/model_card.json. Run in a process of its own (python -c TEST), so side by side ones keep their threads."""
    import dataclasses

    from autoseg.config import load_run_config
    from autoseg.data_stage import data_stage, prepare_data
    from autoseg.pipeline import finalize
    from autoseg.rundir import RunDir, write_json_atomic
    from autoseg.search import load_study

    cfg = load_run_config(run, {"train.final_tiles": tiles, "train.threads": threads})
    rd = RunDir(run)
    trials = {t.number: t for t in load_study(rd, cfg, 0).trials}
    trial = trials[number]
    trial = trials.get(trial.user_attrs.get("same_as_trial"), trial)
    stage, _, task = data_stage(cfg, rd, False, prepare_data(cfg))
    card = finalize(dataclasses.replace(cfg, seed=train_seed), RunDir(dest).prepare(), stage, task, trial)
    write_json_atomic(dest / "model_card.json", card)


TEST = ("import sys; from pathlib import Path; from benchmarks.bench_clock_seeds import test_net; "
        "a = sys.argv[1:]; test_net(Path(a[0]), int(a[1]), int(a[2]), int(a[3]), int(a[4]), Path(a[5]))")


def tested(a: argparse.Namespace, run: Path, number: int, train_seed: int) -> float:
    """Test mIoU of a trial's net trained on --test-tiles crops (kept under KEEP/tests; a rerun reads it)."""
    dest = a.keep / "tests" / f"{run.name}_t{number}_seed{train_seed}"
    if not (dest / "model_card.json").exists():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", TEST, str(run), str(number), str(a.test_tiles), str(train_seed),
                        str(a.threads), str(dest)], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, cwd=Path(__file__).resolve().parent.parent)
        print(f"{run.name} trial {number} training seed {train_seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    return float(json.loads((dest / "model_card.json").read_text())["test_miou"])


def score(t: optuna.trial.FrozenTrial, key: str) -> float:
    return float(t.value) if key == "objective" else float(t.user_attrs["cv_mean"])


def reading(study: optuna.Study, out: Path, trials: int, k: int) -> dict:
    """What one search's study and log say; k is its start's trial count (TPE's start, cost-ordered or random)."""
    lines = log_lines(out)
    t0 = search_start(lines, min(t.datetime_start for t in study.trials).timestamp())
    done = sorted((t for t in study.trials if t.state == TrialState.COMPLETE), key=lambda t: t.datetime_complete)
    end = max(t.datetime_complete for t in study.trials if t.datetime_complete).timestamp()
    said, half = eta_said(lines), eta_halfway(lines, trials)
    eta = None
    if said is not None:  # seconds: said before the first trial, taken after; modelled and taken per trial; half way
        modelled, ran = model_said(lines)
        eta = {"said": said[0], "took": end - said[1], "range": said[2], "modelled": modelled, "ran": ran,
               "half_said": half[0] if half else 0.0, "half_took": end - half[1] if half else 0.0}
    first = [t for t in study.trials if t.number < k]
    start = None
    if len(first) == k and all(t.datetime_complete for t in first):
        start = {"took": max(t.datetime_complete.timestamp() for t in first) - t0,
                 "best": max((score(t, "objective") for t in first if t.state == TrialState.COMPLETE), default=None),
                 "nets": [t.user_attrs.get("arch", "?") for t in first]}
    return {"t0": t0, "done": done, "distinct": sum(t.user_attrs.get("same_as_trial") is None for t in done),
            "wall": end - t0, "eta": eta, "start": start}


def reach(r: dict, key: str, target: float) -> float | None:
    return next((t.datetime_complete.timestamp() - r["t0"] for t in r["done"] if score(t, key) >= target), None)


def fastest(runs: list[dict], key: str, target: float) -> float:
    """The shortest trial (start to end) of a net that reached `target` in any of `runs`, repeats left out."""
    return min((t.datetime_complete - t.datetime_start).total_seconds() for r in runs for t in r["done"]
               if t.user_attrs.get("same_as_trial") is None and score(t, key) >= target)


def best_at(r: dict, key: str, seconds: float) -> tuple[float, optuna.trial.FrozenTrial] | None:
    """The best score of the trials completed by then, and the trial the search would ship if it ended then (the
    best by the objective)."""
    done = [t for t in r["done"] if t.datetime_complete.timestamp() - r["t0"] <= seconds]
    if not done:
        return None
    return max(score(t, key) for t in done), max(done, key=lambda t: t.value)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["new", "old", "median"])
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--reps", type=int, default=120)
    ap.add_argument("--epochs", type=int, default=12, help="per fold; 0: autoseg's default (about 3000 tiles a "
                    "fold)")
    ap.add_argument("--max-minutes", type=float, help="each search's --max-minutes")
    ap.add_argument("--marks", type=float, nargs="+", default=[],
                    help="minutes at which each search's best so far and chosen net are reported")
    ap.add_argument("--latency-budget-ms", type=float, help="each search's latency budget (per 64x64 tile): the "
                    "variants' chosen nets compared at equal latency")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=1, help="searches run at once (give each --threads)")
    ap.add_argument("--test-tiles", type=int, default=0, help="train the nets chosen at the marks and at the end "
                    "as shipped nets on this many crops, and test them on the held-out images (0: no tests)")
    ap.add_argument("--test-seeds", type=int, default=2, help="training seeds of each search's chosen net's tests")
    ap.add_argument("--data", type=Path, default=DATASET)
    ap.add_argument("--keep", type=Path, required=True, help="run directories (a rerun reads the finished ones)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    a.keep.mkdir(parents=True, exist_ok=True)
    todo = [(seed, v) for seed in a.seeds for v in a.variants
            if not (a.keep / f"s{seed}_{v}" / "best" / "model_card.json").exists()]

    def run(job: tuple[int, str]) -> None:
        seed, v = job
        print(f"seed {seed} {v}: {search(a.data, a.keep / f's{seed}_{v}', seed, v, a):.0f} s", flush=True)

    with ThreadPoolExecutor(a.jobs) as pool:
        list(pool.map(run, todo))
    rows, pairs, marks, ends, etas = [], [], [], [], []
    k = startup_trials(load_config(None, {"search.trials": a.trials}))
    miou: dict[tuple[Path, int, int], float] = {}  # (run, trial, training seed)
    runs_by_seed: dict[int, dict[str, dict]] = {}
    for seed in a.seeds:
        runs = runs_by_seed[seed] = {}
        for v in a.variants:
            out = a.keep / f"s{seed}_{v}"
            runs[v] = reading(optuna.load_study(study_name="autoseg", storage=f"sqlite:///{out / 'study.db'}"), out,
                              a.trials, k)
            runs[v]["card"] = json.loads((out / "best" / "model_card.json").read_text())  # what the search shipped
            if runs[v]["eta"]:
                etas.append((seed, v, runs[v]["eta"]))
        if a.test_tiles:
            jobs = {(a.keep / f"s{seed}_{v}", runs[v]["card"]["trial"], s) for v in a.variants
                    for s in range(seed, seed + a.test_seeds)}
            jobs |= {(a.keep / f"s{seed}_{v}", at[1].number, seed) for v in a.variants
                     for at in (best_at(runs[v], "cv", 60 * m) for m in a.marks) if at}
            order = sorted(jobs, key=str)
            with ThreadPoolExecutor(a.jobs) as pool:
                miou.update(zip(order, pool.map(lambda j: tested(a, *j), order), strict=True))
            for v in a.variants:
                card = runs[v]["card"]
                ends.append((seed, v, card["arch"], [miou[(a.keep / f"s{seed}_{v}", card["trial"], s)]
                                                     for s in range(seed, seed + a.test_seeds)]))
        for key in ("cv", "objective"):
            if "new" in runs and "old" in runs:  # the target: the new defaults against the old, alone
                both = max(score(t, key) for v in ("new", "old") for t in runs[v]["done"])
                pairs.append((seed, key, both, reach(runs["new"], key, REACH * both),
                              reach(runs["old"], key, REACH * both),
                              fastest([runs["new"], runs["old"]], key, REACH * both)))
            best = max(score(t, key) for r in runs.values() for t in r["done"])
            for v, r in runs.items():
                marks.append((seed, key, v, a.keep / f"s{seed}_{v}", [best_at(r, key, 60 * m) for m in a.marks]))
            rows.append((seed, key, best, {v: (reach(r, key, REACH * best), max(score(t, key) for t in r["done"]),
                                               r["wall"], r["distinct"]) for v, r in runs.items()}))

    def secs(x: float | None) -> str:
        return "never" if x is None else f"{x:.0f} s"

    epochs = a.epochs or "autoseg's default"
    lines = [
        "# The clock's searches at more seeds",
        "",
        f"`python -m benchmarks.bench_clock_seeds {' '.join(sys.argv[1:] if argv is None else argv)}`",
        "",
        f"Data `{a.data}`, {a.trials} trials, {a.reps} representatives, 3 folds x {epochs} epochs, tile 64, "
        + (f"latency budget {a.latency_budget_ms:g} ms a tile" if a.latency_budget_ms else "no latency budget")
        + ", local latency, train "
        f"threads {a.threads}, {a.jobs} search(es) at once"
        + (f", --max-minutes {a.max_minutes:g}" if a.max_minutes else "") +
        f". Time to {REACH:.0%} of the better final best of the variants at each seed, from the search's start "
        "(after the data stage, its plan counted; the first trial's start where the search kept no log); each "
        "variant's own best, its trials' wall time and the distinct nets it completed.",
        "",
        "| seed | by | best | " + " | ".join(f"{v}: reach / own best / wall / completed" for v in a.variants) + " |",
        "|---|---|---|" + "---|" * len(a.variants),
    ]
    for seed, key, best, per in rows:
        lines.append(f"| {seed} | {key} | {best:.4f} | " + " | ".join(
            f"{secs(per[v][0])} / {per[v][1]:.4f} / {per[v][2]:.0f} s / {per[v][3]}" for v in a.variants) + " |")
    lines += ["", f"Over the seeds (a run that never reached {REACH:.0%} counts as the slowest in the median):", "",
              "| variant | by | reached | median time to reach | own best / seed's best | wall | completed |",
              "|---|---|---|---|---|---|---|"]
    for key in ("cv", "objective"):
        for v in a.variants:
            seeds = [(per[v], best) for _, k, best, per in rows if k == key]
            hits = [math.inf if x[0] is None else x[0] for x, _ in seeds]
            med = statistics.median(hits)
            lines.append(
                f"| {v} | {key} | {sum(h < math.inf for h in hits)} of {len(hits)} | "
                f"{secs(None if med == math.inf else med)} | "
                f"{statistics.fmean(x[1] / best for x, best in seeds):.1%} | "
                f"{statistics.fmean(x[2] for x, _ in seeds):.0f} s | {statistics.fmean(x[3] for x, _ in seeds):.1f} |")
    if pairs:
        lines += ["", f"The new defaults against the old alone (time to {REACH:.0%} of the better best of the two). "
                  "Fastest possible: the shortest trial (start to end) of a net that reached it (either search's, "
                  "repeats left out), the soonest a search that trains whole CVs could reach it with the nets seen; "
                  "the old's time over it is the largest speed-up a start or pruner could have given:", "",
                  "| seed | by | better best | new | old | speed-up (old / new) | fastest possible | its speed-up |",
                  "|---|---|---|---|---|---|---|---|"]
        for seed, key, both, rn, ro, quick in pairs:
            speed = "-" if rn is None else ("inf (old never)" if ro is None else f"{ro / rn:.2f}x")
            bound = "-" if ro is None else f"{ro / quick:.2f}x"
            lines.append(f"| {seed} | {key} | {both:.4f} | {secs(rn)} | {secs(ro)} | {speed} | {secs(quick)} | "
                         f"{bound} |")
    if a.marks:
        lines += ["", "The best so far at each mark, and the net the search would ship if it ended then (the best by "
                  "the objective):", "", "| seed | by | variant | " + " | ".join(f"{m:g} min" for m in a.marks) + " |",
                  "|---|---|---|" + "---|" * len(a.marks)]
        for seed, key, v, out, at in marks:
            lines.append(f"| {seed} | {key} | {v} | " + " | ".join("-" if x is None else (
                f"{x[0]:.4f} `{x[1].user_attrs['arch']}`" + (f", test mIoU {miou[(out, x[1].number, seed)]:.4f}"
                                                             if (out, x[1].number, seed) in miou else ""))
                for x in at) + " |")
    starts = [(seed, v, r["start"]) for seed in a.seeds for v, r in runs_by_seed[seed].items() if r["start"]]
    if starts:
        lines += ["", "The start (TPE's first trials, in the order they ran): when its last trial ended, from the "
                  "search's start, its best objective, and its nets:", "",
                  "| seed | variant | start ended | its best objective | its nets |", "|---|---|---|---|---|"]
        lines += [f"| {seed} | {v} | {st['took']:.0f} s | "
                  + ("-" if st["best"] is None else f"{st['best']:.4f}")
                  + f" | {', '.join(f'`{n}`' for n in st['nets'])} |" for seed, v, st in starts]
        for v in a.variants:
            took = [st["took"] for _, w, st in starts if w == v]
            if took:
                lines.append(f"| all | {v} | median {statistics.median(took):.0f} s | | |")
    if etas:
        lines += ["", "The ETA said before the first trial, against the time the trials took after it (a deadline "
                  "cuts the trials short); the same once half the trials were done; and the clock's cost model of "
                  "the nets the trials trained (as far as each trained), against the time they took:", "",
                  "| seed | variant | ETA said (its range) | trials took | took / said (in the range?) | half way: "
                  "said / took (took / said) | the model of the trials / their time |", "|---|---|---|---|---|---|---|"]

        def inside(e: dict) -> bool:
            low, high = e["range"]
            return low <= e["took"] <= high

        def within(e: dict) -> str:
            return "" if e["range"] is None else " (in)" if inside(e) else " (out)"

        lines += [f"| {seed} | {v} | {e['said']:.0f} s"
                  + (f" ({e['range'][0]:.0f}-{e['range'][1]:.0f} s)" if e["range"] else "")
                  + f" | {e['took']:.0f} s | {e['took'] / e['said']:.2f}{within(e)} | "
                  + (f"{e['half_said']:.0f} s / {e['half_took']:.0f} s ({e['half_took'] / e['half_said']:.2f}) | "
                     if e["half_said"] else "- | ")
                  + (f"{e['modelled'] / e['ran']:.2f} |" if e["ran"] else "- |") for seed, v, e in etas]

        def spread(xs: list[float]) -> str:
            return f"median {statistics.median(xs):.2f}, {min(xs):.2f} to {max(xs):.2f}" if xs else "-"

        es = [e for *_, e in etas]
        ranged = [inside(e) for e in es if e["range"]]
        lines.append(f"| all | | | | {spread([e['took'] / e['said'] for e in es])}"
                     + (f", {sum(ranged)} of {len(ranged)} in the range" if ranged else "") + " | "
                     f"{spread([e['half_took'] / e['half_said'] for e in es if e['half_said']])} | "
                     f"{spread([e['modelled'] / e['ran'] for e in es if e['ran']])} |")
    if ends:
        lines += ["", f"The net each search chose at its end, trained as a shipped net on {a.test_tiles} crops with "
                  f"{a.test_seeds} training seeds and tested on the held-out images:", "",
                  "| seed | variant | chosen | test mIoU per training seed | mean ± sd |", "|---|---|---|---|---|"]
        for seed, v, arch, scores in ends:
            sd = statistics.stdev(scores) if len(scores) > 1 else math.nan
            lines.append(f"| {seed} | {v} | `{arch}` | {', '.join(f'{x:.4f}' for x in scores)} | "
                         f"{statistics.fmean(scores):.4f} ± {sd:.4f} |")
    lines.append("")
    write_results(a.out, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
