"""The latency predictor (issue #26): features, the fit and its trust, learning from the latency cache, and
its use in the search (drop, no drop near the budget, fallback to measuring, off) on real components."""

from __future__ import annotations

import json
import logging
import sqlite3
from contextlib import closing

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState

from autoseg.config import load_config
from autoseg.devices import LatencyCache, LocalDevice, MeasureSettings, open_device, settings_from_config
from autoseg.export import onnx_bytes
from autoseg.latency_history import Learner, load_history, remember_arch
from autoseg.predictor import (
    MIN_MEASUREMENTS,
    MODELS,
    LatencyPredictor,
    LatencyRecord,
    accuracy,
    feature_names,
    features,
    kernel_cost,
    kernel_group,
    kernels,
)
from autoseg.rundir import RunDir
from autoseg.search import (
    OVER_BUDGET,
    Objective,
    SearchTask,
    TileData,
    choose_best,
    open_study,
    pareto_summary,
    run_trials,
    trial_counts,
)
from autoseg.unet import Arch, build_unet, count_macs, count_params
from edge_agent.fingerprint import fingerprint_id

ARCHS = [
    Arch((3,), (8,)),
    Arch((3, 5), (8, 16), "separable", "bilinear"),
    Arch((5, 3, 3), (8, 16, 32), "standard", "transpose"),
    Arch((3, 3, 7, 3), (4, 8, 8, 16), "separable", "transpose"),
    Arch((3, 3, 3), (16, 16, 24), "standard", "bilinear"),
]


def synthetic(n: int, noise: float = 0.02, seed: int = 0, base_ms: float = 0.0) -> list[LatencyRecord]:
    """Nets of a small space with an additive cost latency: work, memory traffic and per-op overhead."""
    rng = np.random.default_rng(seed)
    names = feature_names()
    out: list[LatencyRecord] = []
    seen: set[tuple[str, int]] = set()
    while len(out) < n:
        levels = int(rng.integers(1, 4))
        ch = np.sort(rng.choice([4, 8, 16, 24, 32], size=levels))
        arch = Arch(tuple(int(k) for k in rng.choice([3, 5], size=levels)), tuple(int(c) for c in ch),
                    str(rng.choice(["standard", "separable"])), str(rng.choice(["transpose", "bilinear"])))
        size = int(rng.choice([16, 32, 64]))
        if (arch.key(), size) in seen:  # one measurement per net and size, as the cache keeps
            continue
        seen.add((arch.key(), size))
        f = features(arch, size)
        ms = (base_ms + 2e-6 * f[names.index("macs")] + 5e-6 * f[names.index("macs_depthwise")]
              + 1e-6 * f[names.index("act_bytes")] + 0.01 * f[names.index("ops")])
        out.append(LatencyRecord(arch, (size, size), float(ms * (1 + rng.normal(0, noise)))))
    return out


# ------------------------------------------------------------------------------------------- features


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.key())
def test_features_add_up_to_the_nets_macs_and_params(arch):
    f = dict(zip(feature_names(), features(arch, (32, 64), 3, 5), strict=True))
    assert f["macs"] == sum(f[f"macs_l{i}"] for i in range(6)) == count_macs(arch, 3, 5, 32, 64)
    assert f["params"] == sum(f[f"params_l{i}"] for i in range(6)) == count_params(build_unet(arch, 3, 5))
    assert f["levels"] == arch.levels and f["input_pixels"] == 32 * 64
    assert f["separable"] == (arch.conv == "separable") and f["bilinear"] == (arch.upsample == "bilinear")
    assert all(f[f"macs_l{i}"] == 0 for i in range(arch.levels, 6))  # levels the net does not have
    assert f["act_bytes"] > 0 and (f["macs_depthwise"] > 0) == (arch.conv == "separable")


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.key())
def test_the_kernel_list_is_the_exported_graphs_ops_and_adds_up_to_the_nets_macs(arch):
    import onnx

    graph = onnx.load_from_string(onnx_bytes(build_unet(arch, 3, 5).eval(), 3, 32, 17)).graph
    ops = [n.op_type for n in graph.node]
    ks = kernels(arch, (32, 64), 3, 5)
    kinds = [k.kind for k in ks]
    assert ops.count("Conv") == sum(kinds.count(k) for k in ("conv", "dw", "pw"))
    for op, kind in (("ConvTranspose", "convT"), ("MaxPool", "pool"), ("Resize", "resize"), ("Concat", "concat")):
        assert ops.count(op) == kinds.count(kind), op
    assert sum(kernel_cost(k)[0] for k in ks) == count_macs(arch, 3, 5, 32, 64)
    assert sum(k.first for k in ks) == (2 if arch.conv == "separable" else 1)  # the op(s) reading the raw input


