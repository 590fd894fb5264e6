"""`RepSet`, the chosen tiles: their training arrays and their manifest CSV."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.data import IGNORE, Dataset, load_pair
from autoseg.rundir import fs_escape, write_bytes_atomic
from autoseg.tiles import crop


@dataclass
class RepSet:
    tile: int
    rows: np.ndarray  # int64 (R,) rows of the TileIndex
    image: np.ndarray  # int32 (R,)
    y: np.ndarray  # int32 (R,)
    x: np.ndarray  # int32 (R,)
    cluster: np.ndarray  # int32 (R,)
    class_hist: np.ndarray  # float32 (R, K) pixel fractions (ignore excluded)
    n_tiles: int
    n_after_dedup: int
    n_clusters: int


def _iter_rep_tiles(ds: Dataset, reps: RepSet) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(rep position, image tile (T,T,C) uint8, mask tile (T,T) int32), loading each image once."""
    for i in np.unique(reps.image):
        image, mask = load_pair(ds, int(i))
        if image.ndim == 2:
            image = image[:, :, None]
        for k in np.flatnonzero(reps.image == i):
            y, x = int(reps.y[k]), int(reps.x[k])
            yield int(k), crop(image, y, x, reps.tile, 0), crop(mask, y, x, reps.tile, IGNORE)


def rep_arrays(ds: Dataset, reps: RepSet) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training arrays: x float32 (R,C,T,T) normalised with ds.mean/std, y int64 (R,T,T), groups int64 (R,)."""
    r, t, c = len(reps.rows), reps.tile, ds.channels
    x = np.empty((r, c, t, t), dtype=np.float32)
    y = np.empty((r, t, t), dtype=np.int64)
    mean = np.asarray(ds.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(ds.std, dtype=np.float32)[:, None, None]
    for k, img, m in _iter_rep_tiles(ds, reps):
        x[k] = (img.transpose(2, 0, 1).astype(np.float32) / 255.0 - mean) / std
        y[k] = m
    return x, y, reps.image.astype(np.int64)


def write_manifest(ds: Dataset, reps: RepSet, path: Path) -> None:
    """CSV, one row per representative: image,x,y,size,cluster,class_hist (JSON list of fractions)."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["image", "x", "y", "size", "cluster", "class_hist"])
    for k in range(len(reps.rows)):
        hist = json.dumps([round(float(v), 4) for v in reps.class_hist[k]])
        w.writerow([
            ds.pairs[int(reps.image[k])].image.name, int(reps.x[k]), int(reps.y[k]),
            reps.tile, int(reps.cluster[k]), hist,
        ])
    write_bytes_atomic(Path(path), fs_escape(out.getvalue()).encode())
