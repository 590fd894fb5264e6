"""Full-image inference: window grid, Gaussian blending, whole vs windows, torch vs onnxruntime, evaluate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from autoseg.errors import InputError
from autoseg.export import onnx_bytes
from autoseg.infer import (
    evaluate,
    gaussian_weights,
    normalize,
    ort_runner,
    predict,
    predict_whole,
    predict_windows,
    torch_runner,
    window_grid,
)
from autoseg.unet import Arch, build_unet


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny nets: one thread is as fast, and immune to OpenMP stalls when the machine is busy."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _net(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "pointwise":  # no spatial context: every blending scheme must reproduce it exactly
        return nn.Conv2d(3, 5, 1).eval()
    # Receptive field 5x5: only pixels within 2 px of a window edge see padding instead of context.
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 5, 3, padding=1)).eval()


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth random CHW float32 (blurred noise), so the argmax forms regions rather than salt."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((1, 3, h, w), dtype=np.float32))
    return nn.functional.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)[0].numpy() * 3


@pytest.mark.parametrize(
    ("h", "w", "tile", "overlap"),
    [(100, 70, 32, 0.25), (64, 64, 32, 0.5), (33, 32, 32, 0.0), (32, 32, 32, 0.5), (129, 40, 16, 0.9)],
)
def test_windows_cover_every_pixel(h, w, tile, overlap):
    corners = window_grid(h, w, tile, overlap)
    cover = np.zeros((h, w), np.int32)
    for y, x in corners:
        assert 0 <= y <= h - tile and 0 <= x <= w - tile
        cover[y : y + tile, x : x + tile] += 1
    assert cover.min() >= 1
    assert max(y for y, _ in corners) == h - tile and max(x for _, x in corners) == w - tile  # snapped
    assert len(set(corners)) == len(corners)


def test_gaussian_weights():
    g = gaussian_weights(32)
    assert g.shape == (32, 32) and g.dtype == np.float32
    assert g.max() == pytest.approx(1.0, abs=1e-6) and g.min() > 0
    np.testing.assert_array_equal(g, g.T)
    np.testing.assert_array_equal(g, g[::-1, ::-1])
    # Separable Gaussian with sigma = tile/8 = 4 px around the centre 15.5.
    c = np.arange(32) - 15.5
    profile = np.exp(-(c**2) / (2 * 4.0**2))
    np.testing.assert_allclose(g, np.outer(profile, profile) / profile.max() ** 2, rtol=1e-4, atol=1e-7)
    assert g[0, 0] < 1e-6 < g[0, 16]


def test_pointwise_net_windows_equal_whole():
    run = torch_runner(_net("pointwise"))
    x = _image(45, 70)
    ref = run(x[None])[0]
    np.testing.assert_allclose(predict_whole(run, x, 8), ref, atol=1e-5)
    np.testing.assert_allclose(predict_windows(run, x, 32, 0.25, batch=3), ref, atol=1e-5)
    uniform = np.ones((32, 32), np.float32)
    np.testing.assert_allclose(predict_windows(run, x, 32, 0.5, 4, weights=uniform), ref, atol=1e-5)


def test_small_receptive_field_windows_agree_with_whole():
    run = torch_runner(_net("rf5"))
    x = _image(96, 120, seed=1)
    whole = predict_whole(run, x, 1)
    win = predict_windows(run, x, 32, 0.5, batch=8)
    assert win.shape == whole.shape == (5, 96, 120)
    agree = np.mean(win.argmax(0) == whole.argmax(0))
    assert agree >= 0.99, agree
    # Gaussian blending makes window-edge errors nearly vanish: pixels 2 px inside a window edge
    # weigh ~exp(-5.7) relative to the window that centres them.
    scale = np.abs(whole).mean()
    assert np.abs(win - whole).max() < 0.05 * scale
    # Mean blending (the seed's scheme) is visibly worse at window seams.
    flat = predict_windows(run, x, 32, 0.5, 8, weights=np.ones((32, 32), np.float32))
    assert np.abs(win - whole).mean() < np.abs(flat - whole).mean()


def test_windows_are_batched():
    calls = []
    base = torch_runner(_net("pointwise"))

    def run(x):
        calls.append(x.shape)
        return base(x)

    predict_windows(run, _image(64, 64), 32, 0.5, batch=4)  # 3 x 3 = 9 windows
    assert [c[0] for c in calls] == [4, 4, 1]
    assert all(c[1:] == (3, 32, 32) for c in calls)
    calls.clear()
    predict_whole(run, _image(50, 60), 16)
    assert calls == [(1, 3, 64, 64)]


@pytest.mark.parametrize(("h", "w"), [(20, 13), (5, 40), (1, 1)])
def test_small_images_are_padded_and_cropped_back(h, w):
    run = torch_runner(_net("pointwise"))
    x = _image(max(h, 5), max(w, 5))[:, :h, :w].copy()
    ref = run(x[None])[0]
    for out in (predict_windows(run, x, 32, 0.25, 2), predict_whole(run, x, 16)):
        assert out.shape == (5, h, w)
        np.testing.assert_allclose(out, ref, atol=1e-5)


def test_predict_whole_on_unet_needs_padding():
    arch = Arch((3, 3, 3), (4, 8, 8))
    model = build_unet(arch, 3, 5).eval()
    out = predict_whole(torch_runner(model), _image(37, 50), arch.multiple)  # 37x50 -> 40x52 inside
    assert out.shape == (5, 37, 50) and np.isfinite(out).all()


def test_torch_and_onnxruntime_runners_agree(tmp_path):
    torch.manual_seed(0)
    model = build_unet(Arch((3, 3), (16, 64)), 3, 5).eval()
    data = onnx_bytes(model, 3, 32)
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    x = _image(80, 72, seed=2)
    t_run = torch_runner(model)
    for o_run in (ort_runner(data), ort_runner(path, threads=1)):
        np.testing.assert_allclose(predict_whole(o_run, x, 2), predict_whole(t_run, x, 2), atol=1e-4)
        np.testing.assert_allclose(
            predict_windows(o_run, x, 32, 0.25, 4), predict_windows(t_run, x, 32, 0.25, 4), atol=1e-4
        )
    # float64 input is fed as float32
    assert ort_runner(data)(x[None].astype(np.float64)).dtype == np.float32


def test_normalize():
    img = np.array([[[0, 255, 51]]], np.uint8)  # 1x1 RGB
    x = normalize(img, (0.0, 0.5, 0.2), (1.0, 0.5, 0.1))
    assert x.shape == (3, 1, 1) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 0, 0], [0.0, 1.0, 0.0], atol=1e-6)
    gray = normalize(np.full((4, 6), 255, np.uint8), (0.5,), (0.5,))
    assert gray.shape == (1, 4, 6) and np.allclose(gray, 1.0)
    with pytest.raises(InputError, match="channel"):
        normalize(np.zeros((4, 4, 3), np.uint8), (0.5,), (0.5,))


def test_auto_mode_switches_to_windows_on_big_images(monkeypatch):
    import autoseg.infer as infer

    calls: list[tuple[int, ...]] = []

    def run(x: np.ndarray) -> np.ndarray:
        calls.append(x.shape)
        return np.repeat(x[:, :1], 2, axis=1)

    predict(run, _image(16, 16), "auto", 8, 0.0, 4, 1)
    assert calls[-1][-2:] == (16, 16)  # small: one whole-image call
    monkeypatch.setattr(infer, "WHOLE_MAX_PIXELS", 100)
    calls.clear()
    predict(run, _image(16, 16), "auto", 8, 0.0, 4, 1)
    assert all(c[-2:] == (8, 8) for c in calls)  # big: windows of the tile size


def test_predict_rejects_unknown_mode():
    with pytest.raises(InputError, match=r"eval\.mode"):
        predict(torch_runner(_net("pointwise")), _image(8, 8), "tiles", 8, 0.0, 1, 1)


# ---------------------------------------------------------------- evaluate on real files


def _threshold_runner(x: np.ndarray) -> np.ndarray:
    """A RunFn whose class is 'brighter than the mean' in channel 0: logits (-x0, x0)."""
    return np.concatenate([-x[:, :1], x[:, :1]], axis=1)


def test_evaluate_on_files(tmp_path):
    data = pytest.importorskip("autoseg.data")
    from autoseg.config import DataConfig

    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(40, 56), (33, 47)]):
        mask = np.zeros((h, w), np.uint8)
        mask[5 : 5 + h // 2, 10 : 10 + w // 3] = 1
        img = np.where(mask[..., None] == 1, 220, 30).astype(np.uint8).repeat(3, axis=2)
        img = np.clip(img + rng.integers(-10, 10, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(tmp_path / "img" / f"s{i}.png")
        Image.fromarray(mask).save(tmp_path / "msk" / f"s{i}.png")
    ds = data.scan_dataset(tmp_path / "img", tmp_path / "msk", DataConfig(ignore_index=None))
    assert ds.class_map.num_classes == 2

    for mode in ("whole", "window"):
        res = evaluate(_threshold_runner, ds, [0, 1], mode, tile=16, overlap=0.25, batch=4, multiple=4)
        assert res["mode"] == mode
        assert [r["stem"] for r in res["per_image"]] == ["s0", "s1"]
        assert all(r["miou"] == pytest.approx(1.0) for r in res["per_image"])
        assert res["mean"]["miou"] == pytest.approx(1.0) and res["mean"]["pixel_acc"] == pytest.approx(1.0)
        assert set(res["per_class"]) == set(ds.class_map.names)
        assert sum(v["gt_pixels"] for v in res["per_class"].values()) == 40 * 56 + 33 * 47

    seen = []
    res = evaluate(_threshold_runner, ds, [1, 0], "whole", 16, 0.25, 4, 4,
                   on_prediction=lambda i, image, mask, pred: seen.append((i, image.shape, np.array_equal(pred, mask))))
    assert seen == [(1, (33, 47, 3), True), (0, (40, 56, 3), True)]  # each image once, as it was scored

    # An inverted runner is wrong everywhere: IoU 0 for both classes.
    res = evaluate(lambda x: -_threshold_runner(x), ds, [1], "whole", 16, 0.25, 4, 4)
    assert res["mean"]["miou"] == 0.0 and len(res["per_image"]) == 1
