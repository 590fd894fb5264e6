"""`ClassMap`: raw mask values (gray levels or RGB colours) -> class ids 0..K-1, or IGNORE.

Masks in memory are int32 (or `mask_dtype(K)`) class ids 0..K-1 with `IGNORE` (-1) for ignored pixels.
Which map a dataset gets is decided in `autoseg.data.class_inference`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import numpy as np

from autoseg.data.images import _band_rows
from autoseg.errors import InputError

IGNORE: int = -1

_UNKNOWN = -2  # lookup result for a raw value the class map does not know
_GRAY = 0x010101  # packed colour of gray level v is v * _GRAY
_SHOW = 10  # values listed in an error message


def mask_dtype(num_classes: int) -> type[np.signedinteger]:
    """The smallest signed dtype holding class ids 0..num_classes-1 and IGNORE."""
    return np.int8 if num_classes <= 127 else np.int16 if num_classes <= 32767 else np.int32


@dataclass(frozen=True)
class ClassMap:
    """Raw mask values (gray levels or RGB colours) -> class ids. How one is chosen: autoseg.data.class_inference."""

    kind: Literal["binary", "contiguous", "palette"]
    names: tuple[str, ...]  # one per class id
    values: tuple[int, ...] | None  # raw gray value of each class; None: masks are colour-coded
    colors: tuple[tuple[int, int, int], ...] | None  # RGB of each class (lookup for palette, else display)
    ignore_index: int | None  # raw gray value mapped to IGNORE
    ignore_colors: tuple[tuple[int, int, int], ...] = ()  # colours mapped to IGNORE (colour masks)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def colour_coded(self) -> bool:
        return self.values is None

    def apply(self, raw: np.ndarray, dtype: type[np.signedinteger] = np.int32) -> np.ndarray:
        """Raw mask (H, W) or (H, W, 3) -> (H, W) class ids / IGNORE. ValueError on unknown values.

        Mapped a band of rows at a time, so a big colour mask never needs its 8-byte packed keys at once;
        `dtype` must hold -1..K-1 (mask_dtype(K) is the smallest).
        """
        if raw.ndim not in (2, 3):
            raise ValueError(f"mask must be (H, W) or (H, W, 3), got shape {raw.shape}")
        out = np.empty(raw.shape[:2], dtype)
        rows = _band_rows(raw.shape[1])
        for y0 in range(0, raw.shape[0], rows):
            out[y0 : y0 + rows] = self._apply(raw[y0 : y0 + rows])
        return out

    def _apply(self, raw: np.ndarray) -> np.ndarray:
        if raw.ndim == 3:
            if self.colour_coded:
                ids = self._lookup(_pack(raw))
            else:  # a gray mask stored as RGB: every channel holds the value
                raw = raw[..., 0]
        if raw.ndim == 2:
            fast = raw.dtype == np.uint8  # a 256-entry table instead of a search per pixel
            ids = self._lut8[raw] if fast else self.map_keys(raw.astype(np.int64), colour=False)
        if (ids == _UNKNOWN).any():
            bad = np.unique(raw[ids == _UNKNOWN] if raw.ndim == 2 else _pack(raw)[ids == _UNKNOWN])
            raise ValueError(f"unexpected mask values {_format_keys(bad, raw.ndim == 3)}")
        return ids

    def map_keys(self, keys: np.ndarray, colour: bool) -> np.ndarray:
        """Class id per raw key: gray levels, or packed colours (r << 16 | g << 8 | b) if `colour`."""
        keys = np.asarray(keys, dtype=np.int64)
        if self.colour_coded and not colour:
            keys = np.where((keys >= 0) & (keys <= 255), keys * _GRAY, -1)
        elif colour and not self.colour_coded:
            r, g, b = keys >> 16, (keys >> 8) & 255, keys & 255
            keys = np.where((r == g) & (g == b), r, -1)
        return self._lookup(keys)

    def _lookup(self, keys: np.ndarray) -> np.ndarray:
        table_keys, table_ids = self._table
        pos = np.searchsorted(table_keys, keys).clip(0, len(table_keys) - 1)
        return np.where(table_keys[pos] == keys, table_ids[pos], _UNKNOWN).astype(np.int32)

    @cached_property
    def _table(self) -> tuple[np.ndarray, np.ndarray]:
        table: dict[int, int] = {}
        if self.colour_coded:
            for i, c in enumerate(self.colors or ()):
                table[_pack_one(c)] = i
            for c in self.ignore_colors:  # the ignore mapping wins over a class of the same colour
                table[_pack_one(c)] = IGNORE
        else:
            table = {int(v): i for i, v in enumerate(self.values or ())}
            if self.ignore_index is not None:
                table[int(self.ignore_index)] = IGNORE
        keys = np.array(sorted(table), dtype=np.int64)
        return keys, np.array([table[k] for k in keys.tolist()], dtype=np.int32)

    @cached_property
    def _lut8(self) -> np.ndarray:
        return self.map_keys(np.arange(256), colour=False)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "names": list(self.names),
            "values": None if self.values is None else list(self.values),
            "colors": None if self.colors is None else [list(c) for c in self.colors],
            "ignore_index": self.ignore_index,
            "ignore_colors": [list(c) for c in self.ignore_colors],
        }

    @classmethod
    def from_dict(cls, d: dict) -> ClassMap:
        colors = d.get("colors")
        return cls(
            kind=d["kind"],
            names=tuple(d["names"]),
            values=None if d.get("values") is None else tuple(int(v) for v in d["values"]),
            colors=None if colors is None else tuple(_rgb(c) for c in colors),
            ignore_index=d.get("ignore_index"),
            ignore_colors=tuple(_rgb(c) for c in d.get("ignore_colors", ())),
        )


def _pack(rgb: np.ndarray) -> np.ndarray:
    a = rgb.astype(np.int64)
    return (a[..., 0] << 16) | (a[..., 1] << 8) | a[..., 2]


def _pack_one(c: Sequence[int]) -> int:
    return (int(c[0]) << 16) | (int(c[1]) << 8) | int(c[2])


def _format_keys(keys: Iterable[int], colour: bool) -> str:
    keys = sorted(int(k) for k in keys)
    shown = [
        f"({k >> 16}, {(k >> 8) & 255}, {k & 255})" if colour and k >= 0 else str(k) for k in keys[:_SHOW]
    ]
    return ", ".join(shown) + (f", ... ({len(keys)} in all)" if len(keys) > _SHOW else "")


def _rgb(c: Any, where: str = "colour") -> tuple[int, int, int]:
    if (
        not isinstance(c, list | tuple) or len(c) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in c)
    ):
        raise InputError(f"{where}: must be [r, g, b] with integers 0-255, got {c!r}")
    return (int(c[0]), int(c[1]), int(c[2]))
