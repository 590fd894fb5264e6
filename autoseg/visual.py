"""Pictures a person looks at: colourised masks and image | truth | prediction strips."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from autoseg.data import Dataset
from autoseg.rundir import write_bytes_atomic


def palette(num_classes: int, colors: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """(K+1, 3) uint8: the dataset's own colours when it has them, else a fixed distinct set; last row = ignore."""
    if colors is not None and len(colors) >= num_classes:
        pal = np.asarray(colors[:num_classes], dtype=np.uint8)
    else:
        rng = np.random.default_rng(7)
        base = np.array(
            [
                [0, 0, 0],
                [230, 25, 75],
                [60, 180, 75],
                [255, 225, 25],
                [0, 130, 200],
                [245, 130, 48],
                [145, 30, 180],
                [70, 240, 240],
                [240, 50, 230],
                [210, 245, 60],
                [250, 190, 212],
                [0, 128, 128],
            ],
            dtype=np.uint8,
        )
        extra = rng.integers(40, 255, size=(max(0, num_classes - len(base)), 3), dtype=np.uint8)
        pal = np.concatenate([base, extra])[:num_classes]
    return np.concatenate([pal, np.array([[128, 128, 128]], dtype=np.uint8)])


def colorize(mask: np.ndarray, pal: np.ndarray) -> np.ndarray:
    """Class ids (IGNORE = -1 shown grey) -> RGB."""
    idx = mask.astype(np.intp, copy=False)
    return pal[np.where(idx < 0, len(pal) - 1, idx)]


MAX_STRIP_WIDTH = 1536  # pixels; bigger strips are scaled down so the report stays light
_GAP = 4


def _nearest(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """`a` resampled to (h, w, ...) by nearest neighbour (pixel centres)."""
    ys = ((np.arange(h) + 0.5) * a.shape[0] / h).astype(np.intp)
    xs = ((np.arange(w) + 0.5) * a.shape[1] / w).astype(np.intp)
    return a[ys[:, None], xs[None, :]]


def write_example(ds: Dataset, i: int, image: np.ndarray, mask: np.ndarray, pred: np.ndarray, folder: Path) -> Path:
    """image | ground truth | prediction of test image `i` as one PNG in `folder`.

    A strip wider than MAX_STRIP_WIDTH is scaled down panel by panel (nearest neighbour) before it is
    drawn, so a big test image costs a small picture, not three copies of itself.
    """
    pal = palette(ds.class_map.num_classes, ds.class_map.colors)
    h, w = mask.shape
    if 3 * w + 2 * _GAP > MAX_STRIP_WIDTH:
        scale = (MAX_STRIP_WIDTH - 2 * _GAP) / (3 * w)
        sh, sw = max(1, round(h * scale)), max(1, int(w * scale))
        image, mask, pred = (_nearest(a, sh, sw) for a in (image, mask, pred))
    rgb = image if image.shape[2] == 3 else np.repeat(image, 3, axis=2)
    gap = np.full((rgb.shape[0], _GAP, 3), 255, dtype=np.uint8)
    strip = np.concatenate([rgb, gap, colorize(mask, pal), gap, colorize(pred, pal)], axis=1)
    path = folder / f"{ds.pairs[i].stem}.png"
    buf = io.BytesIO()
    Image.fromarray(strip).save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())
    return path
