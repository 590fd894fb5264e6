"""The report's figures as PNG bytes (matplotlib Agg, no pyplot state)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np


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
