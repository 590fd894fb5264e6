"""The chosen net trained to ship: on crops of all training images (train.final_data: all) or on the
representatives (reps), keyed by everything it depends on, and going on from the state a killed run saved."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoseg.checkpoint import load_if_key, save_checkpoint
from autoseg.config import Config
from autoseg.data_stage import DataStage
from autoseg.final_train import (
    FinalSettings,
    check_cache_memory,
    final_batch_size,
    final_crop,
    final_key,
    final_settings,
    image_class_pixels,
    loader_workers,
    split_validation,
    teacher_source,
    train_final,
)
from autoseg.rundir import RunDir
from autoseg.search import SearchTask, TileData
from autoseg.train import TrainSettings, train_model, training_settings
from autoseg.unet import Arch, build_unet

log = logging.getLogger(__name__)


RETRAIN_STATE = "retrain_state.pt"  # the final retrain in progress, in best/
RETRAIN_SAVE_SHARE = 0.05  # saving the retrain's state may take at most this share of its time


def retrain_key(trial: int, arch: Arch, tile: int, settings: TrainSettings, data: TileData) -> str:
    """What the final retrain depends on: the same key gives the same net, bit for bit."""
    h = hashlib.sha256(json.dumps({"trial": trial, "arch": arch.key(), "tile": tile, "settings": asdict(settings),
                                   "x": list(data.x.shape)}, sort_keys=True).encode())
    for a in (data.x, data.y):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def on_reps(
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


def on_all_data(
    cfg: Config, run: RunDir, stage: DataStage, task: SearchTask, arch: Arch, tile: int, trial: int, progress: bool,
    where: Path,
) -> tuple[str, Callable[[], tuple[torch.nn.Module, dict[str, Any]]]]:
    """train.final_data: all. Crops of every training image; a validation split by image picks the weights."""
    t = cfg.train
    fit_ids, val_ids = split_validation(stage.train_ids, t.val_fraction, cfg.seed)
    teacher = teacher_source(t.teacher, stage.ds, task.in_channels) if t.teacher else None
    multiple = math.lcm(arch.multiple, teacher.arch.multiple if teacher else 1)  # both nets take the crops
    crop = final_crop(t, tile, multiple)
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
