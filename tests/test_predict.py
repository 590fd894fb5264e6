"""`autoseg predict`: masks for new images, from the exported model alone, in the training masks' encoding."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from autoseg.data import MAX_PIXELS_ENV, ClassMap, read_image
from autoseg.errors import InputError
from autoseg.export import export_final
from autoseg.infer import normalize, ort_runner, predict
from autoseg.predict import PngRows, encode_mask, mask_format, model_info, predict_folder
from autoseg.unet import Arch, build_unet
from autoseg.visual import palette
from edge_agent.predict import overlay

ARCH = Arch((3, 3), (4, 8))
COLOURS = ((0, 0, 0), (200, 30, 30), (30, 200, 30))


def colour_map() -> ClassMap:
    return ClassMap("palette", ("bg", "road", "tree"), None, COLOURS, None)


def exported(tmp_path: Path, cmap: ClassMap | None, channels: int = 3, classes: int = 3) -> Path:
    torch.manual_seed(0)
    model = build_unet(ARCH, channels, classes).eval()
    names = ["bg", "road", "tree"] if classes == 3 else [f"c{i}" for i in range(classes)]
    meta = {"classes": json.dumps(names), "tile": "32", "mean": json.dumps([0.5] * channels),
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


# ---------------------------------------------------------------- metadata: one line naming the file and the key


def with_metadata(src: Path, dst: Path, **changes: str | None) -> Path:
    """A copy of the model `src` whose metadata keys are changed (None: removed)."""
    proto = onnx.load(str(src))
    meta = {p.key: p.value for p in proto.metadata_props}
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(dst))
    return dst


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory) -> Path:
    return exported(tmp_path_factory.mktemp("model"), colour_map())


BAD_METADATA = [
    ("tile", "0", "must be a positive whole number, got '0'"),
    ("tile", "-3", "must be a positive whole number"),
    ("tile", "3.5", "must be a positive whole number"),
    ("tile", "sixty", "must be a positive whole number"),
    ("tile", "33", "33 is not a multiple of input_multiple 2"),
    ("input_multiple", "0", "must be a positive whole number"),
    ("mean", "[0.5, 0.5]", "must hold 1 (gray) or 3 (RGB) values, got 2"),
    ("mean", "oops", "is not JSON"),
    ("mean", '["a", "b", "c"]', "must be a list of numbers"),
    ("mean", "[NaN, 0.5, 0.5]", "must hold finite numbers"),
    ("std", "[0.25]", "must hold as many values as mean (3), got 1"),
    ("std", "[0.25, 0, 0.25]", "must be positive"),
    ("classes", "[]", "must be a list of two or more class names"),
    ("classes", '{"bg": 0}', "must be a list of two or more class names"),
    ("class_map", '{"kind": "palette"}', "is damaged (KeyError"),
    ("class_map", '{"kind": "palette", "names": ["a"], "colors": [[1, 2]]}', "is damaged (InputError"),
]


@pytest.mark.parametrize(("key", "value", "problem"), BAD_METADATA)
def test_bad_metadata_is_one_line_naming_the_model_and_the_key(plain_model, tmp_path, key, value, problem):
    """tile=0 was a ZeroDivisionError traceback deep inside the window blending."""
    check_refused(with_metadata(plain_model, tmp_path / "bad.onnx", **{key: value}), tmp_path, key, problem)


def check_refused(model: Path, tmp_path: Path, key: str, problem: str) -> None:
    write_images(tmp_path / "new", [(40, 40)])
    with pytest.raises(InputError) as e:
        predict_folder(model, tmp_path / "new", tmp_path / "out", mode="window")
    msg = str(e.value)
    assert msg.startswith(f"{model}: metadata {key!r} ") and problem in msg, msg
    assert msg.endswith("export the model again with `autoseg export`") and "\n" not in msg
    assert not (tmp_path / "out").exists()  # refused before any work


def test_normalisation_for_other_channels_than_the_net_takes_is_named(plain_model, tmp_path):
    model = with_metadata(plain_model, tmp_path / "gray.onnx", mean="[0.5]", std="[0.25]")
    check_refused(model, tmp_path, "mean", "has 1 value(s) but the net takes 3 channel(s)")


@pytest.mark.parametrize("key", ["tile", "classes", "mean", "std"])
def test_missing_metadata_keys_are_named(plain_model, tmp_path, key):
    model = with_metadata(plain_model, tmp_path / "bad.onnx", **{key: None})
    with pytest.raises(InputError, match=rf"bad\.onnx: metadata lacks {key}; pass a model exported by autoseg"):
        model_info(model)


def test_cli_exits_2_with_one_line_on_tile_0(plain_model, tmp_path):
    model = with_metadata(plain_model, tmp_path / "bad.onnx", tile="0")
    write_images(tmp_path / "new", [(40, 40)])
    proc = subprocess.run([sys.executable, "-m", "autoseg", "predict", str(model), "--images", str(tmp_path / "new"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"autoseg: error: {model}: metadata 'tile' must be a positive whole number, got '0'; "
        "export the model again with `autoseg export`"]


def test_a_model_onnxruntime_cannot_load_is_one_line(plain_model, tmp_path):
    proto = onnx.load(str(plain_model))
    proto.graph.node[0].op_type = "NoSuchOp"
    onnx.save(proto, str(tmp_path / "broken.onnx"))
    write_images(tmp_path / "new", [(40, 40)])
    with pytest.raises(InputError, match=r"broken\.onnx: onnxruntime cannot load it \(.*\); export the model again"):
        predict_folder(tmp_path / "broken.onnx", tmp_path / "new", tmp_path / "out")


# ---------------------------------------------------------------- masks written a band of rows at a time


def whole_image_ids(model: Path, image: np.ndarray, mode: str) -> np.ndarray:
    """Labels the former way: all logits of the image at once."""
    info = model_info(model)
    x = normalize(image, info.mean, info.std)
    return predict(ort_runner(model), x, mode, info.tile, 0.5, 8, info.multiple).argmax(0)


@pytest.mark.parametrize("cmap", [
    ClassMap("binary", ("bg", "fg"), (0, 255), None, None),  # 8-bit gray, values as stored
    ClassMap("palette", ("a", "b"), (100, 40000), ((1, 1, 1), (2, 2, 2)), None),  # 16-bit gray
    None,  # class ids
    colour_map(),  # RGB
])
def test_streamed_masks_equal_the_whole_image_labels(tmp_path, cmap):
    classes = 3 if cmap is None or cmap.num_classes == 3 else 2
    model = exported(tmp_path, cmap, classes=classes)
    write_images(tmp_path / "new", [(75, 50), (20, 90)])  # taller and shorter than the 32 px tile
    for mode in ("window", "whole"):
        predict_folder(model, tmp_path / "new", tmp_path / mode, mode=mode, overlap=0.5, write_overlay=True)
        for name in ("img0", "img1"):
            image = read_image(tmp_path / "new" / f"{name}.png", 3)
            ids = whole_image_ids(model, image, mode)
            written = np.asarray(Image.open(tmp_path / mode / f"{name}.png"))
            assert np.array_equal(written, encode_mask(ids, model_info(model).class_map)), (mode, name)
            want = io.BytesIO()  # the overlay, drawn band by band, is the whole-image one to the bit
            Image.fromarray(overlay(image, ids, palette(classes, cmap.colors if cmap else None))).save(want, "JPEG")
            assert (tmp_path / mode / f"{name}_overlay.jpg").read_bytes() == want.getvalue()


def test_png_rows_match_pillow_and_compress_as_well():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.repeat(rng.integers(0, 5, (12, 20)), 9, axis=0), 7, axis=1)  # 108 x 140 regions
    for cmap in (None, colour_map()):
        channels, dtype = mask_format(cmap, 5 if cmap is None else 3)
        mask = encode_mask(labels % (5 if cmap is None else 3), cmap, dtype)
        buf = io.BytesIO()
        png = PngRows(buf, 140, 108, channels, dtype)
        for y0 in range(0, 108, 25):
            png.write(mask[y0 : y0 + 25])
        png.close()
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(buf.getvalue()))), mask)
        pil = io.BytesIO()
        Image.fromarray(mask).save(pil, format="PNG")
        assert len(buf.getvalue()) < 1.5 * len(pil.getvalue())
    wide = encode_mask(np.array([[0, 1]]), ClassMap("palette", ("a", "b"), (7, 300), ((7, 7, 7), (9, 9, 9)), None),
                       np.uint16)
    buf = io.BytesIO()
    png = PngRows(buf, 2, 1, 1, np.uint16)
    png.write(wide)
    png.close()
    assert np.asarray(Image.open(io.BytesIO(buf.getvalue()))).tolist() == [[7, 300]]
    short = PngRows(io.BytesIO(), 2, 2, 1, np.uint8)
    short.write(np.zeros((1, 2), np.uint8))
    with pytest.raises(ValueError, match="got 1 of its 2 rows"):
        short.close()


def test_predict_holds_the_image_and_a_band_not_classes_x_h_x_w(tmp_path):
    """5.1 GB on a 6000 x 4000 image with 24 classes: K x H x W float32 logits and a float32 image."""
    model = exported(tmp_path, None, classes=16)
    h, w = 1536, 256
    (tmp_path / "new").mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "new" / "a.png")
    tracemalloc.start()
    try:
        predict_folder(model, tmp_path / "new", tmp_path / "out", mode="window", write_overlay=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 * h * w  # the image (3 bytes a pixel) and bands; the logits alone would take 64
    assert np.asarray(Image.open(tmp_path / "out" / "a.png")).shape == (h, w)


# ---------------------------------------------------------------- file names and sizes


def test_names_that_are_not_utf8_are_kept_as_the_os_gives_them(tmp_path):
    model = exported(tmp_path, None)
    (tmp_path / "new").mkdir()
    name = os.fsdecode(b"caf\xe9")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "new" / f"{name}.png")
    summary = predict_folder(model, tmp_path / "new", tmp_path / "out", write_overlay=True)
    assert summary["images"] == 1
    assert sorted(os.listdir(os.fsencode(tmp_path / "out"))) == [b"caf\xe9.png", b"caf\xe9_overlay.jpg"]


def test_a_dangling_symlink_or_an_oversized_image_is_one_line(tmp_path, monkeypatch):
    model = exported(tmp_path, None)
    write_images(tmp_path / "new", [(40, 30)])
    (tmp_path / "new" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(InputError, match=r"gone\.png: broken symbolic link \(to .*nowhere\.png\)"):
        predict_folder(model, tmp_path / "new", tmp_path / "out")
    (tmp_path / "new" / "gone.png").unlink()
    monkeypatch.setenv(MAX_PIXELS_ENV, "1000")
    with pytest.raises(InputError, match=rf"img0\.png: image is 30x40 pixels .*set {MAX_PIXELS_ENV}=1200"):
        predict_folder(model, tmp_path / "new", tmp_path / "out")
