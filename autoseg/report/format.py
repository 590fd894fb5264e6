"""Cell formatting shared by the Markdown and HTML reports: numbers, sizes, milliseconds, '–' for none."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

NA = "not available yet"


def _first(*vals: Any) -> Any:
    return next((v for v in vals if v is not None), None)


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float | np.integer | np.floating):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _si(v: Any, unit: str = "") -> str:
    f = _num(v)
    if f is None:
        return "–"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(f) >= div:
            return f"{f / div:.3g}{suffix}{unit}"
    return f"{f:.0f}{unit}"


def _f(v: Any, fmt: str = ".3f") -> str:
    f = _num(v)
    return "–" if f is None else format(f, fmt)


def _pct(v: Any) -> str:
    f = _num(v)
    return "–" if f is None else f"{100 * f:.2f} %"


def _ms(v: Any) -> str:
    f = _num(v)
    return "–" if f is None else f"{f:.3g}" if f < 100 else f"{f:.0f}"


def _objective_cell(r: dict, objective: str) -> str:
    vals = r["values"]
    if not vals:
        return "–"
    if objective == "pareto" and len(vals) == 2:
        return f"{_f(vals[0])}, {_ms(vals[1])} ms"
    return _f(vals[0], ".4f")


def _where(source: Any, device: Any) -> str:
    src, dev = str(source or "–"), str(device or "")
    return src if dev in ("", src) else f"{src} {dev}"


def _flagged(text: str, flags: Any) -> str:
    """A latency figure with why it is not a clean one next to it: "8.5 ⚠ busy: others used 1.3 cores"."""
    return f"{text} ⚠ {'; '.join(flags)}" if flags and text != "–" else text
