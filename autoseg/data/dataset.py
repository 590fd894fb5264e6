"""The scanned `Dataset`: one streaming pass over the pairs (sizes, channel statistics, the class map),
its digest, loading one pair as class ids, and the split by image."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from autoseg.config import DataConfig
from autoseg.data.class_files import _class_spec
from autoseg.data.class_inference import _all_ignored, _colour_class_map, _gray_class_map, _unexpected
from autoseg.data.class_map import _GRAY, _UNKNOWN, IGNORE, ClassMap, _pack
from autoseg.data.images import _band_rows, read_image, read_raw_mask
from autoseg.data.pairs import Pair, find_pairs
from autoseg.errors import InputError

log = logging.getLogger("autoseg.data")  # one logger for the package: log lines keep the name they had

_MAX_COLOURS = 4096  # more distinct mask colours than this means lossy (JPEG) or non-label masks


@dataclass
class Dataset:
    pairs: list[Pair]
    sizes: list[tuple[int, int]]  # (H, W) per pair
    channels: int  # 1 or 3
    class_map: ClassMap
    class_pixels: np.ndarray  # (K,) int64 pixel counts
    mean: tuple[float, ...]  # per channel, of image/255
    std: tuple[float, ...]
    ignored_pixels: int = field(default=0)

    def summary(self) -> dict:
        """JSON-ready overview for data.json and the report."""
        hw = np.asarray(self.sizes, dtype=np.int64).reshape(-1, 2)
        total = int(self.class_pixels.sum())
        return {
            "num_images": len(self.pairs),
            "images_dir": str(self.pairs[0].image.parent) if self.pairs else None,
            "masks_dir": str(self.pairs[0].mask.parent) if self.pairs else None,
            "size_min": hw.min(axis=0).tolist() if len(hw) else None,  # [H, W]
            "size_max": hw.max(axis=0).tolist() if len(hw) else None,
            "channels": self.channels,
            "num_classes": self.class_map.num_classes,
            "classes": list(self.class_map.names),
            "class_map_kind": self.class_map.kind,
            "class_map": self.class_map.to_dict(),
            "class_pixels": [int(c) for c in self.class_pixels],
            "class_fractions": [float(c) / total if total else 0.0 for c in self.class_pixels],
            "ignored_pixels": int(self.ignored_pixels),
            "mean": [float(m) for m in self.mean],
            "std": [float(s) for s in self.std],
        }


def dataset_digest(ds: Dataset) -> str:
    """sha256 of the data itself: each pair's file names and bytes, in pairing order.

    Folders are left out, so data that moved keeps its digest; a run checks the folders it is given again
    against the digest it saved (data.json)."""
    h = hashlib.sha256()
    for pair in ds.pairs:
        for path in (pair.image, pair.mask):
            name = os.fsencode(path.name)
            h.update(len(name).to_bytes(4, "little") + name + os.path.getsize(path).to_bytes(8, "little"))
            with open(path, "rb") as f:
                for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def _count(
    counts: dict[int, int], where: dict[int, Path], keys: np.ndarray, n: np.ndarray, path: Path
) -> None:
    for k, c in zip(keys.tolist(), n.tolist(), strict=True):
        if k not in counts:
            counts[k] = 0
            where[k] = path
        counts[k] += c


def _moments(hist: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std of image/255 from (C, 256) histograms."""
    v = np.arange(256, dtype=np.float64) / 255.0
    n = hist.sum(axis=1).astype(np.float64)
    mean = (hist * v).sum(axis=1) / n
    var = np.maximum((hist * v**2).sum(axis=1) / n - mean**2, 0.0)
    std = np.sqrt(var)
    if np.any(std < 1e-6):
        log.warning("images have a constant channel; its std is set to 1 to avoid division by zero")
        std = np.where(std < 1e-6, 1.0, std)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def scan_dataset(
    images: Path,
    masks: Path,
    cfg: DataConfig,
    progress: bool = False,
    *,
    class_map: ClassMap | None = None,
    channels: int | None = None,
) -> Dataset:
    """One streaming pass over every pair: sizes, channel statistics, mask values -> Dataset.

    `class_map` / `channels` (e.g. from the training set, when scanning a separate test set)
    replace inference; mask values the given map does not know raise InputError.
    """
    images, masks = Path(images), Path(masks)
    pairs = find_pairs(images, masks, cfg.mask_suffixes)
    sizes: list[tuple[int, int]] = []
    hist_gray = np.zeros(256, dtype=np.int64)
    hist_rgb = np.zeros((3, 256), dtype=np.int64)
    gray: dict[int, int] = {}
    colour: dict[int, int] = {}
    where_gray: dict[int, Path] = {}
    where_colour: dict[int, Path] = {}
    for pair in tqdm(pairs, desc="scan", unit="img", disable=not progress):
        img = read_image(pair.image)
        raw = read_raw_mask(pair.mask)
        h, w = img.shape[:2]
        if raw.shape[:2] != (h, w):
            raise InputError(
                f"{pair.mask}: mask is {raw.shape[1]}x{raw.shape[0]} but image {pair.image.name} is "
                f"{w}x{h} (WxH); each mask must have the size of its image"
            )
        sizes.append((h, w))
        if img.shape[2] == 1:
            hist_gray += np.bincount(img.ravel(), minlength=256)
        else:
            for c in range(3):
                hist_rgb[c] += np.bincount(img[..., c].ravel(), minlength=256)
        if raw.ndim == 2 and raw.dtype == np.uint8:
            n = np.bincount(raw.ravel(), minlength=256)
            keys = np.flatnonzero(n)
            _count(gray, where_gray, keys, n[keys], pair.mask)
        elif raw.ndim == 2:
            keys, n = np.unique(raw, return_counts=True)
            _count(gray, where_gray, keys, n, pair.mask)
        else:
            rows = _band_rows(w)
            for y0 in range(0, h, rows):  # the packed keys take 8 bytes a pixel: a band at a time
                keys, n = np.unique(_pack(raw[y0 : y0 + rows]), return_counts=True)
                _count(colour, where_colour, keys, n, pair.mask)
            if len(colour) > _MAX_COLOURS:
                raise InputError(
                    f"{pair.mask}: masks hold more than {_MAX_COLOURS} distinct colours; masks must be "
                    "lossless (PNG) with one colour per class"
                )

    has_rgb = bool(hist_rgb.any())
    n_channels = channels or (3 if has_rgb else 1)
    hist = hist_rgb + hist_gray[None] if n_channels == 3 else (hist_gray + hist_rgb.sum(axis=0) // 3)[None]
    mean, std = _moments(hist)

    # Colour masks whose every pixel is gray are gray masks saved as RGB.
    colour_coded = any(not ((k >> 16) == ((k >> 8) & 255) == (k & 255)) for k in colour)
    if colour_coded:
        keys_d, where = dict(colour), dict(where_colour)
        for v, c in gray.items():
            key = v * _GRAY if 0 <= v <= 255 else -1 - v  # out-of-range gray: reported as unexpected
            keys_d[key] = keys_d.get(key, 0) + c
            where.setdefault(key, where_gray[v])
    else:
        keys_d, where = dict(gray), dict(where_gray)
        for k, c in colour.items():
            keys_d[k >> 16] = keys_d.get(k >> 16, 0) + c
            where.setdefault(k >> 16, where_colour[k])

    inferred = class_map is None
    if class_map is None:
        spec = _class_spec(masks, cfg)
        if colour_coded:
            class_map = _colour_class_map(set(keys_d), spec, cfg.ignore_index, where, masks)
        else:
            class_map = _gray_class_map(set(keys_d), spec, cfg.ignore_index, where, masks)
        if class_map.num_classes < 2:
            raise InputError(
                f"{masks}: only one class ({class_map.names[0]}) is defined; segmentation needs at least two"
            )
    key_arr = np.array(sorted(keys_d), dtype=np.int64)
    ids = class_map.map_keys(key_arr, colour=colour_coded)
    if (ids == _UNKNOWN).any():
        raise _unexpected(key_arr[ids == _UNKNOWN].tolist(), colour_coded, where, masks,
                          "they are not classes of the given class map")
    counts = np.array([keys_d[k] for k in key_arr.tolist()], dtype=np.int64)
    class_pixels = np.bincount(ids[ids >= 0], weights=counts[ids >= 0], minlength=class_map.num_classes)
    present = np.flatnonzero(class_pixels)
    if inferred and len(present) == 0:
        raise _all_ignored(masks, cfg.ignore_index)
    if inferred and len(present) == 1:  # e.g. empty binary masks: a net would learn nothing, and score 0
        raise InputError(
            f"{masks}: every labelled pixel of the {len(pairs)} mask(s) is class "
            f"{class_map.names[int(present[0])]!r}; segmentation needs at least two classes present: "
            "check the masks (are they empty?) and the data.masks path"
        )
    log.info(
        "%d images, %d channel(s), %d classes (%s)",
        len(pairs), n_channels, class_map.num_classes, class_map.kind,
    )
    return Dataset(
        pairs=pairs,
        sizes=sizes,
        channels=n_channels,
        class_map=class_map,
        class_pixels=class_pixels.astype(np.int64),
        mean=mean,
        std=std,
        ignored_pixels=int(counts[ids == IGNORE].sum()),
    )


def load_pair(ds: Dataset, i: int, dtype: type[np.signedinteger] = np.int32) -> tuple[np.ndarray, np.ndarray]:
    """(image (H, W, C) uint8 with C = ds.channels, mask (H, W) class ids / IGNORE as `dtype`)."""
    pair = ds.pairs[i]
    img = read_image(pair.image, channels=ds.channels)
    raw = read_raw_mask(pair.mask)
    if raw.shape[:2] != img.shape[:2]:
        raise InputError(
            f"{pair.mask}: mask is {raw.shape[1]}x{raw.shape[0]} but image {pair.image.name} is "
            f"{img.shape[1]}x{img.shape[0]} (WxH); each mask must have the size of its image"
        )
    return img, _class_ids(ds, pair, raw, dtype)


def _class_ids(ds: Dataset, pair: Pair, raw: np.ndarray, dtype: type[np.signedinteger]) -> np.ndarray:
    try:
        return ds.class_map.apply(raw, dtype)
    except ValueError as e:
        raise InputError(f"{pair.mask}: {e}; the file changed since the scan, or it is not a mask") from None


def load_mask(ds: Dataset, i: int, dtype: type[np.signedinteger] = np.int32) -> np.ndarray:
    """The mask of pair i alone, as load_pair maps it, checked against the image size of the scan: for a pass
    that needs no pixels (three times fewer bytes decoded on RGB data)."""
    pair = ds.pairs[i]
    raw = read_raw_mask(pair.mask)
    h, w = ds.sizes[i]
    if raw.shape[:2] != (h, w):
        raise InputError(
            f"{pair.mask}: mask is {raw.shape[1]}x{raw.shape[0]} but image {pair.image.name} was {w}x{h} (WxH) "
            "at the scan; each mask must have the size of its image"
        )
    return _class_ids(ds, pair, raw, dtype)


def split_by_image(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train ids, test ids), sorted. At least one train image; test may be empty."""
    if n < 1:
        raise ValueError(f"need at least one image, got n={n}")
    if not 0.0 <= test_fraction < 1.0:
        raise InputError(f"data.test_fraction: must be in [0, 1), got {test_fraction}")
    n_test = 0
    if test_fraction > 0 and n > 1:
        n_test = min(n - 1, max(1, round(n * test_fraction)))
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_test:]).astype(np.int64), np.sort(perm[:n_test]).astype(np.int64)
