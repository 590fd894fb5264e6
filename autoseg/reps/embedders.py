"""Tile features: the `Embedder` protocol, the default handcrafted embedder (no weights) and the CNN embedder."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Protocol

import numpy as np

from autoseg.config import RepsConfig
from autoseg.errors import InputError
from autoseg.reps.blocks import _Grid
from autoseg.reps.networks import _small_cnn, load_resnet18


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
