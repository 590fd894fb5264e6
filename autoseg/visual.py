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
    idx = np.where(mask < 0, len(pal) - 1, mask)
    return pal[idx]


MAX_STRIP_WIDTH = 1536  # pixels; bigger strips are scaled down so the report stays light


def write_example(ds: Dataset, i: int, image: np.ndarray, mask: np.ndarray, pred: np.ndarray, folder: Path) -> Path:
    """image | ground truth | prediction of test image `i` as one PNG in `folder`."""
    pal = palette(ds.class_map.num_classes, ds.class_map.colors)
    rgb = image if image.shape[2] == 3 else np.repeat(image, 3, axis=2)
    gap = np.full((rgb.shape[0], 4, 3), 255, dtype=np.uint8)
    strip = np.concatenate([rgb, gap, colorize(mask, pal), gap, colorize(pred, pal)], axis=1)
    path = folder / f"{ds.pairs[i].stem}.png"
    picture = Image.fromarray(strip)
    if picture.width > MAX_STRIP_WIDTH:
        scale = MAX_STRIP_WIDTH / picture.width
        picture = picture.resize((MAX_STRIP_WIDTH, max(1, round(picture.height * scale))), Image.NEAREST)
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())
    return path
