"""One run of `autoseg search`, top to bottom.

data -> tiles -> representative tiles -> device -> Optuna search -> retrain the best net
-> export (simplified, verified ONNX) -> evaluate on full test images -> model card -> report.

With --storage URL the study is in a database server: `autoseg worker` processes on other hosts join its trials
(autoseg.remote_worker, with what autoseg.study_data records here), and this process alone trains the best net.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from autoseg import __version__
from autoseg.checkpoint import load_if_key, save_checkpoint
from autoseg.config import DATA_PATHS, Config, config_to_dict
from autoseg.data import Dataset, dataset_digest, scan_dataset, split_by_image
from autoseg.devices import (
    Device,
    Measurement,
    MeasureSettings,
    measure_quiet,
    open_device,
    passing,
    settings_from_config,
    unreliable_note,
)
from autoseg.errors import InputError
from autoseg.export import ExportInfo, export_final, model_metadata, quantize_int8
from autoseg.final_train import (
    FinalSettings,
    check_cache_memory,
    final_batch_size,
    final_key,
    final_settings,
    image_class_pixels,
    loader_workers,
    split_validation,
    teacher_source,
    train_final,
)
from autoseg.gate import Gate
from autoseg.infer import evaluate, ort_runner
from autoseg.reps import RepSet, build_reps, rep_arrays, write_contact_sheet, write_manifest, write_tile_pngs
from autoseg.rundir import RunDir, write_json_atomic, write_text_atomic
from autoseg.search import (
    Objective,
    SearchTask,
    TileData,
    check_space,
    choose_best,
    distinct_trials,
    open_study,
    pareto_summary,
    plan_search,
    run_trials,
    study_storage,
    tile_choices,
    timed_size,
    trial_counts,
)
from autoseg.storage import MAX_RETRY, describe, storage_errors
from autoseg.study_data import record_study_data, wait_for_others
from autoseg.tiles import TileIndex, build_index
from autoseg.train import FOLD_TILE_PASSES, TrainSettings, cv_epochs, train_model, training_settings
from autoseg.unet import Arch, build_unet
from autoseg.visual import write_example
from autoseg.workers import run_parallel

log = logging.getLogger(__name__)


@dataclass
class DataStage:
    ds: Dataset  # training images (and the held-out split when no test folders are given)
    train_ids: np.ndarray
    test_ds: Dataset
    test_ids: np.ndarray


# ------------------------------------------------------------------ data stage


def prepare_data(cfg: Config, progress: bool = False) -> DataStage:
    """Scan images and masks, and decide which images train and which test (by image, never by tile)."""
    d = cfg.data
    if d.images is None or d.masks is None:
        raise InputError("data.images / data.masks: both folders are required; pass --images DIR --masks DIR")
    ds = scan_dataset(d.images, d.masks, d, progress=progress)
    if (d.test_images is None) != (d.test_masks is None):
        raise InputError("data.test_images / data.test_masks: give both folders, or neither")
    if d.test_images is not None and d.test_masks is not None:
        test_ds = scan_dataset(
            d.test_images, d.test_masks, d, progress=progress, class_map=ds.class_map, channels=ds.channels
        )
        # The net sees test images normalised as it saw training images.
        test_ds = replace(test_ds, mean=ds.mean, std=ds.std)
        return DataStage(ds, np.arange(len(ds.pairs)), test_ds, np.arange(len(test_ds.pairs)))
    train_ids, test_ids = split_by_image(len(ds.pairs), d.test_fraction, cfg.seed)
    return DataStage(ds, train_ids, ds, test_ids)


def tile_index(cfg: Config, stage: DataStage, tile: int) -> TileIndex:
    return build_index(stage.ds.sizes, tile, cfg.tiles.overlap, images=stage.train_ids)


def select_reps(cfg: Config, stage: DataStage, tile: int, run: RunDir, progress: bool = False) -> RepSet:
    """Representative tiles of the training images at one tile size, cached under RUN/index."""
    index = tile_index(cfg, stage, tile)
    reps = build_reps(stage.ds, index, cfg.reps, cfg.seed, run.index, progress=progress)
    folder = run.reps if len(tile_choices(cfg)) == 1 else run.reps / f"tile{tile}"
    write_manifest(stage.ds, reps, folder / "manifest.csv")
    if cfg.reps.contact_sheet:
        write_contact_sheet(stage.ds, reps, folder / "contact_sheet.png")
    if cfg.reps.write_pngs:
        write_tile_pngs(stage.ds, reps, folder / "tiles")
    return reps


def class_weights(cfg: Config, ds: Dataset) -> tuple[float, ...] | None:
    cw = cfg.train.class_weights
    k = ds.class_map.num_classes
    if cw == "none":
        return None
    if isinstance(cw, list):
        if len(cw) != k:
            raise InputError(f"train.class_weights: needs {k} weights (one per class), got {len(cw)}")
        return tuple(float(v) for v in cw)
    freq = ds.class_pixels / max(1, ds.class_pixels.sum())
    w = 1.0 / np.sqrt(np.maximum(freq, 1e-6))
    return tuple(float(v) for v in w / w.mean())


def data_summary(stage: DataStage, reps_by_tile: dict[int, RepSet]) -> dict[str, Any]:
    summary = stage.ds.summary()
    summary["train_images"] = [stage.ds.pairs[i].stem for i in stage.train_ids]
    summary["test_images"] = [stage.test_ds.pairs[i].stem for i in stage.test_ids]
    summary["test_source"] = "split" if stage.test_ds is stage.ds else "folders"
    summary["tiles"] = {str(t): r.n_tiles for t, r in reps_by_tile.items()}
    summary["reps"] = {str(t): len(r.rows) for t, r in reps_by_tile.items()}
    summary.update(data_digests(stage))
    return summary


def data_digests(stage: DataStage) -> dict[str, str | None]:
    """The run's data, by content (data.json): the training folders', and the test folders' when given."""
    return {"digest": dataset_digest(stage.ds),
            "test_digest": None if stage.test_ds is stage.ds else dataset_digest(stage.test_ds)}


