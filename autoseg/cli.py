"""`autoseg` command line: parse flags, load the config once, run, map errors to exit codes.

Exit codes: 0 ok, 1 internal error, 2 bad input or config, 3 device or study database unreachable (or, for a
worker, a study whose search has not recorded its data in time).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from autoseg import __version__
from autoseg.config import FINAL_TILE_PASSES, FOLD_TILE_PASSES, Config, load_config, load_run_config
from autoseg.errors import AutosegError, InputError
from autoseg.logs import progress_enabled, setup_logging
from autoseg.rundir import os_hint, os_reason

log = logging.getLogger("autoseg")

# flag dest -> dotted config key
_FLAG_KEYS = {
    "images": "data.images",
    "masks": "data.masks",
    "test_images": "data.test_images",
    "test_masks": "data.test_masks",
    "ignore_index": "data.ignore_index",
    "tile": "tiles.size",
    "overlap": "tiles.overlap",
    "num_reps": "reps.num_reps",
    "reps_per_cluster": "reps.reps_per_cluster",
    "embedder": "reps.embedder",
    "embedder_weights": "reps.embedder_weights",
    "trials": "search.trials",
    "objective": "search.objective",
    "sampler": "search.sampler",
    "pruner": "search.pruner",
    "startup": "search.startup",
    "latency_budget_ms": "search.latency_budget_ms",
    "max_minutes": "search.max_minutes",
    "workers": "search.workers",
    "storage": "search.storage",
    "study": "search.study_name",
    "threads": "train.threads",
    "alpha": "search.alpha",
    "measure_size": "device.measure_size",
    "precision": "device.precision",
    "folds": "train.folds",
    "epochs": "train.epochs",
    "final_epochs": "train.final_epochs",
    "final_data": "train.final_data",
    "final_tiles": "train.final_tiles",
    "final_minutes": "train.final_minutes",
    "batch_size": "train.batch_size",
    "device": "device.target",
    "device_python": "device.python",
    "fallback": "device.fallback",
    "known_hosts": "device.known_hosts",
    "identity_file": "device.identity_file",
    "eval_mode": "eval.mode",
    "int8": "export.int8",
    "opset": "export.opset",
    "out": "out",
    "seed": "seed",
}


EVAL_MODE_HELP = ("full-size inference: auto (whole image while one pass fits about 512 MiB, at most 2048x2048 px; "
                  "windows beyond), whole, or window (Gaussian-blended windows; memory bounded by a row of them)")


def _add_common(p: argparse.ArgumentParser, config: bool = True) -> None:
    if config:
        p.add_argument("--config", type=Path, help="YAML config file; flags override it")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    g.add_argument("-v", "--verbose", action="store_true", help="debug logs")


def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", help="folder of training images")
    p.add_argument("--masks", help="folder of label masks (paired with images by file stem)")
    p.add_argument("--ignore-index", type=int, help="mask value left out of loss and metrics (default 255)")
    p.add_argument("--tile", type=int, help="tile size in pixels")
    p.add_argument("--overlap", type=float, help="tile overlap in [0, 1)")
    p.add_argument("--seed", type=int, help="seed of every random choice: split, representatives, sampler, "
                   "training (default 0); the same seed gives the same run")


def _add_reps(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-reps", type=int, help="number of representative tiles")
    p.add_argument("--reps-per-cluster", type=int, help="representatives taken from each cluster")
    p.add_argument("--embedder", choices=["handcrafted", "cnn"])
    p.add_argument("--embedder-weights", help="local state_dict for the cnn embedder (e.g. ResNet-18)")


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="local, user@host, user@host:port or a ~/.ssh/config Host alias; several "
                   "devices of one kind as a pool: pi1,pi2,pi3")
    p.add_argument("--device-python", help="python on the device that has numpy and onnxruntime")
    p.add_argument("--trust-new-host", action="store_true", default=None, help="accept and record an unknown host key")
    p.add_argument("--fallback", choices=["none", "local"], help="measure locally if the device is lost")
    p.add_argument("--known-hosts", help="known_hosts file (default ~/.ssh/known_hosts)")
    p.add_argument("--identity-file", help="private key for the device")


def _add_moved_data(p: argparse.ArgumentParser, test: bool = False) -> None:
    """Where a run's data is now, when it moved: checked against the digest the run saved in data.json."""
    p.add_argument("--images", help="where the run's training images are now, if they moved (checked against "
                   "the run's data digest)")
    p.add_argument("--masks", help="where their masks are now")
    if test:
        p.add_argument("--test-images", help="where the run's test images are now, if it had test folders and "
                       "they moved (with --trial)")
        p.add_argument("--test-masks", help="where their masks are now")


