"""The shipped net: the chosen architecture trained on crops of every training image.

The search ranks nets on a few hundred representative tiles; the net a user deploys should have seen all
their labels. Crops are drawn from every training image, streamed from disk through a bounded cache, with a
share of them centred on pixels of the rarer classes. A validation split of whole images picks the best
checkpoint and stops training when it no longer improves.

Every crop is a pure function of (seed, sample number): the same key gives the same net bit for bit on the
CPU, however many loader processes there are, and a run killed at any point goes on from its last saved
evaluation to the same weights.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from autoseg.checkpoint import checkpoint_with_keys, load_if_key, save_checkpoint
from autoseg.config import TrainConfig
from autoseg.data import Dataset, load_mask, load_pair
from autoseg.errors import InputError
from autoseg.infer import evaluate, torch_runner
from autoseg.metrics import IGNORE
from autoseg.train import TrainSettings, _deterministic_threads, auto_batch_size, seg_loss
from autoseg.unet import Arch, build_unet

log = logging.getLogger(__name__)

MIN_EVALS = 8  # validations over a run when train.eval_every is unset
# Largest automatic batch: at a fixed number of crops, smaller batches take more optimizer steps, and on the
# drone data steps mattered more than batch size (1,800 steps of 32 beat fewer, larger ones).
FINAL_MAX_BATCH = 32


@dataclass(frozen=True)
class FinalSettings:
    tiles: int  # crops seen over the whole run (tile passes)
    crop: int
    batch_size: int
    eval_every: int  # optimizer steps between validations
    patience: int  # validations without improvement before stopping; 0: never stop early
    rare_share: float
    scale_jitter: float
    colour_jitter: float
    cache_mb: float
    loader_workers: int
    minutes: float | None
    train: TrainSettings
    distill_weight: float = 0.0  # weight of the teacher's soft labels (with a teacher)

    @property
    def steps(self) -> int:
        return math.ceil(self.tiles / self.batch_size)


def final_settings(t: TrainConfig, train: TrainSettings, crop: int, batch_size: int, loader_workers: int
                   ) -> FinalSettings:
    """The config's final-training knobs, resolved for one net (crop and batch already decided)."""
    steps = math.ceil(t.final_tiles / batch_size)
    every = math.ceil(t.eval_every / batch_size) if t.eval_every else max(1, steps // MIN_EVALS)
    if every > steps:
        raise InputError(
            f"train.eval_every: {t.eval_every} tiles is more than the whole final budget (train.final_tiles "
            f"{t.final_tiles}), so training would never be validated; lower train.eval_every or leave it null"
        )
    return FinalSettings(
        tiles=t.final_tiles, crop=crop, batch_size=batch_size, eval_every=every, patience=t.patience,
        rare_share=t.rare_share, scale_jitter=t.scale_jitter, colour_jitter=t.colour_jitter,
        cache_mb=t.cache_mb, loader_workers=loader_workers, minutes=t.final_minutes, train=train,
        distill_weight=t.distill_weight if t.teacher else 0.0,
    )


def split_validation(train_ids: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit ids, validation ids) of the training images, by image; fraction 0 gives no validation."""
    n = len(train_ids)
    if fraction == 0:
        return np.asarray(train_ids), np.asarray(train_ids[:0])
    if n < 2:
        raise InputError(
            f"train.val_fraction: {n} training image(s) leave none to train on once {fraction} of them validate; "
            "add images, or set train.val_fraction: 0 (no early stopping, the last weights ship)"
        )
    n_val = min(n - 1, max(1, round(n * fraction)))
    perm = np.random.default_rng([seed, 7]).permutation(n)
    return np.sort(train_ids[perm[n_val:]]), np.sort(train_ids[perm[:n_val]])


# ---------------------------------------------------------------- which crops


def image_class_pixels(ds: Dataset, ids: np.ndarray, cache_dir: Path | None, progress: bool = False) -> np.ndarray:
    """(len(ids), K) labelled pixels of each class per image: where the rare-class crops can come from.

    One pass over the masks, cached under `cache_dir` keyed by the files' paths, sizes and mtimes."""
    k = ds.class_map.num_classes
    h = hashlib.sha256(json.dumps(ds.class_map.to_dict(), sort_keys=True).encode())
    for i in ids:
        p = ds.pairs[int(i)].mask
        st = os.stat(p)
        h.update(f"{os.fsencode(p)!r}:{st.st_size}:{st.st_mtime_ns};".encode())
    path = Path(cache_dir) / f"class-pixels-{h.hexdigest()[:20]}.npy" if cache_dir else None
    if path is not None and path.is_file():
        try:
            cached = np.load(path)
            if cached.shape == (len(ids), k):
                return cached
        except (OSError, ValueError):
            log.warning("%s: unreadable, counted again", path)
    out = np.zeros((len(ids), k), dtype=np.int64)
    for j, i in enumerate(tqdm(ids, desc="class pixels", unit="img", disable=not progress, leave=False)):
        mask = load_mask(ds, int(i))
        m = mask[mask != IGNORE]
        out[j] = np.bincount(m.ravel(), minlength=k)[:k]
    if path is not None:
        from io import BytesIO

        from autoseg.rundir import write_bytes_atomic

        buf = BytesIO()
        np.save(buf, out)
        write_bytes_atomic(path, buf.getvalue())
    return out


@dataclass(frozen=True)
class CropPlan:
    image: int  # position in the fit ids
    cls: int  # class whose pixel the crop is centred on; -1: anywhere
    scale: float  # side of the region cut, relative to the crop
    turn: int  # 0..7: rot90 count (k % 4) and a flip (k >= 4)
    gain: float  # colour jitter: contrast
    bias: float  # colour jitter: brightness


class CropPlanner:
    """Draws sample k's plan from its own random stream seeded by (seed, k): no state, so any k in any order."""

    def __init__(self, pixels: np.ndarray, seed: int, rare_share: float, scale_jitter: float, colour_jitter: float):
        self.seed, self.rare_share = seed, rare_share
        self.scale_jitter, self.colour_jitter = scale_jitter, colour_jitter
        area = pixels.sum(axis=1).astype(np.float64)
        self.image_p = area / area.sum() if area.sum() > 0 else np.full(len(pixels), 1 / len(pixels))
        freq = pixels.sum(axis=0).astype(np.float64)
        present = freq > 0
        # Rarer classes more often, but not in proportion: 1/sqrt(frequency), like the inverse class weights.
        w = np.where(present, 1 / np.sqrt(np.maximum(freq, 1)), 0.0)
        self.class_p = w / w.sum() if w.sum() > 0 else w
        self.images_of = [(np.flatnonzero(pixels[:, c]), pixels[:, c][pixels[:, c] > 0] / max(freq[c], 1))
                          for c in range(pixels.shape[1])]

    def plan(self, k: int) -> CropPlan:
        rng = np.random.default_rng([self.seed, k])
        cls = -1
        if self.class_p.sum() > 0 and rng.random() < self.rare_share:
            cls = int(rng.choice(len(self.class_p), p=self.class_p))
            ids, p = self.images_of[cls]
            image = int(rng.choice(ids, p=p))
        else:
            image = int(rng.choice(len(self.image_p), p=self.image_p))
        j = math.log(self.scale_jitter)
        scale = math.exp(rng.uniform(-j, j)) if j > 0 else 1.0
        cj = self.colour_jitter
        return CropPlan(image, cls, scale, int(rng.integers(8)), float(rng.uniform(1 - cj, 1 + cj)),
                        float(rng.uniform(-cj, cj)))


def cut_crop(image: np.ndarray, mask: np.ndarray, plan: CropPlan, crop: int, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray]:
    """The (side x side) region the plan names, side = crop * scale; outside the image: 0 and IGNORE."""
    h, w = mask.shape
    side = max(2, round(crop * plan.scale))
    if plan.cls >= 0:
        ys, xs = np.nonzero(mask == plan.cls)
        if len(ys):
            p = int(rng.integers(len(ys)))
            # The pixel lands anywhere in the middle half of the crop, not always at its centre.
            y = int(ys[p]) - side // 4 - int(rng.integers(max(1, side // 2)))
            x = int(xs[p]) - side // 4 - int(rng.integers(max(1, side // 2)))
            return _cut(image, mask, y, x, side)
    y = int(rng.integers(min(0, h - side), max(0, h - side) + 1))
    x = int(rng.integers(min(0, w - side), max(0, w - side) + 1))
    return _cut(image, mask, y, x, side)


def _cut(image: np.ndarray, mask: np.ndarray, y: int, x: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    from autoseg.tiles import crop

    return crop(image, y, x, side, 0), crop(mask, y, x, side, IGNORE)


def augment(x: torch.Tensor, y: torch.Tensor, plan: CropPlan, crop: int, aug: bool
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize the cut region to the crop (image bilinear, mask nearest), then turn, flip and jitter colour."""
    if x.shape[-1] != crop:
        x = F.interpolate(x[None], size=(crop, crop), mode="bilinear", align_corners=False)[0]
        y = F.interpolate(y[None, None].float(), size=(crop, crop), mode="nearest")[0, 0].to(y.dtype)
    if aug:
        k = plan.turn % 4
        if k:
            x, y = torch.rot90(x, k, (1, 2)), torch.rot90(y, k, (0, 1))
        if plan.turn >= 4:
            x, y = x.flip(2), y.flip(1)
        x = x * plan.gain + plan.bias  # in normalised units: about one std of brightness per unit
    return x.contiguous(), y.contiguous()


class ImageCache:
    """Decoded (image, mask) pairs, least recently used out first, bounded by bytes."""

    def __init__(self, ds: Dataset, max_mb: float) -> None:
        self.ds, self.max_bytes, self.used = ds, max_mb * 2**20, 0
        self.items: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i in self.items:
            self.items.move_to_end(i)
            return self.items[i]
        image, mask = load_pair(self.ds, i)
        if image.ndim == 2:
            image = image[:, :, None]
        mask = mask.astype(np.int16)  # class ids < 32768, IGNORE = -1: half the memory of int32
        size = image.nbytes + mask.nbytes
        while self.items and self.used + size > self.max_bytes:
            _, (a, b) = self.items.popitem(last=False)
            self.used -= a.nbytes + b.nbytes
        if size <= self.max_bytes:
            self.items[i] = (image, mask)
            self.used += size
        return image, mask


class CropStream(torch.utils.data.Dataset):
    """Samples first, first + 1, ... of the plan: normalised (C, crop, crop) float32 and (crop, crop) int64."""

    def __init__(self, ds: Dataset, fit_ids: np.ndarray, planner: CropPlanner, s: FinalSettings, first: int,
                 total: int) -> None:
        self.ds, self.fit_ids, self.planner, self.s = ds, fit_ids, planner, s
        self.first, self.total = first, total
        self.mean = torch.tensor(ds.mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(ds.std, dtype=torch.float32)[:, None, None]
        self.cache: ImageCache | None = None  # made in the process that reads, so each worker has its own

    def __len__(self) -> int:
        return max(0, self.total - self.first)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.first + j
        if self.cache is None:
            self.cache = ImageCache(self.ds, self.s.cache_mb)
        plan = self.planner.plan(k)
        image, mask = self.cache.get(int(self.fit_ids[plan.image]))
        img, m = cut_crop(image, mask, plan, self.s.crop, np.random.default_rng([self.planner.seed, k, 1]))
        x = (torch.from_numpy(img).permute(2, 0, 1).float() / 255.0 - self.mean) / self.std
        return augment(x, torch.from_numpy(m.astype(np.int64)), plan, self.s.crop, self.s.train.augment)


# ---------------------------------------------------------------- training


def loader_workers(t: TrainConfig, ds: Dataset, fit_ids: np.ndarray) -> int:
    """train.loader_workers, or: none when the decoded training images fit the cache, else some."""
    if t.loader_workers is not None:
        return t.loader_workers
    decoded = sum(ds.sizes[int(i)][0] * ds.sizes[int(i)][1] * (ds.channels + 2) for i in fit_ids)
    if decoded <= t.cache_mb * 2**20:
        return 0  # every image is read once; the main process keeps them
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def check_cache_memory(t: TrainConfig, workers: int) -> None:
    """Refuse a cache the machine cannot hold (each loader process keeps its own), before any swapping."""
    try:
        import psutil

        available = psutil.virtual_memory().available
    except ImportError:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return
    need = t.cache_mb * 2**20 * max(1, workers)
    if need > 0.6 * available:
        raise InputError(
            f"train.cache_mb: {t.cache_mb:g} MB x {max(1, workers)} loader process(es) is more than this machine can "
            f"spare ({available / 2**20:,.0f} MB available); lower train.cache_mb or train.loader_workers"
        )


def final_crop(t: TrainConfig, tile: int, multiple: int) -> int:
    """Side of the final training's crops: train.final_crop (else the tile), rounded up to what the net takes."""
    return -(-(t.final_crop or tile) // multiple) * multiple


def final_batch_size(t: TrainConfig, arch: Any, in_channels: int, num_classes: int, crop: int) -> int:
    return t.batch_size or min(FINAL_MAX_BATCH, auto_batch_size(arch, in_channels, num_classes, crop))


# The teacher that train.teacher: reference trains first: the classic 4-level U-Net with 32 base channels.
REFERENCE_ARCH = Arch((3, 3, 3, 3), (32, 64, 128, 256))


@dataclass
class Teacher:
    name: str
    arch: Arch
    key: str  # part of the student's key: another teacher gives another net
    model: nn.Module | None  # None: to be trained first (the reference)


def teacher_source(spec: str, ds: Dataset, in_channels: int) -> Teacher:
    """train.teacher: "reference", or the path of a best/model.pt whose net knows the same classes."""
    if spec == "reference":
        return Teacher("the reference U-Net", REFERENCE_ARCH, "|teacher:reference", None)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise InputError(f"train.teacher: {path} is not a file; give 'reference' or a best/model.pt of another run")
    ck = checkpoint_with_keys(path, "arch", "state_dict", "in_channels", "num_classes", "classes")
    if list(ck["classes"]) != list(ds.class_map.names) or int(ck["in_channels"]) != in_channels:
        raise InputError(f"train.teacher: {path} was trained on classes {list(ck['classes'])} with "
                         f"{ck['in_channels']} channel(s), this data has {list(ds.class_map.names)} with "
                         f"{in_channels}; give a teacher trained on the same classes")
    arch = Arch.from_dict(ck["arch"])
    model = build_unet(arch, in_channels, int(ck["num_classes"]))
    model.load_state_dict(ck["state_dict"])
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return Teacher(str(path), arch, f"|teacher:{digest}", model)


@dataclass
class FinalResult:
    model: nn.Module
    curve: list[dict[str, float]]
    best_step: int
    best_val_miou: float | None
    stopped: str  # "budget", "early_stop" or "time"
    tile_passes: int
    seconds: float


DISTILL_T = 2.0  # softmax temperature of the soft labels (Hinton et al. use 2-4)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of temperature-softened class distributions, over labelled pixels, x T^2."""
    valid = (target != IGNORE).unsqueeze(1)
    if not bool(valid.any()):
        return student.sum() * 0.0
    log_s = F.log_softmax(student / DISTILL_T, dim=1)
    p_t = F.softmax(teacher / DISTILL_T, dim=1)
    kl = (p_t * (torch.log(p_t.clamp_min(1e-8)) - log_s)).sum(dim=1, keepdim=True)
    return kl[valid].mean() * DISTILL_T**2


def train_final(
    model: nn.Module,
    ds: Dataset,
    fit_ids: np.ndarray,
    val_ids: np.ndarray,
    pixels: np.ndarray,
    s: FinalSettings,
    state_path: Path | None = None,
    key: str = "",
    progress: bool = False,
    validate: Callable[[nn.Module], float] | None = None,
    teacher: nn.Module | None = None,
) -> FinalResult:
    """Train `model` on crops of the `fit_ids` images for s.tiles crops; keep the weights that validate best.

    `pixels` is image_class_pixels of fit_ids. The state is saved to `state_path` at each validation (with
    `key`) and a later call with the same key goes on from there. `validate(model) -> mIoU` defaults to
    whole-image evaluation of `val_ids`. With a `teacher`, its soft labels add s.distill_weight x distill_loss."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = dev.type == "cuda"
    tr = s.train
    steps = s.steps
    if validate is None and len(val_ids):
        arch = getattr(model, "arch", None)
        multiple, width = (arch.multiple, arch.channels[0]) if arch is not None else (1, None)

        def validate(m: nn.Module) -> float:
            metrics = evaluate(torch_runner(m), ds, val_ids, "auto", s.crop, 0.5, 8, multiple, width=width)
            return float(metrics["mean"]["miou"])

    weights = None if tr.class_weights is None else torch.tensor(tr.class_weights, dtype=torch.float32, device=dev)
    planner = CropPlanner(pixels, tr.seed, s.rare_share, s.scale_jitter, s.colour_jitter)
    if teacher is not None:
        teacher = teacher.to(dev).eval()
    with _deterministic_threads(tr.threads):
        torch.manual_seed(tr.seed)
        model.to(dev).train()
        opt = torch.optim.AdamW(model.parameters(), lr=tr.lr, weight_decay=tr.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(t / max(steps, 1), 1.0)))
        )
        scaler = torch.amp.GradScaler("cuda", enabled=amp)
        step, curve, best, best_step, best_val, bad, spent = 0, [], None, 0, None, 0, 0.0
        resume = load_if_key(state_path, key) if state_path is not None else None
        if resume is not None:
            model.load_state_dict(resume["model"])
            opt.load_state_dict(resume["optimizer"])
            sched.load_state_dict(resume["scheduler"])
            torch.set_rng_state(resume["torch_rng"])
            step, curve, best_step, bad = int(resume["step"]), list(resume["curve"]), int(resume["best_step"]), \
                int(resume["bad"])
            best, best_val, spent = resume["best"], resume["best_val"], float(resume["seconds"])
            log.info("final training goes on after %d of %d steps", step, steps)
        stream = CropStream(ds, fit_ids, planner, s, step * s.batch_size, steps * s.batch_size)
        loader = torch.utils.data.DataLoader(stream, batch_size=s.batch_size, num_workers=s.loader_workers,
                                             pin_memory=amp, persistent_workers=False)
        t0 = time.monotonic() - spent
        stopped, total, seen = "budget", torch.zeros((), device=dev), 0
        bar = tqdm(total=steps, initial=step, desc="final training", unit="step", disable=not progress, leave=False)
        try:
            for xb, yb in loader:
                xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
                with torch.autocast(dev.type, enabled=amp):
                    logits = model(xb)
                    loss = seg_loss(logits, yb, tr.dice_weight, weights)
                    if teacher is not None and s.distill_weight > 0:
                        with torch.no_grad():
                            soft = teacher(xb)
                        loss = loss + s.distill_weight * distill_loss(logits.float(), soft.float(), yb)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                step += 1
                total += loss.detach() * len(xb)
                seen += len(xb)
                bar.update(1)
                over_time = s.minutes is not None and time.monotonic() - t0 > 60 * s.minutes
                if step % s.eval_every and step < steps and not over_time:
                    continue
                train_loss = float(total) / max(seen, 1)
                if not math.isfinite(train_loss):
                    raise FloatingPointError(f"final training diverged (loss {train_loss}) at step {step}; "
                                             "lower train.lr")
                total.zero_()
                seen = 0
                point = {"step": step, "tile_passes": step * s.batch_size, "train_loss": train_loss,
                         "seconds": time.monotonic() - t0}
                if validate is not None:
                    point["val_miou"] = validate(model)
                    model.train()
                    if best_val is None or point["val_miou"] > best_val:
                        best_val, best_step, bad = point["val_miou"], step, 0
                        best = copy.deepcopy(model.state_dict())
                    else:
                        bad += 1
                curve.append(point)
                log.info("final training: step %d/%d, %d tiles, train loss %.4f%s", step, steps,
                         point["tile_passes"], train_loss,
                         f", val mIoU {point['val_miou']:.4f} (best {best_val:.4f})" if "val_miou" in point else "")
                done = step >= steps
                if s.patience and bad >= s.patience:
                    stopped, done = "early_stop", True
                elif over_time and not done:
                    stopped, done = "time", True
                if state_path is not None and not done:
                    save_checkpoint({
                        "retrain_key": key, "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(), "curve": curve,
                        "best": best, "best_step": best_step, "best_val": best_val, "bad": bad,
                        "seconds": time.monotonic() - t0,
                    }, state_path)
                if done:
                    break
        finally:
            bar.close()
    if best is not None:
        model.load_state_dict(best)
    else:
        best_step = step
    log.info("final training stopped (%s) after %d steps; kept step %d%s", stopped, step, best_step,
             f", val mIoU {best_val:.4f}" if best_val is not None else "")
    return FinalResult(model, curve, best_step, best_val, stopped, step * s.batch_size, time.monotonic() - t0)


def final_key(arch_key: str, tile: int, s: FinalSettings, ds: Dataset, fit_ids: np.ndarray, val_ids: np.ndarray
              ) -> str:
    """What the final training depends on: the same key gives the same net (minutes aside)."""
    d = asdict(s)
    d.pop("minutes")
    d.pop("loader_workers")  # the crops do not depend on who reads them
    d.pop("cache_mb")
    h = hashlib.sha256(json.dumps({"arch": arch_key, "tile": tile, "settings": d, "mean": list(ds.mean),
                                   "std": list(ds.std), "classes": ds.class_map.to_dict()},
                                  sort_keys=True, default=str).encode())
    for ids in (fit_ids, val_ids):
        for i in ids:
            p = ds.pairs[int(i)]
            h.update(f"{os.fsencode(p.image)!r}|{os.fsencode(p.mask)!r}|{ds.sizes[int(i)]};".encode())
        h.update(b"/")
    return h.hexdigest()[:16]
