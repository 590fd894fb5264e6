import json

import numpy as np
import pytest
from PIL import Image

from autoseg.config import DataConfig
from autoseg.data import scan_dataset
from autoseg.demo_data import CLASSES, MARKER, draw_scene, generate_demo
from autoseg.errors import InputError


def arrays(folder):
    return [np.array(Image.open(p)) for p in sorted(folder.glob("*.png"))]


def test_demo_folder_layout_and_scan(tmp_path):
    images, masks = generate_demo(tmp_path / "demo", n_images=6, size=64, seed=1)
    assert images == tmp_path / "demo" / "images" and masks == tmp_path / "demo" / "masks"
    imgs, msks = arrays(images), arrays(masks)
    assert len(imgs) == len(msks) == 6
    assert all(i.shape == (64, 64, 3) and i.dtype == np.uint8 for i in imgs)
    assert all(m.shape == (64, 64) and m.max() < len(CLASSES) for m in msks)
    classes = json.loads((tmp_path / "demo" / "classes.json").read_text())["classes"]
    assert [c["name"] for c in classes] == ["background", "road", "roof", "vegetation", "water"]
    ds = scan_dataset(images, masks, DataConfig())
    assert ds.class_map.names == CLASSES and ds.channels == 3
    assert not list(tmp_path.glob(".demo.*"))  # no temp folders left behind


def test_deterministic_for_a_seed():
    a = [draw_scene(np.random.default_rng(5), 48) for _ in range(2)]
    assert np.array_equal(a[0][0], a[1][0]) and np.array_equal(a[0][1], a[1][1])
    other = draw_scene(np.random.default_rng(6), 48)
    assert not np.array_equal(a[0][0], other[0])


def test_every_class_appears_and_images_vary(tmp_path):
    rng = np.random.default_rng(0)
    scenes = [draw_scene(rng, 96) for _ in range(12)]
    counts = np.bincount(np.concatenate([m.ravel() for _, m in scenes]), minlength=len(CLASSES))
    fractions = counts / counts.sum()
    assert (fractions > 0.01).all(), fractions
    # Classes are separable by colour only in part: per-class mean colours differ across images.
    road_means = [img[m == 1].mean(axis=0) for img, m in scenes if (m == 1).any()]
    assert np.ptp(np.array(road_means), axis=0).max() > 15


def test_complete_folder_is_not_regenerated_but_new_parameters_are(tmp_path):
    out = tmp_path / "demo"
    generate_demo(out, n_images=3, size=32, seed=0)
    stamp = (out / MARKER).stat().st_mtime_ns
    first = arrays(out / "images")
    generate_demo(out, n_images=3, size=32, seed=0)
    assert (out / MARKER).stat().st_mtime_ns == stamp
    generate_demo(out, n_images=4, size=32, seed=0)
    assert len(arrays(out / "images")) == 4
    assert np.array_equal(arrays(out / "images")[0], first[0])  # same seed, same first scene
    assert not [p for p in tmp_path.iterdir() if p.name != "demo"]


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(InputError, match=r"mine: exists and is not a demo folder"):
        generate_demo(out, n_images=2, size=32)
    assert (out / "precious.txt").read_text() == "keep me"
