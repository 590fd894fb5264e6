import hashlib
import io
from collections.abc import Callable

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from autoseg.unet import Arch, build_unet, count_macs, count_params, depthwise_macs, validate_arch

# Ops that export cleanly with dynamic H/W (BatchNormalization may survive if not folded into Conv).
ALLOWED_OPS = {"Conv", "ConvTranspose", "MaxPool", "Resize", "Concat", "Relu", "BatchNormalization", "Constant"}


def test_key_digest_and_dict_roundtrip():
    a = Arch(kernels=(3, 5), channels=(16, 64), conv="separable", upsample="bilinear")
    assert a.levels == 2 and a.multiple == 2
    assert a.key() == "k3-5_c16-64_separable_bilinear"
    assert a.digest() == hashlib.sha1(a.key().encode()).hexdigest()[:12]
    assert Arch.from_dict(a.to_dict()) == a
    # Lists (JSON, Optuna) give the same, hashable arch.
    b = Arch(kernels=[3, 5], channels=[16, 64], conv="separable", upsample="bilinear")
    assert b == a and hash(b) == hash(a) and b.digest() == a.digest()
    assert Arch((3,), (8,)).key() == "k3_c8_standard_transpose"
    assert Arch((3,), (8,)).multiple == 1


@pytest.mark.parametrize(
    ("arch", "match"),
    [
        (Arch((), ()), "levels must be in 1..6"),
        (Arch((3,) * 7, (8,) * 7), "levels must be in 1..6"),
        (Arch((3, 4), (8, 16)), "kernel 4 at level 1 is even"),
        (Arch((3, 9), (8, 16)), "kernel 9 at level 1 is not supported"),
        (Arch((1,), (8,)), "kernel 1 at level 0 is not supported"),
        (Arch((3, 3), (8,)), "kernels has 2 entries but channels has 1"),
        (Arch((3,), (8, 16)), "kernels has 1 entries but channels has 2"),
        (Arch((3, 3, 3), (8, 32, 16)), "channels decrease from 32 to 16 at level 2"),
        (Arch((3, 3), (0, 16)), "channels at level 0 must be a positive integer"),
        (Arch((3, 3), (-8, 16)), "channels at level 0 must be a positive integer"),
        (Arch((3,), (8,), conv="dilated"), "unknown conv 'dilated'"),
        (Arch((3,), (8,), upsample="nearest"), "unknown upsample 'nearest'"),
    ],
)
def test_invalid_arch(arch, match):
    with pytest.raises(ValueError, match=match):
        validate_arch(arch)
    with pytest.raises(ValueError, match=match):
        build_unet(arch, 3, 2)


def test_tile_divisibility_names_nearest_sizes():
    a = Arch((3,) * 4, (8, 16, 32, 64))
    with pytest.raises(ValueError) as e:
        validate_arch(a, tile=100)
    assert str(e.value) == "tile 100 is not divisible by 8 (4 levels); use 96 or 104"
    with pytest.raises(ValueError, match=r"tile 4 is not divisible by 8 \(4 levels\); use 8$"):
        validate_arch(a, tile=4)
    validate_arch(a, tile=96)
    validate_arch(Arch((7,), (8,)), tile=37)  # one level: any size
    validate_arch(Arch((3,) * 6, (4,) * 6), tile=32)


def test_forward_rejects_bad_input_size():
    net = build_unet(Arch((3, 3, 3), (4, 8, 8)), 1, 2)
    with pytest.raises(ValueError, match="input 30x32 is not divisible by 4; pad it to 32x32"):
        net(torch.zeros(1, 1, 30, 32))


@pytest.mark.parametrize("conv", ["standard", "separable"])
@pytest.mark.parametrize("upsample", ["transpose", "bilinear"])
def test_output_shape_and_counts(conv, upsample):
    arch = Arch((3, 5, 7), (4, 8, 8), conv=conv, upsample=upsample)
    net = build_unet(arch, 3, 5).eval()
    out = net(torch.randn(2, 3, 16, 24))
    assert out.shape == (2, 5, 16, 24)
    assert count_params(net) == sum(p.numel() for p in net.parameters()) > 0
    assert count_macs(arch, 3, 5, 16, 24) == _hook_macs(net, torch.randn(1, 3, 16, 24))


