import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from autoseg.config import DataConfig
from autoseg.data import (
    IGNORE,
    MAX_PIXELS_ENV,
    ClassMap,
    ImageRows,
    find_pairs,
    load_mask,
    load_pair,
    mask_dtype,
    read_image,
    read_raw_mask,
    scan_dataset,
    split_by_image,
)
from autoseg.data import images as data_images
from autoseg.errors import InputError

SUFFIXES = ["_mask", "_label"]


def save(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path)
    return path


def rgb(h: int = 8, w: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def gray(h: int = 8, w: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def dataset(tmp_path: Path, masks: dict[str, np.ndarray], images: dict[str, np.ndarray] | None = None):
    """Write images (random RGB unless given) and masks; return the two folders."""
    for i, (stem, m) in enumerate(masks.items()):
        img = (images or {}).get(stem)
        save(tmp_path / "images" / f"{stem}.png", img if img is not None else rgb(*m.shape[:2], seed=i))
        save(tmp_path / "masks" / f"{stem}.png", m)
    return tmp_path / "images", tmp_path / "masks"


def scan(tmp_path: Path, **cfg):
    return scan_dataset(tmp_path / "images", tmp_path / "masks", DataConfig(**cfg))


# ---------------------------------------------------------------- pairing


def test_pairs_by_stem_across_extensions_and_suffixes(tmp_path, caplog):
    save(tmp_path / "img" / "a.png", rgb())
    save(tmp_path / "img" / "b.jpg", rgb())
    save(tmp_path / "img" / "c.tif", rgb())
    save(tmp_path / "img" / "D.PNG", rgb())
    (tmp_path / "img" / "notes.txt").write_text("not an image")
    save(tmp_path / "msk" / "a_mask.png", gray())
    save(tmp_path / "msk" / "b.png", gray())
    save(tmp_path / "msk" / "c_label.bmp", gray())
    save(tmp_path / "msk" / "D_mask.TIFF", gray())
    save(tmp_path / "msk" / "orphan.png", gray())
    with caplog.at_level(logging.WARNING, logger="autoseg.data"):
        pairs = find_pairs(tmp_path / "img", tmp_path / "msk", SUFFIXES)
    assert [(p.stem, p.image.name, p.mask.name) for p in pairs] == [
        ("D", "D.PNG", "D_mask.TIFF"),
        ("a", "a.png", "a_mask.png"),
        ("b", "b.jpg", "b.png"),
        ("c", "c.tif", "c_label.bmp"),
    ]
    assert "orphan.png" in caplog.text


def test_images_and_masks_in_one_folder(tmp_path):
    save(tmp_path / "d" / "a.png", rgb())
    save(tmp_path / "d" / "a_mask.png", gray())
    save(tmp_path / "d" / "b.png", rgb())
    save(tmp_path / "d" / "b_label.png", gray())
    pairs = find_pairs(tmp_path / "d", tmp_path / "d", SUFFIXES)
    assert [(p.image.name, p.mask.name) for p in pairs] == [("a.png", "a_mask.png"), ("b.png", "b_label.png")]


def test_missing_or_empty_folder_is_named(tmp_path):
    save(tmp_path / "masks" / "a.png", gray())
    with pytest.raises(InputError, match=r"nope: images folder does not exist"):
        find_pairs(tmp_path / "nope", tmp_path / "masks", SUFFIXES)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "readme.txt").write_text("x")
    with pytest.raises(InputError, match=r"images: no images found"):
        find_pairs(tmp_path / "images", tmp_path / "masks", SUFFIXES)
    save(tmp_path / "images" / "a.png", rgb())
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty: no masks found"):
        find_pairs(tmp_path / "images", tmp_path / "empty", SUFFIXES)


def test_images_without_mask_are_listed(tmp_path):
    for s in ["a", "b", "c", "d"]:
        save(tmp_path / "images" / f"{s}.png", rgb())
    save(tmp_path / "masks" / "d.png", gray())
    with pytest.raises(InputError) as e:
        find_pairs(tmp_path / "images", tmp_path / "masks", SUFFIXES)
    msg = str(e.value)
    assert "3 images have no mask" in msg and "a.png, b.png, c.png" in msg
    assert "<stem>_mask.png" in msg and "\n" not in msg


def test_two_masks_for_one_image_is_ambiguous(tmp_path):
    save(tmp_path / "images" / "a.png", rgb())
    save(tmp_path / "masks" / "a.png", gray())
    save(tmp_path / "masks" / "a_mask.png", gray())
    with pytest.raises(InputError, match=r"a\.png matches several masks"):
        find_pairs(tmp_path / "images", tmp_path / "masks", SUFFIXES)


def test_a_dangling_symlink_image_is_named_not_blamed_on_its_mask(tmp_path, caplog):
    """It was silently dropped, then its mask was skipped with a warning that blamed the mask."""
    dataset(tmp_path, {"a": np.eye(8, 10, dtype=np.uint8), "b": np.eye(8, 10, dtype=np.uint8)})
    (tmp_path / "images" / "b.png").unlink()
    (tmp_path / "images" / "b.png").symlink_to(tmp_path / "gone" / "b.png")
    with caplog.at_level(logging.WARNING), pytest.raises(InputError) as e:
        scan(tmp_path)
    link, target = tmp_path / "images" / "b.png", tmp_path / "gone" / "b.png"
    assert str(e.value) == f"{link}: broken symbolic link (to {target}); fix the link or remove it"
    assert "without an image" not in caplog.text
    # A symlink that resolves is an image like any other.
    (tmp_path / "images" / "b.png").unlink()
    (tmp_path / "images" / "b.png").symlink_to(tmp_path / "images" / "a.png")
    assert [p.stem for p in scan(tmp_path).pairs] == ["a", "b"]


NOT_UTF8 = b"caf\xe9"  # Latin-1, as old Windows tools wrote it


@pytest.mark.parametrize("where", ["image", "mask", "folder"])
def test_names_that_are_not_utf8_are_refused_at_the_door(tmp_path, where):
    """The whole search ran, then writing the manifest or the report failed on such a name."""
    root = tmp_path / os.fsdecode(NOT_UTF8) if where == "folder" else tmp_path
    dataset(root, {"a": np.eye(8, 10, dtype=np.uint8)})
    if where != "folder":
        sub = root / ("images" if where == "image" else "masks")
        (sub / "a.png").rename(sub / os.fsdecode(NOT_UTF8 + b".png"))
        other = root / ("masks" if where == "image" else "images")
        (other / "a.png").rename(other / os.fsdecode(NOT_UTF8 + b".png"))
    with pytest.raises(InputError, match=r"caf\\xe9.*: the name is not valid UTF-8 \(under data\.(images|masks)\); "
                                         "rename it") as e:
        scan(root)
    str(e.value).encode("utf-8")  # the message itself prints anywhere
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- reading


def test_read_image_modes(tmp_path):
    g = save(tmp_path / "g.png", gray())
    assert read_image(g).shape == (8, 10, 1)
    rep = read_image(g, channels=3)
    assert rep.shape == (8, 10, 3) and (rep == rep[..., :1]).all()
    rgba = np.dstack([rgb(), np.full((8, 10), 7, np.uint8)])
    a = read_image(save(tmp_path / "a.png", rgba))
    assert a.shape == (8, 10, 3) and np.array_equal(a, rgba[..., :3])
    p = Image.fromarray(gray()).convert("P")
    p.save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").shape == (8, 10, 3)
    g16 = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    assert read_image(tmp_path / "g16.png")[..., 0].tolist() == [[0, 1, 255, 128]]
    assert read_image(save(tmp_path / "c.png", rgb()), channels=1).shape == (8, 10, 1)


def test_exif_orientation_is_applied_as_viewers_and_label_tools_do(tmp_path):
    pixels = rgb(8, 10)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored as is, shown turned 90° clockwise
    Image.fromarray(pixels).save(tmp_path / "cam.png", exif=exif.tobytes())
    assert np.array_equal(read_image(tmp_path / "cam.png"), np.rot90(pixels, k=-1))
    Image.fromarray(gray(8, 10)).save(tmp_path / "m.png", exif=exif.tobytes())
    assert read_raw_mask(tmp_path / "m.png").shape == (10, 8)


def test_big_images_are_read_a_band_at_a_time_to_the_same_pixels(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    cases = {
        "rgb.png": rng.integers(0, 256, (37, 23, 3), dtype=np.uint8),
        "gray.png": rng.integers(0, 256, (37, 23), dtype=np.uint8),
        "rgba.png": rng.integers(0, 256, (37, 23, 4), dtype=np.uint8),
        "g16.png": rng.integers(0, 65536, (37, 23), dtype=np.uint16),
        "f.tif": rng.random((37, 23), dtype=np.float32) * 0.9,  # values in 0..1 are scaled by 255
        "ids.tif": rng.integers(0, 5, (37, 23)).astype(np.float32),
    }
    for name, a in cases.items():
        Image.fromarray(a).save(tmp_path / name)
    images = {(n, c): read_image(tmp_path / n, c) for n in cases for c in (None, 1, 3)}
    masks = {n: read_raw_mask(tmp_path / n) for n in cases if n != "f.tif"}
    # Patched where _band_rows reads it (the package does not re-export it, so a stale patch fails).
    monkeypatch.setattr(data_images, "_BAND_PIXELS", 50)  # bands of 2 rows, the last one shorter
    for (n, c), img in images.items():
        assert np.array_equal(read_image(tmp_path / n, c), img), (n, c)
    for n, raw in masks.items():
        assert np.array_equal(read_raw_mask(tmp_path / n), raw), n
    for (n, c), img in images.items():  # or handed out a band of rows at a time, Pillow's image kept
        with ImageRows(tmp_path / n, c) as rows:
            assert rows.shape == img.shape and rows.ndim == 3
            assert np.array_equal(np.concatenate([rows[y : y + 5] for y in range(0, 37, 5)]), img), (n, c)
            assert np.array_equal(rows[30:99], img[30:]) and rows[5:5].shape == (0, 23, img.shape[2])
            with pytest.raises(TypeError, match="slice of rows"):
                rows[3]
    assert np.array_equal(images["rgb.png", None], cases["rgb.png"])
    assert np.array_equal(images["rgba.png", None], cases["rgba.png"][..., :3])
    assert images["f.tif", None].max() > 200 and np.array_equal(masks["ids.tif"], cases["ids.tif"])


def test_class_ids_in_a_compact_type_a_band_at_a_time(monkeypatch):
    cmap = ClassMap("palette", ("a", "b", "c"), None, ((0, 0, 0), (200, 0, 0), (0, 200, 0)), None,
                    ((9, 9, 9),))
    raw = np.zeros((9, 7, 3), np.uint8)
    raw[2:5, 1:4] = (200, 0, 0)
    raw[6:, 3:] = (0, 200, 0)
    raw[0, 0] = (9, 9, 9)
    ref = cmap.apply(raw)
    monkeypatch.setattr(data_images, "_BAND_PIXELS", 10)
    small = cmap.apply(raw, mask_dtype(3))
    assert ref.dtype == np.int32 and small.dtype == np.int8 and np.array_equal(ref, small)
    assert small[0, 0] == IGNORE and small[3, 2] == 1 and small[7, 5] == 2
    raw[8, 0] = (1, 2, 3)  # unknown in the last band
    with pytest.raises(ValueError, match=r"unexpected mask values \(1, 2, 3\)"):
        cmap.apply(raw, np.int8)
    assert [mask_dtype(k) for k in (2, 127, 128, 40000)] == [np.int8, np.int8, np.int16, np.int32]


def test_images_over_the_pixel_limit_get_one_line_not_a_decompression_bomb(tmp_path, monkeypatch):
    """Pillow warned (DecompressionBombWarning) above 89 Mpx, then evaluation filled memory."""
    path = save(tmp_path / "big.png", rgb(30, 40))  # 1200 px
    monkeypatch.setenv(MAX_PIXELS_ENV, "1000")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Pillow warning either
        for reader, what in ((read_image, "image"), (read_raw_mask, "mask")):
            with pytest.raises(InputError) as e:
                reader(path)
            assert str(e.value).startswith(f"{path}: {what} is 40x30 pixels (0 Mpx), above the limit of 0 Mpx; "
                                           f"to read it anyway set {MAX_PIXELS_ENV}=1200")
        monkeypatch.setenv(MAX_PIXELS_ENV, "500")  # more than twice the limit: Pillow's error, turned into ours
        with pytest.raises(InputError, match=rf"big\.png: image is 40x30 pixels .* set {MAX_PIXELS_ENV}=1200"):
            read_image(path)
        monkeypatch.setenv(MAX_PIXELS_ENV, "1200")  # up to the limit it just works
        assert read_image(path).shape == (30, 40, 3)
    for bad in ("lots", "0", "-5"):
        monkeypatch.setenv(MAX_PIXELS_ENV, bad)
        with pytest.raises(InputError, match=rf"{MAX_PIXELS_ENV}='{bad}': must be a positive whole number"):
            read_image(path)


def test_an_image_bigger_than_pillows_own_limit_reads_without_a_warning(tmp_path):
    """9500 x 9500 = 90 Mpx is over Pillow's 89.5 Mpx warning limit, and well under ours."""
    path = tmp_path / "wide.png"
    Image.new("1", (9500, 9500)).save(path)  # 1 bit a pixel: a small file, decoded as 90 MB
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_raw_mask(path).shape == (9500, 9500)


@pytest.mark.parametrize("content", [b"", b"not a png at all", None])
def test_unreadable_image_is_named(tmp_path, content):
    bad = tmp_path / "bad.png"
    if content is None:  # a real PNG cut in half
        save(bad, rgb(64, 64))
        content = bad.read_bytes()[:200]
    bad.write_bytes(content)
    with pytest.raises(InputError, match=r"bad\.png: cannot read image"):
        read_image(bad)
    with pytest.raises(InputError, match=r"bad\.png: cannot read mask"):
        read_raw_mask(bad)


def test_corrupt_file_in_dataset_is_named(tmp_path):
    dataset(tmp_path, {"a": np.zeros((8, 10), np.uint8), "b": np.ones((8, 10), np.uint8)})
    (tmp_path / "images" / "b.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(InputError, match=r"b\.png: cannot read image"):
        scan(tmp_path)


def test_a_tiff_stack_is_refused_not_read_as_its_first_page(tmp_path):
    dataset(tmp_path, {"a": np.zeros((8, 10), np.uint8)})
    pages = [Image.fromarray(gray(8, 10)) for _ in range(3)]
    pages[0].save(tmp_path / "images" / "a.tif", save_all=True, append_images=pages[1:])
    (tmp_path / "images" / "a.png").unlink()
    with pytest.raises(InputError, match=r"a\.tif: image file holds 3 pages \(a stack\).*one image per file"):
        scan(tmp_path)


def test_size_mismatch_names_file_and_both_sizes(tmp_path):
    dataset(tmp_path, {"a": np.zeros((8, 10), np.uint8)}, images={"a": rgb(12, 9)})
    with pytest.raises(InputError) as e:
        scan(tmp_path)
    msg = str(e.value)
    assert "a.png" in msg and "10x8" in msg and "9x12" in msg


# ---------------------------------------------------------------- class maps


def test_binary_0_255_is_foreground_even_with_ignore_255(tmp_path):
    m = np.zeros((8, 10), np.uint8)
    m[:, :4] = 255
    dataset(tmp_path, {"a": m, "b": np.zeros((8, 10), np.uint8)})
    ds = scan(tmp_path, ignore_index=255)
    cm = ds.class_map
    assert cm.kind == "binary" and cm.names == ("background", "foreground") and cm.ignore_index is None
    assert ds.class_pixels.tolist() == [80 + 48, 32]
    _, mask = load_pair(ds, 0)
    assert mask.dtype == np.int32 and mask[:, :4].tolist() == [[1] * 4] * 8 and (mask[:, 4:] == 0).all()


@pytest.mark.parametrize(("values", "cls"), [([0], "background"), ([255], "foreground"), ([1, 1], "foreground")])
def test_masks_of_one_class_only_are_refused_naming_the_folder(tmp_path, values, cls):
    """All-zero masks made a "binary" net with no foreground pixel, and a test mIoU of 0.0, without a word."""
    dataset(tmp_path, {f"m{i}": np.full((8, 10), v, np.uint8) for i, v in enumerate(values)})
    with pytest.raises(InputError, match=rf"masks: every labelled pixel of the {len(values)} mask\(s\) is class "
                                         rf"'{cls}'; segmentation needs at least two classes present") as e:
        scan(tmp_path)
    assert "\n" not in str(e.value)


def test_one_class_is_refused_even_when_a_class_file_declares_more(tmp_path):
    dataset(tmp_path, {"a": np.full((8, 10), 2, np.uint8)})
    (tmp_path / "masks" / "classes.json").write_text(json.dumps(["sky", "road", "tree"]))
    with pytest.raises(InputError, match="is class 'tree'; segmentation needs at least two"):
        scan(tmp_path)
    # Ignored pixels are not a class: 0 plus the ignore value is still one class.
    m = np.zeros((8, 10), np.uint8)
    m[0] = 7
    dataset(tmp_path / "b", {"a": m})
    with pytest.raises(InputError, match="is class 'background'; segmentation needs at least two"):
        scan(tmp_path / "b", ignore_index=7)


def test_binary_0_1_honours_the_ignore_value(tmp_path):
    m = np.zeros((8, 10), np.uint8)
    m[0] = 1
    m[1] = 255
    dataset(tmp_path, {"a": m})
    ds = scan(tmp_path)
    assert ds.class_map.kind == "binary" and ds.class_map.values == (0, 1)
    assert ds.class_pixels.tolist() == [60, 10] and ds.ignored_pixels == 10
    _, mask = load_pair(ds, 0)
    assert (mask[1] == IGNORE).all() and (mask[0] == 1).all()


def test_contiguous_ids_with_ignore(tmp_path):
    m = np.arange(80, dtype=np.uint8).reshape(8, 10) % 4
    m[0, :3] = 255
    dataset(tmp_path, {"a": m})
    ds = scan(tmp_path)
    assert ds.class_map.kind == "contiguous" and ds.class_map.names == tuple(f"class_{i}" for i in range(4))
    assert ds.class_pixels.sum() == 77
    _, mask = load_pair(ds, 0)
    assert (mask[0, :3] == IGNORE).all()
    assert np.array_equal(mask[1:], m[1:].astype(np.int32))
    # Without an ignore value, 255 is just an unexpected value.
    with pytest.raises(InputError, match=r"unexpected mask values 255 \(found in a\.png\)"):
        scan(tmp_path, ignore_index=None)


def test_load_mask_is_load_pairs_mask_and_checks_the_scanned_size(tmp_path):
    m = np.arange(80, dtype=np.uint8).reshape(8, 10) % 3
    m[0, :3] = 255
    dataset(tmp_path, {"a": m})
    ds = scan(tmp_path)
    assert np.array_equal(load_mask(ds, 0), load_pair(ds, 0)[1])
    assert load_mask(ds, 0, np.int16).dtype == np.int16
    save(tmp_path / "masks" / "a.png", np.zeros((6, 10), np.uint8))  # changed after the scan
    with pytest.raises(InputError, match=r"a\.png: mask is 10x6 but image a\.png was 10x8 \(WxH\) at the scan"):
        load_mask(ds, 0)


def test_unexpected_values_are_listed_with_their_files(tmp_path):
    m1 = np.zeros((8, 10), np.uint8)
    m1[0, :3] = [1, 2, 7]
    m2 = np.zeros((8, 10), np.uint8)
    m2[0, :2] = [1, 9]
    dataset(tmp_path, {"a": m1, "b": m2})
    with pytest.raises(InputError) as e:
        scan(tmp_path)
    msg = str(e.value)
    assert "unexpected mask values 7, 9" in msg
    assert "a.png" in msg and "b.png" in msg
    assert "classes.json" in msg and "data.palette" in msg and "data.ignore_index" in msg


def test_many_unexpected_values_are_cut_short(tmp_path):
    dataset(tmp_path, {"a": (np.arange(80).reshape(8, 10) * 3).astype(np.uint8)})
    with pytest.raises(InputError, match=r"\(79 in all\)") as e:
        scan(tmp_path)
    assert len(str(e.value)) < 600


def test_gaps_are_allowed_when_classes_json_names_the_classes(tmp_path):
    m = np.zeros((8, 10), np.uint8)
    m[0] = 3
    dataset(tmp_path, {"a": m})
    with pytest.raises(InputError, match=r"unexpected mask values 3"):
        scan(tmp_path)
    (tmp_path / "classes.json").write_text(json.dumps(["bg", "road", "roof", "tree", "water"]))
    ds = scan(tmp_path)
    assert ds.class_map.kind == "contiguous"
    assert ds.class_map.names == ("bg", "road", "roof", "tree", "water")
    assert ds.class_pixels.tolist() == [70, 0, 0, 10, 0]
    m[1] = 6  # beyond the declared classes
    save(tmp_path / "masks" / "a.png", m)
    with pytest.raises(InputError, match=r"unexpected mask values 6 .*declares 5 classes"):
        scan(tmp_path)


def test_real_classes_json_format_and_trailing_void(tmp_path):
    m = np.zeros((8, 10), np.uint8)
    m[0] = 1
    m[1] = 255
    dataset(tmp_path, {"a": m})
    entries = [
        {"id": 0, "name": "unlabeled", "rgb": [0, 0, 0]},
        {"id": 1, "name": "paved-area", "rgb": [128, 64, 128]},
        {"id": 2, "name": "grass", "rgb": [0, 102, 0]},
        {"id": 255, "name": "void", "rgb": [224, 224, 192]},
    ]
    (tmp_path / "masks" / "classes.json").write_text(json.dumps(entries))
    ds = scan(tmp_path)
    assert ds.class_map.names == ("unlabeled", "paved-area", "grass")
    assert ds.class_map.kind == "contiguous"
    assert ds.class_pixels.tolist() == [60, 10, 0] and ds.ignored_pixels == 10


def test_name_to_id_classes_json(tmp_path):
    dataset(tmp_path, {"a": np.arange(80, dtype=np.uint8).reshape(8, 10) % 3})
    (tmp_path / "classes.json").write_text(json.dumps({"soil": 0, "road": 1, "roof": 2}))
    assert scan(tmp_path).class_map.names == ("soil", "road", "roof")


def test_two_class_classes_json_keeps_binary_masks_binary(tmp_path):
    m = np.zeros((8, 10), np.uint8)
    m[0] = 255
    dataset(tmp_path, {"a": m})
    (tmp_path / "classes.json").write_text(json.dumps(["sea", "land"]))
    ds = scan(tmp_path)
    assert ds.class_map.kind == "binary" and ds.class_map.names == ("sea", "land")
    assert ds.class_pixels.tolist() == [70, 10]


def colour_mask(ids: np.ndarray, colours) -> np.ndarray:
    return np.asarray(colours, dtype=np.uint8)[ids]


PALETTE = {"ground": [120, 90, 60], "road": [128, 64, 128], "tree": [0, 102, 0]}


def test_rgb_palette_from_config(tmp_path):
    ids = np.arange(80).reshape(8, 10) % 3
    dataset(tmp_path, {"a": colour_mask(ids, list(PALETTE.values()))})
    ds = scan(tmp_path, palette=PALETTE)
    assert ds.class_map.kind == "palette" and ds.class_map.names == ("ground", "road", "tree")
    _, mask = load_pair(ds, 0)
    assert np.array_equal(mask, ids)
    assert ds.class_pixels.tolist() == np.bincount(ids.ravel()).tolist()


def test_rgb_palette_from_classes_json_with_ignore_colour(tmp_path):
    ids = np.arange(80).reshape(8, 10) % 3
    m = colour_mask(ids, list(PALETTE.values()))
    m[0, 0] = 255  # white: the default ignore value 255 as a colour
    dataset(tmp_path, {"a": m})
    classes = [{"id": i, "name": n, "color": c} for i, (n, c) in enumerate(PALETTE.items())]
    (tmp_path / "masks" / "classes.json").write_text(json.dumps({"classes": classes}))
    ds = scan(tmp_path)
    assert ds.class_map.kind == "palette" and ds.ignored_pixels == 1
    _, mask = load_pair(ds, 0)
    assert mask[0, 0] == IGNORE and np.array_equal(mask.ravel()[1:], ids.ravel()[1:])


def test_class_files_of_labelling_tools_and_datasets_name_the_colours(tmp_path):
    ids = np.arange(80).reshape(8, 10) % 3
    m = colour_mask(ids, list(PALETTE.values()))
    dataset(tmp_path, {"a": m})
    names = list(PALETTE)
    # CVAT / Pascal VOC export: labelmap.txt one folder up from SegmentationClass/.
    lines = ["# label:color_rgb:parts:actions"] + [f"{n}:{','.join(map(str, c))}::" for n, c in PALETTE.items()]
    (tmp_path / "labelmap.txt").write_text("\n".join(lines) + "\n")
    ds = scan(tmp_path)
    assert ds.class_map.names == tuple(names) and np.array_equal(load_pair(ds, 0)[1], ids)
    (tmp_path / "labelmap.txt").unlink()
    # CamVid / Kaggle: class_dict.csv beside the masks, header in any case, spaces, a byte-order mark.
    rows = ["\ufeffName, R, G, B"] + [f"{n}, {c[0]}, {c[1]}, {c[2]}" for n, c in PALETTE.items()]
    (tmp_path / "masks" / "class_dict.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    ds = scan(tmp_path)
    assert ds.class_map.names == tuple(names) and np.array_equal(load_pair(ds, 0)[1], ids)
    (tmp_path / "masks" / "class_dict.csv").write_text("name,r,g\nroad,1,2\n")
    with pytest.raises(InputError, match=r"class_dict\.csv: expected a header with name, r, g, b columns"):
        scan(tmp_path)
    (tmp_path / "masks" / "class_dict.csv").unlink()
    (tmp_path / "labelmap.txt").write_text("road:1,2\n")
    with pytest.raises(InputError, match=r"labelmap\.txt: line 1: .*must be \[r, g, b\]"):
        scan(tmp_path)


def test_colour_masks_without_palette_or_with_unknown_colour(tmp_path):
    ids = np.arange(80).reshape(8, 10) % 3
    m = colour_mask(ids, list(PALETTE.values()))
    dataset(tmp_path, {"a": m})
    with pytest.raises(InputError, match=r"colour-coded .*add data\.palette"):
        scan(tmp_path)
    m[0, 0] = [1, 2, 3]
    save(tmp_path / "masks" / "a.png", m)
    with pytest.raises(InputError, match=r"unexpected mask colours \(1, 2, 3\) \(found in a\.png\)"):
        scan(tmp_path, palette=PALETTE)


def test_gray_masks_saved_as_rgb_are_gray(tmp_path):
    m = np.arange(80, dtype=np.uint8).reshape(8, 10) % 3
    dataset(tmp_path, {"a": np.dstack([m, m, m])})
    ds = scan(tmp_path)
    assert ds.class_map.kind == "contiguous" and ds.class_map.num_classes == 3
    assert np.array_equal(load_pair(ds, 0)[1], m)


def test_class_map_round_trip():
    cm = ClassMap("palette", ("a", "b"), None, ((1, 2, 3), (4, 5, 6)), 255, ((255, 255, 255),))
    back = ClassMap.from_dict(json.loads(json.dumps(cm.to_dict())))
    assert back == cm
    raw = np.array([[[1, 2, 3], [4, 5, 6], [255, 255, 255]]], dtype=np.uint8)
    assert back.apply(raw).tolist() == [[0, 1, IGNORE]]
    with pytest.raises(ValueError, match=r"unexpected mask values \(9, 9, 9\)"):
        back.apply(np.full((1, 1, 3), 9, np.uint8))


# ---------------------------------------------------------------- channels and statistics


def test_channels_follow_the_data(tmp_path):
    z = np.zeros((8, 10), np.uint8)
    z[0] = 1  # two classes present
    dataset(tmp_path / "g", {"a": z, "b": z}, images={"a": gray(seed=1), "b": gray(seed=2)})
    assert scan(tmp_path / "g").channels == 1
    dataset(tmp_path / "m", {"a": z, "b": z}, images={"a": gray(seed=1), "b": rgb(seed=2)})
    ds = scan(tmp_path / "m")
    assert ds.channels == 3 and len(ds.mean) == len(ds.std) == 3
    img, _ = load_pair(ds, 0)
    assert img.shape == (8, 10, 3) and np.array_equal(img[..., 0], gray(seed=1))


def test_mean_and_std_match_numpy(tmp_path):
    z = np.zeros((8, 10), np.uint8)
    z[0] = 1  # two classes present
    images = {"a": gray(8, 10, seed=1), "b": rgb(8, 10, seed=2), "c": rgb(8, 10, seed=3)}
    dataset(tmp_path, {"a": z, "b": z, "c": z}, images=images)
    ds = scan(tmp_path)
    stacked = np.stack([np.repeat(images["a"][..., None], 3, axis=2), images["b"], images["c"]]) / 255.0
    np.testing.assert_allclose(ds.mean, stacked.mean(axis=(0, 1, 2)), atol=1e-12)
    np.testing.assert_allclose(ds.std, stacked.std(axis=(0, 1, 2)), atol=1e-12)


def test_summary_is_json_ready(tmp_path):
    m = np.zeros((8, 10), np.uint8)
    m[:2] = 1
    dataset(tmp_path, {"a": m, "b": np.zeros((6, 12), np.uint8)})
    s = json.loads(json.dumps(scan(tmp_path).summary()))
    assert s["num_images"] == 2 and s["channels"] == 3
    assert s["size_min"] == [6, 10] and s["size_max"] == [8, 12]
    assert s["classes"] == ["background", "foreground"] and s["class_map_kind"] == "binary"
    assert s["class_pixels"] == [132, 20] and abs(sum(s["class_fractions"]) - 1) < 1e-9
    assert len(s["mean"]) == len(s["std"]) == 3


# ---------------------------------------------------------------- split


def test_split_by_image_is_deterministic_and_keeps_a_training_image():
    tr, te = split_by_image(20, 0.2, seed=3)
    tr2, te2 = split_by_image(20, 0.2, seed=3)
    assert np.array_equal(tr, tr2) and np.array_equal(te, te2)
    assert len(te) == 4 and len(tr) == 16
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(20))
    assert not np.array_equal(te, split_by_image(20, 0.2, seed=4)[1])
    assert [len(a) for a in split_by_image(1, 0.5, 0)] == [1, 0]
    assert [len(a) for a in split_by_image(2, 0.9, 0)] == [1, 1]
    assert [len(a) for a in split_by_image(3, 0.01, 0)] == [2, 1]
    assert [len(a) for a in split_by_image(5, 0.0, 0)] == [5, 0]


def test_test_set_scanned_with_the_training_class_map(tmp_path):
    m = np.zeros((8, 10), np.uint8)
    m[0] = 1
    dataset(tmp_path / "train", {"a": m})
    train = scan(tmp_path / "train")
    dataset(tmp_path / "test", {"b": np.zeros((8, 10), np.uint8)}, images={"b": gray()})
    test = scan_dataset(
        tmp_path / "test" / "images", tmp_path / "test" / "masks", DataConfig(),
        class_map=train.class_map, channels=train.channels,
    )
    assert test.class_map == train.class_map and test.channels == 3
    assert test.class_pixels.tolist() == [80, 0]
    save(tmp_path / "test" / "masks" / "b.png", np.full((8, 10), 2, np.uint8))
    with pytest.raises(InputError, match=r"unexpected mask values 2"):
        scan_dataset(tmp_path / "test" / "images", tmp_path / "test" / "masks", DataConfig(),
                     class_map=train.class_map)
