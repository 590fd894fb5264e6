"""`python3 -m edge_agent predict MODEL IMAGES OUT`: run an autoseg model on a folder of images, on the device.

numpy + onnxruntime only (Pillow is used when present, for JPEG/TIFF/BMP and EXIF turns; PNG and PGM/PPM are
read and PNG written with the standard library). The preprocessing comes from the model's ONNX metadata
(classes, mean, std, tile, input_multiple, class_map, arch). Inference is the whole image padded to the input
multiple, or Gaussian-blended moving windows (sigma = tile/8) a band of rows at a time; "auto" runs whole while
the pass's activations fit 512 MiB. The host's `autoseg predict` and `autoseg eval` import this module's
window blending, whole-image pass and PNG writer (autoseg/infer.py, autoseg/predict.py), so both label alike;
the parity tests compare their masks pixel by pixel. This module never imports autoseg.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import time
import zlib
from itertools import islice
from typing import IO, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

MODES = ("auto", "whole", "window")
VALUES = ("ids", "training")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".pgm", ".ppm")
REQUIRED_KEYS = ("classes", "mean", "std", "tile")
# "auto" runs the whole image at once while that is cheap, and windows beyond, to bound memory: up to this
# many pixels, and up to WHOLE_MAX_BYTES of estimated activations (whole_pixel_limit).
WHOLE_MAX_PIXELS = 2048 * 2048
WHOLE_MAX_BYTES = 512 * 2**20
WIDTH_GUESS = 64  # first-level channels assumed when the net's are not known (the default space's widest)
BAND_BYTES = 8 * 2**20  # logits handed out (and reduced by argmax) at a time; the ring of window sums is apart
# Strong enough to read the classes at a glance; each region's border is drawn in full colour on top.
OVERLAY_ALPHA = 0.6
MAX_PIXELS = 1 << 28  # as autoseg.data's default image limit (16384 x 16384)

RunFn = Callable[[np.ndarray], np.ndarray]


class PredictError(Exception):
    """Bad input (model, image, folder): one line for the user, exit code 2."""


# ---------------------------------------------------------------------------------------------- overlay


def class_edges(ids: np.ndarray, above: Optional[np.ndarray] = None) -> np.ndarray:
    """(H, W) bool: pixels whose class differs from the pixel left of them or above them.

    `above` is the row just above `ids` when `ids` is a band of a larger image (None at the top), so
    edges drawn band by band equal the whole image's.
    """
    edge = np.zeros(ids.shape, dtype=bool)
    edge[:, 1:] = ids[:, 1:] != ids[:, :-1]
    edge[1:] |= ids[1:] != ids[:-1]
    if above is not None and len(ids):
        edge[0] |= ids[0] != above
    return edge


def overlay(image: np.ndarray, ids: np.ndarray, pal: np.ndarray, alpha: float = OVERLAY_ALPHA,
            above: Optional[np.ndarray] = None) -> np.ndarray:
    """The image with the class colours blended over it and every region's border in full colour, RGB uint8.

    Pixels of a class coloured pure black keep the image (blending black only darkens it); `above` as in
    class_edges. The host's reports and `autoseg predict --overlay` draw with this same function.
    """
    rgb = (np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image).astype(np.float32)
    col = np.asarray(pal, dtype=np.uint8)[ids]
    tint = np.where(col.any(axis=2, keepdims=True), alpha, 0.0).astype(np.float32)
    mixed = (1 - tint) * rgb + tint * col.astype(np.float32)
    edge = class_edges(ids, above) & col.any(axis=2)
    mixed[edge] = col[edge]
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- model


class ModelInfo:
    def __init__(self, classes: List[str], mean: Tuple[float, ...], std: Tuple[float, ...], tile: int,
                 multiple: int, class_map: Optional[Dict[str, Any]], width: Optional[int]) -> None:
        self.classes, self.mean, self.std, self.tile = classes, mean, std, tile
        self.multiple, self.class_map, self.width = multiple, class_map, width


def model_info(path: str, meta: Dict[str, str], input_channels: Any) -> ModelInfo:
    """Check the metadata autoseg's export writes; every fault is one line naming the key."""
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise PredictError(f"{path}: metadata lacks {', '.join(missing)}; pass a model exported by autoseg "
                           "(RUN/best/model.onnx or `autoseg export`)")

    def bad(key: str, problem: str) -> PredictError:
        return PredictError(f"{path}: metadata {key!r} {problem}; export the model again with `autoseg export`")

    def load(key: str) -> Any:
        try:
            return json.loads(meta[key])
        except ValueError:
            raise bad(key, f"is not JSON ({meta[key][:40]!r})") from None

    def numbers(key: str) -> Tuple[float, ...]:
        v = load(key)
        if not isinstance(v, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            raise bad(key, f"must be a list of numbers, got {meta[key][:40]!r}")
        if not all(math.isfinite(x) for x in v):
            raise bad(key, f"must hold finite numbers, got {meta[key][:40]!r}")
        return tuple(float(x) for x in v)

    def positive(key: str, default: Optional[str] = None) -> int:
        raw = meta.get(key, default) or ""
        if not re.fullmatch(r"\s*[0-9]+\s*", raw) or int(raw) < 1:
            raise bad(key, f"must be a positive whole number, got {raw[:40]!r}")
        return int(raw)

    classes = load("classes")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes) or len(classes) < 2:
        raise bad("classes", f"must be a list of two or more class names, got {meta['classes'][:40]!r}")
    mean, std = numbers("mean"), numbers("std")
    if len(mean) not in (1, 3):
        raise bad("mean", f"must hold 1 (gray) or 3 (RGB) values, got {len(mean)}")
    if len(std) != len(mean):
        raise bad("std", f"must hold as many values as mean ({len(mean)}), got {len(std)}")
    if not all(s > 0 for s in std):
        raise bad("std", f"must be positive, got {list(std)}")
    if isinstance(input_channels, int) and input_channels != len(mean):
        raise bad("mean", f"has {len(mean)} value(s) but the net takes {input_channels} channel(s)")
    tile, multiple = positive("tile"), positive("input_multiple", "1")
    if tile % multiple:
        raise bad("tile", f"{tile} is not a multiple of input_multiple {multiple}")
    cmap = None
    if "class_map" in meta:
        cmap = load("class_map")
        ok = isinstance(cmap, dict) and isinstance(cmap.get("names"), list) and len(cmap["names"]) == len(classes)
        cmap = cmap if ok and _class_map_ok(cmap) else None
    return ModelInfo(classes, mean, std, tile, multiple, cmap, _first_width(meta.get("arch")))


