"""Rows and lines both reports show (trials, fingerprints, training, other evaluations, summary)."""

from __future__ import annotations

import shlex
from collections import Counter
from typing import Any

from autoseg.report.format import NA, _f, _flagged, _ms, _objective_cell, _si, _where
from autoseg.report.predicted import predicted_cell
from autoseg.report.provenance import unreliable


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


SECOND_STAGE_HEADERS = ["search rank", "#", "arch", "CV (search)", "validation mIoU", "value", "crops", "minutes"]


def _second_stage_rows(s: dict) -> tuple[str, list[list[str]]]:
    """The second stage (search.refine_top): its sentence and one row per net, ★ on the one that ships."""
    line = (f"The top {len(s['nets'])} nets by the search's score, each trained on {s['tiles']:,} crops of all "
            "training images and ranked by validation mIoU with the search's latency penalty (value); ★ ships.")
    rows = [[str(n["search_rank"]), ("★ " if n["trial"] == s["chosen"] else "") + str(n["trial"]), str(n["arch"]),
             _f(n.get("cv_score")), _f(n.get("val_miou")), _f(n.get("value")), f"{n.get('tile_passes') or 0:,}",
             f"{(n.get('seconds') or 0) / 60:.1f}"] for n in s["nets"]]
    return line, rows


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
        flags = r.get("latency_flags") or []
        note = "; ".join(filter(None, [
            f"repeat of #{r['same_as_trial']}" if r["same_as_trial"] is not None else "", r["pruned_reason"],
            f"latency ⚠ {', '.join(flags)}" if flags and r["latency_ms"] is not None else ""]))
        lat = predicted_cell(r, _ms) or _ms(r["latency_ms"]) + (" ⚠" if flags and r["latency_ms"] is not None else "")
        cells = [f"{r['number']}{mark}", r["state"].lower(), str(r["arch"] or "–"), str(r["tile"] or "–"),
                 _si(r["params"]), _si(r["macs"]), lat, _ms(r["latency_p90_ms"]), cv,
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
                     f"{_si(c.get('macs'))} MACs, {_flagged(_ms(c.get('latency_ms')) + ' ms', c.get('latency_flags'))} "
                     f"({_where(c.get('latency_source'), c.get('device'))}), "
                     f"CV {_f(c.get('cv_mean'))} ± {_f(c.get('cv_std'))}"
                     + (f", test mIoU {_f(c.get('test_miou'))}" if c.get("test_miou") is not None else "") + ".")
    else:
        lines.append(f"Chosen net: {NA}.")
    q = (rep.get("export") or {}).get("int8") or {}
    if q.get("latency_ms") is not None or q.get("fp32_latency_ms") is not None:
        lines.append(f"int8: {_int8_latency(q)}.")
    lat = rep["latency"]
    if lat.get("flagged_trials"):
        kinds = Counter(f.split(":")[0].split(" ")[0] for r in rep["trials"] if r["number"] in lat["flagged_trials"]
                        for f in unreliable(r.get("latency_flags") or []))
        lines.append(f"Latency: {len(lat['flagged_trials'])} of {lat['measured_trials']} measured figures are "
                     f"flagged ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}): trials "
                     f"{', '.join(f'#{n}' for n in lat['flagged_trials'][:12])}"
                     f"{' …' if len(lat['flagged_trials']) > 12 else ''}; see the warning above.")
    t = rep.get("time_limit")
    if t:
        lines.append(_time_limit_line(t))
    return lines


def _int8_latency(q: dict) -> str:
    """int8 vs float latency: plain when both figures are clean, else each with its flags and a caveat."""
    src = f"{q.get('latency_source') or '?'} on {q.get('device') or '?'}"
    a, b = q.get("latency_flags") or [], q.get("fp32_latency_flags") or []
    text = (f"{_flagged(_ms2(q.get('latency_ms')) + ' ms', a)} vs float "
            f"{_flagged(_ms2(q.get('fp32_latency_ms')) + ' ms', b)}, {src}")
    if unreliable([*a, *b]):
        text += " (NOT a clean comparison: the device was not quiet while timing)"
    return text


def _ms2(v: Any) -> str:
    return _f(v, ".2f")


def _time_limit_line(t: dict) -> str:
    """search.max_minutes: how far the search got, and what the limit cut short."""
    head = "Time limit (search.max_minutes" + (f" {t['max_minutes']:g} min)" if t.get("max_minutes") else ")")
    of = f" of {t['trials_asked']}" if t.get("trials_asked") else ""
    parts = []
    if t["partial_trials"]:
        parts.append(f"{len(t['partial_trials'])} trained on fewer folds than asked "
                     f"({', '.join(f'#{n}' for n in t['partial_trials'])}: their CV is partial)")
    if t["cut_trials"]:
        parts.append(f"{len(t['cut_trials'])} stopped before a fold finished (not counted)")
    if not t["cut_short"]:
        return f"{head}: not reached{' yet' if t.get('search_running') else ''}; {t['nets_looked_at']}{of} nets " \
               "looked at."
    rest = f"; {'; '.join(parts)}" if parts else ""
    return (f"{head}: the search was cut by the time limit after {t['nets_looked_at']}{of} nets{rest}. "
            "The result is the best of a partial search: rerun the same command to look at more.")


SHIP_NOTE = ("`autoseg export RUN --trial N` trains that net like the chosen one (the same final training), "
             "then exports, verifies and tests it into RUN/trials/N/.")


def _ship_command(rep: dict, number: int) -> str:
    return f"autoseg export {shlex.quote(rep['run_dir'])} --trial {number}"


def _other_rows(others: list[dict]) -> list[list[str]]:
    return [[str(o["images"]), str(o["n_images"]), _f(o["miou"]), _f(o["macro_dice"]), _f(o["pixel_acc"]),
             o["folder"]] for o in others]


OTHER_HEADERS = ["images", "n", "mIoU", "macro Dice", "pixel acc", "results in"]
OTHER_SOURCE = ("`autoseg eval RUN --test-images X --test-masks Y`: the shipped net on other images, kept apart "
                "from the run's own held-out results above.")


def _export_rows(e: dict) -> list[list[str]]:
    """The export summary (snake_case in report.json) as the (field, value) rows people read."""
    rows = [["file", str(e.get("file"))], ["size", _si(e.get("size_bytes"), "B")], ["opset", str(e.get("opset"))],
            ["parity max |diff| (onnxruntime vs torch)", _f(e.get("parity_max_abs_diff"), ".2e")]]
    if e.get("onnx_nodes_before") is not None:
        rows.append(["nodes before → after simplify", f"{e['onnx_nodes_before']} → {e.get('onnx_nodes_after')}"])
    if e.get("simplified") is not None:
        rows.append(["simplified", str(e["simplified"])])
    q = e.get("int8")
    if isinstance(q, dict) and "error" in q:
        rows.append(["int8 not exported", str(q["error"])])
    elif isinstance(q, dict):
        rows += [["int8 file", str(q.get("file"))], ["int8 size", _si(q.get("size_bytes"), "B")],
                 ["int8 test mIoU (float's)", f"{_f(q.get('test_miou'))} ({_f(q.get('fp32_test_miou'))})"],
                 ["int8 latency vs float", _int8_latency(q)],
                 ["int8 argmax agreement with float, calibration tiles", _f(q.get("argmax_agreement"), ".4f")]]
        if q.get("latency_error"):
            rows.append(["int8 timing not done", str(q["latency_error"])])
    return rows
