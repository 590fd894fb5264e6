"""What the latency figures are worth: where they came from, whether they are comparable, where MACs mislead."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

# Label a latency-vs-MACs outlier only when it is this far off the fit: smaller gaps are measurement noise.
OUTLIER_MIN_RATIO = 1.25


def fit_loglog(x: Sequence[float], y: Sequence[float]) -> dict | None:
    """Least-squares line log10(y) = slope*log10(x) + intercept; None when it cannot be fitted."""
    lx, ly = np.log10(np.asarray(x, dtype=float)), np.log10(np.asarray(y, dtype=float))
    if len(lx) < 3 or np.ptp(lx) <= 0:
        return None
    slope, intercept = np.polyfit(lx, ly, 1)
    resid = ly - (slope * lx + intercept)
    total = float(((ly - ly.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / total if total > 0 else 1.0
    return {"slope": float(slope), "intercept": float(intercept), "r2": r2}


def _latency_provenance(rows: list[dict], trials: list[Any], study: dict | None, card: dict | None) -> dict:
    """Where the latencies came from, and loud warnings when they are not one comparable set."""
    def counted(r: dict) -> bool:  # a repeat reuses its twin's measurement
        return r["latency_ms"] is not None and r["same_as_trial"] is None

    measured = [r for r in rows if counted(r)]
    sources = sorted({str(r["latency_source"]) for r in measured if r["latency_source"]})
    devices = sorted({str(r["device"]) for r in measured if r["device"]})
    fps: dict[str, dict] = {}
    for t, r in zip(trials, rows, strict=True):
        fid = r["fingerprint_id"]
        if not counted(r) or not fid:
            continue
        entry = fps.setdefault(fid, {"fingerprint": {}, "devices": set(), "trials": 0})
        lat = t.user_attrs.get("latency")
        if isinstance(lat, dict) and isinstance(lat.get("fingerprint"), dict) and not entry["fingerprint"]:
            entry["fingerprint"] = lat["fingerprint"]
        entry["devices"].add(str(r["device"]))
        entry["trials"] += 1
    if card and isinstance(card.get("fingerprint"), dict) and not fps:
        fps["final"] = {"fingerprint": card["fingerprint"], "devices": {str(card.get("device"))}, "trials": 0}
    warnings = []
    if len(sources) > 1:
        counts = Counter(str(r["latency_source"]) for r in measured)
        warnings.append("Latency sources are MIXED across trials ("
                        + ", ".join(f"{k}: {v} trials" for k, v in sorted(counts.items()))
                        + "): these numbers are not comparable; rank nets by one source only.")
    precisions = Counter(str(r["precision"]) for r in measured)
    if len(precisions) > 1:
        warnings.append("Some nets were timed in int8 and some in float32 ("
                        + ", ".join(f"{k}: {v} trials" for k, v in sorted(precisions.items()))
                        + "): these numbers are not comparable.")
    if len(devices) > 1:
        warnings.append(f"Latency was measured on {len(devices)} different devices ({', '.join(devices)}): "
                        "not comparable.")
    elif len([f for f in fps if f != "final"]) > 1:
        warnings.append(f"The device fingerprint changed during the study ({len(fps)} fingerprints: "
                        "OS, onnxruntime or providers differ): latencies may not be comparable.")
    sattrs = (study or {}).get("user_attrs", {})
    if sattrs.get("source") and sources and sources != [sattrs["source"]]:
        warnings.append(f"The study asked for latency from {sattrs['source']!r} ({sattrs.get('device', '?')}) "
                        f"but trials were measured by {', '.join(sources)} (fallback?).")
    if card and card.get("latency_source") and sources and card["latency_source"] not in sources:
        warnings.append(f"The final net's latency source ({card['latency_source']}) differs from the "
                        f"trials' ({', '.join(sources)}).")
    throttled = [r["number"] for r in measured if r["throttled"] is True]
    if throttled:
        warnings.append(f"{len(throttled)} measurement(s) ran while the device reported thermal throttling "
                        f"(trials {', '.join(map(str, throttled[:10]))}): those latencies are inflated.")
    emulated = [r["number"] for r in measured if r.get("emulated")]
    if emulated:
        fp = next((e["fingerprint"] for e in fps.values() if e["fingerprint"].get("emulated")), {})
        warnings.append(f"{len(emulated)} measurement(s) ran on an EMULATED device ({fp.get('emulator', 'qemu')} "
                        f"on a {fp.get('kernel_arch', '?')} kernel): those figures prove function, not the "
                        "board's speed.")
    return {
        "sources": sources,
        "devices": devices,
        "emulated": bool(emulated),
        "mixed": len(sources) > 1 or len(devices) > 1,
        "cached": sum(1 for r in measured if r["cached"]),
        "measured_trials": len(measured),
        "fingerprints": {k: {**v, "devices": sorted(v["devices"])} for k, v in fps.items()},
        "warnings": warnings,
        "axis_label": _latency_label(sources, devices, sorted({r["measure_size"] for r in measured
                                                               if isinstance(r["measure_size"], int)}),
                                     sorted({str(r["precision"]) for r in measured}), bool(emulated)),
    }


def _latency_label(sources: list[str], devices: list[str], sizes: Sequence[int] = (),
                   precisions: Sequence[str] = (), emulated: bool = False) -> str:
    if not sources and not devices:
        return "latency, ms (source unknown)"
    if len(sources) > 1 or len(devices) > 1:
        return f"latency, ms — MIXED: {', '.join(devices or sources)} (not comparable)"
    dev = devices[0] if devices else "?"
    src = sources[0] if sources else "?"
    where = "this host" if dev == "local" else dev
    # Small inputs make latency mostly per-layer overhead: the size is part of what the number means.
    at = (f" at {sizes[0]}x{sizes[0]} px" if len(sizes) == 1
          else f" at {sizes[0]}-{sizes[-1]} px square, per net" if sizes else "")
    kind = "int8 " if list(precisions) == ["int8"] else ""  # float unless every net was timed quantized
    return f"{kind}latency{at} on {where} ({src}{', EMULATED' if emulated else ''}), ms"


def _macs_outliers(pts: list[dict], fit: dict, k: int = 3) -> list[dict]:
    out = []
    for p in pts:
        pred = 10 ** (fit["slope"] * math.log10(p["macs"]) + fit["intercept"])
        out.append({"trial": p["number"], "arch": p["arch"], "macs": p["macs"], "latency_ms": p["latency_ms"],
                    "predicted_ms": pred, "ratio": p["latency_ms"] / pred})
    out.sort(key=lambda o: -abs(math.log(o["ratio"])))
    return [o for o in out[:k] if max(o["ratio"], 1 / o["ratio"]) >= OUTLIER_MIN_RATIO]