def _class_map_ok(cmap: Dict[str, Any]) -> bool:
    k = len(cmap["names"])
    values, colors = cmap.get("values"), cmap.get("colors")
    if values is not None:
        return isinstance(values, list) and len(values) == k and all(isinstance(v, int) and v >= 0 for v in values)
    return (isinstance(colors, list) and len(colors) >= k
            and all(isinstance(c, list) and len(c) == 3 and all(isinstance(x, int) for x in c) for c in colors))


def _first_width(arch: Optional[str]) -> Optional[int]:
    """Channels of the first level from the metadata's arch (a key like k3-3_c16-64_... or a JSON dict)."""
    if not arch:
        return None
    try:
        return int(json.loads(arch)["channels"][0])
    except (ValueError, TypeError, KeyError, IndexError):
        pass
    m = re.search(r"_c(\d+)", arch)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------- inference


def stride_for(tile: int, overlap: float) -> int:
    """Step between window starts: `tile * (1 - overlap)`, rounded, at least 1 (as autoseg.tiles)."""
    if not 0.0 <= overlap < 1.0 or tile < 1:
        raise ValueError(f"windows need 0 <= overlap < 1 and tile >= 1, got overlap={overlap}, tile={tile}")
    return max(1, round(tile * (1.0 - overlap)))


def window_starts(length: int, tile: int, stride: int) -> List[int]:
    """Start offsets along one axis; the last one is `length - tile`, so the border is covered."""
    if length <= tile:
        return [0]
    last = length - tile
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)
    return starts


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """HWC uint8 -> CHW float32 as `(image/255 - mean) / std` per channel."""
    m = np.asarray(mean, np.float32)[:, None, None]
    s = np.asarray(std, np.float32)[:, None, None]
    x = image.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray((x - m) / s)


def pad_mode(h: int, w: int, hp: int, wp: int) -> str:
    """Reflect when the image is big enough, else zeros (= the mean)."""
    return "reflect" if hp - h < h and wp - w < w else "constant"


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def predict_whole(run: RunFn, x: np.ndarray, multiple: int) -> np.ndarray:
    """CHW -> KHW logits from one pass over the image padded (bottom/right) to a multiple of `multiple`."""
    _, h, w = x.shape
    hp, wp = _round_up(h, multiple), _round_up(w, multiple)
    if (hp, wp) != (h, w):
        x = np.pad(x, ((0, 0), (0, hp - h), (0, wp - w)), mode=pad_mode(h, w, hp, wp))
    return run(x[None])[0, :, :h, :w]


_WEIGHTS: Dict[int, np.ndarray] = {}


