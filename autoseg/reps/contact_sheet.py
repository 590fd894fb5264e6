"""Pictures of the representatives: the contact sheet and one PNG pair (image, mask in class colours) per tile."""

from __future__ import annotations

import colorsys
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from autoseg.data import IGNORE, Dataset
from autoseg.reps.repset import RepSet, _iter_rep_tiles
from autoseg.rundir import write_bytes_atomic

SHEET_CELL = 64
SHEET_COLUMNS = 20


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