def test_channels_are_rounded_up_to_the_devices_block_but_the_raw_input_is_not():
    a24, a32 = kernels(Arch((3,), (24,)), 16, 3, 2), kernels(Arch((3,), (32,)), 16, 3, 2)
    assert kernel_cost(a24[1], 16) == kernel_cost(a32[1], 16)  # 24 -> 24 costs what 32 -> 32 does
    assert kernel_cost(a24[1], 8)[0] < kernel_cost(a32[1], 8)[0]
    first = a24[0]
    assert first.first and first.cin == 3
    assert kernel_cost(first, 16)[0] == 16 * 16 * 3 * 32 * 9  # input 3 as is, output 24 -> 32
    # A conv reading fewer channels than a block reads them plain: 8 -> 8 costs 8 x 16, in the input's group.
    eight = kernels(Arch((3,), (8,)), 16, 3, 2)[1]
    assert kernel_cost(eight, 16)[0] == 16 * 16 * 8 * 16 * 9
    assert kernel_group(eight, 16) == "in_conv3" and kernel_group(eight, 8) == "conv3"


def test_the_kernel_model_learns_the_devices_channel_block():
    """Latencies made by a 16-channel blocked device: the fit picks the kernel model with 16-wide blocks and
    predicts held-out nets (channel counts 8, 24 and 40 among them) within ±10 %."""
    rng = np.random.default_rng(1)
    recs, seen = [], set()
    while len(recs) < 90:
        levels = int(rng.integers(1, 4))
        ch = np.sort(rng.choice([8, 16, 24, 32, 40], size=levels))
        arch = Arch(tuple(int(k) for k in rng.choice([3, 5], size=levels)), tuple(int(c) for c in ch),
                    str(rng.choice(["standard", "separable"])), str(rng.choice(["transpose", "bilinear"])))
        size = int(rng.choice([16, 32, 64]))
        if (arch.key(), size) in seen:
            continue
        seen.add((arch.key(), size))
        ks = kernels(arch, size)
        ms = 0.02 + sum((4e-6 if k.kind == "dw" else 1e-6) * kernel_cost(k, 16)[0] + 2e-6 * kernel_cost(k, 16)[1]
                        + 0.01 for k in ks)
        recs.append(LatencyRecord(arch, (size, size), float(ms * (1 + rng.normal(0, 0.01)))))
    p = LatencyPredictor().fit(recs[:70])
    assert p.kind == "kernels/b16" and p.usable
    acc = accuracy([p.predict(r.arch, r.size)[0] for r in recs[70:]], [r.latency_ms for r in recs[70:]])
    assert acc.within_10 >= 0.9


# ------------------------------------------------------------------------------------------- the fit


def test_a_fit_on_clean_records_is_usable_and_predicts_held_out_nets_within_10_percent():
    recs = synthetic(80)
    p = LatencyPredictor().fit(recs[:60])
    assert p.usable and p.why_not() == "" and p.cv.within_10 >= 0.9
    preds = [p.predict(r.arch, r.size) for r in recs[60:]]
    acc = accuracy([m for m, _, _ in preds], [r.latency_ms for r in recs[60:]])
    assert acc.within_10 >= 0.9 and acc.mape < 5
    inside = [lo <= r.latency_ms <= hi for (_, lo, hi), r in zip(preds, recs[60:], strict=True)]
    assert np.mean(inside) >= 0.85  # the band is a 95 % one
    assert all(lo <= m <= hi for m, lo, hi in preds)