def test_count_macs_by_hand():
    # One level, k3, 1 -> 4 channels, 2 classes on 8x8: two 3x3 convs plus the 1x1 head.
    assert count_macs(Arch((3,), (4,)), 1, 2, 8, 8) == 64 * (1 * 4 * 9 + 4 * 4 * 9) + 64 * 4 * 2
    # Separable: depthwise k*k*c + pointwise c*cout per conv.
    assert count_macs(Arch((3,), (4,), conv="separable"), 1, 2, 8, 8) == 64 * (9 + 4 + 36 + 16) + 64 * 8


@pytest.mark.parametrize(
    "arch",
    [
        Arch((3,), (8,)),
        Arch((3, 3), (8, 16)),
        Arch((5, 3, 7, 3), (4, 8, 8, 16), "separable", "transpose"),
        Arch((3, 5, 3, 3, 3, 3), (2, 4, 4, 8, 8, 16), "standard", "bilinear"),
    ],
)
def test_count_macs_matches_hooks(arch):
    net = build_unet(arch, 3, 4)
    h, w = 2 * arch.multiple, 3 * arch.multiple
    assert count_macs(arch, 3, 4, h, w) == _hook_macs(net, torch.randn(1, 3, h, w))


@pytest.mark.parametrize("arch", [Arch((5, 3, 7), (4, 8, 16), "separable", "transpose"),
                                  Arch((3, 5), (8, 8), "separable", "bilinear"), Arch((3, 3), (8, 16))])
def test_depthwise_macs_are_the_depthwise_convs_share_of_the_macs(arch):
    net = build_unet(arch, 3, 4)
    h, w = 2 * arch.multiple, 3 * arch.multiple
    depthwise = _hook_macs(net, torch.randn(1, 3, h, w), lambda m: m.groups > 1)
    assert depthwise_macs(arch, 3, h, w) == depthwise
    assert (depthwise > 0) == (arch.conv == "separable")


def test_count_macs_rejects_bad_size():
    with pytest.raises(ValueError, match="height 30 is not divisible by 4"):
        count_macs(Arch((3, 3, 3), (4, 8, 8)), 3, 2, 30, 32)


@pytest.mark.parametrize("upsample", ["transpose", "bilinear"])
def test_onnx_export_dynamic_hw(upsample):
    torch.manual_seed(0)
    net = build_unet(Arch((3, 5, 3), (4, 8, 16), "separable", upsample), 3, 3)
    # A few training steps make BN statistics non-trivial before export.
    net.train()
    for _ in range(2):
        net(torch.randn(4, 3, 32, 32))
    net.eval()
    buf = io.BytesIO()
    torch.onnx.export(
        net,
        (torch.randn(1, 3, 32, 32),),
        buf,
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "n", 2: "h", 3: "w"}, "logits": {0: "n", 2: "h", 3: "w"}},
    )
    import onnx

    model = onnx.load_from_string(buf.getvalue())
    ops = {n.op_type for n in model.graph.node}
    assert ops <= ALLOWED_OPS, ops - ALLOWED_OPS
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 32, 32), (2, 3, 48, 64)]:
        x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
        (got,) = sess.run(None, {"input": x})
        with torch.no_grad():
            want = net(torch.from_numpy(x)).numpy()
        assert got.shape == (shape[0], 3, shape[2], shape[3])
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def _hook_macs(net: nn.Module, x: torch.Tensor, which: Callable[[nn.Module], bool] = lambda m: True) -> int:
    """MACs of the Conv2d/ConvTranspose2d layers (`which` of them) seen on a real forward pass (batch of 1)."""
    total = 0

    def hook(m, inputs, out):
        nonlocal total
        kh, kw = m.kernel_size
        if isinstance(m, nn.ConvTranspose2d):
            # every input pixel is spread over a kh x kw patch of each output channel
            total += inputs[0][0].numel() * (m.out_channels // m.groups) * kh * kw
        else:
            total += out[0].numel() * (m.in_channels // m.groups) * kh * kw

    handles = [m.register_forward_hook(hook) for m in net.modules()
               if isinstance(m, nn.Conv2d | nn.ConvTranspose2d) and which(m)]
    with torch.no_grad():
        net.eval()(x)
    for h in handles:
        h.remove()
    return total
