"""What the latency figures are worth: where they came from, whether they are comparable, where MACs mislead."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

# Label a latency-vs-MACs outlier only when it is this far off the fit: smaller gaps are measurement noise.
OUTLIER_MIN_RATIO = 1.25

# Judging a measurement recorded before measurements carried their own "flags" (autoseg.devices sets them
# now, with the same limits and wording): the figure is not a clean one when other processes kept more
# cores busy than this, when p90 is this many times the median (a quiet CPU stays within ~1.2x), when the
# SoC warmed this much while timing, or when the device throttled or was emulated.
BUSY_CORES = 0.5
NOISY_P90_RATIO = 1.5
NOISY_MIN_RUNS = 10  # fewer runs: their p90 says nothing about noise
TEMP_RISE_C = 5.0
MAX_LISTED = 8  # flagged trials named in a warning; the table has them all
EMULATED = "emulated"  # a flag of its own: it has its own warning, and is not "unreliable timing" but no timing
_BUSY_NOTE = re.compile(r"device busy: others used ([0-9.]+) cores")


def latency_flags(m: Any) -> list[str]:
    """Why a latency measurement (Measurement.to_dict()) is not a clean figure; [] for a clean one.

    A record with "flags" is taken at its word. An older one is judged from what it holds: the "device
    busy" note the search added to its message, cpu_others, throttled, the temperatures, emulated, and
    p90 against the median. A failed measurement has no figure, so nothing to flag.
    """
    if not isinstance(m, dict):
        return []
    if isinstance(m.get("flags"), list | tuple):
        return [str(f) for f in m["flags"]]
    if m.get("error") not in (None, 0, "OK"):
        return []
    flags = []
    busy = _BUSY_NOTE.search(str(m.get("message") or ""))
    others = _real(m.get("cpu_others"))
    if busy:
        flags.append(f"busy: others used {float(busy.group(1)):.1f} cores")
    elif others is not None and others > BUSY_CORES:
        flags.append(f"busy: others used {others:.1f} cores")
    elif "device busy" in str(m.get("message") or ""):
        flags.append("busy")
    stats = m.get("stats") if isinstance(m.get("stats"), dict) else {}
    median, p90, count = _real(stats.get("median_ms")), _real(stats.get("p90_ms")), _real(stats.get("count"))
    if median and p90 is not None and (count is None or count >= NOISY_MIN_RUNS) and p90 / median > NOISY_P90_RATIO:
        flags.append(f"noisy: p90/median {p90 / median:.1f}")
    if m.get("throttled") is True:
        flags.append("throttled")
    before, after = _real(m.get("temp_before_c")), _real(m.get("temp_after_c"))
    if before is not None and after is not None and after - before > TEMP_RISE_C:
        flags.append(f"temperature rose {after - before:.1f} °C")
    fp = m.get("fingerprint") if isinstance(m.get("fingerprint"), dict) else {}
    if m.get("emulated") or fp.get("emulated"):
        flags.append(EMULATED)
    return flags


def entry_flags(entry: Any, prefix: str = "") -> list[str] | None:
    """The flags a model-card entry holds for its `prefix`latency: a list under `prefix`latency_flags, or a
    whole measurement under `prefix`latency; None when it holds neither (a card from before flags)."""
    if not isinstance(entry, dict):
        return None
    v = entry.get(f"{prefix}latency_flags")
    if isinstance(v, list | tuple):
        return [str(x) for x in v]
    m = entry.get(f"{prefix}latency")
    return latency_flags(m) if isinstance(m, dict) else None


def unreliable(flags: Sequence[str]) -> list[str]:
    """The flags that make a timing unreliable (all but "emulated", which is warned about on its own)."""
    return [f for f in flags if f != EMULATED]


def _real(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v) if math.isfinite(v) else None


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
    # Several devices under one fingerprint id: a device pool, whose members are of one kind (autoseg.devices.pool).
    pooled = len(devices) > 1 and len([f for f in fps if f != "final"]) == 1
    if len(devices) > 1 and not pooled:
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
    flagged = [(r.get("number"), f) for r in measured if (f := unreliable(r.get("latency_flags") or []))]
    if flagged:
        shown = "; ".join(f"#{n} {', '.join(f)}" for n, f in flagged[:MAX_LISTED])
        more = f"; and {len(flagged) - MAX_LISTED} more (see the trials table)" if len(flagged) > MAX_LISTED else ""
        warnings.append(f"{len(flagged)} of {len(measured)} latency figure(s) were measured while the device was "
                        f"busy, throttled or noisy, and may be inflated: {shown}{more}. Rank those nets with care, "
                        "or measure again on a quiet device.")
    emulated = [r["number"] for r in measured if r.get("emulated")]
    if emulated:
        fp = next((e["fingerprint"] for e in fps.values() if e["fingerprint"].get("emulated")), {})
        warnings.append(f"{len(emulated)} measurement(s) ran on an EMULATED device ({fp.get('emulator', 'qemu')} "
                        f"on a {fp.get('kernel_arch', '?')} kernel): those figures prove function, not the "
                        "board's speed.")
    return {
        "sources": sources,
        "devices": devices,
        "flagged_trials": [n for n, _ in flagged],
        "emulated": bool(emulated),
        "mixed": len(sources) > 1 or (len(devices) > 1 and not pooled),
        "pooled": pooled,
        "cached": sum(1 for r in measured if r["cached"]),
        "measured_trials": len(measured),
        "fingerprints": {k: {**v, "devices": sorted(v["devices"])} for k, v in fps.items()},
        "warnings": warnings,
        "axis_label": _latency_label(sources, devices, sorted({r["measure_size"] for r in measured
                                                               if isinstance(r["measure_size"], int)}),
                                     sorted({str(r["precision"]) for r in measured}), bool(emulated), pooled),
    }


def _latency_label(sources: list[str], devices: list[str], sizes: Sequence[int] = (),
                   precisions: Sequence[str] = (), emulated: bool = False, pooled: bool = False) -> str:
    if not sources and not devices:
        return "latency, ms (source unknown)"
    if len(sources) > 1 or (len(devices) > 1 and not pooled):
        return f"latency, ms — MIXED: {', '.join(devices or sources)} (not comparable)"
    dev = f"a pool of {len(devices)} alike devices" if pooled else devices[0] if devices else "?"
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
