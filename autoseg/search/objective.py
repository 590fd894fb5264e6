"""The objective and one trial's run: decode the params, reuse a twin's outcome, measure the net (or predict its
latency) and drop it over the latency budget before any training, then cross-validate it, reporting to the pruner
after each fold, and record what it did in the trial's user attributes."""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from autoseg.config import Config, SearchConfig
from autoseg.devices import Device, MeasureError, MeasureSettings, failure_hint, passing
from autoseg.devices.cache import LatencyCache, _graph_hash
from autoseg.errors import DeviceUnreachable
from autoseg.export import annotate, model_metadata
from autoseg.gate import Gate
from autoseg.latency_history import Guess, Learner, remember_arch
from autoseg.predictor import LatencyRecord
from autoseg.rundir import RunDir, write_bytes_atomic
from autoseg.search.measure import measure_candidate, timed_size
from autoseg.search.sampling import pruner_kind, shared
from autoseg.search.space import Candidate, arch_attrs, sample_candidate
from autoseg.search.task import SearchTask
from autoseg.search.trials import find_twin, running_twin
from autoseg.storage import describe
from autoseg.train import TrainSettings, cross_validate, cv_epochs, training_settings
from autoseg.unet import Arch, build_unet, count_macs, count_params, validate_arch

log = logging.getLogger("autoseg.search")  # one logger for the package: log lines keep the name they had


def penalty_objective(score: float, latency_ms: float, macs: float, cfg: SearchConfig) -> float:
    """score - alpha*log10(latency/ref) - beta*log10(macs/ref): the default scalar objective."""
    lat = max(latency_ms, 1e-6) / cfg.latency_ref_ms
    mac = max(macs, 1.0) / cfg.macs_ref
    return score - cfg.alpha * math.log10(lat) - cfg.beta * math.log10(mac)


class DeadlineReached(Exception):
    """Raised inside a trial's training when search.max_minutes is up."""


