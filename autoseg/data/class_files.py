"""Classes declared by the user: `data.palette`, or a class file in the masks folder or beside it.

Read: our classes.json (several shapes), CVAT's / Pascal VOC's labelmap.txt, CamVid's / Kaggle's class_dict.csv.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoseg.config import DataConfig
from autoseg.data.class_map import _SHOW, _rgb
from autoseg.errors import InputError

log = logging.getLogger("autoseg.data")  # one logger for the package: log lines keep the name they had

CLASSES_FILE = "classes.json"
# Where class names (and colours) are looked for, beside the masks or one folder up, first found wins:
# ours, CVAT's / Pascal VOC's export, CamVid's and Kaggle's.
CLASS_FILES = (CLASSES_FILE, "labelmap.txt", "class_dict.csv", "class_dict_seg.csv")


@dataclass(frozen=True)
class _ClassSpec:
    """Classes declared by data.palette or classes.json: names by id, optional colours."""

    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...] | None
    ignore_colors: tuple[tuple[int, int, int], ...]
    source: str

    @property
    def k(self) -> int:
        return len(self.names)


def _entries_from_json(obj: Any, where: str) -> dict[int, tuple[str, tuple[int, int, int] | None]]:
    """Accepts: {"classes": [...]}, [names], [{"id", "name", "color"|"colour"|"rgb"}], {name: id},
    {"id": name} and {name: [r, g, b]}. Returns id -> (name, colour or None)."""
    if isinstance(obj, dict) and "classes" in obj:
        return _entries_from_json(obj["classes"], where)
    out: dict[int, tuple[str, tuple[int, int, int] | None]] = {}
    if isinstance(obj, list):
        for pos, e in enumerate(obj):
            if isinstance(e, str):
                out[pos] = (e, None)
                continue
            if not isinstance(e, dict):
                raise InputError(f"{where}: entry {pos} must be a name or an object, got {e!r}")
            i = e.get("id", pos)
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                raise InputError(f"{where}: entry {pos} has id {i!r}; ids must be integers >= 0")
            if i in out:
                raise InputError(f"{where}: id {i} appears twice; give each class its own id")
            colour = next((e[k] for k in ("color", "colour", "rgb") if k in e), None)
            name = e.get("name", f"class_{i}")
            out[i] = (str(name), None if colour is None else _rgb(colour, f"{where}: class {name!r} colour"))
        return out
    if isinstance(obj, dict) and obj:
        vals = list(obj.values())
        if all(isinstance(v, int) and not isinstance(v, bool) for v in vals):  # {name: id}
            pairs = [(v, str(k)) for k, v in obj.items()]
        elif all(isinstance(k, str) and k.isdigit() for k in obj) and all(isinstance(v, str) for v in vals):
            pairs = [(int(k), v) for k, v in obj.items()]  # {"0": name}
        elif all(isinstance(v, list) for v in vals):  # {name: [r, g, b]}, ids in file order
            return {i: (str(k), _rgb(v, f"{where}: {k}")) for i, (k, v) in enumerate(obj.items())}
        else:
            pairs = []
        if pairs:
            for i, name in pairs:
                if i < 0:
                    raise InputError(f"{where}: class {name!r} has id {i}; ids must be >= 0")
                if i in out:
                    raise InputError(f"{where}: id {i} appears twice; give each class its own id")
                out[i] = (name, None)
            return out
    raise InputError(
        f"{where}: cannot read the classes; use a list of names or "
        '{"classes": [{"id": 0, "name": "background", "color": [0, 0, 0]}, ...]}'
    )


def _spec_from_entries(
    entries: dict[int, tuple[str, tuple[int, int, int] | None]], ignore: int | None, source: str
) -> _ClassSpec:
    ignore_colors: list[tuple[int, int, int]] = []
    if ignore is not None and ignore in entries:
        colour = entries[ignore][1]
        if colour is not None:
            ignore_colors.append(colour)
        if ignore == max(entries) and len(entries) > 1:
            entries = {i: e for i, e in entries.items() if i != ignore}  # e.g. VOC 255 "void"
    k = max(entries) + 1
    names = tuple(entries[i][0] if i in entries else f"class_{i}" for i in range(k))
    have = [i for i, e in entries.items() if e[1] is not None]
    colors = None
    if have:
        if len(have) != k:
            lacking = [i for i in range(k) if i not in have]
            raise InputError(
                f"{source}: classes {lacking[:_SHOW]} have no colour; "
                f"give every id 0..{k - 1} a colour, or none"
            )
        colors = tuple(entries[i][1] for i in range(k))  # type: ignore[misc]
        dup = {c for c in colors if colors.count(c) > 1}
        if dup:
            raise InputError(
                f"{source}: colour {sorted(dup)[0]} is used by several classes; colours must differ"
            )
    return _ClassSpec(names, colors, tuple(ignore_colors), source)


def _class_spec(masks: Path, cfg: DataConfig) -> _ClassSpec | None:
    if cfg.palette:
        entries = {
            i: (str(name), _rgb(c, f"data.palette.{name}")) for i, (name, c) in enumerate(cfg.palette.items())
        }
        return _spec_from_entries(entries, None, "data.palette")
    for folder in (masks, masks.parent):
        for name in CLASS_FILES:
            path = folder / name
            if path.is_file():
                log.info("class names from %s", path)
                return _spec_from_entries(_read_class_file(path), cfg.ignore_index, str(path))
    return None


def _read_class_file(path: Path) -> dict[int, tuple[str, tuple[int, int, int] | None]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read it ({e}); fix or remove the file") from None
    if path.suffix == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e}); fix or remove the file") from None
        return _entries_from_json(obj, str(path))
    if path.suffix == ".csv":
        return _entries_from_csv(text, str(path))
    return _entries_from_labelmap(text, str(path))


def _entries_from_csv(text: str, where: str) -> dict[int, tuple[str, tuple[int, int, int] | None]]:
    """CamVid / Kaggle `class_dict.csv`: a header `name,r,g,b` (any case and spacing), one class per row."""
    rows = [[c.strip() for c in row] for row in csv.reader(io.StringIO(text)) if any(c.strip() for c in row)]
    head = [h.lower() for h in rows[0]] if rows else []
    name_col = next((head.index(k) for k in ("name", "class", "label", "class_name") if k in head), None)
    if name_col is None or not {"r", "g", "b"} <= set(head):
        raise InputError(f"{where}: expected a header with name, r, g, b columns, got {rows[0] if rows else []}")
    cols = [head.index(k) for k in ("r", "g", "b")]
    out: dict[int, tuple[str, tuple[int, int, int] | None]] = {}
    for n, row in enumerate(rows[1:], start=2):
        try:
            rgb = [int(row[c]) for c in cols]
        except (ValueError, IndexError):
            raise InputError(f"{where}: line {n}: r, g, b must be integers 0-255, got {row}") from None
        out[len(out)] = (row[name_col], _rgb(rgb, f"{where}: line {n}"))
    return out


def _entries_from_labelmap(text: str, where: str) -> dict[int, tuple[str, tuple[int, int, int] | None]]:
    """CVAT / Pascal VOC export `labelmap.txt`: `label:r,g,b:parts:actions` per line, # comments."""
    out: dict[int, tuple[str, tuple[int, int, int] | None]] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split(":")
        try:
            rgb = [int(v) for v in fields[1].split(",")]
        except (ValueError, IndexError):
            raise InputError(f"{where}: line {n}: expected label:r,g,b:..., got {line.strip()!r}") from None
        out[len(out)] = (fields[0].strip(), _rgb(rgb, f"{where}: line {n}"))
    if not out:
        raise InputError(f"{where}: no classes in it; expected lines like background:0,0,0::")
    return out
