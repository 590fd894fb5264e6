"""The class map (`ClassMap`) a dataset's masks call for, chosen once from every raw value found in them:

* binary: masks holding only 0 and 255 (or only one of them) -> background 0, foreground 1.
  Here 255 is the foreground class, so `data.ignore_index` (default 255) does NOT apply.
  Masks holding 0/1 are binary too; there the ignore value (e.g. 255) is honoured.
* contiguous: gray masks holding class ids 0..K-1 (every id present). Ids may be missing only
  when `data.palette` or a classes.json declares K classes.
* palette: colour (RGB) masks, one colour per class, from `data.palette` (name -> [r, g, b], in
  class-id order) or a classes.json (or CVAT's labelmap.txt, CamVid's class_dict.csv) in the masks
  folder or beside it. Gray masks whose gray
  levels match an all-gray palette are mapped the same way.

`data.ignore_index` is a raw gray value mapped to IGNORE. For colour masks it means the colour
(v, v, v) when that colour is not a class, and the colour of a classes.json entry whose id is v.
A classes.json entry whose id equals the ignore value is not a class when it is the largest id
(e.g. VOC's 255 "void"). Any other value -> InputError listing the values and the files.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from autoseg.data.class_files import _ClassSpec
from autoseg.data.class_map import _GRAY, ClassMap, _format_keys, _pack_one
from autoseg.errors import InputError


def _unexpected(
    bad: Iterable[int], colour: bool, where: dict[int, Path], masks: Path, hint: str
) -> InputError:
    bad = sorted(bad)
    files = list(dict.fromkeys(where[k].name for k in bad if k in where))
    jpeg = any(where[k].suffix.lower() in (".jpg", ".jpeg") for k in bad if k in where)
    what = "colours" if colour else "values"
    msg = (
        f"{masks}: unexpected mask {what} {_format_keys(bad, colour)} "
        f"(found in {', '.join(files[:5])}{', ...' if len(files) > 5 else ''}); {hint}"
    )
    if jpeg:
        msg += "; JPEG compression alters mask values, save masks as PNG"
    return InputError(msg)


_GRAY_HINT = (
    "masks must hold 0/255 (binary) or class ids 0..K-1; add data.palette or a classes.json naming "
    "the classes, or set data.ignore_index to the value to ignore"
)


def _all_ignored(masks: Path, ignore: int | None) -> InputError:
    return InputError(f"{masks}: every mask pixel has the ignore value {ignore}; check data.ignore_index")


def _binary(values: tuple[int, int], spec: _ClassSpec | None, ignore: int | None) -> ClassMap:
    names = spec.names if spec is not None else ("background", "foreground")
    return ClassMap("binary", names, values, spec.colors if spec else None, ignore)


def _gray_class_map(values: set[int], spec: _ClassSpec | None, ignore: int | None,
                    where: dict[int, Path], masks: Path) -> ClassMap:
    w = values - {ignore} if ignore is not None else set(values)
    if spec is None:
        if values <= {0, 255} and (255 in values or values == {0}):
            return _binary((0, 255), None, None)  # 255 is foreground here, never ignored
        if not w:
            raise _all_ignored(masks, ignore)
        if w <= {0, 1}:
            return _binary((0, 1), None, ignore)
        run = 0
        while run in w:
            run += 1
        if run == max(w) + 1:
            names = tuple(f"class_{i}" for i in range(run))
            return ClassMap("contiguous", names, tuple(range(run)), None, ignore)
        hint = _GRAY_HINT if 0 in w else "class ids must start at 0; " + _GRAY_HINT
        raise _unexpected({v for v in w if v >= run}, False, where, masks, hint)

    k = spec.k
    grays = [c[0] for c in spec.colors or () if c[0] == c[1] == c[2]]
    gray_palette = spec.colors is not None and len(grays) == k
    ids_ok = w <= set(range(k))
    if gray_palette:
        g_ignore = ignore if ignore is not None and ignore not in grays else None
        gray_ok = (values - {g_ignore}) <= set(grays)
        if gray_ok and (not ids_ok or (ignore in values and ignore in grays)):
            return ClassMap("palette", spec.names, tuple(grays), spec.colors, g_ignore)
    if k == 2 and not gray_palette and values <= {0, 255} and 255 in values:
        return _binary((0, 255), spec, None)
    if ids_ok:
        if not w:
            raise _all_ignored(masks, ignore)
        if k == 2:
            return _binary((0, 1), spec, ignore)
        return ClassMap("contiguous", spec.names, tuple(range(k)), spec.colors, ignore)
    bad = {v for v in w if not 0 <= v < k}
    if gray_palette:
        bad_gray = {v for v in w if v not in grays}
        bad = min(bad, bad_gray, key=len)
    raise _unexpected(
        bad, False, where, masks,
        f"{spec.source} declares {k} classes (ids 0..{k - 1}); fix the masks, extend {spec.source} "
        "or set data.ignore_index to the value to ignore",
    )


def _colour_class_map(colours: set[int], spec: _ClassSpec | None, ignore: int | None,
                      where: dict[int, Path], masks: Path) -> ClassMap:
    if spec is None or spec.colors is None:
        raise InputError(
            f"{masks}: masks are colour-coded ({len(colours)} colours, e.g. {_format_keys(colours, True)}) "
            "but no class colours are given; add data.palette (name: [r, g, b]) "
            "or a classes.json with colours (a labelmap.txt or class_dict.csv from CVAT or CamVid works too)"
        )
    palette = {_pack_one(c) for c in spec.colors}
    ignore_colors = list(spec.ignore_colors)
    if ignore is not None and 0 <= ignore <= 255 and ignore * _GRAY not in palette:
        ignore_colors.append((ignore, ignore, ignore))
    bad = colours - palette - {_pack_one(c) for c in ignore_colors}
    if bad:
        raise _unexpected(
            bad, True, where, masks,
            f"every colour must be a class in {spec.source}; add the missing colours there or fix the masks",
        )
    return ClassMap("palette", spec.names, None, spec.colors, ignore, tuple(dict.fromkeys(ignore_colors)))