class Objective:
    """The callable handed to study.optimize. `deadline` (time.time(), set by run_trials) stops a trial
    at its next epoch."""

    def __init__(
        self,
        cfg: Config,
        task: SearchTask,
        device: Device,
        settings: MeasureSettings,
        run: RunDir,
        on_trial: Callable[[str], None] | None = None,
        worker: int = 0,
        gate: Gate | None = None,
    ) -> None:
        self.cfg, self.task, self.device, self.settings, self.run = cfg, task, device, settings, run
        self.worker = worker
        # Parallel workers timing on this machine: a measurement waits for their epochs, and they for it.
        self.gate = gate if device.source == "local" else None
        self.tiles = sorted(task.data)
        self.on_trial = on_trial or log.info
        sp = cfg.search.space  # the longest name the space can give, so the trial lines stay in columns
        widest = Arch((max(sp.kernels),) * max(sp.levels), (max(sp.channels),) * max(sp.levels),
                      max(sp.conv, key=len), max(sp.upsample, key=len))
        self.key_width = len(widest.key())
        self.streak = 0
        self.failures = 0  # measurement failures in a row: one is a net's, several are the device's
        self.stop_message: str | None = None
        self.int8 = cfg.device.precision == "int8"
        self.deadline: float | None = None
        self.epochs_done = 0  # the running trial's, over all its folds
        self.folds_done = 0
        self._learner: Learner | None = None  # search.predict_latency: made at the first trial that can use it

    def late(self) -> bool:
        """The deadline has passed."""
        return self.deadline is not None and time.time() >= self.deadline

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        scfg = self.cfg.search
        self.epochs_done = self.folds_done = 0
        if scfg.storage is not None:  # which host and process ran it, among all that share the study
            trial.set_user_attr("host", f"{socket.gethostname()}:{os.getpid()}")
        cand = sample_candidate(trial, scfg.space, self.tiles)
        trial.set_user_attr("arch", cand.arch.key())
        trial.set_user_attr("arch_dict", cand.arch.to_dict())
        trial.set_user_attr("tile", cand.tile)
        for key, value in arch_attrs(cand).items():
            trial.set_user_attr(key, value)
        try:
            validate_arch(cand.arch, cand.tile)
        except ValueError as e:
            trial.set_user_attr("pruned_reason", "invalid")
            self._say(trial, cand, f"invalid: {e}")
            raise optuna.TrialPruned(str(e)) from None

        twin = self.find_twin(trial, cand)
        if twin is not None:
            return self._repeat(trial, cand, twin)
        busy = running_twin(trial.study, cand, trial.number) if shared(self.cfg) else None
        if busy is not None:  # no outcome yet to share: skip it, uncounted; a later proposal reuses it
            trial.set_user_attr("same_as_trial", busy)
            self._say(trial, cand, f"skipped: another worker is on it (trial {busy})")
            raise optuna.TrialPruned(f"same architecture as running trial {busy}")

        if self.cfg.search.workers > 1:
            trial.set_user_attr("worker", self.worker)
        pareto = scfg.objective == "pareto"
        budget = scfg.latency_budget_ms
        guess = self._guess(cand)
        if guess is not None:
            for key, value in guess.attrs().items():
                trial.set_user_attr(key, value)
        usable = guess is not None and guess.fit["usable"]
        if usable and budget is not None and guess.lo_ms > budget:
            self._predicted_over(trial, cand, guess, budget)
        # Pareto: a net surely within the budget is measured after training, and only if it could reach the front.
        deferred = usable and pareto and (budget is None or guess.hi_ms <= budget)
        if deferred:
            params, macs = self._size_of(trial, cand)
            latency = guess.median_ms  # not used before it is settled: the Pareto objective reports no folds
            lat_txt = f"{latency:.2f} ms predicted"
        else:
            latency, params, macs, lat_txt = self._measured(trial, cand)
        head = f"{_size(params, macs)}  {lat_txt}"
        if self.late():  # measuring took the last of the time
            trial.set_user_attr("pruned_reason", "deadline")
            trial.set_user_attr("epochs_trained", 0)
            self._say(trial, cand, f"{head}  not trained: the time limit is up (a rerun trains it)")
            raise optuna.TrialPruned("the time limit is up")
        return self._train(trial, cand, latency, params, macs, head, guess if deferred else None)

    def _guess(self, cand: Candidate) -> Guess | None:
        """The predicted latency of `cand` (search.predict_latency auto, with a budget or a Pareto objective)."""
        scfg = self.cfg.search
        if scfg.predict_latency == "off" or (scfg.latency_budget_ms is None and scfg.objective != "pareto"):
            return None
        if self._learner is None:
            from edge_agent.fingerprint import fingerprint_id

            self._learner = Learner(self._cache(), fingerprint_id(self.device.fingerprint()),
                                    self.settings.key(), self.cfg.device.precision)
        size = timed_size(cand.arch, cand.tile, self.cfg.device.measure_size)
        return self._learner.guess(cand.arch, size, self.task.in_channels, self.task.num_classes)

    def _cache(self) -> LatencyCache | None:
        cache = getattr(self.device, "cache", None)
        return cache if isinstance(cache, LatencyCache) else None

    def _learn(self, cand: Candidate, blob: bytes, m: Any, size: int) -> None:
        """Keep a clean measurement for the predictor: the net of its graph, in the cache, and in memory."""
        if m.error != MeasureError.OK or passing(m.flags):
            return
        cache = self._cache()
        if cache is not None:  # also with predict_latency off: a later run learns from this one
            remember_arch(cache, _graph_hash(blob), cand.arch, self.task.in_channels, self.task.num_classes,
                          self.cfg.device.precision)
        if self._learner is not None and m.fingerprint_id == self._learner.fingerprint_id:
            self._learner.add(LatencyRecord(cand.arch, (size, size), float(m.median_ms), self.task.in_channels,
                                            self.task.num_classes))

    def _size_of(self, trial: optuna.Trial, cand: Candidate) -> tuple[int, int]:
        """Params and MACs of a net not exported (at the timed size), with the attributes a measured one gets."""
        size = timed_size(cand.arch, cand.tile, self.cfg.device.measure_size)
        params = count_params(build_unet(cand.arch, self.task.in_channels, self.task.num_classes))
        macs = count_macs(cand.arch, self.task.in_channels, self.task.num_classes, size, size)
        for key, value in (("params", params), ("macs", macs), ("measure_size", size),
                           ("precision", self.cfg.device.precision)):
            trial.set_user_attr(key, value)
        return params, macs

    def _predicted_over(self, trial: optuna.Trial, cand: Candidate, guess: Guess, budget: float) -> None:
        """Drop a net whose predicted latency is over the budget by more than its uncertainty: not exported,
        not measured, not trained."""
        params, macs = self._size_of(trial, cand)
        trial.set_user_attr("pruned_reason", "predicted_over_budget")
        self._say(trial, cand, f"{_size(params, macs)}  {guess.median_ms:.2f} ms predicted ({guess.lo_ms:.2f}-"
                  f"{guess.hi_ms:.2f})  pruned: predicted over budget {budget:.4g} ms, not measured")
        self.streak += 1
        if self.streak >= self.cfg.search.max_budget_prunes:
            self._stop(trial, f"search.latency_budget_ms: {self.streak} candidates in a row were slower than "
                       f"{budget:g} ms (predicted or measured); raise --latency-budget-ms or allow smaller nets")
        raise optuna.TrialPruned("latency predicted over budget")

    def _settle(self, trial: optuna.Trial, cand: Candidate, guess: Guess, cv_mean: float) -> tuple[float, str]:
        """Pareto, after training: a net that a measured net beats on score even at the low end of its predicted
        latency cannot reach the front, and keeps its prediction (labelled predicted); any other is measured."""
        for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            a = t.user_attrs
            if a.get("latency_is_predicted") or "cv_mean" not in a or "latency_ms" not in a:
                continue
            if (a["cv_mean"] >= cv_mean and a["latency_ms"] <= guess.lo_ms
                    and (a["cv_mean"] > cv_mean or a["latency_ms"] < guess.lo_ms)):
                trial.set_user_attr("latency_ms", guess.median_ms)
                trial.set_user_attr("latency_source", "predicted")
                trial.set_user_attr("latency_is_predicted", True)
                return guess.median_ms, f"{guess.median_ms:.2f} ms predicted (dominated by trial {t.number})"
        latency, _, _, lat_txt = self._measured(trial, cand)
        return latency, lat_txt

    def _measured(self, trial: optuna.Trial, cand: Candidate) -> tuple[float, int, int, str]:
        """Export and time `cand`; prune it when the device fails or it is over the budget."""
        scfg = self.cfg.search
        try:
            with self.gate.measuring() if self.gate is not None else nullcontext():
                blob, m, params, macs = measure_candidate(
                    cand, self.task, self.device, self.settings, self.cfg.device.measure_size, self.cfg.export.opset,
                    int8=self.int8,
                )
        except DeviceUnreachable:
            trial.set_user_attr("interrupted", True)
            raise
        trial.set_user_attr("params", params)
        trial.set_user_attr("macs", macs)
        trial.set_user_attr("latency", m.to_dict())
        trial.set_user_attr("latency_source", m.source)
        size = timed_size(cand.arch, cand.tile, self.cfg.device.measure_size)
        trial.set_user_attr("measure_size", size)
        trial.set_user_attr("precision", self.cfg.device.precision)
        trial.set_user_attr("device", m.device)
        trial.set_user_attr("fingerprint_id", m.fingerprint_id)
        meta = self.task.dataset_metadata  # described like the final model (tasks made in tests may lack it)
        write_bytes_atomic(self.run.trial(trial.number) / "model.onnx", annotate(
            blob, model_metadata(tile=cand.tile, arch=cand.arch.key(), input_multiple=cand.arch.multiple, **meta),
            cand.tile, self.task.in_channels, self.task.num_classes) if meta else blob)
        if m.error != MeasureError.OK:
            trial.set_user_attr("pruned_reason", "measure_failed")
            self._say(trial, cand, f"measurement failed: {m.message}")
            self.failures += 1
            if self.failures >= scfg.max_measure_failures:
                self._stop(trial, f"device {m.device}: {self.failures} candidates in a row could not be measured "
                           f"(last: {m.message}); {failure_hint(m, self.cfg.export.opset)}")
            raise optuna.TrialPruned(m.message)
        self.failures = 0
        self._learn(cand, blob, m, size)
        latency = float(m.median_ms)
        trial.set_user_attr("latency_ms", latency)
        lat_txt = f"{latency:.2f} ms{' int8' if self.int8 else ''} ({m.source}{', cached' if m.cached else ''})"

        budget = scfg.latency_budget_ms
        if budget is not None and latency > budget:
            trial.set_user_attr("pruned_reason", "latency_budget")
            self._say(trial, cand, f"{_size(params, macs)}  {lat_txt}  pruned: over budget {budget:.4g} ms")
            self.streak += 1
            if self.streak >= scfg.max_budget_prunes:
                self._stop(trial, f"search.latency_budget_ms: {self.streak} candidates in a row were slower than "
                           f"{budget:g} ms on {m.device}; raise --latency-budget-ms or allow smaller nets")
            raise optuna.TrialPruned("latency over budget")
        self.streak = 0
        return latency, params, macs, lat_txt

    def _train(self, trial: optuna.Trial, cand: Candidate, latency: float, params: int, macs: int, head: str,
               deferred: Guess | None) -> float | tuple[float, float]:
        """Cross-validate `cand`, reporting to the pruner; `deferred`: its latency is settled afterwards."""
        scfg = self.cfg.search
        pareto = scfg.objective == "pareto"
        data = self.task.data[cand.tile]
        s = self.train_settings(cand.tile)
        folds = self.cfg.train.folds
        kind = pruner_kind(self.cfg)
        means: list[float] = []  # running CV mean after each finished fold

        def on_epoch(fold: int, done: int, score: Callable[[], float]) -> None:
            self.epochs_done += 1
            if done < s.epochs and self.late():  # after a fold's last epoch its score is worth the wait
                raise DeadlineReached

        def on_fold(i: int, running: float) -> None:
            means.append(running)
            trial.set_user_attr("cv_score", float(running))  # so far: a pruned trial keeps the folds it did
            self.folds_done = i + 1
            last = i + 1 == folds
            if not pareto:  # the objective so far; after the last fold, pruning would save nothing
                value = penalty_objective(running, latency, macs, scfg)
                trial.report(value, i + 1)
                if not last and trial.should_prune():
                    trial.set_user_attr("pruned_reason", kind)
                    raise optuna.TrialPruned(f"after fold {i + 1}: objective {value:.3f} below the {kind} cut")
            if not last and self.late():
                raise DeadlineReached

        try:
            scores = cross_validate(
                cand.arch, data.x, data.y, data.groups, self.task.num_classes, s, folds, on_fold,
                epoch_guard=self.gate.epoch if self.gate is not None else nullcontext, on_epoch=on_epoch,
            )
        except optuna.TrialPruned:
            trial.set_user_attr("epochs_trained", self.epochs_done)
            self._say(trial, cand, f"{head}  pruned ({kind}) after fold {self.folds_done}")
            raise
        except DeadlineReached:
            trial.set_user_attr("epochs_trained", self.epochs_done)
            if not means:
                trial.set_user_attr("pruned_reason", "deadline")
                self._say(trial, cand, f"{head}  stopped by the time limit after {self.epochs_done} epoch(s), before "
                          "a fold finished (a rerun trains it)")
                raise optuna.TrialPruned("stopped by the time limit") from None
            scores = fold_scores(means)
            trial.set_user_attr("stopped_by", "deadline")
        trial.set_user_attr("epochs_trained", self.epochs_done)
        cv_mean, cv_std = float(np.mean(scores)), float(np.std(scores))
        if deferred is not None:
            latency, lat_txt = self._settle(trial, cand, deferred, cv_mean)
            head = f"{_size(params, macs)}  {lat_txt}"
        trial.set_user_attr("fold_scores", [float(v) for v in scores])
        trial.set_user_attr("cv_mean", cv_mean)
        trial.set_user_attr("cv_score", cv_mean)
        trial.set_user_attr("cv_std", cv_std)
        value = penalty_objective(cv_mean, latency, macs, scfg)
        trial.set_user_attr("penalty_value", value)
        partial = f"  ({len(scores)} of {folds} folds: stopped by the time limit)" if len(scores) < folds else ""
        self._say(trial, cand, f"{head}  cv {cv_mean:.3f}±{cv_std:.3f}  obj {value:.3f}{partial}")
        if pareto:
            return cv_mean, latency
        return value

    def find_twin(self, trial: optuna.Trial, cand: Candidate) -> FrozenTrial | None:
        return find_twin(trial.study, cand, trial.number, self.cfg.search.latency_budget_ms)

    def _repeat(self, trial: optuna.Trial, cand: Candidate, twin: FrozenTrial) -> float | tuple[float, float]:
        """A net already looked at: nothing is exported, timed or trained again. Training is deterministic
        for an architecture, tile and seed, so the twin's folds are this trial's; and one net has one
        latency, even when a busy device would measure it twice. The sampler still sees the value, so it
        learns the same from a repeat as from the first look."""
        for key in ("params", "macs", "latency", "latency_ms", "latency_source", "measure_size", "precision", "device",
                    "fingerprint_id", "fold_scores", "cv_mean", "cv_score", "cv_std", "penalty_value", "pruned_reason",
                    "stopped_by", "latency_predicted_ms", "latency_predicted_lo_ms", "latency_predicted_hi_ms",
                    "latency_is_predicted"):
            if key in twin.user_attrs:
                trial.set_user_attr(key, twin.user_attrs[key])
        trial.set_user_attr("same_as_trial", twin.number)
        a = twin.user_attrs
        lat = f"{a['latency_ms']:.2f} ms" if "latency_ms" in a else f"{a['latency_predicted_ms']:.2f} ms predicted"
        head = f"{_size(a['params'], a['macs'])}  {lat}{' predicted' if a.get('latency_is_predicted') else ''}"
        if twin.state == TrialState.PRUNED:
            self._say(trial, cand, f"{head}  pruned, as its twin trial {twin.number}")
            raise optuna.TrialPruned(f"same architecture as pruned trial {twin.number}")
        cv_mean, value = a["cv_mean"], a["penalty_value"]
        self._say(trial, cand, f"{head}  cv {cv_mean:.3f}  same as trial {twin.number}")
        return (cv_mean, a["latency_ms"]) if self.cfg.search.objective == "pareto" else value

    def train_settings(self, tile: int) -> TrainSettings:
        epochs = cv_epochs(self.cfg.train, len(self.task.data[tile].x))
        return training_settings(self.cfg.train, self.cfg.seed, self.task.class_weights, epochs)

    def _stop(self, trial: optuna.Trial, message: str) -> None:
        """End the search after this trial with `message` for the user; the study stays for a rerun."""
        kept = self.run.study_db if self.cfg.search.storage is None else describe(self.cfg.search.storage)
        self.stop_message = f"{message} (the study is kept in {kept})"
        trial.study.stop()

    def _say(self, trial: optuna.Trial, cand: Candidate, text: str) -> None:
        self.on_trial(f"trial {trial.number:3d}  {cand.arch.key():<{self.key_width}} tile {cand.tile:<4} {text}")


def fold_scores(means: Sequence[float]) -> list[float]:
    """Each fold's score from the running means after each fold."""
    return [(i + 1) * m - (i * means[i - 1] if i else 0.0) for i, m in enumerate(means)]


def _size(params: int, macs: int) -> str:
    return f"{params / 1e3:7.1f}k params {macs / 1e6:8.1f}M MACs"
