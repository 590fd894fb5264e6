"""The latency predictor in the report (issue #26): how many nets were measured and how many only predicted, the
predictor's error on the nets measured after it started, and a predicted-vs-measured figure. Every predicted
figure says "predicted"."""

from __future__ import annotations

from typing import Any

from autoseg.report.plots import _figure, _plain_log_axis, _png


def predictor_summary(rows: list[dict]) -> dict | None:
    """None when the search never had a fitted predictor (off, too few measurements, or a run before #26)."""
    firsts = [r for r in rows if r.get("same_as_trial") is None]
    guessed = [r for r in firsts if r.get("latency_predicted_ms") is not None]
    if not guessed:
        return None
    pairs = [(r["latency_predicted_ms"], r["latency_ms"], r["number"]) for r in guessed
             if not r.get("latency_predicted") and r.get("latency_ms")]
    rel = [abs(p - m) / m for p, m, _ in pairs]
    fits = [r["latency_predictor"] for r in guessed if isinstance(r.get("latency_predictor"), dict)]
    return {
        "measured": sum(1 for r in firsts if r.get("latency_ms") is not None and not r.get("latency_predicted")),
        "dropped_on_prediction": sum(1 for r in firsts if r.get("predicted_over_budget")),
        "latency_predicted": sum(1 for r in firsts if r.get("latency_predicted")),
        "checked": len(pairs),  # nets predicted first, then measured: the predictor's test
        "within_10": sum(x <= 0.10 for x in rel) / len(rel) if rel else None,
        "mape": 100 * sum(rel) / len(rel) if rel else None,
        "last_fit": fits[-1] if fits else None,
        "pairs": [{"trial": n, "predicted_ms": p, "measured_ms": m} for p, m, n in pairs],
    }


def summary_line(s: dict) -> str:
    err = (f"on the {s['checked']} nets predicted and then measured, {s['within_10']:.0%} of predictions were within "
           f"±10 % (MAPE {s['mape']:.1f} %)" if s["checked"] else "no net was both predicted and measured")
    fit = s.get("last_fit") or {}
    used = "used for dropping" if fit.get("usable") else "not used for dropping (cross-validated accuracy too low)"
    return (f"Latency predictor: {s['measured']} nets measured, {s['dropped_on_prediction']} dropped on a predicted "
            f"latency over the budget (not measured), {s['latency_predicted']} trained with a predicted latency "
            f"(not on the front); {err}; last fit on {fit.get('n', '?')} nets, {used}.")


def plot_predicted_vs_measured(pairs: list[dict]) -> bytes:
    fig = _figure(5.6, 5.0)
    ax = fig.add_subplot()
    p = [x["predicted_ms"] for x in pairs]
    m = [x["measured_ms"] for x in pairs]
    ax.scatter(m, p, s=28, c="#1f6fb4", alpha=0.85, zorder=3, label=f"nets predicted, then measured ({len(p)})")
    lo, hi = min(p + m) * 0.8, max(p + m) * 1.25
    ax.plot([lo, hi], [lo, hi], color="#444444", lw=1.0, zorder=2, label="predicted = measured")
    ax.fill_between([lo, hi], [lo * 0.9, hi * 0.9], [lo * 1.1, hi * 1.1], color="#999999", alpha=0.2, zorder=1,
                    label="±10 %")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    _plain_log_axis(ax.xaxis)
    _plain_log_axis(ax.yaxis)
    ax.set_xlabel("measured latency, ms")
    ax.set_ylabel("PREDICTED latency, ms (before measuring)")
    ax.set_title("Latency predictor: predicted vs measured", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return _png(fig)


def predicted_cell(r: dict[str, Any], ms: Any) -> str | None:
    """The trial table's latency cell when the figure is a prediction, else None."""
    if r.get("latency_predicted"):
        return f"{ms(r['latency_ms'])} (predicted)"
    if r.get("latency_ms") is None and r.get("latency_predicted_ms") is not None:
        return f"{ms(r['latency_predicted_ms'])} (predicted)"
    return None
