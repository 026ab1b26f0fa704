"""Dscint (Lin et al., Med Phys 2021, Table 4) with CBAM hybrid attention (eq. 2-4).

Layer list exactly as Table 4; the paper does not name activations, so ReLU follows every
convolution and the first two fully connected layers (as in AlexNet-style nets it is modelled on).
BatchNorm follows the 2nd and 5th convolutions (§2.4.3), before their ReLU. No dropout: the paper
lists none (deviation policy: none taken).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.classes import INPUT_COLS, INPUT_ROWS, NUM_CLASSES


class ChannelAttention(nn.Module):
    """Eq. 3: sigma(MLP(avgpool F) + MLP(maxpool F)) with a shared MLP, reduction 16."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels)
        )

    def forward(self, x: Tensor) -> Tensor:
        avg = self.mlp(torch.mean(x, dim=(2, 3)))
        mx = self.mlp(torch.amax(x, dim=(2, 3)))
        return torch.sigmoid(avg + mx)[:, :, None, None]


class SpatialAttention(nn.Module):
    """Eq. 4: sigma(conv7x7([avg_c F; max_c F]))."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        avg = torch.mean(x, dim=1, keepdim=True)
        mx = torch.amax(x, dim=1, keepdim=True)
        return torch.sigmoid(self.conv(torch.cat([avg, mx], dim=1)))


class HybridAttention(nn.Module):
    """Eq. 2 (CBAM order): channel attention first, then spatial attention on the result."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        x = x * self.channel(x)
        return x * self.spatial(x)


def _feature_extractor() -> nn.Sequential:
    """Table 4 up to the last pooling layer."""
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=11, stride=4, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        HybridAttention(16, reduction=16, kernel_size=7),
        nn.Conv2d(16, 16, kernel_size=5, stride=1, padding=2),
        nn.BatchNorm2d(16),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(16, 24, kernel_size=3, stride=1, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(24, 24, kernel_size=3, stride=1, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(24, 24, kernel_size=3, stride=1, padding=1),
        nn.BatchNorm2d(24),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=1),
    )


def feature_shape(rows: int = INPUT_ROWS, cols: int = INPUT_COLS) -> tuple[int, int, int]:
    """Shape (C, H, W) after the last pooling layer for a given input size."""
    with torch.no_grad():
        out = _feature_extractor().eval()(torch.zeros(1, 1, rows, cols))
    c, h, w = out.shape[1:]
    return int(c), int(h), int(w)


class Dscint(nn.Module):
    """The network; forward returns logits (softmax is applied by the exported wrapper)."""

    def __init__(self, num_classes: int = NUM_CLASSES, rows: int = INPUT_ROWS,
                 cols: int = INPUT_COLS) -> None:
        super().__init__()
        c, h, w = feature_shape(rows, cols)
        self.features = _feature_extractor()
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c * h * w, 1024),
            nn.ReLU(inplace=True),
            nn.Linear(1024, 1024),
            nn.ReLU(inplace=True),
            nn.Linear(1024, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class DscintProbabilities(nn.Module):
    """What gets exported: preprocessed (N, 1, 1024, 256) in, softmax probabilities out."""

    def __init__(self, net: Dscint) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(self.net(x), dim=1)


def count_parameters(module: nn.Module) -> int:
    """Trainable parameter count."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
