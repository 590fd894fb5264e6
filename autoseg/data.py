"""Image/mask pairs on disk -> a scanned `Dataset`: sizes, channels, normalisation and the class map.

Masks in memory are int32 class ids 0..K-1 with `IGNORE` (-1) for ignored pixels. How raw mask
values become class ids (`ClassMap`), decided once from every value found in the masks:

* binary: masks holding only 0 and 255 (or only one of them) -> background 0, foreground 1.
  Here 255 is the foreground class, so `data.ignore_index` (default 255) does NOT apply.
  Masks holding 0/1 are binary too; there the ignore value (e.g. 255) is honoured.
* contiguous: gray masks holding class ids 0..K-1 (every id present). Ids may be missing only
  when `data.palette` or a classes.json declares K classes.
* palette: colour (RGB) masks, one colour per class, from `data.palette` (name -> [r, g, b], in
  class-id order) or a classes.json (or CVAT's labelmap.txt, CamVid's class_dict.csv) in the masks
  folder or beside it. Gray masks whose gray
  levels match an all-gray palette are mapped the same way.

`data.ignore_index` is a raw gray value mapped to IGNORE. For colour masks it means the colour
(v, v, v) when that colour is not a class, and the colour of a classes.json entry whose id is v.
A classes.json entry whose id equals the ignore value is not a class when it is the largest id
(e.g. VOC's 255 "void"). Any other value -> InputError listing the values and the files.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from autoseg.config import DataConfig
from autoseg.errors import InputError

log = logging.getLogger(__name__)

IGNORE: int = -1
EXIF_ORIENTATION = 0x0112
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
CLASSES_FILE = "classes.json"
# Where class names (and colours) are looked for, beside the masks or one folder up, first found wins:
# ours, CVAT's / Pascal VOC's export, CamVid's and Kaggle's.
CLASS_FILES = (CLASSES_FILE, "labelmap.txt", "class_dict.csv", "class_dict_seg.csv")

_UNKNOWN = -2  # lookup result for a raw value the class map does not know
_GRAY = 0x010101  # packed colour of gray level v is v * _GRAY
_MAX_COLOURS = 4096  # more distinct mask colours than this means lossy (JPEG) or non-label masks
_SHOW = 10  # values listed in an error message
_BAND_PIXELS = 1 << 22  # pixels converted per step when reading or mapping a big image

# Images bigger than this are refused before they are decoded (Pillow would warn, then fill memory).
MAX_PIXELS_ENV = "AUTOSEG_MAX_IMAGE_PIXELS"
DEFAULT_MAX_IMAGE_PIXELS = 1 << 28  # 16384 x 16384; reading takes about 7 bytes a pixel (RGB)


def mask_dtype(num_classes: int) -> type[np.signedinteger]:
    """The smallest signed dtype holding class ids 0..num_classes-1 and IGNORE."""
    return np.int8 if num_classes <= 127 else np.int16 if num_classes <= 32767 else np.int32


def _band_rows(width: int) -> int:
    return max(1, _BAND_PIXELS // max(1, width))


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class Pair:
    stem: str
    image: Path
    mask: Path


@dataclass(frozen=True)
class ClassMap:
    """Raw mask values (gray levels or RGB colours) -> class ids. See the module docstring."""

    kind: Literal["binary", "contiguous", "palette"]
    names: tuple[str, ...]  # one per class id
    values: tuple[int, ...] | None  # raw gray value of each class; None: masks are colour-coded
    colors: tuple[tuple[int, int, int], ...] | None  # RGB of each class (lookup for palette, else display)
    ignore_index: int | None  # raw gray value mapped to IGNORE
    ignore_colors: tuple[tuple[int, int, int], ...] = ()  # colours mapped to IGNORE (colour masks)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def colour_coded(self) -> bool:
        return self.values is None

    def apply(self, raw: np.ndarray, dtype: type[np.signedinteger] = np.int32) -> np.ndarray:
        """Raw mask (H, W) or (H, W, 3) -> (H, W) class ids / IGNORE. ValueError on unknown values.

        Mapped a band of rows at a time, so a big colour mask never needs its 8-byte packed keys at once;
        `dtype` must hold -1..K-1 (mask_dtype(K) is the smallest).
        """
        if raw.ndim not in (2, 3):
            raise ValueError(f"mask must be (H, W) or (H, W, 3), got shape {raw.shape}")
        out = np.empty(raw.shape[:2], dtype)
        rows = _band_rows(raw.shape[1])
        for y0 in range(0, raw.shape[0], rows):
            out[y0 : y0 + rows] = self._apply(raw[y0 : y0 + rows])
        return out

    def _apply(self, raw: np.ndarray) -> np.ndarray:
        if raw.ndim == 3:
            if self.colour_coded:
                ids = self._lookup(_pack(raw))
            else:  # a gray mask stored as RGB: every channel holds the value
                raw = raw[..., 0]
        if raw.ndim == 2:
            fast = raw.dtype == np.uint8  # a 256-entry table instead of a search per pixel
            ids = self._lut8[raw] if fast else self.map_keys(raw.astype(np.int64), colour=False)
        if (ids == _UNKNOWN).any():
            bad = np.unique(raw[ids == _UNKNOWN] if raw.ndim == 2 else _pack(raw)[ids == _UNKNOWN])
            raise ValueError(f"unexpected mask values {_format_keys(bad, raw.ndim == 3)}")
        return ids

    def map_keys(self, keys: np.ndarray, colour: bool) -> np.ndarray:
        """Class id per raw key: gray levels, or packed colours (r << 16 | g << 8 | b) if `colour`."""
        keys = np.asarray(keys, dtype=np.int64)
        if self.colour_coded and not colour:
            keys = np.where((keys >= 0) & (keys <= 255), keys * _GRAY, -1)
        elif colour and not self.colour_coded:
            r, g, b = keys >> 16, (keys >> 8) & 255, keys & 255
            keys = np.where((r == g) & (g == b), r, -1)
        return self._lookup(keys)

    def _lookup(self, keys: np.ndarray) -> np.ndarray:
        table_keys, table_ids = self._table
        pos = np.searchsorted(table_keys, keys).clip(0, len(table_keys) - 1)
        return np.where(table_keys[pos] == keys, table_ids[pos], _UNKNOWN).astype(np.int32)

    @cached_property
    def _table(self) -> tuple[np.ndarray, np.ndarray]:
        table: dict[int, int] = {}
        if self.colour_coded:
            for i, c in enumerate(self.colors or ()):
                table[_pack_one(c)] = i
            for c in self.ignore_colors:  # the ignore mapping wins over a class of the same colour
                table[_pack_one(c)] = IGNORE
        else:
            table = {int(v): i for i, v in enumerate(self.values or ())}
            if self.ignore_index is not None:
                table[int(self.ignore_index)] = IGNORE
        keys = np.array(sorted(table), dtype=np.int64)
        return keys, np.array([table[k] for k in keys.tolist()], dtype=np.int32)

    @cached_property
    def _lut8(self) -> np.ndarray:
        return self.map_keys(np.arange(256), colour=False)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "names": list(self.names),
            "values": None if self.values is None else list(self.values),
            "colors": None if self.colors is None else [list(c) for c in self.colors],
            "ignore_index": self.ignore_index,
            "ignore_colors": [list(c) for c in self.ignore_colors],
        }

    @classmethod
    def from_dict(cls, d: dict) -> ClassMap:
        colors = d.get("colors")
        return cls(
            kind=d["kind"],
            names=tuple(d["names"]),
            values=None if d.get("values") is None else tuple(int(v) for v in d["values"]),
            colors=None if colors is None else tuple(_rgb(c) for c in colors),
            ignore_index=d.get("ignore_index"),
            ignore_colors=tuple(_rgb(c) for c in d.get("ignore_colors", ())),
        )


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


# ---------------------------------------------------------------- pairing


def list_images(folder: Path, role: str, key: str | None = None) -> list[Path]:
    """The image files in `folder`, sorted; `key` is the setting to name when there are none (data.<role>)."""
    key = key or f"data.{role}"
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a folder"
        raise InputError(f"{folder}: {role} folder {what}; check the {key} path")
    files = []
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in IMAGE_EXTS or p.name.startswith("."):
            continue
        if p.is_symlink() and not p.exists():  # is_file() is False: it would vanish without a word
            raise InputError(f"{p}: broken symbolic link (to {_link_target(p)}); fix the link or remove it")
        if p.is_file():
            files.append(p)
    if not files:
        raise InputError(
            f"{folder}: no {role} found (looked for {', '.join(IMAGE_EXTS)}); check the {key} path"
        )
    return files


def _link_target(p: Path) -> str:
    try:
        return _shown(Path(os.readlink(p)))
    except OSError:
        return "?"


def _shown(p: Path) -> str:
    """The path as printable text: bytes that are not UTF-8 as \\xNN."""
    return os.fsencode(p).decode("utf-8", "backslashreplace")


def _require_utf8(paths: Iterable[Path], key: str) -> None:
    """Names that are not UTF-8 are refused here: run folders, manifests and reports are UTF-8 text."""
    for p in paths:
        try:
            str(p).encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(
                f"{_shown(p)}: the name is not valid UTF-8 (under {key}); rename it, e.g. with "
                "`convmv -f latin1 -t utf8 --notest -r FOLDER`"
            ) from None


def find_pairs(images: Path, masks: Path, suffixes: Sequence[str]) -> list[Pair]:
    """Pair each image with the mask named `<stem>.<ext>` or `<stem><suffix>.<ext>`, sorted by stem."""
    images, masks = Path(images), Path(masks)
    suffixes = [s for s in suffixes if s]
    _require_utf8([images.absolute()], "data.images")
    _require_utf8([masks.absolute()], "data.masks")
    image_files = list_images(images, "images")
    mask_files = list_images(masks, "masks")
    _require_utf8(image_files, "data.images")
    _require_utf8(mask_files, "data.masks")
    by_stem: dict[str, list[Path]] = {}
    for p in mask_files:
        by_stem.setdefault(p.stem, []).append(p)
    if images.resolve() == masks.resolve():
        # One folder for both: a file is a mask when its stem is another file's stem plus a suffix.
        stems = {p.stem for p in image_files}
        is_mask = {
            p for p in image_files for s in suffixes if p.stem.endswith(s) and p.stem[: -len(s)] in stems
        }
        image_files = [p for p in image_files if p not in is_mask]
        by_stem = {}
        for p in is_mask:
            by_stem.setdefault(p.stem, []).append(p)

    seen: dict[str, Path] = {}
    pairs, missing = [], []
    used: set[Path] = set()
    for img in image_files:
        if img.stem in seen:
            raise InputError(
                f"{images}: {seen[img.stem].name} and {img.name} share the stem {img.stem!r}; "
                "keep one image per stem"
            )
        seen[img.stem] = img
        candidates = [m for name in dict.fromkeys([img.stem] + [img.stem + s for s in suffixes])
                      for m in by_stem.get(name, []) if m != img]
        if not candidates:
            missing.append(img)
            continue
        if len(candidates) > 1:
            raise InputError(
                f"{masks}: image {img.name} matches several masks ({', '.join(m.name for m in candidates)}); "
                "keep one mask per image"
            )
        pairs.append(Pair(img.stem, img, candidates[0]))
        used.add(candidates[0])
    if missing:
        shown = ", ".join(p.name for p in missing[:5]) + (", ..." if len(missing) > 5 else "")
        example = f"<stem>{suffixes[0]}.png" if suffixes else "<stem>.png"
        raise InputError(
            f"{images}: {len(missing)} image{'s have' if len(missing) > 1 else ' has'} no mask in {masks}: "
            f"{shown}; name masks <stem>.png or {example}"
        )
    orphans = [m for ms in by_stem.values() for m in ms if m not in used]
    if orphans:
        log.warning(
            "%s: %d mask(s) without an image are skipped: %s",
            masks, len(orphans), ", ".join(sorted(m.name for m in orphans)[:5]),
        )
    return sorted(pairs, key=lambda p: p.stem)


# ---------------------------------------------------------------- reading


def max_image_pixels() -> int:
    """The pixel limit for one image: $AUTOSEG_MAX_IMAGE_PIXELS, else DEFAULT_MAX_IMAGE_PIXELS."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        limit = int(raw.replace("_", ""))
    except ValueError:
        limit = 0
    if limit < 1:
        raise InputError(f"{MAX_PIXELS_ENV}={raw!r}: must be a positive whole number of pixels, "
                         f"e.g. {DEFAULT_MAX_IMAGE_PIXELS} (the default)")
    return limit


