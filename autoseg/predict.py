"""`autoseg predict`: label a folder of new images with an exported model, no masks needed.

The model file is self-describing (its metadata holds the classes, normalisation, tile and input
multiple), so a `best/model.onnx` copied anywhere still works. Masks are written in the encoding of the
training masks, so they drop into the same tools: gray levels as the masks held them (0/255 masks come
out 0/255), or the class colours for colour-coded masks.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from autoseg.data import ClassMap, list_images, read_image
from autoseg.errors import InputError
from autoseg.export import read_metadata
from autoseg.infer import MODES, normalize, ort_runner, predict
from autoseg.rundir import write_bytes_atomic
from autoseg.visual import colorize, palette

log = logging.getLogger(__name__)

OVERLAY_ALPHA = 0.45


@dataclass(frozen=True)
class ModelInfo:
    """What prediction needs to know about an exported model, read from its metadata."""

    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    tile: int
    multiple: int
    class_map: ClassMap | None  # None for models exported before autoseg stored it: class ids are written


def model_info(path: Path) -> ModelInfo:
    """Read and check the metadata of an ONNX model exported by autoseg."""
    meta = read_metadata(path)
    missing = [k for k in ("classes", "mean", "std", "tile") if k not in meta]
    if missing:
        raise InputError(f"{path}: metadata lacks {', '.join(missing)}; pass a model exported by autoseg "
                         "(RUN/best/model.onnx or `autoseg export`)")
    try:
        classes = tuple(json.loads(meta["classes"]))
        mean = tuple(float(v) for v in json.loads(meta["mean"]))
        std = tuple(float(v) for v in json.loads(meta["std"]))
        tile = int(meta["tile"])
        multiple = int(meta.get("input_multiple", "1"))
        cmap = ClassMap.from_dict(json.loads(meta["class_map"])) if "class_map" in meta else None
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path}: damaged autoseg metadata ({type(e).__name__}: {e}); export it again") from None
    if cmap is not None and cmap.num_classes != len(classes):
        cmap = None
    return ModelInfo(classes, mean, std, tile, multiple, cmap)


def resolve_model(target: Path, int8: bool = False) -> Path:
    """A run directory means its best model; anything else must be an ONNX file."""
    if target.is_dir():
        path = target / "best" / ("model.int8.onnx" if int8 else "model.onnx")
        if not path.is_file():
            fix = "run the search with --int8" if int8 else "run `autoseg search` to completion first"
            raise InputError(f"{path}: not found; {fix}")
        return path
    if int8:
        raise InputError(f"{target}: --int8 picks the int8 model of a run directory; pass the int8 .onnx file itself")
    return target


def encode_mask(ids: np.ndarray, cmap: ClassMap | None) -> np.ndarray:
    """Class ids (H, W) -> the training masks' encoding: (H, W) gray values, or (H, W, 3) RGB colours."""
    if cmap is None:
        return ids.astype(np.uint8 if ids.max(initial=0) < 256 else np.uint16)
    if cmap.colour_coded:
        return np.asarray(cmap.colors, dtype=np.uint8)[ids]
    raw = np.asarray(cmap.values)[ids]  # the raw value of each class: 0/255 masks come back 0/255
    return raw.astype(np.uint8 if raw.max(initial=0) < 256 else np.uint16)


def overlay(image: np.ndarray, ids: np.ndarray, pal: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The image with the class colours blended over it, RGB uint8."""
    rgb = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image
    mixed = (1 - alpha) * rgb.astype(np.float32) + alpha * colorize(ids, pal).astype(np.float32)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def _save_atomic(array: np.ndarray, path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=Image.registered_extensions()[path.suffix.lower()])
    write_bytes_atomic(path, buf.getvalue())


def predict_folder(
    model: Path,
    images: Path,
    out: Path,
    *,
    mode: str = "auto",
    overlap: float = 0.5,
    batch: int = 8,
    write_overlay: bool = False,
    progress: bool = False,
) -> dict:
    """Predict every image in `images` and write `<stem>.png` masks (and `<stem>_overlay.jpg`) to `out`.

    Returns a summary: model, images, mode, and the share of pixels given to each class.
    """
    from tqdm.auto import tqdm

    if mode not in MODES:
        raise InputError(f"--eval-mode: must be one of {', '.join(MODES)}, got {mode!r}")
    files = list_images(images, "images", "--images")
    info = model_info(model)
    stems = [p.stem for p in files]
    twins = sorted({s for s in stems if stems.count(s) > 1})
    if twins:
        raise InputError(f"{images}: {twins[0]!r} names more than one image (e.g. .png and .jpg); "
                         "their masks would overwrite each other: rename or remove one")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{out}: cannot create the output folder ({e.strerror}); choose another --out") from None
    run = ort_runner(model)
    channels = len(info.mean)
    pal = palette(len(info.classes), info.class_map.colors if info.class_map else None)
    counts = np.zeros(len(info.classes), np.int64)
    for path in tqdm(files, desc="predict", disable=not progress):
        image = read_image(path, channels)
        logits = predict(run, normalize(image, info.mean, info.std), mode, info.tile, overlap, batch, info.multiple)
        ids = logits.argmax(axis=0)
        counts += np.bincount(ids.ravel(), minlength=len(info.classes))
        _save_atomic(encode_mask(ids, info.class_map), out / f"{path.stem}.png")
        if write_overlay:
            _save_atomic(overlay(image, ids, pal), out / f"{path.stem}_overlay.jpg")
    share = counts / max(1, counts.sum())
    summary = {
        "model": str(model),
        "images": len(files),
        "mode": mode,
        "encoding": _encoding(info.class_map),
        "class_share": {name: float(s) for name, s in zip(info.classes, share, strict=True)},
    }
    log.debug("wrote %d mask(s) to %s (%s)", len(files), out, summary["encoding"])  # the CLI prints the summary
    return summary


def _encoding(cmap: ClassMap | None) -> str:
    if cmap is None:
        return "class ids"
    if cmap.colour_coded:
        return "class colours (RGB)"
    return "gray levels as the training masks held them"


def class_share_text(share: dict[str, float], top: int = 5) -> str:
    best: Sequence[tuple[str, float]] = sorted(share.items(), key=lambda kv: -kv[1])[:top]
    return ", ".join(f"{name} {100 * s:.1f} %" for name, s in best)
