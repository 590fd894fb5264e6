import tracemalloc

import numpy as np
import pytest

from autoseg.errors import InputError
from autoseg.tiles import TileIndex, build_index, crop, stride_for, window_starts


def test_stride_for_rounds_and_is_at_least_one():
    assert stride_for(64, 0.0) == 64
    assert stride_for(64, 0.25) == 48
    assert stride_for(64, 0.5) == 32
    assert stride_for(10, 0.33) == 7
    assert stride_for(8, 0.99) == 1


@pytest.mark.parametrize("overlap", [-0.1, 1.0, 1.5])
def test_overlap_outside_unit_interval_is_rejected(overlap):
    with pytest.raises(InputError, match=r"^tiles\.overlap: must be in \[0, 1\)"):
        stride_for(64, overlap)
    with pytest.raises(InputError, match=r"tiles\.overlap"):
        build_index([(100, 100)], 32, overlap)


def test_window_starts_snap_last_window_to_border():
    assert window_starts(100, 32, 24).tolist() == [0, 24, 48, 68]
    assert window_starts(96, 32, 32).tolist() == [0, 32, 64]  # exact fit: no extra window
    assert window_starts(32, 32, 8).tolist() == [0]
    assert window_starts(20, 32, 8).tolist() == [0]  # smaller than the tile: one padded window


def test_window_starts_cover_every_pixel():
    rng = np.random.default_rng(0)
    for _ in range(300):
        length = int(rng.integers(1, 300))
        tile = int(rng.integers(1, 80))
        stride = stride_for(tile, float(rng.uniform(0, 0.95)))
        starts = window_starts(length, tile, stride)
        covered = np.zeros(max(length, tile), dtype=bool)
        for s in starts:
            covered[s : s + tile] = True
        assert covered[:length].all()
        assert starts.min() >= 0
        assert starts.max() <= max(0, length - tile)
        assert np.all(np.diff(starts) > 0)
        assert np.all(np.diff(starts) <= stride)


def test_build_index_grid_covers_every_pixel_of_every_image():
    sizes = [(100, 70), (40, 40), (20, 50), (64, 64)]
    tile = 32
    index = build_index(sizes, tile, 0.25)
    assert isinstance(index, TileIndex)
    assert index.image.dtype == index.y.dtype == index.x.dtype == np.int32
    for i, (h, w) in enumerate(sizes):
        rows = index.for_image(i)
        assert rows.size == window_starts(h, tile, 24).size * window_starts(w, tile, 24).size
        assert np.all(index.image[rows] == i)
        covered = np.zeros((max(h, tile), max(w, tile)), dtype=bool)
        for y, x in zip(index.y[rows], index.x[rows], strict=True):
            covered[y : y + tile, x : x + tile] = True
        assert covered[:h, :w].all()
    assert len(index) == sum(index.for_image(i).size for i in range(len(sizes)))


def test_small_image_gets_one_window_padded_by_crop():
    index = build_index([(20, 30), (64, 64)], 32, 0.0)
    rows = index.for_image(0)
    assert rows.size == 1
    assert (index.y[rows[0]], index.x[rows[0]]) == (0, 0)
    img = np.arange(20 * 30 * 3, dtype=np.int64).reshape(20, 30, 3).astype(np.uint8)
    mask = np.ones((20, 30), dtype=np.int32)
    t_img = crop(img, 0, 0, 32, 0)
    t_mask = crop(mask, 0, 0, 32, -1)
    assert t_img.shape == (32, 32, 3) and t_img.dtype == np.uint8
    assert np.array_equal(t_img[:20, :30], img)
    assert (t_img[20:] == 0).all() and (t_img[:, 30:] == 0).all()
    assert t_mask.shape == (32, 32)
    assert (t_mask[:20, :30] == 1).all() and (t_mask[20:] == -1).all() and (t_mask[:, 30:] == -1).all()


def test_crop_inside_returns_a_copy_and_pads_past_any_border():
    a = np.arange(100, dtype=np.float32).reshape(10, 10)
    c = crop(a, 2, 3, 4, 0.0)
    assert np.array_equal(c, a[2:6, 3:7])
    c[:] = -5
    assert a[2, 3] == 23  # not a view
    edge = crop(a, 8, 8, 4, -1.0)
    assert np.array_equal(edge[:2, :2], a[8:, 8:])
    assert (edge[2:] == -1).all() and (edge[:, 2:] == -1).all()
    neg = crop(a, -2, -1, 4, 7.0)
    assert np.array_equal(neg[2:, 1:], a[:2, :3])
    assert (neg[:2] == 7).all() and (neg[:, :1] == 7).all()


def test_tile_larger_than_every_image_is_rejected():
    with pytest.raises(InputError) as e:
        build_index([(224, 224), (100, 200)], 512, 0.25)
    assert str(e.value) == (
        "tiles.size: 512 is larger than every image (largest is 224x224); use a smaller --tile"
    )
    # Larger than some images, or than one side only: fine, those windows are padded.
    assert len(build_index([(600, 100), (100, 100)], 512, 0.0)) == 3


def test_subset_of_images_is_indexed_in_id_order():
    sizes = [(64, 64), (32, 32), (96, 32), (32, 96)]
    index = build_index(sizes, 32, 0.0, images=[3, 1])
    assert sorted(set(index.image.tolist())) == [1, 3]
    assert np.all(np.diff(index.image) >= 0)
    assert index.for_image(0).size == 0
    assert index.for_image(1).size == 1
    assert index.for_image(3).size == 3
    assert len(build_index(sizes, 32, 0.0, images=[])) == 0


def test_index_of_100k_tiles_costs_a_few_megabytes():
    sizes = [(1000, 1000)] * 100  # 32 x 32 windows each -> 102 400 tiles
    tracemalloc.start()
    try:
        index = build_index(sizes, 32, 0.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(index) == 102_400
    nbytes = index.image.nbytes + index.y.nbytes + index.x.nbytes
    assert nbytes <= 12 * len(index)
    assert peak < 8 * 2**20