def _too_big(path: Path, what: str, size: tuple[int, int], limit: int) -> InputError:
    w, h = size
    return InputError(
        f"{path}: {what} is {w}x{h} pixels ({w * h / 1e6:.0f} Mpx), above the limit of {limit / 1e6:.0f} Mpx; "
        f"to read it anyway set {MAX_PIXELS_ENV}={w * h} (it needs about {w * h * 10 / 1e9:.1f} GB of memory), "
        "or cut it into smaller images"
    )


def _size_unchecked(path: Path) -> tuple[int, int]:
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as im:  # the header only
            return im.size
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _open(path: Path, what: str) -> Image.Image:
    # Pillow's limit is process-global (matplotlib reads PNGs through it too): set for this read only.
    old = Image.MAX_IMAGE_PIXELS
    try:
        return _open_limited(path, what)
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _open_limited(path: Path, what: str) -> Image.Image:
    limit = max_image_pixels()
    # Pillow warns above its own limit and refuses above twice it; ours is checked before decoding instead.
    Image.MAX_IMAGE_PIXELS = limit
    im = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        if im.width * im.height > limit:
            raise _too_big(path, what, im.size, limit)
        im.load()  # decode now so truncated files fail here, not later
    except Image.DecompressionBombError:
        raise _too_big(path, what, _size_unchecked(path), limit) from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        if im is not None:
            im.close()
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(
            f"{path}: cannot read {what} ({reason}); re-save it as PNG or remove the pair"
        ) from None
    except BaseException:
        if im is not None:
            im.close()
        raise
    pages = getattr(im, "n_frames", 1)
    if pages > 1:  # e.g. a TIFF stack of EM slices: reading page 1 alone would drop the rest unnoticed
        im.close()
        raise InputError(
            f"{path}: {what} file holds {pages} pages (a stack); autoseg reads one image per file: "
            "save each page as its own file, named alike in the images and masks folders"
        )
    if im.getexif().get(EXIF_ORIENTATION, 1) != 1:
        # Cameras store pixels unrotated plus this tag; viewers, labelling tools and OpenCV apply it,
        # so masks drawn on such an image match it turned, not as stored.
        turned = ImageOps.exif_transpose(im)
        im.close()
        im = turned
    return im


