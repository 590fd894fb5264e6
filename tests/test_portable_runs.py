"""Runs are portable folders: a run copied or moved elsewhere is evaluated, reported, exported and used
from any working directory; data that moved is given again and checked against the run's data digest."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import onnx
import pytest
import yaml

from autoseg.demo_data import generate_demo

FAST = ["--tile", "32", "--num-reps", "16", "--folds", "2", "--epochs", "1", "--final-epochs", "1",
        "--final-tiles", "64", "-q"]
SMALL = ("search:\n  space:\n    levels: [1, 2]\n    kernels: [3]\n    channels: [4, 8]\n"
         "device:\n  warmup: 0\n  min_runs: 3\n  min_seconds: 0.0\n  max_busy_cores: null\n"
         "train:\n  threads: 1\n"
         "eval:\n  num_examples: 1\n")


def autoseg(*args: object, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    # PYTHONPATH: the checkout's autoseg, whatever the working directory.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "autoseg", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def one_line_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line]
    assert errors == [lines[-1]] and errors[0].startswith("autoseg: error: "), proc.stderr  # one, after any logs
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run made as `make demo` makes one: started in `start/`, data inside the run folder, every
    path given relative to `start/`."""
    start = tmp_path_factory.mktemp("start")
    run = start / "runs" / "demo"
    generate_demo(run / "data", n_images=6, size=64, seed=1)
    (start / "small.yml").write_text(SMALL)
    proc = autoseg("search", "--config", "small.yml", "--images", "runs/demo/data/images", "--masks",
                   "runs/demo/data/masks", "--trials", 2, "--out", "runs/demo", *FAST, cwd=start)
    assert proc.returncode == 0, proc.stderr
    return run


def _copy(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst, symlinks=True)  # cp -a
    return dst


def test_config_yml_holds_absolute_paths_and_data_json_the_digest(started):
    saved = yaml.safe_load((started / "config.yml").read_text())
    for key in ("images", "masks"):
        assert Path(saved["data"][key]).is_absolute()
        assert Path(saved["data"][key]) == (started / "data" / key).resolve()
    assert Path(saved["out"]).is_absolute()
    data = json.loads((started / "data.json").read_text())
    assert re.fullmatch(r"[0-9a-f]{64}", data["digest"])


