"""The report's figures as PNG bytes (matplotlib Agg, no pyplot state)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

# A log axis spanning fewer decades than this gets a few labelled minor ticks (2 and 5); a wider one
# has enough labelled decades (1, 10, 100) already.
MINOR_LABEL_MAX_DECADES = 2.5


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


def _tick_text(v: float, si: bool) -> str:
    """A plain tick label: "0.3", "20", or with `si` "20M", "1.5G" (never "3×10⁻¹")."""
    if si:
        for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(v) >= div:
                return f"{v / div:g}{suffix}"
    return f"{v:g}"


def _plain_log_axis(axis: Any, si: bool = False) -> None:
    """Decimal labels on a log axis, with minor labels only where there is room for them.

    Matplotlib's default labels every minor tick of a narrow log axis in scientific notation, and on
    the 0.3-40 ms range of small nets they run together ("3×10⁻¹4×10⁻¹"). Which minor ticks get a
    label depends on how many decades the axis spans, decided at draw time, when the limits are known.
    """
    from matplotlib.ticker import FuncFormatter

    def minor(v: float, _pos: Any) -> str:
        lo, hi = sorted(axis.get_view_interval())
        decades = math.log10(hi / lo) if lo > 0 and hi > lo else 0.0
        keep = {1, 2, 3, 4, 5, 6, 7, 8, 9} if decades < 0.6 else {2, 3, 5} if decades < 1.2 \
            else {2, 5} if decades < MINOR_LABEL_MAX_DECADES else set()
        lead = round(v / 10 ** math.floor(math.log10(v) + 1e-9)) if v > 0 else 0
        return _tick_text(v, si) if lead in keep else ""

    axis.set_major_formatter(FuncFormatter(lambda v, _pos: _tick_text(v, si)))
    axis.set_minor_formatter(FuncFormatter(minor))


def _keep_inside(fig: Any, ax: Any, notes: list[Any], margin_px: float = 3.0) -> None:
    """Move annotation labels that would leave the axes (over the title, off the figure) back inside.

    A label that overflows a side is first mirrored to the other side of its point; what still
    overflows is then shifted in; labels that cover each other are then moved apart vertically. Needs a draw
    to know the text sizes, so only figures with labels pay it.
    """
    if not notes:
        return
    pt = 72.0 / fig.dpi  # offsets are in points, extents in pixels

    def overflow(note: Any, renderer: Any) -> tuple[float, float]:
        box = _box(note, renderer)
        frame = ax.get_window_extent(renderer)
        dx = max(0.0, frame.x0 + margin_px - box.x0) - max(0.0, box.x1 - (frame.x1 - margin_px))
        dy = max(0.0, frame.y0 + margin_px - box.y0) - max(0.0, box.y1 - (frame.y1 - margin_px))
        return dx, dy

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for note in notes:
        dx, dy = overflow(note, renderer)
        x, y = note.xyann
        if dx:
            note.xyann = (abs(x) if dx > 0 else -abs(x), note.xyann[1])
            note.set_horizontalalignment("left" if dx > 0 else "right")
        if dy:
            note.xyann = (note.xyann[0], abs(y) if dy > 0 else -abs(y))
            note.set_verticalalignment("bottom" if dy > 0 else "top")
    fig.canvas.draw()
    for note in notes:
        dx, dy = overflow(note, renderer)
        if dx or dy:
            note.xyann = (note.xyann[0] + dx * pt, note.xyann[1] + dy * pt)
    # Labels of nearby points: each moves up or down off the ones placed before it, where it stays inside.
    fig.canvas.draw()
    frame = ax.get_window_extent(renderer)
    placed: list[Any] = []
    for note in notes:
        box = _box(note, renderer)
        for other in placed:
            if not box.overlaps(other):
                continue
            up = other.y1 + margin_px - box.y0
            down = other.y0 - margin_px - box.y1
            shift = up if box.y1 + up <= frame.y1 - margin_px or box.y0 + down < frame.y0 + margin_px else down
            note.xyann = (note.xyann[0], note.xyann[1] + shift * pt)
            box = box.translated(0, shift)
        placed.append(box)


def _box(note: Any, renderer: Any) -> Any:
    patch = note.get_bbox_patch()
    return patch.get_window_extent(renderer) if patch else note.get_window_extent(renderer)


def _ring_flagged(ax: Any, pts: list[dict], x: str, y: str) -> None:
    """A red ring around each point whose latency was measured on a busy, throttled or noisy device."""
    bad = [p for p in pts if [f for f in p.get("latency_flags") or [] if f != "emulated"]]
    if bad:
        ax.scatter([p[x] for p in bad], [p[y] for p in bad], s=150, facecolors="none", edgecolors="#c62828",
                   linewidths=1.4, zorder=6, label=f"latency flagged: busy/noisy/throttled ({len(bad)})")


def _offset(x: float, xs: Sequence[float], log_x: bool) -> tuple[tuple[int, int], str]:
    """Put a label on the side of the point with more room."""
    lo, hi = min(xs), max(xs)
    if log_x:
        lo, hi, x = math.log10(lo), math.log10(hi), math.log10(x)
    right_half = hi > lo and (x - lo) / (hi - lo) > 0.55
    return ((-14, -30), "right") if right_half else ((14, -30), "left")


def plot_pareto(pts: list[dict], front: list[int], chosen: dict | None, xlabel: str,
                budget_ms: float | None, mixed: bool) -> bytes:
    return _png(pareto_figure(pts, front, chosen, xlabel, budget_ms, mixed))


def pareto_figure(pts: list[dict], front: list[int], chosen: dict | None, xlabel: str,
                  budget_ms: float | None, mixed: bool) -> Any:
    """CV score vs latency, the front as a staircase, the chosen net as a star (a matplotlib Figure)."""
    fig = _figure(7.8, 4.9)
    ax = fig.add_subplot()
    xs = [p["latency_ms"] for p in pts]
    ys = [p["cv_mean"] for p in pts]
    err = [p["cv_std"] or 0.0 for p in pts]
    notes: list[Any] = []
    ax.errorbar(xs, ys, yerr=err, fmt="none", ecolor="#dddddd", elinewidth=1, zorder=1)
    markers = {"device": "s", "local": "o"}
    groups = sorted({str(p["latency_source"]) for p in pts}) if mixed else [None]
    for g in groups:
        sel = [p for p in pts if g is None or str(p["latency_source"]) == g]
        label = f"completed trials ({len(sel)})" if g is None else f"{g} latency ({len(sel)} trials)"
        ax.scatter([p["latency_ms"] for p in sel], [p["cv_mean"] for p in sel], s=30, c="#a8a8a8",
                   marker=markers.get(g or "", "o"), label=label, zorder=2)
    _ring_flagged(ax, pts, "latency_ms", "cv_mean")
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
        _plain_log_axis(ax.xaxis)
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
        notes.append(ax.annotate(f"{word}{tag}\nCV {cy:.3f}, {cx:.3g} ms", (cx, cy),
                    xytext=xy, textcoords="offset points", ha=ha, fontsize=8, zorder=6,
                    bbox={"boxstyle": "round,pad=0.3", "fc": "white", "ec": "#999999", "alpha": 0.8},
                    arrowprops={"arrowstyle": "-", "color": "#666666"}))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("CV score: mean val mIoU over folds")
    ax.set_title("Score vs latency (completed trials; bars = ±1 std over folds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.11, top=0.93)
    _keep_inside(fig, ax, notes)
    return fig


def plot_latency_vs_macs(pts: list[dict], fit: dict | None, outliers: list[dict], ylabel: str,
                         mixed: bool = False) -> bytes:
    return _png(latency_vs_macs_figure(pts, fit, outliers, ylabel, mixed))


def latency_vs_macs_figure(pts: list[dict], fit: dict | None, outliers: list[dict], ylabel: str,
                           mixed: bool = False) -> Any:
    """Latency against MACs on log-log axes with the power-law fit; the nets furthest off it labelled."""
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
    _ring_flagged(ax, pts, "macs", "latency_ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    # Plain labels: "0.8" ms, not "8 x 10^-1", on the narrow ranges small nets span; MACs as "20M".
    _plain_log_axis(ax.yaxis)
    _plain_log_axis(ax.xaxis, si=True)
    notes = []
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
        up = o["ratio"] > 1
        notes.append(ax.annotate(
            f"#{o['trial']} {o['arch'] or ''}\n{factor:.1f}× {word} than MACs predict",
            (o["macs"], o["latency_ms"]), xytext=(xy[0], 14 if up else -14), textcoords="offset points",
            ha=ha, va="bottom" if up else "top", fontsize=7.5, zorder=5,
            bbox={"boxstyle": "round,pad=0.25", "fc": "#fff8e1", "ec": "#d4a017", "alpha": 0.95},
            arrowprops={"arrowstyle": "-", "color": "#a07800"}))
    ax.set_xlabel("MACs per inference (analytic count at the input size latency was measured at)")
    ax.set_ylabel(ylabel)
    ax.set_title("Measured latency vs MACs: where MACs mislead", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8, framealpha=0.9)
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.11, top=0.93)
    _keep_inside(fig, ax, notes)
    return fig


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
