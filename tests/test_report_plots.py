"""The report's figures as matplotlib objects: readable log ticks, labels that stay clear of the title."""

from __future__ import annotations

import itertools

from autoseg.report.plots import latency_vs_macs_figure, pareto_figure
from autoseg.report.provenance import _macs_outliers, fit_loglog


def _point(n: int, ms: float, cv: float, macs: float = 1e7, state: str = "COMPLETE") -> dict:
    return {"number": n, "latency_ms": ms, "cv_mean": cv, "cv_std": 0.01, "latency_source": "local",
            "macs": macs, "arch": f"k3-3_c8-{n}_standard_transpose", "state": state}


def _labels(axis) -> list:
    """The tick labels a reader sees on `axis` (major and minor), after a draw."""
    lo, hi = sorted(axis.get_view_interval())
    ticks = [(t, lab) for t, lab in zip(axis.get_majorticklocs(), axis.get_majorticklabels(), strict=True)]
    ticks += [(t, lab) for t, lab in zip(axis.get_minorticklocs(), axis.get_minorticklabels(), strict=True)]
    return [lab for t, lab in ticks if lo <= t <= hi and lab.get_visible() and lab.get_text()]


def _assert_readable(fig, axis) -> None:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labels = _labels(axis)
    assert len(labels) >= 2, [lab.get_text() for lab in labels]
    for lab in labels:
        assert "10^" not in lab.get_text() and "\\times" not in lab.get_text() and "×" not in lab.get_text(), \
            lab.get_text()
    boxes = [(lab.get_text(), lab.get_window_extent(renderer)) for lab in labels]
    for (ta, a), (tb, b) in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), f"tick labels {ta!r} and {tb!r} run together"


def test_pareto_latency_axis_has_plain_decimal_labels_that_do_not_run_together():
    # 0.3 ms to 40 ms: a log axis, where matplotlib's default minor labels read "3×10⁻¹4×10⁻¹".
    pts = [_point(i, ms, 0.5 + 0.03 * i) for i, ms in enumerate([0.31, 0.42, 0.47, 0.9, 2.5, 8.0, 40.0])]
    fig = pareto_figure(pts, list(range(len(pts))), None, "latency, ms", None, False)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    _assert_readable(fig, ax.xaxis)
    texts = [lab.get_text() for lab in _labels(ax.xaxis)]
    assert "1" in texts and "10" in texts, texts


def test_pareto_narrow_log_axis_still_gets_labels():
    # Within one decade there is no major tick but 1 or 10: a few minor labels (2, 5) must say where we are.
    pts = [_point(i, ms, 0.5 + 0.03 * i) for i, ms in enumerate([0.12, 0.2, 0.35, 0.9])]
    pts.append(_point(9, 3.0, 0.8))
    fig = pareto_figure(pts, [0, 4], None, "latency, ms", None, False)
    _assert_readable(fig, fig.axes[0].xaxis)


def test_latency_vs_macs_axes_are_readable():
    pts = [_point(i, ms, 0.6, macs) for i, (ms, macs) in enumerate(
        [(0.3, 2e6), (0.45, 5e6), (0.8, 1e7), (2.0, 4e7), (7.0, 2e8), (30.0, 1e9)])]
    fit = fit_loglog([p["macs"] for p in pts], [p["latency_ms"] for p in pts])
    fig = latency_vs_macs_figure(pts, fit, [], "latency, ms")
    _assert_readable(fig, fig.axes[0].xaxis)
    _assert_readable(fig, fig.axes[0].yaxis)


def test_an_outlier_label_stays_inside_the_axes_and_off_the_title():
    # The slowest net is also the most off the fit: its label used to go up, over the title.
    pts = [_point(i, ms, 0.6, macs) for i, (ms, macs) in enumerate(
        [(1.0, 1e7), (2.0, 2e7), (4.0, 4e7), (8.0, 8e7), (60.0, 1.6e8), (0.5, 5e6)])]
    fit = fit_loglog([p["macs"] for p in pts], [p["latency_ms"] for p in pts])
    outliers = _macs_outliers(pts, fit)
    assert outliers and outliers[0]["trial"] == 4
    fig = latency_vs_macs_figure(pts, fit, outliers, "latency, ms")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    title = ax.title.get_window_extent(renderer)
    inside = ax.get_window_extent(renderer)
    notes = [t for t in ax.texts if t.get_text().startswith("#")]
    assert len(notes) == len(outliers)
    for note in notes:
        box = note.get_bbox_patch().get_window_extent(renderer)
        assert not box.overlaps(title), note.get_text()
        assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1, \
            (note.get_text(), box, inside)


def test_labels_of_nearby_outliers_do_not_cover_each_other():
    # Two small nets both faster than MACs predict, close together: their labels used to be drawn on each other.
    pts = [_point(i, ms, 0.6, macs) for i, (ms, macs) in enumerate(
        [(2.0, 2e7), (4.0, 3e7), (12.0, 3.5e7), (15.0, 1.6e8), (40.0, 4e8), (300.0, 2e9)])]
    fit = fit_loglog([p["macs"] for p in pts], [p["latency_ms"] for p in pts])
    outliers = [{"trial": 0, "arch": "k3-3_c8-16_standard_transpose", "macs": 2e7, "latency_ms": 2.0, "ratio": 0.66},
                {"trial": 1, "arch": "k3-3-3_c8-16-32_standard_transpose", "macs": 3e7, "latency_ms": 4.0,
                 "ratio": 0.7}]
    fig = latency_vs_macs_figure(pts, fit, outliers, "latency, ms")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    inside = ax.get_window_extent(renderer)
    boxes = [t.get_bbox_patch().get_window_extent(renderer) for t in ax.texts if t.get_text().startswith("#")]
    assert len(boxes) == 2 and not boxes[0].overlaps(boxes[1])
    for box in boxes:
        assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1


def test_the_chosen_net_label_stays_inside_the_pareto_axes():
    pts = [_point(i, ms, cv) for i, (ms, cv) in enumerate([(1.0, 0.5), (2.0, 0.6), (3.0, 0.7), (4.0, 0.95)])]
    chosen = {"trial": 3, "latency_ms": 4.0, "cv_mean": 0.95, "provisional": False}
    fig = pareto_figure(pts, [0, 1, 2, 3], chosen, "latency, ms", None, False)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    inside = ax.get_window_extent(renderer)
    note = next(t for t in ax.texts if t.get_text().startswith("chosen net"))
    box = note.get_bbox_patch().get_window_extent(renderer)
    assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1
    assert not box.overlaps(ax.title.get_window_extent(renderer))


def test_points_with_flagged_latency_are_ringed_and_named_in_the_legend():
    pts = [_point(i, ms, 0.5 + 0.05 * i) for i, ms in enumerate([1.0, 2.0, 3.0])]
    pts[1]["latency_flags"] = ["busy: others used 1.3 cores"]
    pts[2]["latency_flags"] = ["emulated"]  # warned about on its own, not ringed
    fig = pareto_figure(pts, [0, 1, 2], None, "latency, ms", None, False)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "latency flagged: busy/noisy/throttled (1)" in labels
    clean = pareto_figure(pts[:1], [0], None, "latency, ms", None, False)
    assert not any("flagged" in t.get_text() for t in clean.axes[0].get_legend().get_texts())
