"""The report a person reads to choose a net: RUN/report.md, a self-contained RUN/report.html, RUN/report.json.

It only reads the run directory. The Optuna storage is opened through a read-only SQLite connection,
so a report can be written while the search is still running; every part that does not exist yet
becomes a "not available yet" line instead of an exception.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import logging
import math
import shlex
import sqlite3
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from autoseg.errors import InputError
from autoseg.pareto import pareto_front
from autoseg.rundir import StudyFileError, check_study_file, fs_escape, sqlite_ro_uri, write_text_atomic

log = logging.getLogger(__name__)

STUDY_NAME = "autoseg"
NA = "not available yet"
MAX_EXAMPLES = 6
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Label a latency-vs-MACs outlier only when it is this far off the fit: smaller gaps are measurement noise.
OUTLIER_MIN_RATIO = 1.25


# ---------------------------------------------------------------- pure core


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


def _first(*vals: Any) -> Any:
    return next((v for v in vals if v is not None), None)


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float | np.integer | np.floating):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


# ---------------------------------------------------------------- reading the run


def _read_json(path: Path, notes: list[str]) -> Any:
    if not path.is_file():
        notes.append(f"{path.parent.name}/{path.name}: {NA}" if path.parent.name in ("best", "eval")
                     else f"{path.name}: {NA}")
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        notes.append(f"{path.name}: unreadable ({type(e).__name__}: {e})")
        return None


def _sqlite_ro_storage(db: Path) -> Any:
    """An RDBStorage whose every connection is read-only: a report can never change the study."""
    import optuna

    path = str(db.resolve())

    def connect() -> sqlite3.Connection:
        return sqlite3.connect(sqlite_ro_uri(Path(path)), uri=True, timeout=10, check_same_thread=False)

    # Optuna formats the URL with str.format; braces in the path must be doubled.
    url = "sqlite:///" + path.replace("{", "{{").replace("}", "}}")
    return optuna.storages.RDBStorage(url, skip_table_creation=True, engine_kwargs={"creator": connect})


def _read_study(db: Path, notes: list[str]) -> tuple[dict | None, list[Any]]:
    """(study summary, frozen trials), or (None, []) with a note when there is no readable study."""
    if not db.exists():
        notes.append(f"study.db: {NA} (the search has not started)")
        return None, []
    try:
        check_study_file(db)
    except StudyFileError as e:
        raise InputError(f"{e}; is {db.parent} the --out folder of an autoseg search?") from None
    import optuna

    storage = None
    try:
        storage = _sqlite_ro_storage(db)
        study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
        trials = study.get_trials(deepcopy=False)
        info = {
            "name": STUDY_NAME,
            "directions": [d.name.lower() for d in study.directions],
            "user_attrs": dict(study.user_attrs),
        }
    except Exception as e:  # a half-created or foreign database is "not available", not a crash
        log.warning("cannot read the study in %s: %s", db, e)
        notes.append(f"study.db: {NA} (cannot read study {STUDY_NAME!r}: {type(e).__name__})")
        return None, []
    finally:
        if storage is not None:
            storage.remove_session()
            storage.engine.dispose()
    info["objective"] = info["user_attrs"].get("objective") or (
        "pareto" if len(info["directions"]) == 2 else "penalty")
    info["n_trials"] = len(trials)
    info["states"] = dict(Counter(t.state.name for t in trials))
    info["repeats"] = sum("same_as_trial" in t.user_attrs for t in trials)
    info["unmeasured"] = sum(t.user_attrs.get("pruned_reason") == "measure_failed" for t in trials)
    return info, trials


def _trial_row(t: Any) -> dict:
    a = t.user_attrs
    lat = a.get("latency") if isinstance(a.get("latency"), dict) else {}
    stats = lat.get("stats") if isinstance(lat.get("stats"), dict) else {}
    values = [_num(v) for v in t.values] if t.values is not None else None
    cv = _num(a.get("cv_mean"))
    if cv is None and values is not None and len(values) == 2:
        cv = values[0]
    note = a.get("pruned_reason")
    steps = getattr(t, "intermediate_values", None) or {}
    if t.state.name == "PRUNED" and steps:
        # Optuna keeps a pruned trial's last report as its value: the objective so far (since #21, which also
        # sets epochs_trained and counts steps in folds done; before, a running CV score at fold index), not a
        # trial's objective.
        values = None
        step, running = max(steps.items())
        new = "epochs_trained" in a
        note = (f"{note or 'pruned'} after fold {step if new else step + 1} "
                f"({'objective so far' if new else 'running CV'} {running:.3f})")
    if t.state.name == "FAIL":
        reason = getattr(t, "system_attrs", {}).get("fail_reason")
        note = note or (f"failed: {str(reason).splitlines()[0][:80]}" if reason else "failed")
    err = lat.get("error")
    if err not in (None, 0, "OK") and lat.get("message"):
        note = f"{note}; " if note else ""
        note += f"latency error: {lat['message']}"
    return {
        "number": t.number,
        "state": t.state.name,
        "arch": a.get("arch"),
        "tile": a.get("tile"),
        "params": a.get("params"),
        "macs": a.get("macs"),
        "latency_ms": _first(_num(stats.get("median_ms")), _num(a.get("latency_ms")),
                             values[1] if values is not None and len(values) == 2 else None),
        "latency_p90_ms": _num(stats.get("p90_ms")),
        "latency_source": a.get("latency_source") or lat.get("source"),
        "device": a.get("device") or lat.get("device"),
        "fingerprint_id": a.get("fingerprint_id") or lat.get("fingerprint_id"),
        "measure_size": a.get("measure_size"),
        "precision": a.get("precision", "fp32"),
        "throttled": lat.get("throttled"),
        "emulated": bool(lat.get("emulated") or (lat.get("fingerprint") or {}).get("emulated")),
        "providers_used": lat.get("providers_used"),
        "cached": lat.get("cached"),
        "cv_mean": cv,
        "cv_std": _num(a.get("cv_std")),
        "fold_scores": a.get("fold_scores"),
        "same_as_trial": a.get("same_as_trial"),
        "values": values,
        "pruned_reason": note,
        "started": t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else None,
        "finished": t.datetime_complete.isoformat(timespec="seconds") if t.datetime_complete else None,
    }


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


def _class_names(data: dict | None, card: dict | None) -> list[str]:
    for src in (card or {}, data or {}):
        for key in ("classes", "class_names", "class_map"):
            v = src.get(key)
            if isinstance(v, dict):
                v = v.get("names")
            if isinstance(v, list) and all(isinstance(n, str) for n in v):
                return list(v)
    return []


def _named(values: Sequence[Any], names: list[str]) -> list[tuple[str, float | None]]:
    return [(names[i] if i < len(names) else f"class {i}", _num(v)) for i, v in enumerate(values)]


def _from_per_class(pc: Any, names: list[str]) -> list[tuple[str, float | None]] | None:
    if isinstance(pc, list):
        return _named(pc, names)
    if not isinstance(pc, dict) or not pc:
        return None
    for key in ("iou", "per_class_iou"):
        if isinstance(pc.get(key), list):
            return _named(pc[key], names)
    out = []
    for name, v in pc.items():
        if isinstance(v, dict):
            v = v.get("iou")
        if v is not None and _num(v) is None:
            return None
        out.append((str(name), _num(v)))
    return out


def _per_class_iou(metrics: dict | None, card: dict | None, names: list[str]) -> tuple[list, str] | None:
    # What eval measured on the test images first, then the copy in the model card.
    if isinstance(metrics, dict):
        mean = metrics.get("mean")
        if isinstance(mean, dict) and isinstance(mean.get("per_class_iou"), list):
            return _named(mean["per_class_iou"], names), "eval/metrics.json (mean.per_class_iou)"
        got = _from_per_class(metrics.get("per_class"), names)
        if got:
            return got, "eval/metrics.json (per_class)"
    if isinstance(card, dict):
        got = _from_per_class(card.get("test_per_class"), names)
        if got:
            return got, "best/model_card.json (test_per_class)"
    return None


def _data_summary(data: dict | None, names: list[str]) -> dict | None:
    """The figures a reader wants from data.json (Dataset.summary() plus the pipeline's split and counts)."""
    if not isinstance(data, dict):
        return None

    def count(v: Any) -> Any:
        if isinstance(v, list):
            return len(v)
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    out: dict[str, Any] = {}
    images = next((count(data.get(k)) for k in ("num_images", "images") if count(data.get(k)) is not None), None)
    if images is not None:
        out["images"] = images
    split = data.get("split") if isinstance(data.get("split"), dict) else {}
    for part in ("train", "test"):
        n = count(data.get(f"{part}_images", split.get(part)))
        if n is not None:
            out[f"{part}_images"] = n
    for key in ("test_source", "size_min", "size_max", "channels", "num_classes", "ignored_pixels"):
        if data.get(key) is not None:
            out[key] = data[key]
    # tiles / reps / CV epochs: {tile size: count}, one per searched tile size (a bare number also works).
    for part in ("tiles", "reps", "cv_epochs"):
        v = data.get(part)
        if isinstance(v, dict):
            nums = {str(k): x for k, x in v.items() if count(x) is not None}
            if len(nums) == 1:
                out[part] = next(iter(nums.values()))
            elif nums:
                out[part] = {f"tile {k}": x for k, x in nums.items()}
        elif count(v) is not None:
            out[part] = count(v)
    for key in ("mean", "std"):
        if key in data:
            out[key] = [round(x, 4) if isinstance(x, float) else x for x in data[key]] \
                if isinstance(data[key], list) else data[key]
    pixels = data.get("class_pixels")
    if isinstance(pixels, list) and pixels:
        total = float(sum(_num(p) or 0 for p in pixels)) or 1.0
        out["classes"] = [{"name": n, "pixels": int(p), "fraction": float(p) / total}
                          for n, p in _named(pixels, names) if p is not None]
    elif names:
        out["classes"] = [{"name": n, "pixels": None, "fraction": None} for n in names]
    return out


def _pick_chosen(rows: list[dict], objective: str, card: dict | None) -> dict | None:
    """The final net (from the model card) or, while the search runs, the current best penalty trial."""
    done = [r for r in rows if r["state"] == "COMPLETE"]
    if isinstance(card, dict):
        match = [r for r in done if r["arch"] == card.get("arch") and r["tile"] == card.get("tile")]
        if isinstance(card.get("trial"), int):
            match = [r for r in done if r["number"] == card["trial"]] or match
        best = max(match, key=lambda r: r["cv_mean"] if r["cv_mean"] is not None else -1.0, default=None)
        return {
            "trial": best["number"] if best else None,
            "provisional": False,
            "from": "best/model_card.json",
            "arch": card.get("arch"), "tile": card.get("tile"), "params": card.get("params"),
            "macs": card.get("macs"),
            "latency_ms": _first(_num(card.get("latency_ms")), best["latency_ms"] if best else None),
            "latency_source": card.get("latency_source"), "device": card.get("device"),
            "cv_mean": _first(_num(card.get("cv_score")), best["cv_mean"] if best else None),
            "cv_std": _num(card.get("cv_std")),
            "test_miou": _num(card.get("test_miou")), "test_dice": _num(card.get("test_dice")),
            "test_pixel_acc": _num(card.get("test_pixel_acc")),
        }
    if objective == "pareto":
        return None  # a Pareto study names its net only when the pipeline finishes
    scored = [r for r in done if r["values"] and r["values"][0] is not None]
    if not scored:
        return None
    best = max(scored, key=lambda r: r["values"][0])
    keys = ("arch", "tile", "params", "macs", "latency_ms", "latency_source", "device", "cv_mean", "cv_std")
    return {"trial": best["number"], "provisional": True, "from": "study (best objective so far)",
            **{k: best[k] for k in keys}}


# ---------------------------------------------------------------- plots (Agg, no pyplot state)


def _figure(w: float, h: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _offset(x: float, xs: Sequence[float], log_x: bool) -> tuple[tuple[int, int], str]:
    """Put a label on the side of the point with more room."""
    lo, hi = min(xs), max(xs)
    if log_x:
        lo, hi, x = math.log10(lo), math.log10(hi), math.log10(x)
    right_half = hi > lo and (x - lo) / (hi - lo) > 0.55
    return ((-14, -30), "right") if right_half else ((14, -30), "left")


def plot_pareto(pts: list[dict], front: list[int], chosen: dict | None, xlabel: str,
                budget_ms: float | None, mixed: bool) -> bytes:
    fig = _figure(7.8, 4.9)
    ax = fig.add_subplot()
    xs = [p["latency_ms"] for p in pts]
    ys = [p["cv_mean"] for p in pts]
    err = [p["cv_std"] or 0.0 for p in pts]
    ax.errorbar(xs, ys, yerr=err, fmt="none", ecolor="#dddddd", elinewidth=1, zorder=1)
    markers = {"device": "s", "local": "o"}
    groups = sorted({str(p["latency_source"]) for p in pts}) if mixed else [None]
    for g in groups:
        sel = [p for p in pts if g is None or str(p["latency_source"]) == g]
        label = f"completed trials ({len(sel)})" if g is None else f"{g} latency ({len(sel)} trials)"
        ax.scatter([p["latency_ms"] for p in sel], [p["cv_mean"] for p in sel], s=30, c="#a8a8a8",
                   marker=markers.get(g or "", "o"), label=label, zorder=2)
    fx = [xs[i] for i in front]
    fy = [ys[i] for i in front]
    ax.step(fx, fy, where="post", color="#1f6fb4", lw=1.4, alpha=0.8, zorder=3)
    ax.scatter(fx, fy, s=52, c="#1f6fb4", edgecolors="white", linewidths=0.8, zorder=4,
               label=f"Pareto front ({len(front)})")
    for i in front:
        ax.annotate(f"#{pts[i]['number']}", (xs[i], ys[i]), xytext=(5, 5), textcoords="offset points",
                    fontsize=7, color="#1f4f84")
    log_x = len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) > 20
    if log_x:
        ax.set_xscale("log")
    if budget_ms:
        ax.axvline(budget_ms, ls="--", lw=1.2, color="#c62828", label=f"latency budget {budget_ms:g} ms")
    if chosen and chosen.get("latency_ms") is not None and chosen.get("cv_mean") is not None:
        cx, cy = chosen["latency_ms"], chosen["cv_mean"]
        word = "current best (provisional)" if chosen["provisional"] else "chosen net"
        ax.scatter([cx], [cy], marker="*", s=420, c="#ffc107", edgecolors="black", linewidths=1.0,
                   zorder=5, label=word)
        tag = f" #{chosen['trial']}" if chosen.get("trial") is not None else ""
        xy, ha = _offset(cx, [*xs, cx], log_x)
        # Short label: the arch is in the caption and the table, a long one would hide neighbours.
        ax.annotate(f"{word}{tag}\nCV {cy:.3f}, {cx:.3g} ms", (cx, cy),
                    xytext=xy, textcoords="offset points", ha=ha, fontsize=8, zorder=6,
                    bbox={"boxstyle": "round,pad=0.3", "fc": "white", "ec": "#999999", "alpha": 0.8},
                    arrowprops={"arrowstyle": "-", "color": "#666666"})
    ax.set_xlabel(xlabel)
    ax.set_ylabel("CV score: mean val mIoU over folds")
    ax.set_title("Score vs latency (completed trials; bars = ±1 std over folds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.11, top=0.93)
    return _png(fig)


def _macs_outliers(pts: list[dict], fit: dict, k: int = 3) -> list[dict]:
    out = []
    for p in pts:
        pred = 10 ** (fit["slope"] * math.log10(p["macs"]) + fit["intercept"])
        out.append({"trial": p["number"], "arch": p["arch"], "macs": p["macs"], "latency_ms": p["latency_ms"],
                    "predicted_ms": pred, "ratio": p["latency_ms"] / pred})
    out.sort(key=lambda o: -abs(math.log(o["ratio"])))
    return [o for o in out[:k] if max(o["ratio"], 1 / o["ratio"]) >= OUTLIER_MIN_RATIO]


def plot_latency_vs_macs(pts: list[dict], fit: dict | None, outliers: list[dict], ylabel: str,
                         mixed: bool = False) -> bytes:
    from matplotlib.ticker import FuncFormatter

    fig = _figure(7.8, 4.9)
    ax = fig.add_subplot()
    colours = {"COMPLETE": "#1f6fb4", "PRUNED": "#ef8a17"}
    markers = {"device": "s", "local": "o"}
    groups = sorted({(p["state"], str(p["latency_source"]) if mixed else "") for p in pts})
    for state, src in groups:
        sel = [p for p in pts if p["state"] == state and (not mixed or str(p["latency_source"]) == src)]
        label = f"{state.lower()}{', ' + src if src else ''} ({len(sel)})"
        ax.scatter([p["macs"] for p in sel], [p["latency_ms"] for p in sel], s=30, alpha=0.85,
                   c=colours.get(state, "#777777"), marker=markers.get(src, "o"), label=label, zorder=3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    # Plain millisecond labels: "0.8", not "8 x 10^-1", on the narrow ranges small nets span.
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    if fit:
        macs = [p["macs"] for p in pts]
        gx = np.geomspace(min(macs), max(macs), 50)
        ax.plot(gx, 10 ** (fit["slope"] * np.log10(gx) + fit["intercept"]), color="#444444", lw=1.2,
                ls="--", label=f"fit: latency ∝ MACs^{fit['slope']:.2f}  (R²={fit['r2']:.2f})", zorder=2)
    xs = [p["macs"] for p in pts]
    for o in outliers:
        word = "slower" if o["ratio"] > 1 else "faster"
        factor = o["ratio"] if o["ratio"] > 1 else 1 / o["ratio"]
        xy, ha = _offset(o["macs"], xs, True)
        ax.annotate(f"#{o['trial']} {o['arch'] or ''}\n{factor:.1f}× {word} than MACs predict",
                    (o["macs"], o["latency_ms"]), xytext=(xy[0], 14 if o["ratio"] > 1 else -28),
                    textcoords="offset points", ha=ha, fontsize=7.5, zorder=5,
                    bbox={"boxstyle": "round,pad=0.25", "fc": "#fff8e1", "ec": "#d4a017", "alpha": 0.95},
                    arrowprops={"arrowstyle": "-", "color": "#a07800"})
    ax.set_xlabel("MACs per inference (analytic count at the input size latency was measured at)")
    ax.set_ylabel(ylabel)
    ax.set_title("Measured latency vs MACs: where MACs mislead", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8, framealpha=0.9)
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.11, top=0.93)
    return _png(fig)


def plot_per_class_iou(items: list[tuple[str, float | None]], miou: float | None, title: str) -> bytes:
    import matplotlib

    fig = _figure(7.8, max(2.4, 0.32 * len(items) + 1.3))
    ax = fig.add_subplot()
    vals = [v if v is not None else 0.0 for _, v in items]
    cmap = matplotlib.colormaps["RdYlGn"]
    ax.barh(range(len(items)), vals, color=[cmap(0.15 + 0.7 * v) for v in vals], edgecolor="#555555",
            linewidth=0.5)
    for i, (_, v) in enumerate(items):
        ax.text((v or 0.0) + 0.01, i, f"{v:.3f}" if v is not None else "absent from test set", va="center",
                fontsize=8, color="#333333" if v is not None else "#888888")
    ax.set_yticks(range(len(items)), [n for n, _ in items], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.12)
    if miou is not None:
        ax.axvline(miou, ls="--", color="#333333", lw=1, label=f"mIoU {miou:.3f}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("IoU")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    # Fixed margins (tight_layout costs a full extra draw); the left one fits the longest class name.
    w, h = fig.get_size_inches()
    left = min(0.45, (0.3 + 0.065 * max((len(n) for n, _ in items), default=4)) / w)
    fig.subplots_adjust(left=left, right=0.97, bottom=0.55 / h, top=1 - 0.35 / h)
    return _png(fig)


def plot_training_curve(curve: list[dict], cv: float | None, best_step: int | None) -> bytes:
    """Validation mIoU (left axis) and train loss (right axis) over the crops the shipped net has seen."""
    fig = _figure(7.8, 3.6)
    ax = fig.add_subplot()
    x = [p["tile_passes"] for p in curve]
    val = [(p["tile_passes"], p["val_miou"]) for p in curve if p.get("val_miou") is not None]
    if val:
        ax.plot(*zip(*val, strict=True), "o-", color="#1f77b4", ms=3, label="validation mIoU (whole images)")
    best = [p for p in curve if p["step"] == best_step and p.get("val_miou") is not None]
    if best:
        ax.plot(best[0]["tile_passes"], best[0]["val_miou"], "*", color="#d4a017", ms=14, mec="#333333",
                label="kept weights")
    if cv is not None:
        ax.axhline(cv, ls=":", color="#555555", lw=1, label=f"search CV score {cv:.3f} (representatives)")
    ax.set_xlabel("crops seen")
    ax.set_ylabel("mIoU")
    ax.grid(alpha=0.3)
    loss = ax.twinx()
    loss.plot(x, [p["train_loss"] for p in curve], "--", color="#d62728", lw=1, label="train loss")
    loss.set_ylabel("train loss", color="#d62728")
    handles = ax.get_legend_handles_labels()
    more = loss.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8, loc="lower right")
    ax.set_title("Training of the shipped net", fontsize=10)
    fig.subplots_adjust(left=0.09, right=0.9, bottom=0.15, top=0.9)
    return _png(fig)


def _training_rows(t: dict) -> list[list[str]]:
    """The shipped net's training, as (field, value) rows for both reports."""
    if t.get("data") == "reps":
        return [["trained on", f"{t.get('tiles')} representative tiles, {t.get('epochs')} epochs"]]
    val = t.get("val_images") or []
    rows = [
        ["trained on", f"crops of {t.get('crop')} px from {t.get('images')} training images"],
        ["crops seen (budget)", f"{t.get('tile_passes'):,} ({t.get('budget_tiles'):,})"],
        ["stopped", str(t.get("stopped", "")).replace("_", " ")],
        ["validation", f"{len(val)} image(s); best mIoU {_f(t.get('best_val_miou'))} at step {t.get('best_step')}"
         if val else "none (train.val_fraction 0): the last weights ship"],
        ["wall time", f"{(t.get('seconds') or 0) / 60:.1f} min"],
    ]
    if t.get("teacher"):
        rows.append(["distilled from", str(t["teacher"])])
    return rows


# ---------------------------------------------------------------- formatting


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


def _trial_table(rows: list[dict], objective: str, front: set[int], chosen: int | None,
                 show_source: bool) -> tuple[list[str], list[list[str]], list[str]]:
    headers = ["#", "state", "arch", "tile", "params", "MACs", "lat median ms", "lat p90 ms",
               "CV ± std", "objective", "pruned / note"]
    if show_source:
        headers.insert(8, "latency source")
    body, classes = [], []
    for r in rows:
        mark = " ★" if r["number"] == chosen else " ◆" if r["number"] in front else ""
        cv = "–" if r["cv_mean"] is None else f"{r['cv_mean']:.3f} ± {_f(r['cv_std'])}"
        note = "; ".join(filter(None, [
            f"repeat of #{r['same_as_trial']}" if r["same_as_trial"] is not None else "", r["pruned_reason"]]))
        cells = [f"{r['number']}{mark}", r["state"].lower(), str(r["arch"] or "–"), str(r["tile"] or "–"),
                 _si(r["params"]), _si(r["macs"]), _ms(r["latency_ms"]), _ms(r["latency_p90_ms"]), cv,
                 _objective_cell(r, objective), note]
        if show_source:
            cells.insert(8, _where(r["latency_source"], r["device"]))
        body.append(cells)
        classes.append("chosen" if r["number"] == chosen else "front" if r["number"] in front else
                       r["state"].lower())
    return headers, body, classes


FP_KEYS = ("emulated", "emulator", "kernel_arch", "machine", "arch", "cpu_model", "cores", "ram_mb", "os", "python",
           "numpy", "onnxruntime", "providers", "governor", "cpu_freq_mhz", "temperature_c", "throttled")


def _fp_rows(latency: dict) -> tuple[list[str], list[list[str]]]:
    fps = latency["fingerprints"]
    headers = ["", *(f"{fid[:8]} ({', '.join(v['devices'])}; {v['trials']} trials)" for fid, v in fps.items())]
    rows = []
    for k in FP_KEYS:
        vals = [v["fingerprint"].get(k) for v in fps.values()]
        if all(x is None for x in vals):
            continue
        rows.append([k, *("–" if x is None else ", ".join(map(str, x)) if isinstance(x, list) else str(x)
                          for x in vals)])
    return headers, rows


def _summary_lines(rep: dict) -> list[str]:
    st = rep["study"]
    lines = []
    if st:
        states = ", ".join(f"{v} {k.lower()}" for k, v in sorted(st["states"].items()))
        rep_txt = f", {st['repeats']} of them repeats of a net already tried" if st.get("repeats") else ""
        if st.get("unmeasured"):
            rep_txt += f", {st['unmeasured']} the device could not measure"
        lines.append(f"Study: {st['n_trials']} trials ({states or 'none yet'}){rep_txt}; "
                     f"objective **{st['objective']}** ({' / '.join(st['directions'])}).")
    lines.append("Status: " + ("; ".join(rep["status"]) + " — this report is partial."
                               if rep["in_progress"] else "run complete."))
    c = rep["chosen"]
    if c:
        word = "Current best (provisional)" if c["provisional"] else "Chosen net"
        trial = f"trial #{c['trial']}, " if c.get("trial") is not None else ""
        lines.append(f"{word}: {trial}`{c.get('arch')}` at tile {c.get('tile')}, {_si(c.get('params'))} params, "
                     f"{_si(c.get('macs'))} MACs, {_ms(c.get('latency_ms'))} ms "
                     f"({_where(c.get('latency_source'), c.get('device'))}), "
                     f"CV {_f(c.get('cv_mean'))} ± {_f(c.get('cv_std'))}"
                     + (f", test mIoU {_f(c.get('test_miou'))}" if c.get("test_miou") is not None else "") + ".")
    else:
        lines.append(f"Chosen net: {NA}.")
    return lines


# ---------------------------------------------------------------- markdown


def _md_cell(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(map(_md_cell, headers)) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]
    return [*out, ""]


def render_markdown(rep: dict, config_text: str | None, data_raw: Any) -> str:
    L = [f"# autoseg report — {Path(rep['run_dir']).name}", "",
         f"_Generated {rep['generated_at']} from `{rep['run_dir']}` by autoseg {rep['autoseg_version']}. "
         "Plots are in report.html._", ""]
    for w in rep["warnings"]:
        L += [f"> **⚠ WARNING:** {w}", ""]
    L += [*(f"- {s}" for s in _summary_lines(rep)), ""]
    if rep["missing"]:
        L += ["Not available yet / missing:", "", *(f"- {m}" for m in rep["missing"]), ""]

    L += ["## Pareto front: CV score vs latency", ""]
    p = rep["plots"]["pareto"]
    if rep["pareto_front"]:
        front = {r["number"]: r for r in rep["trials"]}
        L += [p["source"], ""]
        L += _md_table(["#", "arch", "tile", "params", "MACs", "latency ms", "CV ± std", "ship it"],
                       [[str(n), str(front[n]["arch"]), str(front[n]["tile"]), _si(front[n]["params"]),
                         _si(front[n]["macs"]), _ms(front[n]["latency_ms"]),
                         f"{_f(front[n]['cv_mean'])} ± {_f(front[n]['cv_std'])}",
                         f"`{_ship_command(rep, n)}`"] for n in rep["pareto_front"]])
        L += [SHIP_NOTE, ""]
    else:
        L += [f"Pareto front: {NA} (no completed trial with both a CV score and a latency).", ""]

    L += ["## Trials", ""]
    if rep["trials"]:
        chosen = rep["chosen"]["trial"] if rep["chosen"] else None
        h, body, _ = _trial_table(rep["trials"], rep["study"]["objective"], set(rep["pareto_front"]), chosen,
                                  rep["latency"]["mixed"])
        L += ["★ chosen net, ◆ Pareto front. Latency from the trial's `latency` measurement (median, p90).", ""]
        L += _md_table(h, body)
    else:
        L += [f"Trials: {NA}.", ""]

    L += ["## Latency vs MACs", ""]
    m = rep["macs_fit"]
    if m["fit"]:
        L += [f"Fit over {m['n']} measured trials: latency ∝ MACs^{m['fit']['slope']:.2f} "
              f"(R² = {m['fit']['r2']:.2f}; {rep['latency']['axis_label']}).", ""]
        L += [f"- trial #{o['trial']} `{o['arch']}`: {_ms(o['latency_ms'])} ms measured vs "
              f"{_ms(o['predicted_ms'])} ms predicted from MACs ({o['ratio']:.2f}×)" for o in m["outliers"]]
        L += ["" if m["outliers"] else "No trial is more than 1.25× off the MACs fit.", ""]
    else:
        L += [f"Latency vs MACs: {NA} (needs 3+ measured trials of different size).", ""]

    L += ["## Final net on the test images", ""]
    pc = rep["per_class_iou"]
    if pc:
        L += [f"Per-class IoU from {pc['source']}"
              + (f" on {pc['n_images']} test images" if pc.get("n_images") else "") + ":", ""]
        L += _md_table(["class", "IoU"], [[n, _f(v) if v is not None else "absent"] for n, v in pc["items"]])
    else:
        L += [f"Per-class IoU: {NA}.", ""]
    ex = rep["examples"]
    L += [f"Test examples: {', '.join('eval/examples/' + e for e in ex)} (embedded in report.html)."
          if ex else f"Test examples: {NA}.", ""]

    if rep.get("other_evals"):
        L += ["## Evaluations on other images", "", OTHER_SOURCE, ""]
        L += _md_table(OTHER_HEADERS, _other_rows(rep["other_evals"]))

    L += ["## Training of the shipped net", ""]
    if rep.get("training"):
        L += _md_table(["field", "value"], _training_rows(rep["training"]))
        L += [rep["plots"]["training"]["source"], ""]
    else:
        L += [f"Training: {NA}.", ""]

    L += ["## Export", ""]
    e = rep["export"]
    if e:
        L += _md_table(["field", "value"], [[k, str(v)] for k, v in e.items()])
    else:
        L += [f"ONNX export: {NA}.", ""]

    L += ["## Device and latency source", ""]
    lat = rep["latency"]
    L += [f"Latency source(s): {', '.join(lat['sources']) or '–'}; device(s): {', '.join(lat['devices']) or '–'}; "
          f"{lat['measured_trials']} measured trials ({lat['cached']} from the latency cache).", ""]
    if lat["fingerprints"]:
        L += _md_table(*_fp_rows(lat))
    else:
        L += [f"Device fingerprint: {NA}.", ""]

    L += ["## Data", ""]
    d = rep["data"]
    if d:
        L += _md_table(["field", "value"], [[k, json.dumps(v)] for k, v in d.items() if k != "classes"])
        if d.get("classes"):
            L += _md_table(["class", "pixels", "share"],
                           [[c["name"], _si(c["pixels"]), _pct(c["fraction"])]
                            for c in d["classes"]])
        L += ["<details><summary>data.json</summary>", "", "```json", json.dumps(data_raw, indent=2), "```", "",
              "</details>", ""]
    else:
        L += [f"Data summary: {NA}.", ""]

    L += ["## Run config", ""]
    if config_text is not None:
        L += ["<details><summary>config.yml</summary>", "", "```yaml", config_text.rstrip(), "```", "",
              "</details>", ""]
    else:
        L += [f"Run config: {NA}.", ""]
    return "\n".join(L)


# ---------------------------------------------------------------- html

CSS = """
body{font:14px/1.45 -apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1d1d1f;margin:0;
  background:#f4f5f7}
main{max-width:1180px;margin:0 auto;padding:20px 28px 60px;background:#fff;min-height:100vh}
h1{font-size:24px;margin:8px 0 4px}h2{font-size:18px;margin:30px 0 8px;border-bottom:1px solid #e3e3e3;
  padding-bottom:4px}
.meta,.source{color:#666;font-size:12px}.source{margin:2px 0 14px}
.warn{background:#fdecea;border:2px solid #c62828;color:#7f1010;padding:10px 14px;border-radius:6px;
  margin:10px 0;font-weight:600}
.summary{background:#eef5fc;border-left:4px solid #1f6fb4;padding:8px 14px;margin:12px 0}
.summary p{margin:4px 0}.na{color:#8a6d00;background:#fff8e1;padding:4px 10px;border-radius:4px;
  display:inline-block;margin:4px 0}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0 10px}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f0f1f3;position:sticky;top:0}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.front td{background:#e6f0fa}tr.chosen td{background:#fff3c4;font-weight:600}
tr.pruned td,tr.fail td{color:#777}tr.running td{color:#1f6fb4;font-style:italic}
img.plot{max-width:100%;border:1px solid #eee}
.examples{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:12px}
.examples figure{margin:0}.examples img{width:100%;border:1px solid #ddd}
figcaption{font-size:12px;color:#555}
details{margin:6px 0}summary{cursor:pointer;color:#1f6fb4}
pre{background:#f6f8fa;padding:10px;overflow:auto;font-size:12px;border-radius:4px}
code{background:#f2f2f2;padding:0 3px;border-radius:3px}
"""

_NUMERIC = {"params", "MACs", "lat median ms", "lat p90 ms", "CV ± std", "objective", "tile", "#", "IoU",
            "pixels", "share", "latency ms"}


def _h(s: Any) -> str:
    return html.escape(str(s))


def _html_table(headers: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    num = [h in _NUMERIC for h in headers]
    out = ["<table><thead><tr>", *(f"<th>{_h(h)}</th>" for h in headers), "</tr></thead><tbody>"]
    for i, r in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes else ""
        out.append(f"<tr{cls}>" + "".join(
            f'<td class="n">{_h(c)}</td>' if num[j] else f"<td>{_h(c)}</td>" for j, c in enumerate(r)) + "</tr>")
    return "".join(out) + "</tbody></table>"


def _img(png: bytes, alt: str, cls: str = "plot") -> str:
    return f'<img class="{cls}" alt="{_h(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _na(what: str) -> str:
    return f'<p class="na">{_h(what)}: {NA}.</p>'


def _objective_words(objective: str) -> str:
    if objective == "pareto":
        return "the study's two values (CV score, latency ms)"
    return "the study's value (CV score minus the latency/complexity penalty)"


def render_html(rep: dict, pngs: dict[str, bytes], examples: dict[str, bytes], config_text: str | None,
                data_raw: Any) -> str:
    B = [f"<h1>autoseg report — {_h(Path(rep['run_dir']).name)}</h1>",
         f'<p class="meta">Generated {_h(rep["generated_at"])} from <code>{_h(rep["run_dir"])}</code> '
         f"by autoseg {_h(rep['autoseg_version'])}.</p>"]
    B += [f'<div class="warn">⚠ WARNING: {_h(w)}</div>' for w in rep["warnings"]]
    md_bold = [_h(s).replace("**", "") for s in _summary_lines(rep)]
    B.append('<div class="summary">' + "".join(f"<p>{s.replace('`', '')}</p>" for s in md_bold) + "</div>")
    if rep["missing"]:
        B.append('<details><summary>Not available yet / missing (' + str(len(rep["missing"])) + ")</summary><ul>"
                 + "".join(f"<li>{_h(m)}</li>" for m in rep["missing"]) + "</ul></details>")

    B.append("<h2>Pareto front: CV score vs latency</h2>")
    if "pareto" in pngs:
        B += [_img(pngs["pareto"], "Pareto front"), f'<p class="source">{_h(rep["plots"]["pareto"]["source"])}</p>']
    if rep["pareto_front"]:
        front = {r["number"]: r for r in rep["trials"]}
        B += [_html_table(["#", "arch", "latency ms", "CV", "ship it"], [
            [str(n), str(front[n]["arch"]), _ms(front[n]["latency_ms"]), _f(front[n]["cv_mean"]),
             _ship_command(rep, n)] for n in rep["pareto_front"]]),
            f'<p class="source">{_h(SHIP_NOTE.replace("`", ""))}</p>']
    else:
        B.append(_na("Pareto front (no completed trial with both a CV score and a latency)"))

    B.append("<h2>Trials</h2>")
    if rep["trials"]:
        chosen = rep["chosen"]["trial"] if rep["chosen"] else None
        h, body, cls = _trial_table(rep["trials"], rep["study"]["objective"], set(rep["pareto_front"]), chosen,
                                    rep["latency"]["mixed"])
        B += [_html_table(h, body, cls),
              '<p class="source">★ chosen net (gold), ◆ Pareto front (blue). Latency median and p90 from each '
              "trial's <code>latency</code> measurement stats; CV = mean ± std of fold val mIoU; "
              f"objective = {_objective_words(rep['study']['objective'])}.</p>"]
    else:
        B.append(_na("Trials"))

    B.append("<h2>Latency vs MACs</h2>")
    if "macs" in pngs:
        B += [_img(pngs["macs"], "Latency vs MACs"), f'<p class="source">{_h(rep["plots"]["macs"]["source"])}</p>']
    else:
        B.append(_na("Latency vs MACs (needs 3+ measured trials of different size)"))

    B.append("<h2>Final net on the test images</h2>")
    if "per_class_iou" in pngs:
        B += [_img(pngs["per_class_iou"], "Per-class IoU"),
              f'<p class="source">{_h(rep["plots"]["per_class_iou"]["source"])}</p>']
    else:
        B.append(_na("Per-class IoU"))
    if examples:
        B.append('<div class="examples">' + "".join(
            f"<figure>{_img(png, name, 'ex')}<figcaption>{_h(name)}</figcaption></figure>"
            for name, png in examples.items()) + "</div>")
        B.append('<p class="source">Test examples from eval/examples/ (written by eval).</p>')
    else:
        B.append(_na("Test examples"))

    if rep.get("other_evals"):
        B += ["<h2>Evaluations on other images</h2>", _html_table(OTHER_HEADERS, _other_rows(rep["other_evals"])),
              f'<p class="source">{_h(OTHER_SOURCE.replace("`", ""))}</p>']

    B.append("<h2>Training of the shipped net</h2>")
    if rep.get("training"):
        B.append(_html_table(["field", "value"], _training_rows(rep["training"])))
        if "training" in pngs:
            B += [_img(pngs["training"], "Training curve"),
                  f'<p class="source">{_h(rep["plots"]["training"]["source"])}</p>']
    else:
        B.append(_na("Training of the shipped net"))

    B.append("<h2>Export</h2>")
    if rep["export"]:
        B += [_html_table(["field", "value"], [[k, str(v)] for k, v in rep["export"].items()]),
              '<p class="source">From best/model_card.json["onnx"].</p>']
    else:
        B.append(_na("ONNX export"))

    lat = rep["latency"]
    B.append("<h2>Device and latency source</h2>")
    B.append(f"<p>Latency source(s): <b>{_h(', '.join(lat['sources']) or '–')}</b>; device(s): "
             f"<b>{_h(', '.join(lat['devices']) or '–')}</b>; {lat['measured_trials']} measured trials "
             f"({lat['cached']} served from the latency cache).</p>")
    B.append(_html_table(*_fp_rows(lat)) if lat["fingerprints"] else _na("Device fingerprint"))

    B.append("<h2>Data</h2>")
    d = rep["data"]
    if d:
        B.append(_html_table(["field", "value"], [[k, json.dumps(v)] for k, v in d.items() if k != "classes"]))
        if d.get("classes"):
            B.append(_html_table(["class", "pixels", "share"], [
                [c["name"], _si(c["pixels"]), _pct(c["fraction"])]
                for c in d["classes"]]))
        B.append(f"<details><summary>data.json</summary><pre>{_h(json.dumps(data_raw, indent=2))}</pre></details>")
    else:
        B.append(_na("Data summary"))

    B.append("<h2>Run config</h2>")
    B.append(f"<details><summary>config.yml</summary><pre>{_h(config_text)}</pre></details>"
             if config_text is not None else _na("Run config"))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>autoseg report — {_h(Path(rep['run_dir']).name)}</title>"
            f"<style>{CSS}</style></head><body><main>\n" + "\n".join(B) + "\n</main></body></html>\n")


# ---------------------------------------------------------------- entry


def _clean(o: Any) -> Any:
    """JSON-ready copy: NaN/inf become null, numpy scalars and tuples become plain values."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, list | tuple | set):
        return [_clean(v) for v in o]
    if isinstance(o, bool) or o is None or isinstance(o, str):
        return o
    if isinstance(o, int | np.integer):
        return int(o)
    if isinstance(o, float | np.floating):
        return float(o) if math.isfinite(o) else None
    return str(o)


SHIP_NOTE = ("`autoseg export RUN --trial N` trains that net like the chosen one (the same final training), "
             "then exports, verifies and tests it into RUN/trials/N/.")


def _ship_command(rep: dict, number: int) -> str:
    return f"autoseg export {shlex.quote(rep['run_dir'])} --trial {number}"


def _other_evals(folder: Path) -> list[dict]:
    """`autoseg eval RUN --test-images X --test-masks Y` results, each in its own folder under eval/other/."""
    out = []
    for sub in sorted(folder.iterdir()) if folder.is_dir() else []:
        notes: list[str] = []
        m, src = _read_json(sub / "metrics.json", notes), _read_json(sub / "source.json", notes)
        if not isinstance(m, dict) or not isinstance(m.get("mean"), dict):
            continue
        src = src if isinstance(src, dict) else {}
        out.append({"folder": f"eval/other/{sub.name}", "images": src.get("test_images"),
                    "masks": src.get("test_masks"), "n_images": len(m.get("per_image") or []),
                    "miou": _num(m["mean"].get("miou")), "macro_dice": _num(m["mean"].get("macro_dice")),
                    "pixel_acc": _num(m["mean"].get("pixel_acc"))})
    return out


def _other_rows(others: list[dict]) -> list[list[str]]:
    return [[str(o["images"]), str(o["n_images"]), _f(o["miou"]), _f(o["macro_dice"]), _f(o["pixel_acc"]),
             o["folder"]] for o in others]


OTHER_HEADERS = ["images", "n", "mIoU", "macro Dice", "pixel acc", "results in"]
OTHER_SOURCE = ("`autoseg eval RUN --test-images X --test-masks Y`: the shipped net on other images, kept apart "
                "from the run's own held-out results above.")


def _examples(folder: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(folder.glob("*.png"))[:MAX_EXAMPLES] if folder.is_dir() else []:
        try:
            b = p.read_bytes()
        except OSError:
            continue
        if b.startswith(PNG_MAGIC):
            out[p.name] = b
    return out


def write_report(run_dir: Path) -> dict:
    """Write RUN/report.md, RUN/report.html and RUN/report.json; return the JSON dict."""
    from autoseg import __version__

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: not a run directory; pass the --out folder of an autoseg search")
    missing: list[str] = []

    config_text, config = None, None
    try:
        config_text = (run_dir / "config.yml").read_text(encoding="utf-8", errors="backslashreplace")
        config = yaml.safe_load(config_text)
    except FileNotFoundError:
        missing.append(f"config.yml: {NA}")
    except (OSError, yaml.YAMLError) as e:
        missing.append(f"config.yml: unreadable ({type(e).__name__})")
    config = config if isinstance(config, dict) else None

    data_raw = _read_json(run_dir / "data.json", missing)
    card = _read_json(run_dir / "best" / "model_card.json", missing)
    metrics = _read_json(run_dir / "eval" / "metrics.json", missing)
    card = card if isinstance(card, dict) else None
    metrics = metrics if isinstance(metrics, dict) else None
    study, trials = _read_study(run_dir / "study.db", missing)
    objective = study["objective"] if study else "penalty"

    rows = [_trial_row(t) for t in trials]
    redone = {t.user_attrs["redo_of"]: t.number for t in trials if "redo_of" in t.user_attrs}
    for r in rows:  # killed (or its device lost) and run again with the same net by a resumed search
        if r["state"] == "FAIL" and r["number"] in redone:
            r["pruned_reason"] = f"interrupted; run again as #{redone[r['number']]}"
    latency = _latency_provenance(rows, trials, study, card)
    names = _class_names(data_raw if isinstance(data_raw, dict) else None, card)
    chosen = _pick_chosen(rows, objective, card)

    # A repeated net (same_as_trial) is its twin's point again: plotted and listed once.
    pts = [r for r in rows if r["state"] == "COMPLETE" and r["cv_mean"] is not None
           and r["latency_ms"] is not None and r["same_as_trial"] is None]
    front_idx = pareto_front([(p["cv_mean"], p["latency_ms"]) for p in pts])
    budget = _num(((config or {}).get("search") or {}).get("latency_budget_ms"))
    pngs: dict[str, bytes] = {}
    plots: dict[str, dict] = {}
    n_reps = (_data_summary(data_raw, names) or {}).get("reps")
    n_reps = n_reps if isinstance(n_reps, int) else "the"  # several tile sizes: each trial used one set
    score_src = (f"CV score = mean val mIoU over the k folds on {n_reps} representative tiles "
                 "(trial attr cv_mean)")
    if pts:
        pngs["pareto"] = plot_pareto(pts, front_idx, chosen, latency["axis_label"], budget, latency["mixed"])
    plots["pareto"] = {"available": "pareto" in pngs, "source": (
        f"{score_src}. Latency = median of the trial's ONNX measurement (trial attr latency.stats); "
        f"axis: {latency['axis_label']}. Grey = all completed trials, blue = Pareto front"
        + (f", star = {'current best (provisional)' if chosen['provisional'] else 'chosen net'} "
           f"{chosen.get('arch')}" if chosen else "")
        + (f", dashed = latency budget {budget:g} ms" if budget else "") + ".")}

    mpts = [r for r in rows if (_num(r["macs"]) or 0) > 0 and (r["latency_ms"] or 0) > 0 and r["same_as_trial"] is None]
    fit = fit_loglog([p["macs"] for p in mpts], [p["latency_ms"] for p in mpts]) if mpts else None
    outliers = _macs_outliers(mpts, fit) if fit else []
    if fit:
        pngs["macs"] = plot_latency_vs_macs(mpts, fit, outliers, latency["axis_label"], latency["mixed"])
    plots["macs"] = {"available": "macs" in pngs, "source": (
        f"Every trial with a latency measurement (completed and budget-pruned). MACs: analytic count at the "
        f"measured input size (trial attr macs); axis: {latency['axis_label']}. Dashed: least-squares fit in "
        f"log-log space; labelled: the trials furthest from it (≥{OUTLIER_MIN_RATIO}×).")}

    pc = _per_class_iou(metrics, card, names)
    per_class = None
    if pc:
        items, src = pc
        n_img = len(metrics["per_image"]) if metrics and isinstance(metrics.get("per_image"), list) else None
        miou = _num(((metrics or {}).get("mean") or {}).get("miou")) if metrics else None
        miou = miou if miou is not None else _num((card or {}).get("test_miou"))
        per_class = {"items": items, "source": src, "n_images": n_img, "miou": miou}
        title = "Per-class IoU of the final net" + (f" on {n_img} test images" if n_img else " on the test set")
        pngs["per_class_iou"] = plot_per_class_iou(items, miou, title)
    plots["per_class_iou"] = {"available": per_class is not None, "source": (
        f"IoU per class on the held-out test images, whole images, from {per_class['source']}; "
        "dashed = mean IoU." if per_class else NA)}

    others = _other_evals(run_dir / "eval" / "other")
    training = (card or {}).get("training")
    training = training if isinstance(training, dict) else None
    curve = _read_json(run_dir / "best" / "training.json", missing) if training else None
    curve = curve.get("curve") if isinstance(curve, dict) else None
    if training and isinstance(curve, list) and curve:
        pngs["training"] = plot_training_curve(curve, _num((card or {}).get("cv_score")), training.get("best_step"))
    plots["training"] = {"available": "training" in pngs, "source": (
        "best/training.json: train loss (mean over the crops since the last point) and validation mIoU of whole "
        "held-out training images, after each validation; the star marks the weights that ship. Dotted: the "
        "chosen net's CV score in the search, on the representative tiles (another measure, for scale)."
        if "training" in pngs else NA)}

    examples = _examples(run_dir / "eval" / "examples")
    if not examples:
        missing.append(f"eval/examples/*.png: {NA}")
    export = None
    onnx = (card or {}).get("onnx")
    if isinstance(onnx, dict):
        export = {"file": onnx.get("path", "best/model.onnx"), "size": _si(onnx.get("size_bytes"), "B"),
                  "size_bytes": onnx.get("size_bytes"), "opset": onnx.get("opset"),
                  "parity_max_abs_diff (onnxruntime vs torch)": onnx.get("parity_max_abs_diff"),
                  "nodes before → after simplify": (f"{onnx['nodes_before']} → {onnx['nodes_after']}"
                                                    if "nodes_before" in onnx else None),
                  "simplified": onnx.get("simplified")}
        q = (card or {}).get("int8")
        if isinstance(q, dict) and "error" in q:
            export["int8 not exported"] = q["error"]
        elif isinstance(q, dict):  # export.int8: the quantized model beside the float one
            export.update({
                "int8 file": q.get("path"), "int8 size": _si(q.get("size_bytes"), "B"),
                "int8 test mIoU (float's)": f"{_f(q.get('test_miou'))} ({_f(card.get('test_miou'))})",
                "int8 latency ms (float's), source": f"{_f(q.get('latency_ms'), '.2f')} "
                f"({_f(q.get('fp32_latency_ms'), '.2f')}), {q.get('latency_source')} on {q.get('device')}",
                "int8 argmax agreement with float, calibration tiles": _f(q.get("argmax_agreement"), '.4f'),
                "int8 timing not done": q.get("latency_error"),
            })
        export = {k: v for k, v in export.items() if v is not None}

    running = sum(r["state"] in ("RUNNING", "WAITING") for r in rows)
    # Nothing completed and nothing running: the search ended (or stopped) without a net to pick.
    stuck = bool(rows) and running == 0 and card is None and not any(r["state"] == "COMPLETE" for r in rows)
    status = [text for cond, text in (
        (study is None, "search not started"),
        (running > 0, f"search running ({running} trial{'s' if running > 1 else ''} in progress)"),
        (stuck, "no trial completed yet, so there is no net to retrain: rerun the search with more --trials or "
                "a looser --latency-budget-ms (finished trials are kept)"),
        (card is None, "final net not built yet"),
        (metrics is None, "test evaluation not done yet"),
    ) if cond]
    rep = _clean({
        "autoseg_version": __version__,
        "generated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(run_dir.resolve()),
        "in_progress": bool(status),
        "status": status,
        "warnings": latency["warnings"],
        "missing": missing,
        "config": config,
        "data": _data_summary(data_raw, names),
        "study": study,
        "latency": latency,
        "trials": rows,
        "pareto_front": [pts[i]["number"] for i in front_idx],
        "chosen": chosen,
        "macs_fit": {"n": len(mpts), "fit": fit, "outliers": outliers},
        "per_class_iou": per_class,
        "examples": list(examples),
        "export": export,
        "model_card": card,
        "training": None if training is None else {**training, "curve": curve},
        "other_evals": others,
        "eval": {k: v for k, v in metrics.items() if k != "per_image"} if metrics else None,
        "plots": plots,
    })
    # Names that are not UTF-8 (a run or data folder, an image): \uXXXX escapes in JSON, \xNN in what people read.
    write_text_atomic(run_dir / "report.json", json.dumps(rep, indent=2, ensure_ascii=False) + "\n")
    write_text_atomic(run_dir / "report.md", fs_escape(render_markdown(rep, config_text, data_raw)))
    write_text_atomic(run_dir / "report.html", fs_escape(render_html(rep, pngs, examples, config_text, data_raw)))
    log.debug("report written to %s", run_dir / "report.html")
    return rep
