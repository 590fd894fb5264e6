"""Training and k-fold cross-validation of one architecture on the representative tiles.

Loss = cross-entropy + dice_weight * soft Dice, both blind to IGNORE pixels. Everything random
(init, data order, augmentation) comes from the seed, so a run repeats bit for bit on CPU.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from autoseg.config import FOLD_TILE_PASSES, TrainConfig
from autoseg.metrics import IGNORE, confusion_matrix, metrics_from_confusion
from autoseg.unet import Arch, UNet, build_unet, validate_arch

log = logging.getLogger(__name__)

MIN_BATCH, MAX_BATCH = 2, 64
FALLBACK_BATCH = 16  # when the model is not a UNet we can estimate
MIN_STEPS_PER_EPOCH = 8  # with n_samples known, keep batches small enough to take this many steps
MIN_FOLD_EPOCHS = 3


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    lr: float
    weight_decay: float
    batch_size: int | None  # None: auto_batch_size
    dice_weight: float
    class_weights: tuple[float, ...] | None
    augment: bool
    seed: int
    threads: int | None = None  # torch.set_num_threads for the duration of training; None keeps the default


def training_settings(
    t: TrainConfig, seed: int, class_weights: tuple[float, ...] | None, epochs: int
) -> TrainSettings:
    """The training knobs of the config, for a run of `epochs` epochs."""
    return TrainSettings(
        epochs=epochs,
        lr=t.lr,
        weight_decay=t.weight_decay,
        batch_size=t.batch_size,
        dice_weight=t.dice_weight,
        class_weights=class_weights,
        augment=t.augment,
        seed=seed,
        threads=t.threads,
    )


def fold_epochs(n_tiles: int, folds: int) -> int:
    """Epochs per CV fold when train.epochs is unset: about FOLD_TILE_PASSES tiles seen per fold."""
    per_fold = max(1, n_tiles * (folds - 1) // folds)
    return max(MIN_FOLD_EPOCHS, math.ceil(FOLD_TILE_PASSES / per_fold))


def cv_epochs(t: TrainConfig, n_tiles: int) -> int:
    """Epochs per CV fold: train.epochs, or when unset enough for about FOLD_TILE_PASSES tiles a fold."""
    return t.epochs if t.epochs is not None else fold_epochs(n_tiles, t.folds)


# ---------------------------------------------------------------- loss


def seg_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    dice_weight: float = 1.0,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy + dice_weight * (1 - soft Dice); IGNORE pixels give no loss and no gradient."""
    valid = target != IGNORE
    if not bool(valid.any()):
        return logits.sum() * 0.0  # keeps the graph; mean CE over zero pixels would be NaN
    loss = F.cross_entropy(logits, target, weight=class_weights, ignore_index=IGNORE)
    if dice_weight > 0:
        k = logits.shape[1]
        mask = valid.unsqueeze(1).to(logits.dtype)
        probs = logits.softmax(dim=1) * mask
        onehot = F.one_hot(target.clamp(min=0), k).permute(0, 3, 1, 2).to(logits.dtype) * mask
        dims = (0, 2, 3)
        inter = (probs * onehot).sum(dims)
        denom = probs.sum(dims) + onehot.sum(dims)
        dice = (2 * inter + 1.0) / (denom + 1.0)  # +1 smoothing: absent classes score ~1 unless predicted
        loss = loss + dice_weight * (1.0 - dice.mean())
    return loss


# ---------------------------------------------------------------- folds


