"""`autoseg predict`: masks for new images, from the exported model alone, in the training masks' encoding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from autoseg.data import ClassMap
from autoseg.errors import InputError
from autoseg.export import export_final
from autoseg.predict import encode_mask, model_info, overlay, predict_folder
from autoseg.unet import Arch, build_unet
from autoseg.visual import palette

ARCH = Arch((3, 3), (4, 8))
COLOURS = ((0, 0, 0), (200, 30, 30), (30, 200, 30))


def colour_map() -> ClassMap:
    return ClassMap("palette", ("bg", "road", "tree"), None, COLOURS, None)


def exported(tmp_path: Path, cmap: ClassMap | None, channels: int = 3) -> Path:
    torch.manual_seed(0)
    model = build_unet(ARCH, channels, 3).eval()
    meta = {"classes": json.dumps(["bg", "road", "tree"]), "tile": "32", "mean": json.dumps([0.5] * channels),
            "std": json.dumps([0.25] * channels), "arch": ARCH.key(), "input_multiple": str(ARCH.multiple)}
    if cmap is not None:
        meta["class_map"] = json.dumps(cmap.to_dict())
    path = tmp_path / "model.onnx"
    export_final(model, path, channels, 32, meta)
    return path


def write_images(folder: Path, sizes: list[tuple[int, int]]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        names.append(f"img{i}")
    return names


def test_masks_come_back_in_the_encoding_they_were_given_in():
    ids = np.array([[0, 1], [1, 0]])
    binary = ClassMap("binary", ("bg", "fg"), (0, 255), None, None)
    assert encode_mask(ids, binary).tolist() == [[0, 255], [255, 0]]
    contiguous = ClassMap("contiguous", ("a", "b", "c"), (0, 1, 2), None, 255)
    assert encode_mask(ids + 1, contiguous).tolist() == [[1, 2], [2, 1]]
    gray_palette = ClassMap("palette", ("a", "b"), (10, 200), ((10, 10, 10), (200, 200, 200)), None)
    assert encode_mask(ids, gray_palette).tolist() == [[10, 200], [200, 10]]
    rgb = encode_mask(ids * 2, colour_map())
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8 and rgb[0, 1].tolist() == list(COLOURS[2])
    assert encode_mask(ids, None).dtype == np.uint8  # no class map: the ids
    assert encode_mask(np.array([[300]]), None).dtype == np.uint16


def test_overlay_blends_class_colours_over_gray_and_rgb_images():
    pal = palette(3, COLOURS)
    ids = np.full((4, 4), 1)
    gray = np.zeros((4, 4, 1), np.uint8)
    out = overlay(gray, ids, pal, alpha=0.5)
    assert out.shape == (4, 4, 3) and out[0, 0].tolist() == [100, 15, 15]


def test_a_colour_coded_dataset_gets_colour_masks_for_images_of_any_size(tmp_path):
    model = exported(tmp_path, colour_map())
    assert model_info(model).class_map == colour_map()
    names = write_images(tmp_path / "new", [(40, 52), (33, 33)])  # not multiples of the net's 2
    summary = predict_folder(model, tmp_path / "new", tmp_path / "out", mode="whole", write_overlay=True)
    assert summary["images"] == 2 and abs(sum(summary["class_share"].values()) - 1) < 1e-9
    for name, (h, w) in zip(names, [(40, 52), (33, 33)], strict=True):
        m = np.asarray(Image.open(tmp_path / "out" / f"{name}.png"))
        assert m.shape == (h, w, 3)
        assert {tuple(c) for c in m.reshape(-1, 3).tolist()} <= set(COLOURS)
        assert Image.open(tmp_path / "out" / f"{name}_overlay.jpg").size == (w, h)
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left
    # Moving windows label the same images; same shapes.
    predict_folder(model, tmp_path / "new", tmp_path / "win", mode="window", overlap=0.25)
    assert np.asarray(Image.open(tmp_path / "win" / "img0.png")).shape == (40, 52, 3)


def test_a_model_without_a_class_map_writes_class_ids(tmp_path):
    model = exported(tmp_path, None)
    write_images(tmp_path / "new", [(32, 32)])
    summary = predict_folder(model, tmp_path / "new", tmp_path / "out")
    assert summary["encoding"] == "class ids"
    assert set(np.unique(np.asarray(Image.open(tmp_path / "out" / "img0.png"))).tolist()) <= {0, 1, 2}


def test_two_images_with_one_stem_are_refused(tmp_path):
    model = exported(tmp_path, colour_map())
    write_images(tmp_path / "new", [(32, 32)])
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "new" / "img0.jpg")
    with pytest.raises(InputError, match="'img0' names more than one image"):
        predict_folder(model, tmp_path / "new", tmp_path / "out")
