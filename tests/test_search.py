"""The search loop on real components: local onnxruntime, Optuna's SQLite storage, real training."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import optuna
import pytest
from optuna.trial import TrialState

from autoseg.config import TrainConfig, load_config
from autoseg.devices import open_device, settings_from_config
from autoseg.errors import InputError
from autoseg.rundir import RunDir
from autoseg.search import (
    STUDY_NAME,
    Candidate,
    Objective,
    SearchTask,
    TileData,
    check_space,
    choose_best,
    distinct_trials,
    is_repeat,
    open_study,
    pareto_summary,
    penalty_objective,
    run_trials,
    sample_candidate,
    shortlist,
    study_storage,
    timed_size,
    trial_counts,
)
from autoseg.train import cv_epochs
from autoseg.unet import Arch, count_macs

TINY = {
    "tiles.size": 16,
    "search.space.levels": [1, 2],
    "search.space.kernels": [3],
    "search.space.channels": [4, 8],
    "search.space.conv": ["standard"],
    "search.space.upsample": ["transpose", "bilinear"],
    "train.folds": 2,
    "train.epochs": 1,
    "train.final_tiles": 64,
    "device.warmup": 0,
    "device.min_runs": 2,
    "device.min_seconds": 0.0,
    # Never "busy", so every measurement is cached however loaded the test machine is. (A None override
    # would leave the default: load_config skips None, the value of a flag not given.)
    "device.max_busy_cores": 1e6,
}


def tiny_task() -> SearchTask:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 3, 16, 16)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)  # learnable: class follows channel 0's sign
    groups = np.arange(12) // 3
    return SearchTask(data={16: TileData(x, y, groups)}, in_channels=3, num_classes=2, class_weights=None)


def run_search(tmp_path, trials: int, resume_anyway: bool = False, wrap=lambda d: d, **overrides):
    cfg = load_config(None, {**TINY, "out": str(tmp_path / "run"), "search.trials": trials, **overrides})
    run = RunDir(cfg.out).prepare()
    study = open_study(run, cfg, resume_anyway)
    with closing(wrap(open_device(cfg.device, run.latency_cache))) as device:
        objective = Objective(cfg, tiny_task(), device, settings_from_config(cfg.device), run, on_trial=lambda s: None)
        run_trials(study, objective, cfg.search.trials, max_minutes=cfg.search.max_minutes)
    return cfg, run, study


def test_penalty_objective_matches_formula():
    cfg = load_config(
        None, {"search.alpha": 0.1, "search.beta": 0.05, "search.latency_ref_ms": 10.0, "search.macs_ref": 1e6}
    )
    v = penalty_objective(0.8, 100.0, 1e7, cfg.search)
    assert v == pytest.approx(0.8 - 0.1 * 1.0 - 0.05 * 1.0)


def test_cv_epochs_unset_aim_at_fold_tile_passes_and_a_set_number_is_kept(tmp_path):
    assert cv_epochs(TrainConfig(folds=3, epochs=None), 120) == 38
    assert cv_epochs(TrainConfig(folds=3, epochs=4), 120) == 4
    cfg = load_config(None, {**TINY, "out": str(tmp_path / "run"), "train.epochs": None})
    with closing(open_device(cfg.device, tmp_path / "cache.db")) as device:
        objective = Objective(cfg, tiny_task(), device, settings_from_config(cfg.device), RunDir(cfg.out).prepare())
        assert objective.train_settings(16).epochs == 500  # 12 tiles, 2 folds: 6 a fold


def test_a_one_level_net_is_one_candidate_whatever_its_upsample():
    space = load_config(None, {"search.space.levels": [1, 2]}).search.space

    def cand(levels: int, upsample: str) -> Candidate:
        params = {"levels": levels, "c0": 8, "k0": 3, "cstep1": 1, "k1": 3, "conv": "standard", "upsample": upsample}
        return sample_candidate(optuna.trial.FixedTrial(params), space, [64])

    assert cand(1, "bilinear") == cand(1, "transpose")  # no decoder, so no upsampling to choose
    assert cand(2, "bilinear") != cand(2, "transpose")


def test_default_space_holds_the_wide_shallow_nets_that_won_on_drone():
    # k3-5_c24-64_separable_bilinear matched the reference U-Net at 7 % of its latency (benchmarks/results).
    space = load_config(None, {}).search.space
    params = {"levels": 2, "c0": 24, "k0": 3, "cstep1": 3, "k1": 5, "conv": "separable", "upsample": "bilinear"}
    cand = sample_candidate(optuna.trial.FixedTrial(params), space, [64])
    assert cand.arch.key() == "k3-5_c24-64_separable_bilinear"


def test_space_with_no_valid_architecture_is_refused():
    cfg = load_config(None, {"search.space.levels": [4, 5]})
    with pytest.raises(InputError, match=r"no valid architecture.*divisible by 2\^\(levels-1\) = 8"):
        check_space(cfg.search.space, [36])
    check_space(cfg.search.space, [64])


def test_trials_complete_and_store_their_record(tmp_path):
    cfg, run, study = run_search(tmp_path, trials=3)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) + len([t for t in study.trials if t.state == TrialState.PRUNED]) == 3
    t = done[0]
    for key in (
        "arch",
        "arch_dict",
        "tile",
        "params",
        "macs",
        "latency",
        "latency_ms",
        "latency_source",
        "device",
        "fingerprint_id",
        "fold_scores",
        "cv_mean",
        "cv_std",
    ):
        assert key in t.user_attrs, key
    assert t.user_attrs["latency_source"] == "local"
    assert len(t.user_attrs["fold_scores"]) == cfg.train.folds
    assert (run.trial(t.number) / "model.onnx").stat().st_size > 0
    assert choose_best(study, cfg.search).state == TrialState.COMPLETE


def test_timed_size_pads_measure_size_to_the_nets_multiple_as_inference_does():
    assert timed_size(Arch((3, 3, 3), (4, 8, 8)), 16, 50) == 52  # 3 levels: a multiple of 4
    assert timed_size(Arch((3,), (4,)), 16, 50) == 50
    assert timed_size(Arch((3, 3, 3), (4, 8, 8)), 16, None) == 16  # default: the tile


def test_latency_is_measured_at_measure_size(tmp_path):
    _, run, study = run_search(tmp_path, trials=2, **{"device.measure_size": 47, "search.space.levels": [2]})
    assert [t.user_attrs["measure_size"] for t in study.trials] == [48, 48]  # 47 padded to the 2-level multiple
    arch = Arch.from_dict(study.trials[0].user_attrs["arch_dict"])
    assert study.trials[0].user_attrs["macs"] == count_macs(arch, 3, 2, 48, 48)  # the work that was timed
    with closing(sqlite3.connect(run.latency_cache)) as db:
        keys = [k for (k,) in db.execute("SELECT settings_key FROM latency")]
    assert keys and all(k.endswith("|shape=1x3x48x48") for k in keys)
    _, _, study = run_search(tmp_path / "tile", trials=1)
    assert study.trials[0].user_attrs["measure_size"] == 16  # default: the tile size


def test_over_budget_candidates_are_pruned_before_training(tmp_path):
    _, _, study = run_search(tmp_path, trials=3, **{"search.latency_budget_ms": 1e-6})
    assert len(distinct_trials(study)) == 3
    for t in study.trials:
        assert t.state == TrialState.PRUNED
        assert t.user_attrs["pruned_reason"] == "latency_budget"
        assert "fold_scores" not in t.user_attrs and not t.intermediate_values  # no training happened


def test_impossible_budget_stops_and_keeps_the_study(tmp_path):
    with pytest.raises(InputError, match=r"search\.latency_budget_ms: 2 candidates in a row were slower"):
        run_search(tmp_path, trials=10, **{"search.latency_budget_ms": 1e-6, "search.max_budget_prunes": 2})
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    assert {t.state for t in study.trials} == {TrialState.PRUNED}
    assert len(distinct_trials(study)) == 2


class Recorder:
    """A real local device that keeps the models it was asked to time."""

    def __init__(self, device) -> None:
        self.device, self.name, self.source = device, device.name, device.source
        self.models: list[bytes] = []

    def fingerprint(self) -> dict:
        return self.device.fingerprint()

    def measure(self, model: bytes, shape, settings):
        self.models.append(model)
        return self.device.measure(model, shape, settings)

    def close(self) -> None:
        self.device.close()


class OldRuntime(Recorder):
    """A real local device whose onnxruntime is older than the models: each model reaches the real
    onnxruntime stamped with an opset it does not implement, as opset 17 reaches onnxruntime 1.10."""

    def measure(self, model: bytes, shape, settings):
        proto = onnx.load_from_string(model)
        proto.opset_import[0].version = 99
        return super().measure(proto.SerializeToString(), shape, settings)


def test_candidates_are_timed_at_the_export_opset(tmp_path):
    _, run, study = run_search(tmp_path, trials=1, **{"export.opset": 13})
    proto = onnx.load(str(run.trial(study.trials[0].number) / "model.onnx"))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [13]


def test_int8_precision_times_each_candidate_quantized(tmp_path):
    recorders = []
    _, run, study = run_search(tmp_path, trials=2, wrap=lambda d: recorders.append(Recorder(d)) or recorders[-1],
                               **{"device.precision": "int8"})
    timed = recorders[0].models
    assert len(timed) == 2
    for blob, t in zip(timed, study.trials, strict=True):
        ops = {n.op_type for n in onnx.load_from_string(blob).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "ConvTranspose" not in ops
        assert t.user_attrs["precision"] == "int8" and t.user_attrs["latency_ms"] > 0
        assert (run.trial(t.number) / "model.onnx").read_bytes() == blob  # the file is what was timed
        # onnxruntime runs every conv as an integer kernel, as it will the trained net: none stays float.
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])
        fused = {n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node}
        assert "QLinearConv" in fused and "Conv" not in fused
    # Float timing is another study: the same run directory refuses it.
    with pytest.raises(InputError, match="different config"):
        run_search(tmp_path, trials=2)


def test_a_device_that_cannot_load_the_models_stops_the_search_and_says_why(tmp_path):
    with pytest.raises(InputError) as e:
        run_search(tmp_path, trials=10, wrap=OldRuntime)
    msg = str(e.value)
    assert "3 candidates in a row could not be measured" in msg and "Opset 99" in msg
    assert "cannot load the models, exported at ONNX opset 17: lower --opset (export.opset" in msg
    assert "study is kept" in msg and "\n" not in msg
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    assert len(study.trials) == 3
    for t in study.trials:
        assert t.state == TrialState.PRUNED and t.user_attrs["pruned_reason"] == "measure_failed"
        assert "fold_scores" not in t.user_attrs and not t.intermediate_values  # nothing was trained
    assert distinct_trials(study) == []  # no outcome: they do not count toward --trials
    # Fixed (a newer onnxruntime, or a lower opset: export keys resume): the rerun looks at 2 new nets.
    _, _, study = run_search(tmp_path, trials=2)
    assert len(distinct_trials(study)) == 2
    assert trial_counts(study)["unmeasured"] == 3
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert done and all(t.user_attrs["latency_ms"] > 0 for t in done)


def test_a_time_limit_stops_the_running_trial_and_a_rerun_trains_it(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="autoseg"):
        _, _, study = run_search(tmp_path, trials=5, **{"search.max_minutes": 0.001})
    assert len(study.trials) == 1  # the trial running when the time ran out stopped; no other started
    cut = study.trials[0]
    assert cut.state == TrialState.PRUNED and cut.user_attrs["pruned_reason"] == "deadline"
    assert "time limit of 0.001 min is up after 0 of 5 distinct nets" in caplog.text
    _, _, study = run_search(tmp_path, trials=3)  # no limit: the rerun trains the cut net first, then goes on to 3
    redo = study.trials[1]
    assert redo.user_attrs["redo_of"] == 0 and redo.params == cut.params and redo.state == TrialState.COMPLETE
    assert len(distinct_trials(study)) == 3


def test_a_net_another_worker_is_training_is_skipped_not_trained_twice(tmp_path):
    cfg = load_config(None, {**TINY, "out": str(tmp_path / "run"), "search.trials": 3, "search.workers": 2})
    run = RunDir(cfg.out).prepare()
    study = open_study(run, cfg)
    params = {"levels": 2, "c0": 4, "cstep1": 0, "k0": 3, "k1": 3, "conv": "standard", "upsample": "transpose"}
    study.enqueue_trial(params)
    other = study.ask()  # another worker's trial, still running
    cand = sample_candidate(other, cfg.search.space, [16])
    other.set_user_attr("arch", cand.arch.key())
    other.set_user_attr("tile", cand.tile)
    study.enqueue_trial(params)  # this worker is handed the same net
    with closing(open_device(cfg.device, run.latency_cache)) as device:
        objective = Objective(cfg, tiny_task(), device, settings_from_config(cfg.device), run, on_trial=lambda s: None)
        study.optimize(objective, n_trials=1)
    mine = study.trials[-1]
    assert mine.state == TrialState.PRUNED and mine.user_attrs["same_as_trial"] == other.number
    assert "latency" not in mine.user_attrs and "fold_scores" not in mine.user_attrs  # neither timed nor trained
    assert distinct_trials(study) == []  # and it does not count


def test_rerun_resumes_without_redoing_finished_trials(tmp_path):
    _, _, first = run_search(tmp_path, trials=2)
    before = {t.number: (t.params, t.datetime_complete) for t in first.trials}
    _, _, second = run_search(tmp_path, trials=4)
    after = {t.number: (t.params, t.datetime_complete) for t in second.trials}
    assert len(distinct_trials(second)) == 4  # plus any repeats the sampler proposed, which cost nothing
    for n, rec in before.items():
        assert after[n] == rec


def test_killed_trial_is_run_again_with_its_params(tmp_path):
    cfg, run, study = run_search(tmp_path, trials=1)
    # A trial left RUNNING, as after kill -9 in the middle of it.
    stale = study.ask()
    stale.suggest_categorical("levels", [1, 2])
    params = dict(stale.params)
    study = open_study(run, cfg)
    states = {t.number: t.state for t in study.trials}
    assert states[stale.number] == TrialState.FAIL
    _, _, study = run_search(tmp_path, trials=2)
    rerun = [t for t in study.trials if t.number > stale.number]
    assert rerun and rerun[0].params["levels"] == params["levels"]


@pytest.mark.parametrize("kind", ["random bytes", "a directory", "another database", "empty"])
def test_a_study_db_that_is_no_optuna_study_is_refused_in_one_line(tmp_path, kind):
    cfg = load_config(None, {**TINY, "out": str(tmp_path / "run"), "search.trials": 1})
    run = RunDir(cfg.out).prepare()
    if kind == "random bytes":
        run.study_db.write_bytes(bytes(range(256)) * 16)
    elif kind == "a directory":
        run.study_db.mkdir()
    elif kind == "another database":
        with closing(sqlite3.connect(run.study_db)) as con:
            con.execute("CREATE TABLE notes (x TEXT)")
    else:  # as a kill leaves it while the study is created: the search fills it in
        run.study_db.write_bytes(b"")
        assert open_study(run, cfg).trials == []
        return
    with pytest.raises(InputError, match=r"study\.db: not an Optuna study \(.*\); move it away"):
        open_study(run, cfg)


def test_changed_config_is_refused_unless_resume_anyway(tmp_path):
    _, run, _ = run_search(tmp_path, trials=1)
    other = load_config(None, {**TINY, "out": str(run.root), "search.alpha": 0.5})
    with pytest.raises(InputError, match=r"different config \(changed: search.alpha\).*--resume-anyway"):
        open_study(run, other)
    open_study(run, other, resume_anyway=True)
    # Asking for more trials is not a different config.
    more = load_config(None, {**TINY, "out": str(run.root), "search.alpha": 0.5, "search.trials": 9})
    open_study(run, more)


def test_changed_search_space_is_refused_even_with_resume_anyway(tmp_path):
    # Optuna cannot give a parameter other choices within one study: it would fail mid-search.
    _, run, _ = run_search(tmp_path, trials=1)
    wider = load_config(None, {**TINY, "out": str(run.root), "search.space.channels": [4, 8, 16]})
    for anyway in (False, True):
        with pytest.raises(InputError, match=r"different search space \(changed: search.space.channels\).*new --out"):
            open_study(run, wider, resume_anyway=anyway)
    # A study from before the channel steps were part of the fingerprint sampled with other steps.
    study = optuna.load_study(study_name=STUDY_NAME, storage=run.storage_url)
    old = {k: v for k, v in study.user_attrs["config"].items() if k != "search.space.channel_steps"}
    study.set_user_attr("config", old)
    same = load_config(None, {**TINY, "out": str(run.root)})
    with pytest.raises(InputError, match=r"changed: search.space.channel_steps"):
        open_study(run, same, resume_anyway=True)


def test_pareto_objective_returns_score_and_latency(tmp_path):
    cfg, _, study = run_search(tmp_path, trials=2, **{"search.objective": "pareto", "search.sampler": "nsga2"})
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert done and all(len(t.values) == 2 for t in done)
    assert done[0].values[1] == pytest.approx(done[0].user_attrs["latency_ms"])
    front = pareto_summary(study)
    assert front and choose_best(study, cfg.search).number in {r["trial"] for r in front}


def test_a_repeated_architecture_is_not_trained_again(tmp_path):
    _, _, study = run_search(tmp_path, trials=1)
    first = study.trials[0]
    study.enqueue_trial(first.params)
    _, run, study = run_search(tmp_path, trials=2)
    second = study.trials[1]
    assert second.params == first.params
    assert second.user_attrs["same_as_trial"] == first.number
    assert second.user_attrs["fold_scores"] == first.user_attrs["fold_scores"]
    assert not second.intermediate_values  # no fold was trained or reported
    assert not run.trial(second.number).exists()  # nor exported and timed
    assert second.number not in {r["trial"] for r in pareto_summary(study)}  # one net, listed once
    assert len(distinct_trials(study)) == 2  # the repeat did not count toward --trials


def test_an_over_budget_net_proposed_again_is_pruned_without_timing_it_again(tmp_path):
    over = {"search.latency_budget_ms": 1e-6, "search.max_budget_prunes": 5}
    _, _, study = run_search(tmp_path, trials=1, **over)
    first = study.trials[0]
    study.enqueue_trial(first.params)
    _, run, study = run_search(tmp_path, trials=2, **over)
    second = study.trials[1]
    assert second.state == TrialState.PRUNED and second.user_attrs["same_as_trial"] == first.number
    assert second.user_attrs["pruned_reason"] == "latency_budget"
    assert second.user_attrs["latency_ms"] == first.user_attrs["latency_ms"]
    assert not run.trial(second.number).exists()


def test_a_raised_budget_measures_and_trains_a_net_it_once_pruned(tmp_path):
    _, _, study = run_search(tmp_path, trials=1, **{"search.latency_budget_ms": 1e-6})
    first = study.trials[0]
    study.enqueue_trial(first.params)
    _, _, study = run_search(tmp_path, trials=2, resume_anyway=True)  # no budget now
    second = study.trials[1]
    assert second.params == first.params
    assert second.state == TrialState.COMPLETE and "same_as_trial" not in second.user_attrs
    assert len(second.user_attrs["fold_scores"]) == 2


def test_a_space_with_no_new_nets_left_ends_the_search(tmp_path, caplog):
    # TINY holds 8 nets at tile 16; asking for 12 ends once 12 proposals in a row were repeats.
    with caplog.at_level(logging.WARNING, logger="autoseg"):
        _, _, study = run_search(tmp_path, trials=12)
    distinct = distinct_trials(study)
    assert len(distinct) <= 8
    assert len({(t.user_attrs["arch"], t.user_attrs["tile"]) for t in distinct}) == len(distinct)
    assert all(is_repeat(t) for t in study.trials[-12:])
    assert "nets already tried; stopping at" in caplog.text


def test_a_lowered_budget_prunes_a_net_it_once_trained(tmp_path):
    _, _, study = run_search(tmp_path, trials=1)
    first = study.trials[0]
    assert first.state == TrialState.COMPLETE
    study.enqueue_trial(first.params)
    _, _, study = run_search(
        tmp_path, trials=2, resume_anyway=True, **{"search.latency_budget_ms": 1e-6, "search.max_budget_prunes": 5}
    )
    second = study.trials[1]
    assert second.params == first.params and "same_as_trial" not in second.user_attrs
    assert second.state == TrialState.PRUNED and second.user_attrs["pruned_reason"] == "latency_budget"


def _pop_waiting(root: str, out: object) -> None:
    study = optuna.load_study(study_name=STUDY_NAME, storage=study_storage(RunDir(Path(root))))
    popped = []
    while study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        popped.append(study.ask().number)
    out.put(popped)


def test_two_processes_never_take_the_same_queued_trial(tmp_path):
    # Trials requeued after a kill wait in the study; parallel workers pop them. SQLite ignores Optuna's
    # SELECT ... FOR UPDATE, so two could both move one trial to RUNNING, and the second's tell failed
    # ("Cannot tell a COMPLETE trial").
    run = RunDir(tmp_path / "run").prepare()
    study = optuna.create_study(storage=study_storage(run), study_name=STUDY_NAME)
    for i in range(60):
        study.enqueue_trial({"x": i}, skip_if_exists=False)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_pop_waiting, args=(str(run.root), out)) for _ in range(3)]
    for p in procs:
        p.start()
    popped = [n for _ in procs for n in out.get(timeout=120)]
    for p in procs:
        p.join()
    # Each queued trial taken exactly once (a process that found the queue empty just after its check
    # got a new trial, numbered 60 on).
    assert sorted(n for n in popped if n < 60) == list(range(60))


class StopAtMeasure(Recorder):
    """A real local device that, at its `at`-th measurement, says so in `marker` and hangs until killed."""

    def __init__(self, device, at: int, marker: Path) -> None:
        super().__init__(device)
        self.at, self.marker = at, marker

    def measure(self, model: bytes, shape, settings):
        if len(self.models) + 1 == self.at:
            self.marker.write_text("measuring")
            time.sleep(600)
        return super().measure(model, shape, settings)


def _search_in_child(root: str, trials: int, overrides: dict, marker: str) -> None:
    """A search in a process of its own that hangs in its second measurement (trial 1), to be killed."""
    import torch

    torch.set_num_threads(1)  # as this test process trains: the same folds, the same scores
    run_search(Path(root), trials, wrap=lambda d: StopAtMeasure(d, 2, Path(marker)), **overrides)


def proposals(study: optuna.Study) -> list[str]:
    """The nets proposed, in order; a trial killed and run again counts once, where it was first proposed."""
    redone = {t.user_attrs["redo_of"]: t for t in study.trials if "redo_of" in t.user_attrs}
    out = []
    for t in study.trials:
        if "redo_of" in t.user_attrs:
            continue
        while t.number in redone:
            t = redone[t.number]
        out.append(t.user_attrs["arch"])
    return out


# Past TPE's 3 random startup trials, and past NSGA-II's first generation of 4.
@pytest.mark.parametrize(("sampler", "trials"), [("tpe", 5), ("nsga2", 6)])
def test_a_search_killed_in_trial_1_resumes_as_the_same_search(tmp_path, sampler, trials):
    # alpha 0: the objective leaves out latency, which no two measurements give alike; the rest is deterministic.
    same = {"search.alpha": 0.0, "search.sampler": sampler, "seed": 3}
    _, _, whole = run_search(tmp_path / "whole", trials, **same)
    expected = [t.user_attrs["arch"] for t in whole.trials]
    assert len(set(expected)) == trials

    marker = tmp_path / "measuring"
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_search; "
            f"test_search._search_in_child({str(tmp_path / 'killed')!r}, {trials}, {same!r}, {str(marker)!r})")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    ended = proc.poll() is not None
    if not ended:
        os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    if ended or not marker.exists():
        pytest.fail(f"the search did not reach trial 1's measurement: {err.decode()[-2000:]}")
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{tmp_path / 'killed' / 'run' / 'study.db'}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.RUNNING]  # killed in trial 1

    _, _, resumed = run_search(tmp_path / "killed", trials, **same)
    assert resumed.trials[1].state == TrialState.FAIL
    assert resumed.trials[2].user_attrs["redo_of"] == 1 and resumed.trials[2].params == resumed.trials[1].params
    assert proposals(resumed) == expected  # and no new trial repeats trial 0's net


def test_the_shipped_nets_training_settings_do_not_change_what_a_trial_means():
    from autoseg.search import config_fingerprint

    base = config_fingerprint(load_config(None, TINY))
    final = {"train.final_data": "reps", "train.final_tiles": 10, "train.final_minutes": 5.0, "train.patience": 0,
             "train.val_fraction": 0.0, "train.teacher": "reference", "train.cache_mb": 1.0}
    assert config_fingerprint(load_config(None, {**TINY, **final})) == base  # a rerun may change them and resume
    assert config_fingerprint(load_config(None, {**TINY, "train.augment": False})) != base  # the folds use it


def test_the_shortlist_is_the_searchs_ranking_with_its_choice_first(tmp_path):
    cfg, _, study = run_search(tmp_path, 4, **{"search.pruner": "none"})
    done = [t for t in distinct_trials(study) if t.state == TrialState.COMPLETE]
    top = shortlist(study, cfg.search, 3)
    assert len(done) >= 3 and top[0].number == choose_best(study, cfg.search).number
    assert [t.value for t in top] == sorted((t.value for t in done), reverse=True)[:3]
    assert len(shortlist(study, cfg.search, 99)) == len(done)
