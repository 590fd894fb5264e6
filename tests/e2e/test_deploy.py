"""`autoseg deploy`: the model goes to the device verified by sha256; with --images the device labels them and
the masks come back, equal to those `autoseg predict` writes on this host (issue #23 section 4).

Here a model with autoseg's metadata stands in for a run (fast, x86 sshd in `make test`, arm64 in e2e); the
arm64 parity of a real search's net is in test_arm64.py.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from e2e_devices import Device
from PIL import Image
from test_agent_predict import seg_model

DEVICES = [pytest.param("x86", marks=pytest.mark.ssh), pytest.param("arm64", marks=pytest.mark.e2e)]


@pytest.fixture(params=DEVICES)
def dev(request: pytest.FixtureRequest) -> Device:
    return request.getfixturevalue(request.param)


def autoseg(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autoseg", *map(str, args)], capture_output=True, text=True,
                          timeout=900, env=env)


def fake_run(tmp_path: Path) -> Path:
    """A run folder holding what deploy reads: best/model.onnx (+ int8 twin) and the model card."""
    best = tmp_path / "myrun" / "best"
    best.mkdir(parents=True)
    (best / "model.onnx").write_bytes(seg_model(classes=3, tile=16))
    (best / "model.int8.onnx").write_bytes(seg_model(classes=3, tile=16, seed=1))
    (best / "model_card.json").write_text(json.dumps({"arch": "k3_c8"}))
    return best.parent


def images(folder: Path, sizes: list[tuple[int, int]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(8)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


def test_deploy_copies_the_model_verified_and_labels_images_there(dev: Device, tmp_path: Path) -> None:
    run = fake_run(tmp_path)
    remote = dev.scratch("deployed")
    imgs = images(tmp_path / "images", [(40, 30), (20, 64)])
    flags = [*dev.flags(), "--remote-dir", dev.device_path(remote)]
    proc = autoseg("deploy", run, *flags, "--images", imgs, "--overlay", env=dev.env())
    assert proc.returncode == 0, proc.stderr
    copied = remote / "model.onnx"
    assert hashlib.sha256(copied.read_bytes()).digest() == hashlib.sha256(
        (run / "best" / "model.onnx").read_bytes()).digest()
    assert (remote / "model_card.json").is_file()
    assert not [p for p in remote.iterdir() if p.name.startswith(".")]  # temp files and work folder removed
    lines = proc.stdout.strip().splitlines()
    assert "sha256 verified on the device" in lines[0] and dev.target in lines[0]
    assert "2 image(s) labelled on the device" in lines[1] and "images/s" in lines[1] and "ms per megapixel" in lines[1]
    assert ("emulated" in lines[1]) == dev.emulated
    # The masks are those `autoseg predict` writes here, pixel for pixel (same model, same images).
    host = autoseg("predict", run, "--images", imgs, "--out", tmp_path / "host")
    assert host.returncode == 0, host.stderr
    for name in ("im0.png", "im1.png"):
        got = np.asarray(Image.open(run / "deploy" / "masks" / name))
        want = np.asarray(Image.open(tmp_path / "host" / name))
        assert got.shape == want.shape
        assert (got == want).mean() >= 0.999
        assert (run / "deploy" / "masks" / name.replace(".png", "_overlay.png")).is_file()

    # Again: the device already holds these bytes, so nothing is copied; --int8 sends the int8 model.
    again = autoseg("deploy", run, *flags, env=dev.env())
    assert again.returncode == 0 and "already there (same sha256)" in again.stdout, again.stderr
    int8 = autoseg("deploy", run, *flags, "--int8", env=dev.env())
    assert int8.returncode == 0, int8.stderr
    assert (remote / "model.int8.onnx").read_bytes() == (run / "best/model.int8.onnx").read_bytes()


def test_deploy_faults_are_one_line(dev: Device, tmp_path: Path) -> None:
    run = fake_run(tmp_path)
    (tmp_path / "plain.onnx").write_bytes(b"not a model")
    jpgs = tmp_path / "jpgs"
    jpgs.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(jpgs / "a.jpg")
    cases = [
        (["deploy", run], 2, "deploy copies the model to a device over SSH"),  # no --device
        (["deploy", tmp_path / "nowhere", *dev.flags()], 2, "no such ONNX file"),
        (["deploy", tmp_path / "plain.onnx", *dev.flags()], 2, "not a readable ONNX model"),
        (["deploy", run, *dev.flags(), "--images", tmp_path / "none"], 2, "images folder does not exist"),
    ]
    if dev.name == "arm64":  # the device has no Pillow: its agent says what to install, as one line
        cases.append((["deploy", run, *dev.flags(), "--images", jpgs, "--remote-dir",
                       dev.device_path(dev.scratch("jpg"))], 2, "reading .jpg needs Pillow"))
    for args, code, expect in cases:
        proc = autoseg("-q", *args, env=dev.env())
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == code and len(lines) == 1 and expect in lines[0], (args, proc.stderr)
