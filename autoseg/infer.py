"""Full-image inference: one prediction logic for torch and onnxruntime, whole-image or windowed.

A `RunFn` maps float32 NCHW to logits NCHW. `predict_whole` runs the image once (padded to the
net's size multiple); `predict_windows` runs overlapping tiles in batches and blends them with a
Gaussian importance map (sigma = tile/8, as nnU-Net), so window borders, where the net saw
padding instead of context, count least. `predict_bands` / `predict_labels` give the same results a
band of rows at a time, from the uint8 image, so memory is bounded by the window, not by the image.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from autoseg.errors import InputError
from autoseg.tiles import stride_for, window_starts

if TYPE_CHECKING:
    import torch

    from autoseg.data import Dataset, ImageRows

log = logging.getLogger(__name__)

RunFn = Callable[[np.ndarray], np.ndarray]  # float32 NCHW -> logits NCHW
MODES = ("auto", "whole", "window")
# "auto" runs the whole image at once while that is cheap, and windows beyond, to bound memory: up to this
# many pixels, and up to WHOLE_MAX_BYTES of estimated activations (whole_pixel_limit).
WHOLE_MAX_PIXELS = 2048 * 2048
WHOLE_MAX_BYTES = 512 * 2**20
WIDTH_GUESS = 64  # first-level channels assumed when the net's are not known (the default space's widest)
BAND_BYTES = 8 * 2**20  # logits handed out (and reduced by argmax) at a time; the ring of window sums is apart


# ---------------------------------------------------------------- runners


def torch_runner(model: torch.nn.Module) -> RunFn:
    """Run `model` in eval mode without autograd, on the device its parameters live on."""
    import torch

    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
            return model(t).float().cpu().numpy()

    return run


def ort_runner(model: Path | bytes, threads: int | None = None) -> RunFn:
    """An onnxruntime CPU session; `threads` sets intra-op threads (None: onnxruntime's default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        opts.intra_op_num_threads = threads
    src = model if isinstance(model, bytes) else str(model)
    try:
        sess = ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # a file of the user's (damaged, external data outside its folder, ...): one line
        if isinstance(model, bytes):
            raise
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise InputError(f"{model}: onnxruntime cannot load it ({reason}); export the model again") from None
    name = sess.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return sess.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    return run


# ---------------------------------------------------------------- prediction


def _check_channels(image: np.ndarray | ImageRows, mean: Sequence[float], std: Sequence[float]) -> None:
    channels = 1 if image.ndim == 2 else image.shape[2] if image.ndim == 3 else -1
    if channels != len(mean) or len(std) != len(mean):
        raise InputError(
            f"image: shape {image.shape} does not match {len(mean)} normalisation channel(s); "
            "use images with the channel count the model was trained on"
        )


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """HWC (or HW) uint8 -> CHW float32 as `(image/255 - mean) / std` per channel."""
    _check_channels(image, mean, std)
    img = image[..., None] if image.ndim == 2 else image
    m = np.asarray(mean, np.float32)[:, None, None]
    s = np.asarray(std, np.float32)[:, None, None]
    x = np.empty((img.shape[2], *img.shape[:2]), np.float32)
    x[...] = img.transpose(2, 0, 1)
    x /= np.float32(255.0)  # in place: one float32 copy of the pixels, not four
    x -= m
    x /= s
    return x


def _pad_mode(h: int, w: int, hp: int, wp: int) -> str:
    """Reflect when the image is big enough, else zeros (= the mean)."""
    return "reflect" if hp - h < h and wp - w < w else "constant"


def _pad_to(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Pad CHW bottom/right to (h, w) (see _pad_mode)."""
    ph, pw = h - x.shape[1], w - x.shape[2]
    if ph == 0 and pw == 0:
        return x
    return np.pad(x, ((0, 0), (0, ph), (0, pw)), mode=_pad_mode(x.shape[1], x.shape[2], h, w))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def predict_whole(run: RunFn, x: np.ndarray, multiple: int) -> np.ndarray:
    """CHW -> KHW logits from one pass over the image padded to a multiple of `multiple`."""
    _, h, w = x.shape
    padded = _pad_to(x, _round_up(h, multiple), _round_up(w, multiple))
    return run(padded[None])[0, :, :h, :w]


@lru_cache(maxsize=8)
def gaussian_weights(tile: int) -> np.ndarray:
    """(tile, tile) float32 importance map: 1 at the centre, sigma = tile/8 (nnU-Net's choice)."""
    sigma = tile / 8
    c = np.arange(tile, dtype=np.float64) - (tile - 1) / 2
    g = np.exp(-(c**2) / (2 * sigma**2))
    w = np.outer(g, g)
    w /= w.max()
    # Corners of large tiles underflow to ~0; keep every pixel's weight positive.
    w = np.maximum(w, w[w > 0].min(), out=w).astype(np.float32)
    w.flags.writeable = False
    return w


def window_grid(h: int, w: int, tile: int, overlap: float) -> list[tuple[int, int]]:
    """(y, x) top-left corners of the windows over an (h, w) image (already at least tile x tile)."""
    stride = stride_for(tile, overlap)  # the same grid the training tiles use
    return [(int(y), int(x)) for y in window_starts(h, tile, stride) for x in window_starts(w, tile, stride)]


Rows = Callable[[int, int], np.ndarray]  # (y0, y1) -> CHW float32: rows y0..y1 of the normalised image


def _rows_within(row_bytes: int) -> int:
    """Rows of `row_bytes` each that fit BAND_BYTES (at least one)."""
    return max(1, BAND_BYTES // max(1, row_bytes))


def _ring(start: int, stop: int, size: int) -> list[tuple[slice, slice]]:
    """Rows start..stop (at most `size` of them) of a ring buffer of `size` rows: (buffer rows, offsets)."""
    r, n = start % size, stop - start
    first = min(n, size - r)
    parts = [(slice(r, r + first), slice(0, first))]
    if n > first:
        parts.append((slice(0, n - first), slice(first, n)))
    return parts


def window_bands(
    run: RunFn,
    rows: Rows,
    h: int,
    w: int,
    tile: int,
    overlap: float,
    batch: int,
    weights: np.ndarray | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Blended window logits of an (h, w) image as (y0, KxRxW logits) bands of rows, top to bottom.

    The windows of `window_grid` run `batch` at a time, in row-major order; each pixel's logits are
    the `weights`-weighted mean (default: Gaussian) over the windows that cover it. The sums live in a
    ring of `tile` rows: the rows above the next window row are final, so they are divided, yielded and
    their slots reused. Memory is K x tile x W floats whatever h, and every pixel sums the same terms
    in the same order as one whole-image accumulator would. `rows(y0, y1)` is called once per window
    row (once in all when the image is shorter than a tile); rows already yielded are never read again.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch=}")
    hp, wp = max(h, tile), max(w, tile)  # smaller images are padded, and cropped back
    mode = _pad_mode(h, w, hp, wp)
    wmap = gaussian_weights(tile) if weights is None else np.asarray(weights, np.float32)
    stride = stride_for(tile, overlap)
    xs = window_starts(wp, tile, stride).tolist()

    def band(y: int) -> np.ndarray:
        x = rows(0, h) if h < tile else rows(y, y + tile)
        ph = tile - x.shape[1]
        return x if ph == 0 and wp == w else np.pad(x, ((0, 0), (0, ph), (0, wp - w)), mode=mode)

    def windows() -> Iterator[tuple[int, int, np.ndarray]]:
        for y in window_starts(hp, tile, stride).tolist():
            b = band(y)
            for x0 in xs:
                yield y, x0, b[:, :, x0 : x0 + tile]

    acc: np.ndarray | None = None  # (K, tile, wp): padded row r lives in ring row r % tile
    wsum = np.zeros((tile, wp), np.float32)
    done = 0  # rows above this were yielded

    def emit(stop: int) -> Iterator[tuple[int, np.ndarray]]:
        assert acc is not None
        step = _rows_within(acc.shape[0] * w * 4)  # what is handed out stays small beside the ring
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
    while chunk := list(islice(it, batch)):
        out = run(np.stack([win for _, _, win in chunk]))
        if acc is None:
            acc = np.zeros((out.shape[1], tile, wp), np.float32)
        for (y, x0, _), o in zip(chunk, out, strict=True):
            if y > done:  # a new window row: the rows above it are final
                yield from emit(y)
                done = y
            weighted = o * wmap
            for buf, src in _ring(y, y + tile, tile):
                acc[:, buf, x0 : x0 + tile] += weighted[:, src]
                wsum[buf, x0 : x0 + tile] += wmap[src]
    yield from emit(hp)


def predict_windows(
    run: RunFn,
    x: np.ndarray,
    tile: int,
    overlap: float,
    batch: int,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """CHW -> KHW logits from overlapping tile x tile windows, `batch` windows per call.

    Each pixel's logits are the weighted mean over the windows that cover it; `weights` (tile, tile)
    defaults to the Gaussian map (pass np.ones for plain mean blending). Images smaller than a
    tile are padded first and cropped back. Holds K x H x W logits: label big images with
    `predict_labels`, which keeps a band of rows.
    """
    _, h, w = x.shape
    out: np.ndarray | None = None
    for y0, band in window_bands(run, lambda a, b: x[:, a:b], h, w, tile, overlap, batch, weights):
        if out is None:
            out = np.empty((band.shape[0], h, w), np.float32)
        out[:, y0 : y0 + band.shape[1]] = band
    assert out is not None
    return out


def whole_pixel_limit(in_channels: int, classes: int, width: int | None = None) -> int:
    """The most pixels "auto" runs in one whole-image pass, for a net with `width` first-level channels.

    One onnxruntime pass holds about 5-6 full-resolution activations of the first level (measured on
    2-4 level U-Nets, 8-64 channels), plus input and logits: 8 are counted, to stay on the safe side.
    """
    per_pixel = 4 * (in_channels + 2 * classes + 8 * (width or WIDTH_GUESS))
    return max(1, min(WHOLE_MAX_PIXELS, WHOLE_MAX_BYTES // per_pixel))


def _whole_mode(mode: str, pixels: int, limit: int | None) -> bool:
    if mode not in MODES:
        raise InputError(f"eval.mode: must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        return pixels <= (WHOLE_MAX_PIXELS if limit is None else limit)
    if mode == "whole" and limit is not None and pixels > limit:
        log.warning("whole-image mode on %.1f Mpx: memory grows with the image; --eval-mode window bounds it",
                    pixels / 1e6)
    return mode == "whole"


def predict(
    run: RunFn, x: np.ndarray, mode: str, tile: int, overlap: float, batch: int, multiple: int
) -> np.ndarray:
    """Dispatch on `mode` ("auto", "whole" or "window"): CHW -> KHW logits (auto: whole up to WHOLE_MAX_PIXELS)."""
    if _whole_mode(mode, x.shape[-2] * x.shape[-1], None):
        return predict_whole(run, x, multiple)
    return predict_windows(run, x, tile, overlap, batch)


def label_dtype(num_classes: int) -> type[np.unsignedinteger]:
    """The smallest unsigned dtype that holds class ids 0..num_classes-1."""
    return np.uint8 if num_classes <= 256 else np.uint16 if num_classes <= 65536 else np.uint32


def predict_bands(
    run: RunFn,
    image: np.ndarray | ImageRows,
    mean: Sequence[float],
    std: Sequence[float],
    mode: str,
    tile: int,
    overlap: float,
    batch: int,
    multiple: int,
    whole_max_pixels: int | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """(y0, KxRxW logits) bands of rows of an HWC (or HW) uint8 image, normalised a band at a time.

    `image` is an array, or anything with its `shape`, `ndim` and row slices (autoseg.data.ImageRows).
    "whole" yields one band (all rows, one pass); "window" yields a band per window row, holding
    K x tile x W floats at a time; "auto" is "whole" up to `whole_max_pixels` (see whole_pixel_limit;
    default WHOLE_MAX_PIXELS). Bad mode or channels raise here, before any band is computed.
    """
    _check_channels(image, mean, std)
    h, w = image.shape[:2]
    if _whole_mode(mode, h * w, whole_max_pixels):
        return iter([(0, predict_whole(run, normalize(image[:], mean, std), multiple))])
    return window_bands(run, lambda y0, y1: normalize(image[y0:y1], mean, std), h, w, tile, overlap, batch)


def predict_labels(
    run: RunFn,
    image: np.ndarray | ImageRows,
    mean: Sequence[float],
    std: Sequence[float],
    mode: str,
    tile: int,
    overlap: float,
    batch: int,
    multiple: int,
    whole_max_pixels: int | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """(y0, RxW class ids) bands of rows, the argmax of `predict_bands` (uint8 up to 256 classes)."""
    bands = predict_bands(run, image, mean, std, mode, tile, overlap, batch, multiple, whole_max_pixels)
    return ((y0, argmax_classes(logits)) for y0, logits in bands)


def argmax_classes(logits: np.ndarray) -> np.ndarray:
    """KxRxW logits -> RxW class ids (label_dtype), a few rows at a time: numpy's argmax over the first
    axis copies the whole array first."""
    k, r, w = logits.shape
    out = np.empty((r, w), label_dtype(k))
    step = _rows_within(k * w * logits.itemsize)
    for y0 in range(0, r, step):
        out[y0 : y0 + step] = logits[:, y0 : y0 + step].argmax(axis=0)
    return out


# ---------------------------------------------------------------- evaluation


def evaluate(
    run: RunFn,
    ds: Dataset,
    image_ids: Sequence[int],
    mode: str,
    tile: int,
    overlap: float,
    batch: int,
    multiple: int,
    progress: bool = False,
    on_prediction: Callable[[int, np.ndarray, np.ndarray, np.ndarray], None] | None = None,
    width: int | None = None,
) -> dict:
    """Predict every image in `image_ids` and score it against its mask; `on_prediction(id, image, mask,
    pred)` sees each one (the examples are drawn from it, so no image is predicted twice).

    Scored a band of rows at a time: no K x H x W array is held (see predict_bands); mask and pred are
    class ids in the smallest integer types. `width` (the net's first-level channels) sets how big an
    image "auto" runs whole (whole_pixel_limit; unknown: WIDTH_GUESS).

    Returns {"per_image": [{"stem", "index", **Metrics}], "per_class": {name: {"iou", "dice",
    "gt_pixels", "pred_pixels"}}, "mean": Metrics of the summed confusion, "confusion": (K, K) list,
    "mode": mode}.
    """
    from tqdm.auto import tqdm

    from autoseg.data import load_pair, mask_dtype
    from autoseg.metrics import confusion_matrix, metrics_from_confusion

    if mode not in MODES:
        raise InputError(f"eval.mode: must be one of {MODES}, got {mode!r}")
    k = ds.class_map.num_classes
    limit = whole_pixel_limit(ds.channels, k, width)
    total = np.zeros((k, k), np.int64)
    per_image = []
    for i in tqdm(list(image_ids), desc="evaluate", disable=not progress):
        image, mask = load_pair(ds, int(i), dtype=mask_dtype(k))
        pred = np.empty(mask.shape, label_dtype(k))
        cm = np.zeros((k, k), np.int64)
        for y0, labels in predict_labels(run, image, ds.mean, ds.std, mode, tile, overlap, batch, multiple, limit):
            y1 = y0 + labels.shape[0]
            pred[y0:y1] = labels
            cm += confusion_matrix(labels, mask[y0:y1], k)
        if on_prediction is not None:
            on_prediction(int(i), image, mask, pred)
        del image, mask, pred  # before the next image is read
        total += cm
        per_image.append({"stem": ds.pairs[i].stem, "index": int(i), **metrics_from_confusion(cm).to_dict()})
    overall = metrics_from_confusion(total)
    per_class = {
        name: {
            "iou": overall.per_class_iou[c],
            "dice": overall.per_class_dice[c],
            "gt_pixels": int(total[c].sum()),
            "pred_pixels": int(total[:, c].sum()),
        }
        for c, name in enumerate(ds.class_map.names)
    }
    log.info("evaluated %d image(s) (%s): mIoU %.4f", len(per_image), mode, overall.miou)
    return {
        "mode": mode,
        "per_image": per_image,
        "per_class": per_class,
        "mean": overall.to_dict(),
        "confusion": total.tolist(),
    }