def _by_bands(im: Image.Image, convert: Callable[[Image.Image], np.ndarray]) -> np.ndarray:
    """np.concatenate of convert(band) over bands of rows: Pillow's tobytes would hold the whole image twice."""
    w, h = im.size
    rows = _band_rows(w)
    first = convert(im.crop((0, 0, w, min(h, rows))))
    if rows >= h:
        return np.ascontiguousarray(first)
    out = np.empty((h, *first.shape[1:]), first.dtype)
    out[:rows] = first
    for y0 in range(rows, h, rows):
        out[y0 : y0 + rows] = convert(im.crop((0, y0, w, min(h, y0 + rows))))
    return out


def _scale16(a: np.ndarray) -> np.ndarray:
    # 16-bit (and 32-bit integer) data: a fixed scale, so every image maps the same way.
    a = np.clip(a, 0, 65535).astype(np.uint32)
    return ((a * 255 + 32767) // 65535).astype(np.uint8)


def _luma(a: np.ndarray) -> np.ndarray:
    # ITU-R 601 luma, as Pillow's convert("L")
    return np.rint(a @ np.array([0.299, 0.587, 0.114])).clip(0, 255).astype(np.uint8)[..., None]


class ImageRows:
    """An image as Pillow decoded it, handed out as (rows, W, C) uint8 bands: `rows[y0:y1]`, `rows[:]`.

    For an image too big to hold twice: an RGB image costs Pillow 4 bytes a pixel, and a full numpy copy
    3 more. `shape` and `ndim` are those of the array read_image would return. Close it (or use `with`).
    """

    def __init__(self, path: Path, channels: int | None = None):
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1, 3 or None, got {channels}")
        self._im = _open(path, "image")
        self._channels = channels
        self._scale = np.float32(1.0)
        try:
            if self._im.mode == "F":  # values in 0..1 are scaled to 0..255: look at every band first
                top = _by_bands(self._im, lambda b: np.nan_to_num(np.asarray(b, np.float32)).max(axis=1)).max()
                self._scale = np.float32(255.0 if top <= 1.0 else 1.0)
            first = self._band(self._im.crop((0, 0, self._im.width, 1)))
        except BaseException:
            self._im.close()
            raise
        self.shape: tuple[int, int, int] = (self._im.height, self._im.width, first.shape[2])
        self.ndim = 3

    def _band(self, b: Image.Image) -> np.ndarray:
        mode, channels = self._im.mode, self._channels
        if mode == "RGB":
            a = np.asarray(b)
        elif mode == "L":
            a = np.asarray(b)[..., None]
        elif mode in ("1", "LA", "La"):
            a = np.asarray(b.convert("L"))[..., None]
        elif mode.startswith("I"):
            a = _scale16(np.asarray(b).astype(np.int64))[..., None]
        elif mode == "F":
            f = np.nan_to_num(np.asarray(b, dtype=np.float32)) * self._scale
            a = np.clip(np.rint(f), 0, 255).astype(np.uint8)[..., None]
        else:  # RGBA, P, PA, CMYK, YCbCr, ...
            a = np.asarray(b.convert("RGB"))
        if channels == 3 and a.shape[2] == 1:
            return np.repeat(a, 3, axis=2)
        return _luma(a) if channels == 1 and a.shape[2] == 3 else a

    def __getitem__(self, rows: slice) -> np.ndarray:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError(f"ImageRows takes a slice of rows, got {rows!r}")
        y0, y1, _ = rows.indices(self.shape[0])
        if (y0, y1) == (0, self.shape[0]):
            return _by_bands(self._im, self._band)
        return np.ascontiguousarray(self._band(self._im.crop((0, y0, self.shape[1], max(y0, y1)))))

    def close(self) -> None:
        self._im.close()

    def __enter__(self) -> ImageRows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_image(path: Path, channels: int | None = None) -> np.ndarray:
    """(H, W, C) uint8: gray -> C=1, RGB/RGBA/P -> C=3 (alpha dropped). `channels` forces 1 or 3."""
    with ImageRows(path, channels) as rows:
        return rows[:]


def read_raw_mask(path: Path) -> np.ndarray:
    """Mask values as stored: (H, W) gray levels / palette indices, or (H, W, 3) RGB (alpha dropped)."""
    with _open(path, "mask") as im:
        mode = im.mode

        def band(b: Image.Image) -> np.ndarray:
            if mode == "1":
                return np.asarray(b, dtype=np.uint8)
            if mode in ("L", "P"):  # P: the palette index is the label (VOC style)
                return np.asarray(b)
            if mode.startswith("I;16"):
                return np.asarray(b).astype(np.uint16)
            if mode == "I":
                return np.asarray(b).astype(np.int32)
            if mode in ("LA", "La", "PA"):
                return np.asarray(b)[..., 0]
            if mode in ("RGB", "RGBA", "RGBX", "RGBa"):
                return np.asarray(b)[..., :3]
            if mode == "F":
                f = np.asarray(b, dtype=np.float32)
                if not np.all(np.isfinite(f)) or not np.all(f == np.rint(f)):
                    raise InputError(f"{path}: mask holds fractional values; masks must hold integer class ids")
                return f.astype(np.int32)
            return np.asarray(b.convert("RGB"))

        return _by_bands(im, band)


# ---------------------------------------------------------------- class definitions


@dataclass(frozen=True)
class _ClassSpec:
    """Classes declared by data.palette or classes.json: names by id, optional colours."""

    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...] | None
    ignore_colors: tuple[tuple[int, int, int], ...]
    source: str

    @property
    def k(self) -> int:
        return len(self.names)


