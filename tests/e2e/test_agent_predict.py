"""`python3 -m edge_agent predict`: the agent's own tests of on-device inference (issue #23 section 4).

numpy, onnx and pytest only (no torch, no autoseg, no Pillow needed): they run in `make test` on this host and,
in `make test-e2e`, inside the arm64 root's Python. Models are tiny Conv graphs carrying autoseg's metadata;
PNGs with every row filter are made here, so the standard-library reader is checked without Pillow.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_agent.predict import PngRows, predict_folder, read_png, read_pnm

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 120
# What onnxruntime's own cpuinfo prints to stderr when it is imported under qemu-user (the arm64 device).
ORT_NOISE = ("Error in cpuinfo:", "onnxruntime cpuid_info warning:", "onnxruntime warning: cpuinfo")


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.strip().splitlines() if not ln.startswith(ORT_NOISE)]


def seg_model(classes: int = 3, channels: int = 3, tile: int = 16, multiple: int = 4, seed: int = 0,
              meta: dict | None = None) -> bytes:
    """A 3x3 Conv net (input "input", output "logits") with the metadata autoseg's export writes."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((classes, channels, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["logits"], pads=[1, 1, 1, 1])], "seg",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", channels, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes, "H", "W"])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    names = [f"class{i}" for i in range(classes)]
    props = {
        "classes": json.dumps(names), "mean": json.dumps([0.5] * channels), "std": json.dumps([0.25] * channels),
        "tile": str(tile), "input_multiple": str(multiple), "arch": "k3_c8_standard_transpose",
        "class_map": json.dumps({"kind": "contiguous", "names": names, "values": [10 * i for i in range(classes)],
                                 "colors": None, "ignore_index": None, "ignore_colors": []}),
    }
    props.update(meta or {})
    for k, v in props.items():
        if v is not None:
            model.metadata_props.add(key=k, value=v)
    return model.SerializeToString()


# -- PNG without Pillow ------------------------------------------------------------------------------------


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    pa, pb, pc = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


# Adam7 passes as (first row, first column, row step, column step)
ADAM7 = ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1))


