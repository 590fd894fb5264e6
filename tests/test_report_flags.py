"""Latency figures measured while the device was busy, throttled, noisy or emulated are flagged everywhere the
report shows them; report.json speaks snake_case; the summary says when the time limit cut the search."""

from __future__ import annotations

import json
import re

import optuna
import pytest
from test_report import BEST, NETS, _attrs, make_run

from autoseg.report import latency_flags, write_report

optuna.logging.set_verbosity(optuna.logging.WARNING)

# The case: the search's note on a busy device, and a p90 18x the median.
BUSY = {"message": "device busy: others used 1.3 cores", "cpu_others": 1.3,
        "stats": {"min_ms": 0.4, "median_ms": 0.47, "mean_ms": 1.2, "p90_ms": 8.5, "p99_ms": 9.0, "std_ms": 2.0,
                  "count": 30}}
INT8 = {"path": "best/model.int8.onnx", "size_bytes": 200_000, "test_miou": 0.6, "latency_ms": 1.73,
        "fp32_latency_ms": 15.87, "latency_source": "local", "device": "local", "argmax_agreement": 0.99}


# ---------------------------------------------------------------- the pure function


def test_an_old_record_is_judged_from_what_it_holds():
    assert latency_flags({**_attrs(*NETS[0])["latency"], **BUSY}) == ["busy: others used 1.3 cores",
                                                                      "noisy: p90/median 18.1"]
    clean = _attrs(*NETS[0])["latency"]
    assert latency_flags(clean) == []
    # cpu_others over the limit without the search's note (a record from the cache), and throttling
    assert latency_flags({**clean, "cpu_others": 0.9, "throttled": True}) == ["busy: others used 0.9 cores",
                                                                            "throttled"]
    assert latency_flags({**clean, "temp_before_c": 50.0, "temp_after_c": 56.0}) == ["temperature rose 6.0 °C"]
    assert latency_flags({**clean, "fingerprint": {"emulated": True}}) == ["emulated"]
    # few runs say nothing about noise; a failed measurement has no figure to flag
    few = {**clean, "stats": {**BUSY["stats"], "count": 5}}
    assert latency_flags(few) == []
    assert latency_flags({**clean, **BUSY, "error": "TIMEOUT"}) == []
    assert latency_flags(None) == [] and latency_flags({}) == []


def test_a_record_with_flags_is_taken_at_its_word():
    rec = {**_attrs(*NETS[0])["latency"], **BUSY, "flags": ["throttled"]}
    assert latency_flags(rec) == ["throttled"]
    assert latency_flags({**rec, "flags": []}) == []  # judged clean where it was measured


# ---------------------------------------------------------------- the report


@pytest.fixture(scope="module")
def busy_run(tmp_path_factory):
    """The chosen net (trial BEST) was timed on a busy device; the int8 model was timed while it was noisy."""
    int8 = {**INT8, "latency_flags": ["noisy: p90/median 3.2"], "fp32_latency_flags": []}
    run = make_run(tmp_path_factory.mktemp("busy") / "run", latency={BEST: BUSY, 1: {"throttled": True}},
                   card_extra={"int8": int8}, search={"max_minutes": 30.0, "trials": 40})
    return run, write_report(run)


def test_busy_and_noisy_figures_are_warned_about_with_their_reasons(busy_run):
    run, rep = busy_run
    assert rep["latency"]["flagged_trials"] == [1, BEST]
    (w,) = [w for w in rep["warnings"] if "busy, throttled or noisy" in w]
    assert "#3 busy: others used 1.3 cores, noisy: p90/median 18.1" in w and "#1 throttled" in w
    assert json.loads((run / "report.json").read_text())["warnings"] == rep["warnings"]
    md, page = (run / "report.md").read_text(), (run / "report.html").read_text()
    assert "busy: others used 1.3 cores" in md and "busy: others used 1.3 cores" in page
    assert "WARNING" in md and 'class="warn"' in page
    rows = {r["number"]: r for r in rep["trials"]}
    assert rows[BEST]["latency_flags"] == ["busy: others used 1.3 cores", "noisy: p90/median 18.1"]
    assert rows[0]["latency_flags"] == []
    # the trials table: the figure is marked, the note says why
    line = next(x for x in md.splitlines() if x.startswith(f"| {BEST} ★"))
    assert "| 0.47 ⚠ |" in line and "latency ⚠ busy: others used 1.3 cores, noisy: p90/median 18.1" in line