def _rgb(c: Any, where: str = "colour") -> tuple[int, int, int]:
    if (
        not isinstance(c, list | tuple) or len(c) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in c)
    ):
        raise InputError(f"{where}: must be [r, g, b] with integers 0-255, got {c!r}")
    return (int(c[0]), int(c[1]), int(c[2]))


def _entries_from_json(obj: Any, where: str) -> dict[int, tuple[str, tuple[int, int, int] | None]]:
    """Accepts: {"classes": [...]}, [names], [{"id", "name", "color"|"colour"|"rgb"}], {name: id},
    {"id": name} and {name: [r, g, b]}. Returns id -> (name, colour or None)."""
    if isinstance(obj, dict) and "classes" in obj:
        return _entries_from_json(obj["classes"], where)
    out: dict[int, tuple[str, tuple[int, int, int] | None]] = {}
    if isinstance(obj, list):
        for pos, e in enumerate(obj):
            if isinstance(e, str):
                out[pos] = (e, None)
                continue
            if not isinstance(e, dict):
                raise InputError(f"{where}: entry {pos} must be a name or an object, got {e!r}")
            i = e.get("id", pos)
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                raise InputError(f"{where}: entry {pos} has id {i!r}; ids must be integers >= 0")
            if i in out:
                raise InputError(f"{where}: id {i} appears twice; give each class its own id")
            colour = next((e[k] for k in ("color", "colour", "rgb") if k in e), None)
            name = e.get("name", f"class_{i}")
            out[i] = (str(name), None if colour is None else _rgb(colour, f"{where}: class {name!r} colour"))
        return out
    if isinstance(obj, dict) and obj:
        vals = list(obj.values())
        if all(isinstance(v, int) and not isinstance(v, bool) for v in vals):  # {name: id}
            pairs = [(v, str(k)) for k, v in obj.items()]
        elif all(isinstance(k, str) and k.isdigit() for k in obj) and all(isinstance(v, str) for v in vals):
            pairs = [(int(k), v) for k, v in obj.items()]  # {"0": name}
        elif all(isinstance(v, list) for v in vals):  # {name: [r, g, b]}, ids in file order
            return {i: (str(k), _rgb(v, f"{where}: {k}")) for i, (k, v) in enumerate(obj.items())}
        else:
            pairs = []
        if pairs:
            for i, name in pairs:
                if i < 0:
                    raise InputError(f"{where}: class {name!r} has id {i}; ids must be >= 0")
                if i in out:
                    raise InputError(f"{where}: id {i} appears twice; give each class its own id")
                out[i] = (name, None)
            return out
    raise InputError(
        f"{where}: cannot read the classes; use a list of names or "
        '{"classes": [{"id": 0, "name": "background", "color": [0, 0, 0]}, ...]}'
    )


