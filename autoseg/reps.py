"""Representative tiles: a few hundred tiles that stand for every training tile.

features per tile -> standardise -> drop near-duplicates -> MiniBatchKMeans -> per cluster, the tile
richest in rare classes among its nearer half -> class-aware swaps, so a rare class keeps at least one
representative.

The default embedder needs no downloaded weights: per image it reduces per-pixel maps (colour,
gradients, local binary comparisons) to sums over a grid of blocks whose edges are exactly the
tile edges, then reads every tile's sums from an integral image of those blocks. The cost is a
few passes over the pixels, whatever the tile count or overlap. The whole result is cached on
disk, keyed by the data and the settings.
"""

from __future__ import annotations

import colorsys
import csv
import functools
import hashlib
import io
import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from autoseg.config import RepsConfig
from autoseg.data import IGNORE, Dataset, load_pair
from autoseg.errors import InputError
from autoseg.rundir import fs_escape, write_bytes_atomic
from autoseg.tiles import TileIndex, crop

log = logging.getLogger(__name__)

# Bump when the features or the selection change: old caches then miss instead of lying.
FEATURE_VERSION = 4
# Share of the total feature weight given to the tile's class histogram (the rest is appearance).
CLASS_SHARE = 2.0 / 3.0  # bench_reps: +0.009 mIoU over random on drone (5 seeds), +0.004 on isbi
# Standardised features are clipped here, so a handful of outliers cannot eat the clusters.
Z_CLIP = 5.0
# A cluster's rep is the tile richest in rare classes among its nearer half (the typical tiles), not just
# the one nearest the centre. bench_reps at R = 200, 2000 steps, 3 seeds: drone 0.163 -> 0.169 test mIoU
# (random tiles 0.148), isbi 0.788 either way.
POOL = 0.5
PCA_DIMS = 32
SHEET_CELL = 64
SHEET_COLUMNS = 20


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


# ---------------------------------------------------------------- block grid


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


# ---------------------------------------------------------------- embedders


class Embedder(Protocol):
    def key(self) -> str:
        """Identity for the cache key (name, version, weights hash)."""
        ...

    def groups(self, channels: int) -> list[int]:
        """Widths of the feature groups, in output order; each group gets equal weight."""
        ...

    def embed(self, image: np.ndarray, ys: np.ndarray, xs: np.ndarray, tile: int) -> np.ndarray:
        """Features (n, D) float32 of the tiles at (ys, xs) of one (H, W, C) uint8 image."""
        ...


# Orientation bins: tan of 22.5, 45 and 67.5 degrees split each quadrant into four.
_TAN = (math.tan(math.pi / 8), 1.0, math.tan(3 * math.pi / 8))


