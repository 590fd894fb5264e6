"""One function per `autoseg` command: load the config once, run, print what a person needs."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

from autoseg.cli.flags import build_parser, overrides_from
from autoseg.config import Config, load_config, load_run_config
from autoseg.errors import InputError
from autoseg.logs import progress_enabled

log = logging.getLogger("autoseg")


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
    from autoseg.search.space import trial_candidate

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
    net = trial_candidate(card)
    metrics = evaluate_model(
        cfg, run, run.best / "model.onnx", stage.test_ds, stage.test_ids, net.arch, net.tile, progress_enabled(),
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
