"""A run folder is untrusted input: checkpoints load as data only, never as code."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autoseg.checkpoint import load_if_key, read_checkpoint, save_checkpoint
from autoseg.errors import InputError


class _Payload:
    """Unpickling this runs a shell command that touches `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _malicious(path: Path, marker: Path) -> Path:
    with open(path, "wb") as f:
        pickle.dump({"retrain_key": "k", "arch": _Payload(marker)}, f)
    return path


def test_round_trip_of_a_training_state(tmp_path: Path) -> None:
    m = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(m.parameters())
    state = {"model": m.state_dict(), "optimizer": opt.state_dict(), "generator": torch.Generator().get_state(),
             "retrain_key": "k", "config": {"tiles": {"size": 64}, "classes": ["a", "b"]}}
    save_checkpoint(state, tmp_path / "s.pt")
    back = load_if_key(tmp_path / "s.pt", "k")
    assert back is not None and back["config"] == state["config"]
    assert torch.equal(back["model"]["weight"], m.weight.detach())
    assert load_if_key(tmp_path / "s.pt", "other") is None


def test_a_pickle_with_code_is_refused_and_its_payload_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = _malicious(tmp_path / "model.pt", marker)
    with pytest.raises(InputError, match=r"model\.pt: cannot be read as a plain checkpoint"):
        read_checkpoint(path)
    assert load_if_key(path, "k") is None  # a resume state: ignored with a warning
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"\x00garbage", None])
def test_damaged_or_foreign_files_give_one_line(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "model.pt"
    if content is None:
        save_checkpoint([1, 2, 3], path)  # type: ignore[arg-type]  # data, but not a checkpoint dict
    else:
        path.write_bytes(content)
    with pytest.raises(InputError) as e:
        read_checkpoint(path)
    assert "\n" not in str(e.value) and "model.pt" in str(e.value)


def _run_dir_with(tmp_path: Path, marker: Path) -> Path:
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    (run / "config.yml").write_text("seed: 0\n")
    (run / "study.db").write_bytes(b"")
    _malicious(run / "best" / "model.pt", marker)
    return run


def test_export_of_a_malicious_run_folder_runs_no_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    run = _run_dir_with(tmp_path, marker)
    r = subprocess.run([sys.executable, "-m", "autoseg", "export", str(run), "--to", str(tmp_path / "m.onnx")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "model.pt" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not marker.exists()


def test_a_search_rerun_over_a_malicious_resume_state_runs_no_code(tmp_path: Path) -> None:
    """The rerun of `autoseg search --out RUN` reads best/retrain_state.pt to go on: a planted pickle is ignored."""
    from autoseg.demo_data import generate_demo

    images, masks = generate_demo(tmp_path / "demo", n_images=6, size=48, seed=2)
    cfg = tmp_path / "c.yml"
    cfg.write_text("search:\n  space:\n    levels: [1]\n    kernels: [3]\n    channels: [4]\n"
                   "device:\n  warmup: 0\n  min_runs: 2\n  min_seconds: 0.0\n  max_busy_cores: null\n"
                   "eval:\n  num_examples: 0\n")
    out = tmp_path / "run"
    args = [sys.executable, "-m", "autoseg", "search", "--config", str(cfg), "--images", str(images), "--masks",
            str(masks), "--out", str(out), "--trials", "1", "--tile", "16", "--num-reps", "8", "--folds", "2",
            "--epochs", "1", "--final-tiles", "64"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    marker = tmp_path / "pwned"
    (out / "best" / "model.pt").unlink()  # so the rerun trains again, and looks for a state to go on from
    _malicious(out / "best" / "retrain_state.pt", marker)
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "retrain_state.pt: cannot be read as a plain checkpoint" in again.stderr  # the warning, then work
    assert not marker.exists() and (out / "best" / "model.pt").exists()