class HandcraftedEmbedder:
    """Colour, texture and edge statistics; no weights, a few vectorised passes per image."""

    def key(self) -> str:
        return "handcrafted-v1"

    def groups(self, channels: int) -> list[int]:
        colour = 64 if channels == 3 else 16
        # mean, std, colour histogram, gradient magnitude mean/std, orientation, binary pattern
        return [channels, channels, colour, 2, 8, 8]

    def embed(self, image: np.ndarray, ys: np.ndarray, xs: np.ndarray, tile: int) -> np.ndarray:
        if image.ndim == 2:
            image = image[:, :, None]
        grid = _Grid.make(ys, xs, tile)
        img = grid.fit(image, 0)
        c = img.shape[2]
        if c == 3:
            q = img >> 6
            colour = (q[..., 0] << 4) | (q[..., 1] << 2) | q[..., 2]
            gray = img[..., 0].astype(np.int16) + img[..., 1] + img[..., 2]
            nbins = 64
        else:
            colour = img[..., 0] >> 4
            gray = img[..., 0].astype(np.int16) * 3
            nbins = 16
        gx = np.zeros(gray.shape, np.int16)
        gy = np.zeros(gray.shape, np.int16)
        np.subtract(gray[:, 2:], gray[:, :-2], out=gx[:, 1:-1])
        np.subtract(gray[2:], gray[:-2], out=gy[1:-1])
        mag, orient = _gradient_bins(gx, gy)
        # Local binary comparisons with the right, lower and lower-right neighbours.
        lbp = np.zeros(gray.shape, np.uint8)
        lbp[:, :-1] = gray[:, :-1] > gray[:, 1:]
        lbp[:-1] |= (gray[:-1] > gray[1:]).view(np.uint8) << 1
        lbp[:-1, :-1] |= (gray[:-1, :-1] > gray[1:, 1:]).view(np.uint8) << 2

        blocks = np.concatenate(
            [
                grid.dense(img, np.int32),
                grid.dense(np.square(img, dtype=np.uint16), np.int32),
                grid.dense(mag, np.float64),
                grid.dense(mag * mag, np.float64),
                grid.hist(colour, nbins),
                grid.hist(orient, 8, weights=mag),
                grid.hist(lbp, 8),
            ],
            axis=2,
        )
        s = grid.windows(blocks)
        area = float(tile * tile)
        i = 0

        def take(d: int) -> np.ndarray:
            nonlocal i
            i += d
            return s[:, i - d : i]

        sx, sxx, sm, smm = take(c), take(c), take(1), take(1)
        hist_colour, hist_orient, hist_lbp = take(nbins), take(8), take(8)
        mean = sx / area
        std = np.sqrt(np.maximum(sxx / area - mean * mean, 0.0))
        mmean = sm / area
        mstd = np.sqrt(np.maximum(smm / area - mmean * mmean, 0.0))
        # Square roots of the histograms (Hellinger): rare bins count without dominating.
        feats = np.concatenate(
            [
                mean / 255.0,
                std / 255.0,
                np.sqrt(np.maximum(hist_colour, 0.0) / area),
                np.concatenate([mmean, mstd], axis=1) / 255.0,
                np.sqrt(np.maximum(hist_orient, 0.0) / np.maximum(sm, 1e-9)),
                np.sqrt(np.maximum(hist_lbp, 0.0) / area),
            ],
            axis=1,
        )
        return feats.astype(np.float32)


