"""RUN/report.html: one self-contained page (inline CSS, PNGs as data: URLs, no scripts, no links out)."""

from __future__ import annotations

import base64
import html
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
.legend{font-size:12.5px}.sw{display:inline-block;width:12px;height:12px;border:1px solid #555;margin:0 4px -1px 8px}
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
            [str(n), str(front[n]["arch"]),
             _flagged(_ms(front[n]["latency_ms"]), front[n].get("latency_flags")), _f(front[n]["cv_mean"]),
             _ship_command(rep, n)] for n in rep["pareto_front"]]),
            f'<p class="source">{_h(SHIP_NOTE.replace("`", ""))}</p>']
    else:
        B.append(_na("Pareto front (no completed trial with both a CV score and a latency)"))

    B.append("<h2>Trials</h2>")
    if rep["trials"]:
        chosen = rep["chosen"]["trial"] if rep["chosen"] else None
        h, body, cls = _trial_table(rep["trials"], rep["study"]["objective"], set(rep["pareto_front"]), chosen,
                                    rep["latency"]["mixed"] or rep["latency"].get("pooled", False))
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

    if rep.get("latency_predictor"):
        B += ["<h2>Latency predictor</h2>", f"<p>{_h(summary_line(rep['latency_predictor']))} Figures marked "
              "(predicted) in the tables were not measured.</p>"]
        if "predicted" in pngs:
            B += [_img(pngs["predicted"], "Predicted vs measured latency"),
                  f'<p class="source">{_h(rep["plots"]["predicted"]["source"])}</p>']

    B.append("<h2>Final net on the test images</h2>")
    if "per_class_iou" in pngs:
        B += [_img(pngs["per_class_iou"], "Per-class IoU"),
              f'<p class="source">{_h(rep["plots"]["per_class_iou"]["source"])}</p>']
    else:
        B.append(_na("Per-class IoU"))
    if examples:
        if rep.get("class_colours"):
            B.append('<p class="legend">Class colours: ' + "".join(
                f'<span class="sw" style="background:rgb({",".join(map(str, c["rgb"]))})"></span>{_h(c["name"])} '
                for c in rep["class_colours"]) + "</p>")
        B.append('<div class="examples">' + "".join(
            f"<figure>{_img(png, name, 'ex')}<figcaption>{_h(name)}: image | truth | prediction</figcaption></figure>"
            for name, png in examples.items()) + "</div>")
        B.append('<p class="source">Test examples from eval/examples/ (written by eval): the test image, its '
                 "ground-truth mask and the final net's prediction, in the class colours above.</p>")
    else:
        B.append(_na("Test examples"))

    if rep.get("other_evals"):
        B += ["<h2>Evaluations on other images</h2>", _html_table(OTHER_HEADERS, _other_rows(rep["other_evals"])),
              f'<p class="source">{_h(OTHER_SOURCE.replace("`", ""))}</p>']

    if rep.get("second_stage"):
        line, rows = _second_stage_rows(rep["second_stage"])
        B += ["<h2>Second stage: the top nets on all data</h2>", _html_table(SECOND_STAGE_HEADERS, rows),
              f'<p class="source">{_h(line)}</p>']

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
        B += [_html_table(["field", "value"], _export_rows(rep["export"])),
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
