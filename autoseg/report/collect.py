"""Reading the run folder: the Optuna study (read-only), data.json, the model card, eval results, examples.

Every part that does not exist yet becomes a "not available yet" note instead of an exception.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from autoseg.errors import InputError
from autoseg.report.format import NA, _first, _num
from autoseg.report.provenance import entry_flags, latency_flags
from autoseg.rundir import StudyFileError, check_study_file, sqlite_ro_uri

log = logging.getLogger(__name__)

STUDY_NAME = "autoseg"
MAX_EXAMPLES = 6
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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


def saved_storage(config: dict | None) -> str | None:
    """search.storage of a run's config.yml (its password masked), or None: the run's own study.db."""
    search = (config or {}).get("search")
    url = search.get("storage") if isinstance(search, dict) else None
    return url if isinstance(url, str) and url else None


def saved_study_name(config: dict | None) -> str:
    """search.study_name of a run's config.yml (runs made before it existed used the fixed name)."""
    search = (config or {}).get("search")
    name = search.get("study_name") if isinstance(search, dict) else None
    return name if isinstance(name, str) and name else STUDY_NAME


def _read_study(db: Path, notes: list[str], url: str | None = None, name: str = STUDY_NAME
                ) -> tuple[dict | None, list[Any]]:
    """(study summary, frozen trials), or (None, []) with a note when there is no readable study.

    `url`: the study is in that database (search.storage), read over a read-only session; a server that cannot be
    reached, or refuses the credentials, is an error (exit 3 or 2), not a note."""
    if url is not None:
        return _read_rdb_study(url, notes, name)
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
        study = optuna.load_study(study_name=name, storage=storage)
        trials = study.get_trials(deepcopy=False)
    except Exception as e:  # a half-created or foreign database is "not available", not a crash
        log.warning("cannot read the study in %s: %s", db, e)
        notes.append(f"study.db: {NA} (cannot read study {name!r}: {type(e).__name__})")
        return None, []
    finally:
        if storage is not None:
            storage.remove_session()
            storage.engine.dispose()
    return _summary(study, trials)


def _read_rdb_study(url: str, notes: list[str], name: str) -> tuple[dict | None, list[Any]]:
    import optuna

    from autoseg.storage import describe, open_storage

    storage = open_storage(url, "", read_only=True)
    try:
        if name not in {s.study_name for s in storage.get_all_studies()}:
            notes.append(f"study: {NA} (no study {name!r} in {describe(url)} yet: the search has not started)")
            return None, []
        study = optuna.load_study(study_name=name, storage=storage)
        return _summary(study, study.get_trials(deepcopy=False))
    finally:
        storage.remove_session()
        storage.engine.dispose()


def _summary(study: Any, trials: list[Any]) -> tuple[dict, list[Any]]:
    info = {
        "name": study.study_name,
        "directions": [d.name.lower() for d in study.directions],
        # The workers' copies of the config and the data fingerprint are theirs, not the report's (they are long).
        "user_attrs": {k: v for k, v in study.user_attrs.items() if k not in ("run_config", "data_fingerprint")},
    }
    info["objective"] = info["user_attrs"].get("objective") or (
        "pareto" if len(info["directions"]) == 2 else "penalty")
    info["n_trials"] = len(trials)
    info["states"] = dict(Counter(t.state.name.lower() for t in trials))
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
    if t.state.name == "COMPLETE" and a.get("stopped_by") == "deadline":
        done = len(a["fold_scores"]) if isinstance(a.get("fold_scores"), list) else None
        note = f"time limit: CV over {done} fold(s) only" if done else "time limit: CV over the folds done"
    elif t.state.name == "PRUNED" and a.get("pruned_reason") == "deadline" and not steps:
        note = "deadline: stopped before a fold finished (not counted; a rerun trains it)"
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
        "latency_flags": latency_flags(lat) if lat else [],
        "emulated": bool(lat.get("emulated") or (lat.get("fingerprint") or {}).get("emulated")),
        "providers_used": lat.get("providers_used"),
        "cached": lat.get("cached"),
        # Issue #26: the latency predictor's figure (before measuring), and whether latency_ms is only predicted.
        "latency_predicted": bool(a.get("latency_is_predicted")),
        "latency_predicted_ms": _num(a.get("latency_predicted_ms")),
        "latency_predictor": a.get("latency_predictor"),
        "predicted_over_budget": a.get("pruned_reason") == "predicted_over_budget",
        "cv_mean": cv,
        "cv_std": _num(a.get("cv_std")),
        "fold_scores": a.get("fold_scores"),
        "same_as_trial": a.get("same_as_trial"),
        "stopped_by": a.get("stopped_by") or ("deadline" if a.get("pruned_reason") == "deadline" else None),
        "values": values,
        "pruned_reason": note,
        "started": t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else None,
        "finished": t.datetime_complete.isoformat(timespec="seconds") if t.datetime_complete else None,
    }


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
                out[part] = {f"tile_{k}": x for k, x in nums.items()}
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
            # The card's own record of its measurement, else the trial's (the same figure), else its stats.
            "latency_flags": _first(entry_flags(card), best["latency_flags"] if best else None,
                                    latency_flags({"stats": card.get("latency_stats")})),
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
    keys = ("arch", "tile", "params", "macs", "latency_ms", "latency_source", "device", "latency_flags", "cv_mean",
            "cv_std")
    return {"trial": best["number"], "provisional": True, "from": "study (best objective so far)",
            **{k: best[k] for k in keys}}


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


