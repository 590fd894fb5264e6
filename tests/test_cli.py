"""The command line as a user meets it: exit codes, one-line errors, no tracebacks, whole runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx_models import conv_relu_onnx
from PIL import Image

from autoseg.demo_data import generate_demo

FAST = ["--tile", "32", "--num-reps", "16", "--folds", "2", "--epochs", "1", "--final-epochs", "1",
        "--final-tiles", "64", "-q"]


def autoseg(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "autoseg", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line]
    assert errors == [lines[-1]], proc.stderr  # one error line, last, after any progress logs
    for n in needles:
        assert n in errors[0], errors[0]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, Path]:
    return generate_demo(tmp_path_factory.mktemp("demo"), n_images=6, size=64, seed=1)


def small_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "small.yml"
    cfg.write_text(
        "search:\n  space:\n    levels: [1, 2]\n    kernels: [3]\n    channels: [4, 8]\n"
        "device:\n  warmup: 0\n  min_runs: 3\n  min_seconds: 0.0\n  max_busy_cores: null\n"
        "train:\n  threads: 1\n"
        "eval:\n  num_examples: 1\n"
    )
    return cfg


def search_args(tmp_path: Path, images: Path, masks: Path, out: Path, trials: int) -> list[object]:
    return ["search", "--config", small_config(tmp_path), "--images", images, "--masks", masks,
            "--trials", trials, "--out", out, *FAST]


def test_missing_folder(tmp_path):
    proc = autoseg("tiles", "--images", tmp_path / "nope", "--masks", tmp_path / "nope2")
    assert_one_line_error(proc, 2, "nope")


def test_bad_overlap_names_the_key(demo):
    images, masks = demo
    proc = autoseg("tiles", "--images", images, "--masks", masks, "--overlap", "1.5")
    assert_one_line_error(proc, 2, "tiles.overlap", "1.5")


def test_tile_larger_than_every_image(demo, tmp_path):
    images, masks = demo
    proc = autoseg("reps", "--images", images, "--masks", masks, "--tile", "512", "--out", tmp_path / "r")
    assert_one_line_error(proc, 2, "512")
    assert not (tmp_path / "r" / "reps" / "manifest.csv").exists()


def test_unwritable_run_directory(demo, tmp_path):
    images, masks = demo
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = autoseg("reps", "--images", images, "--masks", masks, "--out", blocker / "run")
    assert_one_line_error(proc, 2, str(blocker / "run"), "--out")


def test_bad_config_file(tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text("tiles:\n  overlap: 1.5\n")
    proc = autoseg("search", "--config", cfg)
    assert_one_line_error(proc, 2, "tiles.overlap: must be in [0.0, 1.0), got 1.5")


def test_tiles_counts(demo):
    images, masks = demo
    proc = autoseg("tiles", "--images", images, "--masks", masks, "--tile", "32", "--overlap", "0")
    assert proc.returncode == 0, proc.stderr
    # 6 images, 1 held out by the default split, 4 tiles of 32 in each 64x64 image.
    assert "20 tiles" in proc.stdout


def test_reps_writes_manifest_and_contact_sheet(demo, tmp_path):
    images, masks = demo
    out = tmp_path / "r"
    proc = autoseg(
        "reps", "--images", images, "--masks", masks, "--tile", "32", "--num-reps", "8", "--out", out, "--contact-sheet"
    )
    assert proc.returncode == 0, proc.stderr
    rows = (out / "reps" / "manifest.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 8
    assert (out / "reps" / "contact_sheet.png").stat().st_size > 0


def test_search_end_to_end_then_eval_export_report(demo, tmp_path):
    images, masks = demo
    out = tmp_path / "run"
    proc = autoseg(*search_args(tmp_path, images, masks, out, trials=2), "--precision", "int8", "--measure-size", "64")
    assert proc.returncode == 0, proc.stderr
    assert "best architecture:" in proc.stdout and "test mIoU" in proc.stdout and "int8:" in proc.stdout
    for rel in (
        "config.yml",
        "data.json",
        "study.db",
        "latency_cache.db",
        "reps/manifest.csv",
        "best/model.onnx",
        "best/model_card.json",
        "best/model.int8.onnx",
        "eval/metrics.json",
        "eval/metrics.int8.json",
        "report.html",
        "report.md",
        "report.json",
    ):
        assert (out / rel).exists(), rel
    # eval.num_examples 1: one image | truth | prediction strip, from the float model's evaluation only
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    first = metrics["per_image"][0]["stem"]
    assert [p.name for p in (out / "eval" / "examples").iterdir()] == [f"{first}.png"]
    strip = Image.open(out / "eval" / "examples" / f"{first}.png").size
    assert strip[0] == 3 * 64 + 8 and strip[1] > 64  # panels captioned above, the classes' legend below
    assert json.loads((out / "data.json").read_text())["cv_epochs"] == {"32": 1}  # --epochs 1
    card = json.loads((out / "best" / "model_card.json").read_text())
    for key in (
        "arch",
        "params",
        "macs",
        "latency_ms",
        "latency_source",
        "cv_score",
        "test_miou",
        "test_dice",
        "test_per_class",
        "onnx",
    ):
        assert key in card, key
    assert card["latency_source"] == "local"
    assert card["onnx"]["parity_max_abs_diff"] <= 1e-4
    assert card["trials"]["distinct"] == 2 and f"searched:  2 distinct nets ({card['trials']['completed']} trained" \
        in proc.stdout
    # --precision int8: candidates were timed quantized, and the int8 model is exported too
    assert card["precision"] == "int8"
    timed = onnx.load(str(out / "trials" / str(card["trial"]) / "model.onnx"))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in timed.graph.node}
    q = card["int8"]  # quantized, tested and timed beside the float model
    assert q["test_miou"] is not None and q["latency_ms"] > 0 and q["fp32_latency_ms"] > 0
    assert q["latency_source"] == "local" and 0.5 < q["argmax_agreement"] <= 1.0
    # --measure-size: timed at the deployment size, not at the 32 px tile
    assert card["measure_size"] == q["measure_size"] == 64 and "ms median in int8 at 64x64 px" in proc.stdout
    assert "int8 test mIoU" in (out / "report.md").read_text()

    assert autoseg("eval", out, "-q").returncode == 0
    # Evaluated on other images, the examples show those images only.
    first_image = sorted(images.iterdir())[0]
    for src, sub in ((first_image, "other_img"), (masks / first_image.name, "other_msk")):
        (tmp_path / sub).mkdir()
        shutil.copy(src, tmp_path / sub / f"other{src.suffix}")
    own = {p.name: p.read_bytes() for p in (out / "eval").rglob("*") if p.is_file()}
    proc = autoseg("eval", out, "--test-images", tmp_path / "other_img", "--test-masks", tmp_path / "other_msk", "-q")
    assert proc.returncode == 0, proc.stderr
    # Other images go to a folder of their own: the run's held-out results and examples stay as they were.
    assert {p.name: p.read_bytes() for p in (out / "eval").glob("*") if p.is_file()} == {
        k: v for k, v in own.items() if (out / "eval" / k).is_file()}
    assert "other.png" not in {p.name for p in (out / "eval" / "examples").iterdir()}
    (other,) = (out / "eval" / "other").iterdir()
    assert other.name.startswith("other_img-") and str(other / "metrics.json") in proc.stdout
    assert [p.name for p in (other / "examples").iterdir()] == ["other.png"]
    assert autoseg("report", out).returncode == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["other_evals"][0]["n_images"] == 1 and rep["other_evals"][0]["folder"] == f"eval/other/{other.name}"
    assert "## Evaluations on other images" in (out / "report.md").read_text()
    assert rep["eval"]["mean"] == json.loads((out / "eval" / "metrics.json").read_text())["mean"]
    exported = tmp_path / "again.onnx"
    proc = autoseg("export", out, "--to", exported)
    assert proc.returncode == 0, proc.stderr
    assert exported.stat().st_size > 0
    said = (proc.stdout + proc.stderr).splitlines()
    assert [line for line in said if str(exported) in line] == said[-1:]  # its result, said once

    # Any trial's net can be shipped: the other of the two, trained like the chosen one, into trials/N/.
    other = 1 - card["trial"]
    proc = autoseg("export", out, "--trial", other, "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out / "trials" / str(other) / "model.onnx")
    shipped = json.loads((out / "trials" / str(other) / "model_card.json").read_text())
    assert shipped["trial"] == other and shipped["training"]["data"] == "all" and shipped["test_miou"] is not None
    assert (out / "trials" / str(other) / "eval" / "metrics.json").exists()
    again = autoseg("eval", out, "--trial", other, "-v")  # done already: kept, only said
    assert again.returncode == 0 and "was retrained already" in again.stderr, again.stderr
    assert f"trial {other}: test mIoU {shipped['test_miou']:.3f}" in again.stdout
    assert_one_line_error(autoseg("export", out, "--trial", 99), 2, "--trial 99: no such trial")
    assert autoseg("report", out).returncode == 0
    assert f"autoseg export {out} --trial " in (out / "report.md").read_text()  # the front's nets, ready to ship
    (out / "report.html").unlink()
    assert autoseg("report", out).returncode == 0
    assert (out / "report.html").exists()

    # New images, no masks: one mask per image, in the training masks' encoding (class ids here).
    pred = tmp_path / "pred"
    proc = autoseg("predict", exported, "--images", images, "--out", pred, "--overlay", "-q")
    assert proc.returncode == 0, proc.stderr
    assert f"6 mask(s) in {pred} (gray levels as the training masks held them)" in proc.stdout  # class_map kept
    raw = set()
    for img in sorted(images.iterdir()):
        m = np.asarray(Image.open(pred / f"{img.stem}.png"))
        assert m.shape == np.asarray(Image.open(img)).shape[:2]
        assert set(np.unique(m).tolist()) <= set(range(len(card["classes"])))
        assert (pred / f"{img.stem}_overlay.jpg").exists()
        raw |= set(np.unique(np.asarray(Image.open(masks / img.name))).tolist())
    assert raw <= set(range(len(card["classes"])))  # the demo masks hold class ids, so must the predictions
    assert autoseg("predict", out, "--int8", "--images", images, "--out", tmp_path / "pred8", "-q").returncode == 0
    assert len(list((tmp_path / "pred8").glob("*.png"))) == 6


def test_second_stage_trains_the_top_nets_on_all_data_and_ships_the_best_on_validation(demo, tmp_path):
    images, masks = demo
    out = tmp_path / "run"
    # --max-minutes: the second stage runs within the search's limit, which leaves it all 48 crops here
    args = [*search_args(tmp_path, images, masks, out, trials=3), "--pruner", "none", "--refine-top", "2",
            "--refine-tiles", "48", "--max-minutes", "20"]
    proc = autoseg(*args)
    assert proc.returncode == 0, proc.stderr
    card = json.loads((out / "best" / "model_card.json").read_text())
    second = card["second_stage"]
    assert second["tiles"] == 48 and second["chosen"] == card["trial"] and len(second["nets"]) == 2
    assert [n["search_rank"] for n in second["nets"]] == [1, 2]
    won = max(second["nets"], key=lambda n: n["value"])
    assert won["trial"] == card["trial"] and all(n["tile_passes"] >= 48 for n in second["nets"])  # whole batches
    for n in second["nets"]:  # each kept where a rerun finds it; the training state is gone once done
        assert (out / "trials" / str(n["trial"]) / "refine" / "result.json").exists()
        assert not (out / "trials" / str(n["trial"]) / "refine" / "retrain_state.pt").exists()
    assert "chosen:    by the second stage, of the top 2 by CV" in proc.stdout
    assert "## Second stage: the top nets on all data" in (out / "report.md").read_text()
    assert "Second stage" in (out / "report.html").read_text()

    again = autoseg(*[a for a in args if a != "-q"], "-v")  # done: nothing is trained again
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("was done already") == 2 and "was retrained already" in again.stderr
    assert json.loads((out / "best" / "model_card.json").read_text())["second_stage"] == second


def test_failed_int8_export_keeps_the_float_model_and_its_card(demo, tmp_path):
    images, masks = demo
    out = tmp_path / "run"
    (out / "best" / "model.int8.onnx").mkdir(parents=True)  # a directory: the quantized file cannot land there
    proc = autoseg(*search_args(tmp_path, images, masks, out, trials=1), "--int8", "--alpha", "0")
    assert proc.returncode == 0, proc.stderr
    assert "alpha: 0.0" in (out / "config.yml").read_text()
    assert "int8:      not exported: quantization failed: IsADirectoryError" in proc.stdout
    assert "Traceback" not in proc.stderr
    card = json.loads((out / "best" / "model_card.json").read_text())
    assert card["test_miou"] is not None and card["onnx"]["parity_max_abs_diff"] <= 1e-4
    assert card["int8"]["error"].startswith("quantization failed: IsADirectoryError")
    assert "int8 not exported" in (out / "report.md").read_text()
    assert not list((out / "best").glob(".*.tmp"))  # the half-written quantized file is gone


def _finished(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute("SELECT COUNT(*) FROM trials WHERE state IN ('COMPLETE', 'PRUNED')").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_kill_9_then_rerun_resumes(demo, tmp_path):
    images, masks = demo
    out = tmp_path / "run"
    args = search_args(tmp_path, images, masks, out, trials=5)
    proc = subprocess.Popen(
        [sys.executable, "-m", "autoseg", *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    while _finished(out / "study.db") < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    if proc.poll() is not None:
        pytest.fail("the search ended before it could be killed")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with sqlite3.connect(out / "study.db") as con:
        before = dict(
            con.execute("SELECT number, datetime_complete FROM trials WHERE state IN ('COMPLETE', 'PRUNED')").fetchall()
        )
    assert len(before) >= 2

    again = autoseg(*args)
    assert again.returncode == 0, again.stderr
    with sqlite3.connect(out / "study.db") as con:
        after = dict(
            con.execute("SELECT number, datetime_complete FROM trials WHERE state IN ('COMPLETE', 'PRUNED')").fetchall()
        )
        repeats = con.execute("SELECT COUNT(*) FROM trial_user_attributes WHERE key = 'same_as_trial'").fetchone()[0]
    assert len(after) - repeats == 5  # --trials counts distinct nets
    for number, completed in before.items():
        assert after[number] == completed  # finished trials kept, not redone


def test_kill_9_in_the_final_retrain_then_rerun_goes_on_from_its_last_epoch(demo, tmp_path):
    import torch

    images, masks = demo
    out = tmp_path / "run"
    args = [*search_args(tmp_path, images, masks, out, trials=1)[:-1],  # without -q
            "--final-data", "reps", "--final-epochs", "150"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "autoseg", *map(str, args), "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    state = out / "best" / "retrain_state.pt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and torch.load(state, weights_only=False)["epochs_done"] >= 5:
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.fail("the search ended before it could be killed")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "best" / "model.pt").exists()
    killed_at = torch.load(state, weights_only=False)["epochs_done"]

    again = autoseg(*args, "-v")  # the trial stays done; the retrain goes on where it stopped
    assert again.returncode == 0, again.stderr
    said = [line for line in again.stderr.splitlines() if "retraining trial" in line]
    assert len(said) == 1 and "for 150 epochs, going on after epoch" in said[0], said
    assert int(said[0].rsplit(" ", 1)[1]) >= killed_at
    assert "no latency budget: every candidate is trained" in again.stderr  # the hint of a run without one
    assert (out / "best" / "model.pt").exists() and not state.exists()

    mtime = (out / "best" / "model.pt").stat().st_mtime_ns
    third = autoseg(*args, "-v")  # finished: kept, not trained again
    assert third.returncode == 0, third.stderr
    assert "was retrained already" in third.stderr and "retraining trial" not in third.stderr
    assert (out / "best" / "model.pt").stat().st_mtime_ns == mtime


def test_predict_refuses_what_it_cannot_use(demo, tmp_path):
    images, _ = demo
    plain = tmp_path / "plain.onnx"
    plain.write_bytes(conv_relu_onnx())
    assert_one_line_error(autoseg("predict", plain, "--images", images, "--out", tmp_path / "o"), 2,
                          "metadata lacks classes, mean, std, tile", "pass a model exported by autoseg")
    assert_one_line_error(autoseg("predict", tmp_path, "--images", images, "--out", tmp_path / "o"), 2,
                          "best/model.onnx: not found")
    assert_one_line_error(autoseg("predict", plain, "--images", tmp_path / "nope", "--out", tmp_path / "o"), 2,
                          "images folder does not exist; check the --images path")


def test_mismatched_image_and_mask_sizes(tmp_path):
    (tmp_path / "i").mkdir()
    (tmp_path / "m").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "i" / "a.png")
    Image.fromarray(np.zeros((16, 32), np.uint8)).save(tmp_path / "m" / "a.png")
    proc = autoseg("tiles", "--images", tmp_path / "i", "--masks", tmp_path / "m")
    assert_one_line_error(proc, 2, "a.png")


def test_disk_full_run_directory(demo, tmp_path):
    images, masks = demo
    out = tmp_path / "run"
    out.mkdir()
    # The kernel's own ENOSPC: the run directory's write probe lands on /dev/full.
    (out / ".write-probe").symlink_to("/dev/full")
    proc = autoseg("reps", "--images", images, "--masks", masks, "--out", out)
    assert_one_line_error(proc, 2, str(out), "disk full")


@pytest.mark.ssh
def test_a_device_lost_mid_search_is_one_line_exit_3_without_optunas_traceback(demo, fresh_sshd_server, agent_root,
                                                                                 tmp_path):
    images, masks = demo
    out = tmp_path / "run"
    known = fresh_sshd_server.write_known_hosts(tmp_path / "known_hosts")
    args = [*search_args(tmp_path, images, masks, out, trials=8), "--device", fresh_sshd_server.target,
            "--device-python", sys.executable, "--known-hosts", known, "--identity-file", fresh_sshd_server.user_key]
    cfg = tmp_path / "small.yml"  # give up on the lost device soon
    cfg.write_text(cfg.read_text().replace("device:\n", "device:\n  connect_timeout_s: 2\n  reconnect_attempts: 1\n"))
    env = {**os.environ, "AUTOSEG_AGENT_ROOT": str(agent_root)}
    proc = subprocess.Popen([sys.executable, "-m", "autoseg", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 240
    while _finished(out / "study.db") < 1 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    fresh_sshd_server.stop()  # the device is switched off while the search runs
    stdout, stderr = proc.communicate(timeout=240)
    assert_one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), 3)
    assert "because of the following error" not in stderr and "Trial" not in stderr


def test_optunas_trial_failed_traceback_is_dropped_for_our_errors_and_kept_for_bugs(capsys):
    import logging

    import optuna

    from autoseg.errors import DeviceUnreachable
    from autoseg.logs import setup_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging()
        for exc, bug in ((DeviceUnreachable("pi@edge: device unreachable"), False), (ZeroDivisionError("a bug"), True)):
            def objective(trial, exc=exc):
                raise exc

            with pytest.raises(type(exc)):
                optuna.create_study().optimize(objective, n_trials=1)
            err = capsys.readouterr().err
            assert ("because of the following error" in err) is bug and ("failed with value" in err) is bug
            assert ("Traceback" in err) is bug, err
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        optuna.logging.disable_propagation()
        optuna.logging.enable_default_handler()


def test_quiet_and_verbose_go_before_or_after_the_command(demo):
    images, masks = demo
    data = ["--images", images, "--masks", masks, "--tile", "32"]
    quiet = autoseg("-q", "tiles", *data)
    assert quiet.returncode == 0 and quiet.stderr == "" and "tiles" in quiet.stdout, quiet.stderr
    verbose = autoseg("--verbose", "tiles", *data)
    assert verbose.returncode == 0 and " INFO autoseg.data: " in verbose.stderr, verbose.stderr  # -v's format
    # Only autoseg's own debug lines: PIL alone logged ~4 per PNG read (about 120 for 30 images).
    assert not [line for line in verbose.stderr.splitlines() if " PIL." in line or " matplotlib" in line]
    both = autoseg("-q", "tiles", *data, "-v")
    assert both.returncode == 2 and "-q/--quiet and -v/--verbose" in both.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def exportable_run(tmp_path_factory) -> Path:
    """A run directory as a finished search leaves it for `autoseg export`: its config and best/model.pt."""
    import torch

    from autoseg.checkpoint import save_checkpoint
    from autoseg.unet import Arch, build_unet

    run = tmp_path_factory.mktemp("exportable") / "run"
    (run / "best").mkdir(parents=True)
    (run / "config.yml").write_text("seed: 0\n")
    arch = Arch((3, 3), (4, 8))
    torch.manual_seed(0)
    save_checkpoint({"arch": arch.to_dict(), "in_channels": 3, "num_classes": 2, "tile": 32, "mean": [0.5] * 3,
                     "std": [0.25] * 3, "classes": ["bg", "fg"], "state_dict": build_unet(arch, 3, 2).state_dict()},
                    run / "best" / "model.pt")
    return run


def _copy_run(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst)
    return dst


@pytest.mark.parametrize("kind", ["empty", "corrupt", "keyless"])
def test_export_of_a_damaged_checkpoint_is_one_line_exit_2(exportable_run, tmp_path, kind):
    import torch

    run = _copy_run(exportable_run, tmp_path / "run")
    pt = run / "best" / "model.pt"
    if kind == "empty":
        pt.write_bytes(b"")
    elif kind == "corrupt":
        pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])  # torn, as a full disk leaves it
    else:
        torch.save({"state_dict": {}}, pt)
    proc = autoseg("export", run)
    assert_one_line_error(proc, 2, str(pt), "rerun `autoseg search`")
    assert not (run / "best" / "model.onnx").exists()


def test_export_to_a_directory_or_an_unwritable_place_is_one_line_exit_2(exportable_run, tmp_path):
    run = _copy_run(exportable_run, tmp_path / "run")
    target = tmp_path / "E07dir"
    target.mkdir()
    proc = autoseg("export", run, "--to", target)
    assert_one_line_error(proc, 2, f"{target}: is a directory", "--to")
    assert ".tmp" not in proc.stderr and "free space" not in proc.stderr
    assert list(target.iterdir()) == [] and not list(tmp_path.glob(".*.tmp"))
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = autoseg("export", run, "--to", blocker / "model.onnx")
    assert_one_line_error(proc, 2, str(blocker), "not a directory")
    assert "free space" not in proc.stderr
    proc = autoseg("export", run, "--to", tmp_path / "ok.onnx")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ok.onnx").stat().st_size > 0


def test_eval_of_a_model_whose_external_data_lies_outside_its_folder_is_one_line_exit_2(demo, tmp_path):
    from onnx import external_data_helper, numpy_helper

    from autoseg.unet import Arch

    images, masks = demo
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    (run / "config.yml").write_text(f"data:\n  images: {images}\n  masks: {masks}\n")
    (run / "best" / "model_card.json").write_text(json.dumps({"arch_dict": Arch((3,), (8,)).to_dict(), "tile": 32}))
    model = onnx.load_from_string(conv_relu_onnx())
    w = model.graph.initializer[0]
    (run / "w.bin").write_bytes(numpy_helper.to_array(w).tobytes())  # beside best/, not in it
    external_data_helper.set_external_data(w, location="../w.bin")
    w.ClearField("raw_data")
    w.ClearField("float_data")
    w.data_location = onnx.TensorProto.EXTERNAL
    (run / "best" / "model.onnx").write_bytes(model.SerializeToString())
    proc = autoseg("eval", run)
    assert_one_line_error(proc, 2, str(run / "best" / "model.onnx"), "onnxruntime cannot load it",
                          "escapes model directory", f"autoseg export {run}")


def test_config_show_prints_what_a_search_would_run_with_and_check_validates_a_file(tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text("tiles: {size: 96}\ntrain: {final_tiles: 5000}\n")
    shown = autoseg("config", "show", "--config", cfg, "--trials", "7", "--tile", "128")
    assert shown.returncode == 0, shown.stderr
    resolved = yaml.safe_load(shown.stdout)
    assert resolved["tiles"]["size"] == 128  # the flag wins over the file
    assert resolved["train"]["final_tiles"] == 5000 and resolved["search"]["trials"] == 7
    assert resolved["train"]["final_data"] == "all" and resolved["train"]["folds"] == 3  # defaults included
    assert (resolved["search"]["refine_top"], resolved["search"]["refine_tiles"]) == (4, 1250)  # as settled
    quiet = autoseg("-q", "config", "show", "--config", cfg, "--trials", "7", "--tile", "128")  # -q first too
    assert quiet.returncode == 0 and yaml.safe_load(quiet.stdout) == resolved, quiet.stderr
    assert autoseg("config", "check", cfg).stdout.strip() == f"{cfg}: ok"
    cfg.write_text("tiles: {size: 1}\n")
    for proc in (autoseg("config", "check", cfg), autoseg("config", "show", "--config", cfg)):
        assert_one_line_error(proc, 2, "tiles.size: must be >= 8, got 1")
    assert autoseg("config", "show", "--no-such-flag").returncode == 2