def test_too_few_or_too_noisy_records_are_not_used_for_dropping():
    few = LatencyPredictor().fit(synthetic(MIN_MEASUREMENTS - 1))
    assert not few.usable and f"{MIN_MEASUREMENTS} needed" in few.why_not()
    with pytest.raises(RuntimeError):
        LatencyPredictor().fit(synthetic(2)).predict(ARCHS[0], 16)
    noisy = LatencyPredictor().fit(synthetic(40, noise=0.5))
    assert noisy.fitted and not noisy.usable
    assert "cross-validated accuracy" in noisy.why_not() and "under the 80%" in noisy.why_not()


def test_a_fit_on_real_local_measurements_of_tiny_nets():
    """Real onnxruntime timings. The machine running the tests may be loaded, so only sanity is asserted here;
    accuracy is benchmarks/bench_predictor.py's."""
    dev = LocalDevice(max_busy_cores=None)
    s = MeasureSettings(warmup=1, min_runs=3, min_seconds=0.0, threads=1)
    recs = []
    for i, arch in enumerate(ARCHS * 4):
        size = (16, 32)[i % 2] * (2 if i >= 10 else 1)
        torch.manual_seed(0)
        blob = onnx_bytes(build_unet(arch, 3, 2).eval(), 3, size, 17)
        m = dev.measure(blob, (1, 3, size, size), s)
        recs.append(LatencyRecord(arch, (size, size), m.median_ms))
    p = LatencyPredictor().fit(recs)
    assert p.fitted and p.n == len(recs) and p.kind in MODELS
    med, lo, hi = p.predict(ARCHS[2], 32)
    assert 0 < lo <= med <= hi and np.isfinite(hi)
    assert 0 <= p.cv.within_10 <= 1 and p.cv.mape > 0


# ------------------------------------------------------------------------------------------- the cache


def test_history_reads_its_fingerprint_settings_and_precision_and_skips_corrupt_entries(tmp_path, caplog):
    path = tmp_path / "latency_cache.db"
    cache = LatencyCache(path)
    key = MeasureSettings().key()
    recs = synthetic(6)
    for i, r in enumerate(recs):
        g = f"g{i}"
        cache.put(g, "fp-a", f"{key}|shape=1x3x{r.size[0]}x{r.size[1]}", {"error": "OK", "median_ms": r.latency_ms,
                                                                        "stats": {"median_ms": r.latency_ms}})
        remember_arch(cache, g, r.arch, 3, 2, "int8" if i == 5 else "fp32")
    cache.put("other-fp", "fp-b", f"{key}|shape=1x3x16x16", {"error": "OK", "median_ms": 1.0})
    remember_arch(cache, "other-fp", ARCHS[0], 3, 2, "fp32")
    cache.put("other-settings", "fp-a", f"{MeasureSettings(warmup=9).key()}|shape=1x3x16x16",
              {"error": "OK", "median_ms": 1.0})
    remember_arch(cache, "other-settings", ARCHS[0], 3, 2, "fp32")
    cache.put("no-arch", "fp-a", f"{key}|shape=1x3x16x16", {"error": "OK", "median_ms": 1.0})
    cache.put("bad-json", "fp-a", f"{key}|shape=1x3x16x16", {"error": "OK", "median_ms": 1.0})
    remember_arch(cache, "bad-json", ARCHS[1], 3, 2, "fp32")
    cache.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE latency SET measurement='{not json' WHERE graph_hash='bad-json'")
        db.execute("UPDATE latency_arch SET arch=? WHERE graph_hash='g4'", (json.dumps({"kernels": [4]}),))
    db.close()
    with caplog.at_level(logging.WARNING, logger="autoseg"):
        h = load_history(LatencyCache(path), "fp-a", key, "fp32")
    assert sorted(r.latency_ms for r in h.records) == sorted(r.latency_ms for r in recs[:4])
    assert h.unknown == 1 and h.corrupt == 2
    assert caplog.text.count("skipped, it cannot be read") == 2
    assert load_history(LatencyCache(tmp_path / "missing.db"), "fp-a", key, "fp32").records == []


