"""The agent's predict is the host's `autoseg predict`, numerically: same labels, same masks, same pixels read.

Host only (imports autoseg); fast, part of `make test`. The arm64 parity of whole runs is in test_arm64.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_agent_predict import REPO, seg_model

from autoseg.data import read_image
from autoseg.infer import ort_runner, whole_pixel_limit
from autoseg.infer import predict_labels as host_labels
from edge_agent import predict as agent


@pytest.mark.parametrize(("mode", "size", "tile", "overlap", "batch"), [
    ("whole", (37, 53), 16, 0.5, 8),
    ("window", (37, 53), 16, 0.5, 8),
    ("window", (70, 45), 32, 0.25, 3),
    ("window", (10, 12), 16, 0.5, 8),  # smaller than a tile: padded, cropped back
    ("auto", (64, 64), 16, 0.5, 8),
])
def test_labels_equal_the_hosts(tmp_path: Path, mode: str, size: tuple[int, int], tile: int, overlap: float,
                                batch: int) -> None:
    blob = seg_model(classes=4, tile=tile)
    path = tmp_path / "m.onnx"
    path.write_bytes(blob)
    image = np.random.default_rng(5).integers(0, 256, (*size, 3), dtype=np.uint8)
    run = ort_runner(blob)
    limit = whole_pixel_limit(3, 4, 8)
    want = np.concatenate([ids for _, ids in host_labels(run, image, [0.5] * 3, [0.25] * 3, mode, tile, overlap,
                                                         batch, 4, limit)])
    info = agent.ModelInfo([f"c{i}" for i in range(4)], (0.5,) * 3, (0.25,) * 3, tile, 4, None, 8)
    got = np.concatenate([ids for _, ids in agent.predict_labels(run, image, info, mode, overlap, batch,
                                                                 agent.whole_pixel_limit(3, 4, 8))])
    np.testing.assert_array_equal(got, want)
    assert agent.whole_pixel_limit(3, 4, 8) == limit and agent.whole_pixel_limit(1, 30, None) == whole_pixel_limit(
        1, 30, None)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16", "LA", "1"])
def test_png_read_without_pillow_equals_autoseg_read_image(tmp_path: Path, mode: str) -> None:
    rng = np.random.default_rng(6)
    if mode == "I;16":
        picture = Image.fromarray(rng.integers(0, 65536, (23, 31)).astype(np.uint16))
    else:
        picture = Image.fromarray(rng.integers(0, 256, (23, 31, 3), dtype=np.uint8)).convert(mode)
    path = tmp_path / f"{mode.replace(';', '')}.png"
    picture.save(path)
    for channels in (1, 3):
        with open(path, "rb") as f:
            a = agent.read_png(f)
        got = np.repeat(a, 3, axis=2) if channels == 3 and a.shape[2] == 1 else (
            agent._luma(a) if channels == 1 and a.shape[2] == 3 else a)
        np.testing.assert_array_equal(got, read_image(path, channels))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_as_autoseg_applies_it(tmp_path: Path, orientation: int) -> None:
    picture = Image.fromarray(np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "turned.png"
    picture.save(path, exif=exif)
    with open(path, "rb") as f:
        np.testing.assert_array_equal(agent.read_png(f), read_image(path, 3))


def test_masks_equal_those_of_autoseg_predict(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(seg_model(classes=3, tile=16))
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(7)
    for i, (h, w) in enumerate([(40, 33), (16, 16), (70, 90)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"p{i}.png")
    Image.fromarray(rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)).save(images / "photo.jpg", quality=90)
    for mode in ("whole", "window"):
        host = subprocess.run([sys.executable, "-m", "autoseg", "predict", str(model), "--images", str(images),
                               "--out", str(tmp_path / f"host-{mode}"), "--eval-mode", mode],
                              capture_output=True, text=True, timeout=120)
        assert host.returncode == 0, host.stderr
        dev = subprocess.run([sys.executable, "-m", "edge_agent", "predict", str(model), str(images),
                              str(tmp_path / f"agent-{mode}"), "--mode", mode, "--values", "training"],
                             capture_output=True, text=True, timeout=120, cwd=REPO)
        assert dev.returncode == 0, dev.stderr
        for name in ("p0.png", "p1.png", "p2.png", "photo.png"):
            want = np.asarray(Image.open(tmp_path / f"host-{mode}" / name))
            got = np.asarray(Image.open(tmp_path / f"agent-{mode}" / name))
            np.testing.assert_array_equal(got, want)


def test_the_agents_overlay_drawn_band_by_band_is_the_hosts_whole_image_overlay(tmp_path: Path) -> None:
    # One overlay function for the report, `autoseg predict --overlay` and the device; borders across bands too.
    from autoseg.visual import palette as host_palette

    blob = seg_model(classes=4, tile=16)
    (tmp_path / "m.onnx").write_bytes(blob)
    image = np.random.default_rng(7).integers(0, 256, (70, 45, 3), dtype=np.uint8)
    (tmp_path / "in").mkdir()
    Image.fromarray(image).save(tmp_path / "in" / "a.png")
    agent.predict_folder(str(tmp_path / "m.onnx"), str(tmp_path / "in"), str(tmp_path / "out"), mode="window",
                         write_overlay=True)
    ids = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    shown = np.asarray(Image.open(tmp_path / "out" / "a_overlay.png").convert("RGB"))
    np.testing.assert_array_equal(shown, agent.overlay(image, ids, host_palette(4)))
    assert agent.class_edges(ids).any()  # the image has borders to draw
