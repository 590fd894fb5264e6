"""One run of `autoseg search`, top to bottom.

data -> tiles -> representative tiles -> device -> Optuna search -> second stage (the top nets trained briefly
on all data; on by default when the shipped net trains on all data) -> train the best net
-> export (simplified, verified ONNX) -> evaluate on full test images -> model card -> report.

The stages this calls: autoseg.data_stage (split, representatives, the trials' arrays), autoseg.search (the
study), autoseg.refine (the second stage), autoseg.retrain (the chosen net's final training), autoseg.model_card
(what the card and summary say).

With --storage URL the study is in a database server: `autoseg worker` processes on other hosts join its trials
(autoseg.remote_worker, with what autoseg.study_data records here), and this process alone trains the best net.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from autoseg import __version__
from autoseg.checkpoint import load_if_key, save_checkpoint
from autoseg.config import Config, config_to_dict
from autoseg.data import Dataset
from autoseg.data_stage import (
    DataStage,
    check_data_digest,
    check_data_folders,
    data_stage,
    data_summary,
    prepare_data,
)
from autoseg.devices import (
    Device,
    Measurement,
    MeasureSettings,
    measure_quiet,
    open_device,
    passing,
    settings_from_config,
)
from autoseg.errors import InputError
from autoseg.export import ExportInfo, export_final, model_metadata, quantize_int8
from autoseg.gate import Gate
from autoseg.infer import evaluate, ort_runner
from autoseg.model_card import card_test_metrics, fmt, int8_comparison, predictor_card, training_summary
from autoseg.refine import second_stage
from autoseg.retrain import RETRAIN_STATE, on_all_data, on_reps
from autoseg.rundir import RunDir, write_json_atomic, write_text_atomic
from autoseg.search import (
    Objective,
    SearchTask,
    check_space,
    choose_best,
    distinct_trials,
    open_study,
    pareto_summary,
    plan_search,
    run_trials,
    shortlist,
    study_storage,
    tile_choices,
    timed_size,
    trial_candidate,
    trial_counts,
)
from autoseg.storage import MAX_RETRY, describe, storage_errors
from autoseg.study_data import record_study_data, wait_for_others
from autoseg.train import FOLD_TILE_PASSES, cv_epochs
from autoseg.unet import Arch, build_unet
from autoseg.visual import write_example
from autoseg.workers import run_parallel

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ search


@contextmanager
def run_lock(run: RunDir) -> Iterator[None]:
    """One search per run directory; the OS drops the lock if the process is killed."""
    path = run.root / ".lock"
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{run.root}: another autoseg search is running here; wait or use another --out") from None
        yield


def run_search(cfg: Config, resume_anyway: bool = False, progress: bool = False) -> dict[str, Any]:
    started = time.time()  # search.max_minutes counts from here
    run = RunDir(cfg.out).prepare()
    with run_lock(run), storage_errors(cfg.search.storage):
        if cfg.search.storage is not None:  # a bad URL or password, or no server, fails before any work
            study_storage(run, cfg.search.storage).engine.dispose()
        # Absolute paths (load_config resolved the data's): a copied or moved run still names its files.
        saved = {**config_to_dict(cfg), "out": os.fsdecode(run.root.resolve())}
        write_text_atomic(run.config, yaml.safe_dump(saved, sort_keys=False))
        tiles = tile_choices(cfg)
        check_space(cfg.search.space, tiles)

        stage, reps_by_tile, task = data_stage(cfg, run, progress)
        summary = data_summary(stage, reps_by_tile)
        summary["cv_epochs"] = {str(t): cv_epochs(cfg.train, len(r.rows)) for t, r in reps_by_tile.items()}
        write_json_atomic(run.data, summary)
        for t, epochs in summary["cv_epochs"].items():
            log.info("cross-validation%s: %d folds x %d epochs on %d representatives%s", f" at tile {t}"
                     if len(tiles) > 1 else "", cfg.train.folds, epochs, summary["reps"][t],
                     "" if cfg.train.epochs else f" (about {FOLD_TILE_PASSES} tiles per fold; --epochs sets it)")

        settings = settings_from_config(cfg.device, cfg.seed)
        with closing(open_device(cfg.device, run.latency_cache, cfg.search.storage)) as device:
            log.info("measuring %slatency on %s (%s)", "int8 " if cfg.device.precision == "int8" else "",
                     device.name, device.source)
            study = open_study(run, cfg, resume_anyway)
            # Budgets, the latency range (or a check of the budget), a calibration and the ETA; bad ones exit 2.
            clock = plan_search(cfg, task, device, settings, study, started)
            if cfg.search.storage is not None:  # what `autoseg worker` on other hosts joins with
                record_study_data(study, cfg, stage.ds, reps_by_tile, clock.deadline, summary["digest"])
            if cfg.search.workers > 1:
                objective = Objective(cfg, task, device, settings, run, gate=Gate(run.root))
                run_parallel(cfg, run, task, objective, study, progress, clock)
            else:
                objective = Objective(cfg, task, device, settings, run)
                run_trials(study, objective, cfg.search.trials, progress, deadline=clock.deadline, clock=clock)
            # A worker that died has its trial put back in the queue: run it here, or the budget comes up short.
            for _ in range(MAX_RETRY + 1):
                if (cfg.search.storage is None or not wait_for_others(study)
                        or len(distinct_trials(study)) >= cfg.search.trials):
                    break
                log.info("running the trial(s) of a worker that stopped")
                run_trials(study, objective, cfg.search.trials, progress, deadline=clock.deadline, clock=clock)
            best, second = choose_best(study, cfg.search), None
            if cfg.search.refine_top > 1:  # the top nets trained briefly on all data: the best of them ships
                top = shortlist(study, cfg.search, cfg.search.refine_top)
                if len(top) > 1:
                    best, second = second_stage(cfg, run, stage, task, top, progress, clock)
            card = finalize(cfg, run, stage, task, best, progress, device=device, settings=settings)
            if second is not None:
                card["second_stage"] = second
            card["pareto_front"] = pareto_summary(study)
            card["trials"] = trial_counts(study)
            predictor = predictor_card(study)
            if predictor:
                card["latency_predictor"] = predictor
            write_json_atomic(run.best / "model_card.json", card)  # the float net is done: keep its card
            if cfg.export.int8 or cfg.device.precision == "int8":
                card["int8"] = int8_variant(cfg, run, stage, task, card, device, settings, progress)
                write_json_atomic(run.best / "model_card.json", card)
    _write_report(run, cfg.search.storage)
    return card


def ship_trial(cfg: Config, run: RunDir, number: int, progress: bool = False,
               given: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """Any trial's net, trained, exported, verified and tested like the chosen one, into RUN/trials/N/.

    For picking another net off the Pareto front: a rerun keeps what is done, like the search's own.
    `given`: the data keys this command's flags set (check_data_folders)."""
    from autoseg.rundir import check_study_file
    from autoseg.search import load_study

    if cfg.search.storage is None:
        if not run.study_db.exists():
            raise InputError(f"{run.study_db}: not found; is {run.root} a run directory written by `autoseg search`?")
        check_study_file(run.study_db)
    with storage_errors(cfg.search.storage):
        trials = {t.number: t for t in load_study(run, cfg, 0).trials}
    if number not in trials:
        where = run.study_db if cfg.search.storage is None else describe(cfg.search.storage)
        raise InputError(f"--trial {number}: no such trial in {where} (trials 0-{max(trials, default=-1)})")
    trial = trials[number]
    trial = trials.get(trial.user_attrs.get("same_as_trial"), trial)  # a repeat: its twin holds the attributes
    if "arch_dict" not in trial.user_attrs or "tile" not in trial.user_attrs:
        raise InputError(f"--trial {number}: the trial never got as far as a net ({trial.state.name}); "
                         "pick a trial of the report's table")
    with run_lock(run):
        check_data_folders(cfg, run, given)
        stage = prepare_data(cfg, progress)
        check_data_digest(cfg, run, stage)  # before any work on data that may not be the run's
        stage, _, task = data_stage(cfg, run, progress, stage)
        card = finalize(cfg, run, stage, task, trial, progress, folder=run.trial(number))
        if number != trial.number:
            card["same_as_trial"] = trial.number
        write_json_atomic(run.trial(number) / "model_card.json", card)
    return card