def _spec_from_entries(
    entries: dict[int, tuple[str, tuple[int, int, int] | None]], ignore: int | None, source: str
) -> _ClassSpec:
    ignore_colors: list[tuple[int, int, int]] = []
    if ignore is not None and ignore in entries:
        colour = entries[ignore][1]
        if colour is not None:
            ignore_colors.append(colour)
        if ignore == max(entries) and len(entries) > 1:
            entries = {i: e for i, e in entries.items() if i != ignore}  # e.g. VOC 255 "void"
    k = max(entries) + 1
    names = tuple(entries[i][0] if i in entries else f"class_{i}" for i in range(k))
    have = [i for i, e in entries.items() if e[1] is not None]
    colors = None
    if have:
        if len(have) != k:
            lacking = [i for i in range(k) if i not in have]
            raise InputError(
                f"{source}: classes {lacking[:_SHOW]} have no colour; "
                f"give every id 0..{k - 1} a colour, or none"
            )
        colors = tuple(entries[i][1] for i in range(k))  # type: ignore[misc]
        dup = {c for c in colors if colors.count(c) > 1}
        if dup:
            raise InputError(
                f"{source}: colour {sorted(dup)[0]} is used by several classes; colours must differ"
            )
    return _ClassSpec(names, colors, tuple(ignore_colors), source)