def _gradient_bins(gx: np.ndarray, gy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gradient magnitude (float32) and unsigned orientation in 8 bins of 22.5 degrees, without arctan."""
    fx, fy = gx.astype(np.float32), gy.astype(np.float32)
    mag = np.sqrt(fx * fx + fy * fy)
    ax, ay = np.abs(fx), np.abs(fy)
    q = (ay > _TAN[0] * ax).view(np.uint8) + (ay > _TAN[1] * ax) + (ay > _TAN[2] * ax)
    # Opposite signs put the angle in (90, 180) degrees: mirror the quadrant (7 - q == 7 ^ q here).
    q ^= ((gx < 0) ^ (gy < 0)).view(np.uint8) * np.uint8(7)
    return mag, q


_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class CNNEmbedder:
    """Global-average-pooled CNN features: a ResNet-18 from a local state_dict, or a small random CNN.

    `weights` is a torchvision-compatible resnet18 state_dict (loaded with strict key checking);
    without it a small seeded random CNN is used, which is a fair texture descriptor and cheap.
    """

    def __init__(self, weights: Path | None, seed: int, batch: int = 64) -> None:
        import torch

        self.weights = weights
        self.batch = batch
        if weights is None:
            self.digest = ""
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.model = _small_cnn()
            self.dim = 64
        else:
            self.digest = _file_sha256(Path(weights))
            self.model = load_resnet18(Path(weights))
            self.dim = 512
        self.model.eval()

    def key(self) -> str:
        return f"resnet18:{self.digest}" if self.weights is not None else "small-cnn-v1"

    def groups(self, channels: int) -> list[int]:
        return [self.dim]

    def embed(self, image: np.ndarray, ys: np.ndarray, xs: np.ndarray, tile: int) -> np.ndarray:
        import torch

        if image.ndim == 2:
            image = image[:, :, None]
        grid_h = int(np.max(ys)) + tile
        grid_w = int(np.max(xs)) + tile
        img = image[:grid_h, :grid_w]
        if img.shape[0] < grid_h or img.shape[1] < grid_w:
            img = np.pad(img, [(0, grid_h - img.shape[0]), (0, grid_w - img.shape[1]), (0, 0)])
        if img.shape[2] == 1:
            img = np.repeat(img, 3, axis=2)
        out = np.empty((len(ys), self.dim), dtype=np.float32)
        with torch.no_grad():
            for lo in range(0, len(ys), self.batch):
                hi = min(lo + self.batch, len(ys))
                tiles = np.stack([img[y : y + tile, x : x + tile] for y, x in zip(ys[lo:hi], xs[lo:hi], strict=True)])
                t = (tiles.astype(np.float32) / 255.0 - _IMAGENET_MEAN) / _IMAGENET_STD
                x = torch.from_numpy(np.ascontiguousarray(t.transpose(0, 3, 1, 2)))
                out[lo:hi] = self.model.features(x).numpy()
        return out


def make_embedder(cfg: RepsConfig, seed: int) -> Embedder:
    if cfg.embedder == "handcrafted":
        return HandcraftedEmbedder()
    return CNNEmbedder(cfg.embedder_weights, seed)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise InputError(
            f"reps.embedder_weights: cannot read {path} ({e.strerror}); "
            "give a local resnet18 state_dict file or set it to null for random weights"
        ) from None
    return h.hexdigest()


# ---------------------------------------------------------------- plain-torch networks


@functools.cache
def _torch_classes() -> tuple[type, type, type]:
    """The network classes, built on first use so the handcrafted path never imports torch."""
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + identity)

    class ResNet18(nn.Module):
        """torchvision's resnet18 layout: its state_dict keys load here unchanged."""

        def __init__(self, num_classes: int = 1000) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            widths, cin = (64, 128, 256, 512), 64
            for i, w in enumerate(widths):
                stride = 1 if i == 0 else 2
                setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, w, stride), BasicBlock(w, w, 1)))
                cin = w
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512, num_classes)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

        def features(self, x: torch.Tensor) -> torch.Tensor:
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return torch.flatten(self.avgpool(x), 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.features(x))

    class SmallCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(),
                nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
            )

        def features(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x).mean(dim=(2, 3))

        forward = features

    return BasicBlock, ResNet18, SmallCNN


def resnet18(num_classes: int = 1000) -> Any:
    """A ResNet-18 in plain torch, randomly initialised (seed torch first for reproducibility)."""
    return _torch_classes()[1](num_classes)


def _small_cnn() -> Any:
    return _torch_classes()[2]()


