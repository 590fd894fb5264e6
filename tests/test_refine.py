"""The second stage's choice (autoseg.refine): the search's latency penalty, ties, and the config's check."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import IntDistribution

from autoseg.config import load_config
from autoseg.errors import InputError
from autoseg.refine import pick, refine_config, refined_value


def trial(number: int, cv: float, value: float) -> optuna.trial.FrozenTrial:
    t = optuna.trial.create_trial(params={"x": number}, distributions={"x": IntDistribution(0, 99)}, value=value,
                                  user_attrs={"cv_mean": cv, "penalty_value": value})
    t.number = number
    return t


def test_the_validation_score_gets_the_penalty_the_search_gave_the_net():
    fast, slow = trial(0, cv=0.50, value=0.48), trial(1, cv=0.52, value=0.42)  # slow: penalised 0.10
    assert refined_value(0.60, fast) == pytest.approx(0.58)
    assert refined_value(0.65, slow) == pytest.approx(0.55)  # a better validation score, still behind
    assert pick([{"trial": 0, "value": 0.58}, {"trial": 1, "value": 0.55}])["trial"] == 0


def test_a_tie_goes_to_the_net_the_search_ranked_higher():
    assert pick([{"trial": 3, "value": 0.5}, {"trial": 1, "value": 0.5}])["trial"] == 3


def test_the_second_stage_trains_the_final_training_cut_short_without_a_teacher():
    cfg = load_config(None, {"search.refine_tiles": 500, "train.teacher": "reference", "train.final_minutes": 3.0,
                             "train.eval_every": 10_000})
    short = refine_config(cfg)
    t = short.train
    assert (t.final_tiles, t.teacher, t.final_minutes, t.eval_every) == (500, None, None, None)
    assert cfg.train.final_tiles == 200_000 and cfg.train.teacher == "reference"  # the shipped net's stay


def test_a_second_stage_without_validation_images_is_refused_at_the_door():
    with pytest.raises(InputError, match=r"search\.refine_top: .*train\.val_fraction"):
        load_config(None, {"search.refine_top": 3, "train.val_fraction": 0.0})
    load_config(None, {"search.refine_top": 1, "train.val_fraction": 0.0})  # 1: off


def test_by_default_the_second_stage_is_on_when_the_shipped_net_trains_on_all_data_with_validation():
    assert load_config(None, {}).search.refine_top == 4
    assert load_config(None, {"train.val_fraction": 0.0}).search.refine_top == 0  # nothing to rank on: off
    assert load_config(None, {"train.final_data": "reps"}).search.refine_top == 0  # the seed's retrain: off
    assert load_config(None, {"search.refine_top": 0}).search.refine_top == 0


def test_the_second_stage_budget_is_a_quarter_of_the_final_one_unless_given():
    assert load_config(None, {}).search.refine_tiles == 50_000  # a quarter of the default 200,000
    assert load_config(None, {"train.final_tiles": 1000}).search.refine_tiles == 250
    assert load_config(None, {"train.final_tiles": 2}).search.refine_tiles == 1
    assert load_config(None, {"train.final_tiles": 1000, "search.refine_tiles": 300}).search.refine_tiles == 300