# ------------------------------------------------------------------ the chosen net


def finalize(
    cfg: Config, run: RunDir, stage: DataStage, task: SearchTask, best: Any, progress: bool = False,
    folder: Path | None = None, device: Device | None = None, settings: MeasureSettings | None = None,
) -> dict[str, Any]:
    """Train the chosen net to ship (on crops of all training images, or on the representatives), export it
    verified, and test it on full images, into `folder` (RUN/best; RUN/trials/N to ship another trial's net).
    With a device, a latency the search took on a busy, noisy or throttled device is timed again (chosen_latency).

    A rerun keeps a training that finished (a later step failed) and goes on with one that was interrupted.
    """
    where = folder or run.best
    net = trial_candidate(best.user_attrs)
    arch, tile = net.arch, net.tile
    ds = stage.ds
    if cfg.train.final_data == "all":
        key, train = on_all_data(cfg, run, stage, task, arch, tile, best.number, progress, where)
    else:
        key, train = on_reps(cfg, task, arch, tile, best.number, progress, where)
    checkpoint = load_if_key(where / "model.pt", key)
    if checkpoint is not None:
        log.info("trial %d (%s) was retrained already: %s kept", best.number, arch.key(), where / "model.pt")
        model = build_unet(arch, task.in_channels, task.num_classes)
        model.load_state_dict(checkpoint["state_dict"])
    else:
        model, training = train()
        checkpoint = {
            "arch": arch.to_dict(),
            "in_channels": task.in_channels,
            "num_classes": task.num_classes,
            "tile": tile,
            "mean": list(ds.mean),
            "std": list(ds.std),
            "classes": list(ds.class_map.names),
            "class_map": ds.class_map.to_dict(),
            "state_dict": model.state_dict(),
            "config": config_to_dict(cfg),
            "training": training,
            "retrain_key": key,
        }
        save_checkpoint(checkpoint, where / "model.pt")
        write_json_atomic(where / "training.json", training)
        (where / RETRAIN_STATE).unlink(missing_ok=True)
    info = export_checkpoint(checkpoint, model.eval(), where / "model.onnx", cfg)
    log.info("exported %s: %.1f kB, opset %d, %d -> %d nodes, parity max |diff| %.2e", info.path,
             info.size_bytes / 1e3, info.opset, info.nodes_before, info.nodes_after, info.parity_max_abs_diff)

    metrics = evaluate_model(cfg, run, where / "model.onnx", stage.test_ds, stage.test_ids, arch, tile, progress,
                             out=None if folder is None else folder / "eval")
    # The search's timed graph is in RUN/trials/N/model.onnx until a shipped trial's export replaces it.
    timed = run.trial(best.number) / "model.onnx" if folder is None else None
    return {
        "trial": best.number,
        "arch": arch.key(),
        "arch_dict": arch.to_dict(),
        "params": best.user_attrs.get("params"),
        "macs": best.user_attrs.get("macs"),
        **chosen_latency(best.user_attrs, task.in_channels, timed, device, settings),
        "measure_size": best.user_attrs.get("measure_size"),
        "precision": best.user_attrs.get("precision", "fp32"),  # of the model timed in the search
        "cv_score": best.user_attrs.get("cv_mean"),
        "cv_std": best.user_attrs.get("cv_std"),
        "fold_scores": best.user_attrs.get("fold_scores"),
        "training": training_summary(checkpoint.get("training")),
        **card_test_metrics(metrics),
        "test_images": len(stage.test_ids),
        "classes": list(ds.class_map.names),
        "in_channels": task.in_channels,
        "tile": tile,
        "mean": list(ds.mean),
        "std": list(ds.std),
        "onnx": info.to_dict(),
        "autoseg_version": __version__,
    }


