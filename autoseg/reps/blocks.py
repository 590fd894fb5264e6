"""The block grid: per-pixel maps reduced to sums over blocks whose edges are exactly the tile edges of one image,
then every tile's sums read from an integral image of those blocks. A few passes over the pixels, whatever the tile
count or overlap."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from autoseg.data import IGNORE


@dataclass(frozen=True)
class _Grid:
    """Blocks whose edges are all tile edges of one image, so block sums add up to exact tile sums."""

    h: int  # extent covered by the tiles (may exceed the image: crop() pads)
    w: int
    step_y: int  # every block edge is a multiple of these: fast reshape-sums first
    step_x: int
    row_starts: np.ndarray  # block start offsets, for np.add.reduceat
    col_starts: np.ndarray
    bid: np.ndarray  # int32 (h*w,) block id of each pixel, row-major
    y0: np.ndarray  # (n,) block index range of each tile
    y1: np.ndarray
    x0: np.ndarray
    x1: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.row_starts), len(self.col_starts)

    @classmethod
    def make(cls, ys: np.ndarray, xs: np.ndarray, tile: int) -> _Grid:
        ys = np.ascontiguousarray(ys, dtype=np.int64)
        xs = np.ascontiguousarray(xs, dtype=np.int64)
        return _grid_cached(tile, ys.tobytes(), xs.tobytes())

    def fit(self, arr: np.ndarray, fill: int) -> np.ndarray:
        """`arr` cut or padded to the grid extent."""
        arr = arr[: self.h, : self.w]
        ph, pw = self.h - arr.shape[0], self.w - arr.shape[1]
        if ph or pw:
            pad = [(0, ph), (0, pw)] + [(0, 0)] * (arr.ndim - 2)
            arr = np.pad(arr, pad, constant_values=fill)
        return arr

    def dense(self, m: np.ndarray, acc: type) -> np.ndarray:
        """Block sums (Hb, Wb, d) of a per-pixel map (h, w[, d]); `acc` must hold a block row's sum."""
        gy, gx = self.step_y, self.step_x
        # A reshape-sum over the common step is ~10x faster than reduceat on the full map.
        if gy > 1:
            m = m.reshape(self.h // gy, gy, *m.shape[1:]).sum(axis=1, dtype=acc)
        r = np.add.reduceat(m, self.row_starts // gy, axis=0, dtype=acc).astype(np.float64)
        if gx > 1:
            r = r.reshape(r.shape[0], self.w // gx, gx, *r.shape[2:]).sum(axis=2)
        r = np.add.reduceat(r, self.col_starts // gx, axis=1)
        return r.reshape(*self.shape, -1)

    def hist(self, code: np.ndarray, bins: int, weights: np.ndarray | None = None) -> np.ndarray:
        """Per-block histogram (Hb, Wb, bins) of an integer code map in [0, bins)."""
        hb, wb = self.shape
        idx = self.bid * np.int32(bins) + code.ravel() if hb * wb * bins < 2**31 else (
            self.bid.astype(np.int64) * bins + code.ravel()
        )
        w = None if weights is None else weights.ravel()
        return np.bincount(idx, weights=w, minlength=hb * wb * bins).reshape(hb, wb, bins)

    def windows(self, blocks: np.ndarray) -> np.ndarray:
        """Exact per-tile sums (n, d) from block sums (Hb, Wb, d), via an integral image."""
        hb, wb, d = blocks.shape
        s = np.zeros((hb + 1, wb + 1, d), dtype=np.float64)
        np.cumsum(blocks, axis=0, out=s[1:, 1:])
        np.cumsum(s[1:, 1:], axis=1, out=s[1:, 1:])
        return s[self.y1, self.x1] - s[self.y0, self.x1] - s[self.y1, self.x0] + s[self.y0, self.x0]


@functools.lru_cache(maxsize=4)
def _grid_cached(tile: int, ys_bytes: bytes, xs_bytes: bytes) -> _Grid:
    # Images of one size share a tile layout, so the grid is usually built once per dataset.
    ys = np.frombuffer(ys_bytes, dtype=np.int64)
    xs = np.frombuffer(xs_bytes, dtype=np.int64)
    rb = np.unique(np.concatenate([[0], ys, ys + tile]))
    cb = np.unique(np.concatenate([[0], xs, xs + tile]))
    h, w = int(rb[-1]), int(cb[-1])
    rid = (np.searchsorted(rb, np.arange(h), side="right") - 1).astype(np.int32)
    cid = (np.searchsorted(cb, np.arange(w), side="right") - 1).astype(np.int32)
    bid = (rid[:, None] * np.int32(len(cb) - 1) + cid[None, :]).ravel()
    bid.flags.writeable = False
    return _Grid(
        h, w, int(np.gcd.reduce(rb)), int(np.gcd.reduce(cb)), rb[:-1], cb[:-1], bid,
        np.searchsorted(rb, ys), np.searchsorted(rb, ys + tile),
        np.searchsorted(cb, xs), np.searchsorted(cb, xs + tile),
    )


def class_counts(mask: np.ndarray, ys: np.ndarray, xs: np.ndarray, tile: int, num_classes: int) -> np.ndarray:
    """Pixel count of each class in each tile, (n, K) int64; IGNORE and padding are not counted."""
    grid = _Grid.make(ys, xs, tile)
    m = grid.fit(mask, IGNORE)
    code = np.clip(m, IGNORE, num_classes - 1).astype(np.int64) + 1  # bin 0 = ignore
    counts = grid.windows(grid.hist(code, num_classes + 1))[:, 1:]
    return np.rint(counts).astype(np.int64)
