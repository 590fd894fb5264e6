"""The search's second stage: its top nets, each trained briefly on all training images, ranked again.

The CV on a few hundred representative tiles is cheap enough to look at many nets, but it cannot see how much
a net gains from all the data: on the drone data it ranked 8 nets trained on all data (200,000 crops) with
Spearman 0.62 and put the 3rd best first (benchmarks/results/full/fidelity_full.md).
A short run of the shipped net's own training (crops of every training image, the validation split by image)
on the top few nets by CV is the rung that decides, as successive halving would: the net that scores best on
the validation images, with the same latency penalty the search applied, is the one trained to ship.
How short matters: at 25,000 crops (an eighth of the default final budget) the top nets' validation scores lay
closer than a training seed moves them, and at one seed it shipped the 6th; at 50,000 (a quarter, the default
search.refine_tiles) over the top 4 the search's order ranked the 8 nets at 0.90 / 0.86 (training seeds 0 / 1)
and shipped the 2nd / the 1st. On by default (4 nets) when the shipped net trains on all data with a
validation split.

Each net's result is kept in RUN/trials/N/refine/, keyed like the final training, so a rerun goes on
where it stopped (an interrupted net from its last saved evaluation).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial

from autoseg.config import Config
from autoseg.data_stage import DataStage
from autoseg.retrain import RETRAIN_STATE, on_all_data
from autoseg.rundir import RunDir, write_json_atomic
from autoseg.search import SearchTask
from autoseg.search.clock import MIN_SECOND_STAGE_SHARE, SearchClock, minutes
from autoseg.search.space import trial_candidate

log = logging.getLogger(__name__)

REFINE_DIR = "refine"
RESULT = "result.json"


def refine_config(cfg: Config, tiles: int | None = None, minutes: float | None = None) -> Config:
    """The final training cut to `tiles` crops (search.refine_tiles): no teacher, its own evaluation steps, and
    no time cap but `minutes` (the share of search.max_minutes left to this net)."""
    return replace(cfg, train=replace(cfg.train, final_tiles=tiles or cfg.search.refine_tiles, eval_every=None,
                                      final_minutes=minutes, teacher=None))


def refined_value(val_miou: float, trial: FrozenTrial) -> float:
    """The validation mIoU with the latency (and MACs) penalty the search gave this net's CV score."""
    a = trial.user_attrs
    penalty = a["cv_mean"] - a["penalty_value"] if "penalty_value" in a and "cv_mean" in a else 0.0
    return val_miou - penalty


def pick(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The best refined value; a tie goes to the net the search ranked higher (results come in its order)."""
    return max(results, key=lambda r: r["value"])


def _kept(path: Path, key: str) -> dict[str, Any] | None:
    try:
        done = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return done if isinstance(done, dict) and done.get("key") == key else None


def train_briefly(cfg: Config, run: RunDir, stage: DataStage, task: SearchTask, trial: Any, where: Path,
                  progress: bool = False, tiles: int | None = None, minutes: float | None = None) -> dict[str, Any]:
    """One net of the second stage, trained on `tiles` (search.refine_tiles) crops of all training images, for
    at most `minutes`: its best validation mIoU and how it trained, kept in `where` (a rerun with the same key
    reads it, an interrupted one goes on)."""
    net = trial_candidate(trial.user_attrs)
    arch = net.arch
    where.mkdir(parents=True, exist_ok=True)
    key, train = on_all_data(refine_config(cfg, tiles, minutes), run, stage, task, arch, net.tile, trial.number,
                             progress, where)
    done = _kept(where / RESULT, key)
    if done is not None:
        log.info("second stage: trial %d (%s) was done already", trial.number, arch.key())
        return done
    _, info = train()
    done = {"key": key, "arch": arch.key(), "val_miou": info["best_val_miou"], "tile_passes": info["tile_passes"],
            "seconds": info["seconds"], "stopped": info["stopped"]}
    write_json_atomic(where / RESULT, done)
    (where / RETRAIN_STATE).unlink(missing_ok=True)
    return done


def second_stage(cfg: Config, run: RunDir, stage: DataStage, task: SearchTask, candidates: list[FrozenTrial],
                 progress: bool = False, clock: SearchClock | None = None) -> tuple[FrozenTrial, dict[str, Any] | None]:
    """Train each candidate (best first by the search) on search.refine_tiles crops of all training images;
    return the winner and what the model card and report show.

    With search.max_minutes (`clock.end`), the nets train on as many crops as fit in the time left, each for at
    most its share of it; with too little time left for a fair ranking, the search's best ships (None)."""
    tiles, end = cfg.search.refine_tiles, None
    if clock is not None and clock.end is not None:
        end = clock.end
        tiles = clock.second_stage_crops([trial_candidate(t.user_attrs) for t in candidates])
        if tiles < max(1, MIN_SECOND_STAGE_SHARE * cfg.search.refine_tiles):
            log.info("second stage skipped: --max-minutes %g leaves %s, room for %s crops a net of the %s planned; "
                     "the search's best ships", cfg.search.max_minutes, minutes(max(0.0, end - time.time())),
                     f"{tiles:,}", f"{cfg.search.refine_tiles:,}")
            return candidates[0], None
    log.info("second stage: the top %d nets by the search's score, each trained on %s crops of all training "
             "images, ranked by validation mIoU%s", len(candidates), f"{tiles:,}",
             "" if end is None else f", by {time.strftime('%H:%M:%S', time.localtime(end))} (--max-minutes)")
    results = []
    for rank, trial in enumerate(candidates, 1):
        cap = None if end is None else max(0.0, end - time.time()) / (len(candidates) - rank + 1) / 60.0
        if cap is not None and cap <= 0:
            log.info("second stage: the time limit is up after %d of its %d nets", len(results), len(candidates))
            break
        trained = train_briefly(cfg, run, stage, task, trial, run.trial(trial.number) / REFINE_DIR, progress, tiles,
                                cap)
        a = trial.user_attrs  # the search's view of the net, from the study as it is now
        done = {"trial": trial.number, "search_rank": rank, "cv_score": a.get("cv_mean"),
                "search_value": a.get("penalty_value"),
                # the config's check makes sure there are validation images
                "value": refined_value(trained["val_miou"], trial),
                **{k: v for k, v in trained.items() if k != "key"}}
        log.info("second stage %d/%d: trial %d (%s): validation mIoU %.3f, value %.3f (the search's CV %s)", rank,
                 len(candidates), trial.number, done["arch"], done["val_miou"], done["value"],
                 "n/a" if done["cv_score"] is None else f"{done['cv_score']:.3f}")
        results.append(done)
    if not results:
        return candidates[0], None
    best = pick(results)
    winner = next(t for t in candidates if t.number == best["trial"])
    if winner.number != candidates[0].number:
        log.info("second stage: trial %d (%s) ships instead of the search's best, trial %d", winner.number,
                 best["arch"], candidates[0].number)
    return winner, {"tiles": tiles, "chosen": winner.number, "nets": results}