def chosen_latency(
    attrs: dict[str, Any], in_channels: int, graph: Path | None, device: Device | None = None,
    settings: MeasureSettings | None = None,
) -> dict[str, Any]:
    """The model card's latency keys of the chosen net, with latency_flags (why the figure is not clean).

    A search figure with flags a wait can clear is timed again on `device`: the same graph the search timed
    (`graph`), waiting for a quiet device up to QUIET_WAIT_S (measure_quiet). The quieter figure is kept;
    search_latency_ms and search_latency_flags keep the search's when it was replaced.
    """
    lat = attrs.get("latency") or {}
    m = Measurement.from_dict(lat) if lat else None
    out: dict[str, Any] = {
        "latency_ms": attrs.get("latency_ms"),
        "latency_stats": lat.get("stats"),
        "latency_source": attrs.get("latency_source"),
        "device": attrs.get("device"),
        "fingerprint": lat.get("fingerprint"),
        "latency_flags": list(m.flags) if m else [],
    }
    size = attrs.get("measure_size")
    if (m is None or not passing(m.flags) or device is None or settings is None or graph is None
            or not graph.is_file() or not size):
        return out
    log.info("the chosen net was timed while %s: timing it again", "; ".join(passing(m.flags)))
    timed, _ = measure_quiet(device, {"chosen net": graph.read_bytes()}, (1, in_channels, size, size), settings)
    again = timed.get("chosen net")
    if again is None or again.median_ms is None or len(passing(again.flags)) >= len(passing(m.flags)):
        return out  # no quieter figure: the search's stays, with its flags
    return {
        **out,
        "latency_ms": again.median_ms,
        "latency_stats": again.stats,
        "latency_source": again.source,
        "device": again.device,
        "fingerprint": again.fingerprint,
        "latency_flags": list(again.flags),
        "search_latency_ms": out["latency_ms"],
        "search_latency_flags": out["latency_flags"],
    }


