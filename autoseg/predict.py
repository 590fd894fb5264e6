"""`autoseg predict`: label a folder of new images with an exported model, no masks needed.

The model file is self-describing (its metadata holds the classes, normalisation, tile and input
multiple), so a `best/model.onnx` copied anywhere still works. Masks are written in the encoding of the
training masks, so they drop into the same tools: gray levels as the masks held them (0/255 masks come
out 0/255), or the class colours for colour-coded masks.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

from autoseg.data import ClassMap, ImageRows, list_images
from autoseg.errors import InputError
from autoseg.infer import MODES, ort_runner, predict_labels, whole_pixel_limit
from autoseg.rundir import write_bytes_atomic
from autoseg.visual import palette
from edge_agent.predict import PngRows, overlay  # the device agent's PNG writer and overlay: one for both

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("classes", "mean", "std", "tile")


@dataclass(frozen=True)
class ModelInfo:
    """What prediction needs to know about an exported model, read from its metadata."""

    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    tile: int
    multiple: int
    class_map: ClassMap | None  # None for models exported before autoseg stored it: class ids are written
    width: int | None = None  # channels of the net's first level, when the metadata names the architecture


def read_metadata(path: Path) -> tuple[dict[str, str], list[int | None]]:
    """The metadata_props of an ONNX file and its input's static dims (weights are not loaded).

    Read with onnx alone: autoseg.export would import torch, a few hundred MB that predict never uses.
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such ONNX file; pass the model.onnx written by `autoseg export`")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises its own types
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path}: not a readable ONNX model ({reason}); re-export it") from None
    dims: list[int | None] = []
    if proto.graph.input:
        shape = proto.graph.input[0].type.tensor_type.shape
        dims = [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]
    return {p.key: p.value for p in proto.metadata_props}, dims


def _bad(path: Path, key: str, problem: str) -> InputError:
    return InputError(f"{path}: metadata {key!r} {problem}; export the model again with `autoseg export`")


def _json(path: Path, meta: dict[str, str], key: str) -> Any:
    try:
        return json.loads(meta[key])
    except ValueError:
        raise _bad(path, key, f"is not JSON ({meta[key][:40]!r})") from None


def _numbers(path: Path, meta: dict[str, str], key: str) -> tuple[float, ...]:
    v = _json(path, meta, key)
    if not isinstance(v, list) or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in v):
        raise _bad(path, key, f"must be a list of numbers, got {meta[key][:40]!r}")
    if not all(math.isfinite(x) for x in v):
        raise _bad(path, key, f"must hold finite numbers, got {meta[key][:40]!r}")
    return tuple(float(x) for x in v)


def _positive_int(path: Path, meta: dict[str, str], key: str, default: str | None = None) -> int:
    raw = meta.get(key, default)
    assert raw is not None
    if not re.fullmatch(r"\s*[0-9]+\s*", raw) or int(raw) < 1:
        raise _bad(path, key, f"must be a positive whole number, got {raw[:40]!r}")
    return int(raw)


def _first_width(arch: str | None) -> int | None:
    """Channels of the first level from the metadata's arch: a key like k3-3_c16-64_... or a JSON dict."""
    if not arch:
        return None
    with contextlib.suppress(ValueError, TypeError, KeyError, IndexError):
        return int(json.loads(arch)["channels"][0])
    m = re.search(r"_c(\d+)", arch)
    return int(m.group(1)) if m else None


def model_info(path: Path) -> ModelInfo:
    """Read and check the metadata of an ONNX model exported by autoseg: every fault is one line naming the key."""
    meta, dims = read_metadata(path)
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise InputError(f"{path}: metadata lacks {', '.join(missing)}; pass a model exported by "
                         "autoseg (RUN/best/model.onnx or `autoseg export`)")
    classes = _json(path, meta, "classes")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes) or len(classes) < 2:
        raise _bad(path, "classes", f"must be a list of two or more class names, got {meta['classes'][:40]!r}")
    mean, std = _numbers(path, meta, "mean"), _numbers(path, meta, "std")
    if len(mean) not in (1, 3):
        raise _bad(path, "mean", f"must hold 1 (gray) or 3 (RGB) values, got {len(mean)}")
    if len(std) != len(mean):
        raise _bad(path, "std", f"must hold as many values as mean ({len(mean)}), got {len(std)}")
    if not all(s > 0 for s in std):
        raise _bad(path, "std", f"must be positive, got {list(std)}")
    if len(dims) == 4 and dims[1] is not None and dims[1] != len(mean):
        raise _bad(path, "mean", f"has {len(mean)} value(s) but the net takes {dims[1]} channel(s)")
    tile = _positive_int(path, meta, "tile")
    multiple = _positive_int(path, meta, "input_multiple", "1")
    if tile % multiple:
        raise _bad(path, "tile", f"{tile} is not a multiple of input_multiple {multiple}")
    cmap = None
    if "class_map" in meta:
        try:
            cmap = ClassMap.from_dict(_json(path, meta, "class_map"))
            cmap.map_keys(np.zeros(1, np.int64), colour=False)  # builds its lookup table: bad values fail here
        except (ValueError, KeyError, TypeError, AttributeError, InputError) as e:
            raise _bad(path, "class_map", f"is damaged ({type(e).__name__}: {str(e)[:60]})") from None
        if cmap.num_classes != len(classes):
            cmap = None
    return ModelInfo(tuple(classes), mean, std, tile, multiple, cmap, _first_width(meta.get("arch")))


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