def _class_spec(masks: Path, cfg: DataConfig) -> _ClassSpec | None:
    if cfg.palette:
        entries = {
            i: (str(name), _rgb(c, f"data.palette.{name}")) for i, (name, c) in enumerate(cfg.palette.items())
        }
        return _spec_from_entries(entries, None, "data.palette")
    for folder in (masks, masks.parent):
        for name in CLASS_FILES:
            path = folder / name
            if path.is_file():
                log.info("class names from %s", path)
                return _spec_from_entries(_read_class_file(path), cfg.ignore_index, str(path))
    return None


def _read_class_file(path: Path) -> dict[int, tuple[str, tuple[int, int, int] | None]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read it ({e}); fix or remove the file") from None
    if path.suffix == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e}); fix or remove the file") from None
        return _entries_from_json(obj, str(path))
    if path.suffix == ".csv":
        return _entries_from_csv(text, str(path))
    return _entries_from_labelmap(text, str(path))


def _entries_from_csv(text: str, where: str) -> dict[int, tuple[str, tuple[int, int, int] | None]]:
    """CamVid / Kaggle `class_dict.csv`: a header `name,r,g,b` (any case and spacing), one class per row."""
    rows = [[c.strip() for c in row] for row in csv.reader(io.StringIO(text)) if any(c.strip() for c in row)]
    head = [h.lower() for h in rows[0]] if rows else []
    name_col = next((head.index(k) for k in ("name", "class", "label", "class_name") if k in head), None)
    if name_col is None or not {"r", "g", "b"} <= set(head):
        raise InputError(f"{where}: expected a header with name, r, g, b columns, got {rows[0] if rows else []}")
    cols = [head.index(k) for k in ("r", "g", "b")]
    out: dict[int, tuple[str, tuple[int, int, int] | None]] = {}
    for n, row in enumerate(rows[1:], start=2):
        try:
            rgb = [int(row[c]) for c in cols]
        except (ValueError, IndexError):
            raise InputError(f"{where}: line {n}: r, g, b must be integers 0-255, got {row}") from None
        out[len(out)] = (row[name_col], _rgb(rgb, f"{where}: line {n}"))
    return out