def gaussian_weights(tile: int) -> np.ndarray:
    """(tile, tile) float32 importance map, read-only: 1 at the centre, sigma = tile/8 (nnU-Net's choice)."""
    if tile not in _WEIGHTS:
        sigma = tile / 8
        c = np.arange(tile, dtype=np.float64) - (tile - 1) / 2
        g = np.exp(-(c**2) / (2 * sigma**2))
        w = np.outer(g, g)
        w /= w.max()
        # Corners of large tiles underflow to ~0; keep every pixel's weight positive.
        w = np.maximum(w, w[w > 0].min()).astype(np.float32)
        w.flags.writeable = False
        _WEIGHTS[tile] = w
    return _WEIGHTS[tile]


def rows_within(row_bytes: int) -> int:
    """Rows of `row_bytes` each that fit BAND_BYTES (at least one)."""
    return max(1, BAND_BYTES // max(1, row_bytes))


def _ring(start: int, stop: int, size: int) -> List[Tuple[slice, slice]]:
    """Rows start..stop (at most `size` of them) of a ring buffer of `size` rows: (buffer rows, offsets)."""
    r, n = start % size, stop - start
    first = min(n, size - r)
    parts = [(slice(r, r + first), slice(0, first))]
    if n > first:
        parts.append((slice(0, n - first), slice(first, n)))
    return parts


def window_bands(run: RunFn, rows: Callable[[int, int], np.ndarray], h: int, w: int, tile: int, overlap: float,
                 batch: int, weights: Optional[np.ndarray] = None) -> Iterator[Tuple[int, np.ndarray]]:
    """Blended window logits of an (h, w) image as (y0, K x R x W logits) bands of rows, top to bottom.

    The one implementation of moving windows: autoseg.infer (the host's predict and eval) calls it too.
    Windows of tile x tile (snapped to the borders, `overlap` apart) run `batch` at a time, in row-major
    order; each pixel's logits are the `weights`-weighted mean (default: Gaussian) over the windows that
    cover it. The sums live in a ring of `tile` rows: the rows above the next window row are final, so
    they are divided, yielded (at most BAND_BYTES of logits at a time) and their slots reused. Memory is
    K x tile x W floats whatever h, and every pixel sums the same terms in the same order as one
    whole-image accumulator would. `rows(y0, y1)` gives rows y0..y1 of the normalised CHW image; it is
    called once per window row (once in all when the image is shorter than a tile). Smaller images are
    padded (see pad_mode) and cropped back.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got batch={batch}")
    hp, wp = max(h, tile), max(w, tile)
    mode = pad_mode(h, w, hp, wp)
    wmap = gaussian_weights(tile) if weights is None else np.asarray(weights, np.float32)
    stride = stride_for(tile, overlap)
    xs = window_starts(wp, tile, stride)

    def band(y: int) -> np.ndarray:
        x = rows(0, h) if h < tile else rows(y, y + tile)
        ph = tile - x.shape[1]
        return x if ph == 0 and wp == w else np.pad(x, ((0, 0), (0, ph), (0, wp - w)), mode=mode)

    def windows() -> Iterator[Tuple[int, int, np.ndarray]]:
        for y in window_starts(hp, tile, stride):
            b = band(y)
            for x0 in xs:
                yield y, x0, b[:, :, x0 : x0 + tile]

    acc: Optional[np.ndarray] = None  # (K, tile, wp): padded row r lives in ring row r % tile
    wsum = np.zeros((tile, wp), np.float32)
    done = 0  # rows above this were yielded

    def emit(acc: np.ndarray, stop: int) -> Iterator[Tuple[int, np.ndarray]]:
        step = rows_within(acc.shape[0] * w * 4)  # what is handed out stays small beside the ring
        for y0 in range(done, min(stop, h), step):
            y1 = min(y0 + step, stop, h)
            out = np.empty((acc.shape[0], y1 - y0, w), np.float32)
            for buf, dst in _ring(y0, y1, tile):
                np.divide(acc[:, buf, :w], wsum[buf, :w], out=out[:, dst])
            yield y0, out
        for buf, _ in _ring(done, stop, tile):
            acc[:, buf] = 0
            wsum[buf] = 0

    it = windows()
    while True:
        chunk = list(islice(it, batch))
        if not chunk:
            break
        out = run(np.stack([win for _, _, win in chunk]))
        if acc is None:
            acc = np.zeros((out.shape[1], tile, wp), np.float32)
        for i, (y, x0, _) in enumerate(chunk):  # zip(strict=) is Python 3.10
            o = out[i]
            if y > done:  # a new window row: the rows above it are final
                for item in emit(acc, y):
                    yield item
                done = y
            weighted = o * wmap
            for buf, src in _ring(y, y + tile, tile):
                acc[:, buf, x0 : x0 + tile] += weighted[:, src]
                wsum[buf, x0 : x0 + tile] += wmap[src]
    if acc is not None:
        for item in emit(acc, hp):
            yield item


def whole_pixel_limit(in_channels: int, classes: int, width: Optional[int] = None) -> int:
    """The most pixels "auto" runs in one whole-image pass, for a net with `width` first-level channels.

    One onnxruntime pass holds about 5-6 full-resolution activations of the first level (measured on
    2-4 level U-Nets, 8-64 channels), plus input and logits: 8 are counted, to stay on the safe side.
    """
    per_pixel = 4 * (in_channels + 2 * classes + 8 * (width or WIDTH_GUESS))
    return max(1, min(WHOLE_MAX_PIXELS, WHOLE_MAX_BYTES // per_pixel))


def label_dtype(num_classes: int) -> Any:
    """The smallest unsigned dtype that holds class ids 0..num_classes-1."""
    return np.uint8 if num_classes <= 256 else np.uint16 if num_classes <= 65536 else np.uint32


def predict_labels(run: RunFn, image: np.ndarray, info: ModelInfo, mode: str, overlap: float, batch: int,
                   limit: int) -> Iterator[Tuple[int, np.ndarray]]:
    """(y0, R x W class ids) bands of an HWC uint8 image."""
    h, w = image.shape[:2]
    whole = mode == "whole" or (mode == "auto" and h * w <= limit)
    if whole:
        bands: Iterator[Tuple[int, np.ndarray]] = iter(
            [(0, predict_whole(run, normalize(image, info.mean, info.std), info.multiple))])
    else:
        bands = window_bands(run, lambda y0, y1: normalize(image[y0:y1], info.mean, info.std), h, w, info.tile,
                             overlap, batch)
    for y0, logits in bands:
        yield y0, argmax_classes(logits)


def argmax_classes(logits: np.ndarray) -> np.ndarray:
    """K x R x W logits -> R x W class ids (label_dtype), a few rows at a time: numpy's argmax over the first
    axis copies the whole array first."""
    k, r, w = logits.shape
    out = np.empty((r, w), label_dtype(k))
    step = rows_within(k * w * logits.itemsize)
    for y0 in range(0, r, step):
        out[y0 : y0 + step] = logits[:, y0 : y0 + step].argmax(axis=0)
    return out


# ---------------------------------------------------------------------------------------------- images


def list_images(folder: str) -> List[str]:
    if not os.path.isdir(folder):
        what = "does not exist" if not os.path.exists(folder) else "is not a folder"
        raise PredictError(f"{folder}: images folder {what}; give the folder of images to label")
    names = sorted(n for n in os.listdir(folder)
                   if os.path.splitext(n)[1].lower() in IMAGE_EXTS and not n.startswith("."))
    files = [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]
    if not files:
        raise PredictError(f"{folder}: no images found (looked for {', '.join(IMAGE_EXTS)})")
    stems = [os.path.splitext(os.path.basename(p))[0] for p in files]
    twins = sorted({s for s in stems if stems.count(s) > 1})
    if twins:
        raise PredictError(f"{folder}: {twins[0]!r} names more than one image; their masks would overwrite each "
                           "other: rename or remove one")
    return files


def _pillow() -> Any:
    try:
        from PIL import Image, ImageOps

        return Image, ImageOps
    except ImportError:
        return None


def read_image(path: str, channels: int) -> np.ndarray:
    """(H, W, channels) uint8, converted as autoseg.data.read_image converts (alpha dropped, 16 bit scaled,
    palette to RGB, ITU-R 601 luma for gray nets, EXIF orientation applied)."""
    ext = os.path.splitext(path)[1].lower()
    pil = _pillow()
    try:
        if pil is not None:
            a = _read_pillow(path, pil)
        elif ext == ".png":
            with open(path, "rb") as f:
                a = read_png(f)
        elif ext in (".pgm", ".ppm"):
            with open(path, "rb") as f:
                a = read_pnm(f)
        else:
            raise PredictError(f"{path}: reading {ext} needs Pillow (`python3 -m pip install pillow`), "
                               "or convert the images to PNG")
    except PredictError:
        raise
    except (OSError, ValueError, EOFError, zlib.error, struct.error, IndexError) as e:
        raise PredictError(f"{path}: cannot read the image ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                           "re-save it as PNG") from None
    if channels == 3 and a.shape[2] == 1:
        return np.repeat(a, 3, axis=2)
    if channels == 1 and a.shape[2] == 3:
        return _luma(a)
    return a


def _luma(a: np.ndarray) -> np.ndarray:
    return np.rint(a @ np.array([0.299, 0.587, 0.114])).clip(0, 255).astype(np.uint8)[..., None]


def _scale16(a: np.ndarray) -> np.ndarray:
    a = np.clip(a, 0, 65535).astype(np.uint32)
    return ((a * 255 + 32767) // 65535).astype(np.uint8)


def _read_pillow(path: str, pil: Any) -> np.ndarray:
    Image, ImageOps = pil
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    with Image.open(path) as im:
        if im.width * im.height > MAX_PIXELS:
            raise PredictError(f"{path}: {im.width}x{im.height} pixels is more than this agent reads ({MAX_PIXELS})")
        if im.getexif().get(0x0112, 1) != 1:
            im = ImageOps.exif_transpose(im)
        mode = im.mode
        if mode == "RGB":
            return np.asarray(im)
        if mode == "L":
            return np.asarray(im)[..., None]
        if mode in ("1", "LA", "La"):
            return np.asarray(im.convert("L"))[..., None]
        if mode.startswith("I"):
            return _scale16(np.asarray(im).astype(np.int64))[..., None]
        if mode == "F":
            f = np.nan_to_num(np.asarray(im, dtype=np.float32))
            f = f * np.float32(255.0 if f.max(initial=0) <= 1.0 else 1.0)
            return np.clip(np.rint(f), 0, 255).astype(np.uint8)[..., None]
        return np.asarray(im.convert("RGB"))


_PNG_SIG = b"\x89PNG\r\n\x1a\n"
# Adam7 passes as (first row, first column, row step, column step)
_ADAM7 = ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1))


def read_png(f: IO[bytes]) -> np.ndarray:
    """A PNG as (H, W, 1 or 3) uint8 with the standard library (zlib): every colour type and bit depth."""
    if f.read(8) != _PNG_SIG:
        raise ValueError("not a PNG file")
    header = None
    palette = None
    idat: List[bytes] = []
    orientation = 1
    while True:
        length, kind = struct.unpack(">I4s", f.read(8))
        data = f.read(length)
        f.read(4)  # crc
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", data)
        elif kind == b"PLTE":
            palette = np.frombuffer(data, np.uint8).reshape(-1, 3)
        elif kind == b"IDAT":
            idat.append(data)
        elif kind == b"eXIf":
            orientation = _exif_orientation(data)
        elif kind == b"IEND" or not kind:
            break
    if header is None:
        raise ValueError("no IHDR chunk")
    w, h, depth, colour, _, _, interlace = header
    if w * h > MAX_PIXELS:
        raise ValueError(f"{w}x{h} pixels is more than this agent reads ({MAX_PIXELS})")
    samples = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour)
    if samples is None or depth not in (1, 2, 4, 8, 16):
        raise ValueError(f"unsupported PNG colour type {colour} / bit depth {depth}")
    raw = zlib.decompress(b"".join(idat))
    if interlace:
        a = np.zeros((h, w, samples), np.uint16 if depth == 16 else np.uint8)
        pos = 0
        for y0, x0, dy, dx in _ADAM7:
            ph, pw = len(range(y0, h, dy)), len(range(x0, w, dx))
            if ph and pw:
                n = ph * (1 + _row_bytes(pw, samples, depth))
                a[y0::dy, x0::dx] = _decode_pass(raw[pos : pos + n], ph, pw, samples, depth)
                pos += n
    else:
        a = _decode_pass(raw, h, w, samples, depth)
    if colour == 3:
        if palette is None:
            raise ValueError("palette PNG without a PLTE chunk")
        out = palette[np.minimum(a[..., 0], len(palette) - 1)]
    elif colour in (0, 4):
        g = a[..., :1]
        if depth == 16 and colour == 0:
            out = _scale16(g.astype(np.int64))  # Pillow reads 16-bit gray as I;16
        elif depth == 16:
            out = (g >> 8).astype(np.uint8)
        elif depth < 8:
            out = (g.astype(np.uint16) * (255 // (2**depth - 1))).astype(np.uint8)
        else:
            out = g
    else:
        rgb = a[..., :3]
        out = (rgb >> 8).astype(np.uint8) if depth == 16 else rgb  # Pillow keeps the high byte of 16-bit RGB
    return _orient(np.ascontiguousarray(out), orientation)


def _row_bytes(w: int, samples: int, depth: int) -> int:
    return (w * samples * depth + 7) // 8


def _decode_pass(raw: bytes, h: int, w: int, samples: int, depth: int) -> np.ndarray:
    rb = _row_bytes(w, samples, depth)
    bpp = max(1, samples * depth // 8)
    rows = np.frombuffer(raw, np.uint8, count=h * (rb + 1)).reshape(h, rb + 1)
    data = _unfilter(rows[:, 0], rows[:, 1:], bpp)
    if depth == 16:
        return data.view(">u2").reshape(h, w, samples).astype(np.uint16)
    if depth == 8:
        return data.reshape(h, w, samples)
    bits = np.unpackbits(data, axis=1).reshape(h, -1, depth)
    vals = np.zeros(bits.shape[:2], np.uint8)
    for i in range(depth):
        vals = (vals << 1) | bits[:, :, i]
    return vals[:, :w, None]


def _unfilter(kinds: np.ndarray, rows: np.ndarray, bpp: int) -> np.ndarray:
    """Undo PNG row filters. None/Sub/Up rows go a row at a time; Average and Paeth, whose every byte needs
    its decoded left neighbour, go along anti-diagonals of pixels (all independent), so no loop is per pixel."""
    if kinds.size and int(kinds.max()) > 4:
        raise ValueError(f"bad PNG filter type {int(kinds.max())}")
    h, rb = rows.shape
    if not np.isin(kinds, (3, 4)).any():
        out = np.empty_like(rows)
        prev = np.zeros(rb, np.uint8)
        for y in range(h):
            k, r = int(kinds[y]), rows[y]
            if k == 0:
                out[y] = r
            elif k == 2:
                np.add(r, prev, out=out[y])
            else:  # Sub: a running sum per byte of the pixel, modulo 256 (rows hold whole pixels)
                out[y] = np.cumsum(r.reshape(-1, bpp), axis=0, dtype=np.uint8).reshape(-1)
            prev = out[y]
        return out
    npx = -(-rb // bpp)
    filt = np.zeros((h, npx * bpp), np.int16)
    filt[:, :rb] = rows
    filt = filt.reshape(h, npx, bpp)
    dec = np.zeros((h + 1, npx + 1, bpp), np.int16)  # row 0 and column 0 are the zeros outside the image
    kind = kinds.astype(np.int16)
    for d in range(h + npx - 1):
        r = np.arange(max(0, d - npx + 1), min(h, d + 1))
        p = d - r
        x = filt[r, p]
        a, b, c = dec[r + 1, p], dec[r, p + 1], dec[r, p]
        pa, pb, pc = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
        paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        k = kind[r][:, None]
        pred = np.where(k == 1, a, np.where(k == 2, b, np.where(k == 3, (a + b) >> 1, np.where(k == 4, paeth, 0))))
        dec[r + 1, p + 1] = (x + pred) & 255
    return dec[1:, 1:].reshape(h, -1)[:, :rb].astype(np.uint8)


def _exif_orientation(data: bytes) -> int:
    """The Orientation tag (0x0112) of an EXIF block (TIFF layout); 1 when absent or unreadable."""
    try:
        order = {b"II": "<", b"MM": ">"}[data[:2]]
        (ifd,) = struct.unpack(order + "I", data[4:8])
        (count,) = struct.unpack(order + "H", data[ifd : ifd + 2])
        for i in range(count):
            tag, _, _, value = struct.unpack(order + "HHI4s", data[ifd + 2 + 12 * i : ifd + 14 + 12 * i])
            if tag == 0x0112:
                return int(struct.unpack(order + "H", value[:2])[0])
    except (KeyError, struct.error):
        pass
    return 1


def _orient(a: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation as Pillow's ImageOps.exif_transpose does."""
    t = {
        2: lambda x: x[:, ::-1],
        3: lambda x: x[::-1, ::-1],
        4: lambda x: x[::-1],
        5: lambda x: x.transpose(1, 0, 2),
        6: lambda x: np.rot90(x, -1),
        7: lambda x: x.transpose(1, 0, 2)[::-1, ::-1],
        8: lambda x: np.rot90(x, 1),
    }.get(orientation)
    return a if t is None else np.ascontiguousarray(t(a))


def read_pnm(f: IO[bytes]) -> np.ndarray:
    """Binary PGM (P5) or PPM (P6), 8 or 16 bit."""
    data = f.read()
    fields: List[bytes] = []
    pos = 0
    while len(fields) < 4:
        m = re.compile(rb"\s*(#[^\n]*\n\s*)*(\S+)").match(data, pos)
        if m is None:
            raise ValueError("truncated PGM/PPM header")
        fields.append(m.group(2))
        pos = m.end()
    magic, w, h, top = fields[0], int(fields[1]), int(fields[2]), int(fields[3])
    if magic not in (b"P5", b"P6") or not 0 < top < 65536:
        raise ValueError("only binary PGM (P5) and PPM (P6) are read")
    c = 1 if magic == b"P5" else 3
    pix = np.frombuffer(data, ">u2" if top > 255 else np.uint8, count=w * h * c, offset=pos + 1).reshape(h, w, c)
    if top > 255:
        return _scale16(pix.astype(np.int64) * 65535 // top)
    return pix.astype(np.uint8) if top == 255 else (pix.astype(np.uint16) * 255 // top).astype(np.uint8)


class PngRows:
    """A PNG written a band of rows at a time (8/16-bit gray or 8-bit RGB): no full-size copy of the mask.

    Standard library only; autoseg predict writes its masks with it too. Every row uses the Up filter
    (its difference to the row above), so label runs repeated down the image compress to zeros, as with
    Pillow's adaptive filters.
    """

    def __init__(self, f: IO[bytes], width: int, height: int, channels: int, dtype: Any) -> None:
        self._f, self._w, self._h, self._c = f, width, height, channels
        self._dtype = np.dtype(dtype).newbyteorder(">")  # PNG samples are big-endian
        self._rows = 0
        self._prev: Optional[np.ndarray] = None
        self._z = zlib.compressobj(6)
        f.write(_PNG_SIG)
        colour = {1: 0, 3: 2}[channels]
        self._chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8 * self._dtype.itemsize, colour, 0, 0, 0))

    def _chunk(self, kind: bytes, data: bytes) -> None:
        self._f.write(struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data)))

    def write(self, band: np.ndarray) -> None:
        """Append rows: (R, W) gray or (R, W, 3) RGB."""
        expect = (self._w,) if self._c == 1 else (self._w, 3)
        if band.shape[1:] != expect or self._rows + band.shape[0] > self._h:
            raise ValueError(f"band {band.shape} does not fit a {self._h}x{self._w}x{self._c} PNG at row {self._rows}")
        raw = np.ascontiguousarray(band, dtype=self._dtype).view(np.uint8).reshape(band.shape[0], -1)
        up = np.empty((raw.shape[0], raw.shape[1] + 1), np.uint8)
        up[:, 0] = 2  # filter type Up
        np.subtract(raw[1:], raw[:-1], out=up[1:, 1:])  # uint8 arithmetic wraps modulo 256, as PNG's does
        np.subtract(raw[0], self._prev if self._prev is not None else 0, out=up[0, 1:], casting="unsafe")
        self._prev = raw[-1].copy()
        self._rows += band.shape[0]
        data = self._z.compress(up.tobytes())
        if data:
            self._chunk(b"IDAT", data)

    def close(self) -> None:
        if self._rows != self._h:
            raise ValueError(f"PNG got {self._rows} of its {self._h} rows")
        self._chunk(b"IDAT", self._z.flush())
        self._chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------- output