def encode_png(a: np.ndarray, depth: int = 8, colour: int | None = None, filters: list[int] | None = None,
               palette: np.ndarray | None = None, interlace: bool = False, exif: bytes | None = None) -> bytes:
    """A PNG of `a` (H, W, C) with the given row filter types (cycled), written by the book."""
    h, w, c = a.shape
    colour = colour if colour is not None else {1: 0, 2: 4, 3: 2, 4: 6}[c]
    if interlace:
        rows = b"".join(_filtered(a[y0::dy, x0::dx], depth, filters) for y0, x0, dy, dx in ADAM7
                        if y0 < h and x0 < w)
    else:
        rows = _filtered(a, depth, filters)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, int(interlace)))
    if palette is not None:
        out += chunk(b"PLTE", palette.astype(np.uint8).tobytes())
    if exif is not None:
        out += chunk(b"eXIf", exif)
    return out + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _filtered(a: np.ndarray, depth: int, filters: list[int] | None) -> bytes:
    """The filtered scanlines of `a` (filter type byte + bytes per row)."""
    h, w, c = a.shape
    if depth == 16:
        raw = a.astype(">u2").view(np.uint8).reshape(h, -1)
    elif depth < 8:
        per = 8 // depth
        vals = np.zeros((h, -(-w // per) * per), np.uint8)
        vals[:, :w] = a[..., 0]
        raw = np.zeros((h, vals.shape[1] // per), np.uint8)
        for i in range(per):
            raw |= (vals[:, i::per] << (8 - depth * (i + 1))).astype(np.uint8)
    else:
        raw = a.astype(np.uint8).reshape(h, -1)
    bpp = max(1, c * depth // 8)
    x = raw.astype(np.int16)
    left = np.zeros_like(x)
    left[:, bpp:] = x[:, :-bpp]
    up = np.zeros_like(x)
    up[1:] = x[:-1]
    upleft = np.zeros_like(x)
    upleft[1:, bpp:] = x[:-1, :-bpp]
    preds = [np.zeros_like(x), left, up, (left + up) >> 1, _paeth(left, up, upleft)]
    filters = filters or [0, 1, 2, 3, 4]
    return b"".join(bytes([filters[y % len(filters)]]) + ((x[y] - preds[filters[y % len(filters)]][y]) & 255)
                    .astype(np.uint8).tobytes() for y in range(h))


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("filters", [[0], [1], [2], [3], [4], [4, 3, 2, 1, 0, 3]])
def test_png_rows_of_every_filter_are_decoded(tmp_path: Path, channels: int, filters: list[int]) -> None:
    a = np.random.default_rng(channels).integers(0, 256, (13, 11, channels), dtype=np.uint8)
    got = read_png(_file(tmp_path, encode_png(a, filters=filters)))
    want = a[..., :1] if channels in (1, 2) else a[..., :3]  # alpha dropped, as Pillow's convert does
    np.testing.assert_array_equal(got, want)


def test_png_bit_depths_and_palettes(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    g16 = rng.integers(0, 65536, (7, 9, 1)).astype(np.uint16)
    got = read_png(_file(tmp_path, encode_png(g16, depth=16, filters=[4, 3])))
    np.testing.assert_array_equal(got, ((g16.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8))
    rgb16 = rng.integers(0, 65536, (5, 6, 3)).astype(np.uint16)
    np.testing.assert_array_equal(read_png(_file(tmp_path, encode_png(rgb16, depth=16))), rgb16 >> 8)
    for depth in (1, 2, 4):
        g = rng.integers(0, 2**depth, (6, 13, 1)).astype(np.uint8)
        got = read_png(_file(tmp_path, encode_png(g, depth=depth, filters=[1, 4])))
        np.testing.assert_array_equal(got, g * (255 // (2**depth - 1)))
    pal = rng.integers(0, 256, (5, 3)).astype(np.uint8)
    idx = rng.integers(0, 5, (8, 8, 1)).astype(np.uint8)
    got = read_png(_file(tmp_path, encode_png(idx, colour=3, palette=pal, filters=[3])))
    np.testing.assert_array_equal(got, pal[idx[..., 0]])


@pytest.mark.parametrize("size", [(1, 1), (5, 3), (17, 23)])
def test_interlaced_png(tmp_path: Path, size: tuple[int, int]) -> None:
    a = np.random.default_rng(9).integers(0, 256, (*size, 3), dtype=np.uint8)
    np.testing.assert_array_equal(read_png(_file(tmp_path, encode_png(a, interlace=True, filters=[4, 1]))), a)
    g = np.random.default_rng(9).integers(0, 4, (*size, 1), dtype=np.uint8)
    np.testing.assert_array_equal(read_png(_file(tmp_path, encode_png(g, depth=2, interlace=True))), g * 85)


def exif_orientation(value: int) -> bytes:
    """A little-endian TIFF block with one IFD entry: Orientation = value."""
    return b"II*\x00" + struct.pack("<IHHHIHH", 8, 1, 0x0112, 3, 1, value, 0) + b"\x00" * 4


def test_png_exif_orientation_is_applied(tmp_path: Path) -> None:
    a = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    turned = {1: a, 3: a[::-1, ::-1], 6: np.rot90(a, -1), 8: np.rot90(a, 1)}  # 6: the camera held it 90° right
    for value, want in turned.items():
        np.testing.assert_array_equal(read_png(_file(tmp_path, encode_png(a, exif=exif_orientation(value)))), want)


def test_png_writer_round_trips(tmp_path: Path) -> None:
    for channels, dtype in ((1, np.uint8), (1, np.uint16), (3, np.uint8)):
        a = np.random.default_rng(2).integers(0, np.iinfo(dtype).max, (20, 7, channels)).astype(dtype)
        path = tmp_path / "w.png"
        with open(path, "wb") as f:
            png = PngRows(f, 7, 20, channels, dtype)
            png.write(a[:8, :, 0] if channels == 1 else a[:8])
            png.write(a[8:, :, 0] if channels == 1 else a[8:])
            png.close()
        with open(path, "rb") as f:
            got = read_png(f)
        want = a if dtype == np.uint8 else ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        np.testing.assert_array_equal(got, want)


def test_pgm_and_ppm(tmp_path: Path) -> None:
    a = np.random.default_rng(3).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    path = tmp_path / "a.ppm"
    path.write_bytes(b"P6\n# comment\n5 4\n255\n" + a.tobytes())
    with open(path, "rb") as f:
        np.testing.assert_array_equal(read_pnm(f), a)


def _file(tmp_path: Path, data: bytes) -> io.BytesIO:
    return io.BytesIO(data)


# -- predict -----------------------------------------------------------------------------------------------


def write_images(folder: Path, sizes: list[tuple[int, int]], channels: int = 3) -> list[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(4)
    images = []
    for i, (h, w) in enumerate(sizes):
        a = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        (folder / f"img{i}.png").write_bytes(encode_png(a))
        images.append(a)
    return images


# `python -m edge_agent` as on a device without Pillow: PNG goes through the standard library.
NO_PILLOW = "import sys; sys.modules['PIL'] = None; from edge_agent.__main__ import main; sys.exit(main())"


def agent(*args: object) -> subprocess.CompletedProcess:
    """This checkout's agent, run without Pillow (as the arm64 device has none)."""
    return subprocess.run([sys.executable, "-c", NO_PILLOW, *map(str, args)], capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=REPO)


@pytest.mark.parametrize("mode", ["whole", "window", "auto"])
def test_predict_writes_class_id_masks_and_reports_throughput(tmp_path: Path, mode: str) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(seg_model())
    images = write_images(tmp_path / "images", [(30, 41), (16, 16), (9, 50)])
    proc = agent("predict", model, tmp_path / "images", tmp_path / "out", "--mode", mode, "--overlay", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["images"] == 3 and summary["mode"] == mode
    assert summary["images_per_s"] > 0 and summary["ms_per_megapixel"] > 0
    assert summary["providers_used"] == ["CPUExecutionProvider"]
    assert abs(sum(summary["class_share"].values()) - 1) < 1e-6
    for i, a in enumerate(images):
        with open(tmp_path / "out" / f"img{i}.png", "rb") as f:
            mask = read_png(f)
        assert mask.shape == (*a.shape[:2], 1) and mask.max() < 3
        with open(tmp_path / "out" / f"img{i}_overlay.png", "rb") as f:
            assert read_png(f).shape == a.shape
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp files left


def test_predict_writes_the_training_values_when_asked(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(seg_model())
    write_images(tmp_path / "images", [(12, 12)])
    for values in ("ids", "training"):
        proc = agent("predict", model, tmp_path / "images", tmp_path / values, "--values", values)
        assert proc.returncode == 0, proc.stderr
        assert "images/s" in proc.stdout and "ms per megapixel" in proc.stdout
    with open(tmp_path / "ids" / "img0.png", "rb") as f:
        ids = read_png(f)
    with open(tmp_path / "training" / "img0.png", "rb") as f:
        np.testing.assert_array_equal(read_png(f), ids * 10)  # class_map values 0, 10, 20


def test_predict_matches_a_direct_onnxruntime_run(tmp_path: Path) -> None:
    import onnxruntime as ort

    blob = seg_model(multiple=1)
    model = tmp_path / "model.onnx"
    model.write_bytes(blob)
    (image,) = write_images(tmp_path / "images", [(20, 24)])
    predict_folder(str(model), str(tmp_path / "images"), str(tmp_path / "out"), mode="whole")
    x = ((image / 255.0 - 0.5) / 0.25).transpose(2, 0, 1)[None].astype(np.float32)
    want = ort.InferenceSession(blob, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0].argmax(1)[0]
    with open(tmp_path / "out" / "img0.png", "rb") as f:
        np.testing.assert_array_equal(read_png(f)[..., 0], want)


def test_gray_net_on_rgb_images_and_rgb_net_on_gray(tmp_path: Path) -> None:
    for net, img in ((1, 3), (3, 1)):
        model = tmp_path / f"m{net}.onnx"
        model.write_bytes(seg_model(channels=net))
        write_images(tmp_path / f"images{img}", [(10, 10)], channels=img)
        proc = agent("predict", model, tmp_path / f"images{img}", tmp_path / f"out{net}")
        assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(("meta", "args", "expect"), [
    ({"tile": None}, [], "metadata lacks tile; pass a model exported by autoseg"),
    ({"tile": "0"}, [], "metadata 'tile' must be a positive whole number"),
    ({"mean": "[0.5, 0.5]"}, [], "metadata 'mean' must hold 1 (gray) or 3 (RGB) values"),
    ({"classes": "nope"}, [], "metadata 'classes' is not JSON"),
    ({}, ["--providers", "CUDAExecutionProvider"], "CUDAExecutionProvider not available on this device"),
    ({}, ["--overlap", "1.5"], "--overlap: must be in [0, 1)"),
])
def test_bad_input_is_one_line_exit_2(tmp_path: Path, meta: dict, args: list[str], expect: str) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(seg_model(meta=meta))
    write_images(tmp_path / "images", [(8, 8)])
    proc = agent("predict", model, tmp_path / "images", tmp_path / "out", *args)
    assert proc.returncode == 2, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert expect in lines[0]


def test_missing_inputs_are_one_line_exit_2(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(seg_model())
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    write_images(tmp_path / "images", [(8, 8)])
    write_images(tmp_path / "mixed", [(8, 8)])
    (tmp_path / "mixed" / "photo.jpg").write_bytes(b"\xff\xd8")
    cases = [
        ((tmp_path / "nope.onnx", tmp_path / "images"), "no such file"),
        ((model, tmp_path / "nowhere"), "images folder does not exist"),
        ((model, tmp_path / "empty"), "no images found"),
        ((tmp_path / "junk.onnx", tmp_path / "images"), "onnxruntime cannot load it"),
    ]
    cases.append(((model, tmp_path / "mixed"), "photo.jpg: reading .jpg needs Pillow"))
    for (m, imgs), expect in cases:
        proc = agent("predict", m, imgs, tmp_path / "out")
        assert proc.returncode == 2 and expect in proc.stderr, proc.stderr
        assert len(error_lines(proc.stderr)) == 1, proc.stderr
        assert not (tmp_path / "out" / "img0.png").exists()  # refused before any image was labelled


def test_onnx_is_only_a_test_dependency() -> None:
    # The agent reads the metadata through onnxruntime: onnx is not needed on the device.
    src = (REPO / "edge_agent" / "predict.py").read_text()
    assert "import onnx\n" not in src and "from onnx " not in src
    assert onnx.__version__
