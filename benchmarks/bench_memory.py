"""Peak memory of `autoseg predict` by image size: bounded by the window, not by the image.

    python -m benchmarks.bench_memory [--sizes 2000x2000,6000x4000,10000x10000 --tile 128 --baseline-max-mpx 25]

Net: a random 24-class U-Net, build_unet(Arch((3, 3), (8, 16)), 3, 24), exported with the project's
export_final and the metadata a run's best/model.onnx carries (colour-coded class map: masks come out RGB).
Images: one synthetic RGB PNG per size. Each size is labelled by `python -m autoseg predict MODEL --images DIR
--out DIR --overlap 0.25 -q` in a fresh process (--eval-mode auto; overlap 0.25 rather than predict's 0.5 to
halve the time: the memory does not depend on it); its peak RSS is the child's ru_maxrss from os.wait4, read
by a small launcher process, so no other process counts.

baseline  the same command on the code before banded inference (BASELINE_REF, extracted with git archive):
          one K x H x W float32 accumulator, a float32 copy of the image, masks encoded whole. It is run up
          to --baseline-max-mpx only (at 100 Mpx it needs over 10 GB).
ours      this checkout.

Targets: peak RSS <= 1 GB at every size, for a 24-class net; flat: from the smallest to the largest image, the
peak grows by at most 8 bytes per added pixel (the decoded image is held: Pillow keeps 4 bytes a pixel for
RGB). Exit code 1 if a target is missed. Results go to benchmarks/results/memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image

import autoseg
from autoseg.export import export_final
from autoseg.infer import whole_pixel_limit
from autoseg.unet import Arch, build_unet
from benchmarks import cpu_and_ram, write_results

ARCH = Arch(kernels=(3, 3), channels=(8, 16))  # small: 10000 x 10000 takes ~25k windows
NUM_CLASSES = 24
# The last commit whose predict held K x H x W logits (infer.predict_windows' whole-image accumulator).
BASELINE_REF = "aa89f159b4043c96d8dfba49527d44021a300732"
TARGET_GB = 1.0
TARGET_BYTES_PER_PIXEL = 8.0
ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results" / "memory.md"


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for part in text.split(","):
        w, _, h = part.strip().lower().partition("x")
        sizes.append((int(w), int(h)))
    return sizes


def build_model(path: Path, tile: int) -> None:
    torch.manual_seed(0)
    model = build_unet(ARCH, 3, NUM_CLASSES).eval()
    rng = np.random.default_rng(1)
    colours = rng.choice(256**3, NUM_CLASSES, replace=False)
    cmap = {"kind": "palette", "names": [f"class_{i}" for i in range(NUM_CLASSES)], "values": None,
            "colors": [[int(c >> 16), int(c >> 8 & 255), int(c & 255)] for c in colours],
            "ignore_index": None, "ignore_colors": []}
    meta = {"classes": json.dumps(cmap["names"]), "tile": str(tile), "mean": json.dumps([0.45, 0.45, 0.4]),
            "std": json.dumps([0.25, 0.25, 0.25]), "arch": ARCH.key(), "input_multiple": str(ARCH.multiple),
            "class_map": json.dumps(cmap)}
    export_final(model, path, 3, tile, meta)


def write_image(path: Path, w: int, h: int) -> None:
    """A smooth RGB scene (gradients and blocks: quick to encode and decode), saved as PNG."""
    rng = np.random.default_rng(w * 7 + h)
    blocks = rng.integers(0, 256, (h // 256 + 1, w // 256 + 1, 3), dtype=np.uint8)
    image = np.empty((h, w, 3), np.uint8)
    ramp = (np.arange(w) * 97 // max(1, w)).astype(np.uint8)
    for y0 in range(0, h, 256):
        band = np.repeat(np.repeat(blocks[y0 // 256 : y0 // 256 + 1], 256, axis=0), 256, axis=1)[:, :w]
        image[y0 : y0 + 256] = band[: min(256, h - y0)] // 2 + ramp[None, :, None]
    Image.MAX_IMAGE_PIXELS = None  # our own synthetic image
    Image.fromarray(image).save(path, compress_level=1)


def baseline_tree(dest: Path, ref: str) -> Path | None:
    """The autoseg package as of `ref`, extracted under dest (None when git cannot give it)."""
    proc = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "autoseg"], capture_output=True)
    if proc.returncode != 0:
        print(f"baseline skipped: git archive {ref}: {proc.stderr.decode(errors='replace').strip()}")
        return None
    with tarfile.open(fileobj=BytesIO(proc.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest


# Runs argv[1:] and prints its peak RSS in KiB. A child's ru_maxrss counts the memory of the process that
# forked it, up to its exec: this launcher is small, the benchmark (torch loaded) is not.
_LAUNCHER = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdout=sys.stdout, stderr=sys.stderr)
_, status, usage = os.wait4(proc.pid, 0)
print(usage.ru_maxrss, os.waitstatus_to_exitcode(status), file=sys.stderr)
"""


