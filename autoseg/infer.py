"""Full-image inference: one prediction logic for torch and onnxruntime, whole-image or windowed.

A `RunFn` maps float32 NCHW to logits NCHW. `predict_whole` runs the image once (padded to the
net's size multiple); `predict_windows` runs overlapping tiles in batches and blends them with a
Gaussian importance map (sigma = tile/8, as nnU-Net), so window borders, where the net saw
padding instead of context, count least. `predict_bands` / `predict_labels` give the same results a
band of rows at a time, from the uint8 image, so memory is bounded by the window, not by the image.
The whole-image pass and the window blending are edge_agent.predict's (see the import below).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from autoseg.errors import InputError
from autoseg.tiles import stride_for, window_starts

# The whole-image pass, the moving-window blending, the "auto" limit and the band-wise argmax are the device
# agent's own (numpy only, shipped in this package): one implementation, so host and device label alike.
from edge_agent.predict import (
    WHOLE_MAX_PIXELS,
    argmax_classes,
    label_dtype,
    predict_whole,
    whole_pixel_limit,
    window_bands,
)

if TYPE_CHECKING:
    import torch

    from autoseg.data import Dataset, ImageRows

log = logging.getLogger(__name__)

RunFn = Callable[[np.ndarray], np.ndarray]  # float32 NCHW -> logits NCHW
MODES = ("auto", "whole", "window")


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


def window_grid(h: int, w: int, tile: int, overlap: float) -> list[tuple[int, int]]:
    """(y, x) top-left corners of the windows over an (h, w) image (already at least tile x tile)."""
    stride = stride_for(tile, overlap)  # the same grid the training tiles use
    return [(int(y), int(x)) for y in window_starts(h, tile, stride) for x in window_starts(w, tile, stride)]


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
