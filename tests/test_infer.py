"""Full-image inference: window grid, Gaussian blending, whole vs windows, torch vs onnxruntime, evaluate."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from autoseg import infer
from autoseg.config import DataConfig
from autoseg.data import scan_dataset
from autoseg.errors import InputError
from autoseg.export import onnx_bytes
from autoseg.infer import (
    evaluate,
    normalize,
    ort_runner,
    predict,
    predict_bands,
    predict_labels,
    predict_whole,
    predict_windows,
    torch_runner,
    whole_pixel_limit,
    window_bands,
    window_grid,
)
from autoseg.metrics import confusion_matrix
from autoseg.unet import Arch, build_unet
from edge_agent.predict import WIDTH_GUESS, gaussian_weights, pad_mode


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
    assert not g.flags.writeable  # cached and shared: a caller must not change it


def test_host_and_device_share_one_window_blending_and_png_writer():
    # autoseg predict/eval and `edge-agent predict` label alike because they run the same code, not a copy.
    import autoseg.predict
    import edge_agent.predict

    assert infer.window_bands is edge_agent.predict.window_bands
    assert infer.predict_whole is edge_agent.predict.predict_whole
    assert autoseg.predict.PngRows is edge_agent.predict.PngRows


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


# ---------------------------------------------------------------- bands of rows: memory bounded by the window


def _one_accumulator(run, x, tile, overlap, batch, weights=None):
    """The former predict_windows: one K x H x W accumulator over the whole (padded) image."""
    _, h, w = x.shape
    hp, wp = max(h, tile), max(w, tile)
    xp = np.pad(x, ((0, 0), (0, hp - h), (0, wp - w)), mode=pad_mode(h, w, hp, wp))
    wmap = gaussian_weights(tile) if weights is None else np.asarray(weights, np.float32)
    corners = window_grid(hp, wp, tile, overlap)
    acc = None
    wsum = np.zeros((hp, wp), np.float32)
    for i in range(0, len(corners), batch):
        chunk = corners[i : i + batch]
        out = run(np.stack([xp[:, y : y + tile, x0 : x0 + tile] for y, x0 in chunk]))
        if acc is None:
            acc = np.zeros((out.shape[1], hp, wp), np.float32)
        for (y, x0), o in zip(chunk, out, strict=True):
            acc[:, y : y + tile, x0 : x0 + tile] += o * wmap
            wsum[y : y + tile, x0 : x0 + tile] += wmap
    acc /= wsum
    return acc[:, :h, :w]


def _mixer(classes: int, seed: int = 0):
    """A RunFn with spatial context and `classes` outputs, in numpy: a 3x3 box blur, then a 1x1 mix."""
    mix = np.random.default_rng(seed).standard_normal((classes, 3)).astype(np.float32)

    def run(x: np.ndarray) -> np.ndarray:
        p = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        blur = sum(p[:, :, dy : dy + x.shape[2], dx : dx + x.shape[3]] for dy in range(3) for dx in range(3)) / 9
        return np.einsum("kc,nchw->nkhw", mix, blur).astype(np.float32)

    return run


@pytest.mark.parametrize(
    ("h", "w", "tile", "overlap", "batch"),
    [
        (157, 203, 32, 0.25, 5),  # stride 24: neither side a multiple of it; batches straddle window rows
        (101, 77, 32, 0.5, 64),  # one batch holds every window
        (130, 40, 32, 0.0, 1),  # no overlap
        (70, 90, 16, 0.9, 7),  # stride 2: each pixel in 64 windows, the ring wraps every 8 rows
        (20, 50, 32, 0.5, 3),  # shorter than a tile: padded rows
        (50, 20, 32, 0.5, 3),  # narrower than a tile
        (5, 6, 32, 0.5, 3),  # smaller than a tile both ways: zero padding
    ],
)
def test_bands_of_rows_equal_one_whole_accumulator(h, w, tile, overlap, batch):
    run = _mixer(7)
    x = _image(h, w, seed=3)
    ref = _one_accumulator(run, x, tile, overlap, batch)
    np.testing.assert_allclose(predict_windows(run, x, tile, overlap, batch), ref, rtol=1e-6, atol=1e-6)
    bands = list(window_bands(run, lambda a, b: x[:, a:b], h, w, tile, overlap, batch))
    assert [y0 for y0, _ in bands] == list(np.cumsum([0] + [b.shape[1] for _, b in bands[:-1]]))
    assert all(b.shape[1] <= tile for _, b in bands) and sum(b.shape[1] for _, b in bands) == h
    joined = np.concatenate([b for _, b in bands], axis=1)
    np.testing.assert_allclose(joined, ref, rtol=1e-6, atol=1e-6)
    assert np.array_equal(joined.argmax(0), ref.argmax(0))
    uniform = np.ones((tile, tile), np.float32)
    np.testing.assert_allclose(predict_windows(run, x, tile, overlap, batch, uniform),
                               _one_accumulator(run, x, tile, overlap, batch, uniform), rtol=1e-6, atol=1e-6)


def test_labels_from_the_uint8_image_a_band_at_a_time_equal_the_whole_path():
    run = _mixer(5, seed=1)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (83, 61, 3), dtype=np.uint8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    ref = _one_accumulator(run, normalize(image, mean, std), 16, 0.5, 4)
    got = np.concatenate([b for _, b in predict_bands(run, image, mean, std, "window", 16, 0.5, 4, 1)], axis=1)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    labels = list(predict_labels(run, image, mean, std, "window", 16, 0.5, 4, 1))
    assert all(b.dtype == np.uint8 for _, b in labels)
    assert np.array_equal(np.concatenate([b for _, b in labels]), ref.argmax(0))
    whole = list(predict_labels(run, image, mean, std, "whole", 16, 0.5, 4, 1))
    assert len(whole) == 1 and np.array_equal(whole[0][1], predict_whole(run, normalize(image, mean, std), 1).argmax(0))
    with pytest.raises(InputError, match="channel"):  # at the call, before a band is computed
        predict_labels(run, image[..., :1], mean, std, "window", 16, 0.5, 4, 1)
    with pytest.raises(InputError, match=r"eval\.mode"):
        predict_labels(run, image, mean, std, "tiles", 16, 0.5, 4, 1)


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_labelling_holds_a_band_of_logits_not_classes_x_h_x_w():
    """`autoseg predict` peaked at 5.1 GB on a 6000x4000 image with 24 classes: K x H x W float32 logits,
    plus the float32 copy of the whole normalised image."""
    k, tile, w = 16, 32, 256
    run = _mixer(k)
    small = np.random.default_rng(0).integers(0, 256, (512, w, 3), dtype=np.uint8)
    big = np.concatenate([small] * 4)  # 2048 x 256: four times the rows

    def label(image):
        for _ in predict_labels(run, image, (0.5,) * 3, (0.25,) * 3, "window", tile, 0.5, 8, 1):
            pass

    band = k * tile * w * 4  # one ring of float32 sums
    peaks = [_peak_bytes(lambda im=im: label(im)) for im in (small, big)]
    assert peaks[1] < 8 * band < k * big.shape[0] * w * 4 / 4  # the whole image's logits would be 32 MB
    assert peaks[1] < 1.2 * peaks[0]  # four times the rows, the same peak


def test_auto_runs_whole_images_only_while_the_pass_is_small():
    # A 24-class net with 16 channels at full resolution: 2000 x 2000 took 1.65 GB in one onnxruntime pass.
    assert whole_pixel_limit(3, 24, 16) < 1000 * 1000 < 2000 * 2000
    assert whole_pixel_limit(3, 2, 8) > whole_pixel_limit(3, 24, 64)  # narrower nets, fewer classes: bigger
    assert whole_pixel_limit(3, 2, None) == whole_pixel_limit(3, 2, WIDTH_GUESS)
    assert whole_pixel_limit(1, 2, 1) == infer.WHOLE_MAX_PIXELS  # never above the pixel cap
    calls: list[tuple[int, ...]] = []

    def run(x: np.ndarray) -> np.ndarray:
        calls.append(x.shape)
        return np.repeat(x[:, :1], 2, axis=1)

    image = np.zeros((40, 30, 3), np.uint8)
    list(predict_bands(run, image, (0.5,) * 3, (0.5,) * 3, "auto", 16, 0.0, 4, 1, whole_max_pixels=1200))
    assert calls == [(1, 3, 40, 30)]
    calls.clear()
    list(predict_bands(run, image, (0.5,) * 3, (0.5,) * 3, "auto", 16, 0.0, 4, 1, whole_max_pixels=1199))
    assert all(c[-2:] == (16, 16) for c in calls)


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


def test_evaluation_scores_a_band_at_a_time(tmp_path):
    """A 10000 x 10000 test image pushed evaluation past 10.5 GB: K x H x W logits, float32 image, int64 argmax."""
    k, h, w = 16, 2048, 256
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "img" / "a.png")
    Image.fromarray((np.arange(w)[None, :] // 16 % k + np.zeros((h, 1), int)).astype(np.uint8)).save(
        tmp_path / "msk" / "a.png")
    ds = scan_dataset(tmp_path / "img", tmp_path / "msk", DataConfig(ignore_index=None))
    assert ds.class_map.num_classes == k
    run = _mixer(k)
    seen = []
    res: dict = {}

    def score():
        res.update(evaluate(run, ds, [0], "window", 32, 0.5, 8, 1,
                            on_prediction=lambda i, image, mask, pred: seen.append((mask.dtype, pred.dtype))))

    peak = _peak_bytes(score)
    assert peak < 12 * h * w  # bytes a pixel: image 3, raw mask 1, mask 1, prediction 1, and a band
    assert seen == [(np.int8, np.uint8)]
    # The same scores as labelling the whole image at once.
    image = np.asarray(Image.open(tmp_path / "img" / "a.png"))
    pred = _one_accumulator(run, normalize(image, ds.mean, ds.std), 32, 0.5, 8).argmax(0)
    mask = np.asarray(Image.open(tmp_path / "msk" / "a.png")).astype(np.int64)
    assert res["confusion"] == confusion_matrix(pred, mask, k).tolist()