def make_folds(groups: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """k (train, val) index pairs. Tiles of one source image stay on one side when there are >= k images."""
    from sklearn.model_selection import GroupKFold, KFold

    groups = np.asarray(groups)
    n = len(groups)
    if k < 2:
        raise ValueError(f"need at least 2 folds, got {k}")
    if n < k:
        raise ValueError(f"cannot make {k} folds from {n} tiles; use fewer folds or more representatives")
    rng = np.random.default_rng(seed)
    uniq, inverse = np.unique(groups, return_inverse=True)
    if len(uniq) >= k:
        # GroupKFold without shuffle: largest image first, each to the fold with the fewest tiles, so folds
        # differ by at most one image's tiles (usually by one tile). The seed relabels the images at random,
        # which orders the images of equal tile count: that is where the seed moves the folds (on real reps,
        # many images share a count; with all counts distinct every seed gives the same folds).
        # GroupKFold(shuffle=True) (scikit-learn >= 1.6) deals out equal numbers of images instead: on 40
        # images of geometric tile counts (257 tiles, 3 folds, 20 seeds) its folds differed by 28 tiles on
        # average (48 at worst), the former hand-written random-order greedy's by 7, these by 1. A fold that
        # trains on fewer tiles scores lower for it, and the pruner judges a trial on its first fold.
        relabel = rng.permutation(len(uniq))[inverse]
        splits = GroupKFold(n_splits=k).split(np.zeros(n), groups=relabel)
    else:
        log.warning(
            "only %d source images for %d folds: splitting by tile, so validation tiles may share "
            "images with training tiles and scores will be optimistic",
            len(uniq),
            k,
        )
        splits = KFold(n_splits=k, shuffle=True, random_state=int(rng.integers(2**31))).split(np.zeros(n))
    return [(tr.astype(np.int64), va.astype(np.int64)) for tr, va in splits]


# ---------------------------------------------------------------- batch size


def activation_bytes(arch: Arch, in_channels: int, num_classes: int, tile: int) -> int:
    """Rough training memory per sample: tensors saved for backward plus their gradients (float32)."""
    c, n = arch.channels, arch.levels
    px = [max(tile >> i, 1) ** 2 for i in range(n)]
    floats = in_channels * px[0]

    def block(cin: int, cout: int, p: int) -> int:
        # per conv: conv output + BN output (ReLU in place); separable adds the depthwise output
        depthwise = (cin + cout) if arch.conv == "separable" else 0
        return p * (4 * cout + depthwise)

    prev = in_channels
    for i in range(n):
        floats += block(prev, c[i], px[i]) + (px[i] * prev if i else 0)  # + maxpool output
        prev = c[i]
    for i in range(n - 1):
        floats += px[i] * c[i] * 3  # upsampled map + concat
        floats += block(2 * c[i], c[i], px[i])
    floats += px[0] * num_classes * 3  # logits, softmax, one-hot
    return int(floats * 4 * 2)  # float32, x2 for gradients alive during backward


def batch_size_for(budget_bytes: float, per_sample_bytes: float, n_samples: int | None = None) -> int:
    """Largest power of two in [2, 64] fitting the budget (and leaving several steps per epoch)."""
    fit = int(budget_bytes // max(per_sample_bytes, 1))
    if n_samples is not None:
        fit = min(fit, n_samples // MIN_STEPS_PER_EPOCH)
    fit = min(max(fit, MIN_BATCH), MAX_BATCH)
    return 1 << (fit.bit_length() - 1)


def _memory_budget() -> float:
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return 0.5 * free
    try:
        import psutil

        available = psutil.virtual_memory().available
    except ImportError:  # psutil is a test extra; sysconf covers Linux
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = 4 << 30
    return 0.25 * available  # leave room for the data, the OS and other processes


def auto_batch_size(arch: Arch, in_channels: int, num_classes: int, tile: int, n_samples: int | None = None) -> int:
    """Batch size from free memory and an activation estimate; a power of two in [2, 64].

    With `n_samples` (the training set size) it is also capped so an epoch takes several steps:
    on a few hundred tiles, more optimiser steps matter more than a bigger batch.
    """
    per_sample = activation_bytes(arch, in_channels, num_classes, tile)
    return batch_size_for(_memory_budget(), per_sample, n_samples)


# ---------------------------------------------------------------- training


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextmanager
def _deterministic_threads(threads: int | None) -> Iterator[None]:
    """Deterministic algorithms (warn-only, so CPU ops without one still run) and optional thread count,
    restored afterwards because both are process-global."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True, warn_only=True)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
        if threads is not None:
            torch.set_num_threads(prev_threads)


def _augment(xb: torch.Tensor, yb: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One random flip/90° rotation for the whole batch (rotations by 90° only on square tiles)."""
    square = xb.shape[-1] == xb.shape[-2]
    r = int(torch.randint(0, 8, (1,), generator=gen))
    k, flip = r % 4, r >= 4
    if not square:
        k = 2 * (k % 2)
    if k:
        xb, yb = torch.rot90(xb, k, (2, 3)), torch.rot90(yb, k, (1, 2))
    if flip:
        xb, yb = xb.flip(3), yb.flip(2)
    return xb, yb


def _check_data(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> None:
    if x.ndim != 4 or y.ndim != 3 or len(x) != len(y) or x.shape[-2:] != y.shape[-2:]:
        raise ValueError(f"expected x (N,C,H,W) and y (N,H,W) of the same N, H, W; got {x.shape} and {y.shape}")
    if len(x) == 0:
        raise ValueError("no training samples")
    labelled = y[y != IGNORE]
    if labelled.numel() and (int(labelled.min()) < 0 or int(labelled.max()) >= num_classes):
        raise ValueError(f"y values must be in 0..{num_classes - 1} or {IGNORE}")


def train_model(
    model: nn.Module,
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    num_classes: int,
    s: TrainSettings,
    progress: bool = False,
    device: str | torch.device | None = None,
    resume: dict | None = None,
    on_epoch: Callable[[int, Callable[[], dict]], None] | None = None,
    epoch_guard: Callable[[], AbstractContextManager] = nullcontext,
) -> nn.Module:
    """Train `model` in place with AdamW and a cosine schedule; returns it (in train mode).

    on_epoch(done, state) is called after each epoch; state() gives everything needed to go on from
    there (weights, optimiser, schedule, random streams, batch size). Passing that dict back as `resume`
    continues the run, and the result is the same bit for bit as if it had never stopped. Each epoch runs
    inside epoch_guard() (parallel search workers let a local latency measurement go first).
    """
    dev = torch.device(device) if device is not None else _default_device()
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.int64)
    _check_data(xt, yt, num_classes)
    xt, yt = xt.to(dev), yt.to(dev)
    n = len(xt)
    bs = s.batch_size
    if bs is None:
        if isinstance(model, UNet):
            tile = max(xt.shape[-2:])
            bs = auto_batch_size(model.arch, xt.shape[1], num_classes, tile, n_samples=n)
        else:
            bs = FALLBACK_BATCH
    bs = max(1, min(bs, n))
    if resume is not None:
        bs = int(resume["batch_size"])  # the auto size depends on free memory, which may have changed
    steps = s.epochs * math.ceil(n / bs)
    weights = None if s.class_weights is None else torch.tensor(s.class_weights, dtype=torch.float32, device=dev)
    if weights is not None and len(weights) != num_classes:
        raise ValueError(f"class_weights has {len(weights)} entries for {num_classes} classes")

    with _deterministic_threads(s.threads):
        torch.manual_seed(s.seed)
        gen = torch.Generator().manual_seed(s.seed)  # data order and augmentation
        model.to(dev).train()
        opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(t / max(steps, 1), 1.0)))
        )
        first = 0
        if resume is not None:
            model.load_state_dict(resume["model"])
            opt.load_state_dict(resume["optimizer"])
            sched.load_state_dict(resume["scheduler"])
            gen.set_state(resume["generator"])
            torch.set_rng_state(resume["torch_rng"])
            first = int(resume["epochs_done"])
            log.debug("training resumes after epoch %d of %d", first, s.epochs)

        def state(done: int) -> dict:
            return {
                "epochs_done": done, "batch_size": bs, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
            }

        log.debug("training %d samples, batch %d, %d epochs", n, bs, s.epochs)
        bar = tqdm(range(first, s.epochs), desc="epochs", disable=not progress, leave=False, initial=first,
                   total=s.epochs)
        for epoch in bar:
            with epoch_guard():
                order = torch.randperm(n, generator=gen).to(dev)
                total = torch.zeros((), device=dev)
                for start in range(0, n, bs):
                    idx = order[start : start + bs]
                    xb, yb = xt[idx], yt[idx]
                    if s.augment:
                        xb, yb = _augment(xb, yb, gen)
                    loss = seg_loss(model(xb), yb, s.dice_weight, weights)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    total += loss.detach() * len(idx)
            mean_loss = float(total) / n  # one sync per epoch
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"training diverged (loss {mean_loss}) in epoch {epoch + 1}; lower train.lr")
            log.debug("epoch %d loss %.4f", epoch + 1, mean_loss)
            if on_epoch is not None:
                on_epoch(epoch + 1, lambda done=epoch + 1: state(done))
    return model


