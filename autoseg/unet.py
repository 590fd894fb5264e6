"""The U-Net family searched by autoseg: an architecture description (`Arch`) and its builder.

Level 0 works at full resolution; level i > 0 is maxpool(2) then a double conv. The decoder
mirrors back to level 0 (upsample, concat the skip, double conv) and a 1x1 head gives logits.
Only ops that export cleanly to ONNX with dynamic H/W are used: conv, convtranspose, maxpool,
bilinear resize with a fixed scale, concat, batchnorm, relu.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

KERNELS = (3, 5, 7)
CONVS = ("standard", "separable")
UPSAMPLES = ("transpose", "bilinear")
MAX_LEVELS = 6


@dataclass(frozen=True)
class Arch:
    kernels: tuple[int, ...]  # per level, each 3/5/7
    channels: tuple[int, ...]  # per level, non-decreasing
    conv: Literal["standard", "separable"] = "standard"
    upsample: Literal["transpose", "bilinear"] = "transpose"

    def __post_init__(self) -> None:
        # Lists (from JSON or Optuna) become tuples so the dataclass stays hashable and keys stable.
        object.__setattr__(self, "kernels", tuple(self.kernels))
        object.__setattr__(self, "channels", tuple(self.channels))

    @property
    def levels(self) -> int:
        return len(self.kernels)

    @property
    def multiple(self) -> int:
        """Input height and width must be divisible by this."""
        return 2 ** max(self.levels - 1, 0)

    def key(self) -> str:
        ks = "-".join(str(k) for k in self.kernels)
        cs = "-".join(str(c) for c in self.channels)
        return f"k{ks}_c{cs}_{self.conv}_{self.upsample}"

    def digest(self) -> str:
        return hashlib.sha1(self.key().encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kernels": list(self.kernels),
            "channels": list(self.channels),
            "conv": self.conv,
            "upsample": self.upsample,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Arch:
        missing = [k for k in ("kernels", "channels") if k not in d]
        if missing:
            raise ValueError(f"arch dict is missing {', '.join(missing)}")
        return cls(
            kernels=tuple(int(k) for k in d["kernels"]),
            channels=tuple(int(c) for c in d["channels"]),
            conv=d.get("conv", "standard"),
            upsample=d.get("upsample", "transpose"),
        )


def validate_arch(arch: Arch, tile: int | None = None) -> None:
    """Raise ValueError naming the first thing wrong with `arch` (and `tile`, if given)."""
    n = arch.levels
    if not 1 <= n <= MAX_LEVELS:
        raise ValueError(f"levels must be in 1..{MAX_LEVELS}, got {n}")
    if len(arch.channels) != n:
        raise ValueError(f"kernels has {n} entries but channels has {len(arch.channels)}; give one per level")
    for i, k in enumerate(arch.kernels):
        if not isinstance(k, int) or isinstance(k, bool):
            raise ValueError(f"kernel at level {i} must be an integer, got {k!r}")
        if k % 2 == 0:
            raise ValueError(f"kernel {k} at level {i} is even; use one of {KERNELS}")
        if k not in KERNELS:
            raise ValueError(f"kernel {k} at level {i} is not supported; use one of {KERNELS}")
    for i, c in enumerate(arch.channels):
        if not isinstance(c, int) or isinstance(c, bool) or c < 1:
            raise ValueError(f"channels at level {i} must be a positive integer, got {c!r}")
        if i > 0 and c < arch.channels[i - 1]:
            raise ValueError(
                f"channels decrease from {arch.channels[i - 1]} to {c} at level {i}; "
                "channels must not decrease with depth"
            )
    if arch.conv not in CONVS:
        raise ValueError(f"unknown conv {arch.conv!r}; use one of {CONVS}")
    if arch.upsample not in UPSAMPLES:
        raise ValueError(f"unknown upsample {arch.upsample!r}; use one of {UPSAMPLES}")
    if tile is not None:
        check_size(tile, arch, what="tile")


def check_size(size: int, arch: Arch, what: str = "size") -> None:
    """Raise ValueError if `size` cannot pass through the net; name the nearest sizes that can."""
    m = arch.multiple
    if size < 1:
        raise ValueError(f"{what} must be positive, got {size}")
    if size % m:
        lo, hi = size // m * m, (size // m + 1) * m
        use = f"{lo} or {hi}" if lo > 0 else f"{hi}"
        raise ValueError(f"{what} {size} is not divisible by {m} ({arch.levels} levels); use {use}")


# ---------------------------------------------------------------- modules


def double_conv(cin: int, cout: int, k: int, conv: str) -> nn.Sequential:
    """(conv-BN-ReLU) x2; "separable" = depthwise kxk then pointwise 1x1, then BN-ReLU."""
    layers: list[nn.Module] = []
    for c in (cin, cout):
        if conv == "separable":
            layers += [
                nn.Conv2d(c, c, k, padding=k // 2, groups=c, bias=False),
                nn.Conv2d(c, cout, 1, bias=False),
            ]
        else:
            layers.append(nn.Conv2d(c, cout, k, padding=k // 2, bias=False))
        layers += [nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def up_block(cin: int, cout: int, upsample: str) -> nn.Module:
    if upsample == "transpose":
        return nn.ConvTranspose2d(cin, cout, 2, stride=2)
    # 1x1 conv before the resize: bilinear weights sum to 1, so this equals resize-then-conv
    # exactly while costing a quarter of the MACs.
    return nn.Sequential(
        nn.Conv2d(cin, cout, 1),
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
    )


class Encoder(nn.Module):
    def __init__(self, arch: Arch, in_channels: int):
        super().__init__()
        self.multiple = arch.multiple
        stages: list[nn.Module] = []
        prev = in_channels
        for i, (k, c) in enumerate(zip(arch.kernels, arch.channels, strict=True)):
            block = double_conv(prev, c, k, arch.conv)
            stages.append(block if i == 0 else nn.Sequential(nn.MaxPool2d(2), block))
            prev = c
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            h, w = x.shape[-2:]
            if h % self.multiple or w % self.multiple:
                m = self.multiple
                ph, pw = -(-h // m) * m, -(-w // m) * m
                raise ValueError(
                    f"input {h}x{w} is not divisible by {m}; pad it to {ph}x{pw} (or crop to a multiple of {m})"
                )
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class Decoder(nn.Module):
    def __init__(self, arch: Arch):
        super().__init__()
        c, k = arch.channels, arch.kernels
        # Built deepest first, in the order forward applies them.
        levels = range(arch.levels - 2, -1, -1)
        self.ups = nn.ModuleList([up_block(c[i + 1], c[i], arch.upsample) for i in levels])
        self.blocks = nn.ModuleList([double_conv(2 * c[i], c[i], k[i], arch.conv) for i in levels])

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        for j, (up, block) in enumerate(zip(self.ups, self.blocks, strict=True)):
            skip = feats[-2 - j]
            x = block(torch.cat([up(x), skip], dim=1))
        return x


class UNet(nn.Module):
    def __init__(self, arch: Arch, in_channels: int, num_classes: int):
        super().__init__()
        self.arch = arch
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.encoder = Encoder(arch, in_channels)
        self.decoder = Decoder(arch)
        self.head = nn.Conv2d(arch.channels[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(self.encoder(x)))


def build_unet(arch: Arch, in_channels: int, num_classes: int) -> UNet:
    validate_arch(arch)
    if in_channels < 1:
        raise ValueError(f"in_channels must be positive, got {in_channels}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return UNet(arch, in_channels, num_classes)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- MACs


def depthwise_macs(arch: Arch, in_channels: int, h: int, w: int) -> int:
    """The MACs of count_macs done in the depthwise convs of a separable net (0 for a standard one). Training on a
    CPU pays far more per MAC for these than for dense convs: the clock prices them apart."""
    if arch.conv != "separable":
        return 0
    c, k = arch.channels, arch.kernels
    pixels = [(h >> i) * (w >> i) for i in range(arch.levels)]
    prev, macs = in_channels, 0
    for i in range(arch.levels):
        macs += pixels[i] * (prev + c[i]) * k[i] * k[i]  # each of the two convs: k*k per channel it reads
        prev = c[i]
    for i in range(arch.levels - 1):
        macs += pixels[i] * (2 * c[i] + c[i]) * k[i] * k[i]
    return int(macs)


def _double_conv_macs(cin: int, cout: int, k: int, conv: str) -> int:
    """Multiply-accumulates per output pixel of a double conv (BN and ReLU ignored)."""
    total = 0
    for c in (cin, cout):
        total += c * k * k + c * cout if conv == "separable" else c * cout * k * k
    return total


def count_macs(arch: Arch, in_channels: int, num_classes: int, h: int, w: int) -> int:
    """Analytic multiply-accumulate count of one forward pass on a (1, in_channels, h, w) input."""
    validate_arch(arch)
    check_size(h, arch, what="height")
    check_size(w, arch, what="width")
    c, k = arch.channels, arch.kernels
    pixels = [(h >> i) * (w >> i) for i in range(arch.levels)]
    macs = 0
    prev = in_channels
    for i in range(arch.levels):
        macs += pixels[i] * _double_conv_macs(prev, c[i], k[i], arch.conv)
        prev = c[i]
    for i in range(arch.levels - 1):
        # Transposed conv k2 s2: each input pixel feeds a 2x2 patch, so cin*cout per output pixel.
        # Bilinear: 1x1 conv at the coarse level; the resize itself is ignored.
        up = pixels[i] if arch.upsample == "transpose" else pixels[i + 1]
        macs += up * c[i + 1] * c[i]
        macs += pixels[i] * _double_conv_macs(2 * c[i], c[i], k[i], arch.conv)
    macs += pixels[0] * c[0] * num_classes
    return int(macs)
