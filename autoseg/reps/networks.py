"""Plain-torch networks for the CNN embedder: a ResNet-18 that loads torchvision's state_dict keys, a small CNN."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from autoseg.errors import InputError


@functools.cache
def _torch_classes() -> tuple[type, type, type]:
    """The network classes, built on first use so the handcrafted path never imports torch."""
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + identity)

    class ResNet18(nn.Module):
        """torchvision's resnet18 layout: its state_dict keys load here unchanged."""

        def __init__(self, num_classes: int = 1000) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            widths, cin = (64, 128, 256, 512), 64
            for i, w in enumerate(widths):
                stride = 1 if i == 0 else 2
                setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, w, stride), BasicBlock(w, w, 1)))
                cin = w
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512, num_classes)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

        def features(self, x: torch.Tensor) -> torch.Tensor:
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return torch.flatten(self.avgpool(x), 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.features(x))

    class SmallCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(),
                nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
            )

        def features(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x).mean(dim=(2, 3))

        forward = features

    return BasicBlock, ResNet18, SmallCNN


def resnet18(num_classes: int = 1000) -> Any:
    """A ResNet-18 in plain torch, randomly initialised (seed torch first for reproducibility)."""
    return _torch_classes()[1](num_classes)


def _small_cnn() -> Any:
    return _torch_classes()[2]()


def load_resnet18(path: Path) -> Any:
    """ResNet-18 with the state_dict at `path`, strictly checked; InputError if it does not fit."""
    import torch

    def fail(why: str) -> InputError:
        return InputError(
            f"reps.embedder_weights: {path}: {why}; give a torchvision resnet18 state_dict "
            "saved with torch.save, or set it to null for random weights"
        )

    if not Path(path).is_file():
        raise fail("file not found")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise fail(f"cannot be loaded ({type(e).__name__})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise fail(f"holds a {type(sd).__name__}, not a state_dict")
    num_classes = sd["fc.weight"].shape[0] if hasattr(sd.get("fc.weight"), "shape") else 1000
    model = resnet18(num_classes)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise fail(f"does not match resnet18 ({first[:160]})") from None
    return model
