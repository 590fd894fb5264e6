"""Representative-tile selection at scale: ~100k tiles in under a minute, in under 2 GB.

    python -m benchmarks.bench_tiles [--tiles 100000 --tile 128 --reps 200 --baseline-sample 64]

Synthesises 1024x1024 RGB images with class masks on disk, then times build_index + build_reps
with the handcrafted embedder (imports warmed up first; the dataset scan is reported separately).
For scale, it times a ResNet-18 (plain torch, random weights) on a sample of 224x224 tiles and
extrapolates to every tile. Exit code 1 if a target is missed. Results go to benchmarks/results/tiles.md.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from autoseg.config import DataConfig, RepsConfig
from autoseg.data import load_pair, scan_dataset
from autoseg.reps import build_reps, resnet18
from autoseg.tiles import build_index, stride_for, window_starts
from benchmarks import write_results

TARGET_SECONDS = 60.0
TARGET_RSS_GB = 2.0
TARGET_RATIO = 50.0
RESULTS = Path(__file__).resolve().parent / "results" / "tiles.md"
N_CLASSES = 6  # class 5 is rare: one small patch in one image


def synthesise(folder: Path, n_images: int, size: int, seed: int = 0) -> None:
    """Images made of textured class regions (blocky Voronoi cells), plus exact copies for dedup."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir(parents=True)
    base = rng.integers(40, 216, size=(N_CLASSES, 3))
    amp = np.array([6, 20, 40, 12, 30, 25])
    textures = []
    for c in range(N_CLASSES):
        noise = rng.normal(0, amp[c], size=(size // 4, size // 4, 3))
        tex = np.repeat(np.repeat(noise, 4, axis=0), 4, axis=1) + rng.normal(0, 4, size=(size, size, 3))
        if c % 2:  # stripes on half of the classes: orientation features see them
            tex += 25 * np.sin(np.arange(size) / (3 + c))[None, :, None]
        textures.append(np.clip(base[c] + tex, 0, 255).astype(np.uint8))
    cells = 8
    for i in range(n_images):
        if i % 10 == 9:  # every tenth image repeats the previous one exactly
            prev = f"{i - 1:04d}.png"
            for sub in ("images", "masks"):
                (folder / sub / f"{i:04d}.png").write_bytes((folder / sub / prev).read_bytes())
            continue
        seeds = rng.integers(0, size, size=(cells, 2))
        labels = rng.integers(0, N_CLASSES - 1, size=cells)
        labels[: N_CLASSES - 1] = np.arange(N_CLASSES - 1)  # every common class in every image
        coarse = np.arange(0, size, 16)
        yy, xx = np.meshgrid(coarse, coarse, indexing="ij")
        d = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
        lab = labels[np.argmin(d, axis=2)]
        mask = np.repeat(np.repeat(lab, 16, axis=0), 16, axis=1).astype(np.uint8)
        if i == 0:
            mask[200:240, 300:340] = N_CLASSES - 1
        shift = rng.integers(0, size, size=2)
        img = np.empty((size, size, 3), np.uint8)
        for c in range(N_CLASSES):
            sel = mask == c
            img[sel] = np.roll(textures[c], tuple(shift), axis=(0, 1))[sel]
        Image.fromarray(img).save(folder / "images" / f"{i:04d}.png", compress_level=1)
        Image.fromarray(mask).save(folder / "masks" / f"{i:04d}.png", compress_level=1)


def peak_rss_gb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb * 1024 / 1e9


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def resnet_seconds_per_tile(ds, sample: int, batch: int = 16) -> float:
    """Mean ResNet-18 forward time per 224x224 tile (CPU, no_grad), after one warm-up batch."""
    import torch

    torch.manual_seed(0)
    model = resnet18().eval()
    image, _ = load_pair(ds, 0)
    rng = np.random.default_rng(0)
    h, w = image.shape[:2]
    crops = [
        image[y : y + 224, x : x + 224]
        for y, x in zip(rng.integers(0, h - 224, sample), rng.integers(0, w - 224, sample), strict=True)
    ]
    x = torch.from_numpy(np.stack(crops).transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    with torch.no_grad():
        model(x[:batch])
        t0 = time.perf_counter()
        for lo in range(0, sample, batch):
            model(x[lo : lo + batch])
        return (time.perf_counter() - t0) / sample


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=100_000, help="approximate number of tiles")
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--baseline-sample", type=int, default=64, help="tiles timed through ResNet-18")
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--overlap", type=float, default=0.75)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    stride = stride_for(args.tile, args.overlap)
    per_image = len(window_starts(args.image_size, args.tile, stride)) ** 2
    n_images = max(1, math.ceil(args.tiles / per_image))
    with tempfile.TemporaryDirectory(prefix="bench_tiles_") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        synthesise(root / "data", n_images, args.image_size)
        t_synth = time.perf_counter() - t
        print(f"synthesised {n_images} images of {args.image_size}px in {t_synth:.1f}s", flush=True)

        t = time.perf_counter()
        ds = scan_dataset(root / "data" / "images", root / "data" / "masks", DataConfig())
        t_scan = time.perf_counter() - t
        import sklearn.cluster  # noqa: F401  -- warm the import: it is not part of the work measured

        rss_before = psutil.Process().memory_info().rss / 1e9
        load_before = os.getloadavg()[0]
        cfg = RepsConfig(num_reps=args.reps)
        t = time.perf_counter()
        index = build_index(ds.sizes, args.tile, args.overlap)
        reps = build_reps(ds, index, cfg, seed=0, cache_dir=root / "index")
        t_ours = time.perf_counter() - t
        rss_peak = peak_rss_gb()
        t = time.perf_counter()
        build_reps(ds, index, cfg, seed=0, cache_dir=root / "index")
        t_cached = time.perf_counter() - t
        covered = int((reps.class_hist > 0).any(axis=0).sum())
        n_tiles = len(index)
        print(f"index+select: {n_tiles} tiles in {t_ours:.1f}s ({n_tiles / t_ours:,.0f} tiles/s), "
              f"peak RSS {rss_peak:.2f} GB; cached rerun {t_cached:.2f}s", flush=True)

        per_tile = resnet_seconds_per_tile(ds, args.baseline_sample)
        t_resnet = per_tile * n_tiles
        ratio = t_resnet / t_ours
        print(f"ResNet-18 224px: {per_tile * 1000:.1f} ms/tile -> {t_resnet:,.0f}s for all tiles "
              f"(ratio {ratio:,.0f}x)", flush=True)

    checks = [
        ("index+select time", f"{t_ours:.1f} s", f"<= {TARGET_SECONDS:.0f} s", t_ours <= TARGET_SECONDS),
        ("peak RSS", f"{rss_peak:.2f} GB", f"<= {TARGET_RSS_GB:.0f} GB", rss_peak <= TARGET_RSS_GB),
        ("ResNet-18 time / ours", f"{ratio:,.0f}x", f">= {TARGET_RATIO:.0f}x", ratio >= TARGET_RATIO),
    ]
    for name, value, target, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {value} (target {target})")

    import torch

    lines = [
        "# Representative-tile selection benchmark",
        "",
        f"`python -m benchmarks.bench_tiles --tiles {args.tiles} --tile {args.tile} --reps {args.reps} "
        f"--baseline-sample {args.baseline_sample}`",
        "",
        "| check | value | target | result |",
        "| --- | --- | --- | --- |",
        *[f"| {n} | {v} | {t} | {'PASS' if ok else 'FAIL'} |" for n, v, t, ok in checks],
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| images | {n_images} x {args.image_size}x{args.image_size} RGB PNG, {N_CLASSES} classes |",
        f"| tiles | {n_tiles:,} ({args.tile} px, overlap {args.overlap}) |",
        f"| after de-duplication | {reps.n_after_dedup:,} |",
        f"| clusters / representatives | {reps.n_clusters} / {len(reps.rows)} |",
        f"| classes covered by the representatives | {covered} of {N_CLASSES} |",
        f"| dataset scan (not in the timed phase) | {t_scan:.1f} s |",
        f"| build_index + build_reps (handcrafted) | {t_ours:.1f} s |",
        f"| throughput | {n_tiles / t_ours:,.0f} tiles/s |",
        f"| rerun from cache | {t_cached:.2f} s |",
        f"| RSS before the phase / peak | {rss_before:.2f} GB / {rss_peak:.2f} GB |",
        f"| ResNet-18, 224 px, batch 16, CPU | {per_tile * 1000:.1f} ms/tile "
        f"(sample of {args.baseline_sample}) |",
        f"| ResNet-18 extrapolated to all tiles | {t_resnet:,.0f} s |",
        "",
        "Machine: "
        f"{platform.platform()}, {cpu_model()}, {os.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM; Python {platform.python_version()}, "
        f"numpy {np.__version__}, torch {torch.__version__}, {torch.get_num_threads()} torch threads; "
        f"1-minute load average {load_before:.1f} when the timed phase started (other jobs share the CPUs).",
        "",
        "The timed phase includes decoding every image and mask; library imports are warmed up first.",
        "",
    ]
    write_results(args.out, "\n".join(lines))
    print(f"wrote {args.out}")
    return 0 if all(ok for *_, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
