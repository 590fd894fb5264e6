"""`autoseg device check`: connect, deploy the agent, and time a reference net, saying what looks wrong."""

from __future__ import annotations

import logging
from contextlib import closing
from typing import Any

import numpy as np
import torch

from autoseg.config import DeviceConfig
from autoseg.devices import MeasureError, failure_hint, open_device, settings_from_config
from autoseg.export import int8_bytes, onnx_bytes
from autoseg.search import trained_like_batchnorm
from autoseg.unet import Arch, build_unet

log = logging.getLogger(__name__)

# A small but not trivial net: big enough that timer noise does not dominate on a Pi.
REFERENCE_ARCH = Arch(kernels=(3, 3, 3), channels=(16, 32, 64))
REFERENCE_SIZE = 128


def diagnose(fp: dict[str, Any], temp_before: float | None, temp_after: float | None) -> list[str]:
    """Conditions that make latency numbers unreliable, in plain words."""
    notes = []
    if fp.get("throttled"):
        notes.append(f"the device reports throttling ({fp.get('throttled_raw')}): check power supply and cooling")
    gov = fp.get("governor")
    if gov and gov not in ("performance", "schedutil"):
        notes.append(f"CPU governor is '{gov}': set 'performance' for stable latency")
    hottest = max((t for t in (temp_before, temp_after, fp.get("temperature_c")) if t is not None), default=None)
    if hottest is not None and hottest >= 75:
        notes.append(f"SoC temperature {hottest:.0f} °C: latency may throttle; add a heatsink or fan")
    return notes


def check_device(cfg: DeviceConfig, opset: int = 17) -> dict[str, Any]:
    """Fingerprint and reference latency; the reference net goes at the opset the search will send.

    The reference is timed in int8 too (as `--precision int8` would time it): whether int8 pays on this
    device, and whether its onnxruntime runs int8 models at all. That part is informative only.
    """
    torch.manual_seed(0)
    model = build_unet(REFERENCE_ARCH, 3, 2).eval()
    trained_like_batchnorm(model)
    blob = onnx_bytes(model, 3, REFERENCE_SIZE, opset)
    calib = np.random.default_rng(0).standard_normal((4, 3, REFERENCE_SIZE, REFERENCE_SIZE), dtype=np.float32)
    shape = (1, 3, REFERENCE_SIZE, REFERENCE_SIZE)
    settings = settings_from_config(cfg)
    with closing(open_device(cfg, cache_path=None)) as device:
        fp = device.fingerprint()
        m = device.measure(blob, shape, settings)
        q = device.measure(int8_bytes(blob, calib), shape, settings) if m.error == MeasureError.OK else None
    int8_ok = bool(q is not None and q.error == MeasureError.OK and q.median_ms and m.median_ms)
    result: dict[str, Any] = {
        "device": m.device,
        "source": m.source,
        "fingerprint": fp,
        "reference_model": f"{REFERENCE_ARCH.key()} at {REFERENCE_SIZE}x{REFERENCE_SIZE}, opset {opset}",
        "latency": m.stats,
        "int8_latency": q.stats if int8_ok else None,
        "int8_speedup": round(float(m.median_ms) / float(q.median_ms), 3) if int8_ok else None,  # > 1: int8 pays
        "int8_error": q.message if q is not None and q.error != MeasureError.OK else None,
        "error": None if m.error == MeasureError.OK else m.message,
        "hint": None if m.error == MeasureError.OK else failure_hint(m, opset),
        "warnings": diagnose(fp, m.temp_before_c, m.temp_after_c),
    }
    for w in result["warnings"]:
        log.warning("%s: %s", m.device, w)
    return result
