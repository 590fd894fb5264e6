"""Reading images and masks: the pixel limit checked before decoding, EXIF orientation, modes and bit depths.

Big images are converted a band of rows at a time (`_BAND_PIXELS`), so no step holds a second full copy.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from autoseg.errors import InputError

EXIF_ORIENTATION = 0x0112
_BAND_PIXELS = 1 << 22  # pixels converted per step when reading or mapping a big image

# Images bigger than this are refused before they are decoded (Pillow would warn, then fill memory).
MAX_PIXELS_ENV = "AUTOSEG_MAX_IMAGE_PIXELS"
DEFAULT_MAX_IMAGE_PIXELS = 1 << 28  # 16384 x 16384; reading takes about 7 bytes a pixel (RGB)


def _band_rows(width: int) -> int:
    return max(1, _BAND_PIXELS // max(1, width))


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