def peak_rss(cmd: list[str], pythonpath: Path | None, cwd: Path, log: Path) -> tuple[float, float, int]:
    """(peak RSS GB, wall s, exit code) of `cmd` in a fresh process, its output in `log`."""
    env = dict(os.environ, PYTHONPATH=str(pythonpath or ROOT))
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], stdout=f, stderr=subprocess.PIPE, env=env,
                              cwd=cwd)
    sec = time.perf_counter() - t0
    *before, last = proc.stderr.decode(errors="replace").strip().splitlines() or ["0 1"]
    with open(log, "ab") as f:
        f.write("\n".join(before).encode())
    kib, code = (int(v) for v in last.split())
    return kib * 1024 / 1e9, sec, code


def run_predict(model: Path, images: Path, out: Path, pythonpath: Path | None, mode: str, overlap: float,
                log: Path) -> tuple[float, float, int]:
    """(peak RSS GB, wall s, exit code) of one `autoseg predict`."""
    cmd = [sys.executable, "-m", "autoseg", "predict", str(model), "--images", str(images), "--out", str(out),
           "--eval-mode", mode, "--overlap", str(overlap), "-q"]
    # cwd is not the checkout: `-m autoseg` would import from it before PYTHONPATH
    return peak_rss(cmd, pythonpath, log.parent, log)


def chosen_modes(pixels: int, mode: str) -> str:
    """How ours / the baseline run an image of `pixels` in `mode` (auto: whole below a limit)."""
    if mode != "auto":
        return mode
    ours = "whole" if pixels <= whole_pixel_limit(3, NUM_CLASSES, ARCH.channels[0]) else "window"
    base = "whole" if pixels <= 2048 * 2048 else "window"  # the baseline's WHOLE_MAX_PIXELS
    return f"{ours} / {base}"


def floor_rss(pythonpath: Path | None, tmp: Path) -> float:
    """Peak RSS of a process that only imports what predict imports."""
    cmd = [sys.executable, "-c", "import autoseg.cli, autoseg.predict, onnxruntime"]
    return peak_rss(cmd, pythonpath, tmp, tmp / "floor.log")[0]


def machine() -> str:
    cpu, ram = cpu_and_ram()
    return (f"{platform.platform()}, {cpu}, {os.cpu_count()} CPUs, {ram}; Python "
            f"{platform.python_version()}, numpy {np.__version__}, onnxruntime {ort.__version__}, "
            f"Pillow {Image.__version__}, autoseg {autoseg.__version__}; 1-minute load average "
            f"{os.getloadavg()[0]:.1f} at the start (other jobs may share the machine)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2000x2000,6000x4000,10000x10000", help="WxH,WxH,...")
    ap.add_argument("--tile", type=int, default=128, help="the model's tile (its window size)")
    ap.add_argument("--mode", default="auto", choices=["auto", "window", "whole"], help="--eval-mode of predict")
    ap.add_argument("--overlap", type=float, default=0.25,
                    help="--overlap of predict: time only, the ring of sums is tile rows at any overlap")
    ap.add_argument("--baseline-ref", default=BASELINE_REF, help="git ref of the code before banded inference")
    ap.add_argument("--baseline-max-mpx", type=float, default=25.0,
                    help="run the baseline up to this many Mpx (0: never)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    sizes = parse_sizes(args.sizes)
    info = machine()
    print(info, flush=True)

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        root = Path(tmp)
        model = root / "model.onnx"
        build_model(model, args.tile)
        base = baseline_tree(root / "baseline", args.baseline_ref) if args.baseline_max_mpx > 0 else None
        floors = {"ours": floor_rss(None, root), **({"baseline": floor_rss(base, root)} if base else {})}
        for w, h in sizes:
            images = root / f"{w}x{h}"
            images.mkdir()
            t0 = time.perf_counter()
            write_image(images / "scene.png", w, h)
            print(f"{w}x{h}: image written in {time.perf_counter() - t0:.1f} s", flush=True)
            row = {"w": w, "h": h, "mpx": w * h / 1e6, "modes": chosen_modes(w * h, args.mode)}
            runs = [("ours", None)]
            if base is not None and w * h / 1e6 <= args.baseline_max_mpx:
                runs.append(("baseline", base))
            for name, path in runs:
                out, log = root / f"out_{name}_{w}x{h}", root / f"{name}_{w}x{h}.log"
                gb, sec, code = run_predict(model, images, out, path, args.mode, args.overlap, log)
                if code != 0:
                    print(log.read_text(errors="replace")[-2000:])
                row[name] = (gb, sec, code)
                print(f"  {name}: peak RSS {gb:.2f} GB, {sec:.1f} s, exit {code}", flush=True)
                if name == "ours" and code == 0:
                    written = np.asarray(Image.open(out / "scene.png"))
                    row["mask"] = written.shape
                if name == "baseline" and code == 0 and "mask" in row:
                    same = (out / "scene.png").read_bytes() == (root / f"out_ours_{w}x{h}" / "scene.png").read_bytes()
                    row["same"] = same or _same_pixels(out / "scene.png", root / f"out_ours_{w}x{h}" / "scene.png")
            rows.append(row)

    ours = [r["ours"] for r in rows]
    ok_runs = all(c == 0 for _, _, c in ours)
    peak = max(gb for gb, _, _ in ours)
    small, large = min(rows, key=lambda r: r["mpx"]), max(rows, key=lambda r: r["mpx"])
    growth = ((large["ours"][0] - small["ours"][0]) * 1e9 / ((large["mpx"] - small["mpx"]) * 1e6)
              if large["mpx"] > small["mpx"] else 0.0)
    targets = [
        (f"peak RSS <= {TARGET_GB:g} GB at every size ({NUM_CLASSES} classes)", ok_runs and peak <= TARGET_GB,
         f"max {peak:.2f} GB"),
        (f"flat: <= {TARGET_BYTES_PER_PIXEL:g} bytes of peak per added pixel, {small['w']}x{small['h']} to "
         f"{large['w']}x{large['h']}", ok_runs and growth <= TARGET_BYTES_PER_PIXEL, f"{growth:.1f} bytes/pixel"),
    ]
    lines = report(args, info, rows, floors, targets)
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(args.out, text)
    print(f"wrote {args.out}")
    return 0 if all(ok for _, ok, _ in targets) else 1


def _same_pixels(a: Path, b: Path) -> bool:
    return bool(np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))))


