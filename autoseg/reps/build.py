"""`build_reps`: features per tile -> standardise -> drop near-duplicates -> PCA and k-means -> a pick per
cluster -> class-aware swaps; the result cached on disk."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from autoseg.config import RepsConfig
from autoseg.data import Dataset, load_pair
from autoseg.errors import InputError
from autoseg.reps.blocks import class_counts
from autoseg.reps.cache import _load_cache, _save_cache, cache_key
from autoseg.reps.clustering import dedup, kmeans, pca, standardise
from autoseg.reps.embedders import Embedder, make_embedder
from autoseg.reps.picking import class_aware_swap, pick_per_cluster, rarity
from autoseg.reps.repset import RepSet
from autoseg.tiles import TileIndex

log = logging.getLogger("autoseg.reps")  # one logger for the package: log lines keep the name they had

# Share of the total feature weight given to the tile's class histogram (the rest is appearance).
CLASS_SHARE = 2.0 / 3.0  # bench_reps: +0.009 mIoU over random on drone (5 seeds), +0.004 on isbi
PCA_DIMS = 32


def build_reps(
    ds: Dataset,
    index: TileIndex,
    cfg: RepsConfig,
    seed: int,
    cache_dir: Path,
    progress: bool = False,
    embedder: Embedder | None = None,
) -> RepSet:
    """Choose the representative tiles of `index`; reuse the cache under `cache_dir` when it matches."""
    n = len(index)
    if n == 0:
        raise InputError("data.images: there are no training tiles to choose from; add images or lower tiles.size")
    emb = embedder if embedder is not None else make_embedder(cfg, seed)
    key = cache_key(ds, index, cfg, seed, emb.key())
    path = Path(cache_dir) / f"reps-{key[:20]}.npz"
    cached = _load_cache(path, key, index)
    if cached is not None:
        log.info("representatives loaded from cache %s", path)
        return cached

    k_classes = ds.class_map.num_classes
    groups = emb.groups(ds.channels)
    feats = np.empty((n, sum(groups)), dtype=np.float32)
    counts = np.empty((n, k_classes), dtype=np.int64)
    order = np.argsort(index.image, kind="stable")
    images, starts = np.unique(index.image[order], return_index=True)
    bounds = [*starts.tolist(), n]
    for j in tqdm(range(len(images)), disable=not progress, desc="tile features", unit="img"):
        rows = order[bounds[j] : bounds[j + 1]]
        image, mask = load_pair(ds, int(images[j]))
        ys, xs = index.y[rows], index.x[rows]
        feats[rows] = emb.embed(image, ys, xs, index.tile)
        counts[rows] = class_counts(mask, ys, xs, index.tile, k_classes)
    valid = counts.sum(axis=1, keepdims=True)
    frac = (counts / np.maximum(valid, 1)).astype(np.float32)

    weights = [1.0] * len(groups)
    class_w = CLASS_SHARE / (1 - CLASS_SHARE) * sum(weights)
    z = standardise(np.concatenate([feats, np.sqrt(frac)], axis=1), [*groups, k_classes], [*weights, class_w])
    del feats

    kept = dedup(z, cfg.dedup_threshold)
    k = min(math.ceil(cfg.num_reps / cfg.reps_per_cluster), len(kept))
    # One BLAS/OpenMP thread: their busy-waiting makes these small products ~10x slower on a
    # busy 2-core machine, and one thread is about as fast on an idle one.
    with threadpool_limits(1):
        # Clustering in the top principal axes: ~99% of the variance, a third of the cost.
        mean, comp = pca(z[kept], PCA_DIMS, seed)
        zk = ((z[kept] - mean) @ comp).astype(np.float32)
        labels, centres = kmeans(zk, k, seed)
    dist = ((zk - centres[labels]) ** 2).sum(axis=1)
    pick = pick_per_cluster(labels, dist, rarity(counts)[kept], cfg.reps_per_cluster, cfg.num_reps)
    chosen, cluster, cdist = kept[pick], labels[pick], dist[pick]

    if cfg.class_aware:
        sizes = np.bincount(labels, minlength=k)

        def assign(row: int) -> tuple[int, float]:
            d = ((centres - (z[row] - mean) @ comp) ** 2).sum(axis=1)
            c = int(np.argmin(d))
            return c, float(d[c])

        chosen, cluster, cdist = class_aware_swap(chosen, cluster, cdist, frac, sizes, assign)

    srt = np.lexsort((chosen, cluster))
    chosen, cluster = chosen[srt].astype(np.int64), cluster[srt].astype(np.int32)
    reps = RepSet(
        tile=index.tile,
        rows=chosen,
        image=index.image[chosen].copy(),
        y=index.y[chosen].copy(),
        x=index.x[chosen].copy(),
        cluster=cluster,
        class_hist=frac[chosen],
        n_tiles=n,
        n_after_dedup=len(kept),
        n_clusters=k,
    )
    _save_cache(path, key, z, kept, labels, centres, reps)
    log.info(
        "representatives: %d tiles, %d after de-duplication, %d clusters, %d chosen",
        n, len(kept), k, len(chosen),
    )
    return reps