def int8_variant(
    cfg: Config, run: RunDir, stage: DataStage, task: SearchTask, card: dict[str, Any], device: Device,
    settings: MeasureSettings, progress: bool = False,
) -> dict[str, Any]:
    """Quantize the exported net to int8, test it like the float one, and time both on the device.

    Both are timed alike, waiting for a quiet device (measure_quiet); latency_flags and fp32_latency_flags
    say why a figure is not clean, and the summary prints the comparison as unreliable then."""
    net = trial_candidate(card)
    arch, tile = net.arch, net.tile
    fp32 = run.best / "model.onnx"
    try:
        info = quantize_int8(fp32, run.best / "model.int8.onnx", task.data[tile].x)
    except Exception as e:  # an optional extra: it must not take the finished float model down with it
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        log.warning("int8: not exported, the float model stands alone (%s)", reason)
        return {"error": f"quantization failed: {reason}"}
    metrics = evaluate_model(
        cfg, run, info.path, stage.test_ds, stage.test_ids, arch, tile, progress, name="metrics.int8.json"
    )
    size = timed_size(arch, tile, cfg.device.measure_size)
    shape = (1, task.in_channels, size, size)
    timed, lost = measure_quiet(device, {"fp32": fp32.read_bytes(), "int8": info.path.read_bytes()}, shape, settings)
    int8_m, fp32_m = timed.get("int8"), timed.get("fp32")
    out = {
        **info.to_dict(),
        **card_test_metrics(metrics),
        "latency_ms": int8_m.median_ms if int8_m else None,
        "fp32_latency_ms": fp32_m.median_ms if fp32_m else None,  # the float model, timed beside it
        "latency_flags": list(int8_m.flags) if int8_m else [],
        "fp32_latency_flags": list(fp32_m.flags) if fp32_m else [],
        "latency_source": int8_m.source if int8_m else None,
        "device": int8_m.device if int8_m else device.name,
        "measure_size": size,
        "latency_error": lost or next((m.message for m in timed.values() if m.median_ms is None), None),
    }
    log.info("int8: %s, %.1f kB, test mIoU %s (float %s), %s on %s", info.path.name, info.size_bytes / 1e3,
             fmt(out["test_miou"]), fmt(card.get("test_miou")), int8_comparison(out), out["device"])
    return out