def predict_confusion(
    model: nn.Module,
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    num_classes: int,
    batch_size: int = 16,
) -> np.ndarray:
    """Confusion matrix (K, K) of the model's argmax over the whole set; leaves the model in eval mode."""
    dev = next(model.parameters()).device
    xt = torch.as_tensor(x, dtype=torch.float32)
    yn = y.cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(xt), batch_size):
            pred = model(xt[start : start + batch_size].to(dev)).argmax(dim=1).cpu().numpy()
            cm += confusion_matrix(pred, yn[start : start + batch_size], num_classes)
    return cm


def cross_validate(
    arch: Arch,
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    num_classes: int,
    s: TrainSettings,
    folds: int,
    on_fold: Callable[[int, float], None] | None = None,
    progress: bool = False,
    epoch_guard: Callable[[], AbstractContextManager] = nullcontext,
    on_epoch: Callable[[int, int, Callable[[], float]], None] | None = None,
) -> list[float]:
    """Per-fold validation mIoU of a fresh `arch` net per fold.

    After each fold calls on_fold(fold_index, running_mean), and after each epoch on_epoch(fold_index,
    epochs_done, score), where score() is the fold's validation mIoU of the net as it is then (it changes
    nothing in the training that follows). An exception from either propagates: the search raises there
    to prune a trial or to stop it at its deadline.
    """
    validate_arch(arch, tile=int(x.shape[-1]))
    validate_arch(arch, tile=int(x.shape[-2]))
    scores: list[float] = []
    splits = make_folds(groups, folds, s.seed)
    for i, (tr, va) in enumerate(tqdm(splits, desc="folds", disable=not progress, leave=False)):
        fold_s = replace(s, seed=s.seed + i)
        torch.manual_seed(fold_s.seed)  # same init for the same arch, seed and fold
        model = build_unet(arch, int(x.shape[1]), num_classes)
        hook = None if on_epoch is None else _epoch_hook(on_epoch, i, model, x[va], y[va], num_classes, epoch_guard)
        train_model(model, x[tr], y[tr], num_classes, fold_s, epoch_guard=epoch_guard, on_epoch=hook)
        with epoch_guard():
            cm = predict_confusion(model, x[va], y[va], num_classes)
        scores.append(metrics_from_confusion(cm).miou)
        log.debug("fold %d/%d: val mIoU %.4f", i + 1, folds, scores[-1])
        if on_fold is not None:
            on_fold(i, float(np.mean(scores)))
    return scores


def _epoch_hook(
    on_epoch: Callable[[int, int, Callable[[], float]], None], fold: int, model: nn.Module, x: np.ndarray,
    y: np.ndarray, num_classes: int, epoch_guard: Callable[[], AbstractContextManager],
) -> Callable[[int, Callable[[], dict]], None]:
    """train_model's on_epoch for cross_validate's: hands out a score() of the net in training."""

    def score() -> float:
        with epoch_guard():
            cm = predict_confusion(model, x, y, num_classes)
        model.train()  # evaluation draws nothing random and leaves BatchNorm's statistics: training goes on alike
        return metrics_from_confusion(cm).miou

    def hook(done: int, _state: Callable[[], dict]) -> None:
        on_epoch(fold, done, score)

    return hook
