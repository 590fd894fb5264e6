"""A small synthetic aerial dataset, drawn with numpy (no downloads), for `autoseg demo` and tests.

Each scene: textured ground with fields, a lake with ripples, straight or curved roads (asphalt
or dirt), rotated gable roofs with shadows, and trees / shrub patches with leafy texture. Colours,
lighting and noise vary per image, and some classes look alike on purpose (dirt road vs soil,
dark roof vs asphalt, teal water vs dark vegetation), so the task is learnable but not trivial.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from autoseg.errors import InputError

log = logging.getLogger(__name__)

CLASSES = ("background", "road", "roof", "vegetation", "water")
COLOURS = ((150, 120, 85), (90, 90, 95), (190, 75, 55), (60, 135, 50), (40, 90, 170))  # display only
BACKGROUND, ROAD, ROOF, VEGETATION, WATER = range(5)
MARKER = ".autoseg_demo.json"
_VERSION = 1  # bump when the drawing changes, so old folders are regenerated


def generate_demo(out: Path, n_images: int = 24, size: int = 192, seed: int = 0) -> tuple[Path, Path]:
    """Write out/images/*.png (RGB), out/masks/*.png (class ids) and out/classes.json; return the folders.

    Skips the work when `out` already holds a complete demo with the same parameters. Writes into a
    temporary folder beside `out` and renames it into place, so `out` is never half-written.
    """
    out = Path(out)
    if n_images < 1 or size < 16:
        raise InputError(f"demo: need n_images >= 1 and size >= 16, got {n_images} and {size}")
    params = {"version": _VERSION, "n_images": n_images, "size": size, "seed": seed}
    if _complete(out, params):
        log.info("%s: demo data already present", out)
        return out / "images", out / "masks"
    if out.exists() and not (out / MARKER).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: exists and is not a demo folder; choose another output folder or remove it")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write(tmp, params)
        old = None
        if out.exists() and (out / MARKER).is_file():  # ours, with other parameters: replace it
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
        try:
            tmp.rename(out)
        except OSError:
            if not _complete(out, params):  # a concurrent run may have won the race with the same data
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s: wrote %d demo images of %dx%d", out, n_images, size, size)
    return out / "images", out / "masks"


def _complete(out: Path, params: dict) -> bool:
    try:
        return json.loads((out / MARKER).read_text()) == params
    except (OSError, ValueError):
        return False


def _write(folder: Path, params: dict) -> None:
    (folder / "images").mkdir()
    (folder / "masks").mkdir()
    rng = np.random.default_rng(params["seed"])
    for i in range(params["n_images"]):
        image, mask = draw_scene(rng, params["size"])
        Image.fromarray(image, "RGB").save(folder / "images" / f"demo_{i:03d}.png", compress_level=1)
        Image.fromarray(mask, "L").save(folder / "masks" / f"demo_{i:03d}.png", compress_level=1)
    classes = [{"id": i, "name": n, "color": list(c)} for i, (n, c) in enumerate(zip(CLASSES, COLOURS, strict=True))]
    (folder / "classes.json").write_text(json.dumps({"classes": classes}, indent=1))
    (folder / MARKER).write_text(json.dumps(params))  # last: marks the folder complete


# ---------------------------------------------------------------- drawing


def _noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth value noise in [0, 1]: a random (cells+1)^2 grid, bilinear with smoothstep weights."""
    g = rng.random((cells + 1, cells + 1), dtype=np.float32)
    t = np.linspace(0, cells, size, endpoint=False, dtype=np.float32)
    i = t.astype(np.int32)
    f = t - i
    f = f * f * (3 - 2 * f)
    rows = g[i] * (1 - f)[:, None] + g[i + 1] * f[:, None]  # (size, cells+1)
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _fractal(rng: np.random.Generator, size: int, cells: tuple[int, ...] = (3, 7, 17)) -> np.ndarray:
    out = np.zeros((size, size), dtype=np.float32)
    amp, total = 1.0, 0.0
    for c in cells:
        out += amp * _noise(rng, size, c)
        total += amp
        amp *= 0.5
    return out / total


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: float) -> np.ndarray:
    return np.clip(np.asarray(rgb, dtype=np.float32) + rng.normal(0, amount, 3).astype(np.float32), 0, 255)


def _window(cy: float, cx: float, r: float, size: int) -> tuple[slice, slice]:
    """Slices of the square of half-side `r` around (cy, cx), clipped to the image."""
    return (
        slice(max(0, int(cy - r)), min(size, int(cy + r) + 2)),
        slice(max(0, int(cx - r)), min(size, int(cx + r) + 2)),
    )


def draw_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (image (S, S, 3) uint8, mask (S, S) uint8 class ids)."""
    s = size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    mask = np.zeros((s, s), dtype=np.uint8)

    # Ground: two earth tones blended by low-frequency "fields", with grain.
    soils = [(150, 120, 85), (175, 155, 110), (120, 115, 70), (135, 100, 70), (165, 140, 100)]
    a, b = rng.choice(len(soils), 2, replace=False)
    fields = _noise(rng, s, int(rng.integers(2, 5)))[..., None]
    img = _jitter(rng, soils[a], 10) * (1 - fields) + _jitter(rng, soils[b], 10) * fields
    img *= (0.85 + 0.3 * _fractal(rng, s, (9, 23)))[..., None]

    # Water: a blob from thresholded noise, biased towards a random centre.
    if rng.random() < 0.65:
        cy, cx = (float(v) for v in rng.uniform(0.1, 0.9, 2) * s)
        r = rng.uniform(0.15, 0.35) * s
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / r
        water = (_fractal(rng, s, (3, 6, 13)) * 1.2 - d) > 0.0
        tone = [(40, 90, 170), (35, 75, 120), (50, 110, 120), (30, 60, 90)][rng.integers(4)]
        angle = rng.uniform(0, np.pi)
        ca, sa = float(np.cos(angle)), float(np.sin(angle))
        wobble = 6 * _noise(rng, s, 5)[water]
        ripple = np.sin((xx[water] * ca + yy[water] * sa) * rng.uniform(0.4, 0.9) + wobble)
        img[water] = _jitter(rng, tone, 8) * (0.93 + 0.07 * ripple)[:, None]
        mask[water] = WATER

    # Roads: straight lines or sine curves, asphalt or dirt (dirt is close to the soil colour).
    grain = 0.9 + 0.2 * _noise(rng, s, 31)
    for _ in range(int(rng.integers(1, 4))):
        half = rng.uniform(2.5, 6.0)
        if rng.random() < 0.5:
            angle = rng.uniform(0, np.pi)
            py, px = (float(v) for v in rng.uniform(0.2, 0.8, 2) * s)
            ca, sa = float(np.cos(angle)), float(np.sin(angle))
            dist = np.abs((xx - px) * sa - (yy - py) * ca)
        else:
            u, v = (yy, xx) if rng.random() < 0.5 else (xx, yy)
            amp, period, phase = rng.uniform(0.05, 0.25) * s, rng.uniform(0.6, 2.0) * s, rng.uniform(0, 6.3)
            c0 = rng.uniform(0.2, 0.8) * s
            k = 2 * np.pi / period
            arg = k * v + phase  # distance to the curve, first-order corrected for its slope
            dist = np.abs(u - (c0 + amp * np.sin(arg))) / np.sqrt(1 + (amp * k * np.cos(arg)) ** 2)
        road = dist < half
        tone = (85, 85, 90) if rng.random() < 0.7 else (160, 135, 100)
        img[road] = _jitter(rng, tone, 10) * grain[road][:, None]
        mask[road] = ROAD
        if tone[0] < 100 and rng.random() < 0.5:  # dashed centre line, still road
            line = (dist < 0.7) & (np.sin((xx + yy) * 0.5) > 0)
            img[line] = (225, 225, 215)

    # Roofs: rotated rectangles with a gable (two shaded halves) and a shadow on the ground.
    shade = np.ones((s, s), dtype=np.float32)
    for _ in range(int(rng.integers(2, 9))):
        for _try in range(10):
            cy, cx = rng.uniform(0.05, 0.95, 2) * s
            if mask[int(cy), int(cx)] == BACKGROUND:
                break
        hl, hw = float(rng.uniform(5, 16)), float(rng.uniform(4, 10))
        t = rng.uniform(0, np.pi)
        ct, st = float(np.cos(t)), float(np.sin(t))
        sy, sx = (float(v) for v in rng.uniform(2, 5, 2))
        # Work in a window around the roof and its shadow: most of the image is untouched.
        win = _window(cy, cx, hl + hw + sy + sx + 1, s)
        y, x = yy[win] - float(cy), xx[win] - float(cx)
        in_shadow = (np.abs((x - sx) * ct + (y - sy) * st) < hl) & (np.abs(-(x - sx) * st + (y - sy) * ct) < hw)
        shade[win][in_shadow] = 0.55
        v = -x * st + y * ct
        roof = (np.abs(x * ct + y * st) < hl) & (np.abs(v) < hw)
        tone = [(190, 75, 55), (80, 80, 85), (140, 95, 70), (205, 200, 190), (120, 60, 50)][rng.integers(5)]
        light = np.where(v > 0, 1.12, 0.82)[roof][:, None]
        img[win][roof] = _jitter(rng, tone, 12) * light + rng.normal(0, 4, (int(roof.sum()), 3))
        mask[win][roof] = ROOF
        shade[win][roof] = 1.0
    img *= np.where(mask == BACKGROUND, shade, 1.0)[..., None]

    # Vegetation: clusters of round trees (with leafy texture) and a few shrub patches on ground.
    leaves = 0.65 + 0.6 * _noise(rng, s, max(8, s // 4))
    greens = [(60, 135, 50), (40, 95, 40), (90, 130, 60), (50, 110, 70)]
    veg = np.zeros((s, s), dtype=bool)
    for _ in range(int(rng.integers(1, 5))):
        gy, gx = rng.uniform(0, 1, 2) * s
        for _t in range(int(rng.integers(3, 12))):
            ty, tx = gy + rng.normal(0, 0.08 * s), gx + rng.normal(0, 0.08 * s)
            r = float(rng.uniform(3, 9) * (0.85 + 0.3 * rng.random()))
            win = _window(ty, tx, r + 1, s)
            veg[win] |= (yy[win] - float(ty)) ** 2 + (xx[win] - float(tx)) ** 2 < r * r
    if rng.random() < 0.6:
        patch = (_fractal(rng, s, (4, 11)) > rng.uniform(0.6, 0.7)) & (mask == BACKGROUND)
        veg |= patch
    veg &= mask != WATER
    tone = greens[rng.integers(len(greens))]
    img[veg] = _jitter(rng, tone, 10) * leaves[veg][:, None]
    mask[veg] = VEGETATION

    # Lighting, colour cast and sensor noise for the whole image.
    img = img * rng.uniform(0.85, 1.15) + rng.normal(0, 6, 3).astype(np.float32)
    img += 4 * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), mask
