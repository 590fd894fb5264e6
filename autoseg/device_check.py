"""`autoseg device check`: connect, deploy the agent, and time a reference net, saying what looks wrong."""

from __future__ import annotations

import logging
from contextlib import closing
from typing import Any

import torch

from autoseg.config import DeviceConfig
from autoseg.export import onnx_bytes
from autoseg.latency import MeasureError, failure_hint, open_device, settings_from_config
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
    """Fingerprint and reference latency; the reference net goes at the opset the search will send."""
    torch.manual_seed(0)
    model = build_unet(REFERENCE_ARCH, 3, 2).eval()
    blob = onnx_bytes(model, 3, REFERENCE_SIZE, opset)
    settings = settings_from_config(cfg)
    with closing(open_device(cfg, cache_path=None)) as device:
        fp = device.fingerprint()
        m = device.measure(blob, (1, 3, REFERENCE_SIZE, REFERENCE_SIZE), settings)
    result: dict[str, Any] = {
        "device": m.device,
        "source": m.source,
        "fingerprint": fp,
        "reference_model": f"{REFERENCE_ARCH.key()} at {REFERENCE_SIZE}x{REFERENCE_SIZE}, opset {opset}",
        "latency": m.stats,
        "error": None if m.error == MeasureError.OK else m.message,
        "hint": None if m.error == MeasureError.OK else failure_hint(m, opset),
        "warnings": diagnose(fp, m.temp_before_c, m.temp_after_c),
    }
    for w in result["warnings"]:
        log.warning("%s: %s", m.device, w)
    return result
