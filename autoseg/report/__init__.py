"""The report a person reads to choose a net: RUN/report.md, a self-contained RUN/report.html, RUN/report.json.

It only reads the run directory. The Optuna storage is opened through a read-only SQLite connection,
so a report can be written while the search is still running; every part that does not exist yet
becomes a "not available yet" line instead of an exception.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from autoseg.errors import InputError
from autoseg.pareto import pareto_front
from autoseg.report.collect import (
    _class_colours,
    _class_names,
    _data_summary,
    _examples,
    _export_summary,
    _other_evals,
    _per_class_iou,
    _pick_chosen,
    _read_json,
    _read_study,
    _time_limit,
    _trial_row,
    saved_storage,
    saved_study_name,
)
from autoseg.report.format import NA, _num
from autoseg.report.html import render_html
from autoseg.report.markdown import render_markdown
from autoseg.report.plots import plot_latency_vs_macs, plot_pareto, plot_per_class_iou, plot_training_curve
from autoseg.report.predicted import plot_predicted_vs_measured, predictor_summary
from autoseg.report.provenance import (
    OUTLIER_MIN_RATIO,
    _latency_provenance,
    _macs_outliers,
    fit_loglog,
    latency_flags,
)
from autoseg.rundir import fs_escape, write_text_atomic

__all__ = ["_latency_provenance", "_trial_row", "fit_loglog", "latency_flags", "render_html", "render_markdown",
           "write_report"]

log = logging.getLogger(__name__)


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


def write_report(run_dir: Path, storage: str | None = None) -> dict:
    """Write RUN/report.md, RUN/report.html and RUN/report.json; return the JSON dict.

    `storage`: the study's database URL (search.storage); default the one the run's config.yml names (its password
    masked: libpq's PGPASSWORD or ~/.pgpass give it), else the run's study.db."""
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
    study, trials = _read_study(run_dir / "study.db", missing, storage or saved_storage(config),
                                saved_study_name(config))
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
           and r["latency_ms"] is not None and r["same_as_trial"] is None and not r["latency_predicted"]]
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

    mpts = [r for r in rows if (_num(r["macs"]) or 0) > 0 and (r["latency_ms"] or 0) > 0 and r["same_as_trial"] is None
            and not r["latency_predicted"]]
    predictor = predictor_summary(rows)
    if predictor and predictor["pairs"]:
        pngs["predicted"] = plot_predicted_vs_measured(predictor["pairs"])
    plots["predicted"] = {"available": "predicted" in pngs, "source": (
        "Trials whose latency the predictor (search.predict_latency) predicted before they were measured: "
        "predicted median (trial attr latency_predicted_ms) against the measurement (latency.stats)."
        if "predicted" in pngs else NA)}
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
    export = _export_summary(card)

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
        "latency_predictor": predictor,
        "per_class_iou": per_class,
        "examples": list(examples),
        "class_colours": _class_colours(data_raw, names),
        "export": export,
        "model_card": card,
        "training": None if training is None else {**training, "curve": curve},
        "second_stage": (card or {}).get("second_stage"),
        "other_evals": others,
        "time_limit": _time_limit(rows, config, study),
        "eval": {k: v for k, v in metrics.items() if k != "per_image"} if metrics else None,
        "plots": plots,
    })
    # Names that are not UTF-8 (a run or data folder, an image): \uXXXX escapes in JSON, \xNN in what people read.
    write_text_atomic(run_dir / "report.json", json.dumps(rep, indent=2, ensure_ascii=False) + "\n")
    write_text_atomic(run_dir / "report.md", fs_escape(render_markdown(rep, config_text, data_raw)))
    write_text_atomic(run_dir / "report.html", fs_escape(render_html(rep, pngs, examples, config_text, data_raw)))
    log.debug("report written to %s", run_dir / "report.html")
    return rep
