"""What a search trains and times its candidates on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TileData:
    """Representative tiles at one tile size, ready for training."""

    x: np.ndarray  # float32 (R, C, T, T), normalised
    y: np.ndarray  # int64 (R, T, T), IGNORE = -1
    groups: np.ndarray  # int64 (R,), source image of each tile


@dataclass(frozen=True)
class SearchTask:
    data: dict[int, TileData]  # by tile size
    in_channels: int
    num_classes: int
    class_weights: tuple[float, ...] | None
    # classes, mean, std and class_map of the data (export.model_metadata): trial ONNX files carry them
    dataset_metadata: dict[str, Any] = field(default_factory=dict)
