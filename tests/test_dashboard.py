"""The study as optuna-dashboard (or any Optuna user) sees it: named metrics, decoded nets as plain attributes."""

from __future__ import annotations

import json
import numbers

import optuna
import pytest
from optuna.trial import TrialState
from test_search import run_search

from autoseg.search import STUDY_NAME

NUMERIC = ("latency_ms", "macs", "params")


def _is_number(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_decoded(t: optuna.trial.FrozenTrial) -> None:
    a = t.user_attrs
    arch = a["arch_dict"]
    assert a["depth"] == len(arch["kernels"])
    for i, (k, c) in enumerate(zip(arch["kernels"], arch["channels"], strict=True)):
        assert a[f"kernel_l{i}"] == k and _is_number(a[f"kernel_l{i}"])
        assert a[f"channels_l{i}"] == c and c in (4, 8)  # the space's real channel counts, not cstep codes
    assert f"kernel_l{a['depth']}" not in a  # no made-up values for levels the net does not have
    assert a["conv"] == arch["conv"] and a["upsample"] == arch["upsample"]
    for key in NUMERIC:
        assert _is_number(a[key]), (key, a.get(key))
    # Plain JSON, as a browser parses it: no NaN or Infinity anywhere in what the dashboard sends.
    json.dumps(a, allow_nan=False)


@pytest.mark.parametrize(("objective", "names"), [
    ("penalty", ["cv_miou_penalised"]),
    ("pareto", ["cv_miou", "latency_ms"]),
])
def test_the_study_names_its_metrics_and_records_the_decoded_nets(tmp_path, objective, names):
    overrides = {"search.objective": objective}
    if objective == "pareto":
        overrides["search.sampler"] = "nsga2"
    _, run, _ = run_search(tmp_path, trials=2, **overrides)
    # What optuna-dashboard does: open the run's storage by its URL, with nothing of autoseg's.
    study = optuna.load_study(study_name=STUDY_NAME, storage=run.storage_url)
    assert study.metric_names == names
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert done
    for t in done:
        _check_decoded(t)
        assert _is_number(t.user_attrs["cv_score"]) and t.user_attrs["cv_score"] == t.user_attrs["cv_mean"]
        if objective == "pareto":
            assert t.values == [t.user_attrs["cv_score"], t.user_attrs["latency_ms"]]
        else:
            assert t.value == t.user_attrs["penalty_value"]


def test_a_net_pruned_before_training_still_carries_its_net_and_cost(tmp_path):
    _, run, _ = run_search(tmp_path, trials=2, **{"search.latency_budget_ms": 1e-6})
    study = optuna.load_study(study_name=STUDY_NAME, storage=run.storage_url)
    assert study.metric_names == ["cv_miou_penalised"]
    assert study.trials and all(t.state == TrialState.PRUNED for t in study.trials)
    for t in study.trials:
        _check_decoded(t)
        assert "cv_score" not in t.user_attrs  # not trained: no score is made up
