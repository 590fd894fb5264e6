"""report.py on real run directories: a real Optuna SQLite study, real JSON files, real PNGs. Budget < 20 s."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml
from PIL import Image

from autoseg.errors import InputError
from autoseg.pareto import pareto_front
from autoseg.report import _latency_provenance, fit_loglog, write_report

optuna.logging.set_verbosity(optuna.logging.WARNING)

CLASSES = ["background", "road", "tree"]
FP = {"machine": "aarch64", "arch": "64bit", "cpu_model": "Cortex-A76", "cores": 4, "ram_mb": 8000,
      "os": "Linux-6.6", "python": "3.11.2", "numpy": "1.26", "onnxruntime": "1.17.0",
      "providers": ["CPUExecutionProvider"], "governor": "performance", "cpu_freq_mhz": 2400,
      "temperature_c": 51.0, "throttled": False}
# number, arch, tile, params, macs, latency ms, cv mean — trial 2 is slow for its MACs (separable).
NETS = [
    ("k3-3_c8-16_standard_transpose", 64, 12_000, 20e6, 2.0, 0.55),
    ("k3-3-3_c8-16-32_standard_transpose", 64, 45_000, 40e6, 4.0, 0.66),
    ("k5-5-5_c16-32-64_separable_bilinear", 64, 30_000, 30e6, 12.0, 0.64),
    ("k3-3-3_c16-32-64_standard_transpose", 64, 180_000, 160e6, 15.0, 0.72),
    ("k5-5-5-5_c16-32-64-64_standard_bilinear", 64, 400_000, 400e6, 40.0, 0.70),
]
BEST = 3  # trial number the fake pipeline picked


def _latency(ms: float, source: str, device: str) -> dict:
    stats = {"min_ms": ms * 0.95, "median_ms": ms, "mean_ms": ms * 1.01, "p90_ms": ms * 1.1,
             "p99_ms": ms * 1.2, "std_ms": ms * 0.03, "count": 30}
    return {"error": 0, "message": "", "stats": stats, "source": source, "device": device,
            "fingerprint": FP, "fingerprint_id": "ab12cd34ef56ab12", "temp_before_c": 50.0,
            "temp_after_c": 52.0, "throttled": False, "cached": False}


def _attrs(arch: str, tile: int, params: int, macs: float, ms: float, cv: float | None,
           source: str = "device", device: str = "pi@edge:22") -> dict:
    a = {"arch": arch, "arch_dict": {"key": arch}, "tile": tile, "params": params, "macs": int(macs),
         "latency": _latency(ms, source, device), "latency_ms": ms, "latency_source": source,
         "device": device, "fingerprint_id": "ab12cd34ef56ab12", "measure_size": tile}
    if cv is not None:
        a.update(fold_scores=[cv - 0.01, cv, cv + 0.01], cv_mean=cv, cv_std=0.01)
    return a


def _png_bytes(colour: tuple[int, int, int]) -> bytes:
    img = Image.new("RGB", (48, 24), colour)
    img.paste((255, 255, 255), (24, 0, 48, 24))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def add_complete(study: optuna.Study, attrs: dict) -> None:
    cv, ms = attrs["cv_mean"], attrs["latency_ms"]
    if len(study.directions) == 1:
        trial = optuna.trial.create_trial(value=cv - 0.05 * math.log10(ms / 10), user_attrs=attrs)
    else:
        trial = optuna.trial.create_trial(values=[cv, ms], user_attrs=attrs)
    study.add_trial(trial)


def make_run(root: Path, objective: str = "penalty", final: bool = True, mixed: bool = False,
             latency: dict[int, dict] | None = None, card_extra: dict | None = None,
             search: dict | None = None) -> Path:
    """A run directory as the pipeline leaves it. `latency` overrides trial N's latency record, `card_extra`
    adds to the model card, `search` to config.yml's search section."""
    root.mkdir(parents=True, exist_ok=True)
    cfg = {"out": str(root), "seed": 0, "search": {"objective": objective, "latency_budget_ms": 50.0, **(search or {})},
           "device": {"target": "pi@edge"}}
    (root / "config.yml").write_text(yaml.safe_dump(cfg))
    # Dataset.summary() plus what the pipeline adds (split stems, tile and rep counts per tile size)
    data = {"num_images": 10, "size_min": [224, 224], "size_max": [224, 300], "channels": 3, "num_classes": 3,
            "classes": CLASSES, "class_map_kind": "palette",
            "class_map": {"kind": "palette", "names": CLASSES, "values": None, "colors": None,
                          "ignore_index": None},
            "class_pixels": [700_000, 250_000, 50_000], "class_fractions": [0.7, 0.25, 0.05],
            "ignored_pixels": 0, "mean": [0.4, 0.4, 0.4], "std": [0.2, 0.2, 0.2],
            "train_images": [f"img{i}" for i in range(8)], "test_images": ["img8", "img9"],
            "test_source": "split", "tiles": {"64": 500}, "reps": {"64": 40}, "cv_epochs": {"64": 38}}
    (root / "data.json").write_text(json.dumps(data))

    directions = ["maximize"] if objective == "penalty" else ["maximize", "minimize"]
    study = optuna.create_study(storage=f"sqlite:///{root / 'study.db'}", study_name="autoseg",
                                directions=directions)
    study.set_user_attr("objective", objective)
    study.set_user_attr("device", "pi@edge:22")
    study.set_user_attr("source", "device")
    for i, (arch, tile, params, macs, ms, cv) in enumerate(NETS):
        source = "local" if mixed and i == 1 else "device"
        device = "local" if source == "local" else "pi@edge:22"
        attrs = _attrs(arch, tile, params, macs, ms, cv, source, device)
        attrs["latency"].update((latency or {}).get(i, {}))
        if source == "local":
            attrs["fingerprint_id"] = attrs["latency"]["fingerprint_id"] = "0123456789abcdef"
            attrs["latency"]["fingerprint"] = {**FP, "machine": "x86_64", "cpu_model": "Xeon"}
        add_complete(study, attrs)
    pruned = _attrs("k7-7-7_c64-64-64_standard_transpose", 64, 900_000, 2e9, 300.0, None)
    pruned["pruned_reason"] = "latency_budget"
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, user_attrs=pruned))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs={"tile": 64}))
    add_complete(study, {**_attrs(*NETS[0]), "same_as_trial": 0})  # a repeat: a table row, not a 2nd front point
    running = study.ask()  # left open: the search is still going
    running.set_user_attr("arch", "k3-3_c8-8_standard_bilinear")
    running.set_user_attr("tile", 64)

    if final:
        arch, tile, params, macs, ms, cv = NETS[BEST]
        card = {"arch": arch, "arch_dict": {"key": arch}, "params": params, "macs": int(macs),
                "latency_ms": ms, "latency_source": "device", "device": "pi@edge:22", "fingerprint": FP,
                "cv_score": cv, "cv_std": 0.01, "test_miou": 0.61, "test_dice": 0.7, "test_pixel_acc": 0.9,
                "test_per_class": {"background": 0.9, "road": 0.62, "tree": None}, "classes": CLASSES,
                "tile": tile, "mean": [0.4] * 3, "std": [0.2] * 3,
                "onnx": {"path": "best/model.onnx", "size_bytes": 734_512, "opset": 17,
                         "parity_max_abs_diff": 3.2e-6, "nodes_before": 80, "nodes_after": 52, "simplified": True},
                "autoseg_version": "0.1.0"}
        curve = [{"step": s, "tile_passes": 32 * s, "train_loss": 1.5 - 0.1 * i, "val_miou": v, "seconds": s / 10}
                 for i, (s, v) in enumerate([(100, 0.41), (200, 0.55), (300, 0.58), (400, 0.57)])]
        training = {"data": "all", "images": 7, "val_images": ["img3"], "crop": 64, "batch_size": 32,
                    "tile_passes": 12_800, "budget_tiles": 200_000, "best_step": 300, "best_val_miou": 0.58,
                    "stopped": "early_stop", "seconds": 95.0, "teacher": None}
        card["training"] = training
        card.update(card_extra or {})
        (root / "best").mkdir()
        (root / "best" / "model_card.json").write_text(json.dumps(card))
        (root / "best" / "training.json").write_text(json.dumps({**training, "curve": curve}))
        (root / "eval" / "examples").mkdir(parents=True)
        per_class = [0.91, 0.6, None]
        metrics = {"per_image": [{"stem": "img8", "miou": 0.6}, {"stem": "img9", "miou": 0.62}],
                   "per_class": {n: {"iou": v} for n, v in zip(CLASSES, per_class, strict=True)},
                   "mean": {"miou": 0.755, "macro_dice": 0.8, "pixel_acc": 0.9, "per_class_iou": per_class,
                            "per_class_dice": [0.95, 0.75, None]}}
        (root / "eval" / "metrics.json").write_text(json.dumps(metrics))
        (root / "eval" / "examples" / "img8.png").write_bytes(_png_bytes((200, 30, 30)))
        (root / "eval" / "examples" / "img9.png").write_bytes(_png_bytes((30, 30, 200)))
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Build each kind of run once and hand out copies: creating the SQLite study is the slow part."""
    built: dict[tuple[str, bool], Path] = {}

    def get(dst: Path, objective: str = "penalty", final: bool = True, mixed: bool = False) -> Path:
        key = (objective, mixed)
        if key not in built:
            built[key] = make_run(tmp_path_factory.mktemp("template") / "run", objective, mixed=mixed)
        # Without best/ and eval/ it is a run whose search is still going (trial 7 is RUNNING).
        shutil.copytree(built[key], dst, ignore=None if final else shutil.ignore_patterns("best", "eval"))
        return dst

    return get


def _embedded_pngs(page: str) -> list[Image.Image]:
    images = []
    for b64 in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page):
        img = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
        img.load()
        assert img.format == "PNG"
        images.append(img)
    return images


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# ---------------------------------------------------------------- pure functions


def test_pareto_front_hand_examples():
    # (score maximised, latency minimised)
    assert pareto_front([]) == []
    assert pareto_front([(0.5, 10.0)]) == [0]
    assert pareto_front([(0.5, 10), (0.6, 20), (0.4, 30), (0.6, 15)]) == [0, 3]
    # a strictly better net dominates everything
    assert pareto_front([(0.5, 10), (0.9, 1), (0.6, 5)]) == [1]
    # exact duplicates are both kept; equal latency with lower score is dominated
    assert pareto_front([(0.5, 10), (0.5, 10), (0.4, 10)]) == [0, 1]
    # a staircase: all on the front, ordered by latency
    assert pareto_front([(0.9, 30), (0.5, 1), (0.7, 10)]) == [1, 2, 0]
    # non-finite points are never on the front and never dominate
    assert pareto_front([(float("nan"), 1.0), (0.5, 10), (0.99, float("inf"))]) == [1]


def test_fit_loglog_recovers_a_power_law():
    macs = [1e6, 1e7, 1e8, 1e9]
    fit = fit_loglog(macs, [2e-6 * m**0.8 for m in macs])
    assert fit is not None
    assert fit["slope"] == pytest.approx(0.8)
    assert fit["r2"] == pytest.approx(1.0)
    assert fit_loglog([1e6, 1e6, 1e6], [1.0, 2.0, 3.0]) is None  # one MAC count: nothing to fit


# ---------------------------------------------------------------- reports


def test_report_on_run_in_progress(tmp_path, runs):
    run = runs(tmp_path / "run", final=False)
    before = _sha(run / "study.db")
    rep = write_report(run)
    assert _sha(run / "study.db") == before, "the report must never write to the study"
    assert rep["in_progress"] is True
    assert rep["status"] == ["search running (1 trial in progress)", "final net not built yet",
                             "test evaluation not done yet"]
    states = {r["number"]: r["state"] for r in rep["trials"]}
    assert states[len(NETS) + 1] == "FAIL"
    assert states[len(NETS) + 2] == "COMPLETE" and states[len(NETS) + 3] == "RUNNING"
    assert rep["chosen"]["provisional"] is True
    assert rep["chosen"]["trial"] == 3  # best penalty value among completed trials
    assert rep["per_class_iou"] is None and rep["export"] is None and rep["examples"] == []
    md = (run / "report.md").read_text()
    page = (run / "report.html").read_text()
    assert "model_card.json: not available yet" in md
    assert "not available yet" in page
    assert len(_embedded_pngs(page)) == 2  # Pareto + latency-vs-MACs, nothing from the final net
    assert json.loads((run / "report.json").read_text()) == rep
    assert not list(run.glob(".*.tmp"))


def test_a_median_pruned_trial_shows_its_running_cv_as_a_note_not_as_an_objective(tmp_path, runs):
    run = runs(tmp_path / "run")
    study = optuna.load_study(storage=f"sqlite:///{run / 'study.db'}", study_name="autoseg")
    trial = study.ask()
    for k, v in {**_attrs("k3-3_c4-4_standard_transpose", 64, 900, 1e6, 1.0, None), "pruned_reason": "median"}.items():
        trial.set_user_attr(k, v)
    trial.report(0.81, 0)  # above every completed trial's objective, as a first fold can be
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    assert study.trials[-1].value == pytest.approx(0.81)  # what Optuna keeps: the last report

    rep = write_report(run)
    row = next(r for r in rep["trials"] if r["number"] == trial.number)
    assert row["values"] is None and row["pruned_reason"] == "median after fold 1 (running CV 0.810)"
    line = next(x for x in (run / "report.md").read_text().splitlines() if "k3-3_c4-4_standard_transpose" in x)
    assert line.endswith("| – | median after fold 1 (running CV 0.810) |")  # objective cell: none


def test_a_study_where_every_trial_was_pruned_says_how_to_go_on(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="autoseg",
                                direction="maximize")
    for arch, tile, params, macs, ms, _ in NETS[:2]:
        trial = study.ask()
        for k, v in {**_attrs(arch, tile, params, macs, ms, None), "pruned_reason": "latency_budget"}.items():
            trial.set_user_attr(k, v)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    rep = write_report(tmp_path)
    assert rep["status"][0].startswith("no trial completed yet, so there is no net to retrain: rerun the search")
    assert rep["status"][0] in (tmp_path / "report.md").read_text()


def test_a_trial_a_resumed_search_ran_again_says_so(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="autoseg",
                                direction="maximize")
    killed = study.ask()
    killed.set_user_attr("arch", NETS[0][0])
    study.tell(killed, state=optuna.trial.TrialState.FAIL)  # as open_study marks a trial a kill left RUNNING
    study.add_trial(optuna.trial.create_trial(value=NETS[0][-1], user_attrs={**_attrs(*NETS[0]), "redo_of": 0}))
    rep = write_report(tmp_path)
    assert rep["trials"][0]["pruned_reason"] == "interrupted; run again as #1"
    assert "interrupted; run again as #1" in (tmp_path / "report.md").read_text()


def test_report_on_empty_and_missing_run_dir(tmp_path):
    rep = write_report(tmp_path)
    assert rep["trials"] == [] and rep["study"] is None and rep["chosen"] is None
    assert any(m.startswith("study.db") for m in rep["missing"])
    assert not (tmp_path / "study.db").exists(), "must not create a study"
    assert "Pareto front: not available yet" in (tmp_path / "report.md").read_text()
    with pytest.raises(InputError, match="not a run directory"):
        write_report(tmp_path / "nope")


@pytest.mark.parametrize("objective", ["penalty", "pareto"])
def test_full_report(tmp_path, runs, objective):
    run = runs(tmp_path / "run", objective=objective)
    rep = write_report(run)
    for key in ("autoseg_version", "generated_at", "run_dir", "in_progress", "warnings", "missing", "config",
                "data", "study", "latency", "trials", "pareto_front", "chosen", "macs_fit", "per_class_iou",
                "examples", "export", "model_card", "eval", "plots"):
        assert key in rep, key
    assert rep["study"]["objective"] == objective
    assert len(rep["study"]["directions"]) == (1 if objective == "penalty" else 2)
    assert rep["warnings"] == []
    assert rep["latency"]["axis_label"] == "latency at 64x64 px on pi@edge:22 (device), ms"
    assert "pi@edge:22 (device)" in rep["plots"]["pareto"]["source"]

    # chosen = the model card's net, found among the trials
    assert rep["chosen"]["trial"] == BEST and rep["chosen"]["provisional"] is False
    # front over completed trials: (0.55,2) (0.66,4) (0.72,15); 12 ms @ 0.64 and 40 ms @ 0.70 are dominated
    assert rep["pareto_front"] == [0, 1, 3]
    # the separable net is the one MACs mislead about
    assert rep["macs_fit"]["outliers"][0]["trial"] == 2 and rep["macs_fit"]["outliers"][0]["ratio"] > 1.25
    # the repeat of trial 0 is neither a second point of the fit nor a second measurement
    assert rep["macs_fit"]["n"] == len(NETS) + 1 and rep["latency"]["measured_trials"] == len(NETS) + 1
    rows = {r["number"]: r for r in rep["trials"]}
    assert rows[len(NETS)]["pruned_reason"] == "latency_budget"
    assert rows[len(NETS) + 1]["pruned_reason"] == "failed"
    assert rows[0]["latency_p90_ms"] == pytest.approx(2.2)
    assert rep["per_class_iou"]["items"] == [["background", 0.91], ["road", 0.6], ["tree", None]]
    assert rep["export"]["opset"] == 17
    assert rep["data"]["images"] == 10 and rep["data"]["test_images"] == 2 and rep["data"]["reps"] == 40
    assert rep["data"]["cv_epochs"] == 38
    assert [c["name"] for c in rep["data"]["classes"]] == CLASSES
    assert rep["examples"] == ["img8.png", "img9.png"]

    md = (run / "report.md").read_text()
    page = (run / "report.html").read_text()
    for heading in ("Pareto front", "Trials", "Latency vs MACs", "Final net on the test images",
                    "Training of the shipped net", "Export", "Device and latency source", "Data", "Run config"):
        assert f"## {heading}" in md and f"<h2>{heading}" in page, heading
    assert "<details><summary>config.yml</summary>" in page and "latency_budget_ms" in page
    assert "Cortex-A76" in page and "Cortex-A76" in md
    assert "latency_budget" in md and "running" in md
    assert "1 of them repeats of a net already tried" in md and "repeat of #0" in md
    assert "src=\"http" not in page and "<link" not in page and "<script" not in page  # self-contained
    images = _embedded_pngs(page)
    assert len(images) == 6  # Pareto, MACs, per-class IoU, training curve, two examples
    assert "crops of 64 px from 7 training images" in md and "12,800 (200,000)" in page and "early stop" in md
    assert "best mIoU 0.580 at step 300" in page
    assert rep["training"]["curve"][2]["val_miou"] == 0.58 and rep["plots"]["training"]["available"]
    assert all(img.width > 20 and img.height > 20 for img in images)
    assert json.loads((run / "report.json").read_text())["pareto_front"] == rep["pareto_front"]


def test_mixed_latency_sources_are_flagged(tmp_path, runs):
    run = runs(tmp_path / "run", mixed=True)
    rep = write_report(run)
    assert rep["latency"]["mixed"] is True
    assert rep["latency"]["sources"] == ["device", "local"]
    assert any("MIXED" in w for w in rep["warnings"])
    assert any("different devices" in w for w in rep["warnings"])
    assert "MIXED" in rep["latency"]["axis_label"]
    page = (run / "report.html").read_text()
    assert 'class="warn"' in page and "MIXED" in page
    assert "WARNING" in (run / "report.md").read_text()
    assert "latency source" in page  # the trials table grows a source column
    assert "Xeon" in page  # both fingerprints are shown side by side


def test_int8_timing_is_in_the_latency_label_and_mixed_precision_is_flagged():
    def rows(*precisions):
        return [{"latency_ms": 2.0, "latency_source": "local", "device": "local", "fingerprint_id": None,
                 "measure_size": 64, "precision": p, "throttled": None, "cached": False, "same_as_trial": None}
                for p in precisions]

    trials = [SimpleNamespace(user_attrs={})] * 2
    lat = _latency_provenance(rows("int8", "int8"), trials, None, None)
    assert lat["axis_label"] == "int8 latency at 64x64 px on this host (local), ms" and not lat["warnings"]
    assert _latency_provenance(rows("fp32", "fp32"), trials, None, None)["axis_label"].startswith("latency at")
    mixed = _latency_provenance(rows("int8", "fp32"), trials, None, None)
    assert any("int8 and some in float32" in w for w in mixed["warnings"])


def test_a_run_that_names_files_whose_names_are_not_utf8_is_reported(tmp_path, runs):
    # A run from before autoseg.data refused such names: its search finished, and its report must be written too.
    odd = os.fsdecode(b"caf\xe9")  # Latin-1 "café": Python reads the byte that is not UTF-8 as a lone surrogate
    run = runs(tmp_path / os.fsdecode(b"run\xff"))
    cfg = yaml.safe_load((run / "config.yml").read_text())
    cfg["data"] = {"images": str(tmp_path / odd / "images"), "masks": str(tmp_path / odd / "masks")}
    (run / "config.yml").write_text(yaml.safe_dump(cfg))  # as the pipeline writes it: YAML escapes the name
    data = json.loads((run / "data.json").read_text())
    data["test_images"] = [f"{odd}8", "img9"]
    (run / "data.json").write_text(json.dumps(data))  # JSON escapes it too
    (run / "eval" / "examples" / "img8.png").rename(run / "eval" / "examples" / f"{odd}8.png")

    rep = write_report(run)
    assert rep["run_dir"] == str(run.resolve()) and rep["examples"] == [f"{odd}8.png", "img9.png"]
    assert rep["study"] is not None and len(rep["trials"]) == len(NETS) + 4
    assert json.loads((run / "report.json").read_text(encoding="utf-8")) == rep  # the name read back as it was
    md = (run / "report.md").read_text(encoding="utf-8")
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "# autoseg report — run\\xff" in md and "caf\\xe98.png" in page

    # PYTHONIOENCODING=utf-8 makes stdout strict, as a UTF-8 locale other than C.UTF-8 does.
    proc = subprocess.run([sys.executable, "-m", "autoseg", "report", run], capture_output=True, text=True,
                          errors="surrogateescape", timeout=120, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.strip() == str(run / "report.html").replace("\udcff", "\\udcff")


@pytest.mark.parametrize("kind", ["empty", "random bytes", "a directory", "another database"])
def test_a_study_db_that_is_no_optuna_study_is_one_line_exit_2(tmp_path, runs, kind):
    run = runs(tmp_path / "run")
    db = run / "study.db"
    db.unlink()
    if kind == "empty":
        db.write_bytes(b"")
    elif kind == "random bytes":
        db.write_bytes(bytes(range(256)) * 16)
    elif kind == "a directory":
        db.mkdir()
    else:
        with sqlite3.connect(db) as con:
            con.execute("CREATE TABLE notes (x TEXT)")
    with pytest.raises(InputError, match=r"study\.db: not an Optuna study"):
        write_report(run)
    proc = subprocess.run([sys.executable, "-m", "autoseg", "report", run], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "not an Optuna study" in proc.stderr and "study.db" in proc.stderr
    assert not (run / "report.html").exists()


@pytest.mark.slow
def test_report_html_renders_in_headless_chromium(tmp_path, runs):
    chromium = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if chromium is None:
        pytest.skip("chromium is not installed")
    run = runs(tmp_path / "run")
    write_report(run)
    shot = tmp_path / "shot.png"
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2000",
         (run / "report.html").resolve().as_uri()],
        check=True, capture_output=True, timeout=120)
    assert shot.is_file()
    img = Image.open(shot).convert("RGB")
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, "screenshot looks blank"


def test_latencies_from_an_emulated_device_are_labelled_so_everywhere(tmp_path):
    from autoseg.report import _trial_row

    fp = {**FP, "emulated": True, "emulator": "qemu-aarch64-static", "kernel_arch": "x86_64"}
    attrs = _attrs(*NETS[0])
    attrs["latency"] = {**attrs["latency"], "fingerprint": fp, "emulated": True}
    trial = optuna.trial.create_trial(value=0.5, user_attrs=attrs)
    rows = [_trial_row(trial)]
    lat = _latency_provenance(rows, [trial], None, None)
    assert rows[0]["emulated"] is True and lat["emulated"] is True
    assert "EMULATED" in lat["axis_label"] and any("EMULATED device (qemu-aarch64-static on a x86_64 kernel)" in w
                                                   for w in lat["warnings"])
    plain = _trial_row(optuna.trial.create_trial(value=0.5, user_attrs=_attrs(*NETS[0])))
    assert _latency_provenance([plain], [optuna.trial.create_trial(value=0.5, user_attrs=_attrs(*NETS[0]))],
                               None, None)["emulated"] is False