def test_the_chosen_net_and_the_int8_comparison_carry_their_flags(busy_run):
    run, rep = busy_run
    assert rep["chosen"]["latency_flags"] == ["busy: others used 1.3 cores", "noisy: p90/median 18.1"]
    md, page = (run / "report.md").read_text(), (run / "report.html").read_text()
    chosen = next(x for x in md.splitlines() if x.startswith("- Chosen net:"))
    assert "15 ms ⚠ busy: others used 1.3 cores; noisy: p90/median 18.1 (device pi@edge:22)" in chosen
    int8 = next(x for x in md.splitlines() if x.startswith("- int8:"))
    assert "1.73 ms ⚠ noisy: p90/median 3.2 vs float 15.87 ms" in int8 and "NOT a clean comparison" in int8
    assert "NOT a clean comparison" in page
    export_row = next(x for x in md.splitlines() if x.startswith("| int8 latency vs float |"))
    assert "⚠ noisy" in export_row


def test_a_clean_int8_comparison_is_shown_plainly(tmp_path):
    run = make_run(tmp_path / "run", card_extra={"int8": {**INT8, "latency_flags": [], "fp32_latency_flags": []}})
    rep = write_report(run)
    assert rep["warnings"] == [] and rep["latency"]["flagged_trials"] == []
    md = (run / "report.md").read_text()
    assert "- int8: 1.73 ms vs float 15.87 ms, local on local." in md
    assert "⚠" not in md
    # a card from before flags: its stats still show a noisy figure
    assert rep["chosen"]["latency_flags"] == []


KEY = re.compile(r"^[a-z0-9_]+$")
# Dict keys that are data, not field names: class names, tile sizes, fingerprint ids, the user's own config
# and Optuna's user attributes (written by the search, checked there), eval's per-class results.
DATA_KEYS = {("model_card", "test_per_class"), ("eval", "per_class"), ("latency", "fingerprints"),
             ("config",), ("study", "user_attrs")}


def _keys(o, path=()):
    if isinstance(o, dict):
        for k, v in o.items():
            if path not in DATA_KEYS:
                yield path, k
            yield from _keys(v, (*path, k) if path not in DATA_KEYS else (*path, "*"))
    elif isinstance(o, list):
        for v in o:
            yield from _keys(v, path)


def test_report_json_keys_are_snake_case(busy_run):
    run, _ = busy_run
    rep = json.loads((run / "report.json").read_text())
    bad = [(".".join(map(str, p)), k) for p, k in _keys(rep) if not KEY.match(k)]
    assert bad == []
    assert rep["export"]["onnx_nodes_before"] == 80 and rep["export"]["onnx_nodes_after"] == 52
    assert rep["export"]["int8"]["fp32_latency_ms"] == 15.87
    md = (run / "report.md").read_text()
    assert "| nodes before → after simplify | 80 → 52 |" in md  # prose stays in what people read


def _deadline_study(run, partial: bool):
    study = optuna.load_study(study_name="autoseg", storage=f"sqlite:///{run / 'study.db'}")
    arch, tile, params, macs, ms, cv = NETS[0]
    attrs = {**_attrs(f"{arch}x", tile, params, macs, ms, cv), "stopped_by": "deadline",
             "fold_scores": [cv, cv]}
    if partial:
        study.add_trial(optuna.trial.create_trial(value=cv, user_attrs=attrs))
    cut = {**_attrs(f"{arch}y", tile, params, macs, ms, None), "pruned_reason": "deadline", "epochs_trained": 3}
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, user_attrs=cut))


def test_the_summary_says_when_the_time_limit_cut_the_search(tmp_path):
    run = make_run(tmp_path / "run", search={"max_minutes": 30.0, "trials": 40})
    _deadline_study(run, partial=True)
    rep = write_report(run)
    t = rep["time_limit"]
    assert t["cut_short"] is True and t["trials_asked"] == 40 and len(t["partial_trials"]) == 1
    md = (run / "report.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("- Time limit"))
    assert "search.max_minutes 30 min" in line and "cut by the time limit" in line and "of 40 nets" in line
    assert "their CV is partial" in line and "1 stopped before a fold finished (not counted)" in line
    assert "time limit: CV over 2 fold(s) only" in md
    assert "deadline: stopped before a fold finished" in md
    assert "cut by the time limit" in (run / "report.html").read_text()


def test_no_time_limit_line_without_a_limit(busy_run, tmp_path):
    run = make_run(tmp_path / "run")
    assert write_report(run)["time_limit"] is None
    assert "Time limit" not in (run / "report.md").read_text()


def test_the_pareto_table_marks_a_flagged_figure(busy_run):
    run, rep = busy_run
    flagged = [n for n in rep["pareto_front"] if n in rep["latency"]["flagged_trials"]]
    assert flagged
    md = (run / "report.md").read_text()
    section = md.split("## Pareto front")[1].split("## Trials")[0]
    row = next(x for x in section.splitlines() if x.startswith(f"| {flagged[0]} |"))
    assert "⚠" in row