def _time_limit(rows: list[dict], config: dict | None, study: dict | None) -> dict | None:
    """What search.max_minutes did to the search (None without a limit): the trials it trained on fewer
    folds (stopped_by "deadline"), the ones it stopped before a fold (pruned_reason "deadline"), and
    whether it ended the search before the asked number of nets."""
    scfg = (config or {}).get("search") or {}
    limit = _num(scfg.get("max_minutes"))
    partial = [r["number"] for r in rows if r["state"] == "COMPLETE" and r["stopped_by"] == "deadline"
               and r["same_as_trial"] is None]
    cut = [r["number"] for r in rows if r["state"] == "PRUNED" and r["stopped_by"] == "deadline"]
    if limit is None and not partial and not cut:
        return None
    # The nets the search counts (search.trial_counts): finished, not repeats, measured, not cut before a fold.
    looked = sum(r["state"] in ("COMPLETE", "PRUNED") and r["same_as_trial"] is None and r["stopped_by"] is None
                 for r in rows) + len(partial) - ((study or {}).get("unmeasured") or 0)
    asked = scfg.get("trials") if isinstance(scfg.get("trials"), int) else None
    running = any(r["state"] in ("RUNNING", "WAITING") for r in rows)
    short = bool(partial or cut) or (not running and asked is not None and 0 < looked < asked and limit is not None)
    return {"max_minutes": limit, "trials_asked": asked, "nets_looked_at": looked,
            "partial_trials": partial, "cut_trials": cut, "cut_short": short, "search_running": running}


def _export_summary(card: dict | None) -> dict | None:
    """The exported model (and its int8 twin) from the model card, in snake_case keys; prose is the renderers'."""
    onnx = (card or {}).get("onnx")
    if not isinstance(onnx, dict):
        return None
    out: dict[str, Any] = {
        "file": onnx.get("path", "best/model.onnx"), "size_bytes": onnx.get("size_bytes"), "opset": onnx.get("opset"),
        "parity_max_abs_diff": onnx.get("parity_max_abs_diff"), "onnx_nodes_before": onnx.get("nodes_before"),
        "onnx_nodes_after": onnx.get("nodes_after"), "simplified": onnx.get("simplified")}
    q = (card or {}).get("int8")
    if isinstance(q, dict) and "error" in q:
        out["int8"] = {"error": q["error"]}
    elif isinstance(q, dict):  # export.int8: the quantized model beside the float one, timed beside it
        out["int8"] = {
            "file": q.get("path"), "size_bytes": q.get("size_bytes"), "test_miou": _num(q.get("test_miou")),
            "fp32_test_miou": _num((card or {}).get("test_miou")), "latency_ms": _num(q.get("latency_ms")),
            "latency_flags": entry_flags(q) or [], "fp32_latency_ms": _num(q.get("fp32_latency_ms")),
            "fp32_latency_flags": entry_flags(q, "fp32_") or [], "latency_source": q.get("latency_source"),
            "device": q.get("device"), "argmax_agreement": _num(q.get("argmax_agreement")),
            "latency_error": q.get("latency_error")}
    return out


def _class_colours(data: Any, names: list[str]) -> list[dict]:
    """The colour each class has in the example strips (visual.palette of the dataset's class map)."""
    from autoseg.visual import palette

    data = data if isinstance(data, dict) else {}
    cmap = data.get("class_map") if isinstance(data.get("class_map"), dict) else {}
    n = len(names) or (data.get("num_classes") if isinstance(data.get("num_classes"), int) else 0)
    if not n:
        return []
    colors = cmap.get("colors") if isinstance(cmap.get("colors"), list) else None
    try:
        pal = palette(n, colors)
    except (TypeError, ValueError):  # a damaged class map: the strips' colours cannot be told
        return []
    return [{"name": names[i] if i < len(names) else f"class {i}", "rgb": pal[i].tolist()} for i in range(n)]
