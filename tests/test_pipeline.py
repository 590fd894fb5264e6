"""The pipeline's data decisions: which images train, which test, and how test images are read."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from autoseg.config import load_config
from autoseg.data_stage import class_weights, prepare_data
from autoseg.errors import InputError
from autoseg.rundir import RunDir


def write_pair(folder, stem: str, value: int, labels: list[int], size: int = 16) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(folder / "images" / f"{stem}.png")
    mask = np.zeros((size, size), np.uint8)
    for i, c in enumerate(labels):
        mask[i] = c
    Image.fromarray(mask).save(folder / "masks" / f"{stem}.png")


def test_held_out_split_is_by_image(tmp_path):
    for i in range(10):
        write_pair(tmp_path, f"im{i}", 10 * i, [0, 1, 2])
    cfg = load_config(None, {"data.images": str(tmp_path / "images"), "data.masks": str(tmp_path / "masks"),
                             "data.test_fraction": 0.3})
    stage = prepare_data(cfg)
    assert stage.test_ds is stage.ds
    assert len(stage.test_ids) == 3 and len(stage.train_ids) == 7
    assert not set(stage.test_ids) & set(stage.train_ids)


def test_test_folders_use_the_training_classes_and_normalisation(tmp_path):
    train, test = tmp_path / "train", tmp_path / "test"
    for i in range(3):
        write_pair(train, f"a{i}", 200, [0, 1, 2])
    write_pair(test, "b0", 20, [0, 0, 1])  # only two of the three classes: still the training class map
    cfg = load_config(None, {
        "data.images": str(train / "images"), "data.masks": str(train / "masks"),
        "data.test_images": str(test / "images"), "data.test_masks": str(test / "masks"),
    })
    stage = prepare_data(cfg)
    assert list(stage.train_ids) == [0, 1, 2] and list(stage.test_ids) == [0]
    assert stage.test_ds.class_map == stage.ds.class_map
    assert stage.test_ds.mean == stage.ds.mean and stage.test_ds.std == stage.ds.std


def test_one_test_folder_without_the_other_is_refused(tmp_path):
    write_pair(tmp_path, "a", 1, [0, 1])
    cfg = load_config(None, {"data.images": str(tmp_path / "images"), "data.masks": str(tmp_path / "masks"),
                             "data.test_images": str(tmp_path / "images")})
    with pytest.raises(InputError, match=r"data\.test_images / data\.test_masks"):
        prepare_data(cfg)


def test_inverse_class_weights_favour_rare_classes(tmp_path):
    write_pair(tmp_path, "a", 1, [0, 1, 2, 2, 2, 2], size=32)
    base = {"data.images": str(tmp_path / "images"), "data.masks": str(tmp_path / "masks")}
    stage = prepare_data(load_config(None, {**base, "data.test_fraction": 0.0}))
    w = class_weights(load_config(None, {**base, "train.class_weights": "inverse"}), stage.ds)
    assert w is not None and w[1] > w[2] > w[0]
    assert class_weights(load_config(None, base), stage.ds) is None
    with pytest.raises(InputError, match=r"train\.class_weights: needs 3 weights"):
        class_weights(load_config(None, {**base, "train.class_weights": [1.0]}), stage.ds)


def test_run_directory_check_is_safe_when_processes_share_it(tmp_path):
    # A second search on one --out (refused later by the run lock), or `autoseg reps` beside a search, checks
    # the directory at the same time: one process deleted the other's probe, which then said "cannot write
    # the run directory".
    def prepare_many() -> None:
        for _ in range(300):
            RunDir(tmp_path / "run").prepare()

    with ThreadPoolExecutor(4) as pool:
        for job in [pool.submit(prepare_many) for _ in range(4)]:
            job.result()
    assert not list((tmp_path / "run").iterdir())  # no probe left behind
