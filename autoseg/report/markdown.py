"""RUN/report.md: the report as text, for a terminal, a diff or a code review."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from autoseg.report.format import NA, _f, _flagged, _ms, _pct, _si
from autoseg.report.predicted import summary_line
from autoseg.report.tables import (
    OTHER_HEADERS,
    OTHER_SOURCE,
    SECOND_STAGE_HEADERS,
    SHIP_NOTE,
    _export_rows,
    _fp_rows,
    _other_rows,
    _second_stage_rows,
    _ship_command,
    _summary_lines,
    _training_rows,
    _trial_table,
)


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
                         _si(front[n]["macs"]), _flagged(_ms(front[n]["latency_ms"]), front[n].get("latency_flags")),
                         f"{_f(front[n]['cv_mean'])} ± {_f(front[n]['cv_std'])}",
                         f"`{_ship_command(rep, n)}`"] for n in rep["pareto_front"]])
        L += [SHIP_NOTE, ""]
    else:
        L += [f"Pareto front: {NA} (no completed trial with both a CV score and a latency).", ""]

    L += ["## Trials", ""]
    if rep["trials"]:
        chosen = rep["chosen"]["trial"] if rep["chosen"] else None
        h, body, _ = _trial_table(rep["trials"], rep["study"]["objective"], set(rep["pareto_front"]), chosen,
                                  rep["latency"]["mixed"] or rep["latency"].get("pooled", False))
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

    if rep.get("latency_predictor"):
        L += ["## Latency predictor", "", summary_line(rep["latency_predictor"]), "",
              "Figures marked (predicted) in the tables were not measured.", ""]

    L += ["## Final net on the test images", ""]
    pc = rep["per_class_iou"]
    if pc:
        L += [f"Per-class IoU from {pc['source']}"
              + (f" on {pc['n_images']} test images" if pc.get("n_images") else "") + ":", ""]
        L += _md_table(["class", "IoU"], [[n, _f(v) if v is not None else "absent"] for n, v in pc["items"]])
    else:
        L += [f"Per-class IoU: {NA}.", ""]
    ex = rep["examples"]
    L += [f"Test examples (image | truth | prediction): {', '.join('eval/examples/' + e for e in ex)} "
          "(embedded in report.html)." if ex else f"Test examples: {NA}.", ""]
    if ex and rep.get("class_colours"):
        L += ["Class colours: " + ", ".join(f"{c['name']} rgb{tuple(c['rgb'])}" for c in rep["class_colours"]) + ".",
              ""]

    if rep.get("other_evals"):
        L += ["## Evaluations on other images", "", OTHER_SOURCE, ""]
        L += _md_table(OTHER_HEADERS, _other_rows(rep["other_evals"]))

    if rep.get("second_stage"):
        line, rows = _second_stage_rows(rep["second_stage"])
        L += ["## Second stage: the top nets on all data", "", line, ""]
        L += _md_table(SECOND_STAGE_HEADERS, rows)

    L += ["## Training of the shipped net", ""]
    if rep.get("training"):
        L += _md_table(["field", "value"], _training_rows(rep["training"]))
        L += [rep["plots"]["training"]["source"], ""]
    else:
        L += [f"Training: {NA}.", ""]

    L += ["## Export", ""]
    e = rep["export"]
    if e:
        L += _md_table(["field", "value"], _export_rows(e))
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
