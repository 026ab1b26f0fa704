"""Dscint layer shapes and parameter count pinned to paper Table 4 / field notes §2."""

from __future__ import annotations

import torch
from torch import nn

from model.dscint import Dscint, HybridAttention, count_parameters, feature_shape


def _shapes(net: Dscint) -> list[tuple[str, tuple[int, ...]]]:
    shapes: list[tuple[str, tuple[int, ...]]] = []
    x = torch.zeros(1, 1, 1024, 256)
    for layer in net.features:
        x = layer(x)
        shapes.append((type(layer).__name__, tuple(x.shape[1:])))
    return shapes


def test_layer_shapes_follow_table_4() -> None:
    net = Dscint().eval()
    weighted = [(n, s) for n, s in _shapes(net) if n in {"Conv2d", "MaxPool2d", "HybridAttention"}]
    assert weighted == [
        ("Conv2d", (16, 255, 63)),       # 11x11/16, stride 4, pad 2
        ("MaxPool2d", (16, 127, 31)),    # 3, stride 2
        ("HybridAttention", (16, 127, 31)),
        ("Conv2d", (16, 127, 31)),       # 5x5/16, pad 2
        ("MaxPool2d", (16, 63, 15)),     # 3, stride 2
        ("Conv2d", (24, 63, 15)),        # 3 x 3x3/24, pad 1
        ("Conv2d", (24, 63, 15)),
        ("Conv2d", (24, 63, 15)),
        ("MaxPool2d", (24, 61, 13)),     # 3, stride 1
    ]
    assert feature_shape() == (24, 61, 13)
    fcs = [m for m in net.classifier if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in fcs] == [
        (24 * 61 * 13, 1024), (1024, 1024), (1024, 4)]


def test_batchnorm_after_second_and_fifth_convolution() -> None:
    kinds = [type(m).__name__ for m in Dscint().features]
    conv_positions = [i for i, k in enumerate(kinds) if k == "Conv2d"]
    assert kinds[conv_positions[1] + 1] == "BatchNorm2d"
    assert kinds[conv_positions[4] + 1] == "BatchNorm2d"
    assert kinds.count("BatchNorm2d") == 2
    assert "Dropout" not in kinds


def test_parameter_count_about_20_57_million_with_fc1_dominant() -> None:
    net = Dscint()
    total = count_parameters(net)
    fc1 = count_parameters(net.classifier[1])
    assert abs(total - 20_570_000) < 10_000
    assert 0.94 < fc1 / total < 0.96


def test_attention_is_cbam_with_reduction_16_and_7x7() -> None:
    att = HybridAttention(16)
    assert att.channel.mlp[0].out_features == 1  # 16 / 16
    assert att.spatial.conv.kernel_size == (7, 7)
    assert att.spatial.conv.in_channels == 2
    x = torch.rand(2, 16, 20, 10)
    y = att(x)
    assert y.shape == x.shape
    assert torch.all(y <= x + 1e-6)  # sigmoid gates only attenuate non-negative input


def test_forward_gives_four_logits_per_image() -> None:
    net = Dscint().eval()
    with torch.no_grad():
        out = net(torch.rand(3, 1, 1024, 256))
    assert out.shape == (3, 4)
    assert torch.isfinite(out).all()
