"""Segmentation metrics from a confusion matrix.

Callers sum confusion matrices over a whole set and compute metrics once, so every pixel
counts equally (no per-batch averaging).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# Same value as autoseg.data.IGNORE (a test checks); kept local to avoid an import dependency.
IGNORE = -1


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) int64 counts, rows = target class, columns = predicted class; IGNORE targets skipped."""
    pred = np.asarray(pred).ravel()
    target = np.asarray(target).ravel()
    if pred.shape != target.shape:
        raise ValueError(f"pred has {pred.size} pixels but target has {target.size}")
    keep = target != IGNORE
    p = pred[keep].astype(np.int64)
    t = target[keep].astype(np.int64)
    k = int(num_classes)
    if t.size and (t.min() < 0 or t.max() >= k):
        raise ValueError(f"target values must be in 0..{k - 1} or {IGNORE}, got {t.min()}..{t.max()}")
    if p.size and (p.min() < 0 or p.max() >= k):
        raise ValueError(f"pred values must be in 0..{k - 1}, got {p.min()}..{p.max()}")
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k).astype(np.int64)


@dataclass(frozen=True)
class Metrics:
    miou: float
    macro_dice: float
    pixel_acc: float
    per_class_iou: tuple[float | None, ...]  # None: class absent from both prediction and ground truth
    per_class_dice: tuple[float | None, ...]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["per_class_iou"] = list(self.per_class_iou)
        d["per_class_dice"] = list(self.per_class_dice)
        return d


def metrics_from_confusion(cm: np.ndarray) -> Metrics:
    """IoU/Dice per class; means over classes present in prediction or ground truth.

    An empty matrix (no labelled pixels) gives zeros rather than NaN, so it can be stored as JSON
    and used as an objective value.
    """
    cm = np.asarray(cm, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {cm.shape}")
    tp = np.diag(cm)
    gt = cm.sum(axis=1)
    pr = cm.sum(axis=0)
    union = gt + pr - tp
    present = union > 0
    iou = np.divide(tp, union, out=np.zeros_like(tp), where=present)
    dice = np.divide(2 * tp, gt + pr, out=np.zeros_like(tp), where=present)
    total = cm.sum()
    return Metrics(
        miou=float(iou[present].mean()) if present.any() else 0.0,
        macro_dice=float(dice[present].mean()) if present.any() else 0.0,
        pixel_acc=float(tp.sum() / total) if total > 0 else 0.0,
        per_class_iou=tuple(float(v) if ok else None for v, ok in zip(iou, present, strict=True)),
        per_class_dice=tuple(float(v) if ok else None for v, ok in zip(dice, present, strict=True)),
    )