def report(args, info: str, rows: list[dict], floors: dict[str, float], targets) -> list[str]:
    cmd = (f"python -m benchmarks.bench_memory --sizes {args.sizes} --tile {args.tile} --mode {args.mode} "
           f"--overlap {args.overlap:g} --baseline-max-mpx {args.baseline_max_mpx:g}")
    lines = [
        "# Peak memory of `autoseg predict` by image size",
        "",
        f"`{cmd}`",
        "",
        f"Machine: {info}.",
        "",
        f"Net: `{ARCH.key()}`, {NUM_CLASSES} classes (random weights: memory does not depend on them), "
        f"tile {args.tile}, exported with `export_final`; colour-coded class map, so masks are written RGB. "
        f"Each run: `python -m autoseg predict MODEL --images DIR --out DIR --eval-mode {args.mode} "
        f"--overlap {args.overlap:g} -q` on one "
        "synthetic RGB PNG, in a fresh process; peak RSS = that process's ru_maxrss (os.wait4). "
        f"Baseline = the same command on commit `{args.baseline_ref[:10]}` (one K x H x W float32 accumulator).",
        "",
        "| image | Mpx | mode (ours / baseline) | ours: peak RSS | ours: wall | baseline: peak RSS | baseline: wall "
        "| baseline / ours | same mask |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gb, sec, code = r["ours"]
        ours = f"{gb:.2f} GB" if code == 0 else f"exit {code}"
        if "baseline" in r:
            bgb, bsec, bcode = r["baseline"]
            base = f"{bgb:.2f} GB" if bcode == 0 else f"exit {bcode} ({bgb:.2f} GB)"
            ratio, bwall = f"{bgb / gb:.1f}x", f"{bsec:.0f} s"
            same = {True: "yes", False: "no"}.get(r.get("same"), "-")
        else:
            base, ratio, bwall, same = "not run", "-", "-", "-"
        lines.append(f"| {r['w']}x{r['h']} | {r['mpx']:.0f} | {r['modes']} | {ours} | {sec:.0f} s | {base} | {bwall} "
                     f"| {ratio} | {same} |")
    lines += [
        "",
        "Floor (a process that only imports what predict imports): "
        + ", ".join(f"{k} {v:.2f} GB" for k, v in floors.items()) + ".",
        "",
        "## Targets",
        "",
        *(f"- {'PASS' if ok else 'FAIL'}: {name}: {val}" for name, ok, val in targets),
        "",
        "What still grows with the image: Pillow's decoded image (4 bytes a pixel for RGB; predict converts and "
        "normalises it a band of rows at a time), and the window sums of one row of windows (K x tile x W "
        "float32, 12 MB per 1000 px of width here); the mask is encoded and compressed a band of rows at a time. "
        "The baseline held K x H x W float32 sums, a float32 copy of the image and the whole encoded mask.",
        "",
        "Same mask: the written masks have the same pixels. Where the modes differ (the baseline's auto ran "
        "images whole up to 2048x2048; ours runs one whole only while the pass fits 512 MiB), they differ "
        "by what whole-image and window inference differ by.",
    ]
    return lines


if __name__ == "__main__":
    sys.exit(main())
