"""A candidate exported and timed on the device: the size it is timed at, and its int8 graph."""

from __future__ import annotations

from typing import Any

import torch

from autoseg.devices import Device, MeasureSettings
from autoseg.export import int8_bytes, onnx_bytes
from autoseg.search.space import Candidate
from autoseg.search.task import SearchTask
from autoseg.unet import Arch, build_unet, count_macs, count_params

INT8_CALIB_TILES = 8  # timing needs the int8 graph, not good scales: a few tiles calibrate it


def timed_size(arch: Arch, tile: int, measure_size: int | None) -> int:
    """The input side a net is timed at: measure_size padded up to the net's multiple, as inference pads
    a full image (or the tile, which is always a multiple)."""
    if measure_size is None:
        return tile
    return -(-measure_size // arch.multiple) * arch.multiple


def measure_candidate(
    cand: Candidate,
    task: SearchTask,
    device: Device,
    settings: MeasureSettings,
    measure_size: int | None,
    opset: int = 17,
    int8: bool = False,
) -> tuple[bytes, Any, int, int]:
    """Export with weights seeded by the architecture, so the same net hashes the same for the cache.

    Latency and MACs are both for a (1, C, size, size) input, size = timed_size(...). The opset is the
    one the final model is exported at: the device must load what it will deploy. With `int8` the net
    is timed quantized, calibrated on a few of its representative tiles, as the final int8 export is.
    """
    torch.manual_seed(int(cand.arch.digest(), 16) % (2**31))
    model = build_unet(cand.arch, task.in_channels, task.num_classes).eval()
    size = timed_size(cand.arch, cand.tile, measure_size)
    if int8:
        trained_like_batchnorm(model)
    blob = onnx_bytes(model, task.in_channels, size, opset)
    if int8:
        blob = int8_bytes(blob, task.data[cand.tile].x[:INT8_CALIB_TILES])
    m = device.measure(blob, (1, task.in_channels, size, size), settings)
    params = count_params(model)
    macs = count_macs(cand.arch, task.in_channels, task.num_classes, size, size)  # the work that was timed
    return blob, m, params, macs


def trained_like_batchnorm(model: torch.nn.Module) -> None:
    """Random BatchNorm statistics and shifts (from torch's seeded stream), as training leaves them.

    At their defaults every bias folded from BatchNorm is zero and the exporter shares one zero tensor
    among the convs; quantized, those convs stayed in float (onnxruntime did not fuse them into integer
    kernels), so the int8 graph timed ran up to 3x slower than a trained net's.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