def palette(num_classes: int, colors: Optional[Sequence[Sequence[int]]] = None) -> np.ndarray:
    """(K, 3) uint8 class colours: the dataset's own, else autoseg.visual's fixed set."""
    if colors is not None and len(colors) >= num_classes:
        return np.asarray(colors[:num_classes], dtype=np.uint8)
    base = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                     [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
                     [0, 128, 128]], dtype=np.uint8)
    extra = np.random.default_rng(7).integers(40, 255, size=(max(0, num_classes - len(base)), 3), dtype=np.uint8)
    return np.concatenate([base, extra])[:num_classes]


def mask_format(info: ModelInfo, values: str) -> Tuple[int, Any]:
    """(channels, dtype) of the masks: class ids, or the training masks' gray values / colours."""
    cmap, k = info.class_map, len(info.classes)
    if values == "training" and cmap is not None:
        if cmap.get("values") is None:
            return 3, np.uint8
        return 1, np.uint8 if max(cmap["values"]) < 256 else np.uint16
    return 1, label_dtype(k) if k <= 65536 else np.uint32


def encode_mask(ids: np.ndarray, info: ModelInfo, values: str, dtype: Any) -> np.ndarray:
    cmap = info.class_map
    if values != "training" or cmap is None:
        return ids.astype(dtype)
    if cmap.get("values") is None:
        return np.asarray(cmap["colors"], dtype=np.uint8)[ids]
    return np.asarray(cmap["values"])[ids].astype(dtype)