# Flags that give a run's data folders again, by data.<key>.
_DATA_FLAGS = {"images": "--images DIR --masks DIR", "masks": "--images DIR --masks DIR",
               "test_images": "--test-images DIR --test-masks DIR", "test_masks": "--test-images DIR --test-masks DIR"}


def check_data_folders(cfg: Config, run: RunDir, given: set[str] | frozenset[str] = frozenset()) -> None:
    """One line naming the flags to pass when a folder the run's config names is gone (the data moved).
    `given`: the data keys this command's flags set (their own errors say what is wrong with them)."""
    for key in DATA_PATHS:
        path = getattr(cfg.data, key)
        if key in given or path is None or path.is_dir():
            continue
        raise InputError(
            f"{run.config}: data.{key} {path} is not there (did the data move?); pass {_DATA_FLAGS[key]} with "
            f"where it is now: it is checked against the run's data digest")


def check_data_digest(cfg: Config, run: RunDir, stage: DataStage, test: bool = True) -> None:
    """The folders read now must hold the data the run was made with (data.json's digests); runs made before
    digests were saved are not checked. `test`: check the test folders too (the run's own held-out set)."""
    try:
        saved = json.loads(run.data.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        saved = {}
    checks = [("digest", stage.ds, "images", "masks", "--images/--masks")]
    if test and stage.test_ds is not stage.ds:
        checks.append(("test_digest", stage.test_ds, "test_images", "test_masks", "--test-images/--test-masks"))
    for key, ds, images, masks, flags in checks:
        if not isinstance(saved.get(key), str):
            continue
        now = dataset_digest(ds)
        if now != saved[key]:
            raise InputError(
                f"{getattr(cfg.data, images)} and {getattr(cfg.data, masks)}: not the data run {run.root} was made "
                f"with (digest {now[:12]}, the run's {saved[key][:12]}); pass the run's own folders with {flags}, "
                f"or evaluate on other images with `autoseg eval {run.root} --test-images DIR --test-masks DIR`")


def same_test_data(run: RunDir, stage: DataStage) -> bool:
    """The test folders given hold the run's own test set (data.json's test_digest): it moved, nothing more."""
    try:
        saved = json.loads(run.data.read_text(encoding="utf-8")).get("test_digest")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(saved, str) and stage.test_ds is not stage.ds and dataset_digest(stage.test_ds) == saved


# ------------------------------------------------------------------ search


def data_stage(cfg: Config, run: RunDir, progress: bool = False, stage: DataStage | None = None
               ) -> tuple[DataStage, dict[int, RepSet], SearchTask]:
    """Images split, representatives chosen (cached under RUN/index) and their arrays: what the trials train on.
    `stage`: prepare_data's, when the caller has it already."""
    stage = stage or prepare_data(cfg, progress)
    if len(stage.train_ids) == 0:
        raise InputError(
            f"{cfg.data.images}: no training images left after the test split; lower data.test_fraction"
        )
    reps_by_tile = {t: select_reps(cfg, stage, t, run, progress) for t in tile_choices(cfg)}
    return stage, reps_by_tile, search_task(cfg, stage.ds, reps_by_tile)


def search_task(cfg: Config, ds: Dataset, reps_by_tile: dict[int, RepSet]) -> SearchTask:
    """The representatives' arrays and what a trial needs beside them (also a worker's, on another host)."""
    return SearchTask(
        data={t: TileData(*rep_arrays(ds, r)) for t, r in reps_by_tile.items()},
        in_channels=ds.channels,
        num_classes=ds.class_map.num_classes,
        class_weights=class_weights(cfg, ds),
        # What each trial's ONNX file carries beside its net, as the final model does.
        dataset_metadata={"classes": list(ds.class_map.names), "mean": list(ds.mean),
                          "std": list(ds.std), "class_map": ds.class_map.to_dict()},
    )


@contextmanager
def run_lock(run: RunDir) -> Iterator[None]:
    """One search per run directory; the OS drops the lock if the process is killed."""
    path = run.root / ".lock"
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{run.root}: another autoseg search is running here; wait or use another --out") from None
        yield


def run_search(cfg: Config, resume_anyway: bool = False, progress: bool = False) -> dict[str, Any]:
    started = time.time()  # search.max_minutes counts from here
    run = RunDir(cfg.out).prepare()
    with run_lock(run), storage_errors(cfg.search.storage):
        if cfg.search.storage is not None:  # a bad URL or password, or no server, fails before any work
            study_storage(run, cfg.search.storage).engine.dispose()
        # Absolute paths (load_config resolved the data's): a copied or moved run still names its files.
        saved = {**config_to_dict(cfg), "out": os.fsdecode(run.root.resolve())}
        write_text_atomic(run.config, yaml.safe_dump(saved, sort_keys=False))
        tiles = tile_choices(cfg)
        check_space(cfg.search.space, tiles)

        stage, reps_by_tile, task = data_stage(cfg, run, progress)
        summary = data_summary(stage, reps_by_tile)
        summary["cv_epochs"] = {str(t): cv_epochs(cfg.train, len(r.rows)) for t, r in reps_by_tile.items()}
        write_json_atomic(run.data, summary)
        for t, epochs in summary["cv_epochs"].items():
            log.info("cross-validation%s: %d folds x %d epochs on %d representatives%s", f" at tile {t}"
                     if len(tiles) > 1 else "", cfg.train.folds, epochs, summary["reps"][t],
                     "" if cfg.train.epochs else f" (about {FOLD_TILE_PASSES} tiles per fold; --epochs sets it)")

        settings = settings_from_config(cfg.device, cfg.seed)
        with closing(open_device(cfg.device, run.latency_cache, cfg.search.storage)) as device:
            log.info("measuring %slatency on %s (%s)", "int8 " if cfg.device.precision == "int8" else "",
                     device.name, device.source)
            study = open_study(run, cfg, resume_anyway)
            # Budgets, the latency range (or a check of the budget), a calibration and the ETA; bad ones exit 2.
            clock = plan_search(cfg, task, device, settings, study, started)
            if cfg.search.storage is not None:  # what `autoseg worker` on other hosts joins with
                record_study_data(study, cfg, stage.ds, reps_by_tile, clock.deadline, summary["digest"])
            if cfg.search.workers > 1:
                objective = Objective(cfg, task, device, settings, run, gate=Gate(run.root))
                run_parallel(cfg, run, task, objective, study, progress, clock)
            else:
                objective = Objective(cfg, task, device, settings, run)
                run_trials(study, objective, cfg.search.trials, progress, deadline=clock.deadline, clock=clock)
            # A worker that died has its trial put back in the queue: run it here, or the budget comes up short.
            for _ in range(MAX_RETRY + 1):
                if (cfg.search.storage is None or not wait_for_others(study)
                        or len(distinct_trials(study)) >= cfg.search.trials):
                    break
                log.info("running the trial(s) of a worker that stopped")
                run_trials(study, objective, cfg.search.trials, progress, deadline=clock.deadline, clock=clock)
            best = choose_best(study, cfg.search)
            card = finalize(cfg, run, stage, task, best, progress, device=device, settings=settings)
            card["pareto_front"] = pareto_summary(study)
            card["trials"] = trial_counts(study)
            predictor = _predictor_card(study)
            if predictor:
                card["latency_predictor"] = predictor
            write_json_atomic(run.best / "model_card.json", card)  # the float net is done: keep its card
            if cfg.export.int8 or cfg.device.precision == "int8":
                card["int8"] = int8_variant(cfg, run, stage, task, card, device, settings, progress)
                write_json_atomic(run.best / "model_card.json", card)
    _write_report(run, cfg.search.storage)
    return card


def ship_trial(cfg: Config, run: RunDir, number: int, progress: bool = False,
               given: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """Any trial's net, trained, exported, verified and tested like the chosen one, into RUN/trials/N/.

    For picking another net off the Pareto front: a rerun keeps what is done, like the search's own.
    `given`: the data keys this command's flags set (check_data_folders)."""
    from autoseg.rundir import check_study_file
    from autoseg.search import load_study

    if cfg.search.storage is None:
        if not run.study_db.exists():
            raise InputError(f"{run.study_db}: not found; is {run.root} a run directory written by `autoseg search`?")
        check_study_file(run.study_db)
    with storage_errors(cfg.search.storage):
        trials = {t.number: t for t in load_study(run, cfg, 0).trials}
    if number not in trials:
        where = run.study_db if cfg.search.storage is None else describe(cfg.search.storage)
        raise InputError(f"--trial {number}: no such trial in {where} (trials 0-{max(trials, default=-1)})")
    trial = trials[number]
    trial = trials.get(trial.user_attrs.get("same_as_trial"), trial)  # a repeat: its twin holds the attributes
    if "arch_dict" not in trial.user_attrs or "tile" not in trial.user_attrs:
        raise InputError(f"--trial {number}: the trial never got as far as a net ({trial.state.name}); "
                         "pick a trial of the report's table")
    with run_lock(run):
        check_data_folders(cfg, run, given)
        stage = prepare_data(cfg, progress)
        check_data_digest(cfg, run, stage)  # before any work on data that may not be the run's
        stage, _, task = data_stage(cfg, run, progress, stage)
        card = finalize(cfg, run, stage, task, trial, progress, folder=run.trial(number))
        if number != trial.number:
            card["same_as_trial"] = trial.number
        write_json_atomic(run.trial(number) / "model_card.json", card)
    return card


# ------------------------------------------------------------------ the chosen net


def finalize(
    cfg: Config, run: RunDir, stage: DataStage, task: SearchTask, best: Any, progress: bool = False,
    folder: Path | None = None, device: Device | None = None, settings: MeasureSettings | None = None,
) -> dict[str, Any]:
    """Train the chosen net to ship (on crops of all training images, or on the representatives), export it
    verified, and test it on full images, into `folder` (RUN/best; RUN/trials/N to ship another trial's net).
    With a device, a latency the search took on a busy, noisy or throttled device is timed again (chosen_latency).

    A rerun keeps a training that finished (a later step failed) and goes on with one that was interrupted.
    """
    where = folder or run.best
    arch = Arch.from_dict(best.user_attrs["arch_dict"])
    tile = int(best.user_attrs["tile"])
    ds = stage.ds
    if cfg.train.final_data == "all":
        key, train = _on_all_data(cfg, run, stage, task, arch, tile, best.number, progress, where)
    else:
        key, train = _on_reps(cfg, task, arch, tile, best.number, progress, where)
    checkpoint = load_if_key(where / "model.pt", key)
    if checkpoint is not None:
        log.info("trial %d (%s) was retrained already: %s kept", best.number, arch.key(), where / "model.pt")
        model = build_unet(arch, task.in_channels, task.num_classes)
        model.load_state_dict(checkpoint["state_dict"])
    else:
        model, training = train()
        checkpoint = {
            "arch": arch.to_dict(),
            "in_channels": task.in_channels,
            "num_classes": task.num_classes,
            "tile": tile,
            "mean": list(ds.mean),
            "std": list(ds.std),
            "classes": list(ds.class_map.names),
            "class_map": ds.class_map.to_dict(),
            "state_dict": model.state_dict(),
            "config": config_to_dict(cfg),
            "training": training,
            "retrain_key": key,
        }
        save_checkpoint(checkpoint, where / "model.pt")
        write_json_atomic(where / "training.json", training)
        (where / RETRAIN_STATE).unlink(missing_ok=True)
    info = export_checkpoint(checkpoint, model.eval(), where / "model.onnx", cfg)
    log.info("exported %s: %.1f kB, opset %d, %d -> %d nodes, parity max |diff| %.2e", info.path,
             info.size_bytes / 1e3, info.opset, info.nodes_before, info.nodes_after, info.parity_max_abs_diff)

    metrics = evaluate_model(cfg, run, where / "model.onnx", stage.test_ds, stage.test_ids, arch, tile, progress,
                             out=None if folder is None else folder / "eval")
    # The search's timed graph is in RUN/trials/N/model.onnx until a shipped trial's export replaces it.
    timed = run.trial(best.number) / "model.onnx" if folder is None else None
    return {
        "trial": best.number,
        "arch": arch.key(),
        "arch_dict": arch.to_dict(),
        "params": best.user_attrs.get("params"),
        "macs": best.user_attrs.get("macs"),
        **chosen_latency(best.user_attrs, task.in_channels, timed, device, settings),
        "measure_size": best.user_attrs.get("measure_size"),
        "precision": best.user_attrs.get("precision", "fp32"),  # of the model timed in the search
        "cv_score": best.user_attrs.get("cv_mean"),
        "cv_std": best.user_attrs.get("cv_std"),
        "fold_scores": best.user_attrs.get("fold_scores"),
        "training": _training_summary(checkpoint.get("training")),
        **_card_test_metrics(metrics),
        "test_images": len(stage.test_ids),
        "classes": list(ds.class_map.names),
        "in_channels": task.in_channels,
        "tile": tile,
        "mean": list(ds.mean),
        "std": list(ds.std),
        "onnx": info.to_dict(),
        "autoseg_version": __version__,
    }


def chosen_latency(
    attrs: dict[str, Any], in_channels: int, graph: Path | None, device: Device | None = None,
    settings: MeasureSettings | None = None,
) -> dict[str, Any]:
    """The model card's latency keys of the chosen net, with latency_flags (why the figure is not clean).

    A search figure with flags a wait can clear is timed again on `device`: the same graph the search timed
    (`graph`), waiting for a quiet device up to QUIET_WAIT_S (measure_quiet). The quieter figure is kept;
    search_latency_ms and search_latency_flags keep the search's when it was replaced.
    """
    lat = attrs.get("latency") or {}
    m = Measurement.from_dict(lat) if lat else None
    out: dict[str, Any] = {
        "latency_ms": attrs.get("latency_ms"),
        "latency_stats": lat.get("stats"),
        "latency_source": attrs.get("latency_source"),
        "device": attrs.get("device"),
        "fingerprint": lat.get("fingerprint"),
        "latency_flags": list(m.flags) if m else [],
    }
    size = attrs.get("measure_size")
    if (m is None or not passing(m.flags) or device is None or settings is None or graph is None
            or not graph.is_file() or not size):
        return out
    log.info("the chosen net was timed while %s: timing it again", "; ".join(passing(m.flags)))
    timed, _ = measure_quiet(device, {"chosen net": graph.read_bytes()}, (1, in_channels, size, size), settings)
    again = timed.get("chosen net")
    if again is None or again.median_ms is None or len(passing(again.flags)) >= len(passing(m.flags)):
        return out  # no quieter figure: the search's stays, with its flags
    return {
        **out,
        "latency_ms": again.median_ms,
        "latency_stats": again.stats,
        "latency_source": again.source,
        "device": again.device,
        "fingerprint": again.fingerprint,
        "latency_flags": list(again.flags),
        "search_latency_ms": out["latency_ms"],
        "search_latency_flags": out["latency_flags"],
    }


RETRAIN_STATE = "retrain_state.pt"  # the final retrain in progress, in best/
RETRAIN_SAVE_SHARE = 0.05  # saving the retrain's state may take at most this share of its time


def retrain_key(trial: int, arch: Arch, tile: int, settings: TrainSettings, data: TileData) -> str:
    """What the final retrain depends on: the same key gives the same net, bit for bit."""
    h = hashlib.sha256(json.dumps({"trial": trial, "arch": arch.key(), "tile": tile, "settings": asdict(settings),
                                   "x": list(data.x.shape)}, sort_keys=True).encode())
    for a in (data.x, data.y):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _on_reps(
    cfg: Config, task: SearchTask, arch: Arch, tile: int, trial: int, progress: bool, where: Path
) -> tuple[str, Callable[[], tuple[torch.nn.Module, dict[str, Any]]]]:
    """train.final_data: reps. Train on the representative tiles for final_epochs, as the search's folds do."""
    data = task.data[tile]
    settings = training_settings(cfg.train, cfg.seed, task.class_weights, epochs=cfg.train.final_epochs)
    key = retrain_key(trial, arch, tile, settings, data)

    def train() -> tuple[torch.nn.Module, dict[str, Any]]:
        t0 = time.monotonic()
        model = _retrain(where / RETRAIN_STATE, key, arch, task, data, settings, trial, progress)
        return model, {"data": "reps", "images": None, "tiles": len(data.x), "epochs": settings.epochs,
                       "tile_passes": settings.epochs * len(data.x), "seconds": time.monotonic() - t0,
                       "stopped": "budget", "curve": []}

    return key, train


def _on_all_data(
    cfg: Config, run: RunDir, stage: DataStage, task: SearchTask, arch: Arch, tile: int, trial: int, progress: bool,
    where: Path,
) -> tuple[str, Callable[[], tuple[torch.nn.Module, dict[str, Any]]]]:
    """train.final_data: all. Crops of every training image; a validation split by image picks the weights."""
    t = cfg.train
    fit_ids, val_ids = split_validation(stage.train_ids, t.val_fraction, cfg.seed)
    teacher = teacher_source(t.teacher, stage.ds, task.in_channels) if t.teacher else None
    multiple = math.lcm(arch.multiple, teacher.arch.multiple if teacher else 1)  # both nets take the crops
    crop = -(-(t.final_crop or tile) // multiple) * multiple
    workers = loader_workers(t, stage.ds, fit_ids)
    check_cache_memory(t, workers)
    settings = training_settings(t, cfg.seed, task.class_weights, epochs=0)

    def plan(a: Arch, teacher_key: str = "") -> tuple[FinalSettings, str]:
        fs = final_settings(t, settings, crop, final_batch_size(t, a, task.in_channels, task.num_classes, crop),
                            workers)
        if not teacher_key:
            fs = replace(fs, distill_weight=0.0)
        return fs, final_key(a.key() + teacher_key, tile, fs, stage.ds, fit_ids, val_ids)

    fs, key = plan(arch, teacher.key if teacher else "")

    def fit(a: Arch, fs: FinalSettings, key: str, state: Path, what: str, soft: torch.nn.Module | None = None
            ) -> tuple[torch.nn.Module, dict[str, Any]]:
        log.info("training %s (%s) on %d training images (%d validate): %d crops of %d px, batch %d, %d steps%s%s",
                 what, a.key(), len(fit_ids), len(val_ids), fs.tiles, crop, fs.batch_size, fs.steps,
                 f", at most {fs.minutes:g} min" if fs.minutes else "",
                 f", distilled from {teacher.name}" if soft is not None and teacher else "")
        pixels = image_class_pixels(stage.ds, fit_ids, run.index, progress)
        torch.manual_seed(cfg.seed)
        model = build_unet(a, task.in_channels, task.num_classes)
        r = train_final(model, stage.ds, fit_ids, val_ids, pixels, fs, state, key, progress, teacher=soft)
        return r.model, {
            "data": "all", "images": len(fit_ids), "val_images": [stage.ds.pairs[int(i)].stem for i in val_ids],
            "crop": crop, "batch_size": fs.batch_size, "tile_passes": r.tile_passes, "budget_tiles": fs.tiles,
            "best_step": r.best_step, "best_val_miou": r.best_val_miou, "stopped": r.stopped,
            "seconds": r.seconds, "teacher": teacher.name if soft is not None and teacher else None,
            "curve": r.curve,
        }

    def train() -> tuple[torch.nn.Module, dict[str, Any]]:
        soft = None
        if teacher is not None:
            soft = teacher.model
            if soft is None:  # the reference U-Net, trained once by the same final training and kept
                t_fs, t_key = plan(teacher.arch)
                path = run.best / "teacher.pt"
                done = load_if_key(path, t_key)
                if done is not None:
                    soft = build_unet(teacher.arch, task.in_channels, task.num_classes)
                    soft.load_state_dict(done["state_dict"])
                else:
                    soft, info = fit(teacher.arch, t_fs, t_key, run.best / "teacher_state.pt", "the teacher")
                    save_checkpoint({"arch": teacher.arch.to_dict(), "state_dict": soft.state_dict(),
                                     "retrain_key": t_key, "training": info}, path)
                    (run.best / "teacher_state.pt").unlink(missing_ok=True)
        return fit(arch, fs, key, where / RETRAIN_STATE, f"trial {trial}", soft)

    return key, train


def _training_summary(training: dict[str, Any] | None) -> dict[str, Any] | None:
    """The model card's view of the final training: everything but the curve (best/training.json has it)."""
    return None if training is None else {k: v for k, v in training.items() if k != "curve"}


def _retrain(
    state_path: Path, key: str, arch: Arch, task: SearchTask, data: TileData, settings: TrainSettings, trial: int,
    progress: bool,
) -> torch.nn.Module:
    """Train the chosen net from scratch, or on from the state an interrupted run of it saved."""
    resume = load_if_key(state_path, key)
    log.info("retraining trial %d (%s) for %d epochs%s", trial, arch.key(), settings.epochs,
             f", going on after epoch {resume['epochs_done']}" if resume else "")
    last, cost = time.monotonic(), 0.0

    def keep(epochs_done: int, state: Callable[[], dict]) -> None:
        # After every epoch that a save does not slow by more than RETRAIN_SAVE_SHARE: a small net's
        # state is saved each epoch, a big one's (megabytes) every few epochs.
        nonlocal last, cost
        now = time.monotonic()
        if epochs_done < settings.epochs and cost <= RETRAIN_SAVE_SHARE * (now - last):
            save_checkpoint({**state(), "retrain_key": key}, state_path)
            last = time.monotonic()
            cost = last - now

    torch.manual_seed(settings.seed)
    model = build_unet(arch, task.in_channels, task.num_classes)
    return train_model(model, data.x, data.y, task.num_classes, settings, progress=progress, resume=resume,
                       on_epoch=keep)


def int8_variant(
    cfg: Config, run: RunDir, stage: DataStage, task: SearchTask, card: dict[str, Any], device: Device,
    settings: MeasureSettings, progress: bool = False,
) -> dict[str, Any]:
    """Quantize the exported net to int8, test it like the float one, and time both on the device.

    Both are timed alike, waiting for a quiet device (measure_quiet); latency_flags and fp32_latency_flags
    say why a figure is not clean, and the summary prints the comparison as unreliable then."""
    arch, tile = Arch.from_dict(card["arch_dict"]), int(card["tile"])
    fp32 = run.best / "model.onnx"
    try:
        info = quantize_int8(fp32, run.best / "model.int8.onnx", task.data[tile].x)
    except Exception as e:  # an optional extra: it must not take the finished float model down with it
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        log.warning("int8: not exported, the float model stands alone (%s)", reason)
        return {"error": f"quantization failed: {reason}"}
    metrics = evaluate_model(
        cfg, run, info.path, stage.test_ds, stage.test_ids, arch, tile, progress, name="metrics.int8.json"
    )
    size = timed_size(arch, tile, cfg.device.measure_size)
    shape = (1, task.in_channels, size, size)
    timed, lost = measure_quiet(device, {"fp32": fp32.read_bytes(), "int8": info.path.read_bytes()}, shape, settings)
    int8_m, fp32_m = timed.get("int8"), timed.get("fp32")
    out = {
        **info.to_dict(),
        **_card_test_metrics(metrics),
        "latency_ms": int8_m.median_ms if int8_m else None,
        "fp32_latency_ms": fp32_m.median_ms if fp32_m else None,  # the float model, timed beside it
        "latency_flags": list(int8_m.flags) if int8_m else [],
        "fp32_latency_flags": list(fp32_m.flags) if fp32_m else [],
        "latency_source": int8_m.source if int8_m else None,
        "device": int8_m.device if int8_m else device.name,
        "measure_size": size,
        "latency_error": lost or next((m.message for m in timed.values() if m.median_ms is None), None),
    }
    log.info("int8: %s, %.1f kB, test mIoU %s (float %s), %s on %s", info.path.name, info.size_bytes / 1e3,
             _fmt(out["test_miou"]), _fmt(card.get("test_miou")), _int8_comparison(out), out["device"])
    return out


def _int8_comparison(q: dict[str, Any]) -> str:
    """'X ms vs Y ms float', plain only when both figures are clean; else with why it is unreliable."""
    flags = [*q.get("latency_flags", ()), *q.get("fp32_latency_flags", ())]
    return (f"{_fmt(q.get('latency_ms'), '.2f')} ms vs {_fmt(q.get('fp32_latency_ms'), '.2f')} ms float"
            f"{unreliable_note(flags)}")


def _card_test_metrics(metrics: dict[str, Any] | None) -> dict[str, Any]:
    """The model card's plain test-metric keys (None without test images)."""
    if not metrics:
        return dict.fromkeys(("test_miou", "test_dice", "test_pixel_acc", "test_per_class"))
    mean = metrics["mean"]
    return {
        "test_miou": mean["miou"],
        "test_dice": mean["macro_dice"],
        "test_pixel_acc": mean["pixel_acc"],
        "test_per_class": metrics["per_class"],
    }


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def export_checkpoint(checkpoint: dict[str, Any], model: torch.nn.Module, path: Path, cfg: Config) -> ExportInfo:
    arch = Arch.from_dict(checkpoint["arch"])
    # class_map: how masks encode the classes, so `autoseg predict` writes them alike (older checkpoints lack it)
    metadata = model_metadata(checkpoint["classes"], checkpoint["mean"], checkpoint["std"], checkpoint["tile"],
                              arch.key(), arch.multiple, checkpoint.get("class_map"))
    info = export_final(
        model,
        path,
        checkpoint["in_channels"],
        checkpoint["tile"],
        metadata,
        opset=cfg.export.opset,
        simplify=cfg.export.simplify,
        atol=cfg.export.parity_atol,
    )
    return info


def evaluate_model(
    cfg: Config,
    run: RunDir,
    onnx_path: Path,
    ds: Dataset,
    ids: np.ndarray,
    arch: Arch,
    tile: int,
    progress: bool = False,
    name: str = "metrics.json",
    out: Path | None = None,
) -> dict[str, Any] | None:
    """Metrics of the exported ONNX model on full-size test images, per image, per class and overall.

    Writes `out`/`name` (out: RUN/eval, the run's own held-out results); example images only for the main
    model (name metrics.json), in `out`/examples."""
    if len(ids) == 0:
        log.warning("no test images: pass --test-images/--test-masks or raise data.test_fraction")
        return None
    e = cfg.eval
    out = out or run.eval
    main = name == "metrics.json"  # only the main model's evaluation draws examples
    examples = {int(i) for i in ids[: e.num_examples]} if main else set()
    folder = out / "examples"
    if main and folder.is_dir():  # strips of an earlier evaluation of this set, maybe of changed images
        keep = {f"{ds.pairs[i].stem}.png" for i in examples}
        for old in folder.glob("*.png"):
            if old.name not in keep:
                old.unlink()

    def draw(i: int, image: np.ndarray, mask: np.ndarray, pred: np.ndarray) -> None:
        if i in examples:
            write_example(ds, i, image, mask, pred, folder)

    metrics = evaluate(ort_runner(onnx_path), ds, ids, e.mode, tile, e.window_overlap, e.batch, arch.multiple,
                       progress=progress, on_prediction=draw, width=arch.channels[0])
    metrics["mode"] = e.mode
    metrics["model"] = str(onnx_path)
    write_json_atomic(out / name, metrics)
    return metrics


def other_eval_folder(run: RunDir, images: Path, masks: Path) -> Path:
    """Where an evaluation on images other than the run's held-out ones goes: RUN/eval/other/<name>-<digest>,
    so it never overwrites the run's own test results (and the same folders land in the same place)."""
    key = "\0".join(os.fsdecode(Path(p).resolve()) for p in (images, masks))
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(images).resolve().name)[:40] or "images"
    return run.eval / "other" / f"{name}-{digest}"


def _write_report(run: RunDir, storage: str | None = None) -> None:
    from autoseg.report import write_report

    with storage_errors(storage):
        write_report(run.root, storage)


def summary_lines(card: dict[str, Any]) -> list[str]:
    return [
        f"best architecture: {card['arch']} (trial {card['trial']}, tile {card['tile']})",
        f"  CV mIoU:   {_fmt(card['cv_score'], '.3f')} ± {_fmt(card['cv_std'], '.3f')}",
        f"  test mIoU: {_fmt(card['test_miou'], '.3f')} on {card['test_images']} image(s)",
        f"  latency:   {_fmt(card['latency_ms'], '.2f')} ms median"
        + (" in int8" if card.get("precision") == "int8" else "")
        + (f" at {size}x{size} px" if (size := card.get("measure_size")) else "")
        + f" on {card['device']} ({card['latency_source']})"
        + unreliable_note(card.get("latency_flags") or ()),
        f"  size:      {card['params']:,} params, {card['macs'] / 1e6:.1f}M MACs, "
        f"ONNX {card['onnx']['size_bytes'] / 1e3:.1f} kB",
        *_training_lines(card.get("training")),
        *_int8_summary(card.get("int8")),
        *_trials_summary(card.get("trials")),
    ]


def _training_lines(t: dict[str, Any] | None) -> list[str]:
    if not t:
        return []
    if t["data"] == "reps":
        return [f"  trained:   {t['epochs']} epochs on {t['tiles']} representative tiles"]
    val = (f", best validation mIoU {_fmt(t['best_val_miou'])} on {len(t['val_images'])} image(s) at "
           f"{t['best_step']:,} steps" if t.get("best_val_miou") is not None else ", no validation split")
    return [f"  trained:   {t['tile_passes']:,} crops of {t['crop']} px from {t['images']} training images "
            f"({t['stopped'].replace('_', ' ')}, {t['seconds'] / 60:.1f} min){val}"]


def _trials_summary(n: dict[str, int] | None) -> list[str]:
    if not n:
        return []
    repeats = f"; {n['repeats']} repeated proposal(s) reused" if n["repeats"] else ""
    failed = f"; {n['unmeasured']} the device could not measure" if n.get("unmeasured") else ""
    guessed = f" ({n['predicted_over_budget']} predicted, not measured)" if n.get("predicted_over_budget") else ""
    return [f"  searched:  {n['distinct']} distinct nets ({n['completed']} trained, {n['over_budget']} over the "
            f"latency budget{guessed}, {n['distinct'] - n['completed'] - n['over_budget']} pruned otherwise)"
            f"{repeats}{failed}"]


def _predictor_card(study: Any) -> dict[str, Any] | None:
    """The model card's account of the latency predictor (issue #26): nets measured and predicted, and its error
    on the nets it predicted before they were measured; None when no predictor was fitted."""
    from autoseg.report.collect import _trial_row
    from autoseg.report.predicted import predictor_summary

    s = predictor_summary([_trial_row(t) for t in study.get_trials(deepcopy=False)])
    return None if s is None else {k: v for k, v in s.items() if k != "pairs"}


def _int8_summary(q: dict[str, Any] | None) -> list[str]:
    if not q:
        return []
    if "error" in q:
        return [f"  int8:      not exported: {q['error']}"]
    return [
        f"  int8:      test mIoU {_fmt(q['test_miou'], '.3f')}, {_int8_comparison(q)}, "
        f"ONNX {q['size_bytes'] / 1e3:.1f} kB: {q['path']}"
    ]