def test_the_learner_starts_at_the_minimum_and_refits_as_measurements_arrive(tmp_path):
    learner = Learner(None, "fp", "k", "fp32", refit_every=5)
    recs = synthetic(MIN_MEASUREMENTS + 10)
    for r in recs[:MIN_MEASUREMENTS - 1]:
        learner.add(r)
    assert learner.guess(ARCHS[1], 32, 3, 2) is None
    learner.add(recs[MIN_MEASUREMENTS - 1])  # the minimum reached: fitted at once
    g = learner.guess(ARCHS[1], 32, 3, 2)
    assert g is not None and g.fit["n"] == MIN_MEASUREMENTS and g.fit["usable"]
    for r in recs[MIN_MEASUREMENTS:MIN_MEASUREMENTS + 5]:
        learner.add(r)
    assert learner.guess(ARCHS[1], 32, 3, 2).fit["n"] == MIN_MEASUREMENTS + 5


# ------------------------------------------------------------------------------------------- the search

TINY = {
    "tiles.size": 16,
    "search.space.levels": [1, 2],
    "search.space.kernels": [3],
    "search.space.channels": [4, 8],
    "search.space.conv": ["standard"],
    "search.space.upsample": ["transpose", "bilinear"],
    "train.folds": 2,
    "train.epochs": 1,
    "device.warmup": 0,
    "device.min_runs": 2,
    "device.min_seconds": 0.0,
    "device.max_busy_cores": 1e6,
}


