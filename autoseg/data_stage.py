"""The data stage of a run: which images train and which test, the representative tiles, and the arrays a
trial trains on; and the checks that a rerun reads the data the run was made with."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from autoseg.config import DATA_PATHS, Config
from autoseg.data import Dataset, dataset_digest, scan_dataset, split_by_image
from autoseg.errors import InputError
from autoseg.reps import RepSet, build_reps, rep_arrays, write_contact_sheet, write_manifest, write_tile_pngs
from autoseg.rundir import RunDir
from autoseg.search import SearchTask, TileData, tile_choices
from autoseg.tiles import TileIndex, build_index


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
