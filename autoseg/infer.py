"""Full-image inference: one prediction logic for torch and onnxruntime, whole-image or windowed.

A `RunFn` maps float32 NCHW to logits NCHW. `predict_whole` runs the image once (padded to the
net's size multiple); `predict_windows` runs overlapping tiles in batches and blends them with a
Gaussian importance map (sigma = tile/8, as nnU-Net), so window borders, where the net saw
padding instead of context, count least.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from autoseg.errors import InputError
from autoseg.tiles import stride_for, window_starts

if TYPE_CHECKING:
    import torch

    from autoseg.data import Dataset

log = logging.getLogger(__name__)

RunFn = Callable[[np.ndarray], np.ndarray]  # float32 NCHW -> logits NCHW
MODES = ("auto", "whole", "window")
# "auto" runs the whole image at once up to this many pixels, and windows beyond, to bound memory.
WHOLE_MAX_PIXELS = 2048 * 2048


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
    sess = ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return sess.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    return run


# ---------------------------------------------------------------- prediction


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """HWC (or HW) uint8 -> CHW float32 as `(image/255 - mean) / std` per channel."""
    img = image[..., None] if image.ndim == 2 else image
    if img.ndim != 3 or img.shape[2] != len(mean) or len(std) != len(mean):
        raise InputError(
            f"image: shape {image.shape} does not match {len(mean)} normalisation channel(s); "
            "use images with the channel count the model was trained on"
        )
    m = np.asarray(mean, np.float32)[:, None, None]
    s = np.asarray(std, np.float32)[:, None, None]
    x = img.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray((x - m) / s)


def _pad_to(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Pad CHW bottom/right to (h, w): reflect when the image is big enough, else zeros (= the mean)."""
    ph, pw = h - x.shape[1], w - x.shape[2]
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < x.shape[1] and pw < x.shape[2] else "constant"
    return np.pad(x, ((0, 0), (0, ph), (0, pw)), mode=mode)


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
    tile are padded first and cropped back.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch=}")
    _, h, w = x.shape
    xp = _pad_to(x, max(h, tile), max(w, tile))
    hp, wp = xp.shape[1:]
    wmap = gaussian_weights(tile) if weights is None else np.asarray(weights, np.float32)
    corners = window_grid(hp, wp, tile, overlap)
    acc: np.ndarray | None = None
    wsum = np.zeros((hp, wp), np.float32)
    for i in range(0, len(corners), batch):
        chunk = corners[i : i + batch]
        out = run(np.stack([xp[:, y : y + tile, x0 : x0 + tile] for y, x0 in chunk]))
        if acc is None:
            acc = np.zeros((out.shape[1], hp, wp), np.float32)
        for (y, x0), o in zip(chunk, out, strict=True):
            acc[:, y : y + tile, x0 : x0 + tile] += o * wmap
            wsum[y : y + tile, x0 : x0 + tile] += wmap
    assert acc is not None
    acc /= wsum
    return acc[:, :h, :w]


def predict(
    run: RunFn, x: np.ndarray, mode: str, tile: int, overlap: float, batch: int, multiple: int
) -> np.ndarray:
    """Dispatch on `mode` ("auto", "whole" or "window"): CHW -> KHW logits."""
    if mode == "auto":
        mode = "whole" if x.shape[-2] * x.shape[-1] <= WHOLE_MAX_PIXELS else "window"
    if mode == "whole":
        return predict_whole(run, x, multiple)
    if mode == "window":
        return predict_windows(run, x, tile, overlap, batch)
    raise InputError(f"eval.mode: must be one of {MODES}, got {mode!r}")


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
) -> dict:
    """Predict every image in `image_ids` and score it against its mask; `on_prediction(id, image, mask,
    pred)` sees each one (the examples are drawn from it, so no image is predicted twice).

    Returns {"per_image": [{"stem", "index", **Metrics}], "per_class": {name: {"iou", "dice",
    "gt_pixels", "pred_pixels"}}, "mean": Metrics of the summed confusion, "confusion": (K, K) list,
    "mode": mode}.
    """
    from tqdm.auto import tqdm

    from autoseg.data import load_pair
    from autoseg.metrics import confusion_matrix, metrics_from_confusion

    if mode not in MODES:
        raise InputError(f"eval.mode: must be one of {MODES}, got {mode!r}")
    k = ds.class_map.num_classes
    total = np.zeros((k, k), np.int64)
    per_image = []
    for i in tqdm(list(image_ids), desc="evaluate", disable=not progress):
        image, mask = load_pair(ds, int(i))
        logits = predict(run, normalize(image, ds.mean, ds.std), mode, tile, overlap, batch, multiple)
        pred = logits.argmax(axis=0).astype(np.int32)
        if pred.shape != mask.shape:
            raise InputError(
                f"{ds.pairs[i].mask}: mask is {mask.shape}, image is {pred.shape}; they must match"
            )
        if on_prediction is not None:
            on_prediction(int(i), image, mask, pred)
        cm = confusion_matrix(pred, mask, k)
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
