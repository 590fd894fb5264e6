"""Pairing each image with its mask by file name; names that are not UTF-8 and broken links are refused."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from autoseg.errors import InputError

log = logging.getLogger("autoseg.data")  # one logger for the package: log lines keep the name they had

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass(frozen=True)
class Pair:
    stem: str
    image: Path
    mask: Path


def list_images(folder: Path, role: str, key: str | None = None) -> list[Path]:
    """The image files in `folder`, sorted; `key` is the setting to name when there are none (data.<role>)."""
    key = key or f"data.{role}"
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a folder"
        raise InputError(f"{folder}: {role} folder {what}; check the {key} path")
    files = []
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in IMAGE_EXTS or p.name.startswith("."):
            continue
        if p.is_symlink() and not p.exists():  # is_file() is False: it would vanish without a word
            raise InputError(f"{p}: broken symbolic link (to {_link_target(p)}); fix the link or remove it")
        if p.is_file():
            files.append(p)
    if not files:
        raise InputError(
            f"{folder}: no {role} found (looked for {', '.join(IMAGE_EXTS)}); check the {key} path"
        )
    return files


def _link_target(p: Path) -> str:
    try:
        return _shown(Path(os.readlink(p)))
    except OSError:
        return "?"


def _shown(p: Path) -> str:
    """The path as printable text: bytes that are not UTF-8 as \\xNN."""
    return os.fsencode(p).decode("utf-8", "backslashreplace")


def _require_utf8(paths: Iterable[Path], key: str) -> None:
    """Names that are not UTF-8 are refused here: run folders, manifests and reports are UTF-8 text."""
    for p in paths:
        try:
            str(p).encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(
                f"{_shown(p)}: the name is not valid UTF-8 (under {key}); rename it, e.g. with "
                "`convmv -f latin1 -t utf8 --notest -r FOLDER`"
            ) from None


def find_pairs(images: Path, masks: Path, suffixes: Sequence[str]) -> list[Pair]:
    """Pair each image with the mask named `<stem>.<ext>` or `<stem><suffix>.<ext>`, sorted by stem."""
    images, masks = Path(images), Path(masks)
    suffixes = [s for s in suffixes if s]
    _require_utf8([images.absolute()], "data.images")
    _require_utf8([masks.absolute()], "data.masks")
    image_files = list_images(images, "images")
    mask_files = list_images(masks, "masks")
    _require_utf8(image_files, "data.images")
    _require_utf8(mask_files, "data.masks")
    by_stem: dict[str, list[Path]] = {}
    for p in mask_files:
        by_stem.setdefault(p.stem, []).append(p)
    if images.resolve() == masks.resolve():
        # One folder for both: a file is a mask when its stem is another file's stem plus a suffix.
        stems = {p.stem for p in image_files}
        is_mask = {
            p for p in image_files for s in suffixes if p.stem.endswith(s) and p.stem[: -len(s)] in stems
        }
        image_files = [p for p in image_files if p not in is_mask]
        by_stem = {}
        for p in is_mask:
            by_stem.setdefault(p.stem, []).append(p)

    seen: dict[str, Path] = {}
    pairs, missing = [], []
    used: set[Path] = set()
    for img in image_files:
        if img.stem in seen:
            raise InputError(
                f"{images}: {seen[img.stem].name} and {img.name} share the stem {img.stem!r}; "
                "keep one image per stem"
            )
        seen[img.stem] = img
        candidates = [m for name in dict.fromkeys([img.stem] + [img.stem + s for s in suffixes])
                      for m in by_stem.get(name, []) if m != img]
        if not candidates:
            missing.append(img)
            continue
        if len(candidates) > 1:
            raise InputError(
                f"{masks}: image {img.name} matches several masks ({', '.join(m.name for m in candidates)}); "
                "keep one mask per image"
            )
        pairs.append(Pair(img.stem, img, candidates[0]))
        used.add(candidates[0])
    if missing:
        shown = ", ".join(p.name for p in missing[:5]) + (", ..." if len(missing) > 5 else "")
        example = f"<stem>{suffixes[0]}.png" if suffixes else "<stem>.png"
        raise InputError(
            f"{images}: {len(missing)} image{'s have' if len(missing) > 1 else ' has'} no mask in {masks}: "
            f"{shown}; name masks <stem>.png or {example}"
        )
    orphans = [m for ms in by_stem.values() for m in ms if m not in used]
    if orphans:
        log.warning(
            "%s: %d mask(s) without an image are skipped: %s",
            masks, len(orphans), ", ".join(sorted(m.name for m in orphans)[:5]),
        )
    return sorted(pairs, key=lambda p: p.stem)
