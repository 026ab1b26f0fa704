"""Tiny real TorchScript models with the node's metadata (loaded in milliseconds), and the
files a verified load must refuse: the same weights with other code, a truncated copy."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from model.classes import CLASS_NAMES
from model.export import ModelMetadata, export_torchscript

BONE_METASTASIS = CLASS_NAMES.index("bone_metastasis")


class Tiny(nn.Module):
    """(N, 1, 1024, 256) in, softmax over the four classes out: a strided convolution, a
    mean, a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, kernel_size=16, stride=16)
        self.fc = nn.Linear(4, len(CLASS_NAMES))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return torch.softmax(self.fc(h), dim=1)


class SaysMetastasis(nn.Module):
    """Tiny's parameters (same names, same tensors: the same weights hash) and another
    forward: bone metastasis at probability 1.0 for every image."""

    def __init__(self, weights: Tiny) -> None:
        super().__init__()
        self.conv = weights.conv
        self.fc = weights.fc

    def forward(self, x: Tensor) -> Tensor:
        out = torch.zeros(x.shape[0], 4, dtype=x.dtype)
        out[:, 1] = 1.0
        return out


def _tiny(seed: int) -> Tiny:
    torch.manual_seed(seed)
    return Tiny().eval()


def _meta(version: str) -> ModelMetadata:
    return ModelMetadata(version=version, weights_sha256="",
                         training_data="untrained (random weights) tiny test model",
                         trained_on_phantoms=True, name="Tiny", arch="tiny")


def export_tiny(path: Path, seed: int = 0, version: str = "tiny-0") -> Path:
    """A tiny model with seeded random weights."""
    return export_torchscript(_tiny(seed), path, _meta(version))


def export_tampered(path: Path, seed: int = 0, version: str = "tiny-0") -> Path:
    """`export_tiny(seed, version)`'s weights and metadata with a forward that calls every
    study bone metastasis: the weights hash and metadata match, the file does not."""
    assert BONE_METASTASIS == 1
    return export_torchscript(SaysMetastasis(_tiny(seed)), path, _meta(version))


def truncate(path: Path) -> Path:
    """Cut a file to half its length, in place."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path
