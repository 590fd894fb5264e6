"""Representative tiles on a tiny generated dataset: counts, class awareness, dedup, cache, embedders, outputs."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from autoseg.config import DataConfig, RepsConfig
from autoseg.data import IGNORE, scan_dataset
from autoseg.errors import InputError
from autoseg.reps import (
    CNNEmbedder,
    HandcraftedEmbedder,
    build_reps,
    class_aware_swap,
    class_counts,
    dedup,
    kmeans,
    load_resnet18,
    pca,
    pick_per_cluster,
    rarity,
    rep_arrays,
    resnet18,
    write_contact_sheet,
    write_manifest,
    write_tile_pngs,
)
from autoseg.tiles import build_index, crop, window_starts

SIZE, TILE = 64, 16
RARE = 3


def _make_dataset(root: Path) -> tuple[Path, Path]:
    """4 images of 64x64: classes 0-2 in textured regions, class 3 in one 6x6 patch of image 0,
    and image 3 an exact copy of image 2 (16 duplicate tiles)."""
    rng = np.random.default_rng(0)
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    colours = np.array([[40, 60, 40], [200, 190, 170], [60, 140, 60], [220, 30, 30]])
    for i in range(4):
        if i == 3:
            for sub in (images, masks):
                (sub / "img3.png").write_bytes((sub / "img2.png").read_bytes())
            continue
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[:, SIZE // 2 + 8 * (i - 1) :] = 1
        mask[SIZE // 2 + 8 * i :, : SIZE // 2] = 2
        if i == 0:
            mask[41:47, 9:15] = RARE
        img = colours[mask] + rng.normal(0, 12, size=(SIZE, SIZE, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(images / f"img{i}.png")
        Image.fromarray(mask).save(masks / f"img{i}.png")
    return images, masks


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("reps_data")
    images, masks = _make_dataset(root)
    ds = scan_dataset(images, masks, DataConfig())
    index = build_index(ds.sizes, TILE, 0.0)
    return ds, index


def test_counts_per_cluster(data, tmp_path):
    ds, index = data
    assert len(index) == 64
    cfg = RepsConfig(num_reps=6, reps_per_cluster=2, class_aware=False)
    reps = build_reps(ds, index, cfg, seed=0, cache_dir=tmp_path)
    assert len(reps.rows) == 6 and reps.n_clusters == 3
    assert np.bincount(reps.cluster).tolist() == [2, 2, 2]
    assert reps.n_tiles == 64
    # The coordinates are those of the chosen TileIndex rows.
    assert np.array_equal(reps.image, index.image[reps.rows])
    assert np.array_equal(reps.y, index.y[reps.rows]) and np.array_equal(reps.x, index.x[reps.rows])
    assert reps.class_hist.shape == (6, ds.class_map.num_classes)
    assert np.allclose(reps.class_hist.sum(axis=1), 1.0)

    # Surplus (7 reps from 4 clusters of 2) is trimmed; asking for more than there are takes all.
    assert len(build_reps(ds, index, RepsConfig(num_reps=7, reps_per_cluster=2), 0, tmp_path).rows) == 7
    every = build_reps(ds, index, RepsConfig(num_reps=1000), 0, tmp_path)
    assert len(every.rows) == every.n_after_dedup == len(np.unique(every.rows))


def test_class_aware_keeps_rare_class(data, tmp_path):
    ds, index = data
    assert ds.class_map.num_classes == 4
    missed = [
        not (build_reps(ds, index, RepsConfig(num_reps=4, class_aware=False), seed, tmp_path).class_hist > 0)
        .any(axis=0).all()
        for seed in range(3)
    ]
    assert any(missed), "the test data must make class awareness matter"
    for seed in range(3):
        reps = build_reps(ds, index, RepsConfig(num_reps=4, class_aware=True), seed, tmp_path)
        assert len(reps.rows) == 4
        assert (reps.class_hist > 0).any(axis=0).all(), "every class, the rare one included, has a rep"
        rare = reps.rows[reps.class_hist[:, RARE] > 0]
        assert set(index.image[rare].tolist()) == {0}


def test_class_aware_swap_never_drops_a_sole_class():
    # 5 tiles, 3 classes; reps are tiles 0 and 1; class 2 appears only in tile 4.
    frac = np.array([[1.0, 0, 0], [0, 1.0, 0], [0.5, 0.5, 0], [1.0, 0, 0], [0.2, 0.1, 0.7]])
    chosen, cluster, dist = np.array([0, 1]), np.array([0, 1]), np.array([0.1, 0.5])
    sizes = np.array([10, 90])  # cluster 1 is the largest: its rep goes, though it alone has class 1...
    out, out_cluster, _ = class_aware_swap(chosen, cluster, dist, frac, sizes, lambda row: (1, 0.0))
    # ...which is fine only because the new tile (4) also holds class 1.
    assert sorted(out.tolist()) == [0, 4] and (frac[out] > 0).any(axis=0).all()
    assert out_cluster[out.tolist().index(4)] == 1
    frac[4] = [0.3, 0, 0.7]  # now removing tile 1 would lose class 1: tile 0 must go instead
    out, _, _ = class_aware_swap(chosen, cluster, dist, frac, sizes, lambda row: (0, 0.0))
    assert sorted(out.tolist()) == [1, 4]


def test_dedup_removes_exact_duplicates(data, tmp_path):
    ds, index = data
    reps = build_reps(ds, index, RepsConfig(num_reps=8, dedup_threshold=0.0), 0, tmp_path)
    assert reps.n_after_dedup <= reps.n_tiles - 16  # image 3 repeats image 2
    # Pure: exact and near duplicates.
    z = np.random.default_rng(0).normal(size=(50, 7)).astype(np.float32)
    zz = np.concatenate([z, z[:10], z[:5] + 1e-6])
    assert len(dedup(zz, 0.0)) == 55
    kept = dedup(zz, 1e-3)
    assert 50 <= len(kept) <= 55 and np.array_equal(kept[:50], np.arange(50))


def test_cache_reused_and_keyed(data, tmp_path, caplog):
    ds, index = data
    cfg = RepsConfig(num_reps=5)
    first = build_reps(ds, index, cfg, 0, tmp_path)
    files = list(tmp_path.glob("reps-*.npz"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="autoseg.reps"):
        again = build_reps(ds, index, cfg, 0, tmp_path)
    assert "loaded from cache" in caplog.text
    assert files[0].stat().st_mtime_ns == mtime
    assert np.array_equal(first.rows, again.rows) and np.array_equal(first.cluster, again.cluster)
    assert np.array_equal(first.class_hist, again.class_hist) and first.n_clusters == again.n_clusters

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="autoseg.reps"):
        build_reps(ds, index, RepsConfig(num_reps=6), 0, tmp_path)  # another setting
        build_reps(ds, index, cfg, 1, tmp_path)  # another seed
    assert "loaded from cache" not in caplog.text
    assert len(list(tmp_path.glob("reps-*.npz"))) == 3
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temp files

    # A changed image file (new mtime) is a different dataset.
    img = ds.pairs[0].image
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="autoseg.reps"):
            build_reps(ds, index, cfg, 0, tmp_path)
        assert "loaded from cache" not in caplog.text
    finally:
        os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_cnn_embedder_random_weights(data, tmp_path):
    ds, index = data
    reps = build_reps(ds, index, RepsConfig(num_reps=5, embedder="cnn"), 0, tmp_path)
    assert len(reps.rows) == 5 and (reps.class_hist > 0).any(axis=0).all()
    img = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    ys, xs = np.array([0, 8, 24]), np.array([0, 30, 34])
    a = CNNEmbedder(None, seed=3).embed(img, ys, xs, TILE)
    b = CNNEmbedder(None, seed=3).embed(img, ys, xs, TILE)
    c = CNNEmbedder(None, seed=4).embed(img, ys, xs, TILE)
    assert a.shape == (3, 64) and np.array_equal(a, b) and not np.array_equal(a, c)


def test_missing_weights_file_is_input_error(data, tmp_path):
    ds, index = data
    missing = tmp_path / "nope.pt"
    cfg = RepsConfig(embedder="cnn", embedder_weights=missing)
    with pytest.raises(InputError, match=r"reps\.embedder_weights.*nope\.pt"):
        build_reps(ds, index, cfg, 0, tmp_path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match=r"reps\.embedder_weights.*junk\.pt"):
        CNNEmbedder(junk, 0)


def test_resnet18_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    model = resnet18().eval()
    sd = model.state_dict()
    # torchvision's resnet18 layout: 122 entries, these names among them.
    assert len(sd) == 122
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.conv2.weight", "layer2.0.downsample.0.weight",
                "layer4.1.bn2.num_batches_tracked", "fc.bias"):
        assert key in sd
    path = tmp_path / "resnet18.pt"
    torch.save(sd, path)
    loaded = load_resnet18(path).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    emb = CNNEmbedder(path, seed=0)
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert emb.embed(img, np.array([0]), np.array([0]), 32).shape == (1, 512)
    assert emb.key().startswith("resnet18:")

    broken = dict(sd)
    broken.pop("layer3.1.conv1.weight")
    bad = tmp_path / "broken.pt"
    torch.save(broken, bad)
    with pytest.raises(InputError, match=r"reps\.embedder_weights.*broken\.pt.*layer3\.1\.conv1\.weight"):
        load_resnet18(bad)


def test_outputs_written(data, tmp_path):
    ds, index = data
    reps = build_reps(ds, index, RepsConfig(num_reps=7), 0, tmp_path / "index")
    write_manifest(ds, reps, tmp_path / "reps" / "manifest.csv")
    with open(tmp_path / "reps" / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "x", "y", "size", "cluster", "class_hist"]
    assert len(rows) == 7
    assert {r["image"] for r in rows} <= {p.image.name for p in ds.pairs}
    assert all(len(json.loads(r["class_hist"])) == 4 and r["size"] == str(TILE) for r in rows)

    write_contact_sheet(ds, reps, tmp_path / "reps" / "contact_sheet.png")
    with Image.open(tmp_path / "reps" / "contact_sheet.png") as im:
        assert im.mode == "RGB" and im.width >= 7 * 64 and im.height >= 64

    write_tile_pngs(ds, reps, tmp_path / "reps" / "tiles")
    pngs = sorted((tmp_path / "reps" / "tiles").glob("*.png"))
    assert len(pngs) == 14 and len([p for p in pngs if p.name.endswith("_mask.png")]) == 7
    with Image.open(pngs[0]) as im:
        assert im.size == (TILE, TILE)

    x, y, groups = rep_arrays(ds, reps)
    assert x.shape == (7, 3, TILE, TILE) and x.dtype == np.float32
    assert y.shape == (7, TILE, TILE) and y.dtype == np.int64 and groups.dtype == np.int64
    assert np.array_equal(groups, reps.image)
    assert set(np.unique(y).tolist()) <= {0, 1, 2, 3}


def test_contact_sheet_many_tiles_stays_a_grid(data, tmp_path):
    ds, index = data
    reps = build_reps(ds, index, RepsConfig(num_reps=1000, dedup_threshold=0.0), 0, tmp_path)
    # Repeat the rows to simulate a large set: 20 columns, 64 px cells.
    idx = np.tile(np.arange(len(reps.rows)), 5)[:230]
    big = type(reps)(reps.tile, reps.rows[idx], reps.image[idx], reps.y[idx], reps.x[idx], reps.cluster[idx],
                     reps.class_hist[idx], reps.n_tiles, reps.n_after_dedup, reps.n_clusters)
    write_contact_sheet(ds, big, tmp_path / "sheet.png")
    with Image.open(tmp_path / "sheet.png") as im:
        assert 20 * 64 <= im.width < 20 * 80
        assert im.height >= 12 * 64


def test_handcrafted_features_and_class_counts_are_exact():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (50, 61, 3), dtype=np.uint8)
    mask = rng.integers(-1, 3, (50, 61)).astype(np.int32)
    tile = 16
    ys0, xs0 = window_starts(50, tile, 12), window_starts(61, tile, 12)  # snapped, unaligned last starts
    ys, xs = np.repeat(ys0, len(xs0)), np.tile(xs0, len(ys0))
    feats = HandcraftedEmbedder().embed(img, ys, xs, tile)
    counts = class_counts(mask, ys, xs, tile, 3)
    for k in range(len(ys)):
        t = crop(img, ys[k], xs[k], tile, 0).reshape(-1, 3).astype(np.float64)
        assert np.allclose(feats[k, :3], t.mean(axis=0) / 255, atol=1e-6)
        assert np.allclose(feats[k, 3:6], t.std(axis=0) / 255, atol=1e-5)
        m = crop(mask, ys[k], xs[k], tile, IGNORE)
        assert counts[k].tolist() == np.bincount(m[m >= 0], minlength=3).tolist()
    # An image smaller than the tile is padded (IGNORE is not counted).
    small = class_counts(np.ones((5, 7), np.int32), np.array([0]), np.array([0]), tile, 2)
    assert small.tolist() == [[0, 35]]
    gray = HandcraftedEmbedder().embed(img[:, :, :1], ys, xs, tile)
    assert gray.shape == (len(ys), sum(HandcraftedEmbedder().groups(1)))


def test_pick_per_cluster_trims_and_fills():
    labels = np.array([0, 0, 0, 1, 1, 2])
    dist = np.array([0.3, 0.1, 0.2, 0.5, 0.4, 0.0])
    flat = np.zeros(6)  # no tile rarer than another: the nearest to each centre
    assert sorted(pick_per_cluster(labels, dist, flat, 1, 3).tolist()) == [1, 4, 5]
    # Two per cluster but cluster 2 has one member: made up from the next ranks.
    assert sorted(pick_per_cluster(labels, dist, flat, 2, 5).tolist()) == [1, 2, 3, 4, 5]
    assert sorted(pick_per_cluster(labels, dist, flat, 2, 4).tolist()) == [1, 2, 4, 5]


def test_pick_per_cluster_prefers_rare_classes_among_the_typical_tiles():
    labels = np.zeros(6, dtype=int)
    dist = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    counts = np.array([[100, 0], [100, 0], [90, 10], [100, 0], [100, 0], [0, 100]])  # class 1 is rare
    score = rarity(counts)
    assert score[5] > score[2] > score[0] == score[1]
    # Tile 5 is the rarest but the least typical (outside the nearer half); tile 2 is inside it.
    assert pick_per_cluster(labels, dist, score, 1, 1).tolist() == [2]
    assert pick_per_cluster(labels, dist, score, 2, 2).tolist() == [2, 0]
    assert pick_per_cluster(labels, dist, score, 1, 1, pool=1.0).tolist() == [5]


def test_outputs_name_files_whose_names_are_not_utf8(data, tmp_path):
    # autoseg.data refuses such names at the door now; a Dataset that holds them (an older run's, or a library
    # caller's) must still get its manifest, tiles and sheet written, the names escaped where text holds them.
    ds, index = data
    odd = os.fsdecode(b"caf\xe9")  # Latin-1 "café": not UTF-8, so Python reads the byte as a lone surrogate
    folder = tmp_path / os.fsdecode(b"data\xff")
    pairs = []
    for p in ds.pairs:
        for sub in ("images", "masks"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        image = folder / "images" / f"{odd}{p.stem}.png"
        mask = folder / "masks" / f"{odd}{p.stem}.png"
        image.write_bytes(p.image.read_bytes())
        mask.write_bytes(p.mask.read_bytes())
        pairs.append(dataclasses.replace(p, stem=f"{odd}{p.stem}", image=image, mask=mask))
    ds = dataclasses.replace(ds, pairs=pairs)
    reps = build_reps(ds, index, RepsConfig(num_reps=7), 0, tmp_path / "index")
    write_manifest(ds, reps, tmp_path / "manifest.csv")
    with open(tmp_path / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 7 and all(r["image"].startswith("caf\\xe9img") for r in rows)
    write_tile_pngs(ds, reps, tmp_path / "tiles")
    assert len(os.listdir(os.fsencode(tmp_path / "tiles"))) == 14  # named as the OS names the images
    write_contact_sheet(ds, reps, tmp_path / "sheet.png")


def test_pca_finds_the_strong_axes_and_kmeans_is_fixed_by_the_seed():
    rng = np.random.default_rng(0)
    # 3 strong axes in 40 features, the rest noise: the top 3 components span them.
    basis = np.linalg.qr(rng.normal(size=(40, 3)))[0]
    z = (rng.normal(size=(3000, 3)) * [9.0, 6.0, 4.0] @ basis.T + rng.normal(size=(3000, 40)) * 0.1 + 5.0)
    mean, comp = pca(z.astype(np.float32), 3, seed=0)
    assert comp.shape == (40, 3) and np.allclose(mean, z.mean(axis=0), atol=1e-3)
    assert np.allclose(np.abs(np.linalg.svd(comp.T @ basis)[1]), 1.0, atol=1e-3)  # same subspace
    assert np.array_equal(pca(z[:, :3], 8)[1], np.eye(3))  # fewer features than dims: kept as they are
    few = z[:5]  # fewer tiles than dims (a tiny dataset): as many axes as they span, no error
    mean, comp = pca(few, 8)
    assert comp.shape == (z.shape[1], 5) and np.isfinite(comp).all()

    blobs = (rng.normal(size=(6, 5)) * 10)[rng.integers(6, size=600)] + rng.normal(size=(600, 5))
    labels, centres = kmeans(blobs.astype(np.float32), 6, seed=1)
    again, _ = kmeans(blobs.astype(np.float32), 6, seed=1)
    assert np.array_equal(labels, again) and centres.shape == (6, 5)
    assert len(np.unique(labels)) == 6  # k-means++ seeding finds every well-separated blob
