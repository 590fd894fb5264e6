"""Pictures a person looks at: colourised masks and captioned image | truth | prediction strips."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from autoseg.rundir import write_bytes_atomic

if TYPE_CHECKING:
    from autoseg.data import Dataset


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
    idx = mask.astype(np.intp, copy=False)
    return pal[np.where(idx < 0, len(pal) - 1, idx)]


MAX_STRIP_WIDTH = 1536  # pixels; bigger strips are scaled down so the report stays light
_GAP = 4


def _nearest(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """`a` resampled to (h, w, ...) by nearest neighbour (pixel centres)."""
    ys = ((np.arange(h) + 0.5) * a.shape[0] / h).astype(np.intp)
    xs = ((np.arange(w) + 0.5) * a.shape[1] / w).astype(np.intp)
    return a[ys[:, None], xs[None, :]]


def classes_shown(*masks: np.ndarray) -> list[int]:
    """The class ids present in any of `masks` (IGNORE = -1 included when present), sorted."""
    return sorted(set().union(*(np.unique(m).tolist() for m in masks)))


PANEL_TITLES = ("image", "truth", "prediction")
_FONT_PX = 14


def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:  # Pillow's own scalable font (no file is read or downloaded); a bitmap one without FreeType
        return ImageFont.load_default(size=px)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def example_strip(image: np.ndarray, mask: np.ndarray, pred: np.ndarray, pal: np.ndarray,
                  names: Sequence[str]) -> np.ndarray:
    """image | ground truth | prediction side by side, each panel captioned, over a legend of the classes
    shown (their colour and name; "ignored" for IGNORE). RGB uint8."""
    rgb = image if image.shape[2] == 3 else np.repeat(image, 3, axis=2)
    h, w = mask.shape
    gap = np.full((h, _GAP, 3), 255, dtype=np.uint8)
    panels = np.concatenate([rgb, gap, colorize(mask, pal), gap, colorize(pred, pal)], axis=1)
    font = _font(_FONT_PX)
    line = _FONT_PX + 8
    shown = classes_shown(mask, pred)
    entries = [("ignored" if c < 0 else names[c] if c < len(names) else f"class {c}",
                tuple(int(v) for v in pal[c if c >= 0 else len(pal) - 1])) for c in shown]
    # Legend entries wrap to as many rows as the strip's width needs.
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widths = [line + 4 + int(probe.textlength(name, font=font)) + 14 for name, _ in entries]
    rows, x = 1, 6
    for wd in widths:
        if x + wd > panels.shape[1] and x > 6:
            rows, x = rows + 1, 6
        x += wd
    canvas = Image.new("RGB", (panels.shape[1], line + h + 4 + rows * line), (255, 255, 255))
    canvas.paste(Image.fromarray(panels), (0, line))
    draw = ImageDraw.Draw(canvas)
    for i, title in enumerate(PANEL_TITLES):
        f, px = font, _FONT_PX
        while px > 8 and draw.textlength(title, font=f) > w - 2:  # a narrow panel: a smaller caption
            px -= 1
            f = _font(px)
        cx = i * (w + _GAP) + w / 2
        draw.text((cx - draw.textlength(title, font=f) / 2, 3), title, fill=(20, 20, 20), font=f)
    x, y = 6, line + h + 4
    for (name, colour), wd in zip(entries, widths, strict=True):
        if x + wd > canvas.width and x > 6:
            x, y = 6, y + line
        draw.rectangle((x, y + 3, x + line - 6, y + line - 3), fill=colour, outline=(60, 60, 60))
        draw.text((x + line, y + 3), name, fill=(20, 20, 20), font=font)
        x += wd
    return np.asarray(canvas)


def write_example(ds: Dataset, i: int, image: np.ndarray, mask: np.ndarray, pred: np.ndarray, folder: Path) -> Path:
    """image | ground truth | prediction of test image `i` as one PNG in `folder`, captioned, with a legend.

    A strip wider than MAX_STRIP_WIDTH is scaled down panel by panel (nearest neighbour) before it is
    drawn, so a big test image costs a small picture, not three copies of itself.
    """
    pal = palette(ds.class_map.num_classes, ds.class_map.colors)
    h, w = mask.shape
    if 3 * w + 2 * _GAP > MAX_STRIP_WIDTH:
        scale = (MAX_STRIP_WIDTH - 2 * _GAP) / (3 * w)
        sh, sw = max(1, round(h * scale)), max(1, int(w * scale))
        image, mask, pred = (_nearest(a, sh, sw) for a in (image, mask, pred))
    strip = example_strip(image, mask, pred, pal, ds.class_map.names)
    path = folder / f"{ds.pairs[i].stem}.png"
    buf = io.BytesIO()
    Image.fromarray(strip).save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())
    return path
