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