def _entries_from_labelmap(text: str, where: str) -> dict[int, tuple[str, tuple[int, int, int] | None]]:
    """CVAT / Pascal VOC export `labelmap.txt`: `label:r,g,b:parts:actions` per line, # comments."""
    out: dict[int, tuple[str, tuple[int, int, int] | None]] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split(":")
        try:
            rgb = [int(v) for v in fields[1].split(",")]
        except (ValueError, IndexError):
            raise InputError(f"{where}: line {n}: expected label:r,g,b:..., got {line.strip()!r}") from None
        out[len(out)] = (fields[0].strip(), _rgb(rgb, f"{where}: line {n}"))
    if not out:
        raise InputError(f"{where}: no classes in it; expected lines like background:0,0,0::")
    return out


# ---------------------------------------------------------------- class map inference


def _pack(rgb: np.ndarray) -> np.ndarray:
    a = rgb.astype(np.int64)
    return (a[..., 0] << 16) | (a[..., 1] << 8) | a[..., 2]


def _pack_one(c: Sequence[int]) -> int:
    return (int(c[0]) << 16) | (int(c[1]) << 8) | int(c[2])


def _format_keys(keys: Iterable[int], colour: bool) -> str:
    keys = sorted(int(k) for k in keys)
    shown = [
        f"({k >> 16}, {(k >> 8) & 255}, {k & 255})" if colour and k >= 0 else str(k) for k in keys[:_SHOW]
    ]
    return ", ".join(shown) + (f", ... ({len(keys)} in all)" if len(keys) > _SHOW else "")


def _unexpected(
    bad: Iterable[int], colour: bool, where: dict[int, Path], masks: Path, hint: str
) -> InputError:
    bad = sorted(bad)
    files = list(dict.fromkeys(where[k].name for k in bad if k in where))
    jpeg = any(where[k].suffix.lower() in (".jpg", ".jpeg") for k in bad if k in where)
    what = "colours" if colour else "values"
    msg = (
        f"{masks}: unexpected mask {what} {_format_keys(bad, colour)} "
        f"(found in {', '.join(files[:5])}{', ...' if len(files) > 5 else ''}); {hint}"
    )
    if jpeg:
        msg += "; JPEG compression alters mask values, save masks as PNG"
    return InputError(msg)


_GRAY_HINT = (
    "masks must hold 0/255 (binary) or class ids 0..K-1; add data.palette or a classes.json naming "
    "the classes, or set data.ignore_index to the value to ignore"
)


