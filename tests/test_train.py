import io
import logging
import time

import numpy as np
import pytest
import torch

from autoseg.metrics import IGNORE, metrics_from_confusion
from autoseg.train import (
    TrainSettings,
    activation_bytes,
    auto_batch_size,
    batch_size_for,
    cross_validate,
    fold_epochs,
    make_folds,
    predict_confusion,
    seg_loss,
    train_model,
)
from autoseg.unet import Arch, build_unet

TINY = Arch((3, 3), (8, 16))


def settings(**kw) -> TrainSettings:
    base = dict(
        epochs=2,
        lr=1e-2,
        weight_decay=1e-4,
        batch_size=8,
        dice_weight=1.0,
        class_weights=None,
        augment=True,
        seed=0,
        threads=1,
    )
    return TrainSettings(**(base | kw))


def bright_dark(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy images where class 1 = bright rectangles, class 0 = dark background."""
    rng = np.random.default_rng(seed)
    y = np.zeros((n, size, size), np.int64)
    for i in range(n):
        for _ in range(2):
            y0, x0 = rng.integers(0, size - 4, 2)
            h, w = rng.integers(4, size // 2, 2)
            y[i, y0 : y0 + h, x0 : x0 + w] = 1
    x = (np.where(y == 1, 1.0, -1.0) + rng.normal(0, 0.3, y.shape)).astype(np.float32)[:, None]
    return x, y


# ---------------------------------------------------------------- folds


def test_folds_keep_images_apart():
    groups = np.repeat(np.arange(10), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    folds = make_folds(groups, 3, seed=0)
    assert len(folds) == 3
    seen_val = []
    for tr, va in folds:
        assert len(va) > 0 and len(tr) > 0
        assert not set(groups[tr]) & set(groups[va])
        assert sorted(np.concatenate([tr, va]).tolist()) == list(range(len(groups)))
        seen_val.append(va)
    assert sorted(np.concatenate(seen_val).tolist()) == list(range(len(groups)))
    sizes = [len(va) for _, va in folds]
    assert max(sizes) - min(sizes) <= 1  # balanced by tile count (GroupKFold: largest image to the lightest fold)


def test_folds_are_fixed_by_the_seed_and_move_with_it():
    # Images of equal tile count, as real representatives have many of: the seed orders them.
    groups = np.repeat(np.arange(12), [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4])
    folds = make_folds(groups, 3, seed=0)
    again = make_folds(groups, 3, seed=0)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again, strict=True))
    others = [make_folds(groups, 3, seed=s) for s in range(1, 6)]
    assert any(not np.array_equal(o[0][1], folds[0][1]) for o in others)
    for tr, va in folds + [f for o in others for f in o]:
        assert not set(groups[tr]) & set(groups[va])
    assert all(max(len(va) for _, va in o) - min(len(va) for _, va in o) <= 1 for o in [folds, *others])


def test_folds_fall_back_to_tiles(caplog):
    groups = np.array([0] * 5 + [1] * 4)
    with caplog.at_level(logging.WARNING, logger="autoseg.train"):
        folds = make_folds(groups, 3, seed=1)
    assert "only 2 source images for 3 folds" in caplog.text
    assert all(len(va) > 0 for _, va in folds)
    assert sorted(np.concatenate([va for _, va in folds]).tolist()) == list(range(9))


def test_folds_reject_impossible():
    with pytest.raises(ValueError, match="at least 2 folds"):
        make_folds(np.arange(5), 1, seed=0)
    with pytest.raises(ValueError, match="cannot make 3 folds from 2 tiles"):
        make_folds(np.arange(2), 3, seed=0)


# ---------------------------------------------------------------- batch size


def test_batch_size_rules():
    assert batch_size_for(1e3, 1e6) == 2  # nothing fits: the floor
    assert batch_size_for(1e15, 1e6) == 64  # everything fits: the ceiling
    assert batch_size_for(48e6, 1e6) == 32  # rounded down to a power of two
    assert batch_size_for(1e15, 1e6, n_samples=133) == 16  # several steps per epoch
    assert batch_size_for(1e15, 1e6, n_samples=4) == 2
    small = activation_bytes(TINY, 3, 2, 64)
    assert activation_bytes(TINY, 3, 2, 128) > small
    assert activation_bytes(Arch((3, 3), (32, 64)), 3, 2, 64) > small
    assert activation_bytes(Arch((3, 3), (8, 16), conv="separable"), 3, 2, 64) > small


def test_auto_batch_size_is_cheap_and_valid():
    t = time.perf_counter()
    values = [auto_batch_size(Arch((3,) * 6, (64,) * 6), 3, 10, 512) for _ in range(20)]
    assert (time.perf_counter() - t) / 20 < 0.01
    for b in [*values, auto_batch_size(TINY, 3, 2, 64), auto_batch_size(TINY, 3, 2, 64, n_samples=40)]:
        assert 2 <= b <= 64 and b & (b - 1) == 0


def test_fold_epochs_give_each_fold_about_three_thousand_tiles():
    assert fold_epochs(120, 3) == 38  # 80 tiles a fold
    assert fold_epochs(200, 3) == 23  # 133
    assert fold_epochs(20, 2) == 300
    assert fold_epochs(100_000, 5) == 3  # never fewer than 3
    assert fold_epochs(1, 2) == 3000  # a fold of no tiles still gets a number


# ---------------------------------------------------------------- loss


def test_loss_ignores_ignore_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    target = torch.full((2, 8, 8), IGNORE, dtype=torch.int64)
    target[1, 3, 5] = 2
    w = torch.tensor([1.0, 2.0, 0.5])
    for dice_weight, weights in [(0.0, None), (1.0, None), (0.7, w)]:
        logits.grad = None
        loss = seg_loss(logits, target, dice_weight, weights)
        loss.backward()
        grad = logits.grad.clone()
        grad[1, :, 3, 5] = 0
        assert torch.count_nonzero(grad) == 0  # no gradient reaches ignored pixels
        assert logits.grad[1, :, 3, 5].abs().sum() > 0
        # Same loss as the lone labelled pixel on its own, and blind to logits elsewhere.
        alone = seg_loss(logits[1:2, :, 3:4, 5:6], target[1:2, 3:4, 5:6], dice_weight, weights)
        assert loss.item() == pytest.approx(alone.item(), rel=1e-6)
        shifted = logits.detach().clone()
        shifted[0] += 5.0
        assert seg_loss(shifted, target, dice_weight, weights).item() == pytest.approx(loss.item(), rel=1e-6)
    none = seg_loss(logits, torch.full((2, 8, 8), IGNORE), 1.0)
    assert none.item() == 0.0
    none.backward()  # still differentiable, no NaN


# ---------------------------------------------------------------- training


def test_training_is_deterministic():
    x, y = bright_dark(12, 16, seed=3)

    def run(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        model = build_unet(TINY, 1, 2)
        return train_model(model, x, y, 2, settings(seed=seed, batch_size=4)).state_dict()

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_an_interrupted_training_goes_on_to_the_same_net():
    x, y = bright_dark(12, 16, seed=3)
    s = settings(epochs=5, batch_size=None)  # auto batch size: the resumed run must keep the first one's

    def fresh() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_unet(TINY, 1, 2)

    straight = train_model(fresh(), x, y, 2, s).state_dict()

    saved: dict[int, bytes] = {}

    class Killed(Exception):
        pass

    def keep(done: int, state) -> None:
        buf = io.BytesIO()
        torch.save(state(), buf)  # as to disk: nothing shared with the live run
        saved[done] = buf.getvalue()
        if done == 2:
            raise Killed

    with pytest.raises(Killed):
        train_model(fresh(), x, y, 2, s, on_epoch=keep)
    state = torch.load(io.BytesIO(saved[2]), weights_only=False)
    assert state["epochs_done"] == 2 and state["batch_size"] >= 1
    torch.manual_seed(123)  # the global stream moved on in between, as in a new process
    resumed = train_model(build_unet(TINY, 1, 2), x, y, 2, s, resume=state).state_dict()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_learns_bright_vs_dark():
    x, y = bright_dark(48, 32, seed=0)
    y[:, :2] = IGNORE  # a labelled-elsewhere border must not hurt
    xv, yv = bright_dark(16, 32, seed=1)
    torch.manual_seed(0)
    model = train_model(build_unet(TINY, 1, 2), x, y, 2, settings(epochs=4))
    m = metrics_from_confusion(predict_confusion(model, xv, yv, 2))
    assert m.miou > 0.9, m


def test_train_model_checks_inputs_and_restores_threads():
    x, y = bright_dark(4, 16, seed=0)
    model = build_unet(TINY, 1, 2)
    with pytest.raises(ValueError, match="same N, H, W"):
        train_model(model, x, y[:3], 2, settings())
    with pytest.raises(ValueError, match=r"y values must be in 0\.\.1"):
        train_model(model, x, y * 2, 2, settings())
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    train_model(model, x, y, 2, settings(epochs=1, threads=1, batch_size=None))
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before


def test_cross_validate_reports_each_fold():
    x, y = bright_dark(24, 16, seed=2)
    groups = np.arange(24) // 4
    calls: list[tuple[int, float]] = []
    scores = cross_validate(TINY, x, y, groups, 2, settings(epochs=1), 3, on_fold=lambda i, m: calls.append((i, m)))
    assert len(scores) == 3 and all(0.0 <= s <= 1.0 for s in scores)
    assert [i for i, _ in calls] == [0, 1, 2]
    assert [m for _, m in calls] == pytest.approx([np.mean(scores[: i + 1]) for i in range(3)])

    class Prune(Exception):
        pass

    def prune(i: int, running: float) -> None:
        raise Prune(f"fold {i}")

    with pytest.raises(Prune, match="fold 0"):
        cross_validate(TINY, x, y, groups, 2, settings(epochs=1), 3, on_fold=prune)
    with pytest.raises(ValueError, match="tile 17 is not divisible by 2"):
        x17 = np.pad(x, ((0, 0), (0, 0), (0, 1), (0, 1)))
        y17 = np.pad(y, ((0, 0), (0, 1), (0, 1)), constant_values=IGNORE)
        cross_validate(TINY, x17, y17, groups, 2, settings(), 3)