def load_resnet18(path: Path) -> Any:
    """ResNet-18 with the state_dict at `path`, strictly checked; InputError if it does not fit."""
    import torch

    def fail(why: str) -> InputError:
        return InputError(
            f"reps.embedder_weights: {path}: {why}; give a torchvision resnet18 state_dict "
            "saved with torch.save, or set it to null for random weights"
        )

    if not Path(path).is_file():
        raise fail("file not found")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise fail(f"cannot be loaded ({type(e).__name__})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise fail(f"holds a {type(sd).__name__}, not a state_dict")
    num_classes = sd["fc.weight"].shape[0] if hasattr(sd.get("fc.weight"), "shape") else 1000
    model = resnet18(num_classes)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise fail(f"does not match resnet18 ({first[:160]})") from None
    return model


# ---------------------------------------------------------------- selection (pure)


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


def rarity(counts: np.ndarray) -> np.ndarray:
    """Per tile (`counts`: (n_tiles, K) pixels per class): sum over classes of its pixel share divided by
    the square root of the class's share of all pixels. High for tiles rich in rare classes."""
    total = counts.sum(axis=0).astype(np.float64)
    share = total / max(total.sum(), 1.0)
    w = np.where(share > 0, 1.0 / np.sqrt(np.maximum(share, 1e-12)), 0.0)
    frac = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    return frac @ w


def pick_per_cluster(
    labels: np.ndarray, dist: np.ndarray, score: np.ndarray, per_cluster: int, total: int, pool: float = POOL
) -> np.ndarray:
    """Indices of `total` points, `per_cluster` from every cluster first: within a cluster, its nearer
    `pool` share of members (the typical ones) by highest `score`, then the rest by distance to the centre.
    Surplus is trimmed from the deepest ranks, and clusters too small are made up from the others."""
    order = np.lexsort((dist, labels))
    lab = labels[order]
    new = np.r_[True, lab[1:] != lab[:-1]]
    start = np.maximum.accumulate(np.where(new, np.arange(len(lab)), 0))
    size = np.diff(np.r_[np.flatnonzero(new), len(lab)])[np.cumsum(new) - 1]
    rank = np.arange(len(lab)) - start
    near = rank < np.maximum(1, np.ceil(pool * size))
    # Within a cluster: the near share first, by score; ties (and the rest) by distance.
    key = np.where(near, -score[order], 0.0)
    order = order[np.lexsort((dist[order], key, ~near, lab))]
    by_rank = np.lexsort((dist[order], rank))
    return order[by_rank[: min(total, len(order))]]


def class_aware_swap(
    chosen: np.ndarray,
    cluster: np.ndarray,
    dist: np.ndarray,
    frac: np.ndarray,
    cluster_size: np.ndarray,
    assign: Callable[[int], tuple[int, float]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Swap tiles in until every class present in `frac` (n_tiles, K) is in some chosen tile.

    For each missing class (rarest first) the tile with the highest fraction of it replaces a rep of
    the cluster with the most members per rep, never one that alone covers a class. `assign(row)`
    gives the new tile's (cluster, distance to centre).
    """
    chosen, cluster, dist = chosen.copy(), cluster.copy(), dist.copy()
    present = frac.max(axis=0) > 0
    rarity = np.argsort(frac.sum(axis=0), kind="stable")
    for c in rarity:
        has = frac[chosen] > 0
        if not present[c] or has[:, c].any():
            continue
        col = frac[:, c].copy()
        col[chosen] = -1.0
        cand = int(np.argmax(col))
        new_has = frac[cand] > 0
        sole = has & (has.sum(axis=0) == 1) & ~new_has
        removable = ~sole.any(axis=1)
        if not removable.any():
            log.warning("class %d has no representative: every one is the only tile of another class", c)
            continue
        reps_in = np.bincount(cluster, minlength=len(cluster_size)).astype(np.float64)
        load = cluster_size[cluster] / np.maximum(reps_in[cluster], 1.0)
        # Most members per rep first, then the rep farthest from its centre.
        key = np.where(removable, load, -np.inf)
        best = np.flatnonzero(key == key.max())
        j = int(best[np.argmax(dist[best])])
        cl, d = assign(cand)
        chosen[j], cluster[j], dist[j] = cand, cl, d
    return chosen, cluster, dist


# ---------------------------------------------------------------- build_reps


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


# ---------------------------------------------------------------- outputs


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


def class_palette(ds: Dataset) -> np.ndarray:
    """(K+1, 3) uint8 lookup for mask + 1: row 0 is IGNORE (grey), then one colour per class."""
    k = ds.class_map.num_classes
    if ds.class_map.colors is not None and len(ds.class_map.colors) >= k:
        cols = [tuple(c) for c in ds.class_map.colors[:k]]
    elif k == 2:
        cols = [(0, 0, 0), (255, 255, 255)]
    else:
        # Evenly spread hues (golden angle), alternating brightness so neighbours differ.
        cols = []
        for i in range(k):
            r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 1.0 if i % 2 == 0 else 0.7)
            cols.append((int(r * 255), int(g * 255), int(b * 255)))
    return np.array([(128, 128, 128), *cols], dtype=np.uint8)


def colourise(mask: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W) class ids / IGNORE -> (H, W, 3) uint8."""
    return palette[np.clip(mask, IGNORE, len(palette) - 2) + 1]


def _to_rgb(tile: np.ndarray) -> Image.Image:
    return Image.fromarray(tile[:, :, 0] if tile.shape[2] == 1 else tile).convert("RGB")


def write_contact_sheet(ds: Dataset, reps: RepSet, path: Path) -> None:
    """One PNG: every representative at 64 px, 20 per row, with its cluster id and a strip
    showing its class mix in mask colours; a legend of the class colours at the bottom."""
    palette = class_palette(ds)
    names = ds.class_map.names
    r = len(reps.rows)
    cols = max(1, min(SHEET_COLUMNS, r))
    rows = max(1, math.ceil(r / cols))
    cell, strip, gap, pad = SHEET_CELL, 7, 4, 8
    font = ImageFont.load_default()
    legend_cols, legend_w = 4, 200
    legend_rows = math.ceil(len(names) / legend_cols)
    header = 18
    width = pad * 2 + cols * (cell + gap) - gap
    height = header + pad + rows * (cell + strip + gap) + legend_rows * 14 + pad
    width = max(width, legend_cols * legend_w + 2 * pad)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text(
        (pad, 4),
        f"{r} representatives of {reps.n_tiles} tiles ({reps.tile} px), {reps.n_clusters} clusters",
        fill=(0, 0, 0), font=font,
    )
    resample = Image.Resampling.NEAREST if reps.tile < cell else Image.Resampling.BILINEAR
    for k, img, _mask in _iter_rep_tiles(ds, reps):
        cx = pad + (k % cols) * (cell + gap)
        cy = header + pad + (k // cols) * (cell + strip + gap)
        sheet.paste(_to_rgb(img).resize((cell, cell), resample), (cx, cy))
        # Class mix as proportional bars under the tile, framed so white/black classes show.
        draw.rectangle([cx, cy + cell, cx + cell - 1, cy + cell + strip - 1], fill=(160, 160, 160))
        x0 = float(cx)
        for c, f in enumerate(reps.class_hist[k]):
            if f <= 0:
                continue
            x1 = x0 + float(f) * cell
            draw.rectangle([round(x0), cy + cell, max(round(x0), round(x1) - 1), cy + cell + strip - 1],
                           fill=tuple(int(v) for v in palette[c + 1]))
            x0 = x1
        draw.rectangle([cx, cy + cell, cx + cell - 1, cy + cell + strip - 1], outline=(90, 90, 90))
        label = str(int(reps.cluster[k]))
        box = draw.textbbox((cx + 1, cy + 1), label, font=font)
        draw.rectangle([box[0] - 1, box[1] - 1, box[2] + 1, box[3] + 1], fill=(0, 0, 0))
        draw.text((cx + 1, cy + 1), label, fill=(255, 255, 255), font=font)
    ly = header + pad + rows * (cell + strip + gap)
    for c, name in enumerate(names):
        lx = pad + (c % legend_cols) * legend_w
        yy = ly + (c // legend_cols) * 14
        draw.rectangle([lx, yy + 2, lx + 10, yy + 12], fill=tuple(int(v) for v in palette[c + 1]),
                       outline=(0, 0, 0))
        draw.text((lx + 14, yy + 1), f"{c} {name}"[:32], fill=(0, 0, 0), font=font)
    _atomic_save_png(sheet, Path(path))


def write_tile_pngs(ds: Dataset, reps: RepSet, folder: Path) -> None:
    """Per representative: `<n>_<stem>_x<x>_y<y>.png` (image) and `..._mask.png` (mask in class colours)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    palette = class_palette(ds)
    for k, img, mask in _iter_rep_tiles(ds, reps):
        stem = ds.pairs[int(reps.image[k])].stem
        base = f"{k:04d}_{stem}_x{int(reps.x[k])}_y{int(reps.y[k])}"
        _atomic_save_png(_to_rgb(img), folder / f"{base}.png")
        _atomic_save_png(Image.fromarray(colourise(mask, palette)), folder / f"{base}_mask.png")


def _atomic_save_png(img: Image.Image, path: Path) -> None:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())