def _all_ignored(masks: Path, ignore: int | None) -> InputError:
    return InputError(f"{masks}: every mask pixel has the ignore value {ignore}; check data.ignore_index")


def _binary(values: tuple[int, int], spec: _ClassSpec | None, ignore: int | None) -> ClassMap:
    names = spec.names if spec is not None else ("background", "foreground")
    return ClassMap("binary", names, values, spec.colors if spec else None, ignore)


def _gray_class_map(values: set[int], spec: _ClassSpec | None, ignore: int | None,
                    where: dict[int, Path], masks: Path) -> ClassMap:
    w = values - {ignore} if ignore is not None else set(values)
    if spec is None:
        if values <= {0, 255} and (255 in values or values == {0}):
            return _binary((0, 255), None, None)  # 255 is foreground here, never ignored
        if not w:
            raise _all_ignored(masks, ignore)
        if w <= {0, 1}:
            return _binary((0, 1), None, ignore)
        run = 0
        while run in w:
            run += 1
        if run == max(w) + 1:
            names = tuple(f"class_{i}" for i in range(run))
            return ClassMap("contiguous", names, tuple(range(run)), None, ignore)
        hint = _GRAY_HINT if 0 in w else "class ids must start at 0; " + _GRAY_HINT
        raise _unexpected({v for v in w if v >= run}, False, where, masks, hint)

    k = spec.k
    grays = [c[0] for c in spec.colors or () if c[0] == c[1] == c[2]]
    gray_palette = spec.colors is not None and len(grays) == k
    ids_ok = w <= set(range(k))
    if gray_palette:
        g_ignore = ignore if ignore is not None and ignore not in grays else None
        gray_ok = (values - {g_ignore}) <= set(grays)
        if gray_ok and (not ids_ok or (ignore in values and ignore in grays)):
            return ClassMap("palette", spec.names, tuple(grays), spec.colors, g_ignore)
    if k == 2 and not gray_palette and values <= {0, 255} and 255 in values:
        return _binary((0, 255), spec, None)
    if ids_ok:
        if not w:
            raise _all_ignored(masks, ignore)
        if k == 2:
            return _binary((0, 1), spec, ignore)
        return ClassMap("contiguous", spec.names, tuple(range(k)), spec.colors, ignore)
    bad = {v for v in w if not 0 <= v < k}
    if gray_palette:
        bad_gray = {v for v in w if v not in grays}
        bad = min(bad, bad_gray, key=len)
    raise _unexpected(
        bad, False, where, masks,
        f"{spec.source} declares {k} classes (ids 0..{k - 1}); fix the masks, extend {spec.source} "
        "or set data.ignore_index to the value to ignore",
    )


def _colour_class_map(colours: set[int], spec: _ClassSpec | None, ignore: int | None,
                      where: dict[int, Path], masks: Path) -> ClassMap:
    if spec is None or spec.colors is None:
        raise InputError(
            f"{masks}: masks are colour-coded ({len(colours)} colours, e.g. {_format_keys(colours, True)}) "
            "but no class colours are given; add data.palette (name: [r, g, b]) "
            "or a classes.json with colours (a labelmap.txt or class_dict.csv from CVAT or CamVid works too)"
        )
    palette = {_pack_one(c) for c in spec.colors}
    ignore_colors = list(spec.ignore_colors)
    if ignore is not None and 0 <= ignore <= 255 and ignore * _GRAY not in palette:
        ignore_colors.append((ignore, ignore, ignore))
    bad = colours - palette - {_pack_one(c) for c in ignore_colors}
    if bad:
        raise _unexpected(
            bad, True, where, masks,
            f"every colour must be a class in {spec.source}; add the missing colours there or fix the masks",
        )
    return ClassMap("palette", spec.names, None, spec.colors, ignore, tuple(dict.fromkeys(ignore_colors)))


# ---------------------------------------------------------------- scanning


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
    try:
        mask = ds.class_map.apply(raw, dtype)
    except ValueError as e:
        raise InputError(f"{pair.mask}: {e}; the file changed since the scan, or it is not a mask") from None
    return img, mask


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