def test_a_copied_run_works_from_any_working_directory(started, tmp_path):
    # The steps: cp -a runs/demo /elsewhere && cd /elsewhere && autoseg eval demo
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = _copy(started, elsewhere / "demo")
    proc = autoseg("eval", "demo", "-q", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    own = json.loads((started / "eval" / "metrics.json").read_text())
    again = json.loads((run / "eval" / "metrics.json").read_text())
    assert again["mean"] == own["mean"] and [i["stem"] for i in again["per_image"]] == \
        [i["stem"] for i in own["per_image"]]  # the same held-out images, the same numbers
    # report, export and predict too, from yet another directory
    other = tmp_path / "other"
    other.mkdir()
    assert autoseg("report", run, cwd=other).returncode == 0
    assert (run / "report.html").exists()
    proc = autoseg("export", run, "--to", "again.onnx", "-q", cwd=other)
    assert proc.returncode == 0, proc.stderr
    assert (other / "again.onnx").stat().st_size > 0
    proc = autoseg("predict", run, "--images", run / "data" / "images", "--out", "pred", "-q", cwd=other)
    assert proc.returncode == 0, proc.stderr
    assert len(list((other / "pred").glob("*.png"))) == 6


@contextlib.contextmanager
def _original_gone(started: Path) -> Iterator[None]:
    """As if the folder the run was made in were gone: config.yml's absolute data paths name nothing."""
    away = started.parent / "away"
    started.rename(away)
    try:
        yield
    finally:
        away.rename(started)


def test_a_moved_run_with_its_data_inside_works_once_the_original_is_gone(started, tmp_path):
    run = _copy(started, tmp_path / "moved")
    with _original_gone(started):
        proc = autoseg("eval", run, "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_an_old_run_with_relative_paths_finds_the_data_inside_it(started, tmp_path):
    run = _copy(started, tmp_path / "old")
    cfg = yaml.safe_load((run / "config.yml").read_text())
    cfg["out"] = "runs/demo"  # as runs made before paths were resolved hold them
    cfg["data"]["images"], cfg["data"]["masks"] = "runs/demo/data/images", "runs/demo/data/masks"
    (run / "config.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = autoseg("eval", run, "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_data_that_moved_is_given_again_and_checked_against_the_digest(started, tmp_path):
    run = _copy(started, tmp_path / "run")
    shutil.move(run / "data", tmp_path / "data")  # the data moved out of the run, not with it
    with _original_gone(started):
        _data_moved(run, tmp_path)


def _data_moved(run: Path, tmp_path: Path) -> None:
    proc = autoseg("eval", run, cwd=tmp_path)
    one_line_error(proc, 2, "data.images", "--images", "--masks")
    proc = autoseg("eval", run, "--images", tmp_path / "data" / "images", "--masks", tmp_path / "data" / "masks",
                   "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # other data under the same names: one line naming the folders and what to do
    wrong = tmp_path / "wrong"
    generate_demo(wrong, n_images=6, size=64, seed=2)
    proc = autoseg("eval", run, "--images", wrong / "images", "--masks", wrong / "masks", cwd=tmp_path)
    line = one_line_error(proc, 2, str(wrong / "images"), str(wrong / "masks"), "digest", "--test-images")
    assert str(run) in line
    proc = autoseg("export", run, "--trial", 0, "--images", wrong / "images", "--masks", wrong / "masks",
                   cwd=tmp_path)
    one_line_error(proc, 2, str(wrong / "images"), "digest")


def test_trial_onnx_files_carry_the_final_models_metadata(started):
    card = json.loads((started / "best" / "model_card.json").read_text())
    final = {p.key: p.value for p in onnx.load(str(started / "best" / "model.onnx")).metadata_props}
    trials = sorted((started / "trials").glob("*/model.onnx"))
    assert trials
    for path in trials:
        meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        assert set(meta) == set(final), path
        for key in ("classes", "mean", "std", "class_map", "in_channels", "num_classes", "opset"):
            assert meta[key] == final[key], key
        assert meta["trained"] == "false"  # timed during the search: seeded weights, not a net to use
    assert final["trained"] == "true"
    chosen = {p.key: p.value for p in onnx.load(str(started / "trials" / str(card["trial"]) / "model.onnx"))
              .metadata_props}
    assert chosen["arch"] == final["arch"] and chosen["tile"] == final["tile"]
    assert chosen["input_multiple"] == final["input_multiple"]


def test_a_study_made_before_paths_were_resolved_resumes_from_where_it_started(tmp_path, monkeypatch):
    from autoseg.config import load_config
    from autoseg.rundir import RunDir
    from autoseg.search import open_study

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, {"data.images": "data/images", "data.masks": "data/masks", "out": "run"})
    run = RunDir(cfg.out).prepare()
    study = open_study(run, cfg)
    saved = dict(study.user_attrs["config"])
    assert saved["data.images"] == str(tmp_path.resolve() / "data" / "images")
    saved["data.images"], saved["data.masks"] = "data/images", "data/masks"  # as older runs saved them
    study.set_user_attr("config", saved)
    open_study(run, cfg)  # the same data: no "made with a different config"


def test_predict_takes_its_eval_settings_from_config_and_flags_win(started, tmp_path):
    images = started / "data" / "images"
    (tmp_path / "window.yml").write_text("eval:\n  mode: window\n  window_overlap: 0.75\n")
    runs = {
        "config": ["--config", "window.yml"],
        "flags": ["--eval-mode", "window", "--overlap", "0.75"],
        "config_then_flag": ["--config", "window.yml", "--eval-mode", "whole"],
        "whole": ["--eval-mode", "whole"],
    }
    said = {}
    for name, extra in runs.items():
        proc = autoseg("predict", started, "--images", images, "--out", name, *extra, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert len(list((tmp_path / name).glob("*.png"))) == 6
        said[name] = proc.stdout.split("; ")[1]
    assert said == {"config": "mode window, overlap 0.75", "flags": "mode window, overlap 0.75",
                    "config_then_flag": "mode whole", "whole": "mode whole"}
    (tmp_path / "bad.yml").write_text("eval:\n  mode: sideways\n")
    one_line_error(autoseg("predict", started, "--images", images, "--out", "x", "--config", "bad.yml", cwd=tmp_path),
                   2, "eval.mode", "sideways")


def test_json_written_by_the_run_and_the_cli_has_snake_case_keys(started, tmp_path):
    """Keys a program reads are snake_case; prose is for report.md/html. Dicts keyed by data (tile sizes,
    class names) are data, not keys."""
    data_keyed = {"tiles", "reps", "cv_epochs", "class_share", "per_class"}

    def keys(obj: object, parent: str = "") -> set[str]:
        if isinstance(obj, dict):
            found = set() if parent in data_keyed else set(obj)
            return found.union(*(keys(v, k) for k, v in obj.items()))
        if isinstance(obj, list):
            return set().union(*(keys(v, parent) for v in obj))
        return set()

    files = [p for p in started.rglob("*.json")
             if p.name != "report.json" and "data" not in p.relative_to(started).parts]  # data/: the demo's own
    assert {"data.json", "model_card.json", "training.json", "metrics.json"} <= {p.name for p in files}
    (tmp_path / "quick.yml").write_text("device:\n  warmup: 0\n  min_runs: 3\n  min_seconds: 0.0\n"
                                        "  max_busy_cores: null\n")
    check = autoseg("device", "check", "--config", "quick.yml", "-q", cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    found = keys(json.loads(check.stdout)).union(*(keys(json.loads(p.read_text())) for p in files))
    assert found and not [k for k in found if not re.fullmatch(r"[a-z][a-z0-9_]*", k)]


def test_a_runs_own_test_folders_that_moved_update_its_own_results(started, tmp_path):
    from autoseg.config import DataConfig
    from autoseg.data import dataset_digest, scan_dataset

    run = _copy(started, tmp_path / "run")
    test = tmp_path / "test"
    for sub in ("images", "masks"):
        (test / sub).mkdir(parents=True)
        for p in sorted((run / "data" / sub).iterdir())[:2]:
            shutil.copy(p, test / sub / p.name)
    shutil.copy(run / "data" / "classes.json", test / "classes.json")
    # As a search given --test-images/--test-masks leaves its config.yml and data.json
    cfg = yaml.safe_load((run / "config.yml").read_text())
    cfg["data"]["test_images"], cfg["data"]["test_masks"] = str(test / "images"), str(test / "masks")
    (run / "config.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    data = json.loads((run / "data.json").read_text())
    data["test_digest"] = dataset_digest(scan_dataset(test / "images", test / "masks", DataConfig()))
    (run / "data.json").write_text(json.dumps(data))
    shutil.move(test, tmp_path / "moved")
    new = tmp_path / "moved"
    one_line_error(autoseg("eval", run, cwd=tmp_path), 2, "data.test_images", "--test-images DIR --test-masks DIR")
    proc = autoseg("eval", run, "--test-images", new / "images", "--test-masks", new / "masks", "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert str(run / "eval" / "metrics.json") in proc.stdout and not (run / "eval" / "other").exists()
    assert len(json.loads((run / "eval" / "metrics.json").read_text())["per_image"]) == 2
