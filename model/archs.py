"""The networks the paper compares (Table 7/8): Dscint and five classical CNNs.

Baselines come from torchvision (AlexNet, ResNet-18, VGG-16, DenseNet-121) and timm
(Inception-v4), built without pretrained weights (nothing can be downloaded here, and the paper
trained them with the same Table 5 settings as Dscint), with one input channel and four outputs.
torchvision and timm are the optional `baselines` extra (torch 2.14.1 + torchvision 0.29.1):
they are imported inside functions only, so the node and Dscint never need them.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from model.classes import NUM_CLASSES
from model.dscint import Dscint

log = logging.getLogger(__name__)

BASELINES_HINT = "pip install -e '.[baselines]' (torch==2.14.1 torchvision==0.29.1 timm)"


@dataclass(frozen=True)
class Arch:
    """A selectable network: CLI key, the name the paper's tables use, what it needs."""

    key: str
    display: str
    needs: tuple[str, ...]  # importable packages beyond torch


ARCHS: dict[str, Arch] = {a.key: a for a in (
    Arch("dscint", "Dscint", ()),
    Arch("alexnet", "AlexNet", ("torchvision",)),
    Arch("resnet18", "ResNet-18", ("torchvision",)),
    Arch("vgg16", "VGG-16", ("torchvision",)),
    Arch("inception_v4", "Inception-v4", ("timm",)),
    Arch("densenet121", "DenseNet-121", ("torchvision",)),
)}
BASELINE_KEYS: tuple[str, ...] = tuple(k for k in ARCHS if k != "dscint")


class ArchError(ValueError):
    """Unknown network, or one whose optional packages are not installed."""


def get_arch(key: str) -> Arch:
    """Look a network up by its CLI key; the error lists the valid keys."""
    try:
        return ARCHS[key]
    except KeyError:
        raise ArchError(f"unknown network {key!r}; expected one of: {', '.join(ARCHS)}") \
            from None


def missing_packages(key: str) -> list[str]:
    """Packages a network needs that are not importable (empty: it can be built)."""
    return [p for p in get_arch(key).needs if importlib.util.find_spec(p) is None]


def unavailable_reason(key: str) -> str | None:
    """Why a network cannot be built here, or None; used for skips and CLI errors."""
    missing = missing_packages(key)
    if not missing:
        return None
    return (f"{get_arch(key).display} needs {', '.join(missing)} (the 'baselines' extra): "
            f"{BASELINES_HINT}")


def _one_channel_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """The same first convolution for a single-channel (grey count) input."""
    return nn.Conv2d(1, conv.out_channels, conv.kernel_size,  # type: ignore[arg-type]
                     stride=conv.stride, padding=conv.padding,  # type: ignore[arg-type]
                     bias=conv.bias is not None)


def _alexnet(num_classes: int) -> nn.Module:
    from torchvision.models import alexnet
    net = alexnet(weights=None, num_classes=num_classes)
    net.features[0] = _one_channel_conv(net.features[0])
    return net


def _resnet18(num_classes: int) -> nn.Module:
    from torchvision.models import resnet18
    net = resnet18(weights=None, num_classes=num_classes)
    net.conv1 = _one_channel_conv(net.conv1)
    return net


def _vgg16(num_classes: int) -> nn.Module:
    from torchvision.models import vgg16
    net = vgg16(weights=None, num_classes=num_classes)
    net.features[0] = _one_channel_conv(net.features[0])
    return net


def _densenet121(num_classes: int) -> nn.Module:
    from torchvision.models import densenet121
    net = densenet121(weights=None, num_classes=num_classes)
    net.features.conv0 = _one_channel_conv(net.features.conv0)
    return net


def _inception_v4(num_classes: int) -> nn.Module:
    import timm
    net: nn.Module = timm.create_model("inception_v4", pretrained=False,
                                       num_classes=num_classes, in_chans=1)
    return net


_BUILDERS: dict[str, Callable[[int], nn.Module]] = {
    "dscint": lambda k: Dscint(num_classes=k),
    "alexnet": _alexnet,
    "resnet18": _resnet18,
    "vgg16": _vgg16,
    "inception_v4": _inception_v4,
    "densenet121": _densenet121,
}


def build_network(key: str, num_classes: int = NUM_CLASSES) -> nn.Module:
    """A freshly initialised network returning logits for (N, 1, 1024, 256) input."""
    reason = unavailable_reason(key)
    if reason:
        raise ArchError(reason)
    return _BUILDERS[key](num_classes)


def set_channels_last(net: nn.Module, on: bool = True) -> nn.Module:
    """Weights in NHWC (on) or NCHW (off) layout, in place; NHWC convolutions train faster on
    this CPU, NCHW is what gets exported."""
    fmt = torch.channels_last if on else torch.contiguous_format
    return net.to(memory_format=fmt)  # type: ignore[call-overload]


class Probabilities(nn.Module):
    """What gets exported for any network: preprocessed input in, softmax probabilities out.

    The attribute is named `net` as in DscintProbabilities, so weights hash the same way.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(self.net(x), dim=1)
