"""The shipped net's training on crops of all training images: sampling, validation, stopping, resume, memory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from autoseg.config import load_config
from autoseg.data import scan_dataset
from autoseg.demo_data import generate_demo
from autoseg.errors import InputError
from autoseg.final_train import (
    CropPlanner,
    CropStream,
    ImageCache,
    check_cache_memory,
    final_settings,
    image_class_pixels,
    split_validation,
    train_final,
)
from autoseg.metrics import IGNORE
from autoseg.train import training_settings
from autoseg.unet import Arch, build_unet

ARCH = Arch((3, 3), (4, 8))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, Path]:
    return generate_demo(tmp_path_factory.mktemp("demo"), n_images=8, size=48, seed=3)


def _setup(demo, **over):
    cfg = load_config(None, {"data.images": str(demo[0]), "data.masks": str(demo[1]), "train.final_tiles": 128,
                             "train.batch_size": 8, **over})
    ds = scan_dataset(demo[0], demo[1], cfg.data)
    fit, val = split_validation(np.arange(len(ds.pairs)), cfg.train.val_fraction, 0)
    fs = final_settings(cfg.train, training_settings(cfg.train, 0, None, 0), 16, 8, 0)
    return cfg, ds, fit, val, fs


def test_validation_is_split_by_image_and_refuses_to_leave_nothing_to_train_on():
    fit, val = split_validation(np.arange(10, 30), 0.1, 0)
    assert len(val) == 2 and len(fit) == 18 and not set(fit) & set(val)
    assert set(fit) | set(val) == set(range(10, 30))
    again = split_validation(np.arange(10, 30), 0.1, 0)
    assert np.array_equal(again[1], val)  # the same seed, the same split
    fit, val = split_validation(np.arange(2), 0.1, 0)
    assert len(fit) == 1 and len(val) == 1
    assert len(split_validation(np.arange(1), 0.0, 0)[1]) == 0  # no validation asked: fine with one image
    with pytest.raises(InputError, match=r"^train\.val_fraction: 1 training image\(s\) leave none .* set "
                                         r"train\.val_fraction: 0"):
        split_validation(np.arange(1), 0.1, 0)


def test_crop_plans_depend_only_on_seed_and_sample_number_and_favour_rare_classes():
    pixels = np.array([[1000, 0, 0], [900, 100, 0], [990, 0, 10]])  # class 2: 10 pixels in image 2 only
    planner = CropPlanner(pixels, seed=5, rare_share=0.5, scale_jitter=1.25, colour_jitter=0.1)
    plans = [planner.plan(k) for k in range(2000)]
    assert plans[1234] == CropPlanner(pixels, 5, 0.5, 1.25, 0.1).plan(1234)  # no hidden state
    rare = [p for p in plans if p.cls == 2]
    assert all(p.image == 2 for p in rare)  # a class-centred crop comes from an image holding that class
    share_by_area = 10 / pixels.sum()
    assert len(rare) / len(plans) > 100 * share_by_area  # seen far more often than its pixel share
    assert all(0.8 - 1e-9 <= p.scale <= 1.25 + 1e-9 and 0 <= p.turn < 8 for p in plans)
    none = CropPlanner(pixels, 5, 0.0, 1.0, 0.0)
    assert all(none.plan(k).cls == -1 and none.plan(k).scale == 1.0 for k in range(50))


def test_class_centred_crops_hold_their_class(demo, tmp_path):
    _, ds, fit, _, fs = _setup(demo, **{"train.rare_share": 1.0})
    pixels = image_class_pixels(ds, fit, tmp_path)
    assert pixels.shape == (len(fit), ds.class_map.num_classes)
    assert np.array_equal(image_class_pixels(ds, fit, tmp_path), pixels)  # from the cache the second time
    assert len(list(tmp_path.glob("class-pixels-*.npy"))) == 1
    planner = CropPlanner(pixels, 0, 1.0, 1.0, 0.0)
    stream = CropStream(ds, fit, planner, fs, 0, 64)
    for j in range(64):
        x, y = stream[j]
        assert x.shape == (ds.channels, 16, 16) and x.dtype == torch.float32 and y.shape == (16, 16)
        cls = planner.plan(j).cls
        # The crop is turned and flipped after it is cut, so the class pixel is still inside it.
        assert (y == cls).any(), (j, cls)
        assert set(torch.unique(y).tolist()) <= set(range(ds.class_map.num_classes)) | {IGNORE}
    x2, y2 = CropStream(ds, fit, planner, fs, 10, 64)[3]  # sample 13 from any starting point
    assert torch.equal(x2, stream[13][0]) and torch.equal(y2, stream[13][1])


def test_image_cache_stays_within_its_bytes(demo):
    _, ds, *_ = _setup(demo)
    one = 48 * 48 * (ds.channels + 2)
    cache = ImageCache(ds, max_mb=2.5 * one / 2**20)
    for i in range(len(ds.pairs)):
        cache.get(i)
        assert cache.used <= cache.max_bytes
    assert len(cache.items) == 2 and list(cache.items) == [len(ds.pairs) - 2, len(ds.pairs) - 1]


def test_training_validates_keeps_the_best_and_stops_early(demo):
    _, ds, fit, val, fs = _setup(demo, **{"train.eval_every": 16, "train.patience": 2})
    pixels = image_class_pixels(ds, fit, None)
    scores = iter([0.5, 0.7, 0.6, 0.65, 0.9, 0.95])
    seen = []

    def validate(model):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(scores)

    torch.manual_seed(0)
    r = train_final(build_unet(ARCH, ds.channels, ds.class_map.num_classes), ds, fit, val, pixels, fs,
                    validate=validate)
    assert r.stopped == "early_stop" and len(r.curve) == 4  # 0.7 at the 2nd, then two worse ones
    assert r.best_step == 4 and r.best_val_miou == 0.7 and r.tile_passes == 64
    assert all(torch.equal(r.model.state_dict()[k], seen[1][k]) for k in seen[1])  # the weights that scored 0.7
    assert [p["step"] for p in r.curve] == [2, 4, 6, 8]
    assert all(np.isfinite(p["train_loss"]) for p in r.curve)


def test_real_validation_scores_whole_images_and_the_budget_ends_training(demo):
    _, ds, fit, val, fs = _setup(demo, **{"train.patience": 0})
    torch.manual_seed(0)
    r = train_final(build_unet(ARCH, ds.channels, ds.class_map.num_classes), ds, fit, val,
                    image_class_pixels(ds, fit, None), fs)
    assert r.stopped == "budget" and r.tile_passes == 128 and len(r.curve) == 8
    assert all(0.0 <= p["val_miou"] <= 1.0 for p in r.curve)
    assert r.best_val_miou == max(p["val_miou"] for p in r.curve)


def test_bad_budgets_and_caches_are_one_line(demo):
    with pytest.raises(InputError, match=r"^train\.eval_every: 1000 tiles is more than the whole final budget"):
        _setup(demo, **{"train.eval_every": 1000})
    cfg = load_config(None, {"train.cache_mb": 1e9})
    with pytest.raises(InputError, match=r"^train\.cache_mb: 1e\+09 MB x 2 loader process\(es\) is more than"):
        check_cache_memory(cfg.train, 2)
    check_cache_memory(load_config().train, 0)


CHILD = """
import sys, numpy as np, torch
from pathlib import Path
from autoseg.config import load_config
from autoseg.data import scan_dataset
from autoseg.final_train import *
from autoseg.train import training_settings
from autoseg.unet import Arch, build_unet
torch.set_num_threads(1)
import logging; logging.basicConfig(level=logging.INFO)
images, masks, state, out, workers = sys.argv[1:6]
cfg = load_config(None, {"train.final_tiles": 2400, "train.batch_size": 8, "train.eval_every": 80,
                         "train.patience": 0, "train.threads": 1})
