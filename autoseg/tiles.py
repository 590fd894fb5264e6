"""The window grid over every image: tiles are coordinates (image, y, x), never pixel copies.

Windows step by `stride_for(tile, overlap)`; the last window of each row/column snaps to the
border so every pixel is covered. An image smaller than the tile gets one window at 0 and
`crop()` pads the part that falls outside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from autoseg.errors import InputError


def stride_for(tile: int, overlap: float) -> int:
    """Step between window starts: `tile * (1 - overlap)`, rounded, at least 1."""
    if not 0.0 <= overlap < 1.0:
        raise InputError(f"tiles.overlap: must be in [0, 1), got {overlap}; e.g. 0.25 for a quarter overlap")
    if tile < 1:
        raise InputError(f"tiles.size: must be a positive number of pixels, got {tile}")
    return max(1, round(tile * (1.0 - overlap)))


def window_starts(length: int, tile: int, stride: int) -> np.ndarray:
    """Start offsets along one axis; the last one is `length - tile`, so the border is covered."""
    if length <= tile:
        return np.zeros(1, dtype=np.int32)
    last = length - tile
    starts = np.arange(0, last + 1, stride, dtype=np.int32)
    if starts[-1] != last:
        starts = np.append(starts, np.int32(last))
    return starts


@dataclass(frozen=True, eq=False)
class TileIndex:
    """All windows, ordered by image id then row-major. Three int32 arrays: 12 bytes per tile."""

    tile: int
    image: np.ndarray  # int32 (N,) index into Dataset.pairs
    y: np.ndarray  # int32 (N,) top
    x: np.ndarray  # int32 (N,) left

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def for_image(self, i: int) -> np.ndarray:
        """Row indices of image `i` (a contiguous range, empty if the image is not indexed)."""
        lo = int(np.searchsorted(self.image, i, side="left"))
        hi = int(np.searchsorted(self.image, i, side="right"))
        return np.arange(lo, hi, dtype=np.int64)


def build_index(
    sizes: Sequence[tuple[int, int]],
    tile: int,
    overlap: float,
    images: Sequence[int] | None = None,
) -> TileIndex:
    """Window grid over `sizes` ((H, W) per image), or over the subset `images` of image ids."""
    stride = stride_for(tile, overlap)
    ids = np.arange(len(sizes)) if images is None else np.unique(np.asarray(images, dtype=np.int64))
    if ids.size and (ids[0] < 0 or ids[-1] >= len(sizes)):
        raise ValueError(f"image ids must be in [0, {len(sizes)}), got {ids[0]}..{ids[-1]}")
    hw = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)[ids]
    if hw.size and np.all((hw[:, 0] < tile) & (hw[:, 1] < tile)):
        h, w = hw[np.argmax(hw[:, 0] * hw[:, 1])]
        raise InputError(
            f"tiles.size: {tile} is larger than every image (largest is {w}x{h}); use a smaller --tile"
        )

    # Images of the same size share one grid: real datasets have few distinct sizes.
    grids: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    parts_i, parts_y, parts_x = [], [], []
    for i, (h, w) in zip(ids.tolist(), hw.tolist(), strict=True):
        grid = grids.get((h, w))
        if grid is None:
            ys = window_starts(h, tile, stride)
            xs = window_starts(w, tile, stride)
            grid = (np.repeat(ys, xs.size), np.tile(xs, ys.size))
            grids[(h, w)] = grid
        parts_y.append(grid[0])
        parts_x.append(grid[1])
        parts_i.append(np.full(grid[0].size, i, dtype=np.int32))
    if not parts_i:
        empty = np.zeros(0, dtype=np.int32)
        return TileIndex(tile, empty, empty.copy(), empty.copy())
    return TileIndex(tile, np.concatenate(parts_i), np.concatenate(parts_y), np.concatenate(parts_x))


def crop(arr: np.ndarray, y: int, x: int, tile: int, fill: int | float) -> np.ndarray:
    """A (tile, tile[, C]) copy of `arr` at (y, x); whatever lies outside `arr` is `fill`."""
    h, w = arr.shape[:2]
    y0, x0 = max(y, 0), max(x, 0)
    y1, x1 = min(y + tile, h), min(x + tile, w)
    if y0 == y and x0 == x and y1 == y + tile and x1 == x + tile:
        return arr[y0:y1, x0:x1].copy()
    out = np.full((tile, tile, *arr.shape[2:]), fill, dtype=arr.dtype)
    if y1 > y0 and x1 > x0:
        out[y0 - y : y1 - y, x0 - x : x1 - x] = arr[y0:y1, x0:x1]
    return out