def _atomic_open(path: str) -> Tuple[IO[bytes], str]:
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}.tmp")
    return open(tmp, "wb"), tmp


def _finish(f: IO[bytes], tmp: str, path: str) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- command


def predict_folder(model: str, images: str, out: str, mode: str = "auto", overlap: float = 0.5, batch: int = 8,
                   values: str = "ids", write_overlay: bool = False, threads: Optional[int] = None,
                   providers: Sequence[str] = ("CPUExecutionProvider",),
                   log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Label every image of `images`, writing `<stem>.png` (and `<stem>_overlay.png`) to `out`; the summary."""
    from edge_agent import __version__
    from edge_agent.bench import ProviderUnavailable, make_session

    if mode not in MODES:
        raise PredictError(f"--mode: must be one of {', '.join(MODES)}, got {mode!r}")
    if not 0.0 <= overlap < 1.0:
        raise PredictError(f"--overlap: must be in [0, 1), got {overlap}")
    if batch < 1:
        raise PredictError(f"--batch: must be >= 1, got {batch}")
    if values not in VALUES:
        raise PredictError(f"--values: must be one of {', '.join(VALUES)}, got {values!r}")
    if not os.path.isfile(model):
        raise PredictError(f"{model}: no such file; give the path of the model.onnx exported by autoseg")
    files = list_images(images)
    if _pillow() is None:  # refused before any work, not after half the folder
        other = [p for p in files if os.path.splitext(p)[1].lower() not in (".png", ".pgm", ".ppm")]
        if other:
            more = f" and {len(other) - 1} more" if len(other) > 1 else ""
            raise PredictError(f"{other[0]}{more}: reading {os.path.splitext(other[0])[1].lower()} needs Pillow "
                               "(`python3 -m pip install pillow`), or convert the images to PNG")
    try:
        sess = make_session(model, threads, list(providers))
    except ProviderUnavailable as e:
        raise PredictError(str(e)) from None
    except Exception as e:  # onnxruntime raises its own types
        reason = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        raise PredictError(f"{model}: onnxruntime cannot load it ({reason}); export the model again") from None
    inp = sess.get_inputs()[0]
    dims = list(inp.shape)
    info = model_info(model, dict(sess.get_modelmeta().custom_metadata_map), dims[1] if len(dims) == 4 else None)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise PredictError(f"{out}: cannot create the output folder ({e.strerror}); choose another") from None

    name = inp.name

    def run(x: np.ndarray) -> np.ndarray:
        return sess.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    k, channels = len(info.classes), len(info.mean)
    limit = whole_pixel_limit(channels, k, info.width)
    fmt = mask_format(info, values)
    pal = palette(k, info.class_map.get("colors") if info.class_map else None)
    counts = np.zeros(k, np.int64)
    per_image = []
    t_start = time.perf_counter()
    infer_s = 0.0
    pixels = 0
    for path in files:
        stem = os.path.splitext(os.path.basename(path))[0]
        image = read_image(path, channels)
        h, w = image.shape[:2]
        shown = np.empty((h, w, 3), np.uint8) if write_overlay else None
        shown_ids_above = None  # the last row of the band before: borders across bands as on the whole image
        target = os.path.join(out, stem + ".png")
        f, tmp = _atomic_open(target)
        try:
            png = PngRows(f, w, h, *fmt)
            t0 = time.perf_counter()
            spent = 0.0
            for y0, ids in predict_labels(run, image, info, mode, overlap, batch, limit):
                spent += time.perf_counter() - t0
                if int(ids.max(initial=0)) >= k:
                    raise PredictError(f"{model}: the net outputs more classes than its metadata 'classes' names "
                                       f"({k}); export the model again")
                counts += np.bincount(ids.ravel(), minlength=k)
                png.write(encode_mask(ids, info, values, fmt[1]))
                if shown is not None:
                    above = shown_ids_above if y0 else None
                    shown[y0 : y0 + ids.shape[0]] = overlay(image[y0 : y0 + ids.shape[0]], ids, pal, above=above)
                    shown_ids_above = ids[-1].copy() if len(ids) else shown_ids_above
                t0 = time.perf_counter()
            png.close()
            _finish(f, tmp, target)
        except BaseException:
            f.close()
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        written = [os.path.basename(target)]
        if shown is not None:
            over = os.path.join(out, stem + "_overlay.png")
            f, tmp = _atomic_open(over)
            png = PngRows(f, w, h, 3, np.uint8)
            png.write(shown)
            png.close()
            _finish(f, tmp, over)
            written.append(os.path.basename(over))
        infer_s += spent
        pixels += h * w
        per_image.append({"image": os.path.basename(path), "height": h, "width": w, "infer_s": spent,
                          "files": written})
        if log is not None:
            log(f"{os.path.basename(path)}: {w}x{h}, {spent * 1000:.0f} ms")
        del image, shown
    total_s = time.perf_counter() - t_start
    share = counts / max(1, int(counts.sum()))
    mpx = pixels / 1e6
    return {
        "edge_agent_predict": __version__,
        "model": model,
        "images": len(files),
        "mode": mode,
        "values": values,
        "classes": info.classes,
        "providers_used": list(sess.get_providers()),
        "megapixels": mpx,
        "total_s": total_s,
        "infer_s": infer_s,
        "images_per_s": len(files) / total_s if total_s > 0 else None,
        "ms_per_megapixel": 1000.0 * infer_s / mpx if mpx > 0 else None,
        "class_share": {c: float(share[i]) for i, c in enumerate(info.classes)},
        "per_image": per_image,
    }
