"""The on-disk cache of a choice (features, clusters, the chosen rows), keyed by the data and every setting."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path

import numpy as np

from autoseg.config import RepsConfig
from autoseg.data import Dataset
from autoseg.reps.repset import RepSet
from autoseg.rundir import write_bytes_atomic
from autoseg.tiles import TileIndex

log = logging.getLogger("autoseg.reps")  # one logger for the package: log lines keep the name they had

# Bump when the features or the selection change: old caches then miss instead of lying.
FEATURE_VERSION = 4


def cache_key(ds: Dataset, index: TileIndex, cfg: RepsConfig, seed: int, embedder_key: str) -> str:
    """sha256 over the data (paths, sizes, mtimes, tile index) and every setting that changes the result."""
    h = hashlib.sha256()
    files = []
    for p in ds.pairs:
        for f in (p.image, p.mask):
            try:
                st = os.stat(f)
                files.append([str(Path(f).resolve()), st.st_size, st.st_mtime_ns])
            except OSError:
                files.append([str(f), -1, -1])
    settings = {
        "version": FEATURE_VERSION,
        "files": files,
        "channels": ds.channels,
        "class_map": ds.class_map.to_dict(),
        "embedder": embedder_key,
        "tile": index.tile,
        "num_reps": cfg.num_reps,
        "reps_per_cluster": cfg.reps_per_cluster,
        "dedup": cfg.dedup_threshold,
        "class_aware": cfg.class_aware,
        "seed": seed,
    }
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for a in (index.image, index.y, index.x):
        h.update(np.ascontiguousarray(a, dtype=np.int32).tobytes())
    return h.hexdigest()


def _save_cache(
    path: Path, key: str, z: np.ndarray, kept: np.ndarray, labels: np.ndarray, centres: np.ndarray, reps: RepSet
) -> None:
    buf = io.BytesIO()
    np.savez(
        buf, key=np.array(key), features=z, kept=kept, labels=labels, centres=centres,
        rows=reps.rows, cluster=reps.cluster, class_hist=reps.class_hist,
        counts=np.array([reps.n_tiles, reps.n_after_dedup, reps.n_clusters], dtype=np.int64),
    )
    write_bytes_atomic(path, buf.getvalue())


def _load_cache(path: Path, key: str, index: TileIndex) -> RepSet | None:
    if not path.is_file():
        return None
    try:
        with np.load(path) as f:
            if str(f["key"]) != key:
                return None
            rows = f["rows"].astype(np.int64)
            cluster = f["cluster"].astype(np.int32)
            class_hist = f["class_hist"].astype(np.float32)
            n_tiles, n_after, n_clusters = (int(v) for v in f["counts"])
    except Exception as e:  # a torn or foreign file: recompute rather than fail
        log.warning("ignoring unreadable reps cache %s (%s)", path, type(e).__name__)
        return None
    if n_tiles != len(index) or (len(rows) and rows.max() >= len(index)):
        return None
    return RepSet(
        index.tile, rows, index.image[rows].copy(), index.y[rows].copy(), index.x[rows].copy(),
        cluster, class_hist, n_tiles, n_after, n_clusters,
    )