def export_checkpoint(checkpoint: dict[str, Any], model: torch.nn.Module, path: Path, cfg: Config) -> ExportInfo:
    arch = Arch.from_dict(checkpoint["arch"])
    # class_map: how masks encode the classes, so `autoseg predict` writes them alike (older checkpoints lack it)
    metadata = model_metadata(checkpoint["classes"], checkpoint["mean"], checkpoint["std"], checkpoint["tile"],
                              arch.key(), arch.multiple, checkpoint.get("class_map"))
    info = export_final(
        model,
        path,
        checkpoint["in_channels"],
        checkpoint["tile"],
        metadata,
        opset=cfg.export.opset,
        simplify=cfg.export.simplify,
        atol=cfg.export.parity_atol,
    )
    return info


def evaluate_model(
    cfg: Config,
    run: RunDir,
    onnx_path: Path,
    ds: Dataset,
    ids: np.ndarray,
    arch: Arch,
    tile: int,
    progress: bool = False,
    name: str = "metrics.json",
    out: Path | None = None,
) -> dict[str, Any] | None:
    """Metrics of the exported ONNX model on full-size test images, per image, per class and overall.

    Writes `out`/`name` (out: RUN/eval, the run's own held-out results); example images only for the main
    model (name metrics.json), in `out`/examples."""
    if len(ids) == 0:
        log.warning("no test images: pass --test-images/--test-masks or raise data.test_fraction")
        return None
    e = cfg.eval
    out = out or run.eval
    main = name == "metrics.json"  # only the main model's evaluation draws examples
    examples = {int(i) for i in ids[: e.num_examples]} if main else set()
    folder = out / "examples"
    if main and folder.is_dir():  # strips of an earlier evaluation of this set, maybe of changed images
        keep = {f"{ds.pairs[i].stem}.png" for i in examples}
        for old in folder.glob("*.png"):
            if old.name not in keep:
                old.unlink()

    def draw(i: int, image: np.ndarray, mask: np.ndarray, pred: np.ndarray) -> None:
        if i in examples:
            write_example(ds, i, image, mask, pred, folder)

    metrics = evaluate(ort_runner(onnx_path), ds, ids, e.mode, tile, e.window_overlap, e.batch, arch.multiple,
                       progress=progress, on_prediction=draw, width=arch.channels[0])
    metrics["mode"] = e.mode
    metrics["model"] = str(onnx_path)
    write_json_atomic(out / name, metrics)
    return metrics


def other_eval_folder(run: RunDir, images: Path, masks: Path) -> Path:
    """Where an evaluation on images other than the run's held-out ones goes: RUN/eval/other/<name>-<digest>,
    so it never overwrites the run's own test results (and the same folders land in the same place)."""
    key = "\0".join(os.fsdecode(Path(p).resolve()) for p in (images, masks))
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(images).resolve().name)[:40] or "images"
    return run.eval / "other" / f"{name}-{digest}"


def _write_report(run: RunDir, storage: str | None = None) -> None:
    from autoseg.report import write_report

    with storage_errors(storage):
        write_report(run.root, storage)


