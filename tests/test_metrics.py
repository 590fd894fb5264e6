import json

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix as sk_confusion

from autoseg.metrics import IGNORE, confusion_matrix, metrics_from_confusion

# 4 classes: 0 and 1 in GT, 2 only predicted (a false positive), 3 only predicted on ignored pixels.
TARGET = np.array([[0, 0, 0, 1], [1, 1, IGNORE, IGNORE]], dtype=np.int32)
PRED = np.array([[0, 0, 1, 1], [1, 2, 3, 0]], dtype=np.int64)


def test_ignore_matches_data_module():
    data = pytest.importorskip("autoseg.data")
    assert data.IGNORE == IGNORE == -1


def test_confusion_by_hand():
    cm = confusion_matrix(PRED, TARGET, 4)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, [[2, 1, 0, 0], [0, 2, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]])


def test_metrics_by_hand():
    m = metrics_from_confusion(confusion_matrix(PRED, TARGET, 4))
    # IoU: class 0 = 2/(3+2-2), class 1 = 2/(3+3-2), class 2 = 0/1, class 3 absent everywhere.
    assert m.per_class_iou == pytest.approx((2 / 3, 0.5, 0.0, None))
    assert m.per_class_iou[3] is None and m.per_class_dice[3] is None
    assert m.per_class_dice == pytest.approx((4 / 5, 4 / 6, 0.0, None))
    assert m.miou == pytest.approx((2 / 3 + 0.5 + 0.0) / 3)
    assert m.macro_dice == pytest.approx((0.8 + 2 / 3 + 0.0) / 3)
    assert m.pixel_acc == pytest.approx(4 / 6)
    d = json.loads(json.dumps(m.to_dict()))
    assert d["per_class_iou"][3] is None and d["miou"] == pytest.approx(m.miou)


def test_perfect_and_empty():
    t = np.array([0, 1, 1, IGNORE])
    m = metrics_from_confusion(confusion_matrix(np.array([0, 1, 1, 0]), t, 3))
    assert (m.miou, m.macro_dice, m.pixel_acc) == (1.0, 1.0, 1.0)
    assert m.per_class_iou == (1.0, 1.0, None)
    empty = metrics_from_confusion(confusion_matrix(np.zeros(3, int), np.full(3, IGNORE), 2))
    assert (empty.miou, empty.macro_dice, empty.pixel_acc) == (0.0, 0.0, 0.0)
    assert empty.per_class_iou == (None, None)


def test_accumulates_over_the_set_and_matches_sklearn():
    rng = np.random.default_rng(0)
    t = rng.integers(-1, 5, size=(6, 16, 16))
    p = rng.integers(0, 5, size=(6, 16, 16))
    summed = sum(confusion_matrix(p[i], t[i], 5) for i in range(6))
    whole = confusion_matrix(p, t, 5)
    np.testing.assert_array_equal(summed, whole)
    keep = t.ravel() != IGNORE
    np.testing.assert_array_equal(whole, sk_confusion(t.ravel()[keep], p.ravel()[keep], labels=range(5)))
    # Set-level mIoU is not the mean of per-batch mIoU (a class can be absent from one batch).
    t2 = np.array([[0, 0], [1, 1]])
    p2 = np.array([[0, 0], [0, 1]])
    batch_mean = np.mean([metrics_from_confusion(confusion_matrix(p2[i], t2[i], 2)).miou for i in range(2)])
    set_level = metrics_from_confusion(confusion_matrix(p2, t2, 2)).miou
    assert set_level == pytest.approx((2 / 3 + 1 / 2) / 2) and set_level != pytest.approx(batch_mean)


def test_bad_input():
    with pytest.raises(ValueError, match=r"target values must be in 0\.\.1"):
        confusion_matrix(np.array([0, 1]), np.array([0, 2]), 2)
    with pytest.raises(ValueError, match=r"pred values must be in 0\.\.1"):
        confusion_matrix(np.array([0, 5]), np.array([0, 1]), 2)
    with pytest.raises(ValueError, match="pred has 3 pixels but target has 2"):
        confusion_matrix(np.array([0, 1, 1]), np.array([0, 1]), 2)
    with pytest.raises(ValueError, match="square"):
        metrics_from_confusion(np.zeros((2, 3)))