def mask_format(cmap: ClassMap | None, num_classes: int) -> tuple[int, type[np.unsignedinteger]]:
    """(channels, dtype) of the masks `encode_mask` writes: 1 or 3 (colours), uint8 or uint16."""
    if cmap is not None and cmap.colour_coded:
        return 3, np.uint8
    top = max(cmap.values or (0,)) if cmap is not None else num_classes - 1
    return 1, np.uint8 if top < 256 else np.uint16


def encode_mask(ids: np.ndarray, cmap: ClassMap | None, dtype: type[np.unsignedinteger] | None = None) -> np.ndarray:
    """Class ids (H, W) -> the training masks' encoding: (H, W) gray values, or (H, W, 3) RGB colours.

    `dtype` fixes the gray type (bands of one mask must agree); None picks uint8 when the values fit.
    """
    if cmap is not None and cmap.colour_coded:
        return np.asarray(cmap.colors, dtype=np.uint8)[ids]
    raw = ids if cmap is None else np.asarray(cmap.values)[ids]  # 0/255 masks come back 0/255
    return raw.astype(dtype or (np.uint8 if raw.max(initial=0) < 256 else np.uint16))


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """A temp file beside `path`, renamed over it when the block ends without error (as write_bytes_atomic)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _save_atomic(picture: Image.Image, path: Path) -> None:
    buf = io.BytesIO()
    picture.save(buf, format=Image.registered_extensions()[path.suffix.lower()])
    write_bytes_atomic(path, buf.getvalue())


def _session(model: Path) -> Any:
    try:
        return ort_runner(model)
    except Exception as e:  # onnxruntime raises its own types (Fail, InvalidGraph, ...)
        reason = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        raise InputError(f"{model}: onnxruntime cannot load it ({reason}); export the model again") from None


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

    Each image is labelled a band of rows at a time (infer.predict_labels), and its mask written as the
    bands come, so memory holds the image and a band of logits, not classes x H x W. File names are
    bytes as the OS gives them: `<stem>.png` keeps the image's name, UTF-8 or not.
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
    run = _session(model)
    k = len(info.classes)
    channels = len(info.mean)
    limit = whole_pixel_limit(channels, k, info.width)
    fmt = mask_format(info.class_map, k)
    pal = palette(k, info.class_map.colors if info.class_map else None)
    counts = np.zeros(k, np.int64)
    for path in tqdm(files, desc="predict", disable=not progress):
        # Pillow's decoded image is the only full-size copy: bands of rows are converted as they are needed.
        with ImageRows(path, channels) as image:
            h, w = image.shape[:2]
            shown = Image.new("RGB", (w, h)) if write_overlay else None  # filled band by band
            with _atomic_file(out / f"{path.stem}.png") as f:
                png = PngRows(f, w, h, *fmt)
                bands = predict_labels(run, image, info.mean, info.std, mode, info.tile, overlap, batch,
                                       info.multiple, limit)
                above = None  # the band before's last row: its borders drawn as on the whole image
                for y0, ids in bands:
                    if ids.max(initial=0) >= k:
                        raise InputError(f"{model}: the net outputs more classes than its metadata 'classes' names "
                                         f"({k}); export the model again")
                    counts += np.bincount(ids.ravel(), minlength=k)
                    png.write(encode_mask(ids, info.class_map, fmt[1]))
                    if shown is not None:
                        part = overlay(image[y0 : y0 + ids.shape[0]], ids, pal, above=above)
                        shown.paste(Image.fromarray(part), (0, y0))
                        above = ids[-1].copy() if len(ids) else above
                png.close()
        if shown is not None:
            _save_atomic(shown, out / f"{path.stem}_overlay.jpg")
            del shown  # before the next image is read
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