ds = scan_dataset(Path(images), Path(masks), cfg.data)
fit, val = split_validation(np.arange(len(ds.pairs)), 0.1, 0)
fs = final_settings(cfg.train, training_settings(cfg.train, 0, None, 0), 16, 8, int(workers))
key = final_key("a", 16, fs, ds, fit, val)
torch.manual_seed(0)
r = train_final(build_unet(Arch((3, 3), (4, 8)), ds.channels, ds.class_map.num_classes), ds, fit, val,
                image_class_pixels(ds, fit, None), fs, Path(state), key)
torch.save(r.model.state_dict(), out)
print(r.stopped, r.tile_passes)
"""


def _child(demo, state: Path, out: Path, workers: int = 0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(demo[0]), str(demo[1]), str(state), str(out),
                             str(workers)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_9_mid_training_then_the_rerun_gives_the_same_net(demo, tmp_path):
    whole = _child(demo, tmp_path / "whole.pt", tmp_path / "whole.weights", workers=1)  # a loader process too
    out, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err
    assert out.split() == ["budget", "2400"]

    state = tmp_path / "state.pt"
    proc = _child(demo, state, tmp_path / "never.weights")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and torch.load(state, weights_only=True)["step"] >= 20:
            break
        time.sleep(0.02)
    if proc.poll() is not None:
        pytest.fail(f"training ended before it could be killed: {proc.communicate()[1][-500:]}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(state, weights_only=True)["step"]
    assert 20 <= killed_at < 300

    again = _child(demo, state, tmp_path / "again.weights")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert f"goes on after {killed_at} of 300 steps" in err
    a, b = torch.load(tmp_path / "whole.weights"), torch.load(tmp_path / "again.weights")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit, loader process or not


def test_distillation_follows_the_teacher_and_refuses_a_teacher_of_other_classes(demo, tmp_path):
    from autoseg.checkpoint import save_checkpoint
    from autoseg.final_train import distill_loss, teacher_source

    logits = torch.randn(2, 3, 4, 4)
    target = torch.zeros(2, 4, 4, dtype=torch.int64)
    assert float(distill_loss(logits, logits, target)) == pytest.approx(0.0, abs=1e-6)
    assert float(distill_loss(logits, -logits, target)) > 0.1
    assert float(distill_loss(logits, -logits, torch.full_like(target, IGNORE))) == 0.0  # nothing labelled

    _, ds, fit, val, fs = _setup(demo, **{"train.teacher": "reference", "train.patience": 0})
    assert fs.distill_weight == 0.5
    teacher = build_unet(ARCH, ds.channels, ds.class_map.num_classes)
    path = tmp_path / "teacher.pt"
    save_checkpoint({"arch": ARCH.to_dict(), "state_dict": teacher.state_dict(), "in_channels": ds.channels,
                     "num_classes": ds.class_map.num_classes, "classes": list(ds.class_map.names)}, path)
    t = teacher_source(str(path), ds, ds.channels)
    assert t.model is not None and t.arch == ARCH and t.key.startswith("|teacher:")
    torch.manual_seed(0)
    plain = train_final(build_unet(ARCH, ds.channels, ds.class_map.num_classes), ds, fit, val,
                        image_class_pixels(ds, fit, None), fs)
    torch.manual_seed(0)
    taught = train_final(build_unet(ARCH, ds.channels, ds.class_map.num_classes), ds, fit, val,
                         image_class_pixels(ds, fit, None), fs, teacher=t.model)
    assert any(not torch.equal(plain.model.state_dict()[k], taught.model.state_dict()[k])
               for k in plain.model.state_dict())  # the soft labels changed what it learned

    save_checkpoint({"arch": ARCH.to_dict(), "state_dict": teacher.state_dict(), "in_channels": ds.channels,
                     "num_classes": 2, "classes": ["a", "b"]}, path)
    with pytest.raises(InputError, match=r"^train\.teacher: .* give a teacher trained on the same classes$"):
        teacher_source(str(path), ds, ds.channels)
    with pytest.raises(InputError, match=r"^train\.teacher: .* is not a file"):
        teacher_source(str(tmp_path / "nope.pt"), ds, ds.channels)


def test_a_search_ships_the_all_data_net_distilled_from_the_reference(demo, tmp_path):
    """End to end through the CLI: the teacher is trained once and kept, the student's card names it."""
    import json

    cfg = tmp_path / "c.yml"
    cfg.write_text(
        "search:\n  space:\n    levels: [1]\n    kernels: [3]\n    channels: [4]\n"
        "device:\n  warmup: 0\n  min_runs: 2\n  min_seconds: 0.0\n  max_busy_cores: null\n"
        "train:\n  teacher: reference\n  threads: 1\n"
        "eval:\n  num_examples: 0\n"
    )
    out = tmp_path / "run"
    args = [sys.executable, "-m", "autoseg", "search", "--config", str(cfg), "--images", str(demo[0]), "--masks",
            str(demo[1]), "--out", str(out), "--trials", "1", "--tile", "16", "--num-reps", "8", "--folds", "2",
            "--epochs", "1", "--final-tiles", "64"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "training the teacher (k3-3-3-3_c32-64-128-256_standard_transpose)" in first.stderr
    assert "distilled from the reference U-Net" in first.stderr
    card = json.loads((out / "best" / "model_card.json").read_text())
    t = card["training"]
    assert t["data"] == "all" and t["teacher"] == "the reference U-Net" and t["tile_passes"] == 64
    assert t["crop"] == 16 and t["images"] >= 1 and len(t["val_images"]) >= 1
    assert (out / "best" / "teacher.pt").exists() and not (out / "best" / "teacher_state.pt").exists()
    curve = json.loads((out / "best" / "training.json").read_text())["curve"]
    assert curve and all("val_miou" in p for p in curve)
    assert "trained:   64 crops of 16 px" in first.stdout
