"""The `autoseg` command line's flags: the parser, and which config key each flag sets."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from autoseg import __version__
from autoseg.config import FINAL_TILE_PASSES, FOLD_TILE_PASSES

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
    "refine_top": "search.refine_top",
    "refine_tiles": "search.refine_tiles",
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
    p.add_argument("--max-minutes", type=float, help="end the search this many minutes after the start, a running "
                   "trial at its next epoch and the second stage included, then train the best so far (its own "
                   "budget: --final-tiles, --final-minutes)")
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
    p.add_argument("--refine-top", type=int, help="second stage: train the top N nets by the search's score "
                   "briefly on all training images and ship the best on the validation images (default 4; 0: off)")
    p.add_argument("--refine-tiles", type=int, help="crops each net of the second stage trains on (default: a "
                   "quarter of --final-tiles)")
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