def tiny_task() -> SearchTask:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 3, 16, 16)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    return SearchTask(data={16: TileData(x, y, np.arange(12) // 3)}, in_channels=3, num_classes=2, class_weights=None)


def seed_cache(path, cfg, n: int, base_ms: float) -> list[LatencyRecord]:
    """Earlier runs' measurements on this machine: cache entries with their nets recorded."""
    fid = fingerprint_id(LocalDevice().fingerprint())
    key = settings_from_config(cfg.device, cfg.seed).key()
    cache = LatencyCache(path)
    recs = synthetic(n, base_ms=base_ms)
    for i, r in enumerate(recs):
        cache.put(f"seed{i}", fid, f"{key}|shape=1x3x{r.size[0]}x{r.size[1]}",
                  {"error": "OK", "median_ms": r.latency_ms, "stats": {"median_ms": r.latency_ms}})
        remember_arch(cache, f"seed{i}", r.arch, 3, 2, "fp32")
    cache.close()
    return recs


def search(tmp_path, trials: int, seeded: int, base_ms: float = 500.0, enqueue=None, **overrides):
    cfg = load_config(None, {**TINY, "out": str(tmp_path / "run"), "search.trials": trials, **overrides})
    run = RunDir(cfg.out).prepare()
    if seeded:
        seed_cache(run.latency_cache, cfg, seeded, base_ms)
    study = open_study(run, cfg)
    for params in enqueue or ():
        study.enqueue_trial(params)
    with closing(open_device(cfg.device, run.latency_cache)) as device:
        objective = Objective(cfg, tiny_task(), device, settings_from_config(cfg.device, cfg.seed), run,
                              on_trial=lambda s: None)
        try:
            run_trials(study, objective, cfg.search.trials)
        finally:
            measured = device.misses + device.hits
    return run, study, measured, objective


NET = {"levels": 2, "c0": 4, "k0": 3, "cstep1": 1, "k1": 3, "conv": "standard", "upsample": "bilinear"}


def test_a_net_predicted_over_the_budget_beyond_doubt_is_dropped_unmeasured(tmp_path):
    # The cache says this machine takes >= 500 ms for any net; the budget is 100 ms.
    run, study, measured, _ = search(tmp_path, trials=3, seeded=40, **{"search.latency_budget_ms": 100.0})
    assert measured == 0
    for t in study.trials:
        a = t.user_attrs
        assert t.state == TrialState.PRUNED and a["pruned_reason"] == "predicted_over_budget"
        assert a["latency_predicted_lo_ms"] > 100.0 and a["latency_predicted_ms"] >= a["latency_predicted_lo_ms"]
        assert a["latency_predictor"]["usable"] and a["latency_predictor"]["n"] == 40
        assert "latency_ms" not in a and "latency" not in a and a["macs"] > 0 and a["params"] > 0
        assert not (run.trial(t.number) / "model.onnx").exists()
    n = trial_counts(study)
    assert n["over_budget"] == n["predicted_over_budget"] == 3


def test_a_net_predicted_near_the_budget_is_measured(tmp_path):
    # Budget at the net's predicted median: its low end is under it, so it is measured (and, really fast, trained).
    cfg = load_config(None, {**TINY, "out": str(tmp_path / "probe")})
    learner = Learner(None, "fp", "k", "fp32")
    for r in synthetic(40, base_ms=500.0):
        learner.add(r)
    g = learner.guess(Arch((3, 3), (4, 8), "standard", "bilinear"), 16, 3, 2)
    assert cfg and g is not None and g.lo_ms < g.median_ms
    _, study, measured, _ = search(tmp_path, trials=1, seeded=40, enqueue=[NET],
                                   **{"search.latency_budget_ms": g.median_ms})
    t = study.trials[0]
    assert measured == 1 and t.state == TrialState.COMPLETE
    assert t.user_attrs["latency_predicted_ms"] == pytest.approx(g.median_ms, rel=1e-6)
    assert t.user_attrs["latency_ms"] < g.median_ms and t.user_attrs["latency_source"] == "local"


def test_too_few_measurements_fall_back_to_measuring_with_one_info_line(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="autoseg"):
        _, study, measured, _ = search(tmp_path, trials=2, seeded=3, **{"search.latency_budget_ms": 100.0})
    assert measured == 2
    assert all("latency" in t.user_attrs and "latency_predicted_ms" not in t.user_attrs for t in study.trials)
    lines = [r.getMessage() for r in caplog.records if "latency predictor" in r.getMessage()]
    assert len(lines) == 1 and f"{MIN_MEASUREMENTS} needed; measuring every net" in lines[0]


def test_off_measures_every_net_as_before(tmp_path):
    fixed = {"search.latency_budget_ms": 100.0, "search.pruner": "none"}  # outcomes not hanging on timings
    off = {**fixed, "search.predict_latency": "off"}
    run, study, measured, objective = search(tmp_path, trials=3, seeded=40, **off)
    assert measured == 3 and objective._learner is None
    for t in study.trials:
        assert "latency" in t.user_attrs and t.user_attrs.get("pruned_reason") not in OVER_BUDGET
        assert not any(k.startswith("latency_predict") for k in t.user_attrs)
        assert (run.trial(t.number) / "model.onnx").exists()
    assert trial_counts(study)["predicted_over_budget"] == 0
    # The same trials, attribute for attribute, as a search with nothing to learn from (today's search).
    _, plain, _, _ = search(tmp_path / "plain", trials=3, seeded=0, **fixed)
    assert [t.params for t in plain.trials] == [t.params for t in study.trials]
    assert [set(t.user_attrs) for t in plain.trials] == [set(t.user_attrs) for t in study.trials]
    assert [t.state for t in plain.trials] == [t.state for t in study.trials]


def test_pareto_measures_only_nets_that_could_reach_the_front(tmp_path):
    # Predicted at >= 500 ms, every net is measured by the fast local machine at well under 1 ms. After a
    # measured net, a net it beats on score even at its predicted low end keeps the prediction, labelled so.
    _, study, measured, _ = search(tmp_path, trials=5, seeded=40, **{"search.objective": "pareto"})
    done = [t for t in study.trials if t.state == TrialState.COMPLETE and "same_as_trial" not in t.user_attrs]
    predicted = [t for t in done if t.user_attrs.get("latency_is_predicted")]
    assert measured == len(done) - len(predicted) >= 1
    print(f"pareto: {len(done)} trained, {len(predicted)} predicted")
    for t in predicted:
        assert t.user_attrs["latency_source"] == "predicted" and "latency" not in t.user_attrs
    front = {r["trial"] for r in pareto_summary(study)}
    assert front and not front & {t.number for t in predicted}
    assert not choose_best(study, load_config(None, {"search.objective": "pareto"}).search).user_attrs.get(
        "latency_is_predicted")


def test_a_measurement_records_its_net_for_later_runs(tmp_path):
    run, study, measured, _ = search(tmp_path, trials=2, seeded=0, **{"search.predict_latency": "off"})
    cfg = load_config(None, {**TINY, "out": str(tmp_path / "run")})
    h = load_history(LatencyCache(run.latency_cache), fingerprint_id(LocalDevice().fingerprint()),
                     settings_from_config(cfg.device, cfg.seed).key(), "fp32")
    assert measured == 2 and len(h.records) == 2 and h.unknown == 0
    assert {r.arch.key() for r in h.records} == {t.user_attrs["arch"] for t in study.trials}
    assert optuna  # the storage is Optuna's own SQLite


# ------------------------------------------------------------------------------------------- the report


def test_the_report_counts_measured_and_predicted_nets_and_labels_every_predicted_figure(tmp_path):
    from autoseg.report import write_report

    run, study, _, _ = search(tmp_path, trials=5, seeded=40, **{"search.objective": "pareto"})
    predicted = {t.number for t in study.trials if t.user_attrs.get("latency_is_predicted")}
    firsts = {n for n in predicted if "same_as_trial" not in study.trials[n].user_attrs}  # a repeat counts once
    rep = write_report(run.root)
    s = rep["latency_predictor"]
    assert s["latency_predicted"] == len(firsts) and s["measured"] >= 1 and s["checked"] >= 1
    assert s["mape"] > 0 and len(s["pairs"]) == s["checked"]  # fast nets predicted at >= 500 ms: far off
    assert not predicted & set(rep["pareto_front"]) and rep["plots"]["predicted"]["available"]
    md = (run.root / "report.md").read_text()
    assert "## Latency predictor" in md and f"{s['measured']} nets measured" in md
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and ln.split("|")[1].strip().rstrip(" ★◆").isdigit()]
    for n in predicted:
        row = next(ln for ln in rows if ln.split("|")[1].strip().rstrip(" ★◆") == str(n))
        assert "(predicted)" in row
    html = (run.root / "report.html").read_text()
    assert "Predicted vs measured latency" in html

    run2, _, _, _ = search(tmp_path / "drop", trials=2, seeded=40, **{"search.latency_budget_ms": 100.0})
    rep2 = write_report(run2.root)
    assert rep2["latency_predictor"]["dropped_on_prediction"] == 2 and rep2["latency_predictor"]["measured"] == 0
    md2 = (run2.root / "report.md").read_text()
    assert md2.count("(predicted)") >= 2 and "predicted_over_budget" in md2


def test_the_model_card_says_how_many_nets_were_predicted_and_how_well(tmp_path):
    from autoseg.model_card import _trials_summary, predictor_card

    _, study, _, _ = search(tmp_path, trials=2, seeded=40, **{"search.latency_budget_ms": 100.0})
    card = predictor_card(study)
    assert card["dropped_on_prediction"] == 2 and card["measured"] == 0 and card["last_fit"]["usable"]
    assert "pairs" not in card
    line = _trials_summary(trial_counts(study))[0]
    assert "2 over the latency budget (2 predicted, not measured)" in line
    _, plain, _, _ = search(tmp_path / "plain", trials=1, seeded=0, **{"search.latency_budget_ms": 100.0})
    assert predictor_card(plain) is None
