"""Standardised features, near-duplicates dropped, PCA and MiniBatchKMeans (pure functions)."""

from __future__ import annotations

import math
import warnings

import numpy as np

# Standardised features are clipped here, so a handful of outliers cannot eat the clusters.
Z_CLIP = 5.0


def standardise(feats: np.ndarray, groups: list[int], weights: list[float]) -> np.ndarray:
    """Z-scores, clipped, scaled so each group's expected squared contribution equals its weight."""
    f = feats.astype(np.float64)
    mu = f.mean(axis=0)
    sd = f.std(axis=0)
    live = sd > 1e-9
    z = np.zeros_like(f)
    z[:, live] = np.clip((f[:, live] - mu[live]) / sd[live], -Z_CLIP, Z_CLIP)
    scale = np.zeros(f.shape[1])
    lo = 0
    for width, w in zip(groups, weights, strict=True):
        n_live = int(live[lo : lo + width].sum())
        if n_live:
            scale[lo : lo + width] = math.sqrt(w / n_live)
        lo += width
    return (z * scale).astype(np.float32)


def dedup(z: np.ndarray, threshold: float) -> np.ndarray:
    """Sorted row indices kept after dropping near-duplicates: one row per grid cell of side
    `threshold` (exact duplicates only when it is 0). Linear time: a 64-bit hash of each cell."""
    if len(z) == 0:
        return np.zeros(0, dtype=np.int64)
    if threshold > 0:
        q = np.floor(z / threshold).astype(np.int64)
    else:
        q = np.ascontiguousarray(z, dtype=np.float32).view(np.int32).astype(np.int64)
    mult = np.random.default_rng(0x5EED).integers(1, 2**62, size=q.shape[1], dtype=np.int64) | 1
    h = q @ mult  # wraps modulo 2**64; collisions are vanishingly rare
    _, first = np.unique(h, return_index=True)
    return np.sort(first).astype(np.int64)


def kmeans(z: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels int32 (n,), centres (k, D)) from MiniBatchKMeans; trivial cases done directly."""
    n = len(z)
    if k >= n:
        return np.arange(n, dtype=np.int32), z.astype(np.float32).copy()
    if k == 1:
        return np.zeros(n, dtype=np.int32), z.mean(axis=0, keepdims=True).astype(np.float32)
    from sklearn.cluster import MiniBatchKMeans

    x = z.astype(np.float64)  # sklearn's float32 path upcasts in small chunks: much slower
    km = MiniBatchKMeans(
        n_clusters=k, init=_kmeans_pp(x, k, seed), n_init=1, random_state=seed,
        batch_size=min(n, 2048), max_no_improvement=10,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "fewer distinct clusters" on very uniform data
        labels = km.fit_predict(x)
    return labels.astype(np.int32), km.cluster_centers_.astype(np.float32)


def pca(z: np.ndarray, dims: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), components (D, d)) of the top `d <= dims` principal axes; project with (z - mean) @ comp.
    scikit-learn's "auto" solver: the covariance's eigenvectors for many tiles of few features (what the
    hand-written version did), randomized SVD when the features are many (the CNN embedder's)."""
    from sklearn.decomposition import PCA

    mean = z.mean(axis=0, dtype=np.float64)
    if z.shape[1] <= dims:
        return mean, np.eye(z.shape[1])
    # A tiny dataset has fewer tiles than axes asked for: they span no more than that many.
    fit = PCA(n_components=min(dims, len(z)), svd_solver="auto", random_state=seed).fit(z)
    return fit.mean_.astype(np.float64), fit.components_.T.astype(np.float64)


def _kmeans_pp(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means++ seeding (scikit-learn's greedy variant) on a seeded subsample of max(10,000, 20k) points.
    The subsample is ours: on every tile the greedy variant takes minutes on small CPUs. Against the former
    hand-written plain k-means++ on the same subsample (3 seeds, 200 clusters, within-cluster inertia per tile
    in the full features): drone 4.891 -> 4.848, isbi 1.656 -> 1.632, 60,000 synthetic tiles 234.9 -> 228.4,
    in about the same time (3 s for 1,000 clusters)."""
    from sklearn.cluster import kmeans_plusplus

    rng = np.random.default_rng(seed)
    sub = max(10_000, 20 * k)
    s = x[np.sort(rng.choice(len(x), sub, replace=False))] if len(x) > sub else x
    centres, _ = kmeans_plusplus(s, k, random_state=int(rng.integers(2**31)))
    return centres