def _add_storage(p: argparse.ArgumentParser, later: bool = False) -> None:
    if later:
        p.add_argument("--storage", metavar="URL", help="the study's database URL with its password, when the run's "
                       "study is in a database (the run's config.yml keeps it with the password as ***)")
        return
    p.add_argument("--storage", metavar="URL", help="keep the Optuna study in this database instead of the run's "
                   "study.db, so workers on other hosts and optuna-dashboard can share it: any SQLAlchemy URL, "
                   "e.g. postgresql+psycopg://user:password@host:5432/dbname")


def _add_opset(p: argparse.ArgumentParser) -> None:
    p.add_argument("--opset", type=int, help="ONNX opset the nets are timed and exported at (default 17); "
                   "older onnxruntime on the device needs a lower one")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autoseg",
        description="Find the smallest U-Net that still segments well, measured on the device that runs it.",
    )
    parser.add_argument("--version", action="version", version=f"autoseg {__version__}")
    # Also before the command (`autoseg -q search ...`); other dests, or the command's defaults would reset them.
    g = parser.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", dest="top_quiet", action="store_true", help="warnings and errors only")
    g.add_argument("-v", "--verbose", dest="top_verbose", action="store_true", help="debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("search", help="search architectures, retrain the best, export and report")
    _add_common(p)
    _add_data(p)
    _add_reps(p)
    _add_device(p)
    p.add_argument("--test-images", help="folder of full-size test images")
    p.add_argument("--test-masks", help="folder of their masks")
    p.add_argument("--trials", type=int, help="distinct nets to try (default 20); repeated proposals do not count")
    p.add_argument("--max-minutes", type=float, help="end the trials this many minutes after the start, a running "
                   "one at its next epoch, then train the best so far (its own budget: --final-tiles, --final-minutes)")
    p.add_argument("--workers", type=int, help="processes running trials at once, each with an equal share of the "
                   "cores (default 1); small nets use many cores poorly")
    p.add_argument("--folds", type=int, help="cross-validation folds per candidate on the representatives "
                   "(default 3)")
    p.add_argument("--epochs", type=int, help="epochs per cross-validation fold (default: enough for "
                   f"each fold to train on about {FOLD_TILE_PASSES} tiles, at least 3)")
    p.add_argument("--final-data", choices=["all", "reps"], help="what the shipped net trains on: crops of all "
                   "training images (default), or the representative tiles for --final-epochs epochs")
    p.add_argument("--final-tiles", type=int, help="crops the shipped net trains on with --final-data all "
                   f"(default {FINAL_TILE_PASSES:,})")
    p.add_argument("--final-minutes", type=float, help="wall-clock cap on the shipped net's training")
    p.add_argument("--final-epochs", type=int, help="epochs of the final retrain with --final-data reps (default 100)")
    p.add_argument("--batch-size", type=int, help="training batch (default: from free memory and the net's "
                   "size, at most 64 in the search and 32 for the shipped net)")
    p.add_argument("--objective", choices=["penalty", "pareto"], help="penalty (default): one score, CV mIoU "
                   "minus alpha x log10 latency; pareto: score and latency, the front is reported")
    p.add_argument("--sampler", choices=["tpe", "nsga2"], help="Optuna sampler: tpe (default) or nsga2 "
                   "(multi-objective, for --objective pareto)")
    p.add_argument("--pruner", choices=["halving", "hyperband", "median", "none"],
                   help="how trials stop early (default halving: judged after the first fold, the whole CV for "
                   "the best third)")
    p.add_argument("--startup", choices=["cost", "random"],
                   help="TPE's first trials: nets spread over the space's cost, cheapest first (default), or random")
    p.add_argument("--latency-budget-ms", type=float, help="drop candidates slower than this before any training")
    p.add_argument("--alpha", type=float, help="penalty objective's weight on log10(latency) (default 0.05; 0 with "
                   "a hard budget: the best score within it)")
    p.add_argument("--measure-size", type=int,
                   help="time each net on an N x N input, the size you deploy at (default: the tile size)")
    p.add_argument("--precision", choices=["fp32", "int8"],
                   help="what the net runs at on the device (default fp32); int8 times every candidate quantized, "
                   "and exports the int8 model too")
    p.add_argument("--eval-mode", choices=["auto", "whole", "window"], help=EVAL_MODE_HELP)
    p.add_argument("--int8", action="store_true", default=None,
                   help="also export an int8 model calibrated on the representative tiles")
    _add_opset(p)
    p.add_argument("--out", help="run directory (rerun the same command to resume)")
    _add_storage(p)
    p.add_argument("--study", metavar="NAME", help="the study's name in --storage's database (default autoseg), "
                   "so one database holds several studies; `autoseg worker --study NAME` joins it")
    p.add_argument("--resume-anyway", action="store_true", help="resume a study made with another config")

    p = sub.add_parser("worker", help="join a search running on another host through its study's database: run "
                       "its trials here until its budget is spent (the search's first process trains the best)")
    _add_common(p, config=False)  # the config is the study's
    p.add_argument("--storage", metavar="URL", required=True, help="the study's database URL with its password, as "
                   "given to `autoseg search --storage`, e.g. postgresql+psycopg://user:password@host:5432/dbname")
    p.add_argument("--study", metavar="NAME", help="the search's --study (default autoseg)")
    p.add_argument("--images", help="this host's copy of the search's training images (default: the folder the "
                   "search names); checked against the study's data digest")
    p.add_argument("--masks", help="this host's copy of their masks")
    _add_device(p)
    p.add_argument("--out", help="folder for this worker's files: trial models, latency cache (default "
                   "runs/worker-NAME)")
    p.add_argument("--workers", type=int, help="processes running trials on this host (default 1)")
    p.add_argument("--threads", type=int, help="torch threads per process (default: an equal share of the cores)")

    p = sub.add_parser("demo", help="generate the built-in demo data and run the whole pipeline on it")
    _add_common(p)
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--trials", type=int, help="distinct nets the demo tries (default 8)")
    p.add_argument("--device", help="measure on this device instead of locally")
    p.add_argument("--device-python")
    p.add_argument("--trust-new-host", action="store_true", default=None)

    p = sub.add_parser("tiles", help="count the moving-window tiles of a dataset")
    _add_common(p)
    _add_data(p)

    p = sub.add_parser("reps", help="choose representative tiles and write their manifest")
    _add_common(p)
    _add_data(p)
    _add_reps(p)
    p.add_argument("--out", help="run directory for the manifest and index cache")
    p.add_argument("--contact-sheet", action="store_true", default=None, help="also write contact_sheet.png")
    p.add_argument("--write-pngs", action="store_true", default=None, help="also write each tile as PNG")

    p = sub.add_parser("eval", help="evaluate a run's exported model on full-size images")
    _add_common(p)
    p.add_argument("run", type=Path, help="run directory")
    _add_moved_data(p)
    p.add_argument("--test-images", help="folder of test images (default: the run's held-out images)")
    p.add_argument("--test-masks", help="folder of their masks")
    p.add_argument("--eval-mode", choices=["auto", "whole", "window"], help=EVAL_MODE_HELP)
    p.add_argument("--trial", type=int, help="test trial N's net, trained like the chosen one first if it is not "
                   "yet (into RUN/trials/N/)")
    _add_storage(p, later=True)

    p = sub.add_parser("export", help="re-export a run's best net to a verified ONNX file")
    _add_common(p)
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--to", type=Path, help="output path (default RUN/best/model.onnx)")
    _add_moved_data(p, test=True)
    p.add_argument("--trial", type=int, help="ship trial N's net instead of the chosen one: trained like it, "
                   "exported, verified and tested into RUN/trials/N/ (see the report's Pareto table)")
    _add_storage(p, later=True)
    _add_opset(p)

    p = sub.add_parser("predict", help="label a folder of new images with a run's model (no masks needed)")
    _add_common(p)  # the model file carries the rest; the config gives the eval section's defaults
    p.add_argument("model", type=Path, help="run directory (its best model) or an .onnx file exported by autoseg")
    p.add_argument("--images", type=Path, required=True, help="folder of images to label")
    p.add_argument("--out", type=Path, required=True, help="folder for the masks (<stem>.png)")
    p.add_argument("--int8", action="store_true", help="use the run's int8 model")
    # Own dests: --eval-mode and --overlap would otherwise set the search's keys (tiles.overlap).
    p.add_argument("--eval-mode", dest="predict_mode", choices=["auto", "whole", "window"],
                   help=EVAL_MODE_HELP + " (default: eval.mode of --config, else auto)")
    p.add_argument("--overlap", dest="predict_overlap", type=float,
                   help="window overlap in [0, 1) (window mode; default: eval.window_overlap of --config, else 0.5)")
    p.add_argument("--overlay", action="store_true", help="also write <stem>_overlay.jpg, the classes over the image")

    p = sub.add_parser("report", help="write report.md/html/json for a run (finished or running)")
    _add_common(p)
    p.add_argument("run", type=Path, help="run directory")
    _add_storage(p, later=True)

    p = sub.add_parser("config", help="show the resolved config of a search, or check a config file")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    c = csub.add_parser("show", help="print the validated config, defaults included, that `autoseg search` with "
                        "the same --config and flags would run with", add_help=False)
    c.add_argument("flags", nargs=argparse.REMAINDER, help="--config FILE and any `autoseg search` flags")
    c = csub.add_parser("check", help="validate a config file: one line naming the first bad key, exit 2")
    _add_common(c, config=False)
    c.add_argument("file", type=Path, help="YAML config file")

    p = sub.add_parser("device", help="device utilities")
    dsub = p.add_subparsers(dest="device_command", required=True, metavar="ACTION")
    c = dsub.add_parser("check", help="connect, deploy the agent, print fingerprint and a reference latency")
    _add_common(c)
    _add_device(c)
    _add_opset(c)

    # Own dests for the predict flags: --images, --out, --int8 ... would otherwise set search config keys.
    p = sub.add_parser("deploy", help="copy a run's model to the device (sha256-verified); with --images, "
                       "label them there and bring the masks back")
    _add_common(p)
    _add_device(p)
    p.add_argument("run", type=Path, help="run directory (its best model) or an .onnx file exported by autoseg")
    p.add_argument("--int8", dest="deploy_int8", action="store_true", help="deploy the run's int8 model")
    p.add_argument("--images", dest="deploy_images", type=Path, metavar="DIR", help="label this folder on the device")
    p.add_argument("--out", dest="deploy_out", type=Path, metavar="DIR",
                   help="folder for its masks (default RUN/deploy/masks)")
    p.add_argument("--remote-dir", metavar="DIR", help="folder on the device (default ~/autoseg-models/<run name>)")
    p.add_argument("--eval-mode", dest="deploy_mode", choices=["auto", "whole", "window"], default="auto")
    p.add_argument("--overlap", dest="deploy_overlap", type=float, default=0.5, metavar="F",
                   help="window overlap in [0, 1)")
    p.add_argument("--overlay", action="store_true", help="also bring back <stem>_overlay.png")
    return parser


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dest, key in _FLAG_KEYS.items():
        v = getattr(args, dest, None)
        if v is not None:
            out[key] = str(v) if isinstance(v, Path) else v
    for flag, key in (
        ("trust_new_host", "device.trust_new_host"),
        ("contact_sheet", "reps.contact_sheet"),
        ("write_pngs", "reps.write_pngs"),
    ):
        if getattr(args, flag, None):
            out[key] = True
    if "device.target" in out:  # --device wins over the config's target and targets alike
        given = str(out["device.target"])
        out["device.targets"] = given.split(",") if "," in given else []
        if "," in given:
            out["device.target"] = "local"
    return out


def _config(args: argparse.Namespace, base: dict[str, Any] | None = None) -> Config:
    overrides = dict(base or {})
    overrides.update(overrides_from(args))
    return load_config(args.config, overrides)


def _run_config(run: Path, args: argparse.Namespace, extra: dict[str, Any] | None = None) -> Config:
    """A run's saved config, with this command's flags on top (--config, if given, is not read: the run's
    own config is what its results mean)."""
    path = run / "config.yml"
    if not path.exists():
        raise InputError(f"{path}: not found; is {run} a run directory written by `autoseg search`?")
    overrides = overrides_from(args)
    overrides.update(extra or {})
    return load_run_config(run, overrides)


# ------------------------------------------------------------------ commands


def cmd_search(args: argparse.Namespace) -> int:
    from autoseg.model_card import summary_lines
    from autoseg.pipeline import run_search

    card = run_search(_config(args), resume_anyway=args.resume_anyway, progress=progress_enabled())
    for line in summary_lines(card):
        print(line)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from autoseg.demo_data import generate_demo
    from autoseg.model_card import summary_lines
    from autoseg.pipeline import run_search

    out = Path(args.out)
    images, masks = generate_demo(out / "data")
    base = {
        "data.images": str(images),
        "data.masks": str(masks),
        "tiles.size": 64,
        "tiles.overlap": 0.25,
        "reps.num_reps": 64,
        "reps.contact_sheet": True,
        "search.trials": 8,
        "search.alpha": 0.05,
        "search.space.levels": [1, 2, 3],
        "search.space.channels": [4, 8, 16, 32],
        "train.folds": 3,
        "train.epochs": 3,
        "train.final_epochs": 25,
        "train.final_tiles": 6000,
        "export.int8": True,
        "out": str(out),
    }
    cfg = _config(args, base)  # flags (--trials, --device, ...) win over the demo's settings
    card = run_search(cfg, progress=progress_enabled())
    for line in summary_lines(card):
        print(line)
    print(f"report: {cfg.out / 'report.html'}")
    return 0


def cmd_tiles(args: argparse.Namespace) -> int:
    from autoseg.data_stage import prepare_data, tile_index

    cfg = _config(args)
    stage = prepare_data(cfg, progress_enabled())
    index = tile_index(cfg, stage, cfg.tiles.size)
    from autoseg.tiles import stride_for

    print(
        f"{len(stage.train_ids)} training images, tile {cfg.tiles.size}, stride "
        f"{stride_for(cfg.tiles.size, cfg.tiles.overlap)}: {len(index)} tiles "
        f"({len(stage.test_ids)} images held out for testing)"
    )
    return 0


def cmd_reps(args: argparse.Namespace) -> int:
    from autoseg.data_stage import prepare_data, select_reps
    from autoseg.rundir import RunDir

    cfg = _config(args)
    run = RunDir(cfg.out).prepare()
    stage = prepare_data(cfg, progress_enabled())
    reps = select_reps(cfg, stage, cfg.tiles.size, run, progress_enabled())
    print(f"{len(reps.rows)} representatives of {reps.n_tiles} tiles -> {run.reps / 'manifest.csv'}")
    if cfg.reps.contact_sheet:
        print(f"contact sheet: {run.reps / 'contact_sheet.png'}")
    return 0


def _given(args: argparse.Namespace) -> frozenset[str]:
    """The data keys (images, masks, test_images, test_masks) this command's flags set."""
    return frozenset(k for k in ("images", "masks", "test_images", "test_masks") if getattr(args, k, None))


def cmd_worker(args: argparse.Namespace) -> int:
    from autoseg.config import SearchConfig
    from autoseg.remote_worker import run_worker, summary_lines
    from autoseg.storage import check_url

    overrides = overrides_from(args)
    url = check_url(overrides.pop("search.storage"))
    name = overrides.pop("search.study_name", SearchConfig().study_name)
    for line in summary_lines(run_worker(url, name, overrides, progress=progress_enabled())):
        print(line)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from autoseg.data_stage import check_data_digest, check_data_folders, prepare_data, same_test_data
    from autoseg.export import check_loads
    from autoseg.pipeline import evaluate_model, other_eval_folder
    from autoseg.rundir import RunDir, write_json_atomic
    from autoseg.unet import Arch

    run = RunDir(args.run)
    if args.trial is not None:
        if args.test_images or args.test_masks:
            raise InputError("--trial tests on the run's held-out images; give --test-images/--test-masks without "
                             "--trial, after `autoseg export RUN --trial N`")
        card = _ship(_run_config(args.run, args), run, args.trial, _given(args))
        print(f"trial {args.trial}: test mIoU {card['test_miou']:.3f} on {card['test_images']} image(s) -> "
              f"{run.trial(args.trial) / 'eval' / 'metrics.json'}")
        return 0
    card = _read_card(run)
    # Run folders are shared: a damaged model, or one whose external data lies outside its folder, is one line.
    check_loads(run.best / "model.onnx", f"run `autoseg export {args.run}` to write it again")
    extra, out = {}, None
    if args.test_images or args.test_masks:
        extra = {"data.test_images": args.test_images, "data.test_masks": args.test_masks}
    cfg = _run_config(args.run, args, extra)
    check_data_folders(cfg, run, _given(args))
    # Same config and seed give the same split, so this is the run's own held-out set unless folders are given.
    stage = prepare_data(cfg, progress_enabled())
    other = bool(args.test_images and args.test_masks) and not same_test_data(run, stage)  # not the run's own moved
    if other:  # other images: their own folder, the run's results stay
        out = other_eval_folder(run, Path(args.test_images), Path(args.test_masks))
    check_data_digest(cfg, run, stage, test=not other)
    arch = Arch.from_dict(card["arch_dict"])
    metrics = evaluate_model(
        cfg, run, run.best / "model.onnx", stage.test_ds, stage.test_ids, arch, card["tile"], progress_enabled(),
        out=out,
    )
    if metrics is None:
        raise InputError(f"{args.run}: no test images to evaluate on; pass --test-images and --test-masks")
    if out is not None:
        write_json_atomic(out / "source.json", {"test_images": os.fsdecode(Path(args.test_images).resolve()),
                                                "test_masks": os.fsdecode(Path(args.test_masks).resolve())})
    m = metrics["mean"]
    print(
        f"{len(stage.test_ids)} image(s): mIoU {m['miou']:.3f}, macro Dice {m['macro_dice']:.3f}, "
        f"pixel acc {m['pixel_acc']:.3f} -> {(out or run.eval) / 'metrics.json'}"
    )
    return 0


def _ship(cfg: Config, run: Any, number: int, given: frozenset[str] = frozenset()) -> dict[str, Any]:
    from autoseg.model_card import summary_lines
    from autoseg.pipeline import ship_trial

    card = ship_trial(cfg, run, number, progress_enabled(), given)
    for line in summary_lines(card):
        log.info(line)
    return card


def cmd_export(args: argparse.Namespace) -> int:
    from autoseg.checkpoint import checkpoint_with_keys
    from autoseg.pipeline import export_checkpoint
    from autoseg.rundir import RunDir
    from autoseg.unet import Arch, build_unet

    run = RunDir(args.run)
    if args.to is not None and args.to.is_dir():
        raise InputError(f"--to {args.to}: is a directory; give a file path, such as {args.to / 'model.onnx'}")
    cfg = _run_config(args.run, args)
    folder = run.best
    if args.trial is not None:
        _ship(cfg, run, args.trial, _given(args))
        folder = run.trial(args.trial)
        if args.to is None:
            print(f"{folder / 'model.onnx'}")
            return 0
    ckpt_path = folder / "model.pt"
    ckpt = checkpoint_with_keys(ckpt_path, "arch", "in_channels", "num_classes", "state_dict", "tile", "classes",
                                "mean", "std")
    model = build_unet(Arch.from_dict(ckpt["arch"]), ckpt["in_channels"], ckpt["num_classes"])
    model.load_state_dict(ckpt["state_dict"])
    info = export_checkpoint(ckpt, model.eval(), args.to or folder / "model.onnx", cfg)
    print(
        f"{info.path}: {info.size_bytes / 1e3:.1f} kB, opset {info.opset}, "
        f"parity max |diff| {info.parity_max_abs_diff:.2e}"
    )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from autoseg.predict import class_share_text, predict_folder, resolve_model

    ev = load_config(args.config).eval  # flags win over the file, the file over the defaults
    overlap = ev.window_overlap if args.predict_overlap is None else args.predict_overlap
    if not 0.0 <= overlap < 1.0:
        raise InputError(f"--overlap: must be in [0.0, 1.0), got {overlap}")
    model = resolve_model(args.model, args.int8)
    summary = predict_folder(model, args.images, args.out, mode=args.predict_mode or ev.mode, overlap=overlap,
                             batch=ev.batch, write_overlay=args.overlay, progress=progress_enabled())
    mode = args.predict_mode or ev.mode
    print(f"{summary['images']} mask(s) in {args.out} ({summary['encoding']}); mode {mode}"
          f"{f', overlap {overlap:g}' if mode != 'whole' else ''}; pixels: {class_share_text(summary['class_share'])}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from autoseg.report import write_report
    from autoseg.storage import check_url

    if args.storage is not None:
        check_url(args.storage)
    elif not (args.run / "study.db").exists() and not _saved_storage(args.run):
        raise InputError(f"{args.run}: no study.db here; give a run directory written by `autoseg search`")
    write_report(args.run, args.storage)
    print(f"{args.run / 'report.html'}")
    return 0


def _saved_storage(run: Path) -> bool:
    """Whether the run's config.yml keeps its study in a database (search.storage)."""
    import yaml

    from autoseg.report.collect import saved_storage

    try:
        saved = yaml.safe_load((run / "config.yml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return saved_storage(saved if isinstance(saved, dict) else None) is not None


def cmd_device_check(args: argparse.Namespace) -> int:
    from autoseg.device_check import check_device

    cfg = _config(args)
    report = check_device(cfg.device, cfg.export.opset)
    print(json.dumps(report, indent=2))
    if report["error"]:
        raise InputError(f"device check: {report['device']}: {report['error']}; {report['hint']}")
    return 0


def _read_card(run: Any) -> dict[str, Any]:
    path = run.best / "model_card.json"
    if not path.exists():
        raise InputError(f"{path}: not found; run `autoseg search` to completion first")
    return json.loads(path.read_text())


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from autoseg.config import config_to_dict

    if args.config_command == "check":
        load_config(args.file)
        print(f"{args.file}: ok")
        return 0
    # `show` takes the search's own flags: parsed by the search's parser, so the two can never disagree.
    search = build_parser().parse_args(["search", *args.flags])
    print(yaml.safe_dump(config_to_dict(_config(search)), sort_keys=False), end="")
    return 0


COMMANDS = {
    "config": cmd_config,
    "search": cmd_search,
    "demo": cmd_demo,
    "tiles": cmd_tiles,
    "reps": cmd_reps,
    "eval": cmd_eval,
    "export": cmd_export,
    "predict": cmd_predict,
    "report": cmd_report,
    "worker": cmd_worker,
}


def cmd_deploy(args: argparse.Namespace) -> int:
    from autoseg.deploy import deploy, summary_lines

    result = deploy(args.run, _config(args).device, int8=args.deploy_int8, images=args.deploy_images,
                    out=args.deploy_out, remote_dir=args.remote_dir, mode=args.deploy_mode,
                    overlap=args.deploy_overlap, overlay=args.overlay)
    for line in summary_lines(result):
        print(line)
    return 0


COMMANDS["deploy"] = cmd_deploy


def main(argv: list[str] | None = None) -> int:
    if sys.stdout.errors == "strict":  # a name that is not UTF-8, printed after the work is done, must not fail
        sys.stdout.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["config", "show"]:  # argparse's REMAINDER does not take flags right after a subcommand
        args = argparse.Namespace(command="config", config_command="show", flags=argv[2:], top_quiet=False,
                                  top_verbose=False)
    else:
        args = parser.parse_args(argv)
    quiet = getattr(args, "quiet", False) or args.top_quiet
    verbose = getattr(args, "verbose", False) or args.top_verbose
    if quiet and verbose:
        parser.error("-q/--quiet and -v/--verbose cannot go together; give one of them")
    setup_logging(quiet=quiet, verbose=verbose)
    handler = cmd_device_check if args.command == "device" else COMMANDS[args.command]
    try:
        return handler(args)
    except AutosegError as e:
        print(f"autoseg: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        # Disk full or permissions while writing: say where, without a traceback.
        if e.errno is not None and e.filename is not None:
            print(f"autoseg: error: {e.filename}: {os_reason(e)}; {os_hint(e)}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("autoseg: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
